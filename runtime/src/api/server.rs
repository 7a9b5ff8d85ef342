//! The daemon side of the local API: a thin async shell around [`Daemon::handle`].

use super::limits::{Budget, ConnSlot, Limits, Refusal};
use super::{ApiError, FrameError, Reply, Request};
use crate::config::Config;
use crate::log_limited;
use crate::plugin::records::{RecordedVersion, SlotRecord, SlotRecords};
use crate::plugin::{
    CallError, Fault, HostConfig, LoadError, PluginHost, RedbKv, SlotError, SlotSettings,
};
use crate::ratelimit::LogLimit;
use crate::space::core::Caller;
use crate::space::{Spaces, Step};
use crate::store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_client::frame::{decode_header, header_len, payload_len, read_bytes_async};
use strata_client::frame::{write_frame_async, MAX_PAYLOAD};
use strata_client::{Reason, ReasonKind};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A connection's read side, buffered (a frame is several small reads).
type Reader = tokio::io::BufReader<OwnedReadHalf>;

/// The daemon's state: plugin host and metadata store.
pub struct Daemon {
    cfg: Config,
    host: PluginHost,
    spaces: Spaces,
    dm: Arc<crate::dm::service::Dm>,
    mounts: Arc<crate::fs::Mounts>,
    router: Arc<crate::fs::route::Router>,
    store: Store,
    started: Instant,
    uid: u32,
}

fn err(kind: &str, fault: Fault, message: impl ToString) -> Reply {
    Reply::Error(ApiError {
        kind: kind.into(),
        fault,
        message: message.to_string(),
        errno: None,
    })
}

fn fs_err(e: crate::fs::FsError) -> Reply {
    Reply::Error(ApiError {
        kind: "fs".into(),
        fault: Fault::Caller,
        message: e.message,
        errno: Some(e.errno),
    })
}

fn dm_err(e: strata_client::dm::DmError) -> Reply {
    Reply::Error(ApiError {
        kind: "dm".into(),
        fault: Fault::Caller,
        message: e.to_string(),
        errno: Some(e.errno()),
    })
}

fn load_err(e: LoadError) -> Reply {
    err("load", e.fault(), e)
}

fn slot_err(e: SlotError) -> Reply {
    err("slot", Fault::Caller, e)
}

fn call_err(e: CallError) -> Reply {
    match e {
        CallError::Slot(s) => slot_err(s),
        CallError::Aborted { errno, .. } => {
            let message = e.to_string();
            Reply::Error(ApiError {
                kind: "call".into(),
                fault: Fault::Plugin,
                message,
                errno: Some(errno),
            })
        }
        CallError::Invalid { .. } => err("invalid", Fault::Caller, e),
        other => err("call", Fault::Plugin, other),
    }
}

/// Record the slot `name` as the host has it now; `component` is the current version's
/// bytes when they are new to the store (stored first, so a record never names a missing
/// blob). Component files no record names any more are removed after.
fn record_slot(
    host: &PluginHost,
    store: &Store,
    name: &str,
    component: Option<&[u8]>,
) -> anyhow::Result<()> {
    {
        let _g = store.blob_guard();
        let info = host.get(name)?;
        if let Some(bytes) = component {
            store.put_blob(&info.current.digest, bytes)?;
        }
        store.put_slot(
            name,
            &SlotRecord {
                kind: info.kind,
                digest: info.current.digest,
                source: info.current.source,
                settings: info.settings,
                history: info
                    .history
                    .iter()
                    .rev()
                    .map(|v| RecordedVersion {
                        digest: v.digest.clone(),
                        source: v.source.clone(),
                        settings: v.settings.clone(),
                    })
                    .collect(),
            },
        )?;
    }
    if let Err(e) = store.remove_unreferenced_blobs() {
        tracing::warn!(plugin = %name, "cannot remove unused plugin files: {e}");
    }
    Ok(())
}

/// `slots` as an unprivileged caller sees them: without the slots' configs (they may hold
/// what only the operator should read).
fn without_configs(mut slots: Vec<crate::plugin::SlotInfo>) -> Vec<crate::plugin::SlotInfo> {
    for s in &mut slots {
        s.settings.config.clear();
        s.current.settings.config.clear();
        for v in &mut s.history {
            v.settings.config.clear();
        }
    }
    slots
}

/// JSON bytes a `plugin-state` page may take (well under the frame's header limit).
const STATE_PAGE_BUDGET: usize = 256 << 10;

