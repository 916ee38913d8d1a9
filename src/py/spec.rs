//! `OperationSpec`: everything fixed at decoration time, and `submit`, the
//! hot path of every decorated call.
//!
//! A call goes through: arity check (fast path in Rust, `inspect` binder
//! otherwise) -> engine lookup -> auto-block check -> admission (the
//! operation's limit, then the engine's `max_pending`; blocking, bounded or
//! non-blocking) -> token -> deadline timer (if any) -> dispatch.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};

use super::call::Call;
use super::deps::{input_tokens, DepWait};
use super::detached::SIGNAL_POLL;
use super::durations::{seconds_arg, timeout_arg};
use super::engine::Engine;
use super::engine_shared::EngineShared;
use super::exceptions::BindError;
use super::handle::TaskToken;
use super::operation::{CallOptions, SpecShared, STORAGE_TIERS};
use super::outside::OutsideLane;
use super::registry::{current_engine, with_current_engine};
use super::run::{maybe_inject_fault, FaultSite};
use super::thread::running_token;
use super::token::{Binding, LaneKind, Ledger, OpState, Placement, PyJob, TokenInner};
use crate::engine::admission::Limit;
use crate::engine::metrics::Rejection;
use crate::engine::pool::Weight;
use crate::engine::routing::Route;
use crate::engine::sync::{AtomicU64, Mutex, Ordering};
use crate::engine::token::now_ns;

static NEXT_TOKEN_ID: AtomicU64 = AtomicU64::new(1);

/// Token ids a thread takes from `NEXT_TOKEN_ID` at a time.
const ID_BLOCK: u64 = 256;

/// A new unique token id. Each thread takes a block of ids at a time (one
/// shared atomic add per 256 tokens instead of one per token): ids are
/// unique and increase along each thread, not across threads.
fn next_token_id() -> u64 {
    thread_local! {
        static IDS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    IDS.with(|ids| {
        let (next, end) = ids.get();
        let (next, end) = if next < end {
            (next, end)
        } else {
            let start = NEXT_TOKEN_ID.fetch_add(ID_BLOCK, Ordering::Relaxed);
            (start, start + ID_BLOCK)
        };
        ids.set((next + 1, end));
        next
    })
}
static DIGEST: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// How a call waits for admission when a limit is full.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Admit {
    /// Block (releasing the GIL) up to the timeout, then raise.
    Block(Option<Duration>),
    /// Do not wait: report the rejection.
    Try,
    /// Do not wait and do not count a rejection (an async caller polling).
    Probe,
}

/// Takes a slot of `limit`, waiting as `how` says. A refusal (not a probe's)
/// is counted on the limit and in the operation's metrics as `why`.
fn admit(
    py: Python<'_>,
    engine: &EngineShared,
    limit: &Limit,
    how: Admit,
    (op, why): (&OpState, Rejection),
    what: impl Fn() -> String,
) -> PyResult<bool> {
    if limit.try_acquire() {
        return Ok(true);
    }
    let rejected = || {
        limit.note_rejected();
        op.metrics.rejected(why);
    };
    let timeout = match how {
        Admit::Try => {
            rejected();
            return Ok(false);
        }
        Admit::Probe => return Ok(false),
        Admit::Block(timeout) => timeout,
    };
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let _blocked = limit.block();
    loop {
        let step = deadline.map_or(SIGNAL_POLL, |d| d.saturating_duration_since(std::time::Instant::now()).min(SIGNAL_POLL));
        let got = py.detach(|| limit.acquire(Some(step)));
        if engine.is_stopping() {
            if got {
                limit.release();
            }
            return Err(BindError::ShutDown.into());
        }
        if got {
            return Ok(true);
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            rejected();
            return Err(BindError::Rejected(format!(
                "{} is full ({} pending) and no slot freed within {:.3}s",
                what(),
                limit.limit(),
                timeout.unwrap_or_default().as_secs_f64()
            ))
            .into());
        }
    }
}

