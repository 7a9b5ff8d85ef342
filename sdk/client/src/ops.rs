//! What both clients share: errors, the request/reply envelope, and turning a space reply
//! into the operation's typed result.

use crate::frame::FrameError;
use crate::proto::*;
use crate::shm::raw::{LeaseWindow, Mapping};
use crate::shm::{map_lease_buffer, CacheError, Reader};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// The daemon refused a request (not a seed status: a malformed request, a privilege check,
/// an internal failure). Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Machine-readable kind (`protocol`, `permission`, `slot`, ...).
    pub kind: String,
    /// Whose fault (`caller`, `host`, `plugin`).
    pub fault: String,
    /// For people.
    pub message: String,
    /// An errno, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

/// Client errors: the request did not get a seed status back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot reach stratad at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("connection to stratad failed: {0}")]
    Frame(#[from] FrameError),
    /// The daemon refused the request.
    #[error("{0}")]
    Api(ApiError),
    /// The daemon answered something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Using a lease buffer failed.
    #[error("lease buffer: {0}")]
    Lease(String),
}

/// A request as it goes on the wire: `{"op": <op>, "call": ..., ...}`.
fn envelope_as<T: Serialize>(op: &str, req: &T) -> Result<serde_json::Value, ClientError> {
    let mut v = serde_json::to_value(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    match v.as_object_mut() {
        Some(m) => {
            m.insert("op".into(), op.into());
            Ok(v)
        }
        None => Err(ClientError::Protocol("request is not an object".into())),
    }
}

/// A space request on the wire.
pub(crate) fn envelope(req: &SpaceRequest) -> Result<serde_json::Value, ClientError> {
    envelope_as("space", req)
}

/// A DM request on the wire.
pub(crate) fn dm_envelope(req: &crate::dm::DmRequest) -> Result<serde_json::Value, ClientError> {
    envelope_as("dm", req)
}

/// A reply header: `{"reply": "<kind>", "value": ...}`; an error reply becomes `Err`.
pub(crate) fn unwrap_reply(
    v: serde_json::Value,
) -> Result<(String, serde_json::Value), ClientError> {
    let serde_json::Value::Object(mut m) = v else {
        return Err(ClientError::Protocol("reply is not an object".into()));
    };
    let kind = match m.remove("reply") {
        Some(serde_json::Value::String(s)) => s,
        _ => return Err(ClientError::Protocol("reply without a kind".into())),
    };
    let value = m.remove("value").unwrap_or(serde_json::Value::Null);
    if kind == "error" {
        let e: ApiError = serde_json::from_value(value)
            .map_err(|e| ClientError::Protocol(format!("error reply: {e}")))?;
        return Err(ClientError::Api(e));
    }
    Ok((kind, value))
}

/// The space reply in a reply header.
pub(crate) fn space_reply(v: serde_json::Value) -> Result<SpaceReply, ClientError> {
    let (kind, value) = unwrap_reply(v)?;
    if kind != "space" {
        return Err(ClientError::Protocol(format!(
            "expected a space reply, got {kind:?}"
        )));
    }
    serde_json::from_value(value).map_err(|e| ClientError::Protocol(format!("space reply: {e}")))
}

fn other(r: &SpaceReply) -> ClientError {
    ClientError::Protocol(unexpected(r))
}

pub(crate) fn create(r: SpaceReply) -> Result<CreateStatus, ClientError> {
    match r {
        SpaceReply::CreateOk => Ok(CreateStatus::Ok),
        SpaceReply::CreateExists => Ok(CreateStatus::Exists),
        r => Err(other(&r)),
    }
}

pub(crate) fn join(r: SpaceReply) -> Result<JoinStatus, ClientError> {
    match r {
        SpaceReply::JoinOk => Ok(JoinStatus::Ok),
        SpaceReply::JoinExists => Ok(JoinStatus::Exists),
        SpaceReply::JoinFail { reason } => Ok(JoinStatus::Fail(reason)),
        r => Err(other(&r)),
    }
}

pub(crate) fn unjoin(r: SpaceReply) -> Result<UnjoinStatus, ClientError> {
    match r {
        SpaceReply::UnjoinOk => Ok(UnjoinStatus::Ok),
        SpaceReply::UnjoinNoExist => Ok(UnjoinStatus::NoExist),
        r => Err(other(&r)),
    }
}

pub(crate) fn hosts(r: SpaceReply) -> Result<HostsStatus, ClientError> {
    match r {
        SpaceReply::HostsOk { hosts } => Ok(HostsStatus::Ok(hosts)),
        SpaceReply::HostsNoExist => Ok(HostsStatus::NoExist),
        r => Err(other(&r)),
    }
}

pub(crate) fn chunk_page(r: SpaceReply) -> Result<Result<ChunkPage, Reason>, ClientError> {
    match r {
        SpaceReply::ChunksOk { entries, next } => Ok(Ok((entries, next))),
        SpaceReply::ChunksFail { reason } => Ok(Err(reason)),
        r => Err(other(&r)),
    }
}

/// Add a page to a whole list; the next `after` (`None`: done). A daemon that does not
/// move forward ends the list rather than looping.
pub(crate) fn next_page(
    all: &mut Vec<ChunkEntry>,
    after: &Option<String>,
    page: ChunkPage,
) -> Option<String> {
    let (entries, next) = page;
    all.extend(entries);
    next.filter(|n| after.as_ref().is_none_or(|a| n > a))
}

pub(crate) fn cache(r: SpaceReply) -> Result<CacheStatus, ClientError> {
    match r {
        SpaceReply::CacheOk { region, size } => Ok(CacheStatus::Ok { region, size }),
        SpaceReply::CacheFail { reason } => Ok(CacheStatus::Fail(reason)),
        r => Err(other(&r)),
    }
}

pub(crate) fn spawn(r: SpaceReply) -> Result<SpawnStatus, ClientError> {
    match r {
        SpaceReply::SpawnOk { pid } => Ok(SpawnStatus::Ok(pid)),
        SpaceReply::SpawnNoSpace => Ok(SpawnStatus::NoSpace),
        SpaceReply::SpawnNoHost => Ok(SpawnStatus::NoHost),
        SpaceReply::SpawnFail { errno, reason } => Ok(SpawnStatus::Fail { errno, reason }),
        r => Err(other(&r)),
    }
}

pub(crate) fn read(r: SpaceReply, data: Vec<u8>) -> Result<ReadStatus, ClientError> {
    match r {
        SpaceReply::ReadOk { version } => Ok(ReadStatus::Ok(Chunk {
            version,
            data,
            from_cache: false,
        })),
        SpaceReply::ReadWaiting => Ok(ReadStatus::Waiting),
        SpaceReply::ReadFail { reason } => Ok(ReadStatus::Fail(reason)),
        r => Err(other(&r)),
    }
}

/// A READ reply into the caller's buffer.
pub(crate) fn read_into(
    r: SpaceReply,
    data: Vec<u8>,
    buf: &mut Vec<u8>,
) -> Result<ReadInto, ClientError> {
    Ok(match read(r, data)? {
        ReadStatus::Ok(c) => {
            *buf = c.data;
            ReadInto::Ok {
                version: c.version,
                from_cache: false,
            }
        }
        ReadStatus::Waiting => ReadInto::Waiting,
        ReadStatus::Fail(r) => ReadInto::Fail(r),
    })
}

pub(crate) fn wait(r: SpaceReply, data: Vec<u8>) -> Result<WaitStatus, ClientError> {
    match r {
        SpaceReply::WaitOk { version } => Ok(WaitStatus::Ok(Chunk {
            version,
            data,
            from_cache: false,
        })),
        SpaceReply::WaitFail { reason } => Ok(WaitStatus::Fail(reason)),
        r => Err(other(&r)),
    }
}

pub(crate) fn write(r: SpaceReply) -> Result<WriteStatus, ClientError> {
    match r {
        SpaceReply::WriteOk {
            version,
            reason: None,
        } => Ok(WriteStatus::Ok(version)),
        SpaceReply::WriteFail {
            reason: Some(reason),
        } => Ok(WriteStatus::Fail(reason)),
        r => Err(other(&r)),
    }
}

pub(crate) fn invalidate(r: SpaceReply) -> Result<InvalidateStatus, ClientError> {
    match r {
        SpaceReply::WriteFail { reason: None } => Ok(InvalidateStatus::Invalidated),
        SpaceReply::WriteOk {
            version,
            reason: Some(reason),
        } => Ok(InvalidateStatus::StillValid { version, reason }),
        r => Err(other(&r)),
    }
}

/// STARTWRITE_OK's fields.
pub(crate) struct Grant {
    pub lease: u64,
    pub version: u64,
    pub len: u64,
    pub buffer: u64,
    pub capacity: u64,
}

pub(crate) fn start_write(r: SpaceReply) -> Result<Result<Grant, Reason>, ClientError> {
    match r {
        SpaceReply::StartWriteOk {
            lease,
            version,
            len,
            buffer,
            capacity,
        } => Ok(Ok(Grant {
            lease,
            version,
            len,
            buffer,
            capacity,
        })),
        SpaceReply::StartWriteFail { reason } => Ok(Err(reason)),
        r => Err(other(&r)),
    }
}

pub(crate) fn repair(r: SpaceReply) -> Result<String, ClientError> {
    match r {
        SpaceReply::RepairOk { report } => Ok(report),
        r => Err(other(&r)),
    }
}

/// The cache regions a client has mapped, by space.
#[derive(Default)]
pub(crate) struct CacheSet {
    /// A mapped region, or none since the instant given (asked again a second later: the
    /// space may have been created, repaired or opened to us since).
    spaces: HashMap<String, Slot>,
    /// When the connection to the daemon was last seen open.
    checked: Option<std::time::Instant>,
    /// The daemon closed the connection: its regions are not trusted any more.
    dead: bool,
}

enum Slot {
    Mapped(Reader),
    Unavailable(std::time::Instant),
}

const RETRY_UNAVAILABLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a cache hit may be served without checking that the daemon that lent the
/// region is still there (one non-blocking peek at the socket). A daemon that died (kill
/// -9, crash) cannot mark its regions retired; its connection closing is what tells.
pub(crate) const LIVENESS_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// What a cache lookup found, and what the client must do next.
pub(crate) enum Lookup {
    /// A hit at this version (the buffer holds it).
    Hit(u64),
    /// Ask the daemon.
    Miss,
    /// Ask the daemon for the region (GETCHUNKCACHE), pass the answer to `opened`, and
    /// look up again.
    Open,
    /// The region is corrupted: ask the daemon to repair it, then read through it.
    Repair(String),
}

impl CacheSet {
    /// Look `chunk` up in the space's region. `peer_closed` says whether the daemon has
    /// closed the connection (asked at most every [`LIVENESS_EVERY`] before a hit).
    pub(crate) fn lookup(
        &mut self,
        space: &str,
        chunk: &str,
        buf: &mut Vec<u8>,
        verify: bool,
        peer_closed: impl FnOnce() -> bool,
    ) -> Lookup {
        if self.dead {
            return Lookup::Miss;
        }
        let reader = match self.spaces.get(space) {
            None => return Lookup::Open,
            Some(Slot::Unavailable(since)) if since.elapsed() >= RETRY_UNAVAILABLE => {
                return Lookup::Open
            }
            Some(Slot::Unavailable(_)) => return Lookup::Miss,
            Some(Slot::Mapped(r)) => r,
        };
        match reader.lookup_into(chunk, buf, verify) {
            Ok(Some(v)) => {
                let now = std::time::Instant::now();
                let due = self
                    .checked
                    .is_none_or(|t| now.duration_since(t) >= LIVENESS_EVERY);
                if due {
                    if peer_closed() {
                        // the daemon is gone: what it lent is not served any more (reads
                        // go to the socket, which reports the broken connection)
                        self.dead = true;
                        self.spaces.clear();
                        return Lookup::Miss;
                    }
                    self.checked = Some(now);
                }
                Lookup::Hit(v)
            }
            Ok(None) => Lookup::Miss,
            Err(CacheError::Retired) => {
                // the daemon replaced the region (unjoin and join, shutdown): ask again
                self.spaces.remove(space);
                Lookup::Open
            }
            Err(CacheError::Corrupted(what)) => {
                self.spaces.remove(space);
                Lookup::Repair(what)
            }
            Err(_) => {
                self.spaces.insert(
                    space.to_owned(),
                    Slot::Unavailable(std::time::Instant::now()),
                );
                Lookup::Miss
            }
        }
    }

    /// Record GETCHUNKCACHE's answer and the region it lent: a mapped region, or none (read
    /// through the daemon).
    pub(crate) fn opened(&mut self, space: &str, st: CacheStatus, fds: Vec<OwnedFd>) {
        let reader = match (st, fds.into_iter().next()) {
            (CacheStatus::Ok { .. }, Some(fd)) => Reader::from_fd(fd).ok(),
            _ => None,
        };
        let slot = match reader {
            Some(r) => Slot::Mapped(r),
            None => Slot::Unavailable(std::time::Instant::now()),
        };
        self.spaces.insert(space.to_owned(), slot);
    }

    /// Read `space` through the daemon for a while (its region is damaged and this
    /// caller may not repair it).
    pub(crate) fn set_unavailable(&mut self, space: &str) {
        self.spaces.insert(
            space.to_owned(),
            Slot::Unavailable(std::time::Instant::now()),
        );
    }

    pub(crate) fn forget(&mut self, space: &str) {
        self.spaces.remove(space);
    }

    pub(crate) fn clear(&mut self) {
        self.spaces.clear();
    }
}

/// Lease buffer mappings a client keeps (beyond, unused ones are unmapped).
const KEEP_LEASE_MAPS: usize = 32;

/// Lease buffers this connection was lent, by buffer number, mapped once (a lease then
/// costs no mmap and, after the buffer's first use, no page faults).
#[derive(Default)]
pub(crate) struct LeaseMaps {
    maps: HashMap<u64, Arc<Mapping>>,
}

impl LeaseMaps {
    /// Record a buffer lent with a STARTWRITE_OK (its descriptor, if it came with the reply)
    /// and return its window, or `None` when this process cannot use it in place (not lent,
    /// not mappable, or a `WriteLease` of this process still holds a window on it).
    pub(crate) fn window(&mut self, g: &Grant, fds: Vec<OwnedFd>) -> Option<LeaseWindow> {
        if let Some(fd) = fds.into_iter().next() {
            match map_lease_buffer(fd, g.capacity) {
                Ok(m) => {
                    self.maps.insert(g.buffer, Arc::new(m));
                }
                Err(_) => {
                    self.maps.remove(&g.buffer);
                }
            }
        }
        if self.maps.len() > KEEP_LEASE_MAPS {
            // buffers not in use and not this one (the daemon frees spares beyond its own
            // limit; one it still lends later is then used through a local buffer)
            let keep = g.buffer;
            self.maps
                .retain(|id, m| *id == keep || Arc::strong_count(m) > 1);
        }
        let m = self.maps.get(&g.buffer)?;
        // a window still alive elsewhere holds a clone: never hand out two
        if Arc::strong_count(m) > 1 {
            return None;
        }
        Mapping::lease_window(m, 0, usize::try_from(g.capacity).ok()?)
    }
}

/// Tell the user that a corrupted region was found and what the daemon did (`Err`: the
/// daemon refused to repair it for this caller, e.g. without write access; reads go
/// through the daemon meanwhile).
pub(crate) fn report_repair(space: &str, what: &str, report: &Result<String, ApiError>) {
    match report {
        Ok(report) => eprintln!(
            "strata-client: chunk cache of space {space} was corrupted ({what}); the daemon repaired it: {report}"
        ),
        Err(e) => eprintln!(
            "strata-client: chunk cache of space {space} is corrupted ({what}); not repaired: {e}"
        ),
    }
}

/// Whether a reply says the daemon closed the connection for idleness before reading the
/// request (`{"reply":"error","value":{"kind":"idle",...}}`): the request was not served.
pub(crate) fn is_idle_close(reply: &serde_json::Value) -> bool {
    reply["reply"] == "error" && reply["value"]["kind"] == "idle"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_and_replies() {
        let v = envelope(&SpaceRequest::Hosts { space: "s".into() }).unwrap();
        assert_eq!(v["op"], "space");
        assert_eq!(v["call"], "hosts");
        let r = space_reply(
            serde_json::json!({"reply":"space","value":{"status":"SPACEGETHOSTS_NOEXIST"}}),
        )
        .unwrap();
        assert_eq!(hosts(r).unwrap(), HostsStatus::NoExist);
        let e = space_reply(serde_json::json!({"reply":"error","value":{"kind":"protocol","fault":"caller","message":"no"}}))
            .unwrap_err();
        assert!(matches!(e, ClientError::Api(ApiError { ref kind, .. }) if kind == "protocol"));
        // a reply for another operation is a protocol error, not a wrong status
        assert!(create(SpaceReply::HostsNoExist).is_err());
        assert_eq!(
            invalidate(SpaceReply::WriteFail { reason: None }).unwrap(),
            InvalidateStatus::Invalidated
        );
        assert!(write(SpaceReply::WriteFail { reason: None }).is_err());
    }
}
