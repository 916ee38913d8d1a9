//! What a worker does with one token.
//!
//! Each worker thread attaches to the interpreter once, for its whole life
//! (`PyHost::run_worker`), so running a task costs no thread-state setup;
//! it detaches only inside `WorkerHooks::idle`, while it spins or sleeps.
//!
//! The call (function, arguments, context) lives in the token (`CallSlot`,
//! under its lock); a queued job points at the token. Whoever takes the call
//! first runs it: a worker that pops the job, a task that waits on the token
//! and runs it inline (help while waiting: the awaited token itself first,
//! depth-first like a plain recursive call), or a thread outside the pool
//! that waits on it (`run_on_caller`). A job whose call was taken stays in
//! its queue until a worker pops it and drops it ("spent"). A retry puts the
//! call back under a new attempt number with a new job; a job takes only
//! its own attempt's call, so a spent job of an earlier attempt never runs a
//! later one. If a job is dropped while its call is still there (the pool
//! was drained or dropped), its token resolves as cancelled: no token is
//! ever left pending; a drained spent job is only dropped (its token runs).

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock, Weak};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use super::engine::EngineShared;
use super::exceptions;
use super::token::{Outcome, TaskToken, TokenInner};
use crate::pool::{Host, Job, Weight, WorkerHooks, WorkerInfo, WorkerLoop};
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::token::{now_ns, TokenState};

/// The function call a token stands for.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) func: Py<PyAny>,
    pub(crate) args: Py<PyTuple>,
    pub(crate) kwargs: Option<Py<PyDict>>,
    /// The caller's `contextvars.Context` copy, run around the call.
    pub(crate) context: super::ffi::CallContext,
}

impl Call {
    fn clone_ref(&self, py: Python<'_>) -> Call {
        Call {
            func: self.func.clone_ref(py),
            args: self.args.clone_ref(py),
            kwargs: self.kwargs.as_ref().map(|k| k.clone_ref(py)),
            context: self.context.clone_ref(py),
        }
    }

    fn invoke(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let func = self.func.bind(py);
        let args = self.args.bind(py);
        let kwargs = self.kwargs.as_ref().map(|k| k.bind(py));
        self.context.run(func, args, kwargs).map(Bound::unbind)
    }
}

/// Where a token keeps its call until someone takes it to run it.
#[derive(Debug, Default)]
pub(crate) struct CallSlot {
    pub(crate) call: Option<Call>,
    /// Which job owns the call: bumped each time a retry puts the call back,
    /// so that a job of an earlier attempt still queued (its call was taken
    /// by a waiter that ran the token itself) never takes a later attempt's.
    attempt: u32,
}

impl CallSlot {
    pub(crate) fn new(call: Option<Call>) -> Self {
        CallSlot { call, attempt: 0 }
    }
}

/// A queued token (its call is in the token).
#[derive(Debug)]
pub(crate) struct PyJob {
    /// Always `Some` until `into_token` takes it.
    token: Option<Arc<TokenInner>>,
    /// The attempt whose call this job may take (see `CallSlot`).
    attempt: u32,
    /// Resolve the token as cancelled if the job is dropped with its call unrun.
    armed: bool,
}

impl PyJob {
    /// A job for another attempt of `token`, with the call it runs.
    pub(crate) fn new(token: Arc<TokenInner>, call: Call) -> Self {
        let attempt = {
            let mut slot = token.call.lock();
            slot.attempt = slot.attempt.wrapping_add(1);
            slot.call = Some(call);
            slot.attempt
        };
        PyJob { token: Some(token), attempt, armed: true }
    }

    /// A job for a token made with its call in place (`TokenInner::new`:
    /// the first attempt, 0).
    pub(crate) fn holding_call(token: Arc<TokenInner>) -> Self {
        PyJob { token: Some(token), attempt: 0, armed: true }
    }

    /// Takes the call, if it is still there and belongs to this job's attempt.
    fn take_call(&self) -> Option<Call> {
        let mut slot = self.token().call.lock();
        if slot.attempt == self.attempt {
            slot.call.take()
        } else {
            None
        }
    }

    /// The token's handle, without resolving anything (the job is spent).
    fn into_token(mut self) -> Arc<TokenInner> {
        self.armed = false;
        self.token.take().expect("a job holds its token until it is spent")
    }

    /// Drops the call without resolving the token (the caller resolves it).
    /// True when the call was there (nobody else took it to run it).
    pub(crate) fn forget_call(&mut self) -> bool {
        self.armed = false;
        self.take_call().is_some()
    }

