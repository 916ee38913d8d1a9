//! Waiting for tokens: the one home of every way a thread waits.
//!
//! # Protocol
//!
//! A thread that waits on an unresolved token (`TokenInner::wait`) takes the
//! first of these that applies:
//!
//! 1. **Help while waiting** (a pool worker, whose task waits on another
//!    token): it runs queued work inline until the token is done
//!    (`help_until_done`): the awaited token itself first, if it is still
//!    queued and may run here, then other queued jobs that fit its core
//!    (`inline_units`). So a task that waits on tokens it submitted cannot
//!    deadlock, even with one worker. Nesting stops at `MAX_HELP_DEPTH`; a
//!    wait that made no progress for `STALL_LIMIT` runs the awaited token
//!    even beside a heavy one (liveness before the heavy limit).
//! 2. **Caller runs** (a thread outside the pool, no timeout): it runs the
//!    token itself when nobody started it (`run_on_caller`), holding core
//!    units as a worker would (`thread::OUTSIDE_UNITS`).
//! 3. **Block**: detached, waking every 50 ms for Ctrl-C (`wait_detached`).
//!    A thread that runs a token for its caller and blocks in a nested wait
//!    lends that token's core units back to the pool meanwhile (`LentUnits`).
//!
//! Spinning: a waiter that saw its token finish spins up to
//! `attach::ATTACH_DELAY` for the worker to release the interpreter
//! (`attach::settle_after_wait`), and `await token` spins up to `AWAIT_SPIN`
//! before it suspends (`handle.rs`).
//!
//! `wait_all` waits for many tokens with one block: a `Countdown` registered
//! on each (a `Listener::Waiter`), woken once by the last resolution.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::asyncio::running_loop;
use super::attach::{idle_epoch, settle_after_wait};
use super::detached::wait_detached;
use super::durations::timeout_arg;
use super::engine_shared::EngineShared;
use super::exceptions::BindError;
use super::lifecycle::check_not_forked;
use super::registry::with_current_engine;
use super::run::{execute, run_call};
use super::thread::{is_current_token, on_main_thread, on_worker_thread, CHAIN_UNITS, HELP_DEPTH, OUTSIDE_UNITS, WORKER};
use super::token::{LaneKind, Listener, TokenInner, Waiter};
use crate::engine::pool::{Job, Weight, WorkerInfo};
use crate::engine::sync::{AtomicUsize, Condvar, Mutex, Ordering};
use crate::engine::token::TokenState;

impl TokenInner {
    /// Blocks (detached, Ctrl-C aware) until done; Err(TimeoutError) after `timeout`.
    pub(crate) fn wait(self: &Arc<Self>, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        if self.cell.is_done() {
            return Ok(());
        }
        check_not_forked()?;
        if is_current_token(self) {
            return Err(BindError::SelfWait.into());
        }
        let timeout = timeout_arg(timeout)?;
        if on_worker_thread() {
            // A task waiting on another token: run queued work meanwhile, so
            // that nested waits cannot exhaust the workers (help while waiting).
            return if help_until_done(py, self, timeout)? { Ok(()) } else { Err(BindError::WaitTimeout.into_pyerr(py)) };
        }
        // Nobody started it and the caller waits for as long as it takes: it runs the token itself.
        if timeout.is_none() && run_on_caller(py, self) && self.cell.is_done() {
            return Ok(());
        }
        let _lent = LentUnits::lend();
        let epoch = idle_epoch();
        // A token of an outside lane (another process, a cluster) is resolved by
        // a thread of this process that holds the interpreter: neither spinning
        // for it nor for a pool worker to go idle pays.
        let near = !matches!(self.lane, LaneKind::Outside(_));
        let done = wait_detached(py, timeout, |step| {
            let done = self.cell.wait_spinning(Some(step), near);
            if done && near {
                settle_after_wait(epoch);
            }
            done
        })?;
        if done {
            Ok(())
        } else {
            Err(BindError::WaitTimeout.into_pyerr(py))
        }
    }
}

