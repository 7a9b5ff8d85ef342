//! A DM application's view of the daemon: a DMAPI session with one typed method per
//! function (the XDSM names without `dm_`), over the local socket.
//!
//! ```no_run
//! use strata_client::dm::{EventSet, EventType, Response};
//! use strata_client::session::DmSession;
//!
//! # fn main() -> Result<(), strata_client::dm::DmError> {
//! let mut s = DmSession::create("/run/strata/stratad.sock", b"my-hsm")?;
//! let fs = s.path_to_fshandle("/mnt/managed")?;
//! let events = EventSet::of(&[EventType::Read, EventType::Destroy]);
//! s.set_disp(&fs, events)?;
//! s.set_eventlist(&fs, events)?;
//! loop {
//!     for m in s.get_events(16, true)? {
//!         // ... recall the data ...
//!         if m.token != 0 {
//!             s.respond(m.token, Response::Continue)?;
//!         }
//!     }
//! }
//! # }
//! ```
//!
//! Errors are the DMAPI ones ([`DmError`]): a daemon that cannot be reached is ENOTREADY
//! (seed 001: "the local daemon is not running"), a connection that fails mid-call ESTALE.

use crate::dm::*;
use crate::{Client, ClientError};
use std::path::{Path, PathBuf};

/// A DMAPI session (created or assumed) and its connection.
pub struct DmSession {
    client: Client,
    socket: PathBuf,
    sid: SessionId,
}

fn lost(e: ClientError) -> DmError {
    match e {
        ClientError::Connect { .. } => DmError::Enotready,
        ClientError::Api(a) if a.kind == "permission" => DmError::Eperm,
        _ => DmError::Estale,
    }
}

fn unexpected(r: DmReply) -> DmError {
    let _ = r;
    DmError::Estale
}

impl DmSession {
    /// dm_create_session with a new session.
    pub fn create(socket: impl AsRef<Path>, info: &[u8]) -> Result<DmSession, DmError> {
        DmSession::assume(socket, NO_SESSION, info)
    }

    /// dm_create_session assuming `old` (the session of a DM application that died): its
    /// outstanding events are delivered again.
    pub fn assume(
        socket: impl AsRef<Path>,
        old: SessionId,
        info: &[u8],
    ) -> Result<DmSession, DmError> {
        let socket = socket.as_ref().to_path_buf();
        let mut client = Client::connect(&socket).map_err(lost)?;
        let req = DmRequest::CreateSession {
            old,
            info: info.to_vec(),
        };
        match client.dm(&req, &[]).map_err(lost)?? {
            DmReply::Session { sid } => Ok(DmSession {
                client,
                socket,
                sid,
            }),
            r => Err(unexpected(r)),
        }
    }

