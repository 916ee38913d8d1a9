//! `EngineShared`: one running engine (its pool, I/O lane, timer and books),
//! shared by its `Engine` object, the registry, its workers and its tokens'
//! waiters.
//!
//! # Stop protocol (`EngineShared::stop`)
//!
//! 1. The caller takes the engine out of the registry (`registry::deactivate`:
//!    new calls fail with `NotStartedError`, or go to another running
//!    engine); `stop` marks the engine stopping.
//! 2. `cancel_pending`: take the jobs that did not start out of the run queues
//!    (`take_unstarted`) and resolve their tokens as cancelled.
//! 3. `wait`: wait, detached, until every submitted token has resolved (or
//!    the timeout passes).
//! 4. Shut the pool down and join the workers (detached, so running tasks
//!    can finish).
//! 5. Anything still queued (a submit that raced step 1, or a timeout) is
//!    resolved as cancelled.
//!
//! Tokens held by a pause (`pause_admission`, `pause_operation`) are
//! cancelled by step 2 or 3 (a pause would otherwise hold them forever).
//!
//! # Dispatch
//!
//! Every job reaches the pool through `EngineShared::dispatch`: a job is
//! parked (state `waiting`) while admission or its operation is paused, goes
//! to the priority heap when its priority is not 0, and to the FIFO
//! injector otherwise. Workers park a queued job whose pause began after it
//! was queued. Resuming re-dispatches what was parked, in order.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::detached::wait_detached;
use super::exceptions::BindError;
use super::token::{cancel_jobs, LaneKind, Ledger, OpState, PyJob, TokenInner};
use crate::engine::io_lane::Lane;
use crate::engine::pool::{Pool, Topology};
use crate::engine::routing::{DomainTable, StickyTable};
use crate::engine::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use crate::engine::timer::Timer;
use crate::engine::token::TokenState;

/// What the engine's timer thread wakes up for.
#[derive(Debug)]
pub(crate) enum TimerItem {
    /// A token's deadline.
    Deadline(Weak<TokenInner>),
    /// A failed token's next attempt.
    Retry(PyJob),
    /// The adaptive pattern's periodic decision.
    Converge,
}

/// The adaptive worker pattern (the original's convergence engine, applied).
///
/// Every `interval` it looks at the queue-wait p95 of tokens that started
/// since the last look, the queue depth and the utilisation of the active
/// workers, and picks how many workers per core take shared work: all of
/// them (`workers_per_core`, 4 by default) under pressure (p95 wait over 1 s,
/// queue deeper than twice the active workers, or utilisation over 80 %),
/// one level fewer (down to `workers_per_core - 2`) when utilisation is under
/// 40 % with an empty queue, else unchanged. Between looks, a queue that grows
/// past the active workers restores the full pattern at once (the pool does
/// this on submit), so a burst after a quiet spell is not throttled.
#[derive(Debug)]
pub(crate) struct Convergence {
    pub(crate) enabled: AtomicBool,
    pub(crate) interval: Duration,
    pub(crate) decisions: AtomicU64,
    pub(crate) last: Mutex<Option<(f64, usize, f64, u32)>>,
    pub(crate) last_look_ns: AtomicU64,
    /// Looks taken so far.
    pub(crate) looks: AtomicU64,
    /// Whether a `Converge` item is pending (one chain of looks at a time).
    pub(crate) armed: AtomicBool,
}

/// A running engine, shared by its `Engine` object, the registry and the workers.
#[derive(Debug)]
pub(crate) struct EngineShared {
    pub(crate) pool: Pool<PyJob>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) stopping: AtomicBool,
    /// Set once nothing is left to stop or join (`release_threads` ran, or
    /// `stop` joined every thread).
    pub(crate) released: AtomicBool,
    /// The process that started the engine (see `in_forked_child`).
    pub(crate) pid: u32,
    pub(crate) topology: Topology,
    pub(crate) workers_per_core: usize,
    pub(crate) timer: Timer<TimerItem>,
    pub(crate) sticky: Arc<StickyTable>,
    pub(crate) domains: Arc<DomainTable>,
    /// The elastic I/O lane (`storage_speed` tokens), one tier per storage speed.
    pub(crate) io: Lane<PyJob>,
    pub(crate) convergence: Convergence,
}

