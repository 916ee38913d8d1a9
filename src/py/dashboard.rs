//! The dashboard of one engine: what the server (`crate::dashboard`) reads and
//! does, and `DashboardServer`, the handle `Engine.serve` returns.
//!
//! Reads (`/metrics`, the snapshot, operations, tokens) take no interpreter:
//! they read the engine's books from the server's thread, so they answer
//! while Python threads hold the GIL. An admin action attaches to the
//! interpreter (resolving a token may run Python callbacks) and answers 503
//! once the engine stopped or the interpreter is exiting. The server holds
//! the engine weakly: it never keeps a stopped engine alive.

use std::sync::{Arc, Weak};

use pyo3::prelude::*;
use serde_json::{json, Value};

use super::engine_shared::EngineShared;
use super::exceptions::BindError;
use super::lifecycle::is_forked;
use super::operation::STORAGE_TIERS;
use super::token::OpState;
use crate::dashboard::{Action, Backend, OpVerb, Refusal, ServeConfig, Server, TokenQuery};
use crate::engine::metrics::{HistogramSnapshot, Outcome, EXECUTION_BOUNDS, QUEUE_WAIT_BOUNDS};
use crate::engine::sync::{Mutex, Ordering};
use crate::engine::token::{now_ns, ns_to_unix, Stamp, TokenState};

/// The backend of one engine's dashboard.
struct EngineBackend {
    engine: Weak<EngineShared>,
}

impl EngineBackend {
    fn engine(&self) -> Result<Arc<EngineShared>, Refusal> {
        match self.engine.upgrade() {
            Some(e) if !e.is_stopping() && !is_forked() => Ok(e),
            _ => Err(Refusal::Gone),
        }
    }
}

/// The upper bound (seconds) of the bucket where the `q` quantile falls; None when empty.
fn quantile(h: &HistogramSnapshot, bounds: &[&str], q: f64) -> Option<f64> {
    let count = h.count();
    if count == 0 {
        return None;
    }
    let want = (q * count as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in h.counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            // Past the last bound: say the last bound (the true value is above it).
            return bounds.get(i).or(bounds.last()).and_then(|b| b.parse().ok());
        }
    }
    None
}

fn histogram(h: &HistogramSnapshot, bounds: &[&str]) -> Value {
    let count = h.count();
    json!({
        "count": count,
        "sum_s": h.sum_ns as f64 / 1e9,
        "mean_s": (count > 0).then(|| h.sum_ns as f64 / 1e9 / count as f64),
        "p50_s": quantile(h, bounds, 0.5),
        "p95_s": quantile(h, bounds, 0.95),
    })
}

fn operation(op: &OpState) -> Value {
    let m = op.metrics.snapshot();
    let outcome = |o: Outcome| m.outcomes[o as usize];
    json!({
        "name": &*op.name,
        "paused": op.paused.load(Ordering::Relaxed),
        "blocked": op.blocked.load(Ordering::Relaxed),
        "health": op.health_class(),
        "pending": op.limit.in_use(),
        "max_pending": (op.limit.limit() != 0).then(|| op.limit.limit()),
        "submitted": m.submitted,
        "completed": outcome(Outcome::Ok),
        "failed": outcome(Outcome::Error),
        "cancelled": outcome(Outcome::Cancelled),
        "killed": outcome(Outcome::Killed),
        "timeout": outcome(Outcome::Timeout),
        "rejected": m.rejected.iter().sum::<u64>(),
        "queue_wait": histogram(&m.queue_wait, &QUEUE_WAIT_BOUNDS),
        "execution": histogram(&m.execution, &EXECUTION_BOUNDS),
    })
}

