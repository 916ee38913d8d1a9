//! Per-operation metrics: counters and fixed-bucket histograms, written on
//! the token paths without atomic read-modify-writes where one thread owns
//! the shard, added up only when read, and rendered in the Prometheus text
//! format (version 0.0.4).
//!
//! # Who touches what
//!
//! * An operation's metrics are split into [`SHARDS`] shards, each on cache
//!   lines of its own: `OWNED` shards that one thread each owns while it
//!   lives, and one shared by every other thread. A thread claims a free
//!   owned shard index the first time it writes (a lock-free bitmask, `FREE`)
//!   and gives it back when it exits; the index is the same in every
//!   operation. The owner of a shard is its only writer, so it adds with a
//!   load and a store (no `lock`ed instruction on the token paths); threads
//!   past the first `OWNED` alive at once write the shared shard with atomic
//!   adds. A thread that claims an index given back sees every write of its
//!   previous owner (the bitmask's release and acquire order them).
//! * Threads that submit or resolve tokens of one operation at once write
//!   different lines (no line is shared by every worker, as one counter would be).
//! * Writers never read; readers ([`OpMetrics::snapshot`]) add the shards up
//!   and take no lock. A snapshot taken while tokens resolve is exact for
//!   each counter, but a histogram's count and its sum may disagree by the
//!   observations in flight, as Prometheus clients allow.
//! * The engine's own totals (tokens made, resolved by state) are these
//!   counters added up over the operations: the token paths write one
//!   sharded counter, not a sharded one and a global one besides.
//! * Counters only grow: nothing resets them (an operation's health resets
//!   after an unblock; its metrics do not, as Prometheus counters must not).

use std::fmt::Write as _;

use crossbeam_utils::CachePadded;

use crate::engine::sync::{AtomicU64, Ordering};
use crate::engine::token::TokenState;

/// Shards that one thread each owns while it lives.
const OWNED: usize = 16;
/// Shards per operation: the owned ones, and one that any other thread shares.
pub const SHARDS: usize = OWNED + 1;

/// The owned shard indices free now, one bit each (std's atomics: a static, and never model-checked).
static FREE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new((1 << OWNED) - 1);

/// A thread's shard index; an owned one goes back to `FREE` when the thread exits.
struct Claim(usize);

impl Claim {
    fn take() -> Claim {
        use std::sync::atomic::Ordering as O;
        let mut free = FREE.load(O::Acquire);
        while free != 0 {
            let bit = free.trailing_zeros();
            match FREE.compare_exchange_weak(free, free & !(1 << bit), O::AcqRel, O::Acquire) {
                Ok(_) => return Claim(bit as usize),
                Err(now) => free = now,
            }
        }
        Claim(OWNED)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.0 < OWNED {
            FREE.fetch_or(1 << self.0, std::sync::atomic::Ordering::Release);
        }
    }
}

thread_local! {
    static CLAIM: Claim = Claim::take();
}

/// The shard this thread writes: `OWNED` (the shared one) once its claim is gone (thread exit).
#[inline]
fn writer() -> usize {
    CLAIM.try_with(|c| c.0).unwrap_or(OWNED)
}

/// Adds `by` to `counter` of shard `shard` (see "Who touches what").
#[inline]
fn bump(counter: &AtomicU64, by: u64, shard: usize, order: Ordering) {
    if shard < OWNED {
        // The owner is the only writer: a load and a store, no read-modify-write.
        counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), order);
    } else {
        counter.fetch_add(by, order);
    }
}

