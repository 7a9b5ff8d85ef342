//! `stratad` configuration (TOML). Every field has a default, so an empty file is valid.
//!
//! Every setting, its default and what it means: `runtime/packaging/stratad.toml`, the
//! file the package installs as `/etc/strata/stratad.toml` (a test checks that it names
//! every setting and nothing else).

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
    /// Managed filesystems.
    pub fs: crate::fs::FsConfig,
    /// What one local user can take of the daemon: connections, bytes, plugin calls.
    pub limits: LimitsConfig,
    /// The Prometheus endpoint (off by default).
    pub metrics: crate::metrics::MetricsConfig,
}

/// `[limits]`: bounds on what the daemon gives one local user (see `docs/protocol.md`,
/// "Limits"). Root and the daemon's own uid are not counted against the connection caps and
/// the total in-flight bytes (they still have their per-uid byte cap).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open API connections of all unprivileged uids together; more are refused with an
    /// error frame and closed.
    pub max_connections: usize,
    /// Open API connections of one unprivileged uid.
    pub max_connections_per_uid: usize,
    /// A connection with no request in flight, no parked request and no lease is closed
    /// after this long without a request (0: never).
    pub idle_timeout_ms: u64,
    /// Once a frame's first byte arrived, its header (and payload length) must arrive
    /// within this.
    pub header_timeout_ms: u64,
    /// Once a frame's header arrived, its payload must arrive within this (including any
    /// wait for the in-flight byte budget).
    pub body_timeout_ms: u64,
    /// Bytes of requests being read or served at once (headers and payloads), all
    /// unprivileged uids together.
    pub max_inflight_bytes: u64,
    /// Bytes of requests being read or served at once for one uid.
    pub max_inflight_bytes_per_uid: u64,
    /// Plugin calls from the socket (place, rebalance) running at once (default: the
    /// number of CPUs: a call is CPU-bound until its deadline).
    pub plugin_calls: Option<usize>,
    /// Of those, how many one uid may run at once (default: half of `plugin_calls`, at
    /// least 1).
    pub plugin_calls_per_uid: Option<usize>,
    /// Threads of the daemon's blocking pool (durable writes, plugin calls, fsync).
    pub max_blocking_threads: usize,
}

