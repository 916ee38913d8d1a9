//! Completions reach asyncio in batches: one loop wake per burst.
//!
//! # Protocol
//!
//! Each event loop that awaits tokens has one `LoopQueue` (found through a
//! per-thread cache: a loop runs on one thread). A resolving worker pushes a
//! `Delivery` (`func(arg)`, in `context`) onto the queue. Only the push that
//! finds the queue empty schedules the loop's `LoopDeliveries` with
//! `call_soon_threadsafe` (the one cross-thread wake); it runs on the
//! loop thread, swaps the whole queue out and calls every delivery. A push
//! that races a running batch either lands in the batch being swapped out or
//! finds the queue empty afterwards and schedules the next run, so nothing
//! is stranded.
//!
//! asyncio's own callbacks (a `Task` wake-up, `gather`'s bookkeeping) re-check
//! cancellation themselves, so a delivery for a task that was cancelled in
//! the meantime is harmless.
//!
//! A delivery that raises `SystemExit` or `KeyboardInterrupt` ends the
//! batch with that exception, as asyncio's own callbacks do (it stops the
//! loop); the rest of the batch goes back to the front of the queue and a
//! run is scheduled for it. Other exceptions go to the loop's exception
//! handler and the batch goes on.
//!
//! A closed loop is never called: `schedule` checks `is_closed()` first and
//! treats the `RuntimeError` of a loop closing in between the same way; in
//! both cases the pending deliveries are dropped.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use crate::engine::sync::{AtomicU64, Mutex, Ordering};

static LOOP_WAKES: AtomicU64 = AtomicU64::new(0);
static LOOP_DELIVERIES: AtomicU64 = AtomicU64::new(0);

/// One callback to run on a loop thread.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) func: Py<PyAny>,
    pub(crate) arg: Py<PyAny>,
    pub(crate) context: Option<Py<PyAny>>,
}

/// The completion queue of one event loop.
pub(crate) struct LoopQueue {
    event_loop: Py<PyAny>,
    pending: Mutex<Vec<Delivery>>,
    runner: PyOnceLock<Py<PyAny>>,
}

impl std::fmt::Debug for LoopQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopQueue").field("pending", &self.pending.lock().len()).finish_non_exhaustive()
    }
}

thread_local! {
    static CACHE: RefCell<Option<Arc<LoopQueue>>> = const { RefCell::new(None) };
}

static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The running loop of this thread, or None (`asyncio._get_running_loop()`).
pub(crate) fn running_loop(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    let f = GET_RUNNING_LOOP.import(py, "asyncio.events", "_get_running_loop")?;
    let event_loop = f.call0()?;
    Ok((!event_loop.is_none()).then_some(event_loop))
}

/// The running loop of this thread, or `RuntimeError('no running event loop')`.
pub(crate) fn get_running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    running_loop(py)?.ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("no running event loop"))
}

/// The queue of `event_loop` (which runs on this thread).
pub(crate) fn queue_for(py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> Arc<LoopQueue> {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(q) = cache.as_ref() {
            if q.event_loop.bind(py).is(event_loop) {
                return q.clone();
            }
        }
        let q = Arc::new(LoopQueue { event_loop: event_loop.clone().unbind(), pending: Mutex::new(Vec::new()), runner: PyOnceLock::new() });
        *cache = Some(q.clone());
        q
    })
}

impl LoopQueue {
    /// Queues a delivery; wakes the loop only if the queue was empty.
    pub(crate) fn push(self: &Arc<Self>, py: Python<'_>, d: Delivery) {
        if self.enqueue(d) {
            self.schedule(py, true);
        }
    }

    /// Like `push`, from the loop's own thread: the batch's run is scheduled with
    /// `call_soon`, which needs no cross-thread wake.
    pub(crate) fn push_local(self: &Arc<Self>, py: Python<'_>, d: Delivery) {
        if self.enqueue(d) {
            self.schedule(py, false);
        }
    }

    /// Queues `d`; true when the queue was empty (the caller schedules a run of the batch).
    fn enqueue(&self, d: Delivery) -> bool {
        let mut pending = self.pending.lock();
        let was_empty = pending.is_empty();
        pending.push(d);
        was_empty
    }

