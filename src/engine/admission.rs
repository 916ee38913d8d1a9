//! Bounded admission: a counting limit that callers acquire before a token
//! exists and release when it resolves.
//!
//! # Protocol
//!
//! * `in_use` counts admitted, unresolved tokens. `try_acquire` CASes it up
//!   if it is below `limit` (`0` means unlimited: no CAS loop, just a count).
//! * `release` decrements it and, if anyone waits (`waiters > 0`, read
//!   after the decrement with SeqCst), takes the lock and signals one waiter.
//! * `acquire(timeout)` tries, then registers in `waiters` under the lock,
//!   re-tries (so a release between the try and the registration is not
//!   missed) and waits on the condvar until it succeeds or times out.
//! * The limit may change at any time (`set_limit`); waiters are woken to
//!   re-check.
//! * `waiters` counts callers inside one `acquire`; a caller that waits in
//!   short steps (to poll for signals between them) holds a `Blocked` guard
//!   for its whole wait, so `waiting()` does not drop to 0 between steps.

use std::time::{Duration, Instant};

use crate::engine::sync::{AtomicUsize, Condvar, Mutex, Ordering};

/// A counting admission limit.
#[derive(Debug, Default)]
pub struct Limit {
    limit: AtomicUsize,
    in_use: AtomicUsize,
    waiters: AtomicUsize,
    blocked: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    rejected: AtomicUsize,
    peak: AtomicUsize,
}

impl Limit {
    /// A limit of `limit` (0: unlimited).
    pub fn new(limit: usize) -> Self {
        let l = Limit::default();
        l.limit.store(limit, Ordering::Relaxed);
        l
    }

    /// The configured limit (0: unlimited).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit and wakes waiters to re-check.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::SeqCst);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    /// Admitted and not yet released.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Highest `in_use` seen.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Callers currently blocked: in `acquire`, or between the steps of a
    /// wait they hold a `Blocked` guard for.
    pub fn waiting(&self) -> usize {
        self.waiters.load(Ordering::Relaxed).max(self.blocked.load(Ordering::Relaxed))
    }

    /// Counts the caller as blocked until the guard is dropped (a wait made
    /// of several `acquire` steps).
    pub fn block(&self) -> Blocked<'_> {
        self.blocked.fetch_add(1, Ordering::Relaxed);
        Blocked(self)
    }

    /// Times an acquire gave up (full, or timed out).
    pub fn rejected(&self) -> usize {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Takes a slot if one is free.
    #[inline]
    pub fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::SeqCst);
        if limit == 0 {
            // Unlimited: just count (one RMW, no CAS loop).
            let now = self.in_use.fetch_add(1, Ordering::SeqCst) + 1;
            self.note_peak(now);
            return true;
        }
        let mut cur = self.in_use.load(Ordering::SeqCst);
        loop {
            if cur >= limit {
                return false;
            }
            match self.in_use.compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.note_peak(cur + 1);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    #[inline]
    fn note_peak(&self, now: usize) {
        // A read first: the peak line is written only when it moves.
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Takes a slot even when the limit is reached (for work that already
    /// exists and only needs counting, like an external lane's token).
    pub fn force_acquire(&self) {
        let now = self.in_use.fetch_add(1, Ordering::SeqCst) + 1;
        self.note_peak(now);
    }

    /// Counts a rejection (the caller gave up).
    pub fn note_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a slot, waiting up to `timeout` (None: forever). Returns true
    /// when a slot was taken. Callers that must poll for signals pass short
    /// timeouts and call again.
    pub fn acquire(&self, timeout: Option<Duration>) -> bool {
        if self.try_acquire() {
            return true;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.lock.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let ok = loop {
            if self.try_acquire() {
                break true;
            }
            match deadline {
                Some(d) => {
                    if Instant::now() >= d {
                        break false;
                    }
                    self.cv.wait_until(&mut g, d);
                }
                None => self.cv.wait(&mut g),
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    /// Gives a slot back and wakes one waiter.
    #[inline]
    pub fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock();
            self.cv.notify_one();
        }
    }
}

/// A caller blocked on a `Limit` for as long as it lives (`Limit::block`).
#[derive(Debug)]
pub struct Blocked<'a>(&'a Limit);

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.0.blocked.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn unlimited_never_blocks() {
        let l = Limit::new(0);
        for _ in 0..1000 {
            assert!(l.try_acquire());
        }
        assert_eq!(l.in_use(), 1000);
    }

    #[test]
    fn a_caller_waiting_in_steps_stays_counted_between_them() {
        let l = Limit::new(1);
        assert!(l.try_acquire());
        let blocked = l.block();
        assert!(!l.acquire(Some(Duration::from_millis(5))));
        assert_eq!(l.waiting(), 1, "counted between two acquire steps");
        drop(blocked);
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn full_limit_rejects_then_admits_after_release() {
        let l = Limit::new(2);
        assert!(l.try_acquire() && l.try_acquire());
        assert!(!l.try_acquire());
        assert!(!l.acquire(Some(Duration::from_millis(20))));
        l.release();
        assert!(l.try_acquire());
    }

    #[test]
    fn blocked_acquire_wakes_on_release_and_limit_holds() {
        let l = Arc::new(Limit::new(3));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        assert!(l.acquire(Some(Duration::from_secs(10))));
                        assert!(l.in_use() <= 3);
                        l.release();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.in_use(), 0);
        assert!(l.peak() <= 3);
    }
}
