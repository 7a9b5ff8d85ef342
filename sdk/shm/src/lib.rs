//! The shared-memory chunk cache: one region per space, a memfd the daemon owns and lends
//! read-only to local clients over the socket, who read it without a round trip (format
//! in `docs/spaces.md`).
//!
//! All integers are little-endian.
//!
//! ```text
//! header (4096 bytes)
//!   0  magic "STRATSHM"          8  format u32 (= 1)     12 header crc32c u32 (of 16..64)
//!   16 slot_size u64             24 slot_count u32       28 index_entries u32
//!   32 index_offset u64          40 data_offset u64      48 generation u64
//!   64 state u64 (1 live, 2 retired: the daemon replaced or dropped the region)
//! index: index_entries x 384-byte entries, an open-addressing hash table on
//!        FNV-1a-64(name) % index_entries with linear probing
//!   0  seq u64 (sequence lock: odd while the daemon changes the entry)
//!   8  state u32 (0 empty, 1 live, 2 removed)   12 name_len u32   16 name [255]
//!   272 version u64   280 slot u32   284 data crc32c u32   288 len u64
//!   296 entry crc32c u32 (of bytes 8..296)
//! data: slot_count x slot_size bytes at data_offset (page aligned)
//! ```
//!
//! A reader loads `seq` (retries while odd), copies the entry, copies the slot's bytes,
//! then loads `seq` again: unchanged means nothing it copied was being written (the daemon
//! bumps the entry's `seq` before a slot it pointed to can be reused), so a torn chunk is
//! never returned. The entry crc catches a corrupted index; the data crc (optional on the
//! hit path, see [`Reader::lookup_into`]) a corrupted slot.
#![warn(missing_docs)]

// The only mapping `unsafe` of the project (see each block's safety argument).
#[allow(unsafe_code)]
pub mod raw;

use raw::Mapping;
use std::fs::File;
use std::sync::atomic::{fence, Ordering};

/// "STRATSHM".
pub const MAGIC: &[u8; 8] = b"STRATSHM";
/// Format version.
pub const FORMAT: u32 = 1;
/// Header bytes.
pub const HEADER_SIZE: u64 = 4096;
/// Index entry bytes.
pub const ENTRY_SIZE: u64 = 384;
const STATE_OFF: usize = 64;
const LIVE: u64 = 1;
const RETIRED: u64 = 2;
const E_EMPTY: u32 = 0;
const E_LIVE: u32 = 1;
const E_REMOVED: u32 = 2;
/// Bytes 8..300 of an entry: everything but the sequence word and padding.
const E_BODY: usize = 292;

/// Region geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per slot (a multiple of 4096).
    pub slot_size: u64,
    /// Number of slots.
    pub slot_count: u32,
    /// Number of index entries.
    pub index_entries: u32,
}

impl Geometry {
    /// The geometry for `slot_count` slots of `slot_size` (index twice the slot count).
    pub fn new(slot_size: u64, slot_count: u32) -> Geometry {
        Geometry {
            slot_size,
            slot_count,
            index_entries: slot_count.saturating_mul(2).max(8),
        }
    }
    /// Offset of the index.
    pub fn index_offset(&self) -> u64 {
        HEADER_SIZE
    }
    /// Offset of the first slot.
    pub fn data_offset(&self) -> u64 {
        (HEADER_SIZE + self.index_entries as u64 * ENTRY_SIZE).div_ceil(4096) * 4096
    }
    /// File size.
    pub fn file_size(&self) -> u64 {
        self.data_offset() + self.slot_count as u64 * self.slot_size
    }
    /// Offset of a slot.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_offset() + slot as u64 * self.slot_size
    }
    fn entry_offset(&self, i: u32) -> usize {
        (self.index_offset() + i as u64 * ENTRY_SIZE) as usize
    }
}

/// FNV-1a 64 of a chunk name: where its probe sequence starts.
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What an index entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryValue {
    /// Chunk name.
    pub name: String,
    /// Published version.
    pub version: u64,
    /// Slot holding the data.
    pub slot: u32,
    /// Bytes.
    pub len: u64,
    /// crc32c of the data.
    pub crc: u32,
}

