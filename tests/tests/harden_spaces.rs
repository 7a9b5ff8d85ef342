//! Issue 10, spaces: quotas against a hostile local user (uid 65534), chunk lists past the
//! frame limit, versions that are never reused, host ids that cannot forge log lines.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};
use strata_client::*;
use strata_tests::{is_root, Daemon};

fn need_root() {
    assert!(
        is_root(),
        "PREREQUISITE MISSING: this test must run as root to act as uid 65534"
    );
}

/// Run `helper` of this test binary as uid 65534 against `d`; its stdout.
fn as_nobody(d: &Daemon, helper: &str, mode: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", helper, "--nocapture", "--test-threads=1"])
        .env("STRATA_HARDEN_SOCKET", d.socket())
        .env("STRATA_HARDEN_MODE", mode)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helper as nobody failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn refusal(r: Result<CreateStatus, ClientError>) -> Result<CreateStatus, (String, String)> {
    match r {
        Ok(s) => Ok(s),
        Err(ClientError::Api(e)) => Err((e.kind, e.message)),
        Err(e) => panic!("not an answer: {e}"),
    }
}

/// The quota helper, run as nobody by `quotas_bound_a_hostile_user`.
#[test]
fn quota_helper() {
    let Some(sock) = std::env::var_os("STRATA_HARDEN_SOCKET") else {
        return; // only meaningful as the child of quotas_bound_a_hostile_user
    };
    let mode = std::env::var("STRATA_HARDEN_MODE").unwrap_or_default();
    let mut c = Client::connect(sock).unwrap();
    if mode == "big" {
        // two spaces of 2 GiB each: the 4 GiB of /dev/shm in two requests
        for name in ["big1", "big2"] {
            let opts = SpaceOptions {
                slot_size: Some(64 << 20),
                slots: Some(32),
                ..SpaceOptions::default()
            };
            match refusal(c.create(name, opts)) {
                Ok(s) => println!("BIG {name} ACCEPTED {s:?}"),
                Err((kind, msg)) => println!("BIG {name} REFUSED {kind} {msg}"),
            }
        }
        return;
    }
    let n: usize = mode.strip_prefix("tiny").unwrap().parse().unwrap();
    let (mut ok, mut exists, mut refused, mut first) = (0, 0, 0, None);
    let t0 = Instant::now();
    for i in 0..n {
        let opts = SpaceOptions {
            volatile: true,
            slot_size: Some(4096),
            slots: Some(2),
            ..SpaceOptions::default()
        };
        match refusal(c.create(&format!("tiny{i}"), opts)) {
            Ok(CreateStatus::Ok) => ok += 1,
            Ok(CreateStatus::Exists) => exists += 1,
            Err((kind, msg)) => {
                assert_eq!(kind, "quota", "{msg}");
                refused += 1;
                first.get_or_insert(msg);
            }
        }
    }
    println!(
        "TINY ok={ok} exists={exists} refused={refused} ms={} first={}",
        t0.elapsed().as_millis(),
        first.unwrap_or_default()
    );
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let i = text.find(key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len();
    text[i..].split_whitespace().next().unwrap()
}

fn region_files(d: &Daemon) -> usize {
    // regions are memfds held by the daemon (no file under /dev/shm): count its
    // descriptors of region memfds (lease buffers are named `.lease.`)
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid())).unwrap();
    let planted = std::fs::read_dir(&d.shm)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("strata.")
        })
        .count();
    assert_eq!(planted, 0, "nothing is made under shm_dir");
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("/memfd:strata.") && !l.contains(".lease."))
        .count()
}

#[test]
fn quotas_bound_a_hostile_user() {
    need_root();
    // the defaults: 64 spaces and 1 GiB of regions per uid
    let mut d = Daemon::start();
    let out = as_nobody(&d, "quota_helper", "big");
    for name in ["big1", "big2"] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("BIG {name} ")))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            line.contains("REFUSED quota") && line.contains("shm_bytes_per_uid"),
            "{line}"
        );
        assert!(line.contains("uid 65534"), "{line}");
    }
    assert_eq!(
        region_files(&d),
        0,
        "no region was made for a refused space"
    );

    // thousands of tiny spaces: the per-uid space quota stops them
    let out = as_nobody(&d, "quota_helper", "tiny2000");
    let line = out.lines().find(|l| l.contains("TINY ok=")).unwrap();
    println!("{line}");
    assert_eq!(field(line, "ok="), "64", "{line}");
    assert_eq!(field(line, "refused="), "1936", "{line}");
    assert!(
        line.contains("spaces_per_uid") && line.contains("uid 65534 uses 64"),
        "{line}"
    );
    assert_eq!(
        region_files(&d),
        64,
        "one region per created space, none leaked"
    );
    // the daemon is healthy: status answers, root still creates
    d.ok(&["status"]);
    let mut root = Client::connect(d.socket()).unwrap();
    assert_eq!(
        root.create("roots", SpaceOptions::default()).unwrap(),
        CreateStatus::Ok
    );
    // after a restart the use is counted again from the store
    d.restart();
    let out = as_nobody(&d, "quota_helper", "tiny65");
    let line = out.lines().find(|l| l.contains("TINY ok=")).unwrap();
    assert_eq!(field(line, "ok="), "0", "{line}");
    assert_eq!(field(line, "exists="), "64", "{line}");
    assert_eq!(field(line, "refused="), "1", "{line}");
    assert!(d.stop());
}

