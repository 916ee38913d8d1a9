//! Per-engine books: token counters, admission limits, operation state and
//! health, the token registry (for `kill_token`), and the ring of recent
//! executions. Generic over the token type (`T`, which tells the books what
//! they need through `Booked`) and the queued job (`J`, held while paused):
//! the binding layer fixes both (`Ledger` and `OpState` in `src/py/token.rs`).
//!
//! # Who touches what
//!
//! * Counters and limits are atomics: the submit and resolve paths take no
//!   lock for them.
//! * The registry is a slab of weak token handles per shard, sharded by
//!   submitting thread (each thread picks a shard once, so its shard stays
//!   cache-hot): submit fills a free slot and the token remembers where;
//!   resolution empties that slot (no hashing, no search). `kill_*` and
//!   `stop` scan it (`registry.rs`).
//! * Memory after a burst: a large shard that empties starts a countdown
//!   (`to_free`) that the tokens' drops count down (`on_token_freed`); at
//!   its end the allocator's free pages go back to the OS (`memory.rs`).
//! * `ops` (operation name -> `OpState`, and the operations in order of first
//!   use) is locked on an operation's first call per engine and by readers
//!   of stats and history; each `OperationSpec` caches its binding.
//! * `recent` is sharded by resolving thread, so a worker's shard stays in
//!   its core's cache: each resolution locks one shard; a shard keeps the
//!   newest `history_size` records and a read merges the shards by finish
//!   time, so the newest `history_size` overall are always there. No lock is
//!   shared by all tokens, and shards sit on separate cache lines. A record
//!   names its operation by index (its position in `ops`), so recording
//!   touches no shared reference count.
//! * `parked` queues (global and per operation) hold jobs while admission or
//!   their operation is paused. The paused flag is changed and read under
//!   the same lock as the queue, so a job is never parked after a resume has
//!   emptied the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use crossbeam_utils::CachePadded;

use super::admission::Limit;
use super::metrics::{OpMetrics, Outcome, RunCounts};
use super::sync::{AtomicBool, AtomicU32, AtomicU64, Mutex, Ordering};
use super::token::{now_ns, Stamp, TokenCell, TokenState};
use registry::RegistryShard;

mod registry;

const SHARDS: usize = 32;

/// Health of one operation (the original's Guard House), counted per run of its
/// body (a retried token runs more than once). Runs, failed runs and their total
/// time are the operation's metrics (sharded by thread, `crate::engine::metrics`) less
/// what they were at the last reset, so a run adds to one set of counters; the
/// extremes, timeouts and the danger flag are kept here. See `OpState::record_run`.
#[derive(Debug, Default)]
pub struct Health {
    pub timeouts: AtomicU64,
    pub min_ns: AtomicU64,
    pub max_ns: AtomicU64,
    /// The metrics' run counts at the last reset.
    base: Mutex<RunCounts>,
    /// Over 90 % of at least 10 runs failed: set by the run that makes it so, read by
    /// every submit while `auto_block` is on (one load, no sum over the shards).
    dangerous: AtomicBool,
}

impl Health {
    fn note_extremes(&self, ns: u64) {
        // Reads first: the extremes' lines are written only when they move.
        if ns > self.max_ns.load(Ordering::Relaxed) {
            self.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
        let ns = ns.max(1);
        let min = self.min_ns.load(Ordering::Relaxed);
        if min == 0 || ns < min {
            let mut cur = min;
            while cur == 0 || ns < cur {
                match self.min_ns.compare_exchange_weak(cur, ns, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(actual) => cur = actual,
                }
            }
        }
    }

    /// The original's health classes: unknown (< 5 runs), excellent (>= 95 %
    /// success), healthy (>= 80 %), at_risk (>= 50 %), problematic.
    pub fn class(c: RunCounts) -> &'static str {
        if c.runs < 5 {
            return "unknown";
        }
        let rate = (c.runs - c.failed.min(c.runs)) as f64 / c.runs as f64;
        if rate >= 0.95 {
            "excellent"
        } else if rate >= 0.80 {
            "healthy"
        } else if rate >= 0.50 {
            "at_risk"
        } else {
            "problematic"
        }
    }

    /// More than 90 % failures over at least 10 runs.
    fn dangerous(c: RunCounts) -> bool {
        c.runs >= 10 && c.failed as f64 > 0.9 * c.runs as f64
    }
}

