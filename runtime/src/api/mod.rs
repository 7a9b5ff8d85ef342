//! The daemon's local API on a Unix socket: what `strata` and the client library speak.
//!
//! Wire format (see `docs/protocol.md`): every message is one frame
//!
//! ```text
//! u32 BE  header length  (<= 1 MiB)
//! bytes   header: JSON, a Request or a Reply
//! u64 BE  payload length (<= 256 MiB; 0 when there is none)
//! bytes   payload: raw bytes (component files, chunk data), never re-encoded
//! ```
//!
//! One request, one reply, in order, on a connection; a client may send the next request
//! after reading the reply. The daemon reads the peer's credentials (SO_PEERCRED):
//! management requests need uid 0 or the daemon's own uid.
//!
//! What one peer can take is bounded ([`limits`], `[limits]` in the config): connections
//! per uid and in all, idle and frame deadlines, payload sizes per op (checked from the
//! header before the payload is read), bytes in flight per uid, plugin calls at once.

pub mod client;
pub mod limits;
pub mod server;

use crate::plugin::{
    CacheOutcome, ChunkMove, ChunkRef, FailureKind, Fault, HostInfo, MembershipChange, PluginKind,
    SlotInfo, SlotSettings, StateCursor, StatePage, SwapReport, VersionInfo,
};
use serde::{Deserialize, Serialize};

pub use strata_client::frame::{
    decode_header, encode, header_len, payload_len, read_frame, write_frame, FrameError,
    MAX_HEADER, MAX_PAYLOAD,
};
pub use strata_client::{SpaceReply, SpaceRequest};

/// A request. Requests that carry bytes (a component) send them as the frame's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Daemon version and uptime.
    Status,
    /// Load the payload (a component) into a new slot.
    PluginLoad {
        /// Slot name.
        name: String,
        /// World.
        kind: PluginKind,
        /// Where the bytes came from (for `list`).
        source: String,
        /// Slot settings; `None` takes the daemon's defaults.
        settings: Option<SlotSettings>,
    },
    /// Hot-swap the payload into an existing slot.
    PluginSwap {
        /// Slot name.
        name: String,
        /// Where the bytes came from.
        source: String,
        /// New settings; `None` keeps the slot's.
        settings: Option<SlotSettings>,
    },
    /// Back to the previous version.
    PluginRollback {
        /// Slot name.
        name: String,
    },
    /// Remove a slot.
    PluginUnload {
        /// Slot name.
        name: String,
    },
    /// All slots with versions and counters.
    PluginList,
    /// A page of a slot's key-value state (replies are paged: a state of any size fits).
    PluginState {
        /// Slot name.
        name: String,
        /// Where the page starts: the `next` of the previous page; absent for the first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<StateCursor>,
    },
    /// Ask a placement slot to order hosts for a chunk.
    Place {
        /// Slot name.
        slot: String,
        /// The chunk.
        chunk: ChunkRef,
        /// Its size.
        size: u64,
        /// Candidate hosts.
        hosts: Vec<HostInfo>,
    },
    /// Ask a placement slot which copies to move after a membership change.
    Rebalance {
        /// Slot name.
        slot: String,
        /// The change.
        change: MembershipChange,
    },
    /// A chunk-space operation (`{"op":"space","call":...}`; see `strata_client::proto`).
    Space(SpaceRequest),
    /// A DMAPI call (`{"op":"dm","call":...}`; see `strata_client::dm`). Root or the
    /// daemon's user only.
    Dm(strata_client::dm::DmRequest),
    /// Mount a managed filesystem (`strata fs mount`).
    FsMount {
        /// Backing directory.
        backing: std::path::PathBuf,
        /// Mount point.
        mountpoint: std::path::PathBuf,
        /// Read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Unmount one (`strata fs umount`), by mount point or backing directory.
    FsUmount {
        /// Mount point or backing directory.
        target: std::path::PathBuf,
        /// Detach even if busy.
        #[serde(default)]
        force: bool,
    },
    /// The managed filesystems.
    FsList,
    /// Attach a `dm-policy` slot to the managed filesystem mounted at `path`: it receives
    /// the events of `events` there.
    DmAttach {
        /// The slot.
        slot: String,
        /// The mount point.
        path: std::path::PathBuf,
        /// Event types.
        events: strata_client::dm::EventSet,
    },
    /// Detach a slot.
    DmDetach {
        /// The slot.
        slot: String,
    },
    /// The attachments.
    DmAttachments,
}

