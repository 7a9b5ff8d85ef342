//! Issue 10, review of items 2, 3, 4, 6, 11 (spawn) and 12 as a hostile local user: what
//! the first fixes left open. Each test fails on the code before the review's fixes.
//!
//! - replies are memory too: a `read` whose reply the client never reads, and the waits a
//!   single write wakes at once, each hold a chunk; they count against the uid's byte
//!   budget (`limits.max_inflight_bytes_per_uid`) like a request's payload;
//! - requests any user may loop (`repair` of their own space, `spawn`) cost a few daemon
//!   log lines a second, not one per request;
//! - odd frames (truncated, huge lengths, non-UTF-8, deep JSON, numbers out of range) are
//!   refused, the daemon stays up and serves.
//!
//! Connections "as uid 65534" are made from a thread that dropped its credentials with raw
//! setresgid/setresuid (per thread on Linux): SO_PEERCRED is taken at connect time.

use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use strata_client::frame;
use strata_client::{Client, SpaceOptions, SpawnStatus, WriteStatus};
use strata_runtime::api::{client::Client as Admin, Reply, Request};
use strata_tests::{is_root, Daemon};

const NOBODY: u32 = 65534;

fn need_root() {
    assert!(
        is_root(),
        "PREREQUISITE MISSING: these tests act as uid 65534 (run the tests as root)"
    );
}

/// Run `f` on a thread whose credentials are uid/gid 65534 (only that thread's: raw
/// syscalls, not the libc wrappers that change every thread of the process).
fn as_nobody<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain integer syscalls changing this thread's credentials only.
        #[allow(unsafe_code)]
        unsafe {
            let g = NOBODY as libc::c_long;
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, g, g, g), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, g, g, g), 0);
        }
        f()
    })
    .join()
    .expect("nobody's thread")
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .unwrap_or(0)
}

/// The daemon's peak RSS over `for_` (sampled every 10 ms).
fn peak_rss(pid: u32, for_: Duration) -> u64 {
    let t = Instant::now();
    let mut peak = 0;
    while t.elapsed() < for_ {
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    peak
}

fn status_ok(socket: &Path) -> bool {
    matches!(
        Admin::connect(socket).and_then(|mut a| a.request(&Request::Status, b"")),
        Ok(Reply::Status { .. })
    )
}

fn big_space(c: &mut Client, name: &str, slot: u64) {
    c.create(
        name,
        SpaceOptions {
            volatile: true,
            slot_size: Some(slot),
            slots: Some(2),
            mode: Some(0o666),
        },
    )
    .expect("create");
}

/// `n` connections from uid 65534, each with `frame` sent and nothing read.
fn unread(socket: PathBuf, n: usize, frame: Vec<u8>) -> Vec<UnixStream> {
    as_nobody(move || {
        (0..n)
            .map(|_| {
                let mut s = UnixStream::connect(&socket).expect("connect as nobody");
                s.write_all(&frame).expect("send");
                s
            })
            .collect()
    })
}

const MIB: u64 = 1 << 20;
const SLOT: u64 = 8 * MIB;
const CONNS: usize = 24;
const BUDGET_CONFIG: &str =
    "[limits]\nmax_inflight_bytes_per_uid = 16777216\nbody_timeout_ms = 4000\n";

#[test]
fn unread_read_replies_cost_at_most_the_uid_byte_budget() {
    need_root();
    let d = Daemon::start_with(BUDGET_CONFIG);
    let mut c = Client::connect(d.socket()).unwrap();
    big_space(&mut c, "big", SLOT);
    let data = vec![7u8; SLOT as usize];
    assert!(matches!(
        c.write("big", "c", &data).unwrap(),
        WriteStatus::Ok { .. }
    ));
    std::thread::sleep(Duration::from_millis(300));
    let before = rss(d.pid());
    // 24 reads of an 8 MiB chunk whose replies nobody reads: 192 MiB of replies if each
    // is made, against a budget of 16 MiB
    let read = frame::encode(
        &json!({"op": "space", "call": "read", "space": "big", "chunk": "c"}),
        b"",
    )
    .unwrap();
    let conns = unread(d.socket(), CONNS, read);
    let peak = peak_rss(d.pid(), Duration::from_millis(2500));
    let grew = peak.saturating_sub(before);
    eprintln!(
        "rss before {} MiB, peak {} MiB (+{} MiB) with {CONNS} unread 8 MiB replies",
        before >> 20,
        peak >> 20,
        grew >> 20
    );
    assert!(status_ok(&d.socket()), "root is still served");
    assert!(
        grew < 80 * MIB,
        "the daemon grew by {} MiB holding replies nobody read (budget 16 MiB)",
        grew >> 20
    );
    drop(conns);
    // the budget comes back: nobody reads the chunk afterwards
    let socket = d.socket();
    let got = as_nobody(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let h = json!({"op": "space", "call": "read", "space": "big", "chunk": "c"});
        frame::exchange::<serde_json::Value, _>(&mut s.try_clone().unwrap(), &mut s, &h, b"")
            .map(|(v, p)| (v, p.len()))
    });
    let (v, len) = got.expect("nobody's read after the flood");
    assert_eq!(len as u64, SLOT, "{v}");
}

