//! A bounded pool of threads for work that may block: FUSE operations that may wait for a
//! DM application's answer, and page-cache invalidations. Threads are started as work
//! comes (up to `max_threads`) and leave after `IDLE` without work; at most `max_queued`
//! jobs wait for a thread. Beyond that a job is refused and handed back, so that the
//! caller answers it with an errno instead of the daemon growing without bound.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long an idle thread waits for work before it leaves.
const IDLE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

struct Inner {
    name: String,
    max_threads: usize,
    max_queued: usize,
    state: Mutex<State>,
    work: Condvar,
}

/// The pool (cheap to clone).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Counters of a pool, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLoad {
    /// Threads alive.
    pub threads: usize,
    /// Of them, waiting for work.
    pub idle: usize,
    /// Jobs waiting for a thread.
    pub queued: usize,
}

impl Pool {
    /// A pool of at most `max_threads` threads (named `name`) and `max_queued` waiting jobs.
    pub fn new(name: &str, max_threads: usize, max_queued: usize) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                name: name.to_string(),
                max_threads: max_threads.max(1),
                max_queued,
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    threads: 0,
                    idle: 0,
                }),
                work: Condvar::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `job` on a thread of the pool, or hand it back when the pool is full (every
    /// thread busy and `max_queued` jobs waiting) or no thread can be started.
    pub fn submit<F: FnOnce() + Send + 'static>(&self, job: F) -> Result<(), F> {
        let mut st = self.state();
        let waiting = st.queue.len();
        if st.idle > waiting {
            st.queue.push_back(Box::new(job));
            drop(st);
            self.inner.work.notify_one();
            return Ok(());
        }
        if st.threads < self.inner.max_threads {
            st.threads += 1;
            drop(st);
            let pool = self.clone();
            let started = std::thread::Builder::new()
                .name(self.inner.name.clone())
                .spawn(move || pool.serve());
            let mut st = self.state();
            if started.is_err() {
                st.threads -= 1;
                // no thread would ever take it: hand it back (its reply answers EIO)
                if st.threads == 0 || st.idle == 0 || st.queue.len() >= self.inner.max_queued {
                    return Err(job);
                }
            }
            st.queue.push_back(Box::new(job));
            drop(st);
            self.inner.work.notify_one();
            return Ok(());
        }
        if waiting >= self.inner.max_queued {
            return Err(job);
        }
        st.queue.push_back(Box::new(job));
        drop(st);
        self.inner.work.notify_one();
        Ok(())
    }

    /// What the pool holds now.
    pub fn load(&self) -> PoolLoad {
        let st = self.state();
        PoolLoad {
            threads: st.threads,
            idle: st.idle,
            queued: st.queue.len(),
        }
    }

    fn serve(&self) {
        let mut st = self.state();
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                // a panicking job must not take the thread's count with it
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                st = self.state();
                continue;
            }
            st.idle += 1;
            let (next, timeout) = self
                .inner
                .work
                .wait_timeout(st, IDLE)
                .unwrap_or_else(|p| p.into_inner());
            st = next;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() {
                st.threads -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn threads_and_queue_are_bounded_and_a_full_pool_hands_the_job_back() {
        let pool = Pool::new("test-pool", 2, 3);
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let done = Arc::new(AtomicUsize::new(0));
        let mut refused = 0;
        for i in 0..10 {
            let (gate, done) = (gate.clone(), done.clone());
            let job = move || {
                let _ = gate.lock().unwrap().recv();
                done.fetch_add(1, Ordering::SeqCst);
            };
            if pool.submit(job).is_err() {
                refused += 1;
            }
            if i == 1 {
                // both threads have taken their job
                let t0 = std::time::Instant::now();
                while pool.load().queued > 0 && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // 2 running (one holds the gate's lock, one waits for it) + 3 queued
        assert_eq!(refused, 5);
        let l = pool.load();
        assert_eq!(l.threads, 2);
        assert!(l.queued <= 3, "{l:?}");
        for _ in 0..5 {
            release.send(()).unwrap();
        }
        let t0 = std::time::Instant::now();
        while done.load(Ordering::SeqCst) < 5 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(done.load(Ordering::SeqCst), 5);
        // once drained, work is taken again
        let (tx, rx) = mpsc::channel();
        pool.submit(move || tx.send(7).unwrap()).ok().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 7);
        assert!(pool.load().threads <= 2);
    }

    #[test]
    fn a_panicking_job_does_not_lose_a_thread() {
        let pool = Pool::new("test-pool", 1, 10);
        pool.submit(|| panic!("job panics")).ok().unwrap();
        let (tx, rx) = mpsc::channel();
        pool.submit(move || tx.send(1).unwrap()).ok().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
        assert_eq!(pool.load().threads, 1);
    }
}
