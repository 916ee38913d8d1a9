//! The engine: everything that schedules and books tokens, with no Python.
//!
//! * [`pool`]: the worker pool (a crossbeam-deque injector taken in
//!   submission order, parking_lot sleep/wake, per-core capacity, core
//!   pinning, the blocking monitor).
//! * [`token`]: the token state machine ([`token::TokenCell`]).
//! * [`io_lane`]: the elastic I/O lane, one tier per storage speed.
//! * [`outside`]: the queues of lanes that run tokens outside the engine's
//!   threads (worker processes, a cluster): the lane takes, runs and reports.
//! * [`timer`]: the deadline and retry timer thread.
//! * [`cpu`]: which CPU a thread runs on, and where waiters park (a resolver
//!   that woke a waiter on its own CPU does not spin for more work).
//! * [`admission`]: counting limits (an operation's, the engine's `max_pending`).
//! * [`ledger`]: per-engine books: operations, health, the token registry, history.
//! * [`routing`]: sticky keys and lead domains (which worker a token must run on).
//! * [`metrics`]: per-operation counters and histograms, and their Prometheus text.
//! * [`memory`]: handing freed memory back to the OS after a large burst.
//! * [`board`]: the memory the process lane shares with each worker process
//!   (which token it runs, which it must skip), and [`reply_stage`]: how a worker
//!   stages and sends its replies; [`wire`]: the framing of its socket.
//! * [`error`]: the engine's errors (the binding layer maps them to Python's).
//! * `sync`: the one place atomics and locks come from (loom's under `--cfg loom`).

pub mod admission;
pub mod board;
pub mod cpu;
pub mod error;
pub mod io_lane;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod outside;
pub mod pool;
pub mod reply_stage;
pub mod routing;
pub(crate) mod sync;
pub mod timer;
pub mod token;
pub mod wire;
