//! Programs started by `spawn` (see `docs/spaces.md`, "Spawn").
//!
//! ```text
//!   Spawner::start ──fork/exec──► child (caller's uid/gid, clean env, fds 0-2 only)
//!        │                          │ stdout+stderr
//!        │ Entry (Child, pidfd,     ▼
//!        │        pipe read end)  pipe ──► reaper thread ──append──► data_dir/spawn/<uid>.log
//!        └──────────────────────────────► (one thread for all children: poll(2) on the
//!                                          pidfds and pipes; reaps, drains, rotates logs)
//! ```
//!
//! A child never gets a file the daemon shares between users: its output goes into a pipe
//! the daemon drains into the log of the child's uid (0600, owned by the daemon, opened with
//! O_NOFOLLOW in a 0700 directory; rotated once to `<uid>.log.1` past
//! `spawn_log_max_bytes`). Every descriptor above 2 is close-on-exec in the child
//! (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` between fork and exec: a descriptor the
//! daemon inherited without the flag does not leak either). A uid has at most
//! `spawn_max_children_per_uid` children alive; a child counts until it has exited and
//! every process holding its output pipe has closed it.
//!
//! The unsafe code here is the `pre_exec` hook (async-signal-safe: one raw syscall), the
//! `poll(2)` call and `getpwuid_r`.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

/// The environment of a spawned program: only these, plus `STRATA_*`.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Why a program was not started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The caller's uid has `spawn_max_children_per_uid` children alive.
    #[error(
        "uid {uid} already has {live} spawned program(s) running, the limit \
         (spaces.spawn_max_children_per_uid)"
    )]
    TooMany {
        /// The caller.
        uid: u32,
        /// Its live children.
        live: usize,
    },
    /// fork/exec (or setting up the output pipe) failed.
    #[error("cannot start {program:?}: {error}")]
    Start {
        /// The program.
        program: String,
        /// The OS error.
        error: std::io::Error,
    },
}

impl SpawnError {
    /// The errno of SPAWNPROCESS_FAIL.
    pub fn errno(&self) -> i32 {
        match self {
            SpawnError::TooMany { .. } => libc::EAGAIN,
            SpawnError::Start { error, .. } => error.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// What the caller asks to start.
pub struct Job<'a> {
    /// Absolute path (already checked against `spawn_allow`).
    pub program: &'a str,
    /// Arguments.
    pub args: &'a [String],
    /// Switch to this uid/gid (a root daemon); `None`: run as the daemon.
    pub as_user: Option<(u32, u32)>,
    /// The uid whose limit and log this child counts against.
    pub uid: u32,
    /// `STRATA_*` variables.
    pub vars: &'a [(&'a str, OsString)],
    /// Space (for the log line).
    pub space: &'a str,
}

/// A child the reaper watches.
struct Entry {
    uid: u32,
    child: Child,
    /// Readable when the child has exited (`None`: pidfd_open failed; polled every second).
    pidfd: Option<OwnedFd>,
    /// The read end of the output pipe (`None` once every writer closed it).
    out: Option<std::io::PipeReader>,
    exited: bool,
    header: String,
}

struct Shared {
    /// Live children per uid.
    live: Mutex<HashMap<u32, usize>>,
    /// Children started and not yet taken by the reaper.
    new: Mutex<Vec<Entry>>,
}

