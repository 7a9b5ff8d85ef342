//! `stratad` configuration (TOML). Every field has a default, so an empty file is valid.
//!
//! ```toml
//! data_dir = "/var/lib/strata"        # metadata store, plugin blobs, precompiled cache
//! socket = "/run/strata/stratad.sock" # local admin/client API
//! log = "info"                        # tracing filter
//!
//! [plugins]
//! deadline_ms = 10                    # default per-call deadline of new slots
//! memory_limit = 67108864             # default memory cap of new slots
//! max_component_bytes = 67108864
//! max_config_bytes = 65536
//! precompiled_cache = true
//!
//! [spaces]
//! host_id = "node1"                   # default: the machine's host name
//! shm_dir = "/dev/shm"                # unused: regions are memfds (accepted for old configs)
//! default_slot_size = 1048576         # largest chunk of a space created without options
//! default_slots = 256                 # cache slots of such a space
//! max_slot_size = 67108864            # largest slot (= chunk) size a space may ask for
//! max_cache_bytes = 4294967296        # largest cache region of one space
//! lease_timeout_ms = 30000            # start_write leases not stopped by then are reclaimed
//! spawn_allow = ["/usr/bin/env"]      # programs `spawn` may start (exact paths)
//! spare_lease_buffers = 8             # lease buffers a connection keeps for its next leases
//!
//! [dm]
//! event_timeout_ms = 60000            # a synchronous event unanswered this long fails...
//! timeout_errno = 110                 # ...its operation with this errno (ETIMEDOUT)
//! ```

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The daemon's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the daemon keeps its state.
    pub data_dir: PathBuf,
    /// The local API socket.
    pub socket: PathBuf,
    /// `tracing` filter directive.
    pub log: String,
    /// Plugin host settings.
    pub plugins: PluginConfig,
    /// Chunk spaces.
    pub spaces: SpaceConfig,
    /// Data management (DMAPI).
    pub dm: crate::dm::service::DmConfig,
}

/// `[spaces]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpaceConfig {
    /// This host's id in host lists (default: the host name).
    pub host_id: Option<String>,
    /// Unused since regions became memfds lent over the socket (nothing of the daemon's
    /// lives in /dev/shm any more; old `strata.*` files there are never opened). Accepted
    /// so that older configuration files still load.
    pub shm_dir: PathBuf,
    /// Slot size of spaces created without one.
    pub default_slot_size: u64,
    /// Slot count of spaces created without one.
    pub default_slots: u32,
    /// Largest slot size.
    pub max_slot_size: u64,
    /// Largest region of one space.
    pub max_cache_bytes: u64,
    /// Lease timeout.
    pub lease_timeout_ms: u64,
    /// Programs `spawn` may start.
    pub spawn_allow: Vec<PathBuf>,
    /// Lease buffers (memfds of a slot size) a connection keeps after its leases end, for
    /// its next leases without a new buffer; more are freed.
    pub spare_lease_buffers: usize,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig {
            host_id: None,
            shm_dir: PathBuf::from("/dev/shm"),
            default_slot_size: 1 << 20,
            default_slots: 256,
            max_slot_size: 64 << 20,
            max_cache_bytes: 4 << 30,
            lease_timeout_ms: 30_000,
            spawn_allow: Vec::new(),
            spare_lease_buffers: 8,
        }
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// Default deadline of a call for slots loaded without one.
    pub deadline_ms: u64,
    /// Default memory cap of an instance.
    pub memory_limit: usize,
    /// Largest component accepted.
    pub max_component_bytes: usize,
    /// Largest slot config accepted.
    pub max_config_bytes: usize,
    /// Keep precompiled components under `data_dir/cache`.
    pub precompiled_cache: bool,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            deadline_ms: 10,
            memory_limit: 64 << 20,
            max_component_bytes: 64 << 20,
            max_config_bytes: 64 << 10,
            precompiled_cache: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/strata"),
            socket: PathBuf::from("/run/strata/stratad.sock"),
            log: "info".into(),
            plugins: PluginConfig::default(),
            spaces: SpaceConfig::default(),
            dm: crate::dm::service::DmConfig::default(),
        }
    }
}

impl Config {
    /// Read and check a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reject values the daemon cannot run with.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.plugins.deadline_ms > 0,
            "plugins.deadline_ms must be positive"
        );
        anyhow::ensure!(
            self.plugins.memory_limit >= 1 << 20,
            "plugins.memory_limit must be at least 1 MiB"
        );
        anyhow::ensure!(
            (1..=crate::dm::core::MAX_ERRNO).contains(&self.dm.timeout_errno),
            "dm.timeout_errno must be an errno from 1 to 511"
        );
        anyhow::ensure!(
            self.dm.event_timeout_ms > 0,
            "dm.event_timeout_ms must be positive"
        );
        let sp = &self.spaces;
        anyhow::ensure!(
            sp.default_slot_size > 0
                && sp.default_slot_size.is_multiple_of(4096)
                && sp.default_slot_size <= sp.max_slot_size,
            "spaces.default_slot_size must be a positive multiple of 4096, at most max_slot_size"
        );
        anyhow::ensure!(
            sp.default_slots >= 2,
            "spaces.default_slots must be at least 2"
        );
        anyhow::ensure!(
            sp.lease_timeout_ms > 0,
            "spaces.lease_timeout_ms must be positive"
        );
        anyhow::ensure!(
            sp.host_id
                .as_deref()
                .is_none_or(|h| !h.is_empty() && h.len() <= 255),
            "spaces.host_id must be 1-255 bytes"
        );
        anyhow::ensure!(
            sp.spawn_allow.iter().all(|p| p.is_absolute()),
            "spaces.spawn_allow entries must be absolute paths"
        );
        anyhow::ensure!(
            self.socket.as_os_str().len() < 100,
            "socket path {} is too long for a Unix socket",
            self.socket.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_defaults_and_unknown_keys_fail() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.plugins.deadline_ms, 10);
        assert!(toml::from_str::<Config>("colour = 1").is_err());
        let c: Config = toml::from_str("data_dir = \"/x\"\n[plugins]\ndeadline_ms = 5").unwrap();
        assert_eq!(c.plugins.deadline_ms, 5);
        assert_eq!(c.data_dir, PathBuf::from("/x"));
    }
}