    /// The token this job runs.
    pub(crate) fn token(&self) -> &Arc<TokenInner> {
        self.token.as_ref().expect("a job holds its token until it is spent")
    }

    /// Replaces input tokens among the arguments with their values. On a
    /// failed input, returns it with the exception to use as the cause.
    pub(crate) fn substitute_inputs(&mut self, py: Python<'_>) -> Result<(), (Arc<TokenInner>, Py<PyAny>)> {
        let token = self.token().clone();
        let mut guard = token.call.lock();
        let Some(call) = guard.call.as_mut() else {
            return Ok(());
        };
        let value_of = |v: Bound<'_, PyAny>| -> Result<Py<PyAny>, (Arc<TokenInner>, Py<PyAny>)> {
            match v.cast::<TaskToken>() {
                Ok(t) => {
                    let inner = t.get().inner.clone();
                    inner.outcome(py, false).map_err(|e| (inner.clone(), e.into_value(py).into_any()))
                }
                Err(_) => Ok(v.unbind()),
            }
        };
        let mut args = Vec::new();
        for a in call.args.bind(py).iter() {
            args.push(value_of(a)?);
        }
        let new_kwargs = match &call.kwargs {
            Some(kw) => {
                let d = PyDict::new(py);
                for (k, v) in kw.bind(py).iter() {
                    let v = value_of(v)?;
                    d.set_item(k, v).map_err(|e| (token.clone(), e.into_value(py).into_any()))?;
                }
                Some(d.unbind())
            }
            None => None,
        };
        let tuple = PyTuple::new(py, args).map_err(|e| (token.clone(), e.into_value(py).into_any()))?;
        call.args = tuple.unbind();
        call.kwargs = new_kwargs;
        Ok(())
    }
}

impl Job for PyJob {
    fn weight(&self) -> Weight {
        self.token().spec().weight
    }

    fn submitted_ns(&self) -> Option<u64> {
        self.token().core.time(crate::token::Stamp::Created)
    }

    /// A caller that submits and then waits (`f(x).result()`, `await f(x)`)
    /// holds the interpreter until its wait begins; a worker that attached
    /// before that would block on the interpreter and need a thread wake-up
    /// (~10 us). Waiting up to `ATTACH_DELAY` for the wait to begin avoids it.
    fn before_idle_run(&self) {
        self.token().core.spin_until_awaited(ATTACH_DELAY);
    }

    /// A waiter took the call and runs (or ran) the token itself
    /// (`run_on_caller`, `help_until_done`), or this job belongs to an
    /// earlier attempt: nothing left for it to run, no reason to take the
    /// interpreter.
    fn is_spent(&self) -> bool {
        let slot = self.token().call.lock();
        slot.attempt != self.attempt || slot.call.is_none()
    }
}

/// How long an idle worker that found a job waits for its caller to start waiting.
const ATTACH_DELAY: std::time::Duration = std::time::Duration::from_micros(4);

impl Drop for PyJob {
    fn drop(&mut self) {
        // `into_token` took the handle: the run owns the token now.
        if self.armed && self.token.is_some() && self.take_call().is_some() {
            self.token().cancel_unrun();
        }
    }
}

/// Resolves drained jobs as cancelled. A job whose call a waiter already
/// took (that waiter runs the token) is only dropped.
pub(crate) fn cancel_jobs(py: Python<'_>, jobs: Vec<PyJob>) -> usize {
    let mut n = 0;
    for mut job in jobs {
        if job.forget_call() && job.token().resolve(py, |_| true, TokenState::Cancelled, None) {
            n += 1;
        }
    }
    n
}

thread_local! {
    static CURRENT_TOKEN: RefCell<Option<Arc<TokenInner>>> = const { RefCell::new(None) };
}

/// The token whose body runs on this thread, if any.
pub(crate) fn running_token() -> Option<Arc<TokenInner>> {
    CURRENT_TOKEN.with(|c| c.borrow().clone())
}

/// True when this thread is running `token`'s body right now.
pub(crate) fn is_current_token(token: &TokenInner) -> bool {
    CURRENT_TOKEN.with(|c| c.borrow().as_ref().is_some_and(|t| std::ptr::eq(Arc::as_ptr(t), token)))
}

