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
//! # Fork and interpreter exit
//!
//! `after_fork_in_child` (registered with `os.register_at_fork`) marks the
//! process as forked when engines were running: every later use raises
//! `ForkedProcessError` before touching a lock that another parent thread
//! may have held at the fork. `begin_interpreter_shutdown` (registered with
//! `threading._register_atexit`, so it runs before threads are joined)
//! refuses new work and stops every engine, running what was queued.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::exceptions::BindError;
use super::job::{cancel_jobs, PyHost, PyJob};
use super::wait::{timeout_arg, wait_detached};
use crate::pool::{Pool, PoolConfig, Topology};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use crate::token::TokenState;

/// Token counters of one engine (atomics: no lock on the hot path).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    submitted: AtomicU64,
    running: AtomicU64,
    resolved: [AtomicU64; 9],
}

impl Counters {
    pub(crate) fn record_submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_resolved(&self, state: TokenState) {
        self.resolved[state as usize].fetch_add(1, Ordering::Release);
    }

    pub(crate) fn running_delta(&self, delta: i64) {
        if delta >= 0 {
            self.running.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.running.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    fn total_resolved(&self) -> u64 {
        self.resolved.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }

    /// Submitted tokens not yet resolved.
    fn unresolved(&self) -> u64 {
        self.submitted.load(Ordering::Acquire).saturating_sub(self.total_resolved())
    }
}

/// A running engine, shared by its `Engine` object, the registry and the workers' cache.
#[derive(Debug)]
pub(crate) struct EngineShared {
    pub(crate) pool: Pool<PyJob>,
    pub(crate) counters: Arc<Counters>,
    stopping: AtomicBool,
    topology: Topology,
    workers_per_core: usize,
}

static ACTIVE: Mutex<Vec<Arc<EngineShared>>> = Mutex::new(Vec::new());
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

/// The engine a decorated call made on this thread submits to.
pub(crate) fn current_engine() -> Result<Arc<EngineShared>, BindError> {
    check_not_forked()?;
    if EXITING.load(Ordering::Relaxed) {
        return Err(BindError::InterpreterShutdown);
    }
    let generation = GENERATION.load(Ordering::Acquire);
    CACHED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != generation {
            *cache = (generation, lookup());
        }
        cache.1.clone().ok_or(BindError::NotStarted)
    })
}

fn activate(engine: &Arc<EngineShared>) {
    ACTIVE.lock().push(engine.clone());
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

fn deactivate(engine: &EngineShared) {
    ACTIVE.lock().retain(|e| !std::ptr::eq(Arc::as_ptr(e), engine));
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// A running pool of workers. Made by `OperationsCoordinator.start()`.
#[pyclass(frozen, name = "Engine", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct Engine {
    shared: Arc<EngineShared>,
}

impl EngineShared {
    fn stop(&self, py: Python<'_>, wait: bool, cancel_pending: bool, timeout: Option<Duration>) -> PyResult<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        deactivate(self);
        if !self.stopping.swap(true, Ordering::SeqCst) {
            LIVE_ENGINES.fetch_sub(1, Ordering::SeqCst);
        }
        if cancel_pending {
            cancel_jobs(py, self.pool.drain());
        }
        if wait {
            let counters = &self.counters;
            wait_detached(py, remaining(), |step| {
                let until = Instant::now() + step;
                loop {
                    if counters.unresolved() == 0 {
                        return true;
                    }
                    if Instant::now() >= until {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            })?;
        }
        self.pool.shutdown();
        let joined = if wait {
            let pool = &self.pool;
            let limit = remaining();
            py.detach(|| pool.join(limit))
        } else {
            false
        };
        cancel_jobs(py, self.pool.drain());
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
    #[pyo3(signature = (workers, *, workers_per_core, pin_cores=true, stack_size=0, thread_name="tokengate-worker"))]
    fn new(
        py: Python<'_>,
        workers: usize,
        workers_per_core: usize,
        pin_cores: bool,
        stack_size: usize,
        thread_name: &str,
    ) -> PyResult<Self> {
        check_not_forked()?;
        if EXITING.load(Ordering::Relaxed) {
            return Err(BindError::InterpreterShutdown.into());
        }
        let mut config = PoolConfig::new(workers);
        config.pin_cores = pin_cores;
        config.stack_size = stack_size;
        config.thread_name = thread_name.to_owned();
        let host = Arc::new(PyHost::default());
        let pool = py.detach(|| Pool::start(&config, host.clone())).map_err(BindError::from)?;
        let shared = Arc::new(EngineShared {
            pool,
            counters: Arc::new(Counters::default()),
            stopping: AtomicBool::new(false),
            topology: Topology::detect(),
            workers_per_core,
        });
        let _ = host.engine.set(Arc::downgrade(&shared));
        LIVE_ENGINES.fetch_add(1, Ordering::SeqCst);
        activate(&shared);
        Ok(Engine { shared })
    }

    /// Stops the engine; see the module docs. Returns True when every worker exited.
    #[pyo3(signature = (wait=true, cancel_pending=false, timeout=None))]
    fn stop(&self, py: Python<'_>, wait: bool, cancel_pending: bool, timeout: Option<f64>) -> PyResult<bool> {
        if FORKED.load(Ordering::Relaxed) {
            return Ok(false);
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
        let out = PyDict::new(py);

        let topo = PyDict::new(py);
        topo.set_item("physical_cores", sh.topology.physical_cores)?;
        topo.set_item("logical_cores", sh.topology.logical_cores)?;
        topo.set_item("workers_per_core", sh.workers_per_core)?;
        topo.set_item("total_workers", sh.pool.workers())?;
        topo.set_item("pinned_cores", sh.pool.pinned_cores())?;
        out.set_item("topology", topo)?;

        let c = &sh.counters;
        let tokens = PyDict::new(py);
        let submitted = c.submitted.load(Ordering::Acquire);
        tokens.set_item("submitted", submitted)?;
        tokens.set_item("unresolved", c.unresolved())?;
        tokens.set_item("executing", c.running.load(Ordering::Relaxed))?;
        for state in TokenState::ALL.iter().filter(|s| s.is_terminal()) {
            tokens.set_item(state.as_str(), c.resolved[*state as usize].load(Ordering::Acquire))?;
        }
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
        out.set_item("pool", pool)?;
        Ok(out)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Dropped without stop(): leave the registry and let the workers
        // finish what is queued and exit. (Joining here could deadlock: the
        // dropping thread holds the interpreter.)
        deactivate(&self.shared);
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            LIVE_ENGINES.fetch_sub(1, Ordering::SeqCst);
        }
        self.shared.pool.shutdown();
    }
}

/// Called in the child after `os.fork()`.
#[pyfunction]
pub(crate) fn after_fork_in_child() {
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
    let engines: Vec<Arc<EngineShared>> = ACTIVE.lock().clone();
    for engine in engines.iter().rev() {
        engine.stop(py, true, false, None)?;
    }
    Ok(())
}

/// How many engines are running.
#[pyfunction]
pub(crate) fn active_engine_count() -> usize {
    if FORKED.load(Ordering::Relaxed) {
        return 0;
    }
    ACTIVE.lock().len()
}
