//! Slots, versions, instance pools, calls with failure policies, hot swap and rollback.

use super::bindings::{
    dm_world, placement_world, ChunkMove, ChunkRef, DmBackend, Event, FileStat, HostInfo,
    HostState, Limiter, MembershipChange, Response, ScanAction,
};
use super::cache::{digest, CacheOutcome, CompileCache};
use super::error::{chain, CallError, FailureKind, LoadError, SlotError};
use super::kv::{KvLimits, KvStore};
use super::settings::{FailurePolicy, PluginKind, SlotSettings};
use super::stats::{Counters, Stats};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use wasmtime::component::{types::ComponentItem, Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap};

/// The version of the WIT package this host provides.
pub const WIT_VERSION: &str = "0.1.0";

/// Settings of the plugin host as a whole.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where precompiled components are kept (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
    /// Epoch tick: the granularity of call deadlines.
    pub epoch_tick: Duration,
    /// Largest component file accepted.
    pub max_component_bytes: usize,
    /// Largest slot config accepted.
    pub max_config_bytes: usize,
    /// Idle instances kept per version (more concurrent callers create more, then drop them).
    pub max_idle_instances: usize,
    /// Earlier versions kept per slot for rollback.
    pub history: usize,
    /// Limits of each slot's key-value store.
    pub kv_limits: KvLimits,
    /// Most hosts a `place` request (and each host list of a `rebalance`) may name.
    pub max_hosts: usize,
    /// Most chunks a `rebalance` request may name.
    pub max_rebalance_chunks: usize,
    /// Longest host id, space or chunk name in a request, in bytes.
    pub max_name_bytes: usize,
    /// Inputs larger than this (see [`input_bytes`]) excuse a timeout or memory-cap
    /// failure from counting towards automatic rollback.
    pub rollback_input_bytes: u64,
    /// Deadline given to components that import WASI (interpreted ones, e.g. componentize-py)
    /// when their slot's deadline is below `wasi_min_deadline_ms`.
    pub wasi_deadline_ms: u64,
    /// Smallest deadline a WASI-importing component runs with (0: no minimum).
    pub wasi_min_deadline_ms: u64,
    /// Least deadline of the self-test (instantiation and `init`) at load, swap and restore,
    /// so a momentarily busy host neither refuses a load nor loses a slot at a restart.
    /// Instances created for a call start within the call's deadline.
    pub init_deadline_ms: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            epoch_tick: Duration::from_millis(1),
            max_component_bytes: 64 << 20,
            max_config_bytes: 64 << 10,
            max_idle_instances: 16,
            history: 4,
            kv_limits: KvLimits::default(),
            max_hosts: 1024,
            max_rebalance_chunks: 100_000,
            max_name_bytes: 1024,
            rollback_input_bytes: 64 << 10,
            wasi_deadline_ms: 2000,
            wasi_min_deadline_ms: 1000,
            init_deadline_ms: 1000,
        }
    }
}

/// The answer of a call, and who gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served<T> {
    /// The plugin's answer, or the failure policy's.
    pub value: T,
    /// The version that served the call.
    pub version: u64,
    /// `Some` when the plugin failed and the value comes from the failure policy.
    pub failure: Option<FailureKind>,
}

/// A version of a slot, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Version number, unique in this host.
    pub id: u64,
    /// sha256 of the component.
    pub digest: String,
    /// Where it came from (a file name).
    pub source: String,
    /// Component size in bytes.
    pub size: usize,
    /// Whether the precompiled cache was used.
    pub cache: CacheOutcome,
    /// Compile (or cache load) time.
    pub compile_ms: f64,
    /// Time to instantiate and run `init` (the self-test).
    pub selftest_ms: f64,
    /// When it was loaded (seconds since the epoch).
    pub loaded_at: u64,
    /// Its counters.
    pub stats: Stats,
    /// The settings it runs with.
    pub settings: SlotSettings,
    /// Whether the component imports WASI (an interpreted component, e.g. componentize-py).
    #[serde(default)]
    pub wasi: bool,
    /// What the host adjusted or wants the operator to know (e.g. a raised deadline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Where a page of a slot's state starts: a key, and an offset in its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCursor {
    /// The key.
    pub key: String,
    /// Offset in its value (0 but for a value split over pages).
    #[serde(default)]
    pub offset: u64,
}

/// A part of one value of a slot's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatePart {
    /// The key.
    pub key: String,
    /// Where `data` starts in the value.
    pub offset: u64,
    /// The value's whole length.
    pub total: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// One page of a slot's key-value state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatePage {
    /// Parts in key order.
    pub parts: Vec<StatePart>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<StateCursor>,
}

/// A slot, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// Slot name.
    pub name: String,
    /// World.
    pub kind: PluginKind,
    /// The version serving now.
    pub current: VersionInfo,
    /// Earlier versions available for rollback, most recent first.
    pub history: Vec<VersionInfo>,
    /// Counters of the slot over all versions, retired ones included.
    pub total: Stats,
    /// Settings in force.
    pub settings: SlotSettings,
    /// Recent swaps and rollbacks, oldest first.
    pub events: Vec<String>,
}

/// What a swap did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwapReport {
    /// The version replaced.
    pub from: u64,
    /// The version now serving.
    pub to: u64,
    /// Compile (or cache load) time of the new version.
    pub compile_ms: f64,
    /// Instantiation and `init` self-test time.
    pub selftest_ms: f64,
    /// Time the switch itself took (the pointer swap), in nanoseconds.
    pub switch_ns: u64,
    /// Cache outcome of the new version.
    pub cache: CacheOutcome,
    /// What the host adjusted or wants the operator to know (e.g. a raised deadline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

enum Pre {
    Placement(placement_world::PlacementPre<HostState>),
    Dm(dm_world::DmPolicyPre<HostState>),
}

enum Bound {
    Placement(placement_world::Placement),
    Dm(dm_world::DmPolicy),
}

struct Live {
    store: Store<HostState>,
    bound: Bound,
}

struct Version {
    id: u64,
    digest: String,
    source: String,
    size: usize,
    cache: CacheOutcome,
    compile_ms: f64,
    selftest_ms: f64,
    loaded_at: u64,
    settings: Arc<SlotSettings>,
    wasi: bool,
    notes: Vec<String>,
    pre: Pre,
    idle: Mutex<Vec<Live>>,
    counters: Counters,
}

impl Version {
    fn info(&self) -> VersionInfo {
        VersionInfo {
            id: self.id,
            digest: self.digest.clone(),
            source: self.source.clone(),
            size: self.size,
            cache: self.cache,
            compile_ms: self.compile_ms,
            selftest_ms: self.selftest_ms,
            loaded_at: self.loaded_at,
            stats: self.counters.snapshot(),
            settings: (*self.settings).clone(),
            wasi: self.wasi,
            notes: self.notes.clone(),
        }
    }
}

