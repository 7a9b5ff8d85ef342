//! The slot configuration format shared by the official plugins: a tiny `key=value` list.
//!
//! ```text
//! # comment to the end of the line
//! copies=3, min_free_bytes=1GiB
//! tier=archive
//! ```
//!
//! * Entries are separated by newlines, commas, semicolons or ASCII whitespace, so the text
//!   fits on a command line (`copies=3,min_free_bytes=0`) as well as in a file.
//! * A key is `[A-Za-z0-9_.-]+`; the value is everything after the first `=` up to the next
//!   separator (it cannot contain one). Empty text is an empty configuration.
//! * A key may appear once. Keys nobody asked for are an error ([`ConfigMap::finish`]), so a
//!   typo never silently falls back to a default.
//!
//! ```
//! use strata_plugin_sdk::config::ConfigMap;
//!
//! let mut cfg = ConfigMap::parse("copies=3 # three copies\nverbose=true").unwrap();
//! assert_eq!(cfg.take_u64("copies").unwrap(), Some(3));
//! assert_eq!(cfg.take_bool("verbose").unwrap(), Some(true));
//! assert_eq!(cfg.take_u64("min_free_bytes").unwrap(), None);
//! cfg.finish().unwrap();
//! ```

use core::fmt;

/// Why a configuration text was refused. The plugin's `init` turns it into its error string.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// An entry is not `key=value` or the key has characters outside `[A-Za-z0-9_.-]`.
    Malformed {
        /// The offending entry as written.
        entry: String,
    },
    /// A key appears more than once.
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A key the plugin does not know.
    UnknownKey {
        /// The unknown key.
        key: String,
    },
    /// A value that does not parse as what the key needs.
    InvalidValue {
        /// The key.
        key: String,
        /// The value as written.
        value: String,
        /// What was expected, e.g. "an unsigned integer".
        expected: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Malformed { entry } => {
                write!(f, "malformed config entry `{entry}` (expected key=value)")
            }
            ConfigError::DuplicateKey { key } => write!(f, "config key `{key}` given twice"),
            ConfigError::UnknownKey { key } => write!(f, "unknown config key `{key}`"),
            ConfigError::InvalidValue {
                key,
                value,
                expected,
            } => write!(f, "config key `{key}`: `{value}` is not {expected}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for String {
    fn from(e: ConfigError) -> String {
        e.to_string()
    }
}

/// A parsed configuration: the entries in order, each taken at most once by the plugin.
#[derive(Debug, Clone, Default)]
pub struct ConfigMap {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    value: String,
    taken: bool,
}

fn is_separator(c: char) -> bool {
    c == ',' || c == ';' || c.is_ascii_whitespace()
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'
}

impl ConfigMap {
    /// Parse configuration text. Fails on malformed entries and repeated keys; unknown keys are
    /// only detected by [`ConfigMap::finish`].
    pub fn parse(text: &str) -> Result<ConfigMap, ConfigError> {
        let mut entries: Vec<Entry> = Vec::new();
        for line in text.lines() {
            let line = line.split_once('#').map_or(line, |(before, _)| before);
            for item in line.split(is_separator).filter(|s| !s.is_empty()) {
                let Some((key, value)) = item.split_once('=') else {
                    return Err(ConfigError::Malformed { entry: item.into() });
                };
                if key.is_empty() || !key.chars().all(is_key_char) {
                    return Err(ConfigError::Malformed { entry: item.into() });
                }
                if entries.iter().any(|e| e.key == key) {
                    return Err(ConfigError::DuplicateKey { key: key.into() });
                }
                entries.push(Entry {
                    key: key.into(),
                    value: value.into(),
                    taken: false,
                });
            }
        }
        Ok(ConfigMap { entries })
    }

    /// True if the configuration has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The raw value of `key`, marking the key as known.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let entry = self.entries.iter_mut().find(|e| e.key == key)?;
        entry.taken = true;
        Some(entry.value.clone())
    }

    /// A non-empty string value.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            Some(v) if v.is_empty() => Err(invalid(key, v, "a non-empty string")),
            other => Ok(other),
        }
    }

    /// An unsigned decimal integer; `_` may separate digit groups (`1_000_000`).
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        parse_u64(&v)
            .map(Some)
            .ok_or_else(|| invalid(key, v, "an unsigned integer"))
    }

    /// A byte count: an unsigned integer with an optional binary suffix `KiB`, `MiB`, `GiB` or
    /// `TiB` (`64MiB` = 67108864).
    pub fn take_bytes(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        const SUFFIXES: [(&str, u64); 4] = [
            ("KiB", 1 << 10),
            ("MiB", 1 << 20),
            ("GiB", 1 << 30),
            ("TiB", 1 << 40),
        ];
        let (digits, unit) = SUFFIXES
            .iter()
            .find_map(|(s, unit)| v.strip_suffix(s).map(|d| (d, *unit)))
            .unwrap_or((v.as_str(), 1));
        parse_u64(digits)
            .and_then(|n| n.checked_mul(unit))
            .map(Some)
            .ok_or_else(|| invalid(key, v.clone(), "a byte count (e.g. 4096 or 64MiB)"))
    }

    /// `true` or `false`.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) if v == "true" => Ok(Some(true)),
            Some(v) if v == "false" => Ok(Some(false)),
            Some(v) => Err(invalid(key, v, "`true` or `false`")),
        }
    }

    /// Fail on the first key that was never taken.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.entries.into_iter().find(|e| !e.taken) {
            Some(e) => Err(ConfigError::UnknownKey { key: e.key }),
            None => Ok(()),
        }
    }
}

