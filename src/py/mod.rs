//! The PyO3 binding layer: the only code in the crate that touches Python.
//!
//! * `engine`: `Engine` (one running pool of Python-attached workers), the
//!   registry of active engines, stop and stats.
//! * `spec`: `OperationSpec`, built once per decorated function; its
//!   `submit` is the hot path of every decorated call.
//! * `attach`: at most one pool worker at a time queues on the GIL.
//! * `job`: what a worker does with one token (attach once, call, capture).
//! * `token`: `TaskToken`, its outcome, listeners and the await iterator.
//! * `asyncio`: per-loop completion queues (one loop wake per burst).
//! * `wait`: the one helper that blocks while detached and polls for Ctrl-C.
//! * `exceptions`: the single mapping from internal errors to Python exceptions.
//! * `ffi`: the only `unsafe` code (direct C-API calls for the context copy and run).

mod asyncio;
mod attach;
mod deps;
mod engine;
mod exceptions;
mod ffi;
mod job;
mod ledger;
mod log;
mod metrics;
mod routing;
mod spec;
mod token;
mod wait;

use pyo3::prelude::*;

/// The native module `tokengate._tokengate`.
#[pymodule(gil_used = false)]
fn _tokengate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<spec::OperationSpec>()?;
    m.add_class::<spec::GuardedFunction>()?;
    m.add_class::<token::TaskToken>()?;
    m.add_class::<token::TokenAwait>()?;
    m.add_class::<asyncio::LoopDrain>()?;
    m.add_function(wrap_pyfunction!(engine::after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(engine::begin_interpreter_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(engine::active_engine_count, m)?)?;
    m.add_function(wrap_pyfunction!(job::set_fault_injection, m)?)?;
    m.add_function(wrap_pyfunction!(job::current_token, m)?)?;
    m.add_function(wrap_pyfunction!(asyncio::loop_stats, m)?)?;
    m.add_function(wrap_pyfunction!(wait::wait_all, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::render_metrics, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_SECONDS", wait::MAX_SECONDS)?;
    m.add("MAX_WORKERS", crate::pool::MAX_WORKERS)?;
    Ok(())
}
