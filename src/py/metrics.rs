//! Prometheus text for the binding: reads engines' books into the views of
//! `crate::engine::metrics` and renders them, off the GIL. Nothing here runs on the
//! token paths (those write `OpState::metrics`; see `ledger.rs`).

use std::sync::Arc;

use super::engine_shared::EngineShared;
use crate::engine::metrics::{cap_operations, render, OpView, PoolView};
use crate::engine::sync::Ordering;

/// One engine's gauges and its operations' metrics, read now.
fn views(sh: &EngineShared) -> (PoolView, Vec<OpView>) {
    let lg = &sh.ledger;
    let pool = sh.pool.id().to_string();
    let stats = sh.pool.stats();
    let running = lg.running_everywhere();
    let view = PoolView {
        pool: pool.clone(),
        queued: lg.unresolved().saturating_sub(running),
        running,
        blocked: stats.lent as u64,
        workers: [
            ("cpu".into(), stats.alive as u64), // spares included
            ("io".into(), sh.io.stats().threads as u64),
            ("process".into(), lg.process_workers.load(Ordering::Relaxed)),
        ]
        .into_iter()
        .chain(lg.outside.all().filter(|q| q.name() != "process").map(|q| (q.name().to_owned().into(), q.workers())))
        .collect(),
        admission_paused: lg.admission_paused.load(Ordering::Relaxed),
        outside: lg
            .outside
            .all()
            .map(|q| {
                let (queued, taken) = q.counts();
                (q.name().to_owned(), queued as u64, taken as u64, q.lost())
            })
            .collect(),
    };
    let ops = lg
        .ops()
        .iter()
        .map(|op| OpView {
            pool: pool.clone(),
            operation: op.name.to_string(),
            metrics: op.metrics.snapshot(),
            paused: op.paused.load(Ordering::Relaxed),
            blocked: op.blocked.load(Ordering::Relaxed),
            health: op.health_class(),
        })
        .collect();
    let ops = cap_operations(ops);
    (view, ops)
}

/// The Prometheus text of `engines` (no interpreter needed).
pub(crate) fn render_engines(engines: &[Arc<EngineShared>]) -> String {
    let mut pools = Vec::with_capacity(engines.len());
    let mut ops = Vec::new();
    for sh in engines {
        let (p, o) = views(sh);
        pools.push(p);
        ops.extend(o);
    }
    render(&pools, &ops)
}
