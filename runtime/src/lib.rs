//! Strata runtime: the `stratad` daemon, the `strata` CLI and the modules they share.
//!
//! ```text
//!  strata (CLI) ──┐                        ┌─► plugin::PluginHost ─► Wasm components
//!  client libs ───┼─► Unix socket ─► api::server::Daemon
//!                 │   (frames: JSON header │─► store::Store (redb: registry, plugin kv)
//!                 │    + raw payload)      ├─► space::Spaces (core + shm regions + redb)
//!  shm readers ◄── lent memfd regions ◄────┘   (later: dm, fuse, net, ...)
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod dm;
pub mod fs;
pub mod plugin;
pub mod ratelimit;
pub mod space;
pub mod store;