impl LimitsConfig {
    /// Plugin calls running at once, in all and for one uid (defaults resolved).
    pub fn plugin_turns(&self) -> (usize, usize) {
        let total = self.plugin_calls.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(2)
        });
        let per_uid = self
            .plugin_calls_per_uid
            .unwrap_or((total / 2).max(1))
            .min(total);
        (total, per_uid)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 4096,
            max_connections_per_uid: 256,
            idle_timeout_ms: 300_000,
            header_timeout_ms: 5_000,
            body_timeout_ms: 30_000,
            max_inflight_bytes: 1 << 30,
            max_inflight_bytes_per_uid: 256 << 20,
            plugin_calls: None,
            plugin_calls_per_uid: None,
            max_blocking_threads: 512,
        }
    }
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
    /// Spawned programs alive at once per uid (a program counts until it has exited and
    /// its output pipe is closed).
    pub spawn_max_children_per_uid: usize,
    /// Size at which a uid's spawn output log is rotated (one old generation is kept).
    pub spawn_log_max_bytes: u64,
    /// Spaces one uid may own (root and the daemon's uid are exempt).
    pub spaces_per_uid: u64,
    /// Bytes of shared memory of one uid: cache regions of its joined spaces and lease
    /// buffers its connections hold.
    pub shm_bytes_per_uid: u64,
    /// Bytes of valid durable chunks in one uid's spaces.
    pub durable_bytes_per_uid: u64,
    /// Chunk records in one uid's spaces.
    pub chunks_per_uid: u64,
    /// Spaces on this host (everyone).
    pub max_spaces: u64,
    /// Bytes of cache regions on this host (everyone); `None`: half the size of the
    /// `shm_dir` filesystem (at least 1 GiB).
    pub max_shm_bytes: Option<u64>,
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
            spawn_max_children_per_uid: 32,
            spawn_log_max_bytes: 8 << 20,
            spaces_per_uid: 64,
            shm_bytes_per_uid: 1 << 30,
            durable_bytes_per_uid: 1 << 30,
            chunks_per_uid: 100_000,
            max_spaces: 4096,
            max_shm_bytes: None,
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
    /// Most hosts a `place` request (and each host list of a `rebalance`) may name; more is
    /// refused as the caller's error before the plugin runs.
    pub max_hosts: usize,
    /// Most chunks a `rebalance` request may name.
    pub max_rebalance_chunks: usize,
    /// Longest host id, space or chunk name a `place`/`rebalance` request may carry.
    pub max_name_bytes: usize,
    /// A call whose input is larger than this (bytes of names and host entries: 1024 hosts
    /// with 1 KiB ids are ~1 MiB) and that times out or hits the memory cap is answered by
    /// the failure policy but does not count towards automatic rollback: any local user
    /// may send a valid but huge `place` or `rebalance`, and a plugin is not at fault for
    /// being slow on it.
    pub rollback_input_bytes: u64,
    /// Deadline of components that import WASI (interpreted plugins such as componentize-py
    /// ones, whose calls take milliseconds) when their slot asks for less than
    /// `wasi_min_deadline_ms`.
    pub wasi_deadline_ms: u64,
    /// Smallest deadline a WASI-importing component runs with (0: no minimum).
    pub wasi_min_deadline_ms: u64,
    /// Longest time an acknowledged change of a plugin's kv state waits in memory before the
    /// background writer commits it (what a `kill -9` may lose).
    pub kv_flush_ms: u64,
    /// Least deadline of the self-test (`init` of a first instance) at load, swap and
    /// restore: a busy host must not refuse a load, or drop a slot at a restart, because a
    /// 10 ms `init` was descheduled once.
    pub init_deadline_ms: u64,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            deadline_ms: 10,
            memory_limit: 64 << 20,
            max_component_bytes: 64 << 20,
            max_config_bytes: 64 << 10,
            precompiled_cache: true,
            max_hosts: 1024,
            max_rebalance_chunks: 100_000,
            max_name_bytes: 1024,
            rollback_input_bytes: 64 << 10,
            wasi_deadline_ms: 2000,
            wasi_min_deadline_ms: 1000,
            kv_flush_ms: 100,
            init_deadline_ms: 1000,
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
            fs: crate::fs::FsConfig::default(),
            limits: LimitsConfig::default(),
            metrics: crate::metrics::MetricsConfig::default(),
        }
    }
}

