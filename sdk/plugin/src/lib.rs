//! Write Strata plugins in Rust, test them natively, ship them as WebAssembly components.
//!
//! A Strata plugin is a component built against one world of the WIT package
//! `strata:plugin@0.1.0` (`wit/` at the workspace root):
//!
//! | world       | exports                             | SDK feature | trait                  |
//! |-------------|-------------------------------------|-------------|------------------------|
//! | `placement` | `init`, `place`, `rebalance`        | `placement` | [`placement::Placement`] |
//! | `dm-policy` | `init`, `on-event`, `on-notify`, `scan` | `dm-policy` | [`dm::DmPolicy`]     |
//!
//! Both worlds import `log`, `clock` and `kv` ([`Env`]); `dm-policy` also imports `dm-host`
//! ([`dm::DmHost`]).
//!
//! ```text
//!            ┌──────────── component (wasm32) ─────────────┐
//!  stratad ──┤ WIT exports ─► export_*! glue ─► your trait impl │
//!  (host)  ◄─┤ WIT imports ◄─ WitEnv / WitHost ◄─ &mut dyn Env  │
//!            └─────────────────────────────────────────────┘
//!            ┌──────────── cargo test (native) ────────────┐
//!            │ your test ─► your trait impl ─► testing::MemEnv / MemHost │
//!            └─────────────────────────────────────────────┘
//! ```
//!
//! # Writing a plugin
//!
//! Enable exactly one feature, so the component carries only its own world:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # cdylib: the component; rlib: native tests, benches
//!
//! [dependencies]
//! strata-plugin-sdk = { workspace = true, features = ["placement"] }
//! ```
//!
//! Implement the world's trait and export it once at the crate root:
//!
//! ```
//! # #[cfg(feature = "placement")] mod doc {
//! use strata_plugin_sdk::placement::{ChunkMove, ChunkRef, HostInfo, MembershipChange, Placement};
//! use strata_plugin_sdk::Env;
//!
//! pub struct FirstFit;
//!
//! impl Placement for FirstFit {
//!     fn init(config: &str, env: &mut dyn Env) -> Result<Self, String> {
//!         env.info(&format!("first-fit configured with {config:?}"));
//!         Ok(FirstFit)
//!     }
//!
//!     fn place(&mut self, _chunk: &ChunkRef, _size: u64, hosts: &[HostInfo], _env: &mut dyn Env)
//!         -> Result<Vec<String>, String> {
//!         Ok(hosts.iter().map(|h| h.id.clone()).collect())
//!     }
//!
//!     fn rebalance(&mut self, _change: &MembershipChange, _env: &mut dyn Env)
//!         -> Result<Vec<ChunkMove>, String> {
//!         Ok(Vec::new())
//!     }
//! }
//!
//! strata_plugin_sdk::export_placement!(FirstFit);
//! # }
//! ```
//!
//! The SDK keeps the value made by `init` (in a thread-local: a component instance is
//! single-threaded) and forwards every later call on that component instance to it; calls before a successful `init`
//! fail (`Err(..)`, `abort(EIO)`, or no scan decisions) instead of trapping. The export macros
//! only emit the component exports when compiling for `wasm32`, so native builds of a plugin
//! never define C symbols named `init` or `place`.
//!
//! Plugin state that must survive hot swaps and daemon restarts goes into the slot's key-value
//! store ([`Env::kv_set`], [`Env::kv_add`] for decimal counters); component instances are
//! created (each running `init`) and discarded by the host as it sees fit — on swaps, after
//! traps, in a pool — so their memory is scratch. Several instances of a slot run at once,
//! so a read-modify-write of shared state must be one host call: [`Env::kv_add`] (atomic
//! add) or a loop around [`Env::kv_compare_and_swap`], never `kv_get` then `kv_set`. Configuration is text; the official plugins use the
//! `key=value` format of [`config`].
//!
//! # Testing a plugin
//!
//! Plain `cargo test`: call the trait methods with the in-memory hosts of [`testing`]:
//!
//! ```
//! # #[cfg(feature = "dm-policy")] {
//! use strata_plugin_sdk::dm::{DmHost, MIGRATION_ATTR};
//! use strata_plugin_sdk::testing::MemHost;
//! use strata_plugin_sdk::attr_name;
//!
//! let mut host = MemHost::new();
//! host.add_file(b"h1", vec![0; 8192]);
//! host.request_migrate(b"h1", "tape").unwrap();
//! let loc = host.get_dmattr(b"h1", &attr_name(MIGRATION_ATTR).unwrap()).unwrap();
//! assert_eq!(loc, b"tape");
//! # }
//! ```
//!
//! # Building a component
//!
//! `scripts/build-plugins.sh` at the workspace root builds every guest crate with the
//! `wasm` profile (`panic = "abort"`, LTO, size-optimised) for `wasm32-unknown-unknown`, links
//! it with `wasm-component-ld` (which turns the core module and the WIT type information the
//! bindings embed into a component) and writes `target/wasm-components/<crate-name>.wasm`.
//! Each guest crate is built by its own cargo invocation, so the `placement` and `dm-policy`
//! features never unify into one component.

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod attr;
pub mod config;
mod env;
pub mod testing;

#[cfg(feature = "dm-policy")]
pub mod dm;
#[cfg(feature = "placement")]
pub mod placement;

pub use attr::{attr_name, AttrNameError, DM_ATTR_NAME_SIZE};
pub use env::{Env, KvError, LogLevel, Timestamp};
