//! Shared helpers of the end-to-end tests: start a real `stratad` in a temporary directory,
//! run the real `strata` CLI against it, find the test components.
//!
//! The binaries are those of the same build as the test (next to the test executable's
//! `deps/` directory): run `cargo build --workspace --bins` before `cargo test` (the
//! project's test script does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A built binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "MISSING BINARY {}: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// Where the guest components are (scripts/build-plugins.sh puts them there).
pub fn components_dir() -> PathBuf {
    match std::env::var_os("STRATA_COMPONENTS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-components"),
    }
}

/// Path of a test component, which must exist.
pub fn component(name: &str) -> PathBuf {
    let p = components_dir().join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "MISSING TEST COMPONENT {}: run scripts/build-plugins.sh and scripts/build-py-plugin.sh",
        p.display()
    );
    p
}

/// A running daemon in its own temporary directory; killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// The directory holding data, socket and log.
    pub dir: PathBuf,
    /// A directory under /dev/shm given to the daemon as `shm_dir` (unused by it since
    /// regions became memfds; tests plant files there to check that nothing is followed).
    pub shm: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    _shm: Option<tempfile::TempDir>,
    /// The current daemon pid, for the watchdog.
    pid_cell: Arc<AtomicU32>,
    /// Set when the daemon is dropped: the watchdog stops.
    done: Arc<AtomicBool>,
}

/// FUSE mounts (from /proc/self/mounts) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Detach (lazily unmount) every mount under `dir`.
pub fn detach_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
}

/// A managed filesystem mounted by a test daemon: its backing directory and mount point.
pub struct Mounted {
    /// The backing directory.
    pub backing: PathBuf,
    /// The mount point.
    pub mnt: PathBuf,
}

impl Daemon {
    /// Start a daemon in a new temporary directory.
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// Start a daemon with extra config (TOML; `[spaces] shm_dir` is set by the harness to
    /// a fresh directory under /dev/shm, removed with the daemon).
    pub fn start_with(config: &str) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("strata-e2e")
            .tempdir()
            .expect("tempdir");
        let shm = tempfile::Builder::new()
            .prefix("strata-e2e")
            .tempdir_in("/dev/shm")
            .expect("a directory under /dev/shm");
        let dir = tmp.path().to_path_buf();
        let shm_dir = shm.path().to_path_buf();
        {
            // other users' clients (permission tests) reach the socket and the regions
            use std::os::unix::fs::PermissionsExt;
            for d in [&dir, &shm_dir] {
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
            }
        }
        let mut text = config.to_string();
        let line = format!("shm_dir = {:?}\n", shm_dir.display().to_string());
        match text.find("[spaces]") {
            Some(i) => text.insert_str(i + "[spaces]".len() + 1, &line),
            None => text.push_str(&format!("\n[spaces]\n{line}")),
        }
        std::fs::write(dir.join("stratad.toml"), text).expect("config");
        let mut d = Daemon {
            child: None,
            dir,
            shm: shm_dir,
            _tmp: Some(tmp),
            _shm: Some(shm),
            pid_cell: Arc::new(AtomicU32::new(0)),
            done: Arc::new(AtomicBool::new(false)),
        };
        d.spawn();
        d.watchdog();
        d
    }

    /// A test that hangs (a FUSE mount waiting on a daemon that never answers) must fail,
    /// not hang CI: after STRATA_TEST_WATCHDOG_S (default 300) seconds the daemon is killed
    /// and its mounts detached, so every blocked file operation fails.
    fn watchdog(&self) {
        let secs = std::env::var("STRATA_TEST_WATCHDOG_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300u64);
        let (pid, done, dir) = (self.pid_cell.clone(), self.done.clone(), self.dir.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < until {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("WATCHDOG: test still running after {secs} s: killing stratad and detaching its mounts");
            signal(pid.load(Ordering::Relaxed), "KILL");
            detach_under(&dir);
        });
    }

    /// Mount a managed filesystem: a new backing directory `NAME.back` (filled by `fill`
    /// before mounting) at `NAME.mnt`, both in the daemon's directory.
    pub fn mount(&self, name: &str, extra: &[&str], fill: impl FnOnce(&Path)) -> Mounted {
        let backing = self.dir.join(format!("{name}.back"));
        let mnt = self.dir.join(format!("{name}.mnt"));
        std::fs::create_dir_all(&backing).expect("backing dir");
        std::fs::create_dir_all(&mnt).expect("mount point");
        fill(&backing);
        let b = backing.display().to_string();
        let m = mnt.display().to_string();
        let mut args = vec!["fs", "mount", b.as_str(), m.as_str()];
        args.extend_from_slice(extra);
        self.ok(&args);
        Mounted { backing, mnt }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kill the daemon with SIGKILL (no shutdown) and start it again on the same state.
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "KILL");
            let _ = c.wait();
        }
        self.spawn();
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("stratad.sock")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stratad.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stratad.log"))
            .expect("log file");
        let child = Command::new(bin("stratad"))
            .arg("--config")
            .arg(self.dir.join("stratad.toml"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--socket")
            .arg(self.socket())
            .env("STRATA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start stratad");
        self.pid_cell.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("stratad exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("stratad did not come up in 30 s: {}", self.log());
    }

    /// Stop with SIGTERM and wait; return whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        signal(c.id(), "TERM");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Stop and start again on the same directory.
    pub fn restart(&mut self) {
        assert!(self.stop(), "stratad did not stop cleanly: {}", self.log());
        self.spawn();
    }

    /// Run `strata ARGS` against this daemon.
    pub fn strata(&self, args: &[&str]) -> Output {
        self.strata_cmd(args).output().expect("run strata")
    }

    /// A `strata ARGS` command against this daemon, to adjust before running.
    pub fn strata_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("strata"));
        c.arg("--socket").arg(self.socket()).args(args);
        c
    }

    /// Run `strata ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.strata(args);
        assert!(
            o.status.success(),
            "strata {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// Send `sig` (a name such as TERM) to `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        detach_under(&self.dir);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach_under(&self.dir);
    }
}

