//! Persistent metadata (redb): the plugin registry, plugin blobs and, through
//! [`crate::plugin::RedbKv`], the plugins' key-value state.
//!
//! ```text
//! data_dir/meta.redb            tables: plugin_slots (name -> JSON SlotRecord),
//!                                       plugin_kv, plugin_kv_usage
//! data_dir/plugins/<sha256>.wasm  component bytes of every version in a registry record
//! data_dir/cache/                 precompiled components (see plugin::cache)
//! ```

use crate::plugin::{PluginKind, SlotSettings};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The daemon's metadata store. Cheap to clone (clones share the database).
#[derive(Clone)]
pub struct Store {
    db: Arc<redb::Database>,
    blobs: PathBuf,
    /// Held by whoever writes a blob and the record naming it, and by the blob collector,
    /// so a blob is never removed between being written and being recorded.
    blob_lock: Arc<std::sync::Mutex<()>>,
}

impl Store {
    /// Open (or create) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(data_dir.join("plugins"))?;
        let db = redb::Database::create(data_dir.join("meta.redb")).map_err(|e| {
            anyhow::anyhow!("cannot open {}: {e}", data_dir.join("meta.redb").display())
        })?;
        let w = db.begin_write()?;
        w.open_table(SLOTS)?;
        w.commit()?;
        Ok(Store {
            db: Arc::new(db),
            blobs: data_dir.join("plugins"),
            blob_lock: Arc::default(),
        })
    }

    /// The database, shared with the plugin key-value store.
    pub fn db(&self) -> Arc<redb::Database> {
        self.db.clone()
    }

    /// Hold off the blob collector while a blob and the record naming it are written.
    pub fn blob_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.blob_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remove the component files no slot record names any more (after an unload, or when a
    /// version falls out of a slot's history); how many were removed.
    pub fn remove_unreferenced_blobs(&self) -> anyhow::Result<usize> {
        let _g = self.blob_guard();
        let mut keep = std::collections::BTreeSet::new();
        for (_, rec) in self.slots()? {
            keep.insert(rec.digest.clone());
            keep.extend(rec.history.iter().map(|v| v.digest.clone()));
        }
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(digest) = name.strip_suffix(".wasm") else {
                continue;
            };
            if digest.len() == 64 && !keep.contains(digest) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
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
