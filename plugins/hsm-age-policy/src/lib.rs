//! `hsm-age-policy`: the official Strata HSM policy. Big files that nobody changed or read for
//! a while move to a slower tier; their local copy can then be released, and is recalled when
//! someone touches the data again.
//!
//! ```text
//!  scan(batch) ─► per file: regular? ─► migration record? (DM attribute "stratloc")
//!                   │ none / stale ─► size ≥ min_size ∧ age ≥ min_age ∧ idle ≥ min_idle ─► migrate(tier)
//!                   │ current      ─► release_after_migrate ∧ resident ─► release
//!                   └ otherwise    ─► ignore
//!  on-event(read | write | truncate) ─► migration record? ─► request-recall(whole file)
//!                                         │ no: continue      ├ ok:   clear managed regions, continue
//!                                         │                   └ fail: abort(EIO)
//!                                         └ lookup failed: abort(EIO)
//!  on-event(anything else) ─► continue;   on-notify ─► log
//! ```
//!
//! # Migration records
//!
//! The runtime records where it migrated a file's data in the DM attribute
//! [`MIGRATION_ATTR`] (`"stratloc"`, value: the tier name). The policy only tests that the
//! attribute exists. A record is **current** when the data was not modified after it was
//! written (`mtime <= dtime`, the DM attribute change time); a **stale** record (the file was
//! written after migrating, e.g. after a recall for a write) counts as "not migrated", so the
//! file is migrated again once it is old and idle, and is never released on the strength of an
//! outdated tier copy.
//!
//! A file is **resident** when it has blocks on local storage (`blocks > 0`).
//!
//! # Configuration
//!
//! `key=value` entries ([`strata_plugin_sdk::config`]); empty text = all defaults; unknown keys
//! are refused:
//!
//! | key                     | default   | meaning                                           |
//! |-------------------------|-----------|---------------------------------------------------|
//! | `tier`                  | `archive` | tier named in `migrate` decisions                 |
//! | `min_size`              | `1MiB`    | smaller files are left alone (bytes, `KiB`..`TiB`) |
//! | `min_age_secs`          | `2592000` | seconds since the last data change (mtime), 30 d  |
//! | `min_idle_secs`         | `604800`  | seconds since the last access (atime), 7 d        |
//! | `release_after_migrate` | `false`   | `release` migrated files that are still resident  |
//!
//! # Statistics
//!
//! Decimal counters in the slot's key-value store
//! ([`Env::kv_add`](strata_plugin_sdk::Env::kv_add)): `stats.migrate`,
//! `stats.release`, `stats.ignore` (scan decisions), `stats.recall` and `stats.recall_failed`
//! (recalls for events). A failing store is logged and otherwise ignored.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use strata_plugin_sdk::config::{ConfigError, ConfigMap};
use strata_plugin_sdk::dm::{
    Action, DmError, DmHost, DmPolicy, Event, EventData, EventType, FileStat, Response, ScanAction,
    EIO, MIGRATION_ATTR,
};
use strata_plugin_sdk::{attr_name, Timestamp};

/// `S_IFMT`: the file type bits of `st_mode`.
const S_IFMT: u32 = 0o170_000;
/// `S_IFREG`: a regular file.
const S_IFREG: u32 = 0o100_000;

/// The policy's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Tier named in `migrate` decisions.
    pub tier: String,
    /// Files smaller than this (bytes) are left alone; empty files always are.
    pub min_size: u64,
    /// Minimum seconds since the last data modification (mtime).
    pub min_age_secs: u64,
    /// Minimum seconds since the last access (atime).
    pub min_idle_secs: u64,
    /// Release migrated files that are still resident.
    pub release_after_migrate: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tier: "archive".into(),
            min_size: 1 << 20,
            min_age_secs: 30 * 24 * 3600,
            min_idle_secs: 7 * 24 * 3600,
            release_after_migrate: false,
        }
    }
}

impl Config {
    /// Parse the slot's config text (see the crate docs).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut map = ConfigMap::parse(text)?;
        let mut cfg = Config::default();
        if let Some(tier) = map.take_str("tier")? {
            cfg.tier = tier;
        }
        if let Some(v) = map.take_bytes("min_size")? {
            cfg.min_size = v;
        }
        if let Some(v) = map.take_u64("min_age_secs")? {
            cfg.min_age_secs = v;
        }
        if let Some(v) = map.take_u64("min_idle_secs")? {
            cfg.min_idle_secs = v;
        }
        if let Some(v) = map.take_bool("release_after_migrate")? {
            cfg.release_after_migrate = v;
        }
        map.finish()?;
        Ok(cfg)
    }
}

/// Whether a file's data is on a tier, as far as the policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// No migration record.
    None,
    /// A record older than the last data change: the tier copy is outdated.
    Stale,
    /// A record at least as new as the data.
    Current,
}

impl Migration {
    /// Classify a file that has (`true`) or has not a migration record.
    pub fn of(file: &FileStat, has_record: bool) -> Migration {
        match has_record {
            false => Migration::None,
            true if file.mtime > file.dtime => Migration::Stale,
            true => Migration::Current,
        }
    }
}

