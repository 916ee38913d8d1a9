//! A token's shared part (`TokenInner`) and its queued job (`PyJob`).
//!
//! # Who holds a token
//!
//! `TokenInner` is owned by its Python handle (`handle::TaskToken`), by the
//! job in a run queue, by listeners and by the ledger's registry (weakly). Its
//! outcome and listeners live in the lock-protected slot of the engine's
//! [`TokenCell`] (see `crate::engine::token` for the state protocol).
//!
//! # Resolution
//!
//! A token resolves exactly once (`resolve*`): its routing pin is released,
//! the books are kept (admission slots, registry, metrics, history:
//! `Ledger::on_resolved`) and the outcome is
//! stored under the slot's lock, before the terminal state is published; the
//! listeners are taken out of the slot by the resolving thread and fired
//! after the lock is released:
//!
//! * `Listener::Thread` (registered with no running event loop): called on
//!   the resolving thread, as `concurrent.futures` does.
//! * `Listener::Loop` (registered from a thread running an event loop, which
//!   is how asyncio's `Task` and `gather` register): queued on that loop's
//!   completion queue (`asyncio.rs`), called on the loop thread.
//! * `Listener::Waiter`: a dependent token's wait (`deps.rs`) or a
//!   `wait_all` countdown (`wait.rs`), told on the resolving thread.
//!
//! # Jobs
//!
//! The call (function, arguments, context) lives in the token (`call`,
//! under its lock); a queued `PyJob` points at the token. Whoever takes the
//! call first runs it (see `run.rs`). A job whose call was taken stays in its
//! queue until a worker pops it and drops it ("spent"). A retry puts the call
//! back under a new attempt number with a new job; a job takes only its own
//! attempt's call, so a spent job of an earlier attempt never runs a later
//! one. If a job is dropped while its call is still there (a drain or a
//! stop took it out of its queue, or the pool was dropped), its token
//! resolves as cancelled: no token is ever left pending; a spent job taken
//! out so is only dropped (its token runs).

use std::sync::Arc;

use pyo3::prelude::*;

use super::asyncio::{self as aio, Delivery, LoopQueue};
use super::call::Call;
use super::exceptions::{self, BindError};
use super::lifecycle::check_not_forked;
use super::operation::{CallOptions, SpecShared};
use crate::engine::ledger::Booked;
use crate::engine::outside::OutsideQueue;
use crate::engine::pool::{Job, Weight};
use crate::engine::routing::Route;
use crate::engine::sync::{AtomicU32, AtomicU64, Ordering};
use crate::engine::token::{TokenCell, TokenState};

/// The books of one engine, over this layer's tokens and jobs.
pub(crate) type Ledger = crate::engine::ledger::Ledger<TokenInner, PyJob>;
/// One operation's state on one engine.
pub(crate) type OpState = crate::engine::ledger::OpState<PyJob>;

/// What a finished body produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The returned value.
    Value(Py<PyAny>),
    /// The exception instance (raised by the body, or made by tokengate: killed, panic).
    Error(Py<PyAny>),
}

/// Someone to tell when the token resolves.
#[derive(Debug)]
pub(crate) enum Listener {
    /// Call `func(arg)` on the resolving thread.
    Thread { func: Py<PyAny>, arg: Py<PyAny> },
    /// Call `func(arg)` on an event loop's thread.
    Loop { queue: Arc<LoopQueue>, delivery: Delivery },
    /// Tell a waiter inside tokengate (a dependent token, a `wait_all`).
    Waiter(Arc<dyn Waiter>),
}

/// A waiter inside tokengate that a resolution tells (on the resolving thread).
pub(crate) trait Waiter: Send + Sync + std::fmt::Debug {
    /// One token it waits on resolved (or, for some, the registrar is done).
    fn notify(&self, py: Python<'_>);
}

/// The lock-protected part of a token.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) outcome: Option<Outcome>,
    pub(crate) listeners: Listeners,
}

/// The listeners of a pending token: boxed, so that the many tokens nobody
/// listens to carry one word for them.
/// (The box is the point: one word where a `Vec` takes three.)
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
pub(crate) struct Listeners(Option<Box<Vec<Listener>>>);

impl Listeners {
    fn push(&mut self, listener: Listener) {
        self.0.get_or_insert_with(Box::default).push(listener);
    }