/// Starts programs and keeps one reaper thread for all of them.
pub struct Spawner {
    dir: PathBuf,
    max_per_uid: usize,
    log_max_bytes: u64,
    shared: Arc<Shared>,
    /// Write a byte to wake the reaper (started with the first child).
    wake: Mutex<Option<std::io::PipeWriter>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Spawner {
    /// A spawner whose logs go under `dir` (created 0700 when needed).
    pub fn new(dir: PathBuf, max_per_uid: usize, log_max_bytes: u64) -> Spawner {
        Spawner {
            dir,
            max_per_uid,
            log_max_bytes,
            shared: Arc::new(Shared {
                live: Mutex::new(HashMap::new()),
                new: Mutex::new(Vec::new()),
            }),
            wake: Mutex::new(None),
        }
    }

    /// Live children of `uid`.
    pub fn live(&self, uid: u32) -> usize {
        lock(&self.shared.live).get(&uid).copied().unwrap_or(0)
    }

    /// Start `job`: its pid.
    pub fn start(&self, job: &Job<'_>) -> Result<u32, SpawnError> {
        {
            let mut live = lock(&self.shared.live);
            let n = live.entry(job.uid).or_insert(0);
            if *n >= self.max_per_uid {
                return Err(SpawnError::TooMany {
                    uid: job.uid,
                    live: *n,
                });
            }
            *n += 1;
        }
        match self.fork(job) {
            Ok(pid) => Ok(pid),
            Err(error) => {
                release(&self.shared, job.uid);
                Err(SpawnError::Start {
                    program: job.program.to_string(),
                    error,
                })
            }
        }
    }

    fn fork(&self, job: &Job<'_>) -> std::io::Result<u32> {
        let (out_r, out_w) = std::io::pipe()?;
        let mut cmd = Command::new(job.program);
        cmd.args(job.args)
            .env_clear()
            .env("PATH", PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(out_w.try_clone()?)
            .stderr(out_w)
            // its own process group: a signal to the daemon's group does not reach it
            .process_group(0);
        let user = job.as_user.map(|(uid, _)| uid).unwrap_or(job.uid);
        let (home, name) = passwd(user);
        cmd.env("HOME", home.unwrap_or_else(|| "/".into()));
        if let Some(n) = name {
            cmd.env("USER", &n).env("LOGNAME", &n);
        }
        if let Some(lang) = std::env::var_os("LANG") {
            cmd.env("LANG", lang);
        }
        for (k, v) in job.vars {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = job.as_user {
            // as the caller, never as root on another user's behalf (std drops the
            // supplementary groups when it switches uid as root)
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: the hook runs between fork and exec and makes one raw syscall, which is
        // async-signal-safe; it allocates nothing and takes no lock.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(cloexec_above_stdio);
        }
        let child = cmd.spawn()?;
        drop(cmd); // our copies of the pipe's write end
        let pid = child.id();
        let pidfd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let header = format!(
            "# stratad: pid {pid} uid {} started {:?} {:?} (space {:?})\n",
            job.uid, job.program, job.args, job.space
        );
        lock(&self.shared.new).push(Entry {
            uid: job.uid,
            child,
            pidfd,
            out: Some(out_r),
            exited: false,
            header,
        });
        self.wake_reaper();
        Ok(pid)
    }

    fn wake_reaper(&self) {
        let mut w = lock(&self.wake);
        if w.is_none() {
            match self.start_reaper() {
                Ok(tx) => *w = Some(tx),
                Err(e) => {
                    // the child runs; it is reaped when a later spawn starts the reaper
                    tracing::error!("cannot start the spawn reaper: {e}");
                    return;
                }
            }
        }
        if let Some(tx) = w.as_mut() {
            let _ = tx.write(&[1]);
        }
    }

    fn start_reaper(&self) -> std::io::Result<std::io::PipeWriter> {
        let (rx, tx) = std::io::pipe()?;
        set_nonblocking(&tx);
        set_nonblocking(&rx);
        let mut reaper = Reaper {
            shared: self.shared.clone(),
            logs: Logs {
                dir: self.dir.clone(),
                max: self.log_max_bytes,
                open: HashMap::new(),
            },
            wake: rx,
            entries: Vec::new(),
        };
        std::thread::Builder::new()
            .name("strata-spawn".into())
            .spawn(move || reaper.run())?;
        Ok(tx)
    }
}

fn release(shared: &Shared, uid: u32) {
    let mut live = lock(&shared.live);
    if let Some(n) = live.get_mut(&uid) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            live.remove(&uid);
        }
    }
}

fn set_nonblocking(fd: &impl std::os::fd::AsFd) {
    if let Ok(fl) = rustix::fs::fcntl_getfl(fd) {
        let _ = rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK);
    }
}

/// Between fork and exec: every descriptor above stderr is closed by the exec.
fn cloexec_above_stdio() -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes plain integers; marking descriptors close-on-exec cannot
    // break the exec-error pipe std uses (it is close-on-exec already).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // kernels before 5.11: flag them one by one, up to the open-file limit
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; fcntl takes integers.
    #[allow(unsafe_code)]
    unsafe {
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            1024
        };
        for fd in 3..max {
            let fl = libc::fcntl(fd, libc::F_GETFD);
            if fl >= 0 && fl & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, fl | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Home directory and user name of `uid` (from the passwd database).
fn passwd(uid: u32) -> (Option<OsString>, Option<OsString>) {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: getpwuid_r writes the entry into `pw` and its strings into `buf`, both ours
    // and alive while the strings are copied out.
    #[allow(unsafe_code)]
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out);
        if rc != 0 || out.is_null() {
            return (None, None);
        }
        let s = |p: *const libc::c_char| {
            (!p.is_null()).then(|| OsStr::from_bytes(CStr::from_ptr(p).to_bytes()).to_owned())
        };
        (s(pw.pw_dir), s(pw.pw_name))
    }
}

