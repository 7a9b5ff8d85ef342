//! Strata runtime: the `stratad` daemon (API server, space shell, config) and the `strata`
//! CLI. The parts they are built from are crates of their own, re-exported here under the
//! names the daemon uses:
//!
//! ```text
//!  strata (CLI) ──┐                        ┌─► plugin (strata-plugin-host) ─► Wasm components
//!  client libs ───┼─► Unix socket ─► api::server::Daemon
//!                 │   (frames: strata-proto)├─► store (strata-common: redb, registry, kv)
//!                 │                        ├─► space::Spaces (shell) ─► space::core (strata-space-core)
//!                 │                        └─► fs, dm (strata-fs: FUSE, DM service) ─► dm::core (strata-dm-core)
//!  shm readers ◄── lent memfd regions (strata-shm)
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod docs;
pub mod metrics;
pub mod sdnotify;
pub mod space;

pub use strata_common::{log_limited, ratelimit, store};
pub use strata_fs::dm;
pub use strata_plugin_host as plugin;
/// Managed filesystems: [`strata_fs`].
pub mod fs {
    pub use strata_fs::*;
}
