//! The blocking client: one Unix-socket connection to `stratad`, plus read-only mappings of
//! the spaces' shared-memory caches so that reads of cached chunks never leave the process.
//!
//! Leases (start_write, start_invalidate) belong to the connection: closing it (or the
//! process dying) gives them back, and the chunk stays at its last published version.

use crate::frame::{exchange, read_frame, write_frame, FrameError};
use crate::ops::{self, CacheSet, ClientError, Grant, LeaseMaps, Lookup};
use crate::proto::*;
use crate::shm::raw::LeaseWindow;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A connection to `stratad`.
pub struct Client {
    s: UnixStream,
    r: std::io::BufReader<UnixStream>,
    socket: PathBuf,
    caches: CacheSet,
    rw: LeaseMaps,
    use_cache: bool,
    verify: bool,
}

/// A start_write or start_invalidate lease: a buffer of the slot size, in the lease buffer
/// the daemon lent this connection (a memfd it copies into the cache slot at stop_write),
/// or in local memory (sent with stop_write) when that buffer cannot be used.
pub struct WriteLease {
    id: u64,
    base_version: u64,
    len: usize,
    capacity: usize,
    buf: LeaseBuf,
}

enum LeaseBuf {
    Shared(LeaseWindow),
    Local(Vec<u8>),
}

impl WriteLease {
    /// The lease's id (for the wire).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The version published when the lease was granted (0: none).
    pub fn base_version(&self) -> u64 {
        self.base_version
    }
    /// Bytes that will be published (initially the last published length when the lease
    /// was asked to keep the contents, else 0).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing will be published.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Largest chunk the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Whether the buffer is the lent shared buffer (nothing to send at stop_write).
    pub fn is_shared(&self) -> bool {
        matches!(self.buf, LeaseBuf::Shared(_))
    }
    /// Set how many bytes of the buffer to publish.
    pub fn set_len(&mut self, len: usize) -> Result<(), ClientError> {
        if len > self.capacity {
            return Err(ClientError::Lease(format!(
                "length {len} is over the buffer's capacity of {}",
                self.capacity
            )));
        }
        self.len = len;
        Ok(())
    }
    /// The whole buffer (`capacity` bytes) to read and write in place.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            LeaseBuf::Shared(w) => w.as_mut_slice(),
            LeaseBuf::Local(v) => &mut v[..],
        }
    }
    /// The bytes that will be published.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buffer_mut()[..len]
    }
    /// Replace the contents with `data` (sets the length).
    pub fn fill(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.set_len(data.len())?;
        self.buffer_mut()[..data.len()].copy_from_slice(data);
        Ok(())
    }
    /// A lease for a grant: the lent buffer mapped writable, or a local buffer when it
    /// cannot be used.
    pub(crate) fn from_grant(
        g: &Grant,
        fds: Vec<OwnedFd>,
        maps: &mut LeaseMaps,
    ) -> Result<WriteLease, ClientError> {
        let capacity = usize::try_from(g.capacity)
            .map_err(|_| ClientError::Protocol("lease capacity".into()))?;
        let len = usize::try_from(g.len.min(g.capacity)).unwrap_or(0);
        let buf = match maps.window(g, fds) {
            Some(w) => LeaseBuf::Shared(w),
            None => LeaseBuf::Local(vec![0u8; capacity]),
        };
        Ok(WriteLease {
            id: g.lease,
            base_version: g.version,
            len,
            capacity,
            buf,
        })
    }
    /// A handle naming a lease by id, without a buffer: stop (publishing nothing new:
    /// length 0), abort or stop_invalidate a lease this connection holds, e.g. one granted
    /// to an earlier `WriteLease` value.
    pub fn by_id(id: u64) -> WriteLease {
        WriteLease {
            id,
            base_version: 0,
            len: 0,
            capacity: 0,
            buf: LeaseBuf::Local(Vec::new()),
        }
    }
    /// Whether a local buffer must be filled with the published contents by a read.
    pub(crate) fn needs_fill(&self, keep: bool) -> bool {
        keep && self.len > 0 && !self.is_shared()
    }
    /// Fill a local buffer from a READ_OK.
    pub(crate) fn fill_local(&mut self, r: &SpaceReply, data: &[u8]) {
        if let (SpaceReply::ReadOk { .. }, LeaseBuf::Local(v)) = (r, &mut self.buf) {
            let n = data.len().min(v.len());
            v[..n].copy_from_slice(&data[..n]);
        }
    }
    /// Id, length and what stop_write sends: nothing for a slot written in place, the
    /// local buffer (moved, not copied) otherwise.
    pub(crate) fn into_wire(self) -> (u64, u64, Vec<u8>) {
        let payload = match self.buf {
            LeaseBuf::Shared(_) => Vec::new(),
            LeaseBuf::Local(mut v) => {
                v.truncate(self.len);
                v
            }
        };
        (self.id, self.len as u64, payload)
    }
}

