//! Where spaces and durable chunks live on disk: tables of the daemon's `meta.redb`.
//!
//! ```text
//! spaces      name                 -> JSON SpaceMeta
//! chunk_meta  "<space>/<chunk>"    -> JSON ChunkMeta   (durable spaces only)
//! chunk_data  "<space>/<chunk>"    -> bytes of the published version
//! ```
//!
//! What the spaces layer persists goes through a [`Storage`] (redb's tables above, or
//! [`MemStorage`] in tests) by group commit ([`Durable::persist`]): every record waiting
//! when a commit begins goes into that one transaction, committed with immediate
//! durability (one fsync), and each waiter hears the outcome only then. A write's data and
//! meta are in one transaction, so an acknowledged write survives `kill -9`; a failed
//! commit fails every request of its batch. Space names have no `/`, so `"<space>/"` is a
//! key prefix per space.

use super::core::{ChunkMeta, SpaceMeta};
use redb::ReadableTable;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

const SPACES: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("spaces");
const CHUNK_META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("chunk_meta");
const CHUNK_DATA: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("chunk_data");

/// A recorded space and its durable chunks' states.
pub type Recorded = (SpaceMeta, Vec<(String, ChunkMeta)>);

/// One thing to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A space's record. The recorded version reservation never goes down (records made
    /// concurrently may carry an older one).
    Space(SpaceMeta),
    /// A chunk's state, with the bytes of its published version (`data`), or without them
    /// (an invalid chunk's stored bytes are dropped).
    Chunk {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// State.
        meta: ChunkMeta,
        /// Bytes of the version `meta` describes.
        data: Option<Vec<u8>>,
    },
}

/// Where the spaces layer keeps spaces records, chunk states and chunk bytes.
pub trait Storage: Send + Sync {
    /// Persist `batch` in order, atomically (all or nothing) and durably: when this
    /// returns `Ok`, every record survives a crash.
    fn commit(&self, batch: &[Record]) -> anyhow::Result<()>;
    /// A chunk's stored state (valid or not) and its stored bytes, if any, unchecked.
    fn chunk(
        &self,
        space: &str,
        chunk: &str,
    ) -> anyhow::Result<Option<(ChunkMeta, Option<Vec<u8>>)>>;
    /// Every recorded space with its durable chunks' states.
    fn load(&self) -> anyhow::Result<Vec<Recorded>>;
}

fn key(space: &str, chunk: &str) -> String {
    format!("{space}/{chunk}")
}

/// The redb backend: tables of the daemon's `meta.redb`.
pub struct RedbStorage {
    db: Arc<crate::store::Db>,
}

impl RedbStorage {
    /// Open the tables (created when missing).
    pub fn open(db: Arc<crate::store::Db>) -> anyhow::Result<RedbStorage> {
        let w = db.begin_write()?;
        w.open_table(SPACES)?;
        w.open_table(CHUNK_META)?;
        w.open_table(CHUNK_DATA)?;
        w.commit()?;
        Ok(RedbStorage { db })
    }
}

