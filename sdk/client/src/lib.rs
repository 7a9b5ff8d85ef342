//! Strata's client library: chunk spaces through the local daemon, with reads served from
//! the shared-memory chunk cache when the chunk is there.
//!
//! - [`Client`] is the blocking client;
//! - `AsyncClient` (feature `tokio`, on by default) the async one;
//! - [`proto`] holds requests, the seed's status codes, typed results (crate
//!   `strata-proto`, with [`frame`], the socket's framing, and [`dm`], the DMAPI types);
//! - [`shm`] is the cache's format and reader (crate `strata-shm`);
//! - [`fdpass`] passes the cache's memfds over the socket.
#![warn(missing_docs)]

pub mod blocking;
pub mod fdpass;
#[cfg(feature = "tokio")]
pub mod nonblocking;
mod ops;
pub mod session;

pub use strata_proto::{dm, frame, proto};
pub use strata_shm as shm;

pub use blocking::{Client, StartWriteStatus, WriteLease};
#[cfg(feature = "tokio")]
pub use nonblocking::AsyncClient;
pub use ops::{ApiError, ClientError};
pub use proto::*;