fn snapshot(sh: &EngineShared) -> Value {
    let lg = &sh.ledger;
    let pool = sh.pool.stats();
    let io = sh.io.stats();
    let (submitted, outcomes) = lg.totals();
    let unresolved = submitted.saturating_sub(outcomes.iter().sum());
    let in_processes = lg.running_in_processes();
    let running = lg.running() + in_processes;
    let io_running: usize = io.tiers.iter().map(|t| t.running).sum();
    let io_queued: usize = io.tiers.iter().map(|t| t.queued).sum();
    let cpu_queued = pool.queued_global + pool.deferred + pool.inbox.iter().sum::<usize>();
    let outcome = |o: Outcome| outcomes[o as usize];
    let mut lanes = vec![
        json!({ "lane": "cpu", "workers": pool.alive, "running": lg.running().saturating_sub(io_running as u64), "queued": cpu_queued }),
        json!({ "lane": "io", "workers": io.threads, "running": io_running, "queued": io_queued,
          "tiers": STORAGE_TIERS.iter().zip(&io.tiers).map(|(name, t)| json!({
              "tier": name, "limit": t.limit, "running": t.running, "queued": t.queued })).collect::<Vec<_>>() }),
    ];
    // The outside lanes: the process lane (a row even before its first token), then clusters.
    let outside: Vec<_> = lg.outside.all().collect();
    if !outside.iter().any(|q| q.name() == "process") {
        lanes.push(json!({ "lane": "process", "workers": lg.process_workers.load(Ordering::Relaxed), "running": 0, "queued": 0 }));
    }
    for q in outside {
        let (queued, taken) = q.counts();
        let workers = if q.name() == "process" { lg.process_workers.load(Ordering::Relaxed) } else { q.workers() };
        lanes.push(json!({ "lane": q.name(), "workers": workers, "running": taken, "queued": queued }));
    }
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "time": ns_to_unix(now_ns()),
        "pool": sh.pool.id(),
        "tokens": {
            "submitted": submitted,
            "unresolved": unresolved,
            "running": running,
            "queued": unresolved.saturating_sub(running),
            "blocked": pool.lent,
            "completed": outcome(Outcome::Ok),
            "failed": outcome(Outcome::Error),
            "cancelled": outcome(Outcome::Cancelled),
            "killed": outcome(Outcome::Killed),
            "timeout": outcome(Outcome::Timeout),
        },
        "admission": {
            "paused": lg.admission_paused.load(Ordering::Relaxed),
            "pending": lg.pending.in_use(),
            "max_pending": (lg.pending.limit() != 0).then(|| lg.pending.limit()),
            "rejected": lg.pending.rejected(),
        },
        "lanes": lanes,
        "operations": lg.ops().iter().map(|op| operation(op)).collect::<Vec<_>>(),
    })
}

impl Backend for EngineBackend {
    fn metrics(&self) -> Result<String, Refusal> {
        Ok(super::metrics::render_engines(std::slice::from_ref(&self.engine()?)))
    }

    fn snapshot(&self) -> Result<Value, Refusal> {
        let engine = self.engine()?;
        Ok(snapshot(&engine))
    }

    fn operations(&self) -> Result<Value, Refusal> {
        let engine = self.engine()?;
        Ok(Value::Array(engine.ledger.ops().iter().map(|op| operation(op)).collect()))
    }

    fn tokens(&self, query: &TokenQuery) -> Result<Value, Refusal> {
        let engine = self.engine()?;
        let state = match &query.state {
            None => None,
            Some(s) => Some(TokenState::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
                let names: Vec<&str> = TokenState::ALL.iter().map(|t| t.as_str()).collect();
                Refusal::BadRequest(format!("state must be one of {names:?}, got {s:?}"))
            })?),
        };
        let mut tokens = engine.ledger.live_tokens(query.op.as_deref());
        tokens.retain(|t| state.is_none_or(|s| t.cell.state() == s));
        tokens.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
        tokens.truncate(query.limit);
        let now = now_ns();
        let rows = tokens
            .iter()
            .map(|t| {
                let created = t.cell.time(Stamp::Created);
                let started = t.cell.time(Stamp::Started);
                let (worker, core) = t.cell.placement();
                json!({
                    "token_id": t.id,
                    "operation": &*t.op().name,
                    "state": t.cell.state().as_str(),
                    "priority": t.priority,
                    "created_at": created.map(ns_to_unix),
                    "started_at": started.map(ns_to_unix),
                    "age_s": created.map(|c| now.saturating_sub(c) as f64 / 1e9),
                    "worker_id": worker,
                    "core_id": core,
                })
            })
            .collect();
        Ok(Value::Array(rows))
    }

    fn act(&self, action: &Action) -> Result<Value, Refusal> {
        let engine = self.engine()?;
        let done = Python::try_attach(|py| -> Result<Value, Refusal> {
            let failed = |e: PyErr| Refusal::Failed(e.to_string());
            match action {
                Action::Admission { pause: true } => Ok(json!({ "paused": true, "held": engine.pause_admission() })),
                Action::Admission { pause: false } => Ok(json!({ "paused": false, "released": engine.resume_admission(py) })),
                Action::Operation { op, verb } => {
                    if engine.ledger.find_op(op).is_none() {
                        return Err(Refusal::UnknownOperation(op.clone()));
                    }
                    Ok(match verb {
                        OpVerb::Pause => json!({ "operation": op, "paused": true, "held": engine.pause_operation(op) }),
                        OpVerb::Resume => json!({ "operation": op, "paused": false, "released": engine.resume_operation(py, op) }),
                        OpVerb::Drain => json!({ "operation": op, "cancelled": engine.drain_operation(py, op) }),
                        OpVerb::Kill => {
                            json!({ "operation": op, "killed": engine.kill_operation(py, Some(op), "dashboard").map_err(failed)? })
                        }
                    })
                }
            }
        });
        done.unwrap_or(Err(Refusal::Gone))
    }
}

