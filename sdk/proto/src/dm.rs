//! Data management (XDSM / DMAPI) types shared by the daemon and DM applications: the GPFS
//! error codes, event types and sets, rights, responses, event messages (see
//! `docs/dmapi.md`).

use serde::{Deserialize, Serialize};

/// A session id (0 is DM_NO_SESSION).
pub type SessionId = u64;
/// A token (0 is DM_INVALID_TOKEN).
pub type Token = u64;
/// A filesystem (mount) id.
pub type FsId = u32;

/// DM_NO_SESSION.
pub const NO_SESSION: SessionId = 0;
/// DM_INVALID_TOKEN (asynchronous messages carry it).
pub const INVALID_TOKEN: Token = 0;
/// DM_SESSION_INFO_LEN.
pub const SESSION_INFO_LEN: usize = 256;

/// DMAPI errors: the GPFS codes of seed 001 and the XDSM ones they refine (the WIT
/// `dm-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "lowercase")]
pub enum DmError {
    /// Not implemented.
    #[error("ENOSYS: function not implemented")]
    Enosys,
    /// The daemon is not running or is initializing.
    #[error("ENOTREADY: the daemon is initializing")]
    Enotready,
    /// Resources could not be acquired.
    #[error("ENOMEM: resources could not be acquired")]
    Enomem,
    /// Fits no other code.
    #[error("ESTALE: error that fits no other code")]
    Estale,
    /// Malformed handle or token, bad argument.
    #[error("EINVAL: invalid argument, handle or token")]
    Einval,
    /// The object does not exist or is inaccessible.
    #[error("EBADF: no such object")]
    Ebadf,
    /// DMAPI disabled for the filesystem, or no privilege.
    #[error("EPERM: not permitted")]
    Eperm,
    /// The event referenced by the token is not outstanding.
    #[error("ESRCH: the event is not outstanding")]
    Esrch,
    /// Invalid address.
    #[error("EFAULT: invalid address")]
    Efault,
    /// Busy (punch_hole on a mapped file, session with outstanding events).
    #[error("EBUSY: busy")]
    Ebusy,
    /// Read-only filesystem.
    #[error("EROFS: read-only filesystem")]
    Erofs,
    /// The right held does not allow it.
    #[error("EACCES: right not held")]
    Eacces,
    /// No such attribute.
    #[error("ENOENT: no such attribute")]
    Enoent,
    /// Over a configured limit.
    #[error("E2BIG: over the limit")]
    E2big,
    /// Would block.
    #[error("EAGAIN: would block")]
    Eagain,
    /// Exists already.
    #[error("EEXIST: exists")]
    Eexist,
    /// I/O error.
    #[error("EIO: i/o error")]
    Eio,
    /// No space.
    #[error("ENOSPC: no space")]
    Enospc,
}

impl DmError {
    /// The errno.
    pub fn errno(self) -> i32 {
        use DmError::*;
        match self {
            Enosys => libc::ENOSYS,
            // Linux has no ENOTREADY: Strata reports it as ENOTCONN (documented)
            Enotready => libc::ENOTCONN,
            Enomem => libc::ENOMEM,
            Estale => libc::ESTALE,
            Einval => libc::EINVAL,
            Ebadf => libc::EBADF,
            Eperm => libc::EPERM,
            Esrch => libc::ESRCH,
            Efault => libc::EFAULT,
            Ebusy => libc::EBUSY,
            Erofs => libc::EROFS,
            Eacces => libc::EACCES,
            Enoent => libc::ENOENT,
            E2big => libc::E2BIG,
            Eagain => libc::EAGAIN,
            Eexist => libc::EEXIST,
            Eio => libc::EIO,
            Enospc => libc::ENOSPC,
        }
    }
}

macro_rules! event_types {
    ($($name:ident),* $(,)?) => {
        /// dm_eventtype_t (the WIT `event-type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        #[allow(missing_docs)]
        pub enum EventType {
            $($name),*
        }

        impl EventType {
            /// Every event type, in the XDSM order.
            pub const ALL: &'static [EventType] = &[$(EventType::$name),*];
        }
    };
}

