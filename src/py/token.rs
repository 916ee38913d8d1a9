//! `TaskToken`: the handle a decorated call returns.
//!
//! A token's shared part (`TokenInner`) is owned by the Python object, by
//! the job in the run queue, and by listeners. Its outcome and listeners
//! live in the lock-protected slot of the engine's [`TokenCore`]; see
//! `src/token.rs` for the state protocol. Listeners are taken out of the slot
//! by the resolving thread and fired after the lock is released:
//!
//! * `Listener::Thread` (registered with no running event loop): called on
//!   the resolving thread, as `concurrent.futures` does.
//! * `Listener::Loop` (registered from a thread running an event loop, which
//!   is how asyncio's `Task` and `gather` register): queued on that loop's
//!   completion queue (`asyncio.rs`), called on the loop thread.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

use super::asyncio::{self as aio, Delivery, LoopQueue};
use super::exceptions::{self, BindError};
use super::ledger::{Ledger, OpState};
use super::routing::Route;
use super::spec::{Binding, SpecShared};
use super::wait::{timeout_arg, wait_detached};
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Mutex, Ordering};
use crate::token::{now_ns, ns_to_unix, Stamp, TokenCore, TokenState};

/// What a finished body produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The returned value.
    Value(Py<PyAny>),
    /// The exception instance (raised by the body, or made by tokengate: killed, panic).
    Error(Py<PyAny>),
}

/// Someone to tell when the token resolves.
#[derive(Debug)]
pub(crate) enum Listener {
    /// Call `func(arg)` on the resolving thread.
    Thread { func: Py<PyAny>, arg: Py<PyAny> },
    /// Call `func(arg)` on an event loop's thread.
    Loop { queue: Arc<LoopQueue>, delivery: Delivery },
    /// A token that takes this one as an argument.
    Dependent(Arc<super::deps::DepWait>),
    /// A `wait_all` counting its tokens down.
    Latch(Arc<super::wait::Latch>),
}

/// The lock-protected part of a token.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) outcome: Option<Outcome>,
    pub(crate) listeners: Vec<Listener>,
}

/// Per-call scheduling options (from tags, overridden per call).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallOptions {
    /// Higher runs first; 0 is the plain FIFO path.
    pub(crate) priority: i64,
    /// Seconds from the call to the token's deadline.
    pub(crate) timeout: Option<f64>,
    /// Extra attempts after a failure.
    pub(crate) retries: u32,
    /// First back-off between attempts, in seconds (doubles each time).
    pub(crate) retry_backoff: f64,
}

/// The shared part of a token.
#[derive(Debug)]
pub(crate) struct TokenInner {
    pub(crate) core: TokenCore<Slot>,
    pub(crate) id: u64,
    /// Its operation, on its engine (spec, ledger and operation state).
    bind: Arc<Binding>,
    pub(crate) priority: i64,
    /// `now_ns` deadline, 0 for none.
    pub(crate) deadline_ns: AtomicU64,
    pub(crate) retries_left: AtomicU32,
    pub(crate) attempts: AtomicU32,
    pub(crate) retry_backoff: f64,
    /// Pin to release at resolution (sticky key or lead domain).
    pub(crate) route: Route,
    /// The worker this token must run on (sticky anchors, lead children).
    pub(crate) pinned: Option<usize>,
    /// Which lane runs it.
    pub(crate) lane: LaneKind,
    /// A lead token (its domain's core is recorded when it starts).
    pub(crate) is_lead: bool,
    /// Where the ledger's registry holds it: shard << 32 | slot (MAX: not registered).
    pub(crate) registry_slot: AtomicU64,
    /// The call, until someone takes it to run it (see `job.rs`).
    pub(crate) call: crate::sync::Mutex<super::job::CallSlot>,
}

/// The lane a token runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LaneKind {
    /// The CPU work-stealing pool.
    #[default]
    Cpu,
    /// The elastic I/O lane, in one storage tier.
    Io(usize),
    /// Worker processes (`process_pool` tokens, driven by `tokengate._process`).
    Process,
}

/// Routing decided at call time.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    pub(crate) route: Route,
    pub(crate) pinned: Option<usize>,
    pub(crate) lane: LaneKind,
    pub(crate) is_lead: bool,
}

