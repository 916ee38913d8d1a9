//! Every atomic, lock and condvar the engine uses comes from here, so that a
//! model checker can swap them in one place (tokio's `loom` shim pattern).
//!
//! Today the engine runs on `std` atomics and `parking_lot` locks; `cfg(loom)`
//! model tests live in `src/pool/loom_tests.rs` and use loom's types directly
//! for the sleep/wake handshake they model.

pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard};
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
pub(crate) use std::sync::Arc;