/// Core units a job of `weight` gets to run inline on this worker now, or
/// None. Light and medium jobs use the units the waiting chain already
/// holds. A heavy job needs its core to itself: nothing else running on it,
/// or, once the wait has stalled, no other heavy job there (the waiting
/// jobs are blocked), so liveness never costs the heavy limit.
fn inline_units(engine: &EngineShared, info: &WorkerInfo, weight: Weight, stalled: bool) -> Option<u32> {
    if weight != Weight::Heavy {
        return Some(engine.pool.units_of(info.index, weight));
    }
    let held = crate::engine::pool::held_units() + CHAIN_UNITS.with(std::cell::Cell::get);
    engine.pool.inline_heavy(info.index, held, stalled)
}

/// Runs `f` with `units` counted in this thread's chain, then gives them back.
fn with_chain_units<R>(engine: &EngineShared, info: &WorkerInfo, weight: Weight, units: u32, f: impl FnOnce() -> R) -> R {
    CHAIN_UNITS.with(|c| c.set(c.get() + units));
    let out = f();
    CHAIN_UNITS.with(|c| c.set(c.get() - units));
    if weight == Weight::Heavy {
        engine.pool.inline_release(info.index, weight, units);
    }
    out
}

/// Nested waits deeper than this block instead of running more work inline.
const MAX_HELP_DEPTH: u32 = 200;

/// Waits for `token` on a worker thread, running queued jobs inline meanwhile
/// (rayon's help-while-waiting), so a task that waits on tokens it submitted
/// cannot deadlock even with one worker. True when done, false on timeout.
fn help_until_done(py: Python<'_>, token: &Arc<TokenInner>, timeout: Option<Duration>) -> PyResult<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let Some((engine, info)) = WORKER.with(|w| w.borrow().as_ref().map(|(e, i)| (e.upgrade(), *i))) else {
        return Ok(token.cell.wait(timeout));
    };
    let Some(engine) = engine else {
        return Ok(token.cell.wait(timeout));
    };
    let weak = Arc::downgrade(&engine);
    let depth = HELP_DEPTH.with(|d| d.get());
    let started = Instant::now();
    let mut last_signal_check = started;
    loop {
        if token.cell.is_done() {
            return Ok(true);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        let stalled = started.elapsed() >= STALL_LIMIT;
        // The awaited token itself, if it still waits in a queue and may run here.
        let runnable_here = token.cell.state() == TokenState::Admitted
            && token.lane == LaneKind::Cpu
            && token.pinned().is_none_or(|w| w == info.index)
            && (depth < MAX_HELP_DEPTH || stalled);
        let units = if runnable_here { inline_units(&engine, &info, token.spec().weight, stalled) } else { None };
        if let Some(units) = units {
            let weight = token.spec().weight;
            let claimed = token.call.lock().take();
            match claimed {
                Some(call) => {
                    HELP_DEPTH.with(|d| d.set(depth + 1));
                    with_chain_units(&engine, &info, weight, units, || {
                        run_call(py, token.clone(), call, Some(&info), &weak);
                    });
                    HELP_DEPTH.with(|d| d.set(depth));
                }
                None if weight == Weight::Heavy => engine.pool.inline_release(info.index, weight, units),
                None => {}
            }
            continue;
        }
        // Otherwise other queued work that may run here.
        let other = if depth < MAX_HELP_DEPTH { engine.pool.try_take() } else { None };
        let fit = other.as_ref().and_then(|job| inline_units(&engine, &info, Job::weight(job), stalled));
        match (other, fit) {
            (Some(job), Some(units)) => {
                let weight = Job::weight(&job);
                HELP_DEPTH.with(|d| d.set(depth + 1));
                with_chain_units(&engine, &info, weight, units, || execute(py, job, &info, &weak));
                HELP_DEPTH.with(|d| d.set(depth));
            }
            (Some(job), None) => {
                // A heavy job that cannot have this core: a worker whose core has room
                // takes it, before what is still queued (not the end of the queue).
                if !Job::is_spent(&job) {
                    match job.token().pinned() {
                        Some(w) => drop(engine.pool.submit_to(w, job)),
                        None => engine.pool.defer(job),
                    }
                }
                let step = Duration::from_millis(1);
                py.detach(|| token.cell.wait(Some(step)));
            }
            (None, _) => {
                let step = Duration::from_millis(2);
                py.detach(|| token.cell.wait(Some(step)));
            }
        }
        if last_signal_check.elapsed() >= Duration::from_millis(50) {
            py.check_signals()?;
            last_signal_check = Instant::now();
        }
    }
}