impl TokenInner {
    /// A new token; `call` is what a worker will run (None for tokens a lane outside the pool drives).
    pub(crate) fn new(id: u64, bind: Arc<Binding>, opts: &CallOptions, placement: Placement, call: Option<super::job::Call>) -> Arc<Self> {
        Arc::new(TokenInner {
            call: crate::sync::Mutex::new(super::job::CallSlot::new(call)),
            registry_slot: AtomicU64::new(u64::MAX),
            route: placement.route,
            pinned: placement.pinned,
            lane: placement.lane,
            is_lead: placement.is_lead,
            core: TokenCore::new(Slot::default()),
            id,
            bind,
            priority: opts.priority,
            deadline_ns: AtomicU64::new(0),
            retries_left: AtomicU32::new(opts.retries),
            attempts: AtomicU32::new(0),
            retry_backoff: opts.retry_backoff,
        })
    }

    /// The decorated function's record.
    #[inline]
    pub(crate) fn spec(&self) -> &Arc<SpecShared> {
        &self.bind.spec
    }

    /// The books of its engine.
    #[inline]
    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.bind.ledger
    }

    /// Its operation's state on its engine.
    #[inline]
    pub(crate) fn op(&self) -> &Arc<OpState> {
        &self.bind.op
    }

    /// Resolves the token once: moves to `to` if `allowed(current)`, stores
    /// `outcome`, then fires listeners. False when it was resolved already.
    pub(crate) fn resolve(&self, py: Python<'_>, allowed: impl Fn(TokenState) -> bool, to: TokenState, outcome: Option<Outcome>) -> bool {
        self.resolve_at(py, allowed, to, outcome, None)
    }

    /// `resolve` with the finish time already read (`None`: read it now).
    pub(crate) fn resolve_at(
        &self,
        py: Python<'_>,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        outcome: Option<Outcome>,
        finished_ns: Option<u64>,
    ) -> bool {
        let error = match &outcome {
            Some(Outcome::Error(e)) => e.bind(py).get_type().name().ok().map(|n| n.to_string()),
            _ => None,
        };
        match self.resolve_quiet_at(allowed, to, outcome, error, finished_ns) {
            Some(listeners) => {
                fire(py, listeners);
                true
            }
            None => false,
        }
    }

    /// Like `resolve`, but hands the listeners back instead of firing them
    /// (for callers that may not be attached to the interpreter).
    pub(crate) fn resolve_quiet(
        &self,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        outcome: Option<Outcome>,
        error: Option<String>,
    ) -> Option<Vec<Listener>> {
        self.resolve_quiet_at(allowed, to, outcome, error, None)
    }

    fn resolve_quiet_at(
        &self,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        outcome: Option<Outcome>,
        error: Option<String>,
        finished_ns: Option<u64>,
    ) -> Option<Vec<Listener>> {
        // The books are kept before the terminal state is published.
        let listeners = self.core.resolve_at(allowed, to, finished_ns, |slot| {
            // The state it leaves is still visible here (see `TokenCore::resolve_at`).
            if self.lane == LaneKind::Process && self.core.state() == TokenState::Executing {
                self.ledger().process_running.fetch_sub(1, Ordering::Relaxed);
            }
            slot.outcome = outcome;
            self.ledger().record_resolved(self, to, error);
            std::mem::take(&mut slot.listeners)
        })?;
        Some(listeners)
    }

    /// Cancels a token whose job was dropped without running (pool gone).
    /// May run on any thread, attached or not.
    pub(crate) fn cancel_unrun(&self) {
        if let Some(listeners) = self.resolve_quiet(|_| true, TokenState::Cancelled, None, None) {
            if !listeners.is_empty() {
                // Without an interpreter (finalizing) there is nobody left to tell.
                let _ = Python::try_attach(|py| fire(py, listeners));
            }
        }
    }

    /// The outcome as a Python return value or exception. The token must be done.
    ///
    /// `asyncio`: for an awaiting coroutine or an asyncio callback. A
    /// cancelled token then raises `asyncio.CancelledError` (with the message
    /// of `cancel(msg)`), and a body's `StopIteration` arrives as a
    /// `RuntimeError` (see `exceptions::for_await`).
    pub(crate) fn outcome(&self, py: Python<'_>, asyncio: bool) -> PyResult<Py<PyAny>> {
        let state = self.core.state();
        if state == TokenState::Cancelled && !asyncio {
            return Err(BindError::Cancelled.into_pyerr(py));
        }
        let slot = self.read_slot()?;
        match (&slot.outcome, state) {
            // A cancel with a message keeps the message as the value (see `cancel_note`).
            (Some(Outcome::Value(msg)), TokenState::Cancelled) => Err(exceptions::asyncio_cancelled_with(py, Some(msg.bind(py)))),
            (_, TokenState::Cancelled) => Err(exceptions::asyncio_cancelled(py)),
            (Some(Outcome::Value(v)), _) => Ok(v.clone_ref(py)),
            (Some(Outcome::Error(e)), _) if asyncio => Err(exceptions::for_await(py, PyErr::from_value(e.bind(py).clone()))),
            (Some(Outcome::Error(e)), _) => Err(PyErr::from_value(e.bind(py).clone())),
            (None, _) => Err(BindError::Runtime(format!("token in state {} has no outcome", state.as_str())).into_pyerr(py)),
        }
    }

    /// The slot, to read the outcome of a resolved token.
    fn read_slot(&self) -> Result<crate::sync::MutexGuard<'_, Slot>, BindError> {
        if super::engine::check_not_forked().is_ok() {
            Ok(self.core.lock())
        } else {
            // Forked: a parent thread may have held the slot at the fork (resolving this token).
            self.core.try_lock().ok_or(BindError::Forked)
        }
    }

    /// Blocks (detached, Ctrl-C aware) until done; Err(TimeoutError) after `timeout`.
    pub(crate) fn wait(self: &Arc<Self>, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        if self.core.is_done() {
            return Ok(());
        }
        super::engine::check_not_forked()?;
        if super::job::is_current_token(self) {
            return Err(BindError::SelfWait.into());
        }
        let timeout = timeout_arg(timeout)?;
        if super::job::on_worker_thread() {
            // A task waiting on another token: run queued work meanwhile, so
            // that nested waits cannot exhaust the workers (help while waiting).
            return if super::job::help_until_done(py, self, timeout)? { Ok(()) } else { Err(BindError::WaitTimeout.into_pyerr(py)) };
        }
        // Nobody started it and the caller waits for as long as it takes: it runs the token itself.
        if timeout.is_none() && super::job::run_on_caller(py, self) && self.core.is_done() {
            return Ok(());
        }
        let _lent = super::job::LentUnits::lend();
        let epoch = super::job::idle_epoch();
        let done = wait_detached(py, timeout, |step| {
            let done = self.core.wait(Some(step));
            if done {
                super::job::settle_after_wait(epoch);
            }
            done
        })?;
        if done {
            Ok(())
        } else {
            Err(BindError::WaitTimeout.into_pyerr(py))
        }
    }

    /// Kills the token: waiters get `TaskKilledError(reason)` at once; a
    /// running body sees its cancel flag and its result is dropped.
    pub(crate) fn kill(&self, py: Python<'_>, reason: &str) -> PyResult<bool> {
        let value = exceptions::killed_value(py, reason)?;
        self.core.request_cancel();
        Ok(self.resolve(py, |_| true, TokenState::Killed, Some(Outcome::Error(value))))
    }

    /// The deadline passed: a queued token never runs; a running one's
    /// waiters get `TaskTimeoutError` now and its body sees the cancel flag.
    pub(crate) fn expire(&self, py: Python<'_>) {
        let was = self.core.state();
        if was.is_terminal() {
            return;
        }
        let value = exceptions::timeout_value(py, self.id, &self.op().name);
        self.core.request_cancel();
        if self.resolve(py, |_| true, TokenState::Timeout, Some(Outcome::Error(value))) {
            let counter = if was == TokenState::Executing { &self.ledger().timeouts_running } else { &self.ledger().timeouts_queued };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cancels the token if it has not started (no cancel flag otherwise).
    pub(crate) fn cancel_pending(&self, py: Python<'_>) -> bool {
        self.resolve(py, TokenState::is_pending, TokenState::Cancelled, None)
    }

    /// `cancel()`: cancels a token that has not started. A running token
    /// cannot be cancelled; its cooperative cancel flag is set instead.
    ///
    /// `msg` (asyncio's `cancel(msg)`) is kept for asyncio callers: see `outcome`.
    pub(crate) fn cancel(&self, py: Python<'_>, msg: Option<&Bound<'_, PyAny>>) -> bool {
        if self.resolve(py, TokenState::is_pending, TokenState::Cancelled, cancel_note(msg)) {
            return true;
        }
        match self.core.state() {
            TokenState::Cancelled => true,
            TokenState::Executing => {
                self.core.request_cancel();
                false
            }
            _ => false,
        }
    }

    /// asyncio's `cancel()` of a running token (asyncio.wait_for, gather
    /// and friends hold the token itself as their future, and wait for a
    /// cancelled future to be done): resolves it as cancelled now. The body
    /// runs on with its cancel flag set, and its outcome is dropped, as
    /// after `kill`. (Awaiting the token directly goes through
    /// `TokenAwait`, whose cancel ends only that await.)
    pub(crate) fn cancel_running(&self, py: Python<'_>, msg: Option<&Bound<'_, PyAny>>) -> bool {
        self.core.request_cancel();
        self.resolve(py, |s| s == TokenState::Executing, TokenState::Cancelled, cancel_note(msg))
    }

    /// Registers `func(arg)` to run once the token resolves; runs it now
    /// (or schedules it on the running loop) if it already has.
    pub(crate) fn add_listener(
        &self,
        py: Python<'_>,
        func: Bound<'_, PyAny>,
        arg: Py<PyAny>,
        context: Option<Py<PyAny>>,
        on_thread: bool,
    ) -> PyResult<()> {
        let running_loop = if on_thread { None } else { aio::running_loop(py)? };
        let listener = match &running_loop {
            Some(event_loop) => {
                Listener::Loop { queue: aio::queue_for(py, event_loop), delivery: Delivery { func: func.unbind(), arg, context } }
            }
            None => Listener::Thread { func: func.unbind(), arg },
        };
        {
            let mut slot = self.core.lock();
            if !self.core.is_done() {
                slot.listeners.push(listener);
                return Ok(());
            }
        }
        match listener {
            Listener::Thread { func, arg } => call_thread_listener(py, &func, &arg),
            Listener::Loop { queue, delivery } => queue.push_local(py, delivery),
            Listener::Dependent(wait) => wait.input_done(py),
            Listener::Latch(latch) => latch.count_down(),
        }
        Ok(())
    }

    /// Registers `listener` (a dependent token's wait, a `wait_all` latch)
    /// unless the token is done already: then false, and nothing is kept.
    pub(crate) fn add_if_pending(&self, listener: Listener) -> bool {
        let mut slot = self.core.lock();
        if self.core.is_done() {
            return false;
        }
        slot.listeners.push(listener);
        true
    }

    /// Takes out the listeners registered with `arg` (by identity).
    pub(crate) fn take_listeners_for(&self, arg: &Bound<'_, PyAny>) -> Vec<Listener> {
        let mut slot = self.core.lock();
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut slot.listeners).into_iter().partition(|l| match l {
            Listener::Thread { arg: a, .. } => a.as_ptr() == arg.as_ptr(),
            Listener::Loop { delivery, .. } => delivery.arg.as_ptr() == arg.as_ptr(),
            Listener::Dependent(_) | Listener::Latch(_) => false,
        });
        slot.listeners = rest;
        mine
    }

    /// Removes every listener whose function equals `func`; returns how many.
    pub(crate) fn remove_listener(&self, py: Python<'_>, func: &Bound<'_, PyAny>) -> PyResult<usize> {
        let removed: Vec<Listener> = {
            let mut slot = self.core.lock();
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut slot.listeners).into_iter().partition(|l| {
                let f = match l {
                    Listener::Thread { func, .. } => func,
                    Listener::Loop { delivery, .. } => &delivery.func,
                    Listener::Dependent(_) | Listener::Latch(_) => return false,
                };
                f.bind(py).eq(func).unwrap_or(false)
            });
            slot.listeners = kept;
            gone
        };
        Ok(removed.len())
    }
}

