//! DM calls on the objects of managed filesystems: handles and paths, attributes, DM
//! attributes, regions, event lists, allocation, holes, invisible I/O, sync and config.
//! They work on the backing objects directly (never through the mount, so they raise no
//! events), and tell the kernel to drop what it cached of an object they change.
//!
//! Errors follow seed 001: a malformed handle is EINVAL before anything is looked up, a
//! missing object EBADF, a filesystem that is not mounted EPERM; under a token the session
//! and token are checked (EINVAL / ESRCH) and the right held (EACCES).

use super::{Live, Mounts};
use crate::dm::attrs::{self, Region as XRegion};
use crate::dm::handle::{Handle, HandleKind};
use crate::dm::service::{check_buflen, fits};
use crate::dm::{
    DmAttr, DmError, DmReply, DmRequest, Entry, EventSet, Extent, Region, Right, SessionId,
    SetAttr, Stat, Token, MAX_INVIS_IO, MAX_NELEM, WRITE_SYNC,
};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An object a handle names, opened.
struct Obj {
    h: Handle,
    live: Arc<Live>,
    file: File,
    st: rfs::Stat,
}

impl Obj {
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Open the object (never blocking: a FIFO or device would wait for a partner).
    fn open(&self, flags: i32) -> Result<File, DmError> {
        self.h.open_with(&self.live.root, flags | libc::O_NONBLOCK)
    }

    fn kind(&self) -> u32 {
        self.st.st_mode & libc::S_IFMT
    }

    /// Data calls (allocinfo, holes, invisible I/O, size) are for regular files: EINVAL.
    fn regular(&self) -> Result<(), DmError> {
        if self.kind() == libc::S_IFREG {
            Ok(())
        } else {
            Err(DmError::Einval)
        }
    }
}

fn errno_dm(e: rustix::io::Errno) -> DmError {
    match e.raw_os_error() {
        libc::ENOENT | libc::ESTALE | libc::EBADF => DmError::Ebadf,
        libc::EPERM | libc::EACCES => DmError::Eperm,
        libc::EINVAL => DmError::Einval,
        libc::ENOMEM => DmError::Enomem,
        libc::EROFS => DmError::Erofs,
        libc::ENOSPC => DmError::Enospc,
        libc::EBUSY => DmError::Ebusy,
        libc::EIO => DmError::Eio,
        _ => DmError::Estale,
    }
}

fn io_dm(e: std::io::Error) -> DmError {
    errno_dm(rustix::io::Errno::from_raw_os_error(
        e.raw_os_error().unwrap_or(libc::EIO),
    ))
}

/// Offsets and lengths as seed 001 checks them: a negative offset, or a length that
/// overflows an offset, is EINVAL.
fn range(offset: i64, length: u64) -> Result<(u64, u64), DmError> {
    if offset < 0 {
        return Err(DmError::Einval);
    }
    if length > i64::MAX as u64 || offset.checked_add(length as i64).is_none() {
        return Err(DmError::Einval);
    }
    Ok((offset as u64, length))
}

fn stat_of(fs: u32, path: &Path, st: &rfs::Stat) -> Stat {
    let events = attrs::get_eventlist(path).unwrap_or_default();
    Stat {
        dev: fs as u64,
        ino: st.st_ino,
        mode: st.st_mode,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: st.st_size as u64,
        blksize: st.st_blksize as u64,
        blocks: st.st_blocks as u64,
        atime: (st.st_atime, st.st_atime_nsec as u32),
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime, st.st_ctime_nsec as u32),
        change: attrs::change(path).unwrap_or(0),
        events,
        has_dmattrs: attrs::has_dmattrs(path).unwrap_or(false),
        has_regions: attrs::get_regions(path).is_ok_and(|r| !r.is_empty()),
    }
}

/// DM_CONFIG_* values.
fn config(flag: &str) -> Option<u64> {
    Some(match flag {
        "bulkall" => 0,
        "create_by_handle" => 0,
        "dtime_overload" => 1,
        "legacy" => 1,
        "lock_upgrade" => 1,
        "max_attribute_size" => attrs::MAX_ATTRIBUTE_SIZE as u64,
        "max_attrname_size" => 8,
        "max_handle_size" => (16 + crate::dm::handle::MAX_KERNEL_HANDLE + 4) as u64,
        "max_managed_regions" => attrs::MAX_REGIONS as u64,
        "max_message_data" => strata_proto::frame::MAX_HEADER as u64,
        "object_id" => 0,
        "persistent_data" => 1,
        "punch_hole" => 1,
        "total_attribute_space" => 4096,
        "will_retry" => 1,
        _ => return None,
    })
}