struct Slot {
    name: Arc<str>,
    kind: PluginKind,
    current: ArcSwap<Version>,
    history: Mutex<Vec<Arc<Version>>>,
    /// Stats of versions no longer held.
    retired: Mutex<Stats>,
    events: Mutex<VecDeque<String>>,
    /// Serializes swap / rollback / unload of this slot. Calls never take it.
    mgmt: Mutex<()>,
}

impl Slot {
    fn note(&self, msg: String) {
        tracing::info!(plugin = %self.name, "{msg}");
        let mut ev = lock(&self.events);
        if ev.len() == 32 {
            ev.pop_front();
        }
        ev.push_back(msg);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    engine: Engine,
    linker_placement: Linker<HostState>,
    linker_dm: Linker<HostState>,
    cache: CompileCache,
    kv: Arc<dyn KvStore>,
    cfg: HostConfig,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    next_version: AtomicU64,
    stop: Arc<AtomicBool>,
    started: Instant,
    on_rollback: RwLock<Option<RollbackHook>>,
}

/// Called after an automatic rollback, with the slot's name (see [`PluginHost::on_rollback`]).
pub type RollbackHook = Arc<dyn Fn(&PluginHost, &str) + Send + Sync>;

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The plugin host: named slots of Wasm components, each serving one world.
///
/// Cheap to clone; every method may be called from any thread. Calls are synchronous and
/// CPU-bound (bounded by the slot's deadline): async callers use `spawn_blocking`.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn classify(e: &wasmtime::Error, memory_hit: bool) -> FailureKind {
    if memory_hit {
        FailureKind::MemoryLimit
    } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        FailureKind::Timeout
    } else {
        FailureKind::Trap
    }
}

impl PluginHost {
    /// A host with its own engine and an epoch ticker thread (stopped when the last clone
    /// is dropped).
    pub fn new(cfg: HostConfig, kv: Arc<dyn KvStore>) -> anyhow::Result<Self> {
        let mut wcfg = wasmtime::Config::new();
        wcfg.wasm_component_model(true)
            .epoch_interruption(true)
            .parallel_compilation(compile_pool_ready());
        let engine = Engine::new(&wcfg).map_err(|e| anyhow::anyhow!(chain(&e)))?;
        let cache = CompileCache::new(&engine, cfg.cache_dir.clone())?;
        let mut linker_placement = Linker::new(&engine);
        let mut linker_dm = Linker::new(&engine);
        let link = |r: wasmtime::Result<()>| r.map_err(|e| anyhow::anyhow!(chain(&e)));
        link(wasmtime_wasi::p2::add_to_linker_sync(&mut linker_placement))?;
        link(wasmtime_wasi::p2::add_to_linker_sync(&mut linker_dm))?;
        link(placement_world::Placement::add_to_linker::<
            HostState,
            wasmtime::component::HasSelf<HostState>,
        >(&mut linker_placement, |s| s))?;
        link(dm_world::DmPolicy::add_to_linker::<
            HostState,
            wasmtime::component::HasSelf<HostState>,
        >(&mut linker_dm, |s| s))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            let tick = cfg.epoch_tick;
            std::thread::Builder::new()
                .name("plugin-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| anyhow::anyhow!("cannot start the plugin epoch thread: {e}"))?;
        }
        Ok(PluginHost {
            inner: Arc::new(Inner {
                engine,
                linker_placement,
                linker_dm,
                cache,
                kv,
                cfg,
                slots: RwLock::new(BTreeMap::new()),
                next_version: AtomicU64::new(1),
                stop,
                started: Instant::now(),
                on_rollback: RwLock::new(None),
            }),
        })
    }

