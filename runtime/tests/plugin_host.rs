//! The plugin host against real components (built by scripts/build-plugins.sh and
//! scripts/build-py-plugin.sh into target/wasm-components, or $STRATA_COMPONENTS).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use strata_runtime::plugin::*;

fn components_dir() -> PathBuf {
    match std::env::var_os("STRATA_COMPONENTS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-components"),
    }
}

fn component(name: &str) -> Vec<u8> {
    let path = components_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "MISSING TEST COMPONENT {}: {e}. Build the guests first: bash scripts/build-plugins.sh && bash scripts/build-py-plugin.sh",
            path.display()
        )
    })
}

fn host() -> (PluginHost, Arc<MemKv>) {
    let kv = MemKv::new();
    (
        PluginHost::new(HostConfig::default(), kv.clone()).unwrap(),
        kv,
    )
}

fn hosts(n: usize) -> Vec<HostInfo> {
    (0..n)
        .map(|i| HostInfo {
            id: format!("h{i}"),
            free_bytes: ((i as u64 % 3) + 1) << 30,
            capacity_bytes: 8 << 30,
        })
        .collect()
}

fn chunk(name: &str) -> ChunkRef {
    ChunkRef {
        space: "s".into(),
        name: name.into(),
    }
}

fn settings(config: &str) -> SlotSettings {
    SlotSettings {
        config: config.into(),
        ..SlotSettings::default()
    }
}

/// The rendezvous order computed natively by the same crate the component is built from.
fn native_rank(c: &ChunkRef, hs: &[HostInfo]) -> Vec<String> {
    use strata_plugin_sdk::placement as sdk;
    let chunk = sdk::ChunkRef {
        space: c.space.clone(),
        name: c.name.clone(),
    };
    let input: Vec<sdk::HostInfo> = hs
        .iter()
        .map(|h| sdk::HostInfo {
            id: h.id.clone(),
            free_bytes: h.free_bytes,
            capacity_bytes: h.capacity_bytes,
        })
        .collect();
    placement_rendezvous::rank(&chunk, &input, &placement_rendezvous::Config::default())
        .expect("native rank")
}

#[test]
fn placement_plugin_loads_and_answers_like_native_code() {
    let (h, _) = host();
    let v = h
        .load(
            "placement",
            PluginKind::Placement,
            &component("placement-rendezvous"),
            "test",
            settings(""),
        )
        .unwrap();
    assert_eq!(v.id, 1);
    let hs = hosts(7);
    for i in 0..200 {
        let c = chunk(&format!("c{i}"));
        let served = h.place("placement", &c, 4096, &hs).unwrap();
        assert_eq!(served.failure, None);
        assert_eq!(served.version, v.id);
        assert_eq!(served.value, native_rank(&c, &hs), "chunk c{i}");
    }
    let info = h.get("placement").unwrap();
    assert_eq!(info.current.stats.calls, 200);
    assert_eq!(info.current.stats.ok, 200);
    // Bad input from the caller is the plugin's to refuse: an empty host list is an error
    // return, answered by the failure policy (builtin: empty order).
    let served = h.place("placement", &chunk("x"), 1, &[]).unwrap();
    assert_eq!(served.failure, Some(FailureKind::PluginError));
}

