//! DM applications inside the daemon: a `dm-policy` plugin slot (or a native policy)
//! attached to a managed filesystem gets a DM session of its own, the dispositions of the
//! event types it asked for, and `dm.attach_workers` worker threads that take the session's
//! events (a few at a time each, so one slow answer holds up no other) and call the policy: `on-event` for synchronous ones (its answer is the response), `on-notify` for
//! the others. The policy's `dm-host` imports run as DM calls of that session under the
//! event's token (the right a call needs is requested under the token first).
//!
//! Events wait in the session's queue, so a hot swap of the slot (or a daemon restart: the
//! attachment is recorded in redb `dm_attachments` and comes back) loses none.

use super::Mounts;
use crate::dm::attrs::flags as region_flags;
use crate::dm::handle::Handle;
use crate::dm::service::DmStep;
use crate::dm::{self as dm, DmReply, DmRequest, EventSet, EventType, SessionId, Token};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use strata_plugin_host::{self as wit, DmBackend, PluginHost};

const ATTACHMENTS: redb::TableDefinition<&str, &[u8]> =
    redb::TableDefinition::new("dm_attachments");

/// A policy the router can call: a Wasm slot or native code.
pub trait Policy: Send + Sync + 'static {
    /// A synchronous event: the answer.
    fn on_event(&self, event: &wit::Event, backend: Arc<dyn DmBackend>) -> wit::Response;
    /// An asynchronous event.
    fn on_notify(&self, event: &wit::Event, backend: Arc<dyn DmBackend>);
}

/// A `dm-policy` slot of the plugin host.
pub struct WasmPolicy {
    /// The host.
    pub host: PluginHost,
    /// The slot.
    pub slot: String,
}

/// A policy's failing calls (a slot gone, a trap, a deadline) are logged rate-limited.
static EVENT_LOG: strata_common::ratelimit::LogLimit =
    strata_common::ratelimit::LogLimit::new(5, std::time::Duration::from_secs(1));

impl Policy for WasmPolicy {
    fn on_event(&self, event: &wit::Event, backend: Arc<dyn DmBackend>) -> wit::Response {
        match self.host.on_event(&self.slot, event, Some(backend)) {
            Ok(s) => s.value,
            Err(e) => {
                // the slot is gone: no opinion, the operation goes on (every file
                // operation of any user may end here: a few lines a second)
                strata_common::log_limited!(EVENT_LOG, error, slot = %self.slot, "on-event: {e}");
                wit::Response::DontCare
            }
        }
    }
    fn on_notify(&self, event: &wit::Event, backend: Arc<dyn DmBackend>) {
        if let Err(e) = self.host.on_notify(&self.slot, event, Some(backend)) {
            strata_common::log_limited!(EVENT_LOG, error, slot = %self.slot, "on-notify: {e}");
        }
    }
}

/// What is recorded about an attachment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachRecord {
    /// The managed filesystem's mount point (where the plugin was attached).
    pub path: PathBuf,
    /// Event types.
    pub events: EventSet,
    /// The plugin's session.
    pub sid: SessionId,
}

struct Attached {
    sid: SessionId,
    client: u64,
    stop: Arc<AtomicBool>,
    /// `dm.attach_workers` threads taking the session's events.
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The attachments of policies to filesystems.
pub struct Router {
    mounts: Arc<Mounts>,
    db: Arc<strata_common::store::Db>,
    attached: Mutex<HashMap<String, Attached>>,
    /// Attaches and detaches one at a time (a name is checked and taken atomically).
    changing: Mutex<()>,
}

/// Pseudo client ids of in-daemon DM applications (socket clients count up from 1).
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(u64::MAX / 2);

fn reply(step: DmStep) -> DmReply {
    match step {
        DmStep::Done(r) => r,
        DmStep::Parked(rx) => rx.blocking_recv().unwrap_or(DmReply::Error {
            error: dm::DmError::Estale,
        }),
    }
}

/// An in-daemon DM call without payload: its reply, or its error.
fn dm_call(
    dm: &crate::dm::service::Dm,
    client: u64,
    req: DmRequest,
) -> Result<DmReply, dm::DmError> {
    ok(reply(dm.call(client, req, vec![])))
}

fn ok(r: DmReply) -> Result<DmReply, dm::DmError> {
    match r {
        DmReply::Error { error } => Err(error),
        r => Ok(r),
    }
}

impl Router {
    /// No attachments yet (see [`Router::restore`]).
    pub fn new(mounts: Arc<Mounts>, db: Arc<strata_common::store::Db>) -> anyhow::Result<Router> {
        let w = db.begin_write()?;
        w.open_table(ATTACHMENTS)?;
        w.commit()?;
        Ok(Router {
            mounts,
            db,
            attached: Mutex::new(HashMap::new()),
            changing: Mutex::new(()),
        })
    }