#[test]
fn waits_woken_at_once_cost_at_most_the_uid_byte_budget() {
    need_root();
    let d = Daemon::start_with(BUDGET_CONFIG);
    let mut c = Client::connect(d.socket()).unwrap();
    big_space(&mut c, "fan", SLOT);
    // 24 waits parked on one chunk; one write wakes them all, each with a copy of it
    let wait = frame::encode(
        &json!({"op": "space", "call": "wait", "space": "fan", "chunk": "w", "timeout_ms": 20000}),
        b"",
    )
    .unwrap();
    let conns = unread(d.socket(), CONNS, wait);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss(d.pid());
    let data = vec![9u8; SLOT as usize];
    assert!(matches!(
        c.write("fan", "w", &data).unwrap(),
        WriteStatus::Ok { .. }
    ));
    let peak = peak_rss(d.pid(), Duration::from_millis(2000));
    let grew = peak.saturating_sub(before);
    eprintln!(
        "rss before {} MiB, peak {} MiB (+{} MiB) after waking {CONNS} waits",
        before >> 20,
        peak >> 20,
        grew >> 20
    );
    assert!(status_ok(&d.socket()), "root is still served");
    assert!(
        grew < 80 * MIB,
        "one write made {} MiB of wait replies (budget 16 MiB)",
        grew >> 20
    );
    drop(conns);
}

#[test]
fn repair_in_a_loop_costs_a_few_log_lines() {
    need_root();
    let d = Daemon::start();
    let socket = d.socket();
    let before = d.log().lines().count();
    let done = as_nobody(move || {
        let mut c = Client::connect(&socket).unwrap();
        c.create(
            "mine",
            SpaceOptions {
                volatile: true,
                slot_size: Some(4096),
                slots: Some(4),
                mode: None,
            },
        )
        .unwrap();
        let mut n = 0;
        for _ in 0..500 {
            if c.repair("mine").is_ok() {
                n += 1;
            }
        }
        n
    });
    assert_eq!(done, 500, "nobody may repair their own space");
    let lines = d.log().lines().count() - before;
    assert!(
        lines < 40,
        "500 repairs by uid {NOBODY} wrote {lines} log lines:\n{}",
        d.log()
    );
}

