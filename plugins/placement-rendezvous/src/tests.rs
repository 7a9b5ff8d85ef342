use super::*;
use strata_plugin_sdk::placement::ChunkPlacement;
use strata_plugin_sdk::testing::MemEnv;

const GIB: u64 = 1 << 30;

fn host(id: &str, free_bytes: u64) -> HostInfo {
    HostInfo {
        id: id.into(),
        free_bytes,
        capacity_bytes: free_bytes.max(1) * 2,
    }
}

fn equal_hosts(n: usize) -> Vec<HostInfo> {
    (0..n).map(|i| host(&format!("host-{i:02}"), GIB)).collect()
}

fn chunk(i: usize) -> ChunkRef {
    ChunkRef {
        space: "space-a".into(),
        name: format!("chunk-{i:06}"),
    }
}

fn alpha(c: &ChunkRef, hosts: &[HostInfo]) -> String {
    rank(c, hosts, &Config::default()).unwrap().remove(0)
}

#[test]
fn deterministic_and_independent_of_input_order() {
    let hosts = vec![
        host("a", 3 * GIB),
        host("b", GIB),
        host("c", 2 * GIB),
        host("d", GIB),
    ];
    let mut reversed = hosts.clone();
    reversed.reverse();
    for i in 0..200 {
        let first = rank(&chunk(i), &hosts, &Config::default()).unwrap();
        assert_eq!(first, rank(&chunk(i), &hosts, &Config::default()).unwrap());
        assert_eq!(
            first,
            rank(&chunk(i), &reversed, &Config::default()).unwrap()
        );
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c", "d"]);
    }
}

#[test]
fn pinned_ranking() {
    // Guards the documented hash and score: a change here reshuffles existing clusters.
    let hosts = equal_hosts(5);
    let order = rank(&chunk(0), &hosts, &Config::default()).unwrap();
    assert_eq!(order, PINNED_ORDER);
}

// Checked independently (Python, from the documented hash; equal weights order by hash).
const PINNED_ORDER: [&str; 5] = ["host-04", "host-01", "host-03", "host-02", "host-00"];

#[test]
fn distribution_follows_free_space() {
    let weights = [1u64, 2, 3, 4];
    let hosts: Vec<HostInfo> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| host(&format!("h{i}"), w * GIB))
        .collect();
    let n = 10_000;
    let mut counts = [0usize; 4];
    for i in 0..n {
        let a = alpha(&chunk(i), &hosts);
        counts[a[1..].parse::<usize>().unwrap()] += 1;
    }
    let total: u64 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let expected = n as f64 * *w as f64 / total as f64;
        let got = counts[i] as f64;
        assert!(
            (got - expected).abs() < 0.1 * expected,
            "host h{i}: {got} alphas, expected about {expected} ({counts:?})"
        );
    }
}

#[test]
fn adding_a_host_moves_about_one_nth_of_the_alphas_all_to_it() {
    let before = equal_hosts(10);
    let mut after = before.clone();
    after.push(host("host-new", GIB));
    let n = 10_000;
    let mut moved = 0;
    for i in 0..n {
        let (a, b) = (alpha(&chunk(i), &before), alpha(&chunk(i), &after));
        if a != b {
            assert_eq!(b, "host-new", "chunk {i} moved from {a} to {b}");
            moved += 1;
        }
    }
    let expected = n / 11;
    assert!(
        moved > expected * 8 / 10 && moved < expected * 12 / 10,
        "{moved} of {n} alphas moved, expected about {expected}"
    );
}

#[test]
fn removing_a_host_only_moves_its_alphas() {
    let before = equal_hosts(8);
    let after: Vec<HostInfo> = before
        .iter()
        .filter(|h| h.id != "host-03")
        .cloned()
        .collect();
    for i in 0..2_000 {
        let (a, b) = (alpha(&chunk(i), &before), alpha(&chunk(i), &after));
        if a != "host-03" {
            assert_eq!(a, b);
        }
    }
}

