//! DM calls on a real managed filesystem: persistence across remount, daemon restart and
//! kill -9; MOUNT / PREUNMOUNT / UNMOUNT; session takeover; every error code of seed 001;
//! bad input; invisible I/O, holes, attributes; the `strata dm` CLI. Needs root.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};
use strata_client::dm::*;
use strata_client::session::DmSession;
use strata_client::Client;
use strata_tests::dm::{need_root, next, none};
use strata_tests::Daemon;

/// Wait until `p` is reachable through a (re)mounted filesystem.
fn wait_for(p: &Path) {
    let t0 = Instant::now();
    while std::fs::metadata(p).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} never came back",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const NAME: &[u8; 8] = b"hsm-tier";

#[test]
fn dm_state_persists_across_remount_restart_and_kill() {
    need_root();
    let mut d = Daemon::start();
    let m = d.mount("p", &[], |b| std::fs::write(b.join("f"), b"data").unwrap());
    let f = m.mnt.join("f");
    let mut s = DmSession::create(d.socket(), b"persistent app").unwrap();
    let sid = s.sid();
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    let h = s.path_to_handle(&f).unwrap();
    let disp = EventSet::of(&[EventType::Create, EventType::Destroy]);
    s.set_disp(&fs, disp).unwrap();
    s.set_eventlist(&fs, EventSet::of(&[EventType::Create]))
        .unwrap();
    s.set_dmattr(0, &h, NAME, b"tape-7").unwrap();
    let regions = vec![Region {
        offset: 0,
        size: 0,
        flags: 1,
    }];
    s.set_region(0, &h, &regions).unwrap();
    s.set_eventlist(&h, EventSet::of(&[EventType::Close]))
        .unwrap();
    s.set_return_on_destroy(&fs, Some(NAME)).unwrap();

    let check = |s: &mut DmSession| {
        let h2 = s.path_to_handle(&f).unwrap();
        assert_eq!(h2, h, "the handle is stable");
        assert_eq!(s.get_dmattr(0, &h, NAME).unwrap(), b"tape-7");
        assert_eq!(s.get_region(0, &h).unwrap(), regions);
        assert_eq!(
            s.get_eventlist(&h).unwrap(),
            EventSet::of(&[EventType::Close])
        );
        assert_eq!(
            s.get_eventlist(&fs).unwrap(),
            EventSet::of(&[EventType::Create])
        );
        let sid = s.sid();
        let got = s
            .call(&DmRequest::GetallDisp { sid, buflen: None }, &[])
            .unwrap()
            .0;
        let fsid = Handle(fs.clone()).fs();
        assert_eq!(
            got,
            DmReply::Dispositions {
                disp: vec![(fsid, disp)]
            }
        );
        // and the disposition is live: a create raises CREATE
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = m.mnt.join(format!(
            "new-{}",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let t = std::thread::spawn(move || std::fs::write(p, b"x"));
        let ev = next(s);
        assert_eq!(ev.kind, EventType::Create);
        s.respond(ev.token, Response::Continue).unwrap();
        t.join().unwrap().unwrap();
    };
    check(&mut s);

    // unmount and mount again
    d.ok(&["fs", "umount", m.mnt.to_str().unwrap()]);
    assert!(!f.exists());
    assert_eq!(
        s.get_dmattr(0, &h, NAME),
        Err(DmError::Eperm),
        "DMAPI disabled while unmounted"
    );
    d.ok(&[
        "fs",
        "mount",
        m.backing.to_str().unwrap(),
        m.mnt.to_str().unwrap(),
    ]);
    check(&mut s);

    // a clean restart: the mount comes back by itself, the session too
    drop(s);
    d.restart();
    wait_for(&f);
    let mut s = DmSession::assume(d.socket(), sid, b"").unwrap();
    assert_eq!(s.query(sid).unwrap(), b"persistent app");
    check(&mut s);

    // kill -9: the stale mount is detached and mounted again
    drop(s);
    d.kill9_and_restart();
    wait_for(&f);
    let mut s = DmSession::assume(d.socket(), sid, b"").unwrap();
    check(&mut s);
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
}

/// A filesystem handle's id (bytes 4..8 of the documented layout).
struct Handle(Vec<u8>);
impl Handle {
    fn fs(&self) -> u32 {
        u32::from_le_bytes(self.0[4..8].try_into().unwrap())
    }
}

#[test]
fn mount_preunmount_and_unmount_events() {
    need_root();
    let d = Daemon::start();
    let backing = d.dir.join("m.back");
    let mnt = d.dir.join("m.mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mut s = DmSession::create(d.socket(), b"mount watcher").unwrap();
    s.set_disp(&[], EventSet::of(&[EventType::Mount])).unwrap();
    let mount = || {
        let mut c = d.strata_cmd(&[
            "fs",
            "mount",
            backing.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]);
        std::thread::spawn(move || c.output().unwrap())
    };
    // refused: the mount fails with the errno
    let t = mount();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Mount);
    match &ev.data {
        EventData::Mount {
            mount_point,
            backing: b,
            ..
        } => {
            assert_eq!(Path::new(mount_point), mnt.canonicalize().unwrap());
            assert_eq!(Path::new(b), backing.canonicalize().unwrap());
        }
        other => panic!("{other:?}"),
    }
    s.respond(ev.token, Response::Abort(libc::EPERM)).unwrap();
    let o = t.join().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused"),
        "{o:?}"
    );
    assert!(!d.ok(&["fs", "list"]).contains(mnt.to_str().unwrap()));
    // allowed
    let t = mount();
    let ev = next(&mut s);
    s.respond(ev.token, Response::Continue).unwrap();
    assert!(t.join().unwrap().status.success());
    let fs = s.path_to_fshandle(&mnt).unwrap();
    let sid = s.sid();
    match s
        .call(
            &DmRequest::GetMountinfo {
                sid,
                token: 0,
                fs_handle: fs.clone(),
                buflen: None,
            },
            &[],
        )
        .unwrap()
        .0
    {
        DmReply::Mountinfo { message } => assert_eq!(message.kind, EventType::Mount),
        other => panic!("{other:?}"),
    }
    // PREUNMOUNT may refuse; UNMOUNT reports the outcome
    let set = EventSet::of(&[EventType::Preunmount, EventType::Unmount]);
    s.set_disp(&fs, set).unwrap();
    s.set_eventlist(&fs, set).unwrap();
    let umount = || {
        let mut c = d.strata_cmd(&["fs", "umount", mnt.to_str().unwrap()]);
        std::thread::spawn(move || c.output().unwrap())
    };
    let t = umount();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Preunmount);
    s.respond(ev.token, Response::Abort(libc::EBUSY)).unwrap();
    assert!(!t.join().unwrap().status.success());
    std::fs::write(mnt.join("still"), b"mounted").unwrap();
    let t = umount();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Preunmount);
    s.respond(ev.token, Response::Continue).unwrap();
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Unmount);
    match ev.data {
        EventData::Namespace {
            retcode, handle1, ..
        } => {
            assert_eq!((retcode, handle1), (0, fs.clone()));
        }
        other => panic!("{other:?}"),
    }
    assert!(t.join().unwrap().status.success());
    assert!(backing.join("still").exists() && !mnt.join("still").exists());
}

