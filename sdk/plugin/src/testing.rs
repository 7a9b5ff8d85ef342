//! In-memory hosts for native unit tests of plugin logic (`cargo test`, no wasm involved).
//!
//! * [`MemEnv`]: log, clock and key-value store, for every world.
//! * [`MemHost`] (feature `dm-policy`): a [`MemEnv`] plus a small file table that answers the
//!   `dm-host` calls — stat, DM attributes, managed regions, file data for
//!   `read-invis`/`write-invis` and holes — and emulates what the runtime does for
//!   `request-migrate`, `request-recall` and scan actions.
//!
//! ```
//! use strata_plugin_sdk::testing::MemEnv;
//! use strata_plugin_sdk::{Env, LogLevel};
//!
//! let mut env = MemEnv::new();
//! env.info("hello");
//! assert_eq!(env.kv_add("stats.calls", 2).unwrap(), 2);
//! assert!(env.has_log(LogLevel::Info, "hello"));
//! assert_eq!(env.kv_get("stats.calls").unwrap(), b"2");
//! ```

use std::collections::BTreeMap;

use crate::{Env, KvError, LogLevel, Timestamp};

/// The longest key the host accepts (bytes); longer keys are [`KvError::TooLarge`].
pub const KV_MAX_KEY_LEN: usize = 256;

/// An in-memory [`Env`]: records log messages, keeps the key-value store in a `BTreeMap` and
/// has a clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct MemEnv {
    logs: Vec<(LogLevel, String)>,
    kv: BTreeMap<String, Vec<u8>>,
    now: Timestamp,
    monotonic_ns: u64,
    kv_write_failure: Option<KvError>,
    kv_max_value_len: usize,
}

impl Default for MemEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemEnv {
    /// The wall-clock time a new `MemEnv` starts at: 2024-01-01T00:00:00Z.
    pub const START: Timestamp = Timestamp::from_secs(1_704_067_200);

    /// An empty store, no logs, the clock at [`MemEnv::START`].
    pub fn new() -> Self {
        MemEnv {
            logs: Vec::new(),
            kv: BTreeMap::new(),
            now: Self::START,
            monotonic_ns: 0,
            kv_write_failure: None,
            kv_max_value_len: 1 << 20,
        }
    }

    /// Set the wall clock.
    pub fn set_now(&mut self, now: Timestamp) {
        self.now = now;
    }

    /// Move both clocks forward by `secs` seconds.
    pub fn advance(&mut self, secs: u64) {
        self.now.seconds = self
            .now
            .seconds
            .saturating_add(i64::try_from(secs).unwrap_or(i64::MAX));
        self.monotonic_ns = self
            .monotonic_ns
            .saturating_add(secs.saturating_mul(1_000_000_000));
    }

    /// Every message logged so far, oldest first.
    pub fn logs(&self) -> &[(LogLevel, String)] {
        &self.logs
    }

    /// Whether a message at `level` containing `needle` was logged.
    pub fn has_log(&self, level: LogLevel, needle: &str) -> bool {
        self.logs
            .iter()
            .any(|(l, m)| *l == level && m.contains(needle))
    }

    /// Forget the logged messages, returning them.
    pub fn take_logs(&mut self) -> Vec<(LogLevel, String)> {
        std::mem::take(&mut self.logs)
    }

    /// The key-value store.
    pub fn kv(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.kv
    }

    /// Make every later `kv_set`/`kv_delete` fail with `error` (`None`: succeed again).
    pub fn fail_kv_writes(&mut self, error: Option<KvError>) {
        self.kv_write_failure = error;
    }

    /// The largest value `kv_set` accepts (default 1 MiB); larger is [`KvError::TooLarge`].
    pub fn set_kv_max_value_len(&mut self, len: usize) {
        self.kv_max_value_len = len;
    }

    fn check_write(&self, key: &str) -> Result<(), KvError> {
        if let Some(e) = self.kv_write_failure {
            return Err(e);
        }
        if key.len() > KV_MAX_KEY_LEN {
            return Err(KvError::TooLarge);
        }
        Ok(())
    }
}

impl Env for MemEnv {
    fn log(&mut self, level: LogLevel, message: &str) {
        // Shown by the test harness when a test fails.
        eprintln!("[plugin {level}] {message}");
        self.logs.push((level, message.to_owned()));
    }

    fn now(&mut self) -> Timestamp {
        self.now
    }

