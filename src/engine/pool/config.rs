//! Pool configuration: how many workers, how they are pinned, their stacks.

use crate::engine::error::Error;

/// Smallest worker stack we accept. A 20,000-deep `json.dumps` overflows
/// Rust's 2 MiB default thread stack; 8 MiB is what Python's own threads get
/// from `ulimit -s` on Linux.
pub const MIN_STACK_SIZE: usize = 8 << 20;

/// The most worker threads one pool may have.
pub const MAX_WORKERS: usize = 4096;

/// How a [`crate::engine::pool::Pool`] is built. Validate with [`PoolConfig::validate`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Number of worker threads (at least 1).
    pub workers: usize,
    /// Pin worker `i` to core `i mod n` of the cores this process may use.
    pub pin_cores: bool,
    /// Stack size of each worker thread in bytes (raised to [`MIN_STACK_SIZE`]).
    pub stack_size: usize,
    /// Thread name prefix; workers are named `{prefix}-{index}`.
    pub thread_name: String,
    /// How many idle workers may spin looking for work at once before parking.
    pub max_spinners: usize,
    /// How many backoff rounds an idle worker spins before it parks.
    pub spin_rounds: u32,
    /// A prioritized job waiting this long gains one priority level.
    pub aging: std::time::Duration,
    /// Cores the workers are spread over (worker `i` -> core `i % cores`).
    pub cores: usize,
    /// Capacity units of each core (`workers_per_core`): light tokens take 1,
    /// medium 2, heavy all of them.
    pub units_per_core: u32,
    /// Start the monitor that lends the units of blocked jobs (Linux; see
    /// `blocking.rs`). Off by default: then units bound running jobs, whatever they do.
    pub blocking_monitor: bool,
    /// Addresses `[lo, hi)` of the interpreter's runtime state: a futex wait
    /// there is a wait for the GIL (busy, not blocked). None: no GIL.
    pub gil_window: Option<(usize, usize)>,
    /// Extra threads the pool may start while jobs are blocked (spare
    /// workers; they retire after `spare_idle` without work). 0: none.
    pub spare_threads: usize,
    /// How long an idle spare worker waits for work before it exits.
    pub spare_idle: std::time::Duration,
    /// Told the `Job::class` of each run the blocking monitor finds blocked
    /// (the Python binding keeps each operation's blocking history with it).
    pub on_lend: Option<LendHook>,
}

/// See `PoolConfig::on_lend`; called on the monitor's thread.
#[derive(Clone)]
pub struct LendHook(pub std::sync::Arc<dyn Fn(u32) + Send + Sync>);

impl std::fmt::Debug for LendHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LendHook")
    }
}

impl PoolConfig {
    /// A configuration with `workers` threads and the defaults for the rest.
    pub fn new(workers: usize) -> Self {
        PoolConfig {
            workers,
            pin_cores: true,
            stack_size: MIN_STACK_SIZE,
            thread_name: "tokengate-worker".to_owned(),
            max_spinners: 1,
            spin_rounds: 64,
            aging: std::time::Duration::from_millis(500),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            units_per_core: 4,
            blocking_monitor: false,
            gil_window: None,
            spare_threads: 0,
            spare_idle: std::time::Duration::from_secs(5),
            on_lend: None,
        }
    }

    /// Checks every field and returns a copy with the stack size raised to the minimum.
    pub fn validate(&self) -> Result<PoolConfig, Error> {
        if self.workers == 0 {
            return Err(Error::InvalidConfig("workers must be greater than 0".into()));
        }
        if self.workers > MAX_WORKERS {
            return Err(Error::InvalidConfig(format!("workers must be at most {MAX_WORKERS}, got {}", self.workers)));
        }
        if self.units_per_core == 0 || self.units_per_core as usize > MAX_WORKERS {
            return Err(Error::InvalidConfig(format!("units_per_core must be from 1 to {MAX_WORKERS}, got {}", self.units_per_core)));
        }
        if self.spare_threads > MAX_WORKERS {
            return Err(Error::InvalidConfig(format!("spare_threads must be at most {MAX_WORKERS}, got {}", self.spare_threads)));
        }
        if self.aging.is_zero() {
            return Err(Error::InvalidConfig("aging must be greater than 0".into()));
        }
        if self.units_per_core == 0 {
            return Err(Error::InvalidConfig("units_per_core must be greater than 0".into()));
        }
        if self.max_spinners == 0 {
            return Err(Error::InvalidConfig("max_spinners must be greater than 0".into()));
        }
        let mut out = self.clone();
        out.stack_size = out.stack_size.max(MIN_STACK_SIZE);
        Ok(out)
    }
}
