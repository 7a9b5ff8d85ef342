//! Issue 10, plugin items, at the level of the plugin host (real components, no daemon):
//! caller errors are not the plugin's failures, paged state, interpreted plugins' deadline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use strata_runtime::plugin::*;

fn component(name: &str) -> Vec<u8> {
    let dir = match std::env::var_os("STRATA_COMPONENTS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-components"),
    };
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "MISSING TEST COMPONENT {}: {e}. Build the guests first: bash scripts/build-plugins.sh && bash scripts/build-py-plugin.sh",
            path.display()
        )
    })
}

fn hosts(n: usize) -> Vec<HostInfo> {
    (0..n)
        .map(|i| HostInfo {
            id: format!("h{i}"),
            free_bytes: 1 << 30,
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

#[test]
fn caller_errors_are_refused_before_the_plugin_and_never_roll_back() {
    let cfg = HostConfig {
        max_hosts: 4,
        max_name_bytes: 16,
        ..HostConfig::default()
    };
    let h = PluginHost::new(cfg, MemKv::new()).unwrap();
    let rolled = Arc::new(AtomicU64::new(0));
    {
        let rolled = rolled.clone();
        h.on_rollback(Arc::new(move |_: &PluginHost, _: &str| {
            rolled.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let s = SlotSettings::default();
    h.load(
        "p",
        PluginKind::Placement,
        &component("placement-rendezvous"),
        "r",
        s,
    )
    .unwrap();
    let v2 = h
        .swap("p", &component("placement-echo"), "echo", None)
        .unwrap()
        .to;
    let mut dup = hosts(2);
    dup[1].id = "h0".into();
    let mut sizes = hosts(1);
    sizes[0].free_bytes = sizes[0].capacity_bytes + 1;
    let mut ctl = hosts(1);
    ctl[0].id = "a\nb".into();
    let cases: Vec<(ChunkRef, Vec<HostInfo>)> = vec![
        (chunk("c"), dup),
        (chunk("c"), hosts(5)),
        (chunk(""), hosts(1)),
        (chunk(&"x".repeat(17)), hosts(1)),
        (chunk("c"), sizes),
        (chunk("c"), ctl),
    ];
    for _ in 0..50 {
        for (c, hs) in &cases {
            match h.place("p", c, 1, hs) {
                Err(CallError::Invalid { hook: "place", .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    let bad_change = MembershipChange {
        before: hosts(1),
        after: hosts(2),
        chunks: vec![ChunkPlacement {
            chunk: chunk("c"),
            size: 1,
            hosts: vec!["h0".into(), "h0".into()],
        }],
    };
    for _ in 0..50 {
        assert!(matches!(
            h.rebalance("p", &bad_change),
            Err(CallError::Invalid {
                hook: "rebalance",
                ..
            })
        ));
    }
    let info = h.get("p").unwrap();
    assert_eq!(info.current.id, v2);
    assert_eq!(info.current.stats.calls, 0, "the plugin never ran");
    assert_eq!(rolled.load(Ordering::Relaxed), 0);
    // a valid call is answered by the echo version
    let ok = h.place("p", &chunk("c"), 1, &hosts(3)).unwrap();
    assert_eq!((ok.version, ok.failure), (v2, None));
}

#[test]
fn the_plugins_own_faults_still_roll_back_and_call_the_hook() {
    let h = PluginHost::new(HostConfig::default(), MemKv::new()).unwrap();
    let rolled = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let rolled = rolled.clone();
        h.on_rollback(Arc::new(move |host: &PluginHost, slot: &str| {
            // the hook may look at the host (the daemon records the slot from it)
            let cur = host.get(slot).unwrap().current.source;
            rolled.lock().unwrap().push(format!("{slot}:{cur}"));
        }));
    }
    let mut s = SlotSettings::default();
    s.rollback.min_calls = 10;
    h.load(
        "p",
        PluginKind::Placement,
        &component("placement-echo"),
        "echo",
        s,
    )
    .unwrap();
    h.swap("p", &component("faulty-malformed"), "malformed", None)
        .unwrap();
    for _ in 0..12 {
        let _ = h.place("p", &chunk("c"), 1, &hosts(2)).unwrap();
    }
    assert_eq!(h.get("p").unwrap().current.source, "echo");
    assert_eq!(*rolled.lock().unwrap(), vec!["p:echo".to_string()]);
}

#[test]
fn timeouts_on_huge_valid_inputs_do_not_roll_back_root_s_plugin() {
    // any local user may call `place` with up to max_hosts hosts of max_name_bytes ids:
    // a plugin that is slow on such an input is not at fault
    let cfg = HostConfig {
        rollback_input_bytes: 1024,
        ..HostConfig::default()
    };
    let h = PluginHost::new(cfg, MemKv::new()).unwrap();
    let rolled = Arc::new(AtomicU64::new(0));
    {
        let rolled = rolled.clone();
        h.on_rollback(Arc::new(move |_: &PluginHost, _: &str| {
            rolled.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let mut s = SlotSettings::default();
    s.rollback.min_calls = 10;
    s.deadline_ms = 5;
    h.load(
        "p",
        PluginKind::Placement,
        &component("placement-echo"),
        "echo",
        s,
    )
    .unwrap();
    let v2 = h
        .swap("p", &component("faulty-loop"), "loop", None)
        .unwrap()
        .to;
    let big = hosts(100); // ~2.6 KB of input
    assert!(place_input_bytes(&chunk("c"), &big) > 1024);
    for _ in 0..15 {
        let r = h.place("p", &chunk("c"), 1, &big).unwrap();
        assert_eq!(r.version, v2);
        assert!(r.failure.is_some(), "answered by the failure policy");
    }
    let info = h.get("p").unwrap();
    assert_eq!(info.current.id, v2, "not rolled back");
    assert_eq!(rolled.load(Ordering::Relaxed), 0);
    let st = &info.current.stats;
    assert_eq!((st.timeouts, st.excused), (15, 15), "{st:?}");
    // the same fault on ordinary inputs is the plugin's own: it rolls back
    for _ in 0..12 {
        let _ = h.place("p", &chunk("c"), 1, &hosts(3));
    }
    assert_ne!(h.get("p").unwrap().current.id, v2, "rolled back");
    assert_eq!(rolled.load(Ordering::Relaxed), 1);
}

#[test]
fn state_is_paged_and_large_values_are_split() {
    let kv = MemKv::new();
    let h = PluginHost::new(HostConfig::default(), kv.clone()).unwrap();
    h.load(
        "p",
        PluginKind::Placement,
        &component("placement-echo"),
        "echo",
        SlotSettings::default(),
    )
    .unwrap();
    let l = KvLimits::default();
    for i in 0..500 {
        kv.set("p", &format!("k{i:04}"), &[b'v'; 100], &l).unwrap();
    }
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    kv.set("p", "m.big", &big, &l).unwrap();
    kv.set("other", "k0000", b"not mine", &l).unwrap();
    let budget = 16 << 10;
    let mut from = None;
    let mut pages = 0;
    let mut got: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let page = h.state_page("p", from.as_ref(), budget).unwrap();
        pages += 1;
        let json = serde_json::to_vec(&page).unwrap();
        assert!(json.len() <= budget + 1024, "page of {} bytes", json.len());
        for part in page.parts {
            match got.last_mut() {
                Some((k, v)) if *k == part.key && part.offset > 0 => {
                    assert_eq!(part.offset as usize, v.len());
                    v.extend_from_slice(&part.data)
                }
                _ => {
                    assert_eq!(part.offset, 0);
                    got.push((part.key, part.data));
                }
            }
        }
        match page.next {
            Some(n) => from = Some(n),
            None => break,
        }
        assert!(pages < 10_000);
    }
    assert!(pages > 10, "{pages} pages");
    assert_eq!(got.len(), 501);
    assert_eq!(got[0], ("k0000".to_string(), vec![b'v'; 100]));
    assert_eq!(got[500].0, "m.big");
    assert_eq!(got[500].1, big);
    assert_eq!(got, h.state("p").unwrap());
    // unload takes the state with it
    h.unload("p").unwrap();
    assert!(kv.keys("p", "").unwrap().is_empty());
    assert_eq!(kv.keys("other", "").unwrap().len(), 1);
}

/// Item 14: an interpreted policy loaded with the defaults (10 ms) runs with the WASI
/// deadline instead, and concurrent events on a busy host (new instances start under the
/// deadline too) all get the plugin's own answer.
#[test]
fn interpreted_policy_with_default_settings_answers_on_a_busy_host() {
    let h = PluginHost::new(HostConfig::default(), MemKv::new()).unwrap();
    let v = h
        .load(
            "py",
            PluginKind::DmPolicy,
            &component("hsm-py-policy"),
            "py",
            SlotSettings::default(),
        )
        .unwrap();
    assert!(v.wasi);
    assert_eq!(v.settings.deadline_ms, 2000);
    assert!(
        v.notes.iter().any(|n| n.contains("imports WASI")),
        "{:?}",
        v.notes
    );
    let stop = Arc::new(AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let event = Event {
        kind: EventType::Read,
        token: 9,
        sequence: 2,
        session: 1,
        data: EventData::Data(DataEvent {
            handle: b"handle-1".to_vec(),
            offset: 0,
            length: 4096,
        }),
    };
    let t0 = Instant::now();
    let failures: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..5)
                        .filter(|_| h.on_event("py", &event, None).unwrap().failure.is_some())
                        .count()
                })
            })
            .collect();
        hs.into_iter().map(|t| t.join().unwrap()).sum()
    });
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    let stats = h.get("py").unwrap().current.stats;
    eprintln!(
        "20 on-event calls (4 concurrent, 2 busy threads) in {:?}: {failures} failed; {} instances, max {} ms",
        t0.elapsed(),
        stats.instances,
        stats.max_ns / 1_000_000
    );
    assert_eq!(failures, 0, "{stats:?}");
}

/// Item 14: a minimum of 0 turns the adjustment off; an explicit deadline at or above the
/// minimum is kept as given.
#[test]
fn explicit_deadlines_of_interpreted_policies_are_kept_above_the_minimum() {
    let h = PluginHost::new(HostConfig::default(), MemKv::new()).unwrap();
    let s = SlotSettings {
        deadline_ms: 1500,
        ..SlotSettings::default()
    };
    let v = h
        .load(
            "py",
            PluginKind::DmPolicy,
            &component("hsm-py-policy"),
            "py",
            s,
        )
        .unwrap();
    assert_eq!(v.settings.deadline_ms, 1500);
    assert!(v.notes.is_empty());
}
