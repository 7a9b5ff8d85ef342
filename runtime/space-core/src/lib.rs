//! The chunk-space state machine, free of I/O: callers, requests and time go in; decisions,
//! replies and effects on the shared-memory index come out. The daemon's shell
//! (`strata_runtime::space::Spaces`) does the copying, the storing and the socket work, and applies the
//! [`Effect`]s in order while it holds the core. The multi-host layer (issue 5) drives the
//! same core.
//!
//! What the core owns: spaces and their membership, every chunk's published version and
//! validity, which cache slot holds which chunk (and which slots lease holders write in),
//! the open-addressing index the clients probe, LRU eviction, leases with their FIFO queues
//! and timeouts, and the parked waits.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use strata_proto::proto::{
    check_chunk_name, check_space_name, ChunkEntry, ChunkList, Reason, ReasonKind, CHUNK_PAGE,
};
use strata_shm::{name_hash, EntryValue, Geometry};

/// Check a host id (config and requests): 1-255 bytes, printable, no whitespace or control
/// characters, so that it can be logged and listed as is.
pub fn check_host_id(host: &str) -> Result<(), Reason> {
    if !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|ch| !ch.is_control() && !ch.is_whitespace())
    {
        Ok(())
    } else {
        Err(reason(
            ReasonKind::BadName,
            format!(
                "host id {} is not 1-255 bytes of printable characters without spaces",
                escape(&host.chars().take(80).collect::<String>())
            ),
        ))
    }
}

/// A string from a client, safe to log: quoted, with control characters escaped.
pub fn escape(s: &str) -> String {
    format!("{s:?}")
}

/// A connection (leases and waits belong to it).
pub type ClientId = u64;
/// A parked wait or queued lease request.
pub type WaiterId = u64;
/// A lease.
pub type LeaseId = u64;

/// Who asks: the connection and its peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Connection.
    pub client: ClientId,
    /// Peer uid.
    pub uid: u32,
    /// Peer gid.
    pub gid: u32,
}

/// What is remembered of a space (persisted by the shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceMeta {
    /// Name.
    pub name: String,
    /// Chunks only in shared memory.
    pub volatile: bool,
    /// Slot size (largest chunk).
    pub slot_size: u64,
    /// Slots in the cache.
    pub slots: u32,
    /// Permission bits (owner/group/other; read 4, write 2).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Member hosts.
    pub hosts: Vec<String>,
    /// Whether this host is a member now (unjoined spaces keep their durable chunks).
    pub joined: bool,
    /// Bumped each time the cache region is created.
    pub generation: u64,
    /// Versions up to this one may have been handed out (volatile spaces: a new chunk's
    /// first version is above it after a restart, so versions are never reused). Reserved
    /// in blocks of [`VERSION_BLOCK`] and recorded before a version above it is published.
    #[serde(default)]
    pub versions_reserved: u64,
}

/// Versions a volatile space reserves at a time (one record per this many new versions).
pub const VERSION_BLOCK: u64 = 1 << 16;

impl SpaceMeta {
    /// The cache geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.slot_size, self.slots)
    }
}

/// A chunk's published state (persisted for durable spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Last published version (kept across invalidation, so versions never repeat).
    pub version: u64,
    /// Whether it may be read.
    pub valid: bool,
    /// Bytes.
    pub len: u64,
    /// crc32c of the bytes.
    pub crc: u32,
}

/// Limits and defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    /// This host's id.
    pub host: String,
    /// A lease not stopped within this long is reclaimed.
    pub lease_timeout_ms: u64,
    /// Default slot size of a new space.
    pub default_slot_size: u64,
    /// Default slot count.
    pub default_slots: u32,
    /// Largest slot size a space may ask for.
    pub max_slot_size: u64,
    /// Largest cache region of one space.
    pub max_cache_bytes: u64,
    /// Quotas per uid and limits of the host.
    pub quotas: Quotas,
}

/// Per-uid quotas (charged to a space's owner) and limits of the whole host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    /// Spaces (joined or not) one uid may own.
    pub spaces_per_uid: u64,
    /// Bytes of shared memory of one uid: the cache regions of the joined spaces it owns
    /// and the lease buffers its connections hold.
    pub shm_bytes_per_uid: u64,
    /// Bytes of valid durable chunks in the spaces one uid owns.
    pub durable_bytes_per_uid: u64,
    /// Chunk records (valid or invalid) in the spaces one uid owns.
    pub chunks_per_uid: u64,
    /// Spaces on this host, all owners together.
    pub max_spaces: u64,
    /// Bytes of cache regions and lease buffers on this host, all owners together.
    pub max_shm_bytes: u64,
    /// Owners free of the per-uid quotas (root and the daemon's own uid); the host limits
    /// hold for everyone.
    pub exempt: Vec<u32>,
}

impl Quotas {
    /// No quota at all.
    pub fn unlimited() -> Quotas {
        Quotas {
            spaces_per_uid: u64::MAX,
            shm_bytes_per_uid: u64::MAX,
            durable_bytes_per_uid: u64::MAX,
            chunks_per_uid: u64::MAX,
            max_spaces: u64::MAX,
            max_shm_bytes: u64::MAX,
            exempt: vec![],
        }
    }
}

/// What one owner (or the host) uses, as charged against [`Quotas`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Spaces.
    pub spaces: u64,
    /// Bytes of regions of joined spaces.
    pub shm_bytes: u64,
    /// Bytes of valid durable chunks.
    pub durable_bytes: u64,
    /// Bytes of durable writes being committed (reserved until they finish).
    pub pending_bytes: u64,
    /// Chunk records.
    pub chunks: u64,
}

fn add(x: &mut u64, d: i128) {
    *x = (*x as i128 + d).clamp(0, u64::MAX as i128) as u64;
}

impl Usage {
    fn change(&mut self, spaces: i128, shm: i128, durable: i128, chunks: i128) {
        add(&mut self.spaces, spaces);
        add(&mut self.shm_bytes, shm);
        add(&mut self.durable_bytes, durable);
        add(&mut self.chunks, chunks);
    }
}

/// Bytes a chunk state charges to its space's owner.
fn stored_bytes(m: &ChunkMeta, volatile: bool) -> u64 {
    if m.valid && !volatile {
        m.len
    } else {
        0
    }
}

fn over_quota(
    what: &str,
    uid: Option<u32>,
    used: u64,
    more: u64,
    limit: u64,
    setting: &str,
) -> Reason {
    let who = match uid {
        Some(u) => format!("uid {u}"),
        None => "this host".to_string(),
    };
    reason(
        ReasonKind::Quota,
        format!(
            "{what} quota exceeded: {who} uses {used} and this needs {more} more, over the limit of {limit} (spaces.{setting})"
        ),
    )
}

/// A change the shell applies to a space's region (in order, before it lets go of the core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Create (or re-create) the space's region: empty index.
    CreateRegion(SpaceMeta),
    /// Retire and remove the region.
    RemoveRegion(String),
    /// Point an index entry at a chunk.
    SetEntry {
        /// Space.
        space: String,
        /// Entry.
        entry: u32,
        /// Contents.
        value: EntryValue,
    },
    /// Empty an entry (`tombstone`: removed, probing goes on past it).
    ClearEntry {
        /// Space.
        space: String,
        /// Entry.
        entry: u32,
        /// Removed rather than empty.
        tombstone: bool,
    },
    /// Record the space.
    StoreSpace(SpaceMeta),
    /// Record a durable chunk's new state (invalidation).
    StoreChunk {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// State.
        meta: ChunkMeta,
    },
    /// A parked request is answered.
    Wake {
        /// Which.
        waiter: WaiterId,
        /// How.
        outcome: Wake,
    },
}

/// How a parked request ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A wait: the chunk at this version is in `slot` of `space`.
    Chunk {
        /// Space.
        space: String,
        /// Version.
        version: u64,
        /// Slot.
        slot: u32,
        /// Bytes.
        len: u64,
    },
    /// A queued lease request got the lease.
    Granted(Grant),
    /// Failed (timeout, space gone, ...).
    Fail(Reason),
}

/// What fills a new lease's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Nothing (start empty).
    Nothing,
    /// Copy `len` bytes from this slot (the published copy).
    Slot(u32, u64),
    /// Load the durable copy (`len` bytes) from the store.
    Disk(u64),
    /// The buffer already is the published copy (start_invalidate takes the slot over).
    InPlace,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Lease.
    pub lease: LeaseId,
    /// Space.
    pub space: String,
    /// Chunk.
    pub chunk: String,
    /// Published version when granted (0: none).
    pub version: u64,
    /// Bytes of published contents the buffer starts with.
    pub len: u64,
    /// The buffer's slot.
    pub slot: u32,
    /// How to fill it.
    pub fill: Fill,
}

/// Write or invalidate lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// start_write (or a plain write, which takes a lease internally).
    Write {
        /// Start with the published contents.
        keep: bool,
    },
    /// start_invalidate.
    Invalidate,
}

/// Outcome of asking for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// Granted now.
    Granted(Grant),
    /// Queued behind the holder: a `Wake` for this waiter comes later.
    Queued(WaiterId),
    /// STARTWRITE_FAIL.
    Fail(Reason),
}

/// Where a read finds its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPlan {
    /// In the cache.
    Resident {
        /// Version.
        version: u64,
        /// Slot.
        slot: u32,
        /// Bytes.
        len: u64,
    },
    /// Only in the durable store: load it (then [`Core::fill`] caches it).
    Disk {
        /// Version.
        version: u64,
        /// Bytes.
        len: u64,
        /// crc32c.
        crc: u32,
    },
}

/// Outcome of a wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Answer now.
    Now(ReadPlan),
    /// Parked.
    Parked(WaiterId),
    /// WAIT_FAIL.
    Fail(Reason),
}

/// A lease being published: copy/persist, then [`Core::finish_stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopPlan {
    /// Lease.
    pub lease: LeaseId,
    /// Space.
    pub space: String,
    /// Chunk.
    pub chunk: String,
    /// The buffer's slot.
    pub slot: u32,
    /// Version it will be published as.
    pub version: u64,
    /// Bytes to publish.
    pub len: u64,
    /// Whether the space is durable (persist before publishing).
    pub durable: bool,
    /// The space's record with more versions reserved: store it before publishing (a
    /// volatile space's version past its reservation).
    pub reserve: Option<SpaceMeta>,
}

/// Invalidate outcome, in the seed's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidateOutcome {
    /// The chunk is now invalid (seed: WRITE_FAIL).
    Invalidated,
    /// The chunk is still valid (seed: WRITE_OK): the call failed.
    StillValid(u64, Reason),
    /// The space is unknown (seed: WRITE_OK with a reason; nothing was invalidated).
    Fail(Reason),
}

#[derive(Debug, Clone, Copy)]
struct Resident {
    slot: u32,
    entry: u32,
}

#[derive(Debug, Clone)]
struct ChunkState {
    meta: ChunkMeta,
    resident: Option<Resident>,
    lease: Option<LeaseId>,
    last_use: u64,
}

#[derive(Debug, Clone)]
struct Lease {
    client: ClientId,
    space: String,
    chunk: String,
    slot: u32,
    kind: LeaseKind,
    deadline: u64,
    committing: bool,
    /// Bytes reserved against the owner's durable quota: of a durable write while it commits,
    /// of an invalidated chunk (still on disk) until its invalidate lease ends.
    pending: Option<u64>,
}

#[derive(Debug, Clone)]
struct Waiter {
    client: ClientId,
    space: String,
    chunk: String,
    after: u64,
    deadline: Option<u64>,
}

#[derive(Debug, Clone)]
struct Queued {
    id: WaiterId,
    client: ClientId,
    kind: LeaseKind,
    deadline: Option<u64>,
}