impl Daemon {
    /// Open the store, start the plugin host and load the recorded slots.
    pub fn open(cfg: Config) -> anyhow::Result<Daemon> {
        crate::store::prepare_data_dir(&cfg.data_dir)?;
        let store = Store::open(&cfg.data_dir)?;
        let kv = Arc::new(
            RedbKv::with_flush_interval(
                store.db(),
                std::time::Duration::from_millis(cfg.plugins.kv_flush_ms),
            )
            .map_err(|e| anyhow::anyhow!("plugin kv: {e}"))?,
        );
        let p = &cfg.plugins;
        let host_cfg = HostConfig {
            cache_dir: p.precompiled_cache.then(|| cfg.data_dir.join("cache")),
            max_component_bytes: p.max_component_bytes,
            max_config_bytes: p.max_config_bytes,
            max_hosts: p.max_hosts,
            max_rebalance_chunks: p.max_rebalance_chunks,
            max_name_bytes: p.max_name_bytes,
            rollback_input_bytes: p.rollback_input_bytes,
            wasi_deadline_ms: p.wasi_deadline_ms,
            wasi_min_deadline_ms: p.wasi_min_deadline_ms,
            init_deadline_ms: p.init_deadline_ms,
            ..HostConfig::default()
        };
        let host = PluginHost::new(host_cfg, kv)?;
        {
            // An automatic rollback (inside a call) is recorded like a manual one, so a
            // restart does not bring the rolled-back version back.
            let store = store.clone();
            host.on_rollback(Arc::new(
                move |host: &PluginHost, name: &str| match record_slot(host, &store, name, None) {
                    Ok(()) => tracing::info!(plugin = %name, "automatic rollback recorded"),
                    Err(e) => {
                        tracing::error!(plugin = %name, "automatic rollback not recorded: {e}")
                    }
                },
            ));
        }
        let uid = own_uid();
        let spaces = Spaces::open(
            cfg.spaces.clone(),
            store.db(),
            &cfg.data_dir,
            cfg.socket.clone(),
            uid,
        )?;
        let dm = Arc::new(crate::dm::service::Dm::open(&cfg.dm, store.db())?);
        let mounts = Arc::new(crate::fs::Mounts::with_config(dm.clone(), cfg.fs.clone()));
        let router = Arc::new(crate::fs::route::Router::new(mounts.clone(), store.db())?);
        let d = Daemon {
            cfg,
            host,
            spaces,
            dm,
            mounts,
            router,
            store,
            started: Instant::now(),
            uid,
        };
        for (name, rec) in d.store.slots()? {
            d.restore(&name, &rec);
        }
        Ok(d)
    }

