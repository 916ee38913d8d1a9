//! Re-attach gating: at most one pool worker at a time waits for the GIL;
//! and the short hand-over spins between a finishing worker and its waiter.
//!
//! # Why
//!
//! Under the GIL one thread runs Python at a time. A pool worker that found
//! work re-attaches (takes the GIL) before it runs it. When several workers
//! find work at once (the chain of wake-ups a burst of submissions causes),
//! they all queue on the GIL, and CPython then hands it round among them and
//! the submitting thread, one switch interval each: more context switches,
//! tokens bouncing between cores, no more parallelism. Measured on the
//! bulk-submission benchmark: 1.47 us per token with 8 workers against 1.16
//! with 1. One waiter is enough: whenever the GIL is free, someone takes it.
//!
//! # Protocol
//!
//! * `State::waiting` (under `SLOT`) says whether a worker holds the "next to
//!   attach" slot. A worker that found work calls [`before_attach`] while
//!   still detached: it takes the slot if it is free, else parks on `FREED`
//!   until the slot is free or `POLITENESS` has passed; then it attaches
//!   (with or without the slot: progress never depends on the slot).
//! * Once attached, the worker calls [`after_attach`] with what
//!   `before_attach` returned: a slot holder frees it and wakes one parked
//!   worker.
//! * Who may wait for whom: an attached thread never waits for the slot, and
//!   the slot holder waits only for the GIL, so there is no cycle; the GIL
//!   holder yields it within a switch interval once the slot holder asks.
//! * A free-threaded interpreter has no GIL: the gate is off there
//!   ([`configure`] reads `sys._is_gil_enabled()` when a worker starts).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;

/// How long a worker waits for the slot before it attaches anyway.
const POLITENESS: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct State {
    waiting: bool,
    parked: usize,
}

static SLOT: Mutex<State> = Mutex::new(State { waiting: false, parked: 0 });
static FREED: Condvar = Condvar::new();

/// 0: not known yet, 1: gate on (GIL), 2: gate off (free-threaded).
static MODE: AtomicU8 = AtomicU8::new(0);

/// Reads whether the interpreter has a GIL (attached; once per process).
pub(crate) fn configure(py: Python<'_>) {
    if MODE.load(Ordering::Relaxed) != 0 {
        return;
    }
    let gil = py
        .import("sys")
        .and_then(|sys| sys.getattr("_is_gil_enabled"))
        .and_then(|f| f.call0())
        .and_then(|v| v.extract::<bool>())
        .unwrap_or(true);
    MODE.store(if gil { 1 } else { 2 }, Ordering::Relaxed);
}

/// Called detached, before a worker re-attaches to run work. Returns whether
/// it took the slot (pass that to [`after_attach`]).
pub(crate) fn before_attach() -> bool {
    if MODE.load(Ordering::Relaxed) != 1 {
        return false;
    }
    let mut state = SLOT.lock();
    if !state.waiting {
        state.waiting = true;
        return true;
    }
    state.parked += 1;
    let timed_out = FREED.wait_while_for(&mut state, |s| s.waiting, POLITENESS).timed_out();
    state.parked -= 1;
    if timed_out {
        return false;
    }
    state.waiting = true;
    true
}

/// Called once attached: frees the slot if this worker held it.
pub(crate) fn after_attach(held: bool) {
    if !held {
        return;
    }
    let mut state = SLOT.lock();
    state.waiting = false;
    if state.parked > 0 {
        FREED.notify_one();
    }
}

// -- hand-over between a finishing worker and its waiting caller ---------------

/// How long a thread that is about to take the interpreter from a worker
/// spins first for the worker to let it go: an idle worker that found a job
/// waits this long for its submitter to start waiting (`Job::before_idle_run`),
/// and a waiter that saw its token finish waits this long for the worker to
/// go idle (`settle_after_wait`). Either way a thread wake-up (~10 us) is saved.
pub(crate) const ATTACH_DELAY: Duration = Duration::from_micros(4);

/// Counts workers going idle (each releases the interpreter first).
static IDLE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current idle epoch (see `settle_after_wait`).
#[inline]
pub(crate) fn idle_epoch() -> u64 {
    IDLE_EPOCH.load(Ordering::Acquire)
}

/// After a wait saw its token finish: the worker that finished it usually
/// releases the interpreter a moment later (it goes idle). Re-attaching
/// before that would block on the interpreter and cost a thread wake-up, so
/// spin up to `ATTACH_DELAY` for a worker to go idle first.
#[inline]
pub(crate) fn settle_after_wait(epoch_before: u64) {
    let start = std::time::Instant::now();
    while IDLE_EPOCH.load(Ordering::Acquire) == epoch_before && start.elapsed() < ATTACH_DELAY {
        std::hint::spin_loop();
    }
}

/// A worker is about to go idle (it has released the interpreter).
#[inline]
pub(crate) fn note_idle() {
    IDLE_EPOCH.fetch_add(1, Ordering::Release);
}
