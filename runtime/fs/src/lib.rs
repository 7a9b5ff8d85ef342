//! Managed filesystems: FUSE mounts of backing directories whose operations become DMAPI
//! events (see `docs/dmapi.md`), and the DM calls on their objects ([`calls`]).
//!
//! A backing directory gets a filesystem id the first time it is mounted and keeps it
//! (redb `dm_fs`), so handles, dispositions and event lists stay valid across remounts and
//! daemon restarts. Mounts recorded as mounted come back when the daemon starts again.

#![warn(missing_docs)]

pub mod calls;
pub mod dm;
pub mod fuse;
pub mod pool;
pub mod route;

use crate::dm::handle::Handle;
use crate::dm::service::{Dm, FsRecord, GLOBAL_FS};
use crate::dm::{EventData, EventType, FsId, Message, INVALID_TOKEN};
use fuse::{ManagedFs, Shared};
use rustix::fs::{self as rfs, Mode, OFlags};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `[fs]`: managed filesystem settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FsConfig {
    /// Most `O_PATH` descriptors of backing objects one mount keeps open (a cache: objects
    /// are found again by their file handles). Also at most half of the daemon's
    /// RLIMIT_NOFILE.
    pub max_open_fds: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig { max_open_fds: 4096 }
    }
}

/// A mount, as `strata fs list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    /// Filesystem id.
    pub fs: FsId,
    /// Backing directory.
    pub backing: PathBuf,
    /// Mount point (`None`: known, not mounted).
    pub mountpoint: Option<PathBuf>,
    /// Read-only.
    pub read_only: bool,
    /// Kernel passthrough is in use for unmanaged files.
    pub passthrough: bool,
}

/// Why a mount or unmount failed: an errno and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    /// errno.
    pub errno: i32,
    /// What happened.
    pub message: String,
}

fn fail(errno: i32, message: impl Into<String>) -> FsError {
    FsError {
        errno,
        message: message.into(),
    }
}

/// A live mount.
pub struct Live {
    /// The filesystem's state.
    pub shared: Arc<Shared>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The backing directory.
    pub backing: PathBuf,
    /// The backing root, for open_by_handle_at.
    pub root: File,
    /// st_dev of the mount (for the mmap check).
    pub dev: Option<u64>,
    notifier: ::fuser::Notifier,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Live {
    /// Tell the kernel to forget what it cached of an object (after a DM call changed it
    /// behind the kernel's back).
    ///
    /// The attributes are dropped at once; the cached pages on a pool thread: the
    /// kernel may have to wait for a page that a blocked operation holds (a page fault
    /// waiting for the READ event whose DM application is making this very call), so the
    /// call must not wait for that.
    pub fn invalidate(&self, backing_ino: u64) {
        let ino = self.shared.fuse_ino(backing_ino);
        if self.shared.node(ino).is_some() {
            // offset -1: attributes only, which takes no page lock
            let _ = self.notifier.inval_inode(ino, -1, 0);
            let n = self.notifier.clone();
            let job = move || {
                let _ = n.inval_inode(ino, 0, 0);
            };
            if self.shared.dm.inval_pool().submit(job).is_err() {
                static FULL: strata_common::ratelimit::LogLimit =
                    strata_common::ratelimit::LogLimit::new(3, Duration::from_secs(10));
                strata_common::log_limited!(
                    FULL,
                    error,
                    "page-cache invalidation dropped: 65536 are waiting already (cached pages of inode {ino} may stay stale until evicted)"
                );
            }
        }
    }
}

/// The daemon's managed filesystems.
pub struct Mounts {
    dm: Arc<Dm>,
    cfg: FsConfig,
    live: Mutex<HashMap<FsId, Arc<Live>>>,
    /// Mounts and unmounts one at a time (from the check that nothing is mounted there to
    /// the record that something now is).
    changing: Mutex<()>,
    /// The daemon is stopping: a mount that finishes now is undone (set under `live`).
    closing: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `/dev/fuse` can be used (the "kernel extension" of seed 001).
pub fn fuse_available() -> bool {
    Path::new("/dev/fuse").exists()
}

impl Mounts {
    /// No mounts yet (see [`Mounts::restore`]).
    pub fn new(dm: Arc<Dm>) -> Mounts {
        Mounts::with_config(dm, FsConfig::default())
    }

