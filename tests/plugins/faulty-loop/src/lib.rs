//! Test plugin `faulty-loop`: `init` succeeds, `place` never returns (the host must interrupt
//! it: epoch deadline or fuel), `rebalance` returns no moves.

#![forbid(unsafe_code)]

use core::hint::black_box;

use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
use strata_plugin_sdk::Env;

/// A placement that spins forever in `place`.
pub struct Spin;

impl Placement for Spin {
    fn init(_config: &str, env: &mut dyn Env) -> Result<Self, String> {
        env.info("faulty-loop: init ok; place will never return");
        Ok(Spin)
    }

    fn place(
        &mut self,
        _chunk: &ChunkRef,
        _size: u64,
        hosts: &[HostInfo],
        _env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        // `black_box` hides the counter from the optimizer, so the loop cannot be proven
        // side-effect free and removed.
        let mut spins = 0u64;
        while black_box(hosts.len()) != usize::MAX {
            spins = black_box(spins.wrapping_add(1));
        }
        Err(format!("unreachable after {spins} spins"))
    }

    fn rebalance(
        &mut self,
        _change: &MembershipChange,
        _env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        Ok(Vec::new())
    }
}

strata_plugin_sdk::export_placement!(Spin);