/// Runs `submit` (the submit path of a call of operation `op`); a panic in
/// it becomes a `RuntimeError` that names it, instead of pyo3's
/// `PanicException` (a `BaseException` that `except Exception` misses).
fn catching_panics<T>(op: &str, submit: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(submit)).unwrap_or_else(|panic| {
        let what = super::exceptions::panic_message(panic.as_ref());
        Err(BindError::Runtime(format!("internal error while submitting a call of {op:?} (please report it): {what}")).into())
    })
}

/// What a call in the submit path holds before its job takes it over:
/// first its two admission slots, then its token. Dropped armed (an error
/// return or a panic in between), it gives the slots back, or resolves the
/// token as cancelled, which gives them back through the ledger.
struct Taken<'a> {
    held: Held<'a>,
    armed: bool,
}

enum Held<'a> {
    Slots(&'a OpState, &'a Ledger),
    Token(Arc<TokenInner>),
}

impl<'a> Taken<'a> {
    fn new(held: Held<'a>) -> Self {
        Taken { held, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match &self.held {
            Held::Slots(op, ledger) => {
                op.limit.release();
                ledger.pending.release();
            }
            Held::Token(token) => token.cancel_unrun(),
        }
    }
}

/// The decoration-time record of a `@task_token_guard` function.
#[pyclass(frozen, name = "OperationSpec", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct OperationSpec {
    shared: Arc<SpecShared>,
    /// (pool id, this operation's binding on that engine).
    binding: Mutex<Option<(u64, Arc<Binding>)>>,
}

impl OperationSpec {
    fn binding_for(&self, engine: &EngineShared) -> Arc<Binding> {
        let mut cache = self.binding.lock();
        if let Some((id, b)) = cache.as_ref() {
            if *id == engine.pool.id() {
                return b.clone();
            }
        }
        let b = Arc::new(Binding { spec: self.shared.clone(), ledger: engine.ledger.clone(), op: engine.ledger.op(&self.shared.op_name) });
        *cache = Some((engine.pool.id(), b.clone()));
        b
    }