    /// Have `hook` called (on the calling thread, outside the host's locks) after every
    /// automatic rollback, so the daemon can record the slot as it is now: a rollback is
    /// persisted like a swap.
    pub fn on_rollback(&self, hook: RollbackHook) {
        *self
            .inner
            .on_rollback
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Make every acknowledged change of the plugins' key-value state durable (a clean stop
    /// calls this; it is also done when the last handle of the store is dropped).
    pub fn flush_state(&self) {
        if let Err(e) = self.inner.kv.flush() {
            tracing::error!("plugin kv store: final flush failed: {e}");
        }
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, SlotError> {
        let slots = self.inner.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .get(name)
            .cloned()
            .ok_or_else(|| SlotError::NoSuchSlot(name.to_string()))
    }

    fn deadline_ticks(&self, settings: &SlotSettings) -> u64 {
        self.ticks(settings.deadline_ms)
    }

    fn ticks(&self, deadline_ms: u64) -> u64 {
        let tick = self.inner.cfg.epoch_tick.as_nanos().max(1) as u64;
        (deadline_ms * 1_000_000).div_ceil(tick) + 1
    }

    /// Check that `component` is a component of `kind`'s world at our WIT version.
    fn check_shape(
        &self,
        plugin: &str,
        component: &Component,
        kind: PluginKind,
    ) -> Result<(), LoadError> {
        let engine = &self.inner.engine;
        let ty = component.component_type();
        for (name, _) in ty.imports(engine) {
            if let Some(rest) = name.strip_prefix("strata:plugin/") {
                let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("");
                let compatible = version
                    .split('.')
                    .take(2)
                    .eq(WIT_VERSION.split('.').take(2));
                if !compatible {
                    return Err(LoadError::WrongVersion {
                        plugin: plugin.into(),
                        found: format!("strata:plugin@{version}"),
                        provided: WIT_VERSION,
                    });
                }
            }
        }
        let exports: BTreeMap<String, ComponentItem> = ty
            .exports(engine)
            .map(|(n, i)| (n.to_string(), i.ty))
            .collect();
        let looks_dm = ["on-event", "on-notify", "scan"]
            .iter()
            .any(|h| exports.contains_key(*h));
        let looks_placement = ["place", "rebalance"]
            .iter()
            .any(|h| exports.contains_key(*h));
        let found = match (looks_dm, looks_placement) {
            (true, false) => Some(PluginKind::DmPolicy),
            (false, true) => Some(PluginKind::Placement),
            _ => None,
        };
        if let Some(found) = found {
            if found != kind {
                return Err(LoadError::WrongWorld {
                    plugin: plugin.into(),
                    expected: kind.world(),
                    found: found.world().into(),
                });
            }
        }
        for hook in kind.hooks() {
            match exports.get(*hook) {
                Some(ComponentItem::ComponentFunc(_)) => {}
                Some(_) => {
                    return Err(LoadError::MissingExport {
                        plugin: plugin.into(),
                        detail: format!(
                            "export `{hook}` of world {} is not a function",
                            kind.world()
                        ),
                    })
                }
                None => {
                    return Err(LoadError::MissingExport {
                        plugin: plugin.into(),
                        detail: format!("missing export `{hook}` of world {}", kind.world()),
                    })
                }
            }
        }
        Ok(())
    }

    /// Compile (or load from the cache), check, link and self-test a new version.
    fn prepare(
        &self,
        plugin: &Arc<str>,
        kind: PluginKind,
        wasm: &[u8],
        source: &str,
        settings: Arc<SlotSettings>,
    ) -> Result<Arc<Version>, LoadError> {
        let name = plugin.to_string();
        let cfg = &self.inner.cfg;
        if wasm.len() > cfg.max_component_bytes {
            return Err(LoadError::TooLarge {
                plugin: name,
                size: wasm.len(),
                limit: cfg.max_component_bytes,
            });
        }
        if settings.config.len() > cfg.max_config_bytes {
            return Err(LoadError::ConfigTooLarge {
                plugin: name,
                size: settings.config.len(),
                limit: cfg.max_config_bytes,
            });
        }
        settings
            .validate(kind, cfg.max_config_bytes)
            .map_err(|detail| LoadError::Slot {
                plugin: name.clone(),
                detail,
            })?;
        if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
            let detail = match wasm.get(..4) {
                None => format!("{} bytes", wasm.len()),
                Some(m) => format!("starts with {m:02x?}, not \\0asm"),
            };
            return Err(LoadError::NotWasm {
                plugin: name,
                detail,
            });
        }
        if wasm[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule { plugin: name });
        }
        let sha = digest(wasm);
        let t0 = Instant::now();
        let (component, cache) = guarded_compile(&name, || {
            self.inner.cache.load(&self.inner.engine, wasm, &sha)
        })?;
        let compile = t0.elapsed();
        self.check_shape(plugin, &component, kind)?;
        let wasi = imports_wasi(&self.inner.engine, &component);
        let mut notes = Vec::new();
        let settings = match self.wasi_settings(wasi, &settings) {
            Some((adjusted, note)) => {
                tracing::warn!(plugin = %name, "{note}");
                notes.push(note);
                Arc::new(adjusted)
            }
            None => settings,
        };
        let link_err = |e: wasmtime::Error| LoadError::Link {
            plugin: name.clone(),
            detail: chain(&e),
        };
        let type_err = |e: wasmtime::Error| LoadError::MissingExport {
            plugin: name.clone(),
            detail: format!("exports do not match world {}: {}", kind.world(), chain(&e)),
        };
        let pre = match kind {
            PluginKind::Placement => {
                let ip = self
                    .inner
                    .linker_placement
                    .instantiate_pre(&component)
                    .map_err(link_err)?;
                Pre::Placement(placement_world::PlacementPre::new(ip).map_err(type_err)?)
            }
            PluginKind::DmPolicy => {
                let ip = self
                    .inner
                    .linker_dm
                    .instantiate_pre(&component)
                    .map_err(link_err)?;
                Pre::Dm(dm_world::DmPolicyPre::new(ip).map_err(type_err)?)
            }
        };
        let version = Arc::new(Version {
            id: 0, // assigned once the self-test passed: refused versions use no number

            digest: sha,
            source: source.to_string(),
            size: wasm.len(),
            cache,
            compile_ms: ms(compile),
            selftest_ms: 0.0,
            loaded_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            settings,
            wasi,
            notes,
            pre,
            idle: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        // Self-test: a first instance must come up and accept the config. It seeds the pool.
        let t1 = Instant::now();
        let live = self
            .instantiate(
                plugin,
                &version,
                version
                    .settings
                    .deadline_ms
                    .max(self.inner.cfg.init_deadline_ms),
            )
            .map_err(|(kind, detail)| match kind {
                FailureKind::PluginError => LoadError::InitRefused {
                    plugin: name.clone(),
                    message: detail,
                },
                _ => LoadError::InitFailed {
                    plugin: name.clone(),
                    detail: format!("{kind}: {detail}"),
                },
            })?;
        let selftest = t1.elapsed();
        lock(&version.idle).push(live);
        let mut version = Arc::into_inner(version).expect("version not shared yet");
        version.selftest_ms = ms(selftest);
        version.id = self.inner.next_version.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(version))
    }

    /// For a component importing WASI (interpreted: componentize-py, jco), the settings it
    /// runs with when `settings`' deadline is below the host's minimum for such components,
    /// and a note saying so; `None` when `settings` stand.
    fn wasi_settings(&self, wasi: bool, settings: &SlotSettings) -> Option<(SlotSettings, String)> {
        let cfg = &self.inner.cfg;
        if !wasi || settings.deadline_ms >= cfg.wasi_min_deadline_ms {
            return None;
        }
        let deadline = cfg.wasi_deadline_ms.max(cfg.wasi_min_deadline_ms);
        let note = format!(
            "component imports WASI (an interpreted plugin): deadline raised from {} ms to {deadline} ms \
             (plugins.wasi_deadline_ms; such components get at least {} ms, plugins.wasi_min_deadline_ms)",
            settings.deadline_ms, cfg.wasi_min_deadline_ms
        );
        Some((
            SlotSettings {
                deadline_ms: deadline,
                ..settings.clone()
            },
            note,
        ))
    }

    /// A fresh instance of `version`, `init` done within `deadline_ms`.
    fn instantiate(
        &self,
        plugin: &Arc<str>,
        version: &Version,
        deadline_ms: u64,
    ) -> Result<Live, (FailureKind, String)> {
        let state = HostState {
            slot: plugin.clone(),
            kv: self.inner.kv.clone(),
            kv_limits: self.inner.cfg.kv_limits,
            limits: Limiter {
                max_memory: version.settings.memory_limit,
                memory_hit: false,
            },
            wasi: super::wasi::deny_all(plugin),
            table: ResourceTable::new(),
            dm: None,
            started: self.inner.started,
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.ticks(deadline_ms));
        store.epoch_deadline_trap();
        let fail = |store: &Store<HostState>, e: wasmtime::Error| {
            (classify(&e, store.data().limits.memory_hit), chain(&e))
        };
        let config = version.settings.config.as_str();
        let (bound, init) = match &version.pre {
            Pre::Placement(pre) => {
                let b = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
                let r = b
                    .call_init(&mut store, config)
                    .map_err(|e| fail(&store, e))?;
                (Bound::Placement(b), r)
            }
            Pre::Dm(pre) => {
                let b = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
                let r = b
                    .call_init(&mut store, config)
                    .map_err(|e| fail(&store, e))?;
                (Bound::Dm(b), r)
            }
        };
        init.map_err(|msg| (FailureKind::PluginError, msg))?;
        version.counters.instance_created();
        Ok(Live { store, bound })
    }

    /// Run one call on the slot's current version. `f` returns the plugin's answer or how it
    /// is malformed / refused (the instance stays usable); a trap discards the instance.
    fn call<R>(
        &self,
        slot: &Slot,
        dm: Option<(Arc<dyn DmBackend>, u64)>,
        input: u64,
        f: impl FnOnce(
            &mut Store<HostState>,
            &Bound,
        ) -> wasmtime::Result<Result<R, (FailureKind, String)>>,
    ) -> (Arc<Version>, Result<R, (FailureKind, String)>) {
        let version = slot.current.load_full();
        let t0 = Instant::now();
        let pooled = lock(&version.idle).pop();
        let mut live = match pooled {
            Some(l) => l,
            None => match self.instantiate(&slot.name, &version, version.settings.deadline_ms) {
                Ok(l) => l,
                Err((kind, detail)) => {
                    let kind = if kind == FailureKind::PluginError {
                        FailureKind::Trap
                    } else {
                        kind
                    };
                    version
                        .counters
                        .record(t0.elapsed().as_nanos() as u64, Err(kind));
                    version.counters.policy_applied();
                    self.maybe_rollback(slot, &version);
                    return (
                        version,
                        Err((kind, format!("instantiation failed: {detail}"))),
                    );
                }
            },
        };
        live.store
            .set_epoch_deadline(self.deadline_ticks(&version.settings));
        live.store.data_mut().dm = dm;
        let huge = input > self.inner.cfg.rollback_input_bytes;
        let excusable = |kind: FailureKind| {
            huge && matches!(kind, FailureKind::Timeout | FailureKind::MemoryLimit)
        };
        let r = f(&mut live.store, &live.bound);
        live.store.data_mut().dm = None;
        let ns = t0.elapsed().as_nanos() as u64;
        let result = match r {
            Ok(answer) => {
                version
                    .counters
                    .record(ns, answer.as_ref().map(|_| ()).map_err(|(k, _)| *k));
                let mut idle = lock(&version.idle);
                if idle.len() < self.inner.cfg.max_idle_instances {
                    idle.push(live);
                }
                answer
            }
            Err(e) => {
                // A trapped instance is discarded here (dropped), never re-entered.
                let kind = classify(&e, live.store.data().limits.memory_hit);
                if excusable(kind) {
                    // a huge (valid) input, which any caller may send: not the plugin's
                    // fault, and never counted towards rollback
                    version.counters.record_excused(ns, kind);
                } else {
                    version.counters.record(ns, Err(kind));
                }
                Err((kind, chain(&e)))
            }
        };
        let label = match &result {
            Ok(_) => "ok",
            Err((FailureKind::Trap, _)) => "trap",
            Err((FailureKind::Timeout, _)) => "timeout",
            Err((FailureKind::MemoryLimit, _)) => "memory",
            Err((FailureKind::Malformed, _)) => "malformed",
            Err((FailureKind::PluginError, _)) => "plugin-error",
        };
        metrics::counter!("strata_plugin_calls_total", "slot" => slot.name.to_string(), "result" => label)
            .increment(1);
        if let Err((kind, _)) = &result {
            // Every failed call is answered by the hook's failure policy (see `failed`);
            // counted here, before a rollback may retire this version's counters.
            version.counters.policy_applied();
            if !excusable(*kind) && *kind != FailureKind::PluginError {
                self.maybe_rollback(slot, &version);
            }
        }
        (version, result)
    }

    fn maybe_rollback(&self, slot: &Slot, version: &Arc<Version>) {
        let (calls, failed) = version.counters.failure_rate_inputs();
        let p = version.settings.rollback;
        if calls < p.min_calls || (failed as f64) <= p.max_failure_rate * calls as f64 {
            return;
        }
        {
            let _g = lock(&slot.mgmt);
            if !Arc::ptr_eq(&slot.current.load(), version) {
                return;
            }
            let Some(prev) = lock(&slot.history).pop() else {
                return;
            };
            slot.current.store(prev.clone());
            self.retire(slot, version);
            metrics::counter!("strata_plugin_rollbacks_total", "slot" => slot.name.to_string())
                .increment(1);
            slot.note(format!(
                "auto-rollback: version {} failed {failed} of {calls} calls (threshold {:.0}%); version {} serves again",
                version.id,
                p.max_failure_rate * 100.0,
                prev.id
            ));
        }
        let hook = self
            .inner
            .on_rollback
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(self, &slot.name);
        }
    }

