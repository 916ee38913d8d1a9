//! A plain call of a process-lane function, queued with no Python frame.
//!
//! [`ProcessCall`] is the base class of Python's `ProcessFunction`
//! (`python/tokengate/_process/wrapper.py`). Its `__call__` queues a call
//! whose arguments are all positional and of plain types (None, bool, int,
//! float, str, bytes, and small tuples, lists and dicts of them: values, never
//! tokens; see [`is_plain`]) on the newest running engine's
//! process lane, as `ProcessFunction._call_slow` would: the arguments pickled
//! here, `pickle.dumps((args, {}), HIGHEST_PROTOCOL)`, and the token queued
//! with `(function, pickled arguments)` (`OperationSpec::queue_outside`).
//! Every other call goes to `_call_slow`, which gives the same answer or the
//! error: keyword arguments, other argument types, a positional count the
//! arity check must bind, the first calls (until Python marks the function's
//! payload made: [`ProcessCall::_enable_fast_calls`]), no lane registered for
//! the engine, a closed lane, no running engine, a worker process.
//!
//! # Protocol
//!
//! * `LANES` maps an engine to its process lane. Python registers a lane
//!   ([`register_process_lane`]) once `lane_for` made it for a running
//!   engine, and forgets it ([`forget_process_lane`]) when the lane's
//!   supervisor exits (the lane closed: its wake-up socket goes with it); an
//!   engine has at most one, and a lane registered again replaces its
//!   engine's entry. Entries of engines that are gone, or whose lane closed,
//!   are also dropped at each registration.
//! * The engine is the newest of the registry (`registry::newest_engine`),
//!   the coordinator that `_current_coordinator` picks: decorated calls made
//!   inside a task of an older coordinator go to the newest one too.
//! * A lane found closed, or an engine stopping, sends the call to
//!   `_call_slow`, which raises the error Python gives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use super::engine_shared::EngineShared;
use super::handle::TaskToken;
use super::outside::OutsideLane;
use super::registry::newest_engine;
use super::spec::{Admit, OperationSpec};
use crate::engine::sync::Mutex;

/// Each engine's process lane (see the module docs).
static LANES: Mutex<Vec<(Weak<EngineShared>, Py<OutsideLane>)>> = Mutex::new(Vec::new());

/// `pickle.dumps` and `pickle.HIGHEST_PROTOCOL`.
static DUMPS: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();

/// The base of a process-lane function (see the module docs).
#[pyclass(subclass, frozen, name = "ProcessCall", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct ProcessCall {
    spec: Py<OperationSpec>,
    /// The function's payload is made: plain calls may be queued here.
    fast: AtomicBool,
}

/// How many values a call's positional arguments may hold to be checked here: each
/// argument, each container, each item, and each dict key and value counts one (an
/// object met twice counts twice). A larger call takes `_call_slow`, whose pickling then
/// costs far more than that Python frame.
const PLAIN_VALUES: usize = 256;

/// Containers nested deeper than this take `_call_slow`.
const PLAIN_DEPTH: u32 = 3;

/// A value whose pickle means the same in every process, and that is no token: None,
/// bool, int, float, str, bytes, or a tuple, list or dict (exact types) of such values,
/// nested at most [`PLAIN_DEPTH`] deep. Plain pickle writes the same bytes for it as
/// loky's pickler (which calls no reducer for these types). `left` counts the values
/// still allowed ([`PLAIN_VALUES`] for a whole call).
fn is_plain(v: &Bound<'_, PyAny>, left: &mut usize, depth: u32) -> bool {
    if *left == 0 {
        return false;
    }
    *left -= 1;
    if v.is_none()
        || v.is_exact_instance_of::<PyInt>()
        || v.is_exact_instance_of::<PyFloat>()
        || v.is_exact_instance_of::<PyString>()
        || v.is_exact_instance_of::<PyBool>()
        || v.is_exact_instance_of::<PyBytes>()
    {
        return true;
    }
    if depth == 0 {
        return false;
    }
    if let Ok(t) = v.cast_exact::<PyTuple>() {
        t.len() <= *left && t.iter().all(|x| is_plain(&x, left, depth - 1))
    } else if let Ok(l) = v.cast_exact::<PyList>() {
        l.len() <= *left && l.iter().all(|x| is_plain(&x, left, depth - 1))
    } else if let Ok(d) = v.cast_exact::<PyDict>() {
        // A snapshot of its items: on a free-threaded build another thread may change the
        // dict meanwhile, and iterating it in place then panics.
        d.len() * 2 <= *left
            && d.items().iter().all(|pair| {
                pair.cast_exact::<PyTuple>().is_ok_and(|kv| {
                    kv.len() == 2
                        && kv.get_item(0).is_ok_and(|k| is_plain(&k, left, depth - 1))
                        && kv.get_item(1).is_ok_and(|x| is_plain(&x, left, depth - 1))
                })
            })
    } else {
        false
    }
}

/// The process lane of `engine`, when one is registered and open.
fn lane_of(py: Python<'_>, engine: &Arc<EngineShared>) -> Option<Py<OutsideLane>> {
    let lanes = LANES.lock();
    let (_, lane) = lanes.iter().find(|(e, _)| std::ptr::eq(e.as_ptr(), Arc::as_ptr(engine)))?;
    (!lane.get().queue.is_closed()).then(|| lane.clone_ref(py))
}

