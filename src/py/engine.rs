//! `Engine`: one running pool of Python-attached workers, and the registry
//! of running engines that decorated calls submit to.
//!
//! # Registry
//!
//! `ACTIVE` lists running engines, newest last. A decorated call submits to
//! the engine whose worker runs it (nested calls stay on their engine), else
//! to the newest active engine. Each thread caches its answer and revalidates
//! it against `GENERATION`, which every start and stop bumps, so the hot path
//! takes no lock.
//!
//! # Stop protocol (`Engine.stop`)
//!
//! 1. Leave `ACTIVE` (new calls fail with `NotStartedError`, or go to another
//!    running engine) and mark the engine stopping.
//! 2. `cancel_pending`: drain the run queues and resolve those tokens as cancelled.
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
//!
//! # Fork and interpreter exit
//!
//! `after_fork_in_child` (registered with `os.register_at_fork`) marks the
//! process as forked when engines were running: every later use raises
//! `ForkedProcessError` before touching a lock that another parent thread
//! may have held at the fork. An engine dropped in the child (at its exit,
//! say) is leaked untouched, for the same reason (`in_forked_child`).
//! `begin_interpreter_shutdown` (registered with `threading._register_atexit`,
//! so it runs before threads are joined) refuses new work and stops every
//! engine, running what was queued.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::exceptions::BindError;
use super::job::{cancel_jobs, IoHost, PyHost, PyJob};
use super::ledger::{Health, Ledger, OpState, Record};
use super::routing::{DomainTable, StickyTable};
use super::token::LaneKind;
use super::token::TokenInner;
use super::wait::{seconds_arg, timeout_arg, wait_detached};
use crate::lane::Lane;
use crate::metrics::Outcome;
use crate::pool::{Pool, PoolConfig, Topology};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use crate::timer::Timer;
use crate::token::{ns_to_unix, TokenState};

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
    enabled: AtomicBool,
    interval: Duration,
    decisions: AtomicU64,
    last: Mutex<Option<(f64, usize, f64, u32)>>,
    last_look_ns: AtomicU64,
    /// Looks taken so far.
    looks: AtomicU64,
    /// Whether a `Converge` item is pending (one chain of looks at a time).
    armed: AtomicBool,
}

/// A running engine, shared by its `Engine` object, the registry and the workers.
#[derive(Debug)]
pub(crate) struct EngineShared {
    pub(crate) pool: Pool<PyJob>,
    pub(crate) ledger: Arc<Ledger>,
    stopping: AtomicBool,
    /// Set once nothing is left to stop or join (`release_threads` ran, or
    /// `stop` joined every thread).
    released: AtomicBool,
    /// The process that started the engine (see `in_forked_child`).
    pid: u32,
    topology: Topology,
    workers_per_core: usize,
    timer: Timer<TimerItem>,
    pub(crate) sticky: Arc<StickyTable>,
    pub(crate) domains: Arc<DomainTable>,
    /// The elastic I/O lane (`storage_speed` tokens), one tier per storage speed.
    pub(crate) io: Lane<PyJob>,
    convergence: Convergence,
}

/// Storage tiers of the I/O lane, in order (the `storage_speed` tag values).
pub(crate) const STORAGE_TIERS: [&str; 4] = ["SLOW", "MODERATE", "FAST", "INSANE"];

static ACTIVE: Mutex<Vec<Arc<EngineShared>>> = Mutex::new(Vec::new());
/// Every engine whose workers may still run (running, or stopped without joining).
static ALL: Mutex<Vec<Weak<EngineShared>>> = Mutex::new(Vec::new());
/// Worker threads of engines dropped before their workers were joined;
/// joined at interpreter exit (a worker needs the interpreter to exit cleanly).
static UNJOINED: Mutex<Vec<Unjoined>> = Mutex::new(Vec::new());

/// Threads of a dropped engine, to join at interpreter exit.
#[derive(Debug)]
enum Unjoined {
    Worker(std::thread::JoinHandle<()>),
    Lane(crate::lane::LaneJoiner),
}

impl Engine {
    pub(crate) fn shared(&self) -> &Arc<EngineShared> {
        &self.shared
    }
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
    fn release_threads(&self) {
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
    fn in_forked_child(&self) -> bool {
        std::process::id() != self.pid
    }
}

impl Drop for EngineShared {
    fn drop(&mut self) {
        self.release_threads();
    }
}
static GENERATION: AtomicU64 = AtomicU64::new(1);
static LIVE_ENGINES: AtomicUsize = AtomicUsize::new(0);
static FORKED: AtomicBool = AtomicBool::new(false);
static EXITING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static CACHED: RefCell<(u64, Option<Arc<EngineShared>>)> = const { RefCell::new((0, None)) };
}

