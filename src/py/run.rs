//! What a thread does with one token's call: start it, run the body, count
//! the run, then retry or resolve.
//!
//! # Who runs a call
//!
//! Each worker thread attaches to the interpreter once, for its whole life
//! (`host.rs`), so running a task costs no thread-state setup; it detaches
//! only while it spins or sleeps. A call (`call.rs`) is taken out of its
//! token, under the token's lock, by exactly one of:
//!
//! * a worker that pops the token's job (`execute`);
//! * a task that waits on the token and runs it inline (`wait::help_until_done`:
//!   the awaited token itself first, depth-first like a plain recursive call);
//! * a thread outside the pool that waits on it (`wait::run_on_caller`).
//!
//! Whoever took it runs it through `run_call`. A job whose call was taken is
//! spent: the worker that pops it later drops it (see `token.rs`, "Jobs").

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Weak};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::call::Call;
use super::engine_shared::EngineShared;
use super::exceptions;
use super::lifecycle::fork_count;
use super::thread::CURRENT_TOKEN;
use super::token::{Outcome, PyJob, TokenInner};
use crate::engine::pool::{Job, Weight, WorkerInfo};
use crate::engine::sync::{AtomicBool, AtomicU64, Ordering};
use crate::engine::token::{now_ns, TokenState};

static FAULT_EVERY: AtomicU64 = AtomicU64::new(0);
static FAULT_COUNT: AtomicU64 = AtomicU64::new(0);
static FAULT_IN_SUBMIT: AtomicBool = AtomicBool::new(false);

/// Where an injected fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultSite {
    /// On the worker, just before the body runs.
    Task,
    /// In the submit path, once the token is registered and before it is queued.
    Submit,
}

/// Test hook: make tokengate's own code panic in every `every`-th task (0:
/// never), on the worker (`site="task"`) or in the submit path (`site="submit"`).
#[pyfunction]
#[pyo3(signature = (every, site="task"))]
pub(crate) fn set_fault_injection(every: u64, site: &str) -> PyResult<()> {
    let in_submit = match site {
        "task" => false,
        "submit" => true,
        other => return Err(exceptions::BindError::Value(format!("site must be 'task' or 'submit', not {other:?}")).into()),
    };
    FAULT_IN_SUBMIT.store(in_submit, Ordering::Relaxed);
    FAULT_EVERY.store(every, Ordering::Relaxed);
    FAULT_COUNT.store(0, Ordering::Relaxed);
    Ok(())
}

#[inline]
pub(crate) fn maybe_inject_fault(site: FaultSite) {
    let every = FAULT_EVERY.load(Ordering::Relaxed);
    if every > 0
        && FAULT_IN_SUBMIT.load(Ordering::Relaxed) == (site == FaultSite::Submit)
        && (FAULT_COUNT.fetch_add(1, Ordering::Relaxed) + 1) % every == 0
    {
        panic!("injected fault (tokengate._tokengate.set_fault_injection)");
    }
}

