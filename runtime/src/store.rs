//! Persistent metadata (redb): the plugin registry, plugin blobs and, through
//! [`crate::plugin::RedbKv`], the plugins' key-value state.
//!
//! ```text
//! data_dir/meta.redb            tables: plugin_slots (name -> JSON SlotRecord),
//!                                       plugin_kv, plugin_kv_usage
//! data_dir/plugins/<sha256>.wasm  component bytes of every version in a registry record
//! data_dir/cache/                 precompiled components (see plugin::cache)
//! ```
//!
//! Every user of `meta.redb` (spaces, DM records, plugin slots, plugin kv, attachments)
//! goes through one [`Db`]: redb latches the first I/O error of a commit (a full disk) and
//! answers every later operation with `PreviousIo` until the database is opened again.
//! [`Db`] notices that and reopens the file transparently (redb recovers it on open), so the
//! daemon serves again by itself once space comes back; until then writes fail with the
//! I/O error and nothing is acknowledged.

use crate::plugin::{PluginKind, SlotSettings};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const SLOTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("plugin_slots");

/// What the daemon remembers of a plugin slot, to load it again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// World of the slot.
    pub kind: PluginKind,
    /// sha256 of the current version's component.
    pub digest: String,
    /// Where the current version came from.
    pub source: String,
    /// Settings in force.
    pub settings: SlotSettings,
    /// Earlier versions kept for rollback, oldest first.
    #[serde(default)]
    pub history: Vec<RecordedVersion>,
}

/// An earlier version of a slot, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedVersion {
    /// sha256 of its component.
    pub digest: String,
    /// Where it came from.
    pub source: String,
    /// The settings it ran with.
    pub settings: SlotSettings,
}

/// After a failed commit or reopen, the next reopen waits this long (a reopen after a
/// failed commit runs redb's recovery, which reads the whole file); meanwhile transactions
/// fail at once with the last error.
const REOPEN_BACKOFF: Duration = Duration::from_millis(200);

/// Whether the open database is poisoned, and the last failure (for the back-off).
#[derive(Default)]
struct Health {
    poisoned: AtomicBool,
    last_failure: Mutex<Option<(Instant, String)>>,
}

impl Health {
    fn failed(&self, why: String) {
        self.poisoned.store(true, Ordering::Release);
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), why));
    }

    fn poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

/// The metadata database (`meta.redb`), reopened after an I/O error poisoned it.
///
/// Use it as a `redb::Database`: [`Db::begin_write`] and [`Db::begin_read`] return redb's
/// transactions (a write transaction wrapped so that a failed commit is noticed).
pub struct Db {
    path: PathBuf,
    /// `None` while closed after a failure (the next use opens it again).
    inner: RwLock<Option<Arc<redb::Database>>>,
    /// Whether a commit failed (the open database refuses everything until reopened).
    health: Arc<Health>,
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// A transaction could not begin.
    #[error(transparent)]
    Transaction(#[from] redb::TransactionError),
    /// The database failed (disk full?) and is not open again yet.
    #[error("the metadata store is unavailable after an I/O error: {0}")]
    Unavailable(String),
}

/// A write transaction of a [`Db`]: a redb `WriteTransaction` whose failed commit marks the
/// database for reopening.
pub struct WriteTxn {
    tx: redb::WriteTransaction,
    health: Arc<Health>,
}

impl std::ops::Deref for WriteTxn {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &redb::WriteTransaction {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTxn {
    fn deref_mut(&mut self) -> &mut redb::WriteTransaction {
        &mut self.tx
    }
}

impl WriteTxn {
    /// Commit; a failure (an I/O error) poisons redb's database, so it is reopened before
    /// a later transaction.
    pub fn commit(self) -> Result<(), redb::CommitError> {
        let r = self.tx.commit();
        if let Err(e) = &r {
            self.health.failed(e.to_string());
        }
        r
    }

    /// Abort.
    pub fn abort(self) -> Result<(), redb::StorageError> {
        self.tx.abort()
    }
}

fn previous_io(e: &redb::TransactionError) -> bool {
    matches!(
        e,
        redb::TransactionError::Storage(redb::StorageError::PreviousIo)
    )
}

impl Db {
    /// Open (or create) the database file.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let db = redb::Database::create(path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Db {
            path: path.to_owned(),
            inner: RwLock::new(Some(Arc::new(db))),
            health: Arc::new(Health::default()),
        })
    }