#[derive(Debug)]
struct Space {
    meta: SpaceMeta,
    chunks: HashMap<String, ChunkState>,
    free: Vec<u32>,
    /// The chunk each index entry holds (`None`: empty). There are no tombstones: a
    /// removal shifts the rest of its probe run back (see [`remove_entry`]).
    index: Vec<Option<String>>,
    queues: HashMap<String, VecDeque<Queued>>,
    /// Every new version in this space is above this one (volatile spaces: the versions
    /// reserved before a restart, and the chunks dropped when the host left the space).
    floor: u64,
}

impl Space {
    /// What the space is charged to its owner: region bytes (while joined), stored bytes
    /// of its chunks, chunk records.
    fn usage(&self) -> (u64, u64, u64) {
        let shm = if self.meta.joined {
            self.meta.geometry().file_size()
        } else {
            0
        };
        let durable = self
            .chunks
            .values()
            .map(|c| stored_bytes(&c.meta, self.meta.volatile))
            .sum();
        (shm, durable, self.chunks.len() as u64)
    }

    fn new(meta: SpaceMeta) -> Space {
        let geo = meta.geometry();
        Space {
            free: (0..meta.slots).rev().collect(),
            index: vec![None; geo.index_entries as usize],
            chunks: HashMap::new(),
            queues: HashMap::new(),
            floor: 0,
            meta,
        }
    }
}

/// The state machine.
pub struct Core {
    limits: Limits,
    spaces: BTreeMap<String, Space>,
    leases: HashMap<LeaseId, Lease>,
    waiters: HashMap<WaiterId, Waiter>,
    /// Slots of leases reclaimed from open connections: (space, generation, slot).
    quarantine: HashMap<ClientId, Vec<(String, u64, u32)>>,
    next_id: u64,
    now: u64,
    uses: u64,
    /// What each space owner uses.
    usage: HashMap<u32, Usage>,
    /// What the host uses (all owners).
    total: Usage,
    /// Bytes of lease buffers (the shell's memfds) held by each connection's uid, charged
    /// to the shared-memory quota with the regions.
    buffers: HashMap<u32, u64>,
    /// Bytes of lease buffers on the host.
    buffers_total: u64,
}

fn reason(kind: ReasonKind, m: impl Into<String>) -> Reason {
    Reason::new(kind, m)
}

fn no_space(space: &str) -> Reason {
    reason(
        ReasonKind::NoSpace,
        format!("no space {space:?} on this host"),
    )
}

/// Whether `caller` may read (`write = false`) or write a space with these bits.
fn allowed(meta: &SpaceMeta, c: &Caller, write: bool) -> bool {
    if c.uid == 0 {
        return true;
    }
    let bits = if c.uid == meta.uid {
        meta.mode >> 6
    } else if c.gid == meta.gid {
        meta.mode >> 3
    } else {
        meta.mode
    } & 7;
    bits & if write { 2 } else { 4 } != 0
}

impl Core {
    /// An empty core.
    pub fn new(limits: Limits) -> Core {
        Core {
            limits,
            spaces: BTreeMap::new(),
            leases: HashMap::new(),
            waiters: HashMap::new(),
            quarantine: HashMap::new(),
            next_id: 1,
            now: 0,
            uses: 0,
            usage: HashMap::new(),
            total: Usage::default(),
            buffers: HashMap::new(),
            buffers_total: 0,
        }
    }

    /// Charge (or release, negative) usage to a space owner and the host.
    fn charge(&mut self, uid: u32, spaces: i128, shm: i128, durable: i128, chunks: i128) {
        let u = self.usage.entry(uid).or_default();
        u.change(spaces, shm, durable, chunks);
        if *u == Usage::default() {
            self.usage.remove(&uid);
        }
        self.total.change(spaces, shm, durable, chunks);
    }

    /// What `uid` uses now (the owner of spaces, as charged against the quotas).
    pub fn usage(&self, uid: u32) -> Usage {
        self.usage.get(&uid).copied().unwrap_or_default()
    }

    /// What the whole host uses.
    pub fn total_usage(&self) -> Usage {
        self.total
    }

    /// Usage counted again from the spaces and chunks (the charged counters must agree;
    /// for tests and checks).
    pub fn recount(&self) -> (HashMap<u32, Usage>, Usage) {
        let mut per: HashMap<u32, Usage> = HashMap::new();
        let mut total = Usage::default();
        for s in self.spaces.values() {
            let (shm, durable, n) = s.usage();
            for u in [per.entry(s.meta.uid).or_default(), &mut total] {
                u.change(1, shm as i128, durable as i128, n as i128);
            }
        }
        for l in self.leases.values() {
            if let Some(p) = l.pending {
                if let Some(s) = self.spaces.get(&l.space) {
                    for u in [per.entry(s.meta.uid).or_default(), &mut total] {
                        u.pending_bytes += p;
                    }
                }
            }
        }
        (per, total)
    }

    /// Reserve bytes of a durable write being committed.
    fn reserve_pending(&mut self, uid: u32, n: u64) {
        self.usage.entry(uid).or_default().pending_bytes += n;
        self.total.pending_bytes += n;
    }

    /// A committing write ended: its reservation goes.
    fn release_pending(&mut self, uid: u32, n: u64) {
        if let Some(u) = self.usage.get_mut(&uid) {
            u.pending_bytes = u.pending_bytes.saturating_sub(n);
            if *u == Usage::default() {
                self.usage.remove(&uid);
            }
        }
        self.total.pending_bytes = self.total.pending_bytes.saturating_sub(n);
    }

    fn exempt(&self, uid: u32) -> bool {
        self.limits.quotas.exempt.contains(&uid)
    }

    /// Bytes of lease buffers on the host.
    pub fn buffer_total(&self) -> u64 {
        self.buffers_total
    }

    /// Bytes of lease buffers `uid`'s connections hold.
    pub fn buffer_bytes(&self, uid: u32) -> u64 {
        self.buffers.get(&uid).copied().unwrap_or(0)
    }

    /// A connection of `uid` needs a new lease buffer of `bytes`: charge it to the
    /// shared-memory quota (with `uid`'s regions) or refuse it.
    pub fn take_buffer(&mut self, uid: u32, bytes: u64) -> Result<(), Reason> {
        self.check_space_quota(uid, 0, bytes)?;
        *self.buffers.entry(uid).or_default() += bytes;
        self.buffers_total = self.buffers_total.saturating_add(bytes);
        Ok(())
    }

    /// A lease buffer of `uid` was freed.
    pub fn drop_buffer(&mut self, uid: u32, bytes: u64) {
        if let Some(b) = self.buffers.get_mut(&uid) {
            *b = b.saturating_sub(bytes);
            if *b == 0 {
                self.buffers.remove(&uid);
            }
        }
        self.buffers_total = self.buffers_total.saturating_sub(bytes);
    }

    /// Whether `uid` may take `shm` more bytes of regions or lease buffers (and `spaces`
    /// more spaces).
    fn check_space_quota(&self, uid: u32, spaces: u64, shm: u64) -> Result<(), Reason> {
        let q = &self.limits.quotas;
        let mut t = self.total;
        t.shm_bytes = t.shm_bytes.saturating_add(self.buffers_total);
        if spaces > 0 && t.spaces.saturating_add(spaces) > q.max_spaces {
            return Err(over_quota(
                "space",
                None,
                t.spaces,
                spaces,
                q.max_spaces,
                "max_spaces",
            ));
        }
        if t.shm_bytes.saturating_add(shm) > q.max_shm_bytes {
            return Err(over_quota(
                "shared-memory",
                None,
                t.shm_bytes,
                shm,
                q.max_shm_bytes,
                "max_shm_bytes",
            ));
        }
        if self.exempt(uid) {
            return Ok(());
        }
        let mut u = self.usage(uid);
        u.shm_bytes = u.shm_bytes.saturating_add(self.buffer_bytes(uid));
        if spaces > 0 && u.spaces.saturating_add(spaces) > q.spaces_per_uid {
            return Err(over_quota(
                "space",
                Some(uid),
                u.spaces,
                spaces,
                q.spaces_per_uid,
                "spaces_per_uid",
            ));
        }
        if u.shm_bytes.saturating_add(shm) > q.shm_bytes_per_uid {
            return Err(over_quota(
                "shared-memory",
                Some(uid),
                u.shm_bytes,
                shm,
                q.shm_bytes_per_uid,
                "shm_bytes_per_uid",
            ));
        }
        Ok(())
    }

    /// Forget a space that [`Core::create`] just made (its record or region could not be
    /// made): nothing else refers to it yet.
    pub fn forget_created(&mut self, space: &str) {
        if let Some(s) = self.spaces.remove(space) {
            let (shm, durable, n) = s.usage();
            self.charge(
                s.meta.uid,
                -1,
                -(shm as i128),
                -(durable as i128),
                -(n as i128),
            );
        }
    }

    /// This host's id.
    pub fn host(&self) -> &str {
        &self.limits.host
    }

    /// Advance the clock (milliseconds, monotonic).
    pub fn set_now(&mut self, now_ms: u64) {
        self.now = self.now.max(now_ms);
    }

    fn id(&mut self) -> u64 {
        let i = self.next_id;
        self.next_id += 1;
        i
    }

    /// Bring back a recorded space and its durable chunks (after a restart). A joined space
    /// gets its region created (an effect); chunks are not cached until read.
    pub fn restore(
        &mut self,
        mut meta: SpaceMeta,
        chunks: Vec<(String, ChunkMeta)>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        if meta.joined {
            meta.generation += 1;
            fx.push(Effect::StoreSpace(meta.clone()));
            fx.push(Effect::CreateRegion(meta.clone()));
        }
        let mut s = Space::new(meta);
        if !s.meta.volatile {
            for (name, m) in chunks {
                s.chunks.insert(
                    name,
                    ChunkState {
                        meta: m,
                        resident: None,
                        lease: None,
                        last_use: 0,
                    },
                );
            }
        }
        // a volatile space's chunks are gone: new versions start above every one that
        // may have been handed out before
        s.floor = s.meta.versions_reserved;
        let (shm, durable, n) = s.usage();
        let uid = s.meta.uid;
        if let Some(old) = self.spaces.insert(s.meta.name.clone(), s) {
            // restored twice: the first one's charge goes
            let (shm, d, n) = old.usage();
            self.charge(old.meta.uid, -1, -(shm as i128), -(d as i128), -(n as i128));
        }
        self.charge(uid, 1, shm as i128, durable as i128, n as i128);
        fx
    }

    /// The record of a space, joined or not.
    pub fn space_record(&self, space: &str) -> Option<&SpaceMeta> {
        self.spaces.get(space).map(|s| &s.meta)
    }

    /// The meta of a joined space the caller may read.
    pub fn space_meta(&self, space: &str) -> Option<&SpaceMeta> {
        self.spaces
            .get(space)
            .filter(|s| s.meta.joined)
            .map(|s| &s.meta)
    }

    fn joined(&mut self, space: &str, c: &Caller, write: bool) -> Result<&mut Space, Reason> {
        check_space_name(space)?;
        match self.spaces.get_mut(space) {
            Some(s) if s.meta.joined => {
                if allowed(&s.meta, c, write) {
                    Ok(s)
                } else {
                    Err(reason(
                        ReasonKind::Permission,
                        format!(
                            "uid {} gid {} may not {} space {space:?} (mode {:o})",
                            c.uid,
                            c.gid,
                            if write { "write" } else { "read" },
                            s.meta.mode
                        ),
                    ))
                }
            }
            _ => Err(no_space(space)),
        }
    }

