//! The async client (tokio): the same operations as [`crate::Client`], with cache hits
//! served without awaiting anything.

use crate::blocking::{StartWriteStatus, WriteLease};
use crate::frame::{exchange_async, read_frame_async, write_frame_async, FrameError};
use crate::ops::{self, CacheSet, ClientError, LeaseMaps, Lookup};
use crate::proto::*;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// An async connection to `stratad`.
pub struct AsyncClient {
    s: UnixStream,
    socket: PathBuf,
    caches: CacheSet,
    rw: LeaseMaps,
    use_cache: bool,
    verify: bool,
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl AsyncClient {
    /// Connect to the daemon's socket.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient, ClientError> {
        let path = path.as_ref();
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Ok(AsyncClient {
            s,
            socket: path.to_owned(),
            caches: CacheSet::default(),
            rw: LeaseMaps::default(),
            use_cache: true,
            verify: true,
        })
    }

    /// Serve reads from the shared-memory cache (default on).
    pub fn set_use_cache(&mut self, on: bool) {
        self.use_cache = on;
    }

    /// Check the crc32c of cache hits (default on).
    pub fn set_verify(&mut self, on: bool) {
        self.verify = on;
    }

    async fn space(
        &mut self,
        req: SpaceRequest,
        payload: &[u8],
    ) -> Result<(SpaceReply, Vec<u8>), ClientError> {
        let env = ops::envelope(&req)?;
        let (mut reply, mut data): (serde_json::Value, Vec<u8>) =
            exchange_async(&mut self.s, &env, payload).await?;
        if ops::is_idle_close(&reply) {
            // closed for idleness before the request was read: connect again, send again
            self.reconnect().await?;
            (reply, data) = exchange_async(&mut self.s, &env, payload).await?;
        }
        Ok((ops::space_reply(reply)?, data))
    }

