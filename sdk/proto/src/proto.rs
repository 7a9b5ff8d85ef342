//! The chunk-space part of the local API: requests, the seed's status codes on the wire, and
//! the typed results the clients return (see `docs/spaces.md`).
//!
//! On the wire a request is `{"op":"space","call":"<call>",...}` and its answer
//! `{"reply":"space","value":{"status":"<SEED_CODE>",...}}`; chunk data travels as the
//! frame's payload (write, stop_write from a local buffer, read, wait).

use serde::{Deserialize, Serialize};

/// Longest space name.
pub const MAX_SPACE_NAME: usize = 64;
/// Longest chunk name.
pub const MAX_CHUNK_NAME: usize = 255;
/// Largest page of a chunk list (entries): a full page stays well under the frame's header
/// limit whatever the names.
pub const CHUNK_PAGE: u32 = 1000;

/// One page of a chunk list: its entries and the `after` of the next page (`None`: the
/// last page).
pub type ChunkPage = (Vec<ChunkEntry>, Option<String>);

/// Check a space name: 1–64 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_space_name(name: &str) -> Result<(), Reason> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SPACE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Reason::new(
            ReasonKind::BadName,
            format!(
                "space name {:?} is not 1-{MAX_SPACE_NAME} bytes of [A-Za-z0-9._-] (not starting with '.')",
                truncate(name)
            ),
        ))
    }
}

/// Check a chunk name: 1–255 bytes of `[A-Za-z0-9._/-]`, no empty, `.` or `..` component.
pub fn check_chunk_name(name: &str) -> Result<(), Reason> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHUNK_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(Reason::new(
            ReasonKind::BadName,
            format!(
                "chunk name {:?} is not 1-{MAX_CHUNK_NAME} bytes of [A-Za-z0-9._/-] with no empty, '.' or '..' component",
                truncate(name)
            ),
        ))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Why an operation failed: a machine-readable kind and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Reason {
    /// What kind of failure.
    pub kind: ReasonKind,
    /// For people.
    pub message: String,
}

impl Reason {
    /// A reason.
    pub fn new(kind: ReasonKind, message: impl Into<String>) -> Reason {
        Reason {
            kind,
            message: message.into(),
        }
    }
}

/// Kinds of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReasonKind {
    /// No such space on this host (or the host left it).
    NoSpace,
    /// A space or chunk name that is not allowed.
    BadName,
    /// Larger than the space's slot size.
    TooLarge,
    /// Another client holds the chunk's lease.
    Busy,
    /// The cache has no free slot (volatile spaces never evict).
    CacheFull,
    /// The time limit passed.
    Timeout,
    /// The lease is not (or no longer) held by this connection.
    NoLease,
    /// The caller's uid/gid may not do this (space mode bits).
    Permission,
    /// Bad arguments (sizes, options).
    Invalid,
    /// The daemon's storage failed.
    Io,
    /// Data in the cache does not match its checksum and could not be restored.
    Corrupted,
    /// The host is not a member of the space.
    NoHost,
    /// A quota or host limit of the daemon (`[spaces]` settings) would be exceeded.
    Quota,
}

/// Which chunk list (seed: CHUNKLIST_ALL / _ALPHA / _LOCAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChunkList {
    /// An entry for every copy of every chunk.
    All,
    /// An entry for the alpha copy of every chunk.
    Alpha,
    /// An entry for every chunk with a local copy.
    Local,
}

/// One entry of a chunk list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Chunk name.
    pub chunk: String,
    /// Host holding this copy.
    pub host: String,
    /// Whether this copy is the alpha copy.
    pub alpha: bool,
    /// Published version.
    pub version: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether the copy is in the shared-memory cache now.
    pub cached: bool,
}

/// Options of a new space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpaceOptions {
    /// Volatile: chunks live in the shm cache only (no fsync; lost when the daemon stops).
    pub volatile: bool,
    /// Size of a cache slot = the largest chunk (bytes, multiple of 4096).
    pub slot_size: Option<u64>,
    /// Number of cache slots.
    pub slots: Option<u32>,
    /// Permission bits (like a file's: owner/group/other read and write).
    pub mode: Option<u32>,
}

