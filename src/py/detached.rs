//! The one loop for blocking waits from Python: it releases the interpreter
//! while it blocks, and wakes every `SIGNAL_POLL` to run signal handlers (so
//! Ctrl-C raises `KeyboardInterrupt` in the waiter within 50 ms).

use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// How often a detached wait wakes to run signal handlers.
pub(crate) const SIGNAL_POLL: Duration = Duration::from_millis(50);

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