    fn retire(&self, slot: &Slot, version: &Version) {
        let mut r = lock(&slot.retired);
        *r = r.merge(&version.counters.snapshot());
    }

    fn failed<T>(
        &self,
        slot: &Slot,
        version: &Version,
        hook: &'static str,
        kind: FailureKind,
        detail: String,
        fallback: impl FnOnce(FailurePolicy) -> Option<T>,
    ) -> Result<Served<T>, CallError> {
        let policy = version.settings.policy(hook);
        let shown = super::bindings::escape_controls(&detail);
        tracing::warn!(plugin = %slot.name, version = version.id, hook, %kind, policy = ?policy, "{shown}");
        match fallback(policy) {
            Some(value) => Ok(Served {
                value,
                version: version.id,
                failure: Some(kind),
            }),
            None => Err(CallError::Aborted {
                plugin: slot.name.to_string(),
                hook,
                kind,
                detail,
                errno: match policy {
                    FailurePolicy::Abort { errno } => errno,
                    _ => libc::EIO,
                },
            }),
        }
    }

    fn typed_slot(&self, name: &str, kind: PluginKind) -> Result<Arc<Slot>, SlotError> {
        let slot = self.slot(name)?;
        if slot.kind != kind {
            return Err(SlotError::WrongKind {
                plugin: name.into(),
                expected: kind.world(),
                found: slot.kind.world(),
            });
        }
        Ok(slot)
    }

    // ---- management -------------------------------------------------------------------

