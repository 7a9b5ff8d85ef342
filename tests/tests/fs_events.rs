//! DMAPI event capture on a real FUSE mount: every event type the filesystem raises, with
//! its fields; synchronous events block their operation until the answer and an abort
//! fails it with the errno; regions limit data events; timeouts and cancellation.
//! Needs root (FUSE mounts, trusted.* attributes): says so loudly otherwise.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};
use strata_client::dm::*;
use strata_client::session::DmSession;
use strata_tests::dm::{data, need_root, next, none, ns};
use strata_tests::Daemon;

/// Run `f` on a thread; it must still be blocked after a while (a synchronous event holds
/// it).
fn blocked<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let t = std::thread::spawn(f);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !t.is_finished(),
        "the operation did not wait for the answer"
    );
    t
}

const NAMESPACE: &[EventType] = &[
    EventType::Create,
    EventType::Postcreate,
    EventType::Remove,
    EventType::Postremove,
    EventType::Rename,
    EventType::Postrename,
    EventType::Symlink,
    EventType::Postsymlink,
    EventType::Link,
    EventType::Postlink,
    EventType::Attribute,
    EventType::Close,
    EventType::Destroy,
];

#[test]
fn namespace_events_block_veto_and_report() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("ns", &[], |b| {
        std::fs::create_dir(b.join("dir")).unwrap();
        std::fs::create_dir(b.join("empty")).unwrap();
        std::fs::create_dir_all(b.join("full/x")).unwrap();
    });
    let mut s = DmSession::create(d.socket(), b"ns test").unwrap();
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    let root = s.path_to_handle(&m.mnt).unwrap();
    let dir = s.path_to_handle(m.mnt.join("dir")).unwrap();
    let set = EventSet::of(NAMESPACE);
    s.set_disp(&fs, set).unwrap();
    s.set_eventlist(&fs, set).unwrap();

    // create: CREATE blocks the open until continue; POSTCREATE carries the new handle
    let p = m.mnt.join("dir/f");
    let t = blocked({
        let p = p.clone();
        move || File::create(&p).map(|mut f| f.write_all(b"hello"))
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Create);
    assert_ne!(ev.token, INVALID_TOKEN);
    let (mode, h1, _, name1, _, _) = ns(&ev);
    assert_eq!((h1, name1.as_str()), (dir.clone(), "f"));
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
    s.respond(ev.token, Response::Continue).unwrap();
    let post = next(&mut s);
    assert_eq!(post.kind, EventType::Postcreate);
    assert_eq!(post.token, INVALID_TOKEN);
    let (_, h1, h2, name1, _, rc) = ns(&post);
    assert_eq!((h1, name1.as_str(), rc), (dir.clone(), "f", 0));
    t.join().unwrap().unwrap().unwrap();
    assert_eq!(h2, s.path_to_handle(&p).unwrap());
    let close = next(&mut s);
    assert_eq!(close.kind, EventType::Close);
    assert_eq!(ns(&close).1, h2);

    // an operation that fails in the backing filesystem: the post event has the errno
    let t = std::thread::spawn({
        let (a, b) = (m.mnt.join("empty"), m.mnt.join("full"));
        move || std::fs::rename(a, b)
    });
    let ev = next(&mut s);
    assert_eq!((ev.kind, ns(&ev).3.as_str()), (EventType::Rename, "empty"));
    assert_eq!(ns(&ev).1, root);
    s.respond(ev.token, Response::Continue).unwrap();
    let post = next(&mut s);
    assert_eq!(
        (post.kind, ns(&post).5),
        (EventType::Postrename, libc::ENOTEMPTY)
    );
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );

    // remove vetoed: the unlink fails with the answered errno, the file stays
    let t = blocked({
        let p = p.clone();
        move || std::fs::remove_file(p)
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Remove);
    assert_eq!(ns(&ev).3, "f");
    s.respond(ev.token, Response::Abort(libc::EACCES)).unwrap();
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::EACCES)
    );
    assert!(p.exists());
    none(&mut s);

    // rename: both directories and names
    let q = m.mnt.join("g");
    let t = blocked({
        let (p, q) = (p.clone(), q.clone());
        move || std::fs::rename(p, q)
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Rename);
    let (_, h1, h2, n1, n2, _) = ns(&ev);
    assert_eq!(
        (h1, h2, n1.as_str(), n2.as_str()),
        (dir.clone(), root.clone(), "f", "g")
    );
    s.respond(ev.token, Response::Continue).unwrap();
    assert_eq!(next(&mut s).kind, EventType::Postrename);
    t.join().unwrap().unwrap();

    // link and symlink
    let t = blocked({
        let q = q.clone();
        let l = m.mnt.join("dir/l");
        move || std::fs::hard_link(q, l)
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Link);
    let (_, h1, h2, n1, _, _) = ns(&ev);
    assert_eq!((h1, n1.as_str()), (dir.clone(), "l"));
    assert_eq!(h2, s.path_to_handle(&q).unwrap());
    s.respond(ev.token, Response::Continue).unwrap();
    assert_eq!(next(&mut s).kind, EventType::Postlink);
    t.join().unwrap().unwrap();
    let t = blocked({
        let l = m.mnt.join("sym");
        move || std::os::unix::fs::symlink("g", l)
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Symlink);
    let (_, _, _, n1, n2, _) = ns(&ev);
    assert_eq!((n1.as_str(), n2.as_str()), ("sym", "g"));
    s.respond(ev.token, Response::Continue).unwrap();
    let post = next(&mut s);
    assert_eq!(post.kind, EventType::Postsymlink);
    t.join().unwrap().unwrap();
    assert_eq!(ns(&post).2, s.path_to_handle(m.mnt.join("sym")).unwrap());

    // attribute change: asynchronous, nothing waits
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Attribute);
    assert_eq!(ns(&ev).0 & 0o7777, 0o600);

    // destroy: the last link and the last open gone, with the attribute asked for
    let gh = s.path_to_handle(&q).unwrap();
    s.set_dmattr(0, &gh, b"hsm-id\0\0", b"tape-42").unwrap();
    s.set_return_on_destroy(&fs, Some(b"hsm-id\0\0")).unwrap();
    let held = File::open(&q).unwrap();
    for victim in [m.mnt.join("dir/l"), q.clone()] {
        let t = std::thread::spawn(move || std::fs::remove_file(victim));
        let ev = next(&mut s);
        assert_eq!(ev.kind, EventType::Remove);
        s.respond(ev.token, Response::Continue).unwrap();
        let post = next(&mut s);
        assert_eq!((post.kind, ns(&post).5), (EventType::Postremove, 0));
        t.join().unwrap().unwrap();
    }
    // still open: no DESTROY yet
    none(&mut s);
    drop(held);
    assert_eq!(next(&mut s).kind, EventType::Close);
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Destroy);
    match ev.data {
        EventData::Destroy {
            handle,
            attr_name,
            attr_copy,
        } => {
            assert_eq!(handle, gh);
            assert_eq!(&attr_name, b"hsm-id\0\0");
            assert_eq!(attr_copy, b"tape-42");
        }
        other => panic!("{other:?}"),
    }
    // without a disposition nothing is raised and nothing waits
    s.set_disp(&fs, EventSet::empty()).unwrap();
    std::fs::write(m.mnt.join("quiet"), b"x").unwrap();
    none(&mut s);
}