/// What the books need to know of a token (the binding layer's token type).
pub trait Booked: Send + Sync {
    /// What its cell's lock protects (the token's `slot`).
    type Slot;
    /// Its id, unique in the process.
    fn id(&self) -> u64;
    /// Its state, stamps and placement.
    fn cell(&self) -> &TokenCell<Self::Slot>;
    /// Where the registry holds it: shard << 32 | slot (`u64::MAX`: not registered).
    fn registry_slot(&self) -> &AtomicU64;
    /// The name of its operation.
    fn op_name(&self) -> &str;
}

/// The state of one operation (all tokens sharing an `operation_type`) on one
/// engine. `J` is a queued job (held here while the operation is paused).
#[derive(Debug)]
pub struct OpState<J> {
    pub name: Arc<str>,
    /// Position in the ledger's `ops.by_index` (history records name it by index).
    index: u32,
    /// (Written by submitters and workers: on a cache line of its own, as is `health`.)
    pub limit: CachePadded<Limit>,
    pub paused: AtomicBool,
    pub parked: Mutex<VecDeque<J>>,
    pub health: CachePadded<Health>,
    pub blocked: AtomicBool,
    /// How often this operation's long runs were blocked (see `BlockingHistory`).
    pub blocking: BlockingHistory,
    /// Counters and histograms for `/metrics` (sharded by thread: see `crate::engine::metrics`).
    pub metrics: OpMetrics,
}

/// Whether an operation's runs usually block: a score from 0 to `MAX`, up by
/// `UP` each time the blocking monitor finds one of its runs blocked (it
/// lends the run's units), down by `DOWN` for each run of over
/// `LONG_RUN_NS` that ended holding its units (it computed). Counting the
/// loans as they happen lets a burst of calls that block start lent after
/// its first four loans, instead of after its first runs end. At `THRESHOLD` or more,
/// its runs start with their units lent (see `blocking.rs` in the pool): a
/// blocking operation then never holds a core's units while it waits, and
/// the monitor takes them back for a run that turns out to compute.
#[derive(Debug, Default)]
pub struct BlockingHistory(AtomicU32);

impl BlockingHistory {
    const MAX: u32 = 16;
    const UP: u32 = 2;
    const DOWN: u32 = 8;
    const THRESHOLD: u32 = 8;
    /// Runs shorter than this say nothing (the monitor cannot have looked at them).
    const LONG_RUN_NS: u64 = 3_000_000;

    /// Whether a run of `elapsed_ns` is long enough to say anything.
    pub fn is_long(&self, elapsed_ns: u64) -> bool {
        elapsed_ns > Self::LONG_RUN_NS
    }

    pub fn starts_lent(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= Self::THRESHOLD
    }

    /// The monitor found a run blocked (`blocked`, see `Ledger::note_lent`),
    /// or a run of over `LONG_RUN_NS` ended holding its units (not `blocked`).
    pub fn record(&self, blocked: bool) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(if blocked { (v + Self::UP).min(Self::MAX) } else { v.saturating_sub(Self::DOWN) })
        });
    }
}

impl<J> OpState<J> {
    /// Its index in the ledger's table (see `Ledger::note_lent`).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// A run of the body ended (once per attempt), `succeeded` or not, after `ns`.
    pub fn record_run(&self, succeeded: bool, ns: u64) {
        self.metrics.ran(succeeded, ns);
        self.health.note_extremes(ns);
        // The sum over the shards only when the flag may change: a failure, or a
        // success while it is set (both rare where it matters).
        if !succeeded || self.health.dangerous.load(Ordering::Relaxed) {
            self.health.dangerous.store(Health::dangerous(self.health_counts()), Ordering::Relaxed);
        }
    }

    /// Runs, failed runs and their time since the last health reset.
    pub fn health_counts(&self) -> RunCounts {
        self.metrics.runs().since(*self.health.base.lock())
    }

    pub fn health_class(&self) -> &'static str {
        Health::class(self.health_counts())
    }

    /// Over 90 % of at least 10 runs failed since the last reset.
    pub fn is_dangerous(&self) -> bool {
        self.health.dangerous.load(Ordering::Relaxed)
    }

    /// Starts the health counts afresh (after an unblock); the metrics go on.
    pub fn reset_health(&self) {
        *self.health.base.lock() = self.metrics.runs();
        for c in [&self.health.timeouts, &self.health.min_ns, &self.health.max_ns] {
            c.store(0, Ordering::Relaxed);
        }
        self.health.dangerous.store(false, Ordering::Relaxed);
    }

    fn new(name: Arc<str>, index: u32) -> Self {
        OpState {
            name,
            index,
            limit: CachePadded::new(Limit::new(0)),
            paused: AtomicBool::new(false),
            parked: Mutex::new(VecDeque::new()),
            health: CachePadded::default(),
            blocked: AtomicBool::new(false),
            blocking: BlockingHistory::default(),
            metrics: OpMetrics::default(),
        }
    }
}