    /// Load a component into a new slot.
    pub fn load(
        &self,
        name: &str,
        kind: PluginKind,
        wasm: &[u8],
        source: &str,
        settings: SlotSettings,
    ) -> Result<VersionInfo, LoadError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(LoadError::Slot {
                plugin: name.into(),
                detail: "slot names are 1-64 characters of [A-Za-z0-9._-]".into(),
            });
        }
        if self.slot(name).is_ok() {
            return Err(LoadError::Slot {
                plugin: name.into(),
                detail: "a slot of that name exists; use swap".into(),
            });
        }
        let plugin: Arc<str> = name.into();
        let version = self.prepare(&plugin, kind, wasm, source, Arc::new(settings))?;
        let info = version.info();
        let slot = Arc::new(Slot {
            name: plugin,
            kind,
            current: ArcSwap::new(version),
            history: Mutex::new(Vec::new()),
            retired: Mutex::new(Stats::default()),
            events: Mutex::new(VecDeque::new()),
            mgmt: Mutex::new(()),
        });
        let mut slots = self.inner.slots.write().unwrap_or_else(|p| p.into_inner());
        if slots.contains_key(name) {
            return Err(LoadError::Slot {
                plugin: name.into(),
                detail: "a slot of that name exists; use swap".into(),
            });
        }
        slot.note(format!(
            "loaded version {} from {source} ({}, cache {:?})",
            info.id,
            &info.digest[..12],
            info.cache
        ));
        slots.insert(name.to_string(), slot);
        Ok(info)
    }

    /// Replace the slot's version. The new one is compiled, instantiated and self-tested
    /// (`init` with the slot's config, or `settings` when given) before an atomic switch;
    /// calls in flight finish on the old version. On any error nothing changes.
    pub fn swap(
        &self,
        name: &str,
        wasm: &[u8],
        source: &str,
        settings: Option<SlotSettings>,
    ) -> Result<SwapReport, LoadError> {
        let slot = self.slot(name).map_err(|e| LoadError::Slot {
            plugin: name.into(),
            detail: e.to_string(),
        })?;
        let inherited = settings.is_none();
        let settings = match settings {
            Some(s) => Arc::new(s),
            None => slot.current.load().settings.clone(),
        };
        let base = settings.clone();
        // compile and self-test without the slot's management lock (a Python component
        // takes seconds to compile; the call path takes that lock for a rollback): only
        // the switch is serialized. Of two concurrent swaps the later switch wins, and
        // the earlier version goes to the history like any replaced one.
        let new = self.prepare(&slot.name, slot.kind, wasm, source, settings)?;
        let _g = lock(&slot.mgmt);
        let raced = |detail: &str| LoadError::Slot {
            plugin: name.into(),
            detail: detail.into(),
        };
        if !self.slot(name).is_ok_and(|now| Arc::ptr_eq(&now, &slot)) {
            return Err(raced(
                "the slot was unloaded while the new version compiled",
            ));
        }
        if inherited && !Arc::ptr_eq(&slot.current.load().settings, &base) {
            return Err(raced(
                "a concurrent swap changed the slot's settings while this version compiled: swap again",
            ));
        }
        let (compile_ms, selftest_ms, cache, to) =
            (new.compile_ms, new.selftest_ms, new.cache, new.id);
        let notes = new.notes.clone();
        let t = Instant::now();
        let old = slot.current.swap(new);
        let switch_ns = t.elapsed().as_nanos() as u64;
        let from = old.id;
        {
            let mut h = lock(&slot.history);
            h.push(old);
            if h.len() > self.inner.cfg.history {
                let dropped = h.remove(0);
                self.retire(&slot, &dropped);
            }
        }
        slot.note(format!("swapped version {from} -> {to} from {source} (compile {compile_ms:.1} ms, self-test {selftest_ms:.1} ms)"));
        Ok(SwapReport {
            from,
            to,
            compile_ms,
            selftest_ms,
            switch_ns,
            cache,
            notes,
        })
    }

    /// Go back to the previous version; the current one is dropped.
    pub fn rollback(&self, name: &str) -> Result<(u64, u64), SlotError> {
        let slot = self.slot(name)?;
        let _g = lock(&slot.mgmt);
        let prev = lock(&slot.history)
            .pop()
            .ok_or_else(|| SlotError::NoPreviousVersion(name.into()))?;
        let to = prev.id;
        let old = slot.current.swap(prev);
        self.retire(&slot, &old);
        slot.note(format!("rollback: version {} -> {to}", old.id));
        Ok((old.id, to))
    }

    /// Remove the slot and its key-value state; calls in flight finish (a key one of them
    /// writes after the removal stays until a slot of that name is unloaded again).
    pub fn unload(&self, name: &str) -> Result<(), SlotError> {
        {
            let mut slots = self.inner.slots.write().unwrap_or_else(|p| p.into_inner());
            slots
                .remove(name)
                .ok_or_else(|| SlotError::NoSuchSlot(name.into()))?;
        }
        match self.inner.kv.remove_slot(name) {
            Ok(n) if n > 0 => {
                tracing::info!(plugin = name, keys = n, "unloaded: key-value state removed")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(
                plugin = name,
                "unloaded, but its key-value state could not be removed: {e}"
            ),
        }
        Ok(())
    }

    /// Every slot.
    pub fn list(&self) -> Vec<SlotInfo> {
        let slots: Vec<Arc<Slot>> = self
            .inner
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        slots.iter().map(|s| self.info(s)).collect()
    }

    /// One slot.
    pub fn get(&self, name: &str) -> Result<SlotInfo, SlotError> {
        Ok(self.info(&*self.slot(name)?))
    }

    fn info(&self, s: &Slot) -> SlotInfo {
        let cur = s.current.load_full();
        let history: Vec<VersionInfo> = lock(&s.history).iter().rev().map(|v| v.info()).collect();
        let current = cur.info();
        let mut total = lock(&s.retired).clone().merge(&current.stats);
        for h in &history {
            total = total.merge(&h.stats);
        }
        SlotInfo {
            name: s.name.to_string(),
            kind: s.kind,
            current,
            history,
            total,
            settings: (*cur.settings).clone(),
            events: lock(&s.events).iter().cloned().collect(),
        }
    }

    /// One page of the slot's key-value state, from `from` (the `next` of the previous
    /// page; `None`: the beginning), whose JSON encoding takes at most about `budget` bytes
    /// (at least one part). A value larger than what is left of the page is split over pages; parts
    /// come in key order, each value's parts in offset order. Pages are read one at a time:
    /// keys changed between two pages may show either value.
    pub fn state_page(
        &self,
        name: &str,
        from: Option<&StateCursor>,
        budget: usize,
    ) -> Result<StatePage, SlotError> {
        let slot = self.slot(name)?;
        let budget = budget.max(1);
        let (mut key, mut offset) = match from {
            Some(c) => (c.key.clone(), c.offset),
            None => (String::new(), 0),
        };
        let mut parts = Vec::new();
        let mut used = 0usize;
        loop {
            let batch = self
                .inner
                .kv
                .range(&slot.name, &key, 64)
                .unwrap_or_default();
            let last = batch.len() < 64;
            for (k, v) in batch {
                if k == key && offset >= v.len() as u64 && offset > 0 {
                    continue; // the value shrank since the previous page
                }
                let start = if k == key { offset as usize } else { 0 };
                let start = start.min(v.len());
                // What the part costs in the reply's JSON at worst: escaped key, numbers of
                // up to 4 characters per byte.
                let overhead = k.len() * 6 + 64;
                let room = budget.saturating_sub(used + overhead) / 4;
                if room == 0 && !parts.is_empty() {
                    return Ok(StatePage {
                        parts,
                        next: Some(StateCursor {
                            key: k,
                            offset: start as u64,
                        }),
                    });
                }
                let take = (v.len() - start).min(room.max(1));
                let end = start + take;
                used += overhead + take * 4;
                let total = v.len() as u64;
                parts.push(StatePart {
                    key: k.clone(),
                    offset: start as u64,
                    total,
                    data: v[start..end].to_vec(),
                });
                if end < v.len() {
                    return Ok(StatePage {
                        parts,
                        next: Some(StateCursor {
                            key: k,
                            offset: end as u64,
                        }),
                    });
                }
                // the next batch starts after this key
                key = format!("{k}\0");
                offset = 0;
            }
            if last {
                return Ok(StatePage { parts, next: None });
            }
        }
    }

    /// The slot's key-value state (what its plugin stored with `kv`), keys in byte order.
    pub fn state(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>, SlotError> {
        let slot = self.slot(name)?;
        let kv = &self.inner.kv;
        let keys = kv.keys(&slot.name, "").unwrap_or_default();
        Ok(keys
            .into_iter()
            .filter_map(|k| kv.get(&slot.name, &k).ok().flatten().map(|v| (k, v)))
            .collect())
    }

    // ---- placement --------------------------------------------------------------------

    /// `place`: the hosts ordered for `chunk`, first = alpha copy. The answer must name only
    /// given hosts, each once, and at least one when hosts were given; anything else is a
    /// malformed answer and gets the failure policy.
    pub fn place(
        &self,
        slot: &str,
        chunk: &ChunkRef,
        size: u64,
        hosts: &[HostInfo],
    ) -> Result<Served<Vec<String>>, CallError> {
        let s = self.typed_slot(slot, PluginKind::Placement)?;
        self.check_place_input(chunk, hosts)
            .map_err(|detail| CallError::Invalid {
                plugin: slot.into(),
                hook: "place",
                detail,
            })?;
        let input = place_input_bytes(chunk, hosts);
        let (version, r) = self.call(&s, None, input, |store, bound| {
            let Bound::Placement(b) = bound else {
                unreachable!("slot kind checked at load")
            };
            Ok(match b.call_place(&mut *store, chunk, size, hosts)? {
                Ok(order) => validate_order(&order, hosts).map(|()| order),
                Err(msg) => Err((FailureKind::PluginError, msg)),
            })
        });
        match r {
            Ok(order) => Ok(Served {
                value: order,
                version: version.id,
                failure: None,
            }),
            Err((kind, detail)) => self.failed(&s, &version, "place", kind, detail, |p| match p {
                FailurePolicy::Continue => Some(hosts.iter().map(|h| h.id.clone()).collect()),
                FailurePolicy::Builtin => Some(builtin_place(hosts)),
                FailurePolicy::Abort { .. } => None,
            }),
        }
    }

    /// `rebalance`: the copies to move after a membership change. Moves must name chunks of
    /// the change and hosts of `after` (destination) / the chunk's copies (source).
    pub fn rebalance(
        &self,
        slot: &str,
        change: &MembershipChange,
    ) -> Result<Served<Vec<ChunkMove>>, CallError> {
        let s = self.typed_slot(slot, PluginKind::Placement)?;
        self.check_rebalance_input(change)
            .map_err(|detail| CallError::Invalid {
                plugin: slot.into(),
                hook: "rebalance",
                detail,
            })?;
        let input = rebalance_input_bytes(change);
        let (version, r) = self.call(&s, None, input, |store, bound| {
            let Bound::Placement(b) = bound else {
                unreachable!("slot kind checked at load")
            };
            Ok(match b.call_rebalance(&mut *store, change)? {
                Ok(moves) => validate_moves(&moves, change).map(|()| moves),
                Err(msg) => Err((FailureKind::PluginError, msg)),
            })
        });
        match r {
            Ok(m) => Ok(Served {
                value: m,
                version: version.id,
                failure: None,
            }),
            Err((kind, detail)) => {
                self.failed(&s, &version, "rebalance", kind, detail, |p| match p {
                    FailurePolicy::Continue => Some(Vec::new()),
                    FailurePolicy::Builtin => Some(builtin_rebalance(change)),
                    FailurePolicy::Abort { .. } => None,
                })
            }
        }
    }

    /// A name of a request (host id, space, chunk): 1..=max_name_bytes bytes, no control
    /// characters.
    fn check_name(&self, what: &str, name: &str) -> Result<(), String> {
        let max = self.inner.cfg.max_name_bytes;
        if name.is_empty() {
            return Err(format!("empty {what}"));
        }
        if name.len() > max {
            return Err(format!(
                "{what} of {} bytes, the limit is {max} (plugins.max_name_bytes)",
                name.len()
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(format!(
                "{what} '{}' contains control characters",
                super::bindings::escape_controls(truncate(name))
            ));
        }
        Ok(())
    }

    /// A host list of a request: at most max_hosts, valid ids, each once, free <= capacity.
    fn check_hosts(&self, what: &str, hosts: &[HostInfo]) -> Result<(), String> {
        let max = self.inner.cfg.max_hosts;
        if hosts.len() > max {
            return Err(format!(
                "{} {what}, the limit is {max} (plugins.max_hosts)",
                hosts.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for h in hosts {
            self.check_name("host id", &h.id)?;
            if !seen.insert(h.id.as_str()) {
                return Err(format!("host '{}' named twice", truncate(&h.id)));
            }
            if h.free_bytes > h.capacity_bytes {
                return Err(format!(
                    "host '{}' has {} free bytes of a capacity of {}",
                    truncate(&h.id),
                    h.free_bytes,
                    h.capacity_bytes
                ));
            }
        }
        Ok(())
    }

    fn check_chunk(&self, c: &ChunkRef) -> Result<(), String> {
        self.check_name("space name", &c.space)?;
        self.check_name("chunk name", &c.name)
    }

    /// Caller errors of a `place` request, found before the plugin runs.
    fn check_place_input(&self, chunk: &ChunkRef, hosts: &[HostInfo]) -> Result<(), String> {
        self.check_chunk(chunk)?;
        self.check_hosts("hosts", hosts)
    }

    /// Caller errors of a `rebalance` request, found before the plugin runs.
    fn check_rebalance_input(&self, change: &MembershipChange) -> Result<(), String> {
        self.check_hosts("hosts before", &change.before)?;
        self.check_hosts("hosts after", &change.after)?;
        let max = self.inner.cfg.max_rebalance_chunks;
        if change.chunks.len() > max {
            return Err(format!(
                "{} chunks, the limit is {max} (plugins.max_rebalance_chunks)",
                change.chunks.len()
            ));
        }
        let mut chunks = BTreeSet::new();
        for c in &change.chunks {
            self.check_chunk(&c.chunk)?;
            if !chunks.insert((c.chunk.space.as_str(), c.chunk.name.as_str())) {
                return Err(format!("chunk '{}' named twice", truncate(&c.chunk.name)));
            }
            if c.hosts.len() > self.inner.cfg.max_hosts {
                return Err(format!(
                    "chunk '{}' has {} copies, the limit is {} (plugins.max_hosts)",
                    truncate(&c.chunk.name),
                    c.hosts.len(),
                    self.inner.cfg.max_hosts
                ));
            }
            let mut holders = BTreeSet::new();
            for h in &c.hosts {
                self.check_name("host id", h)?;
                if !holders.insert(h.as_str()) {
                    return Err(format!(
                        "chunk '{}' names host '{}' twice",
                        truncate(&c.chunk.name),
                        truncate(h)
                    ));
                }
            }
        }
        Ok(())
    }

    // ---- dm-policy --------------------------------------------------------------------

    /// `on-event` for a synchronous event. `backend` serves the plugin's `dm-host` imports,
    /// scoped to `event.token`.
    pub fn on_event(
        &self,
        slot: &str,
        event: &Event,
        backend: Option<Arc<dyn DmBackend>>,
    ) -> Result<Served<Response>, CallError> {
        let s = self.typed_slot(slot, PluginKind::DmPolicy)?;
        let dm = backend.map(|b| (b, event.token));
        let (version, r) = self.call(&s, dm, 0, |store, bound| {
            let Bound::Dm(b) = bound else {
                unreachable!("slot kind checked at load")
            };
            let resp = b.call_on_event(&mut *store, event)?;
            Ok(match resp {
                Response::Abort(0) => {
                    Err((FailureKind::Malformed, "abort with errno 0".to_string()))
                }
                other => Ok(other),
            })
        });
        match r {
            Ok(resp) => Ok(Served {
                value: resp,
                version: version.id,
                failure: None,
            }),
            Err((kind, detail)) => {
                self.failed(&s, &version, "on-event", kind, detail, |p| match p {
                    FailurePolicy::Continue | FailurePolicy::Builtin => Some(Response::Continue),
                    FailurePolicy::Abort { errno } => Some(Response::Abort(errno as u32)),
                })
            }
        }
    }

    /// `on-notify` for an asynchronous event.
    pub fn on_notify(
        &self,
        slot: &str,
        event: &Event,
        backend: Option<Arc<dyn DmBackend>>,
    ) -> Result<Served<()>, CallError> {
        let s = self.typed_slot(slot, PluginKind::DmPolicy)?;
        let dm = backend.map(|b| (b, event.token));
        let (version, r) = self.call(&s, dm, 0, |store, bound| {
            let Bound::Dm(b) = bound else {
                unreachable!("slot kind checked at load")
            };
            b.call_on_notify(&mut *store, event)?;
            Ok(Ok(()))
        });
        match r {
            Ok(()) => Ok(Served {
                value: (),
                version: version.id,
                failure: None,
            }),
            Err((kind, detail)) => {
                self.failed(&s, &version, "on-notify", kind, detail, |p| match p {
                    FailurePolicy::Abort { .. } => None,
                    _ => Some(()),
                })
            }
        }
    }

    /// `scan` over a batch of files. Every action must name a handle of the batch, and
    /// `migrate` a non-empty tier.
    pub fn scan(
        &self,
        slot: &str,
        batch: &[FileStat],
        backend: Option<Arc<dyn DmBackend>>,
    ) -> Result<Served<Vec<ScanAction>>, CallError> {
        let s = self.typed_slot(slot, PluginKind::DmPolicy)?;
        let dm = backend.map(|b| (b, 0));
        let (version, r) = self.call(&s, dm, 0, |store, bound| {
            let Bound::Dm(b) = bound else {
                unreachable!("slot kind checked at load")
            };
            let actions = b.call_scan(&mut *store, batch)?;
            Ok(validate_actions(&actions, batch).map(|()| actions))
        });
        match r {
            Ok(a) => Ok(Served {
                value: a,
                version: version.id,
                failure: None,
            }),
            Err((kind, detail)) => self.failed(&s, &version, "scan", kind, detail, |p| match p {
                FailurePolicy::Abort { .. } => None,
                _ => Some(Vec::new()),
            }),
        }
    }
}

/// Whether the component imports any WASI interface (what interpreted components do).
fn imports_wasi(engine: &Engine, component: &Component) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.starts_with("wasi:"))
}

/// Run a compilation, turning a panic inside the compiler (e.g. a thread pool that could not
/// start when threads or memory maps are exhausted) into a load error: resource exhaustion
/// must never take the daemon down.
fn guarded_compile<T>(
    plugin: &str,
    compile: impl FnOnce() -> wasmtime::Result<T>,
) -> Result<T, LoadError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(compile)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => {
            let detail = chain(&e);
            // The compiler's own resources (code memory, threads) failing is the host's
            // fault, not a property of the component.
            let resources = e
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().is_some())
                || ["mmap", "os error", "Cannot allocate memory"]
                    .iter()
                    .any(|w| detail.contains(w));
            Err(if resources {
                LoadError::Host {
                    plugin: plugin.into(),
                    detail: format!(
                        "compilation failed for lack of resources (threads, memory maps?): {detail}"
                    ),
                }
            } else {
                LoadError::Invalid {
                    plugin: plugin.into(),
                    detail,
                }
            })
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(plugin, "compilation panicked: {what}");
            Err(LoadError::Host {
                plugin: plugin.into(),
                detail: format!(
                    "compilation failed inside the host ({what}); the host may be out of threads or memory maps"
                ),
            })
        }
    }
}

/// Build rayon's global pool (wasmtime's parallel compilation runs on it) now, so a host out
/// of threads or memory maps gets a clear answer here instead of a panic inside a later
/// compilation. `false`: the pool could not start; compile on the calling thread.
fn compile_pool_ready() -> bool {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("plugin-compile-{i}"))
        .build_global()
    {
        Ok(()) => true,
        // Built before (another host in this process): it is there to use.
        Err(e) if e.to_string().contains("already been initialized") => true,
        Err(e) => {
            tracing::warn!(
                "cannot start the plugin compilation threads ({e}); compiling on one thread"
            );
            false
        }
    }
}

