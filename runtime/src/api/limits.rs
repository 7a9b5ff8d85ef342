//! What one local user can take of the daemon through its socket (`[limits]` in the config;
//! see `docs/protocol.md`, "Limits").
//!
//! ```text
//!  accept ─► Limits::admit(uid) ──► refused: error frame, close (log lines rate-limited)
//!                │ ConnSlot (held while the connection lives)
//!                ▼
//!  frame header ─► payload limit of the op ─► Limits::reserve(uid, bytes) ─► read payload
//!                                                 │ Budget (held until the reply is sent)
//!  read / wait ─► Limits::reserve(uid, slot size) ─► serve ─► reply sent ─► given back
//!  place / rebalance ─► Limits::plugin_call(uid) ─► blocking pool
//!                                                 │ PluginPermit (held while the call runs)
//! ```
//!
//! Root and the daemon's own uid ("privileged") are not counted against the connection caps
//! and the total byte budget: an unprivileged user cannot lock the operator out. They keep
//! a per-uid byte budget like everyone (it bounds a runaway root client's memory too).
//!
//! The connection count ([`ConnCount`]) is plain state with no I/O, tested directly.

use crate::config::LimitsConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection or a request was refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The uid has `limit` connections open.
    #[error("too many connections from uid {uid} (limit {limit}, limits.max_connections_per_uid); close some and retry")]
    UidConnections {
        /// The peer's uid.
        uid: u32,
        /// The cap.
        limit: usize,
    },
    /// All unprivileged connections together are at the cap.
    #[error(
        "the daemon has too many connections (limit {limit}, limits.max_connections); retry later"
    )]
    Connections {
        /// The cap.
        limit: usize,
    },
    /// The daemon is out of file descriptors.
    #[error("the daemon is out of file descriptors; retry later")]
    OutOfFds,
    /// A request needs more bytes than a byte budget holds in all.
    #[error("a request of {bytes} bytes is over the in-flight byte limit of {limit} ({setting})")]
    OverBudget {
        /// Bytes asked for.
        bytes: u64,
        /// The budget's size.
        limit: u64,
        /// Which setting.
        setting: &'static str,
    },
    /// The byte budget did not free up in time.
    #[error("uid {uid} has too many request or reply bytes in flight (limits.max_inflight_bytes_per_uid / max_inflight_bytes); retry later")]
    Busy {
        /// The peer's uid.
        uid: u32,
    },
}