    /// Load a recorded slot again: its earlier versions first (oldest first, so rollback
    /// works after a restart), then the current one. A version that no longer loads is
    /// reported and skipped; the slot keeps whatever did load.
    fn restore(&self, name: &str, rec: &SlotRecord) {
        let current = RecordedVersion {
            digest: rec.digest.clone(),
            source: rec.source.clone(),
            settings: rec.settings.clone(),
        };
        let mut loaded = false;
        for v in rec.history.iter().chain(std::iter::once(&current)) {
            let bytes = match self.store.blob(&v.digest) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(plugin = %name, digest = %v.digest, "plugin blob missing: {e}");
                    continue;
                }
            };
            let source = &v.source;
            let result = if loaded {
                self.host
                    .swap(name, &bytes, source, Some(v.settings.clone()))
                    .map(|r| (r.to, r.cache, r.compile_ms))
            } else {
                self.host
                    .load(name, rec.kind, &bytes, source, v.settings.clone())
                    .map(|v| (v.id, v.cache, v.compile_ms))
            };
            match result {
                Ok((id, cache, compile_ms)) => {
                    loaded = true;
                    tracing::info!(plugin = %name, version = id, ?cache, compile_ms, source = %source, "plugin restored");
                }
                Err(e) => {
                    let e = crate::plugin::escape_controls(&e.to_string()).into_owned();
                    tracing::error!(plugin = %name, source = %source, "could not restore plugin version: {e}")
                }
            }
        }
        if !loaded {
            tracing::error!(plugin = %name, "could not restore plugin slot");
        }
    }

    /// The plugin host (for in-process users such as benchmarks and tests).
    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    fn default_settings(&self) -> SlotSettings {
        SlotSettings {
            deadline_ms: self.cfg.plugins.deadline_ms,
            memory_limit: self.cfg.plugins.memory_limit,
            ..SlotSettings::default()
        }
    }

    /// Record the slot as it is now; `component` is the current version's bytes when they
    /// are new to the store (stored first, so a record never names a missing blob).
    fn record(&self, name: &str, component: Option<&[u8]>) -> anyhow::Result<()> {
        record_slot(&self.host, &self.store, name, component)
    }

    /// Serve one request. Blocking (plugin calls run here): call from a blocking thread.
    pub fn handle(&self, req: Request, payload: Vec<u8>, peer_uid: Option<u32>) -> Reply {
        if req.is_management() {
            let allowed = matches!(peer_uid, Some(0)) || peer_uid == Some(self.uid);
            if !allowed {
                return err(
                    "permission",
                    Fault::Caller,
                    "plugin management needs root or the daemon's user",
                );
            }
        }
        match req {
            Request::Status => Reply::Status {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_s: self.started.elapsed().as_secs(),
                wit: crate::plugin::WIT_VERSION.into(),
            },
            Request::PluginLoad {
                name,
                kind,
                source,
                settings,
            } => {
                let settings = settings.unwrap_or_else(|| self.default_settings());
                match self.host.load(&name, kind, &payload, &source, settings) {
                    Ok(v) => {
                        if let Err(e) = self.record(&name, Some(&payload)) {
                            let _ = self.host.unload(&name);
                            return err(
                                "store",
                                Fault::Host,
                                format!("plugin '{name}': cannot record slot: {e}"),
                            );
                        }
                        Reply::Loaded(Box::new(v))
                    }
                    Err(e) => load_err(e),
                }
            }
            Request::PluginSwap {
                name,
                source,
                settings,
            } => match self.host.swap(&name, &payload, &source, settings) {
                Ok(r) => {
                    if let Err(e) = self.record(&name, Some(&payload)) {
                        tracing::error!(plugin = %name, "swap done but not recorded: {e}");
                    }
                    Reply::Swapped(r)
                }
                Err(e) => load_err(e),
            },
            Request::PluginRollback { name } => match self.host.rollback(&name) {
                Ok((from, to)) => {
                    if let Err(e) = self.record(&name, None) {
                        tracing::error!(plugin = %name, "rollback done but not recorded: {e}");
                    }
                    Reply::RolledBack { from, to }
                }
                Err(e) => slot_err(e),
            },
            Request::PluginUnload { name } => match self.host.unload(&name) {
                Ok(()) => {
                    // The slot's kv state went with it (PluginHost::unload); its component
                    // files go when no other slot names them.
                    if let Err(e) = self.store.remove_slot(&name) {
                        tracing::error!(plugin = %name, "unloaded but not removed from the registry: {e}");
                    } else if let Err(e) = self.store.remove_unreferenced_blobs() {
                        tracing::warn!(plugin = %name, "cannot remove unused plugin files: {e}");
                    }
                    Reply::Unloaded
                }
                Err(e) => slot_err(e),
            },
            Request::PluginList => {
                let slots = self.host.list();
                let privileged = matches!(peer_uid, Some(0)) || peer_uid == Some(self.uid);
                Reply::Plugins(if privileged {
                    slots
                } else {
                    without_configs(slots)
                })
            }
            Request::PluginState { name, from } => {
                match self
                    .host
                    .state_page(&name, from.as_ref(), STATE_PAGE_BUDGET)
                {
                    Ok(page) => Reply::State(page),
                    Err(e) => slot_err(e),
                }
            }
            Request::Place {
                slot,
                chunk,
                size,
                hosts,
            } => match self.host.place(&slot, &chunk, size, &hosts) {
                Ok(s) => Reply::Placed {
                    hosts: s.value,
                    version: s.version,
                    failure: s.failure,
                },
                Err(e) => call_err(e),
            },
            Request::FsMount {
                backing,
                mountpoint,
                read_only,
            } => match self.mounts.mount(&backing, &mountpoint, read_only) {
                Ok(m) => Reply::Mounted(m),
                Err(e) => fs_err(e),
            },
            Request::FsUmount { target, force } => match self.mounts.umount(&target, force) {
                Ok(()) => Reply::Unmounted,
                Err(e) => fs_err(e),
            },
            Request::FsList => Reply::Filesystems(self.mounts.list()),
            Request::DmAttach { slot, path, events } => {
                let is_dm = self
                    .host
                    .list()
                    .iter()
                    .any(|s| s.name == slot && s.kind == crate::plugin::PluginKind::DmPolicy);
                if !is_dm {
                    return err(
                        "slot",
                        Fault::Caller,
                        format!("no dm-policy slot named '{slot}'"),
                    );
                }
                let policy = Arc::new(crate::fs::route::WasmPolicy {
                    host: self.host.clone(),
                    slot: slot.clone(),
                });
                match self.router.attach(&slot, policy, &path, events, None) {
                    Ok(sid) => Reply::Attached { sid },
                    Err(e) => dm_err(e),
                }
            }
            Request::DmDetach { slot } => match self.router.detach(&slot) {
                Ok(()) => Reply::Detached,
                Err(e) => dm_err(e),
            },
            Request::DmAttachments => Reply::Attachments(self.router.list()),
            Request::Space(_) | Request::Dm(_) => err(
                "protocol",
                Fault::Caller,
                "space and dm requests are served on a connection (see serve_conn)",
            ),
            Request::Rebalance { slot, change } => match self.host.rebalance(&slot, &change) {
                Ok(s) => Reply::Moves {
                    moves: s.value,
                    version: s.version,
                    failure: s.failure,
                },
                Err(e) => call_err(e),
            },
        }
    }
}

