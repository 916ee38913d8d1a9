//! One worker thread's loop: find work (its inbox, the priority heap, the
//! global injector one job at a time: see the pool's module docs for why not
//! in batches), run it, and when there is none, spin briefly and park (see
//! `sleep.rs`).
//!
//! The embedder wraps the loop (`Host::run_worker`) and sees two moments:
//! `WorkerHooks::execute` for each job and `WorkerHooks::idle` around every
//! wait. The Python binding attaches the thread to the interpreter once for
//! the whole loop and detaches only inside `idle`.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crossbeam_deque::Steal;

use super::capacity::{CoreBudget, Weight};
use super::job::Job;
use super::shared::Shared;
use super::sleep::Woke;
use crate::engine::sync::Ordering;

thread_local! {
    /// (pool id, worker index) of the pool worker running on this thread.
    static CURRENT: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
    /// Core units held by the job this worker runs now.
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// Core units held by the job the pool is running on this thread (0 elsewhere).
pub fn held_units() -> u32 {
    HELD.with(Cell::get)
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
    /// A spare worker (started while others block; it retires when idle), not one of the pool's own.
    pub(super) spare: bool,
    pub(super) shared: crate::engine::sync::Arc<Shared<J>>,
}

impl<J> std::fmt::Debug for WorkerLoop<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerLoop").field("info", &self.info).finish_non_exhaustive()
    }
}

/// A job found by `find_work`, with the core units it already holds (if any).
struct Found<J> {
    job: J,
    weight: Weight,
    /// Units already taken on this worker's core (deferred and pinned jobs).
    units: Option<u32>,
}

impl<J: Job> WorkerLoop<J> {
    /// Who this worker is.
    pub fn info(&self) -> WorkerInfo {
        self.info
    }

    /// Runs jobs until the pool terminates and no work is left.
    pub fn run(mut self, hooks: &mut dyn WorkerHooks<J>) {
        CURRENT.with(|c| c.set(Some((self.info.pool_id, self.info.index))));
        let mut starting = self.spare;
        loop {
            let found = self.find_work();
            if starting {
                // A spare that looked for work no longer counts as starting (see
                // `Shared::ensure_taker`). Only after the look: a job it took has
                // left the queue by then, so that job never counts as waiting with
                // no taker (which started one spare too many).
                self.shared.spares_starting.fetch_sub(1, Ordering::AcqRel);
                starting = false;
            }
            if let Some(found) = found {
                self.execute(hooks, found);
                continue;
            }
            let mut next = None;
            {
                let me = &mut self;
                let slot = &mut next;
                hooks.idle(&mut || *slot = me.wait_for_work());
            }
            match next {
                Some(found) => self.execute(hooks, found),
                None => break,
            }
        }
        CURRENT.with(|c| c.set(None));
    }

    /// The budget of this worker's core.
    fn core(&self) -> &CoreBudget {
        &self.shared.cores[self.shared.core_of(self.info.index)]
    }

    fn budget(&self) -> u32 {
        self.core().budget(self.shared.active_per_core.load(Ordering::Relaxed))
    }