/// Upper bounds of the queue-wait buckets, in seconds as rendered (`le`), up to 30 minutes.
pub const QUEUE_WAIT_BOUNDS: [&str; 17] =
    ["0.0001", "0.0005", "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "5", "10", "30", "60", "120", "300", "900", "1800"];
/// Upper bounds of the execution-time buckets, in seconds as rendered (`le`).
pub const EXECUTION_BOUNDS: [&str; 17] =
    ["0.0001", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "60", "300"];
const BUCKETS: usize = 17;

/// How a token ended, as counted (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Outcome {
    Ok = 0,
    Error = 1,
    Cancelled = 2,
    Killed = 3,
    Timeout = 4,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [Outcome::Ok, Outcome::Error, Outcome::Cancelled, Outcome::Killed, Outcome::Timeout];

    pub fn label(self) -> &'static str {
        ["ok", "error", "cancelled", "killed", "timeout"][self as usize]
    }

    /// The outcome of a token that reached the terminal state `state`.
    pub fn of(state: TokenState) -> Outcome {
        match state {
            TokenState::Completed => Outcome::Ok,
            TokenState::Failed => Outcome::Error,
            TokenState::Killed => Outcome::Killed,
            TokenState::Timeout => Outcome::Timeout,
            _ => Outcome::Cancelled,
        }
    }
}

/// Why a call was refused a token (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Rejection {
    /// The operation's own limit was full.
    OperationLimit = 0,
    /// The coordinator's `max_pending` was full.
    MaxPending = 1,
    /// The operation is blocked (auto-blocked, or blocked by an admin).
    Blocked = 2,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Rejection::OperationLimit, Rejection::MaxPending, Rejection::Blocked];

    pub fn label(self) -> &'static str {
        ["operation_limit", "max_pending", "blocked"][self as usize]
    }
}

/// The bounds in nanoseconds, in the order of their rendered form (a test checks that they agree).
const QUEUE_WAIT_NS: [u64; BUCKETS] = [
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
    300_000_000_000,
    900_000_000_000,
    1_800_000_000_000,
];
const EXECUTION_NS: [u64; BUCKETS] = [
    100_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    60_000_000_000,
    300_000_000_000,
];

/// One shard of a histogram: a count per bucket (not cumulative; the last is `+Inf`) and the sum.
#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    #[inline]
    fn observe(&self, bounds: &[u64; BUCKETS], ns: u64, shard: usize) {
        // The bucket is the number of bounds below `ns`: a count without branches.
        let i = bounds.iter().map(|&b| usize::from(b < ns)).sum::<usize>();
        bump(&self.counts[i], 1, shard, Ordering::Relaxed);
        bump(&self.sum_ns, ns, shard, Ordering::Relaxed);
    }
}