    /// The open database, reopened first when an earlier commit failed.
    fn current(&self) -> Result<Arc<redb::Database>, DbError> {
        if !self.health.poisoned() {
            if let Some(db) = self
                .inner
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                return Ok(db.clone());
            }
        }
        self.reopen()
    }

    /// Close the poisoned database and open the file again (redb repairs it on open).
    fn reopen(&self) -> Result<Arc<redb::Database>, DbError> {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if !self.health.poisoned() {
            if let Some(db) = g.as_ref() {
                // another thread reopened it meanwhile
                return Ok(db.clone());
            }
        }
        if let Some((at, why)) = self
            .health
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if at.elapsed() < REOPEN_BACKOFF {
                return Err(DbError::Unavailable(why.clone()));
            }
        }
        // the file lock is held until every handle of the old database is gone
        *g = None;
        match redb::Database::create(&self.path) {
            Ok(db) => {
                let db = Arc::new(db);
                *g = Some(db.clone());
                self.health.poisoned.store(false, Ordering::Release);
                tracing::warn!(path = %self.path.display(), "metadata store reopened after an I/O error");
                Ok(db)
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(path = %self.path.display(), "cannot reopen the metadata store: {why}");
                self.health.failed(why.clone());
                Err(DbError::Unavailable(why))
            }
        }
    }

    /// Begin a write transaction (reopening the database if an I/O error poisoned it).
    pub fn begin_write(&self) -> Result<WriteTxn, DbError> {
        let db = self.current()?;
        let tx = match db.begin_write() {
            Err(e) if previous_io(&e) => {
                drop(db);
                // latched by an earlier failure: reopen now (the back-off counts from a
                // failure this wrapper saw)
                self.health.poisoned.store(true, Ordering::Release);
                self.reopen()?.begin_write()?
            }
            r => r?,
        };
        Ok(WriteTxn {
            tx,
            health: self.health.clone(),
        })
    }

    /// Begin a read transaction (reopening the database if an I/O error poisoned it).
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, DbError> {
        use redb::ReadableDatabase;
        let db = self.current()?;
        match db.begin_read() {
            Err(e) if previous_io(&e) => {
                drop(db);
                // latched by an earlier failure: reopen now (the back-off counts from a
                // failure this wrapper saw)
                self.health.poisoned.store(true, Ordering::Release);
                Ok(self.reopen()?.begin_read()?)
            }
            r => Ok(r?),
        }
    }
}

/// The daemon's metadata store.
pub struct Store {
    db: Arc<Db>,
    blobs: PathBuf,
}

impl Store {
    /// Open (or create) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(data_dir.join("plugins"))?;
        let db = Db::open(&data_dir.join("meta.redb"))?;
        let w = db.begin_write()?;
        w.open_table(SLOTS)?;
        w.commit()?;
        Ok(Store {
            db: Arc::new(db),
            blobs: data_dir.join("plugins"),
        })
    }

    /// The database, shared with the plugin key-value store.
    pub fn db(&self) -> Arc<Db> {
        self.db.clone()
    }

    /// Keep a component's bytes (content-addressed, written atomically).
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.blobs.join(format!("{digest}.wasm"));
        if path.exists() {
            return Ok(());
        }
        let tmp = self.blobs.join(format!("{digest}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// A component's bytes.
    pub fn blob(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "bad digest"
        );
        Ok(std::fs::read(self.blobs.join(format!("{digest}.wasm")))?)
    }

    /// Record (or replace) a slot.
    pub fn put_slot(&self, name: &str, rec: &SlotRecord) -> anyhow::Result<()> {
        let w = self.db.begin_write()?;
        w.open_table(SLOTS)?
            .insert(name, serde_json::to_vec(rec)?.as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// Forget a slot.
    pub fn remove_slot(&self, name: &str) -> anyhow::Result<()> {
        let w = self.db.begin_write()?;
        w.open_table(SLOTS)?.remove(name)?;
        w.commit()?;
        Ok(())
    }

    /// Every recorded slot (records that do not parse are reported and skipped).
    pub fn slots(&self) -> anyhow::Result<Vec<(String, SlotRecord)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(SLOTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match serde_json::from_slice::<SlotRecord>(v.value()) {
                Ok(rec) => out.push((k.value().to_string(), rec)),
                Err(e) => {
                    tracing::error!(slot = k.value(), "unreadable plugin registry record: {e}")
                }
            }
        }
        Ok(out)
    }
}