#[test]
fn spawn_in_a_loop_costs_a_few_log_lines() {
    need_root();
    let d = Daemon::start_with("[spaces]\nhost_id = \"h1\"\nspawn_allow = [\"/usr/bin/true\"]\n");
    let socket = d.socket();
    let before = d.log().lines().count();
    let started = as_nobody(move || {
        let mut c = Client::connect(&socket).unwrap();
        c.create(
            "s",
            SpaceOptions {
                volatile: true,
                slot_size: Some(4096),
                slots: Some(4),
                mode: None,
            },
        )
        .unwrap();
        let mut n = 0;
        let t = Instant::now();
        while n < 200 && t.elapsed() < Duration::from_secs(30) {
            match c.spawn("s", "h1", "/usr/bin/true", &[]) {
                Ok(SpawnStatus::Ok { .. }) => n += 1,
                // at the per-uid cap of live children: let some end
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        n
    });
    assert_eq!(started, 200, "nobody's programs start");
    std::thread::sleep(Duration::from_millis(500));
    let lines = d.log().lines().count() - before;
    assert!(
        lines < 60,
        "200 spawns by uid {NOBODY} wrote {lines} daemon log lines"
    );
    // each start and end is in nobody's own spawn log
    let log = std::fs::read_to_string(
        d.socket()
            .parent()
            .unwrap()
            .join(format!("data/spawn/{NOBODY}.log")),
    )
    .unwrap();
    assert_eq!(log.matches("started \"/usr/bin/true\"").count(), 200);
    assert_eq!(log.matches(" ended: ").count(), 200, "{log}");
}

/// Send raw bytes as uid 65534 and read whatever comes back until close or timeout.
fn poke(socket: &Path, bytes: Vec<u8>, close_write: bool) -> Vec<u8> {
    let socket = socket.to_path_buf();
    as_nobody(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(&bytes);
        if close_write {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
}

fn raw(header: &[u8], plen: u64) -> Vec<u8> {
    let mut v = (header.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(&plen.to_be_bytes());
    v
}

#[test]
fn odd_frames_are_refused_and_the_daemon_serves_on() {
    need_root();
    let d = Daemon::start_with("[limits]\nheader_timeout_ms = 1000\nbody_timeout_ms = 1000\n");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_obj = format!(
        "{{\"op\":\"space\",\"call\":\"read\",\"space\":{}1{},\"chunk\":\"c\"}}",
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("truncated length", vec![0, 0], true),
        ("huge header length", u32::MAX.to_be_bytes().to_vec(), false),
        ("header over 1 MiB", ((1u32 << 20) + 1).to_be_bytes().to_vec(), false),
        ("zero header", raw(b"", 0), false),
        ("truncated header", {
            let mut v = 100u32.to_be_bytes().to_vec();
            v.extend_from_slice(b"{\"op\":");
            v
        }, true),
        ("non-UTF-8 header", raw(&[0xff, 0xfe, 0x80, 0x00, 0xc3], 0), false),
        ("non-UTF-8 in a string", raw(b"{\"op\":\"space\",\"call\":\"read\",\"space\":\"\xff\xfe\",\"chunk\":\"c\"}", 0), false),
        ("deep arrays", raw(deep.as_bytes(), 0), false),
        ("deep objects", raw(deep_obj.as_bytes(), 0), false),
        ("huge payload length", raw(b"{\"op\":\"status\"}", u64::MAX), false),
        ("payload for status", raw(b"{\"op\":\"status\"}", 1 << 20), false),
        ("number out of range", raw(b"{\"op\":\"space\",\"call\":\"create\",\"space\":\"n\",\"options\":{\"slots\":99999999999999999999999}}", 0), false),
        ("negative number", raw(b"{\"op\":\"space\",\"call\":\"wait\",\"space\":\"n\",\"chunk\":\"c\",\"timeout_ms\":-1}", 0), false),
        ("max timeout", raw(b"{\"op\":\"space\",\"call\":\"wait\",\"space\":\"n\",\"chunk\":\"c\",\"after\":18446744073709551615,\"timeout_ms\":18446744073709551615}", 0), false),
        ("float where an int goes", raw(b"{\"op\":\"space\",\"call\":\"stop-write\",\"lease\":1e308,\"len\":1}", 0), false),
        ("huge stop-write len", raw(b"{\"op\":\"space\",\"call\":\"stop-write\",\"lease\":1,\"len\":18446744073709551615}", 1), true),
        ("huge slot size", raw(b"{\"op\":\"space\",\"call\":\"create\",\"space\":\"n2\",\"options\":{\"slot_size\":18446744073709551615,\"slots\":4294967295}}", 0), false),
        ("unknown op", raw(b"{\"op\":\"\\u0000\\n\"}", 0), false),
        ("duplicate keys", raw(b"{\"op\":\"space\",\"op\":\"status\"}", 0), false),
    ];
    for (what, bytes, close_write) in cases {
        let t = Instant::now();
        let out = poke(&d.socket(), bytes, close_write);
        eprintln!("{what}: {} bytes back in {:?}", out.len(), t.elapsed());
        assert!(status_ok(&d.socket()), "after {what}: {}", d.log());
    }
    // nothing panicked, and the refusals did not flood the log
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.lines().count() < 60, "{log}");
}

#[test]
fn a_failing_policy_costs_a_few_log_lines_however_many_file_operations() {
    need_root();
    assert!(
        strata_runtime::fs::fuse_available(),
        "PREREQUISITE MISSING: /dev/fuse"
    );
    use std::os::unix::fs::PermissionsExt;
    use strata_client::dm::Region;
    use strata_client::session::DmSession;
    let d = Daemon::start();
    let m = d.mount("flood", &[], |b| {
        std::fs::write(b.join("managed"), b"local data").unwrap();
        std::fs::set_permissions(b.join("managed"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    });
    let comp = strata_tests::component("hsm-age-policy");
    d.ok(&[
        "plugin",
        "load",
        "hsm",
        comp.to_str().unwrap(),
        "--kind",
        "dm-policy",
    ]);
    let mut s = DmSession::create(d.socket(), b"setup").unwrap();
    let h = s.path_to_handle(m.mnt.join("managed")).unwrap();
    s.set_region(
        0,
        &h,
        &[Region {
            offset: 0,
            size: 0,
            flags: 1,
        }],
    )
    .unwrap();
    s.destroy().unwrap();
    d.ok(&[
        "dm",
        "attach",
        "hsm",
        m.mnt.to_str().unwrap(),
        "--events",
        "read",
    ]);
    // the policy's slot goes away (unloaded, or not restored after an upgrade): every
    // event of the attachment now fails in the plugin host
    d.ok(&["plugin", "unload", "hsm"]);
    let before = d.log().lines().count();
    let file = m.mnt.join("managed");
    let reads = as_nobody(move || {
        (0..300)
            .filter(|_| std::fs::read(&file).is_ok_and(|b| b == b"local data"))
            .count()
    });
    assert_eq!(
        reads, 300,
        "the file is served (no opinion: the read goes on)"
    );
    let lines = d.log().lines().count() - before;
    assert!(
        lines < 40,
        "300 reads by uid {NOBODY} wrote {lines} daemon log lines:\n{}",
        d.log()
    );
    assert!(d.log().contains("on-event"), "{}", d.log());
}
