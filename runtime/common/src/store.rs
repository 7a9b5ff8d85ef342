//! Persistent metadata (redb): the database every subsystem shares, plugin blobs, the
//! data directory's permissions. The plugin registry's records are in
//! `strata_plugin_host::records`, the plugins' key-value state in `strata_plugin_host::RedbKv`.
//!
//! ```text
//! data_dir/meta.redb            tables: plugin_slots (name -> JSON SlotRecord),
//!                                       plugin_kv, plugin_kv_usage
//! data_dir/plugins/<sha256>.wasm  component bytes of every version in a registry record
//! data_dir/cache/                 precompiled components (see plugin::cache)
//! data_dir/spawn/<uid>.log        output of spawned programs (see space::spawn)
//! ```
//!
//! Everything under `data_dir` is the daemon's alone: directories 0700, files 0600, set at
//! creation and, for a directory left by an older version, at every start
//! ([`prepare_data_dir`]).
//!
//! Every user of `meta.redb` (spaces, DM records, plugin slots, plugin kv, attachments)
//! goes through one [`Db`]: redb latches the first I/O error of a commit (a full disk) and
//! answers every later operation with `PreviousIo` until the database is opened again.
//! [`Db`] notices that and reopens the file transparently (redb recovers it on open), so the
//! daemon serves again by itself once space comes back; until then writes fail with the
//! I/O error and nothing is acknowledged.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Create `data_dir` (0700) if needed, refuse one that belongs to another user, and take
/// group and other access away from everything in it (directories 0700, files 0600;
/// symbolic links are not followed).
pub fn prepare_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
    // a data_dir that is a symbolic link (e.g. /var/lib/strata -> /srv/strata) is checked
    // and tightened where it leads
    let data_dir = &std::fs::canonicalize(data_dir)
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", data_dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    let meta = std::fs::metadata(data_dir)?;
    anyhow::ensure!(
        meta.uid() == me,
        "data_dir {} belongs to uid {}, not to the daemon's uid {me}",
        data_dir.display(),
        meta.uid()
    );
    let mut tightened = 0usize;
    tighten(data_dir, &mut tightened)?;
    if tightened > 0 {
        tracing::warn!(data_dir = %data_dir.display(), files = tightened, "took group/other access away from the data directory (owner-only now)");
    }
    Ok(())
}

fn tighten(path: &Path, count: &mut usize) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Ok(());
    }
    let want = if ft.is_dir() { 0o700 } else { 0o600 };
    if meta.mode() & 0o7777 != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))
            .map_err(|e| anyhow::anyhow!("cannot chmod {}: {e}", path.display()))?;
        *count += 1;
    }
    if ft.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path(), count)?;
        }
    }
    Ok(())
}

/// Create (or truncate) `path` with mode 0600 and write `bytes`.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
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

/// The daemon's metadata store. Cheap to clone (clones share the database).
#[derive(Clone)]
pub struct Store {
    db: Arc<Db>,
    blobs: PathBuf,
    /// Held by whoever writes a blob and the record naming it, and by the blob collector,
    /// so a blob is never removed between being written and being recorded.
    blob_lock: Arc<std::sync::Mutex<()>>,
}

impl Store {
    /// Open (or create) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Store> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir.join("plugins"))?;
        // created 0600 before redb opens it (redb would create it with the umask's mode)
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(data_dir.join("meta.redb"))?;
        let db = Db::open(&data_dir.join("meta.redb"))?;
        Ok(Store {
            db: Arc::new(db),
            blobs: data_dir.join("plugins"),
            blob_lock: Arc::default(),
        })
    }

    /// The database, shared with the plugin key-value store.
    pub fn db(&self) -> Arc<Db> {
        self.db.clone()
    }

    /// Hold off the blob collector while a blob and the record naming it are written.
    pub fn blob_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.blob_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory of component blobs (`<sha256>.wasm`).
    pub fn blob_dir(&self) -> &Path {
        &self.blobs
    }

    /// Keep a component's bytes (content-addressed, written atomically).
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.blobs.join(format!("{digest}.wasm"));
        if path.exists() {
            return Ok(());
        }
        let tmp = self.blobs.join(format!("{digest}.tmp"));
        write_private(&tmp, bytes)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_behind_a_symlink_is_tightened_where_it_leads() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(real.join("meta.redb"), b"x").unwrap();
        std::fs::set_permissions(
            real.join("meta.redb"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        prepare_data_dir(&link).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&real), 0o700);
        assert_eq!(mode(&real.join("meta.redb")), 0o600);
    }
}
