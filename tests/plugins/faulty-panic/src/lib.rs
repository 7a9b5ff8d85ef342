//! Test plugin `faulty-panic`: `init` succeeds, `place` panics (the `wasm` profile has
//! `panic = "abort"`, so the host sees a trap), `rebalance` returns no moves.

#![forbid(unsafe_code)]

use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
use strata_plugin_sdk::Env;

/// The panic message of `place`.
pub const MESSAGE: &str = "faulty-panic: place panics on purpose";

/// A placement that panics in `place`.
pub struct Panicky;

impl Placement for Panicky {
    fn init(_config: &str, env: &mut dyn Env) -> Result<Self, String> {
        env.info("faulty-panic: init ok; place will panic");
        Ok(Panicky)
    }

    fn place(
        &mut self,
        chunk: &ChunkRef,
        _size: u64,
        _hosts: &[HostInfo],
        _env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        panic!("{MESSAGE} (chunk {}/{})", chunk.space, chunk.name);
    }

    fn rebalance(
        &mut self,
        _change: &MembershipChange,
        _env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        Ok(Vec::new())
    }
}

strata_plugin_sdk::export_placement!(Panicky);

#[cfg(test)]
mod tests {
    use super::*;
    use strata_plugin_sdk::testing::MemEnv;

    #[test]
    #[should_panic(expected = "place panics on purpose")]
    fn place_panics() {
        let env = &mut MemEnv::new();
        let mut p = Panicky::init("", env).unwrap();
        let chunk = ChunkRef {
            space: "s".into(),
            name: "c".into(),
        };
        let _ = p.place(&chunk, 1, &[], env);
    }
}
