//! Issue 10, item 10: the data directory on a full filesystem. Nothing is acknowledged
//! unless it is on disk, nothing refused shows up after a restart, and the daemon serves
//! again by itself once space comes back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use strata_client::*;
use strata_tests::{is_root, Daemon};

/// A tmpfs mounted over a directory; unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs on {} failed", at.display());
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the filesystem of `dir` with one file until it is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut block = vec![0xa5u8; 1 << 20];
    while !block.is_empty() {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let n = block.len() / 2;
                block.truncate(n);
            }
            Err(e) => panic!("filling: {e}"),
        }
    }
    let _ = f.sync_all();
    path
}

fn small() -> SpaceOptions {
    SpaceOptions {
        slot_size: Some(64 << 10),
        slots: Some(8),
        ..SpaceOptions::default()
    }
}

fn api_kind(r: Result<CreateStatus, ClientError>) -> Result<CreateStatus, String> {
    match r {
        Ok(s) => Ok(s),
        Err(ClientError::Api(e)) => Err(format!("{} {}", e.kind, e.message)),
        Err(e) => panic!("{e}"),
    }
}

#[derive(Default, Debug)]
struct Outcomes {
    /// Spaces answered CREATE_OK.
    created: Vec<String>,
    /// Spaces refused.
    refused: Vec<String>,
    /// Chunks acknowledged (space, chunk, version, byte).
    written: Vec<(String, String, u64, u8)>,
    /// Writes refused (space, chunk).
    write_refused: Vec<(String, String)>,
    /// Chunks answered "now invalid".
    invalidated: Vec<(String, String)>,
    /// Invalidations refused (the chunk stays valid).
    invalidate_refused: Vec<(String, String)>,
}

fn check(
    d: &Daemon,
    o: &Outcomes,
    latest: &std::collections::HashMap<(String, String), (u64, u8)>,
) {
    let mut c = Client::connect(d.socket()).unwrap();
    for s in &o.created {
        assert_eq!(
            c.create(s, SpaceOptions::default()).unwrap(),
            CreateStatus::Exists,
            "acknowledged space {s} lost"
        );
    }
    for s in &o.refused {
        let hosts = c.hosts(s).unwrap();
        assert_eq!(hosts, HostsStatus::NoExist, "refused space {s} appeared");
    }
    for (s, ch) in &o.write_refused {
        assert!(
            matches!(c.read(s, ch).unwrap(), ReadStatus::Waiting),
            "refused write of {s}/{ch} appeared"
        );
    }
    for (s, ch) in &o.invalidated {
        assert!(
            matches!(c.read(s, ch).unwrap(), ReadStatus::Waiting),
            "acknowledged invalidation of {s}/{ch} lost"
        );
    }
    for ((s, ch), (v, b)) in latest {
        if o.invalidated.contains(&(s.clone(), ch.clone())) {
            continue;
        }
        match c.read(s, ch).unwrap() {
            ReadStatus::Ok(chunk) => {
                assert_eq!(chunk.version, *v, "{s}/{ch}");
                assert!(chunk.data.iter().all(|x| x == b), "{s}/{ch} bytes");
            }
            other => panic!("acknowledged chunk {s}/{ch} v{v}: {other:?}"),
        }
    }
}

type Latest = std::collections::HashMap<(String, String), (u64, u8)>;

/// Write chunks of shrinking sizes until each size is refused once.
fn exhaust(c: &mut Client, o: &mut Outcomes, latest: &mut Latest, prefix: &str) {
    for (k, size) in [
        1usize << 20,
        256 << 10,
        64 << 10,
        16 << 10,
        4 << 10,
        1 << 10,
        64,
    ]
    .into_iter()
    .enumerate()
    {
        for j in 0..64 {
            let ch = format!("{prefix}{k}-{j}");
            match c.write("keep", &ch, &vec![k as u8; size]).unwrap() {
                WriteStatus::Ok(v) => {
                    latest.insert(("keep".into(), ch.clone()), (v, k as u8));
                    o.written.push(("keep".into(), ch, v, k as u8));
                }
                WriteStatus::Fail(r) => {
                    assert_eq!(r.kind, ReasonKind::Io, "{r:?}");
                    o.write_refused.push(("keep".into(), ch));
                    break;
                }
            }
        }
    }
}

