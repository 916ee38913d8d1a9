//! Durations that Python passes in: one bound and one check for all of them.

use std::time::Duration;

use super::exceptions::BindError;

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