static COROUTINE_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn coroutine_error(py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Option<Outcome>> {
    let coroutine_type = COROUTINE_TYPE.import(py, "types", "CoroutineType")?;
    // The coroutine type cannot be subclassed: an identity check suffices.
    if !value.get_type().is(coroutine_type) {
        return Ok(None);
    }
    value.call_method0("close")?;
    let err = PyTypeError::new_err(
        "the task returned a coroutine: @task_token_guard runs synchronous functions; \
         await coroutines on your event loop instead (the coroutine was closed)",
    );
    Ok(Some(Outcome::Error(err.into_value(py).into_any())))
}

/// Parks a job taken from a queue when admission or its operation was
/// paused after it was queued (or, once the engine is stopping, cancels it:
/// a pause would hold it past the stop). Hands the job back otherwise.
#[inline]
pub(crate) fn park_if_paused(py: Python<'_>, mut job: PyJob) -> Option<PyJob> {
    let paused = {
        let token = job.token();
        token.ledger().admission_paused.load(Ordering::Relaxed) || token.op().paused.load(Ordering::Relaxed)
    };
    if paused {
        let token = job.token().clone();
        if token.ledger().stopping.load(Ordering::SeqCst) {
            if job.forget_call() {
                token.resolve(py, |_| true, TokenState::Cancelled, None);
            }
            return None;
        }
        let queue = if token.ledger().admission_paused.load(Ordering::Relaxed) { &token.ledger().parked } else { &token.op().parked };
        let mut parked = queue.lock();
        let still = token.ledger().admission_paused.load(Ordering::SeqCst) || token.op().paused.load(Ordering::SeqCst);
        if still && !job.is_spent() && token.cell.hold() {
            parked.push_back(job);
            return None;
        }
    }
    Some(job)
}

/// Runs one job on a worker (attached).
#[inline]
pub(crate) fn execute(py: Python<'_>, job: PyJob, info: &WorkerInfo, engine: &Weak<EngineShared>) {
    let Some(job) = park_if_paused(py, job) else {
        return;
    };
    // No call for this job: a waiter runs the token itself, or this job is
    // of an earlier attempt (see `TokenInner::call_attempt`).
    let Some((token, call)) = job.claim() else {
        return;
    };
    // The job's handle moves on to the run (no extra count).
    run_call(py, token, call, Some(info), engine);
}

/// Runs a claimed call: start, invoke, record, retry or resolve. `info`
/// is the worker running it, None for a caller outside the pool.
pub(crate) fn run_call(py: Python<'_>, token: Arc<TokenInner>, call: Call, info: Option<&WorkerInfo>, engine: &Weak<EngineShared>) {
    let (worker, core) = info.map_or((crate::engine::token::NO_WORKER, None), |i| (i.index as u32, i.core.map(|c| c as u32)));
    if !token.cell.start(worker, core) {
        return; // cancelled, killed or timed out before it started: never run it
    }
    if token.is_lead {
        if let (Some(seed), Some(engine), Some(info)) = (token.route.seed(), engine.upgrade(), info) {
            engine.domains.set_core(seed, engine.pool.core_of(info.index));
        }
    }
    // Only the thread that started the token writes it (a retry starts it again later).
    token.attempts.store(token.attempts.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    token.ledger().running_delta(1);
    let retry_call = (token.retries_left.load(Ordering::Relaxed) > 0).then(|| call.clone_ref(py));
    let t0 = token.cell.time(crate::engine::token::Stamp::Started).unwrap_or_else(now_ns);
    // The handle moves into CURRENT_TOKEN for the call and back out after it (no extra count).
    // A pool worker running a token of an operation whose runs block lends
    // the token's units before the body (see `BlockingHistory`).
    let pool_of = |i: &WorkerInfo| engine.upgrade().filter(|e| e.pool.id() == i.pool_id);
    if token.op().blocking.starts_lent() && token.spec().weight != Weight::Heavy {
        if let Some(i) = info {
            if let Some(e) = pool_of(i) {
                e.pool.lend_current(i.index);
            }
        }
    }
    let previous = CURRENT_TOKEN.with(|c| c.replace(Some(token)));
    let forks = fork_count();
    let result = catch_unwind(AssertUnwindSafe(|| {
        maybe_inject_fault(FaultSite::Task);
        call.invoke(py)
    }));
    if info.is_some() && fork_count() != forks {
        // The body forked and this is the child, on its only thread: a pool
        // worker with no pool behind it. It ends here instead of waiting for work.
        end_forked_child(py, &result);
    }
    let t1 = now_ns();
    let elapsed = t1.saturating_sub(t0);
    let token = CURRENT_TOKEN.with(|c| c.replace(previous)).expect("the running token is in CURRENT_TOKEN until the call returns");
    let token = &token;
    token.ledger().running_delta(-1);
    if token.op().blocking.is_long(elapsed) {
        if let Some(i) = info {
            // A long run that ended lent was counted when the monitor lent it
            // (one that started lent leaves the score as it is); one that
            // ended holding its units computed.
            if pool_of(i).is_some_and(|e| !e.pool.is_lent(i.index)) {
                token.op().blocking.record(false);
            }
        }
    }
    let mut panicked = false;
    let (state, outcome) = match result {
        Ok(Ok(value)) => match coroutine_error(py, value.bind(py)) {
            Ok(None) => (TokenState::Completed, Outcome::Value(value)),
            Ok(Some(err)) => (TokenState::Failed, err),
            Err(e) => (TokenState::Failed, Outcome::Error(e.into_value(py).into_any())),
        },
        Ok(Err(err)) => (TokenState::Failed, Outcome::Error(err.into_value(py).into_any())),
        Err(payload) => {
            panicked = true;
            let msg = exceptions::panic_message(payload.as_ref());
            (TokenState::Failed, Outcome::Error(exceptions::panic_value(py, &msg)))
        }
    };
    // An attempt that outlived its deadline (or was killed) is not a success;
    // one whose token asyncio cancelled meanwhile counts as it ended.
    let succeeded = state == TokenState::Completed && !matches!(token.cell.state(), TokenState::Timeout | TokenState::Killed);
    token.op().record_run(succeeded, elapsed);
    if state == TokenState::Failed && !panicked {
        if let (Some(call), Some(engine)) = (retry_call, engine.upgrade()) {
            if try_retry(py, token, call, &engine) {
                return;
            }
        }
    }
    if token.cell.state() == TokenState::Timeout {
        let deadline = token.deadline_ns.load(Ordering::Relaxed);
        if deadline != 0 {
            token.ledger().note_overrun(now_ns().saturating_sub(deadline));
        }
    }
    // A token killed or timed out while running is already resolved: its result is dropped.
    token.resolve_at(py, |s| s == TokenState::Executing, state, Some(outcome), Some(t1));
}

/// Ends a child process that a task's body forked on a pool worker, once the
/// body returns in it, as `multiprocessing` ends its fork children: the
/// standard streams are flushed, then `os._exit(code)` (no atexit handlers
/// run). The code is 0 when the body returned, that of `sys.exit(code)`
/// (None: 0; an int; anything else is printed and gives 1), or 1 after
/// printing the traceback of any other exception.
fn end_forked_child(py: Python<'_>, result: &std::thread::Result<PyResult<Py<PyAny>>>) -> ! {
    let code = match result {
        Ok(Ok(_)) => 0,
        Ok(Err(err)) if err.is_instance_of::<pyo3::exceptions::PySystemExit>(py) => {
            let code = err.value(py).getattr("code").ok();
            match code {
                None => 1,
                Some(c) if c.is_none() => 0,
                Some(c) => c.extract::<i32>().unwrap_or_else(|_| {
                    if let Ok(text) = c.str() {
                        let _ = py.import("sys").and_then(|sys| sys.getattr("stderr")?.call_method1("write", (format!("{text}\n"),)));
                    }
                    1
                }),
            }
        }
        Ok(Err(err)) => {
            err.clone_ref(py).print(py);
            1
        }
        Err(_) => 1,
    };
    let _ = py.run(
        c"import sys\nfor s in (sys.stdout, sys.stderr):\n    try:\n        s.flush()\n    except Exception:\n        pass\n",
        None,
        None,
    );
    let _ = py.import("os").and_then(|os| os.getattr("_exit")?.call1((code,)));
    // os._exit does not return; if it could not be called, leave the hard way.
    std::process::abort()
}

/// Schedules another attempt after a back-off. False when no retry is left
/// (or the token was resolved meanwhile).
pub(crate) fn try_retry(py: Python<'_>, token: &Arc<TokenInner>, call: Call, engine: &Arc<EngineShared>) -> bool {
    let left = token.retries_left.load(Ordering::Relaxed);
    if left == 0 || !token.cell.requeue() {
        return false;
    }
    token.retries_left.store(left - 1, Ordering::Relaxed);
    let attempt = token.attempts.load(Ordering::Relaxed).max(1);
    let backoff = (token.spec().defaults.retry_backoff * f64::from(2u32.saturating_pow(attempt - 1))).min(30.0);
    token.ledger().retries.fetch_add(1, Ordering::Relaxed);
    super::log::debug(py, "worker", || {
        format!("token {} ({}) failed attempt {attempt}; retrying in {backoff:.3}s", token.id, token.op().name)
    });
    let job = PyJob::new(token.clone(), call);
    engine.schedule_retry(py, job, std::time::Duration::from_secs_f64(backoff.max(0.0)));
    true
}
