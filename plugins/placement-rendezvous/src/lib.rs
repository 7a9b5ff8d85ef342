//! `placement-rendezvous`: the official Strata chunk placement, weighted rendezvous (highest
//! random weight) hashing on the hosts' free space.
//!
//! ```text
//!  chunk (space, name) ─┬─ host a: key_hash ─► unit u_a ─► score_a = w_a / -ln(u_a) ─┐
//!                       ├─ host b: ...                                               ├─► sort ─► [alpha, copy, copy, ...]
//!                       └─ host c: ...                                               ┘
//! ```
//!
//! # Ranking ([`rank`])
//!
//! Every host gets a score for the chunk: `weight / -ln(u)` where `u` in (0, 1) comes from a
//! fixed 64-bit hash of (space, chunk name, host id) ([`hrw::key_hash`]: FNV-1a 64 over
//! length-framed fields, splitmix64 finalizer) and `weight` is the host's free bytes. Hosts are
//! ordered by descending score; the first holds the alpha copy. With this score a host comes
//! first with probability `weight / Σ weights`, and adding or removing a host only changes the
//! order relative to that host: about `1/n` of the alphas move when an `n`-th host joins, all of
//! them to the new host.
//!
//! * **Full hosts go last.** A host with fewer free bytes than `min_free_bytes` (and always a
//!   host with 0 free bytes) is not excluded — `place` returns every host — but ranked after
//!   all hosts with room, among themselves by unweighted score.
//! * **Deterministic.** No randomness, no hash-map order: the result depends only on the
//!   chunk, the host ids and free bytes, and the config, not on the order of the input. Ties of
//!   score (practically impossible) fall back to the hash, then the host id. The logarithm is
//!   computed with basic IEEE operations only ([`hrw::ln_unit`]), so native code and the
//!   component rank identically.
//! * **Errors**: an empty host list, an empty host id, a host id given twice.
//!
//! # Rebalancing ([`plan_moves`])
//!
//! For each chunk in a membership change, the hosts are ranked again over `after`. With `H` the
//! current holders (alpha first) and `R` the new ranking:
//! 1. if `R[0]` is not the alpha: if `R[0]` already holds a copy, it is promoted in place
//!    (a move with `from == to` and `to-alpha`); otherwise one copy moves to `R[0]` with
//!    `to-alpha` — the old alpha's if it left, else another departed holder's, else the copy of
//!    the present holder ranked lowest in `R`;
//! 2. every other copy on a host that left moves to the best-ranked host in `R` that holds no
//!    copy yet (if any remains; otherwise that copy cannot be replaced and no move is emitted).
//!
//! Copies on hosts that stay are never moved for any other reason, so a change disturbs only
//! the chunks it has to.
//!
//! # Configuration
//!
//! `key=value` entries ([`strata_plugin_sdk::config`]); empty text = all defaults; unknown keys
//! are refused:
//!
//! | key              | default | meaning                                                      |
//! |------------------|---------|--------------------------------------------------------------|
//! | `copies`         | all     | `place` returns only the first `copies` hosts (≥ 1)          |
//! | `min_free_bytes` | `1`     | hosts with less free space rank after all others (`64MiB` ok) |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::cmp::Ordering;
use core::fmt;
use std::collections::BTreeSet;

use strata_plugin_sdk::config::{ConfigError, ConfigMap};
use strata_plugin_sdk::placement::{ChunkMove, MembershipChange, Placement};
use strata_plugin_sdk::Env;

pub mod hrw;

/// The input types of [`rank`] (the SDK's placement records), re-exported so native callers
/// need not name the SDK.
pub use strata_plugin_sdk::placement::{ChunkRef, HostInfo};

/// A host [`rank`] can choose: the SDK's [`HostInfo`] (`id`, `free_bytes`, `capacity_bytes`).
pub type Candidate = HostInfo;

/// The plugin's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Keep only this many hosts in `place` answers; `None`: all hosts.
    pub copies: Option<usize>,
    /// Hosts with fewer free bytes rank after all others. Hosts with 0 free bytes always do.
    pub min_free_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            copies: None,
            min_free_bytes: 1,
        }
    }
}

impl Config {
    /// Parse the slot's config text (see the crate docs).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut map = ConfigMap::parse(text)?;
        let mut cfg = Config::default();
        if let Some(copies) = map.take_u64("copies")? {
            let copies = usize::try_from(copies)
                .ok()
                .filter(|c| *c >= 1)
                .ok_or_else(|| ConfigError::InvalidValue {
                    key: "copies".into(),
                    value: copies.to_string(),
                    expected: "a positive integer",
                })?;
            cfg.copies = Some(copies);
        }
        if let Some(min) = map.take_bytes("min_free_bytes")? {
            cfg.min_free_bytes = min;
        }
        map.finish()?;
        Ok(cfg)
    }
}

/// Why hosts could not be ranked: the host list itself is unusable (the caller's fault).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlaceError {
    /// No hosts to place on.
    NoHosts,
    /// A host with an empty id.
    EmptyHostId,
    /// The same host id appears twice.
    DuplicateHost(String),
}

impl fmt::Display for PlaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlaceError::NoHosts => f.write_str("no hosts to place on"),
            PlaceError::EmptyHostId => f.write_str("a host has an empty id"),
            PlaceError::DuplicateHost(id) => write!(f, "host id `{id}` given twice"),
        }
    }
}

impl std::error::Error for PlaceError {}

fn validate(hosts: &[HostInfo]) -> Result<(), PlaceError> {
    if hosts.is_empty() {
        return Err(PlaceError::NoHosts);
    }
    let mut seen = BTreeSet::new();
    for h in hosts {
        if h.id.is_empty() {
            return Err(PlaceError::EmptyHostId);
        }
        if !seen.insert(h.id.as_str()) {
            return Err(PlaceError::DuplicateHost(h.id.clone()));
        }
    }
    Ok(())
}