/// What a host entry costs on top of its id (free and capacity, the list's slot).
const HOST_ENTRY_BYTES: u64 = 24;

fn hosts_input_bytes(hosts: &[HostInfo]) -> u64 {
    hosts
        .iter()
        .map(|h| h.id.len() as u64 + HOST_ENTRY_BYTES)
        .sum()
}

/// The size of a `place` input: the bytes the plugin is given to look at.
pub fn place_input_bytes(chunk: &ChunkRef, hosts: &[HostInfo]) -> u64 {
    (chunk.space.len() + chunk.name.len()) as u64 + hosts_input_bytes(hosts)
}

/// The size of a `rebalance` input.
pub fn rebalance_input_bytes(change: &MembershipChange) -> u64 {
    hosts_input_bytes(&change.before)
        + hosts_input_bytes(&change.after)
        + (change.chunks.iter())
            .map(|c| {
                (c.chunk.space.len() + c.chunk.name.len()) as u64
                    + 16
                    + c.hosts.iter().map(|h| h.len() as u64 + 8).sum::<u64>()
            })
            .sum::<u64>()
}

fn validate_order(order: &[String], hosts: &[HostInfo]) -> Result<(), (FailureKind, String)> {
    let known: BTreeSet<&str> = hosts.iter().map(|h| h.id.as_str()).collect();
    let mut seen = BTreeSet::new();
    if order.is_empty() && !hosts.is_empty() {
        return Err((FailureKind::Malformed, "empty host order".into()));
    }
    for h in order {
        if !known.contains(h.as_str()) {
            return Err((
                FailureKind::Malformed,
                format!("unknown host '{}' in answer", truncate(h)),
            ));
        }
        if !seen.insert(h.as_str()) {
            return Err((
                FailureKind::Malformed,
                format!("host '{}' named twice", truncate(h)),
            ));
        }
    }
    Ok(())
}