/// Each faulty plugin: the host keeps serving, the failure policy answers, the failure is
/// counted under the right kind, and the failed instance is not reused.
#[test]
fn faulty_plugins_get_their_failure_policy_and_are_counted() {
    let (h, _) = host();
    h.load(
        "good",
        PluginKind::Placement,
        &component("placement-rendezvous"),
        "test",
        settings(""),
    )
    .unwrap();
    let cases = [
        ("faulty-loop", FailureKind::Timeout),
        ("faulty-hog", FailureKind::MemoryLimit),
        ("faulty-panic", FailureKind::Trap),
        ("faulty-malformed", FailureKind::Malformed),
    ];
    let hs = hosts(5);
    for (name, kind) in cases {
        let mut s = settings("");
        s.memory_limit = 16 << 20;
        // Only the looping plugin is meant to time out; the hog must reach the memory cap
        // first (filling 16 MiB byte by byte takes a while on a busy machine).
        s.deadline_ms = if kind == FailureKind::Timeout {
            20
        } else {
            5_000
        };
        h.load(name, PluginKind::Placement, &component(name), "test", s)
            .unwrap();
        for i in 0..3 {
            let served = h.place(name, &chunk(&format!("c{i}")), 1, &hs).unwrap();
            assert_eq!(served.failure, Some(kind), "{name}");
            assert_eq!(
                served.value,
                builtin_place(&hs),
                "{name}: builtin policy answers"
            );
        }
        let st = h.get(name).unwrap().current.stats;
        assert_eq!(st.calls, 3, "{name}");
        assert_eq!(st.policy_applied, 3, "{name}");
        let counted = match kind {
            FailureKind::Timeout => st.timeouts,
            FailureKind::MemoryLimit => st.memory_limits,
            FailureKind::Trap => st.traps,
            FailureKind::Malformed => st.malformed,
            FailureKind::PluginError => st.plugin_errors,
        };
        assert_eq!(counted, 3, "{name}: {st:?}");
        if kind != FailureKind::Malformed {
            // A trapped instance is discarded, never re-entered: the first call used the
            // self-test's instance, each later call needed a fresh one.
            assert_eq!(st.instances, 3, "{name}: {st:?}");
        }
        // The daemon is still serving: the healthy slot answers.
        assert_eq!(h.place("good", &chunk("z"), 1, &hs).unwrap().failure, None);
    }
    // Abort policy: the caller gets the errno instead of an answer.
    let mut s = settings("");
    s.on_failure
        .insert("place".into(), "abort:EACCES".parse().unwrap());
    h.load(
        "aborting",
        PluginKind::Placement,
        &component("faulty-panic"),
        "test",
        s,
    )
    .unwrap();
    match h.place("aborting", &chunk("a"), 1, &hs) {
        Err(CallError::Aborted {
            errno,
            kind,
            plugin,
            ..
        }) => {
            assert_eq!(
                (errno, kind, plugin.as_str()),
                (libc_eacces(), FailureKind::Trap, "aborting")
            );
        }
        other => panic!("expected abort, got {other:?}"),
    }
    // Continue policy: hosts in the order given.
    let mut s = settings("");
    s.on_failure.insert("place".into(), FailurePolicy::Continue);
    h.load(
        "continuing",
        PluginKind::Placement,
        &component("faulty-malformed"),
        "test",
        s,
    )
    .unwrap();
    let served = h.place("continuing", &chunk("a"), 1, &hs).unwrap();
    assert_eq!(
        served.value,
        hs.iter().map(|h| h.id.clone()).collect::<Vec<_>>()
    );
}

fn libc_eacces() -> i32 {
    13
}

