//! `Engine`: the Python class of one running engine, made by
//! `OperationsCoordinator.start()`: start, stop, stats and the control plane
//! (pause, resume, drain, kill, limits). The engine itself is
//! `engine_shared.rs`; the registry of running engines is `registry.rs`.

use std::sync::{Arc, OnceLock, Weak};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::dashboard::{serve, DashboardServer};
use super::durations::{seconds_arg, timeout_arg};
use super::engine_shared::{Convergence, EngineShared, TimerItem};
use super::exceptions::BindError;
use super::host::{IoHost, PyHost};
use super::lifecycle::{check_accepting, check_not_forked, engine_started, engine_stopped, is_forked};
use super::metrics::render_engines;
use super::operation::STORAGE_TIERS;
use super::outside::OutsideLane;
use super::registry::deactivate;
use super::registry::live_engines;
use super::stats::{engine_stats, records_list};
use super::thread::running_token;
use super::token::{cancel_jobs, Ledger};
use crate::engine::io_lane::Lane;
use crate::engine::outside::{OutsideQueue, MAX_OUTSIDE_LANES};
use crate::engine::pool::{LendHook, Pool, PoolConfig, Topology};
use crate::engine::routing::{DomainTable, StickyTable};
use crate::engine::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use crate::engine::timer::Timer;

/// A running pool of workers. Made by `OperationsCoordinator.start()`.
#[pyclass(frozen, name = "Engine", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct Engine {
    shared: Arc<EngineShared>,
}

impl Engine {
    pub(crate) fn shared(&self) -> &Arc<EngineShared> {
        &self.shared
    }
}

