//! tokengate: run ordinary Python functions concurrently on a Rust
//! worker pool.
//!
//! Two floors, and arrows point down only (`scripts/check-module-graph.py`
//! checks it in CI):
//!
//! * No Python: [`engine`] (the worker pool, tokens, lanes, timers, admission,
//!   books and metrics) and [`dashboard`] (the HTTP server of the dashboard,
//!   which asks a backend for what it serves).
//! * `py` (feature `python`): the PyO3 binding layer, the only code that
//!   touches the interpreter. The Python API (`python/tokengate`) sits on it.
//!
//! `unsafe` is denied crate-wide; `py/ffi.rs` alone allows it, for a few
//! direct CPython C-API calls on the hot path, each with its `SAFETY:` proof.

pub mod dashboard;
pub mod engine;

#[cfg(feature = "python")]
mod py;