/// The token whose body runs on this thread, or None outside a task.
#[pyfunction]
pub(crate) fn current_token(py: Python<'_>) -> PyResult<Option<Py<TaskToken>>> {
    match CURRENT_TOKEN.with(|c| c.borrow().clone()) {
        Some(inner) => Ok(Some(Py::new(py, TaskToken { inner })?)),
        None => Ok(None),
    }
}

static FAULT_EVERY: AtomicU64 = AtomicU64::new(0);
static FAULT_COUNT: AtomicU64 = AtomicU64::new(0);
static FAULT_IN_SUBMIT: AtomicBool = AtomicBool::new(false);

/// Where an injected fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultSite {
    /// On the worker, just before the body runs.
    Task,
    /// In the submit path, once the token is registered and before it is queued.
    Submit,
}

/// Test hook: make tokengate's own code panic in every `every`-th task (0:
/// never), on the worker (`site="task"`) or in the submit path (`site="submit"`).
#[pyfunction]
#[pyo3(signature = (every, site="task"))]
pub(crate) fn set_fault_injection(every: u64, site: &str) -> PyResult<()> {
    let in_submit = match site {
        "task" => false,
        "submit" => true,
        other => return Err(super::exceptions::BindError::Value(format!("site must be 'task' or 'submit', not {other:?}")).into()),
    };
    FAULT_IN_SUBMIT.store(in_submit, Ordering::Relaxed);
    FAULT_EVERY.store(every, Ordering::Relaxed);
    FAULT_COUNT.store(0, Ordering::Relaxed);
    Ok(())
}

pub(crate) fn maybe_inject_fault(site: FaultSite) {
    let every = FAULT_EVERY.load(Ordering::Relaxed);
    if every > 0
        && FAULT_IN_SUBMIT.load(Ordering::Relaxed) == (site == FaultSite::Submit)
        && (FAULT_COUNT.fetch_add(1, Ordering::Relaxed) + 1) % every == 0
    {
        panic!("injected fault (tokengate._tokengate.set_fault_injection)");
    }
}

