//! A mount that scales: a tree of tens of thousands of files is extracted into a managed
//! filesystem and removed again while the daemon may hold only a bounded number of
//! descriptors (its RLIMIT_NOFILE is lowered to 1024 and the cache of open objects to
//! `[fs] max_open_fds = 256`). The old design held one `O_PATH` descriptor per object the
//! kernel knew and failed with EMFILE after about a thousand files. Needs root (FUSE).
//!
//! The benchmark (`bench_extract_and_remove_vs_backing`, ignored: run it with
//! `STRATA_TEST_WATCHDOG_S=3600 cargo test -p strata-tests --test fs_scale -- --ignored
//! --nocapture`) extracts and removes a 100,000-file tree on the mount and on a plain
//! directory of the same filesystem and prints the ratios (target <= 1.5x), with the
//! daemon's descriptors and RSS. `STRATA_BENCH_FILES=N` changes the count,
//! `STRATA_BENCH_QUICK=1` makes it 10,000.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_tests::dm::need_root;
use strata_tests::Daemon;

/// Descriptors the process has open.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of the process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn set_nofile(pid: u32, n: u64) {
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{n}"))
        .status()
        .expect("prlimit");
    assert!(st.success(), "prlimit --nofile={n} failed");
}

/// Run a command; panic with its output when it fails.
fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().expect(what);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` while sampling the daemon's descriptor count: `f`'s result, the time it took
/// and the highest count seen.
fn watched<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(fds(pid)));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(fds(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    let t0 = Instant::now();
    let r = f();
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    peak.fetch_max(fds(pid), Ordering::Relaxed);
    (r, took, peak.load(Ordering::Relaxed))
}

/// A tar of `tree/dNNN/fNNNN`: `dirs` directories of `per_dir` small files, made in `work`.
fn make_tar(work: &Path, dirs: usize, per_dir: usize) -> PathBuf {
    let src = work.join("src");
    for d in 0..dirs {
        let dir = src.join(format!("tree/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            std::fs::write(
                dir.join(format!("f{f:04}")),
                format!("file {f} of dir {d}\n"),
            )
            .unwrap();
        }
    }
    let tar = work.join("tree.tar");
    run(
        "tar -c",
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("tree"),
    );
    std::fs::remove_dir_all(&src).unwrap();
    tar
}

fn extract(tar: &Path, into: &Path) {
    run(
        "tar -x",
        Command::new("tar").arg("-xf").arg(tar).arg("-C").arg(into),
    );
}

fn remove(tree: &Path) {
    run("rm -rf", Command::new("rm").arg("-rf").arg(tree));
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn sync() {
    let _ = Command::new("sync").status();
}

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

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_extract_and_remove_vs_backing() {
    need_root();
    let files: usize = std::env::var("STRATA_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("STRATA_BENCH_QUICK").is_some() {
            10_000
        } else {
            100_000
        });
    let dirs = files.div_ceil(1000).max(1);
    let per_dir = files / dirs;
    let d = Daemon::start_with(&std::env::var("STRATA_BENCH_CONFIG").unwrap_or_default());
    let pid = d.pid();
    if let Ok(n) = std::env::var("STRATA_BENCH_NOFILE") {
        set_nofile(pid, n.parse().unwrap());
    }
    let m = d.mount("bench", &[], |_| {});
    let plain = d.dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let tar = make_tar(&d.dir, dirs, per_dir);
    let n = dirs * per_dir;

    // both extractions first, then both removals: ext4 makes an inode allocation skip
    // the inodes deleted in the last minutes (`recently_deleted`), so an extraction right
    // after a removal of 100,000 files is several times slower, whichever side it is on
    sync();
    let t0 = Instant::now();
    extract(&tar, &plain);
    let plain_x = t0.elapsed();
    sync();
    let (fds0, rss0) = (fds(pid), rss_kib(pid));
    let ((), mnt_x, peak_x) = watched(pid, || extract(&tar, &m.mnt));
    let (fds1, rss1) = (fds(pid), rss_kib(pid));
    sync();
    let t0 = Instant::now();
    remove(&plain.join("tree"));
    let plain_rm = t0.elapsed();
    sync();
    let ((), mnt_rm, peak_rm) = watched(pid, || remove(&m.mnt.join("tree")));
    let (fds2, rss2) = (fds(pid), rss_kib(pid));
    assert_eq!(std::fs::read_dir(&m.backing).unwrap().count(), 0);

    let s = |t: Duration| t.as_secs_f64();
    println!("fs_scale bench: {n} files ({dirs} dirs), debug build of stratad");
    println!(
        "  extract: backing {:.2} s, mount {:.2} s: {:.2}x",
        s(plain_x),
        s(mnt_x),
        s(mnt_x) / s(plain_x)
    );
    println!(
        "  rm -rf:  backing {:.2} s, mount {:.2} s: {:.2}x",
        s(plain_rm),
        s(mnt_rm),
        s(mnt_rm) / s(plain_rm)
    );
    println!(
        "  both:    backing {:.2} s, mount {:.2} s: {:.2}x (target <= 1.5x)",
        s(plain_x + plain_rm),
        s(mnt_x + mnt_rm),
        s(mnt_x + mnt_rm) / s(plain_x + plain_rm)
    );
    println!(
        "  daemon fds {fds0} -> {fds1} -> {fds2} (peak {peak_x} extracting, {peak_rm} removing); \
         RSS {rss0} -> {rss1} -> {rss2} KiB"
    );
}
