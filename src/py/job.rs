//! What a worker does with one token.
//!
//! Each worker thread attaches to the interpreter once, for its whole life
//! (`PyHost::run_worker`), so running a task costs no thread-state setup;
//! it detaches only inside `WorkerHooks::idle`, while it spins or sleeps.
//!
//! A job owns the call (function, arguments, context). If a job is dropped
//! without running (the pool was drained or dropped), its token resolves as
//! cancelled: no token is ever left pending.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock, Weak};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use super::engine::EngineShared;
use super::exceptions;
use super::token::{prepend, Outcome, TaskToken, TokenInner};
use crate::pool::{Host, WorkerHooks, WorkerInfo, WorkerLoop};
use crate::sync::{AtomicU64, Ordering};
use crate::token::TokenState;

/// The function call a token stands for.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) func: Py<PyAny>,
    pub(crate) args: Py<PyTuple>,
    pub(crate) kwargs: Option<Py<PyDict>>,
    /// The caller's `contextvars.Context` copy, run around the call.
    pub(crate) context: Option<Py<PyAny>>,
}

impl Call {
    fn invoke(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let func = self.func.bind(py);
        let args = self.args.bind(py);
        let kwargs = self.kwargs.as_ref().map(|k| k.bind(py));
        match &self.context {
            Some(ctx) => {
                let run = ctx.bind(py).getattr(pyo3::intern!(py, "run"))?;
                run.call(prepend(func, args)?, kwargs).map(Bound::unbind)
            }
            None => func.call(args, kwargs).map(Bound::unbind),
        }
    }
}

/// A queued token and its call.
#[derive(Debug)]
pub(crate) struct PyJob {
    token: Arc<TokenInner>,
    call: Option<Call>,
}

impl PyJob {
    pub(crate) fn new(token: Arc<TokenInner>, call: Call) -> Self {
        PyJob { token, call: Some(call) }
    }

    /// Drops the call without resolving the token (the caller resolves it).
    pub(crate) fn forget_call(&mut self) {
        self.call = None;
    }
}

impl Drop for PyJob {
    fn drop(&mut self) {
        if self.call.take().is_some() {
            self.token.cancel_unrun();
        }
    }
}

/// Resolves dropped jobs as cancelled (they are dropped by `Drop`).
pub(crate) fn cancel_jobs(py: Python<'_>, jobs: Vec<PyJob>) -> usize {
    let n = jobs.len();
    for mut job in jobs {
        job.forget_call();
        job.token.resolve(py, |_| true, TokenState::Cancelled, None);
    }
    n
}

thread_local! {
    static CURRENT_TOKEN: RefCell<Option<Arc<TokenInner>>> = const { RefCell::new(None) };
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

/// Test hook: make tokengate's own code panic in every `every`-th task (0: never).
#[pyfunction]
pub(crate) fn set_fault_injection(every: u64) {
    FAULT_EVERY.store(every, Ordering::Relaxed);
    FAULT_COUNT.store(0, Ordering::Relaxed);
}

fn maybe_inject_fault() {
    let every = FAULT_EVERY.load(Ordering::Relaxed);
    if every > 0 && (FAULT_COUNT.fetch_add(1, Ordering::Relaxed) + 1) % every == 0 {
        panic!("injected fault (tokengate._tokengate.set_fault_injection)");
    }
}

static COROUTINE_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn coroutine_error(py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Option<Outcome>> {
    let coroutine_type = COROUTINE_TYPE.import(py, "types", "CoroutineType")?;
    if !value.is_instance(coroutine_type)? {
        return Ok(None);
    }
    value.call_method0("close")?;
    let err = PyTypeError::new_err(
        "the task returned a coroutine: @task_token_guard runs synchronous functions; \
         await coroutines on your event loop instead (the coroutine was closed)",
    );
    Ok(Some(Outcome::Error(err.into_value(py).into_any())))
}

/// Runs one job on a worker (attached).
fn execute(py: Python<'_>, mut job: PyJob, info: &WorkerInfo) {
    let Some(call) = job.call.take() else { return };
    let token = job.token.clone();
    drop(job);
    if !token.core.start(info.index as u32, info.core.map(|c| c as u32)) {
        return; // cancelled or killed before it started: never run it
    }
    token.counters.running_delta(1);
    let previous = CURRENT_TOKEN.with(|c| c.replace(Some(token.clone())));
    let result = catch_unwind(AssertUnwindSafe(|| {
        maybe_inject_fault();
        call.invoke(py)
    }));
    CURRENT_TOKEN.with(|c| *c.borrow_mut() = previous);
    let (state, outcome) = match result {
        Ok(Ok(value)) => match coroutine_error(py, value.bind(py)) {
            Ok(None) => (TokenState::Completed, Outcome::Value(value)),
            Ok(Some(err)) => (TokenState::Failed, err),
            Err(e) => (TokenState::Failed, Outcome::Error(e.into_value(py).into_any())),
        },
        Ok(Err(err)) => (TokenState::Failed, Outcome::Error(err.into_value(py).into_any())),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            (TokenState::Failed, Outcome::Error(exceptions::panic_value(py, &msg)))
        }
    };
    token.counters.running_delta(-1);
    // A token killed or timed out while running is already resolved: its result is dropped.
    token.resolve(py, |s| s == TokenState::Executing, state, Some(outcome));
}

/// Runs the workers of one engine: attached to Python for their whole life.
#[derive(Debug, Default)]
pub(crate) struct PyHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
}

struct PyHooks<'py> {
    py: Python<'py>,
}

impl WorkerHooks<PyJob> for PyHooks<'_> {
    fn execute(&mut self, job: PyJob, worker: &WorkerInfo) {
        execute(self.py, job, worker);
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
                worker.run(&mut PyHooks { py });
            }
        });
        if attached.is_none() {
            if let Some(worker) = slot.take() {
                worker.run(&mut NoPython);
            }
        }
    }
}
