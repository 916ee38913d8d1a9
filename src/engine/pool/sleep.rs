//! Sleep and wake-up of idle workers.
//!
//! # Protocol
//!
//! An idle worker is in one of three phases: **spinning** (searching the
//! queues with a short backoff, counted in `spinners`), **sleeping** (parked
//! on its own condvar, counted in `sleepers` and listed in `idle`), or
//! **running** (counted in neither).
//!
//! Both counts live in one `AtomicU64` (`spinners` in the low 32 bits,
//! `sleepers` in the high 32 bits) so that a phase change is one atomic step.
//!
//! * **Submitter** (`notify_work`): push the job, then `fence(SeqCst)`, then
//!   read the counts. If a worker is spinning it will find the job: do
//!   nothing. Otherwise, if one sleeps, wake exactly one, among those that
//!   can take shared work now (inside the active pattern, room on its core).
//!   If none can, the work waits for a running worker: it looks for more
//!   work as soon as its job ends and its units are free. A burst of
//!   submissions therefore wakes at most one sleeper: the woken worker is
//!   counted as a spinner at once, which silences the rest of the burst.
//! * **Waker** (`wake_one`): under the `idle` lock pop one sleeper and move
//!   one unit from `sleepers` to `spinners` (the woken worker inherits the
//!   spinning role), then set its slot's `notified` flag and signal it.
//! * **Worker going to sleep** (`sleep`): clear its `notified` flag; under the
//!   `idle` lock list itself and move from `spinners` (if it was spinning) to
//!   `sleepers`; `fence(SeqCst)`; re-check the queues. If work appeared, it
//!   takes itself off the list again (unless a waker already did). Else it
//!   waits until `notified`.
//! * **Chain wake**: a spinner that finds a job leaves the spinning phase and,
//!   if more work is visible, calls `notify_work` itself, so wake-ups spread
//!   one worker at a time while work remains.
//!
//! Why no wake-up is lost: the submitter's push and the sleeper's
//! registration are each followed by a SeqCst fence before the other side's
//! state is read (the store-buffer pattern), so at least one of them sees the
//! other: either the submitter sees the sleeper (and wakes it) or the sleeper
//! sees the job (and does not sleep).
//!
//! Shutdown: `wake_all` pops every sleeper, as `wake_one` does, after the
//! terminate flag is set; a worker checks the flag before it parks.
//!
//! A timed sleep (`sleep_until`, spare workers that retire when idle): when
//! the deadline passes, the worker takes the `idle` lock; if it is still
//! listed it takes itself off (counted as nothing) and times out; if not, a
//! waker already took it off and counted it as a spinner, so it waits for
//! that waker's signal and wakes as any woken worker does.

use std::time::Instant;

use crate::engine::sync::{fence, AtomicU64, Condvar, Mutex, Ordering};

const SPINNER: u64 = 1;
const SLEEPER: u64 = 1 << 32;

fn spinners(counts: u64) -> u64 {
    counts & 0xFFFF_FFFF
}

fn sleepers(counts: u64) -> u64 {
    counts >> 32
}

/// How a sleep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woke {
    /// A waker woke it: it is counted as a spinner.
    Signalled,
    /// It found work before it parked: counted as nothing.
    WorkFound,
    /// Its deadline passed: counted as nothing.
    TimedOut,
}

#[derive(Debug, Default)]
pub(crate) struct Slot {
    notified: Mutex<bool>,
    cv: Condvar,
}

/// Sleep state shared by the workers of one pool.
#[derive(Debug)]
pub(crate) struct Sleep {
    counts: AtomicU64,
    max_spinners: u64,
    idle: Mutex<Vec<usize>>,
    slots: Vec<Slot>,
    wakes: AtomicU64,
}

impl Sleep {
    pub(crate) fn new(workers: usize, max_spinners: usize) -> Self {
        Sleep {
            counts: AtomicU64::new(0),
            max_spinners: max_spinners as u64,
            idle: Mutex::new(Vec::with_capacity(workers)),
            slots: (0..workers).map(|_| Slot::default()).collect(),
            wakes: AtomicU64::new(0),
        }
    }