impl Config {
    /// Read and check a config file. Errors name the file and the line: a syntax error, an
    /// unknown key or a value of the wrong type with the parser's position, a value the
    /// daemon cannot run with with the line of its key (when the file sets it).
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        if let Err(e) = cfg.check() {
            let msg = e.to_string();
            let at = msg
                .split_whitespace()
                .next()
                .and_then(|key| line_of(&text, key))
                .map(|line| format!(", line {line}"))
                .unwrap_or_default();
            anyhow::bail!("config {}{at}: {msg}", path.display());
        }
        Ok(cfg)
    }

    /// Reject values the daemon cannot run with.
    pub fn check(&self) -> anyhow::Result<()> {
        self.metrics.addr()?;
        anyhow::ensure!(
            self.plugins.deadline_ms > 0,
            "plugins.deadline_ms must be positive"
        );
        anyhow::ensure!(
            self.plugins.memory_limit >= 1 << 20,
            "plugins.memory_limit must be at least 1 MiB"
        );
        anyhow::ensure!(
            self.plugins.max_hosts > 0 && self.plugins.max_name_bytes > 0,
            "plugins.max_hosts and plugins.max_name_bytes must be positive"
        );
        anyhow::ensure!(
            (1..=60_000).contains(&self.plugins.wasi_deadline_ms)
                && self.plugins.wasi_min_deadline_ms <= 60_000,
            "plugins.wasi_deadline_ms must be 1..=60000 and wasi_min_deadline_ms at most 60000"
        );
        anyhow::ensure!(
            (1..=60_000).contains(&self.plugins.kv_flush_ms),
            "plugins.kv_flush_ms must be 1..=60000"
        );
        anyhow::ensure!(
            self.plugins.init_deadline_ms <= 60_000,
            "plugins.init_deadline_ms must be at most 60000"
        );
        anyhow::ensure!(
            (1..=65_536).contains(&self.dm.op_threads)
                && (1..=64).contains(&self.dm.attach_workers),
            "dm.op_threads must be 1..=65536 and dm.attach_workers 1..=64"
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
        if let Some(h) = sp.host_id.as_deref() {
            crate::space::core::check_host_id(h)
                .map_err(|r| anyhow::anyhow!("spaces.host_id: {}", r.message))?;
        }
        anyhow::ensure!(
            sp.spawn_allow.iter().all(|p| p.is_absolute()),
            "spaces.spawn_allow entries must be absolute paths"
        );
        let l = &self.limits;
        anyhow::ensure!(
            l.max_connections > 0 && l.max_connections_per_uid > 0,
            "limits.max_connections and max_connections_per_uid must be positive"
        );
        anyhow::ensure!(
            l.header_timeout_ms > 0 && l.body_timeout_ms > 0,
            "limits.header_timeout_ms and body_timeout_ms must be positive"
        );
        anyhow::ensure!(
            l.max_inflight_bytes_per_uid >= 2 << 20 && l.max_inflight_bytes >= 2 << 20,
            "limits.max_inflight_bytes and max_inflight_bytes_per_uid must be at least 2 MiB"
        );
        anyhow::ensure!(
            l.max_inflight_bytes <= u32::MAX as u64
                && l.max_inflight_bytes_per_uid <= u32::MAX as u64,
            "limits.max_inflight_bytes and max_inflight_bytes_per_uid must be under 4 GiB"
        );
        anyhow::ensure!(
            l.plugin_calls != Some(0) && l.plugin_calls_per_uid != Some(0),
            "limits.plugin_calls and plugin_calls_per_uid must be positive"
        );
        anyhow::ensure!(
            l.max_blocking_threads >= 8,
            "limits.max_blocking_threads must be at least 8"
        );
        anyhow::ensure!(
            sp.spawn_max_children_per_uid >= 1,
            "spaces.spawn_max_children_per_uid must be at least 1"
        );
        anyhow::ensure!(
            sp.spawn_log_max_bytes >= 4096,
            "spaces.spawn_log_max_bytes must be at least 4096"
        );
        anyhow::ensure!(
            !self.socket.starts_with(&self.data_dir),
            "socket {} must not be inside data_dir {} (only the daemon may enter data_dir)",
            self.socket.display(),
            self.data_dir.display()
        );
        anyhow::ensure!(
            self.socket.as_os_str().len() < 100,
            "socket path {} is too long for a Unix socket",
            self.socket.display()
        );
        Ok(())
    }
}