    /// Queues a token. What the call has taken is given back on every early
    /// exit (see `Taken`), and a panic raises a `RuntimeError` (`catching_panics`).
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        py: Python<'_>,
        engine: &Arc<EngineShared>,
        func: Py<PyAny>,
        args: Bound<'_, PyTuple>,
        kwargs: Option<Bound<'_, PyDict>>,
        opts: &CallOptions,
        how: Admit,
        sticky_key: Option<String>,
        outside: Option<&OutsideLane>,
    ) -> PyResult<Option<Py<TaskToken>>> {
        catching_panics(&self.shared.op_name, || {
            let binding = self.binding_for(engine);
            let op = &binding.op;
            let ledger = &engine.ledger;
            if ledger.auto_block.load(Ordering::Relaxed) && !op.blocked.load(Ordering::Relaxed) && op.is_dangerous() {
                op.blocked.store(true, Ordering::SeqCst);
                super::log::warning(py, "gate", || format!("operation {:?} auto-blocked: over 90% of attempts failed", op.name));
            }
            if op.blocked.load(Ordering::Relaxed) {
                op.metrics.rejected(Rejection::Blocked);
                return Err(BindError::Blocked(op.name.to_string()).into());
            }
            if !admit(py, engine, &op.limit, how, (op, Rejection::OperationLimit), || format!("operation {:?}", op.name))? {
                return Ok(None);
            }
            match admit(py, engine, &ledger.pending, how, (op, Rejection::MaxPending), || "the coordinator (max_pending)".to_owned()) {
                Ok(true) => {}
                Ok(false) => {
                    op.limit.release();
                    return Ok(None);
                }
                Err(e) => {
                    op.limit.release();
                    return Err(e);
                }
            }
            // From here on an early return or a panic gives both slots back.
            let slots = Taken::new(Held::Slots(op, ledger));
            let context = super::ffi::CallContext::capture(py, opts.retries > 0)?;
            let id = next_token_id();
            let placement = match outside {
                Some(lane) => Placement { lane: LaneKind::Outside(lane.index), ..Placement::default() },
                None => self.placement(py, engine, id, sticky_key)?,
            };
            let inputs = input_tokens(&args, kwargs.as_ref());
            let call = Call { func, args: args.unbind(), kwargs: kwargs.map(Bound::unbind), context };
            // The token takes the slots over (and `binding`, which `slots` borrows).
            slots.disarm();
            let inner = TokenInner::new(id, binding, opts, placement, Some(call));
            if let Some(lane) = outside {
                lane.queue.on_placed();
            }
            let taken = Taken::new(Held::Token(inner.clone()));
            ledger.record_submitted(inner.op());
            ledger.register(&inner);
            maybe_inject_fault(FaultSite::Submit);
            if let Some(t) = opts.timeout {
                // Checked when the spec or the options were made.
                let after = Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX);
                let after_ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
                inner.deadline_ns.store(now_ns().saturating_add(after_ns), Ordering::Relaxed);
                engine.schedule_deadline(&inner, after);
            }
            let job = PyJob::holding_call(inner.clone());
            // Everything else first: the caller holds the GIL until it returns,
            // and a worker that finds the job before that waits for the GIL.
            let token = Py::new(py, TaskToken { inner })?;
            // The job owns the token now (resolving it gives the slots back).
            taken.disarm();
            if inputs.is_empty() {
                engine.dispatch(py, job)?;
            } else {
                DepWait::start(py, job, &inputs, engine);
            }
            Ok(Some(token))
        })
    }

    /// Lane, pin and domain of a new token (see `routing.rs`).
    fn placement(&self, py: Python<'_>, engine: &EngineShared, id: u64, sticky_key: Option<String>) -> PyResult<Placement> {
        let spec = &self.shared;
        if let Some(tier) = spec.storage_tier {
            return Ok(Placement {
                lane: LaneKind::Io(u16::try_from(tier).expect("a storage tier index fits in 16 bits")),
                ..Placement::default()
            });
        }
        if let Some(calls) = &spec.lead_calls {
            let digest = DIGEST.import(py, "tokengate._routing", "digest")?;
            let seed: String = digest.call1((spec.digest_policy.as_str(), format!("{id}:{calls}")))?.extract()?;
            let seed: Arc<str> = seed.into();
            engine.domains.open(seed.clone());
            return Ok(Placement { route: Route::domain(engine.domains.clone(), seed), is_lead: true, ..Placement::default() });
        }
        // A call made inside a lead (or one of its children) joins its domain.
        if let Some(parent) = running_token() {
            if let Some(seed) = parent.route.seed() {
                let here = crate::engine::pool::current_worker().map(|(_, i)| i);
                let joined = engine.domains.join(seed, |core| engine.pool.workers_of_core(core), here);
                if let Some(pinned) = joined {
                    return Ok(Placement { route: Route::domain(engine.domains.clone(), seed.into()), pinned, ..Placement::default() });
                }
            }
        }
        if let Some(key) = sticky_key {
            let candidates: Vec<usize> = (0..engine.pool.workers()).collect();
            let worker = engine.sticky.acquire(&key, &candidates);
            return Ok(Placement { route: Route::sticky(engine.sticky.clone(), key), pinned: Some(worker), ..Placement::default() });
        }
        Ok(Placement::default())
    }

    fn check_arity(&self, py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let spec = &self.shared;
        if kwargs.is_some() || !self.arity_is_plain(args.len()) {
            if let Some(binder) = &spec.binder {
                binder.bind(py).call(args, kwargs)?;
            }
        }
        Ok(())
    }

    /// `n` positional arguments, and no keywords, need no binding to check.
    pub(crate) fn arity_is_plain(&self, n: usize) -> bool {
        let spec = &self.shared;
        spec.fast_arity && spec.min_pos <= n && n <= spec.max_pos
    }

    /// Queues a token of this operation on the outside lane `lane` of `engine`,
    /// the lane receiving `func` with the arguments, then steps aside for the
    /// lane's taker (`OutsideLane::step_aside`). `submit_to` and the plain calls
    /// of `process_call.rs` both queue through it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn queue_outside(
        &self,
        py: Python<'_>,
        engine: &Arc<EngineShared>,
        lane: &OutsideLane,
        func: Py<PyAny>,
        args: Bound<'_, PyTuple>,
        kwargs: Option<Bound<'_, PyDict>>,
        opts: &CallOptions,
        how: Admit,
    ) -> PyResult<Option<Py<TaskToken>>> {
        let token = self.enqueue(py, engine, func, args, kwargs, opts, how, None, Some(lane))?;
        lane.step_aside(py);
        Ok(token)
    }

    /// The operation's default call options (its tags').
    pub(crate) fn defaults(&self) -> &CallOptions {
        &self.shared.defaults
    }

    fn options(&self, priority: Option<i64>, timeout: Option<f64>, retries: Option<u32>) -> PyResult<CallOptions> {
        let mut opts = self.shared.defaults;
        if let Some(p) = priority {
            opts.priority = p;
        }
        if let Some(t) = timeout {
            seconds_arg("timeout", t)?;
            opts.timeout = Some(t);
        }
        if let Some(r) = retries {
            opts.retries = r;
        }
        Ok(opts)
    }
}