fn own_uid() -> u32 {
    // Our own uid: the owner of /proc/self (no unsafe libc call needed).
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn refused(r: Reason) -> Reply {
    let kind = serde_json::to_value(r.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "space".into());
    err(&kind, Fault::Caller, r.message)
}

/// Wait until the client closes the connection (or breaks the protocol by sending while
/// its request is parked).
async fn closed(s: &mut Reader) {
    let mut b = [0u8; 1];
    let _ = s.read(&mut b).await;
}

/// Serve a space request: the first step (inline or on a blocking thread), then, if
/// parked, wait for the wake-up or the client's departure.
async fn serve_space(
    daemon: &Arc<Daemon>,
    s: &mut Reader,
    caller: Caller,
    req: strata_client::SpaceRequest,
    payload: Vec<u8>,
) -> Option<(Reply, Vec<u8>)> {
    // Requests that may fsync, exec or load from disk go to the blocking pool; the rest
    // (reads, lists, lease grants, small volatile writes: short, in memory) run inline,
    // which saves a thread hand-off per round trip.
    let light = daemon.spaces.runs_inline(&req) && payload.len() <= 4 << 20;
    let step = if light {
        let run = std::panic::AssertUnwindSafe(|| daemon.spaces.begin(&caller, req, payload));
        std::panic::catch_unwind(run).map_err(|_| "panicked".to_string())
    } else {
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || d.spaces.begin(&caller, req, payload))
            .await
            .map_err(|e| e.to_string())
    };
    let step = match step {
        Ok(step) => step,
        Err(e) => {
            tracing::error!("space request handler failed: {e}");
            return Some((
                err(
                    "internal",
                    Fault::Host,
                    format!("space handler failed: {e}"),
                ),
                vec![],
            ));
        }
    };
    let (rx, then) = match step {
        Step::Done((r, data)) => return Some((Reply::Space(r), data)),
        Step::Refused(r) => return Some((refused(r), vec![])),
        Step::Parked { rx, then } => (rx, then),
    };
    let woken = tokio::select! {
        w = rx => w,
        _ = closed(s) => return None,
    };
    let Ok(woken) = woken else {
        return Some((
            err("internal", Fault::Host, "a parked request was dropped"),
            vec![],
        ));
    };
    let d = daemon.clone();
    match tokio::task::spawn_blocking(move || d.spaces.resume(&caller, then, woken)).await {
        Ok((r, data)) => Some((Reply::Space(r), data)),
        Err(e) => Some((
            err(
                "internal",
                Fault::Host,
                format!("space handler failed: {e}"),
            ),
            vec![],
        )),
    }
}

/// Serve a DM call: in place (the core is in memory), then, if parked, until it is answered
/// or the client leaves.
async fn serve_dm(
    daemon: &Arc<Daemon>,
    s: &mut Reader,
    client: u64,
    req: strata_client::dm::DmRequest,
    payload: Vec<u8>,
) -> Option<(Reply, Vec<u8>)> {
    use crate::dm::service::DmStep;
    if req.is_object_call() {
        let m = daemon.mounts.clone();
        return Some(
            match tokio::task::spawn_blocking(move || m.call(req, payload)).await {
                Ok((r, data)) => (Reply::Dm(r), data),
                Err(e) => (
                    err("internal", Fault::Host, format!("DM call failed: {e}")),
                    vec![],
                ),
            },
        );
    }
    match daemon.dm.call(client, req, payload) {
        DmStep::Done(r) => Some((Reply::Dm(r), vec![])),
        DmStep::Parked(rx) => tokio::select! {
            r = rx => Some((match r {
                Ok(r) => Reply::Dm(r),
                Err(_) => err("internal", Fault::Host, "a parked DM call was dropped"),
            }, vec![])),
            _ = closed(s) => None,
        },
    }
}

/// Refused connections, idle closes, frame deadlines, accept failures: one limiter each,
/// so a flood costs a few log lines a second.
static REFUSED_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(1));
static ACCEPT_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(1));
static FRAME_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(1));

fn limit_err(r: &Refusal) -> Reply {
    err("limit", Fault::Caller, r)
}

/// What the connection's peer sent next.
enum Incoming {
    /// A request and its payload, with the bytes reserved for them.
    Frame(Request, Vec<u8>, Budget),
    /// The peer left (or broke off mid-frame, or stayed idle too long): close quietly.
    Closed,
    /// The frame cannot be served and framing is lost: answer this, then close.
    Refuse(Reply),
    /// The frame was read (its payload discarded) and is answered with this; the
    /// connection goes on.
    Answer(Reply),
}

/// Read and drop `n` payload bytes (a chunk over its space's slot size): the seed answers
/// such a write with WRITE_FAIL `too-large` and the connection goes on, so the bytes are
/// consumed, through a small buffer, never stored.
async fn discard(s: &mut Reader, mut n: u64) -> std::io::Result<()> {
    let mut buf = [0u8; 16 << 10];
    while n > 0 {
        let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        let got = s.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n -= got as u64;
    }
    Ok(())
}

/// The largest payload `req` may carry from `uid`, checked from the header before any of
/// the payload is read; `Err` names what needs privilege when the peer may not send the
/// request at all.
fn payload_limit(daemon: &Daemon, req: &Request, privileged: bool) -> Result<u64, &'static str> {
    Ok(match req {
        Request::PluginLoad { .. } | Request::PluginSwap { .. } if !privileged => {
            return Err("plugin management")
        }
        Request::PluginLoad { .. } | Request::PluginSwap { .. } => {
            daemon.cfg.plugins.max_component_bytes as u64
        }
        Request::Dm(_) if !privileged => return Err("DMAPI calls"),
        Request::Dm(d) => {
            use strata_client::dm::DmRequest as D;
            match d {
                D::SendMsg { .. } | D::SetDmattr { .. } | D::WriteInvis { .. } => MAX_PAYLOAD,
                _ => 0,
            }
        }
        Request::Space(sr) => daemon.spaces.max_payload(sr),
        // status, lists, place, rebalance, plugin and fs management: no payload
        _ => 0,
    })
}

