//! The worker pool. Pure Rust: nothing here imports pyo3, so
//! `cargo test --no-default-features` exercises it without an interpreter.
//!
//! # Architecture
//!
//! * One global [`crossbeam_deque::Injector`] receives jobs submitted from
//!   any thread. Workers take from it one job at a time, so jobs start in
//!   the order they were submitted, as in `ThreadPoolExecutor`: code that
//!   submits a call before the one that releases it (a waiter, then its
//!   setter) relies on that. (Workers used to take batches into deques of
//!   their own, which others stole from: a worker then started later jobs
//!   while earlier ones sat in the batch of a worker blocked in a call, and
//!   with every worker so blocked that was a deadlock `ThreadPoolExecutor`
//!   never has. A take costs the same either way: measured on the bulk path.)
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
//! * Worker `i` belongs to core `i mod n` (`Pool::core_of`), and is pinned
//!   to that CPU core when `pin_cores` is set. Each core has a `CoreBudget`
//!   of units its jobs share, and may be reserved for a heavy job (see
//!   `capacity.rs`); what a worker runs now is in its `RunCell` (see
//!   `blocking.rs`).
//! * While short jobs wait for the GIL, workers start no new ones beside
//!   them (see `contention.rs`).
//!
//! # Who may touch what
//!
//! * `injector`, `inboxes`: any thread (lock-free).
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
//!    stay in the queues; `take_unstarted()` hands them back so the
//!    embedder can resolve them. Dropping the pool drops them.

mod blocking;
mod capacity;
mod config;
mod contention;
mod job;
#[cfg(all(target_os = "linux", not(loom)))]
mod monitor;
mod shared;
mod sleep;
mod topology;
mod worker;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Steal};

pub use capacity::Weight;
pub use config::{LendHook, PoolConfig, MAX_WORKERS, MIN_STACK_SIZE};
pub use job::{Job, NO_CLASS};
pub use topology::Topology;
pub use worker::{current_worker, held_units, Host, WorkerHooks, WorkerInfo, WorkerLoop};

use crate::engine::error::Error;
use crate::engine::sync::{Arc, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};
use blocking::RunCell;
use capacity::CoreBudget;
use shared::{ExitGuard, PrioEntry, PrioQueues, Shared};
use sleep::Sleep;

