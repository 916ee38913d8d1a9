//! Tokens as arguments: a call that receives unresolved tokens waits in the
//! scheduler (state `waiting`, holding no worker) until they resolve; then
//! the worker receives their values.
//!
//! # Protocol
//!
//! `DepWait::remaining` starts at (pending inputs + 1). Each pending input
//! gets a `Listener::Dependent`; each firing decrements `remaining`. The
//! submitting thread drops its extra unit last, so the wait completes exactly
//! once, after every input resolved, on whichever thread resolved the last
//! input. Completion swaps the input tokens in the arguments for their values
//! and dispatches the job; if any input failed (or was cancelled, killed,
//! timed out), the dependent token fails with `DependencyFailedError` whose
//! `__cause__` is that input's exception. A dependent token resolved in the
//! meantime (cancelled, timed out) is simply dropped.
//!
//! This replaces the original's blocking result proxies (`int(token)`,
//! `token + 1`), which blocked a worker on another token and deadlocked a
//! saturated pool.

use std::sync::{Arc, Weak};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::engine_shared::EngineShared;
use super::exceptions;
use super::handle::TaskToken;
use super::token::{Listener, Outcome, PyJob, TokenInner, Waiter};
use crate::engine::sync::{AtomicUsize, Mutex, Ordering};
use crate::engine::token::TokenState;

/// A token waiting for its input tokens.
#[derive(Debug)]
pub(crate) struct DepWait {
    remaining: AtomicUsize,
    job: Mutex<Option<PyJob>>,
    engine: Weak<EngineShared>,
}

/// The unresolved input tokens among `args` and `kwargs` values (top level only).
pub(crate) fn input_tokens(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> Vec<Arc<TokenInner>> {
    let mut out = Vec::new();
    let mut visit = |v: Bound<'_, PyAny>| {
        if let Ok(t) = v.cast::<TaskToken>() {
            out.push(t.get().inner.clone());
        }
    };
    for a in args.iter() {
        visit(a);
    }
    if let Some(kw) = kwargs {
        for (_, v) in kw.iter() {
            visit(v);
        }
    }
    out
}

impl DepWait {
    /// Parks `job` until `inputs` resolve (dispatching it at once if they all have).
    pub(crate) fn start(py: Python<'_>, job: PyJob, inputs: &[Arc<TokenInner>], engine: &Arc<EngineShared>) {
        job.token().cell.hold();
        let wait =
            Arc::new(DepWait { remaining: AtomicUsize::new(inputs.len() + 1), job: Mutex::new(Some(job)), engine: Arc::downgrade(engine) });
        for input in inputs {
            if !input.add_if_pending(Listener::Waiter(wait.clone())) {
                wait.remaining.fetch_sub(1, Ordering::AcqRel);
            }
        }
        wait.input_done(py);
    }

    /// One input resolved (or the submitter finished registering).
    pub(crate) fn input_done(&self, py: Python<'_>) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(mut job) = self.job.lock().take() else {
            return;
        };
        let token = job.token().clone();
        if token.cell.is_done() {
            job.forget_call();
            return;
        }
        match substitute_inputs(py, &job) {
            Ok(()) => match self.engine.upgrade() {
                Some(engine) => {
                    let _ = engine.dispatch(py, job);
                }
                None => drop(job), // engine gone: the job's drop cancels the token
            },
            Err((input, cause)) => {
                job.forget_call();
                let err = exceptions::dependency_failed(py, input.id, &input.op().name, input.cell.state(), cause);
                token.resolve(py, |_| true, TokenState::Failed, Some(Outcome::Error(err)));
            }
        }
    }
}

impl Waiter for DepWait {
    fn notify(&self, py: Python<'_>) {
        self.input_done(py);
    }
}

/// Replaces input tokens among `job`'s arguments with their values. On a
/// failed input, returns it with the exception to use as the cause.
fn substitute_inputs(py: Python<'_>, job: &PyJob) -> Result<(), (Arc<TokenInner>, Py<PyAny>)> {
    let token = job.token().clone();
    let mut guard = token.call.lock();
    let Some(call) = guard.as_mut() else {
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