/// What became of a connection between requests.
enum Between {
    /// A frame's first byte arrived.
    Request,
    /// The peer left.
    Left,
    /// It stayed idle (nothing in flight, no lease) for `idle_timeout_ms`.
    Idle,
}

/// Wait for the next frame's first byte.
async fn await_request(daemon: &Daemon, limits: &Limits, s: &mut Reader, client: u64) -> Between {
    let idle = limits.config().idle_timeout_ms;
    loop {
        let ready = if idle == 0 {
            Ok(s.fill_buf().await.map(|b| !b.is_empty()))
        } else {
            tokio::time::timeout(Duration::from_millis(idle), s.fill_buf())
                .await
                .map(|r| r.map(|b| !b.is_empty()))
        };
        match ready {
            Ok(Ok(true)) => return Between::Request,
            Ok(Ok(false)) => return Between::Left,
            Ok(Err(e)) => {
                tracing::debug!("client connection failed: {e}");
                return Between::Left;
            }
            // a connection holding a lease is busy, however quiet
            Err(_) if daemon.spaces.holds_lease(client) => continue,
            Err(_) => {
                tracing::debug!(client, "closing a connection idle for {idle} ms");
                return Between::Idle;
            }
        }
    }
}

/// Read the next request: the header within `header_timeout_ms` of its first byte, checked
/// (op, payload limit, byte budget) before any payload is read, then the payload within
/// `body_timeout_ms`, into a buffer that grows as it arrives.
async fn next_request(
    daemon: &Daemon,
    limits: &Limits,
    s: &mut Reader,
    uid: u32,
    client: u64,
) -> Incoming {
    let cfg = limits.config();
    match await_request(daemon, limits, s, client).await {
        Between::Request => {}
        Between::Left => return Incoming::Closed,
        // said, so that a client sending just now knows its request was not served
        Between::Idle => {
            return Incoming::Refuse(err(
                "idle",
                Fault::Caller,
                format!(
                    "connection closed after {} ms without a request (limits.idle_timeout_ms); nothing sent on it since was served",
                    cfg.idle_timeout_ms
                ),
            ))
        }
    }
    let header_deadline = Instant::now() + Duration::from_millis(cfg.header_timeout_ms);
    let head = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let hlen = header_len(len)?;
        // the header's bytes count against the budget while they are read
        let budget = match limits.reserve(uid, hlen as u64, header_deadline).await {
            Ok(b) => b,
            Err(r) => return Ok(Err(limit_err(&r))),
        };
        let h = read_bytes_async(s, hlen).await?;
        drop(budget);
        let mut plen = [0u8; 8];
        s.read_exact(&mut plen).await?;
        Ok::<_, FrameError>(Ok((h, payload_len(plen)? as u64)))
    };
    let (h, plen) = match tokio::time::timeout_at(
        tokio::time::Instant::from_std(header_deadline),
        head,
    )
    .await
    {
        Ok(Ok(Ok(x))) => x,
        Ok(Ok(Err(reply))) => return Incoming::Refuse(reply),
        Ok(Err(FrameError::Io(e))) => {
            tracing::debug!("client connection failed mid-frame: {e}");
            return Incoming::Closed;
        }
        Ok(Err(e)) => return Incoming::Refuse(err("protocol", Fault::Caller, e)),
        Err(_) => {
            log_limited!(
                FRAME_LOG,
                info,
                uid,
                "closing a connection: frame header not complete within {} ms",
                cfg.header_timeout_ms
            );
            return Incoming::Refuse(err(
                "protocol",
                Fault::Caller,
                format!(
                    "frame header not complete within {} ms (limits.header_timeout_ms)",
                    cfg.header_timeout_ms
                ),
            ));
        }
    };
    let req: Request = match decode_header(&h) {
        Ok(r) => r,
        Err(e) => return Incoming::Refuse(err("protocol", Fault::Caller, e)),
    };
    drop(h);
    let limit = match payload_limit(daemon, &req, limits.privileged(uid)) {
        Ok(l) => l,
        Err(what) if plen > 0 => {
            return Incoming::Refuse(err(
                "permission",
                Fault::Caller,
                format!("{what} needs root or the daemon's user"),
            ))
        }
        // no payload: the request itself is refused with the same reason
        Err(_) => 0,
    };
    let body_deadline = Instant::now() + Duration::from_millis(cfg.body_timeout_ms);
    if plen > limit {
        if let Request::Space(sr) = &req {
            // a chunk over the slot size: the seed's WRITE_FAIL too-large, bytes dropped
            let (kind, message) = match sr {
                strata_client::SpaceRequest::StopWrite { len, .. } if plen != *len => (
                    ReasonKind::Invalid,
                    format!("stop_write of {len} bytes sent a buffer of {plen} bytes; the lease is still held"),
                ),
                _ => (
                    ReasonKind::TooLarge,
                    format!("a chunk of {plen} bytes is over the space's slot size of {limit}"),
                ),
            };
            let deadline = tokio::time::Instant::from_std(body_deadline);
            return match tokio::time::timeout_at(deadline, discard(s, plen)).await {
                Ok(Ok(())) => {
                    Incoming::Answer(Reply::Space(strata_client::SpaceReply::WriteFail {
                        reason: Some(Reason::new(kind, message)),
                    }))
                }
                Ok(Err(_)) => Incoming::Closed,
                Err(_) => Incoming::Refuse(err(
                    "protocol",
                    Fault::Caller,
                    format!(
                        "payload not complete within {} ms (limits.body_timeout_ms)",
                        cfg.body_timeout_ms
                    ),
                )),
            };
        }
        return Incoming::Refuse(err(
            "protocol",
            Fault::Caller,
            format!(
                "a payload of {plen} bytes is over the limit of {limit} for this request (op {})",
                op_name(&req)
            ),
        ));
    }
    let budget = match limits.reserve(uid, plen, body_deadline).await {
        Ok(b) => b,
        Err(r) => return Incoming::Refuse(limit_err(&r)),
    };
    let payload = if plen == 0 {
        Vec::new()
    } else {
        let deadline = tokio::time::Instant::from_std(body_deadline);
        match tokio::time::timeout_at(deadline, read_bytes_async(s, plen as usize)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::debug!("client connection failed mid-payload: {e}");
                return Incoming::Closed;
            }
            Err(_) => {
                log_limited!(
                    FRAME_LOG,
                    info,
                    uid,
                    "closing a connection: payload not complete within {} ms",
                    cfg.body_timeout_ms
                );
                return Incoming::Refuse(err(
                    "protocol",
                    Fault::Caller,
                    format!(
                        "payload not complete within {} ms (limits.body_timeout_ms)",
                        cfg.body_timeout_ms
                    ),
                ));
            }
        }
    };
    Incoming::Frame(req, payload, budget)
}

