//! What every plugin can ask of the host, whatever its world: the log, a clock and a private
//! key-value store.
//!
//! [`Env`] is the small trait at the edge (STYLE 3): inside a component it is backed by the
//! WIT imports `strata:plugin/log`, `clock` and `kv`; in native unit tests by
//! [`MemEnv`](crate::testing::MemEnv).

use core::fmt;

/// Severity of a log message (WIT `log.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        })
    }
}

/// Why a key-value write failed (WIT `kv.kv-error`). Every variant is the host's answer to a
/// write; reads never fail (a missing key is `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvError {
    /// Key longer than 256 bytes or value larger than the host's limit (the plugin's fault).
    TooLarge,
    /// The slot's quota of keys or bytes is used up (the plugin's fault).
    QuotaExceeded,
    /// The host's store failed; the call had no effect (the host's fault; may be retried).
    Unavailable,
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvError::TooLarge => "key or value too large",
            KvError::QuotaExceeded => "key-value quota exceeded",
            KvError::Unavailable => "key-value store unavailable",
        })
    }
}

impl std::error::Error for KvError {}

/// Wall-clock time: seconds and nanoseconds since the Unix epoch (WIT `dm-types.timestamp`,
/// `dm_timestruct_t`).
///
/// The same type is used by both worlds' bindings (the SDK maps the WIT record onto it), so
/// `FileStat::mtime` and [`Env::now`] can be compared directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z (negative before it).
    pub seconds: i64,
    /// Nanoseconds within the second, `0..1_000_000_000`.
    pub nanoseconds: u32,
}

impl Timestamp {
    /// The Unix epoch; also what the host reports for "never" (e.g. `dtime` of a file without
    /// DM attributes).
    pub const EPOCH: Timestamp = Timestamp {
        seconds: 0,
        nanoseconds: 0,
    };

    /// A timestamp of whole seconds.
    pub const fn from_secs(seconds: i64) -> Timestamp {
        Timestamp {
            seconds,
            nanoseconds: 0,
        }
    }

    /// Whole seconds elapsed from `earlier` to `self`; 0 if `earlier` is not before `self`.
    pub fn secs_since(self, earlier: Timestamp) -> u64 {
        if self <= earlier {
            return 0;
        }
        let mut secs = i128::from(self.seconds) - i128::from(earlier.seconds);
        if self.nanoseconds < earlier.nanoseconds {
            secs -= 1;
        }
        u64::try_from(secs.max(0)).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.seconds, self.nanoseconds)
    }
}

/// The host services every world imports: log, clock and the slot's key-value store.
///
/// Plugins receive it as `&mut dyn Env` in every call. Inside a component the SDK passes an
/// implementation backed by the WIT imports; tests pass a
/// [`MemEnv`](crate::testing::MemEnv).
pub trait Env {
    /// Write a message to the daemon's log, attributed to this plugin slot.
    fn log(&mut self, level: LogLevel, message: &str);
    /// Wall-clock time as the daemon sees it.
    fn now(&mut self) -> Timestamp;
    /// Monotonic nanoseconds since an unspecified start.
    fn monotonic_ns(&mut self) -> u64;
    /// The value stored under `key`, if any.
    fn kv_get(&mut self, key: &str) -> Option<Vec<u8>>;
    /// Store `value` under `key`, replacing any previous value.
    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError>;
    /// Remove `key`; `Ok(true)` if it existed.
    fn kv_delete(&mut self, key: &str) -> Result<bool, KvError>;
    /// Keys that start with `prefix`, in byte order.
    fn kv_keys(&mut self, prefix: &str) -> Vec<String>;

    /// Log at [`LogLevel::Debug`].
    fn debug(&mut self, message: &str) {
        self.log(LogLevel::Debug, message);
    }
    /// Log at [`LogLevel::Info`].
    fn info(&mut self, message: &str) {
        self.log(LogLevel::Info, message);
    }
    /// Log at [`LogLevel::Warn`].
    fn warn(&mut self, message: &str) {
        self.log(LogLevel::Warn, message);
    }
    /// Log at [`LogLevel::Error`].
    fn error(&mut self, message: &str) {
        self.log(LogLevel::Error, message);
    }

