//! The threads an engine runs Python on: pool workers (`PyHost`) and the I/O
//! lane's threads (`IoHost`). Each attaches to the interpreter once, for its
//! whole life, and detaches only while it waits for work; a worker re-attaches
//! through the gate of `attach.rs`. When the interpreter is gone, a thread
//! drops the jobs it gets (`NoPython`), which cancels their tokens.
//!
//! How Python sees each thread is the Python layer's: given a thread factory
//! (`Engine(python_thread=...)`, the coordinator's `PoolThread`), a thread
//! calls `factory(os_thread_name, kind)` (`kind`: "worker" or "io") on this
//! thread once attached, which enters
//! the thread in `threading`'s table, and calls `_tokengate_end()` on what it
//! returned, on this thread, as the thread ends (`PythonThread`). Without one,
//! `threading` sees the thread as any thread it did not start (`Dummy-N`).

use std::sync::{OnceLock, Weak};

use pyo3::prelude::*;

use super::engine_shared::EngineShared;
use super::run::execute;
use super::thread::WORKER;
use super::token::PyJob;
use crate::engine::io_lane::{LaneHost, LaneThread};
use crate::engine::pool::{Host, WorkerHooks, WorkerInfo, WorkerLoop};

/// Runs the workers of one engine: attached to Python for their whole life.
#[derive(Debug)]
pub(crate) struct PyHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
    /// `threading`'s view of a thread (see the module docs).
    pub(crate) python_thread: Option<Py<PyAny>>,
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
#[derive(Debug)]
pub(crate) struct IoHost {
    pub(crate) engine: OnceLock<Weak<EngineShared>>,
    /// `threading`'s view of a thread (see the module docs).
    pub(crate) python_thread: Option<Py<PyAny>>,
}

impl LaneHost<PyJob> for IoHost {
    fn run_thread(&self, thread: LaneThread<PyJob>) {
        let mut slot = Some(thread);
        let attached = Python::try_attach(|py| {
            if let Some(thread) = slot.take() {
                let _thread = PythonThread::enter(py, self.python_thread.as_ref(), "io");
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

/// This thread as `threading` sees it, for as long as the value lives (see the
/// module docs). A factory that fails leaves the thread as `threading` would
/// (its error is not raised: the thread still runs jobs).
struct PythonThread<'py> {
    thread: Option<Bound<'py, PyAny>>,
}

impl<'py> PythonThread<'py> {
    /// `kind`: "worker" (a pool worker) or "io" (an I/O-lane thread).
    fn enter(py: Python<'py>, factory: Option<&Py<PyAny>>, kind: &str) -> Self {
        let thread = factory.and_then(|f| match f.bind(py).call1((std::thread::current().name().unwrap_or_default(), kind)) {
            Ok(thread) => Some(thread),
            Err(e) => {
                // The thread still runs jobs, as a thread `threading` did not start.
                e.write_unraisable(py, Some(f.bind(py)));
                None
            }
        });
        PythonThread { thread }
    }
}

impl Drop for PythonThread<'_> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = thread.call_method0(pyo3::intern!(thread.py(), "_tokengate_end")) {
                e.write_unraisable(thread.py(), Some(&thread));
            }
        }
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
                let _thread = PythonThread::enter(py, self.python_thread.as_ref(), "worker");
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