/// One line of the execution history.
#[derive(Debug, Clone)]
pub struct Record {
    pub token_id: u64,
    /// Index into the ledger's operation names (`Ledger::op_name`).
    pub op_index: u32,
    seq: u64,
    pub state: TokenState,
    pub created_ns: u64,
    pub started_ns: Option<u64>,
    pub finished_ns: u64,
    pub worker_id: Option<u32>,
    pub core_id: Option<u32>,
    pub error: Option<String>,
}

/// The operations used on one engine, by name and in order of first use
/// (`OpState::index`).
#[derive(Debug)]
struct OpTable<J> {
    by_name: HashMap<Arc<str>, Arc<OpState<J>>>,
    by_index: Vec<Arc<OpState<J>>>,
}

impl<J> Default for OpTable<J> {
    fn default() -> Self {
        OpTable { by_name: HashMap::new(), by_index: Vec::new() }
    }
}

/// This thread's shard of the registry and the history (threads take
/// shards round-robin, so one thread always uses the same, cache-hot shard).
pub fn thread_shard() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// The books of one engine, shared with its tokens: `T` is the token type,
/// `J` a queued job (held while admission or an operation is paused).
#[derive(Debug)]
pub struct Ledger<T, J> {
    // The counters the hot paths write sit on cache lines of their own:
    // `running` (workers), `pending` (submitters and workers), apart from the
    // flags everyone reads. Tokens made and resolved are counted per
    // operation (`OpState::metrics`, sharded by thread) and added up here.
    /// Bodies running now, counted per thread shard (a body starts and ends on
    /// one thread, so each thread touches only its own line); read as the sum.
    running: Vec<CachePadded<std::sync::atomic::AtomicI64>>,
    /// Process-lane tokens running in a worker process (started by the lane, ended by their resolution).
    pub process_running: std::sync::atomic::AtomicI64,
    /// Worker processes of the process lane alive now (the lane reports each change).
    pub process_workers: AtomicU64,
    /// The engine's outside lanes (worker processes, clusters), by index.
    pub outside: super::outside::OutsideLanes<J>,
    /// Global `max_pending` limit on unresolved tokens (0: unlimited).
    pub pending: CachePadded<Limit>,
    pub admission_paused: AtomicBool,
    pub parked: Mutex<VecDeque<J>>,
    /// Set when the engine starts stopping: pauses no longer hold tokens (they are cancelled).
    pub stopping: AtomicBool,
    pub auto_block: AtomicBool,
    /// A thread outside the pool that waits on a token nobody started may run it (caller runs).
    pub caller_runs: AtomicBool,
    pub retries: AtomicU64,
    pub timeouts_queued: AtomicU64,
    pub timeouts_running: AtomicU64,
    pub overrun_total_ns: AtomicU64,
    pub overrun_max_ns: AtomicU64,
    pub overruns: AtomicU64,
    ops: Mutex<OpTable<J>>,
    /// Tokens of resolved large bursts not yet freed (see `on_token_freed`).
    to_free: CachePadded<std::sync::atomic::AtomicI64>,
    registry: Vec<CachePadded<Mutex<RegistryShard<T>>>>,
    recent: Vec<CachePadded<Mutex<VecDeque<Record>>>>,
    recent_cap: usize,
}

