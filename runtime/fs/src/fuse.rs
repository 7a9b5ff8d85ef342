//! The managed filesystem: a passthrough FUSE filesystem over a backing directory whose
//! operations raise DMAPI events (see `docs/dmapi.md`).
//!
//! Every object the kernel knows ([`Node`]) is identified by the kernel file handle of its
//! backing object (`name_to_handle_at`), so it keeps its identity across renames; its
//! `O_PATH` descriptor, when one is open, lives in a bounded per-mount cache ([`FdCache`],
//! `[fs] max_open_fds`), and is opened again by handle (`open_by_handle_at`) after an
//! eviction. The mount's descriptors are thus bounded however many objects the kernel
//! knows; the node table holds a small record per object until the kernel's FORGET. Open
//! objects, the root and the objects of a backing filesystem without handles keep their
//! descriptor pinned. Every operation is an `*at` call relative to those descriptors
//! (objects are reopened through `/proc/self/fd`, or by handle when no descriptor is
//! held). Running out of descriptors (EMFILE, ENFILE) closes cached ones and retries once,
//! with a rate-limited log line. Inode numbers are the backing ones (the backing root's and
//! 1 swap places); a lookup that finds a known inode number checks that it is the same
//! object (a descriptor of it is open, or the name's handle is the node's), since a gone
//! object's number may be reused.
//!
//! Files with no managed region are opened with kernel passthrough: their reads, writes
//! and mmaps never reach the daemon. Files with regions are opened with direct I/O so that
//! each read and write comes here with its exact range and may raise a data event.
//!
//! fuser dispatches requests one at a time on one thread; an operation that may wait for a
//! DM application's answer (a synchronous event is disposed on the filesystem) runs on a
//! thread of a bounded pool (`dm.op_threads`, `dm.op_queue`), so that other requests,
//! including the DM application's own, go on.

use crate::dm::attrs::{self, flags, Region};
use crate::dm::handle::Handle;
use crate::dm::service::Dm;
use crate::dm::{EventData, EventType, FsId};
use fuser::{
    consts, BackingId, FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow,
};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache entries and attributes. DM calls that change an object
/// behind the kernel's back (write_invis, punch_hole, set_fileattr) invalidate it.
const TTL: Duration = Duration::from_secs(1);
/// FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6): shared mmap of files opened with direct I/O.
const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
/// FUSE_HANDLE_KILLPRIV_V2 (Linux 5.11): the filesystem clears setuid/setgid bits on writes
/// by unprivileged callers itself, so the kernel need not ask for `security.capability`
/// before every write (a round trip per write through the daemon).
const HANDLE_KILLPRIV_V2: u64 = 1 << 28;

