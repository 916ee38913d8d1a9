//! The work-stealing pool. Pure Rust: nothing here imports pyo3, so
//! `cargo test --no-default-features` exercises it without an interpreter.
//!
//! # Architecture
//!
//! * One global [`crossbeam_deque::Injector`] receives jobs submitted from
//!   any thread.
//! * Each worker owns a FIFO [`crossbeam_deque::Worker`] deque; others steal
//!   from it through its `Stealer`. A worker looks for work in its own deque,
//!   then takes a batch (up to 32) from the injector, then steals a batch
//!   from the other workers.
//! * Jobs submitted with a priority go to shared priority queues instead
//!   (`PrioQueues`: one FIFO per level, "the heap" below). Their order
//!   is `priority * aging - enqueue time` (larger first), which ages every
//!   waiting job by one priority level per `aging` interval with a key that
//!   never changes; equal keys run in submission order. Workers take from the
//!   heap before the FIFO queues when its top outranks the oldest FIFO job
//!   (seen as a priority-0 job of that age, estimated from the submission
//!   time of the last FIFO job taken), and after them otherwise; so a
//!   priority-0 job waiting behind a stream of priority-1 jobs runs once it
//!   has waited one `aging` interval longer than the heap's top.
//! * Idle workers spin briefly, then park; see `sleep.rs` for the wake-up
//!   protocol (a burst of submissions wakes at most one sleeper).
//! * Worker `i` is pinned to core `i mod n` when `pin_cores` is set.
//!
//! # Who may touch what
//!
//! * `injector`, `stealers`: any thread (lock-free).
//! * Each `Worker` deque: only its own worker thread.
//! * `terminate`: written by `shutdown`, read by workers before they park.
//! * `alive`: decremented by each worker as it exits, under its mutex, and
//!   waited on by `join`.
//!
//! # Shutdown protocol
//!
//! 1. `shutdown()` sets `terminate` and wakes every sleeper.
//! 2. Each worker keeps running jobs while it finds any; when it finds none
//!    and `terminate` is set, it leaves its loop (the embedder's
//!    `run_worker` returns) and decrements `alive`.
//! 3. `join(timeout)` waits for `alive == 0`, then joins the threads. If the
//!    timeout passes first (a job that never returns), the threads are left
//!    to exit on their own.
//! 4. Jobs submitted after the last worker looked (a submit racing step 1)
//!    stay in the queues; `drain()` hands them back so the embedder can
//!    resolve them. Dropping the pool drops them.

mod blocking;
mod capacity;
mod config;
mod sleep;
mod topology;
mod worker;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Steal, Stealer, Worker};

pub use capacity::Weight;
pub use config::{PoolConfig, MAX_WORKERS, MIN_STACK_SIZE};
pub use topology::Topology;
pub use worker::{current_worker, held_units, WorkerHooks, WorkerInfo, WorkerLoop};

use crate::error::Error;
use crate::sync::{Arc, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};
use blocking::{Run, RunSlot};
use capacity::CoreSlot;
use sleep::Sleep;

/// What the pool needs to know about a job.
pub trait Job: Send + 'static {
    /// How much of a core it needs (see `capacity.rs`).
    fn weight(&self) -> Weight {
        Weight::Light
    }

    /// When it was submitted (`crate::token::now_ns` units), if known: lets
    /// the pool age the FIFO queue against the priority heap.
    fn submitted_ns(&self) -> Option<u64> {
        None
    }

    /// Called by a worker that found this job while idle, before it leaves
    /// its idle state (for the Python binding: before it re-attaches to the
    /// interpreter). The binding waits there a few microseconds for the
    /// submitting thread to release the interpreter, instead of blocking on
    /// it and paying a thread wake-up.
    fn before_idle_run(&self) {}

    /// True when the job's work was already done elsewhere (the Python
    /// binding: a waiter ran the token itself). An idle worker that finds
    /// such a job drops it and looks on, without leaving its idle state; a
    /// busy one drops a heavy one before it takes the core for it.
    fn is_spent(&self) -> bool {
        false
    }
}

/// What the embedder runs on each worker thread.
pub trait Host<J>: Send + Sync + 'static {
    /// Runs the worker's whole life; must call `worker.run(hooks)` once.
    fn run_worker(&self, worker: WorkerLoop<J>);
}

