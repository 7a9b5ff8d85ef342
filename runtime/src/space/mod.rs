//! Chunk spaces on this host (see `docs/spaces.md`): the shell around [`core::Core`].
//!
//! The shell owns what the core must not: the shared-memory regions, the durable store,
//! the clock, processes (spawn) and the parked requests' channels. It holds the core under
//! one mutex and applies every [`Effect`] before letting go, so the index the clients probe
//! always matches the core. Copies of large chunks into slots and fsyncs happen outside
//! the mutex, on slots the core has reserved (a lease in its committing phase).
//!
//! Shared memory is lent, never shared by name: a space's region is a sealed memfd whose
//! descriptor goes to readers with GETCHUNKCACHE_OK (they can only map it read-only), and
//! a lease holder gets a lease buffer of its own (a memfd the daemon copies into the slot
//! at stop_write). The descriptors wait in a connection's outbox until its reply is sent
//! ([`Spaces::take_fds`]).

/// The sans-IO core: [`strata_space_core`].
pub use strata_space_core as core;
pub mod durable;
pub mod spawn;

#[cfg(test)]
mod crash_tests;

use self::core::{
    Caller, ChunkMeta, ClientId, Core, Effect, Fill, Grant, InvalidateOutcome, JoinError,
    LeaseKind, LeaseOutcome, Limits, Quotas, ReadPlan, SpaceMeta, StopPlan, WaitOutcome, WaiterId,
    Wake,
};
use self::durable::Durable;
use crate::config::SpaceConfig;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use strata_client::shm::{LeaseBuffer, Region};
use strata_client::{Reason, ReasonKind, SpaceReply, SpaceRequest};
use tokio::sync::oneshot;

/// A reply and its payload (chunk bytes for READ_OK and WAIT_OK).
pub type Answer = (SpaceReply, Vec<u8>);

/// What a parked request receives.
#[derive(Debug)]
pub enum Woken {
    /// The answer.
    Reply(Answer),
    /// A queued lease was granted (its buffer filled).
    Granted(Grant),
    /// Failed (timeout, space gone, ...): the operation's FAIL status.
    Fail(Reason),
}

/// Lines a user can cause per request (repair, spawn): rate-limited.
static REPAIR_LOG: crate::ratelimit::LogLimit =
    crate::ratelimit::LogLimit::new(5, std::time::Duration::from_secs(1));
static SPAWN_LOG: crate::ratelimit::LogLimit =
    crate::ratelimit::LogLimit::new(5, std::time::Duration::from_secs(1));

/// What is left to do when a parked request wakes.
#[derive(Debug)]
pub enum Then {
    /// Answer as is (wait).
    Reply,
    /// A start_write / start_invalidate was granted: answer STARTWRITE_OK.
    Lease,
    /// A write got its lease: copy the payload and publish.
    Write(Vec<u8>),
}

/// The first step of a request.
pub enum Step {
    /// Answered.
    Done(Answer),
    /// Not a request the seed has a status for (bad create, not the owner): an API error.
    Refused(Reason),
    /// Parked until `rx` fires (or the connection closes).
    Parked {
        /// Delivers the outcome.
        rx: oneshot::Receiver<Woken>,
        /// What to do with it.
        then: Then,
    },
}

struct Inner {
    core: Core,
    regions: HashMap<String, Arc<Region>>,
    wakers: HashMap<WaiterId, oneshot::Sender<Woken>>,
    /// Lease buffers of live leases (and of leases taken back by timeout, kept out of use
    /// until their connection closes: the holder may still write into them).
    leased: HashMap<u64, Lent>,
    /// Lease buffers connections gave back, for their next leases (they keep them mapped).
    spare: HashMap<ClientId, Vec<Lent>>,
    /// Descriptors to send with a connection's next reply.
    outbox: HashMap<ClientId, Vec<OwnedFd>>,
    /// Each open connection's uid (its lease buffers are charged to it).
    uids: HashMap<ClientId, u32>,
    next_buffer: u64,
}

/// A lease buffer lent to a connection (charged to its uid's shared-memory quota until
/// the daemon drops it; dropping it frees its memory whoever holds the descriptor).
struct Lent {
    client: ClientId,
    uid: u32,
    /// Its number on the wire (unique per daemon).
    id: u64,
    buf: Arc<LeaseBuffer>,
    /// Whether its descriptor went to the client already.
    sent: bool,
}

/// The daemon's chunk spaces.
pub struct Spaces {
    inner: Mutex<Inner>,
    durable: Durable,
    cfg: SpaceConfig,
    host: String,
    instance: String,
    socket: PathBuf,
    spawner: spawn::Spawner,
    epoch: Instant,
    next_client: AtomicU64,
    root: bool,
    own_uid: u32,
}

fn fail(kind: ReasonKind, m: impl Into<String>) -> Reason {
    Reason::new(kind, m)
}

fn io_reason(e: impl std::fmt::Display) -> Reason {
    fail(ReasonKind::Io, format!("the daemon's storage failed: {e}"))
}

fn write_fail(r: Reason) -> Answer {
    (SpaceReply::WriteFail { reason: Some(r) }, vec![])
}

impl Spaces {
    /// Open the spaces recorded in `db` and (re)create the regions of joined ones.
    pub fn open(
        cfg: SpaceConfig,
        db: Arc<crate::store::Db>,
        data_dir: &std::path::Path,
        socket: PathBuf,
        own_uid: u32,
    ) -> anyhow::Result<Spaces> {
        let storage = Arc::new(durable::RedbStorage::open(db)?);
        Spaces::open_with(cfg, storage, data_dir, socket, own_uid)
    }