    /// create: `Ok(true)` CREATE_OK, `Ok(false)` CREATE_EXISTS.
    pub fn create(
        &mut self,
        c: &Caller,
        space: &str,
        volatile: bool,
        slot_size: Option<u64>,
        slots: Option<u32>,
        mode: Option<u32>,
    ) -> Result<(bool, Vec<Effect>), Reason> {
        check_space_name(space)?;
        if self.spaces.contains_key(space) {
            return Ok((false, vec![]));
        }
        let slot_size = slot_size.unwrap_or(self.limits.default_slot_size);
        let slots = slots.unwrap_or(self.limits.default_slots);
        if slot_size == 0
            || !slot_size.is_multiple_of(4096)
            || slot_size > self.limits.max_slot_size
        {
            return Err(reason(
                ReasonKind::Invalid,
                format!(
                    "slot size {slot_size} must be a positive multiple of 4096 up to {}",
                    self.limits.max_slot_size
                ),
            ));
        }
        let geo = Geometry::new(slot_size, slots);
        if slots < 2 || geo.file_size() > self.limits.max_cache_bytes {
            return Err(reason(
                ReasonKind::Invalid,
                format!(
                    "{slots} slots of {slot_size} bytes: need at least 2 slots and at most {} bytes of cache",
                    self.limits.max_cache_bytes
                ),
            ));
        }
        let mode = mode.unwrap_or(0o660);
        if mode & !0o777 != 0 {
            return Err(reason(ReasonKind::Invalid, format!("mode {mode:o}")));
        }
        self.check_space_quota(c.uid, 1, geo.file_size())?;
        let meta = SpaceMeta {
            name: space.into(),
            volatile,
            slot_size,
            slots,
            mode,
            uid: c.uid,
            gid: c.gid,
            hosts: vec![self.limits.host.clone()],
            joined: true,
            generation: 1,
            versions_reserved: 0,
        };
        self.spaces.insert(space.into(), Space::new(meta.clone()));
        self.charge(c.uid, 1, geo.file_size() as i128, 0, 0);
        Ok((
            true,
            vec![Effect::StoreSpace(meta.clone()), Effect::CreateRegion(meta)],
        ))
    }

    /// join: on one host, joining is re-joining a space this host left.
    pub fn join(&mut self, c: &Caller, space: &str, host: &str) -> Result<Vec<Effect>, JoinError> {
        check_space_name(space).map_err(JoinError::Fail)?;
        check_host_id(host).map_err(JoinError::Fail)?;
        let me = self.limits.host.clone();
        let Some(s) = self.spaces.get_mut(space) else {
            return Err(JoinError::Fail(if host == me {
                no_space(space)
            } else {
                reason(
                    ReasonKind::NoHost,
                    format!("host {host:?} is not reachable from this host (single-host daemon)"),
                )
            }));
        };
        if s.meta.joined {
            return Err(JoinError::Exists);
        }
        if host != me && !s.meta.hosts.iter().any(|h| h == host) {
            return Err(JoinError::Fail(reason(
                ReasonKind::NoHost,
                format!("host {host:?} is not a member of space {space:?}"),
            )));
        }
        if !allowed(&s.meta, c, true) {
            return Err(JoinError::Fail(reason(
                ReasonKind::Permission,
                format!("uid {} may not join space {space:?}", c.uid),
            )));
        }
        let (owner, size) = (s.meta.uid, s.meta.geometry().file_size());
        self.check_space_quota(owner, 0, size)
            .map_err(JoinError::Fail)?;
        let s = self.spaces.get_mut(space).expect("checked above");
        s.meta.joined = true;
        s.meta.generation += 1;
        if !s.meta.hosts.contains(&me) {
            s.meta.hosts.push(me);
        }
        let meta = s.meta.clone();
        self.charge(owner, 0, size as i128, 0, 0);
        Ok(vec![
            Effect::StoreSpace(meta.clone()),
            Effect::CreateRegion(meta),
        ])
    }

    /// A join whose record could not be stored is undone: the space is as it was (`old`).
    pub fn undo_join(&mut self, old: SpaceMeta) {
        let Some(s) = self.spaces.get_mut(&old.name) else {
            return;
        };
        if s.meta.joined && !old.joined {
            let (owner, size) = (s.meta.uid, s.meta.geometry().file_size());
            s.meta = old;
            self.charge(owner, 0, -(size as i128), 0, 0);
        }
    }

    /// What an unjoin would record (`Ok(None)`: UNJOINSPACE_NOEXIST); changes nothing. The
    /// shell stores it before [`Core::unjoin`], so a refused record leaves the space joined.
    pub fn unjoin_record(&self, c: &Caller, space: &str) -> Result<Option<SpaceMeta>, Reason> {
        let Some(s) = self.spaces.get(space) else {
            return Ok(None);
        };
        if !s.meta.joined {
            return Ok(None);
        }
        if c.uid != 0 && c.uid != s.meta.uid {
            return Err(reason(
                ReasonKind::Permission,
                format!(
                    "only the owner (uid {}) or root may unjoin {space:?}",
                    s.meta.uid
                ),
            ));
        }
        let mut meta = s.meta.clone();
        meta.joined = false;
        let me = &self.limits.host;
        meta.hosts.retain(|h| h != me);
        Ok(Some(meta))
    }