/// The request's `op` as on the wire (for messages).
fn op_name(req: &Request) -> String {
    serde_json::to_value(req)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
        .unwrap_or_default()
}

async fn serve_conn(daemon: Arc<Daemon>, limits: Arc<Limits>, s: UnixStream, slot: ConnSlot) {
    let cred = s.peer_cred().ok();
    let uid = cred.as_ref().map(|c| c.uid());
    // without credentials the caller gets "other" rights only
    let peer = uid.unwrap_or(u32::MAX - 1);
    let caller = Caller {
        client: daemon.spaces.connect(peer),
        uid: peer,
        gid: cred.map(|c| c.gid()).unwrap_or(u32::MAX - 1),
    };
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    serve_requests(&daemon, &limits, &mut r, &mut w, uid, caller).await;
    drop(slot);
    let d = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || {
        d.spaces.disconnect(caller.client);
        d.dm.disconnect(caller.client);
    })
    .await;
}

/// Run a request on the blocking pool.
async fn blocking(daemon: &Arc<Daemon>, req: Request, payload: Vec<u8>, uid: Option<u32>) -> Reply {
    let d = daemon.clone();
    match tokio::task::spawn_blocking(move || d.handle(req, payload, uid)).await {
        Ok(r) => r,
        Err(e) => err(
            "internal",
            Fault::Host,
            format!("request handler failed: {e}"),
        ),
    }
}

