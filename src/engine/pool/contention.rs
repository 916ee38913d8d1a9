//! Fewer workers while short jobs wait for the GIL.
//!
//! Under the GIL one thread runs Python at a time. When the running jobs need
//! the interpreter more than anything else (pure-Python CPU work), every job
//! beyond the first only waits for the GIL, and CPython hands it round among
//! the waiting threads: each waiter asks for it after a switch interval of its
//! own, so k waiters switch about k times as often, and each switch moves the
//! interpreter to another core. Measured on 8,192 of the proof's wave tokens
//! (2 cores, pure Python, against a plain loop) before this mode existed:
//! 0.97-1.01x with one worker, 0.89-0.92x with two, 0.82-0.90x with the
//! default eight.
//!
//! # Protocol
//!
//! * At each monitor tick (1 to 16 ms apart, see `blocking.rs`), at most
//!   every `GIL_SAMPLE`, while two or more workers run a job, the monitor
//!   reads their kernel state (`monitor.rs`); one found waiting for the GIL,
//!   at any age of its job, turns the pool's GIL-bound mode on
//!   (`Shared::gil_bound`). It goes off once none was found for `GIL_QUIET`.
//! * The monitor names a runner: a running worker it found on a CPU
//!   (`Shared::gil_runner`), kept while it runs a young job. While the
//!   mode is on, every other worker takes no new shared work
//!   (`Shared::holds_back_for_gil`) while the runner runs a job that began
//!   less than `GIL_YOUNG` ago (a runner whose job blocked, its units lent,
//!   holds no one back), unless a job waits in the deferred queue (it goes
//!   first, wherever it fits) or the pool terminates. Jobs blocked elsewhere
//!   with their units lent do not end the mode: each has its own thread, and
//!   the CPU-bound jobs beside them still only wait for the GIL (measured: 200
//!   sleeps with pure-Python jobs queued behind them, 0.74-0.80x a plain loop
//!   when lent units turned the mode off).
//!   A held-back worker parks (its inbox still runs). Workers in the middle of
//!   a job finish it, then hold back; the runner goes on with the queue, so
//!   with short jobs one worker runs the queue back to back. The check is a
//!   few loads (one while the mode is off): it runs for every job a worker
//!   looks for.
//! * With one runner the monitor finds no GIL wait. So once none was found
//!   for `GIL_QUIET`, the monitor lets one more worker run beside the runner
//!   (a probe: `Shared::gil_probe`, an idle worker it names and wakes). A GIL
//!   wait found while the two run keeps the mode on, and the probe holds back
//!   again after its job; none found within `GIL_PROBE` ends the mode. (When
//!   the mode simply ended after `GIL_QUIET`, every worker came back and the
//!   next find turned it on again: an on/off cycle of 50-70 ms in which all
//!   the workers woke, queued on the GIL and parked again, about 800 context
//!   switches a second on the proof's waves; a probe wakes one.)
//! * A job that runs longer than `GIL_YOUNG` holds no one back: behind a
//!   long job the queue waits at most `GIL_YOUNG` plus a monitor tick, and a
//!   job that waits for queued work (a loop polling a flag another token
//!   sets) cannot hang the pool.
//! * At each sample while the mode is on, and when it goes off, the monitor
//!   wakes a worker that may take work (`notify_work`: held back no more,
//!   since its runner's job grew old or the mode ended) if work is queued; when
//!   the mode goes off it also ticks fast again. So jobs that release
//!   the GIL (I/O, hashing of large buffers, NumPy) get their threads back
//!   within `GIL_QUIET` plus a tick, and GIL-bound ones turn the mode on again
//!   within a few ticks. Neither a loan nor a submission wakes a held-back
//!   worker (a loan of the runner's own job ends the hold-back, and its wake
//!   goes through).
//! * Until then, jobs that release the GIL and run beside young GIL-bound
//!   ones run one at a time: the price of the mode for mixed work.
//! * `began` is stamped only where the monitor samples (`gil_window` set):
//!   elsewhere the mode never turns on and the stamp is never read.
//! * Without a GIL the mode stays off: the monitor samples only when the
//!   interpreter has one (`PoolConfig::gil_window`).

use super::blocking::{IDLE, RUNNING};
use super::job::Job;
use super::shared::Shared;
use crate::engine::sync::Ordering;

/// A job that began less than this long ago holds new work back in the GIL-bound mode.
const GIL_YOUNG_NS: u64 = 20_000_000;
/// The monitor samples the running workers for a GIL wait at most this often.
#[cfg(all(target_os = "linux", not(loom)))]
const GIL_SAMPLE: std::time::Duration = std::time::Duration::from_millis(4);
/// Once no worker was found waiting for the GIL for this long, a probe runs beside the runner.
#[cfg(all(target_os = "linux", not(loom)))]
const GIL_QUIET: std::time::Duration = std::time::Duration::from_millis(50);
/// The mode ends when no GIL wait is found this long after a probe began (a few samples).
#[cfg(all(target_os = "linux", not(loom)))]
const GIL_PROBE: std::time::Duration = std::time::Duration::from_millis(20);