    /// unjoin: `Ok(false)` is UNJOINSPACE_NOEXIST. Leases and waits of the space end;
    /// volatile chunks are dropped; durable chunks stay for a later join.
    pub fn unjoin(&mut self, c: &Caller, space: &str) -> Result<(bool, Vec<Effect>), Reason> {
        let Some(meta) = self.unjoin_record(c, space)? else {
            return Ok((false, vec![]));
        };
        let s = self.spaces.get_mut(space).expect("checked above");
        let volatile = s.meta.volatile;
        let size = s.meta.geometry().file_size();
        let old = std::mem::replace(s, Space::new(meta.clone()));
        s.floor = old.floor.max(
            old.chunks
                .values()
                .map(|c| c.meta.version)
                .max()
                .unwrap_or(0),
        );
        let dropped = if volatile { old.chunks.len() } else { 0 };
        if !volatile {
            for (name, ch) in old.chunks {
                s.chunks.insert(
                    name,
                    ChunkState {
                        resident: None,
                        lease: None,
                        ..ch
                    },
                );
            }
        }
        let mut fx = vec![
            Effect::StoreSpace(meta.clone()),
            Effect::RemoveRegion(space.into()),
        ];
        // durable writes still committing: their reservations go with their leases
        let pending: u64 = self
            .leases
            .values()
            .filter(|l| l.space == space)
            .filter_map(|l| l.pending)
            .sum();
        self.charge(meta.uid, 0, -(size as i128), 0, -(dropped as i128));
        if pending > 0 {
            self.release_pending(meta.uid, pending);
        }
        // invalidate leases end here: their chunks' invalidation is recorded, as when
        // a lease ends by itself
        if !volatile {
            let mut ended: Vec<(String, ChunkMeta)> = self
                .leases
                .values()
                .filter(|l| l.space == space && l.kind == LeaseKind::Invalidate)
                .filter_map(|l| {
                    let ch = self.spaces.get(space)?.chunks.get(&l.chunk)?;
                    (!ch.meta.valid).then(|| (l.chunk.clone(), ch.meta))
                })
                .collect();
            ended.sort_by(|a, b| a.0.cmp(&b.0));
            for (chunk, m) in ended {
                fx.push(Effect::StoreChunk {
                    space: space.into(),
                    chunk,
                    meta: m,
                });
            }
        }
        self.leases.retain(|_, l| l.space != space);
        for q in self.quarantine.values_mut() {
            q.retain(|(sp, _, _)| sp != space);
        }
        let gone: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.space == space)
            .map(|(i, _)| *i)
            .collect();
        for id in gone {
            self.waiters.remove(&id);
            fx.push(Effect::Wake {
                waiter: id,
                outcome: Wake::Fail(reason(ReasonKind::NoSpace, "the host left the space")),
            });
        }
        for q in old.queues.into_values().flatten() {
            fx.push(Effect::Wake {
                waiter: q.id,
                outcome: Wake::Fail(reason(ReasonKind::NoSpace, "the host left the space")),
            });
        }
        Ok((true, fx))
    }

    /// The host list (`None`: SPACEGETHOSTS_NOEXIST).
    pub fn hosts(&mut self, c: &Caller, space: &str) -> Result<Vec<String>, Reason> {
        Ok(self.joined(space, c, false)?.meta.hosts.clone())
    }

    /// A page of a chunk list: up to `limit` entries (at most [`CHUNK_PAGE`]) of the chunks
    /// named after `after`, in name order, and the `after` of the next page (`None`: this
    /// is the last). On one host every valid chunk has one copy, here, and it is the alpha.
    pub fn chunks(
        &mut self,
        c: &Caller,
        space: &str,
        _list: ChunkList,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<ChunkEntry>, Option<String>), Reason> {
        let host = self.limits.host.clone();
        let limit = limit.unwrap_or(CHUNK_PAGE).clamp(1, CHUNK_PAGE) as usize;
        let s = self.joined(space, c, false)?;
        let mut names: Vec<&String> = s
            .chunks
            .iter()
            .filter(|(name, ch)| ch.meta.valid && after.is_none_or(|a| name.as_str() > a))
            .map(|(name, _)| name)
            .collect();
        let more = names.len() > limit;
        if more {
            names.select_nth_unstable(limit);
            names.truncate(limit);
        }
        names.sort_unstable();
        let next = more.then(|| names[limit - 1].clone());
        let out: Vec<ChunkEntry> = names
            .into_iter()
            .map(|name| (name, &s.chunks[name]))
            .map(|(name, ch)| ChunkEntry {
                chunk: name.clone(),
                host: host.clone(),
                alpha: true,
                version: ch.meta.version,
                len: ch.meta.len,
                cached: ch.resident.is_some(),
            })
            .collect();
        Ok((out, next))
    }

    /// Check the caller may read the space (for GETCHUNKCACHE and spawn).
    pub fn check(&mut self, c: &Caller, space: &str, write: bool) -> Result<SpaceMeta, Reason> {
        Ok(self.joined(space, c, write)?.meta.clone())
    }

    fn touch(&mut self) -> u64 {
        self.uses += 1;
        self.uses
    }

    /// read: `Ok(None)` is READ_WAITING.
    pub fn read(
        &mut self,
        c: &Caller,
        space: &str,
        chunk: &str,
    ) -> Result<Option<ReadPlan>, Reason> {
        let t = self.touch();
        let s = self.joined(space, c, false)?;
        check_chunk_name(chunk)?;
        Ok(s.chunks.get_mut(chunk).and_then(|ch| plan(ch, t)))
    }

    /// Cache a durable chunk loaded from the store: the slot to copy it into, the effects
    /// to apply before the copy (evicting the slot's previous chunk from the index) and
    /// those to apply once the bytes are there (publishing them). `None`: no slot free,
    /// serve it uncached.
    pub fn fill(&mut self, space: &str, chunk: &str, version: u64) -> Option<Filling> {
        let s = self.spaces.get_mut(space)?;
        let ch = s.chunks.get(chunk)?;
        if ch.resident.is_some() || !ch.meta.valid || ch.meta.version != version {
            return None;
        }
        let meta = ch.meta;
        let mut before = Vec::new();
        let slot = alloc_slot(s, &mut before).ok()?;
        let mut after = Vec::new();
        publish_entry(s, chunk, slot, meta, &mut after);
        Some(Filling {
            slot,
            before,
            after,
        })
    }

    /// wait: the chunk now (if it exists and is newer than `after`), or a parked waiter.
    pub fn wait(
        &mut self,
        c: &Caller,
        space: &str,
        chunk: &str,
        after: Option<u64>,
        timeout_ms: Option<u64>,
    ) -> WaitOutcome {
        let t = self.touch();
        let now = self.now;
        let s = match self.joined(space, c, false) {
            Ok(s) => s,
            Err(r) => return WaitOutcome::Fail(r),
        };
        if let Err(r) = check_chunk_name(chunk) {
            return WaitOutcome::Fail(r);
        }
        let after = after.unwrap_or(0);
        if let Some(ch) = s.chunks.get_mut(chunk) {
            if ch.meta.valid && ch.meta.version > after {
                if let Some(p) = plan(ch, t) {
                    return WaitOutcome::Now(p);
                }
            }
        }
        if timeout_ms == Some(0) {
            return WaitOutcome::Fail(reason(ReasonKind::Timeout, "chunk not there (timeout 0)"));
        }
        let id = self.id();
        self.waiters.insert(
            id,
            Waiter {
                client: c.client,
                space: space.into(),
                chunk: chunk.into(),
                after,
                deadline: timeout_ms.map(|t| now.saturating_add(t)),
            },
        );
        WaitOutcome::Parked(id)
    }

    /// start_write / start_invalidate (and a plain write's internal lease).
    pub fn start_lease(
        &mut self,
        c: &Caller,
        space: &str,
        chunk: &str,
        kind: LeaseKind,
        wait: bool,
        timeout_ms: Option<u64>,
    ) -> (LeaseOutcome, Vec<Effect>) {
        let now = self.now;
        let s = match self.joined(space, c, true) {
            Ok(s) => s,
            Err(r) => return (LeaseOutcome::Fail(r), vec![]),
        };
        if let Err(r) = check_chunk_name(chunk) {
            return (LeaseOutcome::Fail(r), vec![]);
        }
        let holder = s.chunks.get(chunk).and_then(|ch| ch.lease);
        if let Some(h) = holder {
            if !wait {
                return (
                    LeaseOutcome::Fail(reason(
                        ReasonKind::Busy,
                        format!("chunk {chunk:?} is leased by another writer (lease {h})"),
                    )),
                    vec![],
                );
            }
            let id = self.next_id;
            self.next_id += 1;
            let s = self.spaces.get_mut(space).expect("checked above");
            s.queues.entry(chunk.into()).or_default().push_back(Queued {
                id,
                client: c.client,
                kind,
                deadline: timeout_ms.map(|t| now.saturating_add(t)),
            });
            return (LeaseOutcome::Queued(id), vec![]);
        }
        let mut fx = Vec::new();
        let out = match self.grant(space, chunk, c.client, kind, &mut fx) {
            Ok(g) => LeaseOutcome::Granted(g),
            Err(r) => LeaseOutcome::Fail(r),
        };
        (out, fx)
    }

    fn grant(
        &mut self,
        space: &str,
        chunk: &str,
        client: ClientId,
        kind: LeaseKind,
        fx: &mut Vec<Effect>,
    ) -> Result<Grant, Reason> {
        let (owner, new_chunk) = {
            let s = self.spaces.get(space).ok_or_else(|| no_space(space))?;
            (s.meta.uid, !s.chunks.contains_key(chunk))
        };
        if new_chunk && !self.exempt(owner) {
            let (used, limit) = (self.usage(owner).chunks, self.limits.quotas.chunks_per_uid);
            if used.saturating_add(1) > limit {
                return Err(over_quota(
                    "chunk",
                    Some(owner),
                    used,
                    1,
                    limit,
                    "chunks_per_uid",
                ));
            }
        }
        let id = self.id();
        let deadline = self.now.saturating_add(self.limits.lease_timeout_ms);
        let mut freed = 0u64;
        let s = self.spaces.get_mut(space).ok_or_else(|| no_space(space))?;
        let cur = s.chunks.get(chunk).map(|ch| (ch.meta, ch.resident));
        let (slot, fill, version, len) = match kind {
            LeaseKind::Write { keep } => {
                // a volatile space keeps one slot spare so that its chunks can always be
                // rewritten (a new version needs a slot before the old one is freed)
                let resident_now = matches!(cur, Some((_, Some(_))));
                if s.meta.volatile && !resident_now && s.free.len() < 2 {
                    return Err(reason(
                        ReasonKind::CacheFull,
                        format!(
                            "volatile space {:?} is full: its {} slots hold chunks and lease buffers, one is kept spare for rewrites, and volatile spaces never evict",
                            s.meta.name, s.meta.slots
                        ),
                    ));
                }
                let slot = alloc_slot(s, fx)?;
                // allocation may have evicted the chunk itself: look again
                let resident = s.chunks.get(chunk).and_then(|ch| ch.resident);
                let (version, len, fill) = match cur {
                    Some((m, _)) if m.valid && keep => (
                        m.version,
                        m.len,
                        match resident {
                            Some(r) => Fill::Slot(r.slot, m.len),
                            None if s.meta.volatile => Fill::Nothing,
                            None => Fill::Disk(m.len),
                        },
                    ),
                    Some((m, _)) => (m.version, 0, Fill::Nothing),
                    None => (0, 0, Fill::Nothing),
                };
                (slot, fill, version, len)
            }
            LeaseKind::Invalidate => {
                // invalid from now on; the buffer holds the last contents
                let (slot, fill, version, len) = match cur {
                    Some((m, Some(r))) if m.valid => {
                        take_entry(s, chunk, r, fx);
                        (r.slot, Fill::InPlace, m.version, m.len)
                    }
                    Some((m, _)) if m.valid && !s.meta.volatile => {
                        (alloc_slot(s, fx)?, Fill::Disk(m.len), m.version, m.len)
                    }
                    Some((m, _)) => (alloc_slot(s, fx)?, Fill::Nothing, m.version, 0),
                    None => (alloc_slot(s, fx)?, Fill::Nothing, 0, 0),
                };
                // recorded on disk when the lease ends (the stored bytes may still be
                // needed to fill the buffer)
                if let Some(ch) = s.chunks.get_mut(chunk) {
                    freed = stored_bytes(&ch.meta, s.meta.volatile);
                    ch.meta.valid = false;
                }
                (slot, fill, version, len)
            }
        };
        let ch = s.chunks.entry(chunk.into()).or_insert(ChunkState {
            meta: ChunkMeta {
                version: 0,
                valid: false,
                len: 0,
                crc: 0,
            },
            resident: None,
            lease: None,
            last_use: 0,
        });
        ch.lease = Some(id);
        self.charge(owner, 0, 0, -(freed as i128), if new_chunk { 1 } else { 0 });
        // an invalidated chunk's bytes stay on disk until its lease ends and the record
        // is stored: they stay reserved against the owner's durable quota until then
        let pending = (freed > 0).then_some(freed);
        if freed > 0 {
            self.reserve_pending(owner, freed);
        }
        self.leases.insert(
            id,
            Lease {
                client,
                space: space.into(),
                chunk: chunk.into(),
                slot,
                kind,
                deadline,
                committing: false,
                pending,
            },
        );
        Ok(Grant {
            lease: id,
            space: space.into(),
            chunk: chunk.into(),
            version,
            len,
            slot,
            fill,
        })
    }

    /// Check that `c` holds `lease` (of the given kind).
    fn held(&self, c: &Caller, lease: LeaseId, invalidate: bool) -> Result<&Lease, Reason> {
        match self.leases.get(&lease) {
            Some(l)
                if l.client == c.client
                    && !l.committing
                    && matches!(l.kind, LeaseKind::Invalidate) == invalidate =>
            {
                Ok(l)
            }
            _ => Err(reason(
                ReasonKind::NoLease,
                format!("lease {lease} is not held by this connection (stopped, reclaimed, or never granted)"),
            )),
        }
    }

    /// The space of a lease (whoever holds it).
    pub fn lease_space(&self, lease: LeaseId) -> Option<&str> {
        self.leases.get(&lease).map(|l| l.space.as_str())
    }

    /// Where a lease's buffer is (for stop_write with a payload).
    pub fn lease_slot(&self, c: &Caller, lease: LeaseId) -> Result<(String, u32), Reason> {
        let l = self.held(c, lease, false)?;
        Ok((l.space.clone(), l.slot))
    }

    /// First half of stop_write: the lease is committing (no timeout, no reclaim) while
    /// the shell checksums and persists its buffer.
    pub fn begin_stop(&mut self, c: &Caller, lease: LeaseId, len: u64) -> Result<StopPlan, Reason> {
        let l = self.held(c, lease, false)?;
        let s = self
            .spaces
            .get(&l.space)
            .ok_or_else(|| no_space(&l.space))?;
        if len > s.meta.slot_size {
            return Err(reason(
                ReasonKind::TooLarge,
                format!("length {len} is over the slot size {}", s.meta.slot_size),
            ));
        }
        let cur = s.chunks.get(&l.chunk).map(|ch| ch.meta);
        let version = cur.map(|m| m.version).unwrap_or(0).max(s.floor) + 1;
        let durable = !s.meta.volatile;
        let owner = s.meta.uid;
        let reserve = (!durable && version > s.meta.versions_reserved).then(|| {
            let mut m = s.meta.clone();
            m.versions_reserved = version.saturating_add(VERSION_BLOCK);
            m
        });
        if durable && !self.exempt(owner) {
            let u = self.usage(owner);
            let used = u.durable_bytes + u.pending_bytes;
            let old = cur.map(|m| stored_bytes(&m, false)).unwrap_or(0);
            let limit = self.limits.quotas.durable_bytes_per_uid;
            if used.saturating_sub(old).saturating_add(len) > limit {
                return Err(over_quota(
                    "durable-bytes",
                    Some(owner),
                    used,
                    len.saturating_sub(old),
                    limit,
                    "durable_bytes_per_uid",
                ));
            }
        }
        let plan = StopPlan {
            lease,
            space: l.space.clone(),
            chunk: l.chunk.clone(),
            slot: l.slot,
            version,
            len,
            durable,
            reserve,
        };
        if let Some(l) = self.leases.get_mut(&lease) {
            l.committing = true;
            if durable {
                l.pending = Some(len);
            }
        }
        if durable {
            self.reserve_pending(owner, len);
        }
        Ok(plan)
    }

    /// Second half of stop_write: publish (`Ok((len, crc))`, the data is in the slot and,
    /// for durable spaces, stored) or give up (`Err`: the chunk keeps its version). The
    /// lease ends either way and the next queued request gets it.
    pub fn finish_stop(
        &mut self,
        plan: &StopPlan,
        result: Result<(u64, u32), Reason>,
    ) -> (Result<u64, Reason>, Vec<Effect>) {
        let mut fx = Vec::new();
        if result.is_ok() {
            if let Some(m) = &plan.reserve {
                if let Some(s) = self.spaces.get_mut(&plan.space) {
                    s.meta.versions_reserved = s.meta.versions_reserved.max(m.versions_reserved);
                }
            }
        }
        let Some(l) = self.leases.remove(&plan.lease) else {
            // the space was left while the write committed: what was stored on disk is the
            // chunk's state now, so that a later version never repeats this one
            if let (Ok((len, crc)), true) = (&result, plan.durable) {
                let mut delta = None;
                if let Some(s) = self.spaces.get_mut(&plan.space) {
                    let owner = s.meta.uid;
                    if let Some(ch) = s.chunks.get_mut(&plan.chunk) {
                        if ch.meta.version < plan.version {
                            let before = stored_bytes(&ch.meta, false);
                            ch.meta = ChunkMeta {
                                version: plan.version,
                                valid: true,
                                len: *len,
                                crc: *crc,
                            };
                            ch.resident = None;
                            delta = Some((owner, *len as i128 - before as i128));
                        }
                    }
                }
                if let Some((owner, d)) = delta {
                    self.charge(owner, 0, 0, d, 0);
                }
            }
            return (
                Err(reason(
                    ReasonKind::NoSpace,
                    "the host left the space while the write committed",
                )),
                fx,
            );
        };
        let t = self.touch();
        let Some(owner) = self.spaces.get(&l.space).map(|s| s.meta.uid) else {
            return (Err(no_space(&l.space)), fx);
        };
        if let Some(p) = l.pending {
            self.release_pending(owner, p);
        }
        if let Ok((len, _)) = &result {
            let s = &self.spaces[&l.space];
            let before = s
                .chunks
                .get(&l.chunk)
                .map(|ch| stored_bytes(&ch.meta, s.meta.volatile))
                .unwrap_or(0);
            let after = if s.meta.volatile { 0 } else { *len };
            self.charge(owner, 0, 0, after as i128 - before as i128, 0);
        }
        let s = self.spaces.get_mut(&l.space).expect("checked above");
        let out = match result {
            Ok((len, crc)) => {
                let meta = ChunkMeta {
                    version: plan.version,
                    valid: true,
                    len,
                    crc,
                };
                publish_entry(s, &l.chunk, l.slot, meta, &mut fx);
                if let Some(ch) = s.chunks.get_mut(&l.chunk) {
                    ch.last_use = t;
                }
                wake_waiters(
                    &mut self.waiters,
                    &l.space,
                    &l.chunk,
                    plan.version,
                    l.slot,
                    len,
                    &mut fx,
                );
                Ok(plan.version)
            }
            Err(r) => {
                s.free.push(l.slot);
                Err(r)
            }
        };
        if let Some(ch) = s.chunks.get_mut(&l.chunk) {
            ch.lease = None;
        }
        self.next_in_queue(&l.space, &l.chunk, &mut fx);
        (out, fx)
    }

    /// abort_write: the chunk keeps its version (returned).
    pub fn abort(&mut self, c: &Caller, lease: LeaseId) -> (Result<u64, Reason>, Vec<Effect>) {
        if let Err(r) = self.held(c, lease, false) {
            return (Err(r), vec![]);
        }
        let mut fx = Vec::new();
        let v = self.release(lease, &mut fx);
        (Ok(v), fx)
    }

    /// stop_invalidate: the lease ends; the chunk stays invalid until written again.
    pub fn stop_invalidate(
        &mut self,
        c: &Caller,
        lease: LeaseId,
    ) -> (Result<(), Reason>, Vec<Effect>) {
        if let Err(r) = self.held(c, lease, true) {
            return (Err(r), vec![]);
        }
        let mut fx = Vec::new();
        self.release(lease, &mut fx);
        (Ok(()), fx)
    }

    /// End a granted lease whose buffer could not be prepared (the shell's fill failed).
    pub fn cancel(&mut self, lease: LeaseId) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.release(lease, &mut fx);
        fx
    }

    /// End a lease without publishing; returns the chunk's version.
    fn release(&mut self, lease: LeaseId, fx: &mut Vec<Effect>) -> u64 {
        self.end_lease(lease, false, fx)
    }

    /// End a lease without publishing. A lease taken away from a connection that is still
    /// open (timeout) has its slot quarantined until that connection closes: the client
    /// may still write into its buffer, which must not be another chunk's by then.
    fn end_lease(&mut self, lease: LeaseId, quarantine: bool, fx: &mut Vec<Effect>) -> u64 {
        let Some(l) = self.leases.remove(&lease) else {
            return 0;
        };
        if let (Some(p), Some(owner)) = (l.pending, self.spaces.get(&l.space).map(|s| s.meta.uid)) {
            self.release_pending(owner, p);
        }
        let Some(s) = self.spaces.get_mut(&l.space) else {
            return 0;
        };
        if quarantine {
            self.quarantine.entry(l.client).or_default().push((
                l.space.clone(),
                s.meta.generation,
                l.slot,
            ));
        } else {
            s.free.push(l.slot);
        }
        let mut v = 0;
        if let Some(ch) = s.chunks.get_mut(&l.chunk) {
            ch.lease = None;
            v = ch.meta.version;
            if l.kind == LeaseKind::Invalidate && !ch.meta.valid && !s.meta.volatile {
                fx.push(Effect::StoreChunk {
                    space: l.space.clone(),
                    chunk: l.chunk.clone(),
                    meta: ch.meta,
                });
            }
        }
        self.next_in_queue(&l.space, &l.chunk, fx);
        v
    }

    fn next_in_queue(&mut self, space: &str, chunk: &str, fx: &mut Vec<Effect>) {
        loop {
            let Some(q) = self
                .spaces
                .get_mut(space)
                .and_then(|s| s.queues.get_mut(chunk))
                .and_then(|q| q.pop_front())
            else {
                return;
            };
            let outcome = match self.grant(space, chunk, q.client, q.kind, fx) {
                Ok(g) => Wake::Granted(g),
                Err(r) => Wake::Fail(r),
            };
            let granted = matches!(outcome, Wake::Granted(_));
            fx.push(Effect::Wake {
                waiter: q.id,
                outcome,
            });
            if granted {
                return;
            }
        }
    }

    /// invalidate.
    pub fn invalidate(
        &mut self,
        c: &Caller,
        space: &str,
        chunk: &str,
    ) -> (InvalidateOutcome, Vec<Effect>) {
        let s = match self.joined(space, c, true) {
            Ok(s) => s,
            Err(r) => return (InvalidateOutcome::Fail(r), vec![]),
        };
        if let Err(r) = check_chunk_name(chunk) {
            return (InvalidateOutcome::Fail(r), vec![]);
        }
        let mut fx = Vec::new();
        let Some(ch) = s.chunks.get(chunk) else {
            return (InvalidateOutcome::Invalidated, fx);
        };
        if !ch.meta.valid {
            return (InvalidateOutcome::Invalidated, fx);
        }
        if let Some(h) = ch.lease {
            return (
                InvalidateOutcome::StillValid(
                    ch.meta.version,
                    reason(
                        ReasonKind::Busy,
                        format!("chunk {chunk:?} is leased (lease {h})"),
                    ),
                ),
                fx,
            );
        }
        if let Some(r) = ch.resident {
            take_entry(s, chunk, r, &mut fx);
            s.free.push(r.slot);
        }
        let owner = s.meta.uid;
        let volatile = s.meta.volatile;
        let ch = s.chunks.get_mut(chunk).expect("present");
        let freed = stored_bytes(&ch.meta, volatile);
        ch.meta.valid = false;
        if !volatile {
            fx.push(Effect::StoreChunk {
                space: space.into(),
                chunk: chunk.into(),
                meta: ch.meta,
            });
        }
        self.charge(owner, 0, 0, -(freed as i128), 0);
        (InvalidateOutcome::Invalidated, fx)
    }

    /// Whether a connection holds a lease (it is not idle, however long it stays silent).
    pub fn holds_lease(&self, client: ClientId) -> bool {
        self.leases.values().any(|l| l.client == client)
    }

    /// What [`Core::invalidate`] would record (a valid, unleased chunk of a durable space
    /// the caller may write); changes nothing. The shell stores it first, so that an
    /// invalidation is answered only once it is on disk.
    pub fn invalidate_record(&mut self, c: &Caller, space: &str, chunk: &str) -> Option<ChunkMeta> {
        let s = self.joined(space, c, true).ok()?;
        check_chunk_name(chunk).ok()?;
        let ch = s.chunks.get(chunk)?;
        (ch.meta.valid && ch.lease.is_none() && !s.meta.volatile).then_some(ChunkMeta {
            valid: false,
            ..ch.meta
        })
    }

    /// What ending the caller's invalidate lease records (durable space): (space, chunk,
    /// state). The shell stores it before [`Core::stop_invalidate`].
    pub fn invalidate_lease_record(
        &self,
        c: &Caller,
        lease: LeaseId,
    ) -> Option<(String, String, ChunkMeta)> {
        let l = self.held(c, lease, true).ok()?;
        let s = self.spaces.get(&l.space)?;
        let ch = s.chunks.get(&l.chunk)?;
        (!s.meta.volatile && !ch.meta.valid).then(|| (l.space.clone(), l.chunk.clone(), ch.meta))
    }

    /// A chunk's state could not be recorded (the store failed): make the core agree with
    /// what is stored (`stored`, read back by the shell). Only an unleased chunk without a
    /// cached copy changes (an invalidated one, whose lease has ended).
    pub fn resync_chunk(&mut self, space: &str, chunk: &str, stored: Option<ChunkMeta>) {
        let Some(s) = self.spaces.get_mut(space) else {
            return;
        };
        let (owner, volatile) = (s.meta.uid, s.meta.volatile);
        let Some(ch) = s.chunks.get_mut(chunk) else {
            return;
        };
        let Some(m) = stored else {
            return;
        };
        if ch.lease.is_some() || ch.resident.is_some() || volatile {
            return;
        }
        let d = stored_bytes(&m, false) as i128 - stored_bytes(&ch.meta, false) as i128;
        ch.meta = m;
        self.charge(owner, 0, 0, d, 0);
    }

    /// A connection closed: its leases are reclaimed (the chunks stay at their last
    /// published versions), its waits and queued requests dropped.
    pub fn disconnect(&mut self, client: ClientId) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.waiters.retain(|_, w| w.client != client);
        for s in self.spaces.values_mut() {
            for q in s.queues.values_mut() {
                q.retain(|x| x.client != client);
            }
        }
        let mut mine: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.client == client && !l.committing)
            .map(|(i, _)| *i)
            .collect();
        mine.sort_unstable();
        for id in mine {
            self.release(id, &mut fx);
        }
        for (space, generation, slot) in self.quarantine.remove(&client).unwrap_or_default() {
            if let Some(s) = self.spaces.get_mut(&space) {
                if s.meta.generation == generation && s.meta.joined {
                    s.free.push(slot);
                }
            }
        }
        fx
    }

    /// Time passed: waits and queued requests past their deadline fail with `timeout`;
    /// leases past `lease_timeout` are reclaimed.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        self.set_now(now_ms);
        let now = self.now;
        let mut fx = Vec::new();
        let mut late: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline.is_some_and(|d| d <= now))
            .map(|(i, _)| *i)
            .collect();
        late.sort_unstable();
        for id in late {
            self.waiters.remove(&id);
            fx.push(Effect::Wake {
                waiter: id,
                outcome: Wake::Fail(reason(
                    ReasonKind::Timeout,
                    "timed out waiting for the chunk",
                )),
            });
        }
        for s in self.spaces.values_mut() {
            for q in s.queues.values_mut() {
                q.retain(|x| {
                    let keep = x.deadline.is_none_or(|d| d > now);
                    if !keep {
                        fx.push(Effect::Wake {
                            waiter: x.id,
                            outcome: Wake::Fail(reason(
                                ReasonKind::Timeout,
                                "timed out queued behind another writer's lease",
                            )),
                        });
                    }
                    keep
                });
            }
        }
        let mut expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| !l.committing && l.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        expired.sort_unstable();
        for id in expired {
            self.end_lease(id, true, &mut fx);
        }
        fx
    }

    /// The earliest deadline (for the shell's timer).
    pub fn has_deadlines(&self) -> bool {
        !self.leases.is_empty() || self.waiters.values().any(|w| w.deadline.is_some())
    }

    /// Cached chunks of a space, for a repair: (chunk, slot, meta).
    pub fn resident(&self, space: &str) -> Vec<(String, u32, ChunkMeta)> {
        let Some(s) = self.spaces.get(space) else {
            return vec![];
        };
        let mut v: Vec<_> = s
            .chunks
            .iter()
            .filter_map(|(n, ch)| ch.resident.map(|r| (n.clone(), r.slot, ch.meta)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Forget a cached copy (its slot was found corrupted): durable chunks stay valid on
    /// disk; a volatile chunk is lost and becomes invalid.
    pub fn drop_resident(&mut self, space: &str, chunk: &str) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(s) = self.spaces.get_mut(space) else {
            return fx;
        };
        let Some(r) = s.chunks.get(chunk).and_then(|ch| ch.resident) else {
            return fx;
        };
        take_entry(s, chunk, r, &mut fx);
        s.free.push(r.slot);
        let volatile = s.meta.volatile;
        if let Some(ch) = s.chunks.get_mut(chunk) {
            if volatile {
                ch.meta.valid = false;
            }
        }
        fx
    }

    /// Rewrite a space's whole index from the core's state (after a repair, or to drop
    /// tombstones): a new region generation with every cached chunk re-entered.
    pub fn rebuild(&mut self, space: &str) -> Vec<Effect> {
        let Some(s) = self.spaces.get_mut(space) else {
            return vec![];
        };
        let mut fx = Vec::new();
        // every entry, not only the ones in use: a scribbled empty entry must go too
        for (i, u) in s.index.iter_mut().enumerate() {
            fx.push(Effect::ClearEntry {
                space: space.into(),
                entry: i as u32,
                tombstone: false,
            });
            *u = None;
        }
        let mut names: Vec<String> = s
            .chunks
            .iter()
            .filter(|(_, ch)| ch.resident.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        for n in names {
            let ch = s.chunks.get(&n).expect("listed");
            let (slot, meta) = (ch.resident.expect("resident").slot, ch.meta);
            let entry = free_entry(s, &n);
            s.index[entry as usize] = Some(n.clone());
            if let Some(ch) = s.chunks.get_mut(&n) {
                ch.resident = Some(Resident { slot, entry });
            }
            fx.push(set_entry(space, entry, &n, slot, meta));
        }
        fx
    }

    /// The connection holding a lease.
    pub fn lease_client(&self, lease: LeaseId) -> Option<ClientId> {
        self.leases.get(&lease).map(|l| l.client)
    }

    /// Entries a lookup of `chunk` probes (the hit included, or up to the empty entry that
    /// ends a miss): what a client's lookup costs.
    pub fn probes(&self, space: &str, chunk: &str) -> usize {
        let Some(s) = self.spaces.get(space) else {
            return 0;
        };
        let n = s.index.len();
        let start = home(chunk, n);
        for p in 0..n {
            match &s.index[(start + p) % n] {
                None => return p + 1,
                Some(name) if name == chunk => return p + 1,
                Some(_) => {}
            }
        }
        n
    }

    /// Slots in use by cached chunks and leases, and free ones (for tests and status).
    pub fn slot_usage(&self, space: &str) -> Option<(usize, usize, usize)> {
        let s = self.spaces.get(space)?;
        let cached = s.chunks.values().filter(|c| c.resident.is_some()).count();
        let leased = self.leases.values().filter(|l| l.space == space).count();
        Some((cached, leased, s.free.len()))
    }
}

/// A cache fill: see [`Core::fill`].
#[derive(Debug)]
pub struct Filling {
    /// Slot to copy the bytes into.
    pub slot: u32,
    /// Apply before copying.
    pub before: Vec<Effect>,
    /// Apply after copying.
    pub after: Vec<Effect>,
}

/// Why a join failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// JOINSPACE_EXISTS.
    Exists,
    /// JOINSPACE_FAIL.
    Fail(Reason),
}

fn plan(ch: &mut ChunkState, t: u64) -> Option<ReadPlan> {
    if !ch.meta.valid {
        return None;
    }
    ch.last_use = t;
    Some(match ch.resident {
        Some(r) => ReadPlan::Resident {
            version: ch.meta.version,
            slot: r.slot,
            len: ch.meta.len,
        },
        None => ReadPlan::Disk {
            version: ch.meta.version,
            len: ch.meta.len,
            crc: ch.meta.crc,
        },
    })
}

fn set_entry(space: &str, entry: u32, chunk: &str, slot: u32, m: ChunkMeta) -> Effect {
    Effect::SetEntry {
        space: space.into(),
        entry,
        value: EntryValue {
            name: chunk.into(),
            version: m.version,
            slot,
            len: m.len,
            crc: m.crc,
        },
    }
}

/// Where `chunk`'s probe sequence starts in an index of `n` entries.
fn home(chunk: &str, n: usize) -> usize {
    (name_hash(chunk) % n as u64) as usize
}

/// The first entry a new chunk may take on its probe sequence.
fn free_entry(s: &Space, chunk: &str) -> u32 {
    let n = s.index.len();
    let start = home(chunk, n);
    (0..n)
        .map(|p| (start + p) % n)
        .find(|&i| s.index[i].is_none())
        .expect("the index has twice as many entries as there are slots") as u32
}

/// Empty entry `i` without leaving a tombstone (backward-shift deletion): each later entry
/// of the probe run that may sit earlier moves into the hole, so that a miss still ends at
/// the first empty entry and probe runs stay as short as the live chunks make them, however
/// many names came and went. Readers stay safe: an entry is written under its sequence
/// lock before the old copy is cleared (a reader may see both, never a torn one), and the
/// holes stay tombstones while the shift goes on, so a reader probing past them never
/// stops early; the last hole becomes empty. At worst a racing reader misses and asks the
/// daemon.
fn remove_entry(s: &mut Space, i: u32, fx: &mut Vec<Effect>) {
    let n = s.index.len();
    let space = s.meta.name.clone();
    s.index[i as usize] = None;
    let mut hole = i as usize;
    let mut j = hole;
    for _ in 0..n {
        j = (j + 1) % n;
        let Some(name) = s.index[j].clone() else {
            break;
        };
        let h = home(&name, n);
        // the entry stays when its home lies cyclically in (hole, j]
        let stays = if hole <= j {
            hole < h && h <= j
        } else {
            h > hole || h <= j
        };
        if stays {
            continue;
        }
        let Some(ch) = s.chunks.get_mut(&name) else {
            continue;
        };
        let Some(r) = ch.resident.as_mut() else {
            continue;
        };
        if hole == i as usize {
            fx.push(Effect::ClearEntry {
                space: space.clone(),
                entry: i,
                tombstone: true,
            });
        }
        r.entry = hole as u32;
        let (slot, meta) = (r.slot, ch.meta);
        fx.push(set_entry(&space, hole as u32, &name, slot, meta));
        fx.push(Effect::ClearEntry {
            space: space.clone(),
            entry: j as u32,
            tombstone: true,
        });
        s.index[hole] = Some(name);
        s.index[j] = None;
        hole = j;
    }
    fx.push(Effect::ClearEntry {
        space,
        entry: hole as u32,
        tombstone: false,
    });
}

/// Publish `meta` in `slot` for `chunk`: its entry is updated in place (readers of the old
/// slot see the sequence change), and its old slot freed.
fn publish_entry(s: &mut Space, chunk: &str, slot: u32, meta: ChunkMeta, fx: &mut Vec<Effect>) {
    let space = s.meta.name.clone();
    let old = s.chunks.get(chunk).and_then(|c| c.resident);
    let entry = match old {
        Some(r) => r.entry,
        None => {
            let e = free_entry(s, chunk);
            s.index[e as usize] = Some(chunk.to_string());
            e
        }
    };
    fx.push(set_entry(&space, entry, chunk, slot, meta));
    if let Some(r) = old {
        if r.slot != slot {
            s.free.push(r.slot);
        }
    }
    let ch = s.chunks.entry(chunk.into()).or_insert(ChunkState {
        meta,
        resident: None,
        lease: None,
        last_use: 0,
    });
    ch.meta = meta;
    ch.resident = Some(Resident { slot, entry });
}

/// Take a chunk's cached copy out of the index (its slot is now the caller's).
fn take_entry(s: &mut Space, chunk: &str, r: Resident, fx: &mut Vec<Effect>) {
    if let Some(ch) = s.chunks.get_mut(chunk) {
        ch.resident = None;
    }
    remove_entry(s, r.entry, fx);
}

/// A free slot, evicting the least recently used cached chunk of a durable space.
fn alloc_slot(s: &mut Space, fx: &mut Vec<Effect>) -> Result<u32, Reason> {
    if let Some(slot) = s.free.pop() {
        return Ok(slot);
    }
    if s.meta.volatile {
        return Err(reason(
            ReasonKind::CacheFull,
            format!(
                "all {} slots of volatile space {:?} hold chunks or lease buffers (volatile spaces never evict)",
                s.meta.slots, s.meta.name
            ),
        ));
    }
    let victim = s
        .chunks
        .iter()
        .filter_map(|(n, ch)| ch.resident.map(|r| (ch.last_use, n.clone(), r)))
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    let Some((_, name, r)) = victim else {
        return Err(reason(
            ReasonKind::CacheFull,
            format!(
                "all {} slots of space {:?} are lease buffers",
                s.meta.slots, s.meta.name
            ),
        ));
    };
    take_entry(s, &name, r, fx);
    Ok(r.slot)
}

fn wake_waiters(
    waiters: &mut HashMap<WaiterId, Waiter>,
    space: &str,
    chunk: &str,
    version: u64,
    slot: u32,
    len: u64,
    fx: &mut Vec<Effect>,
) {
    let mut ready: Vec<WaiterId> = waiters
        .iter()
        .filter(|(_, w)| w.space == space && w.chunk == chunk && version > w.after)
        .map(|(i, _)| *i)
        .collect();
    ready.sort_unstable();
    for id in ready {
        waiters.remove(&id);
        fx.push(Effect::Wake {
            waiter: id,
            outcome: Wake::Chunk {
                space: space.into(),
                version,
                slot,
                len,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Core {
        Core::new(Limits {
            host: "h1".into(),
            lease_timeout_ms: 1000,
            default_slot_size: 4096,
            default_slots: 4,
            max_slot_size: 1 << 20,
            max_cache_bytes: 1 << 30,
            quotas: Quotas::unlimited(),
        })
    }
    const A: Caller = Caller {
        client: 1,
        uid: 1000,
        gid: 1000,
    };
    const B: Caller = Caller {
        client: 2,
        uid: 1000,
        gid: 1000,
    };
    const OTHER: Caller = Caller {
        client: 3,
        uid: 2000,
        gid: 2000,
    };

    /// Write through a lease: what the shell does for `write`.
    fn write(c: &mut Core, who: &Caller, chunk: &str, len: u64) -> Result<u64, Reason> {
        let (o, _) = c.start_lease(
            who,
            "s",
            chunk,
            LeaseKind::Write { keep: false },
            false,
            None,
        );
        let g = match o {
            LeaseOutcome::Granted(g) => g,
            LeaseOutcome::Fail(r) => return Err(r),
            LeaseOutcome::Queued(_) => panic!("queued"),
        };
        let p = c.begin_stop(who, g.lease, len)?;
        c.finish_stop(&p, Ok((len, 7))).0
    }

    #[test]
    fn create_write_read_versions() {
        let mut c = core();
        let (ok, fx) = c.create(&A, "s", false, None, None, None).unwrap();
        assert!(ok && matches!(fx[1], Effect::CreateRegion(_)));
        assert!(!c.create(&A, "s", false, None, None, None).unwrap().0);
        assert_eq!(c.read(&A, "s", "x").unwrap(), None);
        assert_eq!(write(&mut c, &A, "x", 10).unwrap(), 1);
        assert_eq!(write(&mut c, &A, "x", 20).unwrap(), 2);
        assert!(matches!(
            c.read(&A, "s", "x").unwrap(),
            Some(ReadPlan::Resident {
                version: 2,
                len: 20,
                ..
            })
        ));
        assert_eq!(
            c.read(&A, "nope", "x").unwrap_err().kind,
            ReasonKind::NoSpace
        );
        assert_eq!(
            c.read(&A, "s", "../x").unwrap_err().kind,
            ReasonKind::BadName
        );
        // other users: mode 660 denies
        assert_eq!(
            c.read(&OTHER, "s", "x").unwrap_err().kind,
            ReasonKind::Permission
        );
        // one slot per chunk (old ones freed)
        assert_eq!(c.slot_usage("s"), Some((1, 0, 3)));
    }

    #[test]
    fn one_writer_queue_and_reclaim() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        let (o, _) = c.start_lease(&A, "s", "x", LeaseKind::Write { keep: true }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        // second writer: busy, or queued
        let (o, _) = c.start_lease(&B, "s", "x", LeaseKind::Write { keep: true }, false, None);
        assert!(matches!(o, LeaseOutcome::Fail(ref r) if r.kind == ReasonKind::Busy));
        let (o, _) = c.start_lease(
            &B,
            "s",
            "x",
            LeaseKind::Write { keep: true },
            true,
            Some(5000),
        );
        let LeaseOutcome::Queued(w) = o else { panic!() };
        // B cannot stop A's lease
        assert_eq!(
            c.begin_stop(&B, g.lease, 1).unwrap_err().kind,
            ReasonKind::NoLease
        );
        // A disconnects: lease reclaimed, B gets it
        let fx = c.disconnect(A.client);
        let granted = fx.iter().find_map(|e| match e {
            Effect::Wake {
                waiter,
                outcome: Wake::Granted(g),
            } if *waiter == w => Some(g.clone()),
            _ => None,
        });
        let g2 = granted.expect("B granted");
        assert_eq!(g2.version, 0);
        // B's lease is B's: it publishes version 1
        c.tick(500);
        let p = c.begin_stop(&B, g2.lease, 1).unwrap();
        assert_eq!(c.finish_stop(&p, Ok((1, 0))).0.unwrap(), 1);
    }

    #[test]
    fn lease_timeout_reclaims_and_chunk_keeps_version() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        write(&mut c, &A, "x", 5).unwrap();
        c.set_now(100);
        let (o, _) = c.start_lease(&A, "s", "x", LeaseKind::Write { keep: true }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        assert!(matches!(g.fill, Fill::Slot(_, 5)));
        c.tick(1099);
        assert!(c.slot_usage("s").unwrap().1 == 1);
        c.tick(1100);
        // reclaimed from an open connection: the slot is quarantined until it closes
        assert_eq!(c.slot_usage("s"), Some((1, 0, 2)));
        c.disconnect(A.client);
        assert_eq!(c.slot_usage("s"), Some((1, 0, 3)));
        assert_eq!(
            c.begin_stop(&A, g.lease, 1).unwrap_err().kind,
            ReasonKind::NoLease
        );
        assert!(matches!(
            c.read(&A, "s", "x").unwrap(),
            Some(ReadPlan::Resident { version: 1, .. })
        ));
    }

    #[test]
    fn waits_wake_on_publish_or_time_out() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        let WaitOutcome::Parked(w1) = c.wait(&B, "s", "x", None, None) else {
            panic!()
        };
        let WaitOutcome::Parked(w2) = c.wait(&B, "s", "x", Some(1), Some(50)) else {
            panic!()
        };
        let (o, _) = c.start_lease(&A, "s", "x", LeaseKind::Write { keep: false }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        let p = c.begin_stop(&A, g.lease, 3).unwrap();
        let (v, fx) = c.finish_stop(&p, Ok((3, 1)));
        assert_eq!(v.unwrap(), 1);
        assert!(fx.iter().any(|e| matches!(e, Effect::Wake { waiter, outcome: Wake::Chunk { version: 1, .. } } if *waiter == w1)));
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::Wake { waiter, .. } if *waiter == w2)));
        let fx = c.tick(60);
        assert!(fx.iter().any(|e| matches!(e, Effect::Wake { waiter, outcome: Wake::Fail(r) } if *waiter == w2 && r.kind == ReasonKind::Timeout)));
        assert!(matches!(
            c.wait(&B, "s", "x", None, None),
            WaitOutcome::Now(_)
        ));
        assert!(matches!(
            c.wait(&B, "s", "x", Some(1), Some(0)),
            WaitOutcome::Fail(_)
        ));
    }

    #[test]
    fn invalidate_and_start_invalidate() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        assert_eq!(c.invalidate(&A, "s", "x").0, InvalidateOutcome::Invalidated);
        write(&mut c, &A, "x", 5).unwrap();
        let (o, fx) = c.invalidate(&A, "s", "x");
        assert_eq!(o, InvalidateOutcome::Invalidated);
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::StoreChunk { meta, .. } if !meta.valid)));
        assert_eq!(c.read(&A, "s", "x").unwrap(), None);
        // written again: version continues
        assert_eq!(write(&mut c, &A, "x", 5).unwrap(), 2);
        // a leased chunk cannot be invalidated
        let (o, _) = c.start_lease(&B, "s", "x", LeaseKind::Write { keep: false }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        assert!(matches!(
            c.invalidate(&A, "s", "x").0,
            InvalidateOutcome::StillValid(2, _)
        ));
        c.abort(&B, g.lease).0.unwrap();
        // start_invalidate: invalid at once, buffer is the old slot, until stop
        let (o, _) = c.start_lease(&A, "s", "x", LeaseKind::Invalidate, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        assert_eq!(g.fill, Fill::InPlace);
        assert_eq!(c.read(&A, "s", "x").unwrap(), None);
        assert_eq!(
            c.begin_stop(&A, g.lease, 1).unwrap_err().kind,
            ReasonKind::NoLease
        );
        c.stop_invalidate(&A, g.lease).0.unwrap();
        assert_eq!(c.read(&A, "s", "x").unwrap(), None);
        assert_eq!(c.slot_usage("s"), Some((0, 0, 4)));
    }

    #[test]
    fn eviction_only_in_durable_spaces() {
        let mut c = core();
        c.create(&A, "d", false, None, Some(2), None).unwrap();
        c.create(&A, "v", true, None, Some(2), None).unwrap();
        for sp in ["d", "v"] {
            for (i, ch) in ["a", "b", "c"].iter().enumerate() {
                let (o, _) =
                    c.start_lease(&A, sp, ch, LeaseKind::Write { keep: false }, false, None);
                match o {
                    LeaseOutcome::Granted(g) => {
                        let p = c.begin_stop(&A, g.lease, 1).unwrap();
                        c.finish_stop(&p, Ok((1, 0))).0.unwrap();
                    }
                    LeaseOutcome::Fail(r) => {
                        assert!(sp == "v" && i >= 1 && r.kind == ReasonKind::CacheFull);
                    }
                    _ => panic!(),
                }
            }
        }
        // volatile: the spare slot lets "a" be rewritten, again and again
        for v in 2..5 {
            let (o, _) = c.start_lease(&A, "v", "a", LeaseKind::Write { keep: true }, false, None);
            let LeaseOutcome::Granted(g) = o else {
                panic!("{o:?}")
            };
            let p = c.begin_stop(&A, g.lease, 1).unwrap();
            assert_eq!(c.finish_stop(&p, Ok((1, 0))).0.unwrap(), v);
        }
        // durable: "a" (least recently used) was evicted to disk and reads from there
        assert!(matches!(
            c.read(&A, "d", "a").unwrap(),
            Some(ReadPlan::Disk { .. })
        ));
        assert!(matches!(
            c.read(&A, "d", "c").unwrap(),
            Some(ReadPlan::Resident { .. })
        ));
        // filling "a" again evicts the LRU one ("b")
        let f = c.fill("d", "a", 1).unwrap();
        assert!(matches!(f.after[..], [Effect::SetEntry { .. }]));
        assert!(f
            .before
            .iter()
            .any(|e| matches!(e, Effect::ClearEntry { .. })));
        assert!(matches!(
            c.read(&A, "d", "b").unwrap(),
            Some(ReadPlan::Disk { .. })
        ));
    }

    #[test]
    fn unjoin_keeps_durable_chunks_and_join_restores() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        write(&mut c, &A, "x", 5).unwrap();
        let WaitOutcome::Parked(w) = c.wait(&B, "s", "y", None, None) else {
            panic!()
        };
        assert_eq!(
            c.unjoin(&OTHER, "s").unwrap_err().kind,
            ReasonKind::Permission
        );
        let (ok, fx) = c.unjoin(&A, "s").unwrap();
        assert!(ok);
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Wake { waiter, .. } if *waiter == w)));
        assert!(!c.unjoin(&A, "s").unwrap().0);
        assert_eq!(c.hosts(&A, "s").unwrap_err().kind, ReasonKind::NoSpace);
        assert_eq!(
            c.join(&A, "s", "elsewhere").unwrap_err(),
            JoinError::Fail(reason(
                ReasonKind::NoHost,
                "host \"elsewhere\" is not a member of space \"s\""
            ))
        );
        c.join(&A, "s", "h1").unwrap();
        assert_eq!(c.join(&A, "s", "h1").unwrap_err(), JoinError::Exists);
        assert!(matches!(
            c.read(&A, "s", "x").unwrap(),
            Some(ReadPlan::Disk { version: 1, .. })
        ));
        assert_eq!(c.hosts(&A, "s").unwrap(), vec!["h1".to_string()]);
    }

    #[test]
    fn index_rebuild_reenters_every_cached_chunk() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        for ch in ["a", "b", "c"] {
            write(&mut c, &A, ch, 1).unwrap();
        }
        c.invalidate(&A, "s", "b");
        let fx = c.rebuild("s");
        let sets = fx
            .iter()
            .filter(|e| matches!(e, Effect::SetEntry { .. }))
            .count();
        assert_eq!(sets, 2);
        let clears = fx
            .iter()
            .filter(|e| matches!(e, Effect::ClearEntry { .. }))
            .count();
        assert_eq!(clears, 8);
        assert!(matches!(
            c.drop_resident("s", "a")[..],
            [Effect::ClearEntry { .. }]
        ));
        assert!(matches!(
            c.read(&A, "s", "a").unwrap(),
            Some(ReadPlan::Disk { .. })
        ));
    }

    fn quota_core(q: Quotas) -> Core {
        let mut c = core();
        c.limits.quotas = q;
        c
    }

    fn assert_counted(c: &Core) {
        let (per, total) = c.recount();
        for (uid, u) in &per {
            assert_eq!(c.usage(*uid), *u, "uid {uid}");
        }
        for (uid, u) in &c.usage {
            assert_eq!(per.get(uid).copied().unwrap_or_default(), *u, "uid {uid}");
        }
        assert_eq!(c.total_usage(), total);
    }

    #[test]
    fn lease_buffers_share_the_shm_quota_with_regions() {
        let region = Geometry::new(4096, 4).file_size();
        let mut c = quota_core(Quotas {
            shm_bytes_per_uid: region + 4096,
            max_shm_bytes: 2 * region + 3 * 4096,
            exempt: vec![0],
            ..Quotas::unlimited()
        });
        c.create(&A, "a", false, None, None, None).unwrap();
        c.take_buffer(1000, 4096).unwrap();
        let r = c.take_buffer(1000, 4096).unwrap_err();
        assert_eq!(r.kind, ReasonKind::Quota);
        assert!(r.message.contains("shm_bytes_per_uid"), "{}", r.message);
        assert_eq!(c.buffer_bytes(1000), 4096);
        // the buffers count when a region is made, too
        c.unjoin(&A, "a").unwrap();
        c.take_buffer(1000, 4096).unwrap();
        let r = c.join(&A, "a", "h1").map(|_| ()).unwrap_err();
        assert!(format!("{r:?}").contains("shm_bytes_per_uid"), "{r:?}");
        c.drop_buffer(1000, 4096);
        c.join(&A, "a", "h1").unwrap();
        c.drop_buffer(1000, 4096);
        assert_eq!(c.buffer_bytes(1000), 0);
        // the host limit holds for the exempt too, buffers included
        let root = Caller {
            client: 9,
            uid: 0,
            gid: 0,
        };
        c.create(&root, "r", false, None, None, None).unwrap();
        c.take_buffer(0, 3 * 4096).unwrap();
        let r = c.take_buffer(0, 4096).unwrap_err();
        assert!(r.message.contains("max_shm_bytes"), "{}", r.message);
        assert_counted(&c);
    }

    #[test]
    fn space_and_shm_quotas_refuse_create_with_use_and_limit() {
        // default geometry: 4 slots of 4096 = a region of 4096 + index + 16 KiB
        let region = Geometry::new(4096, 4).file_size();
        let mut c = quota_core(Quotas {
            spaces_per_uid: 2,
            shm_bytes_per_uid: 3 * region,
            max_spaces: 4,
            exempt: vec![0],
            ..Quotas::unlimited()
        });
        c.create(&A, "a", false, None, None, None).unwrap();
        c.create(&A, "b", true, None, None, None).unwrap();
        let r = c.create(&A, "c", false, None, None, None).unwrap_err();
        assert_eq!(r.kind, ReasonKind::Quota);
        assert!(
            r.message.contains("uid 1000 uses 2") && r.message.contains("spaces_per_uid"),
            "{}",
            r.message
        );
        // shm: a big space is refused whatever the count
        let r = c
            .create(&OTHER, "big", false, None, Some(64), None)
            .unwrap_err();
        assert!(r.message.contains("shm_bytes_per_uid"), "{}", r.message);
        assert_counted(&c);
        // unjoin releases the region's bytes, not the space
        c.unjoin(&A, "b").unwrap();
        assert_eq!(c.usage(1000).shm_bytes, region);
        assert_eq!(c.usage(1000).spaces, 2);
        assert!(c.create(&A, "c", false, None, None, None).is_err());
        // root is exempt from per-uid quotas, not from the host's
        let root = Caller {
            client: 9,
            uid: 0,
            gid: 0,
        };
        c.create(&root, "r1", false, None, None, None).unwrap();
        c.create(&root, "r2", false, None, None, None).unwrap();
        let r = c.create(&root, "r3", false, None, None, None).unwrap_err();
        assert!(
            r.message.contains("max_spaces") && r.message.contains("this host"),
            "{}",
            r.message
        );
        // forgetting a space that could not be made releases everything
        c.forget_created("r2");
        c.create(&root, "r3", false, None, None, None).unwrap();
        // join is charged again (and checked)
        c.join(&A, "b", "h1").unwrap();
        assert_eq!(c.usage(1000).shm_bytes, 2 * region);
        assert_counted(&c);
    }

    #[test]
    fn chunk_and_durable_byte_quotas_refuse_writes() {
        let mut c = quota_core(Quotas {
            chunks_per_uid: 3,
            durable_bytes_per_uid: 100,
            ..Quotas::unlimited()
        });
        c.create(&A, "s", false, None, None, None).unwrap();
        write(&mut c, &A, "x", 60).unwrap();
        // a rewrite is charged its new length only
        write(&mut c, &A, "x", 90).unwrap();
        // 90 + 20 > 100: refused at stop, with the use and the limit
        let r = write(&mut c, &OTHER_WRITER, "y", 20).unwrap_err();
        assert_eq!(r.kind, ReasonKind::Quota);
        assert!(
            r.message.contains("durable_bytes_per_uid") && r.message.contains("uses 90"),
            "{}",
            r.message
        );
        c.disconnect(OTHER_WRITER.client);
        // invalidation frees the bytes (the record stays, and counts as a chunk)
        assert_eq!(c.invalidate(&A, "s", "x").0, InvalidateOutcome::Invalidated);
        assert_eq!(c.usage(1000).durable_bytes, 0);
        write(&mut c, &A, "y", 20).unwrap();
        write(&mut c, &A, "z", 20).unwrap();
        assert_eq!(c.usage(1000).chunks, 3);
        // a fourth chunk name: refused at start_write
        let (o, _) = c.start_lease(&A, "s", "w", LeaseKind::Write { keep: false }, false, None);
        assert!(
            matches!(o, LeaseOutcome::Fail(ref r) if r.kind == ReasonKind::Quota && r.message.contains("chunks_per_uid")),
            "{o:?}"
        );
        assert_counted(&c);
        // a restart counts the same from the records
        let recorded: Vec<(String, ChunkMeta)> = ["x", "y", "z"]
            .iter()
            .map(|n| (n.to_string(), c.spaces["s"].chunks[*n].meta))
            .collect();
        let meta = c.spaces["s"].meta.clone();
        let mut d = quota_core(c.limits.quotas.clone());
        d.restore(meta, recorded);
        assert_eq!(d.usage(1000), c.usage(1000));
        assert_counted(&d);
    }

    const OTHER_WRITER: Caller = Caller {
        client: 4,
        uid: 1000,
        gid: 1000,
    };

    #[test]
    fn an_invalidate_lease_keeps_its_bytes_reserved_until_it_ends() {
        let mut c = quota_core(Quotas {
            durable_bytes_per_uid: 100,
            ..Quotas::unlimited()
        });
        c.create(&A, "s", false, None, None, None).unwrap();
        write(&mut c, &A, "x", 90).unwrap();
        let (o, _) = c.start_lease(&A, "s", "x", LeaseKind::Invalidate, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!("{o:?}")
        };
        // the chunk is invalid, its bytes still on disk: still charged
        let u = c.usage(1000);
        assert_eq!((u.durable_bytes, u.pending_bytes), (0, 90));
        assert_counted(&c);
        let r = write(&mut c, &OTHER_WRITER, "y", 20).unwrap_err();
        assert!(r.message.contains("durable_bytes_per_uid"), "{}", r.message);
        c.disconnect(OTHER_WRITER.client);
        // the lease ends and its record is stored: the bytes are free
        let (r, fx) = c.stop_invalidate(&A, g.lease);
        r.unwrap();
        assert!(fx.iter().any(|e| matches!(e, Effect::StoreChunk { .. })));
        assert_eq!(c.usage(1000).pending_bytes, 0);
        write(&mut c, &A, "y", 20).unwrap();
        // a lease that ends with its connection, or with the space, lets go too
        let (o, _) = c.start_lease(&A, "s", "y", LeaseKind::Invalidate, false, None);
        assert!(matches!(o, LeaseOutcome::Granted(_)), "{o:?}");
        assert_eq!(c.usage(1000).pending_bytes, 20);
        c.disconnect(A.client);
        assert_eq!(c.usage(1000).pending_bytes, 0);
        let (o, _) = c.start_lease(&A, "s", "x2", LeaseKind::Write { keep: false }, false, None);
        assert!(matches!(o, LeaseOutcome::Granted(_)), "{o:?}");
        assert_counted(&c);
    }

    #[test]
    fn volatile_versions_stay_above_the_reservation_after_a_restart() {
        let mut c = core();
        c.create(&A, "v", true, None, None, None).unwrap();
        let (o, _) = c.start_lease(&A, "v", "x", LeaseKind::Write { keep: false }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        let p = c.begin_stop(&A, g.lease, 1).unwrap();
        // the first version needs a reservation recorded before it is published
        let reserved = p.reserve.clone().expect("reservation");
        assert_eq!(reserved.versions_reserved, 1 + VERSION_BLOCK);
        c.finish_stop(&p, Ok((1, 0))).0.unwrap();
        // the next ones are inside it
        let (o, _) = c.start_lease(&A, "v", "x", LeaseKind::Write { keep: false }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        let p = c.begin_stop(&A, g.lease, 1).unwrap();
        assert!(p.reserve.is_none());
        assert_eq!(c.finish_stop(&p, Ok((1, 0))).0.unwrap(), 2);
        // a restart: the volatile chunk is gone, its next version is above the reservation
        let mut d = core();
        d.restore(c.spaces["v"].meta.clone(), vec![]);
        let (o, _) = d.start_lease(&A, "v", "x", LeaseKind::Write { keep: false }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        let p = d.begin_stop(&A, g.lease, 1).unwrap();
        assert_eq!(p.version, 2 + VERSION_BLOCK);
        assert!(p.reserve.is_some());
        // a failed reservation is not remembered: the next write asks again
        d.finish_stop(&p, Err(reason(ReasonKind::Io, "disk full")))
            .0
            .unwrap_err();
        assert_eq!(d.spaces["v"].meta.versions_reserved, 1 + VERSION_BLOCK);
        // unjoin and join in one run: versions go on too
        c.unjoin(&A, "v").unwrap();
        c.join(&A, "v", "h1").unwrap();
        let (o, _) = c.start_lease(&A, "v", "x", LeaseKind::Write { keep: false }, false, None);
        let LeaseOutcome::Granted(g) = o else {
            panic!()
        };
        let p = c.begin_stop(&A, g.lease, 1).unwrap();
        assert_eq!(p.version, 3);
    }

    #[test]
    fn chunk_lists_come_in_pages() {
        let mut c = core();
        c.create(&A, "s", true, None, Some(64), None).unwrap();
        for i in 0..25 {
            write(&mut c, &A, &format!("c{i:02}"), 1).unwrap();
        }
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = c
                .chunks(&A, "s", ChunkList::All, after.as_deref(), Some(10))
                .unwrap();
            assert!(page.len() <= 10);
            all.extend(page.into_iter().map(|e| e.chunk));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = (0..25).map(|i| format!("c{i:02}")).collect();
        assert_eq!(all, want);
        // the page size is capped
        let (page, next) = c
            .chunks(&A, "s", ChunkList::All, None, Some(u32::MAX))
            .unwrap();
        assert_eq!((page.len(), next), (25, None));
    }

    #[test]
    fn invalidate_record_changes_nothing_and_resync_undoes() {
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        write(&mut c, &A, "x", 5).unwrap();
        let m = c
            .invalidate_record(&A, "s", "x")
            .expect("durable valid chunk");
        assert!(!m.valid && m.version == 1);
        assert!(c.read(&A, "s", "x").unwrap().is_some());
        assert!(c.invalidate_record(&OTHER, "s", "x").is_none());
        // a lease that ended by itself but whose record failed: back to what is stored
        let (o, _) = c.start_lease(&A, "s", "x", LeaseKind::Invalidate, false, None);
        assert!(matches!(o, LeaseOutcome::Granted(_)));
        let stored = c.spaces["s"].chunks["x"].meta;
        let fx = c.disconnect(A.client);
        assert!(fx.iter().any(|e| matches!(e, Effect::StoreChunk { .. })));
        c.resync_chunk(
            "s",
            "x",
            Some(ChunkMeta {
                valid: true,
                ..stored
            }),
        );
        assert!(matches!(
            c.read(&A, "s", "x").unwrap(),
            Some(ReadPlan::Disk { version: 1, .. })
        ));
        assert_counted(&c);
    }

    #[test]
    fn host_ids_are_printable() {
        assert!(check_host_id("node-1").is_ok());
        for bad in ["", "a\nb", "a b", "\u{1b}[2J"] {
            assert_eq!(check_host_id(bad).unwrap_err().kind, ReasonKind::BadName);
        }
        let mut c = core();
        c.create(&A, "s", false, None, None, None).unwrap();
        c.unjoin(&A, "s").unwrap();
        assert!(
            matches!(c.join(&A, "s", "h1\nFORGED"), Err(JoinError::Fail(r)) if r.kind == ReasonKind::BadName)
        );
    }

    #[test]
    fn misses_stay_short_however_many_names_come_and_go() {
        let mut c = core();
        c.create(&A, "s", false, None, Some(64), None).unwrap();
        // ~5,000 distinct names through 64 slots: every one evicts an older one
        for i in 0..5000 {
            write(&mut c, &A, &format!("chunk/{i}"), 1).unwrap();
            if i % 7 == 0 {
                c.invalidate(&A, "s", &format!("chunk/{}", i / 2));
            }
        }
        let s = &c.spaces["s"];
        let n = s.index.len();
        // every cached chunk sits where the core says, reachable from its home without
        // crossing an empty entry; nothing else is in the index
        let mut live = 0;
        for (name, ch) in &s.chunks {
            let Some(r) = ch.resident else { continue };
            live += 1;
            assert_eq!(s.index[r.entry as usize].as_deref(), Some(name.as_str()));
            let mut i = home(name, n);
            while i != r.entry as usize {
                assert!(s.index[i].is_some(), "{name}: an empty entry before it");
                i = (i + 1) % n;
            }
        }
        assert_eq!(live, s.index.iter().filter(|e| e.is_some()).count());
        assert!(live > 0 && live <= 64);
        // a miss ends at the first empty entry: a few probes, not the whole index (which
        // is what tombstones that are never dropped come to: 128 here)
        let probes: Vec<usize> = (0..1000)
            .map(|i| c.probes("s", &format!("missing/{i}")))
            .collect();
        let mean = probes.iter().sum::<usize>() as f64 / probes.len() as f64;
        let max = *probes.iter().max().unwrap();
        assert!(mean < 4.0, "mean probes of a miss {mean}");
        assert!(max <= 32, "longest miss {max} of {n} entries");
    }
}