    /// Connect again after the daemon closed the connection for idleness (it held no
    /// lease: nothing of the connection's is lost).
    async fn reconnect(&mut self) -> Result<(), ClientError> {
        self.s =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.display().to_string(),
                    source,
                })?;
        Ok(())
    }

    /// A space request whose reply may carry descriptors (see the blocking client).
    async fn space_fds(
        &mut self,
        req: SpaceRequest,
    ) -> Result<(SpaceReply, Vec<u8>, Vec<OwnedFd>), ClientError> {
        let env = ops::envelope(&req)?;
        let (mut reply, mut data, mut fds) = self.exchange_fds(&env).await?;
        if ops::is_idle_close(&reply) {
            // closed for idleness before the request was read: connect again, send again
            self.reconnect().await?;
            (reply, data, fds) = self.exchange_fds(&env).await?;
        }
        Ok((ops::space_reply(reply)?, data, fds))
    }

    async fn exchange_fds(
        &mut self,
        env: &serde_json::Value,
    ) -> Result<(serde_json::Value, Vec<u8>, Vec<OwnedFd>), ClientError> {
        if let Err(e) = write_frame_async(&mut self.s, env, &[]).await {
            // a daemon that closed the connection may have said why first: read it
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Err(FrameError::Io(e).into());
            }
        }
        let mut fds = Vec::new();
        let mut first = vec![0u8; 16 << 10];
        let n = self
            .s
            .async_io(tokio::io::Interest::READABLE, || {
                crate::fdpass::recv_with_fds(&self.s, &mut first, &mut fds)
            })
            .await
            .map_err(FrameError::Io)?;
        if n == 0 {
            return Err(FrameError::Closed.into());
        }
        first.truncate(n);
        let mut chained = tokio::io::AsyncReadExt::chain(&first[..], &mut self.s);
        let (reply, data): (serde_json::Value, Vec<u8>) = read_frame_async(&mut chained).await?;
        Ok((reply, data, fds))
    }

    /// CREATE_OK / CREATE_EXISTS.
    pub async fn create(
        &mut self,
        space: &str,
        options: SpaceOptions,
    ) -> Result<CreateStatus, ClientError> {
        let space = space.into();
        ops::create(
            self.space(SpaceRequest::Create { space, options }, &[])
                .await?
                .0,
        )
    }

    /// JOINSPACE_OK / _EXISTS / _FAIL.
    pub async fn join(&mut self, space: &str, host: &str) -> Result<JoinStatus, ClientError> {
        let (space, host) = (space.into(), host.into());
        ops::join(self.space(SpaceRequest::Join { space, host }, &[]).await?.0)
    }

    /// UNJOINSPACE_OK / _NOEXIST.
    pub async fn unjoin(&mut self, space: &str) -> Result<UnjoinStatus, ClientError> {
        self.caches.forget(space);
        let space = space.into();
        ops::unjoin(self.space(SpaceRequest::Unjoin { space }, &[]).await?.0)
    }

    /// SPACEGETHOSTS_OK / _NOEXIST.
    pub async fn hosts(&mut self, space: &str) -> Result<HostsStatus, ClientError> {
        let space = space.into();
        ops::hosts(self.space(SpaceRequest::Hosts { space }, &[]).await?.0)
    }

    /// GETCHUNKLIST_OK / _FAIL.
    pub async fn chunks(
        &mut self,
        space: &str,
        list: ChunkList,
    ) -> Result<ChunkListStatus, ClientError> {
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let req = SpaceRequest::Chunks {
                space: space.into(),
                list,
                after: after.clone(),
                limit: None,
            };
            match ops::chunk_page(self.space(req, &[]).await?.0)? {
                Ok(page) => match ops::next_page(&mut all, &after, page) {
                    Some(n) => after = Some(n),
                    None => return Ok(ChunkListStatus::Ok(all)),
                },
                Err(reason) => return Ok(ChunkListStatus::Fail(reason)),
            }
        }
    }

    /// GETCHUNKCACHE_OK / _FAIL (the lent region itself is used by cache hits only).
    pub async fn cache(&mut self, space: &str) -> Result<CacheStatus, ClientError> {
        Ok(self.cache_region(space).await?.0)
    }

    async fn cache_region(
        &mut self,
        space: &str,
    ) -> Result<(CacheStatus, Vec<OwnedFd>), ClientError> {
        let space = space.into();
        let (r, _, fds) = self.space_fds(SpaceRequest::Cache { space }).await?;
        Ok((ops::cache(r)?, fds))
    }

    /// SPAWNPROCESS_OK / _NOSPACE / _NOHOST / _FAIL.
    pub async fn spawn(
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
        ops::spawn(self.space(req, &[]).await?.0)
    }

    async fn cache_lookup(
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
                    let (st, fds) = self.cache_region(space).await?;
                    self.caches.opened(space, st, fds);
                }
                Lookup::Repair(what) => {
                    let report = match self.repair(space).await {
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

    /// READ_OK / READ_WAITING / READ_FAIL into `buf`.
    pub async fn read_into(
        &mut self,
        space: &str,
        chunk: &str,
        buf: &mut Vec<u8>,
    ) -> Result<ReadInto, ClientError> {
        if self.use_cache {
            if let Some(version) = self.cache_lookup(space, chunk, buf).await? {
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
        let (r, data) = self.space(req, &[]).await?;
        ops::read_into(r, data, buf)
    }

    /// READ_OK / READ_WAITING / READ_FAIL.
    pub async fn read(&mut self, space: &str, chunk: &str) -> Result<ReadStatus, ClientError> {
        let mut buf = Vec::new();
        let r = self.read_into(space, chunk, &mut buf).await?;
        Ok(r.into_status(buf))
    }

    /// WAIT_OK / WAIT_FAIL.
    pub async fn wait(
        &mut self,
        space: &str,
        chunk: &str,
        after: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<WaitStatus, ClientError> {
        if after.is_none() && self.use_cache {
            let mut buf = Vec::new();
            if let Some(version) = self.cache_lookup(space, chunk, &mut buf).await? {
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
            timeout_ms: ms(timeout),
        };
        let (r, data) = self.space(req, &[]).await?;
        ops::wait(r, data)
    }

    /// WRITE_OK / WRITE_FAIL.
    pub async fn write(
        &mut self,
        space: &str,
        chunk: &str,
        data: &[u8],
    ) -> Result<WriteStatus, ClientError> {
        let (space, chunk) = (space.into(), chunk.into());
        ops::write(
            self.space(SpaceRequest::Write { space, chunk }, data)
                .await?
                .0,
        )
    }

    async fn lease(
        &mut self,
        req: SpaceRequest,
        keep: bool,
    ) -> Result<StartWriteStatus, ClientError> {
        let read = match &req {
            SpaceRequest::StartWrite { space, chunk, .. }
            | SpaceRequest::StartInvalidate { space, chunk, .. } => SpaceRequest::Read {
                space: space.clone(),
                chunk: chunk.clone(),
            },
            _ => return Err(ClientError::Protocol("not a lease request".into())),
        };
        let (r, _, fds) = self.space_fds(req).await?;
        let g = match ops::start_write(r)? {
            Ok(g) => g,
            Err(reason) => return Ok(StartWriteStatus::Fail(reason)),
        };
        let mut lease = WriteLease::from_grant(&g, fds, &mut self.rw)?;
        if lease.needs_fill(keep) {
            let (r, data) = self.space(read, &[]).await?;
            lease.fill_local(&r, &data);
        }
        Ok(StartWriteStatus::Ok(lease))
    }

    /// STARTWRITE_OK (a lease) / STARTWRITE_FAIL.
    pub async fn start_write(
        &mut self,
        space: &str,
        chunk: &str,
        wait: bool,
        timeout: Option<Duration>,
        keep: bool,
    ) -> Result<StartWriteStatus, ClientError> {
        let req = SpaceRequest::StartWrite {
            space: space.into(),
            chunk: chunk.into(),
            wait,
            timeout_ms: ms(timeout),
            keep,
        };
        self.lease(req, keep).await
    }

    /// Publish a lease: WRITE_OK / WRITE_FAIL.
    pub async fn stop_write(&mut self, lease: WriteLease) -> Result<WriteStatus, ClientError> {
        let (lease, len, payload) = lease.into_wire();
        let req = SpaceRequest::StopWrite { lease, len };
        ops::write(self.space(req, &payload).await?.0)
    }

    /// Give a lease back: WRITE_OK with the version the chunk stays at.
    pub async fn abort_write(&mut self, lease: WriteLease) -> Result<WriteStatus, ClientError> {
        let req = SpaceRequest::AbortWrite { lease: lease.id() };
        drop(lease);
        ops::write(self.space(req, &[]).await?.0)
    }

    /// Invalidate (seed's inverted codes).
    pub async fn invalidate(
        &mut self,
        space: &str,
        chunk: &str,
    ) -> Result<InvalidateStatus, ClientError> {
        let (space, chunk) = (space.into(), chunk.into());
        ops::invalidate(
            self.space(SpaceRequest::Invalidate { space, chunk }, &[])
                .await?
                .0,
        )
    }

    /// start_invalidate: a lease, the chunk invalid from now on.
    pub async fn start_invalidate(
        &mut self,
        space: &str,
        chunk: &str,
        wait: bool,
        timeout: Option<Duration>,
    ) -> Result<StartWriteStatus, ClientError> {
        let req = SpaceRequest::StartInvalidate {
            space: space.into(),
            chunk: chunk.into(),
            wait,
            timeout_ms: ms(timeout),
        };
        self.lease(req, false).await
    }

    /// stop_invalidate.
    pub async fn stop_invalidate(
        &mut self,
        lease: WriteLease,
    ) -> Result<InvalidateStatus, ClientError> {
        let req = SpaceRequest::StopInvalidate { lease: lease.id() };
        drop(lease);
        ops::invalidate(self.space(req, &[]).await?.0)
    }

    /// Ask the daemon to check and rebuild a space's cache region.
    pub async fn repair(&mut self, space: &str) -> Result<String, ClientError> {
        self.caches.forget(space);
        let space = space.into();
        ops::repair(self.space(SpaceRequest::Repair { space }, &[]).await?.0)
    }
}