/// A running dashboard server. See `tokengate/_tokengate.pyi`.
#[pyclass(frozen, name = "DashboardServer", module = "tokengate._tokengate")]
#[derive(Debug)]
pub(crate) struct DashboardServer {
    server: Arc<Server>,
    admin: bool,
}

/// Every server started in this process, to stop at interpreter exit (their
/// admin actions must not reach a finalizing interpreter).
static SERVERS: Mutex<Vec<Weak<Server>>> = Mutex::new(Vec::new());

/// Stops every server of this process (at interpreter exit), the GIL released.
pub(crate) fn stop_all(py: Python<'_>) {
    let servers: Vec<Arc<Server>> = std::mem::take(&mut *SERVERS.lock()).iter().filter_map(Weak::upgrade).collect();
    py.detach(|| servers.iter().for_each(|s| s.stop()));
}

impl Drop for DashboardServer {
    fn drop(&mut self) {
        // Dropped while running: stop it with the GIL released, so that an admin
        // action waiting for the GIL can finish and its thread be joined.
        if self.server.is_running() {
            let server = &self.server;
            if Python::try_attach(|py| py.detach(|| server.stop())).is_none() {
                server.stop();
            }
        }
    }
}

/// Starts serving `engine` (see `crate::dashboard` for what it serves and how it is guarded).
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve(
    py: Python<'_>,
    engine: &Arc<EngineShared>,
    host: &str,
    port: u16,
    admin: bool,
    url_prefix: &str,
    token: Option<String>,
    auth: bool,
    allowed_hosts: Vec<String>,
) -> PyResult<DashboardServer> {
    let token = match (auth, token) {
        (true, Some(t)) => Some(t),
        (true, None) => Some(crate::dashboard::new_token().map_err(BindError::Runtime)?),
        (false, None) => None,
        (false, Some(_)) => return Err(BindError::Value("a token was given with auth=False".into()).into()),
    };
    let config = ServeConfig { host: host.to_owned(), port, admin, url_prefix: url_prefix.to_owned(), token, allowed_hosts };
    let backend = Arc::new(EngineBackend { engine: Arc::downgrade(engine) });
    let server = Arc::new(py.detach(|| Server::start(config, backend)).map_err(BindError::Value)?);
    {
        let mut all = SERVERS.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&server));
    }
    Ok(DashboardServer { server, admin })
}

#[pymethods]
impl DashboardServer {
    /// The page's URL (with the one-time `?token=` when there is a token).
    #[getter]
    fn url(&self) -> String {
        self.server.url()
    }

    /// The token clients show (`Authorization: Bearer <token>`), or None.
    #[getter]
    fn token(&self) -> Option<String> {
        self.server.token().map(str::to_owned)
    }

    #[getter]
    fn host(&self) -> String {
        self.server.address().ip().to_string()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.server.address().port()
    }

    /// Whether admin actions are allowed.
    #[getter]
    fn admin(&self) -> bool {
        self.admin
    }

    #[getter]
    fn running(&self) -> bool {
        self.server.is_running()
    }

    /// Stops serving; the port is free when it returns. Idempotent.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.server.stop());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, py: Python<'_>, _exc_type: Py<PyAny>, _exc: Py<PyAny>, _tb: Py<PyAny>) -> bool {
        self.stop(py);
        false
    }

    fn __repr__(&self) -> String {
        let base = self.server.url();
        let base = base.split('?').next().unwrap_or_default();
        format!("<DashboardServer {base} admin={} running={}>", self.admin, self.server.is_running())
    }
}
