//! One worker at a time while jobs wait for the GIL.
//!
//! Under the GIL one thread runs Python at a time. When the running jobs need
//! the interpreter more than anything else (pure-Python CPU work), every job
//! beyond the first only waits for the GIL, and CPython hands it round among
//! the waiting threads: each waiter asks for it after a switch interval of its
//! own, so k waiters switch about k times as often, and each switch moves the
//! interpreter to another core. Measured on the proof's waves (2 cores, 8,192
//! pure-Python tokens, against a plain loop): 0.97-1.01x with one worker,
//! 0.89-0.92x with two, 0.85-0.90x with the default eight.
//!
//! # Protocol
//!
//! * Every `GIL_SAMPLE` while two or more workers run a job, the blocking
//!   monitor reads their kernel state (`monitor.rs`); one found waiting for
//!   the GIL, at any age of its job, turns the pool's GIL-bound mode on
//!   (`Shared::gil_bound`). It goes off once none was found for `GIL_QUIET`.
//! * While it is on, a worker takes no new shared work
//!   (`Shared::holds_back_for_gil`) when another worker runs a job, unless
//!   some core has lent units (work that blocks is about, and threads are what
//!   it needs) or the pool terminates. It parks; its inbox still runs. The
//!   workers that run a job go on with the queue as each job ends, so the
//!   workers drop to one that runs the queued jobs back to back, and nothing
//!   is left without a taker.
//! * When the mode goes off, the monitor wakes a held-back worker
//!   (`notify_work`) if work is queued, and looks closely again: jobs that
//!   release the GIL (I/O, hashing of large buffers, NumPy) get their threads
//!   back within `GIL_QUIET`, and GIL-bound ones turn the mode on again within
//!   a few ticks. A loan and new submissions wake workers as before.
//! * Without a GIL the mode stays off: the monitor samples only when the
//!   interpreter has one (`PoolConfig::gil_window`).

use super::job::Job;
use super::shared::Shared;
use crate::engine::sync::Ordering;

/// How often the monitor samples the running workers for a GIL wait.
#[cfg(all(target_os = "linux", not(loom)))]
const GIL_SAMPLE: std::time::Duration = std::time::Duration::from_millis(4);
/// The GIL-bound mode ends once no worker was found waiting for the GIL for this long.
#[cfg(all(target_os = "linux", not(loom)))]
const GIL_QUIET: std::time::Duration = std::time::Duration::from_millis(50);

impl<J: Job> Shared<J> {
    /// Whether worker `index` starts no new shared job now: the jobs that run
    /// wait for the GIL, and a new one would only wait beside them.
    pub(super) fn holds_back_for_gil(&self, index: usize) -> bool {
        self.gil_bound.load(Ordering::Relaxed)
            && !self.terminate.load(Ordering::Relaxed)
            && self.cores.iter().all(|c| c.lent() == 0)
            && self.runs.iter().enumerate().any(|(i, r)| i != index && r.load().state == super::blocking::RUNNING)
    }
}

/// The monitor's side of the GIL-bound mode.
#[cfg(all(target_os = "linux", not(loom)))]
#[derive(Debug)]
pub(super) struct GilWatch {
    sampled: std::time::Instant,
    last_wait: Option<std::time::Instant>,
}

#[cfg(all(target_os = "linux", not(loom)))]
impl Default for GilWatch {
    fn default() -> Self {
        GilWatch { sampled: std::time::Instant::now(), last_wait: None }
    }
}

#[cfg(all(target_os = "linux", not(loom)))]
impl GilWatch {
    /// Whether a sample is due (then it counts as taken).
    pub(super) fn sample_due(&mut self) -> bool {
        let due = self.sampled.elapsed() >= GIL_SAMPLE;
        if due {
            self.sampled = std::time::Instant::now();
        }
        due
    }

    /// After a sample (`contended`: a running worker waited for the GIL); true
    /// when the mode went off and a held-back worker was woken.
    pub(super) fn after_sample<J: Job>(&mut self, shared: &Shared<J>, contended: bool) -> bool {
        if contended {
            self.last_wait = Some(std::time::Instant::now());
            shared.gil_bound.store(true, Ordering::Relaxed);
            return false;
        }
        match self.last_wait {
            Some(at) if at.elapsed() >= GIL_QUIET => {
                self.last_wait = None;
                shared.gil_bound.store(false, Ordering::Relaxed);
                if shared.has_work() {
                    shared.notify_work();
                }
                true
            }
            _ => false,
        }
    }
}