static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Core units held by a job that runs outside the pool (`Pool::try_acquire_outside`).
#[derive(Debug)]
#[must_use = "give the units back with Pool::release_outside"]
pub struct OutsideUnits {
    /// The core whose units these are (an index in the pool's cores).
    core: usize,
    weight: Weight,
    units: u32,
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
    /// Jobs waiting in the shared queues, the injector and the priority heap (approximate).
    pub queued_global: usize,
    /// Times a parked worker was signalled.
    pub wakes: u64,
    /// Panics that escaped `WorkerHooks::execute` (each was caught).
    pub panics: u64,
    /// Units in use on each core.
    pub core_units: Vec<u32>,
    /// Heavy jobs running on each core.
    pub core_heavy: Vec<u32>,
    /// Cores reserved for a heavy job (they start no new light or medium job).
    pub reserved: usize,
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

/// Core budgets for `workers` workers on `cores` cores (worker `i` -> core `i % n`), `units` each.
fn core_budgets(workers: usize, cores: usize, units: u32) -> Vec<CoreBudget> {
    let n = cores.clamp(1, workers.max(1));
    (0..n).map(|_| CoreBudget::new(units)).collect()
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
        let shared = Arc::new(Shared {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            injector: Injector::new(),
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
            cores: core_budgets(config.workers, config.cores, config.units_per_core),
            active_per_core: AtomicU32::new(u32::MAX),
            deferred: Mutex::new(std::collections::VecDeque::new()),
            deferred_len: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            inboxes: (0..config.workers).map(|_| Injector::new()).collect(),
            heavy_peak: AtomicUsize::new(0),
            heavy_now: AtomicUsize::new(0),
            runs: (0..threads).map(|_| RunCell::new()).collect(),
            lends: AtomicU64::new(0),
            gil_bound: AtomicBool::new(false),
            gil_runner: AtomicUsize::new(usize::MAX),
            gil_probe: AtomicUsize::new(usize::MAX),
            monitor_parked: AtomicBool::new(false),
            monitor_thread: Mutex::new(None),
            run_spare: {
                let host = host.clone();
                Box::new(move |shared: &Arc<Shared<J>>, index| {
                    let info = WorkerInfo { index, core: None, pool_id: shared.id };
                    host.run_worker(WorkerLoop { info, spare: true, shared: shared.clone() });
                })
            },
            spare_free: Mutex::new((config.workers..threads).rev().collect()),
            spares_peak: AtomicUsize::new(0),
            spares_starting: AtomicUsize::new(0),
            spare_handles: Mutex::new(Vec::new()),
            config,
        });
        let topology = if shared.config.pin_cores { Some(Topology::detect()) } else { None };
        let n_cores = shared.cores.len();
        let pool = Pool { shared: shared.clone(), handles: Mutex::new(Vec::with_capacity(shared.config.workers)), pid: std::process::id() };
        for index in 0..shared.config.workers {
            let shared = shared.clone();
            let host = host.clone();
            let core = topology.as_ref().map(|t| t.core_ids[(index % n_cores) % t.core_ids.len()]);
            let spawned = std::thread::Builder::new()
                .name(format!("{}_{index}", shared.config.thread_name))
                .stack_size(shared.config.stack_size)
                .spawn(move || {
                    let pinned = core.filter(|&id| core_affinity::set_for_current(core_affinity::CoreId { id }));
                    shared.pinned[index].store(pinned.unwrap_or(NOT_PINNED), Ordering::Release);
                    shared.runs[index].tid.store(blocking::current_tid(), Ordering::Release);
                    shared.ready.fetch_add(1, Ordering::AcqRel);
                    let info = WorkerInfo { index, core: pinned, pool_id: shared.id };
                    let exit_guard = ExitGuard(&shared);
                    host.run_worker(WorkerLoop { info, spare: false, shared: shared.clone() });
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
            if let Ok(handle) = monitor::start_monitor(pool.shared.clone()) {
                pool.handles.lock().push(handle);
            }
        }
        Ok(pool)
    }

    /// The pool's unique id (see [`current_worker`]).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// How long a queued job waits to gain one priority level.
    pub fn aging(&self) -> Duration {
        self.shared.config.aging
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
            let t = job.submitted_ns().unwrap_or_else(crate::engine::token::now_ns);
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
    /// domains). Only that worker takes it; it takes its units past the budget.
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

    /// Number of cores the workers are spread over.
    pub fn cores(&self) -> usize {
        self.shared.cores.len()
    }

    /// The worker indices of core `core` (an index below `cores()`).
    pub fn workers_of_core(&self, core: usize) -> Vec<usize> {
        let n = self.shared.cores.len();
        (0..self.shared.config.workers).filter(|i| i % n == core).collect()
    }

    /// The core of worker `index` (an index below `cores()`).
    pub fn core_of(&self, index: usize) -> usize {
        self.shared.core_of(index)
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

    /// Takes one queued job for a thread that runs it itself (a worker helping
    /// while it waits), in the order a worker would (`find_work`): its inbox,
    /// the deferred jobs, the urgent part of the priority heap, the injector,
    /// the rest of the heap. Unlike a worker it takes them whatever the pattern,
    /// the GIL-bound mode or a reservation (the caller checks the units). One
    /// that cannot run there goes back with `defer`, not to the end of the queue.
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
        if let Some(job) = self.shared.take_prio(true) {
            return Some(job);
        }
        if let Some(job) = self.shared.take_fifo() {
            return Some(job);
        }
        self.shared.take_prio(false)
    }

    /// Hands back a job taken with `try_take` that could not run where it was
    /// taken: it waits with the deferred jobs, ahead of everything still queued.
    /// Not for a job pinned to a worker (`submit_to` that one again).
    pub fn defer(&self, job: J) {
        let weight = job.weight();
        self.shared.defer(job, weight);
    }

    /// Units a job of `weight` takes on worker `index`'s core.
    pub fn units_of(&self, index: usize, weight: Weight) -> u32 {
        let core = &self.shared.cores[self.shared.core_of(index)];
        weight.units(core.budget(self.shared.active_per_core.load(Ordering::Relaxed)))
    }

    /// A heavy job run inline by worker `index`, whose waiting jobs hold
    /// `held` units: it may run when nothing else is on the core, or, when
    /// `stalled`, when no other heavy job runs there (the waiting jobs are
    /// blocked, so it still has the core's work to itself). Returns the units.
    pub fn inline_heavy(&self, index: usize, held: u32, stalled: bool) -> Option<u32> {
        let core = &self.shared.cores[self.shared.core_of(index)];
        if !stalled && core.used() > held {
            return None;
        }
        if !core.try_heavy_alone() {
            return None;
        }
        let units = Weight::Heavy.units(core.budget(self.shared.active_per_core.load(Ordering::Relaxed)));
        core.force_acquire(units);
        let now = self.shared.heavy_now.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared.heavy_peak.fetch_max(now, Ordering::Relaxed);
        // As when a worker starts one: a core reserved for it (it may have been
        // deferred) is free again, or it would stay reserved for a job that ran.
        self.shared.heavy_job_settled(core);
        Some(units)
    }

    /// Gives back what `inline_heavy` took.
    pub fn inline_release(&self, index: usize, weight: Weight, units: u32) {
        let core = &self.shared.cores[self.shared.core_of(index)];
        if weight == Weight::Heavy {
            core.heavy_finished();
            self.shared.heavy_now.fetch_sub(1, Ordering::AcqRel);
        }
        core.release(units);
    }

    /// Core units for a job of `weight` that a thread outside the pool runs
    /// (a caller that waits on a token no worker has started runs it
    /// itself): the first core, not reserved for a heavy job, where the
    /// units fit, as a worker would take them. None while jobs wait deferred
    /// for room (they go first), once shutdown has begun, or when no core has
    /// room.
    pub fn try_acquire_outside(&self, weight: Weight) -> Option<OutsideUnits> {
        if self.shared.terminate.load(Ordering::Relaxed) || self.shared.deferred_len.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.acquire_on_any_core(weight)
    }

    /// The units of `weight` on the first core, not reserved for a heavy job, where they fit.
    fn acquire_on_any_core(&self, weight: Weight) -> Option<OutsideUnits> {
        let active = self.shared.active_per_core.load(Ordering::Relaxed);
        for (core_index, core) in self.shared.cores.iter().enumerate() {
            if core.reserved.load(Ordering::Acquire) {
                continue;
            }
            let budget = core.budget(active);
            let units = weight.units(budget);
            if core.try_acquire(units, budget) {
                let taken = OutsideUnits { core: core_index, weight, units };
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
        self.shared.cores[taken.core].release(taken.units);
        if self.shared.deferred_len.load(Ordering::SeqCst) > 0 || self.shared.has_work() {
            self.shared.notify_work();
        }
    }

    /// Takes units given back with `release_outside` again: on any core
    /// where they fit now (deferred jobs do not go first: their holder
    /// was running before them), else past the budget on a core where no
    /// heavy job runs (as a pinned job would), so that a heavy job keeps its
    /// core to itself. False when every core runs a heavy job.
    pub fn try_retake_outside(&self, taken: &mut OutsideUnits) -> bool {
        if let Some(units) = self.acquire_on_any_core(taken.weight) {
            *taken = units;
            return true;
        }
        let free_of_heavy = self.shared.cores.iter().position(|c| c.heavy_running() == 0 && !c.reserved.load(Ordering::Acquire));
        match free_of_heavy {
            Some(core) => {
                taken.core = core;
                self.force_retake_outside(taken);
                true
            }
            None => false,
        }
    }

    /// Takes released units back on their core past the budget (their
    /// holder must go on; `try_retake_outside` found no room for too long).
    pub fn force_retake_outside(&self, taken: &OutsideUnits) {
        self.shared.cores[taken.core].force_acquire(taken.units);
        self.heavy_count(taken, true);
    }

    fn heavy_count(&self, taken: &OutsideUnits, start: bool) {
        if taken.weight != Weight::Heavy {
            return;
        }
        let core = &self.shared.cores[taken.core];
        if start {
            core.heavy_started();
            let now = self.shared.heavy_now.fetch_add(1, Ordering::AcqRel) + 1;
            self.shared.heavy_peak.fetch_max(now, Ordering::Relaxed);
        } else {
            core.heavy_finished();
            self.shared.heavy_now.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes every queued job (not yet started) and returns them.
    pub fn take_unstarted(&self) -> Vec<J> {
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
        for queue in &self.shared.inboxes {
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
        let lent = seen.state == blocking::RUNNING && Shared::lend(&self.shared, index, seen);
        if lent {
            Shared::ensure_taker(&self.shared);
        }
        lent
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
            wakes: self.shared.sleep.wakes(),
            panics: self.shared.panics.load(Ordering::Relaxed),
            core_units: self.shared.cores.iter().map(CoreBudget::used).collect(),
            core_heavy: self.shared.cores.iter().map(CoreBudget::heavy_running).collect(),
            reserved: self.shared.reserved.load(Ordering::Relaxed),
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

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