fn encode_entry(state: u32, v: Option<&EntryValue>) -> [u8; E_BODY] {
    let mut b = [0u8; E_BODY];
    b[0..4].copy_from_slice(&state.to_le_bytes());
    if let Some(v) = v {
        let n = v.name.as_bytes();
        let n = &n[..n.len().min(255)];
        b[4..8].copy_from_slice(&(n.len() as u32).to_le_bytes());
        b[8..8 + n.len()].copy_from_slice(n);
        b[264..272].copy_from_slice(&v.version.to_le_bytes());
        b[272..276].copy_from_slice(&v.slot.to_le_bytes());
        b[276..280].copy_from_slice(&v.crc.to_le_bytes());
        b[280..288].copy_from_slice(&v.len.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..288]);
    b[288..292].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

enum Decoded<'a> {
    Empty,
    Removed,
    Live {
        name: &'a [u8],
        version: u64,
        slot: u32,
        crc: u32,
        len: u64,
    },
}

fn decode_entry(b: &[u8; E_BODY]) -> Result<Decoded<'_>, CacheError> {
    // a fresh (all-zero) entry is empty; at worst a zeroed entry costs a miss
    if b.iter().all(|&x| x == 0) {
        return Ok(Decoded::Empty);
    }
    if crc32c::crc32c(&b[..288]) != u32_at(b, 288) {
        return Err(CacheError::Corrupted(
            "index entry checksum mismatch".into(),
        ));
    }
    match u32_at(b, 0) {
        E_EMPTY => Ok(Decoded::Empty),
        E_REMOVED => Ok(Decoded::Removed),
        E_LIVE => {
            let nl = u32_at(b, 4) as usize;
            if nl == 0 || nl > 255 {
                return Err(CacheError::Corrupted("index entry name length".into()));
            }
            Ok(Decoded::Live {
                name: &b[8..8 + nl],
                version: u64_at(b, 264),
                slot: u32_at(b, 272),
                crc: u32_at(b, 276),
                len: u64_at(b, 280),
            })
        }
        s => Err(CacheError::Corrupted(format!("index entry state {s}"))),
    }
}

fn encode_header(geo: &Geometry, generation: u64) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[16..24].copy_from_slice(&geo.slot_size.to_le_bytes());
    h[24..28].copy_from_slice(&geo.slot_count.to_le_bytes());
    h[28..32].copy_from_slice(&geo.index_entries.to_le_bytes());
    h[32..40].copy_from_slice(&geo.index_offset().to_le_bytes());
    h[40..48].copy_from_slice(&geo.data_offset().to_le_bytes());
    h[48..56].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&h[16..64]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn decode_header(h: &[u8; 64], file_len: u64) -> Result<(Geometry, u64), CacheError> {
    let bad = |m: &str| Err(CacheError::Corrupted(format!("region header: {m}")));
    if &h[0..8] != MAGIC {
        return bad("bad magic");
    }
    if u32_at(h, 8) != FORMAT {
        return bad(&format!(
            "format {} (this client reads {FORMAT})",
            u32_at(h, 8)
        ));
    }
    if crc32c::crc32c(&h[16..64]) != u32_at(h, 12) {
        return bad("checksum mismatch");
    }
    let geo = Geometry {
        slot_size: u64_at(h, 16),
        slot_count: u32_at(h, 24),
        index_entries: u32_at(h, 28),
    };
    if geo.slot_size == 0
        || !geo.slot_size.is_multiple_of(4096)
        || geo.index_entries == 0
        || u64_at(h, 32) != geo.index_offset()
        || u64_at(h, 40) != geo.data_offset()
        || geo
            .slot_size
            .checked_mul(geo.slot_count as u64)
            .and_then(|d| d.checked_add(geo.data_offset()))
            != Some(file_len)
    {
        return bad("geometry does not match the file");
    }
    Ok((geo, u64_at(h, 48)))
}

/// Errors reading the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The region could not be mapped.
    #[error("cannot map {path}: {source}")]
    Io {
        /// Region path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon replaced or dropped this region: open the current one.
    #[error("the cache region was retired by the daemon")]
    Retired,
    /// Something in the region does not check out.
    #[error("corrupted chunk cache: {0}")]
    Corrupted(String),
}

/// A hit's version.
pub type Version = u64;

/// A client's read-only view of a space's region.
pub struct Reader {
    map: Mapping,
    geo: Geometry,
    generation: u64,
}

const SEQ_TRIES: u32 = 64;