impl Storage for RedbStorage {
    fn commit(&self, batch: &[Record]) -> anyhow::Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut spaces = w.open_table(SPACES)?;
            let mut metas = w.open_table(CHUNK_META)?;
            let mut datas = w.open_table(CHUNK_DATA)?;
            for r in batch {
                match r {
                    Record::Space(meta) => {
                        let mut meta = meta.clone();
                        if let Some(old) = spaces.get(meta.name.as_str())? {
                            if let Ok(old) = serde_json::from_slice::<SpaceMeta>(old.value()) {
                                meta.versions_reserved =
                                    meta.versions_reserved.max(old.versions_reserved);
                            }
                        }
                        spaces.insert(meta.name.as_str(), serde_json::to_vec(&meta)?.as_slice())?;
                    }
                    Record::Chunk {
                        space,
                        chunk,
                        meta,
                        data,
                    } => {
                        let k = key(space, chunk);
                        match data {
                            Some(d) => {
                                datas.insert(k.as_str(), d.as_slice())?;
                            }
                            None if !meta.valid => {
                                datas.remove(k.as_str())?;
                            }
                            None => {}
                        }
                        metas.insert(k.as_str(), serde_json::to_vec(meta)?.as_slice())?;
                    }
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    fn chunk(
        &self,
        space: &str,
        chunk: &str,
    ) -> anyhow::Result<Option<(ChunkMeta, Option<Vec<u8>>)>> {
        let k = key(space, chunk);
        let r = self.db.begin_read()?;
        let Some(m) = r.open_table(CHUNK_META)?.get(k.as_str())? else {
            return Ok(None);
        };
        let meta: ChunkMeta = serde_json::from_slice(m.value())?;
        if !meta.valid {
            return Ok(Some((meta, None)));
        }
        let data = r
            .open_table(CHUNK_DATA)?
            .get(k.as_str())?
            .map(|d| d.value().to_vec());
        Ok(Some((meta, data)))
    }

    fn load(&self) -> anyhow::Result<Vec<Recorded>> {
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

/// What a [`MemStorage`] holds: what a restart would find.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemState {
    /// Space records.
    pub spaces: BTreeMap<String, SpaceMeta>,
    /// Chunk states by `"<space>/<chunk>"`.
    pub metas: BTreeMap<String, ChunkMeta>,
    /// Chunk bytes by `"<space>/<chunk>"`.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl MemState {
    fn apply(&mut self, r: &Record) {
        match r {
            Record::Space(meta) => {
                let mut meta = meta.clone();
                if let Some(old) = self.spaces.get(&meta.name) {
                    meta.versions_reserved = meta.versions_reserved.max(old.versions_reserved);
                }
                self.spaces.insert(meta.name.clone(), meta);
            }
            Record::Chunk {
                space,
                chunk,
                meta,
                data,
            } => {
                let k = key(space, chunk);
                match data {
                    Some(d) => {
                        self.data.insert(k.clone(), d.clone());
                    }
                    None if !meta.valid => {
                        self.data.remove(&k);
                    }
                    None => {}
                }
                self.metas.insert(k, *meta);
            }
        }
    }
}

#[derive(Default)]
struct MemInner {
    state: MemState,
    /// Commits asked for so far (the failed ones too).
    writes: u64,
    fail_at: std::collections::BTreeSet<u64>,
    crash_at: Option<u64>,
    crashed: bool,
}

/// An in-memory [`Storage`] for tests, which can be told to fail at the Nth commit (that
/// one only: the next ones go through) or to "crash" there (it and every later commit are dropped: what was
/// committed before is what a restart finds, see [`MemStorage::committed`]).
#[derive(Default)]
pub struct MemStorage {
    inner: Mutex<MemInner>,
}

impl MemStorage {
    /// Empty.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Holding `state` (a restart after [`MemStorage::committed`]).
    pub fn with_state(state: MemState) -> MemStorage {
        MemStorage {
            inner: Mutex::new(MemInner {
                state,
                ..MemInner::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `n`th commit (counting from 1 since creation) fails, changing nothing (as do
    /// those set to fail before).
    pub fn fail_at(&self, n: u64) {
        self.lock().fail_at.insert(n);
    }

    /// The `n`th commit and every later one are dropped (they fail).
    pub fn crash_at(&self, n: u64) {
        self.lock().crash_at = Some(n);
    }

    /// No more injected failures (a crash stays).
    pub fn clear_faults(&self) {
        self.lock().fail_at.clear();
    }

    /// Commits asked for so far.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// What is committed.
    pub fn committed(&self) -> MemState {
        self.lock().state.clone()
    }
}

impl Storage for MemStorage {
    fn commit(&self, batch: &[Record]) -> anyhow::Result<()> {
        let mut g = self.lock();
        g.writes += 1;
        let n = g.writes;
        if g.crash_at == Some(n) {
            g.crashed = true;
        }
        anyhow::ensure!(!g.crashed, "injected crash (commit {n} dropped)");
        anyhow::ensure!(!g.fail_at.contains(&n), "injected failure (commit {n})");
        let mut next = g.state.clone();
        for r in batch {
            next.apply(r);
        }
        g.state = next;
        Ok(())
    }

    fn chunk(
        &self,
        space: &str,
        chunk: &str,
    ) -> anyhow::Result<Option<(ChunkMeta, Option<Vec<u8>>)>> {
        let g = self.lock();
        let k = key(space, chunk);
        Ok(g.state
            .metas
            .get(&k)
            .map(|m| (*m, g.state.data.get(&k).cloned())))
    }

    fn load(&self) -> anyhow::Result<Vec<Recorded>> {
        let g = self.lock();
        Ok(g.state
            .spaces
            .values()
            .map(|meta| {
                let prefix = format!("{}/", meta.name);
                let chunks = g
                    .state
                    .metas
                    .range(prefix.clone()..)
                    .map_while(|(k, m)| Some((k.strip_prefix(&prefix)?.to_string(), *m)))
                    .collect();
                (meta.clone(), chunks)
            })
            .collect())
    }
}

/// Records waiting for the next commit, and the outcomes of finished ones.
#[derive(Default)]
struct Group {
    /// Submissions not yet taken by a commit, in order.
    pending: Vec<(u64, Vec<Record>)>,
    next_ticket: u64,
    /// Whether a submitter is committing a batch now (the others wait).
    committing: bool,
    /// Outcomes not yet picked up by their submitters.
    done: HashMap<u64, Result<(), Arc<String>>>,
    /// Submissions in the last commit, and how long it took.
    last: (usize, std::time::Duration),
}

/// The longest a committer waits for the writers of the last batch to come back.
const GATHER_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// The spaces' part of the store: a [`Storage`] written by group commit.
pub struct Durable {
    storage: Arc<dyn Storage>,
    group: Mutex<Group>,
    finished: Condvar,
    /// A submission arrived (for a committer gathering its batch).
    arrived: Condvar,
    batches: AtomicU64,
    records: AtomicU64,
}

/// Ends a batch even if the storage panics: its submitters hear of a failure and the next
/// submitter may commit.
struct Committing<'a> {
    durable: &'a Durable,
    tickets: Vec<u64>,
    outcome: Option<Result<(), Arc<String>>>,
    /// How long the commit took.
    took: std::time::Duration,
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err(Arc::new("the store's commit panicked".into())));
        let mut g = self.durable.lock();
        g.committing = false;
        g.last = (self.tickets.len(), self.took);
        for t in self.tickets.drain(..) {
            g.done.insert(t, outcome.clone());
        }
        drop(g);
        self.durable.finished.notify_all();
    }
}

impl Durable {
    /// Open the tables of `db` (created when missing).
    pub fn open(db: Arc<crate::store::Db>) -> anyhow::Result<Durable> {
        Ok(Durable::new(Arc::new(RedbStorage::open(db)?)))
    }

    /// Over any storage.
    pub fn new(storage: Arc<dyn Storage>) -> Durable {
        Durable {
            storage,
            group: Mutex::default(),
            finished: Condvar::new(),
            arrived: Condvar::new(),
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persist `records` (in order, all or none) and return once they are on disk, or
    /// failed to get there. For callers holding the spaces' lock (no gathering, see
    /// [`Durable::persist_gathering`]).
    pub fn persist(&self, records: Vec<Record>) -> anyhow::Result<()> {
        self.submit(records, false)
    }

    /// [`Durable::persist`] for a caller that holds no lock the other writers need: if
    /// it commits, it first waits a little (at most half the last commit's time, and
    /// [`GATHER_MAX`]) until as many submissions as the last batch had are there. Writers
    /// in a loop come back one after the other once their batch is done; without this the
    /// first one back would commit alone and the batches would alternate 1, n-1, 1, ...
    pub fn persist_gathering(&self, records: Vec<Record>) -> anyhow::Result<()> {
        self.submit(records, true)
    }
    ///
    /// Group commit: a submitter that finds no commit under way commits everything
    /// pending (its own records and those of every submitter waiting) in one transaction,
    /// then hands each submitter its outcome; the others wait meanwhile, and whoever still
    /// waits for a commit when it ends takes the next batch. Submissions are committed in
    /// the order they were made (a batch holds everything submitted before it began and
    /// nothing after), and a failed commit fails every submission of its batch.
    fn submit(&self, records: Vec<Record>, gather: bool) -> anyhow::Result<()> {
        let mut g = self.lock();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.pending.push((ticket, records));
        self.arrived.notify_one();
        loop {
            if let Some(outcome) = g.done.remove(&ticket) {
                return outcome.map_err(|e| anyhow::anyhow!("{e}"));
            }
            if g.committing {
                g = self.finished.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            g.committing = true;
            if gather {
                let (want, took) = g.last;
                let until = std::time::Instant::now() + (took / 2).min(GATHER_MAX);
                while g.pending.len() < want {
                    let now = std::time::Instant::now();
                    if now >= until {
                        break;
                    }
                    g = self
                        .arrived
                        .wait_timeout(g, until - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            let taken = std::mem::take(&mut g.pending);
            drop(g);
            let mut batch = Vec::new();
            let mut run = Committing {
                durable: self,
                tickets: Vec::with_capacity(taken.len()),
                outcome: None,
                took: std::time::Duration::ZERO,
            };
            for (t, rs) in taken {
                run.tickets.push(t);
                batch.extend(rs);
            }
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.records
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let t = std::time::Instant::now();
            run.outcome = Some(
                self.storage
                    .commit(&batch)
                    .map_err(|e| Arc::new(format!("{e:#}"))),
            );
            run.took = t.elapsed();
            metrics::histogram!("strata_durable_commit_seconds").record(run.took.as_secs_f64());
            metrics::histogram!("strata_durable_commit_records").record(batch.len() as f64);
            drop(run);
            g = self.lock();
        }
    }

    /// Commits made so far and the records they held.
    pub fn commits(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.records.load(Ordering::Relaxed),
        )
    }

    /// Record a space.
    pub fn put_space(&self, meta: &SpaceMeta) -> anyhow::Result<()> {
        self.persist(vec![Record::Space(meta.clone())])
    }

    /// Store a chunk's published bytes and state (a write, outside the spaces' lock:
    /// gathering).
    pub fn put_chunk(
        &self,
        space: &str,
        chunk: &str,
        meta: &ChunkMeta,
        data: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.persist_gathering(vec![Record::Chunk {
            space: space.into(),
            chunk: chunk.into(),
            meta: *meta,
            data: Some(data),
        }])
    }

    /// Record a chunk's state only (invalidation: the bytes are dropped).
    pub fn put_chunk_meta(&self, space: &str, chunk: &str, meta: &ChunkMeta) -> anyhow::Result<()> {
        self.persist(vec![Record::Chunk {
            space: space.into(),
            chunk: chunk.into(),
            meta: *meta,
            data: None,
        }])
    }

    /// A chunk's stored state (valid or not), without its bytes.
    pub fn chunk_meta(&self, space: &str, chunk: &str) -> anyhow::Result<Option<ChunkMeta>> {
        Ok(self.storage.chunk(space, chunk)?.map(|(m, _)| m))
    }

    /// A chunk's stored state and bytes (checked against the stored crc32c).
    pub fn chunk(&self, space: &str, chunk: &str) -> anyhow::Result<Option<(ChunkMeta, Vec<u8>)>> {
        let Some((meta, data)) = self.storage.chunk(space, chunk)? else {
            return Ok(None);
        };
        if !meta.valid {
            return Ok(None);
        }
        let Some(data) = data else {
            anyhow::bail!(
                "chunk {space}/{chunk} v{} has no stored bytes",
                meta.version
            );
        };
        anyhow::ensure!(
            data.len() as u64 == meta.len && crc32c::crc32c(&data) == meta.crc,
            "stored bytes of {space}/{chunk} v{} do not match their checksum",
            meta.version
        );
        Ok(Some((meta, data)))
    }

    /// Every recorded space with its durable chunks' states.
    pub fn load(&self) -> anyhow::Result<Vec<Recorded>> {
        self.storage.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Writers of 4 KiB chunk records to a redb store: (records per second, records per
    /// commit).
    fn redb_writers(writers: usize, each: usize) -> (f64, f64) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::store::Db::open(&dir.path().join("meta.redb")).unwrap());
        let d = Durable::open(db).unwrap();
        let data = vec![7u8; 4096];
        let meta = ChunkMeta {
            version: 1,
            valid: true,
            len: 4096,
            crc: crc32c::crc32c(&data),
        };
        let t = Instant::now();
        std::thread::scope(|s| {
            for w in 0..writers {
                let (d, data) = (&d, &data);
                s.spawn(move || {
                    for _ in 0..each {
                        d.put_chunk("s", &format!("c{w}"), &meta, data.clone())
                            .unwrap();
                    }
                });
            }
        });
        let (batches, records) = d.commits();
        (
            (writers * each) as f64 / t.elapsed().as_secs_f64(),
            records as f64 / batches as f64,
        )
    }

    #[test]
    fn concurrent_writers_share_redb_commits() {
        let (one, per1) = redb_writers(1, 40);
        let (eight, per8) = redb_writers(8, 40);
        eprintln!(
            "redb, 4 KiB records: 1 writer {one:.0}/s ({per1:.1} per commit), 8 writers {eight:.0}/s ({per8:.1} per commit): {:.2}x",
            eight / one
        );
        assert_eq!(per1, 1.0);
        assert!(per8 > 1.5, "8 writers, {per8:.1} records per commit");
    }
}