impl<J: Job> Shared<J> {
    /// Whether worker `index` starts no new shared job now: the jobs that run
    /// wait for the GIL, and another worker's short job will end soon, its
    /// worker then taking the next one.
    pub(super) fn holds_back_for_gil(&self, index: usize) -> bool {
        if !self.gil_bound.load(Ordering::Relaxed) {
            return false;
        }
        // The probe runs beside the runner (and with it, not every idle worker is held back).
        let probe = self.gil_probe.load(Ordering::Relaxed);
        if probe != usize::MAX && (index == probe || index == usize::MAX) {
            return false;
        }
        let runner = self.gil_runner.load(Ordering::Relaxed);
        let Some(cell) = self.runs.get(runner).filter(|_| runner != index) else {
            return false;
        };
        if self.terminate.load(Ordering::Relaxed) || self.deferred_len.load(Ordering::SeqCst) > 0 {
            return false;
        }
        cell.load().state == RUNNING && young(cell.began_ns())
    }
}

/// Whether a job that began at `began_ns` (`token::now_ns`) is young: it holds workers back.
fn young(began_ns: u64) -> bool {
    crate::engine::token::now_ns().saturating_sub(began_ns) < GIL_YOUNG_NS
}

/// The monitor's side of the GIL-bound mode.
#[cfg(all(target_os = "linux", not(loom)))]
#[derive(Debug)]
pub(super) struct GilWatch {
    sampled: std::time::Instant,
    last_wait: Option<std::time::Instant>,
    /// When the probe running now began.
    probing: Option<std::time::Instant>,
}

#[cfg(all(target_os = "linux", not(loom)))]
impl Default for GilWatch {
    fn default() -> Self {
        GilWatch { sampled: std::time::Instant::now(), last_wait: None, probing: None }
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

    /// After a sample (`contended`: a running worker waited for the GIL;
    /// `candidate`: a running worker found on a CPU, else any running one);
    /// true when the mode went off. The runner stays the same while it runs a
    /// young job. While the mode is on, and when it goes off, a held-back worker that
    /// may take work now (the runner's job grew old) is woken if work is queued.
    pub(super) fn after_sample<J: Job>(&mut self, shared: &Shared<J>, contended: bool, candidate: Option<usize>) -> bool {
        let mut ended = false;
        if contended || self.last_wait.is_some() {
            // Kept while it runs a young job: a runner in a long job holds no one back,
            // and the short jobs beside it need a runner of their own.
            let runner = shared.gil_runner.load(Ordering::Relaxed);
            let keep = shared.runs.get(runner).is_some_and(|r| r.load().state == RUNNING && young(r.began_ns()));
            if let (false, Some(c)) = (keep, candidate) {
                shared.gil_runner.store(c, Ordering::Relaxed);
            }
        }
        if contended {
            self.last_wait = Some(std::time::Instant::now());
            self.probing = None; // a probe found the GIL contended: it holds back after its job
            shared.gil_probe.store(usize::MAX, Ordering::Relaxed);
            shared.gil_bound.store(true, Ordering::Relaxed);
        } else if self.last_wait.is_some_and(|at| at.elapsed() >= GIL_QUIET) {
            let probe = match self.probing {
                None => probe_candidate(shared),
                Some(_) => None,
            };
            if let Some(p) = probe {
                self.probing = Some(std::time::Instant::now());
                shared.gil_probe.store(p, Ordering::Relaxed);
            } else if self.probing.is_none_or(|at| at.elapsed() >= GIL_PROBE) {
                self.last_wait = None;
                self.probing = None;
                shared.gil_probe.store(usize::MAX, Ordering::Relaxed);
                shared.gil_bound.store(false, Ordering::Relaxed);
                shared.gil_runner.store(usize::MAX, Ordering::Relaxed);
                ended = true;
            }
        }
        if (ended || self.last_wait.is_some()) && shared.queued_jobs() > 0 {
            shared.notify_work();
        }
        ended
    }
}

/// A worker to probe the GIL beside the runner: one of the pool's own (not a spare), in
/// the active pattern, idle (a lent one is inside its own blocked job, and no wake-up
/// reaches it). None when there is none (then the mode ends).
#[cfg(all(target_os = "linux", not(loom)))]
fn probe_candidate<J: Job>(shared: &Shared<J>) -> Option<usize> {
    let runner = shared.gil_runner.load(Ordering::Relaxed);
    (0..shared.config.workers).find(|&i| i != runner && shared.is_active(i) && shared.runs[i].load().state == IDLE)
}
