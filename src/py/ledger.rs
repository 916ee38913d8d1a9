//! Per-engine books: token counters, admission limits, operation state and
//! health, the token registry (for `kill_token`), and the ring of recent
//! executions.
//!
//! # Who touches what
//!
//! * Counters and limits are atomics: the submit and resolve paths take no
//!   lock for them.
//! * The registry is sharded by token id (16 mutex-protected maps): insert
//!   on submit, remove on resolve; `kill_*` scans it.
//! * `ops` (operation name -> `OpState`) is locked only on an operation's
//!   first call per engine; each `OperationSpec` caches its `OpState`.
//! * `recent` is sharded like the registry (by token id): each resolution
//!   locks one shard; a shard keeps the newest `history_size` records and a
//!   read merges the shards by finish time, so the newest `history_size`
//!   overall are always there. No lock is shared by all tokens.
//! * `parked` queues (global and per operation) hold jobs while admission or
//!   their operation is paused. The paused flag is changed and read under
//!   the same lock as the queue, so a job is never parked after a resume has
//!   emptied the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use super::job::PyJob;
use super::token::TokenInner;
use crate::admission::Limit;
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use crate::token::{now_ns, TokenState};

const SHARDS: usize = 32;

/// Token ids are sequential: a multiplicative (Fibonacci) hash spreads them
/// at a fraction of SipHash's cost. Not exposed to untrusted keys.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Health of one operation (the original's Guard House), counted per attempt.
#[derive(Debug, Default)]
pub(crate) struct Health {
    pub(crate) attempts: AtomicU64,
    pub(crate) successes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) total_ns: AtomicU64,
    pub(crate) min_ns: AtomicU64,
    pub(crate) max_ns: AtomicU64,
}

impl Health {
    pub(crate) fn record(&self, ok: bool, ns: u64) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
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

    /// Starts counting afresh (after an unblock).
    pub(crate) fn reset(&self) {
        for c in [&self.attempts, &self.successes, &self.failures, &self.timeouts, &self.total_ns, &self.min_ns, &self.max_ns] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The original's health classes: unknown (< 5 attempts), excellent (>= 95 %
    /// success), healthy (>= 80 %), at_risk (>= 50 %), problematic.
    pub(crate) fn class(&self) -> &'static str {
        let attempts = self.attempts.load(Ordering::Relaxed);
        if attempts < 5 {
            return "unknown";
        }
        let rate = self.successes.load(Ordering::Relaxed) as f64 / attempts as f64;
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

    /// More than 90 % failures over at least 10 attempts.
    pub(crate) fn is_dangerous(&self) -> bool {
        let attempts = self.attempts.load(Ordering::Relaxed);
        attempts >= 10 && self.failures.load(Ordering::Relaxed) as f64 > 0.9 * attempts as f64
    }
}

/// The state of one operation (all tokens sharing an `operation_type`) on one engine.
#[derive(Debug)]
pub(crate) struct OpState {
    pub(crate) name: Arc<str>,
    pub(crate) limit: Limit,
    pub(crate) paused: AtomicBool,
    pub(crate) parked: Mutex<VecDeque<PyJob>>,
    pub(crate) health: Health,
    pub(crate) blocked: AtomicBool,
}

impl OpState {
    fn new(name: &str) -> Self {
        OpState {
            name: name.into(),
            limit: Limit::new(0),
            paused: AtomicBool::new(false),
            parked: Mutex::new(VecDeque::new()),
            health: Health::default(),
            blocked: AtomicBool::new(false),
        }
    }
}

/// One line of the execution history.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) token_id: u64,
    pub(crate) operation_type: Arc<str>,
    seq: u64,
    pub(crate) state: TokenState,
    pub(crate) created_ns: u64,
    pub(crate) started_ns: Option<u64>,
    pub(crate) finished_ns: u64,
    pub(crate) worker_id: Option<u32>,
    pub(crate) core_id: Option<u32>,
    pub(crate) error: Option<String>,
}

/// The books of one engine, shared with its tokens.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub(crate) submitted: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) resolved: [AtomicU64; 9],
    /// Global `max_pending` limit on unresolved tokens (0: unlimited).
    pub(crate) pending: Limit,
    pub(crate) admission_paused: AtomicBool,
    pub(crate) parked: Mutex<VecDeque<PyJob>>,
    /// Set when the engine starts stopping: pauses no longer hold tokens (they are cancelled).
    pub(crate) stopping: AtomicBool,
    pub(crate) auto_block: AtomicBool,
    pub(crate) retries: AtomicU64,
    pub(crate) timeouts_queued: AtomicU64,
    pub(crate) timeouts_running: AtomicU64,
    pub(crate) overrun_total_ns: AtomicU64,
    pub(crate) overrun_max_ns: AtomicU64,
    pub(crate) overruns: AtomicU64,
    ops: Mutex<HashMap<Arc<str>, Arc<OpState>>>,
    registry: Vec<Mutex<IdMap<Weak<TokenInner>>>>,
    recent: Vec<Mutex<VecDeque<Record>>>,
    recent_cap: usize,
}