event_types!(
    Close,
    Mount,
    Preunmount,
    Unmount,
    Nospace,
    Debut,
    Create,
    Postcreate,
    Remove,
    Postremove,
    Rename,
    Postrename,
    Symlink,
    Postsymlink,
    Link,
    Postlink,
    Read,
    Write,
    Truncate,
    Attribute,
    Cancel,
    Destroy,
    User,
);

impl EventType {
    /// Its name, as on the wire.
    pub fn name(self) -> &'static str {
        use EventType::*;
        match self {
            Close => "close",
            Mount => "mount",
            Preunmount => "preunmount",
            Unmount => "unmount",
            Nospace => "nospace",
            Debut => "debut",
            Create => "create",
            Postcreate => "postcreate",
            Remove => "remove",
            Postremove => "postremove",
            Rename => "rename",
            Postrename => "postrename",
            Symlink => "symlink",
            Postsymlink => "postsymlink",
            Link => "link",
            Postlink => "postlink",
            Read => "read",
            Write => "write",
            Truncate => "truncate",
            Attribute => "attribute",
            Cancel => "cancel",
            Destroy => "destroy",
            User => "user",
        }
    }

    /// Whether the operation waits for the DM application's answer (XDSM synchronous
    /// events; `user` events are synchronous when sent so).
    pub fn is_sync(self) -> bool {
        use EventType::*;
        matches!(
            self,
            Mount
                | Preunmount
                | Nospace
                | Create
                | Remove
                | Rename
                | Symlink
                | Link
                | Read
                | Write
                | Truncate
        )
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// dm_eventset_t: a set of event types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EventSet(u32);

impl EventSet {
    /// DMEV_ZERO.
    pub fn empty() -> EventSet {
        EventSet(0)
    }
    /// A set of these types.
    pub fn of(types: &[EventType]) -> EventSet {
        let mut s = EventSet(0);
        for t in types {
            s.set(*t);
        }
        s
    }
    /// DMEV_SET.
    pub fn set(&mut self, t: EventType) {
        self.0 |= t.bit();
    }
    /// DMEV_CLR.
    pub fn clear(&mut self, t: EventType) {
        self.0 &= !t.bit();
    }
    /// DMEV_ISSET.
    pub fn contains(&self, t: EventType) -> bool {
        self.0 & t.bit() != 0
    }
    /// Whether no type is in the set.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    /// The types in the set.
    pub fn types(&self) -> Vec<EventType> {
        EventType::ALL
            .iter()
            .copied()
            .filter(|t| self.contains(*t))
            .collect()
    }
}

/// dm_right_t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// DM_RIGHT_NULL.
    Null,
    /// DM_RIGHT_SHARED.
    Shared,
    /// DM_RIGHT_EXCL.
    Excl,
}

/// dm_response_t with the abort errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// DM_RESP_CONTINUE.
    Continue,
    /// DM_RESP_ABORT: the operation fails with this errno.
    Abort(i32),
    /// DM_RESP_DONTCARE (the operation continues).
    Dontcare,
}

/// What an event carries (the XDSM `dm_*_event_t` bodies; handles are opaque bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventData {
    /// dm_data_event_t.
    Data {
        /// Object.
        handle: Vec<u8>,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// dm_namesp_event_t.
    Namespace {
        /// Mode.
        mode: u32,
        /// Parent (or object).
        handle1: Vec<u8>,
        /// Second object (rename target directory, link target).
        handle2: Vec<u8>,
        /// Name.
        name1: String,
        /// Second name.
        name2: String,
        /// Return code (post events).
        retcode: i32,
    },
    /// dm_mount_event_t.
    Mount {
        /// Mode of the mount point.
        mode: u32,
        /// Filesystem handle.
        fs_handle: Vec<u8>,
        /// Mount point path.
        mount_point: String,
        /// Backing directory.
        backing: String,
        /// Root object's handle.
        root_handle: Vec<u8>,
    },
    /// dm_destroy_event_t.
    Destroy {
        /// Object.
        handle: Vec<u8>,
        /// Attribute copied.
        attr_name: [u8; 8],
        /// Its value.
        attr_copy: Vec<u8>,
    },
    /// dm_cancel_event_t.
    Cancel {
        /// Sequence of the cancelled event.
        sequence: u64,
        /// Its token.
        token: Token,
    },
    /// A user message.
    User {
        /// The message.
        data: Vec<u8>,
    },
}