#[test]
fn data_events_only_inside_regions() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("data", &[], |b| {
        std::fs::write(b.join("f"), vec![7u8; 1 << 20]).unwrap();
        std::fs::write(b.join("plain"), vec![1u8; 4096]).unwrap();
    });
    let mut s = DmSession::create(d.socket(), b"data test").unwrap();
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    s.set_disp(
        &fs,
        EventSet::of(&[EventType::Read, EventType::Write, EventType::Truncate]),
    )
    .unwrap();
    let p = m.mnt.join("f");
    let h = s.path_to_handle(&p).unwrap();
    let regions = [
        Region {
            offset: 0,
            size: 4096,
            flags: 1,
        },
        Region {
            offset: 65536,
            size: 0,
            flags: 2 | 4,
        },
    ];
    assert!(s.set_region(0, &h, &regions).unwrap());
    assert_eq!(s.get_region(0, &h).unwrap(), regions);

    let f = File::options().read(true).write(true).open(&p).unwrap();
    // a read inside the READ region waits for the answer and has the exact range
    let t = blocked({
        let f = f.try_clone().unwrap();
        move || {
            let mut b = vec![0u8; 100];
            f.read_at(&mut b, 10).map(|n| (n, b))
        }
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Read);
    assert_eq!(data(&ev), (h.clone(), 10, 100));
    s.respond(ev.token, Response::Continue).unwrap();
    let (n, b) = t.join().unwrap().unwrap();
    assert_eq!((n, b[0]), (100, 7));
    // outside every READ range: no event; writes inside the READ-only region: no event
    let mut b = vec![0u8; 1000];
    f.read_at(&mut b, 8192).unwrap();
    f.write_at(b"abc", 100).unwrap();
    none(&mut s);
    // an abort fails the read with its errno
    let t = std::thread::spawn({
        let f = f.try_clone().unwrap();
        move || f.read_at(&mut [0u8; 10], 0)
    });
    let ev = next(&mut s);
    s.respond(ev.token, Response::Abort(libc::EIO)).unwrap();
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    // the WRITE region has size 0: from 64 KiB through EOF and beyond
    for off in [70_000u64, 5 << 20] {
        let t = std::thread::spawn({
            let f = f.try_clone().unwrap();
            move || f.write_at(b"xyz", off)
        });
        let ev = next(&mut s);
        assert_eq!(ev.kind, EventType::Write);
        assert_eq!(data(&ev), (h.clone(), off, 3));
        s.respond(ev.token, Response::Continue).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 3);
    }
    // truncate inside the TRUNCATE region
    let t = std::thread::spawn({
        let f = f.try_clone().unwrap();
        move || f.set_len(100_000)
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Truncate);
    assert_eq!(data(&ev).1, 100_000);
    s.respond(ev.token, Response::Continue).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 100_000);
    // the backing file has what was written
    let mut back = Vec::new();
    File::open(m.backing.join("f"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(&back[100..103], b"abc");
    assert_eq!(&back[70_000..70_003], b"xyz");
    // a file without regions never raises data events (kernel passthrough)
    let mut b = Vec::new();
    File::open(m.mnt.join("plain"))
        .unwrap()
        .read_to_end(&mut b)
        .unwrap();
    std::fs::write(m.mnt.join("plain"), b"new").unwrap();
    none(&mut s);
    assert_eq!(std::fs::read(m.backing.join("plain")).unwrap(), b"new");
}

#[test]
fn unanswered_events_time_out_and_dead_callers_cancel() {
    need_root();
    let d = Daemon::start_with("[dm]\nevent_timeout_ms = 700\ntimeout_errno = 110\n");
    let m = d.mount("to", &[], |_| {});
    let mut s = DmSession::create(d.socket(), b"slow").unwrap();
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    s.set_disp(&fs, EventSet::of(&[EventType::Create])).unwrap();
    s.set_eventlist(&fs, EventSet::of(&[EventType::Create]))
        .unwrap();
    // nobody answers: the operation fails with the configured errno, it does not hang
    let t0 = Instant::now();
    let e = File::create(m.mnt.join("a")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
    assert!(t0.elapsed() < Duration::from_secs(10));
    // never delivered, then timed out: gone without a trace
    none(&mut s);
    // delivered and not answered in time
    let t = std::thread::spawn({
        let p = m.mnt.join("a");
        move || File::create(p)
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Create);
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    // the session hears that the event was cancelled; its token is no longer outstanding
    let c = next(&mut s);
    assert_eq!(c.kind, EventType::Cancel);
    assert_eq!(
        c.data,
        EventData::Cancel {
            sequence: ev.sequence,
            token: ev.token
        }
    );
    assert_eq!(s.respond(ev.token, Response::Continue), Err(DmError::Esrch));
    // a caller killed while it waits: its event is cancelled
    let mut child = std::process::Command::new("touch")
        .arg(m.mnt.join("b"))
        .spawn()
        .unwrap();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Create);
    s.pending(ev.token, 60_000).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let c = next(&mut s);
    assert_eq!(c.kind, EventType::Cancel);
    assert_eq!(
        c.data,
        EventData::Cancel {
            sequence: ev.sequence,
            token: ev.token
        }
    );
    // the mount still works
    s.set_disp(&fs, EventSet::empty()).unwrap();
    std::fs::write(m.mnt.join("c"), b"ok").unwrap();
    assert_eq!(std::fs::read(m.mnt.join("c")).unwrap(), b"ok");
    assert!(!Path::new(&m.backing.join("a")).exists());
    let _ = std::fs::metadata(m.backing.join("c")).unwrap().ino();
}

#[test]
fn a_dm_policy_plugin_answers_events_and_survives_a_hot_swap() {
    need_root();
    let mut d = Daemon::start();
    let m = d.mount("wasm", &[], |b| {
        std::fs::write(b.join("resident"), b"local data").unwrap();
        std::fs::write(b.join("migrated"), b"stale stub").unwrap();
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
    // both files are managed: reads raise READ events, which the plugin answers
    let mut s = DmSession::create(d.socket(), b"setup").unwrap();
    for f in ["resident", "migrated"] {
        let h = s.path_to_handle(m.mnt.join(f)).unwrap();
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
    }
    // the policy's record that the data went to a tier: it must recall before the read
    let hm = s.path_to_handle(m.mnt.join("migrated")).unwrap();
    s.set_dmattr(0, &hm, b"stratloc", b"tape").unwrap();
    s.destroy().unwrap();
    let out = d.ok(&[
        "dm",
        "attach",
        "hsm",
        m.mnt.to_str().unwrap(),
        "--events",
        "read",
    ]);
    assert!(out.contains("hsm attached"), "{out}");
    assert!(d.ok(&["dm", "attachments"]).contains("hsm"));
    // no record: the plugin lets the read go on
    assert_eq!(
        std::fs::read(m.mnt.join("resident")).unwrap(),
        b"local data"
    );
    // a record: the plugin asks the host to recall (no tier exists yet: ENOSYS), and
    // refuses the read with EIO
    let e = std::fs::read(m.mnt.join("migrated")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    // hot swap while readers keep going: no read is lost or fails
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (p, stop) = (m.mnt.join("resident"), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(std::fs::read(&p).unwrap(), b"local data");
                    n += 1;
                }
                n
            })
        })
        .collect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(50));
        d.ok(&["plugin", "swap", "hsm", comp.to_str().unwrap()]);
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(reads > 0);
    let list: serde_json::Value =
        serde_json::from_str(&d.ok(&["plugin", "list", "--json"])).unwrap();
    assert_eq!(list[0]["current"]["id"], 4);
    let total = &list[0]["total"];
    assert_eq!(total["ok"], total["calls"], "{list}");
    assert!(
        total["calls"].as_u64().unwrap() >= reads,
        "every read was an event: {list}"
    );
    // the attachment comes back after a restart
    d.restart();
    let t0 = Instant::now();
    while std::fs::metadata(m.mnt.join("migrated")).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(m.mnt.join("migrated"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EIO)
    );
    d.ok(&["dm", "detach", "hsm"]);
    assert_eq!(
        std::fs::read(m.mnt.join("migrated")).unwrap(),
        b"stale stub"
    );
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn new(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "PREREQUISITE MISSING: cannot mount a tmpfs at {}",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn nospace_lets_the_application_free_space_and_debut_names_new_objects() {
    need_root();
    let d = Daemon::start();
    // a 1 MiB backing filesystem, 600 KiB of it taken
    let small = d.dir.join("small.back");
    let _tmpfs = Tmpfs::new(&small, "1m");
    let m = d.mount("small", &[], |b| {
        std::fs::write(b.join("ballast"), vec![1u8; 600 << 10]).unwrap();
    });
    let mut s = DmSession::create(d.socket(), b"space manager").unwrap();
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    let set = EventSet::of(&[EventType::Nospace, EventType::Debut]);
    s.set_disp(&fs, set).unwrap();
    s.set_eventlist(&fs, set).unwrap();
    // DEBUT: the first time the kernel looks an object up
    std::fs::metadata(m.mnt.join("ballast")).unwrap();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Debut);
    assert_eq!(ns(&ev).3, "ballast");
    assert_eq!(ns(&ev).1, s.path_to_handle(m.mnt.join("ballast")).unwrap());
    // a write that does not fit: NOSPACE blocks it; the application frees space and
    // answers continue: the write is tried again and succeeds
    let t = std::thread::spawn({
        let p = m.mnt.join("big");
        move || {
            let f = File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)?;
            f.write_all_at(&vec![2u8; 600 << 10], 0)
        }
    });
    let mut ev = next(&mut s);
    if ev.kind == EventType::Debut {
        // the new file's own debut
        ev = next(&mut s);
    }
    assert_eq!(ev.kind, EventType::Nospace);
    assert_eq!(ns(&ev).1, fs);
    // frees it as an HSM would: the data of a (migrated) file goes, the file stays
    let ballast = s.path_to_handle(m.mnt.join("ballast")).unwrap();
    s.punch_hole(0, &ballast, 0, 0).unwrap();
    s.respond(ev.token, Response::Continue).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(
        std::fs::metadata(m.backing.join("big")).unwrap().len(),
        600 << 10
    );
    // again, and this time the application aborts: the write fails with its errno
    let t = std::thread::spawn({
        let p = m.mnt.join("big");
        move || {
            let f = File::options().write(true).open(p)?;
            f.write_all_at(&vec![3u8; 600 << 10], 600 << 10)
        }
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Nospace);
    s.respond(ev.token, Response::Abort(libc::EDQUOT)).unwrap();
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::EDQUOT)
    );
    s.set_disp(&fs, EventSet::empty()).unwrap();
    d.ok(&["fs", "umount", m.mnt.to_str().unwrap()]);
}
