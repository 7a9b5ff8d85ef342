//! The DM state machine, free of I/O: sessions, event delivery, tokens, rights and
//! dispositions. Operations (FUSE requests, `send_msg`) and DM application calls go in with
//! the time; answers to blocked operations, wake-ups of parked calls and records to persist
//! come out as [`Output`]s. The FUSE and API shells do the I/O.
//!
//! Tokens: every synchronous event gets a token, outstanding from the moment it is queued
//! until it is answered, cancelled or timed out. A token this core never issued (or of
//! another session) is EINVAL; one it issued that is no longer outstanding is ESRCH (seed
//! 001). Rights are held under a token, per object (the handle's bytes), as a readers-writer
//! lock, and released when the token ends.

#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use strata_proto::dm::{
    DmError, EventData, EventSet, EventType, FsId, Message, Response, Right, SessionId, Token,
    INVALID_TOKEN, NO_SESSION, SESSION_INFO_LEN,
};

/// A blocked operation of the shell (a FUSE request, a sync `send_msg`).
pub type OpId = u64;
/// A parked DM call (get_events with DM_EV_WAIT, request_right with DM_RR_WAIT).
pub type WaiterId = u64;

/// What comes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A blocked operation may go on (Continue/Dontcare) or fails with the errno.
    Answer {
        /// Operation.
        op: OpId,
        /// The answer.
        response: Response,
    },
    /// A parked get_events has messages.
    Events {
        /// Waiter.
        waiter: WaiterId,
        /// Its session.
        session: SessionId,
        /// Messages.
        messages: Vec<Message>,
    },
    /// A parked request_right was granted or failed.
    Right {
        /// Waiter.
        waiter: WaiterId,
        /// Result.
        result: Result<(), DmError>,
    },
}

/// How `raise` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raised {
    /// No session takes this event type on this filesystem: the operation goes on.
    NotDisposed,
    /// Queued as an asynchronous message: the operation goes on.
    Queued,
    /// Synchronous: the operation waits for `Output::Answer` (or its timeout).
    Blocked(Token),
}

#[derive(Debug)]
struct Session {
    info: Vec<u8>,
    queue: VecDeque<Message>,
    /// Tokens of this session's outstanding events (queued or delivered).
    tokens: BTreeSet<Token>,
    waiters: VecDeque<(WaiterId, u32)>,
    next_seq: u64,
}

#[derive(Debug)]
struct Outstanding {
    session: SessionId,
    message: Message,
    op: Option<OpId>,
    delivered: bool,
    deadline: u64,
    rights: HashMap<Vec<u8>, Right>,
}

#[derive(Debug, Default)]
struct ObjectLock {
    holders: HashMap<Token, Right>,
    waiters: VecDeque<(WaiterId, Token, Right)>,
}

/// The state machine.
pub struct Core {
    sessions: BTreeMap<SessionId, Session>,
    events: HashMap<Token, Outstanding>,
    /// Tokens issued and since ended (answered, cancelled, timed out): ESRCH, not EINVAL.
    ended: BTreeSet<Token>,
    dispositions: HashMap<FsId, HashMap<EventType, SessionId>>,
    /// Bumped whenever `dispositions` change (the shell republishes its lock-free view).
    disp_generation: u64,
    locks: HashMap<Vec<u8>, ObjectLock>,
    next_session: u64,
    next_token: u64,
    /// Tokens below this were issued by an earlier run of the daemon: ESRCH.
    token_floor: u64,
    next_waiter: u64,
    now: u64,
    timeout_ms: u64,
    timeout_errno: i32,
}

/// The largest errno an abort may carry (the FUSE kernel module refuses larger ones).
pub const MAX_ERRNO: i32 = 511;

/// Keep at most this many ended tokens (older ones become EINVAL).
const ENDED_KEEP: usize = 65_536;

impl Core {
    /// An empty core: sync events unanswered for `timeout_ms` fail with `timeout_errno`.
    pub fn new(timeout_ms: u64, timeout_errno: i32) -> Core {
        Core {
            sessions: BTreeMap::new(),
            events: HashMap::new(),
            ended: BTreeSet::new(),
            dispositions: HashMap::new(),
            disp_generation: 0,
            locks: HashMap::new(),
            next_session: 1,
            next_token: 1,
            token_floor: 0,
            next_waiter: 1,
            now: 0,
            timeout_ms,
            timeout_errno,
        }
    }

    /// Bring back a session recorded by an earlier run (no events: those died with it).
    pub fn restore_session(&mut self, sid: SessionId, info: Vec<u8>) {
        self.next_session = self.next_session.max(sid + 1);
        self.sessions.insert(
            sid,
            Session {
                info,
                queue: VecDeque::new(),
                tokens: BTreeSet::new(),
                waiters: VecDeque::new(),
                next_seq: 1,
            },
        );
    }

