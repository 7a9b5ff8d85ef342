//! DM handles: opaque to applications, versioned, and carrying the backing filesystem's own
//! file handle so that an object is found again by identity (not by path) after renames,
//! remounts and daemon restarts (see `docs/dmapi.md`).
//!
//! ```text
//!  0 "SH"   2 version u8 (1)   3 kind u8 (0 filesystem, 1 object)
//!  4 fsid u32 LE   8 kernel handle type i32 LE   12 kernel handle length u32 LE (<= 128)
//! 16 kernel handle bytes   then crc32c u32 LE of everything before
//! ```
//!
//! Decoding never touches the filesystem: a malformed handle is EINVAL; a well-formed one
//! whose object is gone is EBADF when it is opened (seed 001's refinement).

use super::DmError;
use super::FsId;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Largest kernel file handle kept (MAX_HANDLE_SZ).
pub const MAX_KERNEL_HANDLE: usize = 128;
const HEADER: usize = 16;
const VERSION: u8 = 1;

/// What a handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleKind {
    /// A managed filesystem.
    Fs,
    /// A file, directory or symlink in it.
    Object,
}

/// A decoded handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// Filesystem.
    pub fs: FsId,
    /// Kind.
    pub kind: HandleKind,
    /// Kernel handle type (`name_to_handle_at`).
    pub ktype: i32,
    /// Kernel handle bytes.
    pub kbytes: Vec<u8>,
}

impl Handle {
    /// The handle's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.kbytes.len() + 4);
        v.extend_from_slice(b"SH");
        v.push(VERSION);
        v.push(match self.kind {
            HandleKind::Fs => 0,
            HandleKind::Object => 1,
        });
        v.extend_from_slice(&self.fs.to_le_bytes());
        v.extend_from_slice(&self.ktype.to_le_bytes());
        v.extend_from_slice(&(self.kbytes.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.kbytes);
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Parse handle bytes: EINVAL when they are not a handle of this format.
    pub fn decode(b: &[u8]) -> Result<Handle, DmError> {
        if b.len() < HEADER + 4 || &b[0..2] != b"SH" || b[2] != VERSION {
            return Err(DmError::Einval);
        }
        let kind = match b[3] {
            0 => HandleKind::Fs,
            1 => HandleKind::Object,
            _ => return Err(DmError::Einval),
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let klen = u32_at(12) as usize;
        if klen > MAX_KERNEL_HANDLE || b.len() != HEADER + klen + 4 {
            return Err(DmError::Einval);
        }
        let body = &b[..HEADER + klen];
        if crc32c::crc32c(body) != u32_at(HEADER + klen) {
            return Err(DmError::Einval);
        }
        Ok(Handle {
            fs: u32_at(4),
            kind,
            ktype: u32_at(8) as i32,
            kbytes: b[HEADER..HEADER + klen].to_vec(),
        })
    }

    /// The handle of a managed filesystem.
    pub fn of_fs(fs: FsId) -> Handle {
        Handle {
            fs,
            kind: HandleKind::Fs,
            ktype: 0,
            kbytes: vec![],
        }
    }

    /// The handle of the object at `path` (which must be on the filesystem `fs` is backed
    /// by): ENOENT-like failures are EBADF.
    pub fn of_path(fs: FsId, path: &Path) -> Result<Handle, DmError> {
        let (ktype, kbytes) = sys::kernel_handle(None, path).map_err(io_to_dm)?;
        Ok(Handle {
            fs,
            kind: HandleKind::Object,
            ktype,
            kbytes,
        })
    }

    /// The handle of an open object (an `O_PATH` descriptor will do).
    pub fn of_fd(fs: FsId, fd: std::os::fd::BorrowedFd<'_>) -> Result<Handle, DmError> {
        let (ktype, kbytes) = sys::kernel_handle(Some(fd), Path::new("")).map_err(io_to_dm)?;
        Ok(Handle {
            fs,
            kind: HandleKind::Object,
            ktype,
            kbytes,
        })
    }

    /// The handle of the object `name` names in directory `dir` (not following a final
    /// symlink): the system call's own error.
    pub fn of_at(
        fs: FsId,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
    ) -> std::io::Result<Handle> {
        let (ktype, kbytes) = sys::kernel_handle(Some(dir), Path::new(name))?;
        Ok(Handle {
            fs,
            kind: HandleKind::Object,
            ktype,
            kbytes,
        })
    }

    /// Open the object read-only (`O_PATH` when `path_only`), given an open directory of
    /// its filesystem: a stale or missing object is EBADF.
    pub fn open(&self, mount: &File, path_only: bool) -> Result<File, DmError> {
        self.open_with(
            mount,
            if path_only {
                libc::O_PATH
            } else {
                libc::O_RDONLY | libc::O_NOATIME
            },
        )
    }

    /// Open the object with these `open(2)` flags (`O_CLOEXEC` is added).
    pub fn open_with(&self, mount: &File, flags: i32) -> Result<File, DmError> {
        if self.kind != HandleKind::Object {
            return Err(DmError::Einval);
        }
        sys::open_by_handle(mount, self.ktype, &self.kbytes, flags).map_err(io_to_dm)
    }

    /// Open the object with these `open(2)` flags (`O_CLOEXEC` is added), given any
    /// descriptor of its filesystem: the system call's own error (EMFILE stays EMFILE).
    pub fn open_io(
        &self,
        mount: std::os::fd::BorrowedFd<'_>,
        flags: i32,
    ) -> std::io::Result<std::os::fd::OwnedFd> {
        sys::open_by_handle(&mount, self.ktype, &self.kbytes, flags).map(Into::into)
    }

    /// The object's path (as the kernel sees it now), through its open file.
    pub fn path(&self, mount: &File) -> Result<PathBuf, DmError> {
        let f = self.open(mount, true)?;
        std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&f)
        ))
        .map_err(|_| DmError::Ebadf)
    }
}