#[pymethods]
impl OperationSpec {
    /// `min_pos`/`max_pos` (None: `*args`) bound the positional count that
    /// needs no further check when there are no keyword arguments and
    /// `fast_arity` is true; every other call is checked by `binder(*args, **kwargs)`.
    /// `priority`, `timeout`, `retries` and `retry_backoff` are the defaults from the tags.
    #[new]
    #[pyo3(signature = (func, operation_type, tags, min_pos, max_pos, fast_arity, binder, *,
                        priority=0, timeout=None, retries=0, retry_backoff=0.05, weight="medium",
                        storage_speed=None, external_calls=None, digest_policy="full"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        func: Py<PyAny>,
        operation_type: Bound<'_, PyString>,
        tags: Py<PyAny>,
        min_pos: usize,
        max_pos: Option<usize>,
        fast_arity: bool,
        binder: Option<Py<PyAny>>,
        priority: i64,
        timeout: Option<f64>,
        retries: u32,
        retry_backoff: f64,
        weight: &str,
        storage_speed: Option<&str>,
        external_calls: Option<Vec<String>>,
        digest_policy: &str,
    ) -> PyResult<Self> {
        let storage_tier = match storage_speed {
            None => None,
            Some(t) => Some(
                STORAGE_TIERS
                    .iter()
                    .position(|x| x.eq_ignore_ascii_case(t))
                    .ok_or_else(|| BindError::Value(format!("unknown storage_speed {t:?}; valid: {STORAGE_TIERS:?}")))?,
            ),
        };
        let lead_calls = external_calls.map(|mut calls| {
            calls.sort();
            calls.join(",")
        });
        let weight = match weight {
            "light" => Weight::Light,
            "medium" => Weight::Medium,
            "heavy" => Weight::Heavy,
            other => return Err(BindError::Value(format!("weight must be 'light', 'medium' or 'heavy', not {other:?}")).into()),
        };
        if let Some(t) = timeout {
            seconds_arg("timeout", t)?;
        }
        if !(retry_backoff.is_finite() && retry_backoff >= 0.0) {
            return Err(BindError::Value("retry_backoff must be a non-negative number of seconds".into()).into());
        }
        Ok(OperationSpec {
            shared: Arc::new(SpecShared {
                func,
                op_name: operation_type.to_cow()?.into_owned(),
                operation_type: operation_type.unbind(),
                tags,
                min_pos,
                max_pos: max_pos.unwrap_or(usize::MAX),
                fast_arity,
                binder,
                defaults: CallOptions { priority, timeout, retries, retry_backoff },
                weight,
                storage_tier,
                lead_calls,
                digest_policy: digest_policy.to_owned(),
            }),
            binding: Mutex::new(None),
        })
    }

    /// Checks the call's arity, then queues a token on the running
    /// coordinator (blocking while a bounded coordinator is full).
    #[pyo3(signature = (args, kwargs=None))]
    fn submit(&self, py: Python<'_>, args: Bound<'_, PyTuple>, kwargs: Option<Bound<'_, PyDict>>) -> PyResult<Py<TaskToken>> {
        let kwargs = kwargs.filter(|k| !k.is_empty());
        self.check_arity(py, &args, kwargs.as_ref())?;
        let token = with_current_engine(|engine| {
            self.enqueue(py, engine, self.shared.func.clone_ref(py), args, kwargs, &self.shared.defaults, Admit::Block(None), None, None)
        })??;
        token.ok_or_else(|| BindError::Runtime("admission refused a blocking call".into()).into())
    }

    /// `submit` with per-call options. With `block=False` a full coordinator
    /// returns None instead of waiting (and counts a rejection; `probe=True`
    /// does not count it, for polling async callers); with `admission_timeout`
    /// a blocking call raises `AdmissionRejectedError` after that many seconds.
    #[pyo3(signature = (args, kwargs=None, *, priority=None, timeout=None, retries=None, block=true, admission_timeout=None, probe=false, sticky_key=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit_with(
        &self,
        py: Python<'_>,
        args: Bound<'_, PyTuple>,
        kwargs: Option<Bound<'_, PyDict>>,
        priority: Option<i64>,
        timeout: Option<f64>,
        retries: Option<u32>,
        block: bool,
        admission_timeout: Option<f64>,
        probe: bool,
        sticky_key: Option<String>,
    ) -> PyResult<Option<Py<TaskToken>>> {
        let kwargs = kwargs.filter(|k| !k.is_empty());
        self.check_arity(py, &args, kwargs.as_ref())?;
        let opts = self.options(priority, timeout, retries)?;
        let how = match (block, probe) {
            (_, true) => Admit::Probe,
            (true, false) => Admit::Block(timeout_arg(admission_timeout)?),
            (false, false) => Admit::Try,
        };
        let engine = current_engine()?;
        self.enqueue(py, &engine, self.shared.func.clone_ref(py), args, kwargs, &opts, how, sticky_key, None)
    }

    /// Queues a token of this operation on the outside lane `lane`, with
    /// `submit_with`'s options; the lane receives `func` (default: the
    /// decorated function) with the arguments. No arity check.
    #[pyo3(signature = (lane, args, kwargs=None, *, func=None, priority=None, timeout=None, retries=None, block=true, admission_timeout=None, probe=false))]
    #[allow(clippy::too_many_arguments)]
    fn submit_to(
        &self,
        py: Python<'_>,
        lane: &OutsideLane,
        args: Bound<'_, PyTuple>,
        kwargs: Option<Bound<'_, PyDict>>,
        func: Option<Py<PyAny>>,
        priority: Option<i64>,
        timeout: Option<f64>,
        retries: Option<u32>,
        block: bool,
        admission_timeout: Option<f64>,
        probe: bool,
    ) -> PyResult<Option<Py<TaskToken>>> {
        let kwargs = kwargs.filter(|k| !k.is_empty());
        let opts = self.options(priority, timeout, retries)?;
        let how = match (block, probe) {
            (_, true) => Admit::Probe,
            (true, false) => Admit::Block(timeout_arg(admission_timeout)?),
            (false, false) => Admit::Try,
        };
        let engine = lane.engine.upgrade().filter(|e| !e.is_stopping()).ok_or(BindError::ShutDown)?;
        if lane.queue.is_closed() {
            return Err(BindError::ShutDown.into());
        }
        let func = func.unwrap_or_else(|| self.shared.func.clone_ref(py));
        self.queue_outside(py, &engine, lane, func, args, kwargs, &opts, how)
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
        let kwargs = kwargs.filter(|k| !k.is_empty());
        let token = self.enqueue(py, &engine, func, args, kwargs, &self.shared.defaults, Admit::Block(None), None, None)?;
        token.ok_or_else(|| BindError::Runtime("admission refused a blocking call".into()).into())
    }

    /// A token of this operation that no worker runs: the process lane
    /// drives it with `_start`, `_set_result` and `_set_exception` (its
    /// `lane` reads "process"). It counts on `engine` (default: the running one).
    #[pyo3(signature = (engine=None))]
    fn external_token(&self, py: Python<'_>, engine: Option<Bound<'_, Engine>>) -> PyResult<Py<TaskToken>> {
        let engine = match engine {
            Some(e) => e.get().shared_for_submit()?,
            None => current_engine()?,
        };
        let binding = self.binding_for(&engine);
        binding.op.limit.force_acquire();
        engine.ledger.pending.force_acquire();
        let placement = Placement { lane: LaneKind::Process, ..Placement::default() };
        let inner = TokenInner::new(next_token_id(), binding, &self.shared.defaults, placement, None);
        engine.ledger.record_submitted(inner.op());
        engine.ledger.register(&inner);
        inner.cell.admit();
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
    fn weight(&self) -> &'static str {
        self.shared.weight.as_str()
    }

    #[getter]
    fn func(&self, py: Python<'_>) -> Py<PyAny> {
        self.shared.func.clone_ref(py)
    }
}