impl Ledger {
    pub(crate) fn new(max_pending: usize, history: usize, auto_block: bool) -> Self {
        Ledger {
            submitted: AtomicU64::new(0),
            running: AtomicU64::new(0),
            resolved: Default::default(),
            pending: Limit::new(max_pending),
            admission_paused: AtomicBool::new(false),
            parked: Mutex::new(VecDeque::new()),
            stopping: AtomicBool::new(false),
            auto_block: AtomicBool::new(auto_block),
            retries: AtomicU64::new(0),
            timeouts_queued: AtomicU64::new(0),
            timeouts_running: AtomicU64::new(0),
            overrun_total_ns: AtomicU64::new(0),
            overrun_max_ns: AtomicU64::new(0),
            overruns: AtomicU64::new(0),
            ops: Mutex::new(HashMap::new()),
            registry: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
            recent: (0..SHARDS).map(|_| Mutex::new(VecDeque::new())).collect(),
            recent_cap: history,
        }
    }

    /// The state of operation `name`, made on first use.
    pub(crate) fn op(&self, name: &str) -> Arc<OpState> {
        let mut ops = self.ops.lock();
        if let Some(op) = ops.get(name) {
            return op.clone();
        }
        let op = Arc::new(OpState::new(name));
        ops.insert(op.name.clone(), op.clone());
        op
    }

    /// The operation `name` if it was ever used.
    pub(crate) fn find_op(&self, name: &str) -> Option<Arc<OpState>> {
        self.ops.lock().get(name).cloned()
    }

    /// Every operation used so far.
    pub(crate) fn ops(&self) -> Vec<Arc<OpState>> {
        let mut v: Vec<_> = self.ops.lock().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub(crate) fn register(&self, token: &Arc<TokenInner>) {
        self.registry[token.id as usize % SHARDS].lock().insert(token.id, Arc::downgrade(token));
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.registry[id as usize % SHARDS].lock().remove(&id);
    }

    pub(crate) fn lookup(&self, id: u64) -> Option<Arc<TokenInner>> {
        self.registry[id as usize % SHARDS].lock().get(&id).and_then(Weak::upgrade)
    }

    /// Every live, unresolved token (optionally of one operation).
    pub(crate) fn live_tokens(&self, op: Option<&str>) -> Vec<Arc<TokenInner>> {
        let mut out = Vec::new();
        for shard in &self.registry {
            for t in shard.lock().values().filter_map(Weak::upgrade) {
                if !t.core.is_done() && op.is_none_or(|o| &*t.op.name == o) {
                    out.push(t);
                }
            }
        }
        out
    }

    pub(crate) fn record_submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn running_delta(&self, delta: i64) {
        if delta >= 0 {
            self.running.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.running.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// Books a resolution: counters, limits, registry, history.
    pub(crate) fn record_resolved(&self, token: &TokenInner, state: TokenState, error: Option<String>) {
        self.resolved[state as usize].fetch_add(1, Ordering::Release);
        token.op.limit.release();
        self.pending.release();
        self.unregister(token.id);
        token.route.release();
        if state == TokenState::Timeout {
            token.op.health.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        if self.recent_cap > 0 {
            let (worker_id, core_id) = token.core.placement();
            let record = Record {
                token_id: token.id,
                operation_type: token.op.name.clone(),
                seq: token.core.time(crate::token::Stamp::Finished).unwrap_or(0),
                state,
                created_ns: token.core.time(crate::token::Stamp::Created).unwrap_or(0),
                started_ns: token.core.time(crate::token::Stamp::Started),
                finished_ns: token.core.time(crate::token::Stamp::Finished).unwrap_or_else(now_ns),
                worker_id,
                core_id,
                error,
            };
            let mut recent = self.recent[token.id as usize % SHARDS].lock();
            if recent.len() >= self.recent_cap {
                recent.pop_front();
            }
            recent.push_back(record);
        }
    }

    /// The newest `limit` records, newest first.
    pub(crate) fn recent(&self, limit: usize) -> Vec<Record> {
        let mut all = self.history();
        all.reverse();
        all.truncate(limit);
        all
    }

    /// The newest `history_size` records, oldest first.
    pub(crate) fn history(&self) -> Vec<Record> {
        let mut all: Vec<Record> = self.recent.iter().flat_map(|s| s.lock().iter().cloned().collect::<Vec<_>>()).collect();
        all.sort_by_key(|r| (r.seq, r.token_id));
        let excess = all.len().saturating_sub(self.recent_cap);
        all.drain(..excess);
        all
    }

    pub(crate) fn total_resolved(&self) -> u64 {
        self.resolved.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }

    /// Submitted tokens not yet resolved.
    pub(crate) fn unresolved(&self) -> u64 {
        self.submitted.load(Ordering::Acquire).saturating_sub(self.total_resolved())
    }

    pub(crate) fn note_overrun(&self, ns: u64) {
        self.overruns.fetch_add(1, Ordering::Relaxed);
        self.overrun_total_ns.fetch_add(ns, Ordering::Relaxed);
        self.overrun_max_ns.fetch_max(ns, Ordering::Relaxed);
    }
}