/// Caller runs: a thread outside the pool that waits, without a timeout, on
/// a token no worker has started runs the token itself, as a worker would,
/// instead of waking a worker and sleeping until it is done (as .NET's
/// `Task.Wait` inlines an unstarted task and `ForkJoinTask.join` runs it).
/// That saves two thread switches per token (four interpreter hand-overs
/// under the GIL). True when it ran the token here.
///
/// Only where the body cannot tell (what does differ, the thread above all,
/// is listed in the README's "Caller runs"):
/// * the coordinator allows it (`caller_runs`, default on), the token waits
///   in the CPU pool's queues (`ADMITTED`), and neither admission nor its
///   operation is paused nor the engine stopping;
/// * the token is not pinned to a worker (sticky anchors, lead domains), not
///   a lead, has no deadline (a deadline must be able to end the wait), and
///   is not heavy (a heavy token has its core to itself);
/// * the waiter is not the main thread (Ctrl-C is delivered there and
///   belongs to the wait, not to the body), runs no asyncio event loop (the
///   body would see it) and is not already running a token for its caller
///   (one level);
/// * a core has room for the token's units, which the caller holds while it
///   runs the body (given back while the body blocks in a nested wait, see
///   `LentUnits`), so the per-core limits hold as for workers.
///
/// Whoever takes the call first runs it (`Call` is taken under its lock); a
/// worker that later pops the spent job drops it without taking the
/// interpreter (`Job::is_spent`).
fn run_on_caller(py: Python<'_>, token: &Arc<TokenInner>) -> bool {
    if token.cell.state() != TokenState::Admitted
        || token.lane != LaneKind::Cpu
        || token.pinned().is_some()
        || token.is_lead
        || token.deadline_ns.load(Ordering::Relaxed) != 0
    {
        return false;
    }
    let weight = token.spec().weight;
    let ledger = token.ledger();
    if weight == Weight::Heavy
        || !ledger.caller_runs.load(Ordering::Relaxed)
        || ledger.admission_paused.load(Ordering::Relaxed)
        || token.op().paused.load(Ordering::Relaxed)
        || ledger.stopping.load(Ordering::Relaxed)
    {
        return false;
    }
    if OUTSIDE_UNITS.with(|u| u.borrow().is_some()) || on_main_thread(py) || has_running_loop(py) {
        return false;
    }
    let Ok(Some(engine)) = with_current_engine(|e| Arc::ptr_eq(&e.ledger, ledger).then(|| Arc::clone(e))) else {
        return false;
    };
    let Some(units) = engine.pool.try_acquire_outside(weight) else {
        return false;
    };
    let Some(call) = token.call.lock().take() else {
        engine.pool.release_outside(&units);
        return false;
    };
    let weak = Arc::downgrade(&engine);
    OUTSIDE_UNITS.with(|u| *u.borrow_mut() = Some((engine, units)));
    let _give_back = OutsideRun;
    run_call(py, token.clone(), call, None, &weak);
    true
}

/// Gives the units of a caller's run back when it ends, however it ends.
struct OutsideRun;

impl Drop for OutsideRun {
    fn drop(&mut self) {
        if let Some((engine, units)) = OUTSIDE_UNITS.with(|u| u.borrow_mut().take()) {
            engine.pool.release_outside(&units);
        }
    }
}

/// True when an asyncio event loop runs on this thread (a body run here
/// would see it, and `asyncio.run()` in the body would fail), or when that
/// cannot be told.
fn has_running_loop(py: Python<'_>) -> bool {
    running_loop(py).map_or(true, |running| running.is_some())
}