    /// Tokens issued from now on start at `floor`; those below it belonged to an earlier
    /// run and answer ESRCH.
    pub fn set_token_floor(&mut self, floor: u64) {
        self.token_floor = self.token_floor.max(floor);
        self.next_token = self.next_token.max(floor);
    }

    /// The next token this core will issue.
    pub fn next_token(&self) -> u64 {
        self.next_token
    }

    /// Advance the clock (ms, monotonic).
    pub fn set_now(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// A new waiter id for a parked call.
    pub fn waiter(&mut self) -> WaiterId {
        let w = self.next_waiter;
        self.next_waiter += 1;
        w
    }

    /// dm_create_session: a new session, or (with `old`) assume a session whose DM
    /// application went away: its delivered, unanswered events are delivered again.
    pub fn create_session(&mut self, old: SessionId, info: &[u8]) -> Result<SessionId, DmError> {
        if info.len() > SESSION_INFO_LEN {
            return Err(DmError::E2big);
        }
        if old != NO_SESSION {
            let s = self.sessions.get_mut(&old).ok_or(DmError::Einval)?;
            // an empty info string keeps the session's
            if !info.is_empty() {
                s.info = info.to_vec();
            }
            // re-deliver in sequence order ahead of what is still queued
            let mut again: Vec<Message> = s
                .tokens
                .iter()
                .filter_map(|t| self.events.get(t))
                .filter(|e| e.delivered)
                .map(|e| e.message.clone())
                .collect();
            again.sort_by_key(|m| m.sequence);
            for m in again.into_iter().rev() {
                s.queue.push_front(m);
            }
            for t in &s.tokens {
                if let Some(e) = self.events.get_mut(t) {
                    e.delivered = false;
                }
            }
            return Ok(old);
        }
        let sid = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            sid,
            Session {
                info: info.to_vec(),
                queue: VecDeque::new(),
                tokens: BTreeSet::new(),
                waiters: VecDeque::new(),
                next_seq: 1,
            },
        );
        Ok(sid)
    }

    /// dm_destroy_session: EBUSY while it has outstanding events or dispositions.
    pub fn destroy_session(&mut self, sid: SessionId) -> Result<Vec<Output>, DmError> {
        let s = self.sessions.get(&sid).ok_or(DmError::Einval)?;
        if !s.tokens.is_empty() {
            return Err(DmError::Ebusy);
        }
        if self
            .dispositions
            .values()
            .any(|d| d.values().any(|x| *x == sid))
        {
            return Err(DmError::Ebusy);
        }
        let s = self.sessions.remove(&sid).expect("checked");
        Ok(s.waiters
            .into_iter()
            .map(|(waiter, _)| Output::Events {
                waiter,
                session: sid,
                messages: vec![],
            })
            .collect())
    }

    /// dm_query_session.
    pub fn query_session(&self, sid: SessionId) -> Result<Vec<u8>, DmError> {
        self.sessions
            .get(&sid)
            .map(|s| s.info.clone())
            .ok_or(DmError::Einval)
    }

    /// dm_getall_sessions.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }

    /// dm_getall_tokens: the session's outstanding tokens.
    pub fn tokens(&self, sid: SessionId) -> Result<Vec<Token>, DmError> {
        Ok(self
            .sessions
            .get(&sid)
            .ok_or(DmError::Einval)?
            .tokens
            .iter()
            .copied()
            .collect())
    }

    /// dm_set_disp: the event types of `set` on filesystem `fs` go to `sid` (replacing this
    /// session's earlier set there; a type another session holds is taken over).
    pub fn set_disp(&mut self, sid: SessionId, fs: FsId, set: EventSet) -> Result<(), DmError> {
        if !self.sessions.contains_key(&sid) {
            return Err(DmError::Einval);
        }
        let d = self.dispositions.entry(fs).or_default();
        d.retain(|_, s| *s != sid);
        for t in set.types() {
            d.insert(t, sid);
        }
        self.disp_generation += 1;
        Ok(())
    }

    /// dm_getall_disp: (filesystem, event set) for the session.
    pub fn getall_disp(&self, sid: SessionId) -> Result<Vec<(FsId, EventSet)>, DmError> {
        if !self.sessions.contains_key(&sid) {
            return Err(DmError::Einval);
        }
        let mut out: Vec<(FsId, EventSet)> = self
            .dispositions
            .iter()
            .map(|(fs, d)| {
                let mut set = EventSet::empty();
                for (t, s) in d {
                    if *s == sid {
                        set.set(*t);
                    }
                }
                (*fs, set)
            })
            .filter(|(_, set)| !set.is_empty())
            .collect();
        out.sort_by_key(|(fs, _)| *fs);
        Ok(out)
    }

    /// Changes whenever some disposition changes.
    pub fn disposition_generation(&self) -> u64 {
        self.disp_generation
    }

    /// The event types of `fs` disposed to some session.
    pub fn disposed_set(&self, fs: FsId) -> EventSet {
        let mut set = EventSet::empty();
        for t in self
            .dispositions
            .get(&fs)
            .into_iter()
            .flat_map(|d| d.keys())
        {
            set.set(*t);
        }
        set
    }