    fn records(&self) -> anyhow::Result<Vec<(String, AttachRecord)>> {
        let r = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in r.open_table(ATTACHMENTS)?.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    fn record(&self, name: &str, rec: Option<&AttachRecord>) -> anyhow::Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(ATTACHMENTS)?;
            match rec {
                Some(r) => {
                    t.insert(name, serde_json::to_vec(r)?.as_slice())?;
                }
                None => {
                    t.remove(name)?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// The attachments: name, mount point, events, session.
    pub fn list(&self) -> Vec<(String, AttachRecord)> {
        self.records().unwrap_or_default()
    }

    /// Attach `policy` (named `name`) to the managed filesystem mounted at `path` for
    /// `events`: its session (a new one, or `sid` when given and alive) gets the
    /// dispositions and the filesystem's event list includes the types.
    pub fn attach(
        &self,
        name: &str,
        policy: Arc<dyn Policy>,
        path: &std::path::Path,
        events: EventSet,
        sid: Option<SessionId>,
    ) -> Result<SessionId, dm::DmError> {
        let (fs, _, _) = self.mounts.locate(path)?;
        self.attach_fs(name, policy, path, fs, events, sid)
    }

    /// [`Router::attach`] to filesystem `fs` (mounted or not: a restore attaches before
    /// the mounts come back, so that the policy answers their MOUNT events).
    fn attach_fs(
        &self,
        name: &str,
        policy: Arc<dyn Policy>,
        path: &std::path::Path,
        fs: dm::FsId,
        events: EventSet,
        sid: Option<SessionId>,
    ) -> Result<SessionId, dm::DmError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
        {
            return Err(dm::DmError::Eexist);
        }
        let dm = self.mounts.dm().clone();
        let client = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        let info = format!("plugin:{name}").into_bytes();
        let assumed = sid.and_then(|old| {
            dm_call(
                &dm,
                client,
                DmRequest::CreateSession {
                    old,
                    info: info.clone(),
                },
            )
            .ok()
        });
        let sid = match assumed {
            Some(DmReply::Session { sid }) => sid,
            _ => match dm_call(
                &dm,
                client,
                DmRequest::CreateSession {
                    old: dm::NO_SESSION,
                    info,
                },
            )? {
                DmReply::Session { sid } => sid,
                _ => return Err(dm::DmError::Estale),
            },
        };
        let set_up = || -> Result<(), dm::DmError> {
            let fs_handle = Mounts::fs_handle(fs);
            let (mount, rest): (Vec<EventType>, Vec<EventType>) = events
                .types()
                .into_iter()
                .partition(|t| *t == EventType::Mount);
            let rest = EventSet::of(&rest);
            dm_call(
                &dm,
                client,
                DmRequest::SetDisp {
                    sid,
                    fs_handle,
                    events: rest,
                },
            )?;
            if !mount.is_empty() {
                dm_call(
                    &dm,
                    client,
                    DmRequest::SetDisp {
                        sid,
                        fs_handle: vec![],
                        events: EventSet::of(&mount),
                    },
                )?;
            }
            let mut fs_events = dm.fs_events(fs);
            for t in rest.types() {
                fs_events.set(t);
            }
            dm.update_fs(fs, |r| r.events = fs_events)?;
            let rec = AttachRecord {
                path: path.to_path_buf(),
                events,
                sid,
            };
            self.record(name, Some(&rec)).map_err(|e| {
                tracing::error!(name, "cannot record the attachment: {e}");
                dm::DmError::Enomem
            })
        };
        if let Err(e) = set_up() {
            // leave nothing behind: no dispositions, no session
            release_session(&dm, client, sid);
            return Err(e);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let backend: Arc<dyn DmBackend> = Arc::new(Backend {
            mounts: self.mounts.clone(),
            sid,
            client,
        });
        // several workers take the session's events (a few at a time each), so that a
        // slow answer does not hold up the others; each call takes an idle instance of
        // the policy from its version's pool
        let mut threads = Vec::new();
        for i in 0..dm.attach_workers() {
            let (stop, slot, service) = (stop.clone(), name.to_string(), dm.clone());
            let (policy, backend) = (policy.clone(), backend.clone());
            match std::thread::Builder::new()
                .name(format!("strata-dm-{name}-{i}"))
                .spawn(move || worker(&slot, sid, client, service, policy, backend, stop))
            {
                Ok(t) => threads.push(t),
                Err(e) if threads.is_empty() => {
                    tracing::error!(name, "cannot start an attachment worker: {e}");
                    return Err(dm::DmError::Enomem);
                }
                Err(e) => {
                    tracing::warn!(
                        name,
                        workers = threads.len(),
                        "fewer attachment workers than configured: {e}"
                    );
                    break;
                }
            }
        }
        self.attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_string(),
                Attached {
                    sid,
                    client,
                    stop,
                    threads,
                },
            );
        tracing::info!(name, sid, fs, events = ?events.types(), "policy attached");
        Ok(sid)
    }

    /// Detach: the worker stops, the dispositions go, the session is destroyed (its
    /// outstanding events, if any, keep it: they time out first).
    pub fn detach(&self, name: &str) -> Result<(), dm::DmError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let a = self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let rec = self
            .records()
            .ok()
            .and_then(|r| r.into_iter().find(|(n, _)| n == name).map(|(_, r)| r));
        let Some(sid) = a.as_ref().map(|a| a.sid).or(rec.as_ref().map(|r| r.sid)) else {
            return Err(dm::DmError::Enoent);
        };
        let dm = self.mounts.dm().clone();
        if let Some(a) = a {
            stop_worker(&dm, a);
        }
        release_session(&dm, NEXT_CLIENT.fetch_add(1, Ordering::Relaxed), sid);
        if let Err(e) = self.record(name, None) {
            tracing::error!(name, "cannot forget the attachment: {e}");
        }
        Ok(())
    }

    /// Attach again what was attached when the daemon stopped (slots of the plugin host).
    ///
    /// Call it before [`Mounts::restore`]: the filesystem is found from its record (where
    /// it was mounted), the policy's session is assumed again and its worker started, so a
    /// policy disposed for MOUNT answers the MOUNT event of the remount (otherwise nobody
    /// would, and the remount would wait for the event timeout). An attachment whose
    /// filesystem is not recorded as mounted stays recorded and is reported.
    pub fn restore(&self, host: &PluginHost) {
        for (name, rec) in self.records().unwrap_or_default() {
            let policy = Arc::new(WasmPolicy {
                host: host.clone(),
                slot: name.clone(),
            });
            let fs = self.mounts.locate(&rec.path).map(|(fs, _, _)| fs).ok();
            let Some(fs) = fs.or_else(|| self.mounts.recorded_at(&rec.path)) else {
                tracing::error!(name, path = %rec.path.display(), "cannot attach the policy again: no managed filesystem is recorded there");
                continue;
            };
            match self.attach_fs(&name, policy, &rec.path, fs, rec.events, Some(rec.sid)) {
                Ok(sid) => {
                    tracing::info!(name, sid, path = %rec.path.display(), "policy attached again")
                }
                Err(e) => {
                    tracing::error!(name, path = %rec.path.display(), "cannot attach the policy again: {e}")
                }
            }
        }
    }

    /// Stop every worker (the daemon stops; the records stay).
    pub fn shutdown(&self) {
        let all: Vec<_> = self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, a) in all {
            stop_worker(self.mounts.dm(), a);
        }
    }
}

/// Stop a worker: it may be about to park in get_events, so its parked call is dropped
/// until it has seen the stop flag.
fn stop_worker(dm: &crate::dm::service::Dm, mut a: Attached) {
    a.stop.store(true, Ordering::Release);
    for t in a.threads.drain(..) {
        while !t.is_finished() {
            dm.disconnect(a.client);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = t.join();
    }
}

/// Give a session up: its dispositions cleared (no new events), its outstanding events
/// answered "don't care", and it is destroyed.
fn release_session(dm: &crate::dm::service::Dm, client: u64, sid: SessionId) {
    if let Ok(DmReply::Dispositions { disp }) =
        dm_call(dm, client, DmRequest::GetallDisp { sid, buflen: None })
    {
        for (fs, _) in disp {
            let fs_handle = if fs == crate::dm::service::GLOBAL_FS {
                vec![]
            } else {
                Mounts::fs_handle(fs)
            };
            let _ = dm.call(
                client,
                DmRequest::SetDisp {
                    sid,
                    fs_handle,
                    events: EventSet::empty(),
                },
                vec![],
            );
        }
    }
    if let Ok(DmReply::Tokens { tokens }) =
        dm_call(dm, client, DmRequest::Tokens { sid, nelem: None })
    {
        for token in tokens {
            let _ = dm.call(
                client,
                DmRequest::Respond {
                    sid,
                    token,
                    response: dm::Response::Dontcare,
                },
                vec![],
            );
        }
    }
    if let DmReply::Error { error } =
        reply(dm.call(client, DmRequest::DestroySession { sid }, vec![]))
    {
        tracing::warn!(sid, "cannot destroy the policy's session: {error}");
    }
    dm.disconnect(client);
}

/// Events one worker takes at a time: few, so that the others get the rest.
const EVENTS_PER_WORKER_CALL: u32 = 4;

fn worker(
    name: &str,
    sid: SessionId,
    client: u64,
    service: Arc<crate::dm::service::Dm>,
    policy: Arc<dyn Policy>,
    backend: Arc<dyn DmBackend>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        let r = reply(service.call(
            client,
            DmRequest::GetEvents {
                sid,
                max: EVENTS_PER_WORKER_CALL,
                wait: true,
            },
            vec![],
        ));
        let messages = match r {
            DmReply::Events { messages } => messages,
            DmReply::Error { error } => {
                if !stop.load(Ordering::Acquire) {
                    tracing::error!(name, "get_events: {error}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            _ => continue,
        };
        for m in messages {
            let event = to_wit(sid, &m);
            if m.token != dm::INVALID_TOKEN {
                let response = match policy.on_event(&event, backend.clone()) {
                    wit::Response::Continue => dm::Response::Continue,
                    wit::Response::DontCare => dm::Response::Dontcare,
                    // an errno the kernel would refuse becomes EIO
                    wit::Response::Abort(e) => dm::Response::Abort(
                        i32::try_from(e)
                            .ok()
                            .filter(|e| (1..=crate::dm::core::MAX_ERRNO).contains(e))
                            .unwrap_or(libc::EIO),
                    ),
                };
                if let DmReply::Error { error } = reply(service.call(
                    client,
                    DmRequest::Respond {
                        sid,
                        token: m.token,
                        response,
                    },
                    vec![],
                )) {
                    // cancelled or timed out meanwhile
                    tracing::debug!(name, token = m.token, "respond: {error}");
                }
            } else {
                policy.on_notify(&event, backend.clone());
            }
        }
    }
}

/// The DM message as the WIT `event`.
pub fn to_wit(sid: SessionId, m: &dm::Message) -> wit::Event {
    let some = |v: &Vec<u8>| (!v.is_empty()).then(|| v.clone());
    let some_s = |v: &String| (!v.is_empty()).then(|| v.clone());
    let data = match &m.data {
        dm::EventData::Data {
            handle,
            offset,
            length,
        } => wit::EventData::Data(wit::DataEvent {
            handle: handle.clone(),
            offset: *offset,
            length: *length,
        }),
        dm::EventData::Namespace {
            mode,
            handle1,
            handle2,
            name1,
            name2,
            retcode,
        } => wit::EventData::Namespace(wit::NamespaceEvent {
            mode: *mode,
            handle1: handle1.clone(),
            handle2: some(handle2),
            name1: some_s(name1),
            name2: some_s(name2),
            retcode: *retcode,
        }),
        dm::EventData::Mount {
            mode,
            fs_handle,
            mount_point,
            backing,
            root_handle,
        } => wit::EventData::Mount(wit::MountEvent {
            mode: *mode,
            handle1: fs_handle.clone(),
            handle2: root_handle.clone(),
            name1: mount_point.clone(),
            name2: backing.clone(),
            root_handle: root_handle.clone(),
        }),
        dm::EventData::Destroy {
            handle,
            attr_name,
            attr_copy,
        } => wit::EventData::Destroy(wit::DestroyEvent {
            handle: handle.clone(),
            attr_name: (attr_name != &[0u8; 8]).then(|| attr_name.to_vec()),
            attr_copy: attr_copy.clone(),
        }),
        dm::EventData::Cancel { sequence, token } => wit::EventData::Cancel(wit::CancelEvent {
            sequence: *sequence,
            token: *token,
        }),
        dm::EventData::User { data } => wit::EventData::User(data.clone()),
    };
    wit::Event {
        kind: kind_to_wit(m.kind),
        token: m.token,
        sequence: m.sequence,
        session: sid,
        data,
    }
}

fn kind_to_wit(k: EventType) -> wit::EventType {
    use wit::EventType as W;
    match k {
        EventType::Close => W::Close,
        EventType::Mount => W::Mount,
        EventType::Preunmount => W::Preunmount,
        EventType::Unmount => W::Unmount,
        EventType::Nospace => W::Nospace,
        EventType::Debut => W::Debut,
        EventType::Create => W::Create,
        EventType::Postcreate => W::Postcreate,
        EventType::Remove => W::Remove,
        EventType::Postremove => W::Postremove,
        EventType::Rename => W::Rename,
        EventType::Postrename => W::Postrename,
        EventType::Symlink => W::Symlink,
        EventType::Postsymlink => W::Postsymlink,
        EventType::Link => W::Link,
        EventType::Postlink => W::Postlink,
        EventType::Read => W::Read,
        EventType::Write => W::Write,
        EventType::Truncate => W::Truncate,
        EventType::Attribute => W::Attribute,
        EventType::Cancel => W::Cancel,
        EventType::Destroy => W::Destroy,
        EventType::User => W::User,
    }
}

fn err_to_wit(e: dm::DmError) -> wit::DmError {
    use dm::DmError as D;
    use wit::DmError as W;
    match e {
        D::Enosys => W::Enosys,
        D::Enotready => W::Enotready,
        D::Enomem => W::Enomem,
        D::Estale => W::Estale,
        D::Einval => W::Einval,
        D::Ebadf => W::Ebadf,
        D::Eperm => W::Eperm,
        D::Esrch => W::Esrch,
        D::Efault => W::Efault,
        D::Ebusy => W::Ebusy,
        D::Erofs => W::Erofs,
        D::Eacces => W::Eacces,
        D::Enoent => W::Enoent,
        D::E2big => W::E2big,
        D::Eagain => W::Eagain,
        D::Eexist => W::Eexist,
        D::Eio => W::Eio,
        D::Enospc => W::Enospc,
    }
}

const FLAG_PAIRS: [(u8, wit::RegionFlags); 3] = [
    (region_flags::READ, wit::RegionFlags::READ),
    (region_flags::WRITE, wit::RegionFlags::WRITE),
    (region_flags::TRUNCATE, wit::RegionFlags::TRUNCATE),
];

fn flags_to_wit(f: u8) -> wit::RegionFlags {
    FLAG_PAIRS
        .iter()
        .filter(|(b, _)| f & b != 0)
        .fold(wit::RegionFlags::empty(), |acc, (_, w)| acc | *w)
}

fn flags_from_wit(f: wit::RegionFlags) -> u8 {
    FLAG_PAIRS
        .iter()
        .filter(|(_, w)| f.contains(*w))
        .fold(0, |acc, (b, _)| acc | b)
}

/// The `dm-host` imports of an attached policy: DM calls of its session under the event's
/// token.
pub struct Backend {
    mounts: Arc<Mounts>,
    sid: SessionId,
    client: u64,
}

impl Backend {
    /// A backend for session `sid` (in-daemon client `client`).
    pub fn new(mounts: Arc<Mounts>, sid: SessionId) -> Backend {
        Backend {
            mounts,
            sid,
            client: NEXT_CLIENT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Make `req` under `token`, first taking `need` on the object under the token.
    fn call(
        &self,
        token: Token,
        handle: &[u8],
        need: dm::Right,
        req: DmRequest,
        payload: Vec<u8>,
    ) -> Result<(DmReply, Vec<u8>), wit::DmError> {
        if token != dm::INVALID_TOKEN {
            let object = Handle::decode(handle).map_err(err_to_wit)?.encode();
            dm_call(
                self.mounts.dm(),
                self.client,
                DmRequest::RequestRight {
                    sid: self.sid,
                    token,
                    object,
                    right: need,
                    wait: false,
                },
            )
            .map_err(err_to_wit)?;
        }
        match self.mounts.call(req, payload) {
            (DmReply::Error { error }, _) => Err(err_to_wit(error)),
            r => Ok(r),
        }
    }
}

fn unexpected(r: DmReply) -> wit::DmError {
    tracing::error!("unexpected DM reply {r:?}");
    wit::DmError::Estale
}

fn ts((seconds, nanoseconds): (i64, u32)) -> wit::Timestamp {
    wit::Timestamp {
        seconds,
        nanoseconds,
    }
}

impl DmBackend for Backend {
    fn stat(&self, token: u64, handle: &[u8]) -> Result<wit::FileStat, wit::DmError> {
        let req = DmRequest::GetFileattr {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
        };
        match self.call(token, handle, dm::Right::Shared, req, vec![])?.0 {
            DmReply::Stat { stat } => Ok(wit::FileStat {
                handle: handle.to_vec(),
                name: None,
                path: None,
                dev: stat.dev,
                ino: stat.ino,
                mode: stat.mode,
                nlink: stat.nlink,
                uid: stat.uid,
                gid: stat.gid,
                rdev: stat.rdev,
                size: stat.size,
                atime: ts(stat.atime),
                mtime: ts(stat.mtime),
                ctime: ts(stat.ctime),
                dtime: if stat.has_dmattrs {
                    ts(stat.ctime)
                } else {
                    ts((0, 0))
                },
                blksize: stat.blksize as u32,
                blocks: stat.blocks,
                change: stat.change,
                event_mask: stat.events.types().into_iter().map(kind_to_wit).collect(),
                has_dm_attributes: stat.has_dmattrs,
                has_managed_regions: stat.has_regions,
            }),
            r => Err(unexpected(r)),
        }
    }

    fn get_dmattr(&self, token: u64, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, wit::DmError> {
        let req = DmRequest::GetDmattr {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            name: name.to_vec(),
        };
        match self.call(token, handle, dm::Right::Shared, req, vec![])? {
            (DmReply::Value, v) => Ok(v),
            (r, _) => Err(unexpected(r)),
        }
    }

    fn set_dmattr(
        &self,
        token: u64,
        handle: &[u8],
        name: &[u8],
        value: &[u8],
    ) -> Result<(), wit::DmError> {
        let req = DmRequest::SetDmattr {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            name: name.to_vec(),
        };
        self.call(token, handle, dm::Right::Excl, req, value.to_vec())
            .map(|_| ())
    }

    fn remove_dmattr(&self, token: u64, handle: &[u8], name: &[u8]) -> Result<(), wit::DmError> {
        let req = DmRequest::RemoveDmattr {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            name: name.to_vec(),
        };
        self.call(token, handle, dm::Right::Excl, req, vec![])
            .map(|_| ())
    }

    fn get_regions(&self, token: u64, handle: &[u8]) -> Result<Vec<wit::Region>, wit::DmError> {
        let req = DmRequest::GetRegion {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
        };
        match self.call(token, handle, dm::Right::Shared, req, vec![])?.0 {
            DmReply::Regions { regions } => Ok(regions
                .into_iter()
                .map(|r| wit::Region {
                    offset: r.offset,
                    size: r.size,
                    flags: flags_to_wit(r.flags),
                })
                .collect()),
            r => Err(unexpected(r)),
        }
    }

    fn set_regions(
        &self,
        token: u64,
        handle: &[u8],
        regions: &[wit::Region],
    ) -> Result<bool, wit::DmError> {
        let req = DmRequest::SetRegion {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            regions: regions
                .iter()
                .map(|r| dm::Region {
                    offset: r.offset,
                    size: r.size,
                    flags: flags_from_wit(r.flags),
                })
                .collect(),
        };
        match self.call(token, handle, dm::Right::Excl, req, vec![])?.0 {
            DmReply::Exact { exact } => Ok(exact),
            r => Err(unexpected(r)),
        }
    }

    fn allocinfo(
        &self,
        token: u64,
        handle: &[u8],
        offset: u64,
    ) -> Result<Vec<wit::Extent>, wit::DmError> {
        let req = DmRequest::GetAllocinfo {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            offset: i64::try_from(offset).map_err(|_| wit::DmError::Einval)?,
            nelem: 1024,
        };
        match self.call(token, handle, dm::Right::Shared, req, vec![])?.0 {
            DmReply::Extents { extents, .. } => Ok(extents
                .into_iter()
                .map(|e| wit::Extent {
                    kind: if e.resident {
                        wit::ExtentType::Res
                    } else {
                        wit::ExtentType::Hole
                    },
                    offset: e.offset,
                    length: e.length,
                })
                .collect()),
            r => Err(unexpected(r)),
        }
    }

    fn probe_hole(
        &self,
        token: u64,
        handle: &[u8],
        off: u64,
        len: u64,
    ) -> Result<(u64, u64), wit::DmError> {
        let req = DmRequest::ProbeHole {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            offset: i64::try_from(off).map_err(|_| wit::DmError::Einval)?,
            length: len,
        };
        match self.call(token, handle, dm::Right::Shared, req, vec![])?.0 {
            DmReply::Range { offset, length } => Ok((offset, length)),
            r => Err(unexpected(r)),
        }
    }

    fn punch_hole(
        &self,
        token: u64,
        handle: &[u8],
        off: u64,
        len: u64,
    ) -> Result<(), wit::DmError> {
        let req = DmRequest::PunchHole {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            offset: i64::try_from(off).map_err(|_| wit::DmError::Einval)?,
            length: len,
        };
        self.call(token, handle, dm::Right::Excl, req, vec![])
            .map(|_| ())
    }

    fn read_invis(
        &self,
        token: u64,
        handle: &[u8],
        off: u64,
        len: u64,
    ) -> Result<Vec<u8>, wit::DmError> {
        let req = DmRequest::ReadInvis {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            offset: i64::try_from(off).map_err(|_| wit::DmError::Einval)?,
            length: len,
        };
        match self.call(token, handle, dm::Right::Shared, req, vec![])? {
            (DmReply::Data, d) => Ok(d),
            (r, _) => Err(unexpected(r)),
        }
    }

    fn write_invis(
        &self,
        token: u64,
        handle: &[u8],
        off: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<u64, wit::DmError> {
        let req = DmRequest::WriteInvis {
            sid: self.sid,
            token,
            handle: handle.to_vec(),
            offset: i64::try_from(off).map_err(|_| wit::DmError::Einval)?,
            flags: if sync { dm::WRITE_SYNC } else { 0 },
            length: data.len() as u64,
        };
        match self
            .call(token, handle, dm::Right::Excl, req, data.to_vec())?
            .0
        {
            DmReply::Written { count } => Ok(count),
            r => Err(unexpected(r)),
        }
    }

    fn request_migrate(
        &self,
        _token: u64,
        _handle: &[u8],
        _tier: &str,
    ) -> Result<(), wit::DmError> {
        // tiers come with the object-store layer; until then no tier exists
        Err(wit::DmError::Enosys)
    }

    fn request_recall(
        &self,
        _token: u64,
        _handle: &[u8],
        _off: u64,
        _len: u64,
    ) -> Result<(), wit::DmError> {
        Err(wit::DmError::Enosys)
    }
}