/// While a body that a caller runs (`run_on_caller`) blocks in a nested
/// wait, its core units go back to the pool: a blocked body uses no core,
/// and holding them could leave no room for the workers that must run what
/// it waits for. When the wait ends the body takes units again on a core
/// with room, else on one where no heavy token runs (`try_retake_outside`);
/// when every core runs a heavy token (one may have taken the body's core
/// meanwhile) it waits, detached, up to `STALL_LIMIT`, then goes on beside
/// one rather than risk never going on (that heavy token may wait on it).
pub(crate) struct LentUnits(bool);

impl LentUnits {
    pub(crate) fn lend() -> LentUnits {
        LentUnits(OUTSIDE_UNITS.with(|u| u.borrow().as_ref().map(|(engine, units)| engine.pool.release_outside(units)).is_some()))
    }
}

impl Drop for LentUnits {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        let Some((engine, mut units)) = OUTSIDE_UNITS.with(|u| u.borrow_mut().take()) else {
            return;
        };
        if !engine.pool.try_retake_outside(&mut units) {
            let pool = &engine.pool;
            let units = &mut units;
            Python::attach(|py| {
                py.detach(|| {
                    let deadline = Instant::now() + STALL_LIMIT;
                    while !pool.try_retake_outside(units) {
                        if Instant::now() >= deadline {
                            pool.force_retake_outside(units);
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                });
            });
        }
        OUTSIDE_UNITS.with(|u| *u.borrow_mut() = Some((engine, units)));
    }
}

/// How long a waiting task respects core capacity before it runs the awaited token anyway.
const STALL_LIMIT: Duration = Duration::from_millis(100);

/// A countdown over many tokens: `wait_all` blocks on it once, instead of
/// waking (and re-taking the interpreter) once per token. Starts at 1 for the
/// registering thread, +1 per token it registers on; each token's resolution
/// counts down (a `Listener::Waiter`), and so does the registrar once it has
/// registered on every token.
#[derive(Debug)]
struct Countdown {
    remaining: AtomicUsize,
    done: Mutex<bool>,
    cv: Condvar,
}

impl Countdown {
    fn new() -> Self {
        Countdown { remaining: AtomicUsize::new(1), done: Mutex::new(false), cv: Condvar::new() }
    }

    fn count_down(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.done.lock() = true;
            self.cv.notify_all();
        }
    }

    /// Blocks up to `step`; true once every count is down.
    fn wait(&self, step: Duration) -> bool {
        let mut done = self.done.lock();
        if !*done {
            self.cv.wait_for(&mut done, step);
        }
        *done
    }
}

impl Waiter for Countdown {
    fn notify(&self, _py: Python<'_>) {
        self.count_down();
    }
}

/// Waits until every token in `tokens` is done: one blocking wait, woken once
/// by the last resolution. True when all are done; false on timeout, or at
/// once on a pool worker thread (there the caller waits token by token, so
/// that waiting runs queued work and nested waits cannot deadlock).
pub(crate) fn wait_all<'a>(py: Python<'_>, tokens: impl Iterator<Item = &'a TokenInner>, timeout: Option<f64>) -> PyResult<bool> {
    let timeout = timeout_arg(timeout)?;
    if on_worker_thread() {
        return Ok(false);
    }
    check_not_forked()?;
    let countdown = Arc::new(Countdown::new());
    for inner in tokens {
        if inner.cell.is_done() {
            continue;
        }
        // Counted before it is registered: a resolution right after the
        // registration must not bring the count to zero early (the
        // registrar's own 1 also keeps it above zero until the end).
        countdown.remaining.fetch_add(1, Ordering::AcqRel);
        if !inner.add_if_pending(Listener::Waiter(countdown.clone())) {
            countdown.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }
    countdown.count_down();
    let _lent = LentUnits::lend();
    wait_detached(py, timeout, |step| countdown.wait(step))
}