impl Request {
    /// Whether the request changes the daemon or reads plugin state (and so needs privilege).
    pub fn is_management(&self) -> bool {
        matches!(
            self,
            Request::PluginState { .. }
                | Request::Dm(_)
                | Request::FsMount { .. }
                | Request::FsUmount { .. }
                | Request::DmAttach { .. }
                | Request::DmDetach { .. }
                | Request::PluginLoad { .. }
                | Request::PluginSwap { .. }
                | Request::PluginRollback { .. }
                | Request::PluginUnload { .. }
        )
    }
}

/// What went wrong, for the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Machine-readable kind (`load`, `slot`, `call`, `permission`, `protocol`, ...).
    pub kind: String,
    /// Whose fault.
    pub fault: Fault,
    /// The message, naming the plugin where one is involved.
    pub message: String,
    /// The errno an aborted call fails with, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

/// A reply: `{"reply": "<kind>", "value": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "kebab-case")]
pub enum Reply {
    /// The request failed; nothing changed.
    Error(ApiError),
    /// Status.
    Status {
        /// Daemon version.
        version: String,
        /// Seconds since start.
        uptime_s: u64,
        /// WIT package version the plugin host provides.
        wit: String,
    },
    /// A slot was loaded.
    Loaded(Box<VersionInfo>),
    /// A swap happened.
    Swapped(SwapReport),
    /// A rollback happened.
    RolledBack {
        /// Version dropped.
        from: u64,
        /// Version serving now.
        to: u64,
    },
    /// A slot was removed.
    Unloaded,
    /// The slots.
    Plugins(Vec<SlotInfo>),
    /// A page of a slot's key-value state: value parts in key order, and where the next
    /// page starts (a value too large for one page is split over several).
    State(StatePage),
    /// A placement answer.
    Placed {
        /// Hosts, alpha first.
        hosts: Vec<String>,
        /// Version that answered.
        version: u64,
        /// Set when the failure policy answered instead of the plugin.
        failure: Option<FailureKind>,
    },
    /// A chunk-space answer: the seed's status code (chunk bytes in the payload).
    Space(SpaceReply),
    /// A DMAPI answer.
    Dm(strata_client::dm::DmReply),
    /// A filesystem was mounted.
    Mounted(crate::fs::MountInfo),
    /// A filesystem was unmounted.
    Unmounted,
    /// The managed filesystems.
    Filesystems(Vec<crate::fs::MountInfo>),
    /// A slot was attached; its DM session.
    Attached {
        /// Session.
        sid: u64,
    },
    /// A slot was detached.
    Detached,
    /// Attachments: slot and record.
    Attachments(Vec<(String, crate::fs::route::AttachRecord)>),
    /// A rebalance answer.
    Moves {
        /// Copies to move.
        moves: Vec<ChunkMove>,
        /// Version that answered.
        version: u64,
        /// Set when the failure policy answered instead of the plugin.
        failure: Option<FailureKind>,
    },
}

/// Shorthand for the cache outcome in CLI output.
pub fn cache_word(c: CacheOutcome) -> &'static str {
    match c {
        CacheOutcome::Hit => "hit",
        CacheOutcome::Miss => "miss",
        CacheOutcome::Disabled => "off",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_limits() {
        let bytes = encode(&Request::PluginList, b"xyz").unwrap();
        let (req, payload): (Request, Vec<u8>) = read_frame(&mut &bytes[..]).unwrap();
        assert!(matches!(req, Request::PluginList));
        assert_eq!(payload, b"xyz");
        // truncated frames and garbage never panic
        for cut in 0..bytes.len() {
            assert!(read_frame::<Request>(&mut &bytes[..cut]).is_err());
        }
        let mut huge = (MAX_HEADER + 1).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<Request>(&mut &huge[..]),
            Err(FrameError::TooLarge { .. })
        ));
        let bad = encode(&serde_json::json!({"op": "explode"}), b"").unwrap();
        assert!(matches!(
            read_frame::<Request>(&mut &bad[..]),
            Err(FrameError::BadHeader(_))
        ));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// Random and mutated frames never panic the parser (a small, deterministic fuzz).
    #[test]
    fn random_frames_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good = encode(
            &Request::Place {
                slot: "p".into(),
                chunk: ChunkRef {
                    space: "s".into(),
                    name: "c".into(),
                },
                size: 1,
                hosts: vec![HostInfo {
                    id: "h".into(),
                    free_bytes: 1,
                    capacity_bytes: 2,
                }],
            },
            b"",
        )
        .unwrap();
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            let _ = read_frame::<Request>(&mut &bytes[..]);
            let len = (next() % 64) as usize;
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = read_frame::<Request>(&mut &junk[..]);
        }
    }
}