/// Fires listeners taken out of a resolved token.
pub(crate) fn fire(py: Python<'_>, listeners: Vec<Listener>) {
    for listener in listeners {
        match listener {
            Listener::Thread { func, arg } => call_thread_listener(py, &func, &arg),
            Listener::Loop { queue, delivery } => queue.push(py, delivery),
            Listener::Dependent(wait) => wait.input_done(py),
            Listener::Latch(latch) => latch.count_down(),
        }
    }
}

fn call_thread_listener(py: Python<'_>, func: &Py<PyAny>, arg: &Py<PyAny>) {
    if let Err(err) = func.call1(py, (arg.clone_ref(py),)) {
        super::log::callback_error(py, arg.bind(py), err);
    }
}

/// The handle a decorated call returns. See `tokengate/_tokengate.pyi`.
#[pyclass(frozen, weakref, name = "TaskToken", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct TaskToken {
    pub(crate) inner: Arc<TokenInner>,
}

fn stamp(core: &TokenCore<Slot>, which: Stamp) -> Option<f64> {
    core.time(which).map(ns_to_unix)
}

fn span(from: Option<u64>, to: Option<u64>) -> Option<f64> {
    let from = from?;
    let to = to.unwrap_or_else(now_ns);
    Some(to.saturating_sub(from) as f64 / 1e9)
}