/// 4 callers make 10,000 calls while the slot is swapped from rendezvous to echo: every call
/// is answered, by exactly one version, old before the switch and new after it.
#[test]
fn swap_under_four_concurrent_callers_loses_no_call() {
    let (h, _) = host();
    // The deadline is wall-clock: 4 callers on a 2-core machine get preempted for longer
    // than the default 10 ms. This test is about the swap, not the deadline.
    let mut s = settings("");
    s.deadline_ms = 5_000;
    let v1 = h
        .load(
            "p",
            PluginKind::Placement,
            &component("placement-rendezvous"),
            "v1",
            s,
        )
        .unwrap()
        .id;
    let echo = component("placement-echo");
    let hs = hosts(6);
    // Each caller makes at least PER_THREAD calls and keeps calling until it has made one
    // call begun after the swap returned, so the calls span the switch on any machine.
    const PER_THREAD: u64 = 2_500;
    let clock = Arc::new(AtomicU64::new(0));
    let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Arc::new(Barrier::new(5));
    let mut workers = Vec::new();
    for t in 0..4 {
        let (h, hs, clock, start, swapped) = (
            h.clone(),
            hs.clone(),
            clock.clone(),
            start.clone(),
            swapped.clone(),
        );
        workers.push(std::thread::spawn(move || {
            start.wait();
            let mut log = Vec::with_capacity(PER_THREAD as usize);
            let mut i = 0u64;
            let mut called_after_swap = false;
            while i < PER_THREAD || !called_after_swap {
                called_after_swap = swapped.load(Ordering::SeqCst);
                let c = chunk(&format!("t{t}-{i}"));
                let begin = clock.fetch_add(1, Ordering::SeqCst);
                let served = h.place("p", &c, 1, &hs).expect("call answered");
                let end = clock.fetch_add(1, Ordering::SeqCst);
                assert_eq!(served.failure, None);
                log.push((begin, end, served.version, served.value, c));
                i += 1;
            }
            log
        }));
    }
    start.wait();
    // Let the callers get going, then swap.
    while clock.load(Ordering::SeqCst) < 2 * 4 * 200 {
        std::thread::yield_now();
    }
    let swap_begin = clock.fetch_add(1, Ordering::SeqCst);
    let report = h.swap("p", &echo, "v2", None).unwrap();
    let swap_end = clock.fetch_add(1, Ordering::SeqCst);
    swapped.store(true, Ordering::SeqCst);
    assert_eq!(report.from, v1);
    let v2 = report.to;
    let mut per_version = BTreeMap::new();
    let mut total = 0;
    for w in workers {
        let log = w.join().unwrap();
        let mut seen_new = false;
        for (begin, end, version, value, c) in log {
            total += 1;
            *per_version.entry(version).or_insert(0u64) += 1;
            // Exactly one version answered, and the answer is that version's.
            if version == v1 {
                assert_eq!(value, native_rank(&c, &hs));
                assert!(
                    !seen_new,
                    "old version answered after the new one on the same caller"
                );
                assert!(
                    begin < swap_end,
                    "a call begun after the swap returned got the old version"
                );
            } else {
                assert_eq!(version, v2);
                assert_eq!(value, hs.iter().map(|h| h.id.clone()).collect::<Vec<_>>());
                assert!(
                    end > swap_begin,
                    "a call finished before the swap began got the new version"
                );
                seen_new = true;
            }
        }
    }
    assert!(total >= 4 * PER_THREAD, "{total} calls");
    assert!(
        per_version.get(&v1).is_some_and(|n| *n > 0)
            && per_version.get(&v2).is_some_and(|n| *n > 0),
        "v1={v1} v2={v2} {per_version:?}"
    );
    let info = h.get("p").unwrap();
    assert_eq!(info.total.calls, total, "every call counted once");
    assert_eq!(info.total.ok, total, "every call answered by a plugin");
}

#[test]
fn bad_new_version_is_refused_and_old_keeps_serving() {
    let (h, _) = host();
    let v1 = h
        .load(
            "p",
            PluginKind::Placement,
            &component("placement-echo"),
            "v1",
            settings(""),
        )
        .unwrap()
        .id;
    let before = h.list();
    let err = h
        .swap("p", &component("faulty-init"), "bad", None)
        .unwrap_err();
    assert!(matches!(err, LoadError::InitRefused { .. }), "{err}");
    assert!(err.to_string().contains("plugin 'p'"), "{err}");
    let err = h
        .swap("p", b"definitely not wasm", "bad", None)
        .unwrap_err();
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");
    let err = h
        .swap(
            "p",
            &component("faulty-loop"),
            "bad",
            Some(settings("x".repeat(1 << 20).as_str())),
        )
        .unwrap_err();
    assert!(matches!(err, LoadError::ConfigTooLarge { .. }), "{err}");
    assert_eq!(h.place("p", &chunk("a"), 1, &hosts(3)).unwrap().version, v1);
    let after = h.list();
    assert_eq!(before[0].current.id, after[0].current.id);
    assert!(after[0].history.is_empty());
    // Refused versions used no version number: the next good one is v1 + 1.
    let next = h
        .swap("p", &component("placement-echo"), "v2", None)
        .unwrap();
    assert_eq!((next.from, next.to), (v1, v1 + 1));
}

