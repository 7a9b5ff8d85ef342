//! The private key-value store each plugin slot gets (WIT interface `kv`).
//!
//! Keys are scoped by slot name, so a plugin sees only its own keys, and they belong to the
//! slot, not to a version: a hot swap or a daemon restart keeps them; `unload` removes them.
//! Two backends: memory (tests, volatile daemons) and redb (the daemon's metadata store).
//!
//! ```text
//!   plugin call ─► kv.set / add / compare-and-swap ─► in-memory map (one mutex: every
//!                  update is atomic, quotas checked) ─► dirty set ─┐
//!   background writer (every flush interval) ◄────────────────────┘
//!       └─► one redb transaction per batch (fsync'd), off the call path
//!   clean stop (`flush`, or the last handle dropped) ─► everything dirty committed
//! ```
//!
//! What a `kill -9` (or a power cut) may lose: the updates of the last flush interval
//! (`plugins.kv_flush_ms`, 100 ms by default) that the writer had not committed yet. A
//! committed batch is never partial (one transaction), so state on disk is always a state
//! the plugin saw at some point.

use redb::ReadableTable;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

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

/// A store of per-slot keys. Implementations must be safe to call from many threads, and
/// every update (`set`, `delete`, `add`, `compare_and_swap`) is atomic with respect to the
/// others on the same key.
pub trait KvStore: Send + Sync {
    /// The value of `key` in `slot`.
    fn get(&self, slot: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Set `key` in `slot`, enforcing `limits`.
    fn set(&self, slot: &str, key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError>;
    /// Remove `key`; whether it existed.
    fn delete(&self, slot: &str, key: &str) -> Result<bool, KvError>;
    /// Keys of `slot` starting with `prefix`, in byte order.
    fn keys(&self, slot: &str, prefix: &str) -> Result<Vec<String>, KvError>;
    /// Add `delta` (saturating) to the counter under `key` and return the new value, in one
    /// step. A counter is decimal ASCII digits; a missing key or a value that is not a
    /// counter counts as 0.
    fn add(&self, slot: &str, key: &str, delta: u64, limits: &KvLimits) -> Result<u64, KvError>;
    /// Replace the value of `key` with `new` (`None`: remove it) if it is `expected` now
    /// (`None`: absent), in one step; whether it was replaced.
    fn compare_and_swap(
        &self,
        slot: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        limits: &KvLimits,
    ) -> Result<bool, KvError>;
    /// Up to `limit` (key, value) pairs of `slot` with keys `>= from`, in byte order.
    fn range(
        &self,
        slot: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError>;
    /// Remove every key of `slot`; how many there were.
    fn remove_slot(&self, slot: &str) -> Result<u64, KvError>;
    /// Make every acknowledged update durable now (a clean stop calls this).
    fn flush(&self) -> Result<(), KvError> {
        Ok(())
    }
}

fn check_sizes(key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
    if key.len() > MAX_KEY || value.len() > limits.max_value {
        return Err(KvError::TooLarge);
    }
    Ok(())
}

/// The counter `v` holds (0 when it is not one).
fn counter(v: Option<&Vec<u8>>) -> u64 {
    v.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

type Key = (String, String);

/// The state both backends keep in memory: values and per-slot usage.
#[derive(Default)]
struct Table {
    map: BTreeMap<Key, Vec<u8>>,
    /// slot -> (keys, bytes of keys and values).
    usage: HashMap<String, (u64, u64)>,
}

impl Table {
    fn get(&self, slot: &str, key: &str) -> Option<&Vec<u8>> {
        self.map.get(&(slot.to_string(), key.to_string()))
    }

    /// Put or remove one key under the quota; the change made, for the writer.
    fn put(
        &mut self,
        slot: &str,
        key: &str,
        value: Option<&[u8]>,
        limits: &KvLimits,
    ) -> Result<bool, KvError> {
        if let Some(v) = value {
            check_sizes(key, v, limits)?;
        }
        let k = (slot.to_string(), key.to_string());
        let old = self.map.get(&k).map(|v| v.len());
        let (mut keys, mut bytes) = self.usage.get(slot).copied().unwrap_or((0, 0));
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
                keys += 1;
                bytes += (key.len() + v.len()) as u64;
                self.map.insert(k, v.to_vec());
            }
            None => {
                self.map.remove(&k);
            }
        }
        if keys == 0 {
            self.usage.remove(slot);
        } else {
            self.usage.insert(slot.to_string(), (keys, bytes));
        }
        Ok(old.is_some())
    }

    fn keys(&self, slot: &str, prefix: &str) -> Vec<String> {
        self.map
            .range((slot.to_string(), prefix.to_string())..)
            .take_while(|((s, k), _)| s == slot && k.starts_with(prefix))
            .map(|((_, k), _)| k.clone())
            .collect()
    }

    fn range(&self, slot: &str, from: &str, limit: usize) -> Vec<(String, Vec<u8>)> {
        self.map
            .range((slot.to_string(), from.to_string())..)
            .take_while(|((s, _), _)| s == slot)
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }

    fn slot_keys(&self, slot: &str) -> Vec<String> {
        self.keys(slot, "")
    }
}

/// Journal of the changes not yet committed: the latest value per key (`None`: removed).
type Dirty = BTreeMap<Key, Option<Vec<u8>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The store logic over a [`Table`], journaling changes when `journal` is set.
struct Core {
    table: Table,
    dirty: Option<Dirty>,
}

impl Core {
    fn note(&mut self, slot: &str, key: &str) {
        if let Some(d) = &mut self.dirty {
            let v = self.table.get(slot, key).cloned();
            d.insert((slot.to_string(), key.to_string()), v);
        }
    }

    fn set(&mut self, slot: &str, key: &str, value: &[u8], l: &KvLimits) -> Result<(), KvError> {
        self.table.put(slot, key, Some(value), l)?;
        self.note(slot, key);
        Ok(())
    }

    fn delete(&mut self, slot: &str, key: &str) -> Result<bool, KvError> {
        if key.len() > MAX_KEY {
            return Ok(false);
        }
        let existed = self.table.put(slot, key, None, &KvLimits::default())?;
        if existed {
            self.note(slot, key);
        }
        Ok(existed)
    }

    fn add(&mut self, slot: &str, key: &str, delta: u64, l: &KvLimits) -> Result<u64, KvError> {
        let value = counter(self.table.get(slot, key)).saturating_add(delta);
        self.set(slot, key, value.to_string().as_bytes(), l)?;
        Ok(value)
    }

    fn cas(
        &mut self,
        slot: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        l: &KvLimits,
    ) -> Result<bool, KvError> {
        if key.len() > MAX_KEY {
            return Err(KvError::TooLarge);
        }
        if self.table.get(slot, key).map(|v| v.as_slice()) != expected {
            return Ok(false);
        }
        match new {
            Some(v) => self.set(slot, key, v, l)?,
            None => {
                self.delete(slot, key)?;
            }
        }
        Ok(true)
    }

    fn remove_slot(&mut self, slot: &str) -> u64 {
        let keys = self.table.slot_keys(slot);
        for k in &keys {
            let _ = self.delete(slot, k);
        }
        keys.len() as u64
    }
}

/// In-memory store.
pub struct MemKv {
    core: Mutex<Core>,
}

impl Default for MemKv {
    fn default() -> Self {
        MemKv {
            core: Mutex::new(Core {
                table: Table::default(),
                dirty: None,
            }),
        }
    }
}

impl MemKv {
    /// A new, empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl KvStore for MemKv {
    fn get(&self, slot: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(lock(&self.core).table.get(slot, key).cloned())
    }
    fn set(&self, slot: &str, key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
        lock(&self.core).set(slot, key, value, limits)
    }
    fn delete(&self, slot: &str, key: &str) -> Result<bool, KvError> {
        lock(&self.core).delete(slot, key)
    }
    fn keys(&self, slot: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        Ok(lock(&self.core).table.keys(slot, prefix))
    }
    fn add(&self, slot: &str, key: &str, delta: u64, limits: &KvLimits) -> Result<u64, KvError> {
        lock(&self.core).add(slot, key, delta, limits)
    }
    fn compare_and_swap(
        &self,
        slot: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        limits: &KvLimits,
    ) -> Result<bool, KvError> {
        lock(&self.core).cas(slot, key, expected, new, limits)
    }
    fn range(
        &self,
        slot: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        Ok(lock(&self.core).table.range(slot, from, limit))
    }
    fn remove_slot(&self, slot: &str) -> Result<u64, KvError> {
        Ok(lock(&self.core).remove_slot(slot))
    }
}

const KV: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("plugin_kv");
/// Kept by earlier versions (slot -> usage); usage is now computed when the store opens.
const USAGE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("plugin_kv_usage");

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

struct Shared {
    core: Mutex<Core>,
    db: Arc<strata_common::store::Db>,
    /// Wakes the writer (new dirty entries, or stop).
    wake: Condvar,
    /// Set when the store is dropped: the writer flushes and ends.
    stop: std::sync::atomic::AtomicBool,
    /// Held while a batch is being committed, so `flush` returns only after its batch is on
    /// disk.
    commit: Mutex<()>,
    /// When the last commit failed (its entries are kept and retried).
    failing: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Commit everything dirty in one transaction; on failure the entries go back (newer
    /// changes made meanwhile win).
    fn commit(&self) -> Result<usize, KvError> {
        let _c = lock(&self.commit);
        let batch = {
            let mut core = lock(&self.core);
            std::mem::take(core.dirty.get_or_insert_with(Dirty::new))
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        match self.write(&batch) {
            Ok(()) => {
                if self
                    .failing
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!("plugin kv store: commits succeed again");
                }
                Ok(n)
            }
            Err(e) => {
                let mut core = lock(&self.core);
                let dirty = core.dirty.get_or_insert_with(Dirty::new);
                for (k, v) in batch {
                    dirty.entry(k).or_insert(v);
                }
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::error!(
                        "plugin kv store: cannot commit {n} changes (kept, retried): {e}"
                    );
                }
                Err(e)
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until `d` has passed or the store stops.
    fn pause(&self, d: Duration) {
        let until = std::time::Instant::now() + d;
        let mut core = lock(&self.core);
        while !self.stopping() {
            let now = std::time::Instant::now();
            if now >= until {
                break;
            }
            core = self
                .wake
                .wait_timeout(core, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The background writer: wait for changes, let a batch gather for `interval`, commit
    /// it; on stop, commit what is left and end.
    fn write_loop(&self, interval: Duration) {
        loop {
            {
                let core = lock(&self.core);
                let idle = |c: &mut Core| {
                    c.dirty.as_ref().is_none_or(|d| d.is_empty()) && !self.stopping()
                };
                let _core = self
                    .wake
                    .wait_while(core, idle)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if self.stopping() {
                let _ = self.commit();
                return;
            }
            // Gather a batch: changes of the next interval go into the same commit.
            self.pause(interval);
            if self.commit().is_err() {
                // The store is failing (e.g. disk full): retry later, not in a loop.
                self.pause(interval.max(Duration::from_millis(500)));
            }
        }
    }

    fn write(&self, batch: &Dirty) -> Result<(), KvError> {
        let w = self.db.begin_write().map_err(unavailable)?;
        {
            let mut t = w.open_table(KV).map_err(unavailable)?;
            for ((slot, key), v) in batch {
                let k = scoped(slot, key);
                match v {
                    Some(v) => {
                        t.insert(k.as_slice(), v.as_slice()).map_err(unavailable)?;
                    }
                    None => {
                        t.remove(k.as_slice()).map_err(unavailable)?;
                    }
                }
            }
        }
        w.commit().map_err(unavailable)
    }
}

/// Store in the daemon's redb database: served from memory, committed in batches by a
/// background writer every `flush_interval` (see the module docs for what a crash loses).
pub struct RedbKv {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl RedbKv {
    /// Use (and create the tables of) `db`, committing every 100 ms.
    pub fn new(db: Arc<strata_common::store::Db>) -> Result<Self, KvError> {
        Self::with_flush_interval(db, Duration::from_millis(100))
    }

    /// Use `db`, committing changes every `interval` (at the latest).
    pub fn with_flush_interval(
        db: Arc<strata_common::store::Db>,
        interval: Duration,
    ) -> Result<Self, KvError> {
        let w = db.begin_write().map_err(unavailable)?;
        w.open_table(KV).map_err(unavailable)?;
        w.open_table(USAGE).map_err(unavailable)?;
        w.commit().map_err(unavailable)?;
        let mut table = Table::default();
        {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(KV).map_err(unavailable)?;
            for item in t.iter().map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let k = k.value();
                let Some(sep) = k.iter().position(|b| *b == 0) else {
                    continue;
                };
                let slot = String::from_utf8_lossy(&k[..sep]).into_owned();
                let key = String::from_utf8_lossy(&k[sep + 1..]).into_owned();
                let v = v.value().to_vec();
                let u = table.usage.entry(slot.clone()).or_insert((0, 0));
                u.0 += 1;
                u.1 += (key.len() + v.len()) as u64;
                table.map.insert((slot, key), v);
            }
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                table,
                dirty: Some(Dirty::new()),
            }),
            db,
            wake: Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
            commit: Mutex::new(()),
            failing: std::sync::atomic::AtomicBool::new(false),
        });
        let s = shared.clone();
        let interval = interval.max(Duration::from_millis(1));
        let writer = std::thread::Builder::new()
            .name("plugin-kv-writer".into())
            .spawn(move || s.write_loop(interval))
            .map_err(|e| KvError::Unavailable(format!("cannot start the kv writer: {e}")))?;
        Ok(RedbKv {
            shared,
            writer: Some(writer),
        })
    }

    fn update<T>(&self, f: impl FnOnce(&mut Core) -> Result<T, KvError>) -> Result<T, KvError> {
        let (r, first) = {
            let mut core = lock(&self.shared.core);
            let was_clean = core.dirty.as_ref().is_none_or(|d| d.is_empty());
            let r = f(&mut core);
            (
                r,
                was_clean && core.dirty.as_ref().is_some_and(|d| !d.is_empty()),
            )
        };
        if first {
            // The writer sleeps until there is something to commit; later changes join the
            // batch it is gathering.
            self.shared.wake.notify_one();
        }
        r
    }
}

impl Drop for RedbKv {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl KvStore for RedbKv {
    fn get(&self, slot: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(lock(&self.shared.core).table.get(slot, key).cloned())
    }
    fn set(&self, slot: &str, key: &str, value: &[u8], limits: &KvLimits) -> Result<(), KvError> {
        self.update(|c| c.set(slot, key, value, limits))
    }
    fn delete(&self, slot: &str, key: &str) -> Result<bool, KvError> {
        self.update(|c| c.delete(slot, key))
    }
    fn keys(&self, slot: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        Ok(lock(&self.shared.core).table.keys(slot, prefix))
    }
    fn add(&self, slot: &str, key: &str, delta: u64, limits: &KvLimits) -> Result<u64, KvError> {
        self.update(|c| c.add(slot, key, delta, limits))
    }
    fn compare_and_swap(
        &self,
        slot: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        limits: &KvLimits,
    ) -> Result<bool, KvError> {
        self.update(|c| c.cas(slot, key, expected, new, limits))
    }
    fn range(
        &self,
        slot: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        Ok(lock(&self.shared.core).table.range(slot, from, limit))
    }
    fn remove_slot(&self, slot: &str) -> Result<u64, KvError> {
        let n = self.update(|c| Ok(c.remove_slot(slot)))?;
        // An unload is rare and must not come back after a crash: commit now.
        self.flush()?;
        Ok(n)
    }
    fn flush(&self) -> Result<(), KvError> {
        self.shared.commit().map(|_| ())
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
        // atomic updates
        assert_eq!(kv.add("b", "n", 2, &l).unwrap(), 2);
        assert_eq!(kv.add("b", "n", 3, &l).unwrap(), 5);
        assert_eq!(kv.add("a", "n", 1, &l), Err(KvError::QuotaExceeded));
        assert!(!kv
            .compare_and_swap("b", "n", Some(b"4"), Some(b"9"), &l)
            .unwrap());
        assert!(kv
            .compare_and_swap("b", "n", Some(b"5"), Some(b"9"), &l)
            .unwrap());
        assert!(kv.compare_and_swap("b", "n", Some(b"9"), None, &l).unwrap());
        assert!(kv.compare_and_swap("b", "n", None, Some(b"1"), &l).unwrap());
        assert_eq!(kv.range("a", "x.3", 10).unwrap().len(), 1);
        assert_eq!(kv.remove_slot("a").unwrap(), 2);
        assert!(kv.keys("a", "").unwrap().is_empty());
        kv.set("a", "x.1", b"1", &l).unwrap();
        kv.set("a", "x.2", b"2", &l).unwrap(); // the quota was freed
    }

    #[test]
    fn mem_store() {
        exercise(&*MemKv::new());
    }

    #[test]
    fn concurrent_adds_lose_nothing() {
        let kv = MemKv::new();
        let l = KvLimits::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        kv.add("s", "n", 1, &l).unwrap();
                    }
                });
            }
        });
        assert_eq!(kv.get("s", "n").unwrap().as_deref(), Some(&b"4000"[..]));
    }

    #[test]
    fn redb_store_persists_at_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let db = Arc::new(strata_common::store::Db::open(&path).unwrap());
            // a long interval: only the final flush at drop can have committed
            let kv = RedbKv::with_flush_interval(db, Duration::from_secs(3600)).unwrap();
            exercise(&kv);
            kv.add("c", "n", 7, &KvLimits::default()).unwrap();
        }
        let db = Arc::new(strata_common::store::Db::open(&path).unwrap());
        let kv = RedbKv::new(db).unwrap();
        assert_eq!(kv.get("a", "x.2").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(kv.get("c", "n").unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(kv.get("b", "x.1").unwrap().as_deref(), Some(&b"other"[..]));
        // usage recomputed at open: slot a is at its quota of 2 keys
        let l = KvLimits {
            max_value: 8,
            max_keys: 2,
            max_bytes: 100,
        };
        assert_eq!(kv.set("a", "x.3", b"3", &l), Err(KvError::QuotaExceeded));
    }

    #[test]
    fn redb_writer_commits_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let db = Arc::new(strata_common::store::Db::open(&path).unwrap());
        let kv = RedbKv::with_flush_interval(db.clone(), Duration::from_millis(5)).unwrap();
        kv.set("s", "k", b"v", &KvLimits::default()).unwrap();
        let t0 = std::time::Instant::now();
        loop {
            let r = db.begin_read().unwrap();
            let t = r.open_table(KV).unwrap();
            if t.get(scoped("s", "k").as_slice()).unwrap().is_some() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
