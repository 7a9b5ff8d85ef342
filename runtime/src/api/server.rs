//! The daemon side of the local API: a thin async shell around [`Daemon::handle`].

use super::{ApiError, FrameError, Reply, Request};
use crate::config::Config;
use crate::plugin::{
    CallError, Fault, HostConfig, LoadError, PluginHost, RedbKv, SlotError, SlotSettings,
};
use crate::store::{RecordedVersion, SlotRecord, Store};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The daemon's state: plugin host and metadata store.
pub struct Daemon {
    cfg: Config,
    host: PluginHost,
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
        let d = Daemon {
            cfg,
            host,
            store,
            started: Instant::now(),
            uid: own_uid(),
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

async fn read_frame(s: &mut UnixStream) -> Result<(Request, Vec<u8>), FrameError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut h = vec![0u8; super::header_len(len)?];
    s.read_exact(&mut h).await?;
    let mut plen = [0u8; 8];
    s.read_exact(&mut plen).await?;
    let mut p = vec![0u8; super::payload_len(plen)?];
    s.read_exact(&mut p).await?;
    Ok((super::decode_header(&h)?, p))
}

async fn serve_conn(daemon: Arc<Daemon>, mut s: UnixStream) {
    let uid = s.peer_cred().ok().map(|c| c.uid());
    loop {
        let reply = match read_frame(&mut s).await {
            Ok((req, payload)) => {
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
            Err(FrameError::Closed) => return,
            Err(FrameError::Io(e)) => {
                tracing::debug!("client connection failed: {e}");
                return;
            }
            Err(e) => {
                // Framing is lost after a bad frame: answer, then close.
                if let Ok(frame) = super::encode(&err("protocol", Fault::Caller, e), b"") {
                    let _ = s.write_all(&frame).await;
                }
                return;
            }
        };
        let frame = super::encode(&reply, b"").or_else(|e| {
            tracing::error!("cannot encode a reply: {e}");
            super::encode(
                &err(
                    "internal",
                    Fault::Host,
                    format!("cannot encode the reply: {e}"),
                ),
                b"",
            )
        });
        match frame {
            Ok(f) if s.write_all(&f).await.is_ok() => {}
            _ => return,
        }
    }
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
    tracing::info!(socket = %socket.display(), "stratad serving");
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
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
