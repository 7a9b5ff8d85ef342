//! The DM core behind the local API: DM applications' calls (`{"op":"dm",...}`) and the
//! parked ones (get_events with DM_EV_WAIT, synchronous send_msg, request_right with
//! DM_RR_WAIT). The FUSE capture will raise its events through the same [`Dm`].

use super::core::{Core, OpId, Output, Raised, WaiterId};
use super::handle::{Handle, HandleKind};
use super::{DmError, DmReply, DmRequest, EventData, EventSet, EventType, FsId, Response, Token};
use arc_swap::ArcSwap;
use redb::ReadableTable;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::oneshot;

/// `[dm]` settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DmConfig {
    /// A synchronous event unanswered for this long fails its operation.
    pub event_timeout_ms: u64,
    /// With this errno.
    pub timeout_errno: i32,
    /// At most this many sessions (one more is ENOMEM).
    pub max_sessions: usize,
    /// Threads for filesystem operations that may wait for a DM application (all mounts).
    pub op_threads: usize,
    /// Such operations waiting for a thread; more are answered EIO (and logged).
    pub op_queue: usize,
    /// Threads answering the events of one attached policy.
    pub attach_workers: usize,
}

impl Default for DmConfig {
    fn default() -> Self {
        DmConfig {
            event_timeout_ms: 60_000,
            timeout_errno: libc::ETIMEDOUT,
            max_sessions: 4096,
            op_threads: 256,
            op_queue: 4096,
            attach_workers: 4,
        }
    }
}

const SESSIONS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("dm_sessions");
/// Managed filesystems: fsid -> JSON [`FsRecord`].
const FILESYSTEMS: redb::TableDefinition<u32, &[u8]> = redb::TableDefinition::new("dm_fs");
/// Dispositions: fsid (0: global) -> JSON list of (event type, session).
const DISPOSITIONS: redb::TableDefinition<u32, &[u8]> =
    redb::TableDefinition::new("dm_dispositions");
/// The global filesystem id (DM_GLOBAL_HANP): mount events are disposed there.
pub const GLOBAL_FS: FsId = 0;

/// What is recorded about a managed filesystem (redb `dm_fs`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FsRecord {
    /// The backing directory (canonical).
    pub backing: PathBuf,
    /// Where it is mounted (`None`: not mounted; DMAPI calls on it are EPERM).
    pub mountpoint: Option<PathBuf>,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The filesystem's event list (dm_set_eventlist on its handle).
    #[serde(default)]
    pub events: EventSet,
    /// The DM attribute DESTROY events carry (dm_set_return_on_destroy).
    #[serde(default)]
    pub destroy_attr: Option<[u8; 8]>,
}

/// A raised event, as the filesystem layer holds it.
pub enum Raise {
    /// Nothing waits: the operation goes on.
    Go,
    /// The operation waits for the answer.
    Wait {
        /// The blocked operation.
        op: OpId,
        /// Its event's token.
        token: Token,
        /// Where the answer comes.
        rx: mpsc::Receiver<Response>,
        /// The event's type.
        kind: EventType,
        /// When it was raised.
        since: Instant,
    },
}

/// Who waits for a blocked operation's answer.
enum OpWaiter {
    /// A synchronous send_msg of an API client.
    Api {
        client: u64,
        token: Token,
        tx: oneshot::Sender<DmReply>,
    },
    /// A filesystem operation.
    Local { tx: mpsc::Sender<Response> },
}
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("dm_meta");
/// Tokens are reserved on disk in blocks of this many, so that a restarted daemon knows
/// which tokens an earlier run issued (ESRCH) without a write per event.
const TOKEN_BLOCK: u64 = 1 << 20;

/// A parked call's outcome.
pub type Parked = oneshot::Receiver<DmReply>;

/// How a call went.
pub enum DmStep {
    /// Answered.
    Done(DmReply),
    /// Answered later (or never, if the caller leaves first).
    Parked(Parked),
}

