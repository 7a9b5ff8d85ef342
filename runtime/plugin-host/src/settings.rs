//! Per-slot settings: deadline, memory cap, failure policy per hook, rollback threshold.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The two plugin worlds of `wit/worlds.wit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// World `dm-policy`: data-management (HSM) decisions.
    DmPolicy,
    /// World `placement`: chunk placement.
    Placement,
}

impl PluginKind {
    /// The WIT world name.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::DmPolicy => "dm-policy",
            PluginKind::Placement => "placement",
        }
    }

    /// The hooks (exports) of the world, `init` first.
    pub fn hooks(self) -> &'static [&'static str] {
        match self {
            PluginKind::DmPolicy => &["init", "on-event", "on-notify", "scan"],
            PluginKind::Placement => &["init", "place", "rebalance"],
        }
    }
}

impl std::str::FromStr for PluginKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dm-policy" => Ok(PluginKind::DmPolicy),
            "placement" => Ok(PluginKind::Placement),
            other => Err(format!(
                "unknown plugin kind '{other}' (dm-policy or placement)"
            )),
        }
    }
}

/// What a caller gets when a hook fails (trap, timeout, memory cap, malformed answer).
///
/// | hook       | `continue`                     | `builtin`                              |
/// |------------|--------------------------------|----------------------------------------|
/// | place      | the hosts in the order given   | most free space first, ties by host id |
/// | rebalance  | no moves                       | copies on departed hosts move to the hosts with most free space |
/// | on-event   | DM_RESP_CONTINUE               | DM_RESP_CONTINUE                       |
/// | on-notify  | nothing                        | nothing                                |
/// | scan       | every file `ignore`            | every file `ignore`                    |
///
/// `abort` fails the operation with the errno (for `on-event`: DM_RESP_ABORT with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum FailurePolicy {
    /// Proceed as if the plugin had no opinion.
    Continue,
    /// Fail the operation with this errno.
    Abort {
        /// Positive Linux errno.
        errno: i32,
    },
    /// Use the host's built-in decision.
    Builtin,
}

impl std::str::FromStr for FailurePolicy {
    type Err = String;
    /// `continue`, `builtin`, `abort` (EIO) or `abort:ERRNO` (a number or EIO/EPERM/EACCES/...).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "continue" => Ok(FailurePolicy::Continue),
            "builtin" => Ok(FailurePolicy::Builtin),
            "abort" => Ok(FailurePolicy::Abort { errno: libc::EIO }),
            _ => {
                let code = s
                    .strip_prefix("abort:")
                    .ok_or_else(|| format!("unknown failure policy '{s}'"))?;
                let errno = errno_from_name(code)
                    .or_else(|| code.parse::<i32>().ok().filter(|n| *n > 0 && *n < 4096))
                    .ok_or_else(|| format!("unknown errno '{code}' in failure policy '{s}'"))?;
                Ok(FailurePolicy::Abort { errno })
            }
        }
    }
}

/// The errnos a policy may name.
pub fn errno_from_name(name: &str) -> Option<i32> {
    Some(match name {
        "EPERM" => libc::EPERM,
        "ENOENT" => libc::ENOENT,
        "EIO" => libc::EIO,
        "EAGAIN" => libc::EAGAIN,
        "ENOMEM" => libc::ENOMEM,
        "EACCES" => libc::EACCES,
        "EBUSY" => libc::EBUSY,
        "EINVAL" => libc::EINVAL,
        "ENOSPC" => libc::ENOSPC,
        "EROFS" => libc::EROFS,
        "ENOSYS" => libc::ENOSYS,
        "ESTALE" => libc::ESTALE,
        "ETIMEDOUT" => libc::ETIMEDOUT,
        "ECANCELED" => libc::ECANCELED,
        _ => return None,
    })
}

/// Automatic rollback: a version that is not the first of its slot is replaced by the one
/// before it once, after at least `min_calls` calls, the share of calls that trapped, timed
/// out, hit the memory cap or answered malformed passes `max_failure_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RollbackPolicy {
    /// Calls a version must have served before its rate is judged.
    pub min_calls: u64,
    /// Share of failed calls (0.0..=1.0) above which it is rolled back.
    pub max_failure_rate: f64,
}