/// Worker threads of engines dropped before their workers were joined;
/// joined at interpreter exit (a worker needs the interpreter to exit cleanly).
static UNJOINED: Mutex<Vec<Unjoined>> = Mutex::new(Vec::new());

/// Threads of a dropped engine, to join at interpreter exit.
#[derive(Debug)]
pub(crate) enum Unjoined {
    Worker(std::thread::JoinHandle<()>),
    Lane(crate::engine::io_lane::LaneJoiner),
}

impl EngineShared {
    /// Tells every thread of the engine to exit (workers and the I/O lane
    /// finish what is queued first; the timer drops what it holds, so a
    /// retry waiting in it resolves cancelled) and leaves their handles in
    /// `UNJOINED` for the join at interpreter exit. Runs once, from whichever
    /// comes first: the `Engine` dropped without `stop()`, or the last handle
    /// dropped. (A thread's engine cache can hold a handle long after the
    /// `Engine` is gone: until that thread next submits, or exits. The
    /// threads must not wait for that.)
    pub(crate) fn release_threads(&self) {
        if self.in_forked_child() || self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        self.pool.shutdown();
        self.io.shutdown();
        drop(self.timer.shutdown(Duration::ZERO));
        let mut unjoined = UNJOINED.lock();
        unjoined.extend(self.pool.take_handles().into_iter().map(Unjoined::Worker));
        unjoined.push(Unjoined::Lane(self.io.joiner()));
    }

    /// True in a process forked after this engine started: its threads
    /// exist only in the parent, and any lock of the engine (or of the
    /// registry, or parking_lot's own table) may have been held by one of
    /// them at the fork, so the child must touch none.
    pub(crate) fn in_forked_child(&self) -> bool {
        std::process::id() != self.pid
    }
}

impl Drop for EngineShared {
    fn drop(&mut self) {
        self.release_threads();
    }
}

impl EngineShared {
    /// True once `stop` began.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sends a job towards a worker (see "Dispatch" in the module docs).
    pub(crate) fn dispatch(&self, py: Python<'_>, mut job: PyJob) -> Result<(), BindError> {
        // The job's own handle on its token is borrowed throughout (no extra count).
        let op_paused = |job: &PyJob| job.token().op().paused.load(Ordering::SeqCst);
        if self.is_stopping() && (self.ledger.admission_paused.load(Ordering::SeqCst) || op_paused(&job)) {
            // A pause would hold it past the stop: refuse it instead.
            job.forget_call();
            job.token().resolve(py, |_| true, TokenState::Cancelled, None);
            return Err(BindError::ShutDown);
        }
        if self.ledger.admission_paused.load(Ordering::Relaxed) {
            let mut parked = self.ledger.parked.lock();
            if self.ledger.admission_paused.load(Ordering::SeqCst) {
                job.token().cell.hold();
                parked.push_back(job);
                return Ok(());
            }
        }
        if job.token().op().paused.load(Ordering::Relaxed) {
            let op = job.token().op().clone();
            let mut parked = op.parked.lock();
            if op.paused.load(Ordering::SeqCst) {
                job.token().cell.hold();
                parked.push_back(job);
                return Ok(());
            }
        }
        let token = job.token();
        token.cell.admit();
        let (lane, pinned, priority) = (token.lane, token.pinned(), token.priority);
        if let LaneKind::Outside(index) = lane {
            return self.push_outside(py, usize::from(index), job);
        }
        if let LaneKind::Io(tier) = lane {
            return match self.io.submit(usize::from(tier), job) {
                Ok(()) => Ok(()),
                Err(mut job) => {
                    job.forget_call();
                    job.token().resolve(py, |_| true, TokenState::Cancelled, None);
                    Err(BindError::ShutDown)
                }
            };
        }
        let submitted = match pinned {
            Some(worker) => self.pool.submit_to(worker, job),
            None if priority != 0 => self.pool.submit_prioritized(job, priority),
            None => self.pool.submit(job),
        };
        if let Err((err, mut job)) = submitted {
            job.forget_call();
            job.token().resolve(py, |_| true, TokenState::Cancelled, None);
            return Err(err.into());
        }
        Ok(())
    }