/// What `@task_token_guard` returns (for operations without a sticky anchor):
/// calling it submits, with no Python frame in between. CPython hands its
/// `tp_call` the argument tuple it built and no keyword dict when there are
/// no keywords; a Python `def wrapper(*args, **kwargs)` adds a frame, an
/// empty dict and a second call per token.
///
/// It carries an instance `__dict__`, so `functools.update_wrapper` gives it
/// the function's name, qualified name, module, docs and `__wrapped__`
/// (`inspect.signature` follows that); `__get__` binds it as a method, as
/// a function would be; `__reduce__` pickles it by reference, as a function
/// is pickled.
#[pyclass(frozen, dict, weakref, name = "GuardedFunction", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct GuardedFunction {
    spec: Py<OperationSpec>,
}

#[pymethods]
impl GuardedFunction {
    #[new]
    fn new(spec: Py<OperationSpec>) -> Self {
        GuardedFunction { spec }
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__(&self, py: Python<'_>, args: Bound<'_, PyTuple>, kwargs: Option<Bound<'_, PyDict>>) -> PyResult<Py<TaskToken>> {
        self.spec.get().submit(py, args, kwargs)
    }

    /// Binds like a function: looked up on an instance, it is a method.
    fn __get__(slf: Bound<'_, Self>, instance: Option<Bound<'_, PyAny>>, _owner: Option<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        match instance {
            Some(obj) if !obj.is_none() => {
                let method_type = METHOD_TYPE.import(slf.py(), "types", "MethodType")?;
                Ok(method_type.call1((slf, obj))?.unbind())
            }
            _ => Ok(slf.into_any().unbind()),
        }
    }

    /// Pickled by reference (its module and qualified name), as functions are.
    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Ok(slf.getattr("__qualname__")?.unbind())
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let name = slf.getattr("__qualname__").and_then(|n| n.str().map(|s| s.to_string())).unwrap_or_else(|_| "?".into());
        let op = slf.get().spec.get().shared.operation_type.bind(slf.py()).repr()?;
        Ok(format!("<task_token_guard function {name} operation_type={op}>"))
    }
}

static METHOD_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