/// A chunk-space request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum SpaceRequest {
    /// Create a space on this host (and join it).
    Create {
        /// Space.
        space: String,
        /// Options.
        #[serde(default)]
        options: SpaceOptions,
    },
    /// Join a space that exists on `host`.
    Join {
        /// Space.
        space: String,
        /// Host that has it.
        host: String,
    },
    /// Leave a space (its durable chunks stay on disk for a later join).
    Unjoin {
        /// Space.
        space: String,
    },
    /// The space's host list.
    Hosts {
        /// Space.
        space: String,
    },
    /// A chunk list, one page at a time (in chunk name order).
    Chunks {
        /// Space.
        space: String,
        /// Which one.
        list: ChunkList,
        /// Only chunks whose names sort after this one (the previous page's `next`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Most entries in this page (the daemon caps it; default and cap
        /// [`CHUNK_PAGE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Where the space's shared-memory chunk cache is.
    Cache {
        /// Space.
        space: String,
    },
    /// Start an allow-listed program on a host of the space, as the caller's uid.
    Spawn {
        /// Space.
        space: String,
        /// Host.
        host: String,
        /// Program (must be allow-listed in the daemon's config).
        program: String,
        /// Arguments.
        #[serde(default)]
        args: Vec<String>,
    },
    /// Read a chunk.
    Read {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
    },
    /// Wait until the chunk exists (and is newer than `after`).
    Wait {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// Only a version newer than this one.
        #[serde(default)]
        after: Option<u64>,
        /// Give up after this long.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Write a chunk (the payload) and publish it.
    Write {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
    },
    /// Take the chunk's lease and get a buffer in shared memory.
    StartWrite {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// Queue behind a lease someone else holds (instead of failing `busy`).
        #[serde(default)]
        wait: bool,
        /// How long to queue.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Fill the buffer with the last published contents.
        #[serde(default = "yes")]
        keep: bool,
    },
    /// Publish the lease's buffer (`len` bytes; or the payload, when not empty).
    StopWrite {
        /// Lease.
        lease: u64,
        /// Bytes of the buffer to publish.
        len: u64,
    },
    /// Give the lease back without publishing.
    AbortWrite {
        /// Lease.
        lease: u64,
    },
    /// Invalidate a chunk.
    Invalidate {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
    },
    /// Invalidate a chunk and hold its lease (buffer with its last contents).
    StartInvalidate {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// Queue behind a lease someone else holds.
        #[serde(default)]
        wait: bool,
        /// How long to queue.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Finish a start_invalidate.
    StopInvalidate {
        /// Lease.
        lease: u64,
    },
    /// The client found the shm cache corrupted: check and rebuild it.
    Repair {
        /// Space.
        space: String,
    },
}

fn yes() -> bool {
    true
}

/// The answer to a space request: the seed's status code and what comes with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status")]
#[allow(missing_docs)]
pub enum SpaceReply {
    #[serde(rename = "CREATE_OK")]
    CreateOk,
    #[serde(rename = "CREATE_EXISTS")]
    CreateExists,
    #[serde(rename = "JOINSPACE_OK")]
    JoinOk,
    #[serde(rename = "JOINSPACE_EXISTS")]
    JoinExists,
    #[serde(rename = "JOINSPACE_FAIL")]
    JoinFail { reason: Reason },
    #[serde(rename = "UNJOINSPACE_OK")]
    UnjoinOk,
    #[serde(rename = "UNJOINSPACE_NOEXIST")]
    UnjoinNoExist,
    #[serde(rename = "SPACEGETHOSTS_OK")]
    HostsOk { hosts: Vec<String> },
    #[serde(rename = "SPACEGETHOSTS_NOEXIST")]
    HostsNoExist,
    #[serde(rename = "GETCHUNKLIST_OK")]
    ChunksOk {
        entries: Vec<ChunkEntry>,
        /// More entries follow: ask again with `after` set to this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    #[serde(rename = "GETCHUNKLIST_FAIL")]
    ChunksFail { reason: Reason },
    /// The region's descriptor rides on the reply (SCM_RIGHTS, see `fdpass`); `region`
    /// is its memfd name, for people.
    #[serde(rename = "GETCHUNKCACHE_OK")]
    CacheOk { region: String, size: u64 },
    #[serde(rename = "GETCHUNKCACHE_FAIL")]
    CacheFail { reason: Reason },
    #[serde(rename = "SPAWNPROCESS_OK")]
    SpawnOk { pid: u32 },
    #[serde(rename = "SPAWNPROCESS_NOSPACE")]
    SpawnNoSpace,
    #[serde(rename = "SPAWNPROCESS_NOHOST")]
    SpawnNoHost,
    #[serde(rename = "SPAWNPROCESS_FAIL")]
    SpawnFail { errno: i32, reason: Reason },
    /// Chunk data in the payload.
    #[serde(rename = "READ_OK")]
    ReadOk { version: u64 },
    #[serde(rename = "READ_WAITING")]
    ReadWaiting,
    #[serde(rename = "READ_FAIL")]
    ReadFail { reason: Reason },
    /// Chunk data in the payload.
    #[serde(rename = "WAIT_OK")]
    WaitOk { version: u64 },
    #[serde(rename = "WAIT_FAIL")]
    WaitFail { reason: Reason },
    /// Writes: published as `version`. Invalidate: the chunk is still valid (it failed).
    #[serde(rename = "WRITE_OK")]
    WriteOk {
        version: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Reason>,
    },
    /// Writes: not written. Invalidate: the chunk is now invalid (done, or was already).
    #[serde(rename = "WRITE_FAIL")]
    WriteFail {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Reason>,
    },
    /// A lease and its buffer: `capacity` bytes of the connection's lease buffer number
    /// `buffer` (a memfd whose descriptor rides on the reply the first time the connection
    /// sees it); the first `len` bytes hold the last published contents when asked for.
    #[serde(rename = "STARTWRITE_OK")]
    StartWriteOk {
        lease: u64,
        version: u64,
        len: u64,
        buffer: u64,
        capacity: u64,
    },
    #[serde(rename = "STARTWRITE_FAIL")]
    StartWriteFail { reason: Reason },
    /// Repair done: what was found and fixed.
    #[serde(rename = "REPAIR_OK")]
    RepairOk { report: String },
}

impl SpaceReply {
    /// The seed's code (`DSS_…` without the prefix, as on the wire).
    pub fn code(&self) -> &'static str {
        use SpaceReply::*;
        match self {
            CreateOk => "CREATE_OK",
            CreateExists => "CREATE_EXISTS",
            JoinOk => "JOINSPACE_OK",
            JoinExists => "JOINSPACE_EXISTS",
            JoinFail { .. } => "JOINSPACE_FAIL",
            UnjoinOk => "UNJOINSPACE_OK",
            UnjoinNoExist => "UNJOINSPACE_NOEXIST",
            HostsOk { .. } => "SPACEGETHOSTS_OK",
            HostsNoExist => "SPACEGETHOSTS_NOEXIST",
            ChunksOk { .. } => "GETCHUNKLIST_OK",
            ChunksFail { .. } => "GETCHUNKLIST_FAIL",
            CacheOk { .. } => "GETCHUNKCACHE_OK",
            CacheFail { .. } => "GETCHUNKCACHE_FAIL",
            SpawnOk { .. } => "SPAWNPROCESS_OK",
            SpawnNoSpace => "SPAWNPROCESS_NOSPACE",
            SpawnNoHost => "SPAWNPROCESS_NOHOST",
            SpawnFail { .. } => "SPAWNPROCESS_FAIL",
            ReadOk { .. } => "READ_OK",
            ReadWaiting => "READ_WAITING",
            ReadFail { .. } => "READ_FAIL",
            WaitOk { .. } => "WAIT_OK",
            WaitFail { .. } => "WAIT_FAIL",
            WriteOk { .. } => "WRITE_OK",
            WriteFail { .. } => "WRITE_FAIL",
            StartWriteOk { .. } => "STARTWRITE_OK",
            StartWriteFail { .. } => "STARTWRITE_FAIL",
            RepairOk { .. } => "REPAIR_OK",
        }
    }
}

/// A chunk's contents at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Published version.
    pub version: u64,
    /// Contents.
    pub data: Vec<u8>,
    /// Served from the shared-memory cache without asking the daemon.
    pub from_cache: bool,
}

/// What a `read_into` found (the bytes are in the caller's buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadInto {
    /// READ_OK: the buffer holds the chunk.
    Ok {
        /// Version.
        version: u64,
        /// Served from the shared-memory cache.
        from_cache: bool,
    },
    /// READ_WAITING.
    Waiting,
    /// READ_FAIL.
    Fail(Reason),
}