    /// [`Spaces::open`] over any storage (tests: [`durable::MemStorage`]).
    pub fn open_with(
        cfg: SpaceConfig,
        storage: Arc<dyn durable::Storage>,
        data_dir: &std::path::Path,
        socket: PathBuf,
        own_uid: u32,
    ) -> anyhow::Result<Spaces> {
        let host = cfg.host_id.clone().unwrap_or_else(hostname);
        core::check_host_id(&host).map_err(|r| anyhow::anyhow!("{}", r.message))?;
        let durable = Durable::new(storage);
        raise_nofile();
        let canon = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let instance = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes())[..4])
        };
        let core = Core::new(Limits {
            host: host.clone(),
            lease_timeout_ms: cfg.lease_timeout_ms,
            default_slot_size: cfg.default_slot_size,
            default_slots: cfg.default_slots,
            max_slot_size: cfg.max_slot_size,
            max_cache_bytes: cfg.max_cache_bytes,
            quotas: Quotas {
                spaces_per_uid: cfg.spaces_per_uid,
                shm_bytes_per_uid: cfg.shm_bytes_per_uid,
                durable_bytes_per_uid: cfg.durable_bytes_per_uid,
                chunks_per_uid: cfg.chunks_per_uid,
                max_spaces: cfg.max_spaces,
                max_shm_bytes: cfg
                    .max_shm_bytes
                    .unwrap_or_else(|| default_max_shm(&cfg.shm_dir)),
                exempt: vec![0, own_uid],
            },
        });
        let s = Spaces {
            inner: Mutex::new(Inner {
                core,
                regions: HashMap::new(),
                wakers: HashMap::new(),
                leased: HashMap::new(),
                spare: HashMap::new(),
                outbox: HashMap::new(),
                uids: HashMap::new(),
                next_buffer: 1,
            }),
            durable,
            host,
            instance,
            socket,
            spawner: spawn::Spawner::new(
                data_dir.join("spawn"),
                cfg.spawn_max_children_per_uid,
                cfg.spawn_log_max_bytes,
            ),
            epoch: Instant::now(),
            next_client: AtomicU64::new(1),
            root: own_uid == 0,
            own_uid,
            cfg,
        };
        let recorded = s.durable.load()?;
        let mut g = s.lock();
        for (meta, chunks) in recorded {
            let name = meta.name.clone();
            let n = chunks.len();
            let fx = g.core.restore(meta, chunks);
            s.apply(&mut g, fx);
            tracing::info!(space = %name, chunks = n, "space restored");
        }
        drop(g);
        Ok(s)
    }

    /// This host's id.
    /// What the host uses, all owners together, and the bytes of lease buffers.
    pub fn usage_totals(&self) -> (core::Usage, u64) {
        let g = self.lock();
        (g.core.total_usage(), g.core.buffer_total())
    }

    /// The host id.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A new connection's id (`uid`: its peer's, charged for its lease buffers).
    pub fn connect(&self, uid: u32) -> u64 {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        self.lock().uids.insert(id, uid);
        id
    }

    /// Let go of lease buffers: their quota charge goes with them.
    fn drop_lent(g: &mut Inner, lent: impl IntoIterator<Item = Lent>) {
        for l in lent {
            g.core.drop_buffer(l.uid, l.buf.size());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the core is a bug; keep serving with the state as it is
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.epoch.elapsed().as_millis() as u64;
        g.core.set_now(now);
        g
    }

    /// The memfd name of a space's region (shows in /proc/<pid>/maps; not a path).
    fn region_name(&self, space: &str) -> String {
        format!("strata.{}.{space}", self.instance)
    }

    /// The descriptors to send with connection `client`'s reply now going out.
    pub fn take_fds(&self, client: ClientId) -> Vec<OwnedFd> {
        let mut fds = self.lock().outbox.remove(&client).unwrap_or_default();
        // one reply lends one descriptor; never more than a reply can carry
        let extra = fds.len().saturating_sub(strata_client::fdpass::MAX_FDS);
        fds.drain(..extra);
        fds
    }

    fn region(&self, g: &Inner, space: &str) -> Result<Arc<Region>, Reason> {
        g.regions.get(space).cloned().ok_or_else(|| {
            fail(
                ReasonKind::NoSpace,
                format!("space {space:?} has no cache region on this host"),
            )
        })
    }

    /// Apply effects in order.
    fn apply(&self, g: &mut Inner, fx: Vec<Effect>) {
        for e in fx {
            match e {
                Effect::CreateRegion(meta) => {
                    if let Err(r) = self.create_region(g, &meta) {
                        tracing::error!(space = %meta.name, "{}", r.message);
                    }
                }
                Effect::RemoveRegion(space) => {
                    if let Some(r) = g.regions.remove(&space) {
                        r.remove();
                    }
                }
                Effect::SetEntry {
                    space,
                    entry,
                    value,
                } => {
                    if let Some(r) = g.regions.get(&space) {
                        r.set_entry(entry, &value);
                    }
                }
                Effect::ClearEntry {
                    space,
                    entry,
                    tombstone,
                } => {
                    if let Some(r) = g.regions.get(&space) {
                        r.clear_entry(entry, tombstone);
                    }
                }
                Effect::StoreSpace(meta) => {
                    if let Err(e) = self.durable.put_space(&meta) {
                        tracing::error!(space = %meta.name, "cannot record space: {e}");
                    }
                }
                Effect::StoreChunk { space, chunk, meta } => {
                    // (requests store first and filter these out: this is a lease that
                    // ended by itself, e.g. an invalidate lease of a closed connection)
                    if let Err(e) = self.durable.put_chunk_meta(&space, &chunk, &meta) {
                        tracing::error!(%space, %chunk, "cannot record chunk state (the chunk keeps its stored state): {e}");
                        let stored = self.durable.chunk_meta(&space, &chunk).ok().flatten();
                        g.core.resync_chunk(&space, &chunk, stored);
                    }
                }
                Effect::Wake { waiter, outcome } => {
                    let woken = match outcome {
                        Wake::Chunk {
                            space,
                            version,
                            slot,
                            len,
                        } => {
                            let mut buf = Vec::new();
                            match g.regions.get(&space) {
                                Some(r) if r.read_slot(slot, len, &mut buf) => {
                                    Woken::Reply((SpaceReply::WaitOk { version }, buf))
                                }
                                _ => Woken::Fail(fail(
                                    ReasonKind::Corrupted,
                                    "the published slot is outside the region",
                                )),
                            }
                        }
                        Wake::Granted(grant) => match self.fill(g, &grant) {
                            Ok(()) => Woken::Granted(grant),
                            Err(r) => {
                                let more = g.core.cancel(grant.lease);
                                self.apply(g, more);
                                self.give_back(g, grant.lease);
                                Woken::Fail(r)
                            }
                        },
                        Wake::Fail(r) => Woken::Fail(r),
                    };
                    if let Some(tx) = g.wakers.remove(&waiter) {
                        let _ = tx.send(woken);
                    }
                }
            }
        }
    }

    /// Store the records among `fx` first (in order) and apply the rest only if they all
    /// were: nothing is answered as done before it is on disk. `Err`: nothing was applied.
    fn persist_then_apply(&self, g: &mut Inner, fx: Vec<Effect>) -> Result<(), Reason> {
        let (stores, rest): (Vec<Effect>, Vec<Effect>) = fx
            .into_iter()
            .partition(|e| matches!(e, Effect::StoreSpace(_) | Effect::StoreChunk { .. }));
        for e in &stores {
            match e {
                Effect::StoreSpace(meta) => self.durable.put_space(meta),
                Effect::StoreChunk { space, chunk, meta } => {
                    self.durable.put_chunk_meta(space, chunk, meta)
                }
                _ => Ok(()),
            }
            .map_err(io_reason)?;
        }
        self.apply(g, rest);
        Ok(())
    }

    /// Make a space's region (a new memfd; the old one, if any, is retired).
    fn create_region(&self, g: &mut Inner, meta: &SpaceMeta) -> Result<(), Reason> {
        let name = self.region_name(&meta.name);
        match Region::create(&name, meta.geometry(), meta.generation) {
            Ok(r) => {
                if let Some(old) = g.regions.insert(meta.name.clone(), Arc::new(r)) {
                    old.remove();
                }
                Ok(())
            }
            Err(e) => Err(fail(
                ReasonKind::NoSpace,
                format!(
                    "cannot make the chunk cache region of space {:?} ({} bytes): {e}",
                    meta.name,
                    meta.geometry().file_size()
                ),
            )),
        }
    }

    /// The buffer of a granted lease: one the connection gave back, or a new one.
    fn buffer_for(&self, g: &mut Inner, grant: &Grant) -> Result<Arc<LeaseBuffer>, Reason> {
        if let Some(l) = g.leased.get(&grant.lease) {
            return Ok(l.buf.clone());
        }
        let size = self.region(g, &grant.space)?.geometry().slot_size;
        let client = g
            .core
            .lease_client(grant.lease)
            .ok_or_else(|| fail(ReasonKind::NoLease, format!("lease {} ended", grant.lease)))?;
        let spare = g.spare.entry(client).or_default();
        let fits = |l: &Lent| l.buf.size() == size;
        // one the client already holds first: no new memory, no new descriptor
        let reuse =
            (spare.iter().position(|l| fits(l) && l.sent)).or_else(|| spare.iter().position(fits));
        let lent = match reuse {
            Some(i) => spare.swap_remove(i),
            None => {
                let uid = g.uids.get(&client).copied().ok_or_else(|| {
                    fail(ReasonKind::NoLease, format!("lease {} ended", grant.lease))
                })?;
                g.core.take_buffer(uid, size)?;
                let id = g.next_buffer;
                g.next_buffer += 1;
                let name = format!("strata.{}.lease.{id}", self.instance);
                let buf = match LeaseBuffer::create(&name, size) {
                    Ok(b) => b,
                    Err(e) => {
                        g.core.drop_buffer(uid, size);
                        return Err(fail(
                            ReasonKind::NoSpace,
                            format!("cannot make a lease buffer of {size} bytes: {e}"),
                        ));
                    }
                };
                Lent {
                    client,
                    uid,
                    id,
                    buf: Arc::new(buf),
                    sent: false,
                }
            }
        };
        let buf = lent.buf.clone();
        g.leased.insert(grant.lease, lent);
        Ok(buf)
    }

    /// A lease its holder ended (stop, abort, stop_invalidate) or that was never handed
    /// out: its buffer waits for the connection's next lease.
    fn give_back(&self, g: &mut Inner, lease: u64) {
        if let Some(l) = g.leased.remove(&lease) {
            let spare = g.spare.entry(l.client).or_default();
            // a buffer whose descriptor the connection got stays alive as long as the
            // client keeps it, whatever the daemon does: keep it for reuse (dropping it
            // freed nothing and let each round of leases make new ones); the cap is for
            // buffers never lent
            if l.sent || spare.len() < self.cfg.spare_lease_buffers {
                spare.push(l);
            } else {
                Self::drop_lent(g, [l]);
            }
        }
    }

    /// Fill a granted lease's buffer (under the lock: the published slot it copies from
    /// cannot be reused meanwhile).
    fn fill(&self, g: &mut Inner, grant: &Grant) -> Result<(), Reason> {
        let region = self.region(g, &grant.space)?;
        let copy = |r: std::io::Result<()>| {
            r.map_err(|e| fail(ReasonKind::Io, format!("cannot fill the lease buffer: {e}")))
        };
        match grant.fill {
            Fill::Nothing => Ok(()),
            Fill::InPlace => {
                let buf = self.buffer_for(g, grant)?;
                copy(region.slot_to_buffer(grant.slot, grant.len, &buf))
            }
            Fill::Slot(from, len) => {
                let buf = self.buffer_for(g, grant)?;
                copy(region.slot_to_buffer(from, len, &buf))
            }
            Fill::Disk(_) => match self.durable.chunk(&grant.space, &grant.chunk) {
                Ok(Some((_, data))) => {
                    let buf = self.buffer_for(g, grant)?;
                    copy(buf.write_start(&data))
                }
                Ok(None) => Ok(()),
                Err(e) => Err(io_reason(e)),
            },
        }
    }

    /// STARTWRITE_OK: the lease and its buffer (whose descriptor goes out with the reply
    /// the first time this connection gets it).
    fn start_write_ok(&self, g: &mut Inner, grant: &Grant) -> Answer {
        let lent = self.buffer_for(g, grant).and_then(|buf| {
            let l = g.leased.get_mut(&grant.lease).expect("just lent");
            if !l.sent {
                let fd = buf.share().map_err(|e| {
                    fail(
                        ReasonKind::NoSpace,
                        format!("cannot lend the lease buffer: {e}"),
                    )
                })?;
                l.sent = true;
                let client = l.client;
                g.outbox.entry(client).or_default().push(fd);
            }
            Ok((g.leased[&grant.lease].id, buf.size()))
        });
        match lent {
            Ok((buffer, capacity)) => (
                SpaceReply::StartWriteOk {
                    lease: grant.lease,
                    version: grant.version,
                    len: grant.len,
                    buffer,
                    capacity,
                },
                vec![],
            ),
            Err(reason) => {
                let fx = g.core.cancel(grant.lease);
                self.apply(g, fx);
                self.give_back(g, grant.lease);
                (SpaceReply::StartWriteFail { reason }, vec![])
            }
        }
    }

    fn park(&self, g: &mut Inner, id: WaiterId, then: Then) -> Step {
        let (tx, rx) = oneshot::channel();
        g.wakers.insert(id, tx);
        Step::Parked { rx, then }
    }

    /// Whether a request is short (may run on an async worker): reads, lists, lease grants,
    /// and writes of up to 4 MiB to volatile spaces. Requests that fsync or exec are not. (A
    /// read of a durable chunk evicted from the cache loads it from disk in place.)
    pub fn runs_inline(&self, req: &SpaceRequest) -> bool {
        const SMALL: u64 = 4 << 20;
        let space = match req {
            SpaceRequest::Read { .. }
            | SpaceRequest::Wait { .. }
            | SpaceRequest::Hosts { .. }
            | SpaceRequest::Chunks { .. }
            | SpaceRequest::Cache { .. }
            | SpaceRequest::StartWrite { keep: false, .. }
            | SpaceRequest::AbortWrite { .. } => return true,
            SpaceRequest::StartWrite { space, .. } | SpaceRequest::Write { space, .. } => {
                Some(space.as_str())
            }
            SpaceRequest::StopWrite { len, .. } if *len > SMALL => return false,
            SpaceRequest::StopWrite { .. } => None,
            _ => return false,
        };
        let g = self.lock();
        let space = match (space, req) {
            (Some(s), _) => Some(s),
            (None, SpaceRequest::StopWrite { lease, .. }) => g.core.lease_space(*lease),
            _ => None,
        };
        space
            .and_then(|s| g.core.space_meta(s))
            .is_some_and(|m| m.volatile)
    }

    /// Serve the first step of a request. Blocking (copies, fsync): call from a blocking
    /// thread.
    pub fn begin(&self, c: &Caller, req: SpaceRequest, payload: Vec<u8>) -> Step {
        use SpaceReply as R;
        let done = |a: Answer| Step::Done(a);
        let none = |r: SpaceReply| Step::Done((r, vec![]));
        match req {
            SpaceRequest::Create { space, options } => {
                let mut g = self.lock();
                match g.core.create(
                    c,
                    &space,
                    options.volatile,
                    options.slot_size,
                    options.slots,
                    options.mode,
                ) {
                    Ok((true, fx)) => {
                        // the region first: a space whose region cannot be made (memory,
                        // vm.max_map_count) is refused, and nothing of it is kept
                        let (regions, rest): (Vec<Effect>, Vec<Effect>) = fx
                            .into_iter()
                            .partition(|e| matches!(e, Effect::CreateRegion(_)));
                        for e in regions {
                            if let Effect::CreateRegion(meta) = e {
                                if let Err(r) = self.create_region(&mut g, &meta) {
                                    g.core.forget_created(&space);
                                    tracing::warn!(%space, "create refused: {}", r.message);
                                    return Step::Refused(r);
                                }
                            }
                        }
                        // then the record: nothing is answered as created before it is stored
                        if let Err(r) = self.persist_then_apply(&mut g, rest) {
                            if let Some(region) = g.regions.remove(&space) {
                                region.remove();
                            }
                            g.core.forget_created(&space);
                            tracing::error!(%space, "space not created: {}", r.message);
                            return Step::Refused(r);
                        }
                        none(R::CreateOk)
                    }
                    Ok((false, _)) => none(R::CreateExists),
                    // the seed has no CREATE_FAIL: a request that cannot create anything is
                    // refused as a caller error (bad name, bad options)
                    Err(r) => Step::Refused(r),
                }
            }
            SpaceRequest::Join { space, host } => {
                let mut g = self.lock();
                let before = g.core.space_record(&space).cloned();
                match g.core.join(c, &space, &host) {
                    Ok(fx) => {
                        // the region first, as for create: a join whose region cannot be
                        // made fails and leaves the space as it was
                        let (regions, rest): (Vec<Effect>, Vec<Effect>) = fx
                            .into_iter()
                            .partition(|e| matches!(e, Effect::CreateRegion(_)));
                        let mut made = Ok(());
                        for e in regions {
                            if let Effect::CreateRegion(meta) = e {
                                made = made.and_then(|()| self.create_region(&mut g, &meta));
                            }
                        }
                        match made.and_then(|()| self.persist_then_apply(&mut g, rest)) {
                            Ok(()) => none(R::JoinOk),
                            Err(reason) => {
                                if let Some(region) = g.regions.remove(&space) {
                                    region.remove();
                                }
                                if let Some(old) = before {
                                    g.core.undo_join(old);
                                }
                                tracing::warn!(%space, "join failed: {}", reason.message);
                                none(R::JoinFail { reason })
                            }
                        }
                    }
                    Err(JoinError::Exists) => none(R::JoinExists),
                    Err(JoinError::Fail(reason)) => none(R::JoinFail { reason }),
                }
            }
            SpaceRequest::Unjoin { space } => {
                let mut g = self.lock();
                // the record first: a space whose unjoin is not on disk stays joined
                match g.core.unjoin_record(c, &space) {
                    Ok(Some(meta)) => {
                        if let Err(e) = self.durable.put_space(&meta) {
                            return Step::Refused(io_reason(e));
                        }
                    }
                    Ok(None) => return none(R::UnjoinNoExist),
                    Err(r) => return Step::Refused(r),
                }
                match g.core.unjoin(c, &space) {
                    Ok((true, fx)) => {
                        let fx = fx
                            .into_iter()
                            .filter(|e| !matches!(e, Effect::StoreSpace(_)))
                            .collect();
                        self.apply(&mut g, fx);
                        none(R::UnjoinOk)
                    }
                    Ok((false, _)) => none(R::UnjoinNoExist),
                    Err(r) => Step::Refused(r),
                }
            }
            SpaceRequest::Hosts { space } => match self.lock().core.hosts(c, &space) {
                Ok(hosts) => none(R::HostsOk { hosts }),
                Err(_) => none(R::HostsNoExist),
            },
            SpaceRequest::Chunks {
                space,
                list,
                after,
                limit,
            } => {
                match self
                    .lock()
                    .core
                    .chunks(c, &space, list, after.as_deref(), limit)
                {
                    Ok((entries, next)) => none(R::ChunksOk { entries, next }),
                    Err(reason) => none(R::ChunksFail { reason }),
                }
            }
            SpaceRequest::Cache { space } => {
                let mut g = self.lock();
                match g.core.check(c, &space, false) {
                    Ok(_) => match self.region(&g, &space) {
                        Ok(r) if r.header_ok() => match r.share() {
                            Ok(fd) => {
                                g.outbox.entry(c.client).or_default().push(fd);
                                none(R::CacheOk {
                                    region: r.name().to_string(),
                                    size: r.geometry().file_size(),
                                })
                            }
                            Err(e) => none(R::CacheFail {
                                reason: fail(
                                    ReasonKind::NoSpace,
                                    format!("cannot lend the cache region: {e}"),
                                ),
                            }),
                        },
                        Ok(_) => none(R::CacheFail {
                            reason: fail(
                                ReasonKind::Corrupted,
                                "the cache region's header is damaged (ask for a repair)",
                            ),
                        }),
                        Err(reason) => none(R::CacheFail { reason }),
                    },
                    Err(reason) => none(R::CacheFail { reason }),
                }
            }
            SpaceRequest::Spawn {
                space,
                host,
                program,
                args,
            } => none(self.spawn(c, &space, &host, &program, &args)),
            SpaceRequest::Read { space, chunk } => done(self.read(c, &space, &chunk)),
            SpaceRequest::Wait {
                space,
                chunk,
                after,
                timeout_ms,
            } => {
                let mut g = self.lock();
                match g.core.wait(c, &space, &chunk, after, timeout_ms) {
                    WaitOutcome::Now(p) => match self.serve_plan(g, &space, &chunk, p) {
                        Ok((version, data)) => done((R::WaitOk { version }, data)),
                        Err(reason) => none(R::WaitFail { reason }),
                    },
                    WaitOutcome::Parked(id) => self.park(&mut g, id, Then::Reply),
                    WaitOutcome::Fail(reason) => none(R::WaitFail { reason }),
                }
            }
            SpaceRequest::Write { space, chunk } => self.write(c, &space, &chunk, payload),
            SpaceRequest::StartWrite {
                space,
                chunk,
                wait,
                timeout_ms,
                keep,
            } => self.start_lease(
                c,
                &space,
                &chunk,
                LeaseKind::Write { keep },
                wait,
                timeout_ms,
            ),
            SpaceRequest::StartInvalidate {
                space,
                chunk,
                wait,
                timeout_ms,
            } => self.start_lease(c, &space, &chunk, LeaseKind::Invalidate, wait, timeout_ms),
            SpaceRequest::StopWrite { lease, len } => done(self.stop_write(c, lease, len, payload)),
            SpaceRequest::AbortWrite { lease } => {
                let mut g = self.lock();
                let (r, fx) = g.core.abort(c, lease);
                self.apply(&mut g, fx);
                if r.is_ok() {
                    self.give_back(&mut g, lease);
                }
                done(match r {
                    Ok(version) => (
                        R::WriteOk {
                            version,
                            reason: None,
                        },
                        vec![],
                    ),
                    Err(r) => write_fail(r),
                })
            }
            SpaceRequest::Invalidate { space, chunk } => {
                let mut g = self.lock();
                // recorded before the core changes: a failed store leaves the chunk valid
                if let Some(meta) = g.core.invalidate_record(c, &space, &chunk) {
                    if let Err(e) = self.durable.put_chunk_meta(&space, &chunk, &meta) {
                        return none(invalidate_reply(InvalidateOutcome::StillValid(
                            meta.version,
                            io_reason(e),
                        )));
                    }
                }
                let (o, fx) = g.core.invalidate(c, &space, &chunk);
                self.apply(&mut g, without_chunk_records(fx));
                none(invalidate_reply(o))
            }
            SpaceRequest::StopInvalidate { lease } => {
                let mut g = self.lock();
                // recorded before the lease ends: a failed store keeps the lease (retry
                // stop_invalidate, or abort by closing the connection)
                if let Some((space, chunk, meta)) = g.core.invalidate_lease_record(c, lease) {
                    if let Err(e) = self.durable.put_chunk_meta(&space, &chunk, &meta) {
                        let mut r = io_reason(e);
                        r.message.push_str("; the invalidate lease is still held");
                        return none(R::WriteOk {
                            version: 0,
                            reason: Some(r),
                        });
                    }
                }
                let (r, fx) = g.core.stop_invalidate(c, lease);
                self.apply(&mut g, without_chunk_records(fx));
                if r.is_ok() {
                    self.give_back(&mut g, lease);
                }
                none(match r {
                    Ok(()) => R::WriteFail { reason: None },
                    Err(reason) => R::WriteOk {
                        version: 0,
                        reason: Some(reason),
                    },
                })
            }
            // refused (not a seed call): no write access, no such space
            SpaceRequest::Repair { space } => match self.repair(c, &space) {
                Ok(r) => none(r),
                Err(r) => Step::Refused(r),
            },
        }
    }

    /// Finish a parked request.
    pub fn resume(&self, c: &Caller, then: Then, woken: Woken) -> Answer {
        match (then, woken) {
            (_, Woken::Reply(a)) => a,
            (Then::Reply, Woken::Fail(reason)) => (SpaceReply::WaitFail { reason }, vec![]),
            (Then::Lease, Woken::Fail(reason)) => (SpaceReply::StartWriteFail { reason }, vec![]),
            (Then::Write(_), Woken::Fail(r)) => write_fail(r),
            (Then::Lease, Woken::Granted(grant)) => {
                let mut g = self.lock();
                self.start_write_ok(&mut g, &grant)
            }
            (Then::Write(payload), Woken::Granted(grant)) => {
                let plan = {
                    let mut g = self.lock();
                    match g.core.begin_stop(c, grant.lease, payload.len() as u64) {
                        Ok(p) => p,
                        Err(r) => {
                            // the lease was taken for this write only
                            let fx = g.core.cancel(grant.lease);
                            self.apply(&mut g, fx);
                            return write_fail(r);
                        }
                    }
                };
                self.publish(plan, Some(payload))
            }
            (Then::Reply, Woken::Granted(_)) => write_fail(fail(
                ReasonKind::Invalid,
                "internal: a lease woke a request that did not ask for one",
            )),
        }
    }

    /// Whether connection `client` holds a lease (then it is never closed for idleness).
    pub fn holds_lease(&self, client: u64) -> bool {
        self.lock().core.holds_lease(client)
    }

    /// The largest payload a request may carry (checked from its header, before the payload
    /// is read): a chunk for `write` (the space's slot size, or `max_slot_size` for a space
    /// this host does not know) and `stop-write` (its `len`), nothing for the rest.
    pub fn max_payload(&self, req: &SpaceRequest) -> u64 {
        match req {
            SpaceRequest::Write { space, .. } => self
                .lock()
                .core
                .space_meta(space)
                .map(|m| m.slot_size)
                .unwrap_or(self.cfg.max_slot_size),
            SpaceRequest::StopWrite { len, .. } => {
                // a `len` over every slot is refused by the lease; its bytes are not read
                (*len).min(self.cfg.max_slot_size)
            }
            _ => 0,
        }
    }

    /// The largest data a request's reply may carry: a chunk for `read` and `wait` (the
    /// space's slot size; nothing for a space this host does not know, which fails), nothing
    /// for the rest. Reserved from the caller's byte budget before the request is served,
    /// so that replies a client does not read (or waits a write wakes all at once) cost at
    /// most the budget.
    pub fn max_reply(&self, req: &SpaceRequest) -> u64 {
        match req {
            SpaceRequest::Read { space, .. } | SpaceRequest::Wait { space, .. } => self
                .lock()
                .core
                .space_meta(space)
                .map(|m| m.slot_size)
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// A parked request's connection closed, or a connection ended: reclaim its leases.
    pub fn disconnect(&self, client: u64) {
        let mut g = self.lock();
        let fx = g.core.disconnect(client);
        self.apply(&mut g, fx);
        // wakers of that client are dropped with their receivers; forget the senders
        g.wakers.retain(|_, tx| !tx.is_closed());
        // its lease buffers go, and their memory with them (what the client keeps mapped
        // reads as zeros)
        let leased: Vec<u64> = (g.leased.iter())
            .filter(|(_, l)| l.client == client)
            .map(|(k, _)| *k)
            .collect();
        let gone: Vec<Lent> = leased.iter().filter_map(|k| g.leased.remove(k)).collect();
        Self::drop_lent(&mut g, gone);
        let spare = g.spare.remove(&client).unwrap_or_default();
        Self::drop_lent(&mut g, spare);
        g.outbox.remove(&client);
        g.uids.remove(&client);
    }

    /// Time passed: expire waits, queued requests and leases.
    pub fn tick(&self) {
        let mut g = self.lock();
        self.sweep_leased(&mut g);
        if !g.core.has_deadlines() {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let fx = g.core.tick(now);
        self.apply(&mut g, fx);
        self.sweep_leased(&mut g);
    }

    /// Buffers of leases the core ended by itself (timed out, or their space was left)
    /// go back to their connection's spares: reused by its next lease instead of staying
    /// charged to its quota until it disconnects.
    fn sweep_leased(&self, g: &mut Inner) {
        if g.leased.is_empty() {
            return;
        }
        let ended: Vec<u64> = (g.leased.keys())
            .filter(|id| g.core.lease_client(**id).is_none())
            .copied()
            .collect();
        for id in ended {
            self.give_back(g, id);
        }
    }

    /// Retire every region (clean shutdown: volatile chunks end here; readers still mapping
    /// a region see it retired, and their connections close).
    pub fn shutdown(&self) {
        let mut g = self.lock();
        for (_, r) in g.regions.drain() {
            r.remove();
        }
    }

    /// Bytes of a read plan: from the slot, or from the store (then cached).
    /// `g` is the guard under which the plan was made: a cached chunk is copied under it
    /// (its slot cannot be reused meanwhile); a chunk on disk is loaded without it.
    fn serve_plan(
        &self,
        g: MutexGuard<'_, Inner>,
        space: &str,
        chunk: &str,
        p: ReadPlan,
    ) -> Result<(u64, Vec<u8>), Reason> {
        match p {
            ReadPlan::Resident { version, slot, len } => {
                let r = self.region(&g, space)?;
                let mut buf = Vec::new();
                if r.read_slot(slot, len, &mut buf) {
                    Ok((version, buf))
                } else {
                    Err(fail(ReasonKind::Corrupted, "slot outside the region"))
                }
            }
            ReadPlan::Disk { .. } => {
                drop(g);
                let (meta, data) = match self.durable.chunk(space, chunk) {
                    Ok(Some(x)) => x,
                    Ok(None) => {
                        return Err(fail(
                            ReasonKind::Io,
                            format!("chunk {chunk:?} is recorded but its bytes are gone"),
                        ))
                    }
                    Err(e) => return Err(io_reason(e)),
                };
                let mut g = self.lock();
                if let Some(f) = g.core.fill(space, chunk, meta.version) {
                    // the slot's previous chunk leaves the index before its bytes change
                    self.apply(&mut g, f.before);
                    let copied = self
                        .region(&g, space)
                        .is_ok_and(|r| r.write_slot(f.slot, 0, &data));
                    self.apply(&mut g, f.after);
                    if !copied {
                        let fx = g.core.drop_resident(space, chunk);
                        self.apply(&mut g, fx);
                    }
                }
                Ok((meta.version, data))
            }
        }
    }

    fn read(&self, c: &Caller, space: &str, chunk: &str) -> Answer {
        let mut g = self.lock();
        let plan = g.core.read(c, space, chunk);
        match plan {
            Ok(Some(p)) => match self.serve_plan(g, space, chunk, p) {
                Ok((version, data)) => (SpaceReply::ReadOk { version }, data),
                Err(reason) => (SpaceReply::ReadFail { reason }, vec![]),
            },
            Ok(None) => (SpaceReply::ReadWaiting, vec![]),
            Err(reason) => (SpaceReply::ReadFail { reason }, vec![]),
        }
    }

    fn start_lease(
        &self,
        c: &Caller,
        space: &str,
        chunk: &str,
        kind: LeaseKind,
        wait: bool,
        timeout_ms: Option<u64>,
    ) -> Step {
        let mut g = self.lock();
        let (o, fx) = g.core.start_lease(c, space, chunk, kind, wait, timeout_ms);
        self.apply(&mut g, fx);
        match o {
            LeaseOutcome::Granted(grant) => Step::Done(match self.fill(&mut g, &grant) {
                Ok(()) => self.start_write_ok(&mut g, &grant),
                Err(reason) => {
                    let fx = g.core.cancel(grant.lease);
                    self.apply(&mut g, fx);
                    self.give_back(&mut g, grant.lease);
                    (SpaceReply::StartWriteFail { reason }, vec![])
                }
            }),
            LeaseOutcome::Queued(id) => self.park(&mut g, id, Then::Lease),
            LeaseOutcome::Fail(reason) => {
                Step::Done((SpaceReply::StartWriteFail { reason }, vec![]))
            }
        }
    }

    fn write(&self, c: &Caller, space: &str, chunk: &str, payload: Vec<u8>) -> Step {
        let mut g = self.lock();
        if let Some(meta) = g.core.space_meta(space) {
            if payload.len() as u64 > meta.slot_size {
                return Step::Done(write_fail(fail(
                    ReasonKind::TooLarge,
                    format!(
                        "chunk of {} bytes is over space {space:?}'s slot size of {}",
                        payload.len(),
                        meta.slot_size
                    ),
                )));
            }
        }
        // a plain write queues behind a lease holder for up to the lease timeout
        let timeout = Some(self.cfg.lease_timeout_ms);
        let (o, fx) = g.core.start_lease(
            c,
            space,
            chunk,
            LeaseKind::Write { keep: false },
            true,
            timeout,
        );
        self.apply(&mut g, fx);
        match o {
            LeaseOutcome::Granted(grant) => {
                let plan = match g.core.begin_stop(c, grant.lease, payload.len() as u64) {
                    Ok(p) => p,
                    Err(r) => {
                        // the lease was taken for this write only
                        let fx = g.core.cancel(grant.lease);
                        self.apply(&mut g, fx);
                        return Step::Done(write_fail(r));
                    }
                };
                drop(g);
                Step::Done(self.publish(plan, Some(payload)))
            }
            LeaseOutcome::Queued(id) => self.park(&mut g, id, Then::Write(payload)),
            LeaseOutcome::Fail(r) => Step::Done(write_fail(r)),
        }
    }

    fn stop_write(&self, c: &Caller, lease: u64, len: u64, payload: Vec<u8>) -> Answer {
        if !payload.is_empty() && payload.len() as u64 != len {
            return write_fail(fail(
                ReasonKind::Invalid,
                format!(
                    "stop_write of {len} bytes sent a buffer of {} bytes; the lease is still held",
                    payload.len()
                ),
            ));
        }
        let plan = match self.lock().core.begin_stop(c, lease, len) {
            Ok(p) => p,
            Err(r) => return write_fail(r),
        };
        self.publish(plan, (!payload.is_empty()).then_some(payload))
    }

    /// Publish a committing lease: copy the payload in (if any), checksum, persist
    /// (durable: by group commit, see [`Durable::persist`]), then publish in the core.
    /// Only the last step takes the spaces' lock: the lease (committing, so neither
    /// reclaimed nor timed out) keeps the slot and the chunk to this writer meanwhile.
    fn publish(&self, plan: StopPlan, payload: Option<Vec<u8>>) -> Answer {
        let (region, buffer) = {
            let g = self.lock();
            let buffer = g.leased.get(&plan.lease).map(|l| l.buf.clone());
            (self.region(&g, &plan.space), buffer)
        };
        let result = (|| -> Result<(u64, u32), Reason> {
            let region = region?;
            if let Some(meta) = &plan.reserve {
                // versions above the recorded reservation are not handed out
                self.durable.put_space(meta).map_err(io_reason)?;
            }
            let over = || fail(ReasonKind::TooLarge, "length over the slot size");
            if payload.is_none() && plan.len > 0 {
                // the lease buffer's bytes into the slot (the daemon's own copy: what the
                // holder does to its buffer from now on changes nothing published)
                let buf = buffer.ok_or_else(|| {
                    fail(
                        ReasonKind::Invalid,
                        "this lease has no buffer: send the bytes with stop_write",
                    )
                })?;
                region
                    .slot_from_buffer(plan.slot, &buf, plan.len)
                    .map_err(|e| {
                        fail(ReasonKind::Io, format!("cannot copy the lease buffer: {e}"))
                    })?;
            }
            // the bytes to store (durable spaces) and their checksum
            let (crc, bytes) = match payload {
                Some(p) => {
                    if !region.write_slot(plan.slot, 0, &p) {
                        return Err(over());
                    }
                    (crc32c::crc32c(&p), p)
                }
                None if plan.durable => {
                    let mut buf = Vec::new();
                    if !region.read_slot(plan.slot, plan.len, &mut buf) {
                        return Err(over());
                    }
                    (crc32c::crc32c(&buf), buf)
                }
                None => (
                    region.slot_crc(plan.slot, plan.len).ok_or_else(over)?,
                    Vec::new(),
                ),
            };
            if plan.durable {
                let meta = ChunkMeta {
                    version: plan.version,
                    valid: true,
                    len: plan.len,
                    crc,
                };
                self.durable
                    .put_chunk(&plan.space, &plan.chunk, &meta, bytes)
                    .map_err(io_reason)?;
            }
            Ok((plan.len, crc))
        })();
        let mut g = self.lock();
        let (r, fx) = g.core.finish_stop(&plan, result);
        self.apply(&mut g, fx);
        self.give_back(&mut g, plan.lease);
        match r {
            Ok(version) => (
                SpaceReply::WriteOk {
                    version,
                    reason: None,
                },
                vec![],
            ),
            Err(r) => write_fail(r),
        }
    }

    /// Check and rebuild a space's cache region. Needs write access. The heavy part (a
    /// checksum of every cached slot) runs without the spaces' lock, so that a repair (or
    /// a loop of them) never holds up other spaces; only the slots found damaged are
    /// checked again, restored or dropped under it, and the index rebuilt.
    fn repair(&self, c: &Caller, space: &str) -> Result<SpaceReply, Reason> {
        let (meta, region, cached) = {
            let mut g = self.lock();
            let meta = g.core.check(c, space, true)?;
            (meta, self.region(&g, space)?, g.core.resident(space))
        };
        let suspects: Vec<(String, u32, ChunkMeta)> = cached
            .into_iter()
            .filter(|(_, slot, m)| region.slot_crc(*slot, m.len) != Some(m.crc))
            .collect();
        // the stored copies of damaged durable chunks, read without the lock
        let mut stored: HashMap<String, Vec<u8>> = HashMap::new();
        if !meta.volatile {
            for (chunk, _, m) in &suspects {
                if let Ok(Some((dm, data))) = self.durable.chunk(space, chunk) {
                    if dm.version == m.version {
                        stored.insert(chunk.clone(), data);
                    }
                }
            }
        }
        let mut g = self.lock();
        let region = self.region(&g, space)?;
        let mut notes = Vec::new();
        if !region.header_ok() {
            region.write_header();
            notes.push("header rewritten".to_string());
        }
        // a suspect counts only if it is still the same copy in the same slot, and still
        // damaged (it may have been rewritten or evicted meanwhile)
        let now: HashMap<String, (u32, ChunkMeta)> = g
            .core
            .resident(space)
            .into_iter()
            .map(|(n, slot, m)| (n, (slot, m)))
            .collect();
        let (mut restore, mut lost) = (Vec::new(), Vec::new());
        for (chunk, slot, m) in suspects {
            if now.get(&chunk) != Some(&(slot, m)) || region.slot_crc(slot, m.len) == Some(m.crc) {
                continue;
            }
            match stored.remove(&chunk) {
                Some(data) => restore.push((slot, data)),
                None => {
                    let fx = g.core.drop_resident(space, &chunk);
                    self.apply(&mut g, fx);
                    if meta.volatile {
                        lost.push(chunk);
                    }
                }
            }
        }
        // every entry is cleared before a slot is rewritten, then the index is re-entered
        let (clears, sets): (Vec<Effect>, Vec<Effect>) = g
            .core
            .rebuild(space)
            .into_iter()
            .partition(|e| matches!(e, Effect::ClearEntry { .. }));
        self.apply(&mut g, clears);
        let mut restored = 0;
        for (slot, data) in &restore {
            if region.write_slot(*slot, 0, data) {
                restored += 1;
            }
        }
        let live = sets.len();
        self.apply(&mut g, sets);
        drop(g);
        if restored > 0 {
            notes.push(format!("{restored} corrupted slot(s) restored from disk"));
        }
        if !lost.is_empty() {
            tracing::error!(%space, chunks = ?lost, "volatile chunks lost to a corrupted cache slot");
            notes.push(format!(
                "{} volatile chunk(s) lost (now invalid): {}",
                lost.len(),
                lost.join(", ")
            ));
        }
        notes.push(format!("index rebuilt with {live} cached chunk(s)"));
        // any writer may repair in a loop: a few lines a second, not one per request
        crate::log_limited!(REPAIR_LOG, warn, %space, uid = c.uid, report = %notes.join("; "), "chunk cache repaired");
        Ok(SpaceReply::RepairOk {
            report: notes.join("; "),
        })
    }

    fn spawn(
        &self,
        c: &Caller,
        space: &str,
        host: &str,
        program: &str,
        args: &[String],
    ) -> SpaceReply {
        let meta = match self.lock().core.check(c, space, true) {
            Ok(m) => m,
            Err(r) if r.kind == ReasonKind::Permission => {
                return SpaceReply::SpawnFail {
                    errno: libc::EPERM,
                    reason: r,
                }
            }
            Err(_) => return SpaceReply::SpawnNoSpace,
        };
        if !meta.hosts.iter().any(|h| h == host) {
            return SpaceReply::SpawnNoHost;
        }
        let allowed = self
            .cfg
            .spawn_allow
            .iter()
            .any(|p| p.as_os_str() == std::ffi::OsStr::new(program));
        if !allowed {
            return SpaceReply::SpawnFail {
                errno: libc::EPERM,
                reason: fail(
                    ReasonKind::Permission,
                    format!("{program:?} is not in the daemon's spaces.spawn_allow list"),
                ),
            };
        }
        let as_user = if self.root {
            Some((c.uid, c.gid))
        } else if c.uid != self.own_uid {
            return SpaceReply::SpawnFail {
                errno: libc::EPERM,
                reason: fail(
                    ReasonKind::Permission,
                    format!(
                        "the daemon runs as uid {} and cannot start a process as uid {}",
                        self.own_uid, c.uid
                    ),
                ),
            };
        } else {
            None
        };
        let vars: [(&str, std::ffi::OsString); 3] = [
            ("STRATA_SPACE", space.into()),
            ("STRATA_HOST", host.into()),
            ("STRATA_SOCKET", self.socket.clone().into_os_string()),
        ];
        let job = spawn::Job {
            program,
            args,
            as_user,
            uid: c.uid,
            vars: &vars,
            space,
        };
        match self.spawner.start(&job) {
            Ok(pid) => {
                // every start is in the uid's spawn log; the daemon's log gets a few a second
                crate::log_limited!(SPAWN_LOG, info, %space, program, pid, uid = c.uid, "spawned");
                SpaceReply::SpawnOk { pid }
            }
            Err(e) => SpaceReply::SpawnFail {
                errno: e.errno(),
                reason: fail(
                    match e {
                        spawn::SpawnError::TooMany { .. } => ReasonKind::Busy,
                        _ => ReasonKind::Io,
                    },
                    e.to_string(),
                ),
            },
        }
    }
}

/// Effects without the chunk records (already stored by the request).
fn without_chunk_records(fx: Vec<Effect>) -> Vec<Effect> {
    fx.into_iter()
        .filter(|e| !matches!(e, Effect::StoreChunk { .. }))
        .collect()
}

/// Half the size of the filesystem of `dir` (the shm dir), at least 1 GiB: the default
/// limit of all cache regions together.
fn default_max_shm(dir: &std::path::Path) -> u64 {
    let size = rustix::fs::statvfs(dir)
        .map(|v| v.f_blocks.saturating_mul(v.f_frsize))
        .unwrap_or(0);
    (size / 2).max(1 << 30)
}

fn invalidate_reply(o: InvalidateOutcome) -> SpaceReply {
    match o {
        InvalidateOutcome::Invalidated => SpaceReply::WriteFail { reason: None },
        InvalidateOutcome::StillValid(version, reason) => SpaceReply::WriteOk {
            version,
            reason: Some(reason),
        },
        InvalidateOutcome::Fail(reason) => SpaceReply::WriteOk {
            version: 0,
            reason: Some(reason),
        },
    }
}

/// Every region holds a descriptor (its memfd): let the daemon have as many as its hard
/// limit allows (the soft limit is often 1024).
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (l.current, l.maximum) {
        if cur < max {
            let raised = Rlimit {
                current: Some(max),
                maximum: Some(max),
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!("cannot raise the open-file limit from {cur} to {max}: {e}");
            }
        }
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
