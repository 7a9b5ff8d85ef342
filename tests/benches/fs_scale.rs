//! Metadata at scale (issue 11): extract a 100,000-file tree into a managed filesystem and
//! remove it, and the same on a plain directory of the same filesystem, in one run; prints
//! the ratios (target <= 1.5x) with the daemon's descriptors and RSS. Needs root (FUSE).
//!
//! `cargo bench -p strata-tests --bench fs_scale` (with `STRATA_TEST_WATCHDOG_S=3600` for
//! the full count). `STRATA_BENCH_FILES=N` changes the count, `STRATA_BENCH_QUICK=1` makes
//! it 2,000; `STRATA_BENCH_CONFIG` is the daemon's config, `STRATA_BENCH_NOFILE` its
//! open-file limit.

use std::time::{Duration, Instant};
use strata_tests::dm::need_root;
use strata_tests::scale::*;
use strata_tests::Daemon;

fn main() {
    need_root();
    let files: usize = std::env::var("STRATA_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("STRATA_BENCH_QUICK").is_some() {
            2_000
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
