//! The one helper for blocking waits from Python: it releases the
//! interpreter while it blocks, and wakes every 50 ms to run signal handlers
//! (so Ctrl-C raises `KeyboardInterrupt` in the waiter within 50 ms).

use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::exceptions::BindError;

const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The longest duration a timeout, tag or option may give, in seconds: the
/// standard library's `threading.TIMEOUT_MAX` on Linux (about 292 years).
/// Exported as `tokengate._tokengate.MAX_SECONDS`, so that the Python layer
/// checks the same bound.
pub(crate) const MAX_SECONDS: f64 = 9_223_372_036.0;

/// Checks a duration setting (a tag, option or constructor argument named
/// `name`): a positive, finite number of seconds up to `MAX_SECONDS`.
pub(crate) fn seconds_arg(name: &str, seconds: f64) -> Result<Duration, BindError> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS) {
        return Err(BindError::Value(format!("{name} must be a positive, finite number of seconds up to {MAX_SECONDS:.0}, got {seconds}")));
    }
    // A positive value too small for a nanosecond is one nanosecond (not zero).
    let duration = Duration::try_from_secs_f64(seconds).map_err(|e| BindError::Value(format!("{name}: {e}")))?;
    Ok(duration.max(Duration::from_nanos(1)))
}

/// Converts a Python `timeout` argument (seconds, or None) to a duration.
pub(crate) fn timeout_arg(timeout: Option<f64>) -> Result<Option<Duration>, BindError> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() => Err(BindError::Value("timeout must be a number of seconds, not NaN".into())),
        Some(t) if t <= 0.0 => Ok(Some(Duration::ZERO)),
        Some(t) if t.is_infinite() => Ok(None),
        Some(t) => Ok(Some(Duration::from_secs_f64(t.min(1e9)))),
    }
}

/// Calls `wait(step)` (which blocks up to `step` and returns true when the
/// awaited condition holds) while detached, until it returns true, the
/// timeout passes (false) or a signal handler raises (Err).
pub(crate) fn wait_detached<F>(py: Python<'_>, timeout: Option<Duration>, wait: F) -> PyResult<bool>
where
    F: Fn(Duration) -> bool + Sync,
{
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let step = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL),
            None => SIGNAL_POLL,
        };
        if py.detach(|| wait(step)) {
            return Ok(true);
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
    }
}

/// A countdown over many tokens: `wait_all` blocks on it once, instead of
/// waking (and re-taking the GIL) once per token. Starts at 1 for the
/// registering thread, +1 per token it registers on; each token's
/// resolution counts down (a `Listener::Latch`), and so does the registrar
/// once it has registered on every token.
#[derive(Debug)]
pub(crate) struct Latch {
    remaining: crate::sync::AtomicUsize,
    done: crate::sync::Mutex<bool>,
    cv: crate::sync::Condvar,
}

impl Latch {
    fn new() -> Self {
        Latch { remaining: crate::sync::AtomicUsize::new(1), done: crate::sync::Mutex::new(false), cv: crate::sync::Condvar::new() }
    }

    pub(crate) fn count_down(&self) {
        if self.remaining.fetch_sub(1, crate::sync::Ordering::AcqRel) == 1 {
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

/// Waits until every token in `tokens` is done: one blocking wait, woken once
/// by the last resolution. True when all are done; false on timeout, or at
/// once on a pool worker thread (there the caller waits token by token, so
/// that waiting runs queued work and nested waits cannot deadlock).
#[pyfunction]
#[pyo3(signature = (tokens, timeout=None))]
pub(crate) fn wait_all(py: Python<'_>, tokens: Vec<Bound<'_, super::token::TaskToken>>, timeout: Option<f64>) -> PyResult<bool> {
    let timeout = timeout_arg(timeout)?;
    if super::job::on_worker_thread() {
        return Ok(false);
    }
    super::engine::check_not_forked()?;
    let latch = std::sync::Arc::new(Latch::new());
    for t in &tokens {
        let inner = &t.get().inner;
        if inner.core.is_done() {
            continue;
        }
        // Counted before it is registered: a resolution right after the
        // registration must not bring the count to zero early (the
        // registrar's own 1 also keeps it above zero until the end).
        latch.remaining.fetch_add(1, crate::sync::Ordering::AcqRel);
        if !inner.add_if_pending(super::token::Listener::Latch(latch.clone())) {
            latch.remaining.fetch_sub(1, crate::sync::Ordering::AcqRel);
        }
    }
    latch.count_down();
    let _lent = super::job::LentUnits::lend();
    wait_detached(py, timeout, |step| latch.wait(step))
}
