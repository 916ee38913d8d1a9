//! The registry of running engines that decorated calls submit to.
//!
//! # Protocol
//!
//! `ACTIVE` lists running engines, newest last. A decorated call submits to
//! the engine whose worker runs it (nested calls stay on their engine), else
//! to the newest active engine. Each thread caches its answer and revalidates
//! it against `GENERATION`, which every start and stop bumps, so the hot path
//! takes no lock. `ALL` keeps a weak handle on every engine whose threads may
//! still run (running, or stopped without joining), for the stop at
//! interpreter exit (`begin_interpreter_shutdown`, registered with
//! `threading._register_atexit`, so it runs before threads are joined): it
//! refuses new work and stops every engine, running what was queued.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use pyo3::prelude::*;

use super::engine_shared::{take_unjoined, EngineShared, Unjoined};
use super::exceptions::BindError;
use super::lifecycle::{check_accepting, is_forked, mark_exiting};
use crate::engine::sync::{AtomicU64, Mutex, Ordering};

static ACTIVE: Mutex<Vec<Arc<EngineShared>>> = Mutex::new(Vec::new());
/// Every engine whose workers may still run (running, or stopped without joining).
static ALL: Mutex<Vec<Weak<EngineShared>>> = Mutex::new(Vec::new());
static GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static CACHED: RefCell<(u64, Option<Arc<EngineShared>>)> = const { RefCell::new((0, None)) };
}

fn lookup() -> Option<Arc<EngineShared>> {
    if let Some((pool_id, _)) = crate::engine::pool::current_worker() {
        let active = ACTIVE.lock();
        if let Some(e) = active.iter().find(|e| e.pool.id() == pool_id) {
            return Some(e.clone());
        }
        return active.last().cloned();
    }
    ACTIVE.lock().last().cloned()
}

/// The engine a decorated call made on this thread submits to (a counted
/// handle; the hot path borrows it through `with_current_engine`).
pub(crate) fn current_engine() -> Result<Arc<EngineShared>, BindError> {
    with_current_engine(Arc::clone)
}

/// Runs `f` with the engine a decorated call made on this thread submits to,
/// borrowed from the thread's cache (no reference count taken per call). A
/// call nested inside `f` on the same thread works too (it reads the cache,
/// or looks the engine up when the cache is stale).
pub(crate) fn with_current_engine<R>(f: impl FnOnce(&Arc<EngineShared>) -> R) -> Result<R, BindError> {
    check_accepting()?;
    let generation = GENERATION.load(Ordering::Acquire);
    CACHED.with(|cache| {
        if let Ok(mut c) = cache.try_borrow_mut() {
            if c.0 != generation {
                *c = (generation, lookup());
            }
        }
        match cache.try_borrow() {
            Ok(c) if c.0 == generation => c.1.as_ref().map(f).ok_or(BindError::NotStarted),
            _ => lookup().as_ref().map(f).ok_or(BindError::NotStarted),
        }
    })
}

/// The newest running engine that takes decorated calls, wherever the call
/// is made (the process lane's choice: see `process_call.rs`).
pub(crate) fn newest_engine() -> Result<Arc<EngineShared>, BindError> {
    check_accepting()?;
    // The highest pool id, as `_current_coordinator` picks: two engines started at once on two
    // threads may enter `ACTIVE` in the other order.
    ACTIVE.lock().iter().max_by_key(|e| e.pool.id()).cloned().ok_or(BindError::NotStarted)
}

fn activate(engine: &Arc<EngineShared>) {
    ACTIVE.lock().push(engine.clone());
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// Takes `engine` out of `ACTIVE` (the first step of a stop).
pub(crate) fn deactivate(engine: &EngineShared) {
    ACTIVE.lock().retain(|e| !std::ptr::eq(Arc::as_ptr(e), engine));
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // This thread's cache lets go of the engine now (another thread's, when
    // it next submits or exits). Generation 0 is never current.
    let _ = CACHED.try_with(|cache| {
        if let Ok(mut c) = cache.try_borrow_mut() {
            *c = (0, None);
        }
    });
}

/// Books a new engine in `ALL` (and in `ACTIVE` when `active`).
pub(crate) fn add(engine: &Arc<EngineShared>, active: bool) {
    {
        let mut all = ALL.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(engine));
    }
    if active {
        activate(engine);
    }
}

/// Called once when the interpreter starts to shut down (before threads
/// are joined): refuse new work, then stop every engine, running what is queued.
#[pyfunction]
pub(crate) fn begin_interpreter_shutdown(py: Python<'_>) -> PyResult<()> {
    mark_exiting();
    if is_forked() {
        return Ok(());
    }
    super::dashboard::stop_all(py);
    // Every engine, including those stopped with wait=False whose workers
    // still run: no worker may be attached when the interpreter finalizes.
    let engines: Vec<Arc<EngineShared>> = ALL.lock().iter().filter_map(Weak::upgrade).collect();
    for engine in engines.iter().rev() {
        deactivate(engine);
        engine.stop(py, true, false, None)?;
    }
    drop(engines);
    let handles = take_unjoined();
    py.detach(|| {
        for h in handles {
            match h {
                Unjoined::Worker(h) => {
                    let _ = h.join();
                }
                Unjoined::Lane(j) => {
                    j.join(None);
                }
            }
        }
    });
    Ok(())
}

/// Every engine of this process that has started and not begun to stop.
pub(crate) fn live_engines() -> Vec<Arc<EngineShared>> {
    if is_forked() {
        return Vec::new();
    }
    ALL.lock().iter().filter_map(Weak::upgrade).filter(|e| !e.is_stopping()).collect()
}

/// How many engines are running.
#[pyfunction]
pub(crate) fn active_engine_count() -> usize {
    if is_forked() {
        return 0;
    }
    ACTIVE.lock().len()
}
