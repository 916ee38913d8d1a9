//! `Shared`: the state a pool's handle, its workers and its blocking monitor
//! share, and what works on it from any of them: the priority queues, core
//! units lent and retaken (`blocking.rs`), spare workers, the adaptive pattern.
//! The protocol is in the pool's module docs (`mod.rs`).

use std::thread::JoinHandle;

use crossbeam_deque::{Injector, Steal};

use super::blocking::{current_tid, Run, RunCell};
use super::capacity::{CoreBudget, Weight};
use super::config::PoolConfig;
use super::job::Job;
use super::sleep::Sleep;
use crate::engine::sync::{Arc, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

/// Runs the loop of spare worker `index` of a pool on the calling thread.
pub(super) type RunSpare<J> = Box<dyn Fn(&Arc<Shared<J>>, usize) + Send + Sync>;

/// State shared by a pool's handle and its workers.
pub(crate) struct Shared<J> {
    pub(super) id: u64,
    pub(super) injector: Injector<J>,
    pub(super) sleep: Sleep,
    pub(super) terminate: AtomicBool,
    pub(super) config: PoolConfig,
    pub(super) alive: Mutex<usize>,
    pub(super) exited: Condvar,
    pub(super) panics: AtomicU64,
    /// Written by every submit: on a cache line of its own (workers read the fields around it).
    pub(super) submitted: crossbeam_utils::CachePadded<AtomicU64>,
    pub(super) pinned: Vec<AtomicUsize>,
    /// Workers that have applied their core pinning (start waits for all).
    pub(super) ready: AtomicUsize,
    pub(super) prio: Mutex<PrioQueues<J>>,
    pub(super) prio_len: AtomicUsize,
    /// Estimated submission time of the oldest job in the FIFO queues.
    pub(super) fifo_head_ns: AtomicU64,
    /// One budget per core in use; worker `i` belongs to core `i % cores.len()`.
    pub(super) cores: Vec<CoreBudget>,
    /// Active workers per core (the adaptive pattern); workers of a higher rank only run their inbox.
    pub(super) active_per_core: AtomicU32,
    /// Jobs whose weight did not fit the core of the worker that found them.
    pub(super) deferred: Mutex<std::collections::VecDeque<(J, Weight)>>,
    pub(super) deferred_len: AtomicUsize,
    /// Cores reserved for a heavy job now (`CoreBudget::reserved` set).
    pub(super) reserved: AtomicUsize,
    /// Per-worker queues of jobs that must run on that worker (only that worker takes them).
    pub(super) inboxes: Vec<Injector<J>>,
    pub(super) heavy_peak: AtomicUsize,
    pub(super) heavy_now: AtomicUsize,
    /// What each worker runs now (see `blocking.rs`).
    pub(super) runs: Vec<RunCell>,
    /// Runs whose units were lent so far (blocked jobs).
    pub(super) lends: AtomicU64,
    /// Running jobs wait for the GIL: workers start no more beside young ones (see `contention.rs`).
    pub(super) gil_bound: AtomicBool,
    /// The worker that goes on with the queue in the GIL-bound mode (`usize::MAX`: none).
    pub(super) gil_runner: AtomicUsize,
    /// A worker let run beside the runner to see whether the mode still holds (`usize::MAX`: none).
    pub(super) gil_probe: AtomicUsize,
    /// The blocking monitor parked (no worker ran a job); a worker that begins one wakes it.
    pub(super) monitor_parked: AtomicBool,
    pub(super) monitor_thread: Mutex<Option<std::thread::Thread>>,
    /// Runs the loop of spare worker `index` on the calling thread (the
    /// embedder's `Host::run_worker`, set by `Pool::start`; see `spawn_spare`).
    pub(super) run_spare: RunSpare<J>,
    /// Indices `workers..workers + spare_threads` free for a spare worker.
    pub(super) spare_free: Mutex<Vec<usize>>,
    pub(super) spares_peak: AtomicUsize,
    /// Spares started that have not looked for work yet.
    pub(super) spares_starting: AtomicUsize,
    /// Join handles of spare workers (finished ones are dropped as new ones start).
    pub(super) spare_handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A job queued with a priority (see `PrioQueues`).
pub(super) struct PrioEntry<J> {
    pub(super) key: i128,
    pub(super) seq: u64,
    pub(super) job: J,
}

impl<J> PrioEntry<J> {
    /// Whether `self` runs before `other`: larger key first, then the older (lower) sequence number.
    pub(super) fn before(&self, other: &Self) -> bool {
        (self.key, std::cmp::Reverse(self.seq)) > (other.key, std::cmp::Reverse(other.seq))
    }
}

/// The jobs queued with a priority: one FIFO per priority level.
///
/// Keys are computed under the queue's lock from a monotonic clock, so within
/// one level they never rise in submission order: each level's head is its
/// best job and the best job overall is the best head. Push and pop cost
/// O(levels) (a handful), where a binary heap over all jobs costs O(log n)
/// scattered cache misses per pop (measured: +30 % on the bulk path with
/// 100k queued priority tokens).
pub(super) struct PrioQueues<J> {
    pub(super) levels: std::collections::BTreeMap<i64, std::collections::VecDeque<PrioEntry<J>>>,
    pub(super) len: usize,
}

impl<J> PrioQueues<J> {
    pub(super) fn new() -> Self {
        PrioQueues { levels: std::collections::BTreeMap::new(), len: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push(&mut self, priority: i64, entry: PrioEntry<J>) {
        self.levels.entry(priority).or_default().push_back(entry);
        self.len += 1;
    }

    /// The level whose head runs first.
    pub(super) fn best_level(&self) -> Option<i64> {
        let mut best: Option<(i64, &PrioEntry<J>)> = None;
        for (&level, queue) in &self.levels {
            if let Some(head) = queue.front() {
                if best.is_none_or(|(_, b)| head.before(b)) {
                    best = Some((level, head));
                }
            }
        }
        best.map(|(level, _)| level)
    }

    #[cfg(test)]
    pub(super) fn peek(&self) -> Option<&PrioEntry<J>> {
        self.best_level().and_then(|level| self.levels.get(&level)?.front())
    }

    pub(super) fn pop(&mut self) -> Option<PrioEntry<J>> {
        self.pop_if(|_| true)
    }

    /// Pops the job that runs first if `take(it)` agrees (one search for both).
    pub(super) fn pop_if(&mut self, take: impl FnOnce(&PrioEntry<J>) -> bool) -> Option<PrioEntry<J>> {
        let level = self.best_level()?;
        let queue = self.levels.get_mut(&level)?;
        if !take(queue.front()?) {
            return None;
        }
        let entry = queue.pop_front();
        if queue.is_empty() {
            self.levels.remove(&level);
        }
        if entry.is_some() {
            self.len -= 1;
        }
        entry
    }
}

impl<J: Job> Shared<J> {
    pub(super) fn has_work(&self) -> bool {
        self.prio_len.load(Ordering::SeqCst) > 0 || self.fifo_nonempty()
    }

    /// Worker `index`, outside the active pattern (it takes no shared work),
    /// wakes one that can take the queued work, or a deferred job (the units
    /// its last job gave back may be what that job waits for).
    pub(super) fn hand_over_if_inactive(&self, index: usize) {
        if !self.is_active(index) && (self.has_work() || self.deferred_len.load(Ordering::SeqCst) > 0) {
            self.notify_work();
        }
    }

    /// The core of `worker` (its index in `cores`).
    pub(super) fn core_of(&self, worker: usize) -> usize {
        worker % self.cores.len()
    }

    /// True when worker `index` is inside the active pattern. Every worker
    /// of a core whose job is blocked (its units lent) makes room in the
    /// pattern for one more of that core. A spare worker takes shared work
    /// only while some job is blocked (what it was started for): otherwise
    /// the workers have the units to themselves, and idle spares woken with
    /// them would only hand the interpreter round more threads.
    pub(super) fn is_active(&self, index: usize) -> bool {
        if index >= self.config.workers {
            return self.any_lent();
        }
        let lent = self.cores[self.core_of(index)].lent();
        (index / self.cores.len()) < (self.active_per_core.load(Ordering::Relaxed).saturating_add(lent)) as usize
    }

    /// The job of worker `index` is blocked (run `seen`, still `RUNNING`):
    /// its units go back to its core, and a worker is woken for queued work.
    /// False when the run ended or changed meanwhile.
    ///
    /// Only units are lent: a heavy job stays counted as its core's heavy job
    /// (`heavy_running`), so no other heavy job starts there meanwhile, and a
    /// heavy job keeps its core's CPU to itself once it runs again.
    pub(crate) fn lend(shared: &Arc<Self>, index: usize, seen: Run) -> bool {
        let core = &shared.cores[shared.core_of(index)];
        // Counted before the word moves: a worker ending the run at once
        // settles the loan (`end_loan`) and must not find the count at 0.
        core.lend();
        if !shared.runs[index].try_lend(seen) {
            core.end_loan();
            return false;
        }
        core.release(seen.units);
        shared.lends.fetch_add(1, Ordering::Relaxed);
        shared.notify_work();
        true
    }

    /// After a lend: queued work that no worker searches for (nor a spare
    /// started for it and not yet searching) gets spare workers, if the pool
    /// may: one for each blocked job that lacks one (lent jobs, less the
    /// spares alive), and at least one. Each spare takes the place of a thread
    /// whose job blocked; spares beyond would only contend for the interpreter
    /// (when each monitor loan started up to 64 for whatever was queued, 200
    /// sleeps ahead of CPU work started all 256 allowed). At least one, since
    /// an idle spare alive may sit on a core with no room. A spare's own run
    /// that starts lent starts the next, so a burst of jobs known to block
    /// finds threads in chains, one per blocked worker.
    pub(super) fn ensure_taker(shared: &Arc<Self>) {
        if shared.config.spare_threads == 0 || shared.terminate.load(Ordering::SeqCst) {
            return;
        }
        let queued = shared.queued_jobs();
        let takers = shared.sleep.counts().0 as usize + shared.spares_starting.load(Ordering::Acquire);
        let wanted = queued.saturating_sub(takers);
        if wanted == 0 {
            return;
        }
        let blocked: usize = shared.cores.iter().map(|c| c.lent() as usize).sum();
        let n = blocked.saturating_sub(shared.spares()).max(1);
        for _ in 0..n.min(wanted) {
            if !Self::spawn_spare(shared) {
                break;
            }
        }
    }

    /// Whether any core has units lent: a job of its blocked (see `blocking.rs`).
    pub(super) fn any_lent(&self) -> bool {
        self.cores.iter().any(|c| c.lent() > 0)
    }

    /// Jobs waiting in the queues (global, priority and deferred).
    pub(super) fn queued_jobs(&self) -> usize {
        self.injector.len() + self.prio_len.load(Ordering::SeqCst) + self.deferred_len.load(Ordering::SeqCst)
    }

    /// Starts a spare worker on a free index (none free: false). It has no
    /// inbox and no pinning, and exits after `spare_idle` without work.
    pub(super) fn spawn_spare(this: &Arc<Self>) -> bool {
        let Some(index) = this.spare_free.lock().pop() else {
            return false;
        };
        *this.alive.lock() += 1;
        this.spares_starting.fetch_add(1, Ordering::AcqRel);
        this.spares_peak.fetch_max(this.spares(), Ordering::Relaxed);
        let shared = this.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}_{index}", this.config.thread_name))
            .stack_size(this.config.stack_size)
            .spawn(move || {
                shared.runs[index].tid.store(current_tid(), Ordering::Release);
                let exit_guard = ExitGuard(&shared);
                let spare_guard = SpareGuard(&shared, index);
                (shared.run_spare)(&shared, index);
                drop(spare_guard);
                drop(exit_guard);
            });
        match spawned {
            Ok(handle) => {
                let mut handles = this.spare_handles.lock();
                handles.retain(|h| !h.is_finished());
                handles.push(handle);
                true
            }
            Err(_) => {
                this.spares_starting.fetch_sub(1, Ordering::AcqRel);
                this.spare_free.lock().push(index);
                let mut alive = this.alive.lock();
                *alive -= 1;
                this.exited.notify_all();
                false
            }
        }
    }

    /// Spare workers running now.
    pub(super) fn spares(&self) -> usize {
        self.config.spare_threads - self.spare_free.lock().len()
    }

    /// The lent job of worker `index` (run `seen`) runs again: it takes its
    /// units back, past the budget if need be (nothing is pre-empted; the
    /// core starts nothing new until it has room). False when the run ended.
    pub(crate) fn retake(&self, index: usize, seen: Run) -> bool {
        let core = &self.cores[self.core_of(index)];
        core.force_acquire(seen.units);
        if self.runs[index].try_retake(seen) {
            core.end_loan();
            return true;
        }
        // The run ended while lent: the worker settled the loan, nothing is
        // owed. Meanwhile the core looked full: wake a worker for queued work.
        core.release(seen.units);
        if self.has_work() {
            self.notify_work();
        }
        false
    }

    /// With a reduced adaptive pattern, a backlog (queued plus deferred jobs
    /// beyond the active workers) restores every worker at once.
    #[inline]
    pub(crate) fn restore_pattern_if_backlogged(&self) {
        let active = self.active_per_core.load(Ordering::Relaxed);
        if active < self.config.units_per_core {
            let waiting = self.injector.len() + self.deferred_len.load(Ordering::Relaxed);
            if waiting > active as usize * self.cores.len() || self.deferred_len.load(Ordering::Relaxed) > 0 {
                let prev = self.active_per_core.swap(u32::MAX, Ordering::SeqCst);
                if prev != u32::MAX {
                    self.sleep.wake_all_idle();
                }
            }
        }
    }

    /// Whether worker `index` could take shared (not pinned) work now.
    pub(crate) fn can_take_shared(&self, index: usize) -> bool {
        if !self.is_active(index) || self.holds_back_for_gil(index) {
            return false;
        }
        let core = &self.cores[self.core_of(index)];
        let budget = core.budget(self.active_per_core.load(Ordering::Relaxed));
        let used = core.used();
        if core.reserved.load(Ordering::Relaxed) {
            return used == 0 && self.deferred_len.load(Ordering::SeqCst) > 0;
        }
        used < budget
    }

    /// `core` is no longer reserved for a heavy job (if it was).
    pub(super) fn end_reservation(&self, core: &CoreBudget) {
        if core.reserved.swap(false, Ordering::AcqRel) {
            self.reserved.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A heavy job started on `core` or turned out spent there: `core`'s
    /// reservation ends, and so does every other core's unless a heavy job is
    /// still deferred (a core is reserved for a heavy job that waits, not for
    /// one that found room, whichever core it found it on).
    pub(crate) fn heavy_job_settled(&self, core: &CoreBudget) {
        self.end_reservation(core);
        if self.reserved.load(Ordering::Acquire) == 0 {
            return;
        }
        let deferred = self.deferred.lock();
        if deferred.iter().any(|(_, w)| *w == Weight::Heavy) {
            return;
        }
        for core in &self.cores {
            self.end_reservation(core);
        }
        drop(deferred);
        if self.has_work() {
            self.notify_work();
        }
    }

    /// Parks a job taken from the queues whose units did not fit where it was
    /// found: the first worker whose core has room takes it, before anything
    /// still queued (it left the queues first). A heavy one has a core reserved
    /// for it (not one whose heavy job is blocked: that one could not take it).
    pub(super) fn defer(&self, job: J, weight: Weight) {
        {
            let mut deferred = self.deferred.lock();
            deferred.push_back((job, weight));
            self.deferred_len.store(deferred.len(), Ordering::SeqCst);
            let cores = self.cores.len();
            if weight == Weight::Heavy && self.reserved.load(Ordering::Acquire) < cores.div_ceil(2) {
                let target =
                    self.cores.iter().filter(|c| !c.reserved.load(Ordering::Acquire) && c.heavy_running() == 0).min_by_key(|c| c.used());
                if let Some(core) = target {
                    if !core.reserved.swap(true, Ordering::AcqRel) {
                        self.reserved.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
        self.notify_work();
        self.restore_pattern_if_backlogged();
    }

    /// Wakes the blocking monitor if it parked.
    pub(super) fn wake_monitor(&self) {
        if self.monitor_parked.load(Ordering::SeqCst) {
            if let Some(t) = self.monitor_thread.lock().as_ref() {
                t.unpark();
            }
        }
    }

    /// Wakes one parked worker that can take shared work, if none is searching.
    pub(crate) fn notify_work(&self) {
        if self.holds_back_for_gil(usize::MAX) {
            return; // every sleeper is held back (a sleeper runs no job): ask none of them
        }
        self.sleep.notify_work(|i| self.can_take_shared(i));
    }

    /// Work that worker `index` could take now (used before it parks).
    pub(super) fn has_work_for(&self, index: usize) -> bool {
        if self.inboxes.get(index).is_some_and(|inbox| !inbox.is_empty()) {
            return true;
        }
        if !self.is_active(index) || self.holds_back_for_gil(index) {
            return false;
        }
        let core = &self.cores[self.core_of(index)];
        let budget = core.budget(self.active_per_core.load(Ordering::Relaxed));
        let room = core.used() < budget;
        (room && !core.reserved.load(Ordering::Relaxed) && self.has_work())
            || (self.deferred_len.load(Ordering::SeqCst) > 0 && (room || core.used() == 0))
    }

    pub(super) fn now_ns(&self) -> i128 {
        i128::from(crate::engine::token::now_ns())
    }

    pub(super) fn fifo_nonempty(&self) -> bool {
        !self.injector.is_empty()
    }

    /// The oldest job of the FIFO queue (the injector), its submission time recorded.
    pub(super) fn take_fifo(&self) -> Option<J> {
        loop {
            match self.injector.steal() {
                Steal::Success(job) => {
                    self.note_fifo_pop(&job);
                    return Some(job);
                }
                Steal::Empty => return None,
                Steal::Retry => {}
            }
        }
    }

    /// Records the submission time of a job just taken from the FIFO queues
    /// (the next one was submitted no earlier).
    pub(super) fn note_fifo_pop(&self, job: &J)
    where
        J: Job,
    {
        if let Some(t) = job.submitted_ns() {
            self.fifo_head_ns.store(t, Ordering::Relaxed);
        }
    }

    /// Pops the heap's top; with `only_urgent`, only if it outranks the
    /// oldest job of the FIFO queues (a priority-0 job of that age).
    pub(super) fn take_prio(&self, only_urgent: bool) -> Option<J> {
        if self.prio_len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let fifo_key = -i128::from(self.fifo_head_ns.load(Ordering::Relaxed));
        let fifo_waiting = only_urgent && self.fifo_nonempty();
        let mut heap = self.prio.lock();
        let entry = heap.pop_if(|top| !(fifo_waiting && top.key <= fifo_key))?;
        self.prio_len.store(heap.len(), Ordering::SeqCst);
        Some(entry.job)
    }
}

/// Gives a spare worker's index back when its thread ends (even by a panic).
pub(super) struct SpareGuard<'a, J>(&'a Shared<J>, usize);

impl<J> Drop for SpareGuard<'_, J> {
    fn drop(&mut self) {
        self.0.runs[self.1].tid.store(0, Ordering::Release);
        self.0.spare_free.lock().push(self.1);
    }
}

/// Marks a worker as exited even if the embedder's `run_worker` panics.
pub(super) struct ExitGuard<'a, J>(pub(super) &'a Shared<J>);

impl<J> Drop for ExitGuard<'_, J> {
    fn drop(&mut self) {
        let mut alive = self.0.alive.lock();
        *alive -= 1;
        self.0.exited.notify_all();
    }
}