/// Err(ForkedProcessError) in a child forked from a process with running engines.
pub(crate) fn check_not_forked() -> Result<(), BindError> {
    if FORKED.load(Ordering::Relaxed) {
        Err(BindError::Forked)
    } else {
        Ok(())
    }
}

fn lookup() -> Option<Arc<EngineShared>> {
    if let Some((pool_id, _)) = crate::pool::current_worker() {
        let active = ACTIVE.lock();
        if let Some(e) = active.iter().find(|e| e.pool.id() == pool_id) {
            return Some(e.clone());
        }
        return active.last().cloned();
    }
    ACTIVE.lock().last().cloned()
}

/// The engine a decorated call made on this thread submits to (a counted
/// handle; the hot path borrows it through `with_current_engine`).
pub(crate) fn current_engine() -> Result<Arc<EngineShared>, BindError> {
    with_current_engine(Arc::clone)
}

/// Runs `f` with the engine a decorated call made on this thread submits to,
/// borrowed from the thread's cache (no reference count taken per call). A
/// call nested inside `f` on the same thread works too (it reads the cache,
/// or looks the engine up when the cache is stale).
pub(crate) fn with_current_engine<R>(f: impl FnOnce(&Arc<EngineShared>) -> R) -> Result<R, BindError> {
    check_not_forked()?;
    if EXITING.load(Ordering::Relaxed) {
        return Err(BindError::InterpreterShutdown);
    }
    let generation = GENERATION.load(Ordering::Acquire);
    CACHED.with(|cache| {
        if let Ok(mut c) = cache.try_borrow_mut() {
            if c.0 != generation {
                *c = (generation, lookup());
            }
        }
        match cache.try_borrow() {
            Ok(c) if c.0 == generation => c.1.as_ref().map(f).ok_or(BindError::NotStarted),
            _ => lookup().as_ref().map(f).ok_or(BindError::NotStarted),
        }
    })
}