/// dm_eventmsg_t.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Event type.
    pub kind: EventType,
    /// Token (INVALID_TOKEN for asynchronous events).
    pub token: Token,
    /// Sequence, unique in the session's stream.
    pub sequence: u64,
    /// Filesystem.
    pub fs: FsId,
    /// Body.
    pub data: EventData,
}

/// A DM request on the wire: `{"op":"dm","call":...}` (root or the daemon's user only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum DmRequest {
    /// dm_create_session (`old` != 0: assume that session).
    CreateSession {
        /// Session to assume, or NO_SESSION.
        #[serde(default)]
        old: SessionId,
        /// Session info (at most SESSION_INFO_LEN bytes).
        info: Vec<u8>,
    },
    /// dm_destroy_session.
    DestroySession {
        /// Session.
        sid: SessionId,
    },
    /// dm_query_session.
    QuerySession {
        /// Session.
        sid: SessionId,
    },
    /// dm_getall_sessions.
    Sessions {
        /// The caller's array size (over MAX_NELEM: EINVAL; too small: E2BIG).
        #[serde(default)]
        nelem: Option<u32>,
    },
    /// dm_getall_tokens.
    Tokens {
        /// Session.
        sid: SessionId,
        /// The caller's array size (over MAX_NELEM: EINVAL; too small: E2BIG).
        #[serde(default)]
        nelem: Option<u32>,
    },
    /// dm_get_events (`wait`: DM_EV_WAIT).
    GetEvents {
        /// Session.
        sid: SessionId,
        /// At most this many messages.
        max: u32,
        /// Block until one arrives.
        #[serde(default)]
        wait: bool,
    },
    /// dm_find_eventmsg.
    FindEvent {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
    },
    /// dm_respond_event.
    Respond {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Answer.
        response: Response,
    },
    /// dm_pending.
    Pending {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// More time, in milliseconds.
        delay_ms: u64,
    },
    /// dm_move_event.
    MoveEvent {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Target session.
        target: SessionId,
    },
    /// dm_send_msg: the payload is the message; a synchronous one is answered when the
    /// receiving session responds.
    SendMsg {
        /// Target session.
        sid: SessionId,
        /// DM_MSG_SYNC.
        #[serde(default)]
        sync: bool,
    },
    /// dm_request_right (`wait`: DM_RR_WAIT) on an object (its handle).
    RequestRight {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Object handle.
        object: Vec<u8>,
        /// Right wanted.
        right: Right,
        /// Queue instead of EAGAIN.
        #[serde(default)]
        wait: bool,
    },
    /// dm_release_right.
    ReleaseRight {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Object handle.
        object: Vec<u8>,
    },
    /// dm_upgrade_right.
    UpgradeRight {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Object handle.
        object: Vec<u8>,
    },
    /// dm_downgrade_right.
    DowngradeRight {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Object handle.
        object: Vec<u8>,
    },
    /// dm_query_right.
    QueryRight {
        /// Session.
        sid: SessionId,
        /// Token.
        token: Token,
        /// Object handle.
        object: Vec<u8>,
    },
    /// dm_init_service: the version string.
    InitService,
    /// dm_set_disp: the event types of `events` on the filesystem (`fs_handle`; empty: the
    /// global handle, for mount events) go to the session.
    SetDisp {
        /// Session.
        sid: SessionId,
        /// Filesystem handle, or empty for DM_GLOBAL_HANP.
        #[serde(default)]
        fs_handle: Vec<u8>,
        /// Event types.
        events: EventSet,
    },
    /// dm_getall_disp.
    GetallDisp {
        /// Session.
        sid: SessionId,
        /// Caller's buffer size (>= INT_MAX: EINVAL; too small: E2BIG).
        #[serde(default)]
        buflen: Option<u64>,
    },
    /// dm_set_return_on_destroy: DESTROY events of the filesystem carry this attribute
    /// (`None`: none).
    SetReturnOnDestroy {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Filesystem handle.
        fs_handle: Vec<u8>,
        /// Attribute name (8 bytes) or none.
        name: Option<Vec<u8>>,
    },
    /// dm_get_mountinfo: the mount event of a mounted filesystem.
    GetMountinfo {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Filesystem handle.
        fs_handle: Vec<u8>,
        /// Caller's buffer size.
        #[serde(default)]
        buflen: Option<u64>,
    },
    /// dm_path_to_handle: `path` names an object in a managed filesystem (through its mount).
    PathToHandle {
        /// Path (absolute).
        path: String,
    },
    /// dm_path_to_fshandle.
    PathToFsHandle {
        /// Path (absolute).
        path: String,
    },
    /// dm_handle_to_fshandle.
    HandleToFsHandle {
        /// Object handle.
        handle: Vec<u8>,
    },
    /// dm_handle_to_path: the object's path through the mount.
    HandleToPath {
        /// Object handle.
        handle: Vec<u8>,
        /// Caller's buffer size.
        #[serde(default)]
        buflen: Option<u64>,
    },
    /// dm_get_fileattr.
    GetFileattr {
        /// Session.
        sid: SessionId,
        /// Token (DM_NO_TOKEN: 0).
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
    },
    /// dm_set_fileattr: the fields given are set.
    SetFileattr {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// What to set.
        attr: SetAttr,
    },
    /// dm_get_dirattrs: entries of a directory from `cursor` (0: the start).
    GetDirattrs {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Directory handle.
        handle: Vec<u8>,
        /// Where to go on (from the previous reply).
        #[serde(default)]
        cursor: u64,
        /// At most this many entries.
        max: u32,
        /// Caller's buffer size.
        #[serde(default)]
        buflen: Option<u64>,
    },
    /// dm_get_bulkattr: every object of the filesystem, from `cursor`.
    GetBulkattr {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Filesystem handle.
        fs_handle: Vec<u8>,
        /// Where to go on.
        #[serde(default)]
        cursor: u64,
        /// At most this many objects.
        max: u32,
        /// Caller's buffer size.
        #[serde(default)]
        buflen: Option<u64>,
    },
    /// dm_get_dmattr.
    GetDmattr {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Name (8 bytes).
        name: Vec<u8>,
    },
    /// dm_set_dmattr: the payload is the value.
    SetDmattr {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Name (8 bytes).
        name: Vec<u8>,
    },
    /// dm_remove_dmattr.
    RemoveDmattr {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Name (8 bytes).
        name: Vec<u8>,
    },
    /// dm_getall_dmattr.
    GetallDmattr {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Caller's buffer size.
        #[serde(default)]
        buflen: Option<u64>,
    },
    /// dm_set_region.
    SetRegion {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// The regions (replacing the object's).
        regions: Vec<Region>,
    },
    /// dm_get_region.
    GetRegion {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
    },
    /// dm_set_eventlist on an object or (fs handle) a filesystem.
    SetEventlist {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object or filesystem handle.
        handle: Vec<u8>,
        /// Events.
        events: EventSet,
    },
    /// dm_get_eventlist.
    GetEventlist {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object or filesystem handle.
        handle: Vec<u8>,
    },
    /// dm_get_allocinfo: extents from `offset`.
    GetAllocinfo {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Start (negative: EINVAL).
        offset: i64,
        /// At most this many extents (too large: EINVAL).
        nelem: u32,
    },
    /// dm_probe_hole.
    ProbeHole {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Start (negative: EINVAL).
        offset: i64,
        /// Length (0: to EOF; overflowing an offset: EINVAL).
        length: u64,
    },
    /// dm_punch_hole.
    PunchHole {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Start (negative: EINVAL).
        offset: i64,
        /// Length (0: to EOF; overflowing an offset: EINVAL).
        length: u64,
    },
    /// dm_read_invis: the data comes back as the reply's payload.
    ReadInvis {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Start (negative: EINVAL).
        offset: i64,
        /// Length (over MAX_INVIS_IO or overflowing: EINVAL).
        length: u64,
    },
    /// dm_write_invis: the payload is the data; `length` must equal its size (else EFAULT:
    /// the buffer does not hold what the call says).
    WriteInvis {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
        /// Start (negative: EINVAL).
        offset: i64,
        /// DM_WRITE_SYNC (1) or 0; other bits: EINVAL.
        #[serde(default)]
        flags: u32,
        /// Length of the data.
        length: u64,
    },
    /// dm_sync_by_handle.
    SyncByHandle {
        /// Session.
        sid: SessionId,
        /// Token.
        #[serde(default)]
        token: Token,
        /// Object handle.
        handle: Vec<u8>,
    },
    /// dm_get_config.
    GetConfig {
        /// Object or filesystem handle.
        handle: Vec<u8>,
        /// DM_CONFIG_* name, e.g. "max_attribute_size".
        flag: String,
    },
    /// A call this daemon does not know: ENOSYS.
    #[serde(other)]
    Unknown,
}