/// A histogram added up over the shards.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Per bucket, not cumulative; the last is `+Inf`.
    pub counts: [u64; BUCKETS + 1],
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn add(&mut self, h: &Histogram) {
        for (c, a) in self.counts.iter_mut().zip(&h.counts) {
            *c += a.load(Ordering::Relaxed);
        }
        self.sum_ns += h.sum_ns.load(Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Shard {
    submitted: AtomicU64,
    outcomes: [AtomicU64; 5],
    rejected: [AtomicU64; 3],
    /// Runs of a body that did not succeed (the execution histogram counts every run).
    failed_runs: AtomicU64,
    queue_wait: Histogram,
    execution: Histogram,
}

/// The metrics of one operation on one engine.
#[derive(Debug)]
pub struct OpMetrics {
    shards: Box<[CachePadded<Shard>]>,
}

impl Default for OpMetrics {
    fn default() -> Self {
        OpMetrics { shards: (0..SHARDS).map(|_| CachePadded::new(Shard::default())).collect() }
    }
}

impl OpMetrics {
    /// A token of this operation was made (on the submitting thread's shard).
    pub fn submitted(&self) {
        let w = writer();
        bump(&self.shards[w].submitted, 1, w, Ordering::Release);
    }

    /// A call was refused a token.
    pub fn rejected(&self, why: Rejection) {
        let w = writer();
        bump(&self.shards[w].rejected[why as usize], 1, w, Ordering::Relaxed);
    }

    /// A token resolved: its outcome, and for a token that started, its wait
    /// in the queue (creation to start). Its runs are counted by [`OpMetrics::ran`].
    pub fn resolved(&self, outcome: Outcome, queue_wait_ns: Option<u64>) {
        let w = writer();
        let s = &self.shards[w];
        bump(&s.outcomes[outcome as usize], 1, w, Ordering::Release);
        if let Some(ns) = queue_wait_ns {
            s.queue_wait.observe(&QUEUE_WAIT_NS, ns, w);
        }
    }

    /// A body ran for `ns` (one run per attempt: a retried token runs more than once).
    pub fn ran(&self, succeeded: bool, ns: u64) {
        let w = writer();
        let s = &self.shards[w];
        s.execution.observe(&EXECUTION_NS, ns, w);
        if !succeeded {
            bump(&s.failed_runs, 1, w, Ordering::Relaxed);
        }
    }

    /// Runs so far, the failed ones among them, and their total time: what an
    /// operation's health is made of (see `OpState` in the binding's ledger).
    pub fn runs(&self) -> RunCounts {
        let mut out = RunCounts::default();
        for s in self.shards.iter() {
            out.runs += s.execution.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
            out.failed += s.failed_runs.load(Ordering::Relaxed);
            out.total_ns += s.execution.sum_ns.load(Ordering::Relaxed);
        }
        out
    }

    /// Tokens made and tokens resolved (by [`Outcome`]), added up: the counters alone.
    /// Resolutions are read first, so a token counted resolved is counted made.
    pub fn counts(&self) -> (u64, [u64; 5]) {
        let mut outcomes = [0u64; 5];
        for s in self.shards.iter() {
            for (o, a) in outcomes.iter_mut().zip(&s.outcomes) {
                *o += a.load(Ordering::Acquire);
            }
        }
        let submitted = self.shards.iter().map(|s| s.submitted.load(Ordering::Acquire)).sum();
        (submitted, outcomes)
    }

    /// Every shard added up.
    pub fn snapshot(&self) -> OpSnapshot {
        let mut out = OpSnapshot::default();
        for s in self.shards.iter() {
            out.submitted += s.submitted.load(Ordering::Relaxed);
            for (o, a) in out.outcomes.iter_mut().zip(&s.outcomes) {
                *o += a.load(Ordering::Relaxed);
            }
            for (o, a) in out.rejected.iter_mut().zip(&s.rejected) {
                *o += a.load(Ordering::Relaxed);
            }
            out.queue_wait.add(&s.queue_wait);
            out.execution.add(&s.execution);
        }
        out
    }
}

/// Runs of an operation's bodies, added up (see [`OpMetrics::runs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub runs: u64,
    pub failed: u64,
    pub total_ns: u64,
}

impl RunCounts {
    /// The counts since `base` (an earlier reading).
    pub fn since(self, base: RunCounts) -> RunCounts {
        RunCounts {
            runs: self.runs.saturating_sub(base.runs),
            failed: self.failed.saturating_sub(base.failed),
            total_ns: self.total_ns.saturating_sub(base.total_ns),
        }
    }
}

/// [`OpMetrics`] added up at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpSnapshot {
    pub submitted: u64,
    /// By [`Outcome`].
    pub outcomes: [u64; 5],
    /// By [`Rejection`].
    pub rejected: [u64; 3],
    pub queue_wait: HistogramSnapshot,
    pub execution: HistogramSnapshot,
}

impl OpSnapshot {
    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &OpSnapshot) {
        self.submitted += other.submitted;
        for (a, b) in self.outcomes.iter_mut().zip(other.outcomes) {
            *a += b;
        }
        for (a, b) in self.rejected.iter_mut().zip(other.rejected) {
            *a += b;
        }
        for (mine, theirs) in [(&mut self.queue_wait, &other.queue_wait), (&mut self.execution, &other.execution)] {
            for (a, b) in mine.counts.iter_mut().zip(theirs.counts) {
                *a += b;
            }
            mine.sum_ns += theirs.sum_ns;
        }
    }
}

/// Operations an engine renders by name; the rest are added up under
/// [`OTHER_OPERATIONS`] (a label's values stay bounded, as Prometheus asks).
pub const MAX_OPERATION_LABELS: usize = 200;
/// The `operation` value of the operations past [`MAX_OPERATION_LABELS`].
pub const OTHER_OPERATIONS: &str = "_other";

