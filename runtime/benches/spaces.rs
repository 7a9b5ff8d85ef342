//! Chunk-space benchmark. Prints, from one run on this machine, each figure next to the
//! baseline it is judged against:
//! - shared-memory cache hit throughput for 1 MiB chunks against `memcpy` of 1 MiB
//!   (target ≥ 0.9×), with and without the hit's crc32c check;
//! - 4 KiB cache hit latency against a read through the daemon's Unix socket (target ≤ 0.1×);
//! - write throughput through a lease buffer (start_write/stop_write) against write through the
//!   socket, for volatile and durable spaces, 4 KiB and 1 MiB;
//! - durable 4 KiB writes by group commit: the latency of one writer, and the throughput
//!   of 8 concurrent writers (own connections, own chunks) against 1 (target ≥ 3×);
//! - Redis (`redis-server` on a Unix socket, started here: no persistence as the peer of
//!   volatile spaces, `appendonly yes` + `appendfsync always` as the peer of durable ones,
//!   its files on the same filesystem as the daemon's data directory) doing GET and SET
//!   of the same sizes; a durable 4 KiB write against a Redis SET (target ≤ 1.0×).
//!
//! Run: `cargo bench -p strata-runtime --bench spaces`. `STRATA_BENCH_QUICK=1` shortens it
//! (used by the test script so that it cannot rot).