#[test]
fn full_hosts_go_last() {
    let hosts = vec![
        host("full", 0),
        host("small", 10),
        host("big", GIB),
        host("tiny", 1),
    ];
    for i in 0..100 {
        let order = rank(&chunk(i), &hosts, &Config::default()).unwrap();
        assert_eq!(order.len(), 4);
        assert_eq!(order[3], "full");
        let cfg = Config::parse("min_free_bytes=11").unwrap();
        let order = rank(&chunk(i), &hosts, &cfg).unwrap();
        assert_eq!(order[0], "big");
    }
    // With no host having room, the order is still complete and deterministic.
    let full = vec![host("x", 0), host("y", 0), host("z", 0)];
    let order = rank(&chunk(1), &full, &Config::default()).unwrap();
    assert_eq!(order.len(), 3);
    assert_eq!(order, rank(&chunk(1), &full, &Config::default()).unwrap());
}

#[test]
fn copies_truncates() {
    let cfg = Config::parse("copies=2").unwrap();
    let hosts = equal_hosts(5);
    let all = rank(&chunk(7), &hosts, &Config::default()).unwrap();
    assert_eq!(rank(&chunk(7), &hosts, &cfg).unwrap(), all[..2]);
    let cfg = Config::parse("copies=9").unwrap();
    assert_eq!(rank(&chunk(7), &hosts, &cfg).unwrap(), all);
}

#[test]
fn bad_host_lists() {
    let cfg = Config::default();
    assert_eq!(rank(&chunk(0), &[], &cfg), Err(PlaceError::NoHosts));
    assert_eq!(
        rank(&chunk(0), &[host("a", 1), host("b", 1), host("a", 2)], &cfg),
        Err(PlaceError::DuplicateHost("a".into()))
    );
    assert_eq!(
        rank(&chunk(0), &[host("", 1)], &cfg),
        Err(PlaceError::EmptyHostId)
    );
    let env = &mut MemEnv::new();
    let mut p = Rendezvous::init("", env).unwrap();
    let err = p.place(&chunk(0), 1, &[], env).unwrap_err();
    assert!(err.contains("no hosts"), "{err}");
}

#[test]
fn config() {
    assert_eq!(Config::parse("").unwrap(), Config::default());
    assert_eq!(
        Config::parse("copies=3\nmin_free_bytes=64MiB").unwrap(),
        Config {
            copies: Some(3),
            min_free_bytes: 64 << 20
        }
    );
    assert!(Config::parse("copies=0").is_err());
    assert!(Config::parse("copies=x").is_err());
    assert!(Config::parse("replicas=3").is_err());
    let env = &mut MemEnv::new();
    let err = Rendezvous::init("bogus=1", env).unwrap_err();
    assert!(err.contains("unknown config key `bogus`"), "{err}");
}

fn placement(i: usize, hosts: &[HostInfo], copies: usize) -> ChunkPlacement {
    let mut order = rank(&chunk(i), hosts, &Config::default()).unwrap();
    order.truncate(copies);
    ChunkPlacement {
        chunk: chunk(i),
        size: 1 << 20,
        hosts: order,
    }
}

/// Apply moves to a placement the way the runtime would.
fn apply(p: &ChunkPlacement, moves: &[ChunkMove]) -> Vec<String> {
    let mut hosts = p.hosts.clone();
    for m in moves.iter().filter(|m| m.chunk == p.chunk) {
        if m.from != m.to {
            let i = hosts
                .iter()
                .position(|h| *h == m.from)
                .expect("from holds a copy");
            assert!(!hosts.contains(&m.to), "{} already holds a copy", m.to);
            hosts.remove(i);
            hosts.push(m.to.clone());
        }
        if m.to_alpha {
            let i = hosts.iter().position(|h| *h == m.to).unwrap();
            let h = hosts.remove(i);
            hosts.insert(0, h);
        }
    }
    hosts
}