impl ReadInto {
    /// The [`ReadStatus`] with the buffer's bytes.
    pub fn into_status(self, data: Vec<u8>) -> ReadStatus {
        match self {
            ReadInto::Ok {
                version,
                from_cache,
            } => ReadStatus::Ok(Chunk {
                version,
                data,
                from_cache,
            }),
            ReadInto::Waiting => ReadStatus::Waiting,
            ReadInto::Fail(r) => ReadStatus::Fail(r),
        }
    }
}

/// create: CREATE_OK / CREATE_EXISTS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateStatus {
    /// CREATE_OK.
    Ok,
    /// CREATE_EXISTS.
    Exists,
}

/// join: JOINSPACE_OK / _EXISTS / _FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinStatus {
    /// JOINSPACE_OK.
    Ok,
    /// JOINSPACE_EXISTS: this host is a member already.
    Exists,
    /// JOINSPACE_FAIL.
    Fail(Reason),
}

/// unjoin: UNJOINSPACE_OK / _NOEXIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnjoinStatus {
    /// UNJOINSPACE_OK.
    Ok,
    /// UNJOINSPACE_NOEXIST.
    NoExist,
}

/// space hosts: SPACEGETHOSTS_OK / _NOEXIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostsStatus {
    /// SPACEGETHOSTS_OK.
    Ok(Vec<String>),
    /// SPACEGETHOSTS_NOEXIST.
    NoExist,
}

