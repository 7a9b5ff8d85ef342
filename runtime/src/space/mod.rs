//! Chunk spaces on this host (see `docs/spaces.md`): the shell around [`core::Core`].
//!
//! The shell owns what the core must not: the shared-memory regions, the durable store,
//! the clock, processes (spawn) and the parked requests' channels. It holds the core under
//! one mutex and applies every [`Effect`] before letting go, so the index the clients probe
//! always matches the core. Copies of large chunks into slots and fsyncs happen outside
//! the mutex, on slots the core has reserved (a lease in its committing phase).

pub mod core;
pub mod durable;
pub mod spawn;

use self::core::{
    Caller, ChunkMeta, Core, Effect, Fill, Grant, InvalidateOutcome, JoinError, LeaseKind,
    LeaseOutcome, Limits, ReadPlan, SpaceMeta, StopPlan, WaitOutcome, WaiterId, Wake,
};
use self::durable::Durable;
use crate::config::SpaceConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use strata_client::shm::{Access, Region};
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
        db: Arc<redb::Database>,
        data_dir: &std::path::Path,
        socket: PathBuf,
        own_uid: u32,
    ) -> anyhow::Result<Spaces> {
        let host = cfg.host_id.clone().unwrap_or_else(hostname);
        let durable = Durable::open(db)?;
        std::fs::create_dir_all(&cfg.shm_dir)?;
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
        });
        let s = Spaces {
            inner: Mutex::new(Inner {
                core,
                regions: HashMap::new(),
                wakers: HashMap::new(),
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
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A new connection's id.
    pub fn connect(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the core is a bug; keep serving with the state as it is
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.epoch.elapsed().as_millis() as u64;
        g.core.set_now(now);
        g
    }

    fn region_path(&self, space: &str) -> PathBuf {
        self.cfg
            .shm_dir
            .join(format!("strata.{}.{space}", self.instance))
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
                Effect::CreateRegion(meta) => self.create_region(g, &meta),
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
                    if let Err(e) = self.durable.put_chunk_meta(&space, &chunk, &meta) {
                        tracing::error!(%space, %chunk, "cannot record chunk state: {e}");
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

    fn create_region(&self, g: &mut Inner, meta: &SpaceMeta) {
        let path = self.region_path(&meta.name);
        let access = Access {
            uid: self.root.then_some(meta.uid),
            gid: self.root.then_some(meta.gid),
            mode: meta.mode & 0o666,
        };
        match Region::create(&path, meta.geometry(), meta.generation, access) {
            Ok(r) => {
                g.regions.insert(meta.name.clone(), Arc::new(r));
            }
            Err(e) => {
                tracing::error!(space = %meta.name, path = %path.display(), "cannot create the chunk cache region: {e}")
            }
        }
    }

    /// Fill a granted lease's buffer.
    fn fill(&self, g: &Inner, grant: &Grant) -> Result<(), Reason> {
        let region = self.region(g, &grant.space)?;
        match grant.fill {
            Fill::Nothing | Fill::InPlace => Ok(()),
            Fill::Slot(from, len) => {
                if region.copy_slot(from, grant.slot, len) {
                    Ok(())
                } else {
                    Err(fail(
                        ReasonKind::Corrupted,
                        "cannot copy the published slot",
                    ))
                }
            }
            Fill::Disk(_) => match self.durable.chunk(&grant.space, &grant.chunk) {
                Ok(Some((_, data))) => {
                    if region.write_slot(grant.slot, 0, &data) {
                        Ok(())
                    } else {
                        Err(fail(
                            ReasonKind::Corrupted,
                            "stored chunk larger than the slot",
                        ))
                    }
                }
                Ok(None) => Ok(()),
                Err(e) => Err(io_reason(e)),
            },
        }
    }

    fn start_write_ok(&self, g: &Inner, grant: &Grant) -> Answer {
        match self.region(g, &grant.space) {
            Ok(r) => {
                let geo = r.geometry();
                (
                    SpaceReply::StartWriteOk {
                        lease: grant.lease,
                        version: grant.version,
                        len: grant.len,
                        path: r.path().display().to_string(),
                        offset: geo.slot_offset(grant.slot),
                        capacity: geo.slot_size,
                    },
                    vec![],
                )
            }
            Err(reason) => (SpaceReply::StartWriteFail { reason }, vec![]),
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
                        self.apply(&mut g, fx);
                        if !g.regions.contains_key(&space) {
                            tracing::warn!(%space, "space created without a cache region");
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
                match g.core.join(c, &space, &host) {
                    Ok(fx) => {
                        self.apply(&mut g, fx);
                        none(R::JoinOk)
                    }
                    Err(JoinError::Exists) => none(R::JoinExists),
                    Err(JoinError::Fail(reason)) => none(R::JoinFail { reason }),
                }
            }
            SpaceRequest::Unjoin { space } => {
                let mut g = self.lock();
                match g.core.unjoin(c, &space) {
                    Ok((true, fx)) => {
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
            SpaceRequest::Chunks { space, list } => {
                match self.lock().core.chunks(c, &space, list) {
                    Ok(entries) => none(R::ChunksOk { entries }),
                    Err(reason) => none(R::ChunksFail { reason }),
                }
            }
            SpaceRequest::Cache { space } => {
                let mut g = self.lock();
                match g.core.check(c, &space, false) {
                    Ok(_) => match self.region(&g, &space) {
                        Ok(r) if r.header_ok() => none(R::CacheOk {
                            path: r.path().display().to_string(),
                            size: r.geometry().file_size(),
                        }),
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
                let (o, fx) = g.core.invalidate(c, &space, &chunk);
                self.apply(&mut g, fx);
                none(invalidate_reply(o))
            }
            SpaceRequest::StopInvalidate { lease } => {
                let mut g = self.lock();
                let (r, fx) = g.core.stop_invalidate(c, lease);
                self.apply(&mut g, fx);
                none(match r {
                    Ok(()) => R::WriteFail { reason: None },
                    Err(reason) => R::WriteOk {
                        version: 0,
                        reason: Some(reason),
                    },
                })
            }
            SpaceRequest::Repair { space } => none(self.repair(c, &space)),
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
                let g = self.lock();
                self.start_write_ok(&g, &grant)
            }
            (Then::Write(payload), Woken::Granted(grant)) => {
                let plan = {
                    let mut g = self.lock();
                    match g.core.begin_stop(c, grant.lease, payload.len() as u64) {
                        Ok(p) => p,
                        Err(r) => return write_fail(r),
                    }
                };
                self.publish(plan, Some(&payload))
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
    }

    /// Time passed: expire waits, queued requests and leases.
    pub fn tick(&self) {
        let mut g = self.lock();
        if !g.core.has_deadlines() {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let fx = g.core.tick(now);
        self.apply(&mut g, fx);
    }

    /// Retire and remove every region (clean shutdown: volatile chunks end here).
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
            LeaseOutcome::Granted(grant) => Step::Done(match self.fill(&g, &grant) {
                Ok(()) => self.start_write_ok(&g, &grant),
                Err(reason) => {
                    let fx = g.core.cancel(grant.lease);
                    self.apply(&mut g, fx);
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
                    Err(r) => return Step::Done(write_fail(r)),
                };
                drop(g);
                Step::Done(self.publish(plan, Some(&payload)))
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
        self.publish(plan, (!payload.is_empty()).then_some(&payload[..]))
    }

    /// Publish a committing lease: copy the payload in (if any), checksum, persist
    /// (durable), then publish in the core.
    fn publish(&self, plan: StopPlan, payload: Option<&[u8]>) -> Answer {
        let region = {
            let g = self.lock();
            self.region(&g, &plan.space)
        };
        let result = (|| -> Result<(u64, u32), Reason> {
            let region = region?;
            let over = || fail(ReasonKind::TooLarge, "length over the slot size");
            // the bytes to store (durable spaces) and their checksum; a lease's buffer in
            // the slot is copied out only when it must go to disk
            let (crc, copied) = match payload {
                Some(p) => {
                    if !region.write_slot(plan.slot, 0, p) {
                        return Err(over());
                    }
                    (crc32c::crc32c(p), None)
                }
                None if plan.durable => {
                    let mut buf = Vec::new();
                    if !region.read_slot(plan.slot, plan.len, &mut buf) {
                        return Err(over());
                    }
                    (crc32c::crc32c(&buf), Some(buf))
                }
                None => (region.slot_crc(plan.slot, plan.len).ok_or_else(over)?, None),
            };
            if plan.durable {
                let meta = ChunkMeta {
                    version: plan.version,
                    valid: true,
                    len: plan.len,
                    crc,
                };
                let bytes = copied.as_deref().or(payload).unwrap_or_default();
                self.durable
                    .put_chunk(&plan.space, &plan.chunk, &meta, bytes)
                    .map_err(io_reason)?;
            }
            Ok((plan.len, crc))
        })();
        let mut g = self.lock();
        let (r, fx) = g.core.finish_stop(&plan, result);
        self.apply(&mut g, fx);
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

    fn repair(&self, c: &Caller, space: &str) -> SpaceReply {
        let mut g = self.lock();
        let meta = match g.core.check(c, space, false) {
            Ok(m) => m,
            Err(reason) => return SpaceReply::CacheFail { reason },
        };
        let region = match self.region(&g, space) {
            Ok(r) => r,
            Err(reason) => return SpaceReply::CacheFail { reason },
        };
        let mut notes = Vec::new();
        if !region.header_ok() {
            region.write_header();
            notes.push("header rewritten".to_string());
        }
        let (mut restore, mut lost) = (Vec::new(), Vec::new());
        for (chunk, slot, m) in g.core.resident(space) {
            if region.slot_crc(slot, m.len) == Some(m.crc) {
                continue;
            }
            let stored = if meta.volatile {
                None
            } else {
                match self.durable.chunk(space, &chunk) {
                    Ok(Some((dm, data))) if dm.version == m.version => Some(data),
                    _ => None,
                }
            };
            match stored {
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
        crate::log_limited!(REPAIR_LOG, warn, %space, report = %notes.join("; "), "chunk cache repaired");
        SpaceReply::RepairOk {
            report: notes.join("; "),
        }
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

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