    fn monotonic_ns(&mut self) -> u64 {
        self.monotonic_ns
    }

    fn kv_get(&mut self, key: &str) -> Option<Vec<u8>> {
        self.kv.get(key).cloned()
    }

    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.check_write(key)?;
        if value.len() > self.kv_max_value_len {
            return Err(KvError::TooLarge);
        }
        self.kv.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn kv_delete(&mut self, key: &str) -> Result<bool, KvError> {
        self.check_write(key)?;
        Ok(self.kv.remove(key).is_some())
    }

    fn kv_keys(&mut self, prefix: &str) -> Vec<String> {
        self.kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(feature = "dm-policy")]
pub use mem_host::{DmOp, DmRequest, MemFile, MemHost};

#[cfg(feature = "dm-policy")]
mod mem_host {
    use std::collections::BTreeMap;

    use super::MemEnv;
    use crate::dm::{
        Action, DmError, DmHost, Extent, ExtentType, FileStat, Region, RegionFlags, ScanAction,
        MIGRATION_ATTR,
    };
    use crate::{attr_name, Env, KvError, LogLevel, Timestamp, DM_ATTR_NAME_SIZE};

    /// `S_IFREG | 0644`: the mode of files made by [`MemHost::add_file`].
    const REGULAR_FILE_MODE: u32 = 0o100_644;
    /// Block size of files made by [`MemHost::add_file`].
    const BLOCK_SIZE: u32 = 4096;

    /// The `dm-host` functions, to inject failures with [`MemHost::fail_on`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    #[allow(missing_docs)]
    pub enum DmOp {
        Stat,
        GetDmattr,
        SetDmattr,
        RemoveDmattr,
        GetRegions,
        SetRegions,
        Allocinfo,
        ProbeHole,
        PunchHole,
        ReadInvis,
        WriteInvis,
        RequestMigrate,
        RequestRecall,
    }

    /// A `request-*` call the plugin made (successful or not), in call order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum DmRequest {
        /// `request-migrate(handle, tier)`.
        Migrate {
            /// The file.
            handle: Vec<u8>,
            /// The tier asked for.
            tier: String,
        },
        /// `request-recall(handle, offset, length)`.
        Recall {
            /// The file.
            handle: Vec<u8>,
            /// Start of the range.
            offset: u64,
            /// Length of the range; 0 = to EOF.
            length: u64,
        },
    }

    /// One file of a [`MemHost`].
    #[derive(Debug, Clone)]
    pub struct MemFile {
        /// Its `dm_stat_t`. Tests may change any field; `size`, `blocks`, `change`, `dtime`,
        /// `has-dm-attributes` and `has-managed-regions` are kept up to date by the host.
        pub stat: FileStat,
        /// The file's bytes as seen by `read-invis` (zeros where punched).
        pub data: Vec<u8>,
        /// DM attributes by (8-byte) name.
        pub attrs: BTreeMap<Vec<u8>, Vec<u8>>,
        /// Managed regions.
        pub regions: Vec<Region>,
        /// The copy a `request-migrate` made on "the tier", used by `request-recall`.
        pub tier_copy: Option<Vec<u8>>,
        /// Non-resident ranges `[start, end)`, sorted and disjoint.
        holes: Vec<(u64, u64)>,
    }

    impl MemFile {
        /// Non-resident byte ranges `[start, end)`, sorted and disjoint.
        pub fn holes(&self) -> &[(u64, u64)] {
            &self.holes
        }

        /// Bytes of the file backed by local storage.
        pub fn resident_bytes(&self) -> u64 {
            let size = self.size();
            let hole_bytes: u64 = self
                .holes
                .iter()
                .map(|&(s, e)| e.min(size).saturating_sub(s.min(size)))
                .sum();
            size - hole_bytes
        }

        /// True when every byte is resident.
        pub fn is_resident(&self) -> bool {
            self.resident_bytes() == self.size()
        }

        fn size(&self) -> u64 {
            self.data.len() as u64
        }

        fn refresh(&mut self) {
            self.stat.size = self.size();
            self.stat.blocks = self.resident_bytes().div_ceil(512);
            self.stat.has_dm_attributes = !self.attrs.is_empty();
            self.stat.has_managed_regions = !self.regions.is_empty();
        }

        fn touch(&mut self) {
            self.stat.change += 1;
            self.refresh();
        }

