//! Strata's local wire protocol, shared by the daemon and every client: the socket's
//! framing ([`frame`]), the chunk-space requests with the seed's status codes ([`proto`]),
//! and the DMAPI types ([`dm`]). No I/O beyond reading and writing frames, no unsafe code.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dm;
pub mod frame;
pub mod proto;
