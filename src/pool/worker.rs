//! One worker thread's loop: find work (local deque, then the global
//! injector in batches, then the other workers' deques), run it, and when
//! there is none, spin briefly and park (see `sleep.rs`).
//!
//! The embedder wraps the loop (`Host::run_worker`) and sees two moments:
//! `WorkerHooks::execute` for each job and `WorkerHooks::idle` around every
//! wait. The Python binding attaches the thread to the interpreter once for
//! the whole loop and detaches only inside `idle`.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crossbeam_deque::{Steal, Worker};

use super::Shared;
use crate::sync::Ordering;

thread_local! {
    /// (pool id, worker index) of the pool worker running on this thread.
    static CURRENT: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
}

/// The pool id and index of the worker running on the current thread, if any.
pub fn current_worker() -> Option<(u64, usize)> {
    CURRENT.with(Cell::get)
}

/// Who a worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Index of the worker in its pool, `0..workers`.
    pub index: usize,
    /// The OS id of the core the worker is pinned to, or `None` when unpinned.
    pub core: Option<usize>,
    /// Id of the pool the worker belongs to.
    pub pool_id: u64,
}

/// What the embedder does at the two moments of a worker's life.
pub trait WorkerHooks<J> {
    /// Runs one job. A panic escaping here is caught and counted; the worker goes on.
    fn execute(&mut self, job: J, worker: &WorkerInfo);
    /// Called with the blocking wait for work; must call `wait` exactly once.
    /// The embedder may release resources around it (detach from Python).
    fn idle(&mut self, wait: &mut (dyn FnMut() + Send)) {
        wait();
    }
}

/// The loop of one worker thread, handed to `Host::run_worker`.
pub struct WorkerLoop<J> {
    pub(super) info: WorkerInfo,
    pub(super) local: Worker<J>,
    pub(super) shared: crate::sync::Arc<Shared<J>>,
}

impl<J> std::fmt::Debug for WorkerLoop<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerLoop").field("info", &self.info).finish_non_exhaustive()
    }
}

const STEAL_BATCH: usize = 32;

impl<J: Send + 'static> WorkerLoop<J> {
    /// Who this worker is.
    pub fn info(&self) -> WorkerInfo {
        self.info
    }

    /// Runs jobs until the pool terminates and no work is left.
    pub fn run(mut self, hooks: &mut dyn WorkerHooks<J>) {
        CURRENT.with(|c| c.set(Some((self.info.pool_id, self.info.index))));
        loop {
            if let Some(job) = self.find_work() {
                self.execute(hooks, job);
                continue;
            }
            let mut next = None;
            {
                let me = &mut self;
                let slot = &mut next;
                hooks.idle(&mut || *slot = me.wait_for_work());
            }
            match next {
                Some(job) => self.execute(hooks, job),
                None => break,
            }
        }
        CURRENT.with(|c| c.set(None));
    }

    fn execute(&mut self, hooks: &mut dyn WorkerHooks<J>, job: J) {
        let info = self.info;
        if catch_unwind(AssertUnwindSafe(|| hooks.execute(job, &info))).is_err() {
            self.shared.panics.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Local deque, then a batch from the injector, then the other workers.
    fn find_work(&mut self) -> Option<J> {
        if let Some(job) = self.shared.take_prio(true) {
            return Some(job);
        }
        if let Some(job) = self.local.pop() {
            return Some(job);
        }
        loop {
            match self.shared.injector.steal_batch_with_limit_and_pop(&self.local, STEAL_BATCH) {
                Steal::Success(job) => return Some(job),
                Steal::Empty => break,
                Steal::Retry => {}
            }
        }
        let n = self.shared.stealers.len();
        let mut retry = true;
        while retry {
            retry = false;
            for k in 1..n {
                let victim = &self.shared.stealers[(self.info.index + k) % n];
                match victim.steal_batch_with_limit_and_pop(&self.local, STEAL_BATCH) {
                    Steal::Success(job) => return Some(job),
                    Steal::Empty => {}
                    Steal::Retry => retry = true,
                }
            }
        }
        self.shared.take_prio(false)
    }

    /// Spins, then parks, until a job is found (Some) or the pool terminates (None).
    fn wait_for_work(&mut self) -> Option<J> {
        let shared = self.shared.clone();
        let sleep = &shared.sleep;
        let mut spinning = sleep.try_begin_spin();
        loop {
            let rounds = if spinning { self.shared.config.spin_rounds } else { 1 };
            for round in 0..rounds {
                if let Some(job) = self.find_work() {
                    if spinning {
                        sleep.end_spin();
                    }
                    if self.shared.has_work() {
                        sleep.notify_work();
                    }
                    return Some(job);
                }
                if self.shared.terminate.load(Ordering::SeqCst) {
                    if spinning {
                        sleep.end_spin();
                    }
                    return None;
                }
                backoff(round);
            }
            spinning = sleep.sleep(self.info.index, spinning, || {
                shared.has_work() || shared.terminate.load(Ordering::SeqCst)
            });
        }
    }
}

/// Exponential spin for the first rounds, then yield the CPU.
fn backoff(round: u32) {
    if round < 6 {
        for _ in 0..(1u32 << round) {
            std::hint::spin_loop();
        }
    } else {
        std::thread::yield_now();
    }
}
