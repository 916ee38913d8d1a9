//! The one place where internal errors become Python exceptions.
//!
//! The exception classes themselves are defined in Python
//! (`python/tokengate/exceptions.py`) so that they can derive from two bases
//! (`NotStartedError(TokengateError, RuntimeError)`); they are imported here
//! lazily and cached.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use crate::engine::error::Error;
use crate::engine::token::TokenState;

/// Errors raised by the binding layer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BindError {
    /// No coordinator is running.
    NotStarted,
    /// The coordinator is stopping or stopped.
    ShutDown,
    /// Interpreter shutdown has begun.
    InterpreterShutdown,
    /// This process was forked from one with running workers.
    Forked,
    /// A bad argument; the message names it.
    Value(String),
    /// Waiting for a token timed out (`result(timeout=...)`).
    WaitTimeout,
    /// The token was cancelled.
    Cancelled,
    /// A task waited on its own token.
    SelfWait,
    /// Any other runtime failure (thread spawn).
    Runtime(String),
    /// The operation is blocked by auto-block.
    Blocked(String),
    /// Bounded admission refused the call (full, timed out).
    Rejected(String),
}

impl From<Error> for BindError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidConfig(msg) => BindError::Value(msg),
            Error::Spawn(msg) => BindError::Runtime(format!("could not start a worker thread: {msg}")),
            Error::ShutDown => BindError::ShutDown,
        }
    }
}

static EXCEPTIONS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// `tokengate.exceptions.<name>` (the class object).
pub(crate) fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let module = EXCEPTIONS.get_or_try_init(py, || PyModule::import(py, "tokengate.exceptions").map(Bound::unbind))?;
    module.bind(py).getattr(name)
}

fn instance<'py, A>(py: Python<'py>, module: &str, name: &str, args: A) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    match py.import(module).and_then(|m| m.getattr(name)).and_then(|cls| cls.call1(args)) {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

impl BindError {
    /// The Python exception for this error.
    pub(crate) fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let tokengate = |name: &str, msg: String| match class(py, name).and_then(|c| c.call1((msg,))) {
            Ok(v) => PyErr::from_value(v),
            Err(e) => e,
        };
        match self {
            BindError::NotStarted => tokengate(
                "NotStartedError",
                "no OperationsCoordinator is running: start one (coordinator.start(), \
                 `with OperationsCoordinator():` or `async with OperationsCoordinator():`) \
                 before calling a @task_token_guard function"
                    .into(),
            ),
            BindError::ShutDown => tokengate("ShutdownError", "cannot schedule new futures after shutdown".into()),
            BindError::InterpreterShutdown => tokengate("ShutdownError", "cannot schedule new futures after interpreter shutdown".into()),
            BindError::Forked => tokengate(
                "ForkedProcessError",
                "tokengate cannot be used in a child created by fork() after a coordinator started in the \
                 parent: worker threads do not survive fork. Use the 'spawn' start method."
                    .into(),
            ),
            BindError::Value(msg) => PyValueError::new_err(msg),
            BindError::WaitTimeout => instance(py, "concurrent.futures", "TimeoutError", ("timed out waiting for the token",)),
            BindError::Cancelled => tokengate("TaskCancelledError", "the token was cancelled".into()),
            BindError::SelfWait => PyRuntimeError::new_err(
                "a task waited on its own token: this would deadlock (result() called inside the task it belongs to)",
            ),
            BindError::Runtime(msg) => PyRuntimeError::new_err(msg),
            BindError::Blocked(op) => tokengate(
                "OperationBlockedError",
                format!(
                    "operation {op:?} is blocked: over 90% of its last attempts failed (auto_block); \
                         unblock it with coordinator.unblock_operation({op:?})"
                ),
            ),
            BindError::Rejected(msg) => tokengate("AdmissionRejectedError", msg),
        }
    }
}

impl From<BindError> for PyErr {
    fn from(e: BindError) -> PyErr {
        Python::attach(|py| e.into_pyerr(py))
    }
}