    /// Takes them all out.
    fn take(&mut self) -> Vec<Listener> {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    /// Takes out those for which `out` is true; keeps the rest.
    fn take_where(&mut self, out: impl FnMut(&Listener) -> bool) -> Vec<Listener> {
        let (gone, kept): (Vec<_>, Vec<_>) = self.take().into_iter().partition(out);
        if !kept.is_empty() {
            self.0 = Some(Box::new(kept));
        }
        gone
    }
}

/// The shared part of a token.
#[derive(Debug)]
pub(crate) struct TokenInner {
    pub(crate) cell: TokenCell<Slot>,
    pub(crate) id: u64,
    /// Its operation, on its engine (spec, ledger and operation state).
    bind: Arc<Binding>,
    pub(crate) priority: i64,
    /// `now_ns` deadline, 0 for none.
    pub(crate) deadline_ns: AtomicU64,
    pub(crate) retries_left: AtomicU32,
    pub(crate) attempts: AtomicU32,
    /// Pin to release at resolution (sticky key or lead domain).
    pub(crate) route: Route,
    /// The worker this token must run on (sticky anchors, lead children;
    /// `NOT_PINNED` for none: see `pinned()`).
    pinned: u32,
    /// Which lane runs it.
    pub(crate) lane: LaneKind,
    /// A lead token (its domain's core is recorded when it starts).
    pub(crate) is_lead: bool,
    /// Where the ledger's registry holds it: shard << 32 | slot (MAX: not registered).
    pub(crate) registry_slot: AtomicU64,
    /// The call, until someone takes it to run it (see `run.rs`).
    pub(crate) call: crate::engine::sync::Mutex<Option<Call>>,
    /// Which job owns the call (read and written under `call`'s lock):
    /// bumped each time a retry puts the call back, so that a job of an
    /// earlier attempt still queued (its call was taken by a waiter that
    /// ran the token itself) never takes a later attempt's.
    call_attempt: AtomicU32,
}

impl Drop for TokenInner {
    fn drop(&mut self) {
        self.bind.ledger.on_token_freed();
    }
}

// A pending token's memory is mostly this struct (in an `Arc`: 16 bytes more,
// in a 224-byte block of the C allocator). Measured in benches/bench_memory.py.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<TokenInner>() <= 200, "TokenInner grew past 200 bytes");

/// `TokenInner::pinned` of a token that may run on any worker.
const NOT_PINNED: u32 = u32::MAX;

/// The lane a token runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LaneKind {
    /// The CPU worker pool.
    #[default]
    Cpu,
    /// The elastic I/O lane, in one storage tier (its index).
    Io(u16),
    /// Driven by hand through the lane API (`OperationSpec.external_token`).
    Process,
    /// An outside lane of its engine (worker processes, a cluster), by index
    /// (see `crate::engine::outside` and `outside.rs`).
    Outside(u16),
}

impl LaneKind {
    /// Its body runs outside this process's threads.
    pub(crate) fn runs_elsewhere(self) -> bool {
        matches!(self, LaneKind::Process | LaneKind::Outside(_))
    }
}

/// Routing decided at call time.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    pub(crate) route: Route,
    pub(crate) pinned: Option<usize>,
    pub(crate) lane: LaneKind,
    pub(crate) is_lead: bool,
}

/// What every token of one operation on one engine shares: one reference
/// count per token instead of three (these counts are touched by the
/// submitting thread and the workers alike).
#[derive(Debug)]
pub(crate) struct Binding {
    pub(crate) spec: Arc<SpecShared>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) op: Arc<OpState>,
}

impl Booked for TokenInner {
    type Slot = Slot;

    fn id(&self) -> u64 {
        self.id
    }

    fn cell(&self) -> &TokenCell<Slot> {
        &self.cell
    }

    fn registry_slot(&self) -> &AtomicU64 {
        &self.registry_slot
    }

    fn op_name(&self) -> &str {
        &self.op().name
    }
}

impl TokenInner {
    /// A new token; `call` is what a worker will run (None for tokens a lane outside the pool drives).
    pub(crate) fn new(id: u64, bind: Arc<Binding>, opts: &CallOptions, placement: Placement, call: Option<Call>) -> Arc<Self> {
        Arc::new(TokenInner {
            call: crate::engine::sync::Mutex::new(call),
            call_attempt: AtomicU32::new(0),
            registry_slot: AtomicU64::new(u64::MAX),
            route: placement.route,
            pinned: placement.pinned.map_or(NOT_PINNED, |w| u32::try_from(w).expect("a worker index fits in 32 bits")),
            lane: placement.lane,
            is_lead: placement.is_lead,
            cell: TokenCell::new(Slot::default()),
            id,
            bind,
            priority: opts.priority,
            deadline_ns: AtomicU64::new(0),
            retries_left: AtomicU32::new(opts.retries),
            attempts: AtomicU32::new(0),
        })
    }