fn times(t: Option<(i64, u32)>) -> rfs::Timespec {
    match t {
        Some((s, ns)) => rfs::Timespec {
            tv_sec: s,
            tv_nsec: ns as _,
        },
        None => rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
    }
}

impl Mounts {
    /// Serve a DM call on objects: the reply and its payload (read_invis data, a DM
    /// attribute value).
    pub fn call(&self, req: DmRequest, payload: Vec<u8>) -> (DmReply, Vec<u8>) {
        match self.call_inner(req, payload) {
            Ok(r) => r,
            Err(error) => (DmReply::Error { error }, vec![]),
        }
    }

    fn object(&self, handle: &[u8]) -> Result<Obj, DmError> {
        let (h, live) = self.resolve(handle)?;
        if h.kind != HandleKind::Object {
            return Err(DmError::Einval);
        }
        let file = h.open_with(&live.root, libc::O_PATH)?;
        // a well-formed handle of an object outside the backing directory is inaccessible
        let p = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| DmError::Ebadf)?;
        if !p.starts_with(&live.backing) {
            return Err(DmError::Ebadf);
        }
        let st = rfs::fstat(&file).map_err(errno_dm)?;
        if st.st_nlink == 0 {
            // unlinked: it exists only while something has it open (the kernel may still
            // hold it for a moment after the last close; that is not an object any more)
            let open = live
                .shared
                .node(live.shared.fuse_ino(st.st_ino))
                .is_some_and(|n| n.opens.load(Ordering::Acquire) > 0);
            if !open {
                return Err(DmError::Ebadf);
            }
        }
        Ok(Obj { h, live, file, st })
    }

    /// The object a handle names, after checking the session, token and right (so that an
    /// ended token is ESRCH even when its object is gone since).
    fn checked(
        &self,
        sid: SessionId,
        token: Token,
        handle: &[u8],
        need: Right,
    ) -> Result<Obj, DmError> {
        let h = Handle::decode(handle)?;
        self.dm().check_right(sid, token, &h.encode(), need)?;
        self.object(handle)
    }

    fn fs_of(&self, fs_handle: &[u8]) -> Result<(u32, Arc<Live>), DmError> {
        let (h, live) = self.resolve(fs_handle)?;
        if h.kind != HandleKind::Fs {
            return Err(DmError::Einval);
        }
        Ok((h.fs, live))
    }

    fn mount_path(live: &Live, backing_path: &Path) -> Result<PathBuf, DmError> {
        let s = backing_path.as_os_str().as_bytes();
        if s.ends_with(b" (deleted)") {
            return Err(DmError::Estale);
        }
        let rel = backing_path
            .strip_prefix(&live.backing)
            .map_err(|_| DmError::Ebadf)?;
        Ok(live.mountpoint.join(rel))
    }

    fn entry(fs: u32, dir: &File, name: &std::ffi::OsStr) -> Result<Entry, DmError> {
        let fd = rfs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_dm)?;
        let st = rfs::fstat(&fd).map_err(errno_dm)?;
        let h = Handle::of_fd(fs, std::os::fd::AsFd::as_fd(&fd))?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Ok(Entry {
            name: name.to_string_lossy().into_owned(),
            handle: h.encode(),
            stat: stat_of(fs, &path, &st),
        })
    }

    fn names(dir: &File) -> Result<Vec<std::ffi::OsString>, DmError> {
        let mut d = rfs::Dir::read_from(dir).map_err(errno_dm)?;
        let mut names = Vec::new();
        while let Some(e) = d.read() {
            let e = e.map_err(errno_dm)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(std::ffi::OsStr::from_bytes(n).to_os_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn call_inner(&self, req: DmRequest, payload: Vec<u8>) -> Result<(DmReply, Vec<u8>), DmError> {
        let done = |r: DmReply| Ok((r, vec![]));
        match req {
            DmRequest::PathToHandle { path } => {
                let (fs, live, rel) = self.locate(Path::new(&path))?;
                let p = live.backing.join(&rel);
                std::fs::symlink_metadata(&p).map_err(|_| DmError::Enoent)?;
                let h = Handle::of_path(fs, &p)?;
                done(DmReply::Handle { handle: h.encode() })
            }
            DmRequest::PathToFsHandle { path } => {
                let (fs, _, _) = self.locate(Path::new(&path))?;
                done(DmReply::Handle {
                    handle: Mounts::fs_handle(fs),
                })
            }
            DmRequest::HandleToFsHandle { handle } => {
                let h = Handle::decode(&handle)?;
                done(DmReply::Handle {
                    handle: Mounts::fs_handle(h.fs),
                })
            }
            DmRequest::HandleToPath { handle, buflen } => {
                check_buflen(buflen)?;
                let o = self.object(&handle)?;
                let p = std::fs::read_link(o.path()).map_err(|_| DmError::Ebadf)?;
                let path = Mounts::mount_path(&o.live, &p)?.display().to_string();
                if buflen.is_some_and(|n| (path.len() as u64) >= n) {
                    return Err(DmError::E2big);
                }
                done(DmReply::Path { path })
            }
            DmRequest::GetFileattr { sid, token, handle } => {
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                done(DmReply::Stat {
                    stat: stat_of(o.h.fs, &o.path(), &o.st),
                })
            }
            DmRequest::SetFileattr {
                sid,
                token,
                handle,
                attr,
            } => {
                let o = self.checked(sid, token, &handle, Right::Excl)?;
                self.set_fileattr(&o, &attr)?;
                o.live.invalidate(o.st.st_ino);
                let st = rfs::fstat(&o.file).map_err(errno_dm)?;
                done(DmReply::Stat {
                    stat: stat_of(o.h.fs, &o.path(), &st),
                })
            }
            DmRequest::GetDirattrs {
                sid,
                token,
                handle,
                cursor,
                max,
                buflen,
            } => {
                check_buflen(buflen)?;
                if max == 0 || max > MAX_NELEM {
                    return Err(DmError::Einval);
                }
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                if o.st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(DmError::Einval);
                }
                let dir = o.open(libc::O_RDONLY | libc::O_DIRECTORY)?;
                let names = Mounts::names(&dir)?;
                let mut entries = Vec::new();
                let mut at = cursor as usize;
                while at < names.len() && entries.len() < max as usize {
                    match Mounts::entry(o.h.fs, &dir, &names[at]) {
                        Ok(e) => entries.push(e),
                        // gone since the listing: skipped
                        Err(DmError::Ebadf) => {}
                        Err(e) => return Err(e),
                    }
                    at += 1;
                }
                fits(buflen, &entries)?;
                let cursor = (at < names.len()).then_some(at as u64);
                done(DmReply::Entries { entries, cursor })
            }
            DmRequest::GetBulkattr {
                sid,
                token,
                fs_handle,
                cursor,
                max,
                buflen,
            } => {
                check_buflen(buflen)?;
                if max == 0 || max > MAX_NELEM {
                    return Err(DmError::Einval);
                }
                let (fs, live) = self.fs_of(&fs_handle)?;
                self.dm()
                    .check_right(sid, token, &fs_handle, Right::Shared)?;
                let (entries, cursor) = Mounts::bulk(fs, &live, cursor, max)?;
                fits(buflen, &entries)?;
                done(DmReply::Entries { entries, cursor })
            }
            DmRequest::GetDmattr {
                sid,
                token,
                handle,
                name,
            } => {
                let name = attrs::attr_name(&name)?;
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                let v = attrs::get_dmattr(&o.path(), &name)?;
                Ok((DmReply::Value, v))
            }
            DmRequest::SetDmattr {
                sid,
                token,
                handle,
                name,
            } => {
                let name = attrs::attr_name(&name)?;
                if payload.len() > attrs::MAX_ATTRIBUTE_SIZE {
                    return Err(DmError::E2big);
                }
                let o = self.checked(sid, token, &handle, Right::Excl)?;
                attrs::set_dmattr(&o.path(), &name, &payload)?;
                done(DmReply::Ok)
            }
            DmRequest::RemoveDmattr {
                sid,
                token,
                handle,
                name,
            } => {
                let name = attrs::attr_name(&name)?;
                let o = self.checked(sid, token, &handle, Right::Excl)?;
                attrs::remove_dmattr(&o.path(), &name)?;
                done(DmReply::Ok)
            }
            DmRequest::GetallDmattr {
                sid,
                token,
                handle,
                buflen,
            } => {
                check_buflen(buflen)?;
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                let attrs: Vec<DmAttr> = attrs::getall_dmattr(&o.path())?
                    .into_iter()
                    .map(|a| DmAttr {
                        name: a.0.to_vec(),
                        value: a.1,
                    })
                    .collect();
                fits(buflen, &attrs)?;
                done(DmReply::Attrs { attrs })
            }
            DmRequest::SetRegion {
                sid,
                token,
                handle,
                regions,
            } => {
                let o = self.checked(sid, token, &handle, Right::Excl)?;
                o.regular()?;
                let r: Vec<XRegion> = regions
                    .iter()
                    .map(|r| XRegion {
                        offset: r.offset,
                        size: r.size,
                        flags: r.flags,
                    })
                    .collect();
                // regions that raise events cannot cover opens that bypass the daemon
                if r.iter().any(|r| r.flags != 0) && o.live.shared.passthrough_open(o.st.st_ino) {
                    return Err(DmError::Ebusy);
                }
                let exact = attrs::set_regions(&o.path(), &r)?;
                o.live.shared.regions_gen.fetch_add(1, Ordering::AcqRel);
                done(DmReply::Exact { exact })
            }
            DmRequest::GetRegion { sid, token, handle } => {
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                let regions = attrs::get_regions(&o.path())?
                    .into_iter()
                    .map(|r| Region {
                        offset: r.offset,
                        size: r.size,
                        flags: r.flags,
                    })
                    .collect();
                done(DmReply::Regions { regions })
            }
            DmRequest::SetEventlist {
                sid,
                token,
                handle,
                events,
            } => {
                let h = Handle::decode(&handle)?;
                if h.kind == HandleKind::Fs {
                    let (fs, _) = self.fs_of(&handle)?;
                    self.dm().check_right(sid, token, &handle, Right::Excl)?;
                    self.dm().update_fs(fs, |r| r.events = events)?;
                } else {
                    let o = self.checked(sid, token, &handle, Right::Excl)?;
                    attrs::set_eventlist(&o.path(), events)?;
                }
                done(DmReply::Ok)
            }
            DmRequest::GetEventlist { sid, token, handle } => {
                let h = Handle::decode(&handle)?;
                let events: EventSet = if h.kind == HandleKind::Fs {
                    let (fs, _) = self.fs_of(&handle)?;
                    self.dm().check_right(sid, token, &handle, Right::Shared)?;
                    self.dm().fs_events(fs)
                } else {
                    let o = self.checked(sid, token, &handle, Right::Shared)?;
                    attrs::get_eventlist(&o.path())?
                };
                done(DmReply::EventList { events })
            }
            DmRequest::SetReturnOnDestroy {
                sid,
                token,
                fs_handle,
                name,
            } => {
                let name = name.map(|n| attrs::attr_name(&n)).transpose()?;
                let (fs, _) = self.fs_of(&fs_handle)?;
                self.dm().check_right(sid, token, &fs_handle, Right::Excl)?;
                self.dm().update_fs(fs, |r| r.destroy_attr = name)?;
                done(DmReply::Ok)
            }
            DmRequest::GetMountinfo {
                sid,
                token,
                fs_handle,
                buflen,
            } => {
                check_buflen(buflen)?;
                let (fs, live) = self.fs_of(&fs_handle)?;
                self.dm()
                    .check_right(sid, token, &fs_handle, Right::Shared)?;
                let message = self.mount_message(fs, &live);
                fits(buflen, &message)?;
                done(DmReply::Mountinfo { message })
            }
            DmRequest::GetAllocinfo {
                sid,
                token,
                handle,
                offset,
                nelem,
            } => {
                let (offset, _) = range(offset, 0)?;
                if nelem == 0 || nelem > MAX_NELEM {
                    return Err(DmError::Einval);
                }
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                o.regular()?;
                let f = o.open(libc::O_RDONLY | libc::O_NOATIME)?;
                let (extents, more) = allocinfo(&f, offset, nelem)?;
                done(DmReply::Extents { extents, more })
            }
            DmRequest::ProbeHole {
                sid,
                token,
                handle,
                offset,
                length,
            } => {
                let (offset, length) = range(offset, length)?;
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                o.regular()?;
                let (offset, length) = probe(&o.st, offset, length);
                done(DmReply::Range { offset, length })
            }
            DmRequest::PunchHole {
                sid,
                token,
                handle,
                offset,
                length,
            } => {
                let (offset, length) = range(offset, length)?;
                let o = self.checked(sid, token, &handle, Right::Excl)?;
                if o.live.shared.read_only {
                    return Err(DmError::Erofs);
                }
                o.regular()?;
                // mapped, or open by passthrough (whose reads would see zeros, no event)
                if o.live
                    .shared
                    .is_mapped(o.st.st_dev, o.st.st_ino, o.live.dev)
                    || o.live.shared.passthrough_open(o.st.st_ino)
                {
                    return Err(DmError::Ebusy);
                }
                let size = o.st.st_size as u64;
                let len = if length == 0 {
                    size.saturating_sub(offset)
                } else {
                    length
                };
                if len > 0 {
                    let f = o.open(libc::O_WRONLY)?;
                    let before = rfs::fstat(&f).map_err(errno_dm)?;
                    rfs::fallocate(
                        &f,
                        rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE,
                        offset,
                        len,
                    )
                    .map_err(errno_dm)?;
                    restore_times(&f, &before)?;
                    o.live.invalidate(o.st.st_ino);
                }
                done(DmReply::Ok)
            }
            DmRequest::ReadInvis {
                sid,
                token,
                handle,
                offset,
                length,
            } => {
                let (offset, length) = range(offset, length)?;
                if length > MAX_INVIS_IO {
                    return Err(DmError::Einval);
                }
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                o.regular()?;
                let f = o.open(libc::O_RDONLY | libc::O_NOATIME)?;
                let size = rfs::fstat(&f).map_err(errno_dm)?.st_size as u64;
                let n = length.min(size.saturating_sub(offset));
                let n = usize::try_from(n).map_err(|_| DmError::Enomem)?;
                let mut buf = Vec::new();
                buf.try_reserve_exact(n).map_err(|_| DmError::Enomem)?;
                buf.resize(n, 0);
                let mut got = 0;
                while got < n {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_dm(e)),
                    }
                }
                buf.truncate(got);
                Ok((DmReply::Data, buf))
            }
            DmRequest::WriteInvis {
                sid,
                token,
                handle,
                offset,
                flags,
                length,
            } => {
                if flags & !WRITE_SYNC != 0 {
                    return Err(DmError::Einval);
                }
                let (offset, length) = range(offset, length)?;
                if length > MAX_INVIS_IO {
                    return Err(DmError::Einval);
                }
                if length != payload.len() as u64 {
                    // the caller's buffer does not hold what the call says it does
                    return Err(DmError::Efault);
                }
                let o = self.checked(sid, token, &handle, Right::Excl)?;
                if o.live.shared.read_only {
                    return Err(DmError::Erofs);
                }
                o.regular()?;
                let f = o.open(libc::O_WRONLY)?;
                let before = rfs::fstat(&f).map_err(errno_dm)?;
                f.write_all_at(&payload, offset).map_err(io_dm)?;
                if flags & WRITE_SYNC != 0 {
                    rfs::fdatasync(&f).map_err(errno_dm)?;
                }
                restore_times(&f, &before)?;
                o.live.invalidate(o.st.st_ino);
                done(DmReply::Written { count: length })
            }
            DmRequest::SyncByHandle { sid, token, handle } => {
                let o = self.checked(sid, token, &handle, Right::Shared)?;
                if o.live.shared.read_only {
                    return Err(DmError::Erofs);
                }
                if o.kind() != libc::S_IFREG && o.kind() != libc::S_IFDIR {
                    return Err(DmError::Einval);
                }
                let f = o.open(libc::O_RDONLY | libc::O_NOATIME)?;
                rfs::fsync(&f).map_err(errno_dm)?;
                done(DmReply::Ok)
            }
            DmRequest::GetConfig { handle, flag } => {
                let h = Handle::decode(&handle)?;
                if h.kind == HandleKind::Object {
                    self.object(&handle)?;
                } else {
                    self.fs_of(&handle)?;
                }
                let value = config(&flag).ok_or(DmError::Einval)?;
                done(DmReply::Config { value })
            }
            // session calls are served by the DM service
            _ => Err(DmError::Enosys),
        }
    }

    fn set_fileattr(&self, o: &Obj, a: &SetAttr) -> Result<(), DmError> {
        if o.live.shared.read_only {
            return Err(DmError::Erofs);
        }
        if let Some(size) = a.size {
            o.regular()?;
            let f = o.open(libc::O_WRONLY)?;
            rfs::ftruncate(&f, size).map_err(errno_dm)?;
        }
        if a.uid.is_some() || a.gid.is_some() {
            rfs::chownat(
                &o.file,
                "",
                a.uid.map(rustix::fs::Uid::from_raw),
                a.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno_dm)?;
        }
        if let Some(m) = a.mode {
            rfs::chmodat(
                rfs::CWD,
                o.path(),
                Mode::from_raw_mode(m & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno_dm)?;
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let t = rfs::Timestamps {
                last_access: times(a.atime),
                last_modification: times(a.mtime),
            };
            rfs::utimensat(
                &o.file,
                "",
                &t,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno_dm)?;
        }
        Ok(())
    }

    /// A page of the filesystem's objects, walked breadth first in name order from the
    /// root (the root itself first).
    fn bulk(
        fs: u32,
        live: &Live,
        cursor: u64,
        max: u32,
    ) -> Result<(Vec<Entry>, Option<u64>), DmError> {
        let mut out = Vec::new();
        let mut seen = 0u64;
        let mut queue = std::collections::VecDeque::new();
        queue.push_back(live.backing.clone());
        while let Some(dir) = queue.pop_front() {
            let f = File::open(&dir).map_err(io_dm)?;
            if seen == 0 {
                if cursor == 0 {
                    let st = rfs::fstat(&f).map_err(errno_dm)?;
                    let h = Handle::of_fd(fs, std::os::fd::AsFd::as_fd(&f))?;
                    out.push(Entry {
                        name: String::new(),
                        handle: h.encode(),
                        stat: stat_of(fs, &dir, &st),
                    });
                }
                seen = 1;
            }
            for name in Mounts::names(&f)? {
                let p = dir.join(&name);
                let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
                if is_dir {
                    queue.push_back(p);
                }
                if seen >= cursor {
                    if out.len() >= max as usize {
                        return Ok((out, Some(seen)));
                    }
                    match Mounts::entry(fs, &f, &name) {
                        Ok(mut e) => {
                            e.name = String::new();
                            out.push(e);
                        }
                        Err(DmError::Ebadf) => {}
                        Err(e) => return Err(e),
                    }
                }
                seen += 1;
            }
        }
        Ok((out, None))
    }
}

