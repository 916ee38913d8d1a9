//! `TaskToken`, the Python handle of a token (what a decorated call returns),
//! and `TokenAwait`, the iterator behind `await token`; with the module
//! functions that hand tokens to Python (`current_token`, `wait_all`).
//!
//! A handle is a thin `Arc` on the token's shared part (`token.rs`): the
//! state, outcome and listeners live there; waiting lives in `wait.rs`.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

use super::asyncio as aio;
use super::attach::{idle_epoch, settle_after_wait};
use super::exceptions::{self, BindError};
use super::thread::running_token;
use super::token::{call_thread_listener, LaneKind, Listener, Outcome, Slot, TokenInner};
use crate::engine::sync::{AtomicBool, Mutex, Ordering};
use crate::engine::token::{now_ns, ns_to_unix, Stamp, TokenCell, TokenState};

/// The handle a decorated call returns. See `tokengate/_tokengate.pyi`.
#[pyclass(frozen, weakref, name = "TaskToken", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct TaskToken {
    pub(crate) inner: Arc<TokenInner>,
}

fn stamp(cell: &TokenCell<Slot>, which: Stamp) -> Option<f64> {
    cell.time(which).map(ns_to_unix)
}

fn span(from: Option<u64>, to: Option<u64>) -> Option<f64> {
    let from = from?;
    let to = to.unwrap_or_else(now_ns);
    Some(to.saturating_sub(from) as f64 / 1e9)
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
            Err(e) if self.inner.cell.state() == TokenState::Cancelled => Err(e),
            Err(e) => Ok(Some(e.into_value(py).into_any())),
        }
    }

    fn done(&self) -> bool {
        self.inner.cell.is_done()
    }

    fn running(&self) -> bool {
        self.inner.cell.state() == TokenState::Executing
    }

    fn cancelled(&self) -> bool {
        self.inner.cell.state() == TokenState::Cancelled
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
        match self.inner.cell.state() {
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
        if self.inner.cell.cancel_requested() {
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

    /// "cpu" (the worker pool), "io" (the elastic I/O lane),
    /// "process" (the process lane), or the name of another outside lane.
    #[getter]
    fn lane(&self) -> String {
        match self.inner.lane {
            LaneKind::Cpu => "cpu".into(),
            LaneKind::Io(_) => "io".into(),
            LaneKind::Process => "process".into(),
            LaneKind::Outside(i) => self.inner.ledger().outside.get(usize::from(i)).map_or("process", |q| q.name()).into(),
        }
    }

    /// Attempts made so far (more than 1 after retries).
    #[getter]
    fn attempts(&self) -> u32 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// The original's name for "was this token killed".
    fn is_killed(&self) -> bool {
        self.inner.cell.state() == TokenState::Killed
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
        self.inner.cell.state().as_str()
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
        stamp(&self.inner.cell, Stamp::Created)
    }

    #[getter]
    fn admitted_at(&self) -> Option<f64> {
        stamp(&self.inner.cell, Stamp::Admitted)
    }

    #[getter]
    fn started_at(&self) -> Option<f64> {
        stamp(&self.inner.cell, Stamp::Started)
    }

    #[getter]
    fn finished_at(&self) -> Option<f64> {
        stamp(&self.inner.cell, Stamp::Finished)
    }

    /// Seconds from creation to start (to now while it waits; None if it never started).
    fn wait_time(&self) -> Option<f64> {
        let cell = &self.inner.cell;
        match cell.time(Stamp::Started) {
            Some(started) => span(cell.time(Stamp::Created), Some(started)),
            None if cell.is_done() => None,
            None => span(cell.time(Stamp::Created), None),
        }
    }

    /// Seconds from start to finish (to now while it runs; None if it never started).
    fn execution_time(&self) -> Option<f64> {
        let cell = &self.inner.cell;
        span(cell.time(Stamp::Started), cell.time(Stamp::Finished))
    }

    #[getter]
    fn worker_id(&self) -> Option<u32> {
        self.inner.cell.placement().0
    }

    #[getter]
    fn core_id(&self) -> Option<u32> {
        self.inner.cell.placement().1
    }

    /// True once someone asked the running task to stop (cancel, kill, timeout).
    #[getter]
    fn cancel_requested(&self) -> bool {
        self.inner.cell.cancel_requested()
    }

    /// Everything about the token as a dict.
    fn get_status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let cell = &self.inner.cell;
        d.set_item("token_id", self.inner.id)?;
        d.set_item("state", cell.state().as_str())?;
        d.set_item("operation_type", self.inner.spec().operation_type.bind(py))?;
        d.set_item("tags", self.inner.spec().tags_dict(py)?)?;
        d.set_item("created_at", self.created_at())?;
        d.set_item("admitted_at", self.admitted_at())?;
        d.set_item("started_at", self.started_at())?;
        d.set_item("finished_at", self.finished_at())?;
        d.set_item("age", span(cell.time(Stamp::Created), None))?;
        d.set_item("wait_time", self.wait_time())?;
        d.set_item("execution_time", self.execution_time())?;
        d.set_item("worker_id", self.worker_id())?;
        d.set_item("core_id", self.core_id())?;
        d.set_item("killed", cell.state() == TokenState::Killed)?;
        d.set_item("cancel_requested", cell.cancel_requested())?;
        d.set_item("priority", self.inner.priority)?;
        d.set_item("lane", self.lane())?;
        d.set_item("conductor_seed", self.inner.route.seed())?;
        let has_result = matches!(cell.lock().outcome, Some(Outcome::Value(_)));
        d.set_item("has_result", has_result)?;
        Ok(d)
    }

    /// Lane API (external tokens): marks the token as executing. False when
    /// it was cancelled or killed first (then it must not run).
    #[pyo3(signature = (worker_id=None))]
    fn _start(&self, worker_id: Option<u32>) -> bool {
        let started = self.inner.cell.start(worker_id.unwrap_or(u32::MAX - 1), None);
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
        if self.inner.cell.state() != TokenState::Cancelled {
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
        let epoch = idle_epoch();
        if inner.cell.is_done()
            || py.detach(|| {
                let done = inner.cell.spin_until_done(AWAIT_SPIN);
                if done {
                    settle_after_wait(epoch);
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
        if inner.cell.is_done() || me.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let msg = msg.filter(|m| !m.is_none());
        *me.message.lock() = msg.as_ref().map(|m| m.clone().unbind());
        inner.cancel(py, msg.as_ref());
        me.cancelled.store(true, Ordering::Release);
        if inner.cell.state() == TokenState::Cancelled {
            return true; // resolving the token delivered the wake-up already
        }
        for listener in inner.take_listeners_for(slf.as_any()) {
            match listener {
                Listener::Loop { queue, delivery } => queue.push_local(py, delivery),
                Listener::Thread { func, arg } => call_thread_listener(py, &func, &arg),
                Listener::Waiter(_) => {}
            }
        }
        true
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.token.get().inner.cell.state() == TokenState::Cancelled
    }

    fn done(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.token.get().inner.cell.is_done()
    }

    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(self.cancelled_error(py));
        }
        let inner = &self.token.get().inner;
        if !inner.cell.is_done() {
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

/// The token whose body runs on this thread, or None outside a task.
#[pyfunction]
pub(crate) fn current_token(py: Python<'_>) -> PyResult<Option<Py<TaskToken>>> {
    match running_token() {
        Some(inner) => Ok(Some(Py::new(py, TaskToken { inner })?)),
        None => Ok(None),
    }
}

/// Waits until every token in `tokens` is done (see `wait::wait_all`).
#[pyfunction]
#[pyo3(signature = (tokens, timeout=None))]
pub(crate) fn wait_all(py: Python<'_>, tokens: Vec<Bound<'_, TaskToken>>, timeout: Option<f64>) -> PyResult<bool> {
    super::wait::wait_all(py, tokens.iter().map(|t| &*t.get().inner), timeout)
}