static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// State shared by a pool's handle and its workers.
pub(crate) struct Shared<J> {
    id: u64,
    injector: Injector<J>,
    stealers: Vec<Stealer<J>>,
    sleep: Sleep,
    terminate: AtomicBool,
    config: PoolConfig,
    alive: Mutex<usize>,
    exited: Condvar,
    panics: AtomicU64,
    /// Written by every submit: on a cache line of its own (workers read the fields around it).
    submitted: crossbeam_utils::CachePadded<AtomicU64>,
    pinned: Vec<AtomicUsize>,
    /// Workers that have applied their core pinning (start waits for all).
    ready: AtomicUsize,
    prio: Mutex<PrioQueues<J>>,
    prio_len: AtomicUsize,
    /// Estimated submission time of the oldest job in the FIFO queues.
    fifo_head_ns: AtomicU64,
    /// One core slot per core in use; worker `i` belongs to slot `i % cores.len()`.
    cores: Vec<CoreSlot>,
    /// Active workers per core (the adaptive pattern); workers of a higher rank only run their inbox.
    active_per_core: AtomicU32,
    /// Jobs whose weight did not fit the core of the worker that found them.
    deferred: Mutex<std::collections::VecDeque<(J, Weight)>>,
    deferred_len: AtomicUsize,
    draining: AtomicUsize,
    /// Per-worker queues of jobs that must run on that worker (not stealable).
    inboxes: Vec<Injector<J>>,
    heavy_peak: AtomicUsize,
    heavy_now: AtomicUsize,
    /// What each worker runs now (see `blocking.rs`).
    runs: Vec<RunSlot>,
    /// Runs whose units were lent so far (blocked jobs).
    lends: AtomicU64,
    /// The blocking monitor parked (no worker ran a job); a worker that begins one wakes it.
    monitor_parked: AtomicBool,
    monitor_thread: Mutex<Option<std::thread::Thread>>,
    /// Runs a spare worker's loop (the embedder's `Host::run_worker`; see `spawn_spare`).
    run_spare: Box<dyn Fn(WorkerLoop<J>) + Send + Sync>,
    /// Indices `workers..workers + spare_threads` free for a spare worker.
    spare_free: Mutex<Vec<usize>>,
    spares_peak: AtomicUsize,
    /// Join handles of spare workers (finished ones are dropped as new ones start).
    spare_handles: Mutex<Vec<JoinHandle<()>>>,
}

/// Core units held by a job that runs outside the pool (`Pool::try_acquire_outside`).
#[derive(Debug)]
#[must_use = "give the units back with Pool::release_outside"]
pub struct OutsideUnits {
    slot: usize,
    weight: Weight,
    units: u32,
}

/// A job with a priority (see the module docs for the key).
struct PrioEntry<J> {
    key: i128,
    seq: u64,
    job: J,
}

