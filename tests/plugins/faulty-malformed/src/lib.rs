//! Test plugin `faulty-malformed`: answers that parse but are not placements.
//!
//! `place` answers, by a per-instance call counter `n` (0, 1, 2, ...) rotating through
//! * `n % 3 == 0` — **unknown**: as many ids as hosts given, none of them given
//!   (`"<id>-bogus"`; `["no-such-host"]` for an empty list);
//! * `n % 3 == 1` — **duplicate**: the first host twice, then the others (`[a, a, b, c]`;
//!   `["dup", "dup"]` for an empty list);
//! * `n % 3 == 2` — **empty**: `[]`.
//!
//! The counter lives in the component instance (a fresh instance starts at 0 again). Config
//! `mode=unknown|duplicate|empty` pins one answer for every call instead, whatever the
//! instance; empty config rotates.
//!
//! `rebalance` answers one move for a chunk that is not in the change: chunk
//! `no-such-space/no-such-chunk`, from the first `after` host (or `"nowhere"`) to the second
//! (or `"nowhere-else"`), `to-alpha` true.

#![forbid(unsafe_code)]

use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
use strata_plugin_sdk::Env;

/// Which malformed answer `place` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Host ids that were not given.
    Unknown,
    /// A host id twice.
    Duplicate,
    /// No host at all.
    Empty,
}

/// The malformed placement.
#[derive(Debug)]
pub struct Malformed {
    pinned: Option<Mode>,
    calls: u64,
}

impl Malformed {
    /// The mode of the next `place` call.
    pub fn next_mode(&mut self) -> Mode {
        let n = self.calls;
        self.calls += 1;
        self.pinned.unwrap_or(match n % 3 {
            0 => Mode::Unknown,
            1 => Mode::Duplicate,
            _ => Mode::Empty,
        })
    }
}

impl Placement for Malformed {
    fn init(config: &str, env: &mut dyn Env) -> Result<Self, String> {
        let pinned = match config.trim() {
            "" => None,
            "mode=unknown" => Some(Mode::Unknown),
            "mode=duplicate" => Some(Mode::Duplicate),
            "mode=empty" => Some(Mode::Empty),
            other => return Err(format!("faulty-malformed: bad config {other:?}")),
        };
        env.info(&format!("faulty-malformed: init ok, mode {pinned:?}"));
        Ok(Malformed { pinned, calls: 0 })
    }

    fn place(
        &mut self,
        _chunk: &ChunkRef,
        _size: u64,
        hosts: &[HostInfo],
        _env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        let ids = hosts.iter().map(|h| h.id.clone());
        Ok(match self.next_mode() {
            Mode::Unknown if hosts.is_empty() => vec!["no-such-host".into()],
            Mode::Unknown => ids.map(|id| format!("{id}-bogus")).collect(),
            Mode::Duplicate if hosts.is_empty() => vec!["dup".into(), "dup".into()],
            Mode::Duplicate => {
                let mut out = vec![hosts[0].id.clone()];
                out.extend(ids);
                out
            }
            Mode::Empty => Vec::new(),
        })
    }

    fn rebalance(
        &mut self,
        change: &MembershipChange,
        _env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        let host = |i: usize, default: &str| {
            change
                .after
                .get(i)
                .map_or_else(|| default.to_owned(), |h| h.id.clone())
        };
        Ok(vec![ChunkMove {
            chunk: ChunkRef {
                space: "no-such-space".into(),
                name: "no-such-chunk".into(),
            },
            from: host(0, "nowhere"),
            to: host(1, "nowhere-else"),
            to_alpha: true,
        }])
    }
}

strata_plugin_sdk::export_placement!(Malformed);

#[cfg(test)]
mod tests {
    use super::*;
    use strata_plugin_sdk::testing::MemEnv;

    fn hosts(ids: &[&str]) -> Vec<HostInfo> {
        ids.iter()
            .map(|id| HostInfo {
                id: (*id).into(),
                free_bytes: 1,
                capacity_bytes: 1,
            })
            .collect()
    }

    #[test]
    fn rotates_through_the_malformed_answers() {
        let env = &mut MemEnv::new();
        let mut p = Malformed::init("", env).unwrap();
        let chunk = ChunkRef {
            space: "s".into(),
            name: "c".into(),
        };
        let hs = hosts(&["a", "b"]);
        let mut place = |p: &mut Malformed| p.place(&chunk, 1, &hs, env).unwrap();
        assert_eq!(place(&mut p), ["a-bogus", "b-bogus"]);
        assert_eq!(place(&mut p), ["a", "a", "b"]);
        assert!(place(&mut p).is_empty());
        assert_eq!(place(&mut p), ["a-bogus", "b-bogus"]);
    }

    #[test]
    fn pinned_mode_and_rebalance() {
        let env = &mut MemEnv::new();
        let mut p = Malformed::init("mode=empty", env).unwrap();
        assert_eq!(p.next_mode(), Mode::Empty);
        assert_eq!(p.next_mode(), Mode::Empty);
        assert!(Malformed::init("mode=weird", env).is_err());
        let change = MembershipChange {
            before: vec![],
            after: hosts(&["x"]),
            chunks: vec![],
        };
        let moves = p.rebalance(&change, env).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(
            (moves[0].from.as_str(), moves[0].to.as_str()),
            ("x", "nowhere-else")
        );
        assert_eq!(moves[0].chunk.space, "no-such-space");
    }
}