    /// Puts undelivered `rest` back ahead of what was queued since, and
    /// schedules a run of the batch if none is due (on the loop thread).
    fn requeue_front(self: &Arc<Self>, py: Python<'_>, rest: Vec<Delivery>) {
        if rest.is_empty() {
            return;
        }
        let was_empty = {
            let mut pending = self.pending.lock();
            let was_empty = pending.is_empty();
            let newer = std::mem::replace(&mut *pending, rest);
            pending.extend(newer);
            was_empty
        };
        if was_empty {
            self.schedule(py, false);
        }
    }

    fn schedule(self: &Arc<Self>, py: Python<'_>, threadsafe: bool) {
        let event_loop = self.event_loop.bind(py);
        let closed = event_loop.call_method0("is_closed").and_then(|c| c.is_truthy()).unwrap_or(true);
        if !closed {
            let runner =
                self.runner.get_or_try_init(py, || Py::new(py, LoopDeliveries { queue: Arc::downgrade(self) }).map(|d| d.into_any()));
            if let Ok(runner) = runner {
                let method = if threadsafe { pyo3::intern!(py, "call_soon_threadsafe") } else { pyo3::intern!(py, "call_soon") };
                if event_loop.call_method1(method, (runner.clone_ref(py),)).is_ok() {
                    if threadsafe {
                        LOOP_WAKES.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
        // The loop is closed (or closing): nobody will await these any more.
        let dropped = std::mem::take(&mut *self.pending.lock());
        drop(dropped);
    }
}

/// Runs on the loop thread: delivers every queued completion.
#[pyclass(frozen, name = "LoopDeliveries", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct LoopDeliveries {
    queue: Weak<LoopQueue>,
}

#[pymethods]
impl LoopDeliveries {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let Some(queue) = self.queue.upgrade() else {
            return Ok(());
        };
        let batch = std::mem::take(&mut *queue.pending.lock());
        LOOP_DELIVERIES.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut batch = batch.into_iter();
        while let Some(d) = batch.next() {
            let func = d.func.bind(py);
            let result = match &d.context {
                Some(ctx) => {
                    PyTuple::new(py, [func.clone(), d.arg.bind(py).clone()]).and_then(|args| ctx.bind(py).call_method1("run", args))
                }
                None => func.call1((d.arg.bind(py),)),
            };
            if let Err(err) = result {
                if stops_the_loop(py, &err) {
                    // As asyncio's own handles do: SystemExit and
                    // KeyboardInterrupt leave the loop. What this batch has
                    // not delivered yet goes back to the front of the queue,
                    // for the loop's next round (asyncio.run's cleanup runs one).
                    let rest: Vec<Delivery> = batch.collect();
                    // Counted again when the next run delivers them.
                    LOOP_DELIVERIES.fetch_sub(rest.len() as u64, Ordering::Relaxed);
                    queue.requeue_front(py, rest);
                    return Err(err);
                }
                report(py, &queue, func, err);
            }
        }
        Ok(())
    }
}

/// `SystemExit` and `KeyboardInterrupt` propagate out of asyncio callbacks
/// (asyncio's `Handle._run` re-raises them); everything else is reported.
fn stops_the_loop(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<pyo3::exceptions::PySystemExit>(py) || err.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py)
}

/// What asyncio's `Handle._run` does with a failing callback.
fn report(py: Python<'_>, queue: &LoopQueue, func: &Bound<'_, PyAny>, err: PyErr) {
    let reported = (|| -> PyResult<()> {
        let ctx = PyDict::new(py);
        ctx.set_item("message", format!("Exception in callback {}", func.repr()?))?;
        ctx.set_item("exception", err.value(py))?;
        queue.event_loop.bind(py).call_method1("call_exception_handler", (ctx,))?;
        Ok(())
    })();
    if let Err(e) = reported {
        e.write_unraisable(py, None);
    }
}

/// `{'wakes': n, 'deliveries': m}`: loop wake-ups and callbacks delivered so far (process-wide).
#[pyfunction]
pub(crate) fn loop_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("wakes", LOOP_WAKES.load(Ordering::Relaxed))?;
    d.set_item("deliveries", LOOP_DELIVERIES.load(Ordering::Relaxed))?;
    Ok(d)
}