/// The outcome a cancel leaves: the message asyncio gave (`cancel(msg)`),
/// kept as the value of the cancelled token; each raise builds a fresh
/// `CancelledError(msg)` from it (see `outcome`), as `asyncio.Future` does: a
/// stored exception would carry the traceback of every frame it was raised
/// through, and those frames the token.
fn cancel_note(msg: Option<&Bound<'_, PyAny>>) -> Option<Outcome> {
    msg.map(|m| Outcome::Value(m.clone().unbind()))
}

#[pymethods]
impl TaskToken {
    /// Waits for the result (re-raising the task's exception).
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        self.inner.wait(py, timeout)?;
        self.inner.outcome(py, false)
    }

    /// The original Py-TokenGate name of `result`.
    #[pyo3(signature = (timeout=None))]
    fn get(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        self.result(py, timeout)
    }

    /// Waits, then returns the task's exception (None if it succeeded).
    #[pyo3(signature = (timeout=None))]
    ///
    /// On a thread that runs an event loop (where `asyncio.gather` calls it
    /// from its callback), a body's `StopIteration` is given as the
    /// `RuntimeError` that `await` raises (see `exceptions::for_await`).
    fn exception(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        self.inner.wait(py, timeout)?;
        let outcome = self.inner.outcome(py, false);
        let on_loop = || matches!(aio::running_loop(py), Ok(Some(_)));
        let outcome = match outcome {
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) && on_loop() => Err(exceptions::for_await(py, e)),
            other => other,
        };
        match outcome {
            Ok(_) => Ok(None),
            Err(e) if self.inner.core.state() == TokenState::Cancelled => Err(e),
            Err(e) => Ok(Some(e.into_value(py).into_any())),
        }
    }

    fn done(&self) -> bool {
        self.inner.core.is_done()
    }

    fn running(&self) -> bool {
        self.inner.core.state() == TokenState::Executing
    }

    fn cancelled(&self) -> bool {
        self.inner.core.state() == TokenState::Cancelled
    }

    /// Cancels the token if it has not started. On a thread running an
    /// event loop the token is an asyncio future, and asyncio's contract
    /// holds: a running token is cancelled too (see `cancel_running`).
    /// `msg` is accepted for asyncio compatibility.
    #[pyo3(signature = (msg=None))]
    fn cancel(&self, py: Python<'_>, msg: Option<Bound<'_, PyAny>>) -> bool {
        let msg = msg.as_ref().filter(|m| !m.is_none());
        if self.inner.cancel(py, msg) {
            return true;
        }
        match self.inner.core.state() {
            TokenState::Executing => matches!(aio::running_loop(py), Ok(Some(_))) && self.inner.cancel_running(py, msg),
            // A failed attempt went back to the queue for a retry meanwhile.
            s if s.is_pending() => self.inner.cancel(py, msg),
            _ => false,
        }
    }

    /// Kills the token: its waiters get `TaskKilledError(reason)` at once.
    #[pyo3(signature = (reason="admin_override"))]
    fn kill(&self, py: Python<'_>, reason: &str) -> PyResult<bool> {
        self.inner.kill(py, reason)
    }

    /// Raises `TaskCancelledError`-style `concurrent.futures.CancelledError`
    /// inside a task whose token was asked to stop (cancel, kill, timeout).
    fn check_cancelled(&self, py: Python<'_>) -> PyResult<()> {
        if self.inner.core.cancel_requested() {
            return Err(BindError::Cancelled.into_pyerr(py));
        }
        Ok(())
    }

    /// The token's priority (higher runs first).
    #[getter]
    fn priority(&self) -> i64 {
        self.inner.priority
    }

    /// The lead domain's seed (leads and the calls made inside them), else None.
    #[getter]
    fn conductor_seed(&self) -> Option<&str> {
        self.inner.route.seed()
    }

    /// True for a lead token (tagged `external_calls`).
    #[getter]
    fn is_lead(&self) -> bool {
        self.inner.is_lead
    }

    /// "cpu" (the work-stealing pool), "io" (the elastic I/O lane) or
    /// "process" (the process lane).
    #[getter]
    fn lane(&self) -> &'static str {
        match self.inner.lane {
            LaneKind::Cpu => "cpu",
            LaneKind::Io(_) => "io",
            LaneKind::Process => "process",
        }
    }

    /// Attempts made so far (more than 1 after retries).
    #[getter]
    fn attempts(&self) -> u32 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// The original's name for "was this token killed".
    fn is_killed(&self) -> bool {
        self.inner.core.state() == TokenState::Killed
    }

    #[pyo3(signature = (func, *, context=None))]
    fn add_done_callback(slf: &Bound<'_, Self>, func: Bound<'_, PyAny>, context: Option<Py<PyAny>>) -> PyResult<()> {
        if !func.is_callable() {
            return Err(PyTypeError::new_err(format!("add_done_callback() needs a callable, got {}", func.get_type().name()?)));
        }
        let arg = slf.clone().into_any().unbind();
        slf.get().inner.add_listener(slf.py(), func, arg, context, false)
    }

    /// Like `add_done_callback`, but always calls `func` on the resolving thread.
    fn _add_thread_callback(slf: &Bound<'_, Self>, func: Bound<'_, PyAny>) -> PyResult<()> {
        let arg = slf.clone().into_any().unbind();
        slf.get().inner.add_listener(slf.py(), func, arg, None, true)
    }

    fn remove_done_callback(&self, py: Python<'_>, func: Bound<'_, PyAny>) -> PyResult<usize> {
        self.inner.remove_listener(py, &func)
    }

    #[getter]
    fn state(&self) -> &'static str {
        self.inner.core.state().as_str()
    }

    #[getter]
    fn token_id(&self) -> u64 {
        self.inner.id
    }

    #[getter]
    fn operation_type(&self, py: Python<'_>) -> Py<PyAny> {
        self.inner.spec().operation_type.clone_ref(py).into_any()
    }

    #[getter]
    fn tags(&self, py: Python<'_>) -> Py<PyAny> {
        self.inner.spec().tags.clone_ref(py)
    }

    #[getter]
    fn created_at(&self) -> Option<f64> {
        stamp(&self.inner.core, Stamp::Created)
    }

    #[getter]
    fn admitted_at(&self) -> Option<f64> {
        stamp(&self.inner.core, Stamp::Admitted)
    }

    #[getter]
    fn started_at(&self) -> Option<f64> {
        stamp(&self.inner.core, Stamp::Started)
    }

    #[getter]
    fn finished_at(&self) -> Option<f64> {
        stamp(&self.inner.core, Stamp::Finished)
    }

    /// Seconds from creation to start (to now while it waits; None if it never started).
    fn wait_time(&self) -> Option<f64> {
        let core = &self.inner.core;
        match core.time(Stamp::Started) {
            Some(started) => span(core.time(Stamp::Created), Some(started)),
            None if core.is_done() => None,
            None => span(core.time(Stamp::Created), None),
        }
    }

    /// Seconds from start to finish (to now while it runs; None if it never started).
    fn execution_time(&self) -> Option<f64> {
        let core = &self.inner.core;
        span(core.time(Stamp::Started), core.time(Stamp::Finished))
    }

    #[getter]
    fn worker_id(&self) -> Option<u32> {
        self.inner.core.placement().0
    }

    #[getter]
    fn core_id(&self) -> Option<u32> {
        self.inner.core.placement().1
    }

    /// True once someone asked the running task to stop (cancel, kill, timeout).
    #[getter]
    fn cancel_requested(&self) -> bool {
        self.inner.core.cancel_requested()
    }

    /// Everything about the token as a dict.
    fn get_status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let core = &self.inner.core;
        d.set_item("token_id", self.inner.id)?;
        d.set_item("state", core.state().as_str())?;
        d.set_item("operation_type", self.inner.spec().operation_type.bind(py))?;
        d.set_item("tags", self.inner.spec().tags_dict(py)?)?;
        d.set_item("created_at", self.created_at())?;
        d.set_item("admitted_at", self.admitted_at())?;
        d.set_item("started_at", self.started_at())?;
        d.set_item("finished_at", self.finished_at())?;
        d.set_item("age", span(core.time(Stamp::Created), None))?;
        d.set_item("wait_time", self.wait_time())?;
        d.set_item("execution_time", self.execution_time())?;
        d.set_item("worker_id", self.worker_id())?;
        d.set_item("core_id", self.core_id())?;
        d.set_item("killed", core.state() == TokenState::Killed)?;
        d.set_item("cancel_requested", core.cancel_requested())?;
        d.set_item("priority", self.inner.priority)?;
        d.set_item("lane", self.lane())?;
        d.set_item("conductor_seed", self.inner.route.seed())?;
        let has_result = matches!(core.lock().outcome, Some(Outcome::Value(_)));
        d.set_item("has_result", has_result)?;
        Ok(d)
    }

    /// Lane API (external tokens): marks the token as executing. False when
    /// it was cancelled or killed first (then it must not run).
    #[pyo3(signature = (worker_id=None))]
    fn _start(&self, worker_id: Option<u32>) -> bool {
        let started = self.inner.core.start(worker_id.unwrap_or(u32::MAX - 1), None);
        if started && self.inner.lane == LaneKind::Process {
            self.inner.ledger().process_running.fetch_add(1, Ordering::Relaxed);
        }
        started
    }

    /// Lane API: resolves the token with a value. False if it was already resolved.
    fn _set_result(&self, py: Python<'_>, value: Py<PyAny>) -> bool {
        self.inner.resolve(py, |_| true, TokenState::Completed, Some(Outcome::Value(value)))
    }

    /// Lane API: resolves the token with an exception instance. `state` is
    /// "failed" (default), "timeout" or "killed". False if already resolved.
    #[pyo3(signature = (exc, state="failed"))]
    fn _set_exception(&self, py: Python<'_>, exc: Bound<'_, PyAny>, state: &str) -> PyResult<bool> {
        if !exc.is_instance_of::<pyo3::exceptions::PyBaseException>() {
            return Err(PyTypeError::new_err("_set_exception() needs an exception instance"));
        }
        let to = match state {
            "failed" => TokenState::Failed,
            "timeout" => TokenState::Timeout,
            "killed" => TokenState::Killed,
            other => return Err(BindError::Value(format!("state must be 'failed', 'timeout' or 'killed', not {other:?}")).into()),
        };
        Ok(self.inner.resolve(py, |_| true, to, Some(Outcome::Error(exc.unbind()))))
    }

    /// The loop of the caller (tokens are not bound to one loop).
    fn get_loop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        aio::get_running_loop(py)
    }

    /// asyncio's hook for the error of a cancelled future (used by `gather`):
    /// a new `asyncio.CancelledError`, with the message of `cancel(msg)` if any.
    fn _make_cancelled_error(&self, py: Python<'_>) -> Py<PyAny> {
        exceptions::asyncio_cancelled_with(py, self._cancel_message(py).as_ref().map(|m| m.bind(py))).into_value(py).into_any()
    }

    /// The message of `cancel(msg)` (asyncio reads it on cancelled futures).
    #[getter]
    fn _cancel_message(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        if self.inner.core.state() != TokenState::Cancelled {
            return None;
        }
        let slot = self.inner.read_slot().ok()?;
        match &slot.outcome {
            Some(Outcome::Value(msg)) => Some(msg.clone_ref(py)),
            _ => None,
        }
    }

    /// Marks tokens as asyncio-compatible futures (`asyncio.isfuture`), so
    /// `asyncio.gather` registers a callback instead of wrapping each token in a Task.
    #[getter(_asyncio_future_blocking)]
    fn asyncio_future_blocking(&self) -> bool {
        false
    }

    fn __await__(slf: &Bound<'_, Self>) -> TokenAwait {
        TokenAwait {
            token: slf.clone().unbind(),
            blocking: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            message: Mutex::new(None),
        }
    }

    /// `TaskToken[int]`: a `types.GenericAlias`, as for the standard library's generic classes,
    /// so that annotations evaluated at runtime match the stubs.
    #[classmethod]
    fn __class_getitem__<'py>(cls: &Bound<'py, PyType>, item: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        py.import(pyo3::intern!(py, "types"))?.getattr(pyo3::intern!(py, "GenericAlias"))?.call1((cls, item))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let op = self.inner.spec().operation_type.bind(py).repr()?;
        Ok(format!("<TaskToken id={} operation_type={} state={}>", self.inner.id, op, self.state()))
    }
}