use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_client::*;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path, what: &str) {
    let t0 = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_stratad(dir: &Path, shm: &Path) -> Proc {
    std::fs::write(
        dir.join("stratad.toml"),
        format!(
            "log = \"warn\"\n[spaces]\nshm_dir = {:?}\n",
            shm.display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_stratad"))
        .arg("--config")
        .arg(dir.join("stratad.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start stratad");
    wait_for_socket(&dir.join("s.sock"), "stratad");
    Proc(child)
}

/// Median seconds per iteration over `rounds` rounds of `iters` iterations.
fn per_op(rounds: usize, iters: u64, mut f: impl FnMut()) -> f64 {
    for _ in 0..(iters / 10).max(1) {
        f();
    }
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn gib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / (1u64 << 30) as f64
}

fn fmt_t(secs: f64) -> String {
    if secs < 1e-6 {
        format!("{:.0} ns", secs * 1e9)
    } else if secs < 1e-3 {
        format!("{:.1} µs", secs * 1e6)
    } else {
        format!("{:.2} ms", secs * 1e3)
    }
}

/// A minimal RESP client (SET / GET of binary values) on a Unix socket.
struct Redis {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Redis {
    fn connect(p: &Path) -> Redis {
        let s = UnixStream::connect(p).expect("connect redis");
        Redis {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
    fn cmd(&mut self, parts: &[&[u8]]) {
        let mut out = format!("*{}\r\n", parts.len()).into_bytes();
        for p in parts {
            out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out).unwrap();
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    fn set(&mut self, k: &str, v: &[u8]) {
        self.cmd(&[b"SET", k.as_bytes(), v]);
        let l = self.line();
        assert!(l.starts_with("+OK"), "redis SET: {l}");
    }
    fn get(&mut self, k: &str, buf: &mut Vec<u8>) {
        self.cmd(&[b"GET", k.as_bytes()]);
        let l = self.line();
        let n: usize = l[1..].trim().parse().expect("redis bulk length");
        buf.resize(n + 2, 0);
        self.r.read_exact(buf).unwrap();
        buf.truncate(n);
    }
    fn config(&mut self, args: &[&[u8]]) {
        self.cmd(args);
        let l = self.line();
        assert!(l.starts_with('+'), "redis {args:?}: {l}");
    }
}

fn start_redis(dir: &Path, name: &str, durable: bool) -> Option<(Proc, PathBuf)> {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", "0", "--unixsocket"])
        .arg(&sock)
        .args(["--dir"])
        .arg(dir)
        .args(["--save", "", "--daemonize", "no", "--logfile", ""])
        .args(["--dbfilename", &format!("{name}.rdb")])
        .args(["--appenddirname", &format!("{name}-aof")]);
    if durable {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_socket(&sock, "redis-server");
    Some((Proc(child), sock))
}

/// Writes per second of `writers` connections each writing 4 KiB to its own chunk of the
/// durable space `dur`, `per_writer` times (median of `rounds` rounds).
fn durable_writers(
    sock: &Path,
    writers: usize,
    per_writer: u64,
    rounds: usize,
    data: &[u8],
) -> f64 {
    let mut clients: Vec<Client> = (0..writers)
        .map(|_| Client::connect(sock).unwrap())
        .collect();
    let mut v: Vec<f64> = (0..rounds)
        .map(|round| {
            let start = std::sync::Barrier::new(writers + 1);
            let t = std::thread::scope(|s| {
                for (i, c) in clients.iter_mut().enumerate() {
                    let start = &start;
                    s.spawn(move || {
                        let chunk = format!("gc{i}");
                        // one unmeasured write first: the chunk exists and the connection is warm
                        if round == 0 {
                            assert!(matches!(
                                c.write("dur", &chunk, data).unwrap(),
                                WriteStatus::Ok(_)
                            ));
                        }
                        start.wait();
                        for _ in 0..per_writer {
                            assert!(matches!(
                                c.write("dur", &chunk, data).unwrap(),
                                WriteStatus::Ok(_)
                            ));
                        }
                    });
                }
                start.wait();
                Instant::now()
            });
            (writers as u64 * per_writer) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Records per second of `writers` threads each storing a 4 KiB chunk record `each` times
/// straight into the spaces' store (redb in `dir`, no daemon), and records per commit.
fn store_writers(dir: &Path, writers: usize, each: usize, data: &[u8]) -> (f64, f64) {
    use strata_runtime::space::core::ChunkMeta;
    use strata_runtime::space::durable::Durable;
    let path = dir.join(format!("store-{writers}.redb"));
    let db = std::sync::Arc::new(strata_runtime::store::Db::open(&path).unwrap());
    let d = Durable::open(db).unwrap();
    let meta = ChunkMeta {
        version: 1,
        valid: true,
        len: data.len() as u64,
        crc: 0,
    };
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let d = &d;
            s.spawn(move || {
                for _ in 0..each {
                    d.put_chunk("s", &format!("c{w}"), &meta, data.to_vec())
                        .unwrap();
                }
            });
        }
    });
    let rate = (writers * each) as f64 / t.elapsed().as_secs_f64();
    let (batches, records) = d.commits();
    let _ = std::fs::remove_file(&path);
    (rate, records as f64 / batches as f64)
}

fn main() {
    let quick = std::env::var_os("STRATA_BENCH_QUICK").is_some();
    let rounds = if quick { 3 } else { 7 };
    let scale = if quick { 1 } else { 10 };
    let tmp = tempfile::Builder::new()
        .prefix("strata-bench")
        .tempdir()
        .unwrap();
    let shm = tempfile::Builder::new()
        .prefix("strata-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    let _d = start_stratad(tmp.path(), shm.path());
    let sock = tmp.path().join("s.sock");
    let mut c = Client::connect(&sock).unwrap();
    for (space, volatile) in [("vol", true), ("dur", false)] {
        let opts = SpaceOptions {
            volatile,
            slot_size: Some(1 << 20),
            slots: Some(64),
            ..SpaceOptions::default()
        };
        assert_eq!(c.create(space, opts).unwrap(), CreateStatus::Ok);
    }
    let mib: Vec<u8> = (0..1usize << 20).map(|i| (i * 31 + 7) as u8).collect();
    let kib4: Vec<u8> = mib[..4096].to_vec();
    c.write("vol", "big", &mib).unwrap();
    c.write("vol", "small", &kib4).unwrap();

    println!(
        "chunk spaces benchmark ({} mode, median of {rounds} rounds)",
        if quick { "quick" } else { "full" }
    );
    if cfg!(debug_assertions) {
        println!("(unoptimized build: these figures only show that the benchmark runs; use `cargo bench`)");
    }
    println!();
    // 1. 1 MiB hit vs memcpy
    let mut dst = vec![0u8; 1 << 20];
    let memcpy = per_op(rounds, 200 * scale, || {
        dst.copy_from_slice(black_box(&mib));
        black_box(&mut dst);
    });
    let mut buf = Vec::with_capacity(1 << 20);
    c.set_verify(false);
    let hit = per_op(rounds, 200 * scale, || {
        let r = c.read_into("vol", "big", &mut buf).unwrap();
        assert!(matches!(
            r,
            ReadInto::Ok {
                from_cache: true,
                ..
            }
        ));
    });
    assert_eq!(buf, mib);
    c.set_verify(true);
    let hit_crc = per_op(rounds, 200 * scale, || {
        let r = c.read_into("vol", "big", &mut buf).unwrap();
        assert!(matches!(
            r,
            ReadInto::Ok {
                from_cache: true,
                ..
            }
        ));
    });
    println!("1 MiB read");
    println!(
        "  memcpy (baseline)                 {:>8.2} GiB/s",
        gib_s(1 << 20, memcpy)
    );
    println!(
        "  shm cache hit                     {:>8.2} GiB/s   {:.2}x memcpy (target >= 0.9)",
        gib_s(1 << 20, hit),
        memcpy / hit
    );
    println!(
        "  shm cache hit + crc32c check      {:>8.2} GiB/s   {:.2}x memcpy",
        gib_s(1 << 20, hit_crc),
        memcpy / hit_crc
    );
    // 2. 4 KiB hit vs socket round trip
    let mut sc = Client::connect(&sock).unwrap();
    sc.set_use_cache(false);
    let socket_read = per_op(rounds, 2_000 * scale, || {
        let r = sc.read_into("vol", "small", &mut buf).unwrap();
        assert!(matches!(
            r,
            ReadInto::Ok {
                from_cache: false,
                ..
            }
        ));
    });
    c.set_verify(false);
    let small_hit = per_op(rounds, 50_000 * scale, || {
        let r = c.read_into("vol", "small", &mut buf).unwrap();
        assert!(matches!(
            r,
            ReadInto::Ok {
                from_cache: true,
                ..
            }
        ));
    });
    c.set_verify(true);
    let small_hit_crc = per_op(rounds, 50_000 * scale, || {
        let r = c.read_into("vol", "small", &mut buf).unwrap();
        assert!(matches!(
            r,
            ReadInto::Ok {
                from_cache: true,
                ..
            }
        ));
    });
    println!("4 KiB read latency");
    println!(
        "  through the daemon's socket (baseline) {:>9}",
        fmt_t(socket_read)
    );
    println!(
        "  shm cache hit                          {:>9}   {:.3}x socket (target <= 0.1)",
        fmt_t(small_hit),
        small_hit / socket_read
    );
    println!(
        "  shm cache hit + crc32c check           {:>9}   {:.3}x socket",
        fmt_t(small_hit_crc),
        small_hit_crc / socket_read
    );
    // 3. writes: through a lease buffer vs through the socket
    println!("writes (per write; throughput)");
    let mut results = Vec::new();
    for (space, label) in [("vol", "volatile"), ("dur", "durable")] {
        for (data, size) in [(&kib4, "4 KiB"), (&mib, "1 MiB")] {
            let iters = match (space, data.len()) {
                ("vol", 4096) => 2_000 * scale,
                ("vol", _) => 100 * scale,
                (_, _) => 20 * scale,
            };
            let sock_w = per_op(rounds, iters, || {
                assert!(matches!(
                    c.write(space, "w", data).unwrap(),
                    WriteStatus::Ok(_)
                ));
            });
            let lease_w = per_op(rounds, iters, || {
                match c.start_write(space, "w", false, None, false).unwrap() {
                    StartWriteStatus::Ok(mut l) => {
                        l.fill(data).unwrap();
                        assert!(matches!(c.stop_write(l).unwrap(), WriteStatus::Ok(_)));
                    }
                    other => panic!("{other:?}"),
                }
            });
            println!(
                "  {label:<8} {size}: write via socket {:>9} ({:>7.1} MiB/s)   start_write/stop_write {:>9} ({:>7.1} MiB/s)   {:.2}x faster",
                fmt_t(sock_w),
                data.len() as f64 / sock_w / (1 << 20) as f64,
                fmt_t(lease_w),
                data.len() as f64 / lease_w / (1 << 20) as f64,
                sock_w / lease_w
            );
            results.push((label, size, sock_w, lease_w));
        }
    }
    // 4. durable 4 KiB writes, concurrent writers sharing fsyncs (group commit)
    let per_writer = 20 * scale;
    let one = durable_writers(&sock, 1, per_writer * 4, rounds, &kib4);
    let eight = durable_writers(&sock, 8, per_writer, rounds, &kib4);
    let dur_4k = results
        .iter()
        .find(|(l, s, _, _)| *l == "durable" && *s == "4 KiB")
        .map(|x| x.2)
        .unwrap();
    println!(
        "durable 4 KiB writes (write via socket; group commit: concurrent writers share fsyncs)"
    );
    println!("  1 writer latency                  {:>9}", fmt_t(dur_4k));
    println!("  1 writer                          {:>9.0} writes/s", one);
    println!(
        "  8 writers                         {:>9.0} writes/s   {:.2}x 1 writer (target >= 3)",
        eight,
        eight / one
    );
    let (s1, _) = store_writers(tmp.path(), 1, (per_writer * 4) as usize, &kib4);
    let (s8, per8) = store_writers(tmp.path(), 8, per_writer as usize, &kib4);
    println!(
        "  store only (no daemon): 1 writer {s1:>6.0} writes/s, 8 writers {s8:>6.0} writes/s ({per8:.1} per commit)   {:.2}x",
        s8 / s1
    );
    // 5. Redis, same sizes
    println!("Redis (redis-server on a Unix socket, same machine, same run)");
    let redis_ok = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    if !redis_ok {
        println!("  REDIS MISSING: redis-server is not installed (scripts/setup.sh installs it); no Redis figures");
    } else {
        for (name, durable) in [("redis-volatile", false), ("redis-durable", true)] {
            let Some((_p, rs)) = start_redis(tmp.path(), name, durable) else {
                println!("  REDIS FAILED TO START ({name})");
                continue;
            };
            let mut r = Redis::connect(&rs);
            if !durable {
                r.config(&[b"CONFIG", b"SET", b"save", b""]);
            }
            let label = if durable { "durable" } else { "volatile" };
            for (data, size) in [(&kib4, "4 KiB"), (&mib, "1 MiB")] {
                let iters = match (durable, data.len()) {
                    (false, 4096) => 2_000 * scale,
                    (false, _) => 100 * scale,
                    _ => 20 * scale,
                };
                r.set("k", data);
                let mut got = Vec::new();
                let get = per_op(rounds, iters, || r.get("k", &mut got));
                assert_eq!(&got, data);
                let set = per_op(rounds, iters, || r.set("k", data));
                let ours = results
                    .iter()
                    .find(|(l, s, _, _)| *l == label && *s == size)
                    .map(|x| x.3)
                    .unwrap();
                let our_read = if data.len() == 4096 {
                    small_hit_crc
                } else {
                    hit_crc
                };
                println!(
                    "  {label:<8} {size}: GET {:>9}  SET {:>9}   strata hit (crc) {:.3}x GET, start_write/stop_write {:.2}x SET time",
                    fmt_t(get),
                    fmt_t(set),
                    our_read / get,
                    ours / set
                );
                if durable && data.len() == 4096 {
                    println!(
                        "  durable 4 KiB write via socket {:>9} against SET with appendfsync always {:>9}: {:.2}x (target <= 1.0)",
                        fmt_t(dur_4k),
                        fmt_t(set),
                        dur_4k / set
                    );
                }
            }
        }
    }
    println!();
    println!("(ratios: time of ours / time of the baseline for latencies; baseline / ours for throughput)");
}
