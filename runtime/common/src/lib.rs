//! What every part of `stratad` shares: the redb database wrapper ([`store::Db`], which
//! reopens itself after a full disk), the data directory's permissions and private files,
//! and rate-limited logging of repeated errors ([`ratelimit`], [`log_limited!`]).
#![warn(missing_docs)]

pub mod ratelimit;
pub mod store;