/// How long `await token` spins for a token about to finish before it suspends.
const AWAIT_SPIN: std::time::Duration = std::time::Duration::from_micros(20);

/// The iterator behind `await token`. It yields itself as a future-like
/// object (asyncio's `Task` then registers its wake-up with
/// `add_done_callback`, which reaches the token's loop queue) and returns
/// the token's result once it is done.
#[pyclass(frozen, name = "TokenAwait", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct TokenAwait {
    token: Py<TaskToken>,
    blocking: AtomicBool,
    /// The awaiting task was cancelled: this await ends with `CancelledError`
    /// even if the token itself runs on (its cancel flag is set).
    cancelled: AtomicBool,
    /// The message of that cancel (`task.cancel(msg)`), for its `CancelledError`.
    message: Mutex<Option<Py<PyAny>>>,
}

impl TokenAwait {
    /// `asyncio.CancelledError`, with the message of the cancel that ended this await.
    fn cancelled_error(&self, py: Python<'_>) -> PyErr {
        let message = self.message.lock().as_ref().map(|m| m.clone_ref(py));
        exceptions::asyncio_cancelled_with(py, message.as_ref().map(|m| m.bind(py)))
    }

    fn step(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if slf.get().cancelled.load(Ordering::Acquire) {
            return Err(slf.get().cancelled_error(py));
        }
        let inner = &slf.get().token.get().inner;
        // A short task is often done within microseconds: wait that long
        // (detached) rather than suspend the task and pay a loop wake-up.
        let epoch = super::job::idle_epoch();
        if inner.core.is_done()
            || py.detach(|| {
                let done = inner.core.spin_until_done(AWAIT_SPIN);
                if done {
                    super::job::settle_after_wait(epoch);
                }
                done
            })
        {
            let value = inner.outcome(py, true)?;
            return Err(pyo3::exceptions::PyStopIteration::new_err((value,)));
        }
        slf.get().blocking.store(true, Ordering::Relaxed);
        Ok(slf.clone().into_any().unbind())
    }
}

