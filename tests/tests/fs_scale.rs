//! A mount that scales: a tree of tens of thousands of files is extracted into a managed
//! filesystem and removed again while the daemon may hold only a bounded number of
//! descriptors (its RLIMIT_NOFILE is lowered to 1024 and the cache of open objects to
//! `[fs] max_open_fds = 256`). The old design held one `O_PATH` descriptor per object the
//! kernel knew and failed with EMFILE after about a thousand files. Needs root (FUSE).
//!
//! The benchmark is `tests/benches/fs_scale.rs`.

use std::time::{Duration, Instant};
use strata_tests::dm::need_root;
use strata_tests::scale::*;
use strata_tests::Daemon;

#[test]
fn extracting_and_removing_30k_files_keeps_descriptors_bounded() {
    need_root();
    let d = Daemon::start_with("[fs]\nmax_open_fds = 256\n");
    let pid = d.pid();
    set_nofile(pid, 1024);
    let m = d.mount("scale", &[], |_| {});
    let tar = make_tar(&d.dir, 30, 1000);
    let (fds0, rss0) = (fds(pid), rss_kib(pid));
    let ((), took, peak) = watched(pid, || extract(&tar, &m.mnt));
    let (fds1, rss1) = (fds(pid), rss_kib(pid));
    // the mount still answers, and has it all
    assert_eq!(std::fs::read_dir(&m.mnt).unwrap().count(), 1);
    assert_eq!(count_files(&m.mnt.join("tree")), 30_000);
    assert_eq!(
        std::fs::read_to_string(m.mnt.join("tree/d029/f0999")).unwrap(),
        "file 999 of dir 29\n"
    );
    let ((), took_rm, peak_rm) = watched(pid, || remove(&m.mnt.join("tree")));
    let (fds2, rss2) = (fds(pid), rss_kib(pid));
    eprintln!(
        "extract 30000 files: {:.1} s, rm -rf: {:.1} s; daemon fds {fds0} -> {fds1} -> {fds2} \
         (peak {peak} / {peak_rm}), RSS {rss0} -> {rss1} -> {rss2} KiB",
        took.as_secs_f64(),
        took_rm.as_secs_f64()
    );
    assert_eq!(std::fs::read_dir(&m.mnt).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&m.backing).unwrap().count(), 0);
    // the cache (256) and what the daemon holds anyway; never one per file
    assert!(
        peak.max(peak_rm) <= fds0 + 256 + 64,
        "daemon descriptors not bounded: {fds0} at start, peak {peak} / {peak_rm}"
    );
    let log = d.log();
    assert!(
        !log.contains("Too many open files"),
        "descriptor limit hit: {log}"
    );
}

/// With a cache of 2 descriptors every object is opened again by its handle: identity
/// across renames, backing inode numbers, hard links, unlinked open files, xattrs.
#[test]
fn objects_keep_their_identity_when_their_descriptors_are_evicted() {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    need_root();
    let d = Daemon::start_with("[fs]\nmax_open_fds = 2\n");
    let m = d.mount("ident", &[], |_| {});
    let a = m.mnt.join("a");
    std::fs::create_dir(&a).unwrap();
    std::fs::write(a.join("f"), b"data").unwrap();
    std::fs::hard_link(a.join("f"), a.join("g")).unwrap();
    let ino = std::fs::metadata(a.join("f")).unwrap().ino();
    assert_eq!(ino, std::fs::metadata(m.backing.join("a/f")).unwrap().ino());
    let mut open = std::fs::File::open(a.join("f")).unwrap();
    for i in 0..50 {
        std::fs::write(m.mnt.join(format!("other{i}")), b"o").unwrap();
    }
    std::fs::rename(&a, m.mnt.join("b")).unwrap();
    for i in 0..50 {
        let _ = std::fs::metadata(m.mnt.join(format!("other{i}"))).unwrap();
    }
    let b = m.mnt.join("b");
    let (f, g) = (
        std::fs::metadata(b.join("f")).unwrap(),
        std::fs::metadata(b.join("g")).unwrap(),
    );
    assert_eq!((f.ino(), g.ino(), f.nlink()), (ino, ino, 2));
    assert_eq!(std::fs::read(b.join("g")).unwrap(), b"data");
    rustix::fs::setxattr(b.join("g"), "user.k", b"v", rustix::fs::XattrFlags::empty()).unwrap();
    let mut v = [0u8; 8];
    let n = rustix::fs::getxattr(b.join("f"), "user.k", &mut v[..]).unwrap();
    assert_eq!(&v[..n], b"v");
    std::fs::remove_file(b.join("f")).unwrap();
    std::fs::remove_file(b.join("g")).unwrap();
    for i in 0..50 {
        std::fs::remove_file(m.mnt.join(format!("other{i}"))).unwrap();
    }
    let mut buf = Vec::new();
    open.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"data");
    assert_eq!(open.metadata().unwrap().nlink(), 0);
    drop(open);
    std::fs::remove_dir(&b).unwrap();
    assert_eq!(std::fs::read_dir(&m.mnt).unwrap().count(), 0);
}

/// The descriptor limit drops under the mount's cache after it was mounted: the mount runs
/// out of descriptors, says so in the log, closes cached ones and goes on.
#[test]
fn running_out_of_descriptors_is_logged_and_recovered_from() {
    need_root();
    let d = Daemon::start();
    let pid = d.pid();
    let m = d.mount("emfile", &[], |_| {});
    // the cache was sized (4096, half of the limit at most) before the limit fell
    set_nofile(pid, 300);
    let tar = make_tar(&d.dir, 3, 1000);
    let ((), _, peak) = watched(pid, || extract(&tar, &m.mnt));
    assert_eq!(count_files(&m.mnt.join("tree")), 3000);
    let mut log = d.log();
    let until = Instant::now() + Duration::from_secs(5);
    while !log.contains("out of descriptors") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        log = d.log();
    }
    assert!(log.contains("out of descriptors"), "not logged: {log}");
    remove(&m.mnt.join("tree"));
    assert_eq!(std::fs::read_dir(&m.mnt).unwrap().count(), 0);
    eprintln!("peak daemon descriptors {peak} (limit 300)");
}