#[test]
fn durable_byte_quota_refuses_writes_with_write_fail() {
    need_root();
    let mut d = Daemon::start_with("[spaces]\ndurable_bytes_per_uid = 100000\n");
    // nobody's space; root writes into it count against nobody (the owner)
    let o = d
        .strata_cmd(&["space", "create", "nb", "--mode", "666"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut c = Client::connect(d.socket()).unwrap();
    assert!(matches!(
        c.write("nb", "a", &[1u8; 60_000]).unwrap(),
        WriteStatus::Ok(1)
    ));
    match c.write("nb", "b", &[2u8; 60_000]).unwrap() {
        WriteStatus::Fail(r) => {
            assert_eq!(r.kind, ReasonKind::Quota, "{r:?}");
            assert!(r.message.contains("durable_bytes_per_uid"), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    // a rewrite of the same chunk within the quota is fine, and the lease was not kept
    assert!(matches!(
        c.write("nb", "a", &[3u8; 90_000]).unwrap(),
        WriteStatus::Ok(2)
    ));
    // restart: counted again from the store
    d.restart();
    let mut c = Client::connect(d.socket()).unwrap();
    assert!(matches!(
        c.write("nb", "b", &[2u8; 20_000]).unwrap(),
        WriteStatus::Fail(r) if r.kind == ReasonKind::Quota
    ));
    assert!(d.stop());
}

#[test]
fn chunk_lists_over_the_frame_limit_come_in_pages() {
    let mut d = Daemon::start();
    let mut c = Client::connect(d.socket()).unwrap();
    let opts = SpaceOptions {
        volatile: true,
        slot_size: Some(4096),
        slots: Some(12_100),
        ..SpaceOptions::default()
    };
    assert_eq!(c.create("many", opts).unwrap(), CreateStatus::Ok);
    // 12,000 chunks with long names: one list is ~3.5 MB of entries, over the 1 MiB header
    let pad = "n".repeat(200);
    let n = 12_000;
    for i in 0..n {
        let name = format!("{pad}{i:05}");
        assert!(matches!(
            c.write("many", &name, b"x").unwrap(),
            WriteStatus::Ok(_)
        ));
    }
    match c.chunks("many", ChunkList::All).unwrap() {
        ChunkListStatus::Ok(entries) => {
            assert_eq!(entries.len(), n);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.chunk, format!("{pad}{i:05}"));
            }
        }
        other => panic!("{other:?}"),
    }
    // one page at a time
    let (page, next) = c
        .chunks_page("many", ChunkList::All, None, Some(10))
        .unwrap()
        .unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(next.as_deref(), Some(&*format!("{pad}00009")));
    // the CLI fetches every page
    let out = d.ok(&["space", "chunks", "many", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(n), "{}", &out[..200]);
    assert!(d.stop());
}

#[test]
fn volatile_versions_are_not_reused_after_a_restart() {
    let mut d = Daemon::start();
    let mut c = Client::connect(d.socket()).unwrap();
    let opts = SpaceOptions {
        volatile: true,
        slot_size: Some(4096),
        slots: Some(8),
        ..SpaceOptions::default()
    };
    assert_eq!(c.create("vol", opts).unwrap(), CreateStatus::Ok);
    let mut last = 0;
    for i in 0..3u8 {
        match c.write("vol", "x", &[i]).unwrap() {
            WriteStatus::Ok(v) => last = v,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(last, 3);
    for kill in [false, true] {
        if kill {
            d.kill9_and_restart();
        } else {
            d.restart();
        }
        let mut c = Client::connect(d.socket()).unwrap();
        assert!(matches!(c.read("vol", "x").unwrap(), ReadStatus::Waiting));
        match c.write("vol", "x", b"after").unwrap() {
            WriteStatus::Ok(v) => {
                assert!(v > last, "version {v} after a restart, {last} before");
                last = v;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(d.stop());
}

#[test]
fn host_ids_cannot_forge_log_lines() {
    // a host id with a newline in the config: the daemon refuses to start
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[spaces]\nhost_id = \"node1\\nERROR forged\"\n").unwrap();
    let mut child = Command::new(strata_tests::bin("stratad"))
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stratad started (and kept running) with a forged host id");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "started with a forged host id");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host_id"), "{err}");
    // in requests: refused as a bad name, nothing of it reaches the log as a line
    let mut d = Daemon::start();
    let mut c = Client::connect(d.socket()).unwrap();
    c.create("h", SpaceOptions::default()).unwrap();
    assert_eq!(c.unjoin("h").unwrap(), UnjoinStatus::Ok);
    match c.join("h", "x\nERROR forged-by-join").unwrap() {
        JoinStatus::Fail(r) => assert_eq!(r.kind, ReasonKind::BadName, "{r:?}"),
        other => panic!("{other:?}"),
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !d.log().lines().any(|l| l.starts_with("ERROR forged")),
        "{}",
        d.log()
    );
    assert!(d.stop());
}