    /// Enters the spinning phase if fewer than `max_spinners` workers spin.
    pub(crate) fn try_begin_spin(&self) -> bool {
        let mut cur = self.counts.load(Ordering::Relaxed);
        loop {
            if spinners(cur) >= self.max_spinners {
                return false;
            }
            match self.counts.compare_exchange_weak(cur, cur + SPINNER, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Leaves the spinning phase (the worker found a job or is exiting).
    pub(crate) fn end_spin(&self) {
        self.counts.fetch_sub(SPINNER, Ordering::SeqCst);
    }

    /// Called after new work was published: wakes one sleeper that
    /// `can_take` it, if nobody spins. (A worker that could not take the
    /// work, because its core is full or it is outside the active pattern,
    /// would go back to sleep and the wake-up would be lost.)
    #[inline]
    pub(crate) fn notify_work(&self, can_take: impl Fn(usize) -> bool) {
        fence(Ordering::SeqCst);
        let counts = self.counts.load(Ordering::SeqCst);
        if spinners(counts) == 0 && sleepers(counts) > 0 {
            self.wake_one(can_take);
        }
    }

    /// Wakes the most recently parked worker that `can_take` work, handing it the spinning role.
    fn wake_one(&self, can_take: impl Fn(usize) -> bool) {
        let index = {
            let mut idle = self.idle.lock();
            let Some(pos) = idle.iter().rposition(|&i| can_take(i)) else {
                return;
            };
            let index = idle.remove(pos);
            self.counts.fetch_sub(SLEEPER - SPINNER, Ordering::SeqCst);
            index
        };
        self.signal(index);
    }

    /// Wakes worker `index` if it sleeps (a job was pinned to it). If it is
    /// not listed as sleeping it is running or searching and will see its
    /// inbox; the inbox push and the sleeper's registration are ordered by
    /// the `idle` lock, so the check cannot miss a worker about to park.
    pub(crate) fn wake_worker(&self, index: usize) {
        fence(Ordering::SeqCst);
        let found = {
            let mut idle = self.idle.lock();
            match idle.iter().position(|&i| i == index) {
                Some(pos) => {
                    idle.swap_remove(pos);
                    self.counts.fetch_sub(SLEEPER - SPINNER, Ordering::SeqCst);
                    true
                }
                None => false,
            }
        };
        if found {
            self.signal(index);
        }
    }

    /// Wakes every sleeping worker (a pattern change: they re-check their role).
    pub(crate) fn wake_all_idle(&self) {
        self.wake_all();
    }

    /// Wakes every sleeping worker (shutdown).
    pub(crate) fn wake_all(&self) {
        let woken: Vec<usize> = {
            let mut idle = self.idle.lock();
            let n = idle.len() as u64;
            self.counts.fetch_sub(n * (SLEEPER - SPINNER), Ordering::SeqCst);
            idle.drain(..).collect()
        };
        for index in woken {
            self.signal(index);
        }
    }

    fn signal(&self, index: usize) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[index];
        let mut notified = slot.notified.lock();
        *notified = true;
        slot.cv.notify_one();
    }

    /// Parks worker `index` until woken. `was_spinning` says whether it is
    /// counted as a spinner now. `work_available` is re-checked after the
    /// worker is registered as a sleeper.
    ///
    /// Returns true when a waker woke it (it is now counted as a spinner),
    /// false when it found work before parking (it is counted as nothing).
    pub(crate) fn sleep(&self, index: usize, was_spinning: bool, work_available: impl Fn() -> bool) -> bool {
        self.sleep_until(index, was_spinning, work_available, None) == Woke::Signalled
    }

    /// `sleep`, up to `deadline` (see the protocol).
    pub(crate) fn sleep_until(
        &self,
        index: usize,
        was_spinning: bool,
        work_available: impl Fn() -> bool,
        deadline: Option<Instant>,
    ) -> Woke {
        let slot = &self.slots[index];
        *slot.notified.lock() = false;
        {
            let mut idle = self.idle.lock();
            idle.push(index);
            let delta = if was_spinning { SLEEPER - SPINNER } else { SLEEPER };
            self.counts.fetch_add(delta, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        if work_available() {
            let mut idle = self.idle.lock();
            if self.unlist(&mut idle, index) {
                return Woke::WorkFound;
            }
            // A waker already took us off the list and made us a spinner;
            // fall through to consume its signal.
        }
        let mut notified = slot.notified.lock();
        while !*notified {
            match deadline {
                None => slot.cv.wait(&mut notified),
                Some(d) => {
                    if slot.cv.wait_until(&mut notified, d).timed_out() && !*notified {
                        drop(notified);
                        if self.unlist(&mut self.idle.lock(), index) {
                            return Woke::TimedOut;
                        }
                        // Taken off by a waker: its signal is on the way.
                        notified = slot.notified.lock();
                        while !*notified {
                            slot.cv.wait(&mut notified);
                        }
                    }
                }
            }
        }
        Woke::Signalled
    }

    /// Takes `index` off the sleepers' list if it is still there (counted as nothing then).
    fn unlist(&self, idle: &mut Vec<usize>, index: usize) -> bool {
        match idle.iter().position(|&i| i == index) {
            Some(pos) => {
                idle.swap_remove(pos);
                self.counts.fetch_sub(SLEEPER, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Number of signals sent to sleeping workers so far.
    pub(crate) fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// (spinning, sleeping) workers right now.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let c = self.counts.load(Ordering::Relaxed);
        (spinners(c), sleepers(c))
    }
}