fn activate(engine: &Arc<EngineShared>) {
    ACTIVE.lock().push(engine.clone());
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

fn deactivate(engine: &EngineShared) {
    ACTIVE.lock().retain(|e| !std::ptr::eq(Arc::as_ptr(e), engine));
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // This thread's cache lets go of the engine now (another thread's, when
    // it next submits or exits). Generation 0 is never current.
    let _ = CACHED.try_with(|cache| {
        if let Ok(mut c) = cache.try_borrow_mut() {
            *c = (0, None);
        }
    });
}

/// A running pool of workers. Made by `OperationsCoordinator.start()`.
#[pyclass(frozen, name = "Engine", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct Engine {
    shared: Arc<EngineShared>,
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
                job.token().core.hold();
                parked.push_back(job);
                return Ok(());
            }
        }
        if job.token().op().paused.load(Ordering::Relaxed) {
            let op = job.token().op().clone();
            let mut parked = op.parked.lock();
            if op.paused.load(Ordering::SeqCst) {
                job.token().core.hold();
                parked.push_back(job);
                return Ok(());
            }
        }
        let token = job.token();
        token.core.admit();
        let (lane, pinned, priority) = (token.lane, token.pinned, token.priority);
        if let LaneKind::Io(tier) = lane {
            return match self.io.submit(tier, job) {
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

    /// Re-dispatches parked jobs (after a resume).
    fn release_parked(&self, py: Python<'_>, jobs: VecDeque<PyJob>) -> usize {
        let mut n = 0;
        for job in jobs {
            if job.token().core.is_done() {
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

    fn on_timer(self: &Arc<Self>, py: Python<'_>, items: Vec<TimerItem>) {
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
                    if job.token().core.is_done() {
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
    fn arm_convergence(&self) {
        let conv = &self.convergence;
        if self.is_stopping() || conv.armed.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.timer.schedule(Instant::now() + conv.interval, TimerItem::Converge).is_err() {
            conv.armed.store(false, Ordering::SeqCst);
        }
    }

    /// One decision of the adaptive pattern (see `Convergence`).
    fn converge(&self) {
        let conv = &self.convergence;
        conv.looks.fetch_add(1, Ordering::Relaxed);
        let max = u32::try_from(self.workers_per_core).unwrap_or(u32::MAX).max(1);
        let floor = max.saturating_sub(2).max(1);
        let current = self.pool.active_per_core().min(max);
        let since = conv.last_look_ns.swap(crate::token::now_ns(), Ordering::Relaxed);
        let mut waits: Vec<u64> = self
            .ledger
            .history()
            .iter()
            .filter_map(|r| r.started_ns.filter(|&s| s >= since).map(|s| s.saturating_sub(r.created_ns)))
            .collect();
        waits.sort_unstable();
        let p95 = waits.get(waits.len().saturating_sub(1).min(waits.len() * 95 / 100)).map_or(0.0, |&w| w as f64 / 1e9);
        let stats = self.pool.stats();
        let depth = stats.queued_global + stats.queued_local.iter().sum::<usize>() + stats.deferred;
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
    fn cancel_unstarted(&self, py: Python<'_>) -> usize {
        self.ledger.live_tokens(None).iter().filter(|t| t.cancel_pending(py)).count()
    }

    /// Sets the cooperative cancel flag of every running token (its body sees
    /// `current_token().cancel_requested`); returns how many.
    fn request_cancel_running(&self) -> usize {
        let running = self.ledger.live_tokens(None).into_iter().filter(|t| t.core.state() == TokenState::Executing);
        running.map(|t| t.core.request_cancel()).count()
    }

    /// Cancels every job held by a pause; returns how many.
    fn cancel_parked(&self, py: Python<'_>, op: Option<&OpState>) -> usize {
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
        let jobs: Vec<PyJob> = jobs.into_iter().filter(|j| !j.token().core.is_done()).collect();
        cancel_jobs(py, jobs)
    }

    fn stop(&self, py: Python<'_>, wait: bool, cancel_pending: bool, timeout: Option<Duration>) -> PyResult<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        deactivate(self);
        self.ledger.stopping.store(true, Ordering::SeqCst);
        if !self.stopping.swap(true, Ordering::SeqCst) {
            LIVE_ENGINES.fetch_sub(1, Ordering::SeqCst);
            super::log::info(py, "pool", || format!("stopping engine {} (wait={wait}, cancel_pending={cancel_pending})", self.pool.id()));
        }
        self.cancel_parked(py, None);
        if cancel_pending {
            cancel_jobs(py, self.pool.drain());
            cancel_jobs(py, self.io.drain());
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
            cancel_jobs(py, self.pool.drain());
            cancel_jobs(py, self.io.drain());
        }
        self.cancel_parked(py, None);
        Ok(joined)
    }
}

impl Engine {
    /// The engine, if it still accepts work.
    pub(crate) fn shared_for_submit(&self) -> Result<Arc<EngineShared>, BindError> {
        check_not_forked()?;
        if EXITING.load(Ordering::Relaxed) {
            return Err(BindError::InterpreterShutdown);
        }
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(BindError::ShutDown);
        }
        Ok(self.shared.clone())
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (workers, *, workers_per_core, pin_cores=true, stack_size=0, thread_name="tokengate-worker",
                        max_pending=0, history_size=100, auto_block=false, aging=0.5, register=true,
                        storage_limits=None, io_idle_timeout=5.0, convergence=true, convergence_interval=5.0,
                        caller_runs=true, blocking_monitor=true, gil_window=None, spare_threads=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        workers: usize,
        workers_per_core: usize,
        pin_cores: bool,
        stack_size: usize,
        thread_name: &str,
        max_pending: usize,
        history_size: usize,
        auto_block: bool,
        aging: f64,
        register: bool,
        storage_limits: Option<Vec<usize>>,
        io_idle_timeout: f64,
        convergence: bool,
        convergence_interval: f64,
        caller_runs: bool,
        blocking_monitor: bool,
        gil_window: Option<(usize, usize)>,
        spare_threads: usize,
    ) -> PyResult<Self> {
        // Every duration is checked before anything starts.
        let aging = seconds_arg("aging", aging)?;
        let io_idle_timeout = seconds_arg("io_idle_timeout", io_idle_timeout)?;
        let convergence_interval = seconds_arg("convergence_interval", convergence_interval)?;
        let limits = storage_limits.unwrap_or_else(|| vec![10, 25, 50, 70]);
        if limits.len() != STORAGE_TIERS.len() || limits.contains(&0) {
            return Err(BindError::Value(format!(
                "storage_limits must give a positive limit for each of {STORAGE_TIERS:?}, got {limits:?}"
            ))
            .into());
        }
        check_not_forked()?;
        if EXITING.load(Ordering::Relaxed) {
            return Err(BindError::InterpreterShutdown.into());
        }
        let mut config = PoolConfig::new(workers);
        config.pin_cores = pin_cores;
        config.stack_size = stack_size;
        config.thread_name = thread_name.to_owned();
        config.aging = aging;
        let topology = Topology::detect();
        config.cores = topology.logical_cores.min(workers).max(1);
        config.units_per_core = u32::try_from(workers_per_core).unwrap_or(u32::MAX).max(1);
        config.blocking_monitor = blocking_monitor;
        config.gil_window = gil_window;
        config.spare_threads = spare_threads;
        let host = Arc::new(PyHost::default());
        let pool = py.detach(|| Pool::start(&config, host.clone())).map_err(BindError::from)?;
        let me: Arc<OnceLock<Weak<EngineShared>>> = Arc::new(OnceLock::new());
        let me_for_timer = me.clone();
        let timer = Timer::new(format!("{thread_name}-timer"), move |items: Vec<TimerItem>| {
            let engine = me_for_timer.get().and_then(Weak::upgrade);
            let unhandled = Python::try_attach(|py| match &engine {
                Some(engine) => engine.on_timer(py, items),
                None => drop(items),
            });
            let _ = unhandled;
        });
        let io_host = Arc::new(IoHost::default());
        let io = Lane::new(format!("{thread_name}-io"), &limits, limits.iter().sum(), io_idle_timeout, stack_size, io_host.clone());
        let workers_total = pool.workers();
        let shared = Arc::new(EngineShared {
            sticky: Arc::new(StickyTable::new(workers_total)),
            domains: Arc::new(DomainTable::default()),
            io,
            convergence: Convergence {
                enabled: AtomicBool::new(convergence),
                interval: convergence_interval,
                decisions: AtomicU64::new(0),
                last: Mutex::new(None),
                last_look_ns: AtomicU64::new(crate::token::now_ns()),
                looks: AtomicU64::new(0),
                armed: AtomicBool::new(false),
            },
            pool,
            ledger: Arc::new(Ledger::new(max_pending, history_size, auto_block, caller_runs)),
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
            pid: std::process::id(),
            topology,
            workers_per_core,
            timer,
        });
        let _ = me.set(Arc::downgrade(&shared));
        let _ = host.engine.set(Arc::downgrade(&shared));
        let _ = io_host.engine.set(Arc::downgrade(&shared));
        LIVE_ENGINES.fetch_add(1, Ordering::SeqCst);
        {
            let mut all = ALL.lock();
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&shared));
        }
        if register {
            activate(&shared);
        }
        if convergence {
            shared.arm_convergence();
        }
        super::log::info(py, "pool", || format!("engine {} started with {workers} workers", shared.pool.id()));
        Ok(Engine { shared })
    }

    /// Stops the engine; see the module docs. Returns True when every worker exited.
    #[pyo3(signature = (wait=true, cancel_pending=false, timeout=None))]
    fn stop(&self, py: Python<'_>, wait: bool, cancel_pending: bool, timeout: Option<f64>) -> PyResult<bool> {
        if FORKED.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // A worker of this engine, or a caller running one of its tokens (`job::run_on_caller`).
        let inside = crate::pool::current_worker().is_some_and(|(id, _)| id == self.shared.pool.id())
            || super::job::running_token().is_some_and(|t| Arc::ptr_eq(t.ledger(), &self.shared.ledger));
        if wait && inside {
            return Err(BindError::Runtime(
                "cannot stop a coordinator with wait=True from inside one of its own tasks (it would wait for itself); \
                 use stop(wait=False)"
                    .into(),
            )
            .into());
        }
        let timeout = timeout_arg(timeout)?;
        self.shared.stop(py, wait, cancel_pending, timeout)
    }

    /// Cancels every token still queued; returns how many.
    fn drain(&self, py: Python<'_>) -> PyResult<usize> {
        check_not_forked()?;
        Ok(cancel_jobs(py, self.shared.pool.drain()))
    }

    #[getter]
    fn running(&self) -> bool {
        !self.shared.stopping.load(Ordering::SeqCst) && !FORKED.load(Ordering::Relaxed)
    }

    #[getter]
    fn pool_id(&self) -> u64 {
        self.shared.pool.id()
    }

    /// Topology, worker and token counters as a dict (schema in the stub).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        check_not_forked()?;
        let sh = &self.shared;
        let lg = &sh.ledger;
        let out = PyDict::new(py);

        let topo = PyDict::new(py);
        topo.set_item("physical_cores", sh.topology.physical_cores)?;
        topo.set_item("logical_cores", sh.topology.logical_cores)?;
        topo.set_item("workers_per_core", sh.workers_per_core)?;
        topo.set_item("total_workers", sh.pool.workers())?;
        topo.set_item("pinned_cores", sh.pool.pinned_cores())?;
        out.set_item("topology", topo)?;

        let tokens = PyDict::new(py);
        let (submitted, outcomes) = lg.totals();
        tokens.set_item("submitted", submitted)?;
        tokens.set_item("unresolved", submitted.saturating_sub(outcomes.iter().sum()))?;
        let in_processes = lg.process_running.load(Ordering::Relaxed).max(0) as u64;
        tokens.set_item("executing", lg.running() + in_processes)?;
        for state in TokenState::ALL.iter().filter(|s| s.is_terminal()) {
            tokens.set_item(state.as_str(), outcomes[Outcome::of(*state) as usize])?;
        }
        tokens.set_item("retries", lg.retries.load(Ordering::Relaxed))?;
        out.set_item("tokens", tokens)?;

        let p = sh.pool.stats();
        let pool = PyDict::new(py);
        pool.set_item("workers", p.workers)?;
        pool.set_item("alive", p.alive)?;
        pool.set_item("spinning", p.spinning)?;
        pool.set_item("sleeping", p.sleeping)?;
        pool.set_item("queued", p.queued_global + p.queued_local.iter().sum::<usize>())?;
        pool.set_item("queued_global", p.queued_global)?;
        pool.set_item("queued_local", p.queued_local)?;
        pool.set_item("wakes", p.wakes)?;
        pool.set_item("panics", p.panics)?;
        pool.set_item("core_units", p.core_units)?;
        pool.set_item("core_heavy", p.core_heavy)?;
        pool.set_item("heavy_peak", p.heavy_peak)?;
        pool.set_item("blocked", p.lent)?;
        pool.set_item("lends", p.lends)?;
        pool.set_item("spares", p.spares)?;
        pool.set_item("spares_peak", p.spares_peak)?;
        pool.set_item("draining_cores", p.draining)?;
        pool.set_item("deferred", p.deferred)?;
        pool.set_item("inbox", p.inbox)?;
        pool.set_item("core_slots", sh.pool.core_slots())?;
        pool.set_item("active_per_core", sh.pool.active_per_core().min(sh.workers_per_core as u32))?;
        out.set_item("pool", pool)?;

        let admission = PyDict::new(py);
        admission.set_item("paused", lg.admission_paused.load(Ordering::Relaxed))?;
        admission.set_item("max_pending", (lg.pending.limit() != 0).then(|| lg.pending.limit()))?;
        admission.set_item("pending", lg.pending.in_use())?;
        admission.set_item("peak_pending", lg.pending.peak())?;
        admission.set_item("blocked_callers", lg.pending.waiting())?;
        admission.set_item("rejected", lg.pending.rejected())?;
        admission.set_item("parked", lg.parked.lock().iter().filter(|j| !j.token().core.is_done()).count())?;
        out.set_item("admission", admission)?;

        let timeouts = PyDict::new(py);
        timeouts.set_item("armed", sh.timer.len())?;
        timeouts.set_item("expired_queued", lg.timeouts_queued.load(Ordering::Relaxed))?;
        timeouts.set_item("expired_running", lg.timeouts_running.load(Ordering::Relaxed))?;
        timeouts.set_item("overruns", lg.overruns.load(Ordering::Relaxed))?;
        timeouts.set_item("overrun_total_s", lg.overrun_total_ns.load(Ordering::Relaxed) as f64 / 1e9)?;
        timeouts.set_item("overrun_max_s", lg.overrun_max_ns.load(Ordering::Relaxed) as f64 / 1e9)?;
        out.set_item("timeouts", timeouts)?;

        let io = sh.io.stats();
        let lane = PyDict::new(py);
        lane.set_item("threads", io.threads)?;
        lane.set_item("idle_threads", io.idle)?;
        lane.set_item("threads_started", io.spawned)?;
        let tiers = PyDict::new(py);
        for (name, t) in STORAGE_TIERS.iter().zip(io.tiers.iter()) {
            let d = PyDict::new(py);
            d.set_item("limit", t.limit)?;
            d.set_item("running", t.running)?;
            d.set_item("peak", t.peak)?;
            d.set_item("queued", t.queued)?;
            tiers.set_item(*name, d)?;
        }
        lane.set_item("tiers", tiers)?;
        let lanes = PyDict::new(py);
        lanes.set_item("io", lane)?;
        out.set_item("lanes", lanes)?;

        let conv = PyDict::new(py);
        conv.set_item("enabled", sh.convergence.enabled.load(Ordering::Relaxed))?;
        conv.set_item("interval_s", sh.convergence.interval.as_secs_f64())?;
        conv.set_item("pattern", sh.pool.active_per_core().min(sh.workers_per_core as u32))?;
        conv.set_item("decisions", sh.convergence.decisions.load(Ordering::Relaxed))?;
        conv.set_item("looks", sh.convergence.looks.load(Ordering::Relaxed))?;
        if let Some((p95, depth, util, decision)) = *sh.convergence.last.lock() {
            let last = PyDict::new(py);
            last.set_item("queue_wait_p95_s", p95)?;
            last.set_item("queue_depth", depth)?;
            last.set_item("utilization", util)?;
            last.set_item("pattern", decision)?;
            conv.set_item("last", last)?;
        }
        out.set_item("convergence", conv)?;

        let routing = PyDict::new(py);
        routing.set_item("sticky_keys", sh.sticky.snapshot().len())?;
        routing.set_item("domains", sh.domains.snapshot().len())?;
        out.set_item("routing", routing)?;

        let ops = PyDict::new(py);
        for op in lg.ops() {
            let d = PyDict::new(py);
            d.set_item("pending", op.limit.in_use())?;
            d.set_item("max_pending", (op.limit.limit() != 0).then(|| op.limit.limit()))?;
            d.set_item("peak_pending", op.limit.peak())?;
            d.set_item("rejected", op.limit.rejected())?;
            d.set_item("paused", op.paused.load(Ordering::Relaxed))?;
            d.set_item("parked", op.parked.lock().iter().filter(|j| !j.token().core.is_done()).count())?;
            d.set_item("blocked", op.blocked.load(Ordering::Relaxed))?;
            d.set_item("health", health_dict(py, &op)?)?;
            ops.set_item(&*op.name, d)?;
        }
        out.set_item("operations", ops)?;
        Ok(out)
    }

    /// The newest `limit` execution records, newest first.
    #[pyo3(signature = (limit=50))]
    fn recent_executions<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyList>> {
        records_list(py, &self.shared.ledger, self.shared.ledger.recent(limit))
    }

    /// Every execution record kept, oldest first.
    fn execution_history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        records_list(py, &self.shared.ledger, self.shared.ledger.history())
    }

    // -- control plane ---------------------------------------------------------

    /// The process lane's count of live worker processes (for the metrics).
    fn _note_process_workers(&self, n: u64) {
        self.shared.ledger.process_workers.store(n, Ordering::Relaxed);
    }

    /// `(admission paused, names of paused operations)`: what the process lane
    /// reads before it sends tokens out (far cheaper than `stats()`).
    fn pause_state(&self) -> (bool, Vec<String>) {
        let lg = &self.shared.ledger;
        let ops = lg.ops().iter().filter(|op| op.paused.load(Ordering::SeqCst)).map(|op| op.name.to_string()).collect();
        (lg.admission_paused.load(Ordering::SeqCst), ops)
    }

    /// No queued token starts (and new ones wait) until `resume_admission`.
    /// Returns how many unstarted tokens it holds back now.
    fn pause_admission(&self) -> usize {
        let lg = &self.shared.ledger;
        {
            let _parked = lg.parked.lock();
            lg.admission_paused.store(true, Ordering::SeqCst);
        }
        lg.live_tokens(None).iter().filter(|t| t.core.state().is_pending()).count()
    }

    /// Lets held tokens go; returns how many were released.
    fn resume_admission(&self, py: Python<'_>) -> usize {
        let lg = &self.shared.ledger;
        let jobs = {
            let mut parked = lg.parked.lock();
            lg.admission_paused.store(false, Ordering::SeqCst);
            std::mem::take(&mut *parked)
        };
        self.shared.release_parked(py, jobs)
    }

    /// Tokens of `op` wait (others flow) until `resume_operation`. Returns
    /// how many unstarted tokens of `op` it holds back now.
    fn pause_operation(&self, op: &str) -> usize {
        let state = self.shared.ledger.op(op);
        {
            let _parked = state.parked.lock();
            state.paused.store(true, Ordering::SeqCst);
        }
        self.shared.ledger.live_tokens(Some(op)).iter().filter(|t| t.core.state().is_pending()).count()
    }

    /// Releases the tokens of `op` held by `pause_operation`; returns how many.
    fn resume_operation(&self, py: Python<'_>, op: &str) -> usize {
        let Some(state) = self.shared.ledger.find_op(op) else {
            return 0;
        };
        let jobs = {
            let mut parked = state.parked.lock();
            state.paused.store(false, Ordering::SeqCst);
            std::mem::take(&mut *parked)
        };
        self.shared.release_parked(py, jobs)
    }

    /// Cancels every token that has not started; returns how many.
    fn drain_pool(&self, py: Python<'_>) -> PyResult<usize> {
        check_not_forked()?;
        Ok(cancel_jobs(py, self.shared.pool.drain())
            + cancel_jobs(py, self.shared.io.drain())
            + self.shared.cancel_parked(py, None)
            + self.shared.cancel_unstarted(py))
    }

    /// Cancels every token of `op` that has not started; returns how many.
    fn drain_operation(&self, py: Python<'_>, op: &str) -> PyResult<usize> {
        check_not_forked()?;
        let mut n = 0;
        for token in self.shared.ledger.live_tokens(Some(op)) {
            if token.cancel_pending(py) {
                n += 1;
            }
        }
        // Forget the parked jobs of tokens just cancelled.
        if let Some(state) = self.shared.ledger.find_op(op) {
            state.parked.lock().retain(|j| !j.token().core.is_done());
        }
        self.shared.ledger.parked.lock().retain(|j| !j.token().core.is_done());
        Ok(n)
    }

    /// Kills token `token_id`; returns 1 if it was unresolved, else 0.
    #[pyo3(signature = (token_id, reason="admin_override"))]
    fn kill_token(&self, py: Python<'_>, token_id: u64, reason: &str) -> PyResult<usize> {
        match self.shared.ledger.lookup(token_id) {
            Some(t) => Ok(usize::from(t.kill(py, reason)?)),
            None => Ok(0),
        }
    }

    /// Kills every unresolved token of `op` (all operations when None); returns how many.
    #[pyo3(signature = (op=None, reason="admin_override"))]
    fn kill_all_by_operation(&self, py: Python<'_>, op: Option<&str>, reason: &str) -> PyResult<usize> {
        let mut n = 0;
        for t in self.shared.ledger.live_tokens(op) {
            if t.kill(py, reason)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Sets the global limit on unresolved tokens (None or 0: unlimited).
    #[pyo3(signature = (limit=None))]
    fn set_max_pending(&self, limit: Option<usize>) {
        self.shared.ledger.pending.set_limit(limit.unwrap_or(0));
    }

    /// Sets the limit on unresolved tokens of `op` (None or 0: unlimited).
    #[pyo3(signature = (op, limit=None))]
    fn set_operation_limit(&self, op: &str, limit: Option<usize>) {
        self.shared.ledger.op(op).limit.set_limit(limit.unwrap_or(0));
    }

    /// Accepts calls of `op` again after auto-block; returns whether it was blocked.
    fn unblock_operation(&self, op: &str) -> bool {
        match self.shared.ledger.find_op(op) {
            Some(state) => {
                let was = state.blocked.swap(false, Ordering::SeqCst);
                state.reset_health();
                was
            }
            None => false,
        }
    }

    /// Sticky keys in flight: key -> (worker, tokens in flight).
    fn sticky_snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, w, n) in self.shared.sticky.snapshot() {
            d.set_item(k, (w, n))?;
        }
        Ok(d)
    }

    /// Lead domains open: seed -> (core slot or None, tokens pending).
    fn domain_snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, slot, n) in self.shared.domains.snapshot() {
            d.set_item(k, (slot, n))?;
        }
        Ok(d)
    }

    /// Changes the concurrency limit of a storage tier.
    fn set_storage_limit(&self, tier: &str, limit: usize) -> PyResult<()> {
        let index = STORAGE_TIERS
            .iter()
            .position(|t| t.eq_ignore_ascii_case(tier))
            .ok_or_else(|| BindError::Value(format!("unknown storage tier {tier:?}; valid: {STORAGE_TIERS:?}")))?;
        if limit == 0 {
            return Err(BindError::Value("a storage tier limit must be greater than 0".into()).into());
        }
        self.shared.io.set_limit(index, limit);
        Ok(())
    }

    /// Runs one adaptive-pattern decision now (tests, tools); returns the pattern.
    fn converge_now(&self) -> u32 {
        self.shared.converge();
        self.shared.pool.active_per_core().min(self.shared.workers_per_core as u32)
    }

    /// Turns the adaptive pattern on or off (off restores every worker).
    fn set_convergence(&self, enabled: bool) {
        self.shared.convergence.enabled.store(enabled, Ordering::SeqCst);
        if enabled {
            self.shared.arm_convergence();
        } else {
            self.shared.pool.set_active_per_core(u32::MAX);
        }
    }

    /// Sets the active workers per core by hand (the adaptive pattern may change it again).
    fn set_pattern(&self, active_per_core: u32) -> PyResult<()> {
        if active_per_core == 0 {
            return Err(BindError::Value("active workers per core must be at least 1".into()).into());
        }
        self.shared.pool.set_active_per_core(active_per_core);
        Ok(())
    }

    /// Turns auto-block on or off.
    fn set_auto_block(&self, enabled: bool) {
        self.shared.ledger.auto_block.store(enabled, Ordering::SeqCst);
    }
}

fn health_dict<'py>(py: Python<'py>, op: &OpState) -> PyResult<Bound<'py, PyDict>> {
    let h = &op.health;
    let c = op.health_counts();
    let d = PyDict::new(py);
    let attempts = c.runs;
    let successes = c.runs - c.failed.min(c.runs);
    d.set_item("attempts", attempts)?;
    d.set_item("successes", successes)?;
    d.set_item("failures", c.failed.min(c.runs))?;
    d.set_item("timeouts", h.timeouts.load(Ordering::Relaxed))?;
    let secs = |ns: u64| ns as f64 / 1e9;
    d.set_item("min_time", (attempts > 0).then(|| secs(h.min_ns.load(Ordering::Relaxed))))?;
    d.set_item("max_time", (attempts > 0).then(|| secs(h.max_ns.load(Ordering::Relaxed))))?;
    d.set_item("mean_time", (attempts > 0).then(|| secs(c.total_ns) / attempts as f64))?;
    d.set_item("success_rate", (attempts > 0).then(|| successes as f64 / attempts as f64))?;
    d.set_item("health", Health::class(c))?;
    Ok(d)
}

