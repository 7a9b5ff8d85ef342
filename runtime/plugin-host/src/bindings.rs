//! Host-side bindings of the two worlds (wasmtime `bindgen!`) and the host imports:
//! `log`, `clock`, `kv`, `dm-host`, plus WASI for components that import it.

use super::kv::{KvError, KvLimits, KvStore};
use std::sync::Arc;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// World `placement`.
#[allow(missing_docs)]
pub mod placement_world {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "placement",
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
    });
}

/// World `dm-policy`. The shared interfaces are those of [`placement_world`].
#[allow(missing_docs)]
pub mod dm_world {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "dm-policy",
        with: {
            "strata:plugin/log": super::placement_world::strata::plugin::log,
            "strata:plugin/clock": super::placement_world::strata::plugin::clock,
            "strata:plugin/kv": super::placement_world::strata::plugin::kv,
            "strata:plugin/dm-types": super::placement_world::strata::plugin::dm_types,
        },
    });
}

/// The DMAPI types of `wit/types.wit`, as Rust types.
pub use dm_types::{
    Action, CancelEvent, DataEvent, DestroyEvent, DmError, Event, EventData, EventType, Extent,
    ExtentType, FileStat, MountEvent, NamespaceEvent, Region, RegionFlags, Response, Right,
    ScanAction, Timestamp,
};
/// The placement types of `wit/types.wit`, as Rust types.
pub use placement_world::strata::plugin::placement_types::{
    ChunkMove, ChunkPlacement, ChunkRef, HostInfo, MembershipChange,
};
use placement_world::strata::plugin::{clock, dm_types, kv, log};