fn validate_moves(
    moves: &[ChunkMove],
    change: &MembershipChange,
) -> Result<(), (FailureKind, String)> {
    let after: BTreeSet<&str> = change.after.iter().map(|h| h.id.as_str()).collect();
    let chunks: BTreeMap<(&str, &str), &[String]> = change
        .chunks
        .iter()
        .map(|c| {
            (
                (c.chunk.space.as_str(), c.chunk.name.as_str()),
                c.hosts.as_slice(),
            )
        })
        .collect();
    for m in moves {
        let Some(copies) = chunks.get(&(m.chunk.space.as_str(), m.chunk.name.as_str())) else {
            return Err((
                FailureKind::Malformed,
                format!("move of unknown chunk '{}'", truncate(&m.chunk.name)),
            ));
        };
        if !copies.contains(&m.from) {
            return Err((
                FailureKind::Malformed,
                format!("move from '{}', which holds no copy", truncate(&m.from)),
            ));
        }
        if !after.contains(m.to.as_str()) {
            return Err((
                FailureKind::Malformed,
                format!("move to '{}', which is not a member", truncate(&m.to)),
            ));
        }
    }
    Ok(())
}

fn validate_actions(
    actions: &[ScanAction],
    batch: &[FileStat],
) -> Result<(), (FailureKind, String)> {
    let handles: BTreeSet<&[u8]> = batch.iter().map(|f| f.handle.as_slice()).collect();
    for a in actions {
        if !handles.contains(a.handle.as_slice()) {
            return Err((
                FailureKind::Malformed,
                "action on a handle that is not in the batch".into(),
            ));
        }
        if let super::bindings::Action::Migrate(tier) = &a.action {
            if tier.is_empty() {
                return Err((FailureKind::Malformed, "migrate to an unnamed tier".into()));
            }
        }
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    &s[..s.floor_char_boundary(64)]
}

/// Built-in placement: most free space first, ties by host id.
pub fn builtin_place(hosts: &[HostInfo]) -> Vec<String> {
    let mut v: Vec<&HostInfo> = hosts.iter().collect();
    v.sort_by(|a, b| {
        b.free_bytes
            .cmp(&a.free_bytes)
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut seen = BTreeSet::new();
    v.into_iter()
        .filter(|h| seen.insert(h.id.as_str()))
        .map(|h| h.id.clone())
        .collect()
}

/// Built-in rebalance: every copy on a host that left moves to the member with the most
/// free space that holds no copy of that chunk yet.
pub fn builtin_rebalance(change: &MembershipChange) -> Vec<ChunkMove> {
    let order = builtin_place(&change.after);
    let members: BTreeSet<&str> = change.after.iter().map(|h| h.id.as_str()).collect();
    let mut out = Vec::new();
    for c in &change.chunks {
        let mut holders: BTreeSet<&str> = c
            .hosts
            .iter()
            .map(|h| h.as_str())
            .filter(|h| members.contains(h))
            .collect();
        for (i, h) in c.hosts.iter().enumerate() {
            if members.contains(h.as_str()) {
                continue;
            }
            if let Some(to) = order.iter().find(|o| !holders.contains(o.as_str())) {
                holders.insert(to.as_str());
                out.push(ChunkMove {
                    chunk: c.chunk.clone(),
                    from: h.clone(),
                    to: to.clone(),
                    to_alpha: i == 0,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 7 (issue 10): a compilation that panics (rayon's "The global thread pool has not
    /// been initialized" when threads or memory maps ran out) is a load error, not a panic.
    #[test]
    fn a_panicking_compilation_is_a_load_error() {
        let r: Result<(), LoadError> = guarded_compile("p", || {
            panic!("The global thread pool has not been initialized.")
        });
        match r {
            Err(e @ LoadError::Host { .. }) => {
                assert_eq!(e.fault(), super::super::error::Fault::Host);
                let msg = e.to_string();
                assert!(
                    msg.contains("plugin 'p'") && msg.contains("thread pool"),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
        let r: Result<(), LoadError> =
            guarded_compile("p", || Err(wasmtime::Error::msg("bad bytes")));
        assert!(matches!(r, Err(LoadError::Invalid { .. })));
        let r: Result<(), LoadError> = guarded_compile("p", || {
            Err(wasmtime::Error::new(std::io::Error::from_raw_os_error(
                libc::ENOMEM,
            )))
        });
        assert!(matches!(r, Err(LoadError::Host { .. })), "{r:?}");
    }

    /// The compile pool is built (or found built) once; a host compiles either way.
    #[test]
    fn compile_pool_is_ready_and_a_host_compiles() {
        assert!(compile_pool_ready());
        assert!(compile_pool_ready(), "a second call finds the pool built");
        let h = PluginHost::new(HostConfig::default(), super::super::kv::MemKv::new()).unwrap();
        // The empty component compiles; it is refused as the wrong shape.
        let err = h
            .load(
                "p",
                PluginKind::Placement,
                b"\0asm\x0d\0\x01\0",
                "t",
                SlotSettings::default(),
            )
            .unwrap_err();
        assert!(matches!(err, LoadError::MissingExport { .. }), "{err}");
    }
}