fn records_list<'py>(py: Python<'py>, ledger: &Ledger, records: Vec<Record>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for r in records {
        let d = PyDict::new(py);
        d.set_item("token_id", r.token_id)?;
        d.set_item("operation_type", &*ledger.op_name(r.op_index))?;
        d.set_item("state", r.state.as_str())?;
        d.set_item("created_at", (r.created_ns != 0).then(|| ns_to_unix(r.created_ns)))?;
        d.set_item("started_at", r.started_ns.map(ns_to_unix))?;
        d.set_item("finished_at", ns_to_unix(r.finished_ns))?;
        d.set_item("wait_time", r.started_ns.map(|s| s.saturating_sub(r.created_ns) as f64 / 1e9))?;
        d.set_item("execution_time", r.started_ns.map(|s| r.finished_ns.saturating_sub(s) as f64 / 1e9))?;
        d.set_item("worker_id", r.worker_id)?;
        d.set_item("core_id", r.core_id)?;
        d.set_item("error", r.error)?;
        out.append(d)?;
    }
    Ok(out)
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.shared.in_forked_child() {
            // Touch nothing (see `in_forked_child`), and never drop the
            // engine here: its queues and timer hold jobs whose drop locks.
            std::mem::forget(Arc::clone(&self.shared));
            return;
        }
        // Dropped without stop(): leave the registry and let the workers
        // finish what is queued and exit. (Joining here could deadlock: the
        // dropping thread holds the interpreter.)
        deactivate(&self.shared);
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            LIVE_ENGINES.fetch_sub(1, Ordering::SeqCst);
        }
        // A paused operation (or admission) holds its jobs: nobody will resume them now.
        let _ = Python::try_attach(|py| self.shared.cancel_parked(py, None));
        self.shared.release_threads();
    }
}

