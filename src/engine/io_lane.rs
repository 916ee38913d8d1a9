//! An elastic thread lane with concurrency tiers, for blocking I/O.
//!
//! Threads are spawned on demand (up to `max_threads`) and retire after
//! `idle_timeout` without work, so an idle lane costs no threads. Each job
//! belongs to a tier with a concurrency limit (the original's storage
//! tiers: SLOW 10, MODERATE 25, FAST 50, INSANE 70). A job over its tier's
//! limit waits in the tier's queue and holds no thread.
//!
//! # Protocol (everything under the one `state` lock)
//!
//! * `submit(tier, job)`: if the tier runs fewer than its limit, count it as
//!   running and put it on `ready`; then wake an idle thread, or spawn one
//!   if none is idle. Otherwise append it to the tier's queue.
//! * A thread pops `ready`; after running a job it decrements its tier's
//!   `running` and, if the tier's queue is not empty, moves the next job to
//!   `ready` (counted as running). So a tier never exceeds its limit and a
//!   queued job starts as soon as a slot frees.
//! * An idle thread waits on the condvar (detached from Python, through the
//!   embedder's `idle` hook) up to `idle_timeout`; it retires if nothing came,
//!   decrementing `threads` under the lock, so a `submit` that finds no idle
//!   thread spawns a new one.
//! * `shutdown`: set `stop`, wake all. Threads keep running what is ready or
//!   queued and exit when nothing is left; `join` waits for `threads == 0`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::engine::pool::{WorkerHooks, WorkerInfo};
use crate::engine::sync::{Condvar, Mutex};
use std::sync::Arc;

/// What the embedder runs on each lane thread.
pub trait LaneHost<J>: Send + Sync + 'static {
    /// Runs the thread's whole life; must call `thread.run(hooks)` once.
    fn run_thread(&self, thread: LaneThread<J>);
}

/// One tier's state.
#[derive(Debug)]
struct Tier<J> {
    limit: usize,
    running: usize,
    peak: usize,
    queue: VecDeque<J>,
}

struct State<J> {
    tiers: Vec<Tier<J>>,
    ready: VecDeque<(usize, J)>,
    threads: usize,
    idle: usize,
    spawned: u64,
    stop: bool,
}

struct Shared<J> {
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
    state: Mutex<State<J>>,
    cv: Condvar,
    exited: Condvar,
    idle_timeout: Duration,
    max_threads: usize,
    name: String,
    stack_size: usize,
}

/// Per-tier figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStats {
    /// Concurrency limit.
    pub limit: usize,
    /// Jobs running now.
    pub running: usize,
    /// Most jobs running at once so far.
    pub peak: usize,
    /// Jobs waiting for a slot.
    pub queued: usize,
}

/// Figures of the whole lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneStats {
    /// Threads alive.
    pub threads: usize,
    /// Threads waiting for work.
    pub idle: usize,
    /// Threads started so far.
    pub spawned: u64,
    /// One entry per tier.
    pub tiers: Vec<TierStats>,
}

/// The elastic lane.
pub struct Lane<J: Send + 'static> {
    shared: Arc<Shared<J>>,
    host: Arc<dyn LaneHost<J>>,
}

impl<J: Send + 'static> std::fmt::Debug for Lane<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("name", &self.shared.name).field("stats", &self.stats()).finish()
    }
}

/// A lane thread's loop, handed to `LaneHost::run_thread`.
pub struct LaneThread<J> {
    shared: Arc<Shared<J>>,
    info: WorkerInfo,
}

impl<J> std::fmt::Debug for LaneThread<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneThread").field("info", &self.info).finish()
    }
}