impl<J> PrioEntry<J> {
    /// Whether `self` runs before `other`: larger key first, then the older (lower) sequence number.
    fn before(&self, other: &Self) -> bool {
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
struct PrioQueues<J> {
    levels: std::collections::BTreeMap<i64, std::collections::VecDeque<PrioEntry<J>>>,
    len: usize,
}

impl<J> PrioQueues<J> {
    fn new() -> Self {
        PrioQueues { levels: std::collections::BTreeMap::new(), len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, priority: i64, entry: PrioEntry<J>) {
        self.levels.entry(priority).or_default().push_back(entry);
        self.len += 1;
    }

    /// The level whose head runs first.
    fn best_level(&self) -> Option<i64> {
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
    fn peek(&self) -> Option<&PrioEntry<J>> {
        self.best_level().and_then(|level| self.levels.get(&level)?.front())
    }

    fn pop(&mut self) -> Option<PrioEntry<J>> {
        self.pop_if(|_| true)
    }

    /// Pops the job that runs first if `take(it)` agrees (one search for both).
    fn pop_if(&mut self, take: impl FnOnce(&PrioEntry<J>) -> bool) -> Option<PrioEntry<J>> {
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
    fn has_work(&self) -> bool {
        self.prio_len.load(Ordering::SeqCst) > 0 || !self.injector.is_empty() || self.stealers.iter().any(|s| !s.is_empty())
    }

    fn slot_of(&self, worker: usize) -> usize {
        worker % self.cores.len()
    }

    /// True when worker `index` is inside the active pattern. Every worker
    /// of a core whose job is blocked (its units lent) makes room in the
    /// pattern for one more of that core.
    fn is_active(&self, index: usize) -> bool {
        let lent = self.cores[self.slot_of(index)].lent();
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
        let slot = &shared.cores[shared.slot_of(index)];
        // Counted before the word moves: a worker ending the run at once
        // settles the loan (`end_loan`) and must not find the count at 0.
        slot.lend();
        if !shared.runs[index].try_lend(seen) {
            slot.end_loan();
            return false;
        }
        slot.release(seen.units);
        shared.lends.fetch_add(1, Ordering::Relaxed);
        shared.notify_work();
        Self::ensure_taker(shared);
        true
    }

    /// Work is queued and no worker is searching for it (none was woken: all
    /// are running, blocked, or cannot take it): start a spare worker, if the
    /// pool may. Called by the monitor after a lend.
    fn ensure_taker(shared: &Arc<Self>) {
        if shared.config.spare_threads == 0 || shared.terminate.load(Ordering::SeqCst) {
            return;
        }
        let queued = shared.has_work() || shared.deferred_len.load(Ordering::SeqCst) > 0;
        if !queued || shared.sleep.counts().0 > 0 {
            return;
        }
        Self::spawn_spare(shared);
    }

    /// Starts a spare worker on a free index (none free: false). It has no
    /// deque (it takes one job at a time, so a spare that blocks holds no
    /// batch), no inbox and no pinning, and exits after `spare_idle` without work.
    fn spawn_spare(this: &Arc<Self>) -> bool {
        let Some(index) = this.spare_free.lock().pop() else {
            return false;
        };
        *this.alive.lock() += 1;
        this.spares_peak.fetch_max(this.spares(), Ordering::Relaxed);
        let shared = this.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{index}", this.config.thread_name))
            .stack_size(this.config.stack_size)
            .spawn(move || {
                shared.runs[index].tid.store(blocking::current_tid(), Ordering::Release);
                let info = WorkerInfo { index, core: None, pool_id: shared.id };
                let exit_guard = ExitGuard(&shared);
                let spare_guard = SpareGuard(&shared, index);
                (shared.run_spare)(WorkerLoop { info, local: None, shared: shared.clone() });
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
                this.spare_free.lock().push(index);
                let mut alive = this.alive.lock();
                *alive -= 1;
                this.exited.notify_all();
                false
            }
        }
    }

    /// Spare workers running now.
    fn spares(&self) -> usize {
        self.config.spare_threads - self.spare_free.lock().len()
    }

    /// The lent job of worker `index` (run `seen`) runs again: it takes its
    /// units back, past the budget if need be (nothing is pre-empted; the
    /// core starts nothing new until it has room). False when the run ended.
    pub(crate) fn retake(&self, index: usize, seen: Run) -> bool {
        let slot = &self.cores[self.slot_of(index)];
        slot.force_acquire(seen.units);
        if self.runs[index].try_retake(seen) {
            slot.end_loan();
            return true;
        }
        // The run ended while lent: the worker settled the loan, nothing is
        // owed. Meanwhile the core looked full: wake a worker for queued work.
        slot.release(seen.units);
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
        if !self.is_active(index) {
            return false;
        }
        let slot = &self.cores[self.slot_of(index)];
        let budget = slot.budget(self.active_per_core.load(Ordering::Relaxed));
        let used = slot.used();
        if slot.draining.load(Ordering::Relaxed) {
            return used == 0 && self.deferred_len.load(Ordering::SeqCst) > 0;
        }
        used < budget
    }

    /// `core` stops draining (if it was).
    fn end_draining(&self, core: &CoreSlot) {
        if core.draining.swap(false, Ordering::AcqRel) {
            self.draining.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A heavy job started on `core` or turned out spent there: `core`
    /// stops draining, and so does every other core unless a heavy job is
    /// still deferred (a core drains for a heavy job that waits, not for one
    /// that found room, whichever core it found it on).
    pub(crate) fn heavy_job_settled(&self, core: &CoreSlot) {
        self.end_draining(core);
        if self.draining.load(Ordering::Acquire) == 0 {
            return;
        }
        let deferred = self.deferred.lock();
        if deferred.iter().any(|(_, w)| *w == Weight::Heavy) {
            return;
        }
        for core in &self.cores {
            self.end_draining(core);
        }
        drop(deferred);
        if self.has_work() {
            self.notify_work();
        }
    }

    /// Wakes the blocking monitor if it parked.
    fn wake_monitor(&self) {
        if self.monitor_parked.load(Ordering::SeqCst) {
            if let Some(t) = self.monitor_thread.lock().as_ref() {
                t.unpark();
            }
        }
    }

    /// Wakes one parked worker that can take shared work, if none is searching.
    pub(crate) fn notify_work(&self) {
        self.sleep.notify_work(|i| self.can_take_shared(i));
    }

    /// Work that worker `index` could take now (used before it parks).
    fn has_work_for(&self, index: usize) -> bool {
        if self.inboxes.get(index).is_some_and(|inbox| !inbox.is_empty()) {
            return true;
        }
        if !self.is_active(index) {
            return false;
        }
        let slot = &self.cores[self.slot_of(index)];
        let budget = slot.budget(self.active_per_core.load(Ordering::Relaxed));
        let room = slot.used() < budget;
        (room && !slot.draining.load(Ordering::Relaxed) && self.has_work())
            || (self.deferred_len.load(Ordering::SeqCst) > 0 && (room || slot.used() == 0))
    }

    fn now_ns(&self) -> i128 {
        i128::from(crate::token::now_ns())
    }

    fn fifo_nonempty(&self) -> bool {
        !self.injector.is_empty() || self.stealers.iter().any(|s| !s.is_empty())
    }

    /// Records the submission time of a job just taken from the FIFO queues
    /// (the next one was submitted no earlier).
    fn note_fifo_pop(&self, job: &J)
    where
        J: Job,
    {
        if let Some(t) = job.submitted_ns() {
            self.fifo_head_ns.store(t, Ordering::Relaxed);
        }
    }

    /// Pops the heap's top; with `only_urgent`, only if it outranks the
    /// oldest job of the FIFO queues (a priority-0 job of that age).
    fn take_prio(&self, only_urgent: bool) -> Option<J> {
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

/// Counters describing a pool at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Number of worker threads the pool started.
    pub workers: usize,
    /// Workers whose loop has not exited yet.
    pub alive: usize,
    /// Workers spinning in search of work.
    pub spinning: u64,
    /// Workers parked.
    pub sleeping: u64,
    /// Jobs submitted so far.
    pub submitted: u64,
    /// Jobs waiting in the injector (approximate).
    pub queued_global: usize,
    /// Jobs waiting in each worker's deque (approximate).
    pub queued_local: Vec<usize>,
    /// Times a parked worker was signalled.
    pub wakes: u64,
    /// Panics that escaped `WorkerHooks::execute` (each was caught).
    pub panics: u64,
    /// Units in use on each core slot.
    pub core_units: Vec<u32>,
    /// Heavy jobs running on each core slot.
    pub core_heavy: Vec<u32>,
    /// Core slots draining for a heavy job.
    pub draining: usize,
    /// Jobs waiting for room on a core.
    pub deferred: usize,
    /// Jobs pinned to each worker, not yet started.
    pub inbox: Vec<usize>,
    /// Most heavy jobs running at once so far.
    pub heavy_peak: usize,
    /// Jobs blocked now, with their units lent (see `blocking.rs`).
    pub lent: usize,
    /// Times a blocked job's units were lent so far.
    pub lends: u64,
    /// Spare workers running now (started while jobs were blocked).
    pub spares: usize,
    /// Most spare workers at once so far.
    pub spares_peak: usize,
}

/// A running pool of worker threads executing jobs of type `J`.
pub struct Pool<J: Job> {
    shared: Arc<Shared<J>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// The process that started the workers (see `Drop`).
    pid: u32,
}

/// Core slots for `workers` workers on `cores` cores (worker `i` -> slot `i % n`), `units` each.
fn core_slots(workers: usize, cores: usize, units: u32) -> Vec<CoreSlot> {
    let n = cores.clamp(1, workers.max(1));
    (0..n).map(|_| CoreSlot::new(units)).collect()
}

impl<J: Job> std::fmt::Debug for Pool<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("id", &self.shared.id).field("stats", &self.stats()).finish()
    }
}

const NOT_PINNED: usize = usize::MAX;

impl<J: Job> Pool<J> {
    /// Starts `config.workers` threads, each running `host.run_worker`.
    pub fn start<H: Host<J>>(config: &PoolConfig, host: Arc<H>) -> Result<Pool<J>, Error> {
        let config = config.validate()?;
        let threads = config.workers + config.spare_threads;
        let locals: Vec<Worker<J>> = (0..config.workers).map(|_| Worker::new_fifo()).collect();
        let shared = Arc::new(Shared {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            injector: Injector::new(),
            stealers: locals.iter().map(Worker::stealer).collect(),
            sleep: Sleep::new(threads, config.max_spinners),
            terminate: AtomicBool::new(false),
            alive: Mutex::new(config.workers),
            exited: Condvar::new(),
            panics: AtomicU64::new(0),
            submitted: crossbeam_utils::CachePadded::new(AtomicU64::new(0)),
            pinned: (0..config.workers).map(|_| AtomicUsize::new(NOT_PINNED)).collect(),
            ready: AtomicUsize::new(0),
            prio: Mutex::new(PrioQueues::new()),
            prio_len: AtomicUsize::new(0),
            fifo_head_ns: AtomicU64::new(0),
            cores: core_slots(config.workers, config.cores, config.units_per_core),
            active_per_core: AtomicU32::new(u32::MAX),
            deferred: Mutex::new(std::collections::VecDeque::new()),
            deferred_len: AtomicUsize::new(0),
            draining: AtomicUsize::new(0),
            inboxes: (0..config.workers).map(|_| Injector::new()).collect(),
            heavy_peak: AtomicUsize::new(0),
            heavy_now: AtomicUsize::new(0),
            runs: (0..threads).map(|_| RunSlot::new()).collect(),
            lends: AtomicU64::new(0),
            monitor_parked: AtomicBool::new(false),
            monitor_thread: Mutex::new(None),
            run_spare: {
                let host = host.clone();
                Box::new(move |worker| host.run_worker(worker))
            },
            spare_free: Mutex::new((config.workers..threads).rev().collect()),
            spares_peak: AtomicUsize::new(0),
            spare_handles: Mutex::new(Vec::new()),
            config,
        });
        let topology = if shared.config.pin_cores { Some(Topology::detect()) } else { None };
        let n_slots = shared.cores.len();
        let pool = Pool { shared: shared.clone(), handles: Mutex::new(Vec::with_capacity(locals.len())), pid: std::process::id() };
        for (index, local) in locals.into_iter().enumerate() {
            let shared = shared.clone();
            let host = host.clone();
            let core = topology.as_ref().map(|t| t.core_ids[(index % n_slots) % t.core_ids.len()]);
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{index}", shared.config.thread_name))
                .stack_size(shared.config.stack_size)
                .spawn(move || {
                    let pinned = core.filter(|&id| core_affinity::set_for_current(core_affinity::CoreId { id }));
                    shared.pinned[index].store(pinned.unwrap_or(NOT_PINNED), Ordering::Release);
                    shared.runs[index].tid.store(blocking::current_tid(), Ordering::Release);
                    shared.ready.fetch_add(1, Ordering::AcqRel);
                    let info = WorkerInfo { index, core: pinned, pool_id: shared.id };
                    let exit_guard = ExitGuard(&shared);
                    host.run_worker(WorkerLoop { info, local: Some(local), shared: shared.clone() });
                    drop(exit_guard);
                });
            match spawned {
                Ok(handle) => pool.handles.lock().push(handle),
                Err(e) => {
                    // Workers never started count as exited.
                    let missing = pool.shared.config.workers - index;
                    *pool.shared.alive.lock() -= missing;
                    pool.shutdown();
                    pool.join(None);
                    return Err(Error::Spawn(e.to_string()));
                }
            }
        }
        // Report a settled topology: wait (briefly) until every worker is pinned.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.shared.ready.load(Ordering::Acquire) < pool.shared.config.workers && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        #[cfg(all(target_os = "linux", not(loom)))]
        if pool.shared.config.blocking_monitor {
            // After the workers are ready: it reads their thread ids. Without
            // it the pool still works, with units bound to running jobs. It
            // exits after the last worker; `join` joins it with them.
            if let Ok(handle) = blocking::start_monitor(pool.shared.clone()) {
                pool.handles.lock().push(handle);
            }
        }
        Ok(pool)
    }

    /// The pool's unique id (see [`current_worker`]).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.shared.config.workers
    }

    /// The core each worker is pinned to (`None`: unpinned or not started yet).
    pub fn pinned_cores(&self) -> Vec<Option<usize>> {
        self.shared.pinned.iter().map(|p| Some(p.load(Ordering::Relaxed)).filter(|&c| c != NOT_PINNED)).collect()
    }

    /// Queues a job. Fails (handing the job back) once shutdown has begun.
    #[inline]
    pub fn submit(&self, job: J) -> Result<(), (Error, J)> {
        if self.shared.terminate.load(Ordering::Relaxed) {
            return Err((Error::ShutDown, job));
        }
        if self.shared.injector.is_empty() {
            // Aging compares the heap against the FIFO head: stamp a fresh head.
            let t = job.submitted_ns().unwrap_or_else(crate::token::now_ns);
            self.shared.fifo_head_ns.store(t, Ordering::Relaxed);
        }
        self.shared.injector.push(job);
        self.shared.submitted.fetch_add(1, Ordering::Relaxed);
        self.shared.notify_work();
        self.restore_pattern_if_backlogged();
        Ok(())
    }

    /// With a reduced pattern, a queue longer than the active workers restores every worker.
    #[inline]
    fn restore_pattern_if_backlogged(&self) {
        self.shared.restore_pattern_if_backlogged();
    }

    /// Queues a job with a priority (higher first; 0 is the priority of
    /// plain `submit`). See the module docs for ordering and aging.
    pub fn submit_prioritized(&self, job: J, priority: i64) -> Result<(), (Error, J)> {
        if self.shared.terminate.load(Ordering::Relaxed) {
            return Err((Error::ShutDown, job));
        }
        let aging = self.shared.config.aging.as_nanos() as i128;
        {
            let mut heap = self.shared.prio.lock();
            let seq = self.shared.submitted.fetch_add(1, Ordering::Relaxed);
            heap.push(priority, PrioEntry { key: i128::from(priority) * aging - self.shared.now_ns(), seq, job });
            self.shared.prio_len.store(heap.len(), Ordering::SeqCst);
        }
        self.shared.notify_work();
        Ok(())
    }

    /// Queues a job that must run on worker `index` (sticky anchors, lead
    /// domains). It is never stolen; it takes its units past the budget.
    pub fn submit_to(&self, index: usize, job: J) -> Result<(), (Error, J)> {
        if self.shared.terminate.load(Ordering::Relaxed) {
            return Err((Error::ShutDown, job));
        }
        if index >= self.shared.inboxes.len() {
            return Err((Error::InvalidConfig(format!("no worker {index}")), job));
        }
        self.shared.inboxes[index].push(job);
        self.shared.submitted.fetch_add(1, Ordering::Relaxed);
        self.shared.sleep.wake_worker(index);
        Ok(())
    }

    /// Number of core slots (distinct cores the workers are spread over).
    pub fn core_slots(&self) -> usize {
        self.shared.cores.len()
    }

    /// The worker indices of core slot `slot`.
    pub fn workers_of_slot(&self, slot: usize) -> Vec<usize> {
        let n = self.shared.cores.len();
        (0..self.shared.config.workers).filter(|i| i % n == slot).collect()
    }

    /// The core slot of worker `index`.
    pub fn slot_of(&self, index: usize) -> usize {
        self.shared.slot_of(index)
    }

    /// Sets how many workers per core take shared work (the adaptive
    /// pattern); the others only run jobs pinned to them.
    pub fn set_active_per_core(&self, active: u32) {
        let prev = self.shared.active_per_core.swap(active.max(1), Ordering::SeqCst);
        if active > prev {
            self.shared.sleep.wake_all_idle();
        }
    }

    /// Active workers per core (`u32::MAX`: all).
    pub fn active_per_core(&self) -> u32 {
        self.shared.active_per_core.load(Ordering::Relaxed)
    }

    /// Queues many jobs with one wake-up check.
    pub fn submit_batch(&self, jobs: impl IntoIterator<Item = J>) -> Result<(), Error> {
        if self.shared.terminate.load(Ordering::Relaxed) {
            return Err(Error::ShutDown);
        }
        let mut n = 0;
        for job in jobs {
            self.shared.injector.push(job);
            n += 1;
        }
        self.shared.submitted.fetch_add(n, Ordering::Relaxed);
        self.shared.notify_work();
        Ok(())
    }

    /// Takes one queued job (priority heap, injector, any worker's deque),
    /// for a thread that runs it itself (a worker helping while it waits).
    pub fn try_take(&self) -> Option<J> {
        if let Some(inbox) = current_worker().filter(|(id, _)| *id == self.shared.id).and_then(|(_, i)| self.shared.inboxes.get(i)) {
            loop {
                match inbox.steal() {
                    Steal::Success(job) => return Some(job),
                    Steal::Empty => break,
                    Steal::Retry => {}
                }
            }
        }
        if self.shared.deferred_len.load(Ordering::SeqCst) > 0 {
            let mut deferred = self.shared.deferred.lock();
            if let Some((job, _)) = deferred.pop_front() {
                self.shared.deferred_len.store(deferred.len(), Ordering::SeqCst);
                return Some(job);
            }
        }
        if let Some(job) = self.shared.take_prio(false) {
            return Some(job);
        }
        loop {
            match self.shared.injector.steal() {
                Steal::Success(job) => return Some(job),
                Steal::Empty => break,
                Steal::Retry => {}
            }
        }
        for stealer in &self.shared.stealers {
            loop {
                match stealer.steal() {
                    Steal::Success(job) => return Some(job),
                    Steal::Empty => break,
                    Steal::Retry => {}
                }
            }
        }
        None
    }

    /// Units a job of `weight` takes on worker `index`'s core.
    pub fn units_of(&self, index: usize, weight: Weight) -> u32 {
        let slot = &self.shared.cores[self.shared.slot_of(index)];
        weight.units(slot.budget(self.shared.active_per_core.load(Ordering::Relaxed)))
    }

    /// A heavy job run inline by worker `index`, whose waiting jobs hold
    /// `held` units: it may run when nothing else is on the core, or, when
    /// `stalled`, when no other heavy job runs there (the waiting jobs are
    /// blocked, so it still has the core's work to itself). Returns the units.
    pub fn inline_heavy(&self, index: usize, held: u32, stalled: bool) -> Option<u32> {
        let slot = &self.shared.cores[self.shared.slot_of(index)];
        if !stalled && slot.used() > held {
            return None;
        }
        if !slot.try_heavy_alone() {
            return None;
        }
        let units = Weight::Heavy.units(slot.budget(self.shared.active_per_core.load(Ordering::Relaxed)));
        slot.force_acquire(units);
        let now = self.shared.heavy_now.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared.heavy_peak.fetch_max(now, Ordering::Relaxed);
        Some(units)
    }

    /// Gives back what `inline_heavy` took.
    pub fn inline_release(&self, index: usize, weight: Weight, units: u32) {
        let slot = &self.shared.cores[self.shared.slot_of(index)];
        if weight == Weight::Heavy {
            slot.heavy_finished();
            self.shared.heavy_now.fetch_sub(1, Ordering::AcqRel);
        }
        slot.release(units);
    }

    /// Core units for a job of `weight` that a thread outside the pool runs
    /// (a caller that waits on a token no worker has started runs it
    /// itself): the first core slot, not draining, where the units fit, as a
    /// worker would take them. None while jobs wait deferred for room (they
    /// go first), once shutdown has begun, or when no core has room.
    pub fn try_acquire_outside(&self, weight: Weight) -> Option<OutsideUnits> {
        if self.shared.terminate.load(Ordering::Relaxed) || self.shared.deferred_len.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.acquire_on_any_core(weight)
    }

    /// The units of `weight` on the first core slot, not draining, where they fit.
    fn acquire_on_any_core(&self, weight: Weight) -> Option<OutsideUnits> {
        let active = self.shared.active_per_core.load(Ordering::Relaxed);
        for (slot_index, slot) in self.shared.cores.iter().enumerate() {
            if slot.draining.load(Ordering::Acquire) {
                continue;
            }
            let budget = slot.budget(active);
            let units = weight.units(budget);
            if slot.try_acquire(units, budget) {
                let taken = OutsideUnits { slot: slot_index, weight, units };
                self.heavy_count(&taken, true);
                return Some(taken);
            }
        }
        None
    }

    /// Gives back units `try_acquire_outside` took (also while their holder
    /// blocks, see `try_retake_outside`), and wakes a worker if work waits (a
    /// job may have found no room while the units were out).
    pub fn release_outside(&self, taken: &OutsideUnits) {
        self.heavy_count(taken, false);
        self.shared.cores[taken.slot].release(taken.units);
        if self.shared.deferred_len.load(Ordering::SeqCst) > 0 || self.shared.has_work() {
            self.shared.notify_work();
        }
    }

    /// Takes units given back with `release_outside` again: on any core
    /// slot where they fit now (deferred jobs do not go first: their holder
    /// was running before them), else past the budget on a core where no
    /// heavy job runs (as a pinned job would), so that a heavy job keeps its
    /// core to itself. False when every core runs a heavy job.
    pub fn try_retake_outside(&self, taken: &mut OutsideUnits) -> bool {
        if let Some(units) = self.acquire_on_any_core(taken.weight) {
            *taken = units;
            return true;
        }
        let free_of_heavy = self.shared.cores.iter().position(|c| c.heavy_running() == 0 && !c.draining.load(Ordering::Acquire));
        match free_of_heavy {
            Some(slot) => {
                taken.slot = slot;
                self.force_retake_outside(taken);
                true
            }
            None => false,
        }
    }

    /// Takes released units back on their core past the budget (their
    /// holder must go on; `try_retake_outside` found no room for too long).
    pub fn force_retake_outside(&self, taken: &OutsideUnits) {
        self.shared.cores[taken.slot].force_acquire(taken.units);
        self.heavy_count(taken, true);
    }

    fn heavy_count(&self, taken: &OutsideUnits, start: bool) {
        if taken.weight != Weight::Heavy {
            return;
        }
        let slot = &self.shared.cores[taken.slot];
        if start {
            slot.heavy_started();
            let now = self.shared.heavy_now.fetch_add(1, Ordering::AcqRel) + 1;
            self.shared.heavy_peak.fetch_max(now, Ordering::Relaxed);
        } else {
            slot.heavy_finished();
            self.shared.heavy_now.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes every queued job (not yet started) and returns them.
    pub fn drain(&self) -> Vec<J> {
        let mut out: Vec<J> = {
            let mut heap = self.shared.prio.lock();
            let jobs = std::iter::from_fn(|| heap.pop()).map(|e| e.job).collect();
            self.shared.prio_len.store(0, Ordering::SeqCst);
            jobs
        };
        loop {
            match self.shared.injector.steal() {
                Steal::Success(job) => out.push(job),
                Steal::Empty => break,
                Steal::Retry => {}
            }
        }
        for queue in self.shared.stealers.iter().map(|s| StealFrom::Stealer(s)).chain(self.shared.inboxes.iter().map(StealFrom::Injector)) {
            loop {
                match queue.steal() {
                    Steal::Success(job) => out.push(job),
                    Steal::Empty => break,
                    Steal::Retry => {}
                }
            }
        }
        {
            let mut deferred = self.shared.deferred.lock();
            out.extend(deferred.drain(..).map(|(job, _)| job));
            self.shared.deferred_len.store(0, Ordering::SeqCst);
        }
        out
    }

    /// True once `shutdown` was called.
    pub fn is_shutdown(&self) -> bool {
        self.shared.terminate.load(Ordering::SeqCst)
    }

    /// Tells the workers to exit once they find no more work. Idempotent.
    pub fn shutdown(&self) {
        self.shared.terminate.store(true, Ordering::SeqCst);
        self.shared.sleep.wake_all();
        self.shared.wake_monitor();
    }

    /// Waits for every worker to exit (up to `timeout`) and joins them.
    /// Returns true when all exited. Call `shutdown` first.
    pub fn join(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        {
            let mut alive = self.shared.alive.lock();
            while *alive > 0 {
                match deadline {
                    Some(d) => {
                        if self.shared.exited.wait_until(&mut alive, d).timed_out() && *alive > 0 {
                            return false;
                        }
                    }
                    None => self.shared.exited.wait(&mut alive),
                }
            }
        }
        let current = std::thread::current().id();
        let spares: Vec<JoinHandle<()>> = std::mem::take(&mut *self.shared.spare_handles.lock());
        for handle in self.handles.lock().drain(..).chain(spares) {
            if handle.thread().id() != current {
                let _ = handle.join();
            }
        }
        true
    }

    /// Hands over the worker threads' join handles (for a caller that will
    /// join them later, e.g. at interpreter exit).
    pub fn take_handles(&self) -> Vec<JoinHandle<()>> {
        let mut handles = std::mem::take(&mut *self.handles.lock());
        handles.append(&mut self.shared.spare_handles.lock());
        handles
    }

    /// Lends the units of the job worker `index` runs now (called on that
    /// worker, before a body known to block; a body run nested inside the
    /// job lends the job's units): as the monitor's lend, and the monitor
    /// takes them back if the job computes. False when nothing was lent.
    pub fn lend_current(&self, index: usize) -> bool {
        let seen = self.shared.runs[index].load();
        seen.state == blocking::RUNNING && Shared::lend(&self.shared, index, seen)
    }

    /// True while the job worker `index` runs has its units lent.
    pub fn is_lent(&self, index: usize) -> bool {
        self.shared.runs[index].load().state == blocking::LENT
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> PoolStats {
        let (spinning, sleeping) = self.shared.sleep.counts();
        PoolStats {
            workers: self.shared.config.workers,
            alive: *self.shared.alive.lock(),
            spinning,
            sleeping,
            submitted: self.shared.submitted.load(Ordering::Relaxed),
            queued_global: self.shared.injector.len() + self.shared.prio_len.load(Ordering::Relaxed),
            queued_local: self.shared.stealers.iter().map(Stealer::len).collect(),
            wakes: self.shared.sleep.wakes(),
            panics: self.shared.panics.load(Ordering::Relaxed),
            core_units: self.shared.cores.iter().map(CoreSlot::used).collect(),
            core_heavy: self.shared.cores.iter().map(CoreSlot::heavy_running).collect(),
            draining: self.shared.draining.load(Ordering::Relaxed),
            deferred: self.shared.deferred_len.load(Ordering::Relaxed),
            inbox: self.shared.inboxes.iter().map(Injector::len).collect(),
            heavy_peak: self.shared.heavy_peak.load(Ordering::Relaxed),
            lent: self.shared.cores.iter().map(|c| c.lent() as usize).sum(),
            lends: self.shared.lends.load(Ordering::Relaxed),
            spares: self.shared.spares(),
            spares_peak: self.shared.spares_peak.load(Ordering::Relaxed),
        }
    }
}

impl<J: Job> Drop for Pool<J> {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A process forked from the one that started the pool: the workers
            // exist only there, and one may have held a lock of the pool at
            // the fork. There is nobody to tell, and telling could block.
            return;
        }
        // Threads hold their own `Arc<Shared>`; telling them to stop is enough.
        self.shutdown();
    }
}

/// Either kind of queue a drain empties.
enum StealFrom<'a, J> {
    Stealer(&'a Stealer<J>),
    Injector(&'a Injector<J>),
}

impl<J> StealFrom<'_, J> {
    fn steal(&self) -> Steal<J> {
        match self {
            StealFrom::Stealer(s) => s.steal(),
            StealFrom::Injector(i) => i.steal(),
        }
    }
}

/// Gives a spare worker's index back when its thread ends (even by a panic).
struct SpareGuard<'a, J>(&'a Shared<J>, usize);

impl<J> Drop for SpareGuard<'_, J> {
    fn drop(&mut self) {
        self.0.runs[self.1].tid.store(0, Ordering::Release);
        self.0.spare_free.lock().push(self.1);
    }
}

/// Marks a worker as exited even if the embedder's `run_worker` panics.
struct ExitGuard<'a, J>(&'a Shared<J>);

impl<J> Drop for ExitGuard<'_, J> {
    fn drop(&mut self) {
        let mut alive = self.0.alive.lock();
        *alive -= 1;
        self.0.exited.notify_all();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
