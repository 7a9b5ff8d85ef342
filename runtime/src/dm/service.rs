//! The DM core behind the local API: DM applications' calls (`{"op":"dm",...}`) and the
//! parked ones (get_events with DM_EV_WAIT, synchronous send_msg, request_right with
//! DM_RR_WAIT). The FUSE capture will raise its events through the same [`Dm`].

use super::core::{Core, OpId, Output, Raised, WaiterId};
use super::{DmError, DmReply, DmRequest, Token};
use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::oneshot;

/// `[dm]` settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DmConfig {
    /// A synchronous event unanswered for this long fails its operation.
    pub event_timeout_ms: u64,
    /// With this errno.
    pub timeout_errno: i32,
}

impl Default for DmConfig {
    fn default() -> Self {
        DmConfig {
            event_timeout_ms: 60_000,
            timeout_errno: libc::ETIMEDOUT,
        }
    }
}

const SESSIONS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("dm_sessions");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("dm_meta");
/// Tokens are reserved on disk in blocks of this many, so that a restarted daemon knows
/// which tokens an earlier run issued (ESRCH) without a write per event.
const TOKEN_BLOCK: u64 = 1 << 20;

/// A parked call's outcome.
pub type Parked = oneshot::Receiver<DmReply>;

/// How a call went.
pub enum DmStep {
    /// Answered.
    Done(DmReply),
    /// Answered later (or never, if the caller leaves first).
    Parked(Parked),
}

struct Inner {
    core: Core,
    /// Parked get_events / request_right calls: waiter -> (client, answer).
    wakers: HashMap<WaiterId, (u64, oneshot::Sender<DmReply>)>,
    /// Blocked synchronous send_msg calls: op -> (client, token, answer).
    ops: HashMap<OpId, (u64, Token, oneshot::Sender<DmReply>)>,
    next_op: OpId,
    /// Tokens below this are reserved on disk.
    reserved: u64,
}

/// The daemon's DM service. Sessions (id and info) are recorded in the daemon's redb
/// (`dm_sessions`) and come back after a restart, without their events.
pub struct Dm {
    inner: Mutex<Inner>,
    epoch: Instant,
    db: Arc<redb::Database>,
}

impl Dm {
    /// The DM service, with the sessions recorded in `db`.
    pub fn open(cfg: &DmConfig, db: Arc<redb::Database>) -> anyhow::Result<Dm> {
        let mut core = Core::new(cfg.event_timeout_ms, cfg.timeout_errno);
        let w = db.begin_write()?;
        w.open_table(SESSIONS)?;
        let reserved_before = w
            .open_table(META)?
            .get("token_reserved")?
            .map(|v| v.value());
        w.commit()?;
        let r = db.begin_read()?;
        for item in r.open_table(SESSIONS)?.iter()? {
            let (k, v) = item?;
            core.restore_session(k.value(), v.value().to_vec());
        }
        drop(r);
        let floor = reserved_before.unwrap_or(1);
        core.set_token_floor(floor);
        let dm = Dm {
            inner: Mutex::new(Inner {
                core,
                wakers: HashMap::new(),
                ops: HashMap::new(),
                next_op: 1,
                reserved: floor,
            }),
            epoch: Instant::now(),
            db,
        };
        dm.reserve_tokens(&mut dm.lock())?;
        Ok(dm)
    }

    /// Keep the on-disk reservation ahead of the tokens issued.
    fn reserve_tokens(&self, g: &mut Inner) -> anyhow::Result<()> {
        if g.core.next_token() + TOKEN_BLOCK / 2 < g.reserved {
            return Ok(());
        }
        let reserved = g.core.next_token() + TOKEN_BLOCK;
        let w = self.db.begin_write()?;
        w.open_table(META)?.insert("token_reserved", reserved)?;
        w.commit()?;
        g.reserved = reserved;
        Ok(())
    }

    fn record_session(&self, sid: u64, info: Option<&[u8]>) {
        let r = (|| -> anyhow::Result<()> {
            let w = self.db.begin_write()?;
            {
                let mut t = w.open_table(SESSIONS)?;
                match info {
                    Some(i) => {
                        t.insert(sid, i)?;
                    }
                    None => {
                        t.remove(sid)?;
                    }
                }
            }
            w.commit()?;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::error!(session = sid, "cannot record DM session: {e}");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.epoch.elapsed().as_millis() as u64;
        g.core.set_now(now);
        g
    }

    fn apply(g: &mut Inner, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Answer { op, response } => {
                    if let Some((_, _, tx)) = g.ops.remove(&op) {
                        let _ = tx.send(DmReply::Answered { response });
                    }
                }
                Output::Events {
                    waiter,
                    session,
                    messages,
                } => {
                    let undelivered = match g.wakers.remove(&waiter) {
                        Some((_, tx)) => match tx.send(DmReply::Events { messages }) {
                            Ok(()) => None,
                            Err(DmReply::Events { messages }) => Some(messages),
                            Err(_) => None,
                        },
                        None => Some(messages),
                    };
                    // the caller left: the messages are not lost
                    if let Some(m) = undelivered.filter(|m| !m.is_empty()) {
                        let more = g.core.undeliver(session, m);
                        Self::apply(g, more);
                    }
                }
                Output::Right { waiter, result } => {
                    if let Some((_, tx)) = g.wakers.remove(&waiter) {
                        let _ = tx.send(match result {
                            Ok(()) => DmReply::Ok,
                            Err(error) => DmReply::Error { error },
                        });
                    }
                }
            }
        }
    }

    fn park(g: &mut Inner, client: u64) -> (WaiterId, Parked) {
        let w = g.core.waiter();
        let (tx, rx) = oneshot::channel();
        g.wakers.insert(w, (client, tx));
        (w, rx)
    }