impl<J: Send + 'static> Lane<J> {
    /// A lane whose tiers have the given limits (each at least 1).
    pub fn new(
        name: impl Into<String>,
        limits: &[usize],
        max_threads: usize,
        idle_timeout: Duration,
        stack_size: usize,
        host: Arc<dyn LaneHost<J>>,
    ) -> Self {
        let tiers = limits.iter().map(|&l| Tier { limit: l.max(1), running: 0, peak: 0, queue: VecDeque::new() }).collect();
        Lane {
            shared: Arc::new(Shared {
                handles: Mutex::new(Vec::new()),
                state: Mutex::new(State { tiers, ready: VecDeque::new(), threads: 0, idle: 0, spawned: 0, stop: false }),
                cv: Condvar::new(),
                exited: Condvar::new(),
                idle_timeout,
                max_threads: max_threads.max(1),
                name: name.into(),
                stack_size: stack_size.max(crate::engine::pool::MIN_STACK_SIZE),
            }),
            host,
        }
    }

    /// Queues `job` in `tier`. Fails (handing it back) after shutdown or for an unknown tier.
    pub fn submit(&self, tier: usize, job: J) -> Result<(), J> {
        let spawn = {
            let mut st = self.shared.state.lock();
            if st.stop || tier >= st.tiers.len() {
                return Err(job);
            }
            let t = &mut st.tiers[tier];
            if t.running < t.limit {
                t.running += 1;
                t.peak = t.peak.max(t.running);
                st.ready.push_back((tier, job));
                self.wake_or_spawn(&mut st)
            } else {
                t.queue.push_back(job);
                false
            }
        };
        if spawn {
            self.spawn();
        }
        Ok(())
    }

    /// Wakes an idle thread, or decides to spawn one (never more threads
    /// than jobs running across all tiers). Call with the lock held.
    fn wake_or_spawn(&self, st: &mut State<J>) -> bool {
        if st.idle > 0 {
            self.shared.cv.notify_one();
            return false;
        }
        let running: usize = st.tiers.iter().map(|t| t.running).sum();
        if st.threads < running.min(self.shared.max_threads) {
            st.threads += 1;
            st.spawned += 1;
            true
        } else {
            false
        }
    }

    fn spawn(&self) {
        let shared = self.shared.clone();
        let host = self.host.clone();
        let index = { self.shared.state.lock().spawned as usize };
        let info = WorkerInfo { index, core: None, pool_id: 0 };
        let spawned =
            std::thread::Builder::new().name(format!("{}-{index}", self.shared.name)).stack_size(self.shared.stack_size).spawn(move || {
                let guard = ExitGuard(shared.clone());
                host.run_thread(LaneThread { shared, info });
                drop(guard);
            });
        match spawned {
            Ok(handle) => {
                let mut handles = self.shared.handles.lock();
                // Join the threads that retired since (they have left Python).
                let (done, alive): (Vec<_>, Vec<_>) = handles.drain(..).partition(|h| h.is_finished());
                *handles = alive;
                handles.push(handle);
                drop(handles);
                for h in done {
                    let _ = h.join();
                }
            }
            Err(_) => {
                let mut st = self.shared.state.lock();
                st.threads -= 1;
                self.shared.exited.notify_all();
            }
        }
    }

    /// Changes a tier's limit (queued jobs start if the limit grew).
    pub fn set_limit(&self, tier: usize, limit: usize) {
        let mut spawn = 0;
        {
            let mut st = self.shared.state.lock();
            if tier >= st.tiers.len() {
                return;
            }
            st.tiers[tier].limit = limit.max(1);
            loop {
                let t = &mut st.tiers[tier];
                if t.running >= t.limit {
                    break;
                }
                let Some(job) = t.queue.pop_front() else {
                    break;
                };
                t.running += 1;
                t.peak = t.peak.max(t.running);
                st.ready.push_back((tier, job));
                if self.wake_or_spawn(&mut st) {
                    spawn += 1;
                }
            }
        }
        for _ in 0..spawn {
            self.spawn();
        }
    }

    /// Removes every job not yet started (ready or queued).
    pub fn take_unstarted(&self) -> Vec<J> {
        let mut st = self.shared.state.lock();
        let mut out = Vec::new();
        let ready: Vec<(usize, J)> = st.ready.drain(..).collect();
        for (tier, job) in ready {
            st.tiers[tier].running -= 1;
            out.push(job);
        }
        for t in &mut st.tiers {
            out.extend(t.queue.drain(..));
        }
        out
    }

    /// Figures for monitoring.
    pub fn stats(&self) -> LaneStats {
        let st = self.shared.state.lock();
        LaneStats {
            threads: st.threads,
            idle: st.idle,
            spawned: st.spawned,
            tiers: st.tiers.iter().map(|t| TierStats { limit: t.limit, running: t.running, peak: t.peak, queued: t.queue.len() }).collect(),
        }
    }

    /// Stops accepting jobs; threads finish what is left and exit.
    pub fn shutdown(&self) {
        let mut st = self.shared.state.lock();
        st.stop = true;
        self.shared.cv.notify_all();
    }

    /// Waits up to `timeout` (None: forever) for every thread to exit.
    pub fn join(&self, timeout: Option<Duration>) -> bool {
        self.joiner().join(timeout)
    }

    /// Something that can wait for the threads to exit after the lane is gone.
    pub fn joiner(&self) -> LaneJoiner {
        LaneJoiner(Box::new(SharedJoin(self.shared.clone())))
    }
}

trait Join: Send {
    fn join(&self, timeout: Option<Duration>) -> bool;
}

struct SharedJoin<J>(Arc<Shared<J>>);

impl<J: Send> Join for SharedJoin<J> {
    /// Waits for `threads == 0`, then joins every handle: a thread counts
    /// itself out before it leaves the embedder (Python), so only the join
    /// proves it is gone.
    fn join(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        {
            let mut st = self.0.state.lock();
            while st.threads > 0 {
                match deadline {
                    Some(d) => {
                        if self.0.exited.wait_until(&mut st, d).timed_out() && st.threads > 0 {
                            return false;
                        }
                    }
                    None => self.0.exited.wait(&mut st),
                }
            }
        }
        let handles: Vec<_> = std::mem::take(&mut *self.0.handles.lock());
        for h in handles {
            let _ = h.join();
        }
        true
    }
}

/// Waits for a lane's threads to exit (see `Lane::joiner`).
pub struct LaneJoiner(Box<dyn Join>);

impl std::fmt::Debug for LaneJoiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LaneJoiner")
    }
}

