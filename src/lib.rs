//! tokengate: run ordinary Python functions concurrently on a Rust
//! work-stealing pool.
//!
//! * [`pool`]: the engine (crossbeam-deque work stealing, parking_lot
//!   sleep/wake, core pinning). No Python.
//! * [`token`]: the token state machine. No Python.
//! * [`metrics`]: per-operation counters and histograms, and their Prometheus text. No Python.
//! * `py` (feature `python`): the PyO3 binding layer, the only code that
//!   touches the interpreter.
//!
//! `unsafe` is denied crate-wide; `py/ffi.rs` alone allows it, for a few
//! direct CPython C-API calls on the hot path, each with its `SAFETY:` proof.

pub mod admission;
pub mod error;
pub mod lane;
pub mod metrics;
pub mod pool;
mod sync;
pub mod timer;
pub mod token;

#[cfg(feature = "python")]
mod py;