/// `ops` (of one engine) with at most [`MAX_OPERATION_LABELS`] values of the
/// `operation` label: past that, the operations with the fewest tokens are
/// added up under [`OTHER_OPERATIONS`] (not paused, not blocked, health `unknown`).
pub fn cap_operations(mut ops: Vec<OpView>) -> Vec<OpView> {
    if ops.len() <= MAX_OPERATION_LABELS {
        return ops;
    }
    ops.sort_by(|a, b| b.metrics.submitted.cmp(&a.metrics.submitted).then_with(|| a.operation.cmp(&b.operation)));
    let rest = ops.split_off(MAX_OPERATION_LABELS - 1);
    let mut other = OpView {
        pool: rest[0].pool.clone(),
        operation: OTHER_OPERATIONS.to_owned(),
        metrics: OpSnapshot::default(),
        paused: false,
        blocked: false,
        health: "unknown",
    };
    for op in &rest {
        other.metrics.merge(&op.metrics);
    }
    ops.push(other);
    ops.sort_by(|a, b| a.operation.cmp(&b.operation));
    ops
}

/// One operation as rendered: its labels' values, its counters, its state.
#[derive(Debug, Clone)]
pub struct OpView {
    pub pool: String,
    pub operation: String,
    pub metrics: OpSnapshot,
    pub paused: bool,
    pub blocked: bool,
    /// The health class (`unknown`, `excellent`, `healthy`, `at_risk`, `problematic`).
    pub health: &'static str,
}