#[test]
fn disk_full_refuses_instead_of_losing_and_recovers_without_a_restart() {
    assert!(
        is_root(),
        "PREREQUISITE MISSING: the disk-full test mounts a tmpfs and must run as root"
    );
    let mut d = Daemon::start();
    assert!(d.stop());
    // the data directory moves onto a 24 MiB tmpfs
    let data = d.dir.join("data");
    let old = d.dir.join("data.old");
    std::fs::rename(&data, &old).unwrap();
    std::fs::create_dir(&data).unwrap();
    let _mnt = Tmpfs::mount(&data, "24m");
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", old.display()))
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success());
    d.restart();

    let mut o = Outcomes::default();
    let mut latest = std::collections::HashMap::new();
    let mut c = Client::connect(d.socket()).unwrap();
    // before: acknowledged state
    assert_eq!(
        c.create(
            "keep",
            SpaceOptions {
                slots: Some(32),
                ..SpaceOptions::default()
            }
        )
        .unwrap(),
        CreateStatus::Ok
    );
    o.created.push("keep".into());
    for (i, ch) in ["a", "b", "c"].iter().enumerate() {
        let v = match c.write("keep", ch, &vec![i as u8 + 1; 100_000]).unwrap() {
            WriteStatus::Ok(v) => v,
            other => panic!("{other:?}"),
        };
        latest.insert(("keep".to_string(), ch.to_string()), (v, i as u8 + 1));
        o.written
            .push(("keep".into(), ch.to_string(), v, i as u8 + 1));
    }

    let filler = fill(&data);
    // the store file may still have free pages inside: use them up (acknowledged or not,
    // every outcome is tracked) until even small writes are refused
    exhaust(&mut c, &mut o, &mut latest, "x");
    // full: every operation either is refused with an I/O reason or is really stored
    let mut refused_kinds = 0;
    let before = o.write_refused.len();
    for i in 0..3u8 {
        let ch = format!("w{i}");
        match c.write("keep", &ch, &vec![0x40 + i; 1 << 20]).unwrap() {
            WriteStatus::Ok(v) => {
                latest.insert(("keep".into(), ch.clone()), (v, 0x40 + i));
                o.written.push(("keep".into(), ch, v, 0x40 + i));
            }
            WriteStatus::Fail(r) => {
                assert_eq!(r.kind, ReasonKind::Io, "{r:?}");
                o.write_refused.push(("keep".into(), ch));
            }
        }
    }
    if o.write_refused.len() > before {
        refused_kinds += 1;
    }
    for i in 0..5 {
        let name = format!("full{i}");
        match api_kind(c.create(&name, small())) {
            Ok(CreateStatus::Ok) => o.created.push(name),
            Ok(other) => panic!("{other:?}"),
            Err(msg) => {
                assert!(msg.starts_with("io "), "{msg}");
                o.refused.push(name);
            }
        }
    }
    if !o.refused.is_empty() {
        refused_kinds += 1;
    }
    for ch in ["a", "b"] {
        match c.invalidate("keep", ch).unwrap() {
            InvalidateStatus::Invalidated => o.invalidated.push(("keep".into(), ch.into())),
            InvalidateStatus::StillValid {
                version: v,
                reason: r,
            } => {
                assert_eq!(r.kind, ReasonKind::Io, "{r:?}");
                assert_eq!(v, latest[&("keep".to_string(), ch.to_string())].0);
                o.invalidate_refused.push(("keep".into(), ch.into()));
                // still readable, at its version
                assert!(matches!(c.read("keep", ch).unwrap(), ReadStatus::Ok(_)));
            }
        }
    }
    if !o.invalidate_refused.is_empty() {
        refused_kinds += 1;
    }
    println!("full: {o:?}");
    assert_eq!(
        refused_kinds, 3,
        "with the disk full, create, write and invalidate must each be refused at least once: {o:?}"
    );
    // the in-memory state is the stored one: what the live daemon answers now is what was
    // acknowledged (checked again after restarts below)
    check(&d, &o, &latest);
    drop(c);
    // a kill -9 while full: nothing acknowledged is lost, nothing refused appears (the
    // daemon cannot start on a full disk, so it is checked once space is back, before
    // anything new is written)
    std::fs::remove_file(&filler).unwrap();
    d.kill9_and_restart();
    check(&d, &o, &latest);
    // and full again, then freed: service resumes without a restart
    let filler = fill(&data);
    let mut c = Client::connect(d.socket()).unwrap();
    let before = o.write_refused.len();
    exhaust(&mut c, &mut o, &mut latest, "y");
    assert!(
        o.write_refused.len() > before,
        "nothing refused on a full disk"
    );
    check(&d, &o, &latest);
    drop(c);

    // space comes back: service resumes without a restart
    std::fs::remove_file(&filler).unwrap();
    let pid = d.pid();
    let mut c = Client::connect(d.socket()).unwrap();
    let t0 = std::time::Instant::now();
    let created = loop {
        match api_kind(c.create("after", small())) {
            Ok(s) => break s,
            Err(msg) if t0.elapsed() < std::time::Duration::from_secs(5) => {
                // the store reopens on its own; a moment's back-off between tries
                println!("not yet: {msg}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(msg) => panic!("no service 5 s after space came back: {msg}"),
        }
    };
    assert_eq!(created, CreateStatus::Ok);
    o.created.push("after".into());
    let v = match c.write("keep", "w0", &vec![0x77; 1 << 20]).unwrap() {
        WriteStatus::Ok(v) => v,
        other => panic!("{other:?}"),
    };
    latest.insert(("keep".into(), "w0".into()), (v, 0x77));
    o.write_refused.retain(|(_, ch)| ch != "w0");
    match c.invalidate("keep", "c").unwrap() {
        InvalidateStatus::Invalidated => o.invalidated.push(("keep".into(), "c".into())),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.pid(), pid, "the daemon was not restarted");
    check(&d, &o, &latest);
    drop(c);
    d.restart();
    check(&d, &o, &latest);
    assert!(d.stop());
}