        fn add_hole(&mut self, start: u64, end: u64) {
            if start >= end {
                return;
            }
            self.remove_hole(start, end);
            self.holes.push((start, end));
            self.holes.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.holes.len());
            for &(s, e) in &self.holes {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            self.holes = merged;
        }

        fn remove_hole(&mut self, start: u64, end: u64) {
            let mut out = Vec::with_capacity(self.holes.len() + 1);
            for &(s, e) in &self.holes {
                if e <= start || s >= end {
                    out.push((s, e));
                    continue;
                }
                if s < start {
                    out.push((s, start));
                }
                if e > end {
                    out.push((end, e));
                }
            }
            self.holes = out;
        }

        /// The extents covering `[offset, size)`.
        fn extents_from(&self, offset: u64) -> Vec<Extent> {
            let size = self.size();
            let mut out = Vec::new();
            let mut pos = offset;
            for &(s, e) in &self.holes {
                let (s, e) = (s.min(size), e.min(size));
                if e <= pos {
                    continue;
                }
                if s > pos {
                    out.push(extent(ExtentType::Res, pos, s));
                }
                out.push(extent(ExtentType::Hole, pos.max(s), e));
                pos = e;
            }
            if pos < size {
                out.push(extent(ExtentType::Res, pos, size));
            }
            out
        }
    }

    fn extent(kind: ExtentType, start: u64, end: u64) -> Extent {
        Extent {
            kind,
            offset: start,
            length: end - start,
        }
    }

    fn range_end(offset: u64, length: u64, size: u64) -> Result<u64, DmError> {
        match length {
            0 => Ok(size.max(offset)),
            n => offset.checked_add(n).ok_or(DmError::Einval),
        }
    }

    /// An in-memory [`DmHost`]: a [`MemEnv`] plus a file table keyed by handle.
    ///
    /// It follows the runtime's conventions where the WIT leaves them to the host:
    /// * `request-migrate` copies the data to [`MemFile::tier_copy`] and sets the
    ///   [`MIGRATION_ATTR`] attribute to the tier name (updating `dtime`);
    /// * `request-recall` restores the range from the tier copy (`enoent` without one);
    /// * [`MemHost::apply`] carries out scan actions the way the runtime does.
    ///
    /// Unknown handles are `ebadf`; attribute names of other than 8 bytes are `einval`; a
    /// missing attribute is `enoent`.
    #[derive(Debug, Clone, Default)]
    pub struct MemHost {
        /// Log, clock and key-value store.
        pub env: MemEnv,
        /// The `request-*` calls made so far.
        pub requests: Vec<DmRequest>,
        files: BTreeMap<Vec<u8>, MemFile>,
        failures: BTreeMap<DmOp, DmError>,
        next_ino: u64,
    }

    impl MemHost {
        /// No files; the clock at [`MemEnv::START`].
        pub fn new() -> Self {
            Self::default()
        }

        /// Add (or replace) a regular, fully resident file with this content. Its times are
        /// all "now"; change them through the returned [`MemFile::stat`].
        pub fn add_file(&mut self, handle: &[u8], data: Vec<u8>) -> &mut MemFile {
            self.next_ino += 1;
            let now = self.env.now();
            let mut file = MemFile {
                stat: FileStat {
                    handle: handle.to_vec(),
                    name: None,
                    path: None,
                    dev: 1,
                    ino: self.next_ino,
                    mode: REGULAR_FILE_MODE,
                    nlink: 1,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    size: 0,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    dtime: Timestamp::EPOCH,
                    blksize: BLOCK_SIZE,
                    blocks: 0,
                    change: 1,
                    event_mask: Vec::new(),
                    has_dm_attributes: false,
                    has_managed_regions: false,
                },
                data,
                attrs: BTreeMap::new(),
                regions: Vec::new(),
                tier_copy: None,
                holes: Vec::new(),
            };
            file.refresh();
            self.files.insert(handle.to_vec(), file);
            self.files.get_mut(handle).expect("just inserted")
        }

        /// The file with this handle.
        pub fn file(&self, handle: &[u8]) -> Option<&MemFile> {
            self.files.get(handle)
        }

        /// The file with this handle, to change it.
        pub fn file_mut(&mut self, handle: &[u8]) -> Option<&mut MemFile> {
            self.files.get_mut(handle)
        }

        /// The stats of all files in handle order: a scan batch.
        pub fn batch(&mut self) -> Vec<FileStat> {
            self.files
                .values_mut()
                .map(|f| {
                    f.refresh();
                    f.stat.clone()
                })
                .collect()
        }

