//! Test plugin `placement-echo`: places a chunk on the given hosts in input order.
//!
//! Config: free text, kept as given. Whitespace/comma/semicolon separated tokens switch on:
//! * `fail=true`  — `init` returns `Err` (a refused swap);
//! * `count=true` — every `place` and `rebalance` call adds 1 to the decimal counter in kv key
//!   `calls` (kv round trips; the counter survives swaps because the host keeps the store).
//!
//! `place` errors on an empty host list; `rebalance` never moves anything. `init` logs
//! `placement-echo init: config=<config>` at info.

#![forbid(unsafe_code)]

use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
use strata_plugin_sdk::Env;

/// The kv key counting calls when `count=true`.
pub const CALLS_KEY: &str = "calls";

/// Echo placement.
#[derive(Debug)]
pub struct Echo {
    /// The config text `init` got.
    pub config: String,
    count: bool,
}

fn has_flag(config: &str, flag: &str) -> bool {
    config
        .split(|c: char| c == ',' || c == ';' || c.is_ascii_whitespace())
        .any(|token| token == flag)
}

impl Echo {
    fn count_call(&self, env: &mut dyn Env) -> Result<(), String> {
        if self.count {
            env.kv_add(CALLS_KEY, 1)
                .map_err(|e| format!("placement-echo: counting calls: {e}"))?;
        }
        Ok(())
    }
}

impl Placement for Echo {
    fn init(config: &str, env: &mut dyn Env) -> Result<Self, String> {
        if has_flag(config, "fail=true") {
            return Err(format!(
                "placement-echo: refusing config {config:?} (fail=true)"
            ));
        }
        env.info(&format!("placement-echo init: config={config}"));
        Ok(Echo {
            config: config.to_owned(),
            count: has_flag(config, "count=true"),
        })
    }

    fn place(
        &mut self,
        _chunk: &ChunkRef,
        _size: u64,
        hosts: &[HostInfo],
        env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        self.count_call(env)?;
        if hosts.is_empty() {
            return Err("placement-echo: no hosts".into());
        }
        Ok(hosts.iter().map(|h| h.id.clone()).collect())
    }

    fn rebalance(
        &mut self,
        _change: &MembershipChange,
        env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        self.count_call(env)?;
        Ok(Vec::new())
    }
}

strata_plugin_sdk::export_placement!(Echo);

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

    fn chunk() -> ChunkRef {
        ChunkRef {
            space: "s".into(),
            name: "c".into(),
        }
    }

    #[test]
    fn echoes_input_order() {
        let env = &mut MemEnv::new();
        let mut p = Echo::init("v2", env).unwrap();
        assert_eq!(p.config, "v2");
        let order = p.place(&chunk(), 1, &hosts(&["b", "a", "c"]), env).unwrap();
        assert_eq!(order, ["b", "a", "c"]);
        assert!(p.place(&chunk(), 1, &[], env).is_err());
        assert!(env.kv().is_empty());
    }

    #[test]
    fn counts_only_when_asked() {
        let env = &mut MemEnv::new();
        let mut p = Echo::init("v1 count=true", env).unwrap();
        p.place(&chunk(), 1, &hosts(&["a"]), env).unwrap();
        p.place(&chunk(), 1, &hosts(&["a"]), env).unwrap();
        let change = MembershipChange {
            before: vec![],
            after: vec![],
            chunks: vec![],
        };
        assert!(p.rebalance(&change, env).unwrap().is_empty());
        assert_eq!(env.kv_get(CALLS_KEY).unwrap(), b"3");
    }

    #[test]
    fn fail_flag_refuses_init() {
        let env = &mut MemEnv::new();
        assert!(Echo::init("count=true,fail=true", env).is_err());
        assert!(Echo::init("fail=truer", env).is_ok());
    }
}