    /// The decorated function's record.
    #[inline]
    pub(crate) fn spec(&self) -> &Arc<SpecShared> {
        &self.bind.spec
    }

    /// The worker this token must run on, if any.
    pub(crate) fn pinned(&self) -> Option<usize> {
        (self.pinned != NOT_PINNED).then_some(self.pinned as usize)
    }

    /// The books of its engine.
    #[inline]
    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.bind.ledger
    }

    /// The outside lane (worker processes, a cluster) its token runs on, if any.
    fn outside_lane(&self) -> Option<&Arc<OutsideQueue<PyJob>>> {
        match self.lane {
            LaneKind::Outside(index) => self.ledger().outside.get(usize::from(index)),
            _ => None,
        }
    }

    /// Its operation's state on its engine.
    #[inline]
    pub(crate) fn op(&self) -> &Arc<OpState> {
        &self.bind.op
    }

    /// Resolves the token once: moves to `to` if `allowed(current)`, stores
    /// `outcome`, then fires listeners. False when it was resolved already.
    pub(crate) fn resolve(&self, py: Python<'_>, allowed: impl Fn(TokenState) -> bool, to: TokenState, outcome: Option<Outcome>) -> bool {
        self.resolve_at(py, allowed, to, outcome, None)
    }

    /// `resolve` with the finish time already read (`None`: read it now).
    pub(crate) fn resolve_at(
        &self,
        py: Python<'_>,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        outcome: Option<Outcome>,
        finished_ns: Option<u64>,
    ) -> bool {
        let error = match &outcome {
            Some(Outcome::Error(e)) => e.bind(py).get_type().name().ok().map(|n| n.to_string()),
            _ => None,
        };
        match self.resolve_quiet_at(allowed, to, outcome, error, finished_ns) {
            Some(listeners) => {
                fire(py, listeners);
                true
            }
            None => false,
        }
    }

    /// Like `resolve`, but hands the listeners back instead of firing them
    /// (for callers that may not be attached to the interpreter).
    pub(crate) fn resolve_quiet(
        &self,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        outcome: Option<Outcome>,
        error: Option<String>,
    ) -> Option<Vec<Listener>> {
        self.resolve_quiet_at(allowed, to, outcome, error, None)
    }

    fn resolve_quiet_at(
        &self,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        outcome: Option<Outcome>,
        error: Option<String>,
        finished_ns: Option<u64>,
    ) -> Option<Vec<Listener>> {
        // The books are kept before the terminal state is published.
        let listeners = self.cell.resolve_at(allowed, to, finished_ns, |slot| {
            // The state it leaves is still visible here (see `TokenCell::resolve_at`).
            let elsewhere = self.lane.runs_elsewhere();
            if elsewhere && self.cell.state() == TokenState::Executing {
                self.ledger().process_running.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(lane) = self.outside_lane() {
                lane.on_resolved(self.id);
            }
            slot.outcome = outcome;
            self.route.release();
            self.ledger().on_resolved(self, self.op(), to, elsewhere, error);
            slot.listeners.take()
        });
        if listeners.is_some() {
            if let Some(lane) = self.outside_lane() {
                lane.notify_resolved(self.id);
            }
        }
        // A resolved burst's memory goes back to the OS here, out of the token's lock.
        crate::engine::memory::release_if_requested();
        listeners
    }

    /// Cancels a token whose job was dropped without running (pool gone).
    /// May run on any thread, attached or not.
    pub(crate) fn cancel_unrun(&self) {
        if let Some(listeners) = self.resolve_quiet(|_| true, TokenState::Cancelled, None, None) {
            if !listeners.is_empty() {
                // Without an interpreter (finalizing) there is nobody left to tell.
                let _ = Python::try_attach(|py| fire(py, listeners));
            }
        }
    }

    /// Kills a token an outside lane took and dropped without reporting it
    /// (see `outside.rs`). May run on any thread, attached or not.
    pub(crate) fn kill_unreported(&self) {
        let why = "the lane dropped a token it took without reporting how it ended".to_owned();
        if let Some(listeners) = self.resolve_quiet(|s| s == TokenState::Executing, TokenState::Killed, None, Some(why)) {
            if !listeners.is_empty() {
                let _ = Python::try_attach(|py| fire(py, listeners));
            }
        }
    }

    /// The outcome as a Python return value or exception. The token must be done.
    ///
    /// `asyncio`: for an awaiting coroutine or an asyncio callback. A
    /// cancelled token then raises `asyncio.CancelledError` (with the message
    /// of `cancel(msg)`), and a body's `StopIteration` arrives as a
    /// `RuntimeError` (see `exceptions::for_await`).
    pub(crate) fn outcome(&self, py: Python<'_>, asyncio: bool) -> PyResult<Py<PyAny>> {
        let state = self.cell.state();
        if state == TokenState::Cancelled && !asyncio {
            return Err(BindError::Cancelled.into_pyerr(py));
        }
        let slot = self.read_slot()?;
        match (&slot.outcome, state) {
            // A cancel with a message keeps the message as the value (see `cancel_note`).
            (Some(Outcome::Value(msg)), TokenState::Cancelled) => Err(exceptions::asyncio_cancelled_with(py, Some(msg.bind(py)))),
            (_, TokenState::Cancelled) => Err(exceptions::asyncio_cancelled(py)),
            (Some(Outcome::Value(v)), _) => Ok(v.clone_ref(py)),
            (Some(Outcome::Error(e)), _) if asyncio => Err(exceptions::for_await(py, PyErr::from_value(e.bind(py).clone()))),
            (Some(Outcome::Error(e)), _) => Err(PyErr::from_value(e.bind(py).clone())),
            (None, _) => Err(BindError::Runtime(format!("token in state {} has no outcome", state.as_str())).into_pyerr(py)),
        }
    }

    /// The slot, to read the outcome of a resolved token.
    pub(crate) fn read_slot(&self) -> Result<crate::engine::sync::MutexGuard<'_, Slot>, BindError> {
        if check_not_forked().is_ok() {
            Ok(self.cell.lock())
        } else {
            // Forked: a parent thread may have held the slot at the fork (resolving this token).
            self.cell.try_lock().ok_or(BindError::Forked)
        }
    }

    /// Kills the token: waiters get `TaskKilledError(reason)` at once; a
    /// running body sees its cancel flag and its result is dropped.
    pub(crate) fn kill(&self, py: Python<'_>, reason: &str) -> PyResult<bool> {
        let value = exceptions::killed_value(py, reason)?;
        self.cell.request_cancel();
        Ok(self.resolve(py, |_| true, TokenState::Killed, Some(Outcome::Error(value))))
    }

    /// The deadline passed: a queued token never runs; a running one's
    /// waiters get `TaskTimeoutError` now and its body sees the cancel flag.
    pub(crate) fn expire(&self, py: Python<'_>) {
        let was = self.cell.state();
        if was.is_terminal() {
            return;
        }
        let value = exceptions::timeout_value(py, self.id, &self.op().name);
        self.cell.request_cancel();
        if self.resolve(py, |_| true, TokenState::Timeout, Some(Outcome::Error(value))) {
            let counter = if was == TokenState::Executing { &self.ledger().timeouts_running } else { &self.ledger().timeouts_queued };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cancels the token if it has not started (no cancel flag otherwise).
    pub(crate) fn cancel_pending(&self, py: Python<'_>) -> bool {
        self.resolve(py, TokenState::is_pending, TokenState::Cancelled, None)
    }

    /// `cancel()`: cancels a token that has not started. A running token
    /// cannot be cancelled; its cooperative cancel flag is set instead.
    ///
    /// `msg` (asyncio's `cancel(msg)`) is kept for asyncio callers: see `outcome`.
    pub(crate) fn cancel(&self, py: Python<'_>, msg: Option<&Bound<'_, PyAny>>) -> bool {
        if self.resolve(py, TokenState::is_pending, TokenState::Cancelled, cancel_note(msg)) {
            return true;
        }
        match self.cell.state() {
            TokenState::Cancelled => true,
            TokenState::Executing => {
                self.cell.request_cancel();
                false
            }
            _ => false,
        }
    }

    /// asyncio's `cancel()` of a running token (asyncio.wait_for, gather
    /// and friends hold the token itself as their future, and wait for a
    /// cancelled future to be done): resolves it as cancelled now. The body
    /// runs on with its cancel flag set, and its outcome is dropped, as
    /// after `kill`. (Awaiting the token directly goes through
    /// `TokenAwait`, whose cancel ends only that await.)
    pub(crate) fn cancel_running(&self, py: Python<'_>, msg: Option<&Bound<'_, PyAny>>) -> bool {
        self.cell.request_cancel();
        self.resolve(py, |s| s == TokenState::Executing, TokenState::Cancelled, cancel_note(msg))
    }

    /// Registers `func(arg)` to run once the token resolves; runs it now
    /// (or schedules it on the running loop) if it already has.
    pub(crate) fn add_listener(
        &self,
        py: Python<'_>,
        func: Bound<'_, PyAny>,
        arg: Py<PyAny>,
        context: Option<Py<PyAny>>,
        on_thread: bool,
    ) -> PyResult<()> {
        let running_loop = if on_thread { None } else { aio::running_loop(py)? };
        let listener = match &running_loop {
            Some(event_loop) => {
                Listener::Loop { queue: aio::queue_for(py, event_loop), delivery: Delivery { func: func.unbind(), arg, context } }
            }
            None => Listener::Thread { func: func.unbind(), arg },
        };
        {
            let mut slot = self.cell.lock();
            if !self.cell.is_done() {
                slot.listeners.push(listener);
                return Ok(());
            }
        }
        match listener {
            Listener::Thread { func, arg } => call_thread_listener(py, &func, &arg),
            Listener::Loop { queue, delivery } => queue.push_local(py, delivery),
            Listener::Waiter(waiter) => waiter.notify(py),
        }
        Ok(())
    }

    /// Registers `listener` (a dependent token's wait, a `wait_all` countdown)
    /// unless the token is done already: then false, and nothing is kept.
    pub(crate) fn add_if_pending(&self, listener: Listener) -> bool {
        let mut slot = self.cell.lock();
        if self.cell.is_done() {
            return false;
        }
        slot.listeners.push(listener);
        true
    }

    /// Takes out the listeners registered with `arg` (by identity).
    pub(crate) fn take_listeners_for(&self, arg: &Bound<'_, PyAny>) -> Vec<Listener> {
        self.cell.lock().listeners.take_where(|l| match l {
            Listener::Thread { arg: a, .. } => a.as_ptr() == arg.as_ptr(),
            Listener::Loop { delivery, .. } => delivery.arg.as_ptr() == arg.as_ptr(),
            Listener::Waiter(_) => false,
        })
    }

    /// Removes every listener whose function equals `func`; returns how many.
    pub(crate) fn remove_listener(&self, py: Python<'_>, func: &Bound<'_, PyAny>) -> PyResult<usize> {
        let removed: Vec<Listener> = self.cell.lock().listeners.take_where(|l| {
            let f = match l {
                Listener::Thread { func, .. } => func,
                Listener::Loop { delivery, .. } => &delivery.func,
                Listener::Waiter(_) => return false,
            };
            f.bind(py).eq(func).unwrap_or(false)
        });
        Ok(removed.len())
    }
}

/// Fires listeners taken out of a resolved token.
pub(crate) fn fire(py: Python<'_>, listeners: Vec<Listener>) {
    for listener in listeners {
        match listener {
            Listener::Thread { func, arg } => call_thread_listener(py, &func, &arg),
            Listener::Loop { queue, delivery } => queue.push(py, delivery),
            Listener::Waiter(waiter) => waiter.notify(py),
        }
    }
}

pub(crate) fn call_thread_listener(py: Python<'_>, func: &Py<PyAny>, arg: &Py<PyAny>) {
    if let Err(err) = func.call1(py, (arg.clone_ref(py),)) {
        super::log::callback_error(py, arg.bind(py), err);
    }
}

/// The handle a decorated call returns. See `tokengate/_tokengate.pyi`.
/// The outcome a cancel leaves: the message asyncio gave (`cancel(msg)`),
/// kept as the value of the cancelled token; each raise builds a fresh
/// `CancelledError(msg)` from it (see `outcome`), as `asyncio.Future` does: a
/// stored exception would carry the traceback of every frame it was raised
/// through, and those frames the token.
fn cancel_note(msg: Option<&Bound<'_, PyAny>>) -> Option<Outcome> {
    msg.map(|m| Outcome::Value(m.clone().unbind()))
}

/// A queued token (its call is in the token).
#[derive(Debug)]
pub(crate) struct PyJob {
    /// Always `Some` until `into_token` takes it.
    token: Option<Arc<TokenInner>>,
    /// The attempt whose call this job may take (see `TokenInner::call_attempt`).
    attempt: u32,
    /// Resolve the token as cancelled if the job is dropped with its call unrun.
    armed: bool,
}

impl PyJob {
    /// A job for another attempt of `token`, with the call it runs.
    pub(crate) fn new(token: Arc<TokenInner>, call: Call) -> Self {
        let attempt = {
            let mut slot = token.call.lock();
            let attempt = token.call_attempt.load(Ordering::Relaxed).wrapping_add(1);
            token.call_attempt.store(attempt, Ordering::Relaxed);
            *slot = Some(call);
            attempt
        };
        PyJob { token: Some(token), attempt, armed: true }
    }

    /// A job for a token made with its call in place (`TokenInner::new`:
    /// the first attempt, 0).
    #[inline]
    pub(crate) fn holding_call(token: Arc<TokenInner>) -> Self {
        PyJob { token: Some(token), attempt: 0, armed: true }
    }

    /// Takes the call, if it is still there and belongs to this job's attempt.
    #[inline]
    fn take_call(&self) -> Option<Call> {
        let token = self.token();
        let mut slot = token.call.lock();
        if token.call_attempt.load(Ordering::Relaxed) == self.attempt {
            slot.take()
        } else {
            None
        }
    }

    /// The token's handle, without resolving anything (the job is spent).
    #[inline]
    fn into_token(mut self) -> Arc<TokenInner> {
        self.armed = false;
        self.token.take().expect("a job holds its token until it is spent")
    }

    /// Takes this job's call to run it, with the token's handle (the job is
    /// spent). None when the call is gone: a waiter took it to run the token
    /// itself, or the job belongs to an earlier attempt (see `TokenInner::call_attempt`).
    #[inline]
    pub(crate) fn claim(mut self) -> Option<(Arc<TokenInner>, Call)> {
        self.armed = false;
        let call = self.take_call()?;
        Some((self.into_token(), call))
    }

    /// Drops the call without resolving the token (the caller resolves it).
    /// True when the call was there (nobody else took it to run it).
    #[inline]
    pub(crate) fn forget_call(&mut self) -> bool {
        self.armed = false;
        self.take_call().is_some()
    }

    /// The token this job runs.
    #[inline]
    pub(crate) fn token(&self) -> &Arc<TokenInner> {
        self.token.as_ref().expect("a job holds its token until it is spent")
    }
}

impl Job for PyJob {
    fn weight(&self) -> Weight {
        self.token().spec().weight
    }

    fn submitted_ns(&self) -> Option<u64> {
        self.token().cell.time(crate::engine::token::Stamp::Created)
    }

    fn class(&self) -> u32 {
        self.token().op().index()
    }

    /// A caller that submits and then waits (`f(x).result()`, `await f(x)`)
    /// holds the interpreter until its wait begins; a worker that attached
    /// before that would block on the interpreter and need a thread wake-up
    /// (~10 us). Waiting up to `ATTACH_DELAY` for the wait to begin avoids it.
    fn before_idle_run(&self) {
        self.token().cell.spin_until_awaited(super::attach::ATTACH_DELAY);
    }

    /// A waiter took the call and runs (or ran) the token itself
    /// (`run_on_caller`, `help_until_done`), or this job belongs to an
    /// earlier attempt: nothing left for it to run, no reason to take the
    /// interpreter.
    fn is_spent(&self) -> bool {
        let token = self.token();
        let slot = token.call.lock();
        token.call_attempt.load(Ordering::Relaxed) != self.attempt || slot.is_none()
    }
}

impl Drop for PyJob {
    fn drop(&mut self) {
        // `into_token` took the handle: the run owns the token now.
        if self.armed && self.token.is_some() && self.take_call().is_some() {
            self.token().cancel_unrun();
        }
    }
}

/// Resolves jobs taken out of their queues before they started
/// (`take_unstarted`) as cancelled. A job whose call a waiter already took
/// (that waiter runs the token) is only dropped.
pub(crate) fn cancel_jobs(py: Python<'_>, jobs: Vec<PyJob>) -> usize {
    let mut n = 0;
    for mut job in jobs {
        if job.forget_call() && job.token().resolve(py, |_| true, TokenState::Cancelled, None) {
            n += 1;
        }
    }
    n
}
