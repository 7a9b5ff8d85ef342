//! The managed filesystem behaves like its backing filesystem: a randomized sequence of
//! file operations applied to the mount and to a plain directory gives the same results
//! (each operation's outcome and errno, then contents, sizes, modes, link counts, symlink
//! targets, extended attributes and directory listings). Needs root (FUSE mounts).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use strata_tests::dm::need_root;
use strata_tests::Daemon;

/// xorshift64*: the same sequence for both trees, and a seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

const NAMES: &[&str] = &[
    "a", "b", "c", "e", "f", "d1", "d1/a", "d1/b", "d1/d2", "d1/d2/c", "d3", "d3/x",
];

#[derive(Debug, Clone)]
enum Op {
    Write(String, u64, usize, u8),
    Append(String, usize, u8),
    Truncate(String, u64),
    Read(String),
    Mkdir(String),
    Rmdir(String),
    Unlink(String),
    Rename(String, String),
    Exchange(String, String),
    NoReplace(String, String),
    Link(String, String),
    Symlink(String, String),
    Readlink(String),
    Chmod(String, u32),
    Mmap(String, u64, u8),
    Sparse(String, u64),
    SeekData(String, u64),
    SetXattr(String, String, Vec<u8>),
    GetXattr(String, String),
    List(String),
    Stat(String),
}

fn gen(r: &mut Rng) -> Op {
    let n = |r: &mut Rng| r.pick(NAMES).to_string();
    match r.below(24) {
        0 | 1 | 21 | 22 => Op::Write(
            n(r),
            r.below(20_000),
            r.below(9000) as usize,
            r.below(255) as u8 + 1,
        ),
        2 => Op::Append(n(r), r.below(5000) as usize, r.below(255) as u8 + 1),
        3 => Op::Truncate(n(r), r.below(30_000)),
        4 => Op::Read(n(r)),
        5 | 23 => Op::Mkdir(n(r)),
        6 => Op::Rmdir(n(r)),
        7 => Op::Unlink(n(r)),
        8 => Op::Rename(n(r), n(r)),
        9 => Op::Exchange(n(r), n(r)),
        10 => Op::NoReplace(n(r), n(r)),
        11 => Op::Link(n(r), n(r)),
        12 => Op::Symlink(n(r), n(r)),
        13 => Op::Readlink(n(r)),
        14 => Op::Chmod(
            n(r),
            [0o600, 0o644, 0o755, 0o700, 0o4755, 0o2750][r.below(6) as usize],
        ),
        15 => Op::Mmap(n(r), r.below(30_000), r.below(255) as u8 + 1),
        16 => Op::Sparse(n(r), (1 << 20) + r.below(1 << 20)),
        17 => Op::SeekData(n(r), r.below(2 << 20)),
        18 => Op::SetXattr(
            n(r),
            format!("user.k{}", r.below(3)),
            vec![r.below(255) as u8; r.below(40) as usize],
        ),
        19 => Op::GetXattr(n(r), format!("user.k{}", r.below(3))),
        _ => {
            if r.below(2) == 0 {
                Op::List(n(r))
            } else {
                Op::Stat(n(r))
            }
        }
    }
}

fn errno(e: std::io::Error) -> String {
    format!("errno {}", e.raw_os_error().unwrap_or(-1))
}

fn rename2(root: &Path, a: &str, b: &str, flags: u32) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(root.join(a).as_os_str().as_bytes()).unwrap();
    let b = CString::new(root.join(b).as_os_str().as_bytes()).unwrap();
    // SAFETY: two NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: NUL-terminated path and name, a buffer of the length given.
    let rc = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

fn setxattr(p: &Path, name: &str, v: &[u8]) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name, a value of the length given.
    let rc = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn listxattr(p: &Path) -> std::io::Result<Vec<String>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated path, a buffer of the length given.
    let rc = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    let mut v: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// Apply `op` under `root`: what it observably did.
