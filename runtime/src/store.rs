//! Persistent metadata (redb): the plugin registry, plugin blobs and, through
//! [`crate::plugin::RedbKv`], the plugins' key-value state.
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

use crate::plugin::{PluginKind, SlotSettings};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Create `data_dir` (0700) if needed, refuse one that belongs to another user, and take
/// group and other access away from everything in it (directories 0700, files 0600;
/// symbolic links are not followed).
pub fn prepare_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
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

/// The daemon's metadata store.
pub struct Store {
    db: Arc<redb::Database>,
    blobs: PathBuf,
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
        let db = redb::Database::create(data_dir.join("meta.redb")).map_err(|e| {
            anyhow::anyhow!("cannot open {}: {e}", data_dir.join("meta.redb").display())
        })?;
        let w = db.begin_write()?;
        w.open_table(SLOTS)?;
        w.commit()?;
        Ok(Store {
            db: Arc::new(db),
            blobs: data_dir.join("plugins"),
        })
    }

    /// The database, shared with the plugin key-value store.
    pub fn db(&self) -> Arc<redb::Database> {
        self.db.clone()
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
