//! What DMAPI keeps per file, stored with the file itself as extended attributes of the
//! backing object (so it survives unmount, daemon restart, rename and hard links, and goes
//! away with the file):
//!
//! ```text
//! trusted.strata.dm.<16 hex digits>   a DM attribute (8-byte name), its value
//! trusted.strata.rg                   managed regions: n x (offset u64, size u64, flags u8), LE
//! trusted.strata.ev                   the persistent event list (u32 LE event-set bits)
//! trusted.strata.ch                   dt_change: u64 LE, bumped on every DM attribute change
//! ```
//!
//! `trusted.*` needs CAP_SYS_ADMIN (the daemon runs as root); the FUSE layer hides
//! `trusted.strata.*` from the filesystem's users.

use super::{DmError, EventSet};
use std::path::Path;

/// Prefix of every attribute Strata keeps on backing files.
pub const HIDDEN_PREFIX: &str = "trusted.strata.";
const DM_PREFIX: &str = "trusted.strata.dm.";
const REGIONS: &str = "trusted.strata.rg";
const EVENTS: &str = "trusted.strata.ev";
const CHANGE: &str = "trusted.strata.ch";
/// DM_CONFIG_MAX_ATTRIBUTE_SIZE: the backing filesystem keeps all extended attributes of a
/// file in one block on ext4 (4 KiB), so a DM attribute is at most 2 KiB.
pub const MAX_ATTRIBUTE_SIZE: usize = 2048;
/// DM_CONFIG_MAX_MANAGED_REGIONS.
pub const MAX_REGIONS: usize = 64;

/// An 8-byte DM attribute name (DM_ATTR_NAME_SIZE): any other length is EINVAL.
pub fn attr_name(name: &[u8]) -> Result<[u8; 8], DmError> {
    name.try_into().map_err(|_| DmError::Einval)
}

fn xname(name: &[u8; 8]) -> String {
    format!("{DM_PREFIX}{}", hex::encode(name))
}

/// Whether an extended attribute name is one of Strata's (hidden from users).
pub fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes()
        .starts_with(HIDDEN_PREFIX.as_bytes())
}

fn io(e: std::io::Error) -> DmError {
    match e.raw_os_error() {
        Some(libc::ENODATA) => DmError::Enoent,
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ESTALE) => DmError::Ebadf,
        // the file's attribute space is full (one block on ext4)
        Some(libc::ENOSPC) | Some(libc::E2BIG) | Some(libc::ERANGE) => DmError::E2big,
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOTSUP) => DmError::Eperm,
        Some(libc::EROFS) => DmError::Erofs,
        _ => DmError::Eio,
    }
}

fn bump_change(path: &Path) -> Result<u64, DmError> {
    let v = change(path)? + 1;
    xattr::set_deref(path, CHANGE, &v.to_le_bytes()).map_err(io)?;
    Ok(v)
}

/// dt_change of the object (0 when nothing was ever recorded).
pub fn change(path: &Path) -> Result<u64, DmError> {
    Ok(xattr::get_deref(path, CHANGE)
        .map_err(io)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0))
}

/// dm_set_dmattr.
pub fn set_dmattr(path: &Path, name: &[u8], value: &[u8]) -> Result<(), DmError> {
    let name = attr_name(name)?;
    if value.len() > MAX_ATTRIBUTE_SIZE {
        return Err(DmError::E2big);
    }
    xattr::set_deref(path, xname(&name), value).map_err(io)?;
    bump_change(path)?;
    Ok(())
}

/// dm_get_dmattr (ENOENT when the attribute is not set).
pub fn get_dmattr(path: &Path, name: &[u8]) -> Result<Vec<u8>, DmError> {
    let name = attr_name(name)?;
    xattr::get_deref(path, xname(&name))
        .map_err(io)?
        .ok_or(DmError::Enoent)
}

/// dm_remove_dmattr (ENOENT when the attribute is not set).
pub fn remove_dmattr(path: &Path, name: &[u8]) -> Result<(), DmError> {
    let name = attr_name(name)?;
    xattr::remove_deref(path, xname(&name)).map_err(io)?;
    bump_change(path)?;
    Ok(())
}

