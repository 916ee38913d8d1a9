//! The `Job` trait: what the pool needs to know about a job.

use super::capacity::Weight;

/// `Job::class` of a job in no group.
pub const NO_CLASS: u32 = u32::MAX;

/// What the pool needs to know about a job.
pub trait Job: Send + 'static {
    /// How much of a core it needs (see `capacity.rs`).
    fn weight(&self) -> Weight {
        Weight::Light
    }

    /// The embedder's group of this job (the Python binding: its operation),
    /// reported to `PoolConfig::on_lend` when the monitor finds a run of it
    /// blocked. `NO_CLASS`: none.
    fn class(&self) -> u32 {
        NO_CLASS
    }

    /// When it was submitted (`crate::engine::token::now_ns` units), if known: lets
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
