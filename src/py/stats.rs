//! Per-engine statistics as Python dicts: `Engine.stats()` and the execution
//! history (schemas in `tokengate/_tokengate.pyi`).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::engine_shared::EngineShared;
use super::operation::STORAGE_TIERS;
use super::token::{Ledger, OpState};
use crate::engine::ledger::{Health, Record};
use crate::engine::metrics::Outcome;
use crate::engine::sync::Ordering;
use crate::engine::token::{ns_to_unix, TokenState};

/// Topology, worker and token counters of `sh` as a dict.
pub(crate) fn engine_stats<'py>(py: Python<'py>, sh: &EngineShared) -> PyResult<Bound<'py, PyDict>> {
    let lg = &sh.ledger;
    let out = PyDict::new(py);

    let topo = PyDict::new(py);
    topo.set_item("physical_cores", sh.topology.physical_cores)?;
    topo.set_item("logical_cores", sh.topology.logical_cores)?;
    topo.set_item("workers_per_core", sh.workers_per_core)?;
    topo.set_item("total_workers", sh.pool.workers())?;
    topo.set_item("pinned_cores", sh.pool.pinned_cores())?;
    out.set_item("topology", topo)?;

    let tokens = PyDict::new(py);
    let (submitted, outcomes) = lg.totals();
    tokens.set_item("submitted", submitted)?;
    tokens.set_item("unresolved", submitted.saturating_sub(outcomes.iter().sum()))?;
    tokens.set_item("executing", lg.running_everywhere())?;
    for state in TokenState::ALL.iter().filter(|s| s.is_terminal()) {
        tokens.set_item(state.as_str(), outcomes[Outcome::of(*state) as usize])?;
    }
    tokens.set_item("retries", lg.retries.load(Ordering::Relaxed))?;
    out.set_item("tokens", tokens)?;

    let p = sh.pool.stats();
    let pool = PyDict::new(py);
    pool.set_item("workers", p.workers)?;
    pool.set_item("alive", p.alive)?;
    pool.set_item("spinning", p.spinning)?;
    pool.set_item("sleeping", p.sleeping)?;
    pool.set_item("queued", p.queued_global)?;
    pool.set_item("queued_global", p.queued_global)?;
    pool.set_item("wakes", p.wakes)?;
    pool.set_item("panics", p.panics)?;
    pool.set_item("core_units", p.core_units)?;
    pool.set_item("core_heavy", p.core_heavy)?;
    pool.set_item("heavy_peak", p.heavy_peak)?;
    pool.set_item("blocked", p.lent)?;
    pool.set_item("lends", p.lends)?;
    pool.set_item("spares", p.spares)?;
    pool.set_item("spares_peak", p.spares_peak)?;
    pool.set_item("reserved_cores", p.reserved)?;
    pool.set_item("deferred", p.deferred)?;
    pool.set_item("inbox", p.inbox)?;
    pool.set_item("cores", sh.pool.cores())?;
    pool.set_item("active_per_core", sh.pool.active_per_core().min(sh.workers_per_core as u32))?;
    out.set_item("pool", pool)?;

    let admission = PyDict::new(py);
    admission.set_item("paused", lg.admission_paused.load(Ordering::Relaxed))?;
    admission.set_item("max_pending", (lg.pending.limit() != 0).then(|| lg.pending.limit()))?;
    admission.set_item("pending", lg.pending.in_use())?;
    admission.set_item("peak_pending", lg.pending.peak())?;
    admission.set_item("blocked_callers", lg.pending.waiting())?;
    admission.set_item("rejected", lg.pending.rejected())?;
    admission.set_item("parked", lg.parked.lock().iter().filter(|j| !j.token().cell.is_done()).count())?;
    out.set_item("admission", admission)?;

    let timeouts = PyDict::new(py);
    timeouts.set_item("armed", sh.timer.len())?;
    timeouts.set_item("expired_queued", lg.timeouts_queued.load(Ordering::Relaxed))?;
    timeouts.set_item("expired_running", lg.timeouts_running.load(Ordering::Relaxed))?;
    timeouts.set_item("overruns", lg.overruns.load(Ordering::Relaxed))?;
    timeouts.set_item("overrun_total_s", lg.overrun_total_ns.load(Ordering::Relaxed) as f64 / 1e9)?;
    timeouts.set_item("overrun_max_s", lg.overrun_max_ns.load(Ordering::Relaxed) as f64 / 1e9)?;
    out.set_item("timeouts", timeouts)?;

    let io = sh.io.stats();
    let lane = PyDict::new(py);
    lane.set_item("threads", io.threads)?;
    lane.set_item("idle_threads", io.idle)?;
    lane.set_item("threads_started", io.spawned)?;
    let tiers = PyDict::new(py);
    for (name, t) in STORAGE_TIERS.iter().zip(io.tiers.iter()) {
        let d = PyDict::new(py);
        d.set_item("limit", t.limit)?;
        d.set_item("running", t.running)?;
        d.set_item("peak", t.peak)?;
        d.set_item("queued", t.queued)?;
        tiers.set_item(*name, d)?;
    }
    lane.set_item("tiers", tiers)?;
    let lanes = PyDict::new(py);
    lanes.set_item("io", lane)?;
    out.set_item("lanes", lanes)?;

    let conv = PyDict::new(py);
    conv.set_item("enabled", sh.convergence.enabled.load(Ordering::Relaxed))?;
    conv.set_item("interval_s", sh.convergence.interval.as_secs_f64())?;
    conv.set_item("pattern", sh.pool.active_per_core().min(sh.workers_per_core as u32))?;
    conv.set_item("decisions", sh.convergence.decisions.load(Ordering::Relaxed))?;
    conv.set_item("looks", sh.convergence.looks.load(Ordering::Relaxed))?;
    if let Some((p95, depth, util, decision)) = *sh.convergence.last.lock() {
        let last = PyDict::new(py);
        last.set_item("queue_wait_p95_s", p95)?;
        last.set_item("queue_depth", depth)?;
        last.set_item("utilization", util)?;
        last.set_item("pattern", decision)?;
        conv.set_item("last", last)?;
    }
    out.set_item("convergence", conv)?;

    let routing = PyDict::new(py);
    routing.set_item("sticky_keys", sh.sticky.snapshot().len())?;
    routing.set_item("domains", sh.domains.snapshot().len())?;
    out.set_item("routing", routing)?;

    let ops = PyDict::new(py);
    for op in lg.ops() {
        let d = PyDict::new(py);
        d.set_item("pending", op.limit.in_use())?;
        d.set_item("max_pending", (op.limit.limit() != 0).then(|| op.limit.limit()))?;
        d.set_item("peak_pending", op.limit.peak())?;
        d.set_item("rejected", op.limit.rejected())?;
        d.set_item("paused", op.paused.load(Ordering::Relaxed))?;
        d.set_item("parked", op.parked.lock().iter().filter(|j| !j.token().cell.is_done()).count())?;
        d.set_item("blocked", op.blocked.load(Ordering::Relaxed))?;
        d.set_item("health", health_dict(py, &op)?)?;
        ops.set_item(&*op.name, d)?;
    }
    out.set_item("operations", ops)?;
    Ok(out)
}