/// A DM attribute: name and value.
pub type DmAttr = ([u8; 8], Vec<u8>);

/// dm_getall_dmattr: every DM attribute, by name.
pub fn getall_dmattr(path: &Path) -> Result<Vec<DmAttr>, DmError> {
    let mut out = Vec::new();
    for n in xattr::list_deref(path).map_err(io)? {
        let Some(hexname) = n.to_str().and_then(|s| s.strip_prefix(DM_PREFIX)) else {
            continue;
        };
        let Some(name) = hex::decode(hexname)
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
        else {
            continue;
        };
        if let Some(v) = xattr::get_deref(path, &n).map_err(io)? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether the object has DM attributes (dt_pers).
pub fn has_dmattrs(path: &Path) -> Result<bool, DmError> {
    Ok(xattr::list_deref(path)
        .map_err(io)?
        .any(|n| n.as_encoded_bytes().starts_with(DM_PREFIX.as_bytes())))
}

/// DM_REGION_* flags.
pub mod flags {
    /// DM_REGION_READ.
    pub const READ: u8 = 1;
    /// DM_REGION_WRITE.
    pub const WRITE: u8 = 2;
    /// DM_REGION_TRUNCATE.
    pub const TRUNCATE: u8 = 4;
    /// All of them.
    pub const ALL: u8 = READ | WRITE | TRUNCATE;
}

/// dm_region_t: `size` 0 is from `offset` through end of file and beyond; no flag set is
/// DM_REGION_NOEVENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start.
    pub offset: u64,
    /// Length (0: to EOF and beyond).
    pub size: u64,
    /// DM_REGION_* bits.
    pub flags: u8,
}

impl Region {
    fn end(&self) -> Option<u64> {
        (self.size != 0).then(|| self.offset.saturating_add(self.size))
    }

    /// Whether `[offset, offset+len)` touches this region.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len.max(1));
        end > self.offset && self.end().is_none_or(|e| offset < e)
    }
}

/// dm_set_region: replace the object's regions; returns exactflag (always true: regions are
/// kept exactly as given). More than MAX_REGIONS is E2BIG, unknown flag bits EINVAL.
pub fn set_regions(path: &Path, regions: &[Region]) -> Result<bool, DmError> {
    if regions.len() > MAX_REGIONS {
        return Err(DmError::E2big);
    }
    if regions.iter().any(|r| r.flags & !flags::ALL != 0) {
        return Err(DmError::Einval);
    }
    if regions.is_empty() {
        match xattr::remove_deref(path, REGIONS) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(io(e)),
        }
        return Ok(true);
    }
    let mut v = Vec::with_capacity(regions.len() * 17);
    for r in regions {
        v.extend_from_slice(&r.offset.to_le_bytes());
        v.extend_from_slice(&r.size.to_le_bytes());
        v.push(r.flags);
    }
    xattr::set_deref(path, REGIONS, &v).map_err(io)?;
    Ok(true)
}

/// dm_get_region: the object's regions (none recorded: none).
pub fn get_regions(path: &Path) -> Result<Vec<Region>, DmError> {
    let Some(v) = xattr::get_deref(path, REGIONS).map_err(io)? else {
        return Ok(vec![]);
    };
    if v.len() % 17 != 0 {
        return Err(DmError::Estale);
    }
    Ok(v.chunks_exact(17)
        .map(|c| Region {
            offset: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            size: u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")),
            flags: c[16],
        })
        .collect())
}

/// Whether an access of `[offset, offset+len)` with `flag` raises a data event.
pub fn raises(regions: &[Region], offset: u64, len: u64, flag: u8) -> bool {
    regions
        .iter()
        .any(|r| r.flags & flag != 0 && r.overlaps(offset, len))
}

/// dm_set_eventlist on an object (persistent).
pub fn set_eventlist(path: &Path, set: EventSet) -> Result<(), DmError> {
    let bits = serde_json::to_vec(&set).map_err(|_| DmError::Estale)?;
    xattr::set_deref(path, EVENTS, &bits).map_err(io)
}