impl std::fmt::Debug for WriteLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLease")
            .field("id", &self.id)
            .field("base_version", &self.base_version)
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("shared", &self.is_shared())
            .finish()
    }
}

/// start_write / start_invalidate: STARTWRITE_OK with a lease, or STARTWRITE_FAIL.
#[derive(Debug)]
pub enum StartWriteStatus {
    /// STARTWRITE_OK.
    Ok(WriteLease),
    /// STARTWRITE_FAIL.
    Fail(Reason),
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let r = std::io::BufReader::with_capacity(
            64 << 10,
            s.try_clone().map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?,
        );
        Ok(Client {
            s,
            r,
            socket: path.to_owned(),
            caches: CacheSet::default(),
            rw: LeaseMaps::default(),
            use_cache: true,
            verify: true,
        })
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serve reads from the shared-memory cache when the chunk is there (default on).
    pub fn set_use_cache(&mut self, on: bool) {
        self.use_cache = on;
    }

    /// Check the crc32c of every cache hit's bytes (default on). Off, a hit is only
    /// protected by the sequence lock (never torn) and the entry checksum; a scribbled data
    /// slot would go unnoticed.
    pub fn set_verify(&mut self, on: bool) {
        self.verify = on;
    }

    /// Send any request header (with a payload) and read the reply header and payload; an
    /// error reply becomes `Err`.
    pub fn call<T: serde::Serialize>(
        &mut self,
        header: &T,
        payload: &[u8],
    ) -> Result<(String, serde_json::Value, Vec<u8>), ClientError> {
        let (reply, data) = self.round_trip(header, payload)?;
        let (kind, value) = ops::unwrap_reply(reply)?;
        Ok((kind, value, data))
    }

    /// One request and its reply. A connection the daemon closed for idleness (after
    /// `limits.idle_timeout_ms` without a request; never one holding a lease) did not serve
    /// the request: connect again and send it once more.
    fn round_trip<T: serde::Serialize>(
        &mut self,
        header: &T,
        payload: &[u8],
    ) -> Result<(serde_json::Value, Vec<u8>), ClientError> {
        let (reply, data): (serde_json::Value, Vec<u8>) =
            exchange(&mut self.s, &mut self.r, header, payload)?;
        if !ops::is_idle_close(&reply) {
            return Ok((reply, data));
        }
        self.reconnect()?;
        Ok(exchange(&mut self.s, &mut self.r, header, payload)?)
    }

    /// Connect again after the daemon closed the connection for idleness (it held no
    /// lease: nothing of the connection's is lost).
    fn reconnect(&mut self) -> Result<(), ClientError> {
        let fresh = Client::connect(&self.socket)?;
        self.s = fresh.s;
        self.r = fresh.r;
        Ok(())
    }

    fn space(
        &mut self,
        req: &SpaceRequest,
        payload: &[u8],
    ) -> Result<(SpaceReply, Vec<u8>), ClientError> {
        let env = ops::envelope(req)?;
        let (reply, data) = self.round_trip(&env, payload)?;
        Ok((ops::space_reply(reply)?, data))
    }

    /// A space request whose reply may carry descriptors (GETCHUNKCACHE_OK's region,
    /// STARTWRITE_OK's lease buffer): the reply's first bytes are received with `recvmsg`.
    fn space_fds(
        &mut self,
        req: &SpaceRequest,
    ) -> Result<(SpaceReply, Vec<u8>, Vec<OwnedFd>), ClientError> {
        let env = ops::envelope(req)?;
        let (mut reply, mut data, mut fds) = self.exchange_fds(&env)?;
        if ops::is_idle_close(&reply) {
            // closed for idleness before the request was read: connect again, send again
            self.reconnect()?;
            (reply, data, fds) = self.exchange_fds(&env)?;
        }
        Ok((ops::space_reply(reply)?, data, fds))
    }