#[test]
fn trapping_version_is_rolled_back_automatically() {
    let (h, _) = host();
    let mut s = settings("");
    s.rollback = RollbackPolicy {
        min_calls: 10,
        max_failure_rate: 0.25,
    };
    let v1 = h
        .load(
            "p",
            PluginKind::Placement,
            &component("placement-echo"),
            "v1",
            s,
        )
        .unwrap()
        .id;
    let v2 = h
        .swap("p", &component("faulty-panic"), "v2", None)
        .unwrap()
        .to;
    let hs = hosts(3);
    let mut served_by = Vec::new();
    for i in 0..30 {
        served_by.push(
            h.place("p", &chunk(&format!("c{i}")), 1, &hs)
                .unwrap()
                .version,
        );
    }
    // The first 10 calls are v2's (all trapping, answered by the policy), then v1 again.
    assert!(served_by[..10].iter().all(|v| *v == v2), "{served_by:?}");
    assert!(served_by[10..].iter().all(|v| *v == v1), "{served_by:?}");
    let info = h.get("p").unwrap();
    assert_eq!(info.current.id, v1);
    assert!(
        info.events.iter().any(|e| e.contains("auto-rollback")),
        "{:?}",
        info.events
    );
    assert_eq!(info.total.traps, 10);
    assert_eq!(
        info.total.policy_applied, 10,
        "every failed call's policy answer is counted"
    );
    // A first version has nothing to roll back to: it keeps serving under its policy.
    h.load(
        "lonely",
        PluginKind::Placement,
        &component("faulty-panic"),
        "v1",
        settings(""),
    )
    .unwrap();
    for _ in 0..30 {
        h.place("lonely", &chunk("c"), 1, &hs).unwrap();
    }
    assert_eq!(h.get("lonely").unwrap().current.stats.traps, 30);
    // Manual rollback with no history is a clear error.
    assert_eq!(
        h.rollback("lonely"),
        Err(SlotError::NoPreviousVersion("lonely".into()))
    );
}

#[test]
fn key_value_state_survives_a_swap() {
    let (h, kv) = host();
    let echo = component("placement-echo");
    h.load(
        "p",
        PluginKind::Placement,
        &echo,
        "v1",
        settings("count=true"),
    )
    .unwrap();
    let hs = hosts(2);
    for _ in 0..5 {
        h.place("p", &chunk("c"), 1, &hs).unwrap();
    }
    let read = || {
        let v = kv.get("p", "calls").unwrap().expect("counter written");
        String::from_utf8(v).unwrap().trim().parse::<u64>().unwrap()
    };
    assert_eq!(read(), 5);
    let r = h.swap("p", &echo, "v2", None).unwrap();
    assert_ne!(r.from, r.to);
    for _ in 0..3 {
        assert_eq!(h.place("p", &chunk("c"), 1, &hs).unwrap().version, r.to);
    }
    assert_eq!(
        read(),
        8,
        "the new version continued the old version's counter"
    );
    // Another slot does not see these keys.
    h.load(
        "q",
        PluginKind::Placement,
        &echo,
        "v1",
        settings("count=true"),
    )
    .unwrap();
    h.place("q", &chunk("c"), 1, &hs).unwrap();
    assert_eq!(read(), 8);
    assert_eq!(kv.get("q", "calls").unwrap().as_deref(), Some(&b"1"[..]));
}