async fn serve_requests(
    daemon: &Arc<Daemon>,
    limits: &Arc<Limits>,
    s: &mut Reader,
    w: &mut OwnedWriteHalf,
    uid: Option<u32>,
    caller: Caller,
) {
    let budget_uid = uid.unwrap_or(u32::MAX - 1);
    let write_timeout = Duration::from_millis(limits.config().body_timeout_ms);
    loop {
        // bytes of the reply being sent (a chunk), given back once it is sent
        let mut reply_budgets: Option<Budget> = None;
        let (req, payload, _budget) =
            match next_request(daemon, limits, s, budget_uid, caller.client).await {
                Incoming::Frame(req, payload, budget) => (req, payload, budget),
                Incoming::Closed => return,
                Incoming::Answer(reply) => {
                    let sent =
                        tokio::time::timeout(write_timeout, write_frame_async(w, &reply, b""))
                            .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        return;
                    }
                    continue;
                }
                Incoming::Refuse(reply) => {
                    metrics::counter!("strata_connections_refused_total", "reason" => "frame")
                        .increment(1);
                    // framing is lost after a refused frame: answer, then close
                    if let Ok(frame) = super::encode(&reply, b"") {
                        let _ = tokio::time::timeout(write_timeout, w.write_all(&frame)).await;
                    }
                    return;
                }
            };
        let op = crate::metrics::op_label(&req);
        let started = Instant::now();
        let (reply, data) = match req {
            Request::Dm(req) => {
                if !(uid == Some(0) || uid == Some(daemon.uid)) {
                    (
                        err(
                            "permission",
                            Fault::Caller,
                            "DMAPI calls need root or the daemon's user",
                        ),
                        vec![],
                    )
                } else {
                    match serve_dm(daemon, s, caller.client, req, payload).await {
                        Some(x) => x,
                        None => return,
                    }
                }
            }
            Request::Space(req) => {
                // a chunk the reply will carry counts against the byte budget until it is
                // sent, like a request's payload
                let want = daemon.spaces.max_reply(&req);
                let deadline = Instant::now() + write_timeout;
                let reserved = tokio::select! {
                    r = limits.reserve(budget_uid, want, deadline) => r,
                    _ = closed(s) => return,
                };
                match reserved {
                    Ok(reply_budget) => match serve_space(daemon, s, caller, req, payload).await {
                        Some((reply, data)) => {
                            reply_budgets = Some(reply_budget);
                            (reply, data)
                        }
                        None => return,
                    },
                    Err(r) => (limit_err(&r), vec![]),
                }
            }
            // in memory and cheap: answered here, never queued behind the blocking pool
            Request::Status => (daemon.handle(Request::Status, payload, uid), vec![]),
            // plugin calls take a turn (bounded in all and per uid), then a blocking thread
            req @ (Request::Place { .. } | Request::Rebalance { .. }) => {
                let turn = tokio::select! {
                    t = limits.plugin_call(budget_uid) => t,
                    _ = closed(s) => return,
                };
                let r = blocking(daemon, req, payload, uid).await;
                drop(turn);
                (r, vec![])
            }
            req => (blocking(daemon, req, payload, uid).await, vec![]),
        };
        let result = if matches!(reply, Reply::Error(_)) {
            "error"
        } else {
            "ok"
        };
        metrics::counter!("strata_requests_total", "op" => op, "result" => result).increment(1);
        metrics::histogram!("strata_request_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        // a region or lease buffer lent with this reply rides on its first bytes
        let lends = matches!(
            reply,
            Reply::Space(
                strata_client::SpaceReply::CacheOk { .. }
                    | strata_client::SpaceReply::StartWriteOk { .. }
            )
        );
        let fds = if lends {
            daemon.spaces.take_fds(caller.client)
        } else {
            Vec::new()
        };
        let send = async {
            let written = if fds.is_empty() {
                write_frame_async(w, &reply, &data).await
            } else {
                write_frame_with_fds(w, &reply, &data, &fds).await
            };
            match written {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::Other => {
                    log_limited!(FRAME_LOG, error, "cannot encode a reply: {e}");
                    let r = err(
                        "internal",
                        Fault::Host,
                        format!("cannot encode the reply: {e}"),
                    );
                    write_frame_async(w, &r, b"").await.is_ok()
                }
                Err(_) => false,
            }
        };
        // a peer that does not read its reply is dropped after the body deadline
        let sent = tokio::time::timeout(write_timeout, send)
            .await
            .unwrap_or(false);
        drop(reply_budgets);
        if !sent {
            return;
        }
    }
}

/// Refuse a connection: one error frame (if the socket takes it at once), then close. It
/// costs no task and no log line of its own (refusals are logged rate-limited).
fn refuse(mut s: std::os::unix::net::UnixStream, why: &Refusal) {
    use std::io::Write;
    if let Ok(frame) = super::encode(&limit_err(why), b"") {
        // a fresh socket's send buffer is empty: a small frame fits without blocking
        let _ = s.set_nonblocking(true);
        let _ = s.write(&frame);
    }
}

/// A descriptor kept open so that, when the daemon runs out of them, it can still accept
/// (and refuse) the connection at the head of the queue instead of spinning on EMFILE.
fn reserve_fd() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The uid of a connection's peer (SO_PEERCRED); without one, a uid of its own that no
/// user has.
fn peer_uid(s: &std::os::unix::net::UnixStream) -> u32 {
    rustix::net::sockopt::socket_peercred(s)
        .map(|c| c.uid.as_raw())
        .unwrap_or(u32::MAX - 1)
}