struct Inner {
    core: Core,
    /// Parked get_events / request_right calls: waiter -> (client, answer).
    wakers: HashMap<WaiterId, (u64, oneshot::Sender<DmReply>)>,
    /// Blocked operations: synchronous send_msg calls and filesystem operations.
    ops: HashMap<OpId, OpWaiter>,
    /// Managed filesystems.
    filesystems: HashMap<FsId, FsRecord>,
    next_op: OpId,
    /// Tokens below this are reserved on disk.
    reserved: u64,
    /// (core disposition generation, filesystem records generation) of the published views.
    published: (u64, u64),
    /// Bumped when a filesystem record changes.
    fs_generation: u64,
}

/// What the FUSE hot path asks of a filesystem on every operation, published without the
/// DM lock (see [`Dm::view`]).
#[derive(Debug, Clone, Copy, Default)]
struct FsView {
    /// Event types disposed to some session.
    disposed: EventSet,
    /// The filesystem's event list.
    events: EventSet,
    /// Some synchronous event type is disposed: operations may wait.
    sync: bool,
}

/// A record of the DM service's state to store (see [`Dm::flush`]).
enum Record {
    /// A session was created (its info) or destroyed (`None`).
    Session(u64, Option<Vec<u8>>),
    /// The dispositions of a filesystem, all of them.
    Dispositions(FsId, Vec<(EventType, u64)>),
    /// Tokens below this are reserved.
    Tokens(u64),
}

/// Records queued under the DM lock, in order, and stored after it by one writer at a time.
#[derive(Default)]
struct Records {
    queue: Mutex<std::collections::VecDeque<(u64, Record)>>,
    next: std::sync::atomic::AtomicU64,
    /// The last record stored (or given up on); held while a batch is written.
    writer: Mutex<u64>,
    /// Tokens below this are reserved on disk (only a stored reservation counts).
    stored_tokens: std::sync::atomic::AtomicU64,
    /// A token reservation is queued and not yet written.
    tokens_queued: std::sync::atomic::AtomicBool,
}

impl Records {
    /// Queue a record (called under the DM lock, which orders them).
    fn push(&self, rec: Record) {
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((seq, rec));
    }
}

/// The daemon's DM service. Sessions (id and info) are recorded in the daemon's redb
/// (`dm_sessions`) and come back after a restart, without their events.
pub struct Dm {
    max_sessions: usize,
    attach_workers: usize,
    /// Filesystem operations that may wait for a DM application.
    ops_pool: crate::pool::Pool,
    /// Page-cache invalidations (which may wait for a page a blocked operation holds).
    inval_pool: crate::pool::Pool,
    inner: Mutex<Inner>,
    /// Dispositions and event lists per filesystem, republished under the lock whenever
    /// they change and read by the FUSE hot path without it.
    views: ArcSwap<HashMap<FsId, FsView>>,
    records: Records,
    epoch: Instant,
    db: Arc<strata_common::store::Db>,
}