    /// The filesystems with dispositions.
    pub fn disposed_filesystems(&self) -> Vec<FsId> {
        self.dispositions.keys().copied().collect()
    }

    /// The session an event type on `fs` goes to.
    pub fn disposed_to(&self, fs: FsId, kind: EventType) -> Option<SessionId> {
        self.dispositions.get(&fs)?.get(&kind).copied()
    }

    fn issue_token(&mut self) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// An operation raises an event. `op` is the operation to answer (sync events).
    pub fn raise(
        &mut self,
        fs: FsId,
        kind: EventType,
        data: EventData,
        op: OpId,
    ) -> (Raised, Vec<Output>) {
        let Some(sid) = self.disposed_to(fs, kind) else {
            return (Raised::NotDisposed, vec![]);
        };
        self.enqueue(sid, fs, kind, data, kind.is_sync().then_some(op))
    }

    /// dm_send_msg: a user event to `target`; synchronous ones block `op` until answered.
    pub fn send_msg(
        &mut self,
        target: SessionId,
        sync: bool,
        data: Vec<u8>,
        op: OpId,
    ) -> Result<(Raised, Vec<Output>), DmError> {
        if !self.sessions.contains_key(&target) {
            return Err(DmError::Einval);
        }
        Ok(self.enqueue(
            target,
            0,
            EventType::User,
            EventData::User { data },
            sync.then_some(op),
        ))
    }

    fn enqueue(
        &mut self,
        sid: SessionId,
        fs: FsId,
        kind: EventType,
        data: EventData,
        op: Option<OpId>,
    ) -> (Raised, Vec<Output>) {
        let token = if op.is_some() {
            self.issue_token()
        } else {
            INVALID_TOKEN
        };
        let deadline = self.now.saturating_add(self.timeout_ms);
        let s = self
            .sessions
            .get_mut(&sid)
            .expect("dispositions name live sessions");
        let message = Message {
            kind,
            token,
            sequence: s.next_seq,
            fs,
            data,
        };
        s.next_seq += 1;
        s.queue.push_back(message.clone());
        if let Some(op) = op {
            s.tokens.insert(token);
            self.events.insert(
                token,
                Outstanding {
                    session: sid,
                    message,
                    op: Some(op),
                    delivered: false,
                    deadline,
                    rights: HashMap::new(),
                },
            );
        }
        let out = self.feed_waiters(sid);
        (
            if op.is_some() {
                Raised::Blocked(token)
            } else {
                Raised::Queued
            },
            out,
        )
    }