impl Reader {
    /// Map a region lent by the daemon (GETCHUNKCACHE_OK's descriptor) read-only and check
    /// its header. It must be sealed against shrinking: otherwise another process could
    /// make this one's reads fault.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Reader, CacheError> {
        let io = |source| CacheError::Io {
            path: "the lent region".into(),
            source,
        };
        let s = seals(&fd).map_err(io)?;
        if !s.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(io(std::io::Error::other(
                "the region is not sealed against shrinking",
            )));
        }
        let file = File::from(fd);
        let map = Mapping::read_only(&file).map_err(io)?;
        let mut h = [0u8; 64];
        if !map.read(0, &mut h) {
            return Err(CacheError::Corrupted(
                "region shorter than its header".into(),
            ));
        }
        if h == [0u8; 64] {
            // punched out: the daemon let go of it after lending it
            return Err(CacheError::Retired);
        }
        let (geo, generation) = decode_header(&h, map.len() as u64)?;
        let r = Reader {
            map,
            geo,
            generation,
        };
        r.check_live()?;
        Ok(r)
    }

    /// The region's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// The region's generation (new each time the daemon creates the region).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn check_live(&self) -> Result<(), CacheError> {
        match self.map.load_u64(STATE_OFF) {
            Some(LIVE) => Ok(()),
            // zero: the daemon let go of the region and freed its memory
            Some(RETIRED) | Some(0) => Err(CacheError::Retired),
            _ => Err(CacheError::Corrupted("region state word".into())),
        }
    }

    /// Look `name` up; on a hit copy its bytes into `buf` (resized to the chunk's length)
    /// and return the version. `Ok(None)` is a miss (not cached, or the daemon kept
    /// changing it): ask the daemon. With `verify_data` the bytes' crc32c is checked too
    /// (costs a pass over the data; the entry checksum and the sequence lock are always
    /// checked).
    pub fn lookup_into(
        &self,
        name: &str,
        buf: &mut Vec<u8>,
        verify_data: bool,
    ) -> Result<Option<Version>, CacheError> {
        self.check_live()?;
        let n = self.geo.index_entries;
        let start = (name_hash(name) % n as u64) as u32;
        let mut body = [0u8; E_BODY];
        for probe in 0..n {
            let i = (start + probe) % n;
            let off = self.geo.entry_offset(i);
            let mut tries = 0;
            loop {
                tries += 1;
                if tries > SEQ_TRIES {
                    return Ok(None);
                }
                let s1 = self
                    .map
                    .load_u64(off)
                    .ok_or_else(|| CacheError::Corrupted("index outside the region".into()))?;
                if s1 & 1 == 1 {
                    std::hint::spin_loop();
                    continue;
                }
                if !self.map.read(off + 8, &mut body) {
                    return Err(CacheError::Corrupted("index outside the region".into()));
                }
                fence(Ordering::Acquire);
                if self.map.load_u64_relaxed(off) != Some(s1) {
                    continue;
                }
                let (version, slot, crc, len) = match decode_entry(&body)? {
                    Decoded::Empty => return Ok(None),
                    Decoded::Removed => break,
                    Decoded::Live {
                        name: en,
                        version,
                        slot,
                        crc,
                        len,
                    } => {
                        if en != name.as_bytes() {
                            break;
                        }
                        (version, slot, crc, len)
                    }
                };
                if slot >= self.geo.slot_count || len > self.geo.slot_size {
                    return Err(CacheError::Corrupted(format!(
                        "entry of {name} points outside the data area"
                    )));
                }
                let len = len as usize;
                if buf.len() != len {
                    buf.resize(len, 0);
                }
                if !self
                    .map
                    .read(self.geo.slot_offset(slot) as usize, &mut buf[..len])
                {
                    return Err(CacheError::Corrupted("slot outside the region".into()));
                }
                fence(Ordering::Acquire);
                if self.map.load_u64_relaxed(off) != Some(s1) {
                    continue;
                }
                self.check_live()?;
                if verify_data && crc32c::crc32c(&buf[..len]) != crc {
                    return Err(CacheError::Corrupted(format!(
                        "data of {name} v{version} does not match its checksum"
                    )));
                }
                return Ok(Some(version));
            }
        }
        Ok(None)
    }
}