    /// The session id.
    pub fn sid(&self) -> SessionId {
        self.sid
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Any call, with its payload both ways.
    pub fn call(&mut self, req: &DmRequest, payload: &[u8]) -> Result<(DmReply, Vec<u8>), DmError> {
        self.client.dm_data(req, payload).map_err(lost)?
    }

    fn ok(&mut self, req: DmRequest) -> Result<(), DmError> {
        match self.call(&req, &[])?.0 {
            DmReply::Ok => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    fn handle(&mut self, req: DmRequest) -> Result<Vec<u8>, DmError> {
        match self.call(&req, &[])?.0 {
            DmReply::Handle { handle } => Ok(handle),
            r => Err(unexpected(r)),
        }
    }

    /// dm_destroy_session.
    pub fn destroy(mut self) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::DestroySession { sid })
    }

    /// dm_query_session.
    pub fn query(&mut self, sid: SessionId) -> Result<Vec<u8>, DmError> {
        match self.call(&DmRequest::QuerySession { sid }, &[])?.0 {
            DmReply::Info { info } => Ok(info),
            r => Err(unexpected(r)),
        }
    }

    /// dm_getall_sessions.
    pub fn sessions(&mut self) -> Result<Vec<SessionId>, DmError> {
        match self.call(&DmRequest::Sessions { nelem: None }, &[])?.0 {
            DmReply::Sessions { sids } => Ok(sids),
            r => Err(unexpected(r)),
        }
    }

    /// dm_getall_tokens of this session.
    pub fn tokens(&mut self) -> Result<Vec<Token>, DmError> {
        let sid = self.sid;
        self.tokens_of(sid)
    }

    /// dm_getall_tokens of any session.
    pub fn tokens_of(&mut self, sid: SessionId) -> Result<Vec<Token>, DmError> {
        match self.call(&DmRequest::Tokens { sid, nelem: None }, &[])?.0 {
            DmReply::Tokens { tokens } => Ok(tokens),
            r => Err(unexpected(r)),
        }
    }

    /// dm_get_events (`wait`: DM_EV_WAIT).
    pub fn get_events(&mut self, max: u32, wait: bool) -> Result<Vec<Message>, DmError> {
        let sid = self.sid;
        match self.call(&DmRequest::GetEvents { sid, max, wait }, &[])?.0 {
            DmReply::Events { messages } => Ok(messages),
            r => Err(unexpected(r)),
        }
    }

    /// dm_respond_event.
    pub fn respond(&mut self, token: Token, response: Response) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::Respond {
            sid,
            token,
            response,
        })
    }

    /// dm_pending: `delay_ms` more before the event times out.
    pub fn pending(&mut self, token: Token, delay_ms: u64) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::Pending {
            sid,
            token,
            delay_ms,
        })
    }

    /// dm_move_event.
    pub fn move_event(&mut self, token: Token, target: SessionId) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::MoveEvent { sid, token, target })
    }

    /// dm_send_msg to session `target` (synchronous: the answer).
    pub fn send_msg(
        &mut self,
        target: SessionId,
        sync: bool,
        data: &[u8],
    ) -> Result<Option<Response>, DmError> {
        match self
            .call(&DmRequest::SendMsg { sid: target, sync }, data)?
            .0
        {
            DmReply::Ok => Ok(None),
            DmReply::Answered { response } => Ok(Some(response)),
            r => Err(unexpected(r)),
        }
    }

    /// dm_request_right (`wait`: DM_RR_WAIT).
    pub fn request_right(
        &mut self,
        token: Token,
        object: &[u8],
        right: Right,
        wait: bool,
    ) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::RequestRight {
            sid,
            token,
            object: object.to_vec(),
            right,
            wait,
        })
    }

    /// dm_release_right.
    pub fn release_right(&mut self, token: Token, object: &[u8]) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::ReleaseRight {
            sid,
            token,
            object: object.to_vec(),
        })
    }

    /// dm_set_disp (`fs_handle` empty: the global handle, for MOUNT).
    pub fn set_disp(&mut self, fs_handle: &[u8], events: EventSet) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::SetDisp {
            sid,
            fs_handle: fs_handle.to_vec(),
            events,
        })
    }

    /// dm_set_eventlist on an object or a filesystem.
    pub fn set_eventlist(&mut self, handle: &[u8], events: EventSet) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::SetEventlist {
            sid,
            token: INVALID_TOKEN,
            handle: handle.to_vec(),
            events,
        })
    }

    /// dm_get_eventlist of an object or a filesystem.
    pub fn get_eventlist(&mut self, handle: &[u8]) -> Result<EventSet, DmError> {
        let sid = self.sid;
        let req = DmRequest::GetEventlist {
            sid,
            token: INVALID_TOKEN,
            handle: handle.to_vec(),
        };
        match self.call(&req, &[])?.0 {
            DmReply::EventList { events } => Ok(events),
            r => Err(unexpected(r)),
        }
    }

    /// dm_set_return_on_destroy.
    pub fn set_return_on_destroy(
        &mut self,
        fs_handle: &[u8],
        name: Option<&[u8]>,
    ) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::SetReturnOnDestroy {
            sid,
            token: INVALID_TOKEN,
            fs_handle: fs_handle.to_vec(),
            name: name.map(<[u8]>::to_vec),
        })
    }

    /// dm_path_to_handle (a path through the mount).
    pub fn path_to_handle(&mut self, path: impl AsRef<Path>) -> Result<Vec<u8>, DmError> {
        self.handle(DmRequest::PathToHandle {
            path: path.as_ref().display().to_string(),
        })
    }

    /// dm_path_to_fshandle.
    pub fn path_to_fshandle(&mut self, path: impl AsRef<Path>) -> Result<Vec<u8>, DmError> {
        self.handle(DmRequest::PathToFsHandle {
            path: path.as_ref().display().to_string(),
        })
    }

    /// dm_fd_to_handle: the handle of an open file of a managed filesystem.
    pub fn fd_to_handle(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> Result<Vec<u8>, DmError> {
        use std::os::fd::AsRawFd;
        let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| DmError::Ebadf)?;
        self.path_to_handle(p)
    }

    /// dm_handle_to_path.
    pub fn handle_to_path(&mut self, handle: &[u8]) -> Result<PathBuf, DmError> {
        match self
            .call(
                &DmRequest::HandleToPath {
                    handle: handle.to_vec(),
                    buflen: None,
                },
                &[],
            )?
            .0
        {
            DmReply::Path { path } => Ok(path.into()),
            r => Err(unexpected(r)),
        }
    }

    /// dm_get_fileattr.
    pub fn get_fileattr(&mut self, token: Token, handle: &[u8]) -> Result<Stat, DmError> {
        let sid = self.sid;
        match self
            .call(
                &DmRequest::GetFileattr {
                    sid,
                    token,
                    handle: handle.to_vec(),
                },
                &[],
            )?
            .0
        {
            DmReply::Stat { stat } => Ok(stat),
            r => Err(unexpected(r)),
        }
    }

    /// dm_get_dmattr.
    pub fn get_dmattr(
        &mut self,
        token: Token,
        handle: &[u8],
        name: &[u8],
    ) -> Result<Vec<u8>, DmError> {
        let sid = self.sid;
        let req = DmRequest::GetDmattr {
            sid,
            token,
            handle: handle.to_vec(),
            name: name.to_vec(),
        };
        match self.call(&req, &[])? {
            (DmReply::Value, v) => Ok(v),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// dm_set_dmattr.
    pub fn set_dmattr(
        &mut self,
        token: Token,
        handle: &[u8],
        name: &[u8],
        value: &[u8],
    ) -> Result<(), DmError> {
        let sid = self.sid;
        let req = DmRequest::SetDmattr {
            sid,
            token,
            handle: handle.to_vec(),
            name: name.to_vec(),
        };
        match self.call(&req, value)?.0 {
            DmReply::Ok => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// dm_remove_dmattr.
    pub fn remove_dmattr(
        &mut self,
        token: Token,
        handle: &[u8],
        name: &[u8],
    ) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::RemoveDmattr {
            sid,
            token,
            handle: handle.to_vec(),
            name: name.to_vec(),
        })
    }

    /// dm_getall_dmattr.
    pub fn getall_dmattr(&mut self, token: Token, handle: &[u8]) -> Result<Vec<DmAttr>, DmError> {
        let sid = self.sid;
        let req = DmRequest::GetallDmattr {
            sid,
            token,
            handle: handle.to_vec(),
            buflen: None,
        };
        match self.call(&req, &[])?.0 {
            DmReply::Attrs { attrs } => Ok(attrs),
            r => Err(unexpected(r)),
        }
    }

    /// dm_set_region (returns exactflag).
    pub fn set_region(
        &mut self,
        token: Token,
        handle: &[u8],
        regions: &[Region],
    ) -> Result<bool, DmError> {
        let sid = self.sid;
        let req = DmRequest::SetRegion {
            sid,
            token,
            handle: handle.to_vec(),
            regions: regions.to_vec(),
        };
        match self.call(&req, &[])?.0 {
            DmReply::Exact { exact } => Ok(exact),
            r => Err(unexpected(r)),
        }
    }

    /// dm_get_region.
    pub fn get_region(&mut self, token: Token, handle: &[u8]) -> Result<Vec<Region>, DmError> {
        let sid = self.sid;
        let req = DmRequest::GetRegion {
            sid,
            token,
            handle: handle.to_vec(),
        };
        match self.call(&req, &[])?.0 {
            DmReply::Regions { regions } => Ok(regions),
            r => Err(unexpected(r)),
        }
    }

    /// dm_get_allocinfo.
    pub fn get_allocinfo(
        &mut self,
        token: Token,
        handle: &[u8],
        offset: i64,
        nelem: u32,
    ) -> Result<(Vec<Extent>, bool), DmError> {
        let sid = self.sid;
        let req = DmRequest::GetAllocinfo {
            sid,
            token,
            handle: handle.to_vec(),
            offset,
            nelem,
        };
        match self.call(&req, &[])?.0 {
            DmReply::Extents { extents, more } => Ok((extents, more)),
            r => Err(unexpected(r)),
        }
    }

    /// dm_probe_hole.
    pub fn probe_hole(
        &mut self,
        token: Token,
        handle: &[u8],
        offset: i64,
        length: u64,
    ) -> Result<(u64, u64), DmError> {
        let sid = self.sid;
        let req = DmRequest::ProbeHole {
            sid,
            token,
            handle: handle.to_vec(),
            offset,
            length,
        };
        match self.call(&req, &[])?.0 {
            DmReply::Range { offset, length } => Ok((offset, length)),
            r => Err(unexpected(r)),
        }
    }

    /// dm_punch_hole.
    pub fn punch_hole(
        &mut self,
        token: Token,
        handle: &[u8],
        offset: i64,
        length: u64,
    ) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::PunchHole {
            sid,
            token,
            handle: handle.to_vec(),
            offset,
            length,
        })
    }

    /// dm_read_invis.
    pub fn read_invis(
        &mut self,
        token: Token,
        handle: &[u8],
        offset: i64,
        length: u64,
    ) -> Result<Vec<u8>, DmError> {
        let sid = self.sid;
        let req = DmRequest::ReadInvis {
            sid,
            token,
            handle: handle.to_vec(),
            offset,
            length,
        };
        match self.call(&req, &[])? {
            (DmReply::Data, d) => Ok(d),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// dm_write_invis (`sync`: DM_WRITE_SYNC).
    pub fn write_invis(
        &mut self,
        token: Token,
        handle: &[u8],
        offset: i64,
        data: &[u8],
        sync: bool,
    ) -> Result<u64, DmError> {
        let sid = self.sid;
        let req = DmRequest::WriteInvis {
            sid,
            token,
            handle: handle.to_vec(),
            offset,
            flags: if sync { WRITE_SYNC } else { 0 },
            length: data.len() as u64,
        };
        match self.call(&req, data)?.0 {
            DmReply::Written { count } => Ok(count),
            r => Err(unexpected(r)),
        }
    }

    /// dm_sync_by_handle.
    pub fn sync_by_handle(&mut self, token: Token, handle: &[u8]) -> Result<(), DmError> {
        let sid = self.sid;
        self.ok(DmRequest::SyncByHandle {
            sid,
            token,
            handle: handle.to_vec(),
        })
    }

    /// dm_get_config.
    pub fn get_config(&mut self, handle: &[u8], flag: &str) -> Result<u64, DmError> {
        let req = DmRequest::GetConfig {
            handle: handle.to_vec(),
            flag: flag.into(),
        };
        match self.call(&req, &[])?.0 {
            DmReply::Config { value } => Ok(value),
            r => Err(unexpected(r)),
        }
    }
}
