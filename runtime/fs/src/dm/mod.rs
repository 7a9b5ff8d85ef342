//! Data management (XDSM / DMAPI with the GPFS error refinements): see `docs/dmapi.md`.
//!
//! [`core`] is the sans-IO state machine of sessions, events, tokens, rights and
//! dispositions; [`handle`] the opaque, versioned handles (backed by the kernel's file
//! handles of the backing filesystem); [`attrs`] what is kept per file; [`service`] the core
//! behind the local API. The FUSE capture is the crate's root.

pub mod attrs;
/// The DM core: [`strata_dm_core`].
pub use strata_dm_core as core;
pub mod handle;
pub mod service;

pub use strata_proto::dm::*;

/// Tests that need root say so loudly instead of passing.
#[cfg(test)]
pub(crate) fn require_root(what: &str) {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    assert!(root, "PREREQUISITE MISSING: {what} needs root");
}