/// The daemon's read-write view of a region: it alone writes the header and the index.
///
/// The region is a memfd the daemon owns: no path, nothing in /dev/shm for anyone to
/// truncate, replace or plant a symlink at. Its size is fixed by seals (`F_SEAL_SHRINK`,
/// `F_SEAL_GROW`, `F_SEAL_SEAL`) before the daemon maps it. Readers get a read-only open
/// file of it (see [`Region::share`]): `write`, writable shared mappings and hole punches
/// through it fail, and the memfd's mode (0600, the daemon's) keeps them from opening it
/// again read-write through `/proc/<pid>/fd`.
///
/// When the daemon lets go of a region (the space was unjoined, removed or its region
/// replaced) it punches out all of its memory, header included: a client that keeps the
/// descriptor keeps no memory the daemon allocated (the memory a client faults in again
/// by reading the holes is its own, charged to it as its own memfd would be). This is
/// why the region is not sealed with `F_SEAL_FUTURE_WRITE`: that seal refuses the punch
/// too, and retired regions kept alive by descriptors escaped every quota.
pub struct Region {
    map: Mapping,
    geo: Geometry,
    generation: u64,
    file: File,
    name: String,
}

/// A new memfd named `name` (close-on-exec, sealable, never executable).
fn memfd(name: &str) -> std::io::Result<File> {
    use rustix::fs::{memfd_create, MemfdFlags};
    let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = match memfd_create(name, base | MemfdFlags::NOEXEC_SEAL) {
        // kernels before 6.3 do not know MFD_NOEXEC_SEAL
        Err(rustix::io::Errno::INVAL) => memfd_create(name, base)?,
        r => r?,
    };
    Ok(File::from(fd))
}

/// Size `file` to `len` bytes of real memory now (a full memory is an error here, not a
/// SIGBUS on first touch) and seal its size.
fn size_and_seal(file: &File, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, fcntl_add_seals, ftruncate, FallocateFlags, SealFlags};
    ftruncate(file, len)?;
    fallocate(file, FallocateFlags::empty(), 0, len)?;
    fcntl_add_seals(file, SealFlags::SHRINK | SealFlags::GROW)?;
    Ok(())
}

fn seals(fd: impl std::os::fd::AsFd) -> std::io::Result<rustix::fs::SealFlags> {
    Ok(rustix::fs::fcntl_get_seals(fd)?)
}

impl Region {
    /// Create a region (memfd `name`) laid out for `geo`, with an empty index.
    pub fn create(name: &str, geo: Geometry, generation: u64) -> std::io::Result<Region> {
        use rustix::fs::{fchmod, fcntl_add_seals, Mode, SealFlags};
        if geo.slot_size == 0 || !geo.slot_size.is_multiple_of(4096) || geo.slot_count == 0 {
            return Err(std::io::Error::other(
                "slot size must be a positive multiple of 4096 and slots at least 1",
            ));
        }
        let file = memfd(name)?;
        size_and_seal(&file, geo.file_size())?;
        // nobody but the daemon may open it again through /proc/<pid>/fd
        fchmod(&file, Mode::from_raw_mode(0o600))?;
        fcntl_add_seals(&file, SealFlags::SEAL)?;
        let map = Mapping::read_write(&file)?;
        if map.len() as u64 != geo.file_size() {
            return Err(std::io::Error::other("region mapping of the wrong size"));
        }
        let r = Region {
            map,
            geo,
            generation,
            file,
            name: name.to_owned(),
        };
        r.write_header();
        Ok(r)
    }

    /// Geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// The memfd's name (for people: it shows in `/proc/<pid>/fd` and `/proc/<pid>/maps`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A descriptor of the region to lend to a reader: a new read-only open file of the
    /// memfd (through `/proc/self/fd`), so the reader can only map it read-only.
    pub fn share(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        read_only_reopen(&self.file)
    }

    /// (Re)write the header and mark the region live.
    pub fn write_header(&self) {
        self.map
            .write(0, &encode_header(&self.geo, self.generation));
        self.map.store_u64(STATE_OFF, LIVE, Ordering::Release);
    }

    /// Whether the header is intact.
    pub fn header_ok(&self) -> bool {
        let mut h = [0u8; 64];
        self.map.read(0, &mut h)
            && decode_header(&h, self.map.len() as u64).is_ok()
            && self.map.load_u64(STATE_OFF) == Some(LIVE)
    }

    fn put_entry(&self, i: u32, body: &[u8; E_BODY]) {
        let off = self.geo.entry_offset(i);
        let s = self.map.load_u64(off).unwrap_or(0);
        // odd while the body changes: readers retry; the fence keeps the body's bytes from
        // becoming visible before the odd value
        let odd = if s.is_multiple_of(2) {
            s.wrapping_add(1)
        } else {
            s.wrapping_add(2)
        };
        self.map.store_u64(off, odd, Ordering::Relaxed);
        fence(Ordering::Release);
        self.map.write(off + 8, body);
        self.map
            .store_u64(off, odd.wrapping_add(1), Ordering::Release);
    }

