//! `OutsideLane` and `LaneTask`: the Python face of an outside lane (see
//! `crate::engine::outside` for the queue and its protocol).
//!
//! A lane (the process lane's supervisor, a cluster dispatcher) is one
//! thread that loops: wait until `wake_fd` is readable (or its own events
//! come), `take(room)`, run what it got, and report each task once with
//! `finish`, `fail` or `requeue`. The engine does the rest:
//!
//! * `take` starts each token (it counts as running from then on, as in
//!   `ProcessPoolExecutor`'s call queue: `cancel()` no longer stops it,
//!   `kill()` and deadlines do); a token whose pause began after it was
//!   queued is parked instead, and one resolved meanwhile is skipped.
//! * `fail` retries a token with `retries` left (after the operation's
//!   back-off, through the engine's timer) unless `retry=False`; otherwise it
//!   resolves it failed (or `state`: "timeout", "killed").
//! * `requeue` hands back a task the lane never started (its process died
//!   first): it goes back to its old place in the queue.
//! * A taken token resolved from outside (kill, deadline) comes back in a
//!   later `take`'s list of stopped ids: the lane stops the remote work.
//!
//! # Handing the interpreter to the taker
//!
//! A taker that waits with `wait_events` needs the interpreter again once it wakes.
//! A thread that submits a burst holds it meanwhile, and CPython takes it from
//! that thread only after its switch interval (5 ms): the lane's processes
//! would sit idle for as long. So:
//!
//! * `wait_events` (the taker, interpreter released) marks `wanted` with the
//!   number of the wake-up once its epoll instance has events, and clears it
//!   once the taker holds the interpreter again; the events come back with
//!   it (no second system call that would let go of the interpreter).
//! * A submit to the lane that finds `wanted` set, for a wake-up no submitter
//!   stepped aside for yet (`served`), with [`HANDOFF_BATCH`] tokens or more
//!   queued, releases the interpreter and waits,
//!   yielding its core, until the taker cleared `wanted` or
//!   [`HANDOFF_WAIT`] passed. Then it takes the interpreter back, after the
//!   taker's round (the taker releases it in its next `wait_events`).
//! * One submitter at a time steps aside for a wake-up, never while it holds
//!   a lock of the engine's. When the taker did not get the interpreter in
//!   time (another thread took it first, or the taker got no core), that
//!   submitter lost [`HANDOFF_WAIT`] and the next submit tries again; a
//!   handoff that succeeded is not repeated for the same wake-up.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::call::Call;
use super::durations::timeout_arg;
use super::engine_shared::EngineShared;
use super::handle::TaskToken;
use super::run::{park_if_paused, try_retry};
use super::token::{cancel_jobs, Outcome, PyJob, TokenInner};
use crate::engine::outside::{epoll_events, OutsideQueue};
use crate::engine::sync::{AtomicU64, Mutex, Ordering};
use crate::engine::token::TokenState;

/// The worker id an outside token reports while it runs.
const OUTSIDE_WORKER: u32 = u32::MAX - 1;

/// The longest a submitting thread steps aside for the lane's taker (see the
/// module docs): a wake-up across cores takes some tens of microseconds.
const HANDOFF_WAIT: Duration = Duration::from_micros(500);

/// A submitter steps aside only once this many tokens are queued: enough for a
/// batch to each process, where stepping aside at once would send the first
/// token alone and leave the rest for later.
const HANDOFF_BATCH: usize = 16;

/// The interpreter's hand-off from a submitting thread to the lane's taker
/// (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    /// Nonzero while the taker, woken, waits for the interpreter: the number of that wake-up.
    wanted: AtomicU64,
    /// The last wake-up a submitter stepped aside for.
    served: AtomicU64,
    /// The taker's wake-ups so far.
    wakes: AtomicU64,
}

/// One outside lane of a running engine. Made by `Engine.add_outside_lane`.
#[pyclass(frozen, name = "OutsideLane", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct OutsideLane {
    pub(crate) index: u16,
    pub(crate) queue: Arc<OutsideQueue<PyJob>>,
    pub(crate) engine: Weak<EngineShared>,
    pub(crate) handoff: Handoff,
}

/// One token the lane took: its call, until the lane reports how it ended.
#[pyclass(frozen, name = "LaneTask", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct LaneTask {
    inner: Arc<TokenInner>,
    call: Mutex<Option<Call>>,
    key: i64,
    queue: Arc<OutsideQueue<PyJob>>,
}

