//! `OperationSpec`: everything fixed at decoration time, and `submit`, the
//! hot path of every decorated call.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};

use super::engine::{current_engine, Engine, EngineShared};
use super::exceptions::BindError;
use super::job::{Call, PyJob};
use super::token::{TaskToken, TokenInner};
use crate::sync::{AtomicU64, Ordering};
use crate::token::TokenState;

static NEXT_TOKEN_ID: AtomicU64 = AtomicU64::new(1);
static COPY_CONTEXT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// What a decorated function's tokens share.
#[derive(Debug)]
pub(crate) struct SpecShared {
    pub(crate) func: Py<PyAny>,
    pub(crate) operation_type: Py<PyString>,
    /// A read-only view (`types.MappingProxyType`) of the validated tags.
    pub(crate) tags: Py<PyAny>,
    min_pos: usize,
    max_pos: usize,
    fast_arity: bool,
    binder: Option<Py<PyAny>>,
}

impl SpecShared {
    /// A plain dict copy of the tags.
    pub(crate) fn tags_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.update(self.tags.bind(py).cast::<pyo3::types::PyMapping>()?)?;
        Ok(d)
    }
}

/// The decoration-time record of a `@task_token_guard` function.
#[pyclass(frozen, name = "OperationSpec", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct OperationSpec {
    shared: Arc<SpecShared>,
}

impl OperationSpec {
    fn enqueue(
        &self,
        py: Python<'_>,
        engine: &EngineShared,
        func: Py<PyAny>,
        args: Bound<'_, PyTuple>,
        kwargs: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Py<TaskToken>> {
        let context = COPY_CONTEXT.import(py, "contextvars", "copy_context")?.call0()?;
        let inner = Arc::new(TokenInner::new(
            NEXT_TOKEN_ID.fetch_add(1, Ordering::Relaxed),
            self.shared.clone(),
            engine.counters.clone(),
        ));
        engine.counters.record_submitted();
        inner.core.admit();
        let job = PyJob::new(
            inner.clone(),
            Call { func, args: args.unbind(), kwargs: kwargs.map(Bound::unbind), context: Some(context.unbind()) },
        );
        if let Err((err, mut job)) = engine.pool.submit(job) {
            job.forget_call();
            inner.resolve(py, |_| true, TokenState::Cancelled, None);
            return Err(BindError::from(err).into());
        }
        Py::new(py, TaskToken { inner })
    }
}

#[pymethods]
impl OperationSpec {
    /// `min_pos`/`max_pos` (None: `*args`) bound the positional count that
    /// needs no further check when there are no keyword arguments and
    /// `fast_arity` is true; every other call is checked by `binder(*args, **kwargs)`.
    #[new]
    #[pyo3(signature = (func, operation_type, tags, min_pos, max_pos, fast_arity, binder))]
    fn new(
        func: Py<PyAny>,
        operation_type: Py<PyString>,
        tags: Py<PyAny>,
        min_pos: usize,
        max_pos: Option<usize>,
        fast_arity: bool,
        binder: Option<Py<PyAny>>,
    ) -> Self {
        OperationSpec {
            shared: Arc::new(SpecShared {
                func,
                operation_type,
                tags,
                min_pos,
                max_pos: max_pos.unwrap_or(usize::MAX),
                fast_arity,
                binder,
            }),
        }
    }

    /// Checks the call's arity, then queues a token on the running coordinator.
    #[pyo3(signature = (args, kwargs=None))]
    fn submit(&self, py: Python<'_>, args: Bound<'_, PyTuple>, kwargs: Option<Bound<'_, PyDict>>) -> PyResult<Py<TaskToken>> {
        let spec = &self.shared;
        let kwargs = kwargs.filter(|k| !k.is_empty());
        let n = args.len();
        let fast = spec.fast_arity && kwargs.is_none() && spec.min_pos <= n && n <= spec.max_pos;
        if !fast {
            if let Some(binder) = &spec.binder {
                binder.bind(py).call(&args, kwargs.as_ref())?;
            }
        }
        let engine = current_engine()?;
        self.enqueue(py, &engine, spec.func.clone_ref(py), args, kwargs)
    }

    /// Queues `func(*args, **kwargs)` as a token of this operation on
    /// `engine` (default: the running coordinator's). No arity check: the
    /// call's own `TypeError` fails the token. Used by `tokengate.Executor`.
    #[pyo3(signature = (func, args, kwargs=None, engine=None))]
    fn submit_call(
        &self,
        py: Python<'_>,
        func: Py<PyAny>,
        args: Bound<'_, PyTuple>,
        kwargs: Option<Bound<'_, PyDict>>,
        engine: Option<Bound<'_, Engine>>,
    ) -> PyResult<Py<TaskToken>> {
        let engine = match engine {
            Some(e) => e.get().shared_for_submit()?,
            None => current_engine()?,
        };
        self.enqueue(py, &engine, func, args, kwargs.filter(|k| !k.is_empty()))
    }

    /// A token of this operation that no worker runs: a lane outside the
    /// pool (process lane, I/O lane) drives it with `_start`, `_set_result`
    /// and `_set_exception`. It counts on `engine` (default: the running one).
    #[pyo3(signature = (engine=None))]
    fn external_token(&self, py: Python<'_>, engine: Option<Bound<'_, Engine>>) -> PyResult<Py<TaskToken>> {
        let engine = match engine {
            Some(e) => e.get().shared_for_submit()?,
            None => current_engine()?,
        };
        let inner = Arc::new(TokenInner::new(
            NEXT_TOKEN_ID.fetch_add(1, Ordering::Relaxed),
            self.shared.clone(),
            engine.counters.clone(),
        ));
        engine.counters.record_submitted();
        inner.core.admit();
        Py::new(py, TaskToken { inner })
    }

    #[getter]
    fn operation_type(&self, py: Python<'_>) -> Py<PyString> {
        self.shared.operation_type.clone_ref(py)
    }

    #[getter]
    fn tags(&self, py: Python<'_>) -> Py<PyAny> {
        self.shared.tags.clone_ref(py)
    }

    #[getter]
    fn func(&self, py: Python<'_>) -> Py<PyAny> {
        self.shared.func.clone_ref(py)
    }
}