/// The scan decision for one file, without I/O: its stat, its migration state and the time.
pub fn decide(file: &FileStat, migration: Migration, now: Timestamp, cfg: &Config) -> Action {
    if file.mode & S_IFMT != S_IFREG {
        return Action::Ignore;
    }
    match migration {
        Migration::Current if cfg.release_after_migrate && file.blocks > 0 => Action::Release,
        Migration::Current => Action::Ignore,
        Migration::None | Migration::Stale => {
            let big = file.size > 0 && file.size >= cfg.min_size;
            let old = now.secs_since(file.mtime) >= cfg.min_age_secs;
            let idle = now.secs_since(file.atime) >= cfg.min_idle_secs;
            if big && old && idle {
                Action::Migrate(cfg.tier.clone())
            } else {
                Action::Ignore
            }
        }
    }
}

/// The policy: a [`Config`] and the wire name of the migration attribute.
#[derive(Debug, Clone)]
pub struct AgePolicy {
    /// The configuration from `init`.
    pub config: Config,
    attr: Vec<u8>,
}

/// Add to a statistics counter; a failing store is logged, never fatal.
fn count(host: &mut dyn DmHost, key: &str, n: u64) {
    if n == 0 {
        return;
    }
    if let Err(e) = host.kv_add(key, n) {
        host.warn(&format!("hsm-age-policy: cannot update {key}: {e}"));
    }
}

fn show(handle: &[u8]) -> String {
    handle.iter().map(|b| format!("{b:02x}")).collect()
}

impl AgePolicy {
    /// The migration state of a file from the scan batch (asks the host only if the file has
    /// DM attributes at all).
    fn migration(&self, file: &FileStat, host: &mut dyn DmHost) -> Result<Migration, DmError> {
        if !file.has_dm_attributes {
            return Ok(Migration::None);
        }
        match host.get_dmattr(&file.handle, &self.attr) {
            Ok(_) => Ok(Migration::of(file, true)),
            Err(DmError::Enoent) => Ok(Migration::None),
            Err(e) => Err(e),
        }
    }

    /// Bring back the data of a migrated file before a data operation proceeds.
    fn recall_for(&self, handle: &[u8], host: &mut dyn DmHost) -> Response {
        match host.get_dmattr(handle, &self.attr) {
            Err(DmError::Enoent) => return Response::Continue,
            Err(e) => {
                host.error(&format!(
                    "hsm-age-policy: migration record of {}: {e}; refusing the operation",
                    show(handle)
                ));
                return Response::Abort(EIO);
            }
            Ok(_) => {}
        }
        if let Err(e) = host.request_recall(handle, 0, 0) {
            host.error(&format!(
                "hsm-age-policy: recall of {} failed: {e}",
                show(handle)
            ));
            count(host, "stats.recall_failed", 1);
            return Response::Abort(EIO);
        }
        count(host, "stats.recall", 1);
        // The data is local again: stop intercepting its I/O.
        match host.get_regions(handle) {
            Ok(regions) if regions.is_empty() => {}
            Ok(_) => {
                if let Err(e) = host.set_regions(handle, &[]) {
                    host.warn(&format!(
                        "hsm-age-policy: clearing managed regions of {}: {e}",
                        show(handle)
                    ));
                }
            }
            Err(e) => host.warn(&format!(
                "hsm-age-policy: managed regions of {}: {e}",
                show(handle)
            )),
        }
        Response::Continue
    }
}

impl DmPolicy for AgePolicy {
    fn init(config: &str, host: &mut dyn DmHost) -> Result<Self, String> {
        let config = Config::parse(config).map_err(|e| format!("hsm-age-policy: {e}"))?;
        host.info(&format!("hsm-age-policy: {config:?}"));
        let attr = attr_name(MIGRATION_ATTR).map_err(|e| e.to_string())?;
        Ok(AgePolicy { config, attr })
    }

    fn on_event(&mut self, event: &Event, host: &mut dyn DmHost) -> Response {
        match (event.kind, &event.data) {
            (EventType::Read | EventType::Write | EventType::Truncate, EventData::Data(data)) => {
                self.recall_for(&data.handle, host)
            }
            (EventType::Read | EventType::Write | EventType::Truncate, _) => {
                host.warn(&format!(
                    "hsm-age-policy: {} event {} without data-event payload",
                    event.kind.name(),
                    event.sequence
                ));
                Response::Continue
            }
            _ => Response::Continue,
        }
    }

    fn on_notify(&mut self, event: &Event, host: &mut dyn DmHost) {
        host.info(&format!(
            "hsm-age-policy: notified of {} event (sequence {})",
            event.kind.name(),
            event.sequence
        ));
    }

    fn scan(&mut self, batch: &[FileStat], host: &mut dyn DmHost) -> Vec<ScanAction> {
        let now = host.now();
        let (mut migrate, mut release, mut ignore) = (0, 0, 0);
        let actions: Vec<ScanAction> = batch
            .iter()
            .map(|file| {
                let action = match self.migration(file, host) {
                    Ok(m) => decide(file, m, now, &self.config),
                    Err(e) => {
                        host.warn(&format!(
                            "hsm-age-policy: migration record of {}: {e}; leaving it alone",
                            show(&file.handle)
                        ));
                        Action::Ignore
                    }
                };
                match action {
                    Action::Migrate(_) => migrate += 1,
                    Action::Release => release += 1,
                    _ => ignore += 1,
                }
                ScanAction {
                    handle: file.handle.clone(),
                    action,
                }
            })
            .collect();
        count(host, "stats.migrate", migrate);
        count(host, "stats.release", release);
        count(host, "stats.ignore", ignore);
        host.info(&format!(
            "hsm-age-policy: scanned {} files: {migrate} migrate, {release} release, {ignore} ignore",
            batch.len()
        ));
        actions
    }
}

strata_plugin_sdk::export_dm_policy!(AgePolicy);

#[cfg(test)]
mod tests;