impl LaneJoiner {
    /// Waits up to `timeout` (None: forever); true when every thread exited.
    pub fn join(&self, timeout: Option<Duration>) -> bool {
        self.0.join(timeout)
    }
}

struct ExitGuard<J>(Arc<Shared<J>>);

impl<J> Drop for ExitGuard<J> {
    fn drop(&mut self) {
        let _st = self.0.state.lock();
        self.0.exited.notify_all();
    }
}

impl<J: Send + 'static> LaneThread<J> {
    /// Who this thread is (`index` counts threads spawned by the lane).
    pub fn info(&self) -> WorkerInfo {
        self.info
    }

    /// Runs jobs until the thread retires (idle too long) or the lane stops empty.
    pub fn run(self, hooks: &mut dyn WorkerHooks<J>) {
        loop {
            let mut next = self.try_pop();
            if next.is_none() {
                let me = &self;
                let slot = &mut next;
                hooks.idle(&mut || *slot = me.wait_pop());
            }
            let Some((tier, job)) = next else { return };
            let info = self.info;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hooks.execute(job, &info)));
            self.finished(tier);
        }
    }

    fn try_pop(&self) -> Option<(usize, J)> {
        self.shared.state.lock().ready.pop_front()
    }

    /// Waits for a ready job; on timeout or an empty stopped lane, retires (None).
    fn wait_pop(&self) -> Option<(usize, J)> {
        let mut st = self.shared.state.lock();
        let deadline = Instant::now() + self.shared.idle_timeout;
        loop {
            if let Some(x) = st.ready.pop_front() {
                return Some(x);
            }
            let queued = st.tiers.iter().any(|t| !t.queue.is_empty());
            if st.stop && !queued {
                st.threads -= 1;
                return None;
            }
            st.idle += 1;
            let timed_out = self.shared.cv.wait_until(&mut st, deadline).timed_out();
            st.idle -= 1;
            if timed_out && st.ready.is_empty() {
                st.threads -= 1;
                return None;
            }
        }
    }

    fn finished(&self, tier: usize) {
        let mut st = self.shared.state.lock();
        let t = &mut st.tiers[tier];
        t.running -= 1;
        if t.running < t.limit {
            if let Some(job) = t.queue.pop_front() {
                t.running += 1;
                st.ready.push_back((tier, job));
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    type Job = Box<dyn FnOnce() + Send>;

    struct Hooks;
    impl WorkerHooks<Job> for Hooks {
        fn execute(&mut self, job: Job, _: &WorkerInfo) {
            job();
        }
    }
    struct Host;
    impl LaneHost<Job> for Host {
        fn run_thread(&self, thread: LaneThread<Job>) {
            thread.run(&mut Hooks);
        }
    }

    fn lane(limits: &[usize], idle: Duration) -> Lane<Job> {
        Lane::new("io", limits, 64, idle, 0, Arc::new(Host))
    }

    #[test]
    fn a_tier_never_exceeds_its_limit_and_runs_everything() {
        let l = lane(&[3, 50], Duration::from_millis(200));
        let running = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..40 {
            let (r, m, tx) = (running.clone(), max.clone(), tx.clone());
            l.submit(
                0,
                Box::new(move || {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    r.fetch_sub(1, Ordering::SeqCst);
                    tx.send(()).unwrap();
                }),
            )
            .map_err(|_| "refused")
            .unwrap();
        }
        for _ in 0..40 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 3);
        assert!(l.stats().threads <= 3, "queued jobs must not hold threads: {:?}", l.stats());
        l.shutdown();
        assert!(l.join(Some(Duration::from_secs(5))));
    }

    #[test]
    fn idle_threads_retire() {
        let l = lane(&[10], Duration::from_millis(30));
        let (tx, rx) = mpsc::channel();
        for _ in 0..5 {
            let tx = tx.clone();
            l.submit(
                0,
                Box::new(move || {
                    std::thread::sleep(Duration::from_millis(5));
                    tx.send(()).unwrap();
                }),
            )
            .map_err(|_| "refused")
            .unwrap();
        }
        for _ in 0..5 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while l.stats().threads > 0 {
            assert!(Instant::now() < deadline, "threads did not retire: {:?}", l.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        // and the lane still works afterwards
        let (tx, rx) = mpsc::channel();
        l.submit(0, Box::new(move || tx.send(7).unwrap())).map_err(|_| "refused").unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
        l.shutdown();
        assert!(l.join(Some(Duration::from_secs(5))));
    }

    #[test]
    fn take_unstarted_returns_jobs_that_did_not_start() {
        let l = lane(&[1], Duration::from_secs(1));
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        l.submit(0, Box::new(move || gate_rx.recv().unwrap())).map_err(|_| "refused").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        for _ in 0..5 {
            l.submit(0, Box::new(|| ())).map_err(|_| "refused").unwrap();
        }
        assert_eq!(l.take_unstarted().len(), 5);
        gate_tx.send(()).unwrap();
        l.shutdown();
        assert!(l.join(Some(Duration::from_secs(5))));
    }
}