/// Put back the access and modification times saved before invisible I/O.
fn restore_times(f: &File, before: &rfs::Stat) -> Result<(), DmError> {
    let t = rfs::Timestamps {
        last_access: rfs::Timespec {
            tv_sec: before.st_atime,
            tv_nsec: before.st_atime_nsec as _,
        },
        last_modification: rfs::Timespec {
            tv_sec: before.st_mtime,
            tv_nsec: before.st_mtime_nsec as _,
        },
    };
    rfs::futimens(f, &t).map_err(errno_dm)
}

/// Resident extents and holes from `offset` (SEEK_DATA / SEEK_HOLE), at most `nelem`.
fn allocinfo(f: &File, offset: u64, nelem: u32) -> Result<(Vec<Extent>, bool), DmError> {
    let size = rfs::fstat(f).map_err(errno_dm)?.st_size as u64;
    let mut out = Vec::new();
    let mut at = offset;
    while at < size {
        if out.len() >= nelem as usize {
            return Ok((out, true));
        }
        let data = match rfs::seek(f, rfs::SeekFrom::Data(at)) {
            Ok(d) => d.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(errno_dm(e)),
        };
        if data > at {
            out.push(Extent {
                resident: false,
                offset: at,
                length: data - at,
            });
            at = data;
            continue;
        }
        let hole = match rfs::seek(f, rfs::SeekFrom::Hole(at)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(errno_dm(e)),
        };
        out.push(Extent {
            resident: true,
            offset: at,
            length: hole - at,
        });
        at = hole;
    }
    Ok((out, false))
}

/// dm_probe_hole: the range punch_hole would free: whole blocks inside the range asked
/// (length 0: through EOF, the last partial block included).
fn probe(st: &rfs::Stat, offset: u64, length: u64) -> (u64, u64) {
    let bs = (st.st_blksize as u64).max(512);
    let size = st.st_size as u64;
    let start = offset.div_ceil(bs) * bs;
    let end = if length == 0 {
        size.max(start)
    } else {
        ((offset + length) / bs) * bs
    };
    (start, end.saturating_sub(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_seed_001() {
        assert_eq!(range(-1, 0), Err(DmError::Einval));
        assert_eq!(range(0, u64::MAX), Err(DmError::Einval));
        assert_eq!(range(i64::MAX, 1), Err(DmError::Einval));
        assert_eq!(range(1, i64::MAX as u64), Err(DmError::Einval));
        assert_eq!(range(10, 20), Ok((10, 20)));
        assert_eq!(range(i64::MAX - 1, 1), Ok((i64::MAX as u64 - 1, 1)));
    }
}
