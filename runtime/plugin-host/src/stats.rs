//! Counters per plugin version: calls, failures by kind, latency.

use super::error::FailureKind;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const BUCKETS: usize = 32;

/// Lock-free counters of one plugin version.
#[derive(Default)]
pub(crate) struct Counters {
    calls: AtomicU64,
    ok: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    memory_limits: AtomicU64,
    malformed: AtomicU64,
    plugin_errors: AtomicU64,
    /// Timeouts and memory-cap failures on inputs over `rollback_input_bytes` (counted in
    /// `calls` and their kind too, but not towards rollback).
    excused: AtomicU64,
    policy_applied: AtomicU64,
    instances: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    /// log2 buckets of latency in ns: bucket i holds [2^i, 2^(i+1)).
    hist: [AtomicU64; BUCKETS],
}

impl Counters {
    pub(crate) fn record(&self, ns: u64, outcome: Result<(), FailureKind>) {
        self.calls.fetch_add(1, Relaxed);
        self.total_ns.fetch_add(ns, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
        let b = (64 - ns.max(1).leading_zeros() as usize - 1).min(BUCKETS - 1);
        self.hist[b].fetch_add(1, Relaxed);
        let c = match outcome {
            Ok(()) => &self.ok,
            Err(FailureKind::Trap) => &self.traps,
            Err(FailureKind::Timeout) => &self.timeouts,
            Err(FailureKind::MemoryLimit) => &self.memory_limits,
            Err(FailureKind::Malformed) => &self.malformed,
            Err(FailureKind::PluginError) => &self.plugin_errors,
        };
        c.fetch_add(1, Relaxed);
    }

    /// Record a failure that does not count towards rollback: excused first, so that a
    /// concurrent rollback check never counts it as a failure.
    pub(crate) fn record_excused(&self, ns: u64, kind: FailureKind) {
        self.excused.fetch_add(1, Relaxed);
        self.record(ns, Err(kind));
    }

    pub(crate) fn policy_applied(&self) {
        self.policy_applied.fetch_add(1, Relaxed);
    }

    pub(crate) fn instance_created(&self) {
        self.instances.fetch_add(1, Relaxed);
    }

    /// (calls, failures that count toward rollback).
    pub(crate) fn failure_rate_inputs(&self) -> (u64, u64) {
        let failed = self.traps.load(Relaxed)
            + self.timeouts.load(Relaxed)
            + self.memory_limits.load(Relaxed)
            + self.malformed.load(Relaxed);
        let excused = self.excused.load(Relaxed);
        (
            self.calls.load(Relaxed).saturating_sub(excused),
            failed.saturating_sub(excused),
        )
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let hist: Vec<u64> = self.hist.iter().map(|h| h.load(Relaxed)).collect();
        let calls = self.calls.load(Relaxed);
        let pct = |p: f64| -> u64 {
            let want = ((calls as f64) * p).ceil() as u64;
            let mut seen = 0;
            for (i, n) in hist.iter().enumerate() {
                seen += n;
                if seen >= want && want > 0 {
                    return 1u64 << (i + 1);
                }
            }
            0
        };
        Stats {
            calls,
            ok: self.ok.load(Relaxed),
            traps: self.traps.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            memory_limits: self.memory_limits.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            plugin_errors: self.plugin_errors.load(Relaxed),
            excused: self.excused.load(Relaxed),
            policy_applied: self.policy_applied.load(Relaxed),
            instances: self.instances.load(Relaxed),
            mean_ns: self.total_ns.load(Relaxed).checked_div(calls).unwrap_or(0),
            p50_ns_upper: pct(0.50),
            p99_ns_upper: pct(0.99),
            max_ns: self.max_ns.load(Relaxed),
        }
    }
}

/// A snapshot of a version's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Calls made (every hook, `init` of pooled instances excluded).
    pub calls: u64,
    /// Calls that answered well.
    pub ok: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls that passed the epoch deadline.
    pub timeouts: u64,
    /// Calls that hit the memory cap.
    pub memory_limits: u64,
    /// Calls whose answer was not valid.
    pub malformed: u64,
    /// Calls where the plugin returned its own error.
    pub plugin_errors: u64,
    /// Timeouts and memory-cap failures on inputs over `plugins.rollback_input_bytes`
    /// (also counted as timeouts / memory limits), which do not count towards rollback.
    #[serde(default)]
    pub excused: u64,
    /// Calls answered by the failure policy instead of the plugin.
    pub policy_applied: u64,
    /// Instances created (each trap discards one).
    pub instances: u64,
    /// Mean latency.
    pub mean_ns: u64,
    /// Upper bound of the median latency (power-of-two bucket).
    pub p50_ns_upper: u64,
    /// Upper bound of the 99th percentile latency (power-of-two bucket).
    pub p99_ns_upper: u64,
    /// Longest call.
    pub max_ns: u64,
}

impl Stats {
    /// Sum of two snapshots (latency maxima and percentiles take the larger).
    pub fn merge(&self, o: &Stats) -> Stats {
        let calls = self.calls + o.calls;
        Stats {
            calls,
            ok: self.ok + o.ok,
            traps: self.traps + o.traps,
            timeouts: self.timeouts + o.timeouts,
            memory_limits: self.memory_limits + o.memory_limits,
            malformed: self.malformed + o.malformed,
            plugin_errors: self.plugin_errors + o.plugin_errors,
            excused: self.excused + o.excused,
            policy_applied: self.policy_applied + o.policy_applied,
            instances: self.instances + o.instances,
            mean_ns: (self.mean_ns * self.calls + o.mean_ns * o.calls)
                .checked_div(calls)
                .unwrap_or(0),
            p50_ns_upper: self.p50_ns_upper.max(o.p50_ns_upper),
            p99_ns_upper: self.p99_ns_upper.max(o.p99_ns_upper),
            max_ns: self.max_ns.max(o.max_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let c = Counters::default();
        for _ in 0..99 {
            c.record(1000, Ok(()));
        }
        c.record(1_000_000, Err(FailureKind::Timeout));
        let s = c.snapshot();
        assert_eq!((s.calls, s.ok, s.timeouts), (100, 99, 1));
        assert_eq!(s.p50_ns_upper, 1024);
        assert_eq!(s.p99_ns_upper, 1024);
        assert_eq!(s.max_ns, 1_000_000);
        assert_eq!(c.failure_rate_inputs(), (100, 1));
    }
}