static COROUTINE_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn coroutine_error(py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Option<Outcome>> {
    let coroutine_type = COROUTINE_TYPE.import(py, "types", "CoroutineType")?;
    // The coroutine type cannot be subclassed: an identity check suffices.
    if !value.get_type().is(coroutine_type) {
        return Ok(None);
    }
    value.call_method0("close")?;
    let err = PyTypeError::new_err(
        "the task returned a coroutine: @task_token_guard runs synchronous functions; \
         await coroutines on your event loop instead (the coroutine was closed)",
    );
    Ok(Some(Outcome::Error(err.into_value(py).into_any())))
}

thread_local! {
    /// The engine and worker identity of the worker running on this thread.
    static WORKER: RefCell<Option<(Weak<EngineShared>, WorkerInfo)>> = const { RefCell::new(None) };
    static HELP_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Core units held by the jobs this worker thread runs inline (its waits);
    /// the job the pool started holds `crate::pool::held_units()`.
    static CHAIN_UNITS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Core units a job of `weight` gets to run inline on this worker now, or
/// None. Light and medium jobs use the units the waiting chain already
/// holds. A heavy job needs its core to itself: nothing else running on it,
/// or, once the wait has stalled, no other heavy job there (the waiting
/// jobs are blocked), so liveness never costs the heavy limit.
fn inline_units(engine: &EngineShared, info: &WorkerInfo, weight: Weight, stalled: bool) -> Option<u32> {
    if weight != Weight::Heavy {
        return Some(engine.pool.units_of(info.index, weight));
    }
    let held = crate::pool::held_units() + CHAIN_UNITS.with(std::cell::Cell::get);
    engine.pool.inline_heavy(info.index, held, stalled)
}

/// Runs `f` with `units` counted in this thread's chain, then gives them back.
fn with_chain_units<R>(engine: &EngineShared, info: &WorkerInfo, weight: Weight, units: u32, f: impl FnOnce() -> R) -> R {
    CHAIN_UNITS.with(|c| c.set(c.get() + units));
    let out = f();
    CHAIN_UNITS.with(|c| c.set(c.get() - units));
    if weight == Weight::Heavy {
        engine.pool.inline_release(info.index, weight, units);
    }
    out
}

/// True on a pool worker thread.
pub(crate) fn on_worker_thread() -> bool {
    WORKER.with(|w| w.borrow().is_some())
}

/// Nested waits deeper than this block instead of running more work inline.
const MAX_HELP_DEPTH: u32 = 200;

/// Waits for `token` on a worker thread, running queued jobs inline meanwhile
/// (rayon's help-while-waiting), so a task that waits on tokens it submitted
/// cannot deadlock even with one worker. True when done, false on timeout.
pub(crate) fn help_until_done(py: Python<'_>, token: &Arc<TokenInner>, timeout: Option<std::time::Duration>) -> PyResult<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let Some((engine, info)) = WORKER.with(|w| w.borrow().as_ref().map(|(e, i)| (e.upgrade(), *i))) else {
        return Ok(token.core.wait(timeout));
    };
    let Some(engine) = engine else {
        return Ok(token.core.wait(timeout));
    };
    let weak = Arc::downgrade(&engine);
    let depth = HELP_DEPTH.with(|d| d.get());
    let started = std::time::Instant::now();
    let mut last_signal_check = started;
    loop {
        if token.core.is_done() {
            return Ok(true);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(false);
        }
        let stalled = started.elapsed() >= STALL_LIMIT;
        // The awaited token itself, if it still waits in a queue and may run here.
        let runnable_here = token.core.state() == TokenState::Admitted
            && token.lane == super::token::LaneKind::Cpu
            && token.pinned.is_none_or(|w| w == info.index)
            && (depth < MAX_HELP_DEPTH || stalled);
        let units = if runnable_here { inline_units(&engine, &info, token.spec().weight, stalled) } else { None };
        if let Some(units) = units {
            let weight = token.spec().weight;
            let claimed = token.call.lock().call.take();
            match claimed {
                Some(call) => {
                    HELP_DEPTH.with(|d| d.set(depth + 1));
                    with_chain_units(&engine, &info, weight, units, || {
                        run_call(py, token.clone(), call, Some(&info), &weak);
                    });
                    HELP_DEPTH.with(|d| d.set(depth));
                }
                None if weight == Weight::Heavy => engine.pool.inline_release(info.index, weight, units),
                None => {}
            }
            continue;
        }
        // Otherwise other queued work that may run here.
        let other = if depth < MAX_HELP_DEPTH { engine.pool.try_take() } else { None };
        let fit = other.as_ref().and_then(|job| inline_units(&engine, &info, Job::weight(job), stalled));
        match (other, fit) {
            (Some(job), Some(units)) => {
                let weight = Job::weight(&job);
                HELP_DEPTH.with(|d| d.set(depth + 1));
                with_chain_units(&engine, &info, weight, units, || execute(py, job, &info, &weak));
                HELP_DEPTH.with(|d| d.set(depth));
            }
            (Some(job), None) => {
                // A heavy job that cannot have this core: back to the queues.
                let back = match job.token().pinned {
                    Some(w) => engine.pool.submit_to(w, job),
                    None => engine.pool.submit(job),
                };
                drop(back);
                let step = std::time::Duration::from_millis(1);
                py.detach(|| token.core.wait(Some(step)));
            }
            (None, _) => {
                let step = std::time::Duration::from_millis(2);
                py.detach(|| token.core.wait(Some(step)));
            }
        }
        if last_signal_check.elapsed() >= std::time::Duration::from_millis(50) {
            py.check_signals()?;
            last_signal_check = std::time::Instant::now();
        }
    }
}

/// Counts forks: the thread that forks is the child's main thread.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Called in a child process made by `fork()` (see `engine::after_fork_in_child`).
pub(crate) fn forked() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

thread_local! {
    /// Whether this thread is the interpreter's main thread, asked once per
    /// thread and process (the fork count it was asked at).
    static ON_MAIN_THREAD: std::cell::Cell<Option<(u64, bool)>> = const { std::cell::Cell::new(None) };
    /// The engine and core units of the token this thread (outside the pool) runs for its caller.
    static OUTSIDE_UNITS: RefCell<Option<(Arc<EngineShared>, crate::pool::OutsideUnits)>> = const { RefCell::new(None) };
}

fn on_main_thread(py: Python<'_>) -> bool {
    let forks = FORKS.load(Ordering::Relaxed);
    ON_MAIN_THREAD.with(|c| {
        if let Some((at, v)) = c.get() {
            if at == forks {
                return v;
            }
        }
        let v = (|| -> PyResult<bool> {
            let threading = py.import("threading")?;
            let main = threading.call_method0("main_thread")?.getattr("ident")?;
            main.eq(threading.call_method0("get_ident")?)
        })()
        .unwrap_or(true);
        c.set(Some((forks, v)));
        v
    })
}

/// Caller runs: a thread outside the pool that waits, without a timeout, on
/// a token no worker has started runs the token itself, as a worker would,
/// instead of waking a worker and sleeping until it is done (as .NET's
/// `Task.Wait` inlines an unstarted task and `ForkJoinTask.join` runs it).
/// That saves two thread switches per token (four interpreter hand-overs
/// under the GIL). True when it ran the token here.
///
/// Only where the body cannot tell (what does differ, the thread above all,
/// is listed in the README's "Caller runs"):
/// * the coordinator allows it (`caller_runs`, default on), the token waits
///   in the CPU pool's queues (`ADMITTED`), and neither admission nor its
///   operation is paused nor the engine stopping;
/// * the token is not pinned to a worker (sticky anchors, lead domains), not
///   a lead, has no deadline (a deadline must be able to end the wait), and
///   is not heavy (a heavy token has its core to itself);
/// * the waiter is not the main thread (Ctrl-C is delivered there and
///   belongs to the wait, not to the body), runs no asyncio event loop (the
///   body would see it) and is not already running a token for its caller
///   (one level);
/// * a core has room for the token's units, which the caller holds while it
///   runs the body (given back while the body blocks in a nested wait, see
///   `LentUnits`), so the per-core limits hold as for workers.
///
/// Whoever takes the call first runs it (`Call` is taken under its lock); a
/// worker that later pops the spent job drops it without taking the
/// interpreter (`Job::is_spent`).
pub(crate) fn run_on_caller(py: Python<'_>, token: &Arc<TokenInner>) -> bool {
    if token.core.state() != TokenState::Admitted
        || token.lane != super::token::LaneKind::Cpu
        || token.pinned.is_some()
        || token.is_lead
        || token.deadline_ns.load(Ordering::Relaxed) != 0
    {
        return false;
    }
    let weight = token.spec().weight;
    let ledger = token.ledger();
    if weight == Weight::Heavy
        || !ledger.caller_runs.load(Ordering::Relaxed)
        || ledger.admission_paused.load(Ordering::Relaxed)
        || token.op().paused.load(Ordering::Relaxed)
        || ledger.stopping.load(Ordering::Relaxed)
    {
        return false;
    }
    if OUTSIDE_UNITS.with(|u| u.borrow().is_some()) || on_main_thread(py) || has_running_loop(py) {
        return false;
    }
    let Ok(Some(engine)) = super::engine::with_current_engine(|e| Arc::ptr_eq(&e.ledger, ledger).then(|| Arc::clone(e))) else {
        return false;
    };
    let Some(units) = engine.pool.try_acquire_outside(weight) else {
        return false;
    };
    let Some(call) = token.call.lock().call.take() else {
        engine.pool.release_outside(&units);
        return false;
    };
    let weak = Arc::downgrade(&engine);
    OUTSIDE_UNITS.with(|u| *u.borrow_mut() = Some((engine, units)));
    let _give_back = OutsideRun;
    run_call(py, token.clone(), call, None, &weak);
    true
}

/// Gives the units of a caller's run back when it ends, however it ends.
struct OutsideRun;

impl Drop for OutsideRun {
    fn drop(&mut self) {
        if let Some((engine, units)) = OUTSIDE_UNITS.with(|u| u.borrow_mut().take()) {
            engine.pool.release_outside(&units);
        }
    }
}

/// True when an asyncio event loop runs on this thread (a body run here
/// would see it, and `asyncio.run()` in the body would fail), or when that
/// cannot be told.
fn has_running_loop(py: Python<'_>) -> bool {
    super::asyncio::running_loop(py).map_or(true, |running| running.is_some())
}

/// While a body that a caller runs (`run_on_caller`) blocks in a nested
/// wait, its core units go back to the pool: a blocked body uses no core,
/// and holding them could leave no room for the workers that must run what
/// it waits for. When the wait ends the body takes units again on a core
/// with room, else on one where no heavy token runs (`try_retake_outside`);
/// when every core runs a heavy token (one may have taken the body's core
/// meanwhile) it waits, detached, up to `STALL_LIMIT`, then goes on beside
/// one rather than risk never going on (that heavy token may wait on it).
pub(crate) struct LentUnits(bool);

impl LentUnits {
    pub(crate) fn lend() -> LentUnits {
        LentUnits(OUTSIDE_UNITS.with(|u| u.borrow().as_ref().map(|(engine, units)| engine.pool.release_outside(units)).is_some()))
    }
}

impl Drop for LentUnits {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        let Some((engine, mut units)) = OUTSIDE_UNITS.with(|u| u.borrow_mut().take()) else {
            return;
        };
        if !engine.pool.try_retake_outside(&mut units) {
            let pool = &engine.pool;
            let units = &mut units;
            Python::attach(|py| {
                py.detach(|| {
                    let deadline = std::time::Instant::now() + STALL_LIMIT;
                    while !pool.try_retake_outside(units) {
                        if std::time::Instant::now() >= deadline {
                            pool.force_retake_outside(units);
                            return;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                });
            });
        }
        OUTSIDE_UNITS.with(|u| *u.borrow_mut() = Some((engine, units)));
    }
}

/// How long a waiting task respects core capacity before it runs the awaited token anyway.
const STALL_LIMIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs one job on a worker (attached).
fn execute(py: Python<'_>, mut job: PyJob, info: &WorkerInfo, engine: &Weak<EngineShared>) {
    // Admission or the operation was paused after this token was queued: park
    // it instead (or, once the engine is stopping, cancel it: a pause would
    // hold it past the stop).
    let paused = {
        let token = job.token();
        token.ledger().admission_paused.load(Ordering::Relaxed) || token.op().paused.load(Ordering::Relaxed)
    };
    if paused {
        let token = job.token().clone();
        if token.ledger().stopping.load(Ordering::SeqCst) {
            if job.forget_call() {
                token.resolve(py, |_| true, TokenState::Cancelled, None);
            }
            return;
        }
        let queue = if token.ledger().admission_paused.load(Ordering::Relaxed) { &token.ledger().parked } else { &token.op().parked };
        let mut parked = queue.lock();
        let still = token.ledger().admission_paused.load(Ordering::SeqCst) || token.op().paused.load(Ordering::SeqCst);
        if still && !job.is_spent() && token.core.hold() {
            parked.push_back(job);
            return;
        }
    }
    job.armed = false;
    // No call for this job: a waiter runs the token itself, or this job is
    // of an earlier attempt (see `CallSlot`).
    let Some(call) = job.take_call() else {
        return;
    };
    // The job's handle moves on to the run (no extra count).
    run_call(py, job.into_token(), call, Some(info), engine);
}

/// Runs a claimed call: start, invoke, record, retry or resolve. `info`
/// is the worker running it, None for a caller outside the pool.
fn run_call(py: Python<'_>, token: Arc<TokenInner>, call: Call, info: Option<&WorkerInfo>, engine: &Weak<EngineShared>) {
    let (worker, core) = info.map_or((crate::token::NO_WORKER, None), |i| (i.index as u32, i.core.map(|c| c as u32)));
    if !token.core.start(worker, core) {
        return; // cancelled, killed or timed out before it started: never run it
    }
    if token.is_lead {
        if let (Some(seed), Some(engine), Some(info)) = (token.route.seed(), engine.upgrade(), info) {
            engine.domains.set_slot(seed, engine.pool.slot_of(info.index));
        }
    }
    // Only the thread that started the token writes it (a retry starts it again later).
    token.attempts.store(token.attempts.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    token.ledger().running_delta(1);
    let retry_call = (token.retries_left.load(Ordering::Relaxed) > 0).then(|| call.clone_ref(py));
    let t0 = token.core.time(crate::token::Stamp::Started).unwrap_or_else(now_ns);
    // The handle moves into CURRENT_TOKEN for the call and back out after it (no extra count).
    // A pool worker running a token of an operation whose runs block lends
    // the token's units before the body (see `BlockingHistory`).
    let pool_of = |i: &WorkerInfo| engine.upgrade().filter(|e| e.pool.id() == i.pool_id);
    if token.op().blocking.starts_lent() && token.spec().weight != Weight::Heavy {
        if let Some(i) = info {
            if let Some(e) = pool_of(i) {
                e.pool.lend_current(i.index);
            }
        }
    }
    let previous = CURRENT_TOKEN.with(|c| c.replace(Some(token)));
    let forks = FORKS.load(Ordering::Relaxed);
    let result = catch_unwind(AssertUnwindSafe(|| {
        maybe_inject_fault(FaultSite::Task);
        call.invoke(py)
    }));
    if info.is_some() && FORKS.load(Ordering::Relaxed) != forks {
        // The body forked and this is the child, on its only thread: a pool
        // worker with no pool behind it. It ends here instead of waiting for work.
        end_forked_child(py, &result);
    }
    let t1 = now_ns();
    let elapsed = t1.saturating_sub(t0);
    let token = CURRENT_TOKEN.with(|c| c.replace(previous)).expect("the running token is in CURRENT_TOKEN until the call returns");
    let token = &token;
    token.ledger().running_delta(-1);
    if token.op().blocking.is_long(elapsed) {
        if let Some(i) = info {
            if let Some(e) = pool_of(i) {
                token.op().blocking.record(e.pool.is_lent(i.index));
            }
        }
    }
    let mut panicked = false;
    let (state, outcome) = match result {
        Ok(Ok(value)) => match coroutine_error(py, value.bind(py)) {
            Ok(None) => (TokenState::Completed, Outcome::Value(value)),
            Ok(Some(err)) => (TokenState::Failed, err),
            Err(e) => (TokenState::Failed, Outcome::Error(e.into_value(py).into_any())),
        },
        Ok(Err(err)) => (TokenState::Failed, Outcome::Error(err.into_value(py).into_any())),
        Err(payload) => {
            panicked = true;
            let msg = exceptions::panic_message(payload.as_ref());
            (TokenState::Failed, Outcome::Error(exceptions::panic_value(py, &msg)))
        }
    };
    // An attempt that outlived its deadline (or was killed) is not a success;
    // one whose token asyncio cancelled meanwhile counts as it ended.
    let succeeded = state == TokenState::Completed && !matches!(token.core.state(), TokenState::Timeout | TokenState::Killed);
    token.op().record_run(succeeded, elapsed);
    if state == TokenState::Failed && !panicked {
        if let (Some(call), Some(engine)) = (retry_call, engine.upgrade()) {
            if try_retry(py, token, call, &engine) {
                return;
            }
        }
    }
    if token.core.state() == TokenState::Timeout {
        let deadline = token.deadline_ns.load(Ordering::Relaxed);
        if deadline != 0 {
            token.ledger().note_overrun(now_ns().saturating_sub(deadline));
        }
    }
    // A token killed or timed out while running is already resolved: its result is dropped.
    token.resolve_at(py, |s| s == TokenState::Executing, state, Some(outcome), Some(t1));
}

/// Ends a child process that a task's body forked on a pool worker, once the
/// body returns in it, as `multiprocessing` ends its fork children: the
/// standard streams are flushed, then `os._exit(code)` (no atexit handlers
/// run). The code is 0 when the body returned, that of `sys.exit(code)`
/// (None: 0; an int; anything else is printed and gives 1), or 1 after
/// printing the traceback of any other exception.
fn end_forked_child(py: Python<'_>, result: &std::thread::Result<PyResult<Py<PyAny>>>) -> ! {
    let code = match result {
        Ok(Ok(_)) => 0,
        Ok(Err(err)) if err.is_instance_of::<pyo3::exceptions::PySystemExit>(py) => {
            let code = err.value(py).getattr("code").ok();
            match code {
                None => 1,
                Some(c) if c.is_none() => 0,
                Some(c) => c.extract::<i32>().unwrap_or_else(|_| {
                    if let Ok(text) = c.str() {
                        let _ = py.import("sys").and_then(|sys| sys.getattr("stderr")?.call_method1("write", (format!("{text}\n"),)));
                    }
                    1
                }),
            }
        }
        Ok(Err(err)) => {
            err.clone_ref(py).print(py);
            1
        }
        Err(_) => 1,
    };
    let _ = py.run(
        c"import sys\nfor s in (sys.stdout, sys.stderr):\n    try:\n        s.flush()\n    except Exception:\n        pass\n",
        None,
        None,
    );
    let _ = py.import("os").and_then(|os| os.getattr("_exit")?.call1((code,)));
    // os._exit does not return; if it could not be called, leave the hard way.
    std::process::abort()
}

/// Schedules another attempt after a back-off. False when no retry is left
/// (or the token was resolved meanwhile).
fn try_retry(py: Python<'_>, token: &Arc<TokenInner>, call: Call, engine: &Arc<EngineShared>) -> bool {
    let left = token.retries_left.load(Ordering::Relaxed);
    if left == 0 || !token.core.requeue() {
        return false;
    }
    token.retries_left.store(left - 1, Ordering::Relaxed);
    let attempt = token.attempts.load(Ordering::Relaxed).max(1);
    let backoff = (token.retry_backoff * f64::from(2u32.saturating_pow(attempt - 1))).min(30.0);
    token.ledger().retries.fetch_add(1, Ordering::Relaxed);
    super::log::debug(py, "worker", || {
        format!("token {} ({}) failed attempt {attempt}; retrying in {backoff:.3}s", token.id, token.op().name)
    });
    let job = PyJob::new(token.clone(), call);
    engine.schedule_retry(py, job, std::time::Duration::from_secs_f64(backoff.max(0.0)));
    true
}

/// Runs the workers of one engine: attached to Python for their whole life.
#[derive(Debug, Default)]
pub(crate) struct PyHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
}

struct PyHooks<'a, 'py> {
    py: Python<'py>,
    host: &'a PyHost,
    engine: Weak<EngineShared>,
}

impl WorkerHooks<PyJob> for PyHooks<'_, '_> {
    fn execute(&mut self, job: PyJob, worker: &WorkerInfo) {
        if self.engine.strong_count() == 0 {
            // The engine is published right after the pool starts; jobs exist only after that.
            if let Some(e) = self.host.engine.get() {
                self.engine = e.clone();
                let w = self.engine.clone();
                WORKER.with(|slot| *slot.borrow_mut() = Some((w, *worker)));
            }
        }
        execute(self.py, job, worker, &self.engine);
    }

    fn idle(&mut self, wait: &mut (dyn FnMut() + Send)) {
        let slot = self.py.detach(|| {
            // Tell a caller that just saw its token finish that the interpreter is free.
            IDLE_EPOCH.fetch_add(1, Ordering::Release);
            wait();
            // At most one worker queues on the GIL at a time (see `attach.rs`).
            super::attach::before_attach()
        });
        super::attach::after_attach(slot);
    }
}

/// Counts workers going idle (each releases the interpreter first).
static IDLE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current idle epoch (see `settle_after_wait`).
pub(crate) fn idle_epoch() -> u64 {
    IDLE_EPOCH.load(Ordering::Acquire)
}

/// After a wait saw its token finish: the worker that finished it usually
/// releases the interpreter a moment later (it goes idle). Re-attaching
/// before that would block on the interpreter and cost a thread wake-up, so
/// spin up to `ATTACH_DELAY` for a worker to go idle first.
pub(crate) fn settle_after_wait(epoch_before: u64) {
    let start = std::time::Instant::now();
    while IDLE_EPOCH.load(Ordering::Acquire) == epoch_before && start.elapsed() < ATTACH_DELAY {
        std::hint::spin_loop();
    }
}

/// Runs the threads of an engine's I/O lane (attached for their whole life,
/// detached while they wait).
#[derive(Debug, Default)]
pub(crate) struct IoHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
}

impl crate::lane::LaneHost<PyJob> for IoHost {
    fn run_thread(&self, thread: crate::lane::LaneThread<PyJob>) {
        let mut slot = Some(thread);
        let attached = Python::try_attach(|py| {
            if let Some(thread) = slot.take() {
                let engine = self.engine.get().cloned().unwrap_or_default();
                let mut hooks = IoHooks { py, engine };
                thread.run(&mut hooks);
            }
        });
        if attached.is_none() {
            if let Some(thread) = slot.take() {
                thread.run(&mut NoPython);
            }
        }
    }
}

struct IoHooks<'py> {
    py: Python<'py>,
    engine: Weak<EngineShared>,
}

