//! The daemon's local API on a Unix socket: what `strata` and the client library speak.
//!
//! Wire format (see `docs/protocol.md`): every message is one frame
//!
//! ```text
//! u32 BE  header length  (<= 1 MiB)
//! bytes   header: JSON, a Request or a Reply
//! u64 BE  payload length (<= 256 MiB; 0 when there is none)
//! bytes   payload: raw bytes (component files, later chunk data), never re-encoded
//! ```
//!
//! One request, one reply, in order, on a connection; a client may send the next request
//! after reading the reply. The daemon reads the peer's credentials (SO_PEERCRED):
//! management requests need uid 0 or the daemon's own uid.

pub mod client;
pub mod server;

use crate::plugin::{
    CacheOutcome, ChunkMove, ChunkRef, FailureKind, Fault, HostInfo, MembershipChange, PluginKind,
    SlotInfo, SlotSettings, SwapReport, VersionInfo,
};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Largest header accepted.
pub const MAX_HEADER: u32 = 1 << 20;
/// Largest payload accepted.
pub const MAX_PAYLOAD: u64 = 256 << 20;

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
    /// A slot's key-value state.
    PluginState {
        /// Slot name.
        name: String,
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
}

impl Request {
    /// Whether the request changes the daemon or reads plugin state (and so needs privilege).
    pub fn is_management(&self) -> bool {
        matches!(
            self,
            Request::PluginState { .. }
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
    /// A slot's key-value state: (key, value) pairs in key order.
    State(Vec<(String, Vec<u8>)>),
    /// A placement answer.
    Placed {
        /// Hosts, alpha first.
        hosts: Vec<String>,
        /// Version that answered.
        version: u64,
        /// Set when the failure policy answered instead of the plugin.
        failure: Option<FailureKind>,
    },
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

/// Frame errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// I/O failed mid-frame.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Header or payload over its limit.
    #[error("{what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// header or payload
        what: &'static str,
        /// Size announced.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// The header is not valid JSON of the expected shape.
    #[error("bad header: {0}")]
    BadHeader(String),
}

/// The frame head (lengths and header) for `header` and a payload of `payload_len` bytes.
fn head<T: Serialize>(header: &T, payload_len: usize) -> std::io::Result<Vec<u8>> {
    let h = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    if h.len() > MAX_HEADER as usize || payload_len as u64 > MAX_PAYLOAD {
        return Err(std::io::Error::other("frame over the protocol's limits"));
    }
    let mut out = Vec::with_capacity(12 + h.len());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    Ok(out)
}

/// Encode one frame.
pub fn encode<T: Serialize>(header: &T, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = head(header, payload.len())?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Write one frame (blocking).
pub fn write_frame<T: Serialize>(
    w: &mut impl Write,
    header: &T,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&head(header, payload.len())?)?;
    w.write_all(payload)?;
    w.flush()
}

/// The header length announced by a frame's first 4 bytes, checked against its limit.
pub(crate) fn header_len(bytes: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(bytes);
    if len > MAX_HEADER {
        return Err(FrameError::TooLarge {
            what: "header",
            size: len as u64,
            limit: MAX_HEADER as u64,
        });
    }
    Ok(len as usize)
}

/// The payload length announced after the header, checked against its limit.
pub(crate) fn payload_len(bytes: [u8; 8]) -> Result<usize, FrameError> {
    let len = u64::from_be_bytes(bytes);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            what: "payload",
            size: len,
            limit: MAX_PAYLOAD,
        });
    }
    Ok(len as usize)
}

/// Parse a frame's JSON header.
pub(crate) fn decode_header<T: for<'de> Deserialize<'de>>(h: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(h).map_err(|e| FrameError::BadHeader(e.to_string()))
}

/// Read one frame (blocking).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<(T, Vec<u8>), FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let mut h = vec![0u8; header_len(len)?];
    r.read_exact(&mut h)?;
    let mut plen = [0u8; 8];
    r.read_exact(&mut plen)?;
    let mut p = vec![0u8; payload_len(plen)?];
    r.read_exact(&mut p)?;
    Ok((decode_header(&h)?, p))
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