    /// Takes core units for `found` and runs it, or defers it when it does not fit.
    fn execute(&mut self, hooks: &mut dyn WorkerHooks<J>, found: Found<J>) {
        // A heavy job a waiter already ran must not hold its core (nor keep cores reserved for it).
        let found = if found.weight == Weight::Heavy {
            match self.unless_spent(found) {
                Some(found) => found,
                None => return,
            }
        } else {
            found
        };
        let Found { job, weight, units } = found;
        let budget = self.budget();
        let units = match units {
            Some(u) => u,
            None => {
                let u = weight.units(budget);
                // A heavy job lent while blocked still counts as its core's heavy job.
                if (weight == Weight::Heavy && self.core().heavy_running() > 0) || !self.core().try_acquire(u, budget) {
                    self.shared.defer(job, weight); // its units did not fit this core
                    return;
                }
                u
            }
        };
        let heavy = weight == Weight::Heavy;
        if heavy {
            self.core().heavy_started();
            let now = self.shared.heavy_now.fetch_add(1, Ordering::AcqRel) + 1;
            self.shared.heavy_peak.fetch_max(now, Ordering::Relaxed);
            // Its core was reserved for it, or another core was and it found room here first.
            self.shared.heavy_job_settled(self.core());
        }
        let info = self.info;
        HELD.with(|h| h.set(units));
        let run = &self.shared.runs[info.index];
        run.set_class(job.class());
        if self.shared.config.gil_window.is_some() {
            run.stamp_began(crate::engine::token::now_ns());
        }
        run.begin(units);
        self.shared.wake_monitor();
        if catch_unwind(AssertUnwindSafe(|| hooks.execute(job, &info))).is_err() {
            self.shared.panics.fetch_add(1, Ordering::Relaxed);
        }
        HELD.with(|h| h.set(0));
        let held = run.end();
        if heavy {
            self.core().heavy_finished();
            self.shared.heavy_now.fetch_sub(1, Ordering::AcqRel);
        }
        if held {
            self.core().release(units);
        } else {
            // The job blocked and its units were lent: the lender gave them back already.
            self.core().end_loan();
        }
        // A worker that a loan made active may be outside the pattern now.
        self.shared.hand_over_if_inactive(self.info.index);
    }

    /// The job, unless its work was done elsewhere (`Job::is_spent`): then it
    /// is dropped and the units it held go back. Asked by an idle worker,
    /// where it saves leaving the idle state, and for heavy jobs (a busy
    /// worker's hooks see that a light or medium job has nothing left to run
    /// as cheaply as this would).
    fn unless_spent(&self, found: Found<J>) -> Option<Found<J>> {
        if !found.job.is_spent() {
            return Some(found);
        }
        if let Some(units) = found.units {
            self.core().release(units);
            // A deferred heavy job ends the reservation when it starts; one a
            // waiter already ran ends it here, or a core would stay reserved for it.
            if found.weight == Weight::Heavy {
                self.shared.heavy_job_settled(self.core());
            }
        }
        None
    }

    /// A deferred job that fits this core now, with its units taken.
    fn take_deferred(&self) -> Option<Found<J>> {
        if self.shared.deferred_len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let core = self.core();
        let budget = self.budget();
        let reserved = core.reserved.load(Ordering::Acquire);
        let mut deferred = self.shared.deferred.lock();
        let heavy_here = core.heavy_running() > 0;
        let fits =
            |w: Weight| (!reserved || w == Weight::Heavy) && !(w == Weight::Heavy && heavy_here) && core.used() + w.units(budget) <= budget;
        let pos = deferred.iter().position(|(_, w)| fits(*w))?;
        let weight = deferred[pos].1;
        let units = weight.units(budget);
        if !core.try_acquire(units, budget) {
            return None;
        }
        let (job, _) = deferred.remove(pos)?;
        self.shared.deferred_len.store(deferred.len(), Ordering::SeqCst);
        Some(Found { job, weight, units: Some(units) })
    }

    fn fresh(job: J) -> Found<J> {
        let weight = job.weight();
        Found { job, weight, units: None }
    }

    /// Inbox, deferred jobs that fit, the urgent part of the priority heap,
    /// the injector (one job: jobs start in submission order), then the rest
    /// of the heap. A core reserved for a heavy job, or an inactive
    /// worker, takes only its inbox (and, reserved, a deferred heavy job).
    fn find_work(&mut self) -> Option<Found<J>> {
        while let Some(inbox) = self.shared.inboxes.get(self.info.index) {
            match inbox.steal() {
                Steal::Success(job) => {
                    let weight = job.weight();
                    let units = weight.units(self.budget());
                    self.core().force_acquire(units);
                    return Some(Found { job, weight, units: Some(units) });
                }
                Steal::Empty => break,
                Steal::Retry => {}
            }
        }
        if !self.shared.is_active(self.info.index) || self.shared.holds_back_for_gil(self.info.index) {
            return None;
        }
        if let Some(found) = self.take_deferred() {
            return Some(found);
        }
        if self.core().reserved.load(Ordering::Acquire) || self.core().used() >= self.budget() {
            return None;
        }
        if let Some(job) = self.shared.take_prio(true) {
            return Some(Self::fresh(job));
        }
        if let Some(job) = self.shared.take_fifo() {
            return Some(Self::fresh(job));
        }
        self.shared.take_prio(false).map(Self::fresh)
    }