fn invalid(key: &str, value: String, expected: &'static str) -> ConfigError {
    ConfigError::InvalidValue {
        key: key.into(),
        value,
        expected,
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.starts_with('_') || !s.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return None;
    }
    s.chars().filter(|c| *c != '_').try_fold(0u64, |n, c| {
        n.checked_mul(10)?.checked_add(u64::from(c as u8 - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_empty_config() {
        let cfg = ConfigMap::parse("  \n# only a comment\n").unwrap();
        assert!(cfg.is_empty());
        cfg.finish().unwrap();
    }

    #[test]
    fn separators_and_comments() {
        let mut cfg = ConfigMap::parse("a=1,b=2; c=3\n d=x # e=4\n").unwrap();
        assert_eq!(cfg.take_u64("a").unwrap(), Some(1));
        assert_eq!(cfg.take_u64("b").unwrap(), Some(2));
        assert_eq!(cfg.take_u64("c").unwrap(), Some(3));
        assert_eq!(cfg.take_str("d").unwrap().as_deref(), Some("x"));
        assert_eq!(cfg.take("e"), None);
        cfg.finish().unwrap();
    }

    #[test]
    fn errors() {
        assert!(matches!(
            ConfigMap::parse("novalue"),
            Err(ConfigError::Malformed { .. })
        ));
        assert!(matches!(
            ConfigMap::parse("=1"),
            Err(ConfigError::Malformed { .. })
        ));
        assert!(matches!(
            ConfigMap::parse("a=1 a=2"),
            Err(ConfigError::DuplicateKey { .. })
        ));
        let cfg = ConfigMap::parse("typo=1").unwrap();
        assert_eq!(
            cfg.finish(),
            Err(ConfigError::UnknownKey { key: "typo".into() })
        );
        let mut cfg = ConfigMap::parse("n=-1 b=yes s=").unwrap();
        assert!(cfg.take_u64("n").is_err());
        assert!(cfg.take_bool("b").is_err());
        assert!(cfg.take_str("s").is_err());
    }

    #[test]
    fn numbers_and_sizes() {
        let mut cfg =
            ConfigMap::parse("a=1_000 b=64MiB c=3KiB d=18446744073709551615 e=16EiB f=99999TiB")
                .unwrap();
        assert_eq!(cfg.take_u64("a").unwrap(), Some(1000));
        assert_eq!(cfg.take_bytes("b").unwrap(), Some(64 << 20));
        assert_eq!(cfg.take_bytes("c").unwrap(), Some(3072));
        assert_eq!(cfg.take_u64("d").unwrap(), Some(u64::MAX));
        assert!(cfg.take_bytes("e").is_err());
        assert!(cfg.take_bytes("f").is_ok());
        let mut cfg = ConfigMap::parse("x=18446744073709551616 y=99999999TiB").unwrap();
        assert!(cfg.take_u64("x").is_err());
        assert!(cfg.take_bytes("y").is_err());
    }
}