fn apply(root: &Path, op: &Op) -> String {
    let p = |n: &str| root.join(n);
    let r: std::io::Result<String> = (|| match op {
        Op::Write(f, off, len, b) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p(f))?;
            file.write_all_at(&vec![*b; *len], *off)?;
            Ok(String::new())
        }
        Op::Append(f, len, b) => {
            use std::io::Write;
            let mut file = OpenOptions::new().append(true).create(true).open(p(f))?;
            file.write_all(&vec![*b; *len])?;
            Ok(String::new())
        }
        Op::Truncate(f, len) => {
            OpenOptions::new().write(true).open(p(f))?.set_len(*len)?;
            Ok(String::new())
        }
        Op::Read(f) => {
            let mut v = Vec::new();
            File::open(p(f))?.read_to_end(&mut v)?;
            Ok(format!("{} bytes crc {:08x}", v.len(), crc32c::crc32c(&v)))
        }
        Op::Mkdir(d) => std::fs::create_dir(p(d)).map(|_| String::new()),
        Op::Rmdir(d) => std::fs::remove_dir(p(d)).map(|_| String::new()),
        Op::Unlink(f) => std::fs::remove_file(p(f)).map(|_| String::new()),
        Op::Rename(a, b) => std::fs::rename(p(a), p(b)).map(|_| String::new()),
        Op::Exchange(a, b) => rename2(root, a, b, libc::RENAME_EXCHANGE).map(|_| String::new()),
        Op::NoReplace(a, b) => rename2(root, a, b, libc::RENAME_NOREPLACE).map(|_| String::new()),
        Op::Link(a, b) => std::fs::hard_link(p(a), p(b)).map(|_| String::new()),
        Op::Symlink(t, n) => std::os::unix::fs::symlink(t, p(n)).map(|_| String::new()),
        Op::Readlink(n) => std::fs::read_link(p(n)).map(|t| t.display().to_string()),
        Op::Chmod(n, m) => std::fs::set_permissions(p(n), std::fs::Permissions::from_mode(*m))
            .map(|_| String::new()),
        Op::Mmap(f, off, b) => {
            let file = OpenOptions::new().read(true).write(true).open(p(f))?;
            let len = file.metadata()?.len();
            if len == 0 || !file.metadata()?.is_file() {
                return Ok("empty".into());
            }
            // SAFETY: the file is only changed through this map while it exists.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
            let i = (*off % len) as usize;
            let old = map[i];
            map[i] = *b;
            map.flush()?;
            Ok(format!("was {old}"))
        }
        Op::Sparse(f, off) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p(f))?;
            file.write_all_at(b"sparse", *off)?;
            Ok(String::new())
        }
        Op::SeekData(f, off) => {
            let file = File::open(p(f))?;
            if !file.metadata()?.is_file() {
                // FUSE directories do not forward SEEK_DATA (the kernel answers ENXIO)
                return Ok("not a file".into());
            }
            // SAFETY: lseek on a descriptor we own.
            let r = unsafe { libc::lseek(file.as_raw_fd(), *off as i64, libc::SEEK_DATA) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // where data starts, in 4 KiB blocks (allocation granularity is the backing FS's)
            Ok(format!("data at block {}", r / 4096))
        }
        Op::SetXattr(n, k, v) => setxattr(&p(n), k, v).map(|_| String::new()),
        Op::GetXattr(n, k) => getxattr(&p(n), k).map(|v| format!("{v:?}")),
        Op::List(d) => {
            let mut v: Vec<String> = std::fs::read_dir(p(d))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            v.sort();
            Ok(v.join(","))
        }
        Op::Stat(n) => {
            let m = std::fs::symlink_metadata(p(n))?;
            Ok(format!(
                "mode {:o} nlink {} size {}",
                m.mode(),
                m.nlink(),
                if m.is_dir() { 0 } else { m.len() }
            ))
        }
    })();
    match r {
        Ok(s) => format!("ok {s}"),
        Err(e) => errno(e),
    }
}

/// Everything observable about a tree, by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let rel = dir.strip_prefix(root).unwrap().to_path_buf();
        out.insert(
            rel.join("<listing>"),
            names
                .iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(","),
        );
        for n in names {
            let p = dir.join(&n);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mut desc = format!(
                "mode {:o} nlink {} uid {} gid {}",
                m.mode(),
                m.nlink(),
                m.uid(),
                m.gid()
            );
            if m.is_file() {
                let v = std::fs::read(&p).unwrap();
                desc += &format!(" size {} crc {:08x}", v.len(), crc32c::crc32c(&v));
            } else if m.file_type().is_symlink() {
                desc += &format!(" -> {}", std::fs::read_link(&p).unwrap().display());
            } else if m.is_dir() {
                stack.push(p.clone());
            }
            if !m.file_type().is_symlink() {
                desc += &format!(" xattrs {:?}", listxattr(&p).unwrap());
            }
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), desc);
        }
    }
    out
}