/// Called in the child after `os.fork()`.
#[pyfunction]
pub(crate) fn after_fork_in_child() {
    super::job::forked();
    if LIVE_ENGINES.load(Ordering::SeqCst) > 0 {
        FORKED.store(true, Ordering::SeqCst);
    }
}

/// Called once when the interpreter starts to shut down (before threads
/// are joined): refuse new work, then stop every engine, running what is queued.
#[pyfunction]
pub(crate) fn begin_interpreter_shutdown(py: Python<'_>) -> PyResult<()> {
    EXITING.store(true, Ordering::SeqCst);
    if FORKED.load(Ordering::Relaxed) {
        return Ok(());
    }
    // Every engine, including those stopped with wait=False whose workers
    // still run: no worker may be attached when the interpreter finalizes.
    let engines: Vec<Arc<EngineShared>> = ALL.lock().iter().filter_map(Weak::upgrade).collect();
    for engine in engines.iter().rev() {
        engine.stop(py, true, false, None)?;
    }
    drop(engines);
    let handles: Vec<_> = std::mem::take(&mut *UNJOINED.lock());
    py.detach(|| {
        for h in handles {
            match h {
                Unjoined::Worker(h) => {
                    let _ = h.join();
                }
                Unjoined::Lane(j) => {
                    j.join(None);
                }
            }
        }
    });
    Ok(())
}

/// Every engine of this process that has started and not begun to stop.
pub(crate) fn live_engines() -> Vec<Arc<EngineShared>> {
    if FORKED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    ALL.lock().iter().filter_map(Weak::upgrade).filter(|e| !e.is_stopping()).collect()
}

/// How many engines are running.
#[pyfunction]
pub(crate) fn active_engine_count() -> usize {
    if FORKED.load(Ordering::Relaxed) {
        return 0;
    }
    ACTIVE.lock().len()
}
