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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    h.load(
        "p",
        PluginKind::Placement,
        &rendezvous,
        "bench",
        SlotSettings::default(),
    )
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

    println!("placement decision, 8 hosts, {calls} calls each");
    println!("  native rank()          {native_ns:>9.0} ns/call");
    println!("  through Wasm (place)   {wasm_ns:>9.0} ns/call");
    println!(
        "  ratio wasm/native      {:>9.2}x  (overhead {:.0} ns/call)",
        wasm_ns / native_ns,
        wasm_ns - native_ns
    );

    // Swap under 4 concurrent callers: latency window without a swap, then with one.
    let echo = component("placement-echo");
    let window = |swap: Option<&[u8]>| -> (Duration, u64, Option<SwapReport>, Duration) {
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(Mutex::new(Duration::ZERO));
        let done = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (h, hs, stop, worst, done, chunks) = (
                    h.clone(),
                    hs.clone(),
                    stop.clone(),
                    worst.clone(),
                    done.clone(),
                    chunks.clone(),
                );
                std::thread::spawn(move || {
                    let mut local = Duration::ZERO;
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        black_box(h.place("p", &chunks[i % 1024], 1 << 20, &hs).unwrap());
                        local = local.max(t.elapsed());
                        i += 4;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut g = worst.lock().unwrap();
                    *g = (*g).max(local);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let report = swap.map(|bytes| h.swap("p", bytes, "bench-swap", None).expect("swap"));
        let took = t.elapsed();
        if swap.is_none() {
            std::thread::sleep(Duration::from_millis(30));
        }
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let worst = *worst.lock().unwrap();
        (worst, done.load(Ordering::Relaxed), report, took)
    };
    let (base_worst, base_calls, _, _) = window(None);
    let (swap_worst, swap_calls, report, swap_took) = window(Some(&echo));
    let report = report.unwrap();
    // Swap back to a component already in the precompiled cache.
    let (_, _, again, again_took) = window(Some(&rendezvous));
    let again = again.unwrap();
    println!("hot swap under 4 concurrent callers");
    println!(
        "  swap (compile {:.1} ms [{:?}] + self-test {:.2} ms + switch {} ns): {:.1} ms",
        report.compile_ms,
        report.cache,
        report.selftest_ms,
        report.switch_ns,
        swap_took.as_secs_f64() * 1e3
    );
    println!(
        "  swap to a precompiled (cached) component: compile {:.1} ms, self-test {:.2} ms, switch {} ns, total {:.1} ms",
        again.compile_ms, again.selftest_ms, again.switch_ns, again_took.as_secs_f64() * 1e3
    );
    println!(
        "  longest call: {:.1} us during a swap ({swap_calls} calls) vs {:.1} us without ({base_calls} calls): ratio {:.2}x",
        swap_worst.as_secs_f64() * 1e6,
        base_worst.as_secs_f64() * 1e6,
        swap_worst.as_secs_f64() / base_worst.as_secs_f64().max(1e-9)
    );
    let info = h.get("p").unwrap();
    println!("  calls lost: {}", info.total.calls - info.total.ok);
}