impl<T: Booked, J> Ledger<T, J> {
    pub fn new(max_pending: usize, history: usize, auto_block: bool, caller_runs: bool) -> Self {
        Ledger {
            running: (0..SHARDS).map(|_| CachePadded::new(std::sync::atomic::AtomicI64::new(0))).collect(),
            process_running: std::sync::atomic::AtomicI64::new(0),
            process_workers: AtomicU64::new(0),
            outside: super::outside::OutsideLanes::default(),
            pending: CachePadded::new(Limit::new(max_pending)),
            admission_paused: AtomicBool::new(false),
            parked: Mutex::new(VecDeque::new()),
            stopping: AtomicBool::new(false),
            auto_block: AtomicBool::new(auto_block),
            caller_runs: AtomicBool::new(caller_runs),
            retries: AtomicU64::new(0),
            timeouts_queued: AtomicU64::new(0),
            timeouts_running: AtomicU64::new(0),
            overrun_total_ns: AtomicU64::new(0),
            overrun_max_ns: AtomicU64::new(0),
            overruns: AtomicU64::new(0),
            ops: Mutex::new(OpTable::default()),
            to_free: CachePadded::new(std::sync::atomic::AtomicI64::new(0)),
            registry: (0..SHARDS).map(|_| CachePadded::new(Mutex::new(RegistryShard::default()))).collect(),
            recent: (0..SHARDS).map(|_| CachePadded::new(Mutex::new(VecDeque::new()))).collect(),
            recent_cap: history,
        }
    }

    /// The state of operation `name`, made on first use.
    pub fn op(&self, name: &str) -> Arc<OpState<J>> {
        let mut ops = self.ops.lock();
        if let Some(op) = ops.by_name.get(name) {
            return op.clone();
        }
        let op = Arc::new(OpState::new(name.into(), ops.by_index.len() as u32));
        ops.by_name.insert(op.name.clone(), op.clone());
        ops.by_index.push(op.clone());
        op
    }

    /// The blocking monitor found a run of the operation with `index` blocked.
    pub fn note_lent(&self, index: u32) {
        let op = self.ops.lock().by_index.get(index as usize).cloned();
        if let Some(op) = op {
            op.blocking.record(true);
        }
    }

    /// The name of the operation with `index` (see `Record::op_index`).
    pub fn op_name(&self, index: u32) -> Arc<str> {
        self.ops.lock().by_index[index as usize].name.clone()
    }

    /// The operation `name` if it was ever used.
    pub fn find_op(&self, name: &str) -> Option<Arc<OpState<J>>> {
        self.ops.lock().by_name.get(name).cloned()
    }

