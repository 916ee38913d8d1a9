//! The process's lifecycle as the binding layer sees it: fork and interpreter exit.
//!
//! # Protocol
//!
//! * `LIVE_ENGINES` counts engines started and not yet stopping
//!   (`engine_started`, `engine_stopped`).
//! * `after_fork_in_child` (registered with `os.register_at_fork`) counts the
//!   fork (`fork_count`: per-thread answers cached before it are asked again)
//!   and, when engines were running, marks the process as forked: every later
//!   use raises `ForkedProcessError` (`check_not_forked`) before touching a lock
//!   that another parent thread may have held at the fork. A child forked with
//!   no engine running may start its own.
//! * `mark_exiting` (the first step of `registry::begin_interpreter_shutdown`)
//!   makes every later submit or start fail with `InterpreterShutdownError`
//!   (`check_accepting`).
//!
//! The flags are set, never cleared, in a process.

use pyo3::prelude::*;

use super::exceptions::BindError;
use crate::engine::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

static LIVE_ENGINES: AtomicUsize = AtomicUsize::new(0);
static FORKED: AtomicBool = AtomicBool::new(false);
static EXITING: AtomicBool = AtomicBool::new(false);
/// Counts forks: the thread that forks is the child's main thread.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// An engine started.
pub(crate) fn engine_started() {
    LIVE_ENGINES.fetch_add(1, Ordering::SeqCst);
}

/// An engine began to stop (called once per engine).
pub(crate) fn engine_stopped() {
    LIVE_ENGINES.fetch_sub(1, Ordering::SeqCst);
}

/// True in a child forked from a process with running engines.
#[inline]
pub(crate) fn is_forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// Err(ForkedProcessError) in a child forked from a process with running engines.
#[inline]
pub(crate) fn check_not_forked() -> Result<(), BindError> {
    if is_forked() {
        Err(BindError::Forked)
    } else {
        Ok(())
    }
}

/// Err when no new work may start: a forked child, or an interpreter shutting down.
#[inline]
pub(crate) fn check_accepting() -> Result<(), BindError> {
    check_not_forked()?;
    if EXITING.load(Ordering::Relaxed) {
        return Err(BindError::InterpreterShutdown);
    }
    Ok(())
}

/// The interpreter began to shut down.
pub(crate) fn mark_exiting() {
    EXITING.store(true, Ordering::SeqCst);
}

/// How many times this process's lineage forked (0 in the first process).
#[inline]
pub(crate) fn fork_count() -> u64 {
    FORKS.load(Ordering::Relaxed)
}

/// Called in the child after `os.fork()`.
#[pyfunction]
pub(crate) fn after_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
    if LIVE_ENGINES.load(Ordering::SeqCst) > 0 {
        FORKED.store(true, Ordering::SeqCst);
    }
}
