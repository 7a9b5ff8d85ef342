//! Managed filesystem benchmark. Prints, from one run on this machine (root: it mounts):
//! - sequential 1 MiB writes and reads through the mount against the backing directory
//!   itself, for an unmanaged file (kernel passthrough; target >= 0.9x) and for a managed
//!   file with no event pending (a region, no disposition: served by the daemon);
//! - the round trip of a synchronous READ event (a 4 KiB read of a managed file whose READ
//!   event is answered by a policy) with the hsm-age-policy component in the plugin host,
//!   against the same crate compiled natively and called in its place (target <= 1.5x);
//!   and the same read with no event, for scale.
//!
//! Run: `cargo bench -p strata-runtime --bench dm` (components from
//! scripts/build-plugins.sh). `STRATA_BENCH_QUICK=1` shortens it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_client::dm::{EventSet, EventType, Region};
use strata_runtime::dm::service::{Dm, DmConfig};
use strata_runtime::fs::route::{Backend, Policy, Router, WasmPolicy};
use strata_runtime::fs::Mounts;
use strata_runtime::plugin::{
    self as wit, DmBackend, HostConfig, MemKv, PluginHost, PluginKind, SlotSettings,
};

fn component(name: &str) -> Vec<u8> {
    let dir = std::env::var_os("STRATA_COMPONENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-components")
        });
    let p = dir.join(format!("{name}.wasm"));
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-plugins.sh)", p.display()))
}

const MIB: usize = 1 << 20;