/// DM_WRITE_SYNC.
pub const WRITE_SYNC: u32 = 1;
/// Largest read_invis / write_invis (the uio_resid limit).
pub const MAX_INVIS_IO: u64 = i32::MAX as u64;
/// Largest `nelem` / `max` a listing call accepts.
pub const MAX_NELEM: u32 = 1 << 20;

/// dm_region_t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Start.
    pub offset: u64,
    /// Length; 0 is from `offset` through EOF and beyond.
    pub size: u64,
    /// DM_REGION_READ (1) | WRITE (2) | TRUNCATE (4); 0 is DM_REGION_NOEVENT.
    pub flags: u8,
}

/// dm_stat_t (the fields Strata fills).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    /// st_dev of the managed filesystem (its fsid).
    pub dev: u64,
    /// st_ino (the backing inode number).
    pub ino: u64,
    /// st_mode.
    pub mode: u32,
    /// st_nlink.
    pub nlink: u64,
    /// st_uid.
    pub uid: u32,
    /// st_gid.
    pub gid: u32,
    /// st_rdev.
    pub rdev: u64,
    /// st_size.
    pub size: u64,
    /// st_blksize.
    pub blksize: u64,
    /// st_blocks.
    pub blocks: u64,
    /// atime (s, ns).
    pub atime: (i64, u32),
    /// mtime (s, ns).
    pub mtime: (i64, u32),
    /// ctime (s, ns); also dt_dtime (DM_CONFIG_DTIME_OVERLOAD).
    pub ctime: (i64, u32),
    /// dt_change.
    pub change: u64,
    /// dt_emask: the object's event list.
    pub events: EventSet,
    /// The object has DM attributes.
    pub has_dmattrs: bool,
    /// dt_pmanreg: it has managed regions.
    pub has_regions: bool,
}

