//! The crate's only `unsafe` code: CPython C-API calls on the hot path
//! of every decorated call, each cheaper than its Python-level equivalent.
//!
//! * `copy_context`: `PyContext_CopyCurrent()` (what `contextvars.copy_context()`
//!   calls), without a Python-level call.
//! * `run_in_context`: `PyContext_Enter`/`PyContext_Exit` around a plain call
//!   (what `Context.run` does), without building a bound method and a
//!   prepended argument tuple.
//!
//! The context functions are part of CPython's public C API since 3.7 and
//! exported by every CPython build (shared or static, GIL or free-threaded),
//! but not by the limited API's headers, so pyo3-ffi does not declare them
//! for abi3 builds: they are declared here, with the signatures of CPython's
//! `Include/context.h`. tokengate supports CPython only.

#![allow(unsafe_code)]

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

static CONTEXT_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

extern "C" {
    fn PyContext_CopyCurrent() -> *mut ffi::PyObject;
    fn PyContext_Enter(ctx: *mut ffi::PyObject) -> std::ffi::c_int;
    fn PyContext_Exit(ctx: *mut ffi::PyObject) -> std::ffi::c_int;
}

/// A copy of the calling thread's current `contextvars` context.
///
/// (It stays tracked by the cyclic GC: CPython's `context_tp_dealloc`
/// untracks unconditionally, so untracking it earlier would corrupt the GC
/// list.)
pub(crate) fn copy_context(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    // SAFETY: the caller holds the interpreter (`py`). `PyContext_CopyCurrent`
    // returns a new (owned) reference or NULL with an exception set, which is
    // what `from_owned_ptr_or_err` expects.
    unsafe { Bound::from_owned_ptr_or_err(py, PyContext_CopyCurrent()) }
}

/// `ctx.run(func, *args, **kwargs)`.
pub(crate) fn run_in_context<'py>(
    ctx: &Bound<'py, PyAny>,
    func: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = ctx.py();
    if !ctx.get_type().is(CONTEXT_TYPE.import(py, "contextvars", "Context")?) {
        return Err(pyo3::exceptions::PyTypeError::new_err("a token's context must be a contextvars.Context"));
    }
    // SAFETY: we hold the interpreter and `ctx` is a live `contextvars.Context`
    // (checked above: `PyContext_Enter` requires one). Enter returns -1 with an
    // exception set if the context is entered already (as `Context.run` does).
    if unsafe { PyContext_Enter(ctx.as_ptr()) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let out = func.call(args, kwargs);
    // SAFETY: as above; `ctx` is the context this thread entered just now, and
    // the call in between returned (any context it entered, it exited: a Python
    // function cannot leave a context entered). Exit fails only if `ctx` is not
    // the current context, reported as an error.
    if unsafe { PyContext_Exit(ctx.as_ptr()) } != 0 {
        let err = PyErr::fetch(py);
        return Err(out.err().unwrap_or(err));
    }
    out
}