/// The line (1-based) where `key` (`table.key`, or `key` at the top) is set in `text`, a
/// TOML file of `[table]` headers and `key = value` lines.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let key = key.trim_end_matches([',', ':', '.']);
    let (table, name) = match key.rsplit_once('.') {
        Some((t, n)) => (t, n),
        None => ("", key),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[') {
            current = h.split(']').next().unwrap_or("").trim().to_string();
            continue;
        }
        let Some((k, _)) = l.split_once('=') else {
            continue;
        };
        if current == table && k.trim().trim_matches('"') == name {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGED: &str = include_str!("../packaging/stratad.toml");

    /// (table, key) of every setting a TOML value holds.
    fn keys(v: &toml::Value, table: &str, out: &mut std::collections::BTreeSet<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                match v {
                    toml::Value::Table(_) if table.is_empty() => keys(v, k, out),
                    _ => {
                        out.insert(format!("{table}.{k}"));
                    }
                }
            }
        }
    }

    #[test]
    fn the_packaged_config_documents_every_setting_and_nothing_else() {
        // as shipped (every line commented out): the defaults
        let c: Config = toml::from_str(PACKAGED).unwrap();
        c.check().unwrap();
        // every documented line uncommented: valid keys (unknown ones are refused)
        let open: String = PACKAGED
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split('=').next().is_some_and(|k| {
                        let k = k.trim();
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) && rest.contains('=') =>
                {
                    rest.to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let documented: toml::Value = toml::from_str(&open).unwrap();
        let c: Config = toml::from_str(&open).expect("every documented key is a setting");
        c.check().unwrap();
        let mut doc = std::collections::BTreeSet::new();
        keys(&documented, "", &mut doc);
        let mut all = std::collections::BTreeSet::new();
        keys(
            &toml::Value::try_from(Config::default()).unwrap(),
            "",
            &mut all,
        );
        let missing: Vec<_> = all.difference(&doc).collect();
        assert!(
            missing.is_empty(),
            "settings not in runtime/packaging/stratad.toml: {missing:?}"
        );
    }

    #[test]
    fn errors_name_the_line_of_the_key() {
        let text =
            "log = \"info\"\n\n[plugins]\ndeadline_ms = 5\n\n[dm]\n# a comment\nop_threads = 0\n";
        assert_eq!(line_of(text, "dm.op_threads"), Some(8));
        assert_eq!(line_of(text, "plugins.deadline_ms"), Some(4));
        assert_eq!(line_of(text, "log"), Some(1));
        assert_eq!(line_of(text, "dm.attach_workers"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 8") && e.contains("dm.op_threads"), "{e}");
        std::fs::write(&p, "[dm]\nop_thread = 4\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("op_thread"), "{e}");
    }

    #[test]
    fn host_ids_with_control_characters_are_refused() {
        for bad in ["a\\nb", "a b", "", "x\\u001b[31m"] {
            let c: Config = toml::from_str(&format!("[spaces]\nhost_id = \"{bad}\"")).unwrap();
            assert!(c.check().is_err(), "{bad:?} accepted");
        }
        let c: Config = toml::from_str("[spaces]\nhost_id = \"node-1.example\"").unwrap();
        c.check().unwrap();
    }

    #[test]
    fn empty_config_is_defaults_and_unknown_keys_fail() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.plugins.deadline_ms, 10);
        assert!(toml::from_str::<Config>("colour = 1").is_err());
        let c: Config = toml::from_str("data_dir = \"/x\"\n[plugins]\ndeadline_ms = 5").unwrap();
        assert_eq!(c.plugins.deadline_ms, 5);
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        let c: Config = toml::from_str("[limits]\nmax_connections_per_uid = 8").unwrap();
        assert_eq!(c.limits.max_connections_per_uid, 8);
        assert_eq!(c.limits.max_connections, 4096);
        c.check().unwrap();
        let c: Config = toml::from_str("[limits]\nheader_timeout_ms = 0").unwrap();
        assert!(c.check().is_err());
    }

    #[test]
    fn spawn_limits_have_defaults_and_bounds() {
        let c = Config::default();
        assert_eq!(c.spaces.spawn_max_children_per_uid, 32);
        assert_eq!(c.spaces.spawn_log_max_bytes, 8 << 20);
        c.check().unwrap();
        let mut bad = c.clone();
        bad.spaces.spawn_max_children_per_uid = 0;
        assert!(bad.check().is_err());
        let mut bad = c.clone();
        bad.spaces.spawn_log_max_bytes = 100;
        assert!(bad.check().is_err());
        let mut bad = c;
        bad.socket = bad.data_dir.join("s.sock");
        assert!(bad.check().is_err(), "a socket inside data_dir is refused");
    }
}
