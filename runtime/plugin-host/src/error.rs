//! Errors of the plugin host, one enum per operation, classified by who is at fault.

use std::fmt;

/// Whose fault an error is: the plugin's author, the caller (operator or client), or the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The plugin file or the plugin's behaviour is wrong.
    Plugin,
    /// The request is wrong (unknown slot, bad config, wrong kind).
    Caller,
    /// The host failed (disk, cache, store).
    Host,
}

/// Why a plugin could not be loaded or swapped in. Nothing in the host changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("plugin '{plugin}': not a WebAssembly file ({detail})")]
    NotWasm {
        /// Slot name.
        plugin: String,
        /// What was found instead.
        detail: String,
    },
    /// A core WebAssembly module, not a component.
    #[error(
        "plugin '{plugin}': a core WebAssembly module, not a component (build it as a component, e.g. with the SDK's scripts/build-plugins.sh)"
    )]
    CoreModule {
        /// Slot name.
        plugin: String,
    },
    /// The component could not be compiled (corrupt or unsupported).
    #[error("plugin '{plugin}': invalid component: {detail}")]
    Invalid {
        /// Slot name.
        plugin: String,
        /// The compiler's message.
        detail: String,
    },
    /// The component implements another world than the slot's.
    #[error("plugin '{plugin}': component implements world '{found}', slot takes '{expected}'")]
    WrongWorld {
        /// Slot name.
        plugin: String,
        /// The slot's world.
        expected: &'static str,
        /// The world the exports match.
        found: String,
    },
    /// Built against another, incompatible version of the WIT package.
    #[error(
        "plugin '{plugin}': built against {found}, this daemon provides strata:plugin@{provided}"
    )]
    WrongVersion {
        /// Slot name.
        plugin: String,
        /// The package the component imports.
        found: String,
        /// The version the host provides.
        provided: &'static str,
    },
    /// A function of the world is not exported, or has another type.
    #[error("plugin '{plugin}': {detail}")]
    MissingExport {
        /// Slot name.
        plugin: String,
        /// Which export and what is wrong.
        detail: String,
    },
    /// The component imports something the host does not provide.
    #[error("plugin '{plugin}': cannot link: {detail}")]
    Link {
        /// Slot name.
        plugin: String,
        /// The linker's message.
        detail: String,
    },
    /// The slot's config is larger than the host accepts.
    #[error("plugin '{plugin}': config is {size} bytes, the limit is {limit}")]
    ConfigTooLarge {
        /// Slot name.
        plugin: String,
        /// Size given.
        size: usize,
        /// Limit in force.
        limit: usize,
    },
    /// The file is larger than the host accepts.
    #[error("plugin '{plugin}': component is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Slot name.
        plugin: String,
        /// Size given.
        size: usize,
        /// Limit in force.
        limit: usize,
    },
    /// `init(config)` returned an error: the self-test failed.
    #[error("plugin '{plugin}': init refused the config: {message}")]
    InitRefused {
        /// Slot name.
        plugin: String,
        /// The plugin's own message.
        message: String,
    },
    /// `init(config)` trapped, timed out or hit the memory cap.
    #[error("plugin '{plugin}': init failed: {detail}")]
    InitFailed {
        /// Slot name.
        plugin: String,
        /// The trap.
        detail: String,
    },
    /// A slot of that name already exists (`load`), or does not (`swap`).
    #[error("plugin '{plugin}': {detail}")]
    Slot {
        /// Slot name.
        plugin: String,
        /// What is wrong with the slot.
        detail: String,
    },
    /// The host itself failed (e.g. the precompiled cache could not be written).
    #[error("plugin '{plugin}': host error: {detail}")]
    Host {
        /// Slot name.
        plugin: String,
        /// What failed.
        detail: String,
    },
}

impl LoadError {
    /// Whose fault it is.
    pub fn fault(&self) -> Fault {
        match self {
            LoadError::ConfigTooLarge { .. } | LoadError::Slot { .. } => Fault::Caller,
            LoadError::WrongWorld { .. } => Fault::Caller,
            LoadError::Host { .. } => Fault::Host,
            _ => Fault::Plugin,
        }
    }
}

/// Errors of slot management other than loading (`rollback`, `unload`, lookups).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotError {
    /// No slot of that name.
    #[error("no plugin slot named '{0}'")]
    NoSuchSlot(String),
    /// The slot holds a plugin of another world.
    #[error("plugin '{plugin}' is a {found} plugin, not {expected}")]
    WrongKind {
        /// Slot name.
        plugin: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the slot holds.
        found: &'static str,
    },
    /// `rollback` on a slot with no earlier version.
    #[error("plugin '{0}' has no earlier version to roll back to")]
    NoPreviousVersion(String),
}

/// How a single plugin call failed. The failure policy of the hook decides what the caller
/// sees; the instance that failed is discarded and never re-entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The guest trapped (panic, unreachable, out-of-bounds access, ...).
    Trap,
    /// The call passed its epoch deadline.
    Timeout,
    /// The instance tried to grow its memory past the cap.
    MemoryLimit,
    /// The answer was well-typed but not a valid answer (e.g. unknown hosts).
    Malformed,
    /// The plugin returned its own error.
    PluginError,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory limit",
            FailureKind::Malformed => "malformed answer",
            FailureKind::PluginError => "plugin error",
        })
    }
}

/// A plugin call whose failure policy is `abort`, or that could not be made at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// The slot does not exist or holds another kind of plugin.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The plugin failed and the hook's policy is abort: the operation fails with `errno`.
    #[error("plugin '{plugin}' {hook}: {kind}: {detail} (aborting with errno {errno})")]
    Aborted {
        /// Slot name.
        plugin: String,
        /// The hook called.
        hook: &'static str,
        /// How it failed.
        kind: FailureKind,
        /// Details for the log.
        detail: String,
        /// The errno the operation fails with.
        errno: i32,
    },
    /// The caller's input is invalid (duplicate or too many hosts, empty or oversized
    /// names, inconsistent sizes): refused before the plugin ran; the plugin is not blamed
    /// (its failure counters and automatic rollback do not see it).
    #[error("plugin '{plugin}' {hook}: invalid request: {detail}")]
    Invalid {
        /// Slot name.
        plugin: String,
        /// The hook that was asked for.
        hook: &'static str,
        /// What is wrong with the input.
        detail: String,
    },
    /// No instance could be created for the call (e.g. `init` failed on a fresh instance).
    #[error("plugin '{plugin}': no instance available: {detail}")]
    Unavailable {
        /// Slot name.
        plugin: String,
        /// Why.
        detail: String,
    },
}

/// Render a wasmtime error with its whole chain of causes.
pub(crate) fn chain(e: &wasmtime::Error) -> String {
    let mut out = String::new();
    for (i, cause) in e.chain().enumerate() {
        if i > 0 {
            out.push_str(": ");
        }
        out.push_str(&cause.to_string());
    }
    out
}