/// dm_fileattr_t with the DM_AT_* mask as options: the fields given are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    /// DM_AT_MODE.
    #[serde(default)]
    pub mode: Option<u32>,
    /// DM_AT_UID.
    #[serde(default)]
    pub uid: Option<u32>,
    /// DM_AT_GID.
    #[serde(default)]
    pub gid: Option<u32>,
    /// DM_AT_ATIME (s, ns).
    #[serde(default)]
    pub atime: Option<(i64, u32)>,
    /// DM_AT_MTIME (s, ns).
    #[serde(default)]
    pub mtime: Option<(i64, u32)>,
    /// DM_AT_SIZE (truncate or extend, no events).
    #[serde(default)]
    pub size: Option<u64>,
}

/// dm_extent_t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// DM_EXTENT_RES (true) or DM_EXTENT_HOLE.
    pub resident: bool,
    /// Start.
    pub offset: u64,
    /// Length.
    pub length: u64,
}

/// One object of a directory or bulk listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Name (directory listings; empty in bulk listings).
    pub name: String,
    /// Handle.
    pub handle: Vec<u8>,
    /// Attributes.
    pub stat: Stat,
}

/// A DM attribute (dm_getall_dmattr).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmAttr {
    /// Name (8 bytes).
    pub name: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
}

