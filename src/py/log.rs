//! Logging through the standard `logging` module, one logger per channel of
//! the original (`tokengate.gate`, `tokengate.pool`, `tokengate.worker`,
//! `tokengate.token`). Silent by default (no handler is installed); only
//! rare events are logged, never one line per token on the hot path, and a
//! message is formatted only when its logger is enabled.
//!
//! One exception: an error raised by a done-callback goes, as the standard
//! library's futures report it, to the `concurrent.futures` logger, which
//! prints it to stderr when logging is not configured.

use pyo3::prelude::*;

const DEBUG: i32 = 10;
const INFO: i32 = 20;
const WARNING: i32 = 30;

fn log(py: Python<'_>, channel: &str, level: i32, message: impl FnOnce() -> String) {
    let result = (|| -> PyResult<()> {
        let logger = py.import("logging")?.call_method1("getLogger", (format!("tokengate.{channel}"),))?;
        if logger.call_method1("isEnabledFor", (level,))?.is_truthy()? {
            logger.call_method1("log", (level, message()))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        e.write_unraisable(py, None);
    }
}

/// Logs at DEBUG on `tokengate.<channel>`.
pub(crate) fn debug(py: Python<'_>, channel: &str, message: impl FnOnce() -> String) {
    log(py, channel, DEBUG, message);
}

/// Logs at INFO on `tokengate.<channel>`.
pub(crate) fn info(py: Python<'_>, channel: &str, message: impl FnOnce() -> String) {
    log(py, channel, INFO, message);
}

/// Logs at WARNING on `tokengate.<channel>`.
pub(crate) fn warning(py: Python<'_>, channel: &str, message: impl FnOnce() -> String) {
    log(py, channel, WARNING, message);
}

/// Logs an exception raised by a done-callback of `future` (a token), on the
/// `concurrent.futures` logger, with its traceback: what
/// `concurrent.futures.Future` does.
pub(crate) fn callback_error(py: Python<'_>, future: &Bound<'_, PyAny>, err: PyErr) {
    let logged = (|| -> PyResult<()> {
        let logger = py.import("logging")?.call_method1("getLogger", ("concurrent.futures",))?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("exc_info", err.into_value(py))?;
        logger.call_method("error", ("exception calling callback for %r", future), Some(&kwargs))?;
        Ok(())
    })();
    if let Err(e) = logged {
        e.write_unraisable(py, None);
    }
}