    fn take_messages(&mut self, sid: SessionId, max: u32) -> Vec<Message> {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return vec![];
        };
        let n = (max as usize).min(s.queue.len());
        let msgs: Vec<Message> = s.queue.drain(..n).collect();
        for m in &msgs {
            if let Some(e) = self.events.get_mut(&m.token) {
                e.delivered = true;
            }
        }
        msgs
    }

    fn feed_waiters(&mut self, sid: SessionId) -> Vec<Output> {
        let mut out = Vec::new();
        loop {
            let next = self.sessions.get_mut(&sid).and_then(|s| {
                if s.queue.is_empty() {
                    None
                } else {
                    s.waiters.pop_front()
                }
            });
            let Some((waiter, max)) = next else {
                return out;
            };
            let messages = self.take_messages(sid, max);
            out.push(Output::Events {
                waiter,
                session: sid,
                messages,
            });
        }
    }

    /// dm_get_events: up to `max` messages; none queued and `wait` (DM_EV_WAIT): parked as
    /// `waiter` until some arrive (`Ok(None)`); none and no wait: EAGAIN.
    pub fn get_events(
        &mut self,
        sid: SessionId,
        max: u32,
        wait: Option<WaiterId>,
    ) -> Result<Option<Vec<Message>>, DmError> {
        if max == 0 || max >= i32::MAX as u32 {
            return Err(DmError::Einval);
        }
        let s = self.sessions.get_mut(&sid).ok_or(DmError::Einval)?;
        if s.queue.is_empty() {
            return match wait {
                Some(w) => {
                    s.waiters.push_back((w, max));
                    Ok(None)
                }
                None => Err(DmError::Eagain),
            };
        }
        Ok(Some(self.take_messages(sid, max)))
    }

    /// Messages taken for a caller that left before getting them go back to the front of
    /// the session's queue (events that ended meanwhile are dropped).
    pub fn undeliver(&mut self, sid: SessionId, messages: Vec<Message>) -> Vec<Output> {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return vec![];
        };
        for m in messages.into_iter().rev() {
            if m.token != INVALID_TOKEN {
                match self.events.get_mut(&m.token) {
                    Some(e) if e.session == sid => e.delivered = false,
                    _ => continue,
                }
            }
            s.queue.push_front(m);
        }
        self.feed_waiters(sid)
    }

    /// A parked get_events gave up (its caller left).
    pub fn forget_waiter(&mut self, waiter: WaiterId) {
        for s in self.sessions.values_mut() {
            s.waiters.retain(|(w, _)| *w != waiter);
        }
        for l in self.locks.values_mut() {
            l.waiters.retain(|(w, _, _)| *w != waiter);
        }
    }

    /// Check that `token` is an outstanding event of `sid`.
    fn outstanding(&self, sid: SessionId, token: Token) -> Result<&Outstanding, DmError> {
        if !self.sessions.contains_key(&sid) {
            return Err(DmError::Einval);
        }
        match self.events.get(&token) {
            Some(e) if e.session == sid => Ok(e),
            Some(_) => Err(DmError::Einval),
            None if self.ended.contains(&token) => Err(DmError::Esrch),
            None if token != INVALID_TOKEN && token < self.token_floor => Err(DmError::Esrch),
            None => Err(DmError::Einval),
        }
    }

    /// dm_find_eventmsg.
    pub fn find_eventmsg(&self, sid: SessionId, token: Token) -> Result<Message, DmError> {
        Ok(self.outstanding(sid, token)?.message.clone())
    }

    /// dm_respond_event: the operation goes on or fails; the token and its rights end.
    pub fn respond(
        &mut self,
        sid: SessionId,
        token: Token,
        response: Response,
    ) -> Result<Vec<Output>, DmError> {
        if let Response::Abort(errno) = response {
            // the kernel takes errors 1..=511 only (a larger one would leave the
            // operation unanswered)
            if !(1..=MAX_ERRNO).contains(&errno) {
                return Err(DmError::Einval);
            }
        }
        self.outstanding(sid, token)?;
        Ok(self.end_token(token, Some(response)))
    }

    fn end_token(&mut self, token: Token, response: Option<Response>) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(e) = self.events.remove(&token) else {
            return out;
        };
        if let Some(s) = self.sessions.get_mut(&e.session) {
            s.tokens.remove(&token);
            s.queue.retain(|m| m.token != token);
        }
        self.ended.insert(token);
        while self.ended.len() > ENDED_KEEP {
            self.ended.pop_first();
        }
        // requests still queued under the token fail; rights held are released
        for l in self.locks.values_mut() {
            l.waiters.retain(|(waiter, t, _)| {
                if *t == token {
                    out.push(Output::Right {
                        waiter: *waiter,
                        result: Err(DmError::Esrch),
                    });
                }
                *t != token
            });
        }
        for obj in e.rights.keys() {
            out.extend(self.unlock(obj, token));
        }
        if let (Some(op), Some(response)) = (e.op, response) {
            out.push(Output::Answer { op, response });
        }
        out
    }

    /// dm_pending: the DM application needs more time: the deadline moves `delay_ms` on.
    pub fn pending(&mut self, sid: SessionId, token: Token, delay_ms: u64) -> Result<(), DmError> {
        self.outstanding(sid, token)?;
        let now = self.now;
        if let Some(e) = self.events.get_mut(&token) {
            e.deadline = e.deadline.max(now.saturating_add(delay_ms));
        }
        Ok(())
    }

    /// dm_move_event: hand an outstanding event to another session (same token).
    pub fn move_event(
        &mut self,
        sid: SessionId,
        token: Token,
        target: SessionId,
    ) -> Result<Vec<Output>, DmError> {
        self.outstanding(sid, token)?;
        if !self.sessions.contains_key(&target) {
            return Err(DmError::Einval);
        }
        let msg = {
            let e = self.events.get_mut(&token).expect("outstanding");
            e.session = target;
            e.delivered = false;
            e.message.clone()
        };
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.tokens.remove(&token);
            s.queue.retain(|m| m.token != token);
        }
        let t = self.sessions.get_mut(&target).expect("checked");
        t.tokens.insert(token);
        t.queue.push_back(msg);
        Ok(self.feed_waiters(target))
    }

    /// The operation blocked on `token` was interrupted: the event ends; a session that
    /// already got it receives a cancel message.
    pub fn cancel(&mut self, token: Token) -> Vec<Output> {
        let Some(e) = self.events.get(&token) else {
            return vec![];
        };
        let (sid, delivered, sequence, fs) =
            (e.session, e.delivered, e.message.sequence, e.message.fs);
        let mut out = self.end_token(token, None);
        if delivered {
            if let Some(s) = self.sessions.get_mut(&sid) {
                let m = Message {
                    kind: EventType::Cancel,
                    token: INVALID_TOKEN,
                    sequence: s.next_seq,
                    fs,
                    data: EventData::Cancel { sequence, token },
                };
                s.next_seq += 1;
                s.queue.push_back(m);
            }
            out.extend(self.feed_waiters(sid));
        }
        out
    }

    /// Time passed: synchronous events past their deadline fail their operation with the
    /// configured errno (and are cancelled at the session).
    pub fn tick(&mut self, now: u64) -> Vec<Output> {
        self.set_now(now);
        let mut late: Vec<(Token, Option<OpId>)> = self
            .events
            .iter()
            .filter(|(_, e)| e.deadline <= self.now)
            .map(|(t, e)| (*t, e.op))
            .collect();
        late.sort_unstable();
        let mut out = Vec::new();
        for (token, op) in late {
            out.extend(self.cancel(token));
            if let Some(op) = op {
                out.push(Output::Answer {
                    op,
                    response: Response::Abort(self.timeout_errno),
                });
            }
        }
        out
    }

    /// dm_request_right: take `right` on `object` under `token`. Granted now (`Ok(true)`),
    /// queued as `wait` (DM_RR_WAIT, `Ok(false)`: an `Output::Right` follows), or EAGAIN.
    pub fn request_right(
        &mut self,
        sid: SessionId,
        token: Token,
        object: &[u8],
        right: Right,
        wait: Option<WaiterId>,
    ) -> Result<bool, DmError> {
        self.outstanding(sid, token)?;
        if right == Right::Null {
            return Err(DmError::Einval);
        }
        let held = self.events[&token].rights.get(object).copied();
        if held.is_some_and(|h| h >= right) {
            return Ok(true);
        }
        let lock = self.locks.entry(object.to_vec()).or_default();
        if compatible(lock, token, right) {
            self.hold(token, object, right);
            return Ok(true);
        }
        match wait {
            Some(w) => {
                lock.waiters.push_back((w, token, right));
                Ok(false)
            }
            None => Err(DmError::Eagain),
        }
    }

    /// dm_release_right.
    pub fn release_right(
        &mut self,
        sid: SessionId,
        token: Token,
        object: &[u8],
    ) -> Result<Vec<Output>, DmError> {
        self.outstanding(sid, token)?;
        if self
            .events
            .get_mut(&token)
            .expect("outstanding")
            .rights
            .remove(object)
            .is_none()
        {
            return Err(DmError::Eacces);
        }
        Ok(self.unlock(object, token))
    }

    /// dm_upgrade_right: shared → exclusive (EAGAIN while others share it).
    pub fn upgrade_right(
        &mut self,
        sid: SessionId,
        token: Token,
        object: &[u8],
    ) -> Result<(), DmError> {
        self.outstanding(sid, token)?;
        match self.events[&token].rights.get(object) {
            Some(Right::Excl) => return Ok(()),
            Some(Right::Shared) => {}
            _ => return Err(DmError::Eacces),
        }
        let others = self
            .locks
            .get(object)
            .is_some_and(|l| l.holders.keys().any(|t| *t != token));
        if others {
            return Err(DmError::Eagain);
        }
        self.hold(token, object, Right::Excl);
        Ok(())
    }

    /// dm_downgrade_right: exclusive → shared (waiting sharers get in).
    pub fn downgrade_right(
        &mut self,
        sid: SessionId,
        token: Token,
        object: &[u8],
    ) -> Result<Vec<Output>, DmError> {
        self.outstanding(sid, token)?;
        if self.events[&token].rights.get(object) != Some(&Right::Excl) {
            return Err(DmError::Eacces);
        }
        self.hold(token, object, Right::Shared);
        Ok(self.grant_waiting(object))
    }

    /// A DM call on `object` under (`sid`, `token`): DM_NO_TOKEN (0) needs only a live
    /// session; any other token must be an outstanding event of the session (EINVAL /
    /// ESRCH) holding at least `need` on the object (EACCES).
    pub fn check_right(
        &self,
        sid: SessionId,
        token: Token,
        object: &[u8],
        need: Right,
    ) -> Result<(), DmError> {
        if !self.sessions.contains_key(&sid) {
            return Err(DmError::Einval);
        }
        if token == INVALID_TOKEN {
            return Ok(());
        }
        let e = self.outstanding(sid, token)?;
        match e.rights.get(object) {
            Some(r) if *r >= need => Ok(()),
            _ if need == Right::Null => Ok(()),
            _ => Err(DmError::Eacces),
        }
    }

    /// The dispositions of one filesystem (to persist them).
    pub fn dispositions_of(&self, fs: FsId) -> Vec<(EventType, SessionId)> {
        let mut v: Vec<(EventType, SessionId)> = self
            .dispositions
            .get(&fs)
            .map(|d| d.iter().map(|(t, s)| (*t, *s)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Bring back recorded dispositions (of sessions that still exist).
    pub fn restore_dispositions(&mut self, fs: FsId, disp: &[(EventType, SessionId)]) {
        for (t, sid) in disp {
            if self.sessions.contains_key(sid) {
                self.dispositions.entry(fs).or_default().insert(*t, *sid);
            }
        }
        self.disp_generation += 1;
    }

    /// Whether any synchronous event type on `fs` goes to a session (an operation there
    /// may have to wait).
    pub fn any_sync_disposed(&self, fs: FsId) -> bool {
        self.dispositions
            .get(&fs)
            .is_some_and(|d| d.keys().any(|t| t.is_sync()))
    }

    /// dm_query_right.
    pub fn query_right(
        &self,
        sid: SessionId,
        token: Token,
        object: &[u8],
    ) -> Result<Right, DmError> {
        Ok(self
            .outstanding(sid, token)?
            .rights
            .get(object)
            .copied()
            .unwrap_or(Right::Null))
    }

    /// Record that `token` holds `right` on `object` (in the object's lock and the event).
    fn hold(&mut self, token: Token, object: &[u8], right: Right) {
        self.locks
            .entry(object.to_vec())
            .or_default()
            .holders
            .insert(token, right);
        if let Some(e) = self.events.get_mut(&token) {
            e.rights.insert(object.to_vec(), right);
        }
    }

    fn unlock(&mut self, object: &[u8], token: Token) -> Vec<Output> {
        if let Some(l) = self.locks.get_mut(object) {
            l.holders.remove(&token);
            l.waiters.retain(|(_, t, _)| *t != token);
        }
        self.grant_waiting(object)
    }

    fn grant_waiting(&mut self, object: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(l) = self.locks.get_mut(object) else {
            return out;
        };
        while let Some(&(waiter, token, right)) = l.waiters.front() {
            if !compatible(l, token, right) {
                break;
            }
            l.waiters.pop_front();
            l.holders.insert(token, right);
            if let Some(e) = self.events.get_mut(&token) {
                e.rights.insert(object.to_vec(), right);
            }
            out.push(Output::Right {
                waiter,
                result: Ok(()),
            });
        }
        if l.holders.is_empty() && l.waiters.is_empty() {
            self.locks.remove(object);
        }
        out
    }
}

/// Whether `token` may hold `right` given the other holders.
fn compatible(l: &ObjectLock, token: Token, right: Right) -> bool {
    let others = l.holders.iter().filter(|(t, _)| **t != token);
    match right {
        Right::Excl => others.count() == 0,
        Right::Shared => others.filter(|(_, r)| **r == Right::Excl).count() == 0,
        Right::Null => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(h: &[u8]) -> EventData {
        EventData::Data {
            handle: h.to_vec(),
            offset: 0,
            length: 10,
        }
    }

    fn core() -> (Core, SessionId) {
        let mut c = Core::new(1000, libc::ETIMEDOUT);
        let s = c.create_session(NO_SESSION, b"hsm").unwrap();
        c.set_disp(
            s,
            7,
            EventSet::of(&[EventType::Read, EventType::Postcreate]),
        )
        .unwrap();
        (c, s)
    }

    #[test]
    fn sessions_info_and_limits() {
        let mut c = Core::new(1000, libc::ETIMEDOUT);
        assert_eq!(
            c.create_session(NO_SESSION, &[b'x'; 257]),
            Err(DmError::E2big)
        );
        let s = c.create_session(NO_SESSION, &[b'x'; 256]).unwrap();
        assert_eq!(c.query_session(s).unwrap().len(), 256);
        assert_eq!(c.query_session(99), Err(DmError::Einval));
        assert_eq!(c.sessions(), vec![s]);
        c.set_disp(s, 1, EventSet::of(&[EventType::Read])).unwrap();
        assert_eq!(c.destroy_session(s), Err(DmError::Ebusy), "dispositions");
        c.set_disp(s, 1, EventSet::empty()).unwrap();
        assert!(c.destroy_session(s).is_ok());
        assert_eq!(c.destroy_session(s), Err(DmError::Einval));
    }

    #[test]
    fn sync_events_block_until_answered_and_tokens_end() {
        let (mut c, s) = core();
        // not disposed: goes on
        assert_eq!(
            c.raise(7, EventType::Write, data(b"f"), 1).0,
            Raised::NotDisposed
        );
        assert_eq!(
            c.raise(8, EventType::Read, data(b"f"), 1).0,
            Raised::NotDisposed
        );
        // async: queued, no token
        assert_eq!(
            c.raise(7, EventType::Postcreate, data(b"f"), 2).0,
            Raised::Queued
        );
        let (r, _) = c.raise(7, EventType::Read, data(b"f"), 3);
        let Raised::Blocked(t) = r else { panic!() };
        let msgs = c.get_events(s, 10, None).unwrap().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].token, msgs[1].token), (INVALID_TOKEN, t));
        assert!(msgs[0].sequence < msgs[1].sequence);
        assert_eq!(c.get_events(s, 10, None), Err(DmError::Eagain));
        assert_eq!(c.tokens(s).unwrap(), vec![t]);
        let out = c.respond(s, t, Response::Abort(libc::EIO)).unwrap();
        assert_eq!(
            out,
            vec![Output::Answer {
                op: 3,
                response: Response::Abort(libc::EIO)
            }]
        );
        // answered: ESRCH; never issued: EINVAL
        assert_eq!(c.respond(s, t, Response::Continue), Err(DmError::Esrch));
        assert_eq!(
            c.respond(s, 12345, Response::Continue),
            Err(DmError::Einval)
        );
        assert_eq!(
            c.respond(s, t + 1000, Response::Continue),
            Err(DmError::Einval)
        );
    }

    #[test]
    fn waiting_get_events_wakes_and_timeouts_abort() {
        let (mut c, s) = core();
        let w = c.waiter();
        assert_eq!(c.get_events(s, 5, Some(w)), Ok(None));
        let (r, out) = c.raise(7, EventType::Read, data(b"f"), 9);
        let Raised::Blocked(t) = r else { panic!() };
        assert!(
            matches!(&out[..], [Output::Events { waiter, messages, .. }] if *waiter == w && messages[0].token == t)
        );
        c.pending(s, t, 5000).unwrap();
        assert!(c.tick(1500).is_empty(), "pending moved the deadline");
        let out = c.tick(5000);
        assert!(out.contains(&Output::Answer {
            op: 9,
            response: Response::Abort(libc::ETIMEDOUT)
        }));
        // the session hears that the delivered event was cancelled
        let m = c.get_events(s, 5, None).unwrap().unwrap();
        assert_eq!(m[0].kind, EventType::Cancel);
        assert_eq!(
            m[0].data,
            EventData::Cancel {
                sequence: 1,
                token: t
            }
        );
        assert_eq!(c.respond(s, t, Response::Continue), Err(DmError::Esrch));
    }

    #[test]
    fn assumed_session_gets_outstanding_events_again() {
        let (mut c, s) = core();
        let (r, _) = c.raise(7, EventType::Read, data(b"f"), 1);
        let Raised::Blocked(t) = r else { panic!() };
        c.get_events(s, 5, None).unwrap().unwrap();
        // the DM application restarts and assumes its session
        assert_eq!(c.create_session(s, b"hsm again").unwrap(), s);
        let again = c.get_events(s, 5, None).unwrap().unwrap();
        assert_eq!(again[0].token, t);
        assert_eq!(c.query_session(s).unwrap(), b"hsm again");
        assert!(c.respond(s, t, Response::Continue).is_ok());
        assert_eq!(c.create_session(424242, b""), Err(DmError::Einval));
    }

    #[test]
    fn move_event_and_tokens_of_another_session() {
        let (mut c, s) = core();
        let s2 = c.create_session(NO_SESSION, b"other").unwrap();
        let (r, _) = c.raise(7, EventType::Read, data(b"f"), 1);
        let Raised::Blocked(t) = r else { panic!() };
        assert_eq!(c.respond(s2, t, Response::Continue), Err(DmError::Einval));
        c.move_event(s, t, s2).unwrap();
        assert_eq!(c.respond(s, t, Response::Continue), Err(DmError::Einval));
        assert_eq!(c.get_events(s2, 1, None).unwrap().unwrap()[0].token, t);
        assert!(c.respond(s2, t, Response::Dontcare).is_ok());
    }

    #[test]
    fn user_messages_sync_and_async() {
        let (mut c, s) = core();
        assert_eq!(c.send_msg(99, false, vec![], 1), Err(DmError::Einval));
        let (r, _) = c.send_msg(s, false, b"hi".to_vec(), 1).unwrap();
        assert_eq!(r, Raised::Queued);
        let (r, _) = c.send_msg(s, true, b"sync".to_vec(), 2).unwrap();
        let Raised::Blocked(t) = r else { panic!() };
        let m = c.get_events(s, 5, None).unwrap().unwrap();
        assert_eq!(
            m[1].data,
            EventData::User {
                data: b"sync".to_vec()
            }
        );
        assert_eq!(
            c.respond(s, t, Response::Continue).unwrap(),
            vec![Output::Answer {
                op: 2,
                response: Response::Continue
            }]
        );
    }

    #[test]
    fn messages_taken_for_a_caller_that_left_are_not_lost() {
        let (mut c, s) = core();
        c.raise(7, EventType::Postcreate, data(b"a"), 1);
        let (r, _) = c.raise(7, EventType::Read, data(b"f"), 2);
        let Raised::Blocked(t) = r else { panic!() };
        let m = c.get_events(s, 5, None).unwrap().unwrap();
        let w = c.waiter();
        assert_eq!(c.get_events(s, 5, Some(w)), Ok(None));
        // the first caller vanished with its messages: back in order, to the next waiter
        let out = c.undeliver(s, m.clone());
        assert_eq!(
            out,
            vec![Output::Events {
                waiter: w,
                session: s,
                messages: m
            }]
        );
        c.respond(s, t, Response::Continue).unwrap();
        // an event that ended meanwhile is not handed out again
        assert!(c.undeliver(s, vec![]).is_empty());
        let (r, _) = c.raise(7, EventType::Read, data(b"g"), 3);
        let Raised::Blocked(t2) = r else { panic!() };
        let m = c.get_events(s, 5, None).unwrap().unwrap();
        c.respond(s, t2, Response::Continue).unwrap();
        c.undeliver(s, m);
        assert_eq!(c.get_events(s, 5, None), Err(DmError::Eagain));
    }

    #[test]
    fn tokens_of_an_earlier_run_are_esrch_and_sessions_come_back() {
        let mut c = Core::new(1000, libc::ETIMEDOUT);
        c.restore_session(5, b"kept".to_vec());
        c.set_token_floor(1 << 20);
        assert_eq!(c.query_session(5).unwrap(), b"kept");
        assert_eq!(c.respond(5, 17, Response::Continue), Err(DmError::Esrch));
        assert_eq!(
            c.respond(5, (1 << 20) + 5, Response::Continue),
            Err(DmError::Einval)
        );
        assert_eq!(
            c.respond(5, INVALID_TOKEN, Response::Continue),
            Err(DmError::Einval)
        );
        assert_eq!(c.create_session(NO_SESSION, b"new").unwrap(), 6);
        c.set_disp(5, 1, EventSet::of(&[EventType::Read])).unwrap();
        match c.raise(1, EventType::Read, data(b"f"), 1).0 {
            Raised::Blocked(t) => assert!(t >= 1 << 20),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn interrupted_operation_cancels_its_event() {
        let (mut c, s) = core();
        let (r, _) = c.raise(7, EventType::Read, data(b"f"), 1);
        let Raised::Blocked(t) = r else { panic!() };
        // not delivered yet: it simply disappears
        c.cancel(t);
        assert_eq!(c.get_events(s, 5, None), Err(DmError::Eagain));
        assert_eq!(c.respond(s, t, Response::Continue), Err(DmError::Esrch));
    }

    #[test]
    fn rights_are_a_readers_writer_lock_per_object() {
        let (mut c, s) = core();
        let tok = |c: &mut Core, op| match c.raise(7, EventType::Read, data(b"f"), op).0 {
            Raised::Blocked(t) => t,
            other => panic!("{other:?}"),
        };
        let (t1, t2) = (tok(&mut c, 1), tok(&mut c, 2));
        assert_eq!(
            c.request_right(s, t1, b"obj", Right::Shared, None),
            Ok(true)
        );
        assert_eq!(
            c.request_right(s, t2, b"obj", Right::Shared, None),
            Ok(true)
        );
        assert_eq!(c.upgrade_right(s, t1, b"obj"), Err(DmError::Eagain));
        assert_eq!(c.release_right(s, t2, b"obj").unwrap(), vec![]);
        assert_eq!(c.upgrade_right(s, t1, b"obj"), Ok(()));
        assert_eq!(c.query_right(s, t1, b"obj"), Ok(Right::Excl));
        assert_eq!(
            c.request_right(s, t2, b"obj", Right::Shared, None),
            Err(DmError::Eagain)
        );
        let w = c.waiter();
        assert_eq!(
            c.request_right(s, t2, b"obj", Right::Shared, Some(w)),
            Ok(false)
        );
        let out = c.downgrade_right(s, t1, b"obj").unwrap();
        assert_eq!(
            out,
            vec![Output::Right {
                waiter: w,
                result: Ok(())
            }]
        );
        assert_eq!(c.query_right(s, t2, b"obj"), Ok(Right::Shared));
        assert_eq!(c.release_right(s, t2, b"nope"), Err(DmError::Eacces));
        assert_eq!(
            c.request_right(s, t2, b"o", Right::Null, None),
            Err(DmError::Einval)
        );
        // a request queued under a token that ends fails with ESRCH
        let t3 = tok(&mut c, 3);
        let w3 = c.waiter();
        assert_eq!(
            c.request_right(s, t3, b"obj", Right::Excl, Some(w3)),
            Ok(false)
        );

        let out = c.respond(s, t3, Response::Continue).unwrap();
        assert!(out.contains(&Output::Right {
            waiter: w3,
            result: Err(DmError::Esrch)
        }));
        // answering the event releases its rights
        c.respond(s, t1, Response::Continue).unwrap();
        c.respond(s, t2, Response::Continue).unwrap();
        assert!(c.locks.is_empty());
        assert_eq!(c.query_right(s, t1, b"obj"), Err(DmError::Esrch));
    }

    #[test]
    fn dispositions_per_filesystem() {
        let (mut c, s) = core();
        let s2 = c.create_session(NO_SESSION, b"b").unwrap();
        c.set_disp(s2, 7, EventSet::of(&[EventType::Read])).unwrap();
        assert_eq!(c.disposed_to(7, EventType::Read), Some(s2));
        assert_eq!(c.disposed_to(7, EventType::Postcreate), Some(s));
        assert_eq!(
            c.getall_disp(s).unwrap(),
            vec![(7, EventSet::of(&[EventType::Postcreate]))]
        );
        assert_eq!(c.getall_disp(77), Err(DmError::Einval));
        assert_eq!(c.set_disp(77, 1, EventSet::empty()), Err(DmError::Einval));
    }
}