impl ProcessCall {
    /// The token of `func(*args)` queued on the newest engine's process lane, or
    /// None when this call must take `_call_slow` (see the module docs).
    fn try_queue(slf: &Bound<'_, Self>, args: &Bound<'_, PyTuple>) -> PyResult<Option<Py<TaskToken>>> {
        let py = slf.py();
        let me = slf.get();
        let spec = me.spec.get();
        if !me.fast.load(Ordering::Acquire) || !spec.arity_is_plain(args.len()) {
            return Ok(None);
        }
        let mut left = PLAIN_VALUES;
        if !args.iter().all(|a| is_plain(&a, &mut left, PLAIN_DEPTH)) {
            return Ok(None);
        }
        let Ok(engine) = newest_engine() else { return Ok(None) };
        if engine.is_stopping() {
            return Ok(None);
        }
        let Some(lane) = lane_of(py, &engine) else { return Ok(None) };
        let (dumps, proto) = DUMPS.get_or_try_init(py, || -> PyResult<_> {
            let pickle = py.import("pickle")?;
            Ok((pickle.getattr("dumps")?.unbind(), pickle.getattr("HIGHEST_PROTOCOL")?.unbind()))
        })?;
        // On a free-threaded build another thread may put a value that is not plain into a
        // container argument after the check: a pickling error then sends the call to
        // `_call_slow`, which pickles it as any other (a token in it fails the token).
        let data = match dumps.bind(py).call1(((args, PyDict::new(py)), proto.bind(py))) {
            Ok(data) => data,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyException>(py) => return Ok(None),
            Err(e) => return Err(e), // KeyboardInterrupt and the like
        };
        let func = PyTuple::new(py, [slf.as_any(), &data])?;
        // A blocking admission queues the token or raises: None would be a bug (and the
        // caller would then queue the call a second time through `_call_slow`).
        let (args, defaults) = (PyTuple::empty(py), spec.defaults());
        match spec.queue_outside(py, &engine, lane.get(), func.into_any().unbind(), args, None, defaults, Admit::Block(None))? {
            Some(token) => Ok(Some(token)),
            None => Err(pyo3::exceptions::PyRuntimeError::new_err("admission refused a blocking call")),
        }
    }
}

#[pymethods]
impl ProcessCall {
    #[new]
    /// `func` is the decorated function (kept by the Python subclass).
    #[pyo3(signature = (spec, func))]
    fn new(spec: Py<OperationSpec>, func: Bound<'_, PyAny>) -> Self {
        let _ = func;
        ProcessCall { spec, fast: AtomicBool::new(false) }
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__(slf: &Bound<'_, Self>, args: Bound<'_, PyTuple>, kwargs: Option<Bound<'_, PyDict>>) -> PyResult<Py<PyAny>> {
        let kwargs = kwargs.filter(|k| !k.is_empty());
        if kwargs.is_none() {
            if let Some(token) = Self::try_queue(slf, &args)? {
                return Ok(token.into_any());
            }
        }
        Ok(slf.call_method(pyo3::intern!(slf.py(), "_call_slow"), args, kwargs.as_ref())?.unbind())
    }

    /// Plain calls may be queued here from now on (the function's payload is made).
    fn _enable_fast_calls(&self) {
        self.fast.store(true, Ordering::Release);
    }
}

/// Takes out of `LANES` the entries `gone` picks and adds `add`, under one lock;
/// what was taken out is released after the lock (the caller holds the interpreter).
fn update_lanes(gone: impl Fn(&Weak<EngineShared>, &OutsideLane) -> bool, add: Option<(Weak<EngineShared>, Py<OutsideLane>)>) {
    let dropped: Vec<(Weak<EngineShared>, Py<OutsideLane>)>;
    {
        let mut lanes = LANES.lock();
        let (out, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *lanes).into_iter().partition(|(e, l)| gone(e, l.get()));
        *lanes = keep;
        lanes.extend(add);
        dropped = out;
    }
    drop(dropped);
}

/// Registers `lane` as its engine's process lane (see the module docs).
#[pyfunction]
pub(crate) fn register_process_lane(_py: Python<'_>, lane: Py<OutsideLane>) -> PyResult<()> {
    let engine = lane.get().engine.clone();
    if engine.strong_count() == 0 {
        return Err(pyo3::exceptions::PyRuntimeError::new_err("the engine of this lane is gone"));
    }
    let stale = |e: &Weak<EngineShared>, l: &OutsideLane| e.strong_count() == 0 || l.queue.is_closed() || e.ptr_eq(&engine);
    update_lanes(stale, Some((engine.clone(), lane)));
    Ok(())
}

/// Forgets `lane` (see the module docs): plain calls no longer reach it.
#[pyfunction]
pub(crate) fn forget_process_lane(_py: Python<'_>, lane: &Bound<'_, OutsideLane>) {
    let target: *const OutsideLane = lane.get();
    update_lanes(|_, l| std::ptr::eq(l, target), None);
}