/// A `TaskKilledError(reason)` value to store in a token.
pub(crate) fn killed_value(py: Python<'_>, reason: &str) -> PyResult<Py<PyAny>> {
    Ok(class(py, "TaskKilledError")?.call1((reason,))?.unbind())
}

/// A `TaskPanicError(message)` value to store in a token.
pub(crate) fn panic_value(py: Python<'_>, message: &str) -> Py<PyAny> {
    match class(py, "TaskPanicError").and_then(|c| c.call1((format!("tokengate panicked while running the task: {message}"),))) {
        Ok(v) => v.unbind(),
        Err(e) => e.into_value(py).into_any(),
    }
}

/// A `TaskTimeoutError` value to store in a token that passed its deadline.
pub(crate) fn timeout_value(py: Python<'_>, id: u64, op: &str) -> Py<PyAny> {
    let msg = format!("token {id} ({op}) passed its deadline");
    match class(py, "TaskTimeoutError").and_then(|c| c.call1((msg,))) {
        Ok(v) => v.unbind(),
        Err(e) => e.into_value(py).into_any(),
    }
}

/// A `DependencyFailedError` for a token whose input token failed, with
/// `__cause__` set to the input's exception.
pub(crate) fn dependency_failed(py: Python<'_>, input_id: u64, input_op: &str, input_state: TokenState, cause: Py<PyAny>) -> Py<PyAny> {
    let msg = format!("input token {input_id} ({input_op}) ended {}: the call that received it never ran", input_state.as_str());
    let made = class(py, "DependencyFailedError").and_then(|c| c.call1((msg,))).and_then(|e| {
        e.setattr("__cause__", cause.bind(py))?;
        e.setattr("input_token_id", input_id)?;
        Ok(e)
    });
    match made {
        Ok(v) => v.unbind(),
        Err(e) => e.into_value(py).into_any(),
    }
}

/// The error of an await that was cancelled: exactly `asyncio.CancelledError`
/// (asyncio's `timeout()` tests the class by identity). The synchronous API
/// raises `TaskCancelledError`, which is both kinds of `CancelledError`.
pub(crate) fn asyncio_cancelled(py: Python<'_>) -> PyErr {
    instance(py, "asyncio", "CancelledError", ())
}

/// `asyncio.CancelledError(msg)`: the message of `cancel(msg)` travels with
/// the error, as with an asyncio future (anyio tells its cancel scopes apart by it).
pub(crate) fn asyncio_cancelled_with(py: Python<'_>, msg: Option<&Bound<'_, PyAny>>) -> PyErr {
    match msg {
        Some(m) => instance(py, "asyncio", "CancelledError", (m,)),
        None => asyncio_cancelled(py),
    }
}

/// What `await` raises for a body's `StopIteration`: a `RuntimeError` caused
/// by it, as PEP 479 does for generators and `asyncio.Future.set_exception`
/// does (a `StopIteration` would end the awaiting coroutine's `send` as a
/// plain return of None). Other errors pass through.
pub(crate) fn for_await(py: Python<'_>, err: PyErr) -> PyErr {
    if !err.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) {
        return err;
    }
    let wrapped = PyRuntimeError::new_err("StopIteration interacts badly with generators and cannot be raised into a Future");
    let cause = err.into_value(py);
    let value = wrapped.value(py);
    let _ = value.setattr("__cause__", &cause);
    let _ = value.setattr("__context__", &cause);
    wrapped
}

/// The message of a caught Rust panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// An I/O error of the process lane's wire (a worker's socket, its board) as the
/// matching `OSError` subclass (`BrokenPipeError`, ...).
pub(crate) fn os_error(e: std::io::Error) -> PyErr {
    PyErr::from(e)
}

/// A process-lane worker whose supervisor's process died while it waited on its board:
/// an `EOFError`, as when its socket closes (the worker then exits).
pub(crate) fn orphaned_error() -> PyErr {
    pyo3::exceptions::PyEOFError::new_err("the process lane's supervisor is gone (its process died)")
}