    /// Every operation used so far.
    pub fn ops(&self) -> Vec<Arc<OpState<J>>> {
        let mut v = self.ops.lock().by_index.clone();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Adds `token` to the registry (once, at submission).
    pub fn register(&self, token: &Arc<T>) {
        let shard = thread_shard();
        let index = self.registry[shard].lock().insert(Arc::downgrade(token));
        token.registry_slot().store(((shard as u64) << 32) | u64::from(index), Ordering::Relaxed);
    }

    fn unregister(&self, token: &T) {
        let at = token.registry_slot().load(Ordering::Relaxed);
        if at != u64::MAX {
            let resolved = self.registry[(at >> 32) as usize].lock().remove(at as u32, token);
            if let Some(burst) = resolved {
                // Counted down as tokens are freed; a few may live on in their callers.
                let expected = burst - (burst / 256).max(256);
                self.to_free.fetch_add(expected as i64, std::sync::atomic::Ordering::Relaxed);
                // Tokens dropped as they finished are free already.
                crate::engine::memory::request_release();
            }
        }
    }

    /// A token of this ledger was freed (its last handle dropped). Once
    /// nearly as many tokens as a resolved large burst held are freed, the allocator's
    /// free pages go back to the OS (`memory::release_free_memory`), and
    /// again shortly after (`memory::release_soon`), once what held the tokens
    /// is freed too: their memory is free only then, not when the burst
    /// resolved (its caller may still hold the tokens). Outside such a
    /// countdown a token pays one load of a line nobody writes.
    pub fn on_token_freed(&self) {
        if self.to_free.load(std::sync::atomic::Ordering::Relaxed) > 0
            && self.to_free.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1
        {
            crate::engine::memory::release_free_memory();
            crate::engine::memory::release_soon();
        }
    }

    /// The unresolved token `id`, if any.
    pub fn lookup(&self, id: u64) -> Option<Arc<T>> {
        self.registry.iter().find_map(|shard| {
            // Upgraded under the lock, searched (and the rest dropped) after it: a
            // last handle dropped under the lock could resolve its token, which
            // takes this lock.
            let all: Vec<Arc<T>> = shard.lock().handles().filter_map(Weak::upgrade).collect();
            all.into_iter().find(|t| t.id() == id && !t.cell().is_done())
        })
    }

    /// Every live, unresolved token (optionally of one operation).
    pub fn live_tokens(&self, op: Option<&str>) -> Vec<Arc<T>> {
        let mut out = Vec::new();
        for shard in &self.registry {
            // Upgraded under the lock, filtered (and the rest dropped) after it.
            let all: Vec<Arc<T>> = shard.lock().handles().filter_map(Weak::upgrade).collect();
            out.extend(all.into_iter().filter(|t| !t.cell().is_done() && op.is_none_or(|o| t.op_name() == o)));
        }
        out
    }

    /// Books a new token of `op`.
    pub fn record_submitted(&self, op: &OpState<J>) {
        op.metrics.submitted();
    }

    pub fn running_delta(&self, delta: i64) {
        self.running[thread_shard()].fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bodies running now in the process lane's worker processes.
    pub fn running_in_processes(&self) -> u64 {
        self.process_running.load(std::sync::atomic::Ordering::Relaxed).max(0) as u64
    }

    /// Bodies running now: on this process's threads, and in the process lane's workers.
    pub fn running_everywhere(&self) -> u64 {
        self.running() + self.running_in_processes()
    }

    /// Bodies running now on this process's threads (workers, the I/O lane, callers).
    pub fn running(&self) -> u64 {
        self.running.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).sum::<i64>().max(0) as u64
    }

    /// Everything the books do when `token` of operation `op` resolves (its
    /// state is `state` now): give its admission slots back (the operation's
    /// limit and `max_pending`), take it out of the registry, count its
    /// outcome and queue wait, keep its record. `ran_elsewhere`: its
    /// body ran outside this process's threads (a worker process), so its one
    /// run is counted here (a thread's run is counted where it ran).
    pub fn on_resolved(&self, token: &T, op: &OpState<J>, state: TokenState, ran_elsewhere: bool, error: Option<String>) {
        op.limit.release();
        self.pending.release();
        self.unregister(token);
        if state == TokenState::Timeout {
            op.health.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = Outcome::of(state);
        let cell = token.cell();
        let created = cell.time(Stamp::Created);
        let started = cell.time(Stamp::Started);
        let finished = cell.time(Stamp::Finished);
        let queue_wait = started.zip(created).map(|(s, c)| s.saturating_sub(c));
        op.metrics.resolved(outcome, queue_wait);
        if ran_elsewhere {
            if let Some(ns) = finished.zip(started).map(|(f, s)| f.saturating_sub(s)) {
                op.record_run(outcome == Outcome::Ok, ns);
            }
        }
        if self.recent_cap > 0 {
            let (worker_id, core_id) = cell.placement();
            let record = Record {
                token_id: token.id(),
                op_index: op.index,
                seq: finished.unwrap_or(0),
                state,
                created_ns: created.unwrap_or(0),
                started_ns: started,
                finished_ns: finished.unwrap_or_else(now_ns),
                worker_id,
                core_id,
                error,
            };
            let mut recent = self.recent[thread_shard()].lock();
            if recent.len() >= self.recent_cap {
                recent.pop_front();
            }
            recent.push_back(record);
        }
    }

    /// The newest `limit` records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Record> {
        let mut all = self.history();
        all.reverse();
        all.truncate(limit);
        all
    }

    /// The newest `history_size` records, oldest first.
    pub fn history(&self) -> Vec<Record> {
        let mut all: Vec<Record> = self.recent.iter().flat_map(|s| s.lock().iter().cloned().collect::<Vec<_>>()).collect();
        all.sort_by_key(|r| (r.seq, r.token_id));
        let excess = all.len().saturating_sub(self.recent_cap);
        all.drain(..excess);
        all
    }

    /// Tokens made, and tokens resolved by outcome, over every operation.
    pub fn totals(&self) -> (u64, [u64; 5]) {
        let ops = self.ops.lock().by_index.clone();
        let mut submitted = 0;
        let mut outcomes = [0u64; 5];
        for op in ops {
            let (s, o) = op.metrics.counts();
            submitted += s;
            for (t, n) in outcomes.iter_mut().zip(o) {
                *t += n;
            }
        }
        (submitted, outcomes)
    }

    /// Submitted tokens not yet resolved.
    pub fn unresolved(&self) -> u64 {
        let (submitted, outcomes) = self.totals();
        submitted.saturating_sub(outcomes.iter().sum())
    }

    pub fn note_overrun(&self, ns: u64) {
        self.overruns.fetch_add(1, Ordering::Relaxed);
        self.overrun_total_ns.fetch_add(ns, Ordering::Relaxed);
        self.overrun_max_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
