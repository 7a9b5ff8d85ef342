//! Chunk spaces end to end: a real `stratad`, the real socket, the client library and the
//! CLI, the shared-memory cache (regions lent by the daemon).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_client::*;
use strata_tests::{is_root, Daemon};

fn client(d: &Daemon) -> Client {
    Client::connect(d.socket()).expect("connect")
}

fn host(d: &Daemon) -> String {
    assert_eq!(client(d).hosts("probe-none").unwrap(), HostsStatus::NoExist);
    // the daemon names itself in every host list: make a space to ask
    let mut c = client(d);
    let _ = c.create("hostprobe", SpaceOptions::default());
    match c.hosts("hostprobe").unwrap() {
        HostsStatus::Ok(h) => h[0].clone(),
        other => panic!("{other:?}"),
    }
}

fn small() -> SpaceOptions {
    SpaceOptions {
        slot_size: Some(64 << 10),
        slots: Some(32),
        ..SpaceOptions::default()
    }
}

fn read_ok(c: &mut Client, space: &str, chunk: &str) -> Chunk {
    match c.read(space, chunk).unwrap() {
        ReadStatus::Ok(ch) => ch,
        other => panic!("read {space}/{chunk}: {other:?}"),
    }
}

fn write_ok(c: &mut Client, space: &str, chunk: &str, data: &[u8]) -> u64 {
    match c.write(space, chunk, data).unwrap() {
        WriteStatus::Ok(v) => v,
        other => panic!("write {space}/{chunk}: {other:?}"),
    }
}

fn lease(c: &mut Client, space: &str, chunk: &str) -> WriteLease {
    match c.start_write(space, chunk, false, None, true).unwrap() {
        StartWriteStatus::Ok(l) => l,
        other => panic!("start_write {space}/{chunk}: {other:?}"),
    }
}

fn fail_kind<T: std::fmt::Debug>(what: T) -> ReasonKind {
    let s = format!("{what:?}");
    for (k, name) in [
        (ReasonKind::NoSpace, "NoSpace"),
        (ReasonKind::BadName, "BadName"),
        (ReasonKind::TooLarge, "TooLarge"),
        (ReasonKind::Busy, "Busy"),
        (ReasonKind::CacheFull, "CacheFull"),
        (ReasonKind::Timeout, "Timeout"),
        (ReasonKind::NoLease, "NoLease"),
        (ReasonKind::Permission, "Permission"),
        (ReasonKind::Invalid, "Invalid"),
        (ReasonKind::Io, "Io"),
        (ReasonKind::Corrupted, "Corrupted"),
        (ReasonKind::NoHost, "NoHost"),
    ] {
        if s.contains(&format!("kind: {name}")) {
            return k;
        }
    }
    panic!("no reason kind in {s}");
}

