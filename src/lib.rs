//! tokengate: run ordinary Python functions concurrently on a Rust
//! work-stealing pool.
//!
//! Two floors, and arrows point down only (`scripts/check-module-graph.py`
//! checks it in CI):
//!
//! * [`engine`]: work stealing, tokens, lanes, timers, admission, books and
//!   metrics. No Python.
//! * `py` (feature `python`): the PyO3 binding layer, the only code that
//!   touches the interpreter. The Python API (`python/tokengate`) sits on it.
//!
//! `unsafe` is denied crate-wide; `py/ffi.rs` alone allows it, for a few
//! direct CPython C-API calls on the hot path, each with its `SAFETY:` proof.

pub mod engine;

#[cfg(feature = "python")]
mod py;