/// chunk list: GETCHUNKLIST_OK / _FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkListStatus {
    /// GETCHUNKLIST_OK.
    Ok(Vec<ChunkEntry>),
    /// GETCHUNKLIST_FAIL.
    Fail(Reason),
}

/// chunk cache: GETCHUNKCACHE_OK / _FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// GETCHUNKCACHE_OK: the region (lent to the client, which maps it) and its size.
    Ok {
        /// The region's memfd name (for people; it is not a path).
        region: String,
        /// Bytes.
        size: u64,
    },
    /// GETCHUNKCACHE_FAIL.
    Fail(Reason),
}

/// spawn: SPAWNPROCESS_OK / _NOSPACE / _NOHOST / _FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnStatus {
    /// SPAWNPROCESS_OK with the pid.
    Ok(u32),
    /// SPAWNPROCESS_NOSPACE.
    NoSpace,
    /// SPAWNPROCESS_NOHOST.
    NoHost,
    /// SPAWNPROCESS_FAIL with the system error code.
    Fail {
        /// errno of the failed spawn.
        errno: i32,
        /// Why.
        reason: Reason,
    },
}

/// read: READ_OK / READ_WAITING / READ_FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadStatus {
    /// READ_OK.
    Ok(Chunk),
    /// READ_WAITING: the chunk does not exist (or is invalid) in the space.
    Waiting,
    /// READ_FAIL.
    Fail(Reason),
}

/// wait: WAIT_OK / WAIT_FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitStatus {
    /// WAIT_OK.
    Ok(Chunk),
    /// WAIT_FAIL (no space, timeout, ...).
    Fail(Reason),
}

/// write and stop_write: WRITE_OK (the version published) / WRITE_FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteStatus {
    /// WRITE_OK.
    Ok(u64),
    /// WRITE_FAIL.
    Fail(Reason),
}

/// invalidate and stop_invalidate, with the seed's inverted codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidateStatus {
    /// Seed code WRITE_FAIL: the chunk is now invalid (this call did it, or it already was).
    Invalidated,
    /// Seed code WRITE_OK: the chunk is still valid at this version, so the call failed.
    StillValid {
        /// Version still published.
        version: u64,
        /// Why.
        reason: Reason,
    },
}

impl InvalidateStatus {
    /// The seed's code.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidateStatus::Invalidated => "WRITE_FAIL",
            InvalidateStatus::StillValid { .. } => "WRITE_OK",
        }
    }
}

/// The message of a client's protocol error: a reply that does not answer the request.
pub fn unexpected(reply: &SpaceReply) -> String {
    format!("unexpected answer {} to this request", reply.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "space-1", "A.b_c", &"x".repeat(64)] {
            assert!(check_space_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65), "é"] {
            assert_eq!(check_space_name(bad).unwrap_err().kind, ReasonKind::BadName);
        }
        for ok in ["c", "dir/c.1", "a-b_c/d", &"y".repeat(255)] {
            assert!(check_chunk_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "./a",
            "a/..",
            "a b",
            &"y".repeat(256),
            "a\0",
        ] {
            assert_eq!(check_chunk_name(bad).unwrap_err().kind, ReasonKind::BadName);
        }
    }

    #[test]
    fn wire_names_are_the_seed_codes() {
        let r = SpaceReply::WriteFail { reason: None };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"status":"WRITE_FAIL"}"#);
        let r = SpaceReply::SpawnFail {
            errno: 13,
            reason: Reason::new(ReasonKind::Permission, "x"),
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["status"], "SPAWNPROCESS_FAIL");
        assert_eq!(j["reason"]["kind"], "permission");
        let back: SpaceReply = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
        let req: SpaceRequest =
            serde_json::from_str(r#"{"call":"start-write","space":"s","chunk":"c"}"#).unwrap();
        assert!(matches!(
            req,
            SpaceRequest::StartWrite {
                keep: true,
                wait: false,
                ..
            }
        ));
    }
}
