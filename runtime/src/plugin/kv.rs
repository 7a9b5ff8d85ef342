//! The private key-value store each plugin slot gets (WIT interface `kv`).
//!
//! Keys are scoped by slot name, so a plugin sees only its own keys, and they belong to the
//! slot, not to a version: a hot swap or a daemon restart keeps them. Two backends: memory
//! (tests, volatile daemons) and redb (the daemon's metadata store).

use redb::ReadableTable;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Longest key accepted.
pub const MAX_KEY: usize = 256;

/// Limits of one slot's store.
#[derive(Debug, Clone, Copy)]
pub struct KvLimits {
    /// Largest value.
    pub max_value: usize,
    /// Most keys per slot.
    pub max_keys: u64,
    /// Most bytes (keys + values) per slot.
    pub max_bytes: u64,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_value: 1 << 20,
            max_keys: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Key or value over the limit.
    #[error("key or value too large")]
    TooLarge,
    /// The slot's quota is used up.
    #[error("quota exceeded")]
    QuotaExceeded,
    /// The backend failed; nothing changed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A store of per-slot keys. Implementations must be safe to call from many threads.
pub trait KvStore: Send + Sync {
    /// The value of `key` in `slot`.
    fn get(&self, slot: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Set `key` in `slot`, enforcing `limits`.
    fn set(&self, slot: &str, key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError>;
    /// Remove `key`; whether it existed.
    fn delete(&self, slot: &str, key: &str) -> Result<bool, KvError>;
    /// Keys of `slot` starting with `prefix`, in byte order.
    fn keys(&self, slot: &str, prefix: &str) -> Result<Vec<String>, KvError>;
}

fn check_sizes(key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
    if key.len() > MAX_KEY || value.len() > limits.max_value {
        return Err(KvError::TooLarge);
    }
    Ok(())
}

/// In-memory store.
#[derive(Default)]
pub struct MemKv {
    inner: Mutex<BTreeMap<(String, String), Vec<u8>>>,
}

impl MemKv {
    /// A new, empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl KvStore for MemKv {
    fn get(&self, slot: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(m.get(&(slot.to_string(), key.to_string())).cloned())
    }

    fn set(&self, slot: &str, key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
        check_sizes(key, value, limits)?;
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (mut keys, mut bytes) = (0u64, 0u64);
        for ((s, k), v) in m.iter() {
            if s == slot && k != key {
                keys += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        if keys + 1 > limits.max_keys || bytes + (key.len() + value.len()) as u64 > limits.max_bytes
        {
            return Err(KvError::QuotaExceeded);
        }
        m.insert((slot.to_string(), key.to_string()), value.to_vec());
        Ok(())
    }

    fn delete(&self, slot: &str, key: &str) -> Result<bool, KvError> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(m.remove(&(slot.to_string(), key.to_string())).is_some())
    }

    fn keys(&self, slot: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(m.keys()
            .filter(|(s, k)| s == slot && k.starts_with(prefix))
            .map(|(_, k)| k.clone())
            .collect())
    }
}

const KV: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("plugin_kv");
/// slot name -> (keys, bytes) as 16 big-endian bytes.
const USAGE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("plugin_kv_usage");

/// Store in the daemon's redb database. Every `set`/`delete` is one durable transaction.
pub struct RedbKv {
    db: Arc<crate::store::Db>,
}

fn scoped(slot: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(slot.len() + 1 + key.len());
    k.extend_from_slice(slot.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn unavailable(e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(e.to_string())
}

fn decode_usage(b: &[u8]) -> (u64, u64) {
    let mut k = [0u8; 8];
    let mut v = [0u8; 8];
    if b.len() == 16 {
        k.copy_from_slice(&b[..8]);
        v.copy_from_slice(&b[8..]);
    }
    (u64::from_be_bytes(k), u64::from_be_bytes(v))
}

fn encode_usage(keys: u64, bytes: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&keys.to_be_bytes());
    out[8..].copy_from_slice(&bytes.to_be_bytes());
    out
}

impl RedbKv {
    /// Use (and create the tables of) `db`.
    pub fn new(db: Arc<crate::store::Db>) -> Result<Self, KvError> {
        let w = db.begin_write().map_err(unavailable)?;
        w.open_table(KV).map_err(unavailable)?;
        w.open_table(USAGE).map_err(unavailable)?;
        w.commit().map_err(unavailable)?;
        Ok(RedbKv { db })
    }

    fn update(
        &self,
        slot: &str,
        key: &str,
        value: Option<&[u8]>,
        limits: &KvLimits,
    ) -> Result<bool, KvError> {
        let k = scoped(slot, key);
        let w = self.db.begin_write().map_err(unavailable)?;
        let existed;
        {
            let mut t = w.open_table(KV).map_err(unavailable)?;
            let mut u = w.open_table(USAGE).map_err(unavailable)?;
            let (mut keys, mut bytes) = u
                .get(slot)
                .map_err(unavailable)?
                .map(|g| decode_usage(g.value()))
                .unwrap_or((0, 0));
            let old = t
                .get(k.as_slice())
                .map_err(unavailable)?
                .map(|g| g.value().len());
            existed = old.is_some();
            if let Some(n) = old {
                keys -= 1;
                bytes -= (key.len() + n) as u64;
            }
            match value {
                Some(v) => {
                    if keys + 1 > limits.max_keys
                        || bytes + (key.len() + v.len()) as u64 > limits.max_bytes
                    {
                        return Err(KvError::QuotaExceeded);
                    }
                    t.insert(k.as_slice(), v).map_err(unavailable)?;
                    keys += 1;
                    bytes += (key.len() + v.len()) as u64;
                }
                None => {
                    t.remove(k.as_slice()).map_err(unavailable)?;
                }
            }
            u.insert(slot, encode_usage(keys, bytes).as_slice())
                .map_err(unavailable)?;
        }
        w.commit().map_err(unavailable)?;
        Ok(existed)
    }
}

impl KvStore for RedbKv {
    fn get(&self, slot: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let r = self.db.begin_read().map_err(unavailable)?;
        let t = r.open_table(KV).map_err(unavailable)?;
        let v = t.get(scoped(slot, key).as_slice()).map_err(unavailable)?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    fn set(&self, slot: &str, key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
        check_sizes(key, value, limits)?;
        self.update(slot, key, Some(value), limits).map(|_| ())
    }

    fn delete(&self, slot: &str, key: &str) -> Result<bool, KvError> {
        if key.len() > MAX_KEY {
            return Ok(false);
        }
        self.update(slot, key, None, &KvLimits::default())
    }

    fn keys(&self, slot: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let r = self.db.begin_read().map_err(unavailable)?;
        let t = r.open_table(KV).map_err(unavailable)?;
        let start = scoped(slot, prefix);
        let mut out = Vec::new();
        for item in t.range(start.as_slice()..).map_err(unavailable)? {
            let (k, _) = item.map_err(unavailable)?;
            let k = k.value();
            if !k.starts_with(&start) {
                break;
            }
            out.push(String::from_utf8_lossy(&k[slot.len() + 1..]).into_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(kv: &dyn KvStore) {
        let l = KvLimits {
            max_value: 8,
            max_keys: 2,
            max_bytes: 100,
        };
        kv.set("a", "x.1", b"one", &l).unwrap();
        kv.set("a", "x.2", b"two", &l).unwrap();
        kv.set("b", "x.1", b"other", &l).unwrap();
        assert_eq!(kv.get("a", "x.1").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.keys("a", "x.").unwrap(), vec!["x.1", "x.2"]);
        assert_eq!(kv.set("a", "x.3", b"3", &l), Err(KvError::QuotaExceeded));
        kv.set("a", "x.2", b"TWO", &l).unwrap(); // overwrite within quota
        assert_eq!(kv.set("a", "x.1", b"123456789", &l), Err(KvError::TooLarge));
        assert!(kv.delete("a", "x.1").unwrap());
        assert!(!kv.delete("a", "x.1").unwrap());
        kv.set("a", "x.3", b"3", &l).unwrap();
        assert_eq!(kv.keys("a", "").unwrap(), vec!["x.2", "x.3"]);
        assert_eq!(kv.get("b", "x.1").unwrap().as_deref(), Some(&b"other"[..]));
    }

    #[test]
    fn mem_store() {
        exercise(&*MemKv::new());
    }

    #[test]
    fn redb_store_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let db = Arc::new(crate::store::Db::open(&path).unwrap());
            exercise(&RedbKv::new(db).unwrap());
        }
        let db = Arc::new(crate::store::Db::open(&path).unwrap());
        let kv = RedbKv::new(db).unwrap();
        assert_eq!(kv.get("a", "x.2").unwrap().as_deref(), Some(&b"TWO"[..]));
    }
}