    /// Point entry `i` at a chunk's data.
    pub fn set_entry(&self, i: u32, v: &EntryValue) {
        self.put_entry(i, &encode_entry(E_LIVE, Some(v)));
    }

    /// Mark entry `i` removed (`tombstone`) or empty.
    pub fn clear_entry(&self, i: u32, tombstone: bool) {
        self.put_entry(
            i,
            &encode_entry(if tombstone { E_REMOVED } else { E_EMPTY }, None),
        );
    }

    /// Whether entry `i` holds exactly `want` (`None`: removed or empty).
    pub fn entry_is(&self, i: u32, want: Option<&EntryValue>) -> bool {
        let mut body = [0u8; E_BODY];
        if !self.map.read(self.geo.entry_offset(i) + 8, &mut body) {
            return false;
        }
        match (decode_entry(&body), want) {
            (Ok(Decoded::Empty | Decoded::Removed), None) => true,
            (
                Ok(Decoded::Live {
                    name,
                    version,
                    slot,
                    crc,
                    len,
                }),
                Some(w),
            ) => {
                name == w.name.as_bytes()
                    && version == w.version
                    && slot == w.slot
                    && crc == w.crc
                    && len == w.len
            }
            _ => false,
        }
    }

    /// Copy `data` into `slot` at `at`.
    pub fn write_slot(&self, slot: u32, at: u64, data: &[u8]) -> bool {
        slot < self.geo.slot_count
            && at + data.len() as u64 <= self.geo.slot_size
            && self
                .map
                .write((self.geo.slot_offset(slot) + at) as usize, data)
    }

    /// Copy the first `len` bytes of `slot` into `out`.
    pub fn read_slot(&self, slot: u32, len: u64, out: &mut Vec<u8>) -> bool {
        if slot >= self.geo.slot_count || len > self.geo.slot_size {
            return false;
        }
        out.resize(len as usize, 0);
        self.map.read(self.geo.slot_offset(slot) as usize, out)
    }

    /// Copy `len` bytes from one slot to another.
    pub fn copy_slot(&self, from: u32, to: u32, len: u64) -> bool {
        from < self.geo.slot_count
            && to < self.geo.slot_count
            && len <= self.geo.slot_size
            && self.map.copy_within(
                self.geo.slot_offset(from) as usize,
                self.geo.slot_offset(to) as usize,
                len as usize,
            )
    }

    /// Copy the first `len` bytes of a lease buffer into `slot` (with `pread`: whatever
    /// the holder does to its buffer meanwhile, this copies bytes or fails, never faults).
    pub fn slot_from_buffer(&self, slot: u32, buf: &LeaseBuffer, len: u64) -> std::io::Result<()> {
        if slot >= self.geo.slot_count || len > self.geo.slot_size || len > buf.size {
            return Err(std::io::Error::other("length over the slot or buffer size"));
        }
        self.map.pread_into(
            self.geo.slot_offset(slot) as usize,
            len as usize,
            &buf.file,
            0,
        )
    }

    /// Copy the first `len` bytes of `slot` into a lease buffer (with `pwrite`).
    pub fn slot_to_buffer(&self, slot: u32, len: u64, buf: &LeaseBuffer) -> std::io::Result<()> {
        if slot >= self.geo.slot_count || len > self.geo.slot_size || len > buf.size {
            return Err(std::io::Error::other("length over the slot or buffer size"));
        }
        self.map.pwrite_from(
            self.geo.slot_offset(slot) as usize,
            len as usize,
            &buf.file,
            0,
        )
    }

    /// crc32c of the first `len` bytes of `slot`.
    pub fn slot_crc(&self, slot: u32, len: u64) -> Option<u32> {
        if slot >= self.geo.slot_count || len > self.geo.slot_size {
            return None;
        }
        self.map
            .crc(self.geo.slot_offset(slot) as usize, len as usize)
    }

    /// Mark the region retired: readers that still map it stop using it and ask the daemon
    /// for the current one. Its memory is punched out when the daemon drops it.
    pub fn remove(&self) {
        self.map.store_u64(STATE_OFF, RETIRED, Ordering::Release);
    }
}

