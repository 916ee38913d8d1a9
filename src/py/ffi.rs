//! The crate's only `unsafe` code: CPython C-API calls on the hot path
//! of every decorated call, each cheaper than its Python-level equivalent.
//!
//! * `copy_context`: `PyContext_CopyCurrent()` (what `contextvars.copy_context()`
//!   calls), without a Python-level call.
//! * `CallContext`: a queued call's context copy, untracked by the cyclic GC
//!   while it waits (see its docs); its `run` is `PyContext_Enter`/`Exit`
//!   around a plain call (what `Context.run` does), without building a bound
//!   method and a prepended argument tuple.
//!
//! The context functions are part of CPython's public C API since 3.7 and
//! exported by every CPython build (shared or static, GIL or free-threaded),
//! but not by the limited API's headers, so pyo3-ffi does not declare them
//! for abi3 builds: they are declared here, with the signatures of CPython's
//! `Include/context.h`. tokengate supports CPython only.

#![allow(unsafe_code)]

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

extern "C" {
    fn PyContext_CopyCurrent() -> *mut ffi::PyObject;
    fn PyContext_New() -> *mut ffi::PyObject;
    fn PyContext_Enter(ctx: *mut ffi::PyObject) -> std::ffi::c_int;
    fn PyContext_Exit(ctx: *mut ffi::PyObject) -> std::ffi::c_int;
    fn PyGILState_Check() -> std::ffi::c_int;
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

/// The caller's context copy a queued call carries, held untracked by the
/// cyclic garbage collector until the call is dropped.
///
/// Why: a burst of queued calls otherwise promotes thousands of context
/// copies into the GC's older generations, and CPython then runs full
/// collections over every object of the program (measured: ~7 % of the
/// bulk-submission path).
///
/// Why it is sound: the copy cannot be part of a reference cycle. Only this
/// handle (and clones of it, for retries) refer to it, and while the call
/// runs the thread state does; no Python API returns the current context
/// object itself (`copy_context()` inside the task returns another copy), so
/// nothing reachable from it can refer back to it. Its contents (the
/// variables' values) stay tracked as usual.
///
/// The one hazard: CPython's `context_tp_dealloc` untracks unconditionally,
/// so the object must be tracked again before its last reference goes.
/// `Drop` does that when its thread is attached; otherwise (a queued job
/// dropped by a thread outside Python, or inside a lock) it parks the handle
/// and the next capture, attached, releases it. What is parked when the
/// process exits is leaked, never freed untracked.
///
/// Most callers have set no context variable: their copy is empty, and a
/// call that cannot be retried keeps none (`None`: a queued call then costs
/// no context object); it runs in a new empty context, made when it runs.
/// (One empty context per thread, reused, would not do: a body can leave a
/// context empty but not as it found it, holding a `contextvars.Token` that
/// a later call could then reset.) A call that may be retried keeps its copy
/// even when empty, so that every attempt runs in the same context.
#[derive(Debug)]
pub(crate) struct CallContext(Option<Py<PyAny>>);

impl CallContext {
    /// Captures the calling thread's current context (see `copy_context`);
    /// `retried`: the call may run again (see the type docs).
    pub(crate) fn capture(py: Python<'_>, retried: bool) -> PyResult<Self> {
        release_orphans(py);
        let ctx = copy_context(py)?;
        if !retried && ctx.len()? == 0 {
            return Ok(CallContext(None));
        }
        // SAFETY: attached (`py`); `ctx` is a live object we own.
        // `PyObject_GC_IsTracked` accepts any object, and `PyObject_GC_UnTrack`
        // runs only on one it reported tracked (so it has a GC header). `Drop`
        // tracks it again before the last reference goes (see the type docs).
        unsafe {
            if ffi::PyObject_GC_IsTracked(ctx.as_ptr()) != 0 {
                ffi::PyObject_GC_UnTrack(ctx.as_ptr().cast());
            }
        }
        Ok(CallContext(Some(ctx.unbind())))
    }

    /// Another handle on the same context (a retry runs in the same context).
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Self {
        CallContext(self.0.as_ref().map(|c| c.clone_ref(py)))
    }

    /// `ctx.run(func, *args, **kwargs)` in this context.
    pub(crate) fn run<'py>(
        &self,
        func: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = func.py();
        let Some(ctx) = self.0.as_ref() else {
            // SAFETY: attached (`py`); `PyContext_New` returns a new (owned)
            // reference or NULL with an exception set.
            let empty = unsafe { Bound::from_owned_ptr_or_err(py, PyContext_New())? };
            return enter_and_call(&empty, func, args, kwargs);
        };
        enter_and_call(ctx.bind(py), func, args, kwargs)
    }
}

/// `ctx.run(func, *args, **kwargs)`.
fn enter_and_call<'py>(
    ctx: &Bound<'py, PyAny>,
    func: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = func.py();
    // SAFETY: attached (`py`); `ctx` is live and a `contextvars.Context`
    // (made by `PyContext_CopyCurrent` or `PyContext_New`), which `PyContext_Enter`
    // requires. Enter returns -1 with an exception set if the context is
    // entered already (as `Context.run` does).
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

impl Drop for CallContext {
    fn drop(&mut self) {
        let Some(ctx) = self.0.take() else { return };
        // SAFETY: `PyGILState_Check` only reads the calling thread's state; it
        // is callable from any thread, attached or not.
        if unsafe { PyGILState_Check() } == 0 {
            // Not attached (maybe holding a lock an attached thread wants):
            // attaching here could deadlock, so park it for the next capture.
            park(ctx);
            return;
        }
        // SAFETY: `PyGILState_Check` just said this thread is attached.
        let py = unsafe { Python::assume_attached() };
        release(py, ctx);
    }
}

/// Contexts dropped while their thread was not attached, released by the next capture.
static ORPHANS: parking_lot::Mutex<Vec<Py<PyAny>>> = parking_lot::Mutex::new(Vec::new());
static ORPHAN_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn park(ctx: Py<PyAny>) {
    let mut orphans = ORPHANS.lock();
    orphans.push(ctx);
    ORPHAN_COUNT.store(orphans.len(), std::sync::atomic::Ordering::Release);
}

/// Tracks `ctx` again and drops this reference to it.
fn release(py: Python<'_>, ctx: Py<PyAny>) {
    // SAFETY: attached (`py`); `ctx` is live (we hold a reference). Tracking is
    // only done on an object reported untracked, and a context is a GC type
    // (it was tracked when it was made), so it has a GC header.
    unsafe {
        if ffi::PyObject_GC_IsTracked(ctx.as_ptr()) == 0 {
            ffi::PyObject_GC_Track(ctx.as_ptr().cast());
        }
    }
    drop(ctx.into_bound(py));
}

/// Releases the contexts parked by `Drop` (attached).
fn release_orphans(py: Python<'_>) {
    if ORPHAN_COUNT.load(std::sync::atomic::Ordering::Acquire) == 0 {
        return;
    }
    let orphans = {
        let mut parked = ORPHANS.lock();
        ORPHAN_COUNT.store(0, std::sync::atomic::Ordering::Release);
        std::mem::take(&mut *parked)
    };
    for ctx in orphans {
        release(py, ctx);
    }
}