#[test]
fn space_operations_give_every_seed_status() {
    let mut d =
        Daemon::start_with("[spaces]\nspawn_allow = [\"/usr/bin/touch\", \"/nonexistent/prog\"]\n");
    let me = host(&d);
    let mut c = client(&d);
    // create
    assert_eq!(c.create("s1", small()).unwrap(), CreateStatus::Ok);
    assert_eq!(c.create("s1", small()).unwrap(), CreateStatus::Exists);
    // join: joined already / unknown space / unknown host
    assert_eq!(c.join("s1", &me).unwrap(), JoinStatus::Exists);
    assert_eq!(fail_kind(c.join("nope", &me).unwrap()), ReasonKind::NoSpace);
    assert_eq!(
        fail_kind(c.join("nope", "other-host").unwrap()),
        ReasonKind::NoHost
    );
    // hosts
    assert_eq!(c.hosts("s1").unwrap(), HostsStatus::Ok(vec![me.clone()]));
    assert_eq!(c.hosts("nope").unwrap(), HostsStatus::NoExist);
    // chunk lists: all / alpha / local
    write_ok(&mut c, "s1", "a", b"one");
    write_ok(&mut c, "s1", "dir/b", b"two");
    for list in [ChunkList::All, ChunkList::Alpha, ChunkList::Local] {
        match c.chunks("s1", list).unwrap() {
            ChunkListStatus::Ok(e) => {
                let names: Vec<_> = e.iter().map(|e| e.chunk.as_str()).collect();
                assert_eq!(names, ["a", "dir/b"], "{list:?}");
                assert!(e
                    .iter()
                    .all(|e| e.alpha && e.host == me && e.version == 1 && e.cached));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        fail_kind(c.chunks("nope", ChunkList::All).unwrap()),
        ReasonKind::NoSpace
    );
    // chunk cache
    match c.cache("s1").unwrap() {
        CacheStatus::Ok { region, size } => {
            // a memfd lent over the socket: nothing in the old shm directory
            assert!(
                region.starts_with("strata.") && region.ends_with(".s1"),
                "{region}"
            );
            assert!(size > 32 * (64 << 10), "{size}");
            assert_eq!(std::fs::read_dir(&d.shm).unwrap().count(), 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fail_kind(c.cache("nope").unwrap()), ReasonKind::NoSpace);
    // unjoin / join again (the durable chunks come back)
    assert_eq!(c.unjoin("s1").unwrap(), UnjoinStatus::Ok);
    assert_eq!(c.unjoin("s1").unwrap(), UnjoinStatus::NoExist);
    assert_eq!(c.unjoin("never").unwrap(), UnjoinStatus::NoExist);
    assert_eq!(c.hosts("s1").unwrap(), HostsStatus::NoExist);
    assert_eq!(fail_kind(c.read("s1", "a").unwrap()), ReasonKind::NoSpace);
    assert_eq!(c.join("s1", &me).unwrap(), JoinStatus::Ok);
    assert_eq!(read_ok(&mut c, "s1", "a").data, b"one");
    // spawn: OK with a pid, NOSPACE, NOHOST, FAIL with errno
    let marker = d.dir.join("spawned");
    let m = marker.display().to_string();
    match c
        .spawn("s1", &me, "/usr/bin/touch", std::slice::from_ref(&m))
        .unwrap()
    {
        SpawnStatus::Ok(pid) => assert!(pid > 0),
        other => panic!("{other:?}"),
    }
    let t0 = Instant::now();
    while !marker.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(marker.exists(), "the spawned program ran");
    assert_eq!(
        c.spawn("nope", &me, "/usr/bin/touch", &[]).unwrap(),
        SpawnStatus::NoSpace
    );
    assert_eq!(
        c.spawn("s1", "other-host", "/usr/bin/touch", &[]).unwrap(),
        SpawnStatus::NoHost
    );
    match c
        .spawn("s1", &me, "/bin/rm", &["-rf".into(), "/".into()])
        .unwrap()
    {
        SpawnStatus::Fail { errno, reason } => {
            assert_eq!(errno, libc::EPERM);
            assert_eq!(reason.kind, ReasonKind::Permission);
        }
        other => panic!("{other:?}"),
    }
    match c.spawn("s1", &me, "/nonexistent/prog", &[]).unwrap() {
        SpawnStatus::Fail { errno, .. } => assert_eq!(errno, libc::ENOENT),
        other => panic!("{other:?}"),
    }
    // bad names: create is refused (the seed has no CREATE_FAIL), the rest FAIL
    assert!(
        matches!(c.create("bad/name", small()), Err(ClientError::Api(e)) if e.kind == "bad-name")
    );
    assert!(matches!(
        c.create(".hidden", small()),
        Err(ClientError::Api(_))
    ));
    assert_eq!(c.hosts("bad/name").unwrap(), HostsStatus::NoExist);
    // bad options
    let huge = SpaceOptions {
        slot_size: Some(1 << 40),
        ..SpaceOptions::default()
    };
    assert!(matches!(c.create("huge", huge), Err(ClientError::Api(e)) if e.kind == "invalid"));
    assert!(d.stop());
}

#[test]
fn transactions_give_every_seed_status() {
    let mut d = Daemon::start();
    let mut c = client(&d);
    let mut other = client(&d);
    c.create("t", small()).unwrap();
    // read: WAITING, OK, FAIL
    assert_eq!(c.read("t", "x").unwrap(), ReadStatus::Waiting);
    assert_eq!(write_ok(&mut c, "t", "x", b"v1"), 1);
    assert_eq!(write_ok(&mut c, "t", "x", b"v2"), 2);
    let ch = read_ok(&mut c, "t", "x");
    assert_eq!(
        (ch.version, &ch.data[..], ch.from_cache),
        (2, &b"v2"[..], true)
    );
    c.set_use_cache(false);
    let ch = read_ok(&mut c, "t", "x");
    assert_eq!((ch.version, ch.from_cache), (2, false));
    c.set_use_cache(true);
    assert_eq!(fail_kind(c.read("nope", "x").unwrap()), ReasonKind::NoSpace);
    assert_eq!(fail_kind(c.read("t", "a//b").unwrap()), ReasonKind::BadName);
    // write: FAIL too large / no space / bad name
    let big = vec![7u8; (64 << 10) + 1];
    assert_eq!(
        fail_kind(c.write("t", "x", &big).unwrap()),
        ReasonKind::TooLarge
    );
    assert_eq!(
        fail_kind(c.write("nope", "x", b"").unwrap()),
        ReasonKind::NoSpace
    );
    assert_eq!(
        fail_kind(c.write("t", "../x", b"").unwrap()),
        ReasonKind::BadName
    );
    assert_eq!(
        read_ok(&mut c, "t", "x").version,
        2,
        "failed writes change nothing"
    );
    // wait: OK at once, OK when written by another client, FAIL on timeout / no space
    match c.wait("t", "x", None, None).unwrap() {
        WaitStatus::Ok(ch) => assert_eq!(ch.version, 2),
        other => panic!("{other:?}"),
    }
    let sock = d.socket();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let mut w = Client::connect(sock).unwrap();
        w.write("t", "x", b"v3").unwrap()
    });
    match c
        .wait("t", "x", Some(2), Some(Duration::from_secs(20)))
        .unwrap()
    {
        WaitStatus::Ok(ch) => assert_eq!((ch.version, &ch.data[..]), (3, &b"v3"[..])),
        other => panic!("{other:?}"),
    }
    assert_eq!(writer.join().unwrap(), WriteStatus::Ok(3));
    let t0 = Instant::now();
    assert_eq!(
        fail_kind(
            c.wait("t", "x", Some(3), Some(Duration::from_millis(150)))
                .unwrap()
        ),
        ReasonKind::Timeout
    );
    assert!(t0.elapsed() >= Duration::from_millis(140));
    assert_eq!(
        fail_kind(c.wait("nope", "x", None, None).unwrap()),
        ReasonKind::NoSpace
    );
    // start_write: OK (buffer holds the last version), FAIL busy, FAIL no space; stop_write
    let mut l = lease(&mut c, "t", "x");
    assert!(l.is_shared(), "root maps the slot writable");
    assert_eq!((l.base_version(), &l.data_mut()[..]), (3, &b"v3"[..]));
    assert_eq!(
        fail_kind(other.start_write("t", "x", false, None, true).unwrap()),
        ReasonKind::Busy
    );
    assert_eq!(
        fail_kind(other.start_write("nope", "x", false, None, true).unwrap()),
        ReasonKind::NoSpace
    );
    // readers see the last published version while the lease is open
    l.fill(b"half-writ").unwrap();
    assert_eq!(read_ok(&mut other, "t", "x").data, b"v3");
    assert_eq!(c.stop_write(l).unwrap(), WriteStatus::Ok(4));
    assert_eq!(read_ok(&mut other, "t", "x").data, b"half-writ");
    // stop_write of a lease not held: WRITE_FAIL no-lease (another connection's, or gone)
    let l = lease(&mut c, "t", "x");
    let forged = other.abort_write(same_lease_id(&l));
    assert_eq!(fail_kind(forged.unwrap()), ReasonKind::NoLease);
    assert_eq!(c.abort_write(l).unwrap(), WriteStatus::Ok(4));
    // queued start_write: granted when the holder stops
    let l = lease(&mut c, "t", "x");
    let sock = d.socket();
    let queued = std::thread::spawn(move || {
        let mut q = Client::connect(sock).unwrap();
        match q
            .start_write("t", "x", true, Some(Duration::from_secs(20)), true)
            .unwrap()
        {
            StartWriteStatus::Ok(mut l) => {
                let got = l.data_mut().to_vec();
                l.fill(b"queued").unwrap();
                (got, q.stop_write(l).unwrap())
            }
            other => panic!("{other:?}"),
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut l2 = l;
    l2.fill(b"first").unwrap();
    assert_eq!(c.stop_write(l2).unwrap(), WriteStatus::Ok(5));
    let (seen, st) = queued.join().unwrap();
    assert_eq!((seen, st), (b"first".to_vec(), WriteStatus::Ok(6)));
    // queued with a timeout: FAIL timeout
    let l = lease(&mut c, "t", "x");
    assert_eq!(
        fail_kind(
            other
                .start_write("t", "x", true, Some(Duration::from_millis(100)), true)
                .unwrap()
        ),
        ReasonKind::Timeout
    );
    // invalidate: a leased chunk stays valid (seed WRITE_OK)
    match other.invalidate("t", "x").unwrap() {
        InvalidateStatus::StillValid { version, reason } => {
            assert_eq!((version, reason.kind), (6, ReasonKind::Busy))
        }
        other => panic!("{other:?}"),
    }
    c.abort_write(l).unwrap();
    // invalidate: now invalid (seed WRITE_FAIL), twice, and for a chunk never written
    assert_eq!(
        other.invalidate("t", "x").unwrap(),
        InvalidateStatus::Invalidated
    );
    assert_eq!(other.invalidate("t", "x").unwrap().code(), "WRITE_FAIL");
    assert_eq!(
        other.invalidate("t", "never").unwrap(),
        InvalidateStatus::Invalidated
    );
    assert_eq!(c.read("t", "x").unwrap(), ReadStatus::Waiting);
    assert!(matches!(
        other.invalidate("nope", "x").unwrap(),
        InvalidateStatus::StillValid { .. }
    ));
    // written again: the version goes on from where it was
    assert_eq!(write_ok(&mut c, "t", "x", b"back"), 7);
    // start_invalidate: invalid at once, buffer holds the old contents; stop_invalidate
    let mut l = match c.start_invalidate("t", "x", false, None).unwrap() {
        StartWriteStatus::Ok(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!(&l.data_mut()[..], b"back");
    assert_eq!(other.read("t", "x").unwrap(), ReadStatus::Waiting);
    assert_eq!(
        fail_kind(other.start_write("t", "x", false, None, true).unwrap()),
        ReasonKind::Busy
    );
    assert_eq!(c.stop_invalidate(l).unwrap(), InvalidateStatus::Invalidated);
    assert_eq!(other.read("t", "x").unwrap(), ReadStatus::Waiting);
    assert_eq!(write_ok(&mut other, "t", "x", b"again"), 8);
    assert!(d.stop());
}

/// A lease handle naming the same lease id (to try it from another connection).
fn same_lease_id(l: &WriteLease) -> WriteLease {
    WriteLease::by_id(l.id())
}

#[test]
fn the_cli_reads_and_writes_stdin_stdout_and_files() {
    let mut d = Daemon::start();
    d.ok(&[
        "space",
        "create",
        "cli",
        "--slot-size",
        "65536",
        "--slots",
        "8",
    ]);
    let o = d.strata(&["space", "create", "cli"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("CREATE_EXISTS"));
    let mut w = d
        .strata_cmd(&["chunk", "write", "cli", "c1"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    w.stdin.take().unwrap().write_all(b"from stdin").unwrap();
    let o = w.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("WRITE_OK version 1"));
    assert_eq!(d.ok(&["chunk", "read", "cli", "c1"]), "from stdin");
    let f = d.dir.join("in.bin");
    let data: Vec<u8> = (0..60_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    d.ok(&[
        "chunk",
        "write",
        "cli",
        "c2",
        f.to_str().unwrap(),
        "--lease",
    ]);
    let out = d.dir.join("out.bin");
    d.ok(&[
        "chunk",
        "read",
        "cli",
        "c2",
        "-o",
        out.to_str().unwrap(),
        "--no-cache",
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let o = d.strata(&["chunk", "read", "cli", "missing"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("READ_WAITING"));
    let o = d.strata(&["chunk", "wait", "cli", "missing", "--timeout-ms", "50"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("WAIT_FAIL"));
    d.ok(&["chunk", "invalidate", "cli", "c1"]);
    let chunks = d.ok(&["space", "chunks", "cli", "--list", "local"]);
    assert!(chunks.contains("c2") && !chunks.contains("c1 "), "{chunks}");
    assert_eq!(d.ok(&["space", "hosts", "cli"]).lines().count(), 1);
    let o = d.strata(&["chunk", "write", "cli", "c3", "/nonexistent/file"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(d.stop());
}

#[test]
fn spawn_runs_as_the_caller_never_as_root_for_another_user() {
    if !is_root() {
        panic!("PREREQUISITE MISSING: this test must run as root to act as another user");
    }
    let mut d = Daemon::start_with("[spaces]\nspawn_allow = [\"/usr/bin/touch\"]\n");
    let me = host(&d);
    let mut c = client(&d);
    c.create(
        "shared",
        SpaceOptions {
            mode: Some(0o666),
            ..small()
        },
    )
    .unwrap();
    c.create("private", small()).unwrap();
    let dir = d.dir.join("drop");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let target = dir.join("by-nobody");
    let o = d
        .strata_cmd(&[
            "spawn",
            "shared",
            &me,
            "/usr/bin/touch",
            target.to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t0 = Instant::now();
    while !target.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&target).unwrap().uid(),
        65534,
        "ran as the caller"
    );
    // nobody may not use a space with mode 660 owned by root
    let o = d
        .strata_cmd(&["spawn", "private", &me, "/usr/bin/touch", "/tmp/x"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("SPAWNPROCESS_FAIL"));
    let o = d
        .strata_cmd(&["chunk", "read", "private", "x"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission"),
        "{o:?}"
    );
    // through a 666 space nobody writes through a lease (its own lease buffer)
    let o = d
        .strata_cmd(&[
            "chunk",
            "write",
            "shared",
            "n",
            "--lease",
            target.to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.stop());
}

/// Payload with a checksum: [version u64][len u32][bytes...][crc32c of everything before].
fn payload(version: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 16);
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    let mut x = version.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn payload_ok(b: &[u8]) -> Option<u64> {
    if b.len() < 16 {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let len = u32::from_le_bytes(body[8..12].try_into().ok()?) as usize;
    (len + 12 == body.len() && crc32c::crc32c(body) == u32::from_le_bytes(crc.try_into().ok()?))
        .then(|| u64::from_le_bytes(body[0..8].try_into().unwrap()))
}

#[test]
fn concurrent_writers_and_cache_readers_never_see_a_torn_chunk() {
    let mut d = Daemon::start();
    let mut c = client(&d);
    for (space, volatile) in [("stress-v", true), ("stress-d", false)] {
        c.create(
            space,
            SpaceOptions {
                volatile,
                slot_size: Some(256 << 10),
                slots: Some(8),
                ..SpaceOptions::default()
            },
        )
        .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for space in ["stress-v", "stress-d"] {
        for w in 0..2u64 {
            let (sock, stop) = (d.socket(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut c = Client::connect(sock).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let tag = (w << 40) | n;
                    let len = ((n * 7919) % (200 << 10)) as usize;
                    let data = payload(tag, len);
                    let chunk = format!("c{}", n % 3);
                    // alternate: write through the socket, and in place through a lease
                    if n.is_multiple_of(2) {
                        assert!(matches!(
                            c.write(space, &chunk, &data).unwrap(),
                            WriteStatus::Ok(_)
                        ));
                    } else {
                        match c.start_write(space, &chunk, true, None, false).unwrap() {
                            StartWriteStatus::Ok(mut l) => {
                                // write it slowly, in pieces, to widen any race
                                l.set_len(data.len()).unwrap();
                                for (i, piece) in data.chunks(4096).enumerate() {
                                    l.buffer_mut()[i * 4096..i * 4096 + piece.len()]
                                        .copy_from_slice(piece);
                                }
                                assert!(matches!(c.stop_write(l).unwrap(), WriteStatus::Ok(_)));
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                }
                n
            }));
        }
        for _ in 0..2 {
            let (sock, stop, hits, reads) = (d.socket(), stop.clone(), hits.clone(), reads.clone());
            threads.push(std::thread::spawn(move || {
                let mut c = Client::connect(sock).unwrap();
                // the sequence lock alone must keep torn chunks out: no crc check on hits
                c.set_verify(false);
                let mut buf = Vec::new();
                let mut last = [0u64; 3];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for (i, last) in last.iter_mut().enumerate() {
                        match c.read_into(space, &format!("c{i}"), &mut buf).unwrap() {
                            ReadInto::Ok { version, from_cache } => {
                                assert!(
                                    payload_ok(&buf).is_some(),
                                    "torn chunk c{i} v{version} ({} bytes, from cache: {from_cache})",
                                    buf.len()
                                );
                                assert!(version >= *last, "versions go backwards");
                                *last = version;
                                if from_cache {
                                    hits.fetch_add(1, Ordering::Relaxed);
                                }
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                            ReadInto::Waiting => {}
                            ReadInto::Fail(r) => panic!("{r:?}"),
                        }
                        n += 1;
                    }
                }
                n
            }));
        }
    }
    std::thread::sleep(Duration::from_secs(if std::env::var_os("CI").is_some() {
        6
    } else {
        4
    }));
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    for t in threads {
        ops += t.join().expect("no thread saw a torn chunk");
    }
    let (hits, reads) = (hits.load(Ordering::Relaxed), reads.load(Ordering::Relaxed));
    eprintln!("stress: {ops} operations, {reads} checked reads, {hits} from the shm cache");
    assert!(
        hits > 100,
        "readers were served from the cache ({hits} hits)"
    );
    assert!(d.stop());
}

#[test]
fn kill_9_after_acknowledged_writes_loses_nothing_durable() {
    let mut d = Daemon::start();
    let mut c = client(&d);
    c.create("dur", small()).unwrap();
    c.create(
        "vol",
        SpaceOptions {
            volatile: true,
            ..small()
        },
    )
    .unwrap();
    let mut expect = Vec::new();
    for i in 0..120u64 {
        let data = payload(i, (i as usize * 331) % (60 << 10));
        let chunk = format!("k/{}", i % 60);
        let v = if i % 3 == 0 {
            let mut l = lease(&mut c, "dur", &chunk);
            l.fill(&data).unwrap();
            match c.stop_write(l).unwrap() {
                WriteStatus::Ok(v) => v,
                other => panic!("{other:?}"),
            }
        } else {
            write_ok(&mut c, "dur", &chunk, &data)
        };
        expect.retain(|(c, _, _): &(String, u64, Vec<u8>)| *c != chunk);
        expect.push((chunk, v, data));
    }
    write_ok(&mut c, "vol", "gone", b"volatile");
    c.invalidate("dur", "k/0").unwrap();
    expect.retain(|(c, _, _)| c != "k/0");
    drop(c);
    d.kill9_and_restart();
    let mut c = client(&d);
    for (chunk, v, data) in &expect {
        let ch = read_ok(&mut c, "dur", chunk);
        assert_eq!((ch.version, &ch.data), (*v, data), "{chunk}");
    }
    assert_eq!(
        c.read("dur", "k/0").unwrap(),
        ReadStatus::Waiting,
        "invalidation is durable too"
    );
    // the volatile space is still there, its chunks are not
    assert_eq!(c.read("vol", "gone").unwrap(), ReadStatus::Waiting);
    // versions go on after the restart
    let (chunk, v, _) = &expect[0];
    assert_eq!(write_ok(&mut c, "dur", chunk, b"after"), v + 1);
    // start_invalidate of a chunk only on disk: the buffer holds its stored bytes, and the
    // invalidation is recorded when the lease ends
    let (chunk, _, data) = expect.last().unwrap().clone();
    drop(c);
    d.kill9_and_restart();
    let mut c = client(&d);
    let mut l = match c.start_invalidate("dur", &chunk, false, None).unwrap() {
        StartWriteStatus::Ok(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!(l.data_mut(), &data[..]);
    assert_eq!(c.stop_invalidate(l).unwrap(), InvalidateStatus::Invalidated);
    drop(c);
    d.kill9_and_restart();
    let mut c = client(&d);
    assert_eq!(c.read("dur", &chunk).unwrap(), ReadStatus::Waiting);
    assert!(d.stop());
}

/// Run by `a_client_crash_mid_start_write_...` in a child process: take a lease, scribble
/// half the buffer, say so, and wait to be killed.
#[test]
fn crash_helper() {
    let Some(sock) = std::env::var_os("STRATA_CRASH_SOCKET") else {
        return; // only meaningful as the child of the crash test
    };
    let mut c = Client::connect(sock).unwrap();
    let mut l = lease(&mut c, "crash", "victim");
    l.set_len(30_000).unwrap();
    l.buffer_mut()[..15_000].fill(0xEE);
    println!("LEASED {}", l.id());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_client_crash_mid_start_write_keeps_the_last_version_and_frees_the_lease() {
    let mut d = Daemon::start();
    let mut c = client(&d);
    c.create("crash", small()).unwrap();
    let good = payload(1, 20_000);
    write_ok(&mut c, "crash", "victim", &good);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_helper", "--nocapture", "--test-threads=1"])
        .env("STRATA_CRASH_SOCKET", d.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // libtest may print "test crash_helper ... " on the same line
    while !line.contains("LEASED") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "helper died"
        );
    }
    // the lease is held: another writer is busy, a queued one waits
    assert_eq!(
        fail_kind(c.start_write("crash", "victim", false, None, true).unwrap()),
        ReasonKind::Busy
    );
    let sock = d.socket();
    let queued = std::thread::spawn(move || {
        let mut q = Client::connect(sock).unwrap();
        match q
            .start_write("crash", "victim", true, Some(Duration::from_secs(20)), true)
            .unwrap()
        {
            StartWriteStatus::Ok(mut l) => {
                let seen = l.data_mut().to_vec();
                q.abort_write(l).unwrap();
                seen
            }
            other => panic!("{other:?}"),
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    // readers still see the published version while the lease is open
    assert_eq!(read_ok(&mut c, "crash", "victim").data, good);
    child.kill().unwrap();
    child.wait().unwrap();
    // the queued writer got the lease with the last published contents
    assert_eq!(queued.join().unwrap(), good);
    let ch = read_ok(&mut c, "crash", "victim");
    assert_eq!((ch.version, &ch.data), (1, &good));
    c.set_use_cache(false);
    assert_eq!(read_ok(&mut c, "crash", "victim").data, good);
    let mut l = lease(&mut c, "crash", "victim");
    l.fill(b"after the crash").unwrap();
    assert_eq!(c.stop_write(l).unwrap(), WriteStatus::Ok(2));
    assert!(d.stop());
}

fn raw_frame(header: &serde_json::Value, payload_len: u64, payload: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut v = (h.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&h);
    v.extend_from_slice(&payload_len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing() {
    let mut d = Daemon::start();
    let mut c = client(&d);
    c.create("b", small()).unwrap();
    write_ok(&mut c, "b", "keep", b"precious");
    // a payload over the protocol's limit: refused, connection closed, daemon serving
    {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        let f = raw_frame(
            &serde_json::json!({"op":"space","call":"write","space":"b","chunk":"keep"}),
            1 << 40,
            b"",
        );
        s.write_all(&f).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert!(
            String::from_utf8_lossy(&reply).contains("over the limit"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    // disconnect mid-request: half a payload, then gone
    {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        let f = raw_frame(
            &serde_json::json!({"op":"space","call":"write","space":"b","chunk":"keep"}),
            60_000,
            &[1u8; 1000],
        );
        s.write_all(&f).unwrap();
    }
    // disconnect while parked in a wait and while queued for a lease
    {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        s.write_all(&raw_frame(
            &serde_json::json!({"op":"space","call":"wait","space":"b","chunk":"never"}),
            0,
            b"",
        ))
        .unwrap();
        let mut l = lease(&mut c, "b", "keep");
        let mut q = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        q.write_all(&raw_frame(&serde_json::json!({"op":"space","call":"start-write","space":"b","chunk":"keep","wait":true}), 0, b"")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(q);
        drop(s);
        std::thread::sleep(Duration::from_millis(100));
        l.fill(b"updated").unwrap();
        assert_eq!(c.stop_write(l).unwrap(), WriteStatus::Ok(2));
    }
    // unknown call, unknown space, mismatched stop_write payload
    let bad = raw_frame(&serde_json::json!({"op":"space","call":"explode"}), 0, b"");
    {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        s.write_all(&bad).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert!(String::from_utf8_lossy(&reply).contains("protocol"));
    }
    let l = lease(&mut c, "b", "keep");
    let id = l.id();
    let mut raw = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    let _ = raw.write_all(&raw_frame(
        &serde_json::json!({"op":"space","call":"stop-write","lease":id,"len":5}),
        3,
        b"abc",
    ));
    drop(raw);
    c.abort_write(l).unwrap();
    // after all of it: nothing lost, everything still served
    assert_eq!(read_ok(&mut c, "b", "keep").data, b"updated");
    assert_eq!(write_ok(&mut c, "b", "new", b"fine"), 1);
    assert!(d.stop());
}

#[test]
fn a_corrupted_cache_region_is_detected_and_repaired_without_loss() {
    let mut d = Daemon::start();
    let mut c = client(&d);
    c.create("cor", small()).unwrap();
    c.create(
        "corv",
        SpaceOptions {
            volatile: true,
            ..small()
        },
    )
    .unwrap();
    let data: Vec<Vec<u8>> = (0..6)
        .map(|i| payload(i, 10_000 + i as usize * 100))
        .collect();
    for (i, p) in data.iter().enumerate() {
        write_ok(&mut c, "cor", &format!("c{i}"), p);
    }
    write_ok(&mut c, "corv", "v", b"volatile bytes");
    // only the daemon can write its regions (sealed memfds): damage comes from root
    // writing the daemon's memory
    assert!(
        is_root(),
        "PREREQUISITE MISSING: this test writes the daemon's memory and must run as root"
    );
    let pid = d.pid();
    let scribble = |off: u64, bytes: &[u8]| region_write(pid, "cor", off, bytes);
    let geo = strata_client::shm::Geometry::new(64 << 10, 32);
    // 1. a data slot: every slot in use gets garbage (the crc check catches it)
    for slot in 0..32 {
        scribble(geo.slot_offset(slot) + 100, b"GARBAGE!");
    }
    let mut r = client(&d);
    for (i, p) in data.iter().enumerate() {
        let ch = read_ok(&mut r, "cor", &format!("c{i}"));
        assert_eq!(
            &ch.data, p,
            "c{i} served correctly after detecting the corruption"
        );
    }
    // after the repair the cache serves again, from restored slots
    let ch = read_ok(&mut r, "cor", "c3");
    assert!(ch.from_cache, "repaired slots are cached again");
    assert_eq!(ch.data, data[3]);
    // 2. the index: scribble over every entry
    for e in 0..geo.index_entries as u64 {
        scribble(4096 + e * 384 + 20, &[0xAB; 16]);
    }
    for (i, p) in data.iter().enumerate() {
        assert_eq!(&read_ok(&mut r, "cor", &format!("c{i}")).data, p);
    }
    // 3. the header: GETCHUNKCACHE_FAIL until repaired, reads still served
    scribble(16, &[0xFF; 8]);
    let mut fresh = client(&d);
    assert_eq!(read_ok(&mut fresh, "cor", "c1").data, data[1]);
    assert_eq!(
        fail_kind(fresh.cache("cor").unwrap()),
        ReasonKind::Corrupted
    );
    let report = fresh.repair("cor").unwrap();
    assert!(report.contains("header rewritten"), "{report}");
    assert!(matches!(
        fresh.cache("cor").unwrap(),
        CacheStatus::Ok { .. }
    ));
    assert!(read_ok(&mut fresh, "cor", "c1").from_cache);
    // a volatile chunk whose slot is scribbled on is lost, and said so
    for slot in 0..32 {
        region_write(pid, "corv", geo.slot_offset(slot), b"X");
    }
    let report = c.repair("corv").unwrap();
    assert!(report.contains("lost") && report.contains('v'), "{report}");
    assert_eq!(c.read("corv", "v").unwrap(), ReadStatus::Waiting);
    assert!(d.log().contains("volatile chunks lost"));
    assert!(d.stop());
}

/// Write `bytes` at `off` of space `space`'s region in the daemon `pid`'s memory (its
/// writable mapping of the memfd `strata.<instance>.<space>`), as root through
/// /proc/<pid>/mem.
fn region_write(pid: u32, space: &str, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let suffix = format!(".{space} (deleted)");
    let line = maps
        .lines()
        .find(|l| l.contains(" rw-s ") && l.contains("/memfd:strata.") && l.ends_with(&suffix))
        .unwrap_or_else(|| panic!("no mapping of {space}'s region in {maps}"));
    let start = u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    mem.write_all_at(bytes, start + off).unwrap();
}

#[test]
fn async_client_does_the_same() {
    let mut d = Daemon::start();
    let rt = tokio_rt();
    rt.block_on(async {
        let mut c = AsyncClient::connect(d.socket()).await.unwrap();
        assert_eq!(c.create("as", small()).await.unwrap(), CreateStatus::Ok);
        assert_eq!(c.write("as", "x", b"hi").await.unwrap(), WriteStatus::Ok(1));
        match c.read("as", "x").await.unwrap() {
            ReadStatus::Ok(ch) => assert_eq!((&ch.data[..], ch.from_cache), (&b"hi"[..], true)),
            other => panic!("{other:?}"),
        }
        let StartWriteStatus::Ok(mut l) =
            c.start_write("as", "x", false, None, true).await.unwrap()
        else {
            panic!()
        };
        l.fill(b"async lease").unwrap();
        assert_eq!(c.stop_write(l).await.unwrap(), WriteStatus::Ok(2));
        match c
            .wait("as", "x", Some(1), Some(Duration::from_secs(5)))
            .await
            .unwrap()
        {
            WaitStatus::Ok(ch) => assert_eq!(ch.data, b"async lease"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.invalidate("as", "x").await.unwrap(),
            InvalidateStatus::Invalidated
        );
        assert_eq!(c.read("as", "x").await.unwrap(), ReadStatus::Waiting);
        assert_eq!(c.unjoin("as").await.unwrap(), UnjoinStatus::Ok);
    });
    assert!(d.stop());
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