impl DmRequest {
    /// Whether the call works on objects of managed filesystems (the filesystem layer
    /// serves it) rather than on sessions and events.
    pub fn is_object_call(&self) -> bool {
        use DmRequest::*;
        !matches!(
            self,
            CreateSession { .. }
                | DestroySession { .. }
                | QuerySession { .. }
                | Sessions { .. }
                | Tokens { .. }
                | GetEvents { .. }
                | FindEvent { .. }
                | Respond { .. }
                | Pending { .. }
                | MoveEvent { .. }
                | SendMsg { .. }
                | RequestRight { .. }
                | ReleaseRight { .. }
                | UpgradeRight { .. }
                | DowngradeRight { .. }
                | QueryRight { .. }
                | InitService
                | SetDisp { .. }
                | GetallDisp { .. }
                | Unknown
        )
    }
}

/// A DM answer on the wire: `{"reply":"dm","value":{"result":...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum DmReply {
    /// Done.
    Ok,
    /// A session id.
    Session {
        /// Session.
        sid: SessionId,
    },
    /// Session info.
    Info {
        /// Bytes.
        info: Vec<u8>,
    },
    /// Session ids.
    Sessions {
        /// Ids.
        sids: Vec<SessionId>,
    },
    /// Tokens.
    Tokens {
        /// Tokens.
        tokens: Vec<Token>,
    },
    /// Event messages.
    Events {
        /// Messages.
        messages: Vec<Message>,
    },
    /// A right.
    Right {
        /// Right.
        right: Right,
    },
    /// What a synchronous send_msg was answered.
    Answered {
        /// The receiving session's response.
        response: Response,
    },
    /// dm_init_service's version string.
    Version {
        /// Version.
        version: String,
    },
    /// Dispositions: (filesystem, event set) pairs.
    Dispositions {
        /// Pairs.
        disp: Vec<(FsId, EventSet)>,
    },
    /// A handle.
    Handle {
        /// Bytes.
        handle: Vec<u8>,
    },
    /// A path.
    Path {
        /// Path.
        path: String,
    },
    /// An object's attributes.
    Stat {
        /// Attributes.
        stat: Stat,
    },
    /// A listing and where to go on (`None`: the end).
    Entries {
        /// Entries.
        entries: Vec<Entry>,
        /// Cursor for the next call.
        cursor: Option<u64>,
    },
    /// A DM attribute value (the reply's payload).
    Value,
    /// DM attributes.
    Attrs {
        /// Attributes.
        attrs: Vec<DmAttr>,
    },
    /// Managed regions.
    Regions {
        /// Regions.
        regions: Vec<Region>,
    },
    /// dm_set_region's exactflag.
    Exact {
        /// Whether the regions are kept exactly as given.
        exact: bool,
    },
    /// An event list.
    EventList {
        /// Events.
        events: EventSet,
    },
    /// Extents from the offset asked and whether more follow.
    Extents {
        /// Extents.
        extents: Vec<Extent>,
        /// More follow (call again from the end of the last).
        more: bool,
    },
    /// A byte range (probe_hole).
    Range {
        /// Start.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// Data read (the reply's payload).
    Data,
    /// Bytes written.
    Written {
        /// Count.
        count: u64,
    },
    /// A configuration value.
    Config {
        /// Value.
        value: u64,
    },
    /// The mount event of a filesystem.
    Mountinfo {
        /// The message.
        message: Message,
    },
    /// The call failed with this DMAPI error.
    Error {
        /// Error.
        error: DmError,
    },
}
