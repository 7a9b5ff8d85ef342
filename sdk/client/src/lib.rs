//! Strata's client library: chunk spaces through the local daemon, with reads served from
//! the shared-memory chunk cache when the chunk is there.
//!
//! - [`Client`] is the blocking client;
//! - `AsyncClient` (feature `tokio`, on by default) the async one;
//! - [`proto`] holds requests, the seed's status codes, typed results.
//! - [`shm`] is the cache's format, reader and (for the daemon) writer.
//! - [`frame`] is the socket's framing; [`fdpass`] passes the cache's memfds over it.
#![warn(missing_docs)]
// The only unsafe code is `shm::raw` (mapping shared memory), which allows it.
#![deny(unsafe_code)]

pub mod blocking;
pub mod dm;
pub mod fdpass;
pub mod frame;
#[cfg(feature = "tokio")]
pub mod nonblocking;
mod ops;
pub mod proto;
pub mod session;
pub mod shm;

pub use blocking::{Client, StartWriteStatus, WriteLease};
#[cfg(feature = "tokio")]
pub use nonblocking::AsyncClient;
pub use ops::{ApiError, ClientError};
pub use proto::*;
