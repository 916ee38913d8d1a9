//! The function call a token stands for (kept in the token until someone
//! takes it to run it: see "Who runs a call" in `run.rs`).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

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
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Call {
        Call {
            func: self.func.clone_ref(py),
            args: self.args.clone_ref(py),
            kwargs: self.kwargs.as_ref().map(|k| k.clone_ref(py)),
            context: self.context.clone_ref(py),
        }
    }

    pub(crate) fn invoke(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let func = self.func.bind(py);
        let args = self.args.bind(py);
        let kwargs = self.kwargs.as_ref().map(|k| k.bind(py));
        self.context.run(func, args, kwargs).map(Bound::unbind)
    }
}
