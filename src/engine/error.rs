//! The engine's error type. The binding layer maps each variant to a Python
//! exception in exactly one place (`src/py/exceptions.rs`).

use std::fmt;

/// Errors raised by the engine (pool construction and submission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A configuration value was out of range; the message names it.
    InvalidConfig(String),
    /// The operating system refused to start a worker thread.
    Spawn(String),
    /// The pool is shutting down or stopped and accepts no new work.
    ShutDown,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Spawn(msg) => write!(f, "could not start a worker thread: {msg}"),
            Error::ShutDown => f.write_str("cannot schedule new futures after shutdown"),
        }
    }
}

impl std::error::Error for Error {}