    /// No mounts yet; mounts made with these settings.
    pub fn with_config(dm: Arc<Dm>, cfg: FsConfig) -> Mounts {
        Mounts {
            dm,
            cfg,
            live: Mutex::new(HashMap::new()),
            changing: Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The DM service.
    pub fn dm(&self) -> &Arc<Dm> {
        &self.dm
    }

    /// A live mount of filesystem `fs`.
    pub fn live(&self, fs: FsId) -> Option<Arc<Live>> {
        lock(&self.live).get(&fs).cloned()
    }

    /// All live mounts.
    pub fn lives(&self) -> Vec<(FsId, Arc<Live>)> {
        lock(&self.live)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Every known filesystem and whether it is mounted.
    pub fn list(&self) -> Vec<MountInfo> {
        let live = lock(&self.live).clone();
        self.dm
            .fs_records()
            .into_iter()
            .map(|(fs, r)| MountInfo {
                fs,
                backing: r.backing,
                mountpoint: live.get(&fs).map(|l| l.mountpoint.clone()),
                read_only: r.read_only,
                passthrough: live.get(&fs).is_some_and(|l| l.shared.passthrough()),
            })
            .collect()
    }

    /// The mount event message of a mounted filesystem.
    pub fn mount_message(&self, fs: FsId, live: &Live) -> Message {
        let mode = std::fs::metadata(&live.backing)
            .map(|m| m.mode())
            .unwrap_or(0);
        Message {
            kind: EventType::Mount,
            token: INVALID_TOKEN,
            sequence: 0,
            fs,
            data: EventData::Mount {
                mode,
                fs_handle: live.shared.fs_handle(),
                mount_point: live.mountpoint.display().to_string(),
                backing: live.backing.display().to_string(),
                root_handle: live.shared.handle_of(live.shared.root()),
            },
        }
    }

    /// `strata fs mount`: serve `backing` at `mountpoint`. A MOUNT event disposed on the
    /// global handle is raised first; an abort refuses the mount with its errno.
    pub fn mount(
        &self,
        backing: &Path,
        mountpoint: &Path,
        read_only: bool,
    ) -> Result<MountInfo, FsError> {
        let _one_at_a_time = lock(&self.changing);
        if !rustix::process::geteuid().is_root() {
            return Err(fail(
                libc::EPERM,
                "managed filesystems need stratad to run as root (trusted.* attributes need \
                 CAP_SYS_ADMIN, handles CAP_DAC_READ_SEARCH)",
            ));
        }
        if !fuse_available() {
            return Err(fail(
                libc::ENOSYS,
                "/dev/fuse is missing: the fuse kernel module is not loaded",
            ));
        }
        let backing = backing.canonicalize().map_err(|e| {
            fail(
                e.raw_os_error().unwrap_or(libc::EINVAL),
                format!("backing directory {}: {e}", backing.display()),
            )
        })?;
        let mountpoint = mountpoint.canonicalize().map_err(|e| {
            fail(
                e.raw_os_error().unwrap_or(libc::EINVAL),
                format!("mount point {}: {e}", mountpoint.display()),
            )
        })?;
        if !backing.is_dir() {
            return Err(fail(
                libc::ENOTDIR,
                format!("{} is not a directory", backing.display()),
            ));
        }
        if !mountpoint.is_dir() {
            return Err(fail(
                libc::ENOTDIR,
                format!("{} is not a directory", mountpoint.display()),
            ));
        }
        if mountpoint.starts_with(&backing) || backing.starts_with(&mountpoint) {
            return Err(fail(
                libc::EINVAL,
                "the mount point and the backing directory must not contain each other",
            ));
        }
        let fs = self
            .dm
            .register_fs(&backing)
            .map_err(|e| fail(e.errno(), format!("cannot record the filesystem: {e}")))?;
        {
            let live = lock(&self.live);
            if let Some(l) = live.get(&fs) {
                return Err(fail(
                    libc::EBUSY,
                    format!(
                        "{} is already mounted at {}",
                        backing.display(),
                        l.mountpoint.display()
                    ),
                ));
            }
            if live.values().any(|l| l.mountpoint == mountpoint) {
                return Err(fail(
                    libc::EBUSY,
                    format!("something is already mounted at {}", mountpoint.display()),
                ));
            }
        }
        let root_fd = rfs::openat(
            rfs::CWD,
            &backing,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(e.raw_os_error(), format!("open {}: {e}", backing.display())))?;
        let root = File::from(
            rfs::openat(
                rfs::CWD,
                &backing,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail(e.raw_os_error(), format!("open {}: {e}", backing.display())))?,
        );
        let shared = Arc::new(
            Shared::new(
                fs,
                self.dm.clone(),
                root_fd,
                read_only,
                self.cfg.max_open_fds,
            )
            .map_err(|e| fail(e.raw_os_error().unwrap_or(libc::EIO), e.to_string()))?,
        );
        // the MOUNT event: a DM application may refuse the mount
        let data = EventData::Mount {
            mode: std::fs::metadata(&backing).map(|m| m.mode()).unwrap_or(0),
            fs_handle: shared.fs_handle(),
            mount_point: mountpoint.display().to_string(),
            backing: backing.display().to_string(),
            root_handle: shared.handle_of(shared.root()),
        };
        let raised = self.dm.raise(GLOBAL_FS, EventType::Mount, data);
        if let Err(errno) = self.dm.wait(raised, &|| true) {
            return Err(fail(
                errno,
                format!("the DM application refused the mount (errno {errno})"),
            ));
        }
        let mut options = vec![
            ::fuser::MountOption::FSName(format!("strata:{}", backing.display())),
            ::fuser::MountOption::Subtype("strata".into()),
            ::fuser::MountOption::DefaultPermissions,
            ::fuser::MountOption::AllowOther,
            ::fuser::MountOption::Suid,
            ::fuser::MountOption::Dev,
        ];
        if read_only {
            options.push(::fuser::MountOption::RO);
        }
        let mut session =
            ::fuser::Session::new(ManagedFs::new(shared.clone()), &mountpoint, &options).map_err(
                |e| {
                    fail(
                        e.raw_os_error().unwrap_or(libc::EIO),
                        format!("mount {}: {e}", mountpoint.display()),
                    )
                },
            )?;
        let notifier = session.notifier();
        let thread = std::thread::Builder::new()
            .name(format!("strata-fuse-{fs}"))
            .spawn(move || {
                if let Err(e) = session.run() {
                    tracing::error!(fs, "FUSE session ended: {e}");
                }
            })
            .map_err(|e| fail(libc::EAGAIN, format!("cannot start the FUSE thread: {e}")))?;
        let dev = std::fs::metadata(&mountpoint).map(|m| m.dev()).ok();
        let live = Arc::new(Live {
            shared,
            mountpoint: mountpoint.clone(),
            backing: backing.clone(),
            root,
            dev,
            notifier,
            thread: Mutex::new(Some(thread)),
        });
        {
            let mut l = lock(&self.live);
            if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                drop(l);
                let _ = self.detach(&live, true);
                return Err(fail(libc::ESHUTDOWN, "the daemon is stopping"));
            }
            l.insert(fs, live.clone());
        }
        if let Err(e) = self.dm.update_fs(fs, |r| {
            r.mountpoint = Some(mountpoint.clone());
            r.read_only = read_only;
        }) {
            tracing::error!(fs, "cannot record the mount: {e}");
        }
        tracing::info!(fs, backing = %backing.display(), mountpoint = %mountpoint.display(), passthrough = live.shared.passthrough(), "mounted");
        Ok(MountInfo {
            fs,
            backing,
            mountpoint: Some(mountpoint),
            read_only,
            passthrough: live.shared.passthrough(),
        })
    }

    fn find(&self, what: &Path) -> Option<(FsId, Arc<Live>)> {
        let c = what.canonicalize().unwrap_or_else(|_| what.to_path_buf());
        lock(&self.live)
            .iter()
            .find(|(_, l)| l.mountpoint == c || l.backing == c || l.mountpoint == what)
            .map(|(k, v)| (*k, v.clone()))
    }

    /// `strata fs umount`: PREUNMOUNT (a DM application may refuse with an errno), the
    /// unmount (busy: EBUSY, unless `force`, which detaches it lazily), then UNMOUNT with
    /// the result.
    pub fn umount(&self, what: &Path, force: bool) -> Result<(), FsError> {
        let _one_at_a_time = lock(&self.changing);
        let Some((fs, live)) = self.find(what) else {
            return Err(fail(
                libc::EINVAL,
                format!("{} is not a managed mount", what.display()),
            ));
        };
        let s = &live.shared;
        let mode = if force { 1 } else { 0 };
        let data = || EventData::Namespace {
            mode,
            handle1: s.fs_handle(),
            handle2: vec![],
            name1: String::new(),
            name2: String::new(),
            retcode: 0,
        };
        if s.generated(EventType::Preunmount, s.root()) {
            let raised = self.dm.raise(fs, EventType::Preunmount, data());
            if let Err(errno) = self.dm.wait(raised, &|| true) {
                return Err(fail(
                    errno,
                    format!("the DM application refused the unmount (errno {errno})"),
                ));
            }
        }
        let r = self.detach(&live, force);
        if s.generated(EventType::Unmount, s.root()) {
            let mut d = data();
            if let EventData::Namespace { retcode, .. } = &mut d {
                *retcode = r.as_ref().err().map(|e| e.errno).unwrap_or(0);
            }
            let _ = self.dm.raise(fs, EventType::Unmount, d);
        }
        r?;
        lock(&self.live).remove(&fs);
        if let Err(e) = self.dm.update_fs(fs, |r| r.mountpoint = None) {
            tracing::error!(fs, "cannot record the unmount: {e}");
        }
        tracing::info!(fs, mountpoint = %live.mountpoint.display(), "unmounted");
        Ok(())
    }

    /// Unmount and let the FUSE thread finish.
    fn detach(&self, live: &Live, lazy: bool) -> Result<(), FsError> {
        let flags = if lazy {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
        rustix::mount::unmount(&live.mountpoint, flags).map_err(|e| {
            fail(
                e.raw_os_error(),
                format!("umount {}: {e}", live.mountpoint.display()),
            )
        })?;
        if !lazy {
            let t = lock(&live.thread).take();
            if let Some(t) = t {
                let until = Instant::now() + Duration::from_secs(5);
                while !t.is_finished() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
        }
        Ok(())
    }

    /// Mount again what was mounted when the daemon stopped (a stale mount left by a
    /// daemon that died is detached first). Restore the policy attachments first
    /// ([`route::Router::restore`]): a policy disposed for MOUNT answers these mounts.
    pub fn restore(&self) {
        for (fs, rec) in self.dm.fs_records() {
            let FsRecord {
                backing,
                mountpoint: Some(mountpoint),
                read_only,
                ..
            } = rec
            else {
                continue;
            };
            let _ = rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH);
            match self.mount(&backing, &mountpoint, read_only) {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(fs, backing = %backing.display(), mountpoint = %mountpoint.display(), "cannot mount again: {e}");
                }
            }
        }
    }

    /// The filesystem recorded as mounted at a mount point `path` is in (the longest
    /// recorded mount point that is a prefix of `path`), mounted now or not.
    pub fn recorded_at(&self, path: &Path) -> Option<FsId> {
        self.dm
            .fs_records()
            .into_iter()
            .filter_map(|(fs, r)| r.mountpoint.map(|m| (fs, m)))
            .filter(|(_, m)| path.starts_with(m))
            .max_by_key(|(_, m)| m.as_os_str().len())
            .map(|(fs, _)| fs)
    }

    /// The daemon stops: unmount everything (lazily: nothing waits), keeping the records
    /// so that the next start mounts them again.
    pub fn shutdown(&self) {
        let all: Vec<_> = {
            let mut l = lock(&self.live);
            self.closing
                .store(true, std::sync::atomic::Ordering::Release);
            l.drain().collect()
        };
        for (_, live) in all {
            let _ = self.detach(&live, true);
        }
    }

    /// Find the mount `path` (absolute, through a mount point) is in: the filesystem, the
    /// live mount and the path relative to its root. Not in a managed filesystem: EPERM
    /// (DMAPI is disabled there); `..` components: EINVAL.
    pub fn locate(&self, path: &Path) -> Result<(FsId, Arc<Live>, PathBuf), crate::dm::DmError> {
        use std::path::Component;
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(crate::dm::DmError::Einval);
        }
        let live = lock(&self.live);
        let best = live
            .iter()
            .filter(|(_, l)| path.starts_with(&l.mountpoint))
            .max_by_key(|(_, l)| l.mountpoint.as_os_str().len());
        match best {
            Some((fs, l)) => {
                let rel = path
                    .strip_prefix(&l.mountpoint)
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                Ok((*fs, l.clone(), rel))
            }
            None => Err(crate::dm::DmError::Eperm),
        }
    }

    /// A handle's filesystem, mounted: malformed EINVAL, unknown EBADF, not mounted EPERM.
    pub fn resolve(&self, handle: &[u8]) -> Result<(Handle, Arc<Live>), crate::dm::DmError> {
        use crate::dm::DmError;
        let h = Handle::decode(handle)?;
        if self.dm.fs_record(h.fs).is_none() {
            return Err(DmError::Ebadf);
        }
        let live = self.live(h.fs).ok_or(DmError::Eperm)?;
        Ok((h, live))
    }

    /// The filesystem handle of a filesystem id.
    pub fn fs_handle(fs: FsId) -> Vec<u8> {
        Handle::of_fs(fs).encode()
    }
}