/// What `dm-host` imports do, implemented by the DM core. Each call carries the token of the
/// event being handled (0 during scans: rights are acquired per call).
pub trait DmBackend: Send + Sync {
    /// dm_get_fileattr.
    fn stat(&self, token: u64, handle: &[u8]) -> Result<FileStat, DmError>;
    /// dm_get_dmattr.
    fn get_dmattr(&self, token: u64, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, DmError>;
    /// dm_set_dmattr.
    fn set_dmattr(
        &self,
        token: u64,
        handle: &[u8],
        name: &[u8],
        value: &[u8],
    ) -> Result<(), DmError>;
    /// dm_remove_dmattr.
    fn remove_dmattr(&self, token: u64, handle: &[u8], name: &[u8]) -> Result<(), DmError>;
    /// dm_get_region.
    fn get_regions(&self, token: u64, handle: &[u8]) -> Result<Vec<Region>, DmError>;
    /// dm_set_region.
    fn set_regions(&self, token: u64, handle: &[u8], regions: &[Region]) -> Result<bool, DmError>;
    /// dm_get_allocinfo.
    fn allocinfo(&self, token: u64, handle: &[u8], offset: u64) -> Result<Vec<Extent>, DmError>;
    /// dm_probe_hole.
    fn probe_hole(
        &self,
        token: u64,
        handle: &[u8],
        off: u64,
        len: u64,
    ) -> Result<(u64, u64), DmError>;
    /// dm_punch_hole.
    fn punch_hole(&self, token: u64, handle: &[u8], off: u64, len: u64) -> Result<(), DmError>;
    /// dm_read_invis.
    fn read_invis(&self, token: u64, handle: &[u8], off: u64, len: u64)
        -> Result<Vec<u8>, DmError>;
    /// dm_write_invis.
    fn write_invis(
        &self,
        token: u64,
        handle: &[u8],
        off: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<u64, DmError>;
    /// Native migration to a tier.
    fn request_migrate(&self, token: u64, handle: &[u8], tier: &str) -> Result<(), DmError>;
    /// Native recall from the tier.
    fn request_recall(&self, token: u64, handle: &[u8], off: u64, len: u64) -> Result<(), DmError>;
}

/// The data of one plugin instance's store.
pub(crate) struct HostState {
    pub(crate) slot: Arc<str>,
    pub(crate) kv: Arc<dyn KvStore>,
    pub(crate) kv_limits: KvLimits,
    pub(crate) limits: Limiter,
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// The DM backend and token of the event being handled; `None` outside DM calls.
    pub(crate) dm: Option<(Arc<dyn DmBackend>, u64)>,
    pub(crate) started: std::time::Instant,
}

/// Memory and table caps of one instance; records whether the memory cap was hit so a trap
/// can be told apart from a refused allocation.
pub(crate) struct Limiter {
    pub(crate) max_memory: usize,
    pub(crate) memory_hit: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_hit = true;
            wasmtime::bail!(
                "memory cap of {} bytes reached (wanted {desired})",
                self.max_memory
            );
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let slot = &*self.slot;
        let message = if message.len() > 8192 {
            &message[..message.floor_char_boundary(8192)]
        } else {
            &message
        };
        // A plugin's text never forges log lines: newlines and other control characters
        // are written escaped.
        let message = &*escape_controls(message);
        match level {
            log::Level::Trace => tracing::trace!(plugin = slot, "{message}"),
            log::Level::Debug => tracing::debug!(plugin = slot, "{message}"),
            log::Level::Info => tracing::info!(plugin = slot, "{message}"),
            log::Level::Warn => tracing::warn!(plugin = slot, "{message}"),
            log::Level::Error => tracing::error!(plugin = slot, "{message}"),
        }
    }
}

impl clock::Host for HostState {
    fn now(&mut self) -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            nanoseconds: d.subsec_nanos(),
        }
    }
    fn monotonic_ns(&mut self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

/// `text` with control characters (newlines, carriage returns, escapes, ...) written as
/// Rust escapes (`\n`, `\u{1b}`), so what a plugin (or a client) sends can never start a
/// new log line or drive a terminal. (Backslashes stay as they are: they cannot forge a line.)
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn kv_err(e: KvError) -> kv::KvError {
    match e {
        KvError::TooLarge => kv::KvError::TooLarge,
        KvError::QuotaExceeded => kv::KvError::QuotaExceeded,
        KvError::Unavailable(m) => {
            tracing::error!("plugin kv store failed: {m}");
            kv::KvError::Unavailable
        }
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        match self.kv.get(&self.slot, &key) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(plugin = %self.slot, "kv get failed: {e}");
                None
            }
        }
    }
    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), kv::KvError> {
        self.kv
            .set(&self.slot, &key, &value, &self.kv_limits)
            .map_err(kv_err)
    }
    fn delete(&mut self, key: String) -> Result<bool, kv::KvError> {
        self.kv.delete(&self.slot, &key).map_err(kv_err)
    }
    fn keys(&mut self, prefix: String) -> Vec<String> {
        self.kv.keys(&self.slot, &prefix).unwrap_or_else(|e| {
            tracing::error!(plugin = %self.slot, "kv keys failed: {e}");
            Vec::new()
        })
    }
    fn add(&mut self, key: String, delta: u64) -> Result<u64, kv::KvError> {
        self.kv
            .add(&self.slot, &key, delta, &self.kv_limits)
            .map_err(kv_err)
    }
    fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, kv::KvError> {
        self.kv
            .compare_and_swap(
                &self.slot,
                &key,
                expected.as_deref(),
                new.as_deref(),
                &self.kv_limits,
            )
            .map_err(kv_err)
    }
}

impl dm_types::Host for HostState {}
impl placement_world::strata::plugin::placement_types::Host for HostState {}

impl HostState {
    fn dm<T>(
        &self,
        what: &str,
        f: impl FnOnce(&dyn DmBackend, u64) -> Result<T, DmError>,
    ) -> Result<T, DmError> {
        match &self.dm {
            Some((backend, token)) => f(&**backend, *token),
            None => {
                tracing::debug!(plugin = %self.slot, "dm-host.{what}: no DM session behind this call (ENOSYS)");
                Err(DmError::Enosys)
            }
        }
    }
}