/// Writing `total` bytes sequentially in 1 MiB writes: GiB/s.
fn write_rate(path: &Path, total: usize) -> f64 {
    let buf = vec![0x5au8; MIB];
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let t0 = Instant::now();
    for i in 0..total / MIB {
        f.write_all_at(&buf, (i * MIB) as u64).unwrap();
    }
    total as f64 / t0.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

/// Reading `total` bytes sequentially in 1 MiB reads: GiB/s.
fn read_rate(path: &Path, total: usize) -> f64 {
    let mut buf = vec![0u8; MIB];
    let f = File::open(path).unwrap();
    let t0 = Instant::now();
    for i in 0..total / MIB {
        f.read_exact_at(&mut buf, (i * MIB) as u64).unwrap();
    }
    total as f64 / t0.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

/// Mean latency of a 4 KiB read at offset 0 (median of `rounds` batches of `n`).
fn read_latency(path: &Path, n: usize, rounds: usize) -> Duration {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut means = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        for _ in 0..n {
            f.read_exact_at(&mut buf, 0).unwrap();
        }
        means.push(t0.elapsed() / n as u32);
    }
    means.sort();
    means[means.len() / 2]
}

/// hsm-age-policy compiled natively, behind the same `Policy` interface as the component.
struct NativePolicy {
    policy: Mutex<hsm_age_policy::AgePolicy>,
}

mod native {
    //! The SDK's `DmHost` over the runtime's `DmBackend` (conversions between the two
    //! bindings of the same WIT types).
    use super::wit;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use strata_plugin_sdk::dm as sdk;
    use strata_plugin_sdk::{Env, KvError, LogLevel, Timestamp};

    pub struct Host {
        pub backend: Arc<dyn wit::DmBackend>,
        pub token: u64,
        pub kv: BTreeMap<String, Vec<u8>>,
    }

    pub fn err(e: wit::DmError) -> sdk::DmError {
        use sdk::DmError as S;
        use wit::DmError as W;
        match e {
            W::Enosys => S::Enosys,
            W::Enotready => S::Enotready,
            W::Enomem => S::Enomem,
            W::Estale => S::Estale,
            W::Einval => S::Einval,
            W::Ebadf => S::Ebadf,
            W::Eperm => S::Eperm,
            W::Esrch => S::Esrch,
            W::Efault => S::Efault,
            W::Ebusy => S::Ebusy,
            W::Erofs => S::Erofs,
            W::Eacces => S::Eacces,
            W::Enoent => S::Enoent,
            W::E2big => S::E2big,
            W::Eagain => S::Eagain,
            W::Eexist => S::Eexist,
            W::Eio => S::Eio,
            W::Enospc => S::Enospc,
        }
    }

    fn flags_in(f: wit::RegionFlags) -> sdk::RegionFlags {
        let mut out = sdk::RegionFlags::empty();
        for (w, s) in [
            (wit::RegionFlags::READ, sdk::RegionFlags::READ),
            (wit::RegionFlags::WRITE, sdk::RegionFlags::WRITE),
            (wit::RegionFlags::TRUNCATE, sdk::RegionFlags::TRUNCATE),
        ] {
            if f.contains(w) {
                out |= s;
            }
        }
        out
    }

    fn flags_out(f: sdk::RegionFlags) -> wit::RegionFlags {
        let mut out = wit::RegionFlags::empty();
        for (w, s) in [
            (wit::RegionFlags::READ, sdk::RegionFlags::READ),
            (wit::RegionFlags::WRITE, sdk::RegionFlags::WRITE),
            (wit::RegionFlags::TRUNCATE, sdk::RegionFlags::TRUNCATE),
        ] {
            if f.contains(s) {
                out |= w;
            }
        }
        out
    }

    pub fn event(e: &wit::Event) -> sdk::Event {
        let data = match &e.data {
            wit::EventData::Data(d) => sdk::EventData::Data(sdk::DataEvent {
                handle: d.handle.clone(),
                offset: d.offset,
                length: d.length,
            }),
            wit::EventData::User(u) => sdk::EventData::User(u.clone()),
            wit::EventData::Cancel(c) => sdk::EventData::Cancel(sdk::CancelEvent {
                sequence: c.sequence,
                token: c.token,
            }),
            // the benchmark disposes READ events only
            other => panic!("unexpected event data {other:?}"),
        };
        sdk::Event {
            kind: match e.kind {
                wit::EventType::Read => sdk::EventType::Read,
                wit::EventType::Write => sdk::EventType::Write,
                wit::EventType::Truncate => sdk::EventType::Truncate,
                _ => sdk::EventType::User,
            },
            token: e.token,
            sequence: e.sequence,
            session: e.session,
            data,
        }
    }

    pub fn response(r: sdk::Response) -> wit::Response {
        match r {
            sdk::Response::Continue => wit::Response::Continue,
            sdk::Response::Abort(e) => wit::Response::Abort(e),
            sdk::Response::DontCare => wit::Response::DontCare,
        }
    }

    impl Env for Host {
        fn log(&mut self, _level: LogLevel, _message: &str) {}
        fn now(&mut self) -> Timestamp {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Timestamp {
                seconds: d.as_secs() as i64,
                nanoseconds: d.subsec_nanos(),
            }
        }
        fn monotonic_ns(&mut self) -> u64 {
            0
        }
        fn kv_get(&mut self, key: &str) -> Option<Vec<u8>> {
            self.kv.get(key).cloned()
        }
        fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
            self.kv.insert(key.into(), value.to_vec());
            Ok(())
        }
        fn kv_delete(&mut self, key: &str) -> Result<bool, KvError> {
            Ok(self.kv.remove(key).is_some())
        }
        fn kv_keys(&mut self, prefix: &str) -> Vec<String> {
            self.kv
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect()
        }
    }

    impl sdk::DmHost for Host {
        fn stat(&mut self, handle: &[u8]) -> Result<sdk::FileStat, sdk::DmError> {
            let s = self.backend.stat(self.token, handle).map_err(err)?;
            let t = |t: wit::Timestamp| Timestamp {
                seconds: t.seconds,
                nanoseconds: t.nanoseconds,
            };
            Ok(sdk::FileStat {
                handle: s.handle,
                name: s.name,
                path: s.path,
                dev: s.dev,
                ino: s.ino,
                mode: s.mode,
                nlink: s.nlink,
                uid: s.uid,
                gid: s.gid,
                rdev: s.rdev,
                size: s.size,
                atime: t(s.atime),
                mtime: t(s.mtime),
                ctime: t(s.ctime),
                dtime: t(s.dtime),
                blksize: s.blksize,
                blocks: s.blocks,
                change: s.change,
                event_mask: vec![],
                has_dm_attributes: s.has_dm_attributes,
                has_managed_regions: s.has_managed_regions,
            })
        }
        fn get_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, sdk::DmError> {
            self.backend
                .get_dmattr(self.token, handle, name)
                .map_err(err)
        }
        fn set_dmattr(
            &mut self,
            handle: &[u8],
            name: &[u8],
            value: &[u8],
        ) -> Result<(), sdk::DmError> {
            self.backend
                .set_dmattr(self.token, handle, name, value)
                .map_err(err)
        }
        fn remove_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<(), sdk::DmError> {
            self.backend
                .remove_dmattr(self.token, handle, name)
                .map_err(err)
        }
        fn get_regions(&mut self, handle: &[u8]) -> Result<Vec<sdk::Region>, sdk::DmError> {
            Ok(self
                .backend
                .get_regions(self.token, handle)
                .map_err(err)?
                .into_iter()
                .map(|r| sdk::Region {
                    offset: r.offset,
                    size: r.size,
                    flags: flags_in(r.flags),
                })
                .collect())
        }
        fn set_regions(
            &mut self,
            handle: &[u8],
            regions: &[sdk::Region],
        ) -> Result<bool, sdk::DmError> {
            let r: Vec<wit::Region> = regions
                .iter()
                .map(|r| wit::Region {
                    offset: r.offset,
                    size: r.size,
                    flags: flags_out(r.flags),
                })
                .collect();
            self.backend
                .set_regions(self.token, handle, &r)
                .map_err(err)
        }
        fn allocinfo(
            &mut self,
            handle: &[u8],
            offset: u64,
        ) -> Result<Vec<sdk::Extent>, sdk::DmError> {
            Ok(self
                .backend
                .allocinfo(self.token, handle, offset)
                .map_err(err)?
                .into_iter()
                .map(|e| sdk::Extent {
                    kind: match e.kind {
                        wit::ExtentType::Res => sdk::ExtentType::Res,
                        wit::ExtentType::Hole => sdk::ExtentType::Hole,
                    },
                    offset: e.offset,
                    length: e.length,
                })
                .collect())
        }
        fn probe_hole(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<(u64, u64), sdk::DmError> {
            self.backend
                .probe_hole(self.token, handle, offset, length)
                .map_err(err)
        }
        fn punch_hole(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<(), sdk::DmError> {
            self.backend
                .punch_hole(self.token, handle, offset, length)
                .map_err(err)
        }
        fn read_invis(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<Vec<u8>, sdk::DmError> {
            self.backend
                .read_invis(self.token, handle, offset, length)
                .map_err(err)
        }
        fn write_invis(
            &mut self,
            handle: &[u8],
            offset: u64,
            data: &[u8],
            sync: bool,
        ) -> Result<u64, sdk::DmError> {
            self.backend
                .write_invis(self.token, handle, offset, data, sync)
                .map_err(err)
        }
        fn request_migrate(&mut self, handle: &[u8], tier: &str) -> Result<(), sdk::DmError> {
            self.backend
                .request_migrate(self.token, handle, tier)
                .map_err(err)
        }
        fn request_recall(
            &mut self,
            handle: &[u8],
            offset: u64,
            length: u64,
        ) -> Result<(), sdk::DmError> {
            self.backend
                .request_recall(self.token, handle, offset, length)
                .map_err(err)
        }
    }
}

impl Policy for NativePolicy {
    fn on_event(&self, event: &wit::Event, backend: Arc<dyn DmBackend>) -> wit::Response {
        use strata_plugin_sdk::dm::DmPolicy;
        let mut host = native::Host {
            backend,
            token: event.token,
            kv: Default::default(),
        };
        let e = native::event(event);
        let mut p = self.policy.lock().unwrap();
        native::response(p.on_event(&e, &mut host))
    }
    fn on_notify(&self, _event: &wit::Event, _backend: Arc<dyn DmBackend>) {}
}

fn main() {
    let quick = std::env::var_os("STRATA_BENCH_QUICK").is_some();
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    assert!(
        root,
        "PREREQUISITE MISSING: the managed filesystem benchmark mounts FUSE: run it as root"
    );
    let total = if quick { 64 * MIB } else { 512 * MIB };
    let rounds = if quick { 3 } else { 7 };
    let events = if quick { 500 } else { 5_000 };

    let tmp = tempfile::Builder::new()
        .prefix("strata-bench")
        .tempdir_in("/tmp")
        .unwrap();
    let backing = tmp.path().join("back");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    for f in ["plain", "managed", "event"] {
        let file = File::create(backing.join(f)).unwrap();
        file.set_len(total as u64).unwrap();
        file.write_all_at(&vec![1u8; total], 0).unwrap();
    }
    let db = Arc::new(strata_runtime::store::Db::open(&tmp.path().join("db.redb")).unwrap());
    let dm = Arc::new(Dm::open(&DmConfig::default(), db.clone()).unwrap());
    let mounts = Arc::new(Mounts::new(dm.clone()));
    let info = mounts.mount(&backing, &mnt, false).expect("mount");
    let _unmount = Unmount(mounts.clone(), mnt.clone());
    let fs = info.fs;
    println!(
        "managed filesystem benchmark ({}): {} MiB files, best of {rounds}; kernel passthrough: {}",
        if quick { "quick" } else { "full" },
        total / MIB,
        info.passthrough
    );

    // regions on "managed" and "event": served by the daemon (direct I/O); a session
    // for the setup
    let sid = match dm.call(
        1,
        strata_client::dm::DmRequest::CreateSession {
            old: 0,
            info: b"bench".to_vec(),
        },
        vec![],
    ) {
        strata_runtime::dm::service::DmStep::Done(strata_client::dm::DmReply::Session { sid }) => {
            sid
        }
        _ => panic!("session"),
    };
    for (name, flags) in [("managed", 1u8), ("event", 1u8)] {
        let h = strata_runtime::dm::handle::Handle::of_path(fs, &backing.join(name))
            .unwrap()
            .encode();
        let (r, _) = mounts.call(
            strata_client::dm::DmRequest::SetRegion {
                sid,
                token: 0,
                handle: h,
                regions: vec![Region {
                    offset: 0,
                    size: 0,
                    flags,
                }],
            },
            vec![],
        );
        assert!(
            matches!(r, strata_client::dm::DmReply::Exact { .. }),
            "{r:?}"
        );
    }

    println!("\nsequential 1 MiB I/O (best of {rounds}, interleaved)  backing    mount   ratio");
    for (label, name) in [
        ("unmanaged (passthrough)", "plain"),
        ("managed, no event pending", "managed"),
    ] {
        let (b, m) = (backing.join(name), mnt.join(name));
        // warm both paths once, then alternate so that drift hits both alike
        write_rate(&b, total);
        write_rate(&m, total);
        let (mut wb, mut wm, mut rb, mut rm) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..rounds {
            wb = wb.max(write_rate(&b, total));
            wm = wm.max(write_rate(&m, total));
            rb = rb.max(read_rate(&b, total));
            rm = rm.max(read_rate(&m, total));
        }
        println!(
            "  write {label:<26} {wb:6.2} {wm:8.2}   {:.2}x GiB/s",
            wm / wb
        );
        println!(
            "  read  {label:<26} {rb:6.2} {rm:8.2}   {:.2}x GiB/s",
            rm / rb
        );
    }

    // READ event round trips
    let event_file = mnt.join("event");
    let no_event = read_latency(&event_file, events, rounds);
    let cache = tempfile::tempdir().unwrap();
    let host = PluginHost::new(
        HostConfig {
            cache_dir: Some(cache.path().to_path_buf()),
            ..HostConfig::default()
        },
        MemKv::new(),
    )
    .unwrap();
    let settings = SlotSettings {
        deadline_ms: 1_000,
        ..SlotSettings::default()
    };
    host.load(
        "hsm",
        PluginKind::DmPolicy,
        &component("hsm-age-policy"),
        "bench",
        settings,
    )
    .expect("load hsm-age-policy");
    let router = Router::new(mounts.clone(), db.clone()).unwrap();
    let read_set = EventSet::of(&[EventType::Read]);
    let mut results = Vec::new();
    for which in ["wasm", "native"] {
        let policy: Arc<dyn Policy> = match which {
            "wasm" => Arc::new(WasmPolicy {
                host: host.clone(),
                slot: "hsm".into(),
            }),
            _ => {
                use strata_plugin_sdk::dm::DmPolicy;
                let mut h = native::Host {
                    backend: Arc::new(Backend::new(mounts.clone(), sid)),
                    token: 0,
                    kv: Default::default(),
                };
                Arc::new(NativePolicy {
                    policy: Mutex::new(hsm_age_policy::AgePolicy::init("", &mut h).unwrap()),
                })
            }
        };
        router
            .attach(which, policy, &mnt, read_set, None)
            .expect("attach");
        // warm up, then measure
        read_latency(&event_file, events / 10 + 1, 1);
        results.push((which, read_latency(&event_file, events, rounds)));
        router.detach(which).expect("detach");
    }
    let (wasm, native) = (results[0].1, results[1].1);
    println!("\nsynchronous READ event round trip (4 KiB read of a managed file, mean of {events}, median of {rounds})");
    println!(
        "  no event (region, no disposition)   {:>8.1} us",
        no_event.as_secs_f64() * 1e6
    );
    println!(
        "  answered by hsm-age-policy native   {:>8.1} us",
        native.as_secs_f64() * 1e6
    );
    println!(
        "  answered by hsm-age-policy (Wasm)   {:>8.1} us",
        wasm.as_secs_f64() * 1e6
    );
    println!(
        "  Wasm / native: {:.2}x (target <= 1.5x)",
        wasm.as_secs_f64() / native.as_secs_f64()
    );
    let stats = host.list();
    let s = &stats[0].total;
    assert_eq!(
        s.ok, s.calls,
        "every event was answered by the plugin itself"
    );
}

/// Unmount when the benchmark ends (or panics).
struct Unmount(Arc<Mounts>, PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = self.0.umount(&self.1, true);
    }
}