#[pymethods]
impl TokenAwait {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::step(slf)
    }

    #[pyo3(signature = (_value=None))]
    fn send(slf: &Bound<'_, Self>, _value: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        Self::step(slf)
    }

    /// Re-raises what the driver throws in (asyncio throws `CancelledError` when the awaiting task is cancelled).
    #[pyo3(signature = (typ, val=None, _tb=None))]
    fn throw(&self, py: Python<'_>, typ: Bound<'_, PyAny>, val: Option<Bound<'_, PyAny>>, _tb: Option<Py<PyAny>>) -> PyResult<()> {
        let exc = match val {
            Some(v) if !v.is_none() => v,
            _ if typ.is_instance_of::<pyo3::exceptions::PyBaseException>() => typ,
            _ => typ.call0()?,
        };
        let _ = py;
        Err(PyErr::from_value(exc))
    }

    fn close(&self) {}

    #[getter(_asyncio_future_blocking)]
    fn get_blocking(&self) -> bool {
        self.blocking.load(Ordering::Relaxed)
    }

    #[setter(_asyncio_future_blocking)]
    fn set_blocking(&self, value: bool) {
        self.blocking.store(value, Ordering::Relaxed);
    }

    fn get_loop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        aio::get_running_loop(py)
    }

    fn _make_cancelled_error(&self, py: Python<'_>) -> Py<PyAny> {
        self.cancelled_error(py).into_value(py).into_any()
    }

    #[getter]
    fn _cancel_message(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.message.lock().as_ref().map(|m| m.clone_ref(py))
    }

    #[pyo3(signature = (func, *, context=None))]
    fn add_done_callback(slf: &Bound<'_, Self>, func: Bound<'_, PyAny>, context: Option<Py<PyAny>>) -> PyResult<()> {
        let arg = slf.clone().into_any().unbind();
        slf.get().token.get().inner.add_listener(slf.py(), func, arg, context, false)
    }

    fn remove_done_callback(&self, py: Python<'_>, func: Bound<'_, PyAny>) -> PyResult<usize> {
        self.token.get().inner.remove_listener(py, &func)
    }

    /// Called by asyncio when the awaiting task is cancelled: cancels the
    /// token if it has not started, else sets its cooperative cancel flag;
    /// either way this await ends now with `CancelledError` (the task's
    /// wake-up is delivered at once, not when the token finishes).
    #[pyo3(signature = (msg=None))]
    fn cancel(slf: &Bound<'_, Self>, msg: Option<Bound<'_, PyAny>>) -> bool {
        let py = slf.py();
        let me = slf.get();
        let inner = &me.token.get().inner;
        if inner.core.is_done() || me.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let msg = msg.filter(|m| !m.is_none());
        *me.message.lock() = msg.as_ref().map(|m| m.clone().unbind());
        inner.cancel(py, msg.as_ref());
        me.cancelled.store(true, Ordering::Release);
        if inner.core.state() == TokenState::Cancelled {
            return true; // resolving the token delivered the wake-up already
        }
        for listener in inner.take_listeners_for(slf.as_any()) {
            match listener {
                Listener::Loop { queue, delivery } => queue.push_local(py, delivery),
                Listener::Thread { func, arg } => call_thread_listener(py, &func, &arg),
                Listener::Dependent(_) | Listener::Latch(_) => {}
            }
        }
        true
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.token.get().inner.core.state() == TokenState::Cancelled
    }

    fn done(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.token.get().inner.core.is_done()
    }

    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(self.cancelled_error(py));
        }
        let inner = &self.token.get().inner;
        if !inner.core.is_done() {
            return Err(py.import("asyncio")?.getattr("InvalidStateError")?.call1(("Result is not ready.",)).map(PyErr::from_value)?);
        }
        inner.outcome(py, true)
    }

    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.result(py) {
            Ok(_) => Ok(None),
            Err(e) if self.cancelled() => Err(e),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyException>(py) && !self.done() => Err(e),
            Err(e) => Ok(Some(e.into_value(py).into_any())),
        }
    }

    /// The token being awaited.
    #[getter]
    fn token(&self, py: Python<'_>) -> Py<TaskToken> {
        self.token.clone_ref(py)
    }
}