impl Drop for LaneTask {
    /// A task dropped before the lane reported it (a lane that lost it, or
    /// one that could not become a Python object) kills its token: nothing
    /// stays taken and unresolved.
    fn drop(&mut self) {
        if self.call.get_mut().take().is_some() {
            self.queue.release(self.inner.id);
            self.inner.kill_unreported();
        }
    }
}

impl OutsideLane {
    /// Starts a job the queue handed over; None when it was parked by a
    /// pause, or resolved while queued (then it is no longer taken).
    fn start(&self, py: Python<'_>, q: crate::engine::outside::Queued<PyJob>) -> Option<LaneTask> {
        let id = q.id;
        let started = park_if_paused(py, q.job).and_then(PyJob::claim).filter(|(inner, _)| inner.cell.start(OUTSIDE_WORKER, None));
        let Some((inner, call)) = started else {
            self.queue.release(id);
            return None;
        };
        inner.attempts.store(inner.attempts.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        inner.ledger().process_running.fetch_add(1, Ordering::Relaxed);
        Some(LaneTask { inner, call: Mutex::new(Some(call)), key: q.key, queue: self.queue.clone() })
    }

    /// Called by a thread that just queued a token here: when the lane's taker
    /// woke and waits for the interpreter, steps aside for it once (see the
    /// module docs).
    pub(crate) fn step_aside(&self, py: Python<'_>) {
        let h = &self.handoff;
        let wake = h.wanted.load(Ordering::Acquire);
        if wake == 0 || h.served.load(Ordering::Relaxed) >= wake || self.queue.counts().0 < HANDOFF_BATCH {
            return;
        }
        // Wake-ups only grow: one submitter serves each (and `served` never goes back).
        if h.served.fetch_max(wake, Ordering::AcqRel) >= wake {
            return;
        }
        let handed = py.detach(|| {
            let until = Instant::now() + HANDOFF_WAIT;
            while h.wanted.load(Ordering::Acquire) == wake {
                if Instant::now() >= until {
                    return false;
                }
                std::thread::yield_now();
            }
            true
        });
        if !handed {
            // Another thread took the interpreter first (or the taker got no core in
            // time): the next submit tries again.
            let _ = h.served.compare_exchange(wake, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn engine(&self) -> PyResult<Arc<EngineShared>> {
        self.engine.upgrade().ok_or_else(|| PyRuntimeError::new_err("the engine of this lane is gone"))
    }

    /// The call back from `task` (None when the lane reported it already).
    fn settle(&self, task: &LaneTask) -> Option<Call> {
        let call = task.call.lock().take()?;
        self.queue.release(task.inner.id);
        Some(call)
    }
}

fn end_state(state: &str) -> PyResult<TokenState> {
    match state {
        "failed" => Ok(TokenState::Failed),
        "timeout" => Ok(TokenState::Timeout),
        "killed" => Ok(TokenState::Killed),
        "cancelled" => Ok(TokenState::Cancelled),
        other => Err(PyValueError::new_err(format!("state must be 'failed', 'timeout', 'killed' or 'cancelled', not {other:?}"))),
    }
}

#[pymethods]
impl OutsideLane {
    /// Up to `max` queued tokens, started, in priority order; and the ids of
    /// taken tokens resolved from outside since the last call. When it finds
    /// neither, a stop notice wakes the taker, and so does queued work if
    /// `push_wakes` (default: when `max` is not 0; a taker with no room looks
    /// again once its own events give it room).
    #[pyo3(signature = (max, push_wakes=None))]
    fn take<'py>(&self, py: Python<'py>, max: usize, push_wakes: Option<bool>) -> PyResult<(Bound<'py, PyList>, Vec<u64>)> {
        let push_wakes = push_wakes.unwrap_or(max > 0);
        let out = PyList::empty(py);
        let mut stopped = Vec::new();
        // Jobs resolved while queued, or parked by a pause, are skipped: take
        // again until `max` are out or the queue is empty (then the queue
        // itself arms the wake-up, under its lock).
        loop {
            let want = max - out.len();
            let taken = self.queue.take(want, push_wakes);
            stopped.extend(taken.stopped);
            if taken.jobs.is_empty() {
                break;
            }
            for q in taken.jobs {
                if let Some(task) = self.start(py, q) {
                    // A task that cannot become a Python object is dropped: its
                    // `Drop` kills the token (nothing is left taken and unreported).
                    if let Ok(task) = Py::new(py, task) {
                        let _ = out.append(task);
                    }
                }
            }
            if out.len() >= max {
                break;
            }
        }
        Ok((out, stopped))
    }

    /// The task's function returned `value`. False when its token was
    /// resolved first (killed, timed out) or the task was reported already.
    fn finish(&self, py: Python<'_>, task: &LaneTask, value: Py<PyAny>) -> bool {
        if self.settle(task).is_none() {
            return false;
        }
        task.inner.resolve(py, |s| s == TokenState::Executing, TokenState::Completed, Some(Outcome::Value(value)))
    }

    /// The task failed with `exc`. Retried when `retry` and the token has
    /// retries left (returns True); otherwise the token resolves `state`.
    #[pyo3(signature = (task, exc, *, retry=true, state="failed"))]
    fn fail(&self, py: Python<'_>, task: &LaneTask, exc: Bound<'_, PyAny>, retry: bool, state: &str) -> PyResult<bool> {
        if !exc.is_instance_of::<pyo3::exceptions::PyBaseException>() {
            return Err(PyTypeError::new_err("fail() needs an exception instance"));
        }
        let to = end_state(state)?;
        let Some(call) = self.settle(task) else {
            return Ok(false);
        };
        if retry && to == TokenState::Failed && task.inner.cell.state() == TokenState::Executing {
            let engine = self.engine()?;
            let started = task.inner.cell.time(crate::engine::token::Stamp::Started).unwrap_or(0);
            let elapsed = crate::engine::token::now_ns().saturating_sub(started);
            if try_retry(py, &task.inner, call, &engine) {
                // The attempt's run counts here (its last one counts at resolution).
                task.inner.op().record_run(false, elapsed);
                task.inner.ledger().process_running.fetch_sub(1, Ordering::Relaxed);
                return Ok(true);
            }
        }
        task.inner.resolve(py, |s| s == TokenState::Executing, to, Some(Outcome::Error(exc.unbind())));
        Ok(false)
    }

    /// Hands back a task the lane never started (its process died first): it
    /// goes back to its place in the queue, held by a pause like any queued
    /// token. Returns how many times its token went back so far (0 when it
    /// was resolved first or the task was reported already).
    fn requeue(&self, py: Python<'_>, task: &LaneTask) -> u32 {
        let Some(call) = task.call.lock().take() else {
            return 0;
        };
        let inner = &task.inner;
        if !inner.cell.hand_back() {
            self.queue.release(inner.id);
            return 0;
        }
        // It never ran: this take was no attempt, and a pause holds it again.
        inner.attempts.store(inner.attempts.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
        inner.ledger().process_running.fetch_sub(1, Ordering::Relaxed);
        let job = PyJob::new(inner.clone(), call);
        match self.queue.requeue(task.key, inner.id, job) {
            Ok(n) => {
                if inner.cell.is_done() {
                    // Resolved since it was handed back (a kill, its deadline): the job
                    // put back is skipped when taken; its count goes now, not with it.
                    self.queue.forget_requeues(inner.id);
                    return 0;
                }
                n
            }
            Err(mut job) => {
                job.forget_call();
                job.token().resolve(py, |_| true, TokenState::Cancelled, None);
                0
            }
        }
    }

    /// No more tokens reach the lane; the queued ones are cancelled. Returns how many.
    fn close(&self, py: Python<'_>) -> usize {
        cancel_jobs(py, self.queue.close())
    }

    /// Cancels the queued tokens (the lane stays open). Returns how many.
    fn cancel_queued(&self, py: Python<'_>) -> usize {
        cancel_jobs(py, self.queue.take_unstarted())
    }

    /// The descriptor that turns readable when `take` has something new
    /// (after a `take` that returned nothing). `clear_wake` empties it.
    #[getter]
    fn wake_fd(&self) -> i32 {
        self.queue.wake_socket().as_raw_fd()
    }

    /// Waits, the interpreter released, until the epoll instance `epfd` (the
    /// taker's selector, which gathers `wake_fd` and the lane's own descriptors,
    /// registered by number) has events, or `timeout` seconds pass (None: no
    /// limit), and returns them as `(fd, events)` pairs (at most `EPOLL_EVENTS`, 64; `[]` after
    /// the timeout or when a signal cut the wait short). They are fetched
    /// before the interpreter is taken back: the taker needs no second system
    /// call that would let go of it. A thread that submits to the lane
    /// meanwhile steps aside for the taker once it woke (see the module docs).
    #[pyo3(signature = (epfd, timeout=None))]
    fn wait_events(&self, py: Python<'_>, epfd: i32, timeout: Option<f64>) -> PyResult<Vec<(i32, u32)>> {
        if epfd < 0 {
            return Err(PyValueError::new_err(format!("not a file descriptor: {epfd}")));
        }
        // The one rule of every timeout argument (`timeout_arg`): None or infinite waits
        // for ever, 0 or less does not wait. Rounded up to whole milliseconds, as selectors
        // do (a wait never ends before its time), and capped at epoll's longest, about 24
        // days (a longer wait ends with no events, early: callers loop).
        let ms = match timeout_arg(timeout)? {
            None => -1,
            Some(d) => (d.as_secs_f64() * 1e3).ceil().min(f64::from(i32::MAX)) as i32,
        };
        let h = &self.handoff;
        let mut out = Vec::new();
        let res = py.detach(|| {
            let res = epoll_events(epfd, ms, &mut out);
            if !out.is_empty() {
                h.wanted.store(h.wakes.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Release);
            }
            res
        });
        h.wanted.store(0, Ordering::Release);
        res.map_err(crate::py::exceptions::os_error)?;
        Ok(out)
    }

    /// Reads every pending wake-up byte.
    fn clear_wake(&self) {
        use std::io::Read;
        let mut buf = [0u8; 64];
        while matches!(self.queue.wake_socket().read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Tokens placed on the lane and not resolved (queued, taken, parked,
    /// waiting for their inputs or a retry): 0 when the lane is idle.
    #[getter]
    fn pending(&self) -> u64 {
        self.queue.pending()
    }

    #[getter]
    fn name(&self) -> &str {
        self.queue.name()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// The lane lost a worker while it ran one of its tokens (counted in the
    /// metrics: `tokengate_lane_workers_lost_total`).
    fn note_lost(&self) {
        self.queue.note_lost();
    }

    /// The lane has `n` workers now (shown by the dashboard and `tokengate status`).
    fn set_workers(&self, n: u64) {
        self.queue.set_workers(n);
    }

    /// `{"queued": n, "taken": n, "pending": n, "submitted": n}` (submitted: tokens ever placed on the lane).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (queued, taken) = self.queue.counts();
        let d = PyDict::new(py);
        d.set_item("queued", queued)?;
        d.set_item("taken", taken)?;
        d.set_item("pending", self.queue.pending())?;
        d.set_item("submitted", self.queue.placed())?;
        Ok(d)
    }
}

#[pymethods]
impl LaneTask {
    #[getter]
    fn token(&self, py: Python<'_>) -> PyResult<Py<TaskToken>> {
        Py::new(py, TaskToken { inner: self.inner.clone() })
    }

    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }

    /// The callable submitted (for the process lane, its `ProcessFunction`).
    #[getter]
    fn func(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.with_call(|c| c.func.clone_ref(py))
    }

    #[getter]
    fn args(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.with_call(|c| c.args.clone_ref(py))
    }

    #[getter]
    fn kwargs(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.with_call(|c| c.kwargs.as_ref().map_or_else(|| PyDict::new(py).into_any().unbind(), |k| k.clone_ref(py).into_any()))
    }

    /// This attempt's number (1 for the first).
    #[getter]
    fn attempt(&self) -> u32 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// Times its token went back to the queue unstarted (`OutsideLane.requeue`).
    #[getter]
    fn requeues(&self) -> u32 {
        self.queue.requeues(self.inner.id)
    }

    /// The token's priority (higher runs first).
    #[getter]
    fn priority(&self) -> i64 {
        self.inner.priority
    }

    /// Retries the token has left (a failed attempt is retried while above 0).
    #[getter]
    fn retries_left(&self) -> u32 {
        self.inner.retries_left.load(Ordering::Relaxed)
    }

    /// Records which of the lane's workers runs it (the token's `worker_id`).
    fn set_worker(&self, worker_id: u32) {
        self.inner.cell.set_worker(worker_id);
    }

    /// The operation's name.
    #[getter]
    fn operation_type(&self) -> String {
        self.inner.op().name.to_string()
    }

    /// The operation's weight: "light", "medium" or "heavy".
    #[getter]
    fn weight(&self) -> &'static str {
        self.inner.spec().weight.as_str()
    }

    /// Whether the token has a deadline (a `timeout` tag or a per-call timeout).
    #[getter]
    fn has_deadline(&self) -> bool {
        self.inner.deadline_ns.load(Ordering::Relaxed) != 0
    }
}

impl LaneTask {
    fn with_call<T>(&self, f: impl FnOnce(&Call) -> T) -> PyResult<T> {
        self.call.lock().as_ref().map(f).ok_or_else(|| PyRuntimeError::new_err("this task was reported already"))
    }
}