/// Whether the tests run as root (some need it to act as another user).
pub fn is_root() -> bool {
    // The owner of /proc/self is our effective uid.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

pub mod scale;

/// Helpers of the DMAPI tests on real mounts.
pub mod dm {
    use strata_client::dm::{DmError, EventData, Message};
    use strata_client::session::DmSession;

    /// FUSE mount tests need root: say so loudly instead of passing.
    pub fn need_root() {
        assert!(
            super::is_root(),
            "PREREQUISITE MISSING: FUSE mount tests need root (run the tests as root)"
        );
    }

    /// Wait for the next message (DM_EV_WAIT; a hang is ended by the daemon's watchdog).
    pub fn next(s: &mut DmSession) -> Message {
        let m = s.get_events(1, true).expect("get_events");
        assert_eq!(m.len(), 1, "{m:?}");
        eprintln!("event: {:?}", m[0]);
        m.into_iter().next().expect("one message")
    }

    /// No message is queued.
    pub fn none(s: &mut DmSession) {
        match s.get_events(16, false) {
            Err(DmError::Eagain) => {}
            other => panic!("expected no events, got {other:?}"),
        }
    }

    /// The fields of a namespace event: (mode, handle1, handle2, name1, name2, retcode).
    pub fn ns(m: &Message) -> (u32, Vec<u8>, Vec<u8>, String, String, i32) {
        match &m.data {
            EventData::Namespace {
                mode,
                handle1,
                handle2,
                name1,
                name2,
                retcode,
            } => (
                *mode,
                handle1.clone(),
                handle2.clone(),
                name1.clone(),
                name2.clone(),
                *retcode,
            ),
            other => panic!("not a namespace event: {other:?}"),
        }
    }

    /// The fields of a data event: (handle, offset, length).
    pub fn data(m: &Message) -> (Vec<u8>, u64, u64) {
        match &m.data {
            EventData::Data {
                handle,
                offset,
                length,
            } => (handle.clone(), *offset, *length),
            other => panic!("not a data event: {other:?}"),
        }
    }
}
