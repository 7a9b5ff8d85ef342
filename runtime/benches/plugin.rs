//! Plugin host benchmark. Prints, from one run on this machine:
//! - the per-call cost of a placement decision through Wasm (`PluginHost::place`, the
//!   placement-rendezvous component) against the same ranking code called natively;
//! - the time of a hot swap (compile + self-test + switch) and of the switch itself;
//! - the longest call latency seen by 4 concurrent callers during a swap, against the
//!   longest seen in a window of the same length without a swap.
//!
//! Run: `cargo bench -p strata-runtime --bench plugin` (components from
//! scripts/build-plugins.sh). `STRATA_BENCH_QUICK=1` shortens it (used by the test script to
//! keep the benchmark from rotting).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_runtime::plugin::*;

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

fn hosts(n: usize) -> Vec<HostInfo> {
    (0..n)
        .map(|i| HostInfo {
            id: format!("host-{i:02}"),
            free_bytes: ((i as u64 % 5) + 1) << 30,
            capacity_bytes: 8 << 30,
        })
        .collect()
}

fn main() {
    let quick = std::env::var_os("STRATA_BENCH_QUICK").is_some();
    let calls: u64 = if quick { 5_000 } else { 200_000 };
    let cache = tempfile::tempdir().expect("tempdir");
    let cfg = HostConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..HostConfig::default()
    };
    let h = PluginHost::new(cfg, MemKv::new()).expect("host");
    let rendezvous = component("placement-rendezvous");
    // The deadline is wall-clock; on a busy 2-core machine a preempted caller would time out
    // at the default 10 ms and be answered by the failure policy. We measure the plugin.
    let settings = SlotSettings {
        deadline_ms: 1_000,
        ..SlotSettings::default()
    };
    h.load("p", PluginKind::Placement, &rendezvous, "bench", settings)
        .expect("load");
    let hs = hosts(8);
    use strata_plugin_sdk::placement as sdk;
    let cands: Vec<sdk::HostInfo> = hs
        .iter()
        .map(|h| sdk::HostInfo {
            id: h.id.clone(),
            free_bytes: h.free_bytes,
            capacity_bytes: h.capacity_bytes,
        })
        .collect();
    let cfg = placement_rendezvous::Config::default();
    let names: Vec<String> = (0..1024).map(|i| format!("chunk-{i}")).collect();
    let sdk_chunks: Vec<sdk::ChunkRef> = names
        .iter()
        .map(|n| sdk::ChunkRef {
            space: "s".into(),
            name: n.clone(),
        })
        .collect();

    // Warm up both paths.
    for n in names.iter().take(200) {
        black_box(
            h.place(
                "p",
                &ChunkRef {
                    space: "s".into(),
                    name: n.clone(),
                },
                1 << 20,
                &hs,
            )
            .unwrap(),
        );
        black_box(placement_rendezvous::rank(&sdk_chunks[0], &cands, &cfg).unwrap());
    }

    let t = Instant::now();
    for i in 0..calls {
        black_box(
            placement_rendezvous::rank(&sdk_chunks[(i % 1024) as usize], &cands, &cfg).unwrap(),
        );
    }
    let native_ns = t.elapsed().as_nanos() as f64 / calls as f64;

    let chunks: Vec<ChunkRef> = names
        .iter()
        .map(|n| ChunkRef {
            space: "s".into(),
            name: n.clone(),
        })
        .collect();
    let t = Instant::now();
    for i in 0..calls {
        black_box(
            h.place("p", &chunks[(i % 1024) as usize], 1 << 20, &hs)
                .unwrap(),
        );
    }
    let wasm_ns = t.elapsed().as_nanos() as f64 / calls as f64;

    // Control: the same call through a plugin that only echoes the hosts back: the cost of
    // the host side and the component ABI (8 strings in, 8 strings out) without the ranking.
    // (On a host of its own, so the swap measured below still compiles the echo plugin.)
    let echo = component("placement-echo");
    let ctl = PluginHost::new(HostConfig::default(), MemKv::new()).expect("host");
    ctl.load(
        "echo",
        PluginKind::Placement,
        &echo,
        "bench",
        SlotSettings::default(),
    )
    .expect("load echo");
    for c in chunks.iter().take(200) {
        black_box(ctl.place("echo", c, 1 << 20, &hs).unwrap());
    }
    let t = Instant::now();
    for i in 0..calls {
        black_box(
            ctl.place("echo", &chunks[(i % 1024) as usize], 1 << 20, &hs)
                .unwrap(),
        );
    }
    let echo_ns = t.elapsed().as_nanos() as f64 / calls as f64;

    println!("placement decision, 8 hosts, {calls} calls each");
    println!("  native rank()          {native_ns:>9.0} ns/call");
    println!("  through Wasm (place)   {wasm_ns:>9.0} ns/call");
    println!("  echo plugin (host+ABI) {echo_ns:>9.0} ns/call");
    println!(
        "  ratio wasm/native      {:>9.2}x  (overhead {:.0} ns/call)",
        wasm_ns / native_ns,
        wasm_ns - native_ns
    );

    // Swap under 4 concurrent callers: latency window without a swap, then with one.
    // 4 callers call continuously for a window of `len`; a swap (if any) starts 50 ms in.
    struct Window {
        worst: Duration,
        issued: u64,
        by_plugin: u64,
        by_policy: u64,
        report: Option<SwapReport>,
        swap_took: Duration,
        len: Duration,
    }
    let window = |swap: Option<&[u8]>, min_len: Duration| -> Window {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new((Duration::ZERO, 0u64, 0u64, 0u64)));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (h, hs, stop, tally, chunks) = (
                    h.clone(),
                    hs.clone(),
                    stop.clone(),
                    tally.clone(),
                    chunks.clone(),
                );
                std::thread::spawn(move || {
                    let (mut worst, mut issued, mut by_plugin, mut by_policy) =
                        (Duration::ZERO, 0, 0, 0);
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        issued += 1;
                        if let Ok(s) = h.place("p", &chunks[i % 1024], 1 << 20, &hs) {
                            if s.failure.is_none() {
                                by_plugin += 1
                            } else {
                                by_policy += 1
                            }
                        }
                        worst = worst.max(t.elapsed());
                        i += 4;
                    }
                    let mut g = tally.lock().unwrap();
                    g.0 = g.0.max(worst);
                    g.1 += issued;
                    g.2 += by_plugin;
                    g.3 += by_policy;
                })
            })
            .collect();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let report = swap.map(|bytes| h.swap("p", bytes, "bench-swap", None).expect("swap"));
        let swap_took = t.elapsed();
        std::thread::sleep(Duration::from_millis(50));
        while t0.elapsed() < min_len {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let len = t0.elapsed();
        let (worst, issued, by_plugin, by_policy) = *tally.lock().unwrap();
        Window {
            worst,
            issued,
            by_plugin,
            by_policy,
            report,
            swap_took,
            len,
        }
    };
    let during = window(Some(&echo), Duration::ZERO);
    let base = window(None, during.len);
    let report = during.report.clone().unwrap();
    // Swap back to a component already in the precompiled cache.
    let again = window(Some(&rendezvous), Duration::ZERO);
    let again_report = again.report.clone().unwrap();
    println!("hot swap under 4 concurrent callers (2 cores)");
    println!(
        "  swap (compile {:.1} ms [{:?}] + self-test {:.2} ms + switch {} ns): {:.1} ms",
        report.compile_ms,
        report.cache,
        report.selftest_ms,
        report.switch_ns,
        during.swap_took.as_secs_f64() * 1e3
    );
    println!(
        "  swap to a precompiled (cached) component: compile {:.1} ms, self-test {:.2} ms, switch {} ns, total {:.1} ms",
        again_report.compile_ms, again_report.selftest_ms, again_report.switch_ns, again.swap_took.as_secs_f64() * 1e3
    );
    println!(
        "  longest call: {:.1} us in a {:.0} ms window with a swap vs {:.1} us in one without: ratio {:.2}x",
        during.worst.as_secs_f64() * 1e6,
        during.len.as_secs_f64() * 1e3,
        base.worst.as_secs_f64() * 1e6,
        during.worst.as_secs_f64() / base.worst.as_secs_f64().max(1e-9)
    );
    for (name, w) in [
        ("with swap", &during),
        ("without", &base),
        ("cached swap", &again),
    ] {
        println!(
            "  {name:<12} calls issued {:>7}, answered by a plugin {:>7}, by failure policy {}, lost {}",
            w.issued,
            w.by_plugin,
            w.by_policy,
            w.issued - w.by_plugin - w.by_policy
        );
    }
}