impl Dm {
    /// The DM service, with the sessions recorded in `db`.
    pub fn open(cfg: &DmConfig, db: Arc<strata_common::store::Db>) -> anyhow::Result<Dm> {
        let mut core = Core::new(cfg.event_timeout_ms, cfg.timeout_errno);
        let w = db.begin_write()?;
        w.open_table(SESSIONS)?;
        w.open_table(FILESYSTEMS)?;
        w.open_table(DISPOSITIONS)?;
        let reserved_before = w
            .open_table(META)?
            .get("token_reserved")?
            .map(|v| v.value());
        w.commit()?;
        let r = db.begin_read()?;
        for item in r.open_table(SESSIONS)?.iter()? {
            let (k, v) = item?;
            core.restore_session(k.value(), v.value().to_vec());
        }
        let mut filesystems = HashMap::new();
        for item in r.open_table(FILESYSTEMS)?.iter()? {
            let (k, v) = item?;
            match serde_json::from_slice::<FsRecord>(v.value()) {
                Ok(rec) => {
                    filesystems.insert(k.value(), rec);
                }
                Err(e) => tracing::error!(fs = k.value(), "unreadable filesystem record: {e}"),
            }
        }
        for item in r.open_table(DISPOSITIONS)?.iter()? {
            let (k, v) = item?;
            match serde_json::from_slice::<Vec<(EventType, u64)>>(v.value()) {
                Ok(d) => core.restore_dispositions(k.value(), &d),
                Err(e) => tracing::error!(fs = k.value(), "unreadable dispositions: {e}"),
            }
        }
        drop(r);
        let floor = reserved_before.unwrap_or(1);
        core.set_token_floor(floor);
        let dm = Dm {
            max_sessions: cfg.max_sessions,
            attach_workers: cfg.attach_workers.max(1),
            ops_pool: crate::pool::Pool::new("strata-fs-op", cfg.op_threads, cfg.op_queue),
            inval_pool: crate::pool::Pool::new("strata-fs-inval", 4, 1 << 16),
            inner: Mutex::new(Inner {
                core,
                wakers: HashMap::new(),
                ops: HashMap::new(),
                filesystems,
                next_op: 1,
                reserved: floor,
                published: (u64::MAX, u64::MAX),
                fs_generation: 0,
            }),
            views: ArcSwap::default(),
            records: Records::default(),
            epoch: Instant::now(),
            db,
        };
        dm.records
            .stored_tokens
            .store(floor, AtomicOrdering::Release);
        {
            let mut g = dm.lock();
            // (the floor itself may be all that is stored: the next token is refused
            // until a reservation is, just below)
            let _ = dm.reserve_tokens(&mut g);
            dm.publish(&mut g);
        }
        dm.flush();
        anyhow::ensure!(
            dm.records.stored_tokens.load(AtomicOrdering::Acquire) > dm.lock().core.next_token(),
            "cannot store the DM token reservation"
        );
        Ok(dm)
    }

    /// Keep the on-disk reservation ahead of the tokens issued: half a block before the
    /// tokens reach it, a new reservation is queued (stored by [`Dm::flush`] after the lock
    /// is released, long before the tokens get there).
    ///
    /// `Err` when the next token would pass the reservation *stored* (one queued, or none
    /// could be stored): the caller must not issue it, or a token could repeat after a
    /// crash.
    fn reserve_tokens(&self, g: &mut Inner) -> Result<(), DmError> {
        let stored = self.records.stored_tokens.load(AtomicOrdering::Acquire);
        g.reserved = stored;
        let next = g.core.next_token();
        if next + TOKEN_BLOCK / 2 >= stored
            && !self
                .records
                .tokens_queued
                .swap(true, AtomicOrdering::AcqRel)
        {
            self.records.push(Record::Tokens(next + TOKEN_BLOCK));
        }
        if next >= stored {
            return Err(DmError::Enomem);
        }
        Ok(())
    }

    /// Store every record queued so far (not under the DM lock: whoever comes first
    /// commits the records of everyone waiting, in the order they were queued, in one
    /// transaction). Failures are logged: as before, a record that cannot be stored
    /// leaves the state in memory as it is.
    fn flush(&self) {
        let mut committed = self
            .records
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let batch: Vec<(u64, Record)> = {
            let mut q = self.records.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.drain(..).collect()
        };
        let Some(last) = batch.last().map(|(seq, _)| *seq) else {
            return;
        };
        let r = (|| -> anyhow::Result<()> {
            let w = self.db.begin_write()?;
            {
                let mut sessions = w.open_table(SESSIONS)?;
                let mut disp = w.open_table(DISPOSITIONS)?;
                let mut meta = w.open_table(META)?;
                for (_, rec) in &batch {
                    match rec {
                        Record::Session(sid, Some(info)) => {
                            sessions.insert(*sid, info.as_slice())?;
                        }
                        Record::Session(sid, None) => {
                            sessions.remove(*sid)?;
                        }
                        Record::Dispositions(fs, d) if d.is_empty() => {
                            disp.remove(*fs)?;
                        }
                        Record::Dispositions(fs, d) => {
                            disp.insert(*fs, serde_json::to_vec(d)?.as_slice())?;
                        }
                        Record::Tokens(reserved) => {
                            meta.insert("token_reserved", *reserved)?;
                        }
                    }
                }
            }
            w.commit()?;
            Ok(())
        })();
        let tokens = batch.iter().filter_map(|(_, rec)| match rec {
            Record::Tokens(t) => Some(*t),
            _ => None,
        });
        let tokens = tokens.max();
        match r {
            Ok(()) => {
                if let Some(t) = tokens {
                    self.records
                        .stored_tokens
                        .fetch_max(t, AtomicOrdering::AcqRel);
                }
            }
            Err(e) => tracing::error!(
                records = batch.len(),
                "cannot record DM sessions, dispositions or token reservations: {e}"
            ),
        }
        if tokens.is_some() {
            // stored or not, the next reservation may be queued (again)
            self.records
                .tokens_queued
                .store(false, AtomicOrdering::Release);
        }
        *committed = last;
    }