#[test]
fn precompiled_cache_is_used_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..HostConfig::default()
    };
    let bytes = component("placement-rendezvous");
    let first = {
        let h = PluginHost::new(cfg.clone(), MemKv::new()).unwrap();
        h.load("p", PluginKind::Placement, &bytes, "t", settings(""))
            .unwrap()
    };
    assert_eq!(first.cache, CacheOutcome::Miss);
    let h = PluginHost::new(cfg.clone(), MemKv::new()).unwrap();
    let second = h
        .load("p", PluginKind::Placement, &bytes, "t", settings(""))
        .unwrap();
    assert_eq!(second.cache, CacheOutcome::Hit);
    assert!(h
        .place("p", &chunk("c"), 1, &hosts(3))
        .unwrap()
        .failure
        .is_none());
    // A corrupted cache entry is detected by its checksum and recompiled, not trusted.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "cwasm") {
            let mut code = std::fs::read(&p).unwrap();
            let mid = code.len() / 2;
            code[mid] ^= 0xff;
            std::fs::write(&p, code).unwrap();
        }
    }
    let h = PluginHost::new(cfg, MemKv::new()).unwrap();
    let third = h
        .load("p", PluginKind::Placement, &bytes, "t", settings(""))
        .unwrap();
    assert_eq!(third.cache, CacheOutcome::Miss);
    assert!(h
        .place("p", &chunk("c"), 1, &hosts(3))
        .unwrap()
        .failure
        .is_none());
}

/// A bad-input case: slot name, bytes, kind, settings, and the error expected.
type Case = (
    &'static str,
    Vec<u8>,
    PluginKind,
    SlotSettings,
    fn(&LoadError) -> bool,
);

#[test]
fn bad_components_get_clear_errors_naming_the_plugin_and_change_nothing() {
    let (h, _) = host();
    h.load(
        "keep",
        PluginKind::Placement,
        &component("placement-echo"),
        "t",
        settings(""),
    )
    .unwrap();
    let before = h.list();
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let cases: Vec<Case> = vec![
        (
            "not-wasm",
            b"#!/bin/sh\necho hi\n".to_vec(),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::NotWasm { .. }),
        ),
        (
            "empty",
            Vec::new(),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::NotWasm { .. }),
        ),
        (
            "core",
            core_module,
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::CoreModule { .. }),
        ),
        (
            "truncated",
            component("placement-echo")[..2000].to_vec(),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::Invalid { .. }),
        ),
        (
            "world",
            component("hsm-age-policy"),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::WrongWorld { .. }),
        ),
        (
            "world2",
            component("placement-echo"),
            PluginKind::DmPolicy,
            settings(""),
            |e| matches!(e, LoadError::WrongWorld { .. }),
        ),
        (
            "version",
            component("wrong-version"),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::WrongVersion { .. }),
        ),
        (
            "missing",
            component("missing-export"),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::MissingExport { .. }),
        ),
        (
            "bigconfig",
            component("placement-echo"),
            PluginKind::Placement,
            settings(&"x".repeat(65 * 1024)),
            |e| matches!(e, LoadError::ConfigTooLarge { .. }),
        ),
        (
            "initfail",
            component("faulty-init"),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::InitRefused { .. }),
        ),
        (
            "keep",
            component("placement-echo"),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::Slot { .. }),
        ),
        (
            "bad name!",
            component("placement-echo"),
            PluginKind::Placement,
            settings(""),
            |e| matches!(e, LoadError::Slot { .. }),
        ),
    ];
    for (name, bytes, kind, s, check) in cases {
        let e = h.load(name, kind, &bytes, "t", s).unwrap_err();
        assert!(check(&e), "{name}: unexpected error {e:?}");
        assert!(
            e.to_string().contains(&format!("plugin '{name}'")),
            "{name}: message does not name the plugin: {e}"
        );
    }
    assert_eq!(h.list().len(), before.len());
    assert_eq!(h.list()[0].current.id, before[0].current.id);
    // Calls to unknown slots or slots of another kind are errors, not panics.
    assert!(matches!(
        h.place("nope", &chunk("c"), 1, &hosts(1)),
        Err(CallError::Slot(SlotError::NoSuchSlot(_)))
    ));
    let ev = user_event(b"x");
    assert!(matches!(
        h.on_event("keep", &ev, None),
        Err(CallError::Slot(SlotError::WrongKind { .. }))
    ));
}

fn user_event(payload: &[u8]) -> Event {
    Event {
        kind: EventType::User,
        token: 7,
        sequence: 1,
        session: 1,
        data: EventData::User(payload.to_vec()),
    }
}

