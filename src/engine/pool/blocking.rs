//! Blocking-aware capacity: a running job that blocks gives its core units
//! back, and takes them again when it runs once more.
//!
//! Core units (`capacity.rs`) bound how many jobs *run* on a core, which is
//! right for work that needs the CPU (under the GIL more runnable threads only
//! rotate the interpreter) and wrong for work that sleeps in the kernel: a
//! job waiting on a barrier, a queue, a lock, a socket or `time.sleep` holds
//! units another job could use, and jobs that wait for each other deadlock.
//! So a monitor thread watches the workers that run a job, and lends the
//! units of one that is blocked to the pool: another worker then takes
//! queued work. Nothing is pre-empted: a blocked job that becomes runnable
//! takes its units again at once, even past the core's budget (a debt: the
//! core starts nothing new until it is paid back).
//!
//! # Telling blocked from busy
//!
//! Each tick (1 ms while anything changes, up to `MAX_TICK` while only busy
//! or long-blocked jobs run, from one tick up to `IDLE_POLL` while no job runs; the monitor
//! parks once none has run for `DEEP_IDLE`, and the next job to begin wakes
//! it), for every
//! worker whose job was already running two ticks before (short jobs cost no
//! read at all), the monitor reads `/proc/self/task/<tid>/schedstat` (CPU time so far). A
//! job that used more than `BUSY_NS` of CPU since its previous reading is
//! busy. Otherwise it reads `/proc/self/task/<tid>/syscall`: `running` is
//! busy too, and so is a `futex` wait on an address inside the interpreter's
//! runtime state (`PoolConfig::gil_window`): that is a thread waiting for
//! the GIL, which is waiting for the CPU, not blocking. Anything else (a
//! `futex` on a lock, queue, event or barrier in the heap, `nanosleep`,
//! `select`, `recv`, `wait4`, ...) is blocked: the job's units are lent. A
//! lent job is looked at every `LENT_EVERY` ticks: one that used more than
//! `BUSY_NS` of CPU since it was last looked at takes its units back; one
//! found waiting for the GIL is looked at again after `GIL_RECHECK` ticks. A
//! tick makes at most `READS_PER_TICK` reads (round robin), and the files of
//! the first `OPEN_WATCHES` workers stay open (opened when the monitor
//! starts, so the process's file count does not change while it runs).
//!
//! # Protocol: the run word
//!
//! Each worker has one `RunCell`, whose word packs the run number (bumped at
//! every job), the state (`IDLE`, `RUNNING`, `LENT`) and the units the job holds.
//!
//! * The worker stores a `RUNNING` word once it has taken the job's units
//!   (`begin`), and swaps in `IDLE` when the job returns (`end`). It gives
//!   the units back itself only if the word it swapped out was `RUNNING`.
//! * The monitor moves `RUNNING` to `LENT` (CAS on the same run) and only
//!   then gives the units back (`Shared::lend`); it moves `LENT` back to
//!   `RUNNING` (CAS on the same run) only after it took the units again
//!   (`Shared::retake`), and gives them back if the CAS fails (the run ended).
//! * So for every run, whoever moves the word out of `RUNNING` gives the
//!   units back, exactly once. The lender counts the loan on the core
//!   (`CoreBudget::lend`) before its CAS (and uncounts it if the CAS fails);
//!   whoever ends the loan (a retake, or the worker's `end`) uncounts it.
//! * Only units are lent. A heavy job stays its core's heavy job while lent
//!   (`heavy_running`, kept by the worker from start to end), so no other
//!   heavy job starts on that core: once it runs again it has the core's CPU
//!   to itself, after the light and medium jobs that started meanwhile end.
//! * A worker whose job ends outside the active pattern (a loan had let it
//!   in) wakes a worker for queued work, since it takes none itself.
//!
//! Only the worker writes `IDLE` and `RUNNING` words of a new run; only the
//! monitor writes the `RUNNING` word that ends a loan. `LENT` words come
//! from the monitor, or from the worker itself before a body that starts
//! lent (`Pool::lend_current`, the same CAS and the same rule).
//!
//! # After a loan
//!
//! * Threads: queued work that no spinning worker nor starting spare will
//!   take starts spare workers (`Shared::ensure_taker`): one for each lent
//!   job that lacks one, and at least one; a spare's own run, if it starts
//!   lent, starts the next. A spare takes shared work only while some job
//!   is lent (`Shared::is_active`).
//! * The monitor's loans only: the embedder hears of each
//!   (`PoolConfig::on_lend`, with the run's `Job::class`), and the Python
//!   binding counts it in the operation's blocking history, so a burst of
//!   calls that block starts lent after four loans.
//!
//! # Shutdown
//!
//! The monitor holds the pool's `Shared` and exits when the pool terminates
//! and every worker has exited (it checks at each tick and when woken).

use super::job::NO_CLASS;
use crate::engine::sync::{AtomicU32, AtomicU64, Ordering};

pub(crate) const IDLE: u64 = 0;
pub(crate) const RUNNING: u64 = 1;
pub(crate) const LENT: u64 = 2;

