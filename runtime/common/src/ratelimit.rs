//! Rate-limited logging of repeated errors: a fault that repeats (a failing `accept`, a flood
//! of refused connections, a plugin that logs in a loop) costs a few lines a second, not one
//! line per occurrence.
//!
//! ```text
//!  occurrence ─► LogLimit::admit(now) ─► Some(suppressed) ─► log it ("... (N more suppressed)")
//!                                    └─► None             ─► counted, not logged
//! ```
//!
//! [`LogLimit`] is a token bucket: `burst` lines at once, then one line every `every`.
//! The core ([`LogLimit::admit_at`]) takes the time as an argument (tested with a fake
//! clock); [`LogLimit::admit`] reads the clock. It is cheap (one uncontended mutex) and can
//! be shared between threads; use one limiter per kind of message.
//!
//! ```
//! use strata_common::ratelimit::LogLimit;
//! use std::time::Duration;
//! static ACCEPT: LogLimit = LogLimit::new(5, Duration::from_secs(1));
//! if let Some(suppressed) = ACCEPT.admit() {
//!     eprintln!("accept failed ({suppressed} similar lines suppressed)");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket for log lines of one kind.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    every: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Lines that may be logged now (in units of `every`, scaled by 1).
    tokens: u32,
    /// When the bucket last gained a token (None: never used).
    refilled: Option<Instant>,
    /// Occurrences not logged since the last logged one.
    suppressed: u64,
}

impl LogLimit {
    /// At most `burst` lines at once, then one per `every`.
    pub const fn new(burst: u32, every: Duration) -> LogLimit {
        LogLimit {
            burst,
            every,
            state: Mutex::new(State {
                tokens: burst,
                refilled: None,
                suppressed: 0,
            }),
        }
    }

    /// One occurrence now: `Some(n)` when it should be logged (`n` occurrences were
    /// suppressed since the last logged one), `None` when it should not.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// One occurrence at `now` (see [`LogLimit::admit`]).
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let since = *s.refilled.get_or_insert(now);
        if !self.every.is_zero() && now > since {
            let gained = (now - since).as_nanos() / self.every.as_nanos().max(1);
            if gained > 0 {
                let gained = u32::try_from(gained).unwrap_or(u32::MAX);
                s.tokens = s.tokens.saturating_add(gained).min(self.burst);
                // keep the remainder: a token every `every`, exactly
                s.refilled = Some(since + self.every * gained.min(1 << 20));
                if s.tokens == self.burst {
                    s.refilled = Some(now);
                }
            }
        }
        if self.every.is_zero() || s.tokens > 0 {
            if !self.every.is_zero() {
                s.tokens -= 1;
            }
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }

    /// Occurrences suppressed since the last logged one.
    pub fn suppressed(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .suppressed
    }
}

/// Log with `tracing` at `level` through a [`LogLimit`]: the line is written only when the
/// limiter admits it, with a `suppressed` field counting the lines left out before it.
///
/// ```
/// use strata_common::{ratelimit::LogLimit, log_limited};
/// use std::time::Duration;
/// static REFUSED: LogLimit = LogLimit::new(3, Duration::from_secs(1));
/// log_limited!(REFUSED, warn, uid = 65534, "connection refused: too many connections");
/// ```
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, $level:ident, $($rest:tt)+) => {
        if let Some(suppressed) = $limit.admit() {
            tracing::$level!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_per_period_counting_the_rest() {
        let l = LogLimit::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        // a burst of three, then nothing for the rest of the second
        assert_eq!(l.admit_at(t0), Some(0));
        assert_eq!(l.admit_at(t0), Some(0));
        assert_eq!(l.admit_at(t0), Some(0));
        for i in 0..1000 {
            assert_eq!(l.admit_at(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(l.suppressed(), 1000);
        // a second later: one more line, reporting the thousand left out
        assert_eq!(l.admit_at(t0 + Duration::from_millis(1001)), Some(1000));
        assert_eq!(l.admit_at(t0 + Duration::from_millis(1002)), None);
        // a flood over 10 s at 100 kHz logs about burst + 10 lines
        let mut logged = 0;
        for i in 0..1_000_000u64 {
            if l.admit_at(t0 + Duration::from_secs(2) + Duration::from_micros(i * 10))
                .is_some()
            {
                logged += 1;
            }
        }
        assert!((10..=14).contains(&logged), "{logged} lines");
        // after a quiet spell the burst is back, not more
        let later = t0 + Duration::from_secs(100);
        let n = (0..10).filter(|_| l.admit_at(later).is_some()).count();
        assert_eq!(n, 3);
    }

    #[test]
    fn zero_period_admits_everything() {
        let l = LogLimit::new(1, Duration::ZERO);
        let t = Instant::now();
        assert!((0..100).all(|_| l.admit_at(t).is_some()));
    }
}
