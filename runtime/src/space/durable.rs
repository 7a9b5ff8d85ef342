//! Where spaces and durable chunks live on disk: tables of the daemon's `meta.redb`.
//!
//! ```text
//! spaces      name                 -> JSON SpaceMeta
//! chunk_meta  "<space>/<chunk>"    -> JSON ChunkMeta   (durable spaces only)
//! chunk_data  "<space>/<chunk>"    -> bytes of the published version
//! ```
//!
//! A write commits data and meta in one redb transaction with immediate durability (fsync)
//! before the version is published, so an acknowledged write survives `kill -9`. Space
//! names have no `/`, so `"<space>/"` is a key prefix per space.

use super::core::{ChunkMeta, SpaceMeta};
use redb::ReadableTable;
use std::sync::Arc;

const SPACES: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("spaces");
const CHUNK_META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("chunk_meta");
const CHUNK_DATA: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("chunk_data");

/// A recorded space and its durable chunks' states.
pub type Recorded = (SpaceMeta, Vec<(String, ChunkMeta)>);

/// The spaces' part of the metadata store.
pub struct Durable {
    db: Arc<crate::store::Db>,
}

fn key(space: &str, chunk: &str) -> String {
    format!("{space}/{chunk}")
}

impl Durable {
    /// Open the tables (created when missing).
    pub fn open(db: Arc<crate::store::Db>) -> anyhow::Result<Durable> {
        let w = db.begin_write()?;
        w.open_table(SPACES)?;
        w.open_table(CHUNK_META)?;
        w.open_table(CHUNK_DATA)?;
        w.commit()?;
        Ok(Durable { db })
    }

    /// Record a space. The recorded version reservation never goes down (records made
    /// concurrently may carry an older one).
    pub fn put_space(&self, meta: &SpaceMeta) -> anyhow::Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(SPACES)?;
            let mut meta = meta.clone();
            if let Some(old) = t.get(meta.name.as_str())? {
                if let Ok(old) = serde_json::from_slice::<SpaceMeta>(old.value()) {
                    meta.versions_reserved = meta.versions_reserved.max(old.versions_reserved);
                }
            }
            t.insert(meta.name.as_str(), serde_json::to_vec(&meta)?.as_slice())?;
        }
        w.commit()?;
        Ok(())
    }

    /// A chunk's stored state (valid or not), without its bytes.
    pub fn chunk_meta(&self, space: &str, chunk: &str) -> anyhow::Result<Option<ChunkMeta>> {
        let k = key(space, chunk);
        let r = self.db.begin_read()?;
        let Some(m) = r.open_table(CHUNK_META)?.get(k.as_str())? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(m.value())?))
    }

    /// Store a chunk's published bytes and state (one fsynced transaction).
    pub fn put_chunk(
        &self,
        space: &str,
        chunk: &str,
        meta: &ChunkMeta,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let k = key(space, chunk);
        let w = self.db.begin_write()?;
        w.open_table(CHUNK_DATA)?.insert(k.as_str(), data)?;
        w.open_table(CHUNK_META)?
            .insert(k.as_str(), serde_json::to_vec(meta)?.as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// Record a chunk's state only (invalidation: the bytes are dropped).
    pub fn put_chunk_meta(&self, space: &str, chunk: &str, meta: &ChunkMeta) -> anyhow::Result<()> {
        let k = key(space, chunk);
        let w = self.db.begin_write()?;
        w.open_table(CHUNK_META)?
            .insert(k.as_str(), serde_json::to_vec(meta)?.as_slice())?;
        if !meta.valid {
            w.open_table(CHUNK_DATA)?.remove(k.as_str())?;
        }
        w.commit()?;
        Ok(())
    }

    /// A chunk's stored state and bytes (checked against the stored crc32c).
    pub fn chunk(&self, space: &str, chunk: &str) -> anyhow::Result<Option<(ChunkMeta, Vec<u8>)>> {
        let k = key(space, chunk);
        let r = self.db.begin_read()?;
        let Some(m) = r.open_table(CHUNK_META)?.get(k.as_str())? else {
            return Ok(None);
        };
        let meta: ChunkMeta = serde_json::from_slice(m.value())?;
        if !meta.valid {
            return Ok(None);
        }
        let Some(d) = r.open_table(CHUNK_DATA)?.get(k.as_str())? else {
            anyhow::bail!(
                "chunk {space}/{chunk} v{} has no stored bytes",
                meta.version
            );
        };
        let data = d.value().to_vec();
        anyhow::ensure!(
            data.len() as u64 == meta.len && crc32c::crc32c(&data) == meta.crc,
            "stored bytes of {space}/{chunk} v{} do not match their checksum",
            meta.version
        );
        Ok(Some((meta, data)))
    }

    /// Every recorded space with its durable chunks' states.
    pub fn load(&self) -> anyhow::Result<Vec<Recorded>> {
        let r = self.db.begin_read()?;
        let spaces = r.open_table(SPACES)?;
        let metas = r.open_table(CHUNK_META)?;
        let mut out = Vec::new();
        for item in spaces.iter()? {
            let (k, v) = item?;
            let meta: SpaceMeta = match serde_json::from_slice(v.value()) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(space = k.value(), "unreadable space record: {e}");
                    continue;
                }
            };
            let prefix = format!("{}/", meta.name);
            let mut chunks = Vec::new();
            for item in metas.range(prefix.as_str()..)? {
                let (ck, cv) = item?;
                let Some(name) = ck.value().strip_prefix(&prefix) else {
                    break;
                };
                match serde_json::from_slice::<ChunkMeta>(cv.value()) {
                    Ok(m) => chunks.push((name.to_string(), m)),
                    Err(e) => tracing::error!(chunk = ck.value(), "unreadable chunk record: {e}"),
                }
            }
            out.push((meta, chunks));
        }
        Ok(out)
    }
}