        /// Make every later call of `op` fail with `error`.
        pub fn fail_on(&mut self, op: DmOp, error: DmError) {
            self.failures.insert(op, error);
        }

        /// Undo all [`MemHost::fail_on`].
        pub fn clear_failures(&mut self) {
            self.failures.clear();
        }

        /// Carry out scan decisions as the runtime does: `migrate` = `request-migrate`,
        /// `release` = punch the whole file and set a read/write/truncate managed region,
        /// `recall` = `request-recall` of the whole file and clear the managed regions.
        /// Stops at the first error.
        pub fn apply(&mut self, actions: &[ScanAction]) -> Result<(), DmError> {
            for a in actions {
                match &a.action {
                    Action::Ignore => {}
                    Action::Migrate(tier) => self.request_migrate(&a.handle, tier)?,
                    Action::Release => {
                        self.punch_hole(&a.handle, 0, 0)?;
                        let all = RegionFlags::READ | RegionFlags::WRITE | RegionFlags::TRUNCATE;
                        let region = Region {
                            offset: 0,
                            size: 0,
                            flags: all,
                        };
                        self.set_regions(&a.handle, &[region])?;
                    }
                    Action::Recall => {
                        self.request_recall(&a.handle, 0, 0)?;
                        self.set_regions(&a.handle, &[])?;
                    }
                }
            }
            Ok(())
        }

        fn check(&self, op: DmOp) -> Result<(), DmError> {
            match self.failures.get(&op) {
                Some(e) => Err(*e),
                None => Ok(()),
            }
        }

        fn get(&mut self, op: DmOp, handle: &[u8]) -> Result<&mut MemFile, DmError> {
            self.check(op)?;
            self.files.get_mut(handle).ok_or(DmError::Ebadf)
        }
    }

    fn check_name(name: &[u8]) -> Result<(), DmError> {
        if name.len() == DM_ATTR_NAME_SIZE {
            Ok(())
        } else {
            Err(DmError::Einval)
        }
    }