impl dm_world::strata::plugin::dm_host::Host for HostState {
    fn stat(&mut self, handle: Vec<u8>) -> Result<FileStat, DmError> {
        self.dm("stat", |b, t| b.stat(t, &handle))
    }
    fn get_dmattr(&mut self, handle: Vec<u8>, name: Vec<u8>) -> Result<Vec<u8>, DmError> {
        self.dm("get-dmattr", |b, t| b.get_dmattr(t, &handle, &name))
    }
    fn set_dmattr(
        &mut self,
        handle: Vec<u8>,
        name: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), DmError> {
        self.dm("set-dmattr", |b, t| b.set_dmattr(t, &handle, &name, &value))
    }
    fn remove_dmattr(&mut self, handle: Vec<u8>, name: Vec<u8>) -> Result<(), DmError> {
        self.dm("remove-dmattr", |b, t| b.remove_dmattr(t, &handle, &name))
    }
    fn get_regions(&mut self, handle: Vec<u8>) -> Result<Vec<Region>, DmError> {
        self.dm("get-regions", |b, t| b.get_regions(t, &handle))
    }
    fn set_regions(&mut self, handle: Vec<u8>, regions: Vec<Region>) -> Result<bool, DmError> {
        self.dm("set-regions", |b, t| b.set_regions(t, &handle, &regions))
    }
    fn allocinfo(&mut self, handle: Vec<u8>, offset: u64) -> Result<Vec<Extent>, DmError> {
        self.dm("allocinfo", |b, t| b.allocinfo(t, &handle, offset))
    }
    fn probe_hole(
        &mut self,
        handle: Vec<u8>,
        offset: u64,
        length: u64,
    ) -> Result<(u64, u64), DmError> {
        self.dm("probe-hole", |b, t| {
            b.probe_hole(t, &handle, offset, length)
        })
    }
    fn punch_hole(&mut self, handle: Vec<u8>, offset: u64, length: u64) -> Result<(), DmError> {
        self.dm("punch-hole", |b, t| {
            b.punch_hole(t, &handle, offset, length)
        })
    }
    fn read_invis(
        &mut self,
        handle: Vec<u8>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, DmError> {
        self.dm("read-invis", |b, t| {
            b.read_invis(t, &handle, offset, length)
        })
    }
    fn write_invis(
        &mut self,
        handle: Vec<u8>,
        offset: u64,
        data: Vec<u8>,
        sync: bool,
    ) -> Result<u64, DmError> {
        self.dm("write-invis", |b, t| {
            b.write_invis(t, &handle, offset, &data, sync)
        })
    }
    fn request_migrate(&mut self, handle: Vec<u8>, tier: String) -> Result<(), DmError> {
        self.dm("request-migrate", |b, t| {
            b.request_migrate(t, &handle, &tier)
        })
    }
    fn request_recall(&mut self, handle: Vec<u8>, offset: u64, length: u64) -> Result<(), DmError> {
        self.dm("request-recall", |b, t| {
            b.request_recall(t, &handle, offset, length)
        })
    }
}

const REGION_FLAG_NAMES: [(&str, RegionFlags); 3] = [
    ("read", RegionFlags::READ),
    ("write", RegionFlags::WRITE),
    ("truncate", RegionFlags::TRUNCATE),
];

/// Region flags serialize as a list of names (`[]` is DM_REGION_NOEVENT).
impl serde::Serialize for RegionFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = REGION_FLAG_NAMES
            .iter()
            .filter(|(_, f)| self.contains(*f))
            .map(|(n, _)| *n)
            .collect();
        names.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for RegionFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names: Vec<String> = serde::Deserialize::deserialize(d)?;
        let mut out = RegionFlags::empty();
        for n in names {
            let f = REGION_FLAG_NAMES
                .iter()
                .find(|(name, _)| *name == n)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown region flag '{n}'")))?;
            out |= f.1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain text \\ ok"), "plain text \\ ok");
        assert_eq!(
            escape_controls("a\nFORGED\r\u{1b}[2K\t\u{7f}é"),
            "a\\nFORGED\\r\\u{1b}[2K\\t\\u{7f}é"
        );
        assert!(!escape_controls("x\u{85}y").contains('\u{85}'));
    }
}
