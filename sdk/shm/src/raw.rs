//! The only unsafe code of the shared-memory chunk cache: mapping a region (or lease buffer) and
//! reading/writing it through raw pointers.
//!
//! Why it is sound enough to rely on:
//! - Every access is bounds-checked against the mapping's length here, so a corrupted
//!   header or index can make a caller read the wrong bytes, never outside the mapping.
//! - Other processes change the mapped bytes at any time (that is the point of the cache),
//!   so no Rust reference to mapped memory is ever handed out for a shared mapping: bytes
//!   are copied in and out with `ptr::copy_nonoverlapping`, and the 8-byte sequence words
//!   are accessed as `AtomicU64` (naturally aligned: the mapping is page aligned and every
//!   sequence word sits at a multiple of 8).
//! - The sequence-lock protocol (see `super`) decides whether copied bytes are used: a
//!   copy that raced with a writer is thrown away. The fences that order the copy against
//!   the sequence loads are in `super`; on x86-64 (TSO) they compile to nothing but keep
//!   the compiler from moving the copies.
//! - The only `&mut [u8]` into shared memory is a [`LeaseWindow`]: a lease buffer, a memfd
//!   the daemon lent to this connection alone (no other client has it; the daemon only
//!   copies it with `pread`/`pwrite` at grant and stop_write). The daemon gives a buffer
//!   back to the same connection for a later lease only after the client ended the
//!   previous one (stop/abort), when the client library has consumed its `WriteLease`; a
//!   lease taken back by timeout keeps its buffer out of use until the connection closes.
//!   The window is borrowed mutably through `&mut self`, so while the slice lives nothing
//!   else in this process touches those bytes.
//! - Mappings are made only of memfds sealed against shrinking (checked before mapping),
//!   so no other process can make an access here fault.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

// the mappings are held only to keep them alive; access goes through `ptr`
#[allow(dead_code)]
enum Map {
    Ro(memmap2::Mmap),
    Rw(memmap2::MmapMut),
}

/// A mapping of a region or a lease buffer (memfds).
pub struct Mapping {
    map: Map,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through the bounds-checked copy and
// atomic methods below; moving or sharing the handle between threads is no different from
// another process mapping the same file.
unsafe impl Send for Mapping {}
// SAFETY: as above: all access goes through copies and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map the whole file read-only.
    pub fn read_only(file: &File) -> std::io::Result<Mapping> {
        // SAFETY: the file is shared memory that other processes change; we never form
        // references into it (see the module comment).
        let m = unsafe { memmap2::Mmap::map(file)? };
        let (ptr, len) = (m.as_ptr() as *mut u8, m.len());
        Ok(Mapping {
            map: Map::Ro(m),
            ptr,
            len,
        })
    }

    /// Map the whole file read-write.
    pub fn read_write(file: &File) -> std::io::Result<Mapping> {
        // SAFETY: as in `read_only`.
        let mut m = unsafe { memmap2::MmapOptions::new().map_mut(file)? };
        let (ptr, len) = (m.as_mut_ptr(), m.len());
        Ok(Mapping {
            map: Map::Rw(m),
            ptr,
            len,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never, for a mapping this module made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range_ok(&self, off: usize, len: usize) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.len)
    }

    fn atomic64(&self, off: usize) -> Option<&AtomicU64> {
        if !self.range_ok(off, 8) || !off.is_multiple_of(8) {
            return None;
        }
        // SAFETY: in bounds, 8-aligned (page-aligned base); AtomicU64 has u64's layout and
        // atomics are the right way to share the word with other processes.
        Some(unsafe { &*(self.ptr.add(off) as *const AtomicU64) })
    }

    /// Load of the u64 at `off` ordered before later reads (a relaxed atomic load, which
    /// is fine on a read-only mapping, then an acquire fence); `None` out of bounds or
    /// misaligned.
    pub fn load_u64(&self, off: usize) -> Option<u64> {
        let v = self.atomic64(off).map(|a| a.load(Ordering::Relaxed));
        std::sync::atomic::fence(Ordering::Acquire);
        v
    }

    /// Atomic load (relaxed) of the u64 at `off`.
    pub fn load_u64_relaxed(&self, off: usize) -> Option<u64> {
        self.atomic64(off).map(|a| a.load(Ordering::Relaxed))
    }

    /// Atomic store of the u64 at `off` (read-write mappings only).
    pub fn store_u64(&self, off: usize, v: u64, order: Ordering) -> bool {
        if !matches!(self.map, Map::Rw(_)) {
            return false;
        }
        match self.atomic64(off) {
            Some(a) => {
                a.store(v, order);
                true
            }
            None => false,
        }
    }

    /// Copy `out.len()` bytes at `off` out of the mapping.
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        if !self.range_ok(off, out.len()) {
            return false;
        }
        // SAFETY: in bounds; `out` is our own memory and cannot overlap the mapping's
        // copy source in a way that matters (copy_nonoverlapping on distinct regions).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) };
        true
    }