#[test]
fn an_assumed_session_gets_outstanding_file_events_again() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("take", &[], |_| {});
    let mut a = DmSession::create(d.socket(), b"first instance").unwrap();
    let sid = a.sid();
    let fs = a.path_to_fshandle(&m.mnt).unwrap();
    a.set_disp(&fs, EventSet::of(&[EventType::Create])).unwrap();
    a.set_eventlist(&fs, EventSet::of(&[EventType::Create]))
        .unwrap();
    let t = std::thread::spawn({
        let p = m.mnt.join("x");
        move || std::fs::write(p, b"after takeover")
    });
    let first = next(&mut a);
    a.pending(first.token, 30_000).unwrap();
    // the application dies with the event outstanding
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.is_finished());
    let mut b = DmSession::assume(d.socket(), sid, b"second instance").unwrap();
    assert_eq!(b.tokens().unwrap(), vec![first.token]);
    let again = next(&mut b);
    assert_eq!(
        (again.kind, again.token, again.sequence),
        (first.kind, first.token, first.sequence)
    );
    b.respond(again.token, Response::Continue).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(
        std::fs::read(m.backing.join("x")).unwrap(),
        b"after takeover"
    );
}

fn forge(fs: u32, kbytes: &[u8]) -> Vec<u8> {
    let mut v = b"SH".to_vec();
    v.push(1);
    v.push(1);
    v.extend_from_slice(&fs.to_le_bytes());
    v.extend_from_slice(&1i32.to_le_bytes());
    v.extend_from_slice(&(kbytes.len() as u32).to_le_bytes());
    v.extend_from_slice(kbytes);
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

#[test]
fn every_seed_001_error_code() {
    need_root();
    let d = Daemon::start_with("[dm]\nmax_sessions = 3\n");
    let m = d.mount("e", &[], |b| {
        std::fs::write(b.join("f"), vec![5u8; 1 << 20]).unwrap();
        std::fs::write(b.join("gone"), b"x").unwrap();
        std::fs::write(b.join("open-unlinked"), b"x").unwrap();
    });
    let ro = d.mount("ro", &["--read-only"], |b| {
        std::fs::write(b.join("r"), b"r").unwrap()
    });
    let mut s = DmSession::create(d.socket(), b"errors").unwrap();
    let sid = s.sid();
    let f = m.mnt.join("f");
    let h = s.path_to_handle(&f).unwrap();

    // ENOSYS: a DMAPI function this daemon does not implement
    let mut c = Client::connect(d.socket()).unwrap();
    let (_, v, _) = c
        .call(
            &serde_json::json!({"op": "dm", "call": "create-userevent"}),
            b"",
        )
        .unwrap();
    assert_eq!(v["result"], "error");
    assert_eq!(v["error"], "enosys");
    // ENOTREADY: the daemon is not running
    assert_eq!(
        DmSession::create(d.dir.join("no-such.sock"), b"x").err(),
        Some(DmError::Enotready)
    );
    // ENOMEM: the configured resources (3 sessions) are used up
    let _s2 = DmSession::create(d.socket(), b"2").unwrap();
    let _s3 = DmSession::create(d.socket(), b"3").unwrap();
    assert_eq!(
        DmSession::create(d.socket(), b"4").err(),
        Some(DmError::Enomem)
    );
    // ESTALE: fits no other code (the path of an object that has no name any more)
    let held = File::open(m.mnt.join("open-unlinked")).unwrap();
    let hu = s.path_to_handle(m.mnt.join("open-unlinked")).unwrap();
    std::fs::remove_file(m.mnt.join("open-unlinked")).unwrap();
    assert_eq!(s.handle_to_path(&hu), Err(DmError::Estale));
    drop(held);
    // EINVAL: a malformed handle, without looking it up; EBADF: a missing object
    assert_eq!(s.get_fileattr(0, &h[..h.len() - 1]), Err(DmError::Einval));
    let hg = s.path_to_handle(m.mnt.join("gone")).unwrap();
    std::fs::remove_file(m.mnt.join("gone")).unwrap();
    assert_eq!(s.get_fileattr(0, &hg), Err(DmError::Ebadf));
    // EPERM: DMAPI disabled for the filesystem (not mounted)
    let hr = s.path_to_handle(ro.mnt.join("r")).unwrap();
    // EROFS: sync_by_handle on a read-only mount
    assert_eq!(s.sync_by_handle(0, &hr), Err(DmError::Erofs));
    d.ok(&["fs", "umount", ro.mnt.to_str().unwrap()]);
    assert_eq!(s.get_fileattr(0, &hr), Err(DmError::Eperm));
    // EPERM: dm_get_region without the privilege (as nobody, through the CLI)
    {
        use std::os::unix::process::CommandExt;
        let o = d
            .strata_cmd(&["dm", "region", "get", f.to_str().unwrap()])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(5), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("EPERM"),
            "{o:?}"
        );
    }
    // ESRCH: the event is not outstanding (answered already)
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    s.set_disp(&fs, EventSet::of(&[EventType::Create])).unwrap();
    s.set_eventlist(&fs, EventSet::of(&[EventType::Create]))
        .unwrap();
    let t = std::thread::spawn({
        let p = m.mnt.join("n");
        move || std::fs::write(p, b"")
    });
    let ev = next(&mut s);
    s.respond(ev.token, Response::Continue).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(s.respond(ev.token, Response::Continue), Err(DmError::Esrch));
    // dm_downgrade_right / dm_upgrade_right, dm_move_event / dm_respond_event: EINVAL for
    // a token that is not valid
    for req in [
        DmRequest::DowngradeRight {
            sid,
            token: 987_654_321,
            object: h.clone(),
        },
        DmRequest::UpgradeRight {
            sid,
            token: 987_654_321,
            object: h.clone(),
        },
        DmRequest::MoveEvent {
            sid,
            token: 987_654_321,
            target: sid,
        },
        DmRequest::Respond {
            sid,
            token: 987_654_321,
            response: Response::Continue,
        },
    ] {
        assert_eq!(s.call(&req, &[]).err(), Some(DmError::Einval), "{req:?}");
    }
    // dm_init_service's EFAULT (an argument's buffer is not what the call says): the
    // socket's analogue is write_invis whose length disagrees with the bytes sent
    let req = DmRequest::WriteInvis {
        sid,
        token: 0,
        handle: h.clone(),
        offset: 0,
        flags: 0,
        length: 10,
    };
    assert_eq!(s.call(&req, b"abc").err(), Some(DmError::Efault));
    // dm_punch_hole: EBUSY while the file is memory mapped (a managed file, served by the
    // daemon: a NOEVENT region)
    s.set_region(
        0,
        &h,
        &[Region {
            offset: 0,
            size: 0,
            flags: 0,
        }],
    )
    .unwrap();
    {
        let file = File::open(&f).unwrap();
        // SAFETY: a read-only map of a file nothing truncates during the test.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        assert_eq!(map[0], 5);
        assert_eq!(s.punch_hole(0, &h, 0, 4096), Err(DmError::Ebusy));
        drop(map);
        assert_eq!(s.punch_hole(0, &h, 0, 4096), Ok(()));
    }
    // dm_probe_hole / dm_punch_hole: EINVAL for a negative offset or a length that
    // overflows an offset
    for (off, len) in [(-1i64, 10u64), (0, u64::MAX), (1, i64::MAX as u64)] {
        assert_eq!(s.probe_hole(0, &h, off, len), Err(DmError::Einval));
        assert_eq!(s.punch_hole(0, &h, off, len), Err(DmError::Einval));
    }
    // dm_write_invis: EINVAL for bad flags; read/write_invis: EINVAL for a length too
    // large or a negative offset
    let req = DmRequest::WriteInvis {
        sid,
        token: 0,
        handle: h.clone(),
        offset: 0,
        flags: 2,
        length: 1,
    };
    assert_eq!(s.call(&req, b"x").err(), Some(DmError::Einval));
    assert_eq!(s.read_invis(0, &h, 0, 1 << 31), Err(DmError::Einval));
    assert_eq!(s.read_invis(0, &h, -5, 1), Err(DmError::Einval));
    assert_eq!(s.write_invis(0, &h, -5, b"x", false), Err(DmError::Einval));
    // buflen too large (INT_MAX or more): EINVAL
    let big = Some(i32::MAX as u64);
    for req in [
        DmRequest::GetallDisp { sid, buflen: big },
        DmRequest::HandleToPath {
            handle: h.clone(),
            buflen: big,
        },
        DmRequest::GetDirattrs {
            sid,
            token: 0,
            handle: s.path_to_handle(&m.mnt).unwrap(),
            cursor: 0,
            max: 10,
            buflen: big,
        },
        DmRequest::GetBulkattr {
            sid,
            token: 0,
            fs_handle: fs.clone(),
            cursor: 0,
            max: 10,
            buflen: big,
        },
        DmRequest::GetMountinfo {
            sid,
            token: 0,
            fs_handle: fs.clone(),
            buflen: big,
        },
        DmRequest::GetallDmattr {
            sid,
            token: 0,
            handle: h.clone(),
            buflen: big,
        },
        DmRequest::GetEvents {
            sid,
            max: i32::MAX as u32,
            wait: false,
        },
    ] {
        assert_eq!(s.call(&req, &[]).err(), Some(DmError::Einval), "{req:?}");
    }
    // nelem too large: EINVAL
    for req in [
        DmRequest::GetAllocinfo {
            sid,
            token: 0,
            handle: h.clone(),
            offset: 0,
            nelem: u32::MAX,
        },
        DmRequest::Sessions {
            nelem: Some(u32::MAX),
        },
        DmRequest::Tokens {
            sid,
            nelem: Some(u32::MAX),
        },
    ] {
        assert_eq!(s.call(&req, &[]).err(), Some(DmError::Einval), "{req:?}");
    }
    // the mount kept working through all of it
    s.set_disp(&fs, EventSet::empty()).unwrap();
    std::fs::write(m.mnt.join("after"), b"fine").unwrap();
    assert_eq!(std::fs::read(m.mnt.join("after")).unwrap(), b"fine");
}