    fn record_session(&self, sid: u64, info: Option<&[u8]>) {
        self.records
            .push(Record::Session(sid, info.map(<[u8]>::to_vec)));
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.epoch.elapsed().as_millis() as u64;
        g.core.set_now(now);
        g
    }

    fn apply(g: &mut Inner, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Answer { op, response } => match g.ops.remove(&op) {
                    Some(OpWaiter::Api { tx, .. }) => {
                        let _ = tx.send(DmReply::Answered { response });
                    }
                    Some(OpWaiter::Local { tx }) => {
                        let _ = tx.send(response);
                    }
                    None => {}
                },
                Output::Events {
                    waiter,
                    session,
                    messages,
                } => {
                    let undelivered = match g.wakers.remove(&waiter) {
                        Some((_, tx)) => match tx.send(DmReply::Events { messages }) {
                            Ok(()) => None,
                            Err(DmReply::Events { messages }) => Some(messages),
                            Err(_) => None,
                        },
                        None => Some(messages),
                    };
                    // the caller left: the messages are not lost
                    if let Some(m) = undelivered.filter(|m| !m.is_empty()) {
                        let more = g.core.undeliver(session, m);
                        Self::apply(g, more);
                    }
                }
                Output::Right { waiter, result } => {
                    if let Some((_, tx)) = g.wakers.remove(&waiter) {
                        let _ = tx.send(match result {
                            Ok(()) => DmReply::Ok,
                            Err(error) => DmReply::Error { error },
                        });
                    }
                }
            }
        }
    }

    /// The pool of filesystem operations that may wait for a DM application.
    pub fn ops_pool(&self) -> &crate::pool::Pool {
        &self.ops_pool
    }

    /// The pool of page-cache invalidations.
    pub fn inval_pool(&self) -> &crate::pool::Pool {
        &self.inval_pool
    }

    /// Threads answering the events of one attached policy.
    pub fn attach_workers(&self) -> usize {
        self.attach_workers
    }

    /// Republish the hot path's view if dispositions or filesystem records changed (called
    /// under the lock after every change, so readers never see an older state than the
    /// last change that was answered).
    fn publish(&self, g: &mut Inner) {
        let now = (g.core.disposition_generation(), g.fs_generation);
        if g.published == now {
            return;
        }
        let mut views: HashMap<FsId, FsView> = g
            .filesystems
            .iter()
            .map(|(fs, rec)| {
                let v = FsView {
                    events: rec.events,
                    ..FsView::default()
                };
                (*fs, v)
            })
            .collect();
        for fs in g.core.disposed_filesystems() {
            let v = views.entry(fs).or_default();
            v.disposed = g.core.disposed_set(fs);
            v.sync = g.core.any_sync_disposed(fs);
        }
        self.views.store(Arc::new(views));
        g.published = now;
    }

    fn view(&self, fs: FsId) -> FsView {
        self.views.load().get(&fs).copied().unwrap_or_default()
    }

    fn park(g: &mut Inner, client: u64) -> (WaiterId, Parked) {
        let w = g.core.waiter();
        let (tx, rx) = oneshot::channel();
        g.wakers.insert(w, (client, tx));
        (w, rx)
    }

    /// Serve a call from connection `client` (whose peer may use DMAPI).
    pub fn call(&self, client: u64, req: DmRequest, payload: Vec<u8>) -> DmStep {
        let mut g = self.lock();
        let step = self.call_locked(&mut g, client, req, payload);
        self.publish(&mut g);
        drop(g);
        // what the call changed is stored before it is answered
        self.flush();
        step
    }

    fn call_locked(&self, g: &mut Inner, client: u64, req: DmRequest, payload: Vec<u8>) -> DmStep {
        let r: Result<DmReply, DmError> = match req {
            DmRequest::CreateSession { old, info }
                if old == super::NO_SESSION && g.core.sessions().len() >= self.max_sessions =>
            {
                let _ = info;
                // the configured resources are used up
                Err(DmError::Enomem)
            }
            DmRequest::CreateSession { old, info } => {
                g.core.create_session(old, &info).map(|sid| {
                    let info = g.core.query_session(sid).unwrap_or(info);
                    self.record_session(sid, Some(&info));
                    DmReply::Session { sid }
                })
            }
            DmRequest::DestroySession { sid } => g.core.destroy_session(sid).map(|out| {
                self.record_session(sid, None);
                Self::apply(g, out);
                DmReply::Ok
            }),
            DmRequest::InitService => Ok(DmReply::Version {
                version: format!("strata-dmapi {}", env!("CARGO_PKG_VERSION")),
            }),
            DmRequest::SetDisp {
                sid,
                fs_handle,
                events,
            } => self.fs_of(g, &fs_handle).and_then(|fs| {
                if fs == GLOBAL_FS && events.types().iter().any(|t| *t != EventType::Mount) {
                    // only mount events are disposed on the global handle
                    return Err(DmError::Einval);
                }
                if fs != GLOBAL_FS && events.contains(EventType::Mount) {
                    return Err(DmError::Einval);
                }
                g.core.set_disp(sid, fs, events)?;
                self.record_dispositions(g, fs);
                Ok(DmReply::Ok)
            }),
            DmRequest::GetallDisp { sid, buflen } => check_buflen(buflen).and_then(|()| {
                let disp = g.core.getall_disp(sid)?;
                fits(buflen, &disp)?;
                Ok(DmReply::Dispositions { disp })
            }),
            DmRequest::QuerySession { sid } => {
                g.core.query_session(sid).map(|info| DmReply::Info { info })
            }
            DmRequest::Sessions { nelem } => nelem_ok(nelem).and_then(|()| {
                let sids = g.core.sessions();
                if nelem.is_some_and(|n| (n as usize) < sids.len()) {
                    return Err(DmError::E2big);
                }
                Ok(DmReply::Sessions { sids })
            }),
            DmRequest::Tokens { sid, nelem } => nelem_ok(nelem).and_then(|()| {
                let tokens = g.core.tokens(sid)?;
                if nelem.is_some_and(|n| (n as usize) < tokens.len()) {
                    return Err(DmError::E2big);
                }
                Ok(DmReply::Tokens { tokens })
            }),
            DmRequest::GetEvents { sid, max, wait } => {
                let parked = wait.then(|| Self::park(g, client));
                match g.core.get_events(sid, max, parked.as_ref().map(|p| p.0)) {
                    Ok(Some(messages)) => {
                        if let Some((w, _)) = parked {
                            g.wakers.remove(&w);
                        }
                        Ok(DmReply::Events { messages })
                    }
                    Ok(None) => return DmStep::Parked(parked.expect("parked").1),
                    Err(e) => {
                        if let Some((w, _)) = parked {
                            g.wakers.remove(&w);
                        }
                        Err(e)
                    }
                }
            }
            DmRequest::FindEvent { sid, token } => g
                .core
                .find_eventmsg(sid, token)
                .map(|m| DmReply::Events { messages: vec![m] }),
            DmRequest::Respond {
                sid,
                token,
                response,
            } => g.core.respond(sid, token, response).map(|out| {
                Self::apply(g, out);
                DmReply::Ok
            }),
            DmRequest::Pending {
                sid,
                token,
                delay_ms,
            } => g.core.pending(sid, token, delay_ms).map(|()| DmReply::Ok),
            DmRequest::MoveEvent { sid, token, target } => {
                g.core.move_event(sid, token, target).map(|out| {
                    Self::apply(g, out);
                    DmReply::Ok
                })
            }
            DmRequest::SendMsg { sid, sync } => {
                let op = g.next_op;
                g.next_op += 1;
                if let Err(error) = self.reserve_tokens(g) {
                    tracing::error!("no DM token reserved on disk: send_msg refused");
                    return DmStep::Done(DmReply::Error { error });
                }
                match g.core.send_msg(sid, sync, payload, op) {
                    Ok((Raised::Blocked(token), out)) => {
                        let (tx, rx) = oneshot::channel();
                        g.ops.insert(op, OpWaiter::Api { client, token, tx });
                        Self::apply(g, out);
                        return DmStep::Parked(rx);
                    }
                    Ok((_, out)) => {
                        Self::apply(g, out);
                        Ok(DmReply::Ok)
                    }
                    Err(e) => Err(e),
                }
            }
            DmRequest::RequestRight {
                sid,
                token,
                object,
                right,
                wait,
            } => {
                let parked = wait.then(|| Self::park(g, client));
                match g
                    .core
                    .request_right(sid, token, &object, right, parked.as_ref().map(|p| p.0))
                {
                    Ok(false) => return DmStep::Parked(parked.expect("parked").1),
                    r => {
                        if let Some((w, _)) = parked {
                            g.wakers.remove(&w);
                        }
                        r.map(|_| DmReply::Ok)
                    }
                }
            }
            DmRequest::ReleaseRight { sid, token, object } => {
                g.core.release_right(sid, token, &object).map(|out| {
                    Self::apply(g, out);
                    DmReply::Ok
                })
            }
            DmRequest::UpgradeRight { sid, token, object } => g
                .core
                .upgrade_right(sid, token, &object)
                .map(|()| DmReply::Ok),
            DmRequest::DowngradeRight { sid, token, object } => {
                g.core.downgrade_right(sid, token, &object).map(|out| {
                    Self::apply(g, out);
                    DmReply::Ok
                })
            }
            DmRequest::QueryRight { sid, token, object } => g
                .core
                .query_right(sid, token, &object)
                .map(|right| DmReply::Right { right }),
            DmRequest::Unknown => Err(DmError::Enosys),
            // served by the filesystem layer (`crate::fs`)
            _ => Err(DmError::Enosys),
        };
        DmStep::Done(r.unwrap_or_else(|error| DmReply::Error { error }))
    }

    /// A connection closed (or gave up a parked call): its parked calls are forgotten and
    /// the events of its blocked synchronous messages cancelled. Its sessions stay, for a
    /// DM application to assume.
    pub fn disconnect(&self, client: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        let mine: Vec<WaiterId> = g
            .wakers
            .iter()
            .filter(|(_, (c, _))| *c == client)
            .map(|(w, _)| *w)
            .collect();
        for w in mine {
            g.wakers.remove(&w);
            g.core.forget_waiter(w);
        }
        let ops: Vec<(OpId, Token)> = g
            .ops
            .iter()
            .filter_map(|(op, w)| match w {
                OpWaiter::Api {
                    client: c, token, ..
                } if *c == client => Some((*op, *token)),
                _ => None,
            })
            .collect();
        for (op, token) in ops {
            g.ops.remove(&op);
            let out = g.core.cancel(token);
            Self::apply(g, out);
        }
    }

    /// The filesystem a filesystem handle names (empty: the global handle). A malformed
    /// handle is EINVAL, an unknown filesystem EBADF.
    fn fs_of(&self, g: &Inner, fs_handle: &[u8]) -> Result<FsId, DmError> {
        if fs_handle.is_empty() {
            return Ok(GLOBAL_FS);
        }
        let h = Handle::decode(fs_handle)?;
        if h.kind != HandleKind::Fs {
            return Err(DmError::Einval);
        }
        if !g.filesystems.contains_key(&h.fs) {
            return Err(DmError::Ebadf);
        }
        Ok(h.fs)
    }

    fn record_dispositions(&self, g: &Inner, fs: FsId) {
        self.records
            .push(Record::Dispositions(fs, g.core.dispositions_of(fs)));
    }

    fn record_fs(&self, fs: FsId, rec: &FsRecord) -> Result<(), DmError> {
        let r = (|| -> anyhow::Result<()> {
            let w = self.db.begin_write()?;
            w.open_table(FILESYSTEMS)?
                .insert(fs, serde_json::to_vec(rec)?.as_slice())?;
            w.commit()?;
            Ok(())
        })();
        r.map_err(|e| {
            tracing::error!(fs, "cannot record filesystem: {e}");
            DmError::Enomem
        })
    }

    /// The id of the filesystem backed by `backing` (canonical), registered on first use:
    /// the same backing directory keeps its id across remounts and restarts.
    pub fn register_fs(&self, backing: &std::path::Path) -> Result<FsId, DmError> {
        let mut g = self.lock();
        if let Some((id, _)) = g.filesystems.iter().find(|(_, r)| r.backing == backing) {
            return Ok(*id);
        }
        let id = g.filesystems.keys().max().copied().unwrap_or(GLOBAL_FS) + 1;
        let rec = FsRecord {
            backing: backing.to_path_buf(),
            mountpoint: None,
            read_only: false,
            events: EventSet::empty(),
            destroy_attr: None,
        };
        self.record_fs(id, &rec)?;
        g.filesystems.insert(id, rec);
        g.fs_generation += 1;
        self.publish(&mut g);
        Ok(id)
    }

    /// A filesystem's record.
    pub fn fs_record(&self, fs: FsId) -> Option<FsRecord> {
        self.lock().filesystems.get(&fs).cloned()
    }

    /// A filesystem's event list (empty for an unknown one).
    pub fn fs_events(&self, fs: FsId) -> EventSet {
        self.view(fs).events
    }

    /// All filesystem records.
    pub fn fs_records(&self) -> Vec<(FsId, FsRecord)> {
        let mut v: Vec<_> = self
            .lock()
            .filesystems
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Change a filesystem's record (persisted before it is changed in memory).
    pub fn update_fs(&self, fs: FsId, f: impl FnOnce(&mut FsRecord)) -> Result<(), DmError> {
        let mut g = self.lock();
        let mut rec = g.filesystems.get(&fs).cloned().ok_or(DmError::Ebadf)?;
        f(&mut rec);
        self.record_fs(fs, &rec)?;
        g.filesystems.insert(fs, rec);
        g.fs_generation += 1;
        self.publish(&mut g);
        Ok(())
    }

    /// Check a DM call's session, token and right on `object`.
    pub fn check_right(
        &self,
        sid: u64,
        token: Token,
        object: &[u8],
        need: super::Right,
    ) -> Result<(), DmError> {
        self.lock().core.check_right(sid, token, object, need)
    }

    /// Whether an event of `kind` on `fs` goes to some session (no lock: see
    /// [`Dm::publish`]; an event raised just as its disposition goes is dropped by
    /// [`Dm::raise`], which asks the core again).
    pub fn disposed(&self, fs: FsId, kind: EventType) -> bool {
        self.view(fs).disposed.contains(kind)
    }

    /// When an event of `kind` on `fs` goes to some session: the filesystem's event list
    /// (both read from one published view, without the DM lock).
    pub fn disposed_events(&self, fs: FsId, kind: EventType) -> Option<EventSet> {
        let v = self.view(fs);
        v.disposed.contains(kind).then_some(v.events)
    }

    /// Whether some synchronous event on `fs` goes to a session (operations there may
    /// wait, so the filesystem layer runs them off its dispatch thread). No lock.
    pub fn may_block(&self, fs: FsId) -> bool {
        self.view(fs).sync
    }

    /// Raise an event for an operation (synchronous types block it: wait with
    /// [`Dm::wait`]).
    pub fn raise(&self, fs: FsId, kind: EventType, data: EventData) -> Raise {
        let mut guard = self.lock();
        let g = &mut *guard;
        if kind.is_sync() {
            if let Err(e) = self.reserve_tokens(g) {
                // as before the records were stored off the lock: the operation goes on
                // without its event rather than with a token that could repeat
                static LIMIT: strata_common::ratelimit::LogLimit =
                    strata_common::ratelimit::LogLimit::new(3, std::time::Duration::from_secs(10));
                strata_common::log_limited!(
                    LIMIT,
                    error,
                    ?kind,
                    "no DM token reserved on disk ({e}): a synchronous event is not raised"
                );
                drop(guard);
                self.flush_if_queued();
                return Raise::Go;
            }
        }
        let op = g.next_op;
        g.next_op += 1;
        let (raised, out) = g.core.raise(fs, kind, data, op);
        if !matches!(raised, Raised::NotDisposed) {
            metrics::counter!("strata_dm_events_total", "type" => kind.name()).increment(1);
        }
        let r = match raised {
            Raised::Blocked(token) => {
                let (tx, rx) = mpsc::channel();
                g.ops.insert(op, OpWaiter::Local { tx });
                Raise::Wait {
                    op,
                    token,
                    rx,
                    kind,
                    since: Instant::now(),
                }
            }
            _ => Raise::Go,
        };
        Self::apply(g, out);
        drop(guard);
        self.flush_if_queued();
        r
    }

    /// Store queued records, if any (cheap when there are none).
    fn flush_if_queued(&self) {
        let queued = !self
            .records
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if queued {
            self.flush();
        }
    }

    /// Wait for a raised event's answer: `Ok` to go on, `Err(errno)` to fail the operation
    /// (an abort, or the configured errno after the timeout). `alive` is asked now and then;
    /// when the operation's caller is gone the event is cancelled and EINTR returned.
    pub fn wait(&self, raised: Raise, alive: &dyn Fn() -> bool) -> Result<(), i32> {
        let Raise::Wait {
            op,
            token,
            rx,
            kind,
            since,
        } = raised
        else {
            return Ok(());
        };
        loop {
            let got = rx.recv_timeout(std::time::Duration::from_millis(100));
            if got.is_ok() {
                metrics::histogram!("strata_dm_event_answer_seconds", "type" => kind.name())
                    .record(since.elapsed().as_secs_f64());
            }
            match got {
                Ok(Response::Abort(errno)) => {
                    return Err(if (1..=super::core::MAX_ERRNO).contains(&errno) {
                        errno
                    } else {
                        libc::EIO
                    });
                }
                Ok(_) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(libc::EIO),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !alive() {
                        let mut g = self.lock();
                        let g = &mut *g;
                        g.ops.remove(&op);
                        let out = g.core.cancel(token);
                        Self::apply(g, out);
                        return Err(libc::EINTR);
                    }
                }
            }
        }
    }

    /// Time passed: unanswered synchronous events time out.
    pub fn tick(&self) {
        let mut g = self.lock();
        let now = self.epoch.elapsed().as_millis() as u64;
        let out = g.core.tick(now);
        Self::apply(&mut g, out);
    }
}

/// The buflen rule of seed 001: INT_MAX or more is EINVAL.
pub fn check_buflen(buflen: Option<u64>) -> Result<(), DmError> {
    match buflen {
        Some(n) if n >= i32::MAX as u64 => Err(DmError::Einval),
        _ => Ok(()),
    }
}

/// E2BIG when the answer does not fit the caller's buffer (its JSON size).
pub fn fits<T: serde::Serialize>(buflen: Option<u64>, v: &T) -> Result<(), DmError> {
    match buflen {
        Some(n)
            if serde_json::to_vec(v)
                .map(|b| b.len() as u64)
                .unwrap_or(u64::MAX)
                > n =>
        {
            Err(DmError::E2big)
        }
        _ => Ok(()),
    }
}

/// The nelem rule of seed 001: more than MAX_NELEM is EINVAL.
fn nelem_ok(nelem: Option<u32>) -> Result<(), DmError> {
    match nelem {
        Some(n) if n > super::MAX_NELEM => Err(DmError::Einval),
        _ => Ok(()),
    }
}