impl Engine {
    /// The engine, if it still accepts work.
    pub(crate) fn shared_for_submit(&self) -> Result<Arc<EngineShared>, BindError> {
        check_accepting()?;
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
                        caller_runs=true, blocking_monitor=true, gil_window=None, spare_threads=0, python_thread=None))]
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
        python_thread: Option<Py<PyAny>>,
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
        check_accepting()?;
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
        let ledger = Arc::new(Ledger::new(max_pending, history_size, auto_block, caller_runs));
        // The monitor's loans count in each operation's blocking history.
        let ledger_for_lends = Arc::downgrade(&ledger);
        config.on_lend = Some(LendHook(Arc::new(move |op| {
            if let Some(ledger) = ledger_for_lends.upgrade() {
                ledger.note_lent(op);
            }
        })));
        let host = Arc::new(PyHost { engine: OnceLock::new(), python_thread: python_thread.as_ref().map(|f| f.clone_ref(py)) });
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
        let io_host = Arc::new(IoHost { engine: OnceLock::new(), python_thread });
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
                last_look_ns: AtomicU64::new(crate::engine::token::now_ns()),
                looks: AtomicU64::new(0),
                armed: AtomicBool::new(false),
            },
            pool,
            ledger,
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
        engine_started();
        super::registry::add(&shared, register);
        if convergence {
            shared.arm_convergence();
        }
        super::log::info(py, "pool", || format!("engine {} started with {workers} workers", shared.pool.id()));
        Ok(Engine { shared })
    }

    /// Stops the engine (see "Stop protocol" in `engine_shared.rs`). Returns True when every worker exited.
    #[pyo3(signature = (wait=true, cancel_pending=false, timeout=None))]
    fn stop(&self, py: Python<'_>, wait: bool, cancel_pending: bool, timeout: Option<f64>) -> PyResult<bool> {
        if is_forked() {
            return Ok(false);
        }
        // A worker of this engine, or a caller running one of its tokens (`wait::run_on_caller`).
        let inside = crate::engine::pool::current_worker().is_some_and(|(id, _)| id == self.shared.pool.id())
            || running_token().is_some_and(|t| Arc::ptr_eq(t.ledger(), &self.shared.ledger));
        if wait && inside {
            return Err(BindError::Runtime(
                "cannot stop a coordinator with wait=True from inside one of its own tasks (it would wait for itself); \
                 use stop(wait=False)"
                    .into(),
            )
            .into());
        }
        let timeout = timeout_arg(timeout)?;
        deactivate(&self.shared);
        self.shared.stop(py, wait, cancel_pending, timeout)
    }

    /// Cancels every token still queued; returns how many.
    fn drain(&self, py: Python<'_>) -> PyResult<usize> {
        check_not_forked()?;
        let mut n = cancel_jobs(py, self.shared.pool.take_unstarted());
        for lane in self.shared.ledger.outside.all() {
            n += cancel_jobs(py, lane.take_unstarted());
        }
        Ok(n)
    }

    /// A new outside lane called `name` (what its tokens' `lane` reads): a
    /// lane that runs tokens outside the engine's threads and takes them
    /// from the engine's queue (see `OutsideLane`).
    fn add_outside_lane(&self, name: &str) -> PyResult<OutsideLane> {
        check_not_forked()?;
        if self.shared.is_stopping() {
            return Err(BindError::ShutDown.into());
        }
        let queue = Arc::new(OutsideQueue::new(name).map_err(|e| BindError::Runtime(format!("cannot make a lane's wake-up socket: {e}")))?);
        let index = self
            .shared
            .ledger
            .outside
            .add(queue.clone())
            .ok_or_else(|| BindError::Runtime(format!("an engine has at most {MAX_OUTSIDE_LANES} outside lanes")))?;
        let index = u16::try_from(index).expect("MAX_OUTSIDE_LANES fits in 16 bits");
        Ok(OutsideLane { index, queue, engine: Arc::downgrade(&self.shared), handoff: Default::default() })
    }

    #[getter]
    fn running(&self) -> bool {
        !self.shared.stopping.load(Ordering::SeqCst) && !is_forked()
    }

    #[getter]
    fn pool_id(&self) -> u64 {
        self.shared.pool.id()
    }

    /// Serves this engine's dashboard, metrics and API (see `dashboard.rs`).
    #[pyo3(signature = (host="127.0.0.1", port=0, *, admin=false, url_prefix="", token=None, auth=true, allowed_hosts=None))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        py: Python<'_>,
        host: &str,
        port: u16,
        admin: bool,
        url_prefix: &str,
        token: Option<String>,
        auth: bool,
        allowed_hosts: Option<Vec<String>>,
    ) -> PyResult<DashboardServer> {
        check_not_forked()?;
        if self.shared.is_stopping() {
            return Err(BindError::ShutDown.into());
        }
        serve(py, &self.shared, host, port, admin, url_prefix, token, auth, allowed_hosts.unwrap_or_default())
    }

    /// Topology, worker and token counters as a dict (schema in the stub).
    /// Topology, worker and token counters as a dict (schema in the stub).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        check_not_forked()?;
        engine_stats(py, &self.shared)
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

    /// No queued token starts (and new ones wait) until `resume_admission`.
    /// Returns how many unstarted tokens it holds back now.
    fn pause_admission(&self) -> usize {
        self.shared.pause_admission()
    }

    /// Lets held tokens go; returns how many were released.
    fn resume_admission(&self, py: Python<'_>) -> usize {
        self.shared.resume_admission(py)
    }

    /// Tokens of `op` wait (others flow) until `resume_operation`. Returns
    /// how many unstarted tokens of `op` it holds back now.
    fn pause_operation(&self, op: &str) -> usize {
        self.shared.pause_operation(op)
    }

    /// Releases the tokens of `op` held by `pause_operation`; returns how many.
    fn resume_operation(&self, py: Python<'_>, op: &str) -> usize {
        self.shared.resume_operation(py, op)
    }

    /// Cancels every token that has not started; returns how many.
    fn drain_pool(&self, py: Python<'_>) -> PyResult<usize> {
        check_not_forked()?;
        Ok(cancel_jobs(py, self.shared.pool.take_unstarted())
            + cancel_jobs(py, self.shared.io.take_unstarted())
            + self.shared.cancel_parked(py, None)
            + self.shared.cancel_unstarted(py))
    }

    /// Cancels every token of `op` that has not started; returns how many.
    fn drain_operation(&self, py: Python<'_>, op: &str) -> PyResult<usize> {
        check_not_forked()?;
        Ok(self.shared.drain_operation(py, op))
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
        self.shared.kill_operation(py, op, reason)
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

    /// Lead domains open: seed -> (core or None, tokens pending).
    fn domain_snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, core, n) in self.shared.domains.snapshot() {
            d.set_item(k, (core, n))?;
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
            engine_stopped();
        }
        // A paused operation (or admission) holds its jobs: nobody will resume them now.
        let _ = Python::try_attach(|py| self.shared.cancel_parked(py, None));
        self.shared.release_threads();
    }
}

/// The Prometheus text (format 0.0.4) of the given engines, or of every
/// running engine of this process (`pool` label: the engine's id).
#[pyfunction]
#[pyo3(signature = (engines=None))]
pub(crate) fn render_metrics(py: Python<'_>, engines: Option<Vec<PyRef<'_, Engine>>>) -> String {
    let engines: Vec<Arc<EngineShared>> = match engines {
        Some(list) => list.iter().map(|e| e.shared().clone()).collect(),
        None => live_engines(),
    };
    py.detach(|| render_engines(&engines))
}
