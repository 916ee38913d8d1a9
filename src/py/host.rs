//! The threads an engine runs Python on: pool workers (`PyHost`) and the I/O
//! lane's threads (`IoHost`). Each attaches to the interpreter once, for its
//! whole life, and detaches only while it waits for work; a worker re-attaches
//! through the gate of `attach.rs`. When the interpreter is gone, a thread
//! drops the jobs it gets (`NoPython`), which cancels their tokens.
//!
//! Python sees each thread under its pool's name (`threading.current_thread()`,
//! logging's `%(threadName)s`), as `ThreadPoolExecutor`'s threads are seen
//! under theirs, not as `Dummy-N`: `PythonThreadName` names it once attached
//! and takes it out of `threading`'s table when the thread ends (CPython before
//! 3.13 keeps the entry of a thread it did not start for as long as the
//! interpreter runs, and spare workers come and go).

use std::sync::{OnceLock, Weak};

use pyo3::prelude::*;

use super::engine_shared::EngineShared;
use super::run::execute;
use super::thread::WORKER;
use super::token::PyJob;
use crate::engine::io_lane::{LaneHost, LaneThread};
use crate::engine::pool::{Host, WorkerHooks, WorkerInfo, WorkerLoop};

/// Runs the workers of one engine: attached to Python for their whole life.
#[derive(Debug, Default)]
pub(crate) struct PyHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
}

struct PyHooks<'a, 'py> {
    py: Python<'py>,
    host: &'a PyHost,
    engine: Weak<EngineShared>,
}

impl WorkerHooks<PyJob> for PyHooks<'_, '_> {
    fn execute(&mut self, job: PyJob, worker: &WorkerInfo) {
        if self.engine.strong_count() == 0 {
            // The engine is published right after the pool starts; jobs exist only after that.
            if let Some(e) = self.host.engine.get() {
                self.engine = e.clone();
                let w = self.engine.clone();
                WORKER.with(|slot| *slot.borrow_mut() = Some((w, *worker)));
            }
        }
        execute(self.py, job, worker, &self.engine);
    }

    fn idle(&mut self, wait: &mut (dyn FnMut() + Send)) {
        let slot = self.py.detach(|| {
            // Tell a caller that just saw its token finish that the interpreter is free.
            super::attach::note_idle();
            wait();
            // At most one worker queues on the GIL at a time (see `attach.rs`).
            super::attach::before_attach()
        });
        super::attach::after_attach(slot);
    }
}

/// Runs the threads of an engine's I/O lane (attached for their whole life,
/// detached while they wait).
#[derive(Debug, Default)]
pub(crate) struct IoHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
}

impl LaneHost<PyJob> for IoHost {
    fn run_thread(&self, thread: LaneThread<PyJob>) {
        let mut slot = Some(thread);
        let attached = Python::try_attach(|py| {
            if let Some(thread) = slot.take() {
                let _name = PythonThreadName::set(py);
                let engine = self.engine.get().cloned().unwrap_or_default();
                let mut hooks = IoHooks { py, engine };
                thread.run(&mut hooks);
            }
        });
        if attached.is_none() {
            if let Some(thread) = slot.take() {
                thread.run(&mut NoPython);
            }
        }
    }
}

struct IoHooks<'py> {
    py: Python<'py>,
    engine: Weak<EngineShared>,
}

impl WorkerHooks<PyJob> for IoHooks<'_> {
    fn execute(&mut self, job: PyJob, worker: &WorkerInfo) {
        execute(self.py, job, worker, &self.engine);
    }

    fn idle(&mut self, wait: &mut (dyn FnMut() + Send)) {
        self.py.detach(wait);
    }
}

/// This thread's name in `threading`, for as long as the value lives (see the
/// module docs). Every step may fail (an interpreter shutting down, a patched
/// `threading`): the thread then keeps the name Python gives it.
struct PythonThreadName<'py> {
    py: Python<'py>,
    /// The `threading.Thread` object named (None when naming failed).
    thread: Option<Bound<'py, PyAny>>,
}

impl<'py> PythonThreadName<'py> {
    fn set(py: Python<'py>) -> Self {
        let thread = std::thread::current().name().and_then(|name| {
            let thread = py.import("threading").and_then(|t| t.call_method0("current_thread")).ok()?;
            thread.setattr("name", name).ok().map(|()| thread)
        });
        PythonThreadName { py, thread }
    }
}

impl Drop for PythonThreadName<'_> {
    /// Takes this thread's entry out of `threading._active`, only if it is still the
    /// object named (a thread of a forked child may be another by then).
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let forget = || -> PyResult<()> {
            let threading = self.py.import("threading")?;
            let ident = threading.call_method0("get_ident")?;
            let lock = threading.getattr("_active_limbo_lock")?;
            lock.call_method0("acquire")?;
            let popped = threading.getattr("_active").and_then(|active| {
                if active.call_method1("get", (&ident,))?.is(&thread) {
                    active.del_item(&ident)?;
                }
                Ok(())
            });
            lock.call_method0("release")?;
            popped
        };
        let _ = forget();
    }
}

/// Used when the interpreter is gone: jobs are dropped (so cancelled).
struct NoPython;

impl WorkerHooks<PyJob> for NoPython {
    fn execute(&mut self, job: PyJob, _worker: &WorkerInfo) {
        drop(job);
    }
}

impl Host<PyJob> for PyHost {
    fn run_worker(&self, worker: WorkerLoop<PyJob>) {
        let mut slot = Some(worker);
        let attached = Python::try_attach(|py| {
            if let Some(worker) = slot.take() {
                super::attach::configure(py);
                let _name = PythonThreadName::set(py);
                let engine = self.engine.get().cloned().unwrap_or_default();
                WORKER.with(|w| *w.borrow_mut() = Some((engine.clone(), worker.info())));
                let mut hooks = PyHooks { py, host: self, engine };
                worker.run(&mut hooks);
                WORKER.with(|w| *w.borrow_mut() = None);
            }
        });
        if attached.is_none() {
            if let Some(worker) = slot.take() {
                worker.run(&mut NoPython);
            }
        }
    }
}