impl Drop for Region {
    /// Free the region's memory even if clients still hold descriptors of it. Their reads
    /// see zeros: a zero state word is "retired", a zero entry is a miss, and a reader in
    /// the middle of a lookup sees its entry's sequence word change.
    fn drop(&mut self) {
        self.remove();
        // (fails only with write seals, which regions never get)
        let _ = punch_all(&self.file, self.geo.file_size());
    }
}

/// Punch out every byte of `file` (its size stays): the memory goes back to the system.
fn punch_all(file: &File, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        len,
    )?;
    Ok(())
}

/// A new read-only open file of `file` (a memfd of this process).
fn read_only_reopen(file: &File) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{open, Mode, OFlags};
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    Ok(open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A lease's buffer: a memfd of the slot size lent to the lease holder (writable by it),
/// its size sealed before it is lent. The daemon never maps it: it copies the buffer into
/// the slot with `pread` at stop_write and checksums its own copy, so what the holder does
/// to its buffer (rewrite it meanwhile, punch holes) cannot fault the daemon or make the
/// published bytes differ from their checksum.
pub struct LeaseBuffer {
    file: File,
    size: u64,
}

impl Drop for LeaseBuffer {
    /// Free the buffer's memory even if its holder keeps the descriptor (what it faults in
    /// again by touching the buffer is its own).
    fn drop(&mut self) {
        let _ = punch_all(&self.file, self.size);
    }
}

impl LeaseBuffer {
    /// A new buffer of `size` bytes (allocated now).
    pub fn create(name: &str, size: u64) -> std::io::Result<LeaseBuffer> {
        use rustix::fs::{fchmod, fcntl_add_seals, Mode, SealFlags};
        let file = memfd(name)?;
        size_and_seal(&file, size)?;
        fcntl_add_seals(&file, SealFlags::SEAL)?;
        fchmod(&file, Mode::from_raw_mode(0o600))?;
        Ok(LeaseBuffer { file, size })
    }
    /// Bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// A descriptor to lend to the holder.
    pub fn share(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self.file.try_clone()?.into())
    }
    /// Write `data` at the start (filling a lease from the store).
    pub fn write_start(&self, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if data.len() as u64 > self.size {
            return Err(std::io::Error::other("data over the buffer size"));
        }
        self.file.write_all_at(data, 0)
    }
}

