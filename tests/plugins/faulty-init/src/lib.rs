//! Test plugin `faulty-init`: `init` always fails with `refusing config <config as Debug>`, so
//! a hot swap to it must be refused and the old version kept. `place` and `rebalance` are never
//! reached (the SDK answers "called before a successful `init`").

#![forbid(unsafe_code)]

use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
use strata_plugin_sdk::Env;

/// A placement that refuses every config.
pub struct Refuser;

impl Placement for Refuser {
    fn init(config: &str, env: &mut dyn Env) -> Result<Self, String> {
        env.warn("faulty-init: refusing every config");
        Err(format!("refusing config {config:?}"))
    }

    fn place(
        &mut self,
        _chunk: &ChunkRef,
        _size: u64,
        hosts: &[HostInfo],
        _env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        Ok(hosts.iter().map(|h| h.id.clone()).collect())
    }

    fn rebalance(
        &mut self,
        _change: &MembershipChange,
        _env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        Ok(Vec::new())
    }
}

strata_plugin_sdk::export_placement!(Refuser);

#[cfg(test)]
mod tests {
    use super::*;
    use strata_plugin_sdk::testing::MemEnv;

    #[test]
    fn refuses_everything() {
        let env = &mut MemEnv::new();
        for config in ["", "copies=3", "anything at all"] {
            let err = Refuser::init(config, env).err().unwrap();
            assert!(err.starts_with("refusing config "), "{err}");
        }
    }
}