    /// Queues a job on outside lane `index`, in priority order with aging
    /// (the same key as the pool's priority queues).
    fn push_outside(&self, py: Python<'_>, index: usize, job: PyJob) -> Result<(), BindError> {
        let lane = self.ledger.outside.get(index).expect("a token names an outside lane of its engine");
        let token = job.token();
        let aging = i64::try_from(self.pool.aging().as_nanos()).unwrap_or(i64::MAX);
        let now = i64::try_from(crate::engine::token::now_ns()).unwrap_or(i64::MAX);
        let key = token.priority.saturating_mul(aging).saturating_sub(now);
        let id = token.id;
        match lane.push(key, id, job) {
            Ok(()) => Ok(()),
            Err(mut job) => {
                job.forget_call();
                job.token().resolve(py, |_| true, TokenState::Cancelled, None);
                Err(BindError::ShutDown)
            }
        }
    }

    /// Re-dispatches parked jobs (after a resume).
    pub(crate) fn release_parked(&self, py: Python<'_>, jobs: VecDeque<PyJob>) -> usize {
        let mut n = 0;
        for job in jobs {
            if job.token().cell.is_done() {
                continue; // cancelled or killed while parked
            }
            if self.dispatch(py, job).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Arms the deadline of `token` (its `deadline_ns` is set).
    pub(crate) fn schedule_deadline(&self, token: &Arc<TokenInner>, after: Duration) {
        if let Some(at) = Instant::now().checked_add(after) {
            let _ = self.timer.schedule(at, TimerItem::Deadline(Arc::downgrade(token)));
        }
    }

    /// Queues another attempt of a failed token after `after`.
    pub(crate) fn schedule_retry(&self, py: Python<'_>, job: PyJob, after: Duration) {
        if let Err(TimerItem::Retry(mut job)) = self.timer.schedule(Instant::now() + after, TimerItem::Retry(job)) {
            job.forget_call();
            job.token().resolve(py, |_| true, TokenState::Cancelled, None);
        }
    }

    pub(crate) fn on_timer(self: &Arc<Self>, py: Python<'_>, items: Vec<TimerItem>) {
        for item in items {
            match item {
                TimerItem::Deadline(token) => {
                    if let Some(token) = token.upgrade() {
                        token.expire(py);
                    }
                }
                TimerItem::Converge => {
                    self.convergence.armed.store(false, Ordering::SeqCst);
                    if !self.is_stopping() && self.convergence.enabled.load(Ordering::Relaxed) {
                        self.converge();
                        self.arm_convergence();
                    }
                }
                TimerItem::Retry(mut job) => {
                    if job.token().cell.is_done() {
                        job.forget_call(); // cancelled or killed while it waited
                    } else {
                        let _ = self.dispatch(py, job);
                    }
                }
            }
        }
    }

    /// Schedules the adaptive pattern's next look, unless one is pending or
    /// the engine stops. (Turning the pattern off ends the chain at its next
    /// look; turning it on again starts a new one.)
    pub(crate) fn arm_convergence(&self) {
        let conv = &self.convergence;
        if self.is_stopping() || conv.armed.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.timer.schedule(Instant::now() + conv.interval, TimerItem::Converge).is_err() {
            conv.armed.store(false, Ordering::SeqCst);
        }
    }

    /// One decision of the adaptive pattern (see `Convergence`).
    pub(crate) fn converge(&self) {
        let conv = &self.convergence;
        conv.looks.fetch_add(1, Ordering::Relaxed);
        let max = u32::try_from(self.workers_per_core).unwrap_or(u32::MAX).max(1);
        let floor = max.saturating_sub(2).max(1);
        let current = self.pool.active_per_core().min(max);
        let since = conv.last_look_ns.swap(crate::engine::token::now_ns(), Ordering::Relaxed);
        let mut waits: Vec<u64> = self
            .ledger
            .history()
            .iter()
            .filter_map(|r| r.started_ns.filter(|&s| s >= since).map(|s| s.saturating_sub(r.created_ns)))
            .collect();
        waits.sort_unstable();
        let p95 = waits.get(waits.len().saturating_sub(1).min(waits.len() * 95 / 100)).map_or(0.0, |&w| w as f64 / 1e9);
        let stats = self.pool.stats();
        let depth = stats.queued_global + stats.deferred;
        let active_workers = (current as usize * stats.core_units.len()).max(1);
        let utilization = self.ledger.running() as f64 / active_workers as f64;
        let next = if p95 > 1.0 || depth > 2 * active_workers || utilization > 0.8 {
            max
        } else if utilization < 0.4 && depth == 0 {
            current.saturating_sub(1).max(floor)
        } else {
            current
        };
        if next != current {
            self.pool.set_active_per_core(next);
            conv.decisions.fetch_add(1, Ordering::Relaxed);
        }
        *conv.last.lock() = Some((p95, depth, utilization, next));
    }

    /// Cancels every live token that has not started and is in no queue
    /// (waiting for a retry, for input tokens, or held by a pause); returns how many.
    pub(crate) fn cancel_unstarted(&self, py: Python<'_>) -> usize {
        self.ledger.live_tokens(None).iter().filter(|t| t.cancel_pending(py)).count()
    }

    /// Sets the cooperative cancel flag of every running token (its body sees
    /// `current_token().cancel_requested`); returns how many.
    pub(crate) fn request_cancel_running(&self) -> usize {
        let running = self.ledger.live_tokens(None).into_iter().filter(|t| t.cell.state() == TokenState::Executing);
        running.map(|t| t.cell.request_cancel()).count()
    }

    /// Cancels every job held by a pause; returns how many.
    pub(crate) fn cancel_parked(&self, py: Python<'_>, op: Option<&OpState>) -> usize {
        let mut jobs: Vec<PyJob> = Vec::new();
        match op {
            Some(op) => jobs.extend(op.parked.lock().drain(..)),
            None => {
                jobs.extend(self.ledger.parked.lock().drain(..));
                for op in self.ledger.ops() {
                    jobs.extend(op.parked.lock().drain(..));
                }
            }
        }
        let jobs: Vec<PyJob> = jobs.into_iter().filter(|j| !j.token().cell.is_done()).collect();
        cancel_jobs(py, jobs)
    }

    pub(crate) fn stop(&self, py: Python<'_>, wait: bool, cancel_pending: bool, timeout: Option<Duration>) -> PyResult<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        self.ledger.stopping.store(true, Ordering::SeqCst);
        if !self.stopping.swap(true, Ordering::SeqCst) {
            super::lifecycle::engine_stopped();
            super::log::info(py, "pool", || format!("stopping engine {} (wait={wait}, cancel_pending={cancel_pending})", self.pool.id()));
        }
        self.cancel_parked(py, None);
        if cancel_pending {
            cancel_jobs(py, self.pool.take_unstarted());
            cancel_jobs(py, self.io.take_unstarted());
            for lane in self.ledger.outside.all() {
                cancel_jobs(py, lane.take_unstarted());
            }
            self.cancel_unstarted(py);
            self.request_cancel_running();
        }
        if wait {
            let ledger = &self.ledger;
            let settled = wait_detached(py, remaining(), |step| {
                let until = Instant::now() + step;
                loop {
                    if ledger.unresolved() == 0 {
                        return true;
                    }
                    if Instant::now() >= until {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            })?;
            if !settled {
                // The timeout passed: bodies still running are asked to stop.
                self.request_cancel_running();
            }
        }
        self.pool.shutdown();
        self.io.shutdown();
        let joined = if wait {
            let pool = &self.pool;
            let io = &self.io;
            let limit = remaining();
            py.detach(|| pool.join(limit) && io.join(remaining()))
        } else {
            false
        };
        let timer = &self.timer;
        let leftovers = py.detach(|| timer.shutdown(Duration::from_secs(2)));
        if joined {
            // Every thread has exited and been joined: nothing for `release_threads` to hand on.
            self.released.store(true, Ordering::SeqCst);
        }
        for item in leftovers {
            if let TimerItem::Retry(job) = item {
                cancel_jobs(py, vec![job]);
            }
        }
        if wait || cancel_pending {
            // What is still queued now raced the stop (or outlived the
            // timeout): nobody will run it. With wait=False the workers
            // still drain the queues (as ThreadPoolExecutor.shutdown(wait=False)
            // does); anything left when the engine is dropped is cancelled then.
            cancel_jobs(py, self.pool.take_unstarted());
            cancel_jobs(py, self.io.take_unstarted());
        }
        self.cancel_parked(py, None);
        Ok(joined)
    }
}

/// Takes the threads of dropped engines, to join them at interpreter exit.
pub(crate) fn take_unjoined() -> Vec<Unjoined> {
    std::mem::take(&mut *UNJOINED.lock())
}
