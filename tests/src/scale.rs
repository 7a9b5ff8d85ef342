//! Helpers of the tests and benchmarks that load a mount with many files, and of those
//! that watch the daemon's process (descriptors, memory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Descriptors the process has open.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of the process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Set a process's open-file limit (soft and hard) with prlimit.
pub fn set_nofile(pid: u32, n: u64) {
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{n}"))
        .status()
        .expect("prlimit");
    assert!(st.success(), "prlimit --nofile={n} failed");
}

/// Run a command; panic with its output when it fails.
pub fn run(what: &str, cmd: &mut Command) {
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
pub fn watched<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Duration, usize) {
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
pub fn make_tar(work: &Path, dirs: usize, per_dir: usize) -> PathBuf {
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

/// Extract `tar` into `into`.
pub fn extract(tar: &Path, into: &Path) {
    run(
        "tar -x",
        Command::new("tar").arg("-xf").arg(tar).arg("-C").arg(into),
    );
}

/// `rm -rf tree`.
pub fn remove(tree: &Path) {
    run("rm -rf", Command::new("rm").arg("-rf").arg(tree));
}

/// Regular files (and other non-directories) under `dir`.
pub fn count_files(dir: &Path) -> usize {
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

/// Flush the page cache to disk (between timed phases).
pub fn sync() {
    let _ = Command::new("sync").status();
}

/// Resident memory of the process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    rss_kib(pid) << 10
}

/// What a `strata-hostile` attacker printed (its JSON report); `{"killed": ...}` when it
/// printed nothing (killed, e.g. by a test's memory monitor).
pub fn hostile_report(c: std::process::Child) -> serde_json::Value {
    let o = c.wait_with_output().expect("strata-hostile");
    let text = String::from_utf8_lossy(&o.stdout);
    if text.trim().is_empty() {
        return serde_json::json!({"killed": o.status.to_string()});
    }
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("strata-hostile said {text:?}: {e}"))
}