    impl Env for MemHost {
        fn log(&mut self, level: LogLevel, message: &str) {
            self.env.log(level, message);
        }
        fn now(&mut self) -> Timestamp {
            self.env.now()
        }
        fn monotonic_ns(&mut self) -> u64 {
            self.env.monotonic_ns()
        }
        fn kv_get(&mut self, key: &str) -> Option<Vec<u8>> {
            self.env.kv_get(key)
        }
        fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
            self.env.kv_set(key, value)
        }
        fn kv_delete(&mut self, key: &str) -> Result<bool, KvError> {
            self.env.kv_delete(key)
        }
        fn kv_keys(&mut self, prefix: &str) -> Vec<String> {
            self.env.kv_keys(prefix)
        }
    }

    impl DmHost for MemHost {
        fn stat(&mut self, handle: &[u8]) -> Result<FileStat, DmError> {
            let f = self.get(DmOp::Stat, handle)?;
            f.refresh();
            Ok(f.stat.clone())
        }

        fn get_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, DmError> {
            check_name(name)?;
            let f = self.get(DmOp::GetDmattr, handle)?;
            f.attrs.get(name).cloned().ok_or(DmError::Enoent)
        }

        fn set_dmattr(&mut self, handle: &[u8], name: &[u8], value: &[u8]) -> Result<(), DmError> {
            check_name(name)?;
            let now = self.env.now();
            let f = self.get(DmOp::SetDmattr, handle)?;
            f.attrs.insert(name.to_vec(), value.to_vec());
            f.stat.dtime = now;
            f.touch();
            Ok(())
        }

        fn remove_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<(), DmError> {
            check_name(name)?;
            let now = self.env.now();
            let f = self.get(DmOp::RemoveDmattr, handle)?;
            f.attrs.remove(name).ok_or(DmError::Enoent)?;
            f.stat.dtime = now;
            f.touch();
            Ok(())
        }

        fn get_regions(&mut self, handle: &[u8]) -> Result<Vec<Region>, DmError> {
            Ok(self.get(DmOp::GetRegions, handle)?.regions.clone())
        }

        fn set_regions(&mut self, handle: &[u8], regions: &[Region]) -> Result<bool, DmError> {
            let f = self.get(DmOp::SetRegions, handle)?;
            f.regions = regions.to_vec();
            f.touch();
            Ok(true)
        }

        fn allocinfo(&mut self, handle: &[u8], offset: u64) -> Result<Vec<Extent>, DmError> {
            let f = self.get(DmOp::Allocinfo, handle)?;
            Ok(f.extents_from(offset))
        }

        fn probe_hole(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<(u64, u64), DmError> {
            let f = self.get(DmOp::ProbeHole, handle)?;
            let block = u64::from(f.stat.blksize.max(1));
            let size = f.size();
            if offset >= size {
                return Err(DmError::Einval);
            }
            let start = offset.div_ceil(block) * block;
            if length == 0 {
                return Ok((start, 0));
            }
            let end = offset.checked_add(length).ok_or(DmError::Einval)?;
            let end = if end >= size {
                end
            } else {
                end / block * block
            };
            if end <= start {
                return Err(DmError::Einval);
            }
            Ok((start, end - start))
        }

        fn punch_hole(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<(), DmError> {
            let f = self.get(DmOp::PunchHole, handle)?;
            let block = u64::from(f.stat.blksize.max(1));
            let size = f.size();
            let end = range_end(offset, length, size)?;
            let aligned_end = length == 0 || end >= size || end.is_multiple_of(block);
            if !offset.is_multiple_of(block) || !aligned_end {
                return Err(DmError::Einval);
            }
            let end = end.min(size);
            if offset < end {
                // Both bounds are below `data.len()`, so they fit in usize.
                f.data[offset as usize..end as usize].fill(0);
                f.add_hole(offset, end);
            }
            f.touch();
            Ok(())
        }

        fn read_invis(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<Vec<u8>, DmError> {
            let f = self.get(DmOp::ReadInvis, handle)?;
            let size = f.size();
            let start = offset.min(size);
            let end = offset.saturating_add(length).min(size);
            Ok(f.data[start as usize..end as usize].to_vec())
        }

        fn write_invis(
            &mut self,
            handle: &[u8],
            offset: u64,
            data: &[u8],
            _sync: bool,
        ) -> Result<u64, DmError> {
            let f = self.get(DmOp::WriteInvis, handle)?;
            let start = usize::try_from(offset).map_err(|_| DmError::Einval)?;
            let end = start.checked_add(data.len()).ok_or(DmError::Einval)?;
            if end > f.data.len() {
                f.data.resize(end, 0);
            }
            f.data[start..end].copy_from_slice(data);
            f.remove_hole(offset, end as u64);
            f.touch();
            Ok(data.len() as u64)
        }

        fn request_migrate(&mut self, handle: &[u8], tier: &str) -> Result<(), DmError> {
            self.requests.push(DmRequest::Migrate {
                handle: handle.to_vec(),
                tier: tier.to_owned(),
            });
            let now = self.env.now();
            let f = self.get(DmOp::RequestMigrate, handle)?;
            // The logical content: resident bytes, the rest from an earlier tier copy.
            let mut content = f.data.clone();
            if let Some(old) = &f.tier_copy {
                for &(s, e) in &f.holes {
                    for i in s..e.min(content.len() as u64) {
                        content[i as usize] = old.get(i as usize).copied().unwrap_or(0);
                    }
                }
            }
            f.tier_copy = Some(content);
            let name = attr_name(MIGRATION_ATTR).expect("valid attribute name");
            f.attrs.insert(name, tier.as_bytes().to_vec());
            f.stat.dtime = now;
            f.touch();
            Ok(())
        }

        fn request_recall(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<(), DmError> {
            self.requests.push(DmRequest::Recall {
                handle: handle.to_vec(),
                offset,
                length,
            });
            let f = self.get(DmOp::RequestRecall, handle)?;
            let Some(copy) = f.tier_copy.clone() else {
                return Err(DmError::Enoent);
            };
            let size = f.size();
            let end = range_end(offset, length, size)?.min(size);
            let holes: Vec<(u64, u64)> = f.holes.clone();
            for (s, e) in holes {
                let (s, e) = (s.max(offset), e.min(end));
                for i in s..e {
                    f.data[i as usize] = copy.get(i as usize).copied().unwrap_or(0);
                }
            }
            f.remove_hole(offset, end);
            f.touch();
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const H: &[u8] = b"file-1";

        fn host_with_file(len: usize) -> MemHost {
            let mut host = MemHost::new();
            host.add_file(H, (0..len).map(|i| (i % 251) as u8).collect());
            host
        }

        #[test]
        fn stat_and_unknown_handles() {
            let mut host = host_with_file(10_000);
            let st = host.stat(H).unwrap();
            assert_eq!(st.size, 10_000);
            assert_eq!(st.blocks, 20);
            assert_eq!(st.mtime, MemEnv::START);
            assert_eq!(host.stat(b"nope"), Err(DmError::Ebadf));
            host.fail_on(DmOp::Stat, DmError::Eio);
            assert_eq!(host.stat(H), Err(DmError::Eio));
            host.clear_failures();
            assert!(host.stat(H).is_ok());
        }

        #[test]
        fn dm_attributes() {
            let mut host = host_with_file(1);
            let name = attr_name("x").unwrap();
            assert_eq!(host.get_dmattr(H, &name), Err(DmError::Enoent));
            assert_eq!(host.get_dmattr(H, b"x"), Err(DmError::Einval));
            host.env.advance(5);
            host.set_dmattr(H, &name, b"v").unwrap();
            assert_eq!(host.get_dmattr(H, &name).unwrap(), b"v");
            let st = host.stat(H).unwrap();
            assert!(st.has_dm_attributes);
            assert_eq!(st.dtime.secs_since(MemEnv::START), 5);
            host.remove_dmattr(H, &name).unwrap();
            assert_eq!(host.remove_dmattr(H, &name), Err(DmError::Enoent));
            assert!(!host.stat(H).unwrap().has_dm_attributes);
        }

        #[test]
        fn holes_read_as_zeros_and_show_in_allocinfo() {
            let mut host = host_with_file(3 * 4096 + 100);
            assert_eq!(host.probe_hole(H, 1, 3 * 4096).unwrap(), (4096, 8192));
            assert_eq!(host.probe_hole(H, 1, 0).unwrap(), (4096, 0));
            assert_eq!(host.probe_hole(H, 1, 10), Err(DmError::Einval));
            assert_eq!(host.punch_hole(H, 1, 4096), Err(DmError::Einval));
            host.punch_hole(H, 4096, 4096).unwrap();
            assert_eq!(
                host.read_invis(H, 4095, 3).unwrap(),
                [(4095 % 251) as u8, 0, 0]
            );
            let ext = host.allocinfo(H, 0).unwrap();
            let kinds: Vec<_> = ext.iter().map(|e| (e.kind, e.offset, e.length)).collect();
            assert_eq!(
                kinds,
                [
                    (ExtentType::Res, 0, 4096),
                    (ExtentType::Hole, 4096, 4096),
                    (ExtentType::Res, 8192, 4196),
                ]
            );
            assert_eq!(
                host.stat(H).unwrap().blocks,
                (3 * 4096 + 100 - 4096) / 512 + 1
            );
            // Writing fills the hole back in.
            assert_eq!(host.write_invis(H, 4096, &[7; 4096], true).unwrap(), 4096);
            assert!(host.file(H).unwrap().is_resident());
            // Punch to EOF keeps the size.
            host.punch_hole(H, 0, 0).unwrap();
            assert_eq!(host.stat(H).unwrap().size, 3 * 4096 + 100);
            assert_eq!(host.stat(H).unwrap().blocks, 0);
        }

        #[test]
        fn migrate_release_recall_round_trip() {
            let mut host = host_with_file(9000);
            let original = host.file(H).unwrap().data.clone();
            let h = H.to_vec();
            let act = |action| ScanAction {
                handle: h.clone(),
                action,
            };
            host.apply(&[act(Action::Migrate("tape".into()))]).unwrap();
            let loc = host.get_dmattr(H, &attr_name(MIGRATION_ATTR).unwrap());
            assert_eq!(loc.unwrap(), b"tape");
            host.apply(&[act(Action::Release)]).unwrap();
            assert_eq!(host.stat(H).unwrap().blocks, 0);
            assert!(host.stat(H).unwrap().has_managed_regions);
            assert!(host.read_invis(H, 0, 9000).unwrap().iter().all(|b| *b == 0));
            host.request_recall(H, 0, 0).unwrap();
            assert_eq!(host.read_invis(H, 0, 9000).unwrap(), original);
            assert_eq!(host.requests.len(), 2);
            assert_eq!(host.request_recall(b"nope", 0, 0), Err(DmError::Ebadf));
        }

        #[test]
        fn recall_without_tier_copy_is_enoent() {
            let mut host = host_with_file(10);
            assert_eq!(host.request_recall(H, 0, 0), Err(DmError::Enoent));
        }
    }
}