/// The per-uid output logs (used by the reaper thread only).
struct Logs {
    dir: PathBuf,
    max: u64,
    /// Open log and its size.
    open: HashMap<u32, (File, u64)>,
}

impl Logs {
    fn path(&self, uid: u32) -> PathBuf {
        self.dir.join(format!("{uid}.log"))
    }

    fn open(dir: &Path, path: &Path) -> std::io::Result<(File, u64)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    fn write(&mut self, uid: u32, bytes: &[u8]) {
        let path = self.path(uid);
        if let Some((_, len)) = self.open.get(&uid) {
            if len + bytes.len() as u64 > self.max {
                // one generation kept: <uid>.log.1
                self.open.remove(&uid);
                let _ = std::fs::rename(&path, self.dir.join(format!("{uid}.log.1")));
            }
        }
        if !self.open.contains_key(&uid) {
            match Self::open(&self.dir, &path) {
                Ok(f) => {
                    self.open.insert(uid, f);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot open the spawn log: {e}");
                    return;
                }
            }
        }
        if let Some((f, len)) = self.open.get_mut(&uid) {
            match f.write_all(bytes) {
                Ok(()) => *len += bytes.len() as u64,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot write the spawn log: {e}");
                    self.open.remove(&uid);
                }
            }
        }
    }
}

struct Reaper {
    shared: Arc<Shared>,
    logs: Logs,
    wake: std::io::PipeReader,
    entries: Vec<Entry>,
}

impl Reaper {
    fn run(&mut self) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            for e in std::mem::take(&mut *lock(&self.shared.new)) {
                self.logs.write(e.uid, e.header.as_bytes());
                self.entries.push(e);
            }
            let mut fds = vec![libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let mut timeout = -1;
            for e in &self.entries {
                match (&e.pidfd, e.exited) {
                    (Some(p), false) => fds.push(pollfd(p.as_raw_fd())),
                    (None, false) => timeout = 1000,
                    _ => {}
                }
                if let Some(o) = &e.out {
                    fds.push(pollfd(o.as_raw_fd()));
                }
            }
            // SAFETY: `fds` is a live, correctly sized array of pollfd.
            #[allow(unsafe_code)]
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!("spawn reaper: poll: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            if fds[0].revents != 0 {
                while matches!(self.wake.read(&mut buf[..64]), Ok(n) if n > 0) {}
            }
            let ready: HashMap<i32, i16> = fds[1..].iter().map(|p| (p.fd, p.revents)).collect();
            for e in &mut self.entries {
                if let Some(o) = &mut e.out {
                    if ready.get(&o.as_raw_fd()).is_some_and(|r| *r != 0) {
                        match o.read(&mut buf) {
                            Ok(0) => e.out = None,
                            Ok(n) => self.logs.write(e.uid, &buf[..n]),
                            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => e.out = None,
                        }
                    }
                }
                let due = match &e.pidfd {
                    Some(p) => ready.get(&p.as_raw_fd()).is_some_and(|r| *r != 0),
                    None => true,
                };
                if !e.exited && due {
                    if let Ok(Some(status)) = e.child.try_wait() {
                        e.exited = true;
                        e.pidfd = None;
                        let line = format!("# stratad: pid {} ended: {status}\n", e.child.id());
                        self.logs.write(e.uid, line.as_bytes());
                        crate::log_limited!(ENDED_LOG, info, pid = e.child.id(), uid = e.uid, %status, "spawned program ended");
                    }
                }
            }
            let shared = &self.shared;
            self.entries.retain(|e| {
                let done = e.exited && e.out.is_none();
                if done {
                    release(shared, e.uid);
                }
                !done
            });
        }
    }
}

/// A user may start programs in a loop: their ends cost a few lines a second in the
/// daemon's log (each is in the uid's spawn log).
static ENDED_LOG: crate::ratelimit::LogLimit =
    crate::ratelimit::LogLimit::new(5, std::time::Duration::from_secs(1));

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_log_is_private_and_rotated_once_past_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spawn");
        let mut logs = Logs {
            dir: dir.clone(),
            max: 100,
            open: HashMap::new(),
        };
        logs.write(7, &[b'a'; 60]);
        logs.write(7, &[b'b'; 60]);
        logs.write(7, &[b'c'; 60]);
        let cur = std::fs::read(dir.join("7.log")).unwrap();
        let old = std::fs::read(dir.join("7.log.1")).unwrap();
        assert_eq!(cur, [b'c'; 60]);
        assert_eq!(old, [b'b'; 60], "one generation kept");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("7.log")), 0o600);
        // a symbolic link planted at a log's place is not followed
        let target = tmp.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("8.log")).unwrap();
        logs.write(8, b"x");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