/// One engine's gauges, as rendered.
#[derive(Debug, Clone, Default)]
pub struct PoolView {
    pub pool: String,
    /// Tokens made and not yet started.
    pub queued: u64,
    pub running: u64,
    /// Running tokens blocked in the kernel (their core units lent).
    pub blocked: u64,
    /// (lane, threads): `cpu` workers, `io` threads, `process` workers, then
    /// each other outside lane's workers (a cluster's threads).
    pub workers: Vec<(std::borrow::Cow<'static, str>, u64)>,
    pub admission_paused: bool,
    /// Outside lanes: (name, tokens queued, tokens taken, workers lost so far).
    pub outside: Vec<(String, u64, u64, u64)>,
}

/// A per-engine gauge: its name, its help, and how to read it from a [`PoolView`].
type PoolGauge = (&'static str, &'static str, fn(&PoolView) -> u64);

/// The health classes, in the order they are rendered.
pub const HEALTH_CLASSES: [&str; 5] = ["unknown", "excellent", "healthy", "at_risk", "problematic"];

/// Escapes a label value (backslash, double quote, newline), as the text format asks.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, bounds: &[&str; BUCKETS], h: &HistogramSnapshot) {
    let mut cumulative = 0u64;
    for (le, n) in bounds.iter().zip(&h.counts) {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    cumulative += h.counts[BUCKETS];
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(h.sum_ns));
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

/// Renders engines and their operations in the Prometheus text format: each
/// family once, with its HELP and TYPE, and a sample per engine (`pool`
/// label) and operation (`operation` label).
pub fn render(pools: &[PoolView], ops: &[OpView]) -> String {
    let mut out = String::with_capacity(1024 + ops.len() * 6 * 1024);
    let op_labels: Vec<String> =
        ops.iter().map(|o| format!("pool=\"{}\",operation=\"{}\"", escape(&o.pool), escape(&o.operation))).collect();

    family(&mut out, "tokengate_tokens_submitted_total", "counter", "Tokens made, per operation.");
    for (o, l) in ops.iter().zip(&op_labels) {
        let _ = writeln!(out, "tokengate_tokens_submitted_total{{{l}}} {}", o.metrics.submitted);
    }
    family(&mut out, "tokengate_tokens_completed_total", "counter", "Tokens resolved, per operation and outcome.");
    for (o, l) in ops.iter().zip(&op_labels) {
        for outcome in Outcome::ALL {
            let n = o.metrics.outcomes[outcome as usize];
            let _ = writeln!(out, "tokengate_tokens_completed_total{{{l},outcome=\"{}\"}} {n}", outcome.label());
        }
    }
    family(&mut out, "tokengate_tokens_rejected_total", "counter", "Calls refused a token, per operation and reason.");
    for (o, l) in ops.iter().zip(&op_labels) {
        for why in Rejection::ALL {
            let n = o.metrics.rejected[why as usize];
            let _ = writeln!(out, "tokengate_tokens_rejected_total{{{l},reason=\"{}\"}} {n}", why.label());
        }
    }
    family(&mut out, "tokengate_queue_wait_seconds", "histogram", "Time from a token's creation to the start of its run.");
    for (o, l) in ops.iter().zip(&op_labels) {
        histogram(&mut out, "tokengate_queue_wait_seconds", l, &QUEUE_WAIT_BOUNDS, &o.metrics.queue_wait);
    }
    family(
        &mut out,
        "tokengate_execution_seconds",
        "histogram",
        "Time each run of an operation's body took (a retried token runs more than once).",
    );
    for (o, l) in ops.iter().zip(&op_labels) {
        histogram(&mut out, "tokengate_execution_seconds", l, &EXECUTION_BOUNDS, &o.metrics.execution);
    }
    family(&mut out, "tokengate_operation_paused", "gauge", "1 while the operation is paused.");
    for (o, l) in ops.iter().zip(&op_labels) {
        let _ = writeln!(out, "tokengate_operation_paused{{{l}}} {}", u8::from(o.paused));
    }
    family(&mut out, "tokengate_operation_blocked", "gauge", "1 while the operation is blocked.");
    for (o, l) in ops.iter().zip(&op_labels) {
        let _ = writeln!(out, "tokengate_operation_blocked{{{l}}} {}", u8::from(o.blocked));
    }
    family(&mut out, "tokengate_operation_health", "gauge", "1 for the operation's health class, 0 for the others.");
    for (o, l) in ops.iter().zip(&op_labels) {
        for class in HEALTH_CLASSES {
            let _ = writeln!(out, "tokengate_operation_health{{{l},class=\"{class}\"}} {}", u8::from(o.health == class));
        }
    }
    let pool_labels: Vec<String> = pools.iter().map(|p| format!("pool=\"{}\"", escape(&p.pool))).collect();
    let gauges: [PoolGauge; 4] = [
        ("tokengate_tokens_queued", "Tokens made and not yet started.", |p| p.queued),
        ("tokengate_tokens_running", "Tokens running now.", |p| p.running),
        ("tokengate_tokens_blocked", "Running tokens blocked in the kernel (their core units lent).", |p| p.blocked),
        ("tokengate_admission_paused", "1 while admission of new tokens is paused.", |p| u64::from(p.admission_paused)),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        for (p, l) in pools.iter().zip(&pool_labels) {
            let _ = writeln!(out, "{name}{{{l}}} {}", value(p));
        }
    }
    family(&mut out, "tokengate_workers", "gauge", "Threads or processes that run tokens, per lane.");
    for (p, l) in pools.iter().zip(&pool_labels) {
        for (lane, n) in &p.workers {
            let _ = writeln!(out, "tokengate_workers{{{l},lane=\"{}\"}} {n}", escape(lane));
        }
    }
    family(&mut out, "tokengate_lane_tokens", "gauge", "Tokens of an outside lane (processes, a cluster), queued or taken by it.");
    for (p, l) in pools.iter().zip(&pool_labels) {
        for (lane, queued, taken, _) in &p.outside {
            let lane = escape(lane);
            let _ = writeln!(out, "tokengate_lane_tokens{{{l},lane=\"{lane}\",state=\"queued\"}} {queued}");
            let _ = writeln!(out, "tokengate_lane_tokens{{{l},lane=\"{lane}\",state=\"taken\"}} {taken}");
        }
    }
    family(&mut out, "tokengate_lane_workers_lost_total", "counter", "Cluster workers lost while they ran a token, per outside lane.");
    for (p, l) in pools.iter().zip(&pool_labels) {
        for (lane, _, _, lost) in &p.outside {
            let _ = writeln!(out, "tokengate_lane_workers_lost_total{{{l},lane=\"{}\"}} {lost}", escape(lane));
        }
    }
    out
}

#[cfg(all(test, not(loom)))]
mod tests;