    fn exchange_fds(
        &mut self,
        env: &serde_json::Value,
    ) -> Result<(serde_json::Value, Vec<u8>, Vec<OwnedFd>), ClientError> {
        if let Err(e) = write_frame(&mut self.s, env, &[]) {
            // a daemon that closed the connection may have said why first: read it
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Err(FrameError::Io(e).into());
            }
        }
        let mut fds = Vec::new();
        // one reply per request: nothing of this reply is buffered yet (if something were,
        // its descriptors would be lost, and the client falls back to the socket)
        let (reply, data): (serde_json::Value, Vec<u8>) = if self.r.buffer().is_empty() {
            let mut first = vec![0u8; 16 << 10];
            let n = crate::fdpass::recv_with_fds(&self.s, &mut first, &mut fds)
                .map_err(FrameError::Io)?;
            if n == 0 {
                return Err(FrameError::Closed.into());
            }
            first.truncate(n);
            read_frame(&mut std::io::Read::chain(&first[..], &mut self.r))?
        } else {
            read_frame(&mut self.r)?
        };
        Ok((reply, data, fds))
    }

    /// A DMAPI call (`payload`: the message of `send-msg`). `Ok(Err(e))` is the DMAPI
    /// error the call failed with.
    pub fn dm(
        &mut self,
        req: &crate::dm::DmRequest,
        payload: &[u8],
    ) -> Result<Result<crate::dm::DmReply, crate::dm::DmError>, ClientError> {
        Ok(self.dm_data(req, payload)?.map(|(r, _)| r))
    }

    /// A DMAPI call whose reply may carry bytes (read_invis data, a DM attribute value).
    pub fn dm_data(
        &mut self,
        req: &crate::dm::DmRequest,
        payload: &[u8],
    ) -> Result<Result<(crate::dm::DmReply, Vec<u8>), crate::dm::DmError>, ClientError> {
        let (kind, value, data) = self.call(&ops::dm_envelope(req)?, payload)?;
        if kind != "dm" {
            return Err(ClientError::Protocol(format!(
                "expected a dm reply, got {kind:?}"
            )));
        }
        match serde_json::from_value(value) {
            Ok(crate::dm::DmReply::Error { error }) => Ok(Err(error)),
            Ok(r) => Ok(Ok((r, data))),
            Err(e) => Err(ClientError::Protocol(format!("dm reply: {e}"))),
        }
    }

    /// Create a space on this host (CREATE_OK / CREATE_EXISTS).
    pub fn create(
        &mut self,
        space: &str,
        options: SpaceOptions,
    ) -> Result<CreateStatus, ClientError> {
        let req = SpaceRequest::Create {
            space: space.into(),
            options,
        };
        ops::create(self.space(&req, &[])?.0)
    }

    /// Join a space that exists on `host`.
    pub fn join(&mut self, space: &str, host: &str) -> Result<JoinStatus, ClientError> {
        let req = SpaceRequest::Join {
            space: space.into(),
            host: host.into(),
        };
        ops::join(self.space(&req, &[])?.0)
    }

    /// Leave a space.
    pub fn unjoin(&mut self, space: &str) -> Result<UnjoinStatus, ClientError> {
        self.caches.forget(space);
        ops::unjoin(
            self.space(
                &SpaceRequest::Unjoin {
                    space: space.into(),
                },
                &[],
            )?
            .0,
        )
    }

    /// The space's hosts.
    pub fn hosts(&mut self, space: &str) -> Result<HostsStatus, ClientError> {
        let req = SpaceRequest::Hosts {
            space: space.into(),
        };
        ops::hosts(self.space(&req, &[])?.0)
    }

    /// A chunk list (all of it: the daemon answers in pages, fetched here one by one).
    pub fn chunks(&mut self, space: &str, list: ChunkList) -> Result<ChunkListStatus, ClientError> {
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let req = SpaceRequest::Chunks {
                space: space.into(),
                list,
                after: after.clone(),
                limit: None,
            };
            match ops::chunk_page(self.space(&req, &[])?.0)? {
                Ok(page) => match ops::next_page(&mut all, &after, page) {
                    Some(n) => after = Some(n),
                    None => return Ok(ChunkListStatus::Ok(all)),
                },
                Err(reason) => return Ok(ChunkListStatus::Fail(reason)),
            }
        }
    }

    /// One page of a chunk list: up to `limit` entries (capped by the daemon) of chunks
    /// named after `after`, and the `after` of the next page (`None`: this was the last).
    pub fn chunks_page(
        &mut self,
        space: &str,
        list: ChunkList,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Result<ChunkPage, Reason>, ClientError> {
        let req = SpaceRequest::Chunks {
            space: space.into(),
            list,
            after: after.map(str::to_string),
            limit,
        };
        ops::chunk_page(self.space(&req, &[])?.0)
    }

    /// The space's shared-memory cache: GETCHUNKCACHE_OK with the region's name and size
    /// (the region itself, lent with the reply, is what cache hits read; this call only
    /// reports on it).
    pub fn cache(&mut self, space: &str) -> Result<CacheStatus, ClientError> {
        Ok(self.cache_region(space)?.0)
    }

    fn cache_region(&mut self, space: &str) -> Result<(CacheStatus, Vec<OwnedFd>), ClientError> {
        let req = SpaceRequest::Cache {
            space: space.into(),
        };
        let (r, _, fds) = self.space_fds(&req)?;
        Ok((ops::cache(r)?, fds))
    }

    /// Start an allow-listed program on a host of the space, as this process's uid.
    pub fn spawn(
        &mut self,
        space: &str,
        host: &str,
        program: &str,
        args: &[String],
    ) -> Result<SpawnStatus, ClientError> {
        let req = SpaceRequest::Spawn {
            space: space.into(),
            host: host.into(),
            program: program.into(),
            args: args.to_vec(),
        };
        ops::spawn(self.space(&req, &[])?.0)
    }

    /// Read a chunk (from the cache when it is there).
    pub fn read(&mut self, space: &str, chunk: &str) -> Result<ReadStatus, ClientError> {
        let mut buf = Vec::new();
        let r = self.read_into(space, chunk, &mut buf)?;
        Ok(r.into_status(buf))
    }

    /// Read a chunk into `buf` (resized to the chunk), reusing its allocation.
    pub fn read_into(
        &mut self,
        space: &str,
        chunk: &str,
        buf: &mut Vec<u8>,
    ) -> Result<ReadInto, ClientError> {
        if self.use_cache {
            if let Some(version) = self.cache_lookup(space, chunk, buf)? {
                return Ok(ReadInto::Ok {
                    version,
                    from_cache: true,
                });
            }
        }
        let req = SpaceRequest::Read {
            space: space.into(),
            chunk: chunk.into(),
        };
        let (r, data) = self.space(&req, &[])?;
        ops::read_into(r, data, buf)
    }

    /// A cache hit, or `None` (miss, no cache, or a problem the daemon was told about).
    fn cache_lookup(
        &mut self,
        space: &str,
        chunk: &str,
        buf: &mut Vec<u8>,
    ) -> Result<Option<u64>, ClientError> {
        loop {
            let s = &self.s;
            let closed = || crate::fdpass::peer_closed(s);
            match self.caches.lookup(space, chunk, buf, self.verify, closed) {
                Lookup::Hit(v) => return Ok(Some(v)),
                Lookup::Miss => return Ok(None),
                Lookup::Open => {
                    let (st, fds) = self.cache_region(space)?;
                    self.caches.opened(space, st, fds);
                }
                Lookup::Repair(what) => {
                    let report = match self.repair(space) {
                        Ok(r) => Ok(r),
                        Err(ClientError::Api(e)) => {
                            self.caches.set_unavailable(space);
                            Err(e)
                        }
                        Err(e) => return Err(e),
                    };
                    ops::report_repair(space, &what, &report);
                    return Ok(None);
                }
            }
        }
    }

    /// Forget cache mappings (after the daemon restarted, say).
    pub fn drop_caches(&mut self) {
        self.caches.clear();
    }

    /// Wait until the chunk exists (and, with `after`, has a version newer than it);
    /// `timeout` bounds the wait (WAIT_FAIL with reason `timeout`).
    pub fn wait(
        &mut self,
        space: &str,
        chunk: &str,
        after: Option<u64>,
        timeout: Option<std::time::Duration>,
    ) -> Result<WaitStatus, ClientError> {
        if after.is_none() && self.use_cache {
            let mut buf = Vec::new();
            if let Some(version) = self.cache_lookup(space, chunk, &mut buf)? {
                return Ok(WaitStatus::Ok(Chunk {
                    version,
                    data: buf,
                    from_cache: true,
                }));
            }
        }
        let req = SpaceRequest::Wait {
            space: space.into(),
            chunk: chunk.into(),
            after,
            timeout_ms: timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
        };
        let (r, data) = self.space(&req, &[])?;
        ops::wait(r, data)
    }

    /// Write a chunk through the socket and publish it.
    pub fn write(
        &mut self,
        space: &str,
        chunk: &str,
        data: &[u8],
    ) -> Result<WriteStatus, ClientError> {
        let req = SpaceRequest::Write {
            space: space.into(),
            chunk: chunk.into(),
        };
        ops::write(self.space(&req, data)?.0)
    }

    /// Take the chunk's lease and a buffer. With `wait`, queue behind another holder (up to
    /// `timeout`) instead of failing `busy`; with `keep`, the buffer starts with the last
    /// published contents.
    pub fn start_write(
        &mut self,
        space: &str,
        chunk: &str,
        wait: bool,
        timeout: Option<std::time::Duration>,
        keep: bool,
    ) -> Result<StartWriteStatus, ClientError> {
        let req = SpaceRequest::StartWrite {
            space: space.into(),
            chunk: chunk.into(),
            wait,
            timeout_ms: timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
            keep,
        };
        let (r, _, fds) = self.space_fds(&req)?;
        match ops::start_write(r)? {
            Ok(g) => Ok(StartWriteStatus::Ok(
                self.lease(space, chunk, g, fds, keep)?,
            )),
            Err(reason) => Ok(StartWriteStatus::Fail(reason)),
        }
    }

    fn lease(
        &mut self,
        space: &str,
        chunk: &str,
        g: Grant,
        fds: Vec<OwnedFd>,
        keep: bool,
    ) -> Result<WriteLease, ClientError> {
        let mut lease = WriteLease::from_grant(&g, fds, &mut self.rw)?;
        if lease.needs_fill(keep) {
            let req = SpaceRequest::Read {
                space: space.into(),
                chunk: chunk.into(),
            };
            let (r, data) = self.space(&req, &[])?;
            lease.fill_local(&r, &data);
        }
        Ok(lease)
    }

    /// Publish the lease's buffer (its first `len()` bytes): WRITE_OK with the new version.
    pub fn stop_write(&mut self, lease: WriteLease) -> Result<WriteStatus, ClientError> {
        let (lease, len, payload) = lease.into_wire();
        let req = SpaceRequest::StopWrite { lease, len };
        ops::write(self.space(&req, &payload)?.0)
    }

    /// Give the lease back without publishing.
    pub fn abort_write(&mut self, lease: WriteLease) -> Result<WriteStatus, ClientError> {
        let req = SpaceRequest::AbortWrite { lease: lease.id };
        drop(lease.buf);
        // WRITE_OK with the version the chunk stays at
        ops::write(self.space(&req, &[])?.0)
    }

    /// Invalidate a chunk (seed: WRITE_FAIL = now invalid, WRITE_OK = still valid).
    pub fn invalidate(
        &mut self,
        space: &str,
        chunk: &str,
    ) -> Result<InvalidateStatus, ClientError> {
        let req = SpaceRequest::Invalidate {
            space: space.into(),
            chunk: chunk.into(),
        };
        ops::invalidate(self.space(&req, &[])?.0)
    }

    /// Invalidate a chunk and hold its lease (the buffer holds its last contents) until
    /// [`Client::stop_invalidate`].
    pub fn start_invalidate(
        &mut self,
        space: &str,
        chunk: &str,
        wait: bool,
        timeout: Option<std::time::Duration>,
    ) -> Result<StartWriteStatus, ClientError> {
        let req = SpaceRequest::StartInvalidate {
            space: space.into(),
            chunk: chunk.into(),
            wait,
            timeout_ms: timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
        };
        let (r, _, fds) = self.space_fds(&req)?;
        match ops::start_write(r)? {
            Ok(g) => Ok(StartWriteStatus::Ok(
                self.lease(space, chunk, g, fds, false)?,
            )),
            Err(reason) => Ok(StartWriteStatus::Fail(reason)),
        }
    }

    /// Finish a start_invalidate: the chunk stays invalid until it is written again.
    pub fn stop_invalidate(&mut self, lease: WriteLease) -> Result<InvalidateStatus, ClientError> {
        let req = SpaceRequest::StopInvalidate { lease: lease.id };
        drop(lease.buf);
        ops::invalidate(self.space(&req, &[])?.0)
    }

    /// Ask the daemon to check and rebuild a space's cache region.
    pub fn repair(&mut self, space: &str) -> Result<String, ClientError> {
        self.caches.forget(space);
        let req = SpaceRequest::Repair {
            space: space.into(),
        };
        ops::repair(self.space(&req, &[])?.0)
    }
}