    /// Read a counter stored by [`Env::kv_add`]: decimal ASCII digits; 0 when the key is
    /// missing or does not hold a counter.
    fn kv_counter(&mut self, key: &str) -> u64 {
        self.kv_get(key)
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0)
    }

    /// Add `delta` to the counter under `key` (saturating) and return the new value.
    ///
    /// Counters are stored as decimal ASCII digits (`b"42"`), so the host and operators can read
    /// them without knowing the plugin. A value that is not a counter is replaced.
    ///
    /// Inside a component this is one host call (WIT `kv.add`), atomic across the slot's
    /// instances: concurrent callers lose no increment. The default body (for test
    /// environments, which are single-threaded) reads and writes.
    fn kv_add(&mut self, key: &str, delta: u64) -> Result<u64, KvError> {
        let value = self.kv_counter(key).saturating_add(delta);
        self.kv_set(key, value.to_string().as_bytes())?;
        Ok(value)
    }

    /// Replace the value under `key` with `new` (`None`: remove the key) if it is `expected`
    /// now (`None`: the key is absent); `Ok(true)` if it was replaced.
    ///
    /// Inside a component this is one host call (WIT `kv.compare-and-swap`), atomic across
    /// the slot's instances: the building block of any read-modify-write of shared state
    /// (read, compute, compare-and-swap, retry on `false`).
    fn kv_compare_and_swap(
        &mut self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, KvError> {
        if self.kv_get(key).as_deref() != expected {
            return Ok(false);
        }
        match new {
            Some(v) => self.kv_set(key, v)?,
            None => {
                self.kv_delete(key)?;
            }
        }
        Ok(true)
    }
}

/// Implements [`Env`] for a unit struct with the generated bindings of the module it is invoked
/// in (`bindings::strata::plugin::{log, clock, kv}`: each world has its own copy of them).
#[cfg(any(feature = "placement", feature = "dm-policy"))]
macro_rules! wit_env_impl {
    ($ty:ty) => {
        impl $crate::Env for $ty {
            fn log(&mut self, level: $crate::LogLevel, message: &str) {
                use bindings::strata::plugin::log::Level;
                let level = match level {
                    $crate::LogLevel::Trace => Level::Trace,
                    $crate::LogLevel::Debug => Level::Debug,
                    $crate::LogLevel::Info => Level::Info,
                    $crate::LogLevel::Warn => Level::Warn,
                    $crate::LogLevel::Error => Level::Error,
                };
                bindings::strata::plugin::log::log(level, message);
            }
            fn now(&mut self) -> $crate::Timestamp {
                bindings::strata::plugin::clock::now()
            }
            fn monotonic_ns(&mut self) -> u64 {
                bindings::strata::plugin::clock::monotonic_ns()
            }
            fn kv_get(&mut self, key: &str) -> Option<Vec<u8>> {
                bindings::strata::plugin::kv::get(key)
            }
            fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), $crate::KvError> {
                bindings::strata::plugin::kv::set(key, value).map_err(kv_error)
            }
            fn kv_delete(&mut self, key: &str) -> Result<bool, $crate::KvError> {
                bindings::strata::plugin::kv::delete(key).map_err(kv_error)
            }
            fn kv_keys(&mut self, prefix: &str) -> Vec<String> {
                bindings::strata::plugin::kv::keys(prefix)
            }
            fn kv_add(&mut self, key: &str, delta: u64) -> Result<u64, $crate::KvError> {
                bindings::strata::plugin::kv::add(key, delta).map_err(kv_error)
            }
            fn kv_compare_and_swap(
                &mut self,
                key: &str,
                expected: Option<&[u8]>,
                new: Option<&[u8]>,
            ) -> Result<bool, $crate::KvError> {
                bindings::strata::plugin::kv::compare_and_swap(key, expected, new).map_err(kv_error)
            }
        }

        fn kv_error(e: bindings::strata::plugin::kv::KvError) -> $crate::KvError {
            use bindings::strata::plugin::kv::KvError as Wit;
            match e {
                Wit::TooLarge => $crate::KvError::TooLarge,
                Wit::QuotaExceeded => $crate::KvError::QuotaExceeded,
                Wit::Unavailable => $crate::KvError::Unavailable,
            }
        }
    };
}

#[cfg(any(feature = "placement", feature = "dm-policy"))]
pub(crate) use wit_env_impl;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secs_since_counts_whole_seconds() {
        let a = Timestamp {
            seconds: 10,
            nanoseconds: 500,
        };
        let b = Timestamp {
            seconds: 12,
            nanoseconds: 499,
        };
        assert_eq!(b.secs_since(a), 1);
        assert_eq!(a.secs_since(b), 0);
        assert_eq!(Timestamp::from_secs(100).secs_since(Timestamp::EPOCH), 100);
        assert_eq!(
            Timestamp::from_secs(i64::MAX).secs_since(Timestamp::from_secs(i64::MIN)),
            u64::MAX
        );
    }
}