fn read_event(handle: &[u8]) -> Event {
    Event {
        kind: EventType::Read,
        token: 9,
        sequence: 2,
        session: 1,
        data: EventData::Data(DataEvent {
            handle: handle.to_vec(),
            offset: 0,
            length: 4096,
        }),
    }
}

/// The Python policy (componentize-py) goes into the same slot as the Rust one, answers,
/// and cannot open files or sockets or see the environment.
#[test]
fn python_policy_loads_into_the_same_slot_and_is_sandboxed() {
    let (h, kv) = host();
    let mut s = settings("tier=archive\nmin_size=1");
    s.deadline_ms = 2_000; // CPython is slower to answer than a Rust plugin
    s.memory_limit = 256 << 20;
    h.load(
        "hsm",
        PluginKind::DmPolicy,
        &component("hsm-age-policy"),
        "rust",
        s,
    )
    .unwrap();
    let rust = h.on_event("hsm", &user_event(b"hello"), None).unwrap();
    assert_eq!((rust.value, rust.failure), (Response::Continue, None));
    let r = h
        .swap("hsm", &component("hsm-py-policy"), "python", None)
        .unwrap();
    let py = h.on_event("hsm", &user_event(b"probe"), None).unwrap();
    assert_eq!(py.version, r.to);
    assert_eq!(py.failure, None);
    assert_eq!(
        py.value,
        Response::Continue,
        "the probe found something allowed"
    );
    for key in ["probe.open", "probe.listdir", "probe.socket", "probe.env"] {
        let v = kv
            .get("hsm", key)
            .unwrap()
            .unwrap_or_else(|| panic!("{key} not recorded"));
        let v = String::from_utf8_lossy(&v);
        assert!(v.starts_with("denied:"), "{key}: {v}");
    }
    // No dm-host backend behind this call: the policy's recall attempt gets ENOSYS and the
    // event is aborted with EIO rather than letting a read see a hole. Either way it answers.
    let read = h.on_event("hsm", &read_event(b"handle-1"), None).unwrap();
    assert_eq!(read.failure, None);
    let scan = h.scan("hsm", &[], None).unwrap();
    assert_eq!((scan.value, scan.failure), (vec![], None));
}

#[test]
fn unload_while_calls_are_in_flight() {
    let (h, _) = host();
    let mut s = settings("");
    s.deadline_ms = 50;
    h.load(
        "slow",
        PluginKind::Placement,
        &component("faulty-loop"),
        "t",
        s,
    )
    .unwrap();
    let h2 = h.clone();
    let t = std::thread::spawn(move || h2.place("slow", &chunk("c"), 1, &hosts(2)));
    std::thread::sleep(Duration::from_millis(10));
    h.unload("slow").unwrap();
    let served = t.join().unwrap().unwrap();
    assert_eq!(served.failure, Some(FailureKind::Timeout));
    assert!(h.get("slow").is_err());
}

/// A DM backend that records what the plugin asked, scoped by token.
#[derive(Default)]
struct FakeDm {
    calls: std::sync::Mutex<Vec<(u64, String, Vec<u8>)>>,
}

impl FakeDm {
    fn log(&self, token: u64, what: &str, handle: &[u8]) {
        self.calls
            .lock()
            .unwrap()
            .push((token, what.into(), handle.to_vec()));
    }
}