/// Open connections per uid: the sans-IO core of the connection caps.
#[derive(Debug, Default)]
pub struct ConnCount {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

impl ConnCount {
    /// A connection from `uid` wants in: counted, or refused.
    pub fn admit(&mut self, uid: u32, privileged: bool, cfg: &LimitsConfig) -> Result<(), Refusal> {
        if privileged {
            return Ok(());
        }
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= cfg.max_connections_per_uid {
            return Err(Refusal::UidConnections {
                uid,
                limit: cfg.max_connections_per_uid,
            });
        }
        if self.total >= cfg.max_connections {
            return Err(Refusal::Connections {
                limit: cfg.max_connections,
            });
        }
        *self.per_uid.entry(uid).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// A connection admitted by [`ConnCount::admit`] closed.
    pub fn release(&mut self, uid: u32, privileged: bool) {
        if privileged {
            return;
        }
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Open connections of `uid` (0 for privileged ones, which are not counted).
    pub fn of(&self, uid: u32) -> usize {
        self.per_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Open unprivileged connections.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// The daemon's limits and what is taken of them now.
#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    own_uid: u32,
    conns: Mutex<ConnCount>,
    bytes_total: Arc<Semaphore>,
    bytes_uid: Mutex<HashMap<u32, Arc<Semaphore>>>,
    calls_total: Arc<Semaphore>,
    calls_uid: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

/// A connection's place under the caps; given back when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<Limits>,
    uid: u32,
    privileged: bool,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.lock_conns().release(self.uid, self.privileged);
    }
}

/// Bytes reserved for a request being read or served; given back when dropped.
#[derive(Debug, Default)]
pub struct Budget {
    _permits: Vec<OwnedSemaphorePermit>,
}

/// A plugin call's turn; given back when dropped.
#[derive(Debug)]
pub struct PluginPermit {
    _uid: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

/// Semaphores count bytes; they take at most `u32::MAX` at once.
fn permits(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Limits {
    /// The limits of `cfg`; `own_uid` is the daemon's uid (privileged like root).
    pub fn new(cfg: LimitsConfig, own_uid: u32) -> Limits {
        Limits {
            bytes_total: Arc::new(Semaphore::new(permits(cfg.max_inflight_bytes) as usize)),
            calls_total: Arc::new(Semaphore::new(cfg.plugin_turns().0)),
            cfg,
            own_uid,
            conns: Mutex::new(ConnCount::default()),
            bytes_uid: Mutex::new(HashMap::new()),
            calls_uid: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    /// Whether `uid` is root or the daemon's own uid.
    pub fn privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own_uid
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, ConnCount> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections of `uid` and of all unprivileged uids.
    pub fn connections(&self, uid: u32) -> (usize, usize) {
        let c = self.lock_conns();
        (c.of(uid), c.total())
    }

    /// A connection from `uid` was accepted: its slot, or why it is refused.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<ConnSlot, Refusal> {
        let privileged = self.privileged(uid);
        self.lock_conns().admit(uid, privileged, &self.cfg)?;
        Ok(ConnSlot {
            limits: self.clone(),
            uid,
            privileged,
        })
    }

    fn uid_semaphore(
        map: &Mutex<HashMap<u32, Arc<Semaphore>>>,
        uid: u32,
        size: usize,
    ) -> Arc<Semaphore> {
        // one entry per uid that ever connected: bounded by the users of the host
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(size)))
            .clone()
    }

    /// Reserve `n` bytes of `uid`'s budget (and of the total, for unprivileged uids),
    /// waiting until `deadline` for them to free up.
    pub async fn reserve(&self, uid: u32, n: u64, deadline: Instant) -> Result<Budget, Refusal> {
        if n == 0 {
            return Ok(Budget::default());
        }
        let per_uid = self.cfg.max_inflight_bytes_per_uid;
        if n > per_uid {
            return Err(Refusal::OverBudget {
                bytes: n,
                limit: per_uid,
                setting: "limits.max_inflight_bytes_per_uid",
            });
        }
        let privileged = self.privileged(uid);
        if !privileged && n > self.cfg.max_inflight_bytes {
            return Err(Refusal::OverBudget {
                bytes: n,
                limit: self.cfg.max_inflight_bytes,
                setting: "limits.max_inflight_bytes",
            });
        }
        let mine = Self::uid_semaphore(&self.bytes_uid, uid, permits(per_uid) as usize);
        let deadline = tokio::time::Instant::from_std(deadline);
        let take = |s: Arc<Semaphore>| async move {
            // fast path first: no timer when the budget is free
            match s.clone().try_acquire_many_owned(permits(n)) {
                Ok(p) => Ok(p),
                Err(_) => match tokio::time::timeout_at(deadline, s.acquire_many_owned(permits(n)))
                    .await
                {
                    Ok(Ok(p)) => Ok(p),
                    _ => Err(Refusal::Busy { uid }),
                },
            }
        };
        let mut held = vec![take(mine).await?];
        if !privileged {
            held.push(take(self.bytes_total.clone()).await?);
        }
        Ok(Budget { _permits: held })
    }

    /// Wait for a turn to run a plugin call for `uid`: at most `plugin_calls_per_uid` of
    /// one uid and `plugin_calls` in all run at once (see
    /// [`LimitsConfig::plugin_turns`]); waiters are served in order.
    pub async fn plugin_call(&self, uid: u32) -> PluginPermit {
        let mine = Self::uid_semaphore(&self.calls_uid, uid, self.cfg.plugin_turns().1);
        // the semaphores are never closed: acquiring cannot fail
        let uid_permit = mine
            .acquire_owned()
            .await
            .expect("plugin call semaphore closed");
        let total = self
            .calls_total
            .clone()
            .acquire_owned()
            .await
            .expect("plugin call semaphore closed");
        PluginPermit {
            _uid: uid_permit,
            _total: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            max_connections: 5,
            max_connections_per_uid: 3,
            max_inflight_bytes: 8 << 20,
            max_inflight_bytes_per_uid: 4 << 20,
            plugin_calls: Some(3),
            plugin_calls_per_uid: Some(2),
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn connection_caps_per_uid_and_in_all_privileged_exempt() {
        let c = cfg();
        let mut n = ConnCount::default();
        for _ in 0..3 {
            n.admit(1000, false, &c).unwrap();
        }
        assert!(matches!(
            n.admit(1000, false, &c),
            Err(Refusal::UidConnections {
                uid: 1000,
                limit: 3
            })
        ));
        n.admit(1001, false, &c).unwrap();
        n.admit(1001, false, &c).unwrap();
        assert!(matches!(
            n.admit(1002, false, &c),
            Err(Refusal::Connections { limit: 5 })
        ));
        // root is never refused by the caps, and not counted
        for _ in 0..100 {
            n.admit(0, true, &c).unwrap();
        }
        assert_eq!(n.total(), 5);
        n.release(1000, false);
        n.admit(1002, false, &c).unwrap();
        assert!(n.admit(1000, false, &c).is_err());
        // releasing what was never admitted does not underflow
        n.release(4242, false);
        assert_eq!(n.total(), 5);
    }

    #[tokio::test]
    async fn byte_budget_waits_then_refuses_and_is_given_back() {
        let l = Arc::new(Limits::new(cfg(), 4242));
        let soon = || Instant::now() + Duration::from_millis(50);
        let a = l.reserve(1000, 3 << 20, soon()).await.unwrap();
        // the uid's budget is taken: the next waits, then is refused
        assert!(matches!(
            l.reserve(1000, 2 << 20, soon()).await,
            Err(Refusal::Busy { uid: 1000 })
        ));
        // another uid has its own budget
        let b = l.reserve(1001, 3 << 20, soon()).await.unwrap();
        // the total (8 MiB) is nearly taken: a third uid waits for it
        assert!(l.reserve(1002, 3 << 20, soon()).await.is_err());
        // root does not count against the total
        let _r = l.reserve(0, 4 << 20, soon()).await.unwrap();
        drop(a);
        let _c = l.reserve(1002, 3 << 20, soon()).await.unwrap();
        drop(b);
        // more than a budget holds in all is refused at once
        assert!(matches!(
            l.reserve(1000, 5 << 20, soon()).await,
            Err(Refusal::OverBudget { .. })
        ));
        assert!(l.reserve(1000, 0, soon()).await.is_ok());
    }

    #[tokio::test]
    async fn one_uid_cannot_take_every_plugin_call() {
        let l = Arc::new(Limits::new(cfg(), 4242));
        let a1 = l.plugin_call(1000).await;
        let _a2 = l.plugin_call(1000).await;
        // a third call of uid 1000 waits although a total permit is free...
        let l2 = l.clone();
        let third = tokio::spawn(async move { l2.plugin_call(1000).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished());
        // ...which another uid gets at once
        let b = tokio::time::timeout(Duration::from_secs(1), l.plugin_call(1001))
            .await
            .expect("another uid is not starved");
        drop(b);
        drop(a1);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("the waiting call runs once a turn frees")
            .unwrap();
    }
}