    /// Spins, then parks, until a job is found (Some) or the pool terminates (None).
    fn wait_for_work(&mut self) -> Option<Found<J>> {
        let shared = self.shared.clone();
        let sleep = &shared.sleep;
        let index = self.info.index;
        // Only a worker that could take shared work spins for it (a spinner
        // silences the submitters' wake-ups).
        let mut spinning = shared.can_take_shared(index) && sleep.try_begin_spin(index);
        loop {
            let rounds = if spinning { self.shared.config.spin_rounds } else { 1 };
            let spin_start = std::time::Instant::now();
            // After waking a parked waiter, spin only briefly (see `take_woke_waiter`).
            let spin_limit = if crate::engine::token::take_woke_waiter() { WOKE_SPIN_LIMIT } else { SPIN_LIMIT };
            for round in 0..rounds {
                if let Some(found) = self.find_work() {
                    let Some(found) = self.unless_spent(found) else {
                        continue;
                    };
                    if spinning {
                        sleep.end_spin(index);
                        spinning = false;
                    }
                    if self.shared.has_work() {
                        self.shared.notify_work();
                    }
                    found.job.before_idle_run();
                    // The wait above gives a caller time to take the job itself.
                    match self.unless_spent(found) {
                        Some(found) => return Some(found),
                        None => break,
                    }
                }
                if self.shared.terminate.load(Ordering::SeqCst) && !self.shared.has_work_for(index) {
                    if spinning {
                        sleep.end_spin(index);
                    }
                    return None;
                }
                backoff(round);
                // A spinner silences the submitters' wake-ups, so it spins only while it
                // really runs: never past SPIN_LIMIT of wall time (on a busy machine a
                // thread that lost its CPU comes back much later), and without yielding
                // (a yield hands the core to a CPU-bound neighbour for its whole slice).
                if round >= 6 && spin_start.elapsed() >= spin_limit {
                    break;
                }
            }
            if spinning {
                // Hand the search over before parking: a submitter may have
                // skipped its wake-up because this worker was spinning.
                sleep.end_spin(index);
                spinning = false;
                if shared.has_work() {
                    shared.notify_work();
                }
            }
            let work_or_end = || shared.has_work_for(index) || shared.terminate.load(Ordering::SeqCst);
            if !self.spare {
                spinning = sleep.sleep(index, spinning, work_or_end);
                continue;
            }
            // A spare that the end of the last loan left outside the pattern,
            // before it parks.
            shared.hand_over_if_inactive(index);
            // A spare retires after `spare_idle` without work.
            let deadline = std::time::Instant::now() + shared.config.spare_idle;
            match sleep.sleep_until(index, spinning, work_or_end, Some(deadline)) {
                Woke::Signalled => spinning = true,
                Woke::WorkFound => spinning = false,
                Woke::TimedOut => return None,
            }
        }
    }
}

/// The longest an idle worker spins (wall time) before it parks.
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_micros(50);

/// The same right after its run woke a parked waiter.
const WOKE_SPIN_LIMIT: std::time::Duration = std::time::Duration::from_micros(3);

/// Exponential spin for the first rounds, then a steady one (no yield: see `wait_for_work`).
fn backoff(round: u32) {
    for _ in 0..(1u32 << round.min(6)) {
        std::hint::spin_loop();
    }
}

/// What the embedder runs on each worker thread.
pub trait Host<J>: Send + Sync + 'static {
    /// Runs the worker's whole life; must call `worker.run(hooks)` once.
    fn run_worker(&self, worker: WorkerLoop<J>);
}