impl WorkerHooks<PyJob> for IoHooks<'_> {
    fn execute(&mut self, job: PyJob, worker: &WorkerInfo) {
        execute(self.py, job, worker, &self.engine);
    }

    fn idle(&mut self, wait: &mut (dyn FnMut() + Send)) {
        self.py.detach(wait);
    }
}

/// Used when the interpreter is gone: jobs are dropped (so cancelled).
struct NoPython;

impl WorkerHooks<PyJob> for NoPython {
    fn execute(&mut self, job: PyJob, _worker: &WorkerInfo) {
        drop(job);
    }
}

impl Host<PyJob> for PyHost {
    fn run_worker(&self, worker: WorkerLoop<PyJob>) {
        let mut slot = Some(worker);
        let attached = Python::try_attach(|py| {
            if let Some(worker) = slot.take() {
                super::attach::configure(py);
                let engine = self.engine.get().cloned().unwrap_or_default();
                WORKER.with(|w| *w.borrow_mut() = Some((engine.clone(), worker.info())));
                let mut hooks = PyHooks { py, host: self, engine };
                worker.run(&mut hooks);
                WORKER.with(|w| *w.borrow_mut() = None);
            }
        });
        if attached.is_none() {
            if let Some(worker) = slot.take() {
                worker.run(&mut NoPython);
            }
        }
    }
}