fn io_to_dm(e: std::io::Error) -> DmError {
    match e.raw_os_error() {
        Some(libc::ESTALE) | Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::EBADF) => {
            DmError::Ebadf
        }
        Some(libc::EPERM) | Some(libc::EACCES) => DmError::Eperm,
        Some(libc::ENOMEM) => DmError::Enomem,
        Some(libc::EOVERFLOW) | Some(libc::EINVAL) => DmError::Einval,
        _ => DmError::Estale,
    }
}

/// The two system calls std does not offer. The only unsafe code of the DM layer.
#[allow(unsafe_code)]
mod sys {
    use super::MAX_KERNEL_HANDLE;
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// A `struct file_handle` with room for MAX_KERNEL_HANDLE bytes, 8-aligned.
    #[repr(C)]
    struct Buf {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; MAX_KERNEL_HANDLE],
    }

    pub fn kernel_handle(
        dir: Option<std::os::fd::BorrowedFd<'_>>,
        path: &Path,
    ) -> std::io::Result<(i32, Vec<u8>)> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut buf = Buf {
            handle_bytes: MAX_KERNEL_HANDLE as u32,
            handle_type: 0,
            f_handle: [0; MAX_KERNEL_HANDLE],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `c` is a NUL-terminated path, `dir` (if any) a descriptor borrowed for
        // the call; `buf` is a file_handle header followed by
        // `handle_bytes` bytes of storage, as the call requires; `mount_id` is a valid out
        // pointer. The kernel writes at most `handle_bytes` bytes after the header.
        let rc = unsafe {
            libc::name_to_handle_at(
                dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd()),
                c.as_ptr(),
                (&mut buf as *mut Buf).cast::<libc::file_handle>(),
                &mut mount_id,
                if dir.is_some() {
                    libc::AT_EMPTY_PATH
                } else {
                    0
                },
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (buf.handle_bytes as usize).min(MAX_KERNEL_HANDLE);
        Ok((buf.handle_type, buf.f_handle[..n].to_vec()))
    }

    pub fn open_by_handle(
        mount: &impl AsRawFd,
        ktype: i32,
        bytes: &[u8],
        flags: i32,
    ) -> std::io::Result<File> {
        if bytes.len() > MAX_KERNEL_HANDLE {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut buf = Buf {
            handle_bytes: bytes.len() as u32,
            handle_type: ktype,
            f_handle: [0; MAX_KERNEL_HANDLE],
        };
        buf.f_handle[..bytes.len()].copy_from_slice(bytes);
        let flags = libc::O_CLOEXEC | flags;
        // SAFETY: `buf` is a valid file_handle of `handle_bytes` bytes; the kernel only reads
        // it. On success the returned descriptor is new and owned by us alone.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&mut buf as *mut Buf).cast::<libc::file_handle>(),
                flags,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn malformed_handles_are_einval_without_looking() {
        let h = Handle {
            fs: 3,
            kind: HandleKind::Object,
            ktype: 1,
            kbytes: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let b = h.encode();
        assert_eq!(Handle::decode(&b).unwrap(), h);
        for cut in 0..b.len() {
            assert_eq!(
                Handle::decode(&b[..cut]),
                Err(DmError::Einval),
                "truncated at {cut}"
            );
        }
        for i in 0..b.len() {
            let mut f = b.clone();
            f[i] ^= 0x40;
            assert_eq!(Handle::decode(&f), Err(DmError::Einval), "flipped byte {i}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(Handle::decode(&long), Err(DmError::Einval));
        assert_eq!(Handle::decode(b""), Err(DmError::Einval));
    }

    #[test]
    fn handles_find_objects_by_identity_and_missing_ones_are_ebadf() {
        crate::dm::require_root("open_by_handle_at (CAP_DAC_READ_SEARCH)");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        std::fs::write(&p, b"contents").unwrap();
        let h = Handle::of_path(9, &p).unwrap();
        let bytes = h.encode();
        let mount = File::open(d.path()).unwrap();
        // renamed: still found
        let q = d.path().join("b");
        std::fs::rename(&p, &q).unwrap();
        let h2 = Handle::decode(&bytes).unwrap();
        let mut s = String::new();
        h2.open(&mount, false)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "contents");
        assert_eq!(h2.path(&mount).unwrap(), q);
        // gone: EBADF (not EINVAL: the handle itself is fine)
        std::fs::remove_file(&q).unwrap();
        assert_eq!(h2.open(&mount, false).unwrap_err(), DmError::Ebadf);
        assert_eq!(Handle::of_path(9, &q).unwrap_err(), DmError::Ebadf);
    }
}