#[test]
fn bad_input_gets_the_documented_error_and_the_mount_keeps_working() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("bad", &[], |b| {
        std::fs::write(b.join("f"), b"0123456789").unwrap()
    });
    let mut a = DmSession::create(d.socket(), b"a").unwrap();
    let mut b = DmSession::create(d.socket(), b"b").unwrap();
    let f = m.mnt.join("f");
    let h = a.path_to_handle(&f).unwrap();
    let fsid = Handle(h.clone()).fs();
    // truncated and bit-flipped handles: EINVAL; forged well-formed ones: EBADF
    for cut in [0, 1, 2, 8, 16, h.len() - 1] {
        assert_eq!(
            a.get_dmattr(0, &h[..cut], NAME),
            Err(DmError::Einval),
            "cut {cut}"
        );
    }
    for bit in 0..h.len() * 8 {
        let mut x = h.clone();
        x[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(a.get_fileattr(0, &x), Err(DmError::Einval), "bit {bit}");
    }
    assert_eq!(
        a.get_fileattr(0, &forge(fsid, &[0xAB; 8])),
        Err(DmError::Ebadf)
    );
    assert_eq!(
        a.get_fileattr(0, &forge(999, &[0xAB; 8])),
        Err(DmError::Ebadf)
    );
    assert_eq!(a.get_fileattr(0, &[0u8; 1 << 16]), Err(DmError::Einval));
    // names that are not 8 bytes: EINVAL; values over the limit: E2BIG
    for name in [&b""[..], b"abc", b"123456789"] {
        assert_eq!(a.set_dmattr(0, &h, name, b"v"), Err(DmError::Einval));
        assert_eq!(a.get_dmattr(0, &h, name), Err(DmError::Einval));
    }
    assert_eq!(
        a.set_dmattr(0, &h, NAME, &vec![1u8; 3000]),
        Err(DmError::E2big)
    );
    assert_eq!(
        a.set_dmattr(0, &h, NAME, &vec![1u8; 1 << 20]),
        Err(DmError::E2big)
    );
    assert_eq!(a.get_dmattr(0, &h, NAME), Err(DmError::Enoent));
    // a token of another session: EINVAL; an answered one: ESRCH
    let fs = a.path_to_fshandle(&m.mnt).unwrap();
    a.set_disp(&fs, EventSet::of(&[EventType::Remove])).unwrap();
    a.set_eventlist(&fs, EventSet::of(&[EventType::Remove]))
        .unwrap();
    let t = std::thread::spawn({
        let f = f.clone();
        move || std::fs::remove_file(f)
    });
    let ev = next(&mut a);
    assert_eq!(
        b.respond(ev.token, Response::Continue),
        Err(DmError::Einval)
    );
    assert_eq!(
        b.request_right(ev.token, &h, Right::Shared, false),
        Err(DmError::Einval)
    );
    // rights under the token: a DM call needing more than is held is EACCES
    assert_eq!(a.set_dmattr(ev.token, &h, NAME, b"v"), Err(DmError::Eacces));
    a.request_right(ev.token, &h, Right::Excl, false).unwrap();
    a.set_dmattr(ev.token, &h, NAME, b"v").unwrap();
    a.respond(ev.token, Response::Continue).unwrap();
    assert_eq!(a.respond(ev.token, Response::Continue), Err(DmError::Esrch));
    assert_eq!(a.set_dmattr(ev.token, &h, NAME, b"v"), Err(DmError::Esrch));
    t.join().unwrap().unwrap();
    // paths outside managed filesystems: EPERM; relative or with `..`: EINVAL
    assert_eq!(a.path_to_handle("/etc/passwd"), Err(DmError::Eperm));
    assert_eq!(a.path_to_handle("relative"), Err(DmError::Einval));
    assert_eq!(a.path_to_handle(m.mnt.join("../x")), Err(DmError::Einval));
    assert_eq!(
        a.path_to_handle(m.mnt.join("missing")),
        Err(DmError::Enoent)
    );
    // config names that do not exist: EINVAL
    assert_eq!(a.get_config(&fs, "no_such_flag"), Err(DmError::Einval));
    // an abort errno the kernel cannot carry (over 511): EINVAL, the event stays
    // outstanding and a proper answer still completes the operation
    std::fs::write(m.mnt.join("g"), b"x").unwrap();
    let t = std::thread::spawn({
        let g = m.mnt.join("g");
        move || std::fs::remove_file(g)
    });
    let ev = next(&mut a);
    for bad in [0, -1, 512, 1000] {
        assert_eq!(
            a.respond(ev.token, Response::Abort(bad)),
            Err(DmError::Einval)
        );
    }
    a.respond(ev.token, Response::Abort(libc::EPERM)).unwrap();
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    a.set_disp(&fs, EventSet::empty()).unwrap();
    // a file open by passthrough (its reads never reach the daemon): regions that raise
    // events and holes are EBUSY until it is closed (its reader would see zeros, no event)
    std::fs::write(m.mnt.join("pt"), vec![7u8; 8192]).unwrap();
    let hp = a.path_to_handle(m.mnt.join("pt")).unwrap();
    let reader = File::open(m.mnt.join("pt")).unwrap();
    let r = [Region {
        offset: 0,
        size: 0,
        flags: 1,
    }];
    assert_eq!(a.set_region(0, &hp, &r), Err(DmError::Ebusy));
    assert_eq!(a.punch_hole(0, &hp, 0, 0), Err(DmError::Ebusy));
    drop(reader);
    let t0 = Instant::now();
    // the kernel releases the open asynchronously
    while a.set_region(0, &hp, &r) == Err(DmError::Ebusy) {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    a.punch_hole(0, &hp, 0, 0).unwrap();
    // data calls on a FIFO: EINVAL at once (nothing waits for a partner)
    let fifo = m.mnt.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let hf = a.path_to_handle(&fifo).unwrap();
    assert_eq!(a.read_invis(0, &hf, 0, 10), Err(DmError::Einval));
    assert_eq!(a.write_invis(0, &hf, 0, b"x", false), Err(DmError::Einval));
    assert_eq!(a.get_allocinfo(0, &hf, 0, 4), Err(DmError::Einval));
    assert_eq!(a.sync_by_handle(0, &hf), Err(DmError::Einval));
    assert_eq!(a.punch_hole(0, &hf, 0, 0), Err(DmError::Einval));
    // the mount keeps working
    a.set_disp(&fs, EventSet::empty()).unwrap();
    std::fs::write(&f, b"again").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"again");
}