/// dm_get_eventlist on an object.
pub fn get_eventlist(path: &Path) -> Result<EventSet, DmError> {
    match xattr::get_deref(path, EVENTS).map_err(io)? {
        None => Ok(EventSet::empty()),
        Some(b) => serde_json::from_slice(&b).map_err(|_| DmError::Estale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::EventType;

    fn root() {
        crate::dm::require_root("trusted.* extended attributes");
    }

    #[test]
    fn dm_attributes_live_with_the_file() {
        root();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(set_dmattr(&p, b"short", b"v"), Err(DmError::Einval));
        assert_eq!(set_dmattr(&p, b"ninechars", b"v"), Err(DmError::Einval));
        assert_eq!(
            set_dmattr(&p, b"toolarge", &vec![0; MAX_ATTRIBUTE_SIZE + 1]),
            Err(DmError::E2big)
        );
        assert_eq!(get_dmattr(&p, b"migrated"), Err(DmError::Enoent));
        assert_eq!(remove_dmattr(&p, b"migrated"), Err(DmError::Enoent));
        assert!(!has_dmattrs(&p).unwrap());
        let c0 = change(&p).unwrap();
        set_dmattr(&p, b"migrated", b"tier=tape").unwrap();
        set_dmattr(&p, b"bi\0\x01\x02\x03\x04\xff", &[0u8; MAX_ATTRIBUTE_SIZE]).unwrap();
        assert!(change(&p).unwrap() > c0);
        // renamed and hard-linked: the attributes go with the file
        let q = d.path().join("g");
        std::fs::rename(&p, &q).unwrap();
        std::fs::hard_link(&q, d.path().join("h")).unwrap();
        assert_eq!(
            get_dmattr(&d.path().join("h"), b"migrated").unwrap(),
            b"tier=tape"
        );
        let all = getall_dmattr(&q).unwrap();
        assert_eq!(all.len(), 2);
        assert!(has_dmattrs(&q).unwrap());
        remove_dmattr(&q, b"migrated").unwrap();
        assert_eq!(getall_dmattr(&q).unwrap().len(), 1);
        // a file that is gone
        assert_eq!(get_dmattr(&p, b"migrated"), Err(DmError::Ebadf));
        // ours are hidden names
        assert!(is_hidden(std::ffi::OsStr::new("trusted.strata.rg")));
        assert!(!is_hidden(std::ffi::OsStr::new("user.mine")));
    }

    #[test]
    fn regions_and_event_lists_persist_and_decide_data_events() {
        root();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(get_regions(&p).unwrap(), vec![]);
        let rs = [
            Region {
                offset: 0,
                size: 4096,
                flags: flags::READ,
            },
            Region {
                offset: 1 << 20,
                size: 0,
                flags: flags::WRITE | flags::TRUNCATE,
            },
        ];
        assert!(set_regions(&p, &rs).unwrap());
        assert_eq!(get_regions(&p).unwrap(), rs);
        assert!(raises(&rs, 100, 10, flags::READ));
        assert!(!raises(&rs, 100, 10, flags::WRITE));
        assert!(!raises(&rs, 4096, 10, flags::READ), "end is exclusive");
        assert!(
            raises(&rs, u64::MAX - 5, 1, flags::WRITE),
            "size 0: to EOF and beyond"
        );
        assert!(!raises(&rs, 8192, 100, flags::WRITE));
        assert_eq!(
            set_regions(
                &p,
                &[Region {
                    offset: 0,
                    size: 1,
                    flags: 8
                }]
            ),
            Err(DmError::Einval)
        );
        let many = vec![rs[0]; MAX_REGIONS + 1];
        assert_eq!(set_regions(&p, &many), Err(DmError::E2big));
        assert!(set_regions(&p, &[]).unwrap());
        assert_eq!(get_regions(&p).unwrap(), vec![]);
        let set = EventSet::of(&[EventType::Destroy, EventType::Attribute]);
        set_eventlist(&p, set).unwrap();
        assert_eq!(get_eventlist(&p).unwrap(), set);
    }
}