    /// Copy `src` into the mapping at `off` (read-write mappings only).
    pub fn write(&self, off: usize, src: &[u8]) -> bool {
        if !matches!(self.map, Map::Rw(_)) || !self.range_ok(off, src.len()) {
            return false;
        }
        // SAFETY: in bounds of a writable mapping; src is not in the mapping's range.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        true
    }

    /// Copy `len` bytes inside the mapping from `from` to `to` (read-write only).
    pub fn copy_within(&self, from: usize, to: usize, len: usize) -> bool {
        if !matches!(self.map, Map::Rw(_)) || !self.range_ok(from, len) || !self.range_ok(to, len) {
            return false;
        }
        // SAFETY: both ranges in bounds; `copy` allows overlap.
        unsafe { std::ptr::copy(self.ptr.add(from), self.ptr.add(to), len) };
        true
    }

    /// crc32c of `len` bytes at `off` (a racing writer gives a wrong crc, never UB).
    ///
    /// The bytes are copied out in pieces (`ptr::copy_nonoverlapping` into a stack buffer,
    /// as every read here) and checksummed there: no Rust slice over the shared mapping is
    /// ever made, so another thread or process writing the bytes meanwhile (the daemon's
    /// own writers during a repair, any writer of a lease buffer) changes the result, which
    /// is what the check is for, and nothing else.
    pub fn crc(&self, off: usize, len: usize) -> Option<u32> {
        const PIECE: usize = 16 << 10;
        if !self.range_ok(off, len) {
            return None;
        }
        let mut piece = [0u8; PIECE];
        let mut crc = 0u32;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            // SAFETY: `off + done .. off + done + n` is inside the mapping (range_ok above
            // and n <= len - done); the destination is this stack buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.add(off + done), piece.as_mut_ptr(), n)
            };
            crc = crc32c::crc32c_append(crc, &piece[..n]);
            done += n;
        }
        Some(crc)
    }

    /// Fill `len` bytes at `off` of this (read-write) mapping from `file` at `at`, with
    /// `pread`: the kernel copies, so a file that is short or has holes gives an error or
    /// zeroes, never a fault in this process.
    pub fn pread_into(&self, off: usize, len: usize, file: &File, at: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        if !matches!(self.map, Map::Rw(_)) || !self.range_ok(off, len) {
            return Err(std::io::Error::other("outside the writable mapping"));
        }
        all_of(len, at, std::io::ErrorKind::UnexpectedEof, |done, pos| {
            // SAFETY: the destination range is inside our own writable mapping (checked
            // above); the kernel writes into it like any other process sharing it would,
            // and no Rust reference to those bytes exists. The region's pages cannot
            // vanish under the copy: it is allocated in full and sealed against shrinking
            // and hole punching (a failed copy would be EFAULT, not a signal).
            unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.ptr.add(off + done).cast(),
                    len - done,
                    pos,
                )
            }
        })
    }

    /// Write `len` bytes at `off` of this mapping into `file` at `at`, with `pwrite`.
    pub fn pwrite_from(&self, off: usize, len: usize, file: &File, at: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        if !self.range_ok(off, len) {
            return Err(std::io::Error::other("outside the mapping"));
        }
        all_of(len, at, std::io::ErrorKind::WriteZero, |done, pos| {
            // SAFETY: the source range is inside our mapping (checked above); the kernel
            // only reads it.
            unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    self.ptr.add(off + done).cast_const().cast(),
                    len - done,
                    pos,
                )
            }
        })
    }

    /// The write lease holder's window on `len` bytes at `off` of a read-write mapping.
    pub fn lease_window(map: &Arc<Mapping>, off: usize, len: usize) -> Option<LeaseWindow> {
        if !matches!(map.map, Map::Rw(_)) || !map.range_ok(off, len) {
            return None;
        }
        Some(LeaseWindow {
            map: map.clone(),
            off,
            len,
        })
    }
}

/// A lease holder's bytes in a shared mapping (see the module comment for why handing out
/// `&mut` to them is sound).
pub struct LeaseWindow {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
}

impl LeaseWindow {
    /// The window as bytes to read and write in place.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: in bounds of a live read-write mapping (checked in `lease_window`; the
        // Arc keeps it mapped); exclusive for the lease's lifetime by the protocol, and for
        // this borrow by `&mut self` (module comment).
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.add(self.off), self.len) }
    }
}

/// Run `step(done, file offset)` (one pread or pwrite of the rest) until `len` bytes are
/// moved: EINTR is retried, 0 bytes is `zero`.
fn all_of(
    len: usize,
    at: u64,
    zero: std::io::ErrorKind,
    mut step: impl FnMut(usize, libc::off_t) -> isize,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let pos = libc::off_t::try_from(at + done as u64)
            .map_err(|_| std::io::Error::other("offset too large"))?;
        let n = step(done, pos);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(zero.into());
        }
        done += n as usize;
    }
    Ok(())
}