fn health_dict<'py>(py: Python<'py>, op: &OpState) -> PyResult<Bound<'py, PyDict>> {
    let h = &op.health;
    let c = op.health_counts();
    let d = PyDict::new(py);
    let attempts = c.runs;
    let successes = c.runs - c.failed.min(c.runs);
    d.set_item("attempts", attempts)?;
    d.set_item("successes", successes)?;
    d.set_item("failures", c.failed.min(c.runs))?;
    d.set_item("timeouts", h.timeouts.load(Ordering::Relaxed))?;
    let secs = |ns: u64| ns as f64 / 1e9;
    d.set_item("min_time", (attempts > 0).then(|| secs(h.min_ns.load(Ordering::Relaxed))))?;
    d.set_item("max_time", (attempts > 0).then(|| secs(h.max_ns.load(Ordering::Relaxed))))?;
    d.set_item("mean_time", (attempts > 0).then(|| secs(c.total_ns) / attempts as f64))?;
    d.set_item("success_rate", (attempts > 0).then(|| successes as f64 / attempts as f64))?;
    d.set_item("health", Health::class(c))?;
    Ok(d)
}

pub(crate) fn records_list<'py>(py: Python<'py>, ledger: &Ledger, records: Vec<Record>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for r in records {
        let d = PyDict::new(py);
        d.set_item("token_id", r.token_id)?;
        d.set_item("operation_type", &*ledger.op_name(r.op_index))?;
        d.set_item("state", r.state.as_str())?;
        d.set_item("created_at", (r.created_ns != 0).then(|| ns_to_unix(r.created_ns)))?;
        d.set_item("started_at", r.started_ns.map(ns_to_unix))?;
        d.set_item("finished_at", ns_to_unix(r.finished_ns))?;
        d.set_item("wait_time", r.started_ns.map(|s| s.saturating_sub(r.created_ns) as f64 / 1e9))?;
        d.set_item("execution_time", r.started_ns.map(|s| r.finished_ns.saturating_sub(s) as f64 / 1e9))?;
        d.set_item("worker_id", r.worker_id)?;
        d.set_item("core_id", r.core_id)?;
        d.set_item("error", r.error)?;
        out.append(d)?;
    }
    Ok(out)
}
