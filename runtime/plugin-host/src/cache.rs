//! The on-disk cache of precompiled components, so a daemon restart does not recompile.
//!
//! ```text
//!   component bytes ──sha256──► KEY = <sha256>-<engine compatibility hash>
//!   DIR/KEY.cwasm   native code serialized by wasmtime (Component::serialize)
//!   DIR/KEY.sum     sha256 of the .cwasm, checked before it is trusted
//! ```
//!
//! This is the one place of the plugin host with `unsafe`: `Component::deserialize` trusts
//! its input to be native code that wasmtime produced. We only hand it files that (a) live in
//! the daemon's own cache directory (mode 0700), (b) carry the engine's compatibility hash in
//! their name, and (c) match the checksum written next to them when they were produced. A
//! file failing any check is recompiled and rewritten.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Whether a component came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheOutcome {
    /// Loaded precompiled code; no compilation.
    Hit,
    /// Compiled now (and stored for next time, when a cache directory is set).
    Miss,
    /// No cache directory configured.
    Disabled,
}

pub(crate) struct CompileCache {
    dir: Option<PathBuf>,
    compat: String,
}

/// sha256 of `bytes` in hex.
pub(crate) fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl CompileCache {
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(d) = &dir {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(CompileCache {
            dir,
            compat: format!("{:016x}", h.finish()),
        })
    }

    fn paths(&self, sha: &str) -> Option<(PathBuf, PathBuf)> {
        let d = self.dir.as_ref()?;
        let key = format!("{sha}-{}", self.compat);
        Some((d.join(format!("{key}.cwasm")), d.join(format!("{key}.sum"))))
    }

    /// The compiled component for `bytes` (whose sha256 is `sha`), from the cache if possible.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha: &str,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let Some((cwasm, sum)) = self.paths(sha) else {
            return Ok((Component::new(engine, bytes)?, CacheOutcome::Disabled));
        };
        if let Some(c) = Self::read_checked(engine, &cwasm, &sum) {
            return Ok((c, CacheOutcome::Hit));
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = Self::store(&component, &cwasm, &sum) {
            tracing::warn!(path = %cwasm.display(), error = %e, "could not write precompiled component");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn read_checked(engine: &Engine, cwasm: &Path, sum: &Path) -> Option<Component> {
        let code = std::fs::read(cwasm).ok()?;
        let expected = std::fs::read_to_string(sum).ok()?;
        if digest(&code) != expected.trim() {
            tracing::warn!(path = %cwasm.display(), "precompiled component fails its checksum; recompiling");
            return None;
        }
        // SAFETY: see the module docs: the bytes are wasmtime's own serialization, produced by
        // this engine configuration (compatibility hash in the file name), stored in our 0700
        // directory and verified against the checksum written with them.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize(engine, &code) };
        match loaded {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %cwasm.display(), error = %super::error::chain(&e), "stale precompiled component; recompiling");
                None
            }
        }
    }

    fn store(component: &Component, cwasm: &Path, sum: &Path) -> anyhow::Result<()> {
        let code = component
            .serialize()
            .map_err(|e| anyhow::anyhow!(super::error::chain(&e)))?;
        let tmp = cwasm.with_extension("tmp");
        strata_common::store::write_private(&tmp, &code)?;
        strata_common::store::write_private(sum, digest(&code).as_bytes())?;
        std::fs::rename(&tmp, cwasm)?;
        Ok(())
    }
}
