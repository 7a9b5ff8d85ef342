//! Test plugin `faulty-hog`: `init` succeeds, `place` allocates 1 MiB blocks (each written, so
//! the pages are really used) and keeps all of them until the host's memory limit makes an
//! allocation fail (the guest then aborts: a trap). `rebalance` returns no moves.

#![forbid(unsafe_code)]

use core::hint::black_box;

use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
use strata_plugin_sdk::Env;

/// Bytes per allocation.
pub const BLOCK: usize = 1 << 20;

/// A placement that hoards memory in `place`.
pub struct Hog;

impl Placement for Hog {
    fn init(_config: &str, env: &mut dyn Env) -> Result<Self, String> {
        env.info("faulty-hog: init ok; place will allocate without bound");
        Ok(Hog)
    }

    fn place(
        &mut self,
        _chunk: &ChunkRef,
        _size: u64,
        _hosts: &[HostInfo],
        _env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let block = black_box(vec![0xa5u8; BLOCK]);
            hoard.push(block);
            black_box(&mut hoard);
        }
    }

    fn rebalance(
        &mut self,
        _change: &MembershipChange,
        _env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        Ok(Vec::new())
    }
}

strata_plugin_sdk::export_placement!(Hog);
