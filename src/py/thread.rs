//! Per-thread state of the binding layer. Each item is read and written only
//! by its own thread.
//!
//! * `CURRENT_TOKEN`: the token whose body runs on this thread (a worker's,
//!   or a caller's running a token itself, see `wait::run_on_caller`).
//! * `WORKER`: on a pool worker, its engine and identity.
//! * `HELP_DEPTH`, `CHAIN_UNITS`: a worker's nested runs while it waits
//!   (`wait::help_until_done`), and the core units they hold.
//! * `OUTSIDE_UNITS`: the core units a thread outside the pool holds while
//!   it runs a token for its caller.
//! * `ON_MAIN_THREAD`: whether this is the interpreter's main thread.
//!
//! The engine a decorated call submits to is cached per thread too, beside
//! the registry it caches (`registry.rs`).

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Weak};

use pyo3::prelude::*;

use super::engine_shared::EngineShared;
use super::lifecycle::fork_count;
use super::token::TokenInner;
use crate::engine::pool::{OutsideUnits, WorkerInfo};

thread_local! {
    /// The token whose body runs on this thread.
    pub(crate) static CURRENT_TOKEN: RefCell<Option<Arc<TokenInner>>> = const { RefCell::new(None) };
    /// The engine and worker identity of the worker running on this thread.
    pub(crate) static WORKER: RefCell<Option<(Weak<EngineShared>, WorkerInfo)>> = const { RefCell::new(None) };
    /// How many runs this worker has nested inside its waits.
    pub(crate) static HELP_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Core units held by the jobs this worker thread runs inline (its waits);
    /// the job the pool started holds `crate::engine::pool::held_units()`.
    pub(crate) static CHAIN_UNITS: Cell<u32> = const { Cell::new(0) };
    /// The engine and core units of the token this thread (outside the pool) runs for its caller.
    pub(crate) static OUTSIDE_UNITS: RefCell<Option<(Arc<EngineShared>, OutsideUnits)>> = const { RefCell::new(None) };
    /// Whether this thread is the interpreter's main thread, asked once per
    /// thread and process (the fork count it was asked at).
    static ON_MAIN_THREAD: Cell<Option<(u64, bool)>> = const { Cell::new(None) };
}

/// The token whose body runs on this thread, if any.
#[inline]
pub(crate) fn running_token() -> Option<Arc<TokenInner>> {
    CURRENT_TOKEN.with(|c| c.borrow().clone())
}

/// True when this thread is running `token`'s body right now.
#[inline]
pub(crate) fn is_current_token(token: &TokenInner) -> bool {
    CURRENT_TOKEN.with(|c| c.borrow().as_ref().is_some_and(|t| std::ptr::eq(Arc::as_ptr(t), token)))
}

/// True on a pool worker thread.
#[inline]
pub(crate) fn on_worker_thread() -> bool {
    WORKER.with(|w| w.borrow().is_some())
}

/// True on the interpreter's main thread (asked once per thread and fork).
pub(crate) fn on_main_thread(py: Python<'_>) -> bool {
    let forks = fork_count();
    ON_MAIN_THREAD.with(|c| {
        if let Some((at, v)) = c.get() {
            if at == forks {
                return v;
            }
        }
        let v = (|| -> PyResult<bool> {
            let threading = py.import("threading")?;
            let main = threading.call_method0("main_thread")?.getattr("ident")?;
            main.eq(threading.call_method0("get_ident")?)
        })()
        .unwrap_or(true);
        c.set(Some((forks, v)));
        v
    })
}
