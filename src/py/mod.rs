//! The PyO3 binding layer: the only code in the crate that touches Python.
//!
//! Its modules, from the bottom up (a module names only those above it in
//! this list; `scripts/check-module-graph.py` checks there is no circle):
//!
//! * leaves: `exceptions` (the one mapping from errors to Python exceptions),
//!   `ffi` (direct C-API calls for the context copy and run), `log`, `attach`
//!   (at most one worker queues on the GIL; the hand-over spins), `asyncio`
//!   (per-loop completion queues), `lifecycle` (fork and interpreter exit),
//!   `process_lane` (the process lane's board, a worker's reply stage, the
//!   supervisor's reply reader), `durations`, `detached` (the blocking loop
//!   that polls for Ctrl-C), `call` (the call a token stands for),
//!   `operation` (what a decorated function's tokens share).
//! * `token`: a token's shared part, its resolution and listeners, its job.
//! * `engine_shared`: one running engine: dispatch, timer, convergence, stop.
//! * `registry`: the running engines that calls submit to; the stop at exit.
//! * `thread`: per-thread state (the running token, the worker, units held).
//! * `run`: what a thread does with one token's call.
//! * `wait`: every way a thread waits for tokens (help while waiting, caller
//!   runs, lent units, `wait_all`).
//! * `handle`: `TaskToken` and `TokenAwait`, the token's Python face.
//! * `deps`: tokens passed as arguments.
//! * `outside`: `OutsideLane` and `LaneTask`, what a lane that runs tokens
//!   outside the engine's threads (worker processes, a cluster) takes and reports.
//! * `host`: the threads an engine runs Python on.
//! * `spec`: `OperationSpec`, whose `submit` is the hot path of every
//!   decorated call, and `GuardedFunction`.
//! * `process_call`: `ProcessCall`, the base of a process-lane function, which
//!   queues its plain calls on the newest engine's process lane.
//! * `control`: pause, resume, drain and kill (for `Engine` and the dashboard).
//! * `metrics`: Prometheus text of live engines.
//! * `dashboard`: what the dashboard server (`crate::dashboard`) reads and does.
//! * `stats`, `engine`: the `Engine` class (start, stop, stats, control plane, serve).

mod asyncio;
mod attach;
mod call;
mod control;
mod dashboard;
mod deps;
mod detached;
mod durations;
mod engine;
mod engine_shared;
mod exceptions;
mod ffi;
mod handle;
mod host;
mod lifecycle;
mod log;
mod metrics;
mod operation;
mod outside;
mod process_call;
mod process_lane;
mod registry;
mod run;
mod spec;
mod stats;
mod thread;
mod token;
mod wait;

use pyo3::prelude::*;

/// The native module `tokengate._tokengate`.
#[pymodule(gil_used = false)]
fn _tokengate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<spec::OperationSpec>()?;
    m.add_class::<spec::GuardedFunction>()?;
    m.add_class::<handle::TaskToken>()?;
    m.add_class::<handle::TokenAwait>()?;
    m.add_class::<asyncio::LoopDeliveries>()?;
    m.add_class::<dashboard::DashboardServer>()?;
    m.add_class::<outside::OutsideLane>()?;
    m.add_class::<outside::LaneTask>()?;
    m.add_class::<process_call::ProcessCall>()?;
    m.add_class::<process_lane::ProcessBoard>()?;
    m.add_class::<process_lane::ReplyOutbox>()?;
    m.add_class::<process_lane::ReplyReader>()?;
    m.add_class::<process_lane::BatchOutbox>()?;
    m.add_function(wrap_pyfunction!(process_call::register_process_lane, m)?)?;
    m.add_function(wrap_pyfunction!(process_call::forget_process_lane, m)?)?;
    m.add_function(wrap_pyfunction!(lifecycle::after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(registry::begin_interpreter_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(registry::active_engine_count, m)?)?;
    m.add_function(wrap_pyfunction!(run::set_fault_injection, m)?)?;
    m.add_function(wrap_pyfunction!(handle::current_token, m)?)?;
    m.add_function(wrap_pyfunction!(asyncio::loop_stats, m)?)?;
    m.add_function(wrap_pyfunction!(handle::wait_all, m)?)?;
    m.add_function(wrap_pyfunction!(engine::render_metrics, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_SECONDS", durations::MAX_SECONDS)?;
    m.add("MAX_WORKERS", crate::engine::pool::MAX_WORKERS)?;
    Ok(())
}