/// Accept connections on a thread of their own, in plain blocking calls: a flood of
/// connections to refuse (accept, SO_PEERCRED, one write, close) never goes through the
/// async reactor nor waits behind its tasks, so a new connection from root is reached
/// quickly. Admitted connections are handed to the runtime. Out of descriptors, the loop
/// refuses with a reserve descriptor and backs off.
fn accept_loop(
    rt: tokio::runtime::Handle,
    daemon: Arc<Daemon>,
    limits: Arc<Limits>,
    listener: std::os::unix::net::UnixListener,
) {
    let mut reserve = reserve_fd();
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                let uid = peer_uid(&s);
                match limits.admit(uid) {
                    Ok(slot) => {
                        let (daemon, limits) = (daemon.clone(), limits.clone());
                        rt.spawn(async move {
                            let s = match s
                                .set_nonblocking(true)
                                .and_then(|()| UnixStream::from_std(s))
                            {
                                Ok(s) => s,
                                Err(e) => {
                                    log_limited!(
                                        ACCEPT_LOG,
                                        warn,
                                        "cannot serve a connection: {e}"
                                    );
                                    return;
                                }
                            };
                            serve_conn(daemon, limits, s, slot).await
                        });
                    }
                    Err(why) => {
                        let reason = match why {
                            super::limits::Refusal::UidConnections { .. } => "uid-connections",
                            super::limits::Refusal::Connections { .. } => "connections",
                            super::limits::Refusal::OutOfFds => "out-of-fds",
                            _ => "other",
                        };
                        metrics::counter!("strata_connections_refused_total", "reason" => reason)
                            .increment(1);
                        log_limited!(REFUSED_LOG, warn, uid, "connection refused: {why}");
                        refuse(s, &why);
                    }
                }
            }
            Err(e) if out_of_fds(&e) => {
                log_limited!(
                    ACCEPT_LOG,
                    error,
                    "accept failed: {e}; refusing connections until descriptors free up"
                );
                // give up the reserve to take the waiting connection off the queue and
                // refuse it, then wait a little for descriptors to close
                drop(reserve.take());
                if let Ok((s, _)) = listener.accept() {
                    refuse(s, &Refusal::OutOfFds);
                }
                reserve = reserve_fd();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                log_limited!(ACCEPT_LOG, warn, "accept failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Write a reply frame with descriptors attached to its first bytes (SCM_RIGHTS; see
/// `strata_client::fdpass`). The descriptors are closed here once sent.
async fn write_frame_with_fds(
    w: &mut OwnedWriteHalf,
    reply: &Reply,
    data: &[u8],
    fds: &[std::os::fd::OwnedFd],
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let head = strata_client::frame::head(reply, data.len())?;
    let lent: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let stream: &UnixStream = w.as_ref();
    let n = stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            strata_client::fdpass::send_with_fds(stream, &head, &lent)
        })
        .await?;
    w.write_all(&head[n..]).await?;
    w.write_all(data).await?;
    w.flush().await
}

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let socket = cfg.socket.clone();
    if let Some(dir) = socket.parent() {
        socket_dir(dir)?;
    }
    if socket.exists() {
        // A live daemon answers; a stale socket file does not.
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            anyhow::bail!("another daemon is serving {}", socket.display());
        }
        std::fs::remove_file(&socket)?;
    }
    let metrics_cfg = cfg.metrics.clone();
    let daemon = Arc::new(tokio::task::spawn_blocking(move || Daemon::open(cfg)).await??);
    crate::metrics::install(&metrics_cfg)?;
    let listener = std::os::unix::net::UnixListener::bind(&socket)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    }
    tracing::info!(socket = %socket.display(), host = daemon.spaces.host(), "stratad serving");
    {
        // managed filesystems mounted when the daemon stopped come back (their MOUNT
        // events can be answered now that the socket is up); the attached policies first,
        // so that a policy disposed for MOUNT is there to answer
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || {
            d.router.restore(&d.host);
            d.mounts.restore();
        });
    }
    let ticker = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(10));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n: u64 = 0;
            loop {
                every.tick().await;
                n += 1;
                let d = d.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    d.spaces.tick();
                    d.dm.tick();
                    if n.is_multiple_of(100) {
                        // once a second: what the host uses, against the [spaces] quotas
                        let (u, buffers) = d.spaces.usage_totals();
                        metrics::gauge!("strata_spaces").set(u.spaces as f64);
                        metrics::gauge!("strata_shm_bytes").set(u.shm_bytes as f64);
                        metrics::gauge!("strata_durable_bytes").set(u.durable_bytes as f64);
                        metrics::gauge!("strata_chunks").set(u.chunks as f64);
                        metrics::gauge!("strata_lease_buffer_bytes").set(buffers as f64);
                    }
                })
                .await;
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let limits = Arc::new(Limits::new(daemon.cfg.limits.clone(), daemon.uid));
    {
        let (rt, d) = (tokio::runtime::Handle::current(), daemon.clone());
        // ends with the process
        std::thread::Builder::new()
            .name("stratad-accept".into())
            .spawn(move || accept_loop(rt, d, limits, listener))?;
    }
    // the socket answers from now on: `systemctl start` may return
    let status = format!("READY=1\nSTATUS=serving {}", socket.display());
    if let Err(e) = crate::sdnotify::notify(&status) {
        tracing::warn!("cannot tell the service manager the daemon is ready: {e}");
    }
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stratad stopping");
    let _ = crate::sdnotify::notify("STOPPING=1");
    ticker.abort();
    let _ = std::fs::remove_file(&socket);
    daemon.spaces.shutdown();
    daemon.router.shutdown();
    daemon.mounts.shutdown();
    // acknowledged plugin kv changes still in memory are committed before exiting
    daemon.host.flush_state();
    Ok(())
}

/// The socket's directory: created 0755 (everyone may connect, nobody else may replace
/// the socket). An existing one writable by group or others without the sticky bit would
/// let another user swap the socket for their own: ours is tightened (go-w), another
/// user's is refused.
fn socket_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 == 0 || mode & 0o1000 != 0 {
        return Ok(());
    }
    let me = rustix::process::geteuid().as_raw();
    anyhow::ensure!(
        meta.uid() == me,
        "the socket directory {} is writable by others (mode {mode:o}) and belongs to uid {}: \
         choose a directory only the daemon's user can write",
        dir.display(),
        meta.uid()
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & !0o022))?;
    tracing::warn!(dir = %dir.display(), "the socket directory was writable by others: now {:o}", mode & !0o022);
    Ok(())
}