#[test]
fn randomized_operations_match_a_plain_directory() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("posix", &[], |_| {});
    let plain = d.dir.join("plain");
    std::fs::create_dir(&plain).unwrap();
    let seeds: Vec<u64> = match std::env::var("STRATA_POSIX_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => vec![0x5eed_0001, 0x5eed_0002, 0x5eed_0003],
    };
    let (mut applied, mut succeeded) = (0, 0);
    for seed in seeds {
        for root in [&m.mnt, &plain] {
            for e in std::fs::read_dir(root).unwrap() {
                let p = e.unwrap().path();
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        let mut r = Rng(seed);
        for i in 0..2000 {
            let op = gen(&mut r);
            let a = apply(&m.mnt, &op);
            let b = apply(&plain, &op);
            assert_eq!(
                a, b,
                "seed {seed:#x} step {i}: {op:?}: mount vs plain directory"
            );
            applied += 1;
            succeeded += usize::from(a.starts_with("ok"));
            if i % 100 == 99 {
                assert_eq!(
                    snapshot(&m.mnt),
                    snapshot(&plain),
                    "seed {seed:#x} after step {i}"
                );
            }
        }
        let (sm, sp) = (snapshot(&m.mnt), snapshot(&plain));
        assert_eq!(sm, sp, "seed {seed:#x}: final trees differ");
        // the backing directory holds exactly what the mount shows
        assert_eq!(
            snapshot(&m.backing),
            sm,
            "seed {seed:#x}: backing differs from mount"
        );
    }
    eprintln!("{applied} operations applied to both trees, {succeeded} of them succeeded");
    // the sequence exercises the filesystem, not only its error paths
    assert!(
        succeeded * 4 > applied,
        "{succeeded} of {applied} succeeded"
    );
}

#[test]
fn permissions_as_another_user() {
    need_root();
    let d = Daemon::start();
    let m = d.mount("perm", &[], |b| {
        std::fs::write(b.join("secret"), b"s").unwrap();
        std::fs::set_permissions(b.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(b.join("open")).unwrap();
        std::fs::set_permissions(b.join("open"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(b.join("open/roots"), b"r").unwrap();
        for f in ["suid-w", "suid-t"] {
            std::fs::write(b.join(f), b"x").unwrap();
            std::fs::set_permissions(b.join(f), std::fs::Permissions::from_mode(0o6777)).unwrap();
        }
    });
    std::fs::set_permissions(&m.mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
    // run shell commands as nobody through the mount
    let sh = |script: &str| {
        use std::os::unix::process::CommandExt;
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&m.mnt)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // default_permissions: modes are enforced by the kernel
    assert!(!sh("cat secret").0);
    assert!(!sh("touch new").0, "the root directory is 755 root");
    // a new file belongs to its creator, with the mode asked (umask applied once)
    assert!(sh("umask 022; echo hi > open/mine").0);
    let md = std::fs::metadata(m.backing.join("open/mine")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (65534, 65534, 0o644)
    );
    let md = std::fs::metadata(m.mnt.join("open/mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    assert!(sh("mkdir open/d && ln -s mine open/l && ln open/mine open/h").0);
    let md = std::fs::symlink_metadata(m.backing.join("open/l")).unwrap();
    assert_eq!(md.uid(), 65534);
    assert_eq!(
        std::fs::metadata(m.backing.join("open/mine"))
            .unwrap()
            .nlink(),
        2
    );
    // the sticky directory: nobody may not remove root's file
    assert!(!sh("rm -f open/roots").0);
    assert!(m.backing.join("open/roots").exists());
    // an unprivileged write or truncate drops setuid and setgid, as on the backing FS
    assert!(sh("echo more >> suid-w").0);
    assert!(sh(": > suid-t").0);
    for f in ["suid-w", "suid-t"] {
        let mode = std::fs::metadata(m.backing.join(f)).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o777, "{f}");
    }
    // Strata's own attributes are neither visible nor writable through the mount
    let f = m.mnt.join("secret");
    assert!(listxattr(&f)
        .unwrap()
        .iter()
        .all(|n| !n.starts_with("trusted.strata")));
    assert!(setxattr(&f, "trusted.strata.rg", b"x").is_err());
}

#[test]
fn open_flags_appends_and_directory_listings() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    need_root();
    let d = Daemon::start();
    let m = d.mount("flags", &[], |b| {
        std::fs::write(b.join("plain"), b"plain").unwrap();
        std::fs::write(b.join("managed"), vec![b'A'; 8192]).unwrap();
    });
    // a managed file (a region, nothing disposed): served by the daemon
    d.ok(&[
        "dm",
        "region",
        "set",
        m.mnt.join("managed").to_str().unwrap(),
        "0:0:r",
    ]);
    // several opens of one file at once, with different flags, all work (they share the
    // inode's one passthrough backing file); writes through one are seen through the other
    {
        let p = m.mnt.join("plain");
        let r = File::open(&p).unwrap();
        let w = File::options().read(true).write(true).open(&p).unwrap();
        let a = File::options().append(true).open(&p).unwrap();
        w.write_all_at(b"PL", 0).unwrap();
        (&a).write_all(b"+").unwrap();
        let mut got = String::new();
        (&r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "PLain+");
        // SAFETY: a read-only map of a file only this test changes, through `w`.
        let map = unsafe { memmap2::Mmap::map(&r).unwrap() };
        assert_eq!(&map[..2], b"PL");
    }
    // the same for a file the daemon serves (a region): opens follow the first one
    {
        let p = m.mnt.join("managed");
        let r = File::open(&p).unwrap();
        let w = File::options().write(true).open(&p).unwrap();
        w.write_all_at(b"Z", 0).unwrap();
        let mut b = [0u8; 1];
        r.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"Z");
        w.write_all_at(b"A", 0).unwrap();
    }
    // O_NOFOLLOW on a regular file is fine
    for f in ["plain", "managed"] {
        let mut s = String::new();
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(m.mnt.join(f))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert!(!s.is_empty());
    }
    // O_DIRECT through the daemon (aligned buffers, as O_DIRECT wants)
    let o = std::process::Command::new("dd")
        .arg(format!("if={}", m.mnt.join("managed").display()))
        .args(["of=/dev/null", "bs=4096", "count=2", "iflag=direct"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let o = std::process::Command::new("dd")
        .arg(format!("of={}", m.mnt.join("managed").display()))
        .args([
            "if=/dev/zero",
            "bs=4096",
            "count=1",
            "oflag=direct",
            "conv=notrunc",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // O_APPEND appends at the real end, even when the file grew behind the kernel's back
    let mut f = File::options()
        .append(true)
        .open(m.mnt.join("managed"))
        .unwrap();
    f.write_all(b"BB").unwrap();
    File::options()
        .append(true)
        .open(m.backing.join("managed"))
        .unwrap()
        .write_all(b"CCCC")
        .unwrap();
    f.write_all(b"DD").unwrap();
    let back = std::fs::read(m.backing.join("managed")).unwrap();
    assert_eq!(&back[8192..], b"BBCCCCDD");
    // a listing read again from the start (rewinddir) on the same open directory sees
    // what was created since
    let path = std::ffi::CString::new(m.mnt.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: opendir/readdir/rewinddir/closedir on one DIR stream owned by this block;
    // each dirent is read before the next readdir call.
    let (before, after) = unsafe {
        let dir = libc::opendir(path.as_ptr());
        assert!(!dir.is_null());
        let count = |dir: *mut libc::DIR| {
            let mut names = Vec::new();
            loop {
                let e = libc::readdir(dir);
                if e.is_null() {
                    break;
                }
                names.push(
                    std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            names
        };
        let before = count(dir);
        std::fs::write(m.mnt.join("new"), b"n").unwrap();
        libc::rewinddir(dir);
        let after = count(dir);
        libc::closedir(dir);
        (before, after)
    };
    assert!(!before.contains(&"new".to_string()));
    assert!(after.contains(&"new".to_string()), "{after:?}");
}