impl DmBackend for FakeDm {
    fn stat(&self, _: u64, _: &[u8]) -> Result<FileStat, DmError> {
        Err(DmError::Enosys)
    }
    fn get_dmattr(&self, token: u64, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, DmError> {
        self.log(token, "get-dmattr", handle);
        assert_eq!(name, b"stratloc");
        match handle {
            b"migrated" | b"broken" => Ok(b"archive".to_vec()),
            _ => Err(DmError::Enoent),
        }
    }
    fn set_dmattr(&self, _: u64, _: &[u8], _: &[u8], _: &[u8]) -> Result<(), DmError> {
        Err(DmError::Enosys)
    }
    fn remove_dmattr(&self, _: u64, _: &[u8], _: &[u8]) -> Result<(), DmError> {
        Err(DmError::Enosys)
    }
    fn get_regions(&self, token: u64, handle: &[u8]) -> Result<Vec<Region>, DmError> {
        self.log(token, "get-regions", handle);
        Ok(vec![])
    }
    fn set_regions(&self, _: u64, _: &[u8], _: &[Region]) -> Result<bool, DmError> {
        Err(DmError::Enosys)
    }
    fn allocinfo(&self, _: u64, _: &[u8], _: u64) -> Result<Vec<Extent>, DmError> {
        Err(DmError::Enosys)
    }
    fn probe_hole(&self, _: u64, _: &[u8], _: u64, _: u64) -> Result<(u64, u64), DmError> {
        Err(DmError::Enosys)
    }
    fn punch_hole(&self, _: u64, _: &[u8], _: u64, _: u64) -> Result<(), DmError> {
        Err(DmError::Enosys)
    }
    fn read_invis(&self, _: u64, _: &[u8], _: u64, _: u64) -> Result<Vec<u8>, DmError> {
        Err(DmError::Enosys)
    }
    fn write_invis(&self, _: u64, _: &[u8], _: u64, _: &[u8], _: bool) -> Result<u64, DmError> {
        Err(DmError::Enosys)
    }
    fn request_migrate(&self, _: u64, _: &[u8], _: &str) -> Result<(), DmError> {
        Err(DmError::Enosys)
    }
    fn request_recall(&self, token: u64, handle: &[u8], _: u64, _: u64) -> Result<(), DmError> {
        self.log(token, "request-recall", handle);
        if handle == b"broken" {
            Err(DmError::Eio)
        } else {
            Ok(())
        }
    }
}

/// The dm-host imports reach the backend with the token of the event being handled, and the
/// Rust HSM policy recalls migrated data before a read proceeds.
#[test]
fn dm_policy_imports_are_scoped_to_the_event_token() {
    let (h, kv) = host();
    h.load(
        "hsm",
        PluginKind::DmPolicy,
        &component("hsm-age-policy"),
        "t",
        settings("tier=archive"),
    )
    .unwrap();
    let dm = Arc::new(FakeDm::default());
    let backend: Arc<dyn DmBackend> = dm.clone();
    let mut ev = read_event(b"migrated");
    ev.token = 41;
    let r = h.on_event("hsm", &ev, Some(backend.clone())).unwrap();
    assert_eq!((r.value, r.failure), (Response::Continue, None));
    let mut ev = read_event(b"plain");
    ev.token = 42;
    assert_eq!(
        h.on_event("hsm", &ev, Some(backend.clone())).unwrap().value,
        Response::Continue
    );
    let mut ev = read_event(b"broken");
    ev.token = 43;
    assert_eq!(
        h.on_event("hsm", &ev, Some(backend.clone())).unwrap().value,
        Response::Abort(5)
    );
    let calls = dm.calls.lock().unwrap().clone();
    let recalls: Vec<(u64, Vec<u8>)> = calls
        .iter()
        .filter(|c| c.1 == "request-recall")
        .map(|c| (c.0, c.2.clone()))
        .collect();
    assert_eq!(
        recalls,
        vec![(41, b"migrated".to_vec()), (43, b"broken".to_vec())]
    );
    assert!(calls
        .iter()
        .all(|(token, _, handle)| match handle.as_slice() {
            b"migrated" => *token == 41,
            b"plain" => *token == 42,
            _ => *token == 43,
        }));
    assert_eq!(
        kv.get("hsm", "stats.recall").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        kv.get("hsm", "stats.recall_failed").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    // Without a backend (no DM session behind the call) the imports answer ENOSYS and the
    // policy refuses the operation rather than letting it read a hole.
    assert_eq!(
        h.on_event("hsm", &read_event(b"migrated"), None)
            .unwrap()
            .value,
        Response::Abort(5)
    );
}