#[test]
fn invisible_io_holes_and_attributes() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("inv", &[], |b| {
        std::fs::write(b.join("f"), vec![9u8; 1 << 20]).unwrap();
        std::fs::create_dir(b.join("dir")).unwrap();
        for n in ["a", "b", "c"] {
            std::fs::write(b.join("dir").join(n), n).unwrap();
        }
    });
    let mut s = DmSession::create(d.socket(), b"inv").unwrap();
    let sid = s.sid();
    let f = m.mnt.join("f");
    let h = s.path_to_handle(&f).unwrap();
    let fs = s.path_to_fshandle(&m.mnt).unwrap();
    // a managed file with every data event disposed: invisible I/O raises none
    s.set_region(
        0,
        &h,
        &[Region {
            offset: 0,
            size: 0,
            flags: 7,
        }],
    )
    .unwrap();
    s.set_disp(&fs, EventSet::of(&[EventType::Read, EventType::Write]))
        .unwrap();
    let before = std::fs::metadata(m.backing.join("f")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(s.write_invis(0, &h, 100, b"INVISIBLE", true).unwrap(), 9);
    assert_eq!(
        s.read_invis(0, &h, 98, 13).unwrap(),
        b"\x09\x09INVISIBLE\x09\x09"
    );
    assert_eq!(
        s.read_invis(0, &h, (1 << 20) - 2, 100).unwrap(),
        vec![9u8; 2]
    );
    let after = std::fs::metadata(m.backing.join("f")).unwrap();
    assert_eq!(
        (
            after.mtime(),
            after.mtime_nsec(),
            after.atime(),
            after.atime_nsec()
        ),
        (
            before.mtime(),
            before.mtime_nsec(),
            before.atime(),
            before.atime_nsec()
        ),
        "no timestamp changes"
    );
    none(&mut s);
    // what the mount shows is the new data (its cache was dropped); reading it is a
    // READ event, answered here
    let t = std::thread::spawn({
        let f = f.clone();
        move || {
            let mut b = vec![0u8; 9];
            File::open(f).unwrap().read_exact_at(&mut b, 100).map(|_| b)
        }
    });
    let ev = next(&mut s);
    assert_eq!(ev.kind, EventType::Read);
    s.respond(ev.token, Response::Continue).unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"INVISIBLE");
    s.set_disp(&fs, EventSet::empty()).unwrap();

    // holes: probe aligns inward to blocks; punch frees them; allocinfo and SEEK_HOLE agree
    assert_eq!(s.probe_hole(0, &h, 100, 10_000).unwrap(), (4096, 4096));
    assert_eq!(s.probe_hole(0, &h, 0, 0).unwrap(), (0, 1 << 20));
    s.punch_hole(0, &h, 0, 512 << 10).unwrap();
    let (ext, more) = s.get_allocinfo(0, &h, 0, 16).unwrap();
    assert!(!more);
    assert_eq!(
        ext,
        vec![
            Extent {
                resident: false,
                offset: 0,
                length: 512 << 10
            },
            Extent {
                resident: true,
                offset: 512 << 10,
                length: 512 << 10
            }
        ]
    );
    let (ext, more) = s.get_allocinfo(0, &h, 0, 1).unwrap();
    assert!(more && ext.len() == 1);
    {
        use std::os::fd::AsRawFd;
        let file = File::open(&f).unwrap();
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert_eq!(data, 512 << 10);
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 1 << 20, "size kept");
        let mut b = [1u8; 4];
        file.read_exact_at(&mut b, 100).unwrap();
        assert_eq!(b, [0; 4], "the punched range reads as zeros");
    }

    // file attributes: get, set (visible through the mount), dt_change, flags
    let st = s.get_fileattr(0, &h).unwrap();
    assert_eq!(
        (st.size, st.has_regions, st.has_dmattrs),
        (1 << 20, true, false)
    );
    s.set_dmattr(0, &h, NAME, b"x").unwrap();
    let st2 = s.get_fileattr(0, &h).unwrap();
    assert!(st2.has_dmattrs && st2.change > st.change);
    let req = DmRequest::SetFileattr {
        sid,
        token: 0,
        handle: h.clone(),
        attr: SetAttr {
            mode: Some(0o640),
            mtime: Some((1_000_000_000, 5)),
            size: Some(4096),
            ..Default::default()
        },
    };
    s.call(&req, &[]).unwrap();
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.mtime(), md.len()),
        (0o640, 1_000_000_000, 4096)
    );

    // directory and bulk attributes, paged
    let dh = s.path_to_handle(m.mnt.join("dir")).unwrap();
    let mut names = Vec::new();
    let mut cursor = 0;
    loop {
        let req = DmRequest::GetDirattrs {
            sid,
            token: 0,
            handle: dh.clone(),
            cursor,
            max: 2,
            buflen: None,
        };
        match s.call(&req, &[]).unwrap().0 {
            DmReply::Entries { entries, cursor: c } => {
                for e in &entries {
                    assert_eq!(
                        e.handle,
                        s.path_to_handle(m.mnt.join("dir").join(&e.name)).unwrap()
                    );
                    assert_eq!(e.stat.size, 1);
                }
                names.extend(entries.into_iter().map(|e| e.name));
                match c {
                    Some(c) => cursor = c,
                    None => break,
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(names, ["a", "b", "c"]);
    let req = DmRequest::GetBulkattr {
        sid,
        token: 0,
        fs_handle: fs.clone(),
        cursor: 0,
        max: 100,
        buflen: None,
    };
    match s.call(&req, &[]).unwrap().0 {
        DmReply::Entries { entries, cursor } => {
            // the root, f, dir and its three files
            assert_eq!((entries.len(), cursor), (6, None));
        }
        other => panic!("{other:?}"),
    }
    // too small a buffer: E2BIG
    let req = DmRequest::GetBulkattr {
        sid,
        token: 0,
        fs_handle: fs.clone(),
        cursor: 0,
        max: 100,
        buflen: Some(10),
    };
    assert_eq!(s.call(&req, &[]).err(), Some(DmError::E2big));
    // handles and paths both ways; config
    assert_eq!(s.handle_to_path(&h).unwrap(), f);
    assert_eq!(s.get_config(&h, "max_attribute_size").unwrap(), 2048);
    assert_eq!(s.get_config(&fs, "punch_hole").unwrap(), 1);
    assert_eq!(
        s.call(&DmRequest::HandleToFsHandle { handle: h.clone() }, &[])
            .unwrap()
            .0,
        DmReply::Handle { handle: fs.clone() }
    );
    let version = s.call(&DmRequest::InitService, &[]).unwrap().0;
    assert!(matches!(version, DmReply::Version { .. }));
}

#[test]
fn the_dm_cli() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("cli", &[], |b| {
        std::fs::write(b.join("f"), vec![3u8; 100_000]).unwrap()
    });
    let f = m.mnt.join("f");
    let fp = f.to_str().unwrap();
    d.ok(&["dm", "attr", "set", fp, "tier", "tape-3"]);
    assert_eq!(d.ok(&["dm", "attr", "get", fp, "tier"]).trim(), "tape-3");
    assert!(d.ok(&["dm", "attr", "list", fp]).contains("tier\ttape-3"));
    d.ok(&["dm", "region", "set", fp, "0:0:rw", "4096:100:-"]);
    assert_eq!(d.ok(&["dm", "region", "get", fp]), "0:0:rw\n4096:100:-\n");
    assert_eq!(
        d.ok(&["dm", "hole", "probe", fp, "1", "10000"]).trim(),
        "4096 4096"
    );
    d.ok(&["dm", "hole", "punch", fp, "0", "65536"]);
    let alloc = d.ok(&["dm", "hole", "alloc", fp]);
    assert!(alloc.lines().next().unwrap().ends_with("hole"), "{alloc}");
    let o = d.strata(&["dm", "attr", "get", fp, "nothing"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ENOENT"));
    // a session, its events and answers, all from the shell
    let sid = d
        .ok(&["dm", "sessions", "--create", "shell hsm"])
        .trim()
        .to_string();
    assert!(d.ok(&["dm", "sessions"]).contains("shell hsm"));
    d.ok(&[
        "dm",
        "events",
        &sid,
        "--dispose",
        m.mnt.to_str().unwrap(),
        "--events",
        "read",
    ]);
    let t = std::thread::spawn({
        let f = f.clone();
        move || std::fs::read(f)
    });
    let line = d.ok(&["dm", "events", &sid, "--wait", "--max", "1"]);
    let msg: Message = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(msg.kind, EventType::Read);
    d.ok(&["dm", "respond", &sid, &msg.token.to_string(), "abort", "5"]);
    assert_eq!(
        t.join().unwrap().unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    d.ok(&[
        "dm",
        "events",
        &sid,
        "--dispose",
        m.mnt.to_str().unwrap(),
        "--events",
        "",
    ]);
    d.ok(&["dm", "sessions", "--destroy", &sid]);
    assert!(!d.ok(&["dm", "sessions"]).contains("shell hsm"));
    // an attach that fails leaves no session behind
    let comp = strata_tests::component("hsm-age-policy");
    d.ok(&[
        "plugin",
        "load",
        "hsm",
        comp.to_str().unwrap(),
        "--kind",
        "dm-policy",
    ]);
    let o = d.strata(&[
        "dm",
        "attach",
        "hsm",
        d.dir.to_str().unwrap(),
        "--events",
        "read",
    ]);
    assert!(!o.status.success());
    assert!(!d.ok(&["dm", "sessions"]).contains("plugin:hsm"));
    d.ok(&[
        "dm",
        "attach",
        "hsm",
        m.mnt.to_str().unwrap(),
        "--events",
        "read",
    ]);
    assert!(d.ok(&["dm", "sessions"]).contains("plugin:hsm"));
    d.ok(&["dm", "detach", "hsm"]);
    assert!(!d.ok(&["dm", "sessions"]).contains("plugin:hsm"));
}