impl Default for RollbackPolicy {
    fn default() -> Self {
        RollbackPolicy {
            min_calls: 20,
            max_failure_rate: 0.25,
        }
    }
}

/// Settings of one plugin slot. They belong to the slot, not the version: a swap keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotSettings {
    /// Text handed to `init` (format defined by the plugin).
    pub config: String,
    /// Epoch deadline of one call, in milliseconds.
    pub deadline_ms: u64,
    /// Linear-memory cap of one instance, in bytes.
    pub memory_limit: usize,
    /// Failure policy per hook name (`place`, `on-event`, ...); missing hooks use the default.
    pub on_failure: BTreeMap<String, FailurePolicy>,
    /// Automatic rollback threshold.
    pub rollback: RollbackPolicy,
}

impl Default for SlotSettings {
    fn default() -> Self {
        SlotSettings {
            config: String::new(),
            deadline_ms: 10,
            memory_limit: 64 << 20,
            on_failure: BTreeMap::new(),
            rollback: RollbackPolicy::default(),
        }
    }
}

impl SlotSettings {
    /// The failure policy in force for `hook`.
    ///
    /// Defaults: `place` builtin, `rebalance` continue, `on-event` abort with EIO (a failed
    /// policy must not let a read of migrated data see the hole), `on-notify` and `scan`
    /// continue.
    pub fn policy(&self, hook: &str) -> FailurePolicy {
        if let Some(p) = self.on_failure.get(hook) {
            return *p;
        }
        match hook {
            "place" => FailurePolicy::Builtin,
            "on-event" => FailurePolicy::Abort { errno: libc::EIO },
            _ => FailurePolicy::Continue,
        }
    }

    /// Check the settings against the host's limits.
    pub(crate) fn validate(&self, kind: PluginKind, max_config: usize) -> Result<(), String> {
        if self.config.len() > max_config {
            return Err(format!(
                "config is {} bytes, the limit is {max_config}",
                self.config.len()
            ));
        }
        if self.deadline_ms == 0 || self.deadline_ms > 60_000 {
            return Err(format!(
                "deadline_ms {} is outside 1..=60000",
                self.deadline_ms
            ));
        }
        if self.memory_limit < (1 << 20) {
            return Err(format!("memory_limit {} is below 1 MiB", self.memory_limit));
        }
        for hook in self.on_failure.keys() {
            if !kind.hooks().contains(&hook.as_str()) || hook == "init" {
                return Err(format!("no hook '{hook}' in world {}", kind.world()));
            }
        }
        let r = self.rollback.max_failure_rate;
        if !(0.0..=1.0).contains(&r) {
            return Err(format!("rollback.max_failure_rate {r} is outside 0..=1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_policy_parses() {
        assert_eq!("continue".parse(), Ok(FailurePolicy::Continue));
        assert_eq!(
            "abort".parse(),
            Ok(FailurePolicy::Abort { errno: libc::EIO })
        );
        assert_eq!(
            "abort:EACCES".parse(),
            Ok(FailurePolicy::Abort {
                errno: libc::EACCES
            })
        );
        assert_eq!("abort:28".parse(), Ok(FailurePolicy::Abort { errno: 28 }));
        assert!("abort:-1".parse::<FailurePolicy>().is_err());
        assert!("explode".parse::<FailurePolicy>().is_err());
    }

    #[test]
    fn defaults_and_validation() {
        let s = SlotSettings::default();
        assert_eq!(s.policy("place"), FailurePolicy::Builtin);
        assert_eq!(
            s.policy("on-event"),
            FailurePolicy::Abort { errno: libc::EIO }
        );
        assert_eq!(s.policy("scan"), FailurePolicy::Continue);
        assert!(s.validate(PluginKind::Placement, 10).is_ok());
        let mut bad = s.clone();
        bad.on_failure
            .insert("on-event".into(), FailurePolicy::Continue);
        assert!(bad.validate(PluginKind::Placement, 10).is_err());
        let mut big = s;
        big.config = "x".repeat(11);
        assert!(big.validate(PluginKind::Placement, 10).is_err());
    }
}
