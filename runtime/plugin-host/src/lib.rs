//! Plugin host: sandboxed WebAssembly components that make Strata's decisions.
//!
//! ```text
//!   load/swap(bytes) ─► cache (sha256 → precompiled .cwasm) ─► shape check (world, WIT
//!   version, exports) ─► link (log, clock, kv, dm-host, deny-all WASI) ─► self-test
//!   (instantiate + init(config)) ─► atomic switch of the slot's current version
//!
//!   call(slot) ─► current version (Arc, so in-flight calls finish on it) ─► idle instance
//!   or a fresh one ─► epoch deadline + memory cap ─► answer checked ─► instance back to
//!   the pool, or discarded after a trap ─► failure policy ─► counters ─► rollback check
//! ```
//!
//! The narrow API is [`PluginHost`]: `load`, `swap`, `rollback`, `unload`, `list`, and the
//! typed calls `place`, `rebalance`, `on_event`, `on_notify`, `scan`. Everything a plugin
//! sends back is checked before the caller sees it; a trap, a timeout, the memory cap or a
//! malformed answer never reaches the daemon as anything but a [`FailureKind`] and the
//! hook's [`FailurePolicy`].
//!
//! Instances: each version keeps a pool of idle instances, each used by one caller at a
//! time (a `Store` is single-owner). Guest memory is scratch: a new instance may serve the
//! next call, so durable plugin state belongs in the `kv` store, which survives swaps and
//! restarts.
#![warn(missing_docs)]

mod bindings;
mod cache;
mod error;
mod host;
mod kv;
pub mod records;
mod settings;
mod stats;
mod wasi;

pub use bindings::escape_controls;
pub use bindings::{
    Action, CancelEvent, ChunkMove, ChunkPlacement, ChunkRef, DataEvent, DestroyEvent, DmBackend,
    DmError, Event, EventData, EventType, Extent, ExtentType, FileStat, HostInfo, MembershipChange,
    MountEvent, NamespaceEvent, Region, RegionFlags, Response, Right, ScanAction, Timestamp,
};
pub use cache::CacheOutcome;
pub use error::{CallError, FailureKind, Fault, LoadError, SlotError};
pub use host::{
    builtin_place, builtin_rebalance, place_input_bytes, rebalance_input_bytes, HostConfig,
    PluginHost, RollbackHook, Served, SlotInfo, StateCursor, StatePage, StatePart, SwapReport,
    VersionInfo, WIT_VERSION,
};
pub use kv::{KvError, KvLimits, KvStore, MemKv, RedbKv, MAX_KEY};
pub use settings::{errno_from_name, FailurePolicy, PluginKind, RollbackPolicy, SlotSettings};
pub use stats::Stats;