    /// Serve a call from connection `client` (whose peer may use DMAPI).
    pub fn call(&self, client: u64, req: DmRequest, payload: Vec<u8>) -> DmStep {
        let mut g = self.lock();
        let g = &mut *g;
        let r: Result<DmReply, DmError> = match req {
            DmRequest::CreateSession { old, info } => {
                g.core.create_session(old, &info).map(|sid| {
                    self.record_session(sid, Some(&info));
                    DmReply::Session { sid }
                })
            }
            DmRequest::DestroySession { sid } => g.core.destroy_session(sid).map(|out| {
                self.record_session(sid, None);
                Self::apply(g, out);
                DmReply::Ok
            }),
            DmRequest::QuerySession { sid } => {
                g.core.query_session(sid).map(|info| DmReply::Info { info })
            }
            DmRequest::Sessions => Ok(DmReply::Sessions {
                sids: g.core.sessions(),
            }),
            DmRequest::Tokens { sid } => {
                g.core.tokens(sid).map(|tokens| DmReply::Tokens { tokens })
            }
            DmRequest::GetEvents { sid, max, wait } => {
                let parked = wait.then(|| Self::park(g, client));
                match g.core.get_events(sid, max, parked.as_ref().map(|p| p.0)) {
                    Ok(Some(messages)) => {
                        if let Some((w, _)) = parked {
                            g.wakers.remove(&w);
                        }
                        Ok(DmReply::Events { messages })
                    }
                    Ok(None) => return DmStep::Parked(parked.expect("parked").1),
                    Err(e) => {
                        if let Some((w, _)) = parked {
                            g.wakers.remove(&w);
                        }
                        Err(e)
                    }
                }
            }
            DmRequest::FindEvent { sid, token } => g
                .core
                .find_eventmsg(sid, token)
                .map(|m| DmReply::Events { messages: vec![m] }),
            DmRequest::Respond {
                sid,
                token,
                response,
            } => g.core.respond(sid, token, response).map(|out| {
                Self::apply(g, out);
                DmReply::Ok
            }),
            DmRequest::Pending {
                sid,
                token,
                delay_ms,
            } => g.core.pending(sid, token, delay_ms).map(|()| DmReply::Ok),
            DmRequest::MoveEvent { sid, token, target } => {
                g.core.move_event(sid, token, target).map(|out| {
                    Self::apply(g, out);
                    DmReply::Ok
                })
            }
            DmRequest::SendMsg { sid, sync } => {
                let op = g.next_op;
                g.next_op += 1;
                if let Err(e) = self.reserve_tokens(g) {
                    tracing::error!("cannot reserve DM tokens: {e}");
                    return DmStep::Done(DmReply::Error {
                        error: DmError::Enomem,
                    });
                }
                match g.core.send_msg(sid, sync, payload, op) {
                    Ok((Raised::Blocked(token), out)) => {
                        let (tx, rx) = oneshot::channel();
                        g.ops.insert(op, (client, token, tx));
                        Self::apply(g, out);
                        return DmStep::Parked(rx);
                    }
                    Ok((_, out)) => {
                        Self::apply(g, out);
                        Ok(DmReply::Ok)
                    }
                    Err(e) => Err(e),
                }
            }
            DmRequest::RequestRight {
                sid,
                token,
                object,
                right,
                wait,
            } => {
                let parked = wait.then(|| Self::park(g, client));
                match g
                    .core
                    .request_right(sid, token, &object, right, parked.as_ref().map(|p| p.0))
                {
                    Ok(false) => return DmStep::Parked(parked.expect("parked").1),
                    r => {
                        if let Some((w, _)) = parked {
                            g.wakers.remove(&w);
                        }
                        r.map(|_| DmReply::Ok)
                    }
                }
            }
            DmRequest::ReleaseRight { sid, token, object } => {
                g.core.release_right(sid, token, &object).map(|out| {
                    Self::apply(g, out);
                    DmReply::Ok
                })
            }
            DmRequest::UpgradeRight { sid, token, object } => g
                .core
                .upgrade_right(sid, token, &object)
                .map(|()| DmReply::Ok),
            DmRequest::DowngradeRight { sid, token, object } => {
                g.core.downgrade_right(sid, token, &object).map(|out| {
                    Self::apply(g, out);
                    DmReply::Ok
                })
            }
            DmRequest::QueryRight { sid, token, object } => g
                .core
                .query_right(sid, token, &object)
                .map(|right| DmReply::Right { right }),
        };
        DmStep::Done(r.unwrap_or_else(|error| DmReply::Error { error }))
    }

    /// A connection closed (or gave up a parked call): its parked calls are forgotten and
    /// the events of its blocked synchronous messages cancelled. Its sessions stay, for a
    /// DM application to assume.
    pub fn disconnect(&self, client: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        let mine: Vec<WaiterId> = g
            .wakers
            .iter()
            .filter(|(_, (c, _))| *c == client)
            .map(|(w, _)| *w)
            .collect();
        for w in mine {
            g.wakers.remove(&w);
            g.core.forget_waiter(w);
        }
        let ops: Vec<(OpId, Token)> = g
            .ops
            .iter()
            .filter(|(_, (c, _, _))| *c == client)
            .map(|(op, (_, t, _))| (*op, *t))
            .collect();
        for (op, token) in ops {
            g.ops.remove(&op);
            let out = g.core.cancel(token);
            Self::apply(g, out);
        }
    }

    /// Time passed: unanswered synchronous events time out.
    pub fn tick(&self) {
        let mut g = self.lock();
        let now = self.epoch.elapsed().as_millis() as u64;
        let out = g.core.tick(now);
        Self::apply(&mut g, out);
    }
}