thread_local! {
    /// Set on fuser's dispatch thread (which must never wait for a DM application).
    static ON_DISPATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An object the kernel knows. It holds no descriptor of its own (but see `pin`): it is
/// found again by its kernel file handle, and its `O_PATH` descriptor, when one is open,
/// is in the mount's bounded cache ([`FdCache`]).
pub struct Node {
    /// The FUSE inode number.
    pub ino: u64,
    /// Unique among the nodes of the mount (a node replaced by another of the same inode
    /// number has another): the key of its descriptor in the cache.
    serial: u64,
    /// The backing object's kernel file handle (`name_to_handle_at`): type and bytes.
    /// `None`: the backing filesystem gives none, and the node keeps its descriptor in
    /// `pin` for as long as the kernel knows it.
    khandle: Option<(i32, Box<[u8]>)>,
    /// A descriptor kept whatever the cache does: the root's, that of an object with no
    /// handle, and that of an open object (an unlinked open file must still be reached,
    /// and its DESTROY event reads its attributes after the last close).
    pin: Mutex<Option<Arc<OwnedFd>>>,
    nlookup: AtomicU64,
    /// Open files of the object.
    pub opens: AtomicU32,
    destroyed: AtomicBool,
    /// Serializes appends served by the daemon (end of file, then write).
    append: Mutex<()>,
    /// The backing file registered with the kernel for passthrough, while some open uses
    /// it: the kernel allows one per inode, so every passthrough open of the node shares
    /// it (and it is opened read-write when it can be). `true`: it is writable.
    passthrough: Mutex<(Weak<BackingId>, bool)>,
    /// Opens of the node the daemon serves (the kernel refuses passthrough opens of an
    /// inode while others are open without it, and the reverse).
    served: AtomicU32,
}

impl Node {
    fn new(
        ino: u64,
        serial: u64,
        khandle: Option<(i32, Box<[u8]>)>,
        pin: Option<Arc<OwnedFd>>,
    ) -> Node {
        Node {
            ino,
            serial,
            khandle,
            pin: Mutex::new(pin),
            nlookup: AtomicU64::new(1),
            opens: AtomicU32::new(0),
            destroyed: AtomicBool::new(false),
            append: Mutex::new(()),
            passthrough: Mutex::new((Weak::new(), false)),
            served: AtomicU32::new(0),
        }
    }

    fn pinned(&self) -> Option<Arc<OwnedFd>> {
        lock(&self.pin).clone()
    }
}

/// A path that reaches an object through a descriptor of it.
pub fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The mount's open `O_PATH` descriptors of the nodes the kernel knows: at most `cap`,
/// evicted in CLOCK order (an approximation of least recently used: a used entry gets a
/// second chance). A node whose descriptor was evicted is opened again by its handle.
/// Evicted descriptors are returned to the caller, to be closed outside the lock.
struct FdCache {
    cap: usize,
    /// (node serial, descriptor, used since the hand last passed).
    slots: Vec<(u64, Arc<OwnedFd>, bool)>,
    index: HashMap<u64, usize>,
    hand: usize,
}

impl FdCache {
    fn new(cap: usize) -> FdCache {
        FdCache {
            cap,
            slots: Vec::new(),
            index: HashMap::new(),
            hand: 0,
        }
    }

    fn get(&mut self, serial: u64) -> Option<Arc<OwnedFd>> {
        let i = *self.index.get(&serial)?;
        let slot = &mut self.slots[i];
        slot.2 = true;
        Some(slot.1.clone())
    }

    /// Cache `fd` as node `serial`'s: the descriptor it replaces or evicts, if any.
    #[must_use]
    fn put(&mut self, serial: u64, fd: Arc<OwnedFd>) -> Option<Arc<OwnedFd>> {
        if self.cap == 0 {
            return Some(fd);
        }
        if let Some(&i) = self.index.get(&serial) {
            self.slots[i].2 = true;
            return Some(std::mem::replace(&mut self.slots[i].1, fd));
        }
        if self.slots.len() < self.cap {
            self.index.insert(serial, self.slots.len());
            self.slots.push((serial, fd, false));
            return None;
        }
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if slot.2 {
                slot.2 = false;
                self.hand += 1;
                continue;
            }
            let (old, old_fd, _) = std::mem::replace(slot, (serial, fd, false));
            self.index.remove(&old);
            self.index.insert(serial, self.hand);
            self.hand += 1;
            return Some(old_fd);
        }
    }

    #[must_use]
    fn remove(&mut self, serial: u64) -> Option<Arc<OwnedFd>> {
        let i = self.index.remove(&serial)?;
        let (_, fd, _) = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.0, i);
        }
        Some(fd)
    }

    /// Evict entries until at most `keep` are left.
    #[must_use]
    fn shrink(&mut self, keep: usize) -> Vec<Arc<OwnedFd>> {
        let mut out = Vec::new();
        while self.slots.len() > keep {
            let Some((serial, fd, _)) = self.slots.pop() else {
                break;
            };
            self.index.remove(&serial);
            out.push(fd);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        out
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// An open file.
struct Open {
    node: Arc<Node>,
    file: File,
    /// Served here (regions were set when it was opened), not by kernel passthrough.
    managed: bool,
    /// (regions generation, regions) last read.
    regions: Mutex<(u64, Vec<Region>)>,
    /// The kernel's passthrough mapping (shared by the node's passthrough opens), kept
    /// alive until release.
    backing: Option<Arc<BackingId>>,
    /// Opened with O_APPEND (served by the daemon): writes go to the backing file's end.
    append: bool,
}

/// A directory being listed.
struct DirList {
    dir: OwnedFd,
    node: Arc<Node>,
    /// The listing, taken at opendir and again when it is read from the start
    /// (rewinddir).
    entries: Mutex<Arc<Vec<(u64, FileType, OsString)>>>,
}

/// Who asked (copied off the request, which is not `Send`).
#[derive(Debug, Clone, Copy)]
struct Who {
    uid: u32,
    gid: u32,
    pid: u32,
}

impl Who {
    fn of(req: &Request<'_>) -> Who {
        Who {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }
}

/// Whether process (or thread) `pid` still runs and is not being killed: a blocked
/// operation whose caller is gone or dying is cancelled. (A task killed while its FUSE
/// request is in the daemon's hands waits, uninterruptibly, for the answer with SIGKILL
/// pending; it can only die once the request is answered.)
fn alive(pid: u32) -> bool {
    if pid == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "State" if value.starts_with('Z') || value.starts_with('X') => return false,
            "SigPnd" | "ShdPnd"
                if u64::from_str_radix(value, 16).is_ok_and(|m| m & SIGKILL_BIT != 0) =>
            {
                return false
            }
            _ => {}
        }
    }
    true
}

fn errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

fn io_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// State of one mount, shared by the dispatch thread, operation threads and the DM calls.
pub struct Shared {
    /// The filesystem's id.
    pub fs: FsId,
    /// The DM service events go to.
    pub dm: Arc<Dm>,
    /// Mounted read-only.
    pub read_only: bool,
    root: Arc<Node>,
    root_dev: u64,
    root_ino: u64,
    nodes: Mutex<HashMap<u64, Arc<Node>>>,
    next_serial: AtomicU64,
    /// Open `O_PATH` descriptors of nodes (bounded).
    fds: Mutex<FdCache>,
    /// The backing filesystem refused a file handle (logged once).
    no_handles: AtomicBool,
    /// The backing root opened for reading: `open_by_handle_at` wants a descriptor of the
    /// filesystem that is not `O_PATH`.
    mount_fd: OwnedFd,
    opens: Mutex<HashMap<u64, Arc<Open>>>,
    dirs: Mutex<HashMap<u64, Arc<DirList>>>,
    next_fh: AtomicU64,
    /// Bumped when a DM call changes some object's regions.
    pub regions_gen: AtomicU64,
    passthrough: AtomicBool,
    /// FUSE_HANDLE_KILLPRIV_V2 is in force.
    killpriv: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The state of a mount of `backing` (an open directory) as filesystem `fs`, keeping
    /// at most `max_open_fds` descriptors of the objects the kernel knows open (and at most
    /// half of what RLIMIT_NOFILE lets the daemon open).
    pub fn new(
        fs: FsId,
        dm: Arc<Dm>,
        backing: OwnedFd,
        read_only: bool,
        max_open_fds: usize,
    ) -> std::io::Result<Shared> {
        let st = rfs::fstat(&backing)?;
        let mount_fd = rfs::openat(
            &backing,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let khandle = Handle::of_fd(fs, backing.as_fd())
            .ok()
            .map(|h| (h.ktype, h.kbytes.into_boxed_slice()));
        let no_handles = khandle.is_none();
        let root = Arc::new(Node::new(
            fuser::FUSE_ROOT_ID,
            0,
            khandle,
            Some(Arc::new(backing)),
        ));
        let mut nodes = HashMap::new();
        nodes.insert(fuser::FUSE_ROOT_ID, root.clone());
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let cap = max_open_fds.min(usize::try_from(nofile / 2).unwrap_or(usize::MAX));
        if no_handles {
            tracing::warn!(
                fs,
                "the backing filesystem gives no file handles: every object the kernel knows \
                 keeps a descriptor open (a large tree may exhaust the daemon's descriptors)"
            );
        }
        tracing::info!(fs, max_open_fds = cap, "descriptor cache");
        Ok(Shared {
            fs,
            dm,
            read_only,
            root,
            root_dev: st.st_dev,
            root_ino: st.st_ino,
            nodes: Mutex::new(nodes),
            next_serial: AtomicU64::new(1),
            fds: Mutex::new(FdCache::new(cap)),
            no_handles: AtomicBool::new(no_handles),
            mount_fd,
            opens: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            regions_gen: AtomicU64::new(0),
            passthrough: AtomicBool::new(false),
            killpriv: AtomicBool::new(false),
        })
    }

    /// Whether unmanaged files use kernel passthrough.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// The backing root.
    pub fn root(&self) -> &Arc<Node> {
        &self.root
    }

    /// FUSE inode number of a backing inode number (and back: the mapping is its own
    /// inverse).
    pub fn fuse_ino(&self, backing: u64) -> u64 {
        if backing == self.root_ino {
            fuser::FUSE_ROOT_ID
        } else if backing == fuser::FUSE_ROOT_ID {
            self.root_ino
        } else {
            backing
        }
    }

    /// The node the kernel knows by this number, if any.
    pub fn node(&self, ino: u64) -> Option<Arc<Node>> {
        lock(&self.nodes).get(&ino).cloned()
    }

    /// Whether the kernel has passthrough opens of this backing inode: their reads and
    /// writes never reach the daemon, so no data event could be raised for them.
    pub fn passthrough_open(&self, backing_ino: u64) -> bool {
        self.node(self.fuse_ino(backing_ino))
            .is_some_and(|n| lock(&n.passthrough).0.strong_count() > 0)
    }

    fn node_or(&self, ino: u64) -> Result<Arc<Node>, i32> {
        self.node(ino).ok_or(libc::ESTALE)
    }

    /// The node's descriptor if one is open (pinned or cached), without opening one.
    fn held_fd(&self, node: &Node) -> Option<Arc<OwnedFd>> {
        node.pinned().or_else(|| lock(&self.fds).get(node.serial))
    }

    /// An `O_PATH` descriptor of the node's object: the one held, or one opened again by
    /// its handle (and cached). A gone object is ESTALE.
    fn fd(&self, node: &Node) -> Result<Arc<OwnedFd>, i32> {
        if let Some(fd) = self.held_fd(node) {
            return Ok(fd);
        }
        let fd = Arc::new(self.by_handle(node, libc::O_PATH)?);
        self.cache(node, fd.clone());
        Ok(fd)
    }

    /// Keep `fd` as the node's descriptor in the cache (unless the node has one pinned).
    fn cache(&self, node: &Node, fd: Arc<OwnedFd>) {
        if node.pinned().is_some() {
            return;
        }
        let evicted = lock(&self.fds).put(node.serial, fd);
        drop(evicted);
    }

    /// Open the node's object by its handle with these `open(2)` flags.
    fn by_handle(&self, node: &Node, flags: i32) -> Result<OwnedFd, i32> {
        let Some((ktype, kbytes)) = &node.khandle else {
            // no handle: the node keeps its descriptor pinned; it was dropped (cannot be)
            return Err(libc::ESTALE);
        };
        let h = Handle {
            fs: self.fs,
            kind: crate::dm::handle::HandleKind::Object,
            ktype: *ktype,
            kbytes: kbytes.to_vec(),
        };
        self.retry_fds(|| h.open_io(self.mount_fd.as_fd(), flags).map_err(io_errno))
            .map_err(|e| if e == libc::ENOENT { libc::ESTALE } else { e })
    }

    /// Open the node's object with these `open(2)` flags (not `O_PATH`): through its
    /// descriptor when one is held, else by its handle (no `O_PATH` descriptor is opened
    /// for it).
    fn reopen(&self, node: &Node, flags: OFlags) -> Result<OwnedFd, i32> {
        match self.held_fd(node) {
            Some(fd) => self.retry_fds(|| {
                rfs::openat(
                    rfs::CWD,
                    proc_path(&fd),
                    flags | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)
            }),
            None if node.khandle.is_some() => self.by_handle(node, flags.bits() as i32),
            None => Err(libc::ESTALE),
        }
    }

    /// Run something that opens a descriptor; when the daemon is out of descriptors
    /// (EMFILE, ENFILE), say so (rate-limited), close half of the cached ones and try
    /// once more.
    fn retry_fds<T>(&self, mut f: impl FnMut() -> Result<T, i32>) -> Result<T, i32> {
        static LIMIT: strata_common::ratelimit::LogLimit =
            strata_common::ratelimit::LogLimit::new(3, Duration::from_secs(10));
        match f() {
            Err(e @ (libc::EMFILE | libc::ENFILE)) => {
                let evicted = {
                    let mut c = lock(&self.fds);
                    let keep = c.len() / 2;
                    c.shrink(keep)
                };
                let closed = evicted.len();
                drop(evicted);
                let r = f();
                strata_common::log_limited!(
                    LIMIT,
                    warn,
                    fs = self.fs,
                    closed,
                    recovered = r.is_ok(),
                    "out of descriptors ({}): closed cached descriptors and tried again \
                     (lower [fs] max_open_fds or raise the daemon's RLIMIT_NOFILE)",
                    if e == libc::EMFILE {
                        "EMFILE"
                    } else {
                        "ENFILE"
                    }
                );
                r
            }
            r => r,
        }
    }

    /// Whether some process maps the object (through the mount or, for passthrough files,
    /// the backing file): `/proc/*/maps` names the device and inode of every mapping.
    pub fn is_mapped(&self, backing_dev: u64, backing_ino: u64, fuse_dev: Option<u64>) -> bool {
        let fuse_ino = self.fuse_ino(backing_ino);
        let wanted = |dev: u64, ino: u64| {
            (dev == backing_dev && ino == backing_ino)
                || fuse_dev.is_some_and(|d| d == dev && ino == fuse_ino)
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return false;
        };
        for p in procs.flatten() {
            if !p.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) else {
                continue;
            };
            for line in maps.lines() {
                let mut f = line.split_ascii_whitespace();
                let (Some(_), Some(_), Some(_), Some(dev), Some(ino)) =
                    (f.next(), f.next(), f.next(), f.next(), f.next())
                else {
                    continue;
                };
                let Some((maj, min)) = dev.split_once(':') else {
                    continue;
                };
                let (Ok(maj), Ok(min), Ok(ino)) = (
                    u32::from_str_radix(maj, 16),
                    u32::from_str_radix(min, 16),
                    ino.parse::<u64>(),
                ) else {
                    continue;
                };
                if ino != 0 && wanted(libc::makedev(maj, min), ino) {
                    return true;
                }
            }
        }
        false
    }

    fn attr(&self, st: &rfs::Stat) -> FileAttr {
        let t = |s: i64, ns: u64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
            }
        };
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => FileType::Directory,
            libc::S_IFLNK => FileType::Symlink,
            libc::S_IFBLK => FileType::BlockDevice,
            libc::S_IFCHR => FileType::CharDevice,
            libc::S_IFIFO => FileType::NamedPipe,
            libc::S_IFSOCK => FileType::Socket,
            _ => FileType::RegularFile,
        };
        FileAttr {
            ino: self.fuse_ino(st.st_ino),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: t(st.st_atime, st.st_atime_nsec),
            mtime: t(st.st_mtime, st.st_mtime_nsec),
            ctime: t(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn stat(&self, node: &Node) -> Result<(rfs::Stat, FileAttr), i32> {
        let st = rfs::fstat(self.fd(node)?).map_err(errno)?;
        let a = self.attr(&st);
        Ok((st, a))
    }

    /// Look `name` up in `parent`: the node (its lookup count taken) and attributes.
    fn lookup_node(&self, parent: &Node, name: &OsStr) -> Result<(Arc<Node>, FileAttr), i32> {
        self.lookup_in(parent, name, false)
    }

    /// [`Shared::lookup_node`]; `fresh`: the name was just made (the kernel cannot know it).
    fn lookup_in(
        &self,
        parent: &Node,
        name: &OsStr,
        fresh: bool,
    ) -> Result<(Arc<Node>, FileAttr), i32> {
        let pfd = self.fd(parent)?;
        if !fresh {
            // a name the kernel knows: a stat of it is enough when its node's descriptor
            // is open (the object is alive, so no other has its inode number) or when the
            // name's handle is the node's (same object); a missing name costs one call
            let st = rfs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
            let ino = self.fuse_ino(st.st_ino);
            if let Some(n) = self.node(ino).filter(|_| st.st_dev == self.root_dev) {
                let same = self.held_fd(&n).is_some()
                    || n.khandle.as_ref().is_some_and(|(t, b)| {
                        Handle::of_at(self.fs, pfd.as_fd(), name)
                            .is_ok_and(|h| h.ktype == *t && h.kbytes[..] == b[..])
                    });
                if same {
                    let nodes = lock(&self.nodes);
                    if nodes.get(&ino).is_some_and(|m| Arc::ptr_eq(m, &n)) {
                        n.nlookup.fetch_add(1, Ordering::Relaxed);
                        drop(nodes);
                        return Ok((n, self.attr(&st)));
                    }
                }
            }
        }
        let fd = self.retry_fds(|| {
            rfs::openat(
                &pfd,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)
        })?;
        let st = rfs::fstat(&fd).map_err(errno)?;
        if st.st_dev != self.root_dev {
            // another filesystem mounted inside the backing directory: inode numbers
            // would collide, so it is not served
            return Err(libc::EXDEV);
        }
        let ino = self.fuse_ino(st.st_ino);
        let khandle = match Handle::of_fd(self.fs, fd.as_fd()) {
            Ok(h) => Some((h.ktype, h.kbytes.into_boxed_slice())),
            Err(e) => {
                if !self.no_handles.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        fs = self.fs,
                        "the backing filesystem gives no file handle ({e:?}): such objects \
                         keep a descriptor open while the kernel knows them"
                    );
                }
                None
            }
        };
        let fd = Arc::new(fd);
        let (node, new, replaced) = {
            let mut nodes = lock(&self.nodes);
            match nodes.get(&ino) {
                Some(n) if n.khandle == khandle => {
                    n.nlookup.fetch_add(1, Ordering::Relaxed);
                    (n.clone(), false, None)
                }
                other => {
                    // new, or an object that took the inode number of one the kernel
                    // still knows (gone since, its descriptor closed): the number now
                    // names this one, with the lookups the kernel counted
                    let before = other.map_or(0, |o| o.nlookup.load(Ordering::Relaxed));
                    let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
                    let pin = khandle.is_none().then(|| fd.clone());
                    let n = Arc::new(Node::new(ino, serial, khandle, pin));
                    n.nlookup.fetch_add(before, Ordering::Relaxed);
                    let old = nodes.insert(ino, n.clone());
                    (n, old.is_none(), old)
                }
            }
        };
        if let Some(old) = replaced {
            let evicted = lock(&self.fds).remove(old.serial);
            drop(evicted);
        }
        self.cache(&node, fd);
        if new && self.generated(EventType::Debut, &node) {
            self.post(
                EventType::Debut,
                ns(
                    st.st_mode,
                    self.handle_of(&node),
                    vec![],
                    name,
                    OsStr::new(""),
                    0,
                ),
            );
        }
        Ok((node, self.attr(&st)))
    }

    fn forget(&self, ino: u64, n: u64) {
        if ino == fuser::FUSE_ROOT_ID {
            return;
        }
        let gone = {
            let mut nodes = lock(&self.nodes);
            let Some(node) = nodes.get(&ino) else {
                return;
            };
            let left = node.nlookup.load(Ordering::Relaxed).saturating_sub(n);
            node.nlookup.store(left, Ordering::Relaxed);
            if left != 0 {
                return;
            }
            nodes.remove(&ino)
        };
        if let Some(node) = gone {
            let evicted = lock(&self.fds).remove(node.serial);
            drop(evicted);
        }
    }

    /// The DM handle of a node (empty when the backing filesystem gives none).
    pub fn handle_of(&self, node: &Node) -> Vec<u8> {
        match &node.khandle {
            Some((ktype, kbytes)) => Handle {
                fs: self.fs,
                kind: crate::dm::handle::HandleKind::Object,
                ktype: *ktype,
                kbytes: kbytes.to_vec(),
            }
            .encode(),
            None => vec![],
        }
    }

    /// The filesystem's handle.
    pub fn fs_handle(&self) -> Vec<u8> {
        Handle::of_fs(self.fs).encode()
    }

    /// Whether an event of `kind` about `obj` is generated and goes to a session: it is
    /// disposed on the filesystem and in the filesystem's or the object's event list.
    pub(crate) fn generated(&self, kind: EventType, obj: &Node) -> bool {
        let Some(fs_events) = self.dm.disposed_events(self.fs, kind) else {
            return false;
        };
        fs_events.contains(kind)
            || self.fd(obj).is_ok_and(|fd| {
                attrs::get_eventlist(&proc_path(&fd)).is_ok_and(|s| s.contains(kind))
            })
    }

    /// A synchronous event about `obj` (when generated): waits for the answer.
    fn pre(
        &self,
        who: Who,
        kind: EventType,
        obj: &Node,
        data: impl FnOnce() -> EventData,
    ) -> Result<(), i32> {
        if !self.generated(kind, obj) {
            return Ok(());
        }
        self.raise_wait(who, kind, data())
    }

    fn raise_wait(&self, who: Who, kind: EventType, data: EventData) -> Result<(), i32> {
        if ON_DISPATCH.with(std::cell::Cell::get) {
            // the dispatcher runs an operation itself only when no synchronous event was
            // disposed as it started; a disposition set since then must not make the one
            // thread that serves the mount wait (the operation counts as earlier)
            return Ok(());
        }
        let r = self.dm.raise(self.fs, kind, data);
        self.dm.wait(r, &|| alive(who.pid))
    }

    /// An asynchronous event (already known to be generated).
    fn post(&self, kind: EventType, data: EventData) {
        let _ = self.dm.raise(self.fs, kind, data);
    }

    fn post_if(&self, kind: EventType, obj: &Node, data: impl FnOnce() -> EventData) {
        if self.generated(kind, obj) {
            self.post(kind, data());
        }
    }

    /// Run a backing operation; when it fails with ENOSPC, raise NOSPACE and, if the DM
    /// application answers continue (it freed space), try once more.
    fn nospace<T>(&self, who: Who, mut f: impl FnMut() -> Result<T, i32>) -> Result<T, i32> {
        match f() {
            Err(libc::ENOSPC) if self.generated(EventType::Nospace, &self.root) => {
                let data = ns(
                    0,
                    self.fs_handle(),
                    vec![],
                    OsStr::new(""),
                    OsStr::new(""),
                    0,
                );
                self.raise_wait(who, EventType::Nospace, data)?;
                f()
            }
            r => r,
        }
    }

    /// Whether an operation on this filesystem may wait for a DM application.
    fn may_block(&self) -> bool {
        self.dm.may_block(self.fs)
    }

    /// A descriptor of `node` to keep across an operation that may remove its last link,
    /// for [`Shared::maybe_destroy`]; `None` when no DESTROY event could be raised for it
    /// (then none is opened).
    fn destroy_fd(&self, node: &Node) -> Option<Arc<OwnedFd>> {
        if !self.dm.disposed(self.fs, EventType::Destroy) {
            return None;
        }
        self.fd(node).ok()
    }

    /// The last link and the last open of `node` are gone: DESTROY (once). `fd`: a
    /// descriptor of it held since before the last link went (a gone object cannot be
    /// opened by its handle any more).
    fn maybe_destroy(&self, node: &Arc<Node>, fd: Option<Arc<OwnedFd>>) {
        if node.opens.load(Ordering::Acquire) != 0 || !self.dm.disposed(self.fs, EventType::Destroy)
        {
            return;
        }
        let Some(fd) = fd else {
            return;
        };
        let Ok(st) = rfs::fstat(&fd) else {
            return;
        };
        if st.st_nlink != 0 || node.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        let generated = self
            .dm
            .disposed_events(self.fs, EventType::Destroy)
            .is_some_and(|fs_events| {
                fs_events.contains(EventType::Destroy)
                    || attrs::get_eventlist(&proc_path(&fd))
                        .is_ok_and(|s| s.contains(EventType::Destroy))
            });
        if !generated {
            return;
        }
        let (attr_name, attr_copy) = match self.dm.fs_record(self.fs).and_then(|r| r.destroy_attr) {
            Some(name) => (
                name,
                attrs::get_dmattr(&proc_path(&fd), &name).unwrap_or_default(),
            ),
            None => ([0; 8], vec![]),
        };
        self.post(
            EventType::Destroy,
            EventData::Destroy {
                handle: self.handle_of(node),
                attr_name,
                attr_copy,
            },
        );
    }

    /// Make `name` in `parent` belong to the caller (the daemon creates as root), with
    /// exactly `mode` (the caller's umask is applied by the kernel; the daemon's must not
    /// be).
    fn own(&self, who: Who, parent: &OwnedFd, name: &OsStr, mode: Option<u32>) -> Result<(), i32> {
        let pst = rfs::fstat(parent).map_err(errno)?;
        let setgid_dir = pst.st_mode & libc::S_ISGID != 0;
        // what is already so is not done again (a root caller's objects are the daemon's)
        let st = rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let chown = st.st_uid != who.uid || (!setgid_dir && st.st_gid != who.gid);
        if chown {
            rfs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(who.uid)),
                (!setgid_dir).then(|| rustix::fs::Gid::from_raw(who.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(m) = mode {
            let mut m = m & 0o7777;
            if setgid_dir && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                m |= libc::S_ISGID;
            }
            // (a chown may have dropped setuid/setgid bits: the mode is set again)
            if chown || st.st_mode & 0o7777 != m {
                rfs::chmodat(parent, name, Mode::from_raw_mode(m), AtFlags::empty())
                    .map_err(errno)?;
            }
        }
        Ok(())
    }

    /// mknod / mkdir / symlink with their namespace events.
    fn make(
        &self,
        who: Who,
        parent: &Arc<Node>,
        name: &OsStr,
        mode: u32,
        what: Make<'_>,
    ) -> Result<FileAttr, i32> {
        let (pre, post) = match what {
            Make::Symlink(_) => (EventType::Symlink, EventType::Postsymlink),
            _ => (EventType::Create, EventType::Postcreate),
        };
        let target = match &what {
            Make::Symlink(t) => t.as_os_str(),
            _ => OsStr::new(""),
        };
        let ph = || self.handle_of(parent);
        self.pre(who, pre, parent, || ns(mode, ph(), vec![], name, target, 0))?;
        let pfd = self.fd(parent)?;
        let r = self.nospace(who, || {
            match &what {
                Make::Node(rdev) => rfs::mknodat(
                    &pfd,
                    name,
                    rfs::FileType::from_raw_mode(mode),
                    Mode::from_raw_mode(mode & 0o7777),
                    *rdev,
                ),
                Make::Dir => rfs::mkdirat(&pfd, name, Mode::from_raw_mode(mode & 0o7777)),
                Make::Symlink(t) => rfs::symlinkat(*t, &pfd, name),
            }
            .map_err(errno)?;
            let own = self.own(
                who,
                &pfd,
                name,
                (!matches!(what, Make::Symlink(_))).then_some(mode),
            );
            if let Err(e) = own {
                let _ = rfs::unlinkat(
                    &pfd,
                    name,
                    if matches!(what, Make::Dir) {
                        AtFlags::REMOVEDIR
                    } else {
                        AtFlags::empty()
                    },
                );
                return Err(e);
            }
            Ok(())
        });
        let r = r.and_then(|()| self.lookup_in(parent, name, true));
        self.post_if(post, parent, || match &r {
            Ok((n, _)) => ns(mode, ph(), self.handle_of(n), name, target, 0),
            Err(e) => ns(mode, ph(), vec![], name, target, *e),
        });
        r.map(|(_, a)| a)
    }

    fn remove(&self, who: Who, parent: &Arc<Node>, name: &OsStr, dir: bool) -> Result<(), i32> {
        let pfd = self.fd(parent)?;
        let st = rfs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let victim = self.node(self.fuse_ino(st.st_ino));
        let ph = || self.handle_of(parent);
        self.pre(who, EventType::Remove, parent, || {
            ns(st.st_mode, ph(), vec![], name, OsStr::new(""), 0)
        })?;
        let vfd = victim.as_ref().and_then(|v| self.destroy_fd(v));
        let r = rfs::unlinkat(
            &pfd,
            name,
            if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            },
        )
        .map_err(errno);
        self.post_if(EventType::Postremove, parent, || {
            ns(
                st.st_mode,
                ph(),
                vec![],
                name,
                OsStr::new(""),
                r.err().unwrap_or(0),
            )
        });
        if let (Ok(()), Some(v)) = (&r, victim) {
            self.maybe_destroy(&v, vfd);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        who: Who,
        parent: &Arc<Node>,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), i32> {
        let (pfd, npfd) = (self.fd(parent)?, self.fd(newparent)?);
        let st = rfs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let victim = rfs::statat(&npfd, newname, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .and_then(|v| self.node(self.fuse_ino(v.st_ino)));
        let h = || (self.handle_of(parent), self.handle_of(newparent));
        self.pre(who, EventType::Rename, parent, || {
            let (a, b) = h();
            ns(st.st_mode, a, b, name, newname, 0)
        })?;
        let vfd = victim.as_ref().and_then(|v| self.destroy_fd(v));
        let r = rfs::renameat_with(
            &pfd,
            name,
            &npfd,
            newname,
            rfs::RenameFlags::from_bits_retain(flags),
        )
        .map_err(errno);
        self.post_if(EventType::Postrename, parent, || {
            let (a, b) = h();
            ns(st.st_mode, a, b, name, newname, r.err().unwrap_or(0))
        });
        if let (Ok(()), Some(v)) = (&r, victim) {
            self.maybe_destroy(&v, vfd);
        }
        r
    }

    fn link(
        &self,
        who: Who,
        node: &Arc<Node>,
        newparent: &Arc<Node>,
        newname: &OsStr,
    ) -> Result<FileAttr, i32> {
        let (fd, npfd) = (self.fd(node)?, self.fd(newparent)?);
        let st = rfs::fstat(&fd).map_err(errno)?;
        let h = || (self.handle_of(newparent), self.handle_of(node));
        self.pre(who, EventType::Link, newparent, || {
            let (a, b) = h();
            ns(st.st_mode, a, b, newname, OsStr::new(""), 0)
        })?;
        let r = self
            .nospace(who, || {
                rfs::linkat(&fd, "", &npfd, newname, AtFlags::EMPTY_PATH).map_err(errno)
            })
            .and_then(|()| self.lookup_node(newparent, newname));
        self.post_if(EventType::Postlink, newparent, || {
            let (a, b) = h();
            ns(
                st.st_mode,
                a,
                b,
                newname,
                OsStr::new(""),
                r.as_ref().err().copied().unwrap_or(0),
            )
        });
        r.map(|(_, a)| a)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        who: Who,
        node: &Arc<Node>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<u64>,
    ) -> Result<FileAttr, i32> {
        let fd = self.fd(node)?;
        let path = proc_path(&fd);
        if let Some(size) = size {
            let regions = attrs::get_regions(&path).unwrap_or_default();
            if attrs::raises(&regions, size, u64::MAX - size, flags::TRUNCATE)
                && self.dm.disposed(self.fs, EventType::Truncate)
            {
                let data = EventData::Data {
                    handle: self.handle_of(node),
                    offset: size,
                    length: 0,
                };
                self.raise_wait(who, EventType::Truncate, data)?;
            }
            let open = fh.and_then(|fh| lock(&self.opens).get(&fh).cloned());
            self.nospace(who, || match &open {
                Some(o) => rfs::ftruncate(&o.file, size).map_err(errno),
                None => {
                    let f = self.reopen(node, OFlags::WRONLY)?;
                    rfs::ftruncate(&f, size).map_err(errno)
                }
            })?;
            if who.uid != 0 && self.killpriv.load(Ordering::Relaxed) {
                self.kill_privs(node);
            }
        }
        if uid.is_some() || gid.is_some() {
            rfs::chownat(
                &fd,
                "",
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(m) = mode {
            rfs::chmodat(
                rfs::CWD,
                &path,
                Mode::from_raw_mode(m & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            let ts = |t: Option<TimeOrNow>| match t {
                None => rfs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rfs::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => rfs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rfs::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
                    Ok(d) => rfs::Timespec {
                        tv_sec: d.as_secs() as i64,
                        tv_nsec: d.subsec_nanos() as _,
                    },
                    Err(e) => {
                        let d = e.duration();
                        let mut s = -(d.as_secs() as i64);
                        let mut ns = d.subsec_nanos() as i64;
                        if ns > 0 {
                            s -= 1;
                            ns = 1_000_000_000 - ns;
                        }
                        rfs::Timespec {
                            tv_sec: s,
                            tv_nsec: ns as _,
                        }
                    }
                },
            };
            let times = rfs::Timestamps {
                last_access: ts(atime),
                last_modification: ts(mtime),
            };
            rfs::utimensat(
                &fd,
                "",
                &times,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        let (st, a) = self.stat(node)?;
        self.post_if(EventType::Attribute, node, || {
            ns(
                st.st_mode,
                self.handle_of(node),
                vec![],
                OsStr::new(""),
                OsStr::new(""),
                0,
            )
        });
        Ok(a)
    }

    /// Whether the object carries privileges a write must drop (setuid, setgid with group
    /// execute, a file capability).
    fn has_privs(&self, node: &Node) -> bool {
        let Ok(fd) = self.fd(node) else {
            return true;
        };
        let Ok(st) = rfs::fstat(&fd) else {
            return true;
        };
        st.st_mode & libc::S_ISUID != 0
            || (st.st_mode & libc::S_ISGID != 0 && st.st_mode & libc::S_IXGRP != 0)
            || rfs::getxattr_query(proc_path(&fd), "security.capability").is_ok()
    }

    /// Drop setuid / setgid and the file capability after an unprivileged write or
    /// truncate (FUSE_HANDLE_KILLPRIV_V2 makes this the filesystem's job).
    fn kill_privs(&self, node: &Node) {
        let Ok(fd) = self.fd(node) else {
            return;
        };
        let Ok(st) = rfs::fstat(&fd) else {
            return;
        };
        let mut mode = st.st_mode & 0o7777;
        mode &= !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode != st.st_mode & 0o7777 {
            let _ = rfs::chmodat(
                rfs::CWD,
                proc_path(&fd),
                Mode::from_raw_mode(mode),
                AtFlags::empty(),
            );
        }
        let _ = rfs::removexattr(proc_path(&fd), "security.capability");
    }

    /// What an open would want on its own: (regions, passthrough). Passthrough: no
    /// region, no privileges a write must drop, NOSPACE not disposed (its writes would not
    /// be seen), and the kernel accepted passthrough.
    fn wants(&self, node: &Node, fd: &OwnedFd, flags: i32) -> (Vec<Region>, bool, bool) {
        let regions = attrs::get_regions(&proc_path(fd)).unwrap_or_default();
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let privileged = writable && self.has_privs(node);
        let passthrough = regions.is_empty()
            && self.passthrough.load(Ordering::Relaxed)
            && !privileged
            && !(writable && self.dm.disposed(self.fs, EventType::Nospace));
        (regions, passthrough, privileged)
    }

    /// Open the backing file for a passthrough open (read-write when the file allows it:
    /// the kernel does the I/O of every passthrough open of the inode on it, with each
    /// open's own flags) or for the daemon (the caller's flags, without those the daemon
    /// handles itself).
    fn open_file(&self, fd: &OwnedFd, flags: i32, passthrough: bool) -> Result<File, i32> {
        let path = proc_path(fd);
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let fd = if passthrough {
            // O_NONBLOCK: a lease on the backing file must not stall the dispatch thread
            // (EWOULDBLOCK instead); a file being executed refuses writers (ETXTBSY):
            // readers then get a read-only backing file
            let open = |mode: OFlags| {
                self.retry_fds(|| {
                    let fd = rfs::openat(
                        rfs::CWD,
                        &path,
                        mode | OFlags::NONBLOCK | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(errno)?;
                    rfs::fcntl_setfl(
                        &fd,
                        rfs::fcntl_getfl(&fd).map_err(errno)? - OFlags::NONBLOCK,
                    )
                    .map_err(errno)?;
                    Ok(fd)
                })
            };
            match open(OFlags::RDWR) {
                Ok(fd) => fd,
                Err(_) if !writable => open(OFlags::RDONLY)?,
                Err(e) => return Err(e),
            }
        } else {
            // the name was resolved by the kernel; the daemon reads and writes through its
            // own buffers at offsets it chooses (appends at the backing file's end)
            let f = flags
                & !(libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOCTTY
                    | libc::O_TRUNC
                    | libc::O_NOFOLLOW
                    | libc::O_DIRECTORY
                    | libc::O_PATH
                    | libc::O_APPEND
                    | libc::O_DIRECT);
            self.retry_fds(|| {
                rfs::openat(
                    rfs::CWD,
                    &path,
                    OFlags::from_bits_retain(f as u32) | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno)
            })?
        };
        Ok(File::from(fd))
    }

    fn release(&self, fh: u64) {
        let Some(open) = lock(&self.opens).remove(&fh) else {
            return;
        };
        let node = open.node.clone();
        if open.backing.is_none() {
            node.served.fetch_sub(1, Ordering::AcqRel);
        }
        drop(open);
        node.opens.fetch_sub(1, Ordering::AcqRel);
        self.post_if(EventType::Close, &node, || {
            ns(
                0,
                self.handle_of(&node),
                vec![],
                OsStr::new(""),
                OsStr::new(""),
                0,
            )
        });
        // the last close: the node's descriptor goes back to the cache's rule
        let fd = {
            let mut pin = lock(&node.pin);
            if node.opens.load(Ordering::Acquire) == 0 && node.khandle.is_some() {
                let fd = pin.take();
                if let Some(fd) = &fd {
                    // (not `cache`: it takes the pin's lock)
                    let evicted = lock(&self.fds).put(node.serial, fd.clone());
                    drop(evicted);
                }
                fd
            } else {
                pin.clone()
            }
        };
        self.maybe_destroy(&node, fd);
    }

    fn open_of(&self, fh: u64) -> Result<Arc<Open>, i32> {
        lock(&self.opens).get(&fh).cloned().ok_or(libc::EBADF)
    }

    /// Whether an access of a managed open file raises a data event (it must then run off
    /// the dispatch thread).
    fn raises(&self, open: &Open, offset: u64, len: u64, flag: u8, kind: EventType) -> bool {
        if !open.managed || !self.dm.disposed(self.fs, kind) {
            return false;
        }
        let gen = self.regions_gen.load(Ordering::Acquire);
        let mut r = lock(&open.regions);
        if r.0 != gen {
            let regions = self
                .fd(&open.node)
                .ok()
                .and_then(|fd| attrs::get_regions(&proc_path(&fd)).ok());
            *r = (gen, regions.unwrap_or_default());
        }
        attrs::raises(&r.1, offset, len, flag)
    }

    /// Read for the kernel into this thread's buffer (reused: no allocation and zeroing
    /// per request) and answer with it.
    fn read(&self, who: Who, open: &Open, offset: u64, size: u32, event: bool, reply: ReplyData) {
        if event {
            let data = EventData::Data {
                handle: self.handle_of(&open.node),
                offset,
                length: size as u64,
            };
            if let Err(e) = self.raise_wait(who, EventType::Read, data) {
                return reply.error(e);
            }
        }
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            let size = size as usize;
            if buf.len() < size {
                buf.resize(size, 0);
            }
            let mut n = 0;
            while n < size {
                match open.file.read_at(&mut buf[n..size], offset + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(io_errno(e)),
                }
            }
            reply.data(&buf[..n]);
        });
    }

    fn write(
        &self,
        who: Who,
        open: &Open,
        offset: u64,
        data: &[u8],
        event: bool,
        kill: bool,
    ) -> Result<u32, i32> {
        if event {
            let ev = EventData::Data {
                handle: self.handle_of(&open.node),
                offset,
                length: data.len() as u64,
            };
            self.raise_wait(who, EventType::Write, ev)?;
        }
        self.nospace(who, || {
            if open.append {
                // O_APPEND: at the backing file's end now (the kernel's idea of the size
                // may be stale), one append at a time
                let _g = lock(&open.node.append);
                let end = rfs::fstat(&open.file).map_err(errno)?.st_size as u64;
                open.file.write_all_at(data, end).map_err(io_errno)
            } else {
                open.file.write_all_at(data, offset).map_err(io_errno)
            }
        })?;
        if kill {
            self.kill_privs(&open.node);
        }
        Ok(data.len() as u32)
    }

    fn list(&self, node: &Node) -> Result<Vec<(u64, FileType, OsString)>, i32> {
        let dir = self.reopen(node, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut entries = Vec::new();
        let mut d = rfs::Dir::new(dir).map_err(errno)?;
        while let Some(e) = d.read() {
            let e = e.map_err(errno)?;
            let kind = match e.file_type() {
                rfs::FileType::Directory => FileType::Directory,
                rfs::FileType::Symlink => FileType::Symlink,
                rfs::FileType::BlockDevice => FileType::BlockDevice,
                rfs::FileType::CharacterDevice => FileType::CharDevice,
                rfs::FileType::Fifo => FileType::NamedPipe,
                rfs::FileType::Socket => FileType::Socket,
                _ => FileType::RegularFile,
            };
            let name = OsStr::from_bytes(e.file_name().to_bytes()).to_os_string();
            let ino = if name == "." {
                node.ino
            } else if name == ".." && node.ino == fuser::FUSE_ROOT_ID {
                // the backing root's parent is outside the filesystem
                fuser::FUSE_ROOT_ID
            } else {
                self.fuse_ino(e.ino())
            };
            entries.push((ino, kind, name));
        }
        Ok(entries)
    }

    fn opendir(&self, node: &Arc<Node>) -> Result<u64, i32> {
        let dir = self.reopen(node, OFlags::RDONLY | OFlags::DIRECTORY)?;
        // listed when read from the start (the first read is)
        let entries = Vec::new();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(
            fh,
            Arc::new(DirList {
                dir,
                node: node.clone(),
                entries: Mutex::new(Arc::new(entries)),
            }),
        );
        Ok(fh)
    }

    fn getxattr(&self, node: &Node, name: &OsStr, size: u32) -> Result<Vec<u8>, i32> {
        if attrs::is_hidden(name) {
            return Err(libc::ENODATA);
        }
        let fd = self.fd(node)?;
        let path = proc_path(&fd);
        if size == 0 {
            let n = rfs::getxattr_query(&path, name).map_err(errno)?;
            return Ok(vec![0; n]);
        }
        let mut buf = vec![0u8; size as usize];
        let n = rfs::getxattr(&path, name, &mut buf[..]).map_err(errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn listxattr(&self, node: &Node) -> Result<Vec<u8>, i32> {
        let fd = self.fd(node)?;
        let path = proc_path(&fd);
        let n = rfs::listxattr_query(&path).map_err(errno)?;
        let mut buf = vec![0u8; n + 256];
        let n = rfs::listxattr(&path, &mut buf[..]).map_err(errno)?;
        buf.truncate(n);
        let mut out = Vec::with_capacity(n);
        for name in buf.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if !attrs::is_hidden(OsStr::from_bytes(name)) {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        Ok(out)
    }
}

/// What `make` creates.
enum Make<'a> {
    Node(u64),
    Dir,
    Symlink(&'a std::path::Path),
}

/// A dm_namesp_event_t.
fn ns(
    mode: u32,
    h1: Vec<u8>,
    h2: Vec<u8>,
    name1: &OsStr,
    name2: &OsStr,
    retcode: i32,
) -> EventData {
    EventData::Namespace {
        mode,
        handle1: h1,
        handle2: h2,
        name1: name1.to_string_lossy().into_owned(),
        name2: name2.to_string_lossy().into_owned(),
        retcode,
    }
}

/// The fuser filesystem: the dispatch thread's side.
pub struct ManagedFs {
    s: Arc<Shared>,
}

impl ManagedFs {
    /// A filesystem over `shared`.
    pub fn new(s: Arc<Shared>) -> ManagedFs {
        ManagedFs { s }
    }

    /// Run `job` here, or on a thread of its own when it may wait for a DM application.
    fn run(&self, blocking: bool, job: impl FnOnce(&Shared) + Send + 'static) {
        if blocking {
            let s = self.s.clone();
            // a full pool hands the job back: dropping it drops its reply, which answers
            // EIO (the kernel's request never goes unanswered)
            if self.s.dm.ops_pool().submit(move || job(&s)).is_err() {
                static FULL: strata_common::ratelimit::LogLimit =
                    strata_common::ratelimit::LogLimit::new(3, Duration::from_secs(10));
                strata_common::log_limited!(
                    FULL,
                    error,
                    "a filesystem operation was refused with EIO: every thread of dm.op_threads waits for a DM application and dm.op_queue operations wait for a thread"
                );
            }
        } else {
            job(&self.s)
        }
    }

    fn rofs(&self) -> bool {
        self.s.read_only
    }
}

/// Answer an entry request.
fn entry(reply: ReplyEntry, r: Result<FileAttr, i32>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, 0),
        Err(e) => reply.error(e),
    }
}

/// Answer a request that returns nothing.
fn empty(reply: ReplyEmpty, r: Result<(), i32>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// A new file handle for `file`.
fn fh_file(s: &Shared, file: File) -> (u64, File) {
    (s.next_fh.fetch_add(1, Ordering::Relaxed), file)
}

impl ManagedFs {
    /// Record an open and answer the kernel.
    #[allow(clippy::too_many_arguments)]
    fn opened(
        &self,
        n: Arc<Node>,
        fd: Arc<OwnedFd>,
        (fh, file): (u64, File),
        regions: Vec<Region>,
        backing: Option<Arc<BackingId>>,
        append: bool,
        reply: ReplyOpen,
    ) {
        let open = Arc::new(Open {
            node: n.clone(),
            file,
            managed: !regions.is_empty(),
            regions: Mutex::new((self.s.regions_gen.load(Ordering::Acquire), regions)),
            backing,
            append,
        });
        n.opens.fetch_add(1, Ordering::AcqRel);
        {
            // an open object keeps its descriptor (see `Node::pin`)
            let mut pin = lock(&n.pin);
            if pin.is_none() {
                *pin = Some(fd);
            }
        }
        lock(&self.s.opens).insert(fh, open.clone());
        match &open.backing {
            Some(id) => reply.opened_passthrough(fh, 0, id),
            // served here with direct I/O: no page cache of the inode competes with the
            // kernel's passthrough opens of it (the kernel refuses the mix)
            None => reply.opened(fh, consts::FOPEN_DIRECT_IO),
        }
    }
}

macro_rules! node_or_reply {
    ($s:expr, $ino:expr, $reply:ident) => {
        match $s.node_or($ino) {
            Ok(n) => n,
            Err(e) => return $reply.error(e),
        }
    };
}

impl Filesystem for ManagedFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        ON_DISPATCH.with(|d| d.set(true));
        if config.add_capabilities(consts::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok()
        {
            self.s.passthrough.store(true, Ordering::Relaxed);
        } else {
            tracing::warn!(
                fs = self.s.fs,
                "kernel passthrough unavailable: unmanaged files are served by the daemon"
            );
        }
        let _ = config.add_capabilities(DIRECT_IO_ALLOW_MMAP);
        if config.add_capabilities(HANDLE_KILLPRIV_V2).is_ok() {
            self.s.killpriv.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let p = node_or_reply!(self.s, parent, reply);
        match self.s.lookup_node(&p, name) {
            Ok((_, a)) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        self.s.forget(ino, nlookup);
    }

    fn batch_forget(&mut self, _req: &Request<'_>, nodes: &[fuser::fuse_forget_one]) {
        for n in nodes {
            self.s.forget(n.nodeid, n.nlookup);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let n = node_or_reply!(self.s, ino, reply);
        match self.s.stat(&n) {
            Ok((_, a)) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let n = node_or_reply!(self.s, ino, reply);
        let who = Who::of(req);
        let blocking = size.is_some() && self.s.may_block();
        self.run(blocking, move |s| {
            match s.setattr(who, &n, mode, uid, gid, size, atime, mtime, fh) {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let n = node_or_reply!(self.s, ino, reply);
        let fd = match self.s.fd(&n) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        match rfs::readlinkat(&fd, "", Vec::new()) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let p = node_or_reply!(self.s, parent, reply);
        let (who, name) = (Who::of(req), name.to_os_string());
        self.run(self.s.may_block(), move |s| {
            entry(reply, s.make(who, &p, &name, mode, Make::Node(rdev as u64)))
        });
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let p = node_or_reply!(self.s, parent, reply);
        let (who, name) = (Who::of(req), name.to_os_string());
        self.run(self.s.may_block(), move |s| {
            entry(
                reply,
                s.make(who, &p, &name, mode | libc::S_IFDIR, Make::Dir),
            )
        });
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let p = node_or_reply!(self.s, parent, reply);
        let (who, name) = (Who::of(req), name.to_os_string());
        self.run(self.s.may_block(), move |s| {
            empty(reply, s.remove(who, &p, &name, false))
        });
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let p = node_or_reply!(self.s, parent, reply);
        let (who, name) = (Who::of(req), name.to_os_string());
        self.run(self.s.may_block(), move |s| {
            empty(reply, s.remove(who, &p, &name, true))
        });
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let p = node_or_reply!(self.s, parent, reply);
        let (who, name, target) = (Who::of(req), link_name.to_os_string(), target.to_path_buf());
        self.run(self.s.may_block(), move |s| {
            entry(
                reply,
                s.make(
                    who,
                    &p,
                    &name,
                    libc::S_IFLNK | 0o777,
                    Make::Symlink(&target),
                ),
            )
        });
    }

    fn rename(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let p = node_or_reply!(self.s, parent, reply);
        let np = node_or_reply!(self.s, newparent, reply);
        let (who, name, newname) = (Who::of(req), name.to_os_string(), newname.to_os_string());
        self.run(self.s.may_block(), move |s| {
            empty(reply, s.rename(who, &p, &name, &np, &newname, flags))
        });
    }

    fn link(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let n = node_or_reply!(self.s, ino, reply);
        let np = node_or_reply!(self.s, newparent, reply);
        let (who, newname) = (Who::of(req), newname.to_os_string());
        self.run(self.s.may_block(), move |s| {
            entry(reply, s.link(who, &n, &np, &newname))
        });
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let n = node_or_reply!(self.s, ino, reply);
        let fd = match self.s.fd(&n) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let (regions, wants_passthrough, privileged) = self.s.wants(&n, &fd, flags);
        // the kernel serves an inode either all by passthrough (one backing file) or all
        // through the daemon: an open follows the opens already there
        let mut pt = lock(&n.passthrough);
        let live = pt.0.upgrade();
        let served_now = n.served.load(Ordering::Acquire) > 0;
        let backing = match live {
            Some(_) if privileged => {
                // a write that must drop setuid/setgid cannot go by passthrough
                return reply.error(libc::ETXTBSY);
            }
            Some(_) if writable && !pt.1 => return reply.error(libc::ETXTBSY),
            // passthrough opens are there: this one shares their backing file (a region
            // set meanwhile takes effect once they are closed)
            Some(id) => Some(id),
            None if served_now || !wants_passthrough => None,
            None => {
                let file = match self.s.open_file(&fd, flags, true) {
                    Ok(f) => f,
                    Err(e) => return reply.error(e),
                };
                let rw = rfs::fcntl_getfl(&file)
                    .map(|f| f.contains(OFlags::RDWR))
                    .unwrap_or(false);
                match reply.open_backing(&file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        *pt = (Arc::downgrade(&id), rw);
                        drop(pt);
                        return self.opened(
                            n,
                            fd,
                            fh_file(&self.s, file),
                            regions,
                            Some(id),
                            false,
                            reply,
                        );
                    }
                    Err(e) => {
                        tracing::warn!(
                            fs = self.s.fs,
                            "passthrough open failed ({e}): served by the daemon"
                        );
                        self.s.passthrough.store(false, Ordering::Relaxed);
                        None
                    }
                }
            }
        };
        let passthrough = backing.is_some();
        if !passthrough {
            n.served.fetch_add(1, Ordering::AcqRel);
        }
        drop(pt);
        let file = match self.s.open_file(&fd, flags, passthrough) {
            Ok(f) => f,
            Err(e) => {
                if !passthrough {
                    n.served.fetch_sub(1, Ordering::AcqRel);
                }
                return reply.error(e);
            }
        };
        let append = !passthrough && flags & libc::O_APPEND != 0;
        self.opened(
            n,
            fd,
            fh_file(&self.s, file),
            regions,
            backing,
            append,
            reply,
        );
    }

    fn read(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let open = match self.s.open_of(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let who = Who::of(req);
        let offset = offset.max(0) as u64;
        let event = self
            .s
            .raises(&open, offset, size as u64, flags::READ, EventType::Read);
        self.run(event, move |s| {
            s.read(who, &open, offset, size, event, reply)
        });
    }

    fn write(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        // FUSE_WRITE_KILL_SUIDGID: an unprivileged writer
        let kill = write_flags & consts::FUSE_WRITE_KILL_PRIV != 0;
        if self.rofs() {
            return reply.error(libc::EROFS);
        }
        let open = match self.s.open_of(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let who = Who::of(req);
        let offset = if open.append {
            // where the append will land (the event says so)
            rfs::fstat(&open.file).map_or(0, |st| st.st_size as u64)
        } else {
            offset.max(0) as u64
        };
        let event = self.s.raises(
            &open,
            offset,
            data.len() as u64,
            flags::WRITE,
            EventType::Write,
        );
        if !event && !self.s.dm.disposed(self.s.fs, EventType::Nospace) {
            return match self.s.write(who, &open, offset, data, false, kill) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            };
        }
        let data = data.to_vec();
        self.run(true, move |s| {
            match s.write(who, &open, offset, &data, event, kill) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        // nothing to do at a close (no locks, no write-back): ENOSYS makes the kernel stop
        // sending FLUSH (a round trip per close) and count it a success
        reply.error(libc::ENOSYS);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.s.release(fh);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let open = match self.s.open_of(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        self.run(true, move |_| {
            let r = if datasync {
                rfs::fdatasync(&open.file)
            } else {
                rfs::fsync(&open.file)
            };
            empty(reply, r.map_err(errno));
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let n = node_or_reply!(self.s, ino, reply);
        match self.s.opendir(&n) {
            Ok(fh) => reply.opened(fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(d) = lock(&self.s.dirs).get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        if offset == 0 {
            // from the start again (rewinddir): a fresh listing
            match self.s.list(&d.node) {
                Ok(e) => *lock(&d.entries) = Arc::new(e),
                Err(e) => return reply.error(e),
            }
        }
        let entries = lock(&d.entries).clone();
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        lock(&self.s.dirs).remove(&fh);
        reply.ok();
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(d) = lock(&self.s.dirs).get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        empty(reply, rfs::fsync(&d.dir).map_err(errno));
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let Some(root) = self.s.root.pinned() else {
            return reply.error(libc::ESTALE);
        };
        match rfs::fstatvfs(&root) {
            Ok(v) => reply.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_bsize as u32,
                v.f_namemax as u32,
                v.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if attrs::is_hidden(name) {
            return reply.error(libc::EPERM);
        }
        let n = node_or_reply!(self.s, ino, reply);
        let fd = match self.s.fd(&n) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        empty(
            reply,
            rfs::setxattr(
                proc_path(&fd),
                name,
                value,
                rfs::XattrFlags::from_bits_retain(flags as u32),
            )
            .map_err(errno),
        )
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let n = node_or_reply!(self.s, ino, reply);
        match self.s.getxattr(&n, name, size) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let n = node_or_reply!(self.s, ino, reply);
        match self.s.listxattr(&n) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(libc::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        if attrs::is_hidden(name) {
            return reply.error(libc::ENODATA);
        }
        let n = node_or_reply!(self.s, ino, reply);
        let fd = match self.s.fd(&n) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        empty(reply, rfs::removexattr(proc_path(&fd), name).map_err(errno));
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself
        reply.ok();
    }

    fn fallocate(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let open = match self.s.open_of(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        if offset < 0 || length <= 0 {
            return reply.error(libc::EINVAL);
        }
        let who = Who::of(req);
        let (off, len) = (offset as u64, length as u64);
        let event = self
            .s
            .raises(&open, off, len, flags::WRITE, EventType::Write);
        self.run(event || self.s.may_block(), move |s| {
            let r = (|| {
                if event {
                    let data = EventData::Data {
                        handle: s.handle_of(&open.node),
                        offset: off,
                        length: len,
                    };
                    s.raise_wait(who, EventType::Write, data)?;
                }
                s.nospace(who, || {
                    rfs::fallocate(
                        &open.file,
                        rfs::FallocateFlags::from_bits_retain(mode as u32),
                        off,
                        len,
                    )
                    .map_err(errno)
                })
            })();
            empty(reply, r);
        });
    }

    fn lseek(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let open = match self.s.open_of(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        if offset < 0 {
            return reply.error(libc::EINVAL);
        }
        let pos = match whence {
            libc::SEEK_DATA => rfs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rfs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rfs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rfs::SeekFrom::End(offset),
            _ => return reply.error(libc::EINVAL),
        };
        match rfs::seek(&open.file, pos) {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(errno(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(File::open("/dev/null").unwrap()))
    }

    #[test]
    fn the_descriptor_cache_is_bounded_and_gives_used_entries_a_second_chance() {
        let mut c = FdCache::new(3);
        for s in 1..=3 {
            assert!(c.put(s, fd()).is_none());
        }
        assert!(c.get(1).is_some());
        // full: 1 was used, so 2 goes
        assert!(c.put(4, fd()).is_some());
        assert_eq!(c.len(), 3);
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some() && c.get(3).is_some() && c.get(4).is_some());
        // the same key again replaces its descriptor
        let again = fd();
        assert!(c.put(4, again.clone()).is_some());
        assert!(Arc::ptr_eq(&c.get(4).unwrap(), &again));
        assert!(c.remove(1).is_some() && c.remove(1).is_none());
        assert!(c.get(3).is_some() && c.get(4).is_some());
        assert_eq!(c.shrink(1).len(), 1);
        assert_eq!(c.len(), 1);
        for s in 10..20 {
            let _ = c.put(s, fd());
            assert!(c.len() <= 3);
        }
        assert_eq!(FdCache::new(0).put(1, fd()).map(|_| ()), Some(()));
    }
}