/// A job that used more CPU than this since the previous tick is busy.
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const BUSY_NS: u64 = 50_000;
/// How often the monitor looks while any worker runs a job.
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const TICK: std::time::Duration = std::time::Duration::from_millis(1);
/// While no job runs, the monitor looks this often...
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(10);
/// ...and parks once none has run for this long (a job that begins then wakes it).
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const DEEP_IDLE: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest tick, once nothing changes (only busy or long-blocked jobs).
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const MAX_TICK: std::time::Duration = std::time::Duration::from_millis(16);
/// A lent job is looked at every this many ticks (a blocked job rarely wakes).
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const LENT_EVERY: usize = 8;
/// A job found waiting for the GIL is looked at again after this many ticks.
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const GIL_RECHECK: usize = 4;
/// At most this many `/proc` reads per tick (round robin over the workers).
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const READS_PER_TICK: usize = 32;
/// The `/proc` files of this many workers stay open (two each); the files of
/// workers beyond are opened for each read.
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const OPEN_WATCHES: usize = 8;
/// A parked monitor looks anyway after this long (a safety net: the wake-up is not lost).
#[cfg(all(target_os = "linux", not(loom)))]
pub(super) const PARK_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The run word of a job: (run, state, units), packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) run: u32,
    pub(crate) state: u64,
    pub(crate) units: u32,
}

impl Run {
    fn pack(self) -> u64 {
        u64::from(self.run) | (self.state << 32) | (u64::from(self.units) << 34)
    }

    fn unpack(word: u64) -> Run {
        Run { run: word as u32, state: (word >> 32) & 3, units: (word >> 34) as u32 }
    }

    fn with_state(self, state: u64) -> Run {
        Run { state, ..self }
    }
}

/// What one worker runs now (see the protocol).
#[derive(Debug)]
pub(crate) struct RunCell {
    word: crossbeam_utils::CachePadded<AtomicU64>,
    /// The worker thread's kernel id (0 until it started).
    pub(crate) tid: AtomicU64,
    /// `Job::class` of the run (written by the worker before `begin`).
    class: AtomicU32,
    /// When the run began (`token::now_ns`), stamped only where the monitor samples for the GIL (see `contention.rs`).
    began: AtomicU64,
}

impl RunCell {
    pub(crate) fn new() -> Self {
        RunCell {
            word: crossbeam_utils::CachePadded::new(AtomicU64::new(0)),
            tid: AtomicU64::new(0),
            class: AtomicU32::new(NO_CLASS),
            began: AtomicU64::new(0),
        }
    }

    /// The next run's `Job::class` (the worker, before `begin`).
    pub(crate) fn set_class(&self, class: u32) {
        self.class.store(class, Ordering::Release);
    }

    /// The `Job::class` of the current run.
    pub(crate) fn class(&self) -> u32 {
        self.class.load(Ordering::Acquire)
    }

    /// Stamps the next run's start (`token::now_ns`), before `begin` (see `contention.rs`).
    pub(crate) fn stamp_began(&self, now_ns: u64) {
        self.began.store(now_ns, Ordering::Relaxed);
    }

    /// When the current (or last) run began, if stamped (see `stamp_began`).
    pub(crate) fn began_ns(&self) -> u64 {
        self.began.load(Ordering::Relaxed)
    }

    pub(crate) fn load(&self) -> Run {
        Run::unpack(self.word.load(Ordering::SeqCst))
    }

    /// The worker starts a job holding `units` (SeqCst: see `monitor::park`).
    pub(crate) fn begin(&self, units: u32) {
        let run = Run::unpack(self.word.load(Ordering::Relaxed)).run.wrapping_add(1);
        self.word.store(Run { run, state: RUNNING, units }.pack(), Ordering::SeqCst);
    }

    /// The worker's job returned. True when the worker still holds the units
    /// (the run was not lent): then it gives them back itself.
    pub(crate) fn end(&self) -> bool {
        let cur = Run::unpack(self.word.load(Ordering::Relaxed));
        let was = Run::unpack(self.word.swap(cur.with_state(IDLE).pack(), Ordering::AcqRel));
        was.state == RUNNING
    }

    /// `RUNNING` -> `LENT` for run `seen`; true when this caller now owes the units back to the core.
    pub(crate) fn try_lend(&self, seen: Run) -> bool {
        seen.state == RUNNING
            && self.word.compare_exchange(seen.pack(), seen.with_state(LENT).pack(), Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// `LENT` -> `RUNNING` for run `seen` (the caller took the units again first).
    pub(crate) fn try_retake(&self, seen: Run) -> bool {
        seen.state == LENT
            && self.word.compare_exchange(seen.pack(), seen.with_state(RUNNING).pack(), Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// The calling thread's kernel thread id, from `/proc/thread-self` (0 when unknown).
pub(crate) fn current_tid() -> u64 {
    #[cfg(all(target_os = "linux", not(loom)))]
    {
        if let Ok(link) = std::fs::read_link("/proc/thread-self") {
            if let Some(tid) = link.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()) {
                return tid;
            }
        }
    }
    0
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_word_round_trips() {
        let r = Run { run: u32::MAX, state: LENT, units: 4096 };
        assert_eq!(Run::unpack(r.pack()), r);
        let r = Run { run: 7, state: RUNNING, units: 1 };
        assert_eq!(Run::unpack(r.pack()), r);
    }

    #[test]
    fn units_go_back_exactly_once() {
        let cell = RunCell::new();
        cell.begin(2);
        let seen = cell.load();
        // lent first: the worker's end must not give them back again
        assert!(cell.try_lend(seen));
        assert!(!cell.try_lend(seen));
        assert!(!cell.end());
        // a retake that races the end of the run fails
        assert!(!cell.try_retake(seen));
        // not lent: the worker gives them back
        cell.begin(2);
        assert_eq!(cell.load().run, seen.run + 1);
        assert!(cell.end());
        // lent, retaken, then the worker gives them back
        cell.begin(1);
        let seen = cell.load();
        assert!(cell.try_lend(seen));
        assert!(cell.try_retake(cell.load()));
        assert!(cell.end());
    }
}