/// Map a lease buffer lent by the daemon read-write (the holder's side): it must be a
/// memfd sealed against shrinking, of exactly `capacity` bytes.
pub fn map_lease_buffer(fd: std::os::fd::OwnedFd, capacity: u64) -> std::io::Result<Mapping> {
    if !seals(&fd)?.contains(rustix::fs::SealFlags::SHRINK) {
        return Err(std::io::Error::other("lease buffer is not sealed"));
    }
    let file = File::from(fd);
    if file.metadata()?.len() != capacity {
        return Err(std::io::Error::other("lease buffer of the wrong size"));
    }
    Mapping::read_write(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> Region {
        Region::create("strata-test-region", Geometry::new(4096, 4), 7).unwrap()
    }

    #[test]
    fn write_then_read_and_detect_corruption() {
        let r = region();
        let data = b"hello chunk".to_vec();
        assert!(r.write_slot(2, 0, &data));
        let v = EntryValue {
            name: "a/b".into(),
            version: 3,
            slot: 2,
            len: data.len() as u64,
            crc: crc32c::crc32c(&data),
        };
        let i = (name_hash("a/b") % r.geometry().index_entries as u64) as u32;
        r.set_entry(i, &v);
        assert!(r.entry_is(i, Some(&v)));
        let rd = Reader::from_fd(r.share().unwrap()).unwrap();
        assert_eq!(rd.generation(), 7);
        let mut buf = Vec::new();
        assert_eq!(rd.lookup_into("a/b", &mut buf, true).unwrap(), Some(3));
        assert_eq!(buf, data);
        assert_eq!(rd.lookup_into("zz", &mut buf, true).unwrap(), None);
        // scribble on the data: the crc check catches it
        assert!(r.write_slot(2, 0, b"J"));
        assert!(matches!(
            rd.lookup_into("a/b", &mut buf, true),
            Err(CacheError::Corrupted(_))
        ));
        // scribble on the entry
        let off = r.geometry().entry_offset(i) + 20;
        r.map.write(off, b"\xff");
        assert!(matches!(
            rd.lookup_into("a/b", &mut buf, false),
            Err(CacheError::Corrupted(_))
        ));
        r.set_entry(i, &v);
        // scribble on the header: new readers refuse it
        r.map.write(20, b"\x01");
        assert!(matches!(
            Reader::from_fd(r.share().unwrap()),
            Err(CacheError::Corrupted(_))
        ));
        assert!(!r.header_ok());
        r.write_header();
        assert!(r.header_ok());
        // retire: old readers stop
        r.remove();
        assert!(matches!(
            rd.lookup_into("a/b", &mut buf, false),
            Err(CacheError::Retired)
        ));
    }

    #[test]
    fn a_lent_region_cannot_be_resized_written_or_punched() {
        use rustix::fs::{fallocate, ftruncate, FallocateFlags};
        use std::os::unix::fs::FileExt;
        let r = region();
        let f = File::from(r.share().unwrap());
        let size = r.geometry().file_size();
        assert!(ftruncate(&f, 0).is_err(), "shrink");
        assert!(ftruncate(&f, size * 2).is_err(), "grow");
        assert!(f.write_at(b"x", 100).is_err(), "write");
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        assert!(fallocate(&f, punch, 0, size).is_err(), "punch");
        assert!(Mapping::read_write(&f).is_err(), "writable mapping");
        assert!(Mapping::read_only(&f).is_ok());
        // nor opened again for writing (as the daemon's own uid this would work: this
        // checks the open file lent is read-only, the mode is checked by the e2e test)
        let again = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        let rw = std::fs::OpenOptions::new().read(true).open(&again).unwrap();
        assert!(Mapping::read_write(&rw).is_err(), "reopened read-only");
        assert_eq!(f.metadata().unwrap().len(), size);
        // the daemon still writes through its own mapping
        assert!(r.write_slot(0, 0, b"still mine"));
    }

    /// Bytes of memory a memfd holds.
    fn held(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn a_dropped_region_or_buffer_holds_no_memory_through_a_lent_descriptor() {
        let r = Region::create("strata-test-region", Geometry::new(64 << 10, 16), 3).unwrap();
        let size = r.geometry().file_size();
        let lent = File::from(r.share().unwrap());
        let rd = Reader::from_fd(r.share().unwrap()).unwrap();
        assert_eq!(held(&lent), size, "allocated when made");
        drop(r);
        assert_eq!(held(&lent), 0, "the daemon let go: nothing left");
        assert_eq!(lent.metadata().unwrap().len(), size, "the size stays");
        let mut buf = Vec::new();
        assert!(matches!(
            rd.lookup_into("a", &mut buf, true),
            Err(CacheError::Retired)
        ));
        assert!(matches!(
            Reader::from_fd(lent.try_clone().unwrap().into()),
            Err(CacheError::Retired)
        ));
        let b = LeaseBuffer::create("strata-test-lease", 1 << 20).unwrap();
        let lent = File::from(b.share().unwrap());
        assert_eq!(held(&lent), 1 << 20);
        drop(b);
        assert_eq!(held(&lent), 0);
    }

    #[test]
    fn lease_buffers_copy_in_and_out_by_syscall() {
        let r = region();
        let b = LeaseBuffer::create("strata-test-lease", 4096).unwrap();
        let m = map_lease_buffer(b.share().unwrap(), 4096).unwrap();
        assert!(m.write(0, b"from the holder"));
        r.slot_from_buffer(1, &b, 15).unwrap();
        let mut out = Vec::new();
        assert!(r.read_slot(1, 15, &mut out));
        assert_eq!(out, b"from the holder");
        // a holder punching holes in its buffer only zeroes its own bytes
        use rustix::fs::{fallocate, FallocateFlags};
        let f = File::from(b.share().unwrap());
        fallocate(
            &f,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            0,
            4096,
        )
        .unwrap();
        assert!(rustix::fs::ftruncate(&f, 0).is_err(), "sealed size");
        r.slot_from_buffer(1, &b, 15).unwrap();
        assert!(r.read_slot(1, 15, &mut out));
        assert_eq!(out, [0u8; 15]);
        assert!(r.write_slot(2, 0, b"published"));
        r.slot_to_buffer(2, 9, &b).unwrap();
        let mut got = [0u8; 9];
        assert!(m.read(0, &mut got));
        assert_eq!(&got, b"published");
        assert!(r.slot_from_buffer(1, &b, 8192).is_err());
    }
}