#[test]
fn rebalance_after_a_host_leaves() {
    let before = equal_hosts(6);
    let after: Vec<HostInfo> = before
        .iter()
        .filter(|h| h.id != "host-02")
        .cloned()
        .collect();
    let chunks: Vec<ChunkPlacement> = (0..500).map(|i| placement(i, &before, 3)).collect();
    let change = MembershipChange {
        before: before.clone(),
        after: after.clone(),
        chunks: chunks.clone(),
    };
    let moves = plan_moves(&change, &Config::default()).unwrap();
    let affected = chunks
        .iter()
        .filter(|c| c.hosts.iter().any(|h| h == "host-02"))
        .count();
    let alphas_lost = chunks.iter().filter(|c| c.hosts[0] == "host-02").count();
    // One move per lost copy, plus an in-place promotion per lost alpha (HRW keeps the
    // relative order of the remaining hosts, so the second copy becomes the alpha).
    assert_eq!(moves.len(), affected + alphas_lost);
    for c in &chunks {
        let new_hosts = apply(c, &moves);
        let mut ideal = rank(&c.chunk, &after, &Config::default()).unwrap();
        ideal.truncate(3);
        // Exactly the ideal top 3, alpha first.
        assert_eq!(new_hosts[0], ideal[0], "{c:?}");
        let mut got = new_hosts.clone();
        got.sort();
        ideal.sort();
        assert_eq!(got, ideal, "{c:?}");
    }
    for m in &moves {
        assert!(
            m.from == "host-02" || (m.from == m.to && m.to_alpha),
            "{m:?}"
        );
    }
}

#[test]
fn rebalance_after_a_host_joins() {
    let before = equal_hosts(6);
    let mut after = before.clone();
    after.push(host("host-new", GIB));
    let chunks: Vec<ChunkPlacement> = (0..700).map(|i| placement(i, &before, 2)).collect();
    let change = MembershipChange {
        before,
        after: after.clone(),
        chunks: chunks.clone(),
    };
    let moves = plan_moves(&change, &Config::default()).unwrap();
    assert!(!moves.is_empty());
    for m in &moves {
        assert_eq!(m.to, "host-new");
        assert!(m.to_alpha);
    }
    for c in &chunks {
        let new_hosts = apply(c, &moves);
        assert_eq!(new_hosts[0], alpha(&c.chunk, &after));
        assert_eq!(new_hosts.len(), 2);
    }
    // About 1/7 of the alphas moved.
    assert!(
        moves.len() > 70 && moves.len() < 140,
        "{} moves",
        moves.len()
    );
}

#[test]
fn rebalance_promotes_in_place() {
    // Find a chunk whose alpha leaves and whose second copy becomes the alpha.
    let before = equal_hosts(4);
    let i = (0..)
        .find(|i| placement(*i, &before, 2).hosts[0] == "host-00")
        .unwrap();
    let p = placement(i, &before, 2);
    let after: Vec<HostInfo> = before
        .iter()
        .filter(|h| h.id != "host-00")
        .cloned()
        .collect();
    let change = MembershipChange {
        before: before.clone(),
        after: after.clone(),
        chunks: vec![p.clone()],
    };
    let moves = plan_moves(&change, &Config::default()).unwrap();
    let ideal = rank(&p.chunk, &after, &Config::default()).unwrap();
    assert_eq!(
        ideal[0], p.hosts[1],
        "HRW keeps the relative order of the others"
    );
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert_eq!(
        (moves[0].from.as_str(), moves[0].to_alpha),
        (p.hosts[1].as_str(), true)
    );
    assert_eq!(moves[0].from, moves[0].to);
    assert_eq!(
        (
            moves[1].from.as_str(),
            moves[1].to.as_str(),
            moves[1].to_alpha
        ),
        ("host-00", ideal[1].as_str(), false)
    );
}

#[test]
fn rebalance_errors_and_edge_cases() {
    let cfg = Config::default();
    let empty = MembershipChange {
        before: vec![],
        after: vec![],
        chunks: vec![],
    };
    assert_eq!(plan_moves(&empty, &cfg).unwrap(), vec![]);
    let everyone_left = MembershipChange {
        before: equal_hosts(2),
        after: vec![],
        chunks: vec![placement(0, &equal_hosts(2), 2)],
    };
    assert_eq!(plan_moves(&everyone_left, &cfg), Err(PlaceError::NoHosts));
    // More copies than hosts left: the copies that cannot be replaced are not moved.
    let before = equal_hosts(3);
    let p = placement(1, &before, 3);
    let change = MembershipChange {
        before: before.clone(),
        after: vec![host(&p.hosts[0], GIB)],
        chunks: vec![p.clone()],
    };
    assert_eq!(plan_moves(&change, &cfg).unwrap(), vec![]);
    let env = &mut MemEnv::new();
    let mut plugin = Rendezvous::init("", env).unwrap();
    assert!(plugin.rebalance(&everyone_left, env).is_err());
    assert!(plugin.rebalance(&empty, env).unwrap().is_empty());
}