/// One host's rank key for one chunk.
struct Ranked<'a> {
    id: &'a str,
    has_room: bool,
    score: f64,
    hash: u64,
}

impl Ranked<'_> {
    /// Best first: hosts with room, then higher score, higher hash, smaller id.
    fn cmp_best_first(&self, other: &Self) -> Ordering {
        other
            .has_room
            .cmp(&self.has_room)
            .then_with(|| other.score.total_cmp(&self.score))
            .then_with(|| other.hash.cmp(&self.hash))
            .then_with(|| self.id.cmp(other.id))
    }
}

/// All hosts ordered for the chunk, best first (the hosts are already validated).
fn order<'a>(chunk: &ChunkRef, hosts: &'a [HostInfo], cfg: &Config) -> Vec<&'a str> {
    let threshold = cfg.min_free_bytes.max(1);
    let mut ranked: Vec<Ranked<'a>> = hosts
        .iter()
        .map(|h| {
            let hash = hrw::key_hash(&chunk.space, &chunk.name, &h.id);
            let has_room = h.free_bytes >= threshold;
            let weight = if has_room { h.free_bytes as f64 } else { 1.0 };
            Ranked {
                id: &h.id,
                has_room,
                score: hrw::score(hash, weight),
                hash,
            }
        })
        .collect();
    ranked.sort_by(Ranked::cmp_best_first);
    ranked.into_iter().map(|r| r.id).collect()
}

/// The hosts for a chunk, best first: the first holds the alpha copy. Every host appears once,
/// unless `cfg.copies` truncates the list.
///
/// This is exactly what the component's `place` answers (the chunk size does not matter), so
/// the runtime's benchmark can call it natively.
pub fn rank(chunk: &ChunkRef, hosts: &[HostInfo], cfg: &Config) -> Result<Vec<String>, PlaceError> {
    validate(hosts)?;
    let mut ids: Vec<String> = order(chunk, hosts, cfg)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(copies) = cfg.copies {
        ids.truncate(copies);
    }
    Ok(ids)
}

/// The moves after a membership change (see the crate docs for the rules). Chunks without
/// holders are skipped; `after` must be a valid host list if there is any chunk to move.
pub fn plan_moves(change: &MembershipChange, cfg: &Config) -> Result<Vec<ChunkMove>, PlaceError> {
    let mut moves = Vec::new();
    if change.chunks.iter().all(|c| c.hosts.is_empty()) {
        return Ok(moves);
    }
    validate(&change.after)?;
    let present: BTreeSet<&str> = change.after.iter().map(|h| h.id.as_str()).collect();

    for placement in &change.chunks {
        // Current holders, alpha first, without repeats.
        let mut holders: Vec<&str> = Vec::with_capacity(placement.hosts.len());
        for h in &placement.hosts {
            if !holders.contains(&h.as_str()) {
                holders.push(h);
            }
        }
        let Some(&alpha) = holders.first() else {
            continue;
        };
        let ranking = order(&placement.chunk, &change.after, cfg);
        let mut departed: Vec<&str> = holders
            .iter()
            .copied()
            .filter(|h| !present.contains(h))
            .collect();
        let mut free: Vec<&str> = ranking
            .iter()
            .copied()
            .filter(|h| !holders.contains(h))
            .collect();
        let mv = |from: &str, to: &str, to_alpha: bool| ChunkMove {
            chunk: placement.chunk.clone(),
            from: from.to_owned(),
            to: to.to_owned(),
            to_alpha,
        };

        let new_alpha = ranking[0];
        if new_alpha != alpha {
            if holders.contains(&new_alpha) {
                moves.push(mv(new_alpha, new_alpha, true));
            } else {
                let source = if departed.contains(&alpha) {
                    alpha
                } else if let Some(&first) = departed.first() {
                    first
                } else {
                    // The present holder ranked lowest: the one the ideal order drops.
                    *ranking
                        .iter()
                        .rev()
                        .find(|h| holders.contains(h))
                        .expect("a holder is present when none departed")
                };
                moves.push(mv(source, new_alpha, true));
                departed.retain(|h| *h != source);
                free.retain(|h| *h != new_alpha);
            }
        }
        for (from, to) in departed.into_iter().zip(free) {
            moves.push(mv(from, to, false));
        }
    }
    Ok(moves)
}

/// The plugin: weighted rendezvous hashing with a [`Config`].
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// The configuration from `init`.
    pub config: Config,
}

impl Placement for Rendezvous {
    fn init(config: &str, env: &mut dyn Env) -> Result<Self, String> {
        let config = Config::parse(config).map_err(|e| format!("placement-rendezvous: {e}"))?;
        env.info(&format!("placement-rendezvous: {config:?}"));
        Ok(Rendezvous { config })
    }

    fn place(
        &mut self,
        chunk: &ChunkRef,
        _size: u64,
        hosts: &[HostInfo],
        _env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        rank(chunk, hosts, &self.config).map_err(|e| format!("placement-rendezvous: {e}"))
    }

    fn rebalance(
        &mut self,
        change: &MembershipChange,
        env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        let moves =
            plan_moves(change, &self.config).map_err(|e| format!("placement-rendezvous: {e}"))?;
        env.info(&format!(
            "placement-rendezvous: rebalance of {} chunks over {} hosts: {} moves",
            change.chunks.len(),
            change.after.len(),
            moves.len()
        ));
        Ok(moves)
    }
}

strata_plugin_sdk::export_placement!(Rendezvous);

#[cfg(test)]
mod tests;
