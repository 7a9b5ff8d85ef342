//! The plugin registry's records in the daemon's database: what it needs to load every
//! slot again after a restart (table `plugin_slots`: name -> JSON [`SlotRecord`]).

use crate::{PluginKind, SlotSettings};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use strata_common::store::Store;

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

/// The registry's records, kept in the daemon's [`Store`].
pub trait SlotRecords {
    /// Record (or replace) a slot.
    fn put_slot(&self, name: &str, rec: &SlotRecord) -> anyhow::Result<()>;
    /// Forget a slot.
    fn remove_slot(&self, name: &str) -> anyhow::Result<()>;
    /// Every recorded slot (records that do not parse are reported and skipped).
    fn slots(&self) -> anyhow::Result<Vec<(String, SlotRecord)>>;
    /// Remove the component files no slot record names any more (after an unload, or when a
    /// version falls out of a slot's history); how many were removed.
    fn remove_unreferenced_blobs(&self) -> anyhow::Result<usize>;
}

impl SlotRecords for Store {
    fn put_slot(&self, name: &str, rec: &SlotRecord) -> anyhow::Result<()> {
        let w = self.db().begin_write()?;
        w.open_table(SLOTS)?
            .insert(name, serde_json::to_vec(rec)?.as_slice())?;
        w.commit()?;
        Ok(())
    }

    fn remove_slot(&self, name: &str) -> anyhow::Result<()> {
        let w = self.db().begin_write()?;
        w.open_table(SLOTS)?.remove(name)?;
        w.commit()?;
        Ok(())
    }

    fn slots(&self) -> anyhow::Result<Vec<(String, SlotRecord)>> {
        let r = self.db().begin_read()?;
        let t = match r.open_table(SLOTS) {
            Ok(t) => t,
            // a new database: no slot recorded yet
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
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

    fn remove_unreferenced_blobs(&self) -> anyhow::Result<usize> {
        let _g = self.blob_guard();
        let mut keep = std::collections::BTreeSet::new();
        for (_, rec) in self.slots()? {
            keep.insert(rec.digest.clone());
            keep.extend(rec.history.iter().map(|v| v.digest.clone()));
        }
        let mut removed = 0;
        for entry in std::fs::read_dir(self.blob_dir())? {
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
}
