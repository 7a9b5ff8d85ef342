//! The daemon side of the local API: a thin async shell around [`Daemon::handle`].

use super::{ApiError, FrameError, Reply, Request};
use crate::config::Config;
use crate::plugin::{
    CallError, Fault, HostConfig, LoadError, PluginHost, RedbKv, SlotError, SlotSettings,
};
use crate::space::core::Caller;
use crate::space::{Spaces, Step};
use crate::store::{RecordedVersion, SlotRecord, Store};
use std::sync::Arc;
use std::time::Instant;
use strata_client::frame::{read_frame_async, write_frame_async};
use strata_client::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

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
        other => err("call", Fault::Plugin, other),
    }
}

impl Daemon {
    /// Open the store, start the plugin host and load the recorded slots.
    pub fn open(cfg: Config) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let store = Store::open(&cfg.data_dir)?;
        let kv = Arc::new(RedbKv::new(store.db()).map_err(|e| anyhow::anyhow!("plugin kv: {e}"))?);
        let host_cfg = HostConfig {
            cache_dir: cfg
                .plugins
                .precompiled_cache
                .then(|| cfg.data_dir.join("cache")),
            max_component_bytes: cfg.plugins.max_component_bytes,
            max_config_bytes: cfg.plugins.max_config_bytes,
            ..HostConfig::default()
        };
        let host = PluginHost::new(host_cfg, kv)?;
        let uid = own_uid();
        let spaces = Spaces::open(
            cfg.spaces.clone(),
            store.db(),
            &cfg.data_dir,
            cfg.socket.clone(),
            uid,
        )?;
        let dm = Arc::new(crate::dm::service::Dm::open(&cfg.dm, store.db())?);
        let mounts = Arc::new(crate::fs::Mounts::new(dm.clone()));
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
        let info = self.host.get(name)?;
        if let Some(bytes) = component {
            self.store.put_blob(&info.current.digest, bytes)?;
        }
        self.store.put_slot(
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
        )
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
                    if let Err(e) = self.store.remove_slot(&name) {
                        tracing::error!(plugin = %name, "unloaded but not removed from the registry: {e}");
                    }
                    Reply::Unloaded
                }
                Err(e) => slot_err(e),
            },
            Request::PluginList => Reply::Plugins(self.host.list()),
            Request::PluginState { name } => match self.host.state(&name) {
                Ok(kv) => Reply::State(kv),
                Err(e) => slot_err(e),
            },
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

async fn serve_conn(daemon: Arc<Daemon>, s: UnixStream) {
    let cred = s.peer_cred().ok();
    let uid = cred.as_ref().map(|c| c.uid());
    let caller = Caller {
        client: daemon.spaces.connect(),
        // without credentials the caller gets "other" rights only
        uid: uid.unwrap_or(u32::MAX - 1),
        gid: cred.map(|c| c.gid()).unwrap_or(u32::MAX - 1),
    };
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    serve_requests(&daemon, &mut r, &mut w, uid, caller).await;
    let d = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || {
        d.spaces.disconnect(caller.client);
        d.dm.disconnect(caller.client);
    })
    .await;
}

async fn serve_requests(
    daemon: &Arc<Daemon>,
    s: &mut Reader,
    w: &mut OwnedWriteHalf,
    uid: Option<u32>,
    caller: Caller,
) {
    loop {
        let (reply, data) = match read_frame_async::<Request>(s).await {
            Ok((Request::Dm(req), payload)) => {
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
            Ok((Request::Space(req), payload)) => {
                match serve_space(daemon, s, caller, req, payload).await {
                    Some(x) => x,
                    None => return,
                }
            }
            Ok((req, payload)) => {
                let d = daemon.clone();
                let r = match tokio::task::spawn_blocking(move || d.handle(req, payload, uid)).await
                {
                    Ok(r) => r,
                    Err(e) => err(
                        "internal",
                        Fault::Host,
                        format!("request handler failed: {e}"),
                    ),
                };
                (r, vec![])
            }
            Err(FrameError::Closed) => return,
            Err(FrameError::Io(e)) => {
                tracing::debug!("client connection failed: {e}");
                return;
            }
            Err(e) => {
                // Framing is lost after a bad frame: answer, then close.
                if let Ok(frame) = super::encode(&err("protocol", Fault::Caller, e), b"") {
                    let _ = w.write_all(&frame).await;
                }
                return;
            }
        };
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
        let written = if fds.is_empty() {
            write_frame_async(w, &reply, &data).await
        } else {
            write_frame_with_fds(w, &reply, &data, &fds).await
        };
        let sent = match written {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::Other => {
                tracing::error!("cannot encode a reply: {e}");
                let r = err(
                    "internal",
                    Fault::Host,
                    format!("cannot encode the reply: {e}"),
                );
                write_frame_async(w, &r, b"").await.is_ok()
            }
            Err(_) => false,
        };
        if !sent {
            return;
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
        std::fs::create_dir_all(dir)?;
    }
    if socket.exists() {
        // A live daemon answers; a stale socket file does not.
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            anyhow::bail!("another daemon is serving {}", socket.display());
        }
        std::fs::remove_file(&socket)?;
    }
    let daemon = Arc::new(tokio::task::spawn_blocking(move || Daemon::open(cfg)).await??);
    let listener = UnixListener::bind(&socket)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    }
    tracing::info!(socket = %socket.display(), host = daemon.spaces.host(), "stratad serving");
    {
        // managed filesystems mounted when the daemon stopped come back (their MOUNT
        // events can be answered now that the socket is up)
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || {
            d.mounts.restore();
            d.router.restore(&d.host);
        });
    }
    let ticker = {
        let d = daemon.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(10));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                let d = d.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    d.spaces.tick();
                    d.dm.tick();
                })
                .await;
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => { tokio::spawn(serve_conn(daemon.clone(), s)); }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stratad stopping");
    ticker.abort();
    let _ = std::fs::remove_file(&socket);
    daemon.spaces.shutdown();
    daemon.router.shutdown();
    daemon.mounts.shutdown();
    Ok(())
}
