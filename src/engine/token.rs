//! The token state machine, independent of what a token carries.
//!
//! [`TokenCell`] holds one token's state, timestamps and placement (the
//! worker and the CPU core it started on), and the lock-protected `slot`
//! where the binding layer keeps what the token carries (its outcome,
//! listeners, bookkeeping).
//!
//! # States
//!
//! * `CREATED`: made by a call, not yet handed to the scheduler.
//! * `WAITING`: held by the scheduler (admission limits, dependencies, pauses).
//! * `ADMITTED`: in a run queue.
//! * `EXECUTING`: a worker is running its body.
//! * `COMPLETED`, `FAILED`, `KILLED`, `TIMEOUT`, `CANCELLED`: terminal.
//!
//! # Protocol
//!
//! * Forward moves to `WAITING`, `ADMITTED` and `EXECUTING` are a single
//!   compare-and-swap on `state`, without the lock.
//! * A terminal move happens under the `slot` lock: the resolver CASes the
//!   state to the internal `RESOLVING` marker (readers still see the state
//!   it came from), fills the slot (outcome, listeners, bookkeeping such as
//!   admission slots and counters), then publishes the terminal state and
//!   wakes blocked waiters before it unlocks. It therefore happens exactly
//!   once, and whoever sees a terminal `state` sees everything the resolver
//!   did (a caller whose `result()` returned finds its admission slot free).
//! * `start` (to `EXECUTING`) and a cancel (to `CANCELLED`) race through the
//!   same atomic, so exactly one wins: a cancelled token never runs, and a
//!   token that started can no longer be cancelled (only killed or timed out,
//!   which resolve its waiters while the body finishes on its own).
//! * Blocked waiters count themselves in `waiters` under the lock; a resolver
//!   signals the condvar only when that count is non-zero.

// The clock's offset is plain std: it is process-wide and outside the loom models.
use std::sync::atomic::{AtomicI64, Ordering as ClockOrdering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Condvar, Mutex, MutexGuard, Ordering};

/// Lifecycle state of a token (the original's eight states plus `Cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TokenState {
    /// Made, not yet handed to the scheduler.
    Created = 0,
    /// Held back by the scheduler (limits, dependencies, pauses).
    Waiting = 1,
    /// In a run queue.
    Admitted = 2,
    /// Running on a worker.
    Executing = 3,
    /// Returned a value.
    Completed = 4,
    /// Raised an exception.
    Failed = 5,
    /// Killed by `kill()` or the control plane.
    Killed = 6,
    /// Passed its deadline.
    Timeout = 7,
    /// Cancelled before it started.
    Cancelled = 8,
}

impl TokenState {
    /// All states, in numeric order.
    pub const ALL: [TokenState; 9] = [
        TokenState::Created,
        TokenState::Waiting,
        TokenState::Admitted,
        TokenState::Executing,
        TokenState::Completed,
        TokenState::Failed,
        TokenState::Killed,
        TokenState::Timeout,
        TokenState::Cancelled,
    ];

    fn from_u8(v: u8) -> TokenState {
        TokenState::ALL[v as usize]
    }

    /// True for the five end states.
    pub fn is_terminal(self) -> bool {
        self as u8 >= TokenState::Completed as u8
    }

    /// True before the body started (it can still be cancelled).
    pub fn is_pending(self) -> bool {
        (self as u8) < TokenState::Executing as u8
    }

    /// The lowercase name used by the Python API.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Created => "created",
            TokenState::Waiting => "waiting",
            TokenState::Admitted => "admitted",
            TokenState::Executing => "executing",
            TokenState::Completed => "completed",
            TokenState::Failed => "failed",
            TokenState::Killed => "killed",
            TokenState::Timeout => "timeout",
            TokenState::Cancelled => "cancelled",
        }
    }
}

/// The process clock: the CPU's invariant time-stamp counter through
/// `quanta` (about 11 ns a read here, against 28 ns for `Instant::now`; a
/// token reads the clock three times), calibrated against the OS monotonic
/// clock once (under a millisecond); quanta falls back to the OS clock
/// where the TSC is not usable.
///
/// Stamps are monotonic; Unix times are derived from them only when read
/// (`ns_to_unix`), through `unix_offset`: the wall clock minus the process
/// clock. The wall clock can be stepped while a process runs (NTP or
/// chrony correcting a VM restored from a snapshot; an administrator), and
/// the process clock drifts slowly from it, so the offset is measured again
/// at each conversion and replaced when it has moved by more than
/// [`OFFSET_SLACK_NS`]. Within the slack one held offset converts every
/// stamp, so stamps read together keep their order exactly.
struct Clock {
    source: quanta::Clock,
    base: u64,
    unix_offset: AtomicI64,
}

/// How far the held wall-clock offset may lag the measured one.
const OFFSET_SLACK_NS: i64 = 1_000_000;

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let source = quanta::Clock::new();
        let base = source.raw();
        let c = Clock { source, base, unix_offset: AtomicI64::new(0) };
        c.unix_offset.store(c.measured_offset(), ClockOrdering::Relaxed);
        c
    })
}

impl Clock {
    fn now_ns(&self) -> u64 {
        self.source.delta_as_nanos(self.base, self.source.raw()) + 1
    }

    /// The wall clock, in Unix nanoseconds, minus the process clock now.
    fn measured_offset(&self) -> i64 {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        unix - self.now_ns() as i64
    }
}

/// Monotonic nanoseconds since the process clock base, never 0.
pub fn now_ns() -> u64 {
    clock().now_ns()
}

/// Converts a `now_ns` reading to seconds since the Unix epoch, by the wall
/// clock as it reads now (see [`Clock`]).
pub fn ns_to_unix(ns: u64) -> f64 {
    let c = clock();
    let measured = c.measured_offset();
    let held = c.unix_offset.load(ClockOrdering::Relaxed);
    let offset = if (measured - held).abs() > OFFSET_SLACK_NS {
        c.unix_offset.store(measured, ClockOrdering::Relaxed);
        measured
    } else {
        held
    };
    (ns as i64 - 1 + offset) as f64 / 1e9
}

/// Index of each timestamp in [`TokenCell::time`].
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Stamp {
    /// When the call made the token.
    Created = 0,
    /// When the token entered a run queue.
    Admitted = 1,
    /// When a worker started the body.
    Started = 2,
    /// When the token reached a terminal state.
    Finished = 3,
}

pub(crate) const NO_WORKER: u32 = u32::MAX;

/// How long `TokenCell::wait` spins before it parks.
const WAIT_SPIN: Duration = Duration::from_micros(20);

std::thread_local! {
    /// Set by a resolution that woke a parked waiter (see `take_woke_waiter`).
    static WOKE_WAITER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a resolution on this thread woke a parked waiter since the last
/// call (and clears it). The woken thread often lands on the resolver's CPU
/// (the kernel places a wakee near its waker), where a resolver that goes on
/// spinning for more work keeps it from running.
pub fn take_woke_waiter() -> bool {
    WOKE_WAITER.with(|w| w.replace(false))
}

/// Internal state value while a resolver fills the slot (see the protocol).
const RESOLVING: u8 = u8::MAX;

/// State, timestamps and the lock-protected slot `S` of one token.
#[derive(Debug)]
pub struct TokenCell<S> {
    state: AtomicU8,
    /// The state a resolver started from, reported while `state == RESOLVING`.
    resolving_from: AtomicU8,
    cancel_requested: AtomicBool,
    /// Someone waits for this token (set when a wait begins).
    awaited: AtomicBool,
    waiters: AtomicU32,
    worker: AtomicU32,
    /// The CPU core of the worker that started the body (`NO_WORKER`: not pinned, or not started).
    core: AtomicU32,
    times: [AtomicU64; 4],
    slot: Mutex<S>,
    cv: Condvar,
}

impl<S> TokenCell<S> {
    /// A new token in `CREATED`, stamped now.
    pub fn new(slot: S) -> Self {
        TokenCell {
            state: AtomicU8::new(TokenState::Created as u8),
            resolving_from: AtomicU8::new(TokenState::Created as u8),
            cancel_requested: AtomicBool::new(false),
            awaited: AtomicBool::new(false),
            waiters: AtomicU32::new(0),
            worker: AtomicU32::new(NO_WORKER),
            core: AtomicU32::new(NO_WORKER),
            times: [AtomicU64::new(now_ns()), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            slot: Mutex::new(slot),
            cv: Condvar::new(),
        }
    }

    /// The current state.
    #[inline]
    pub fn state(&self) -> TokenState {
        match self.state.load(Ordering::Acquire) {
            RESOLVING => TokenState::from_u8(self.resolving_from.load(Ordering::Acquire)),
            v => TokenState::from_u8(v),
        }
    }

    /// True once a terminal state was reached.
    #[inline]
    pub fn is_done(&self) -> bool {
        self.state().is_terminal()
    }

    /// A timestamp (`now_ns` units), if it was taken.
    pub fn time(&self, which: Stamp) -> Option<u64> {
        Some(self.times[which as usize].load(Ordering::Acquire)).filter(|&t| t != 0)
    }

    /// Worker index and pinned core of the worker that started the body.
    pub fn placement(&self) -> (Option<u32>, Option<u32>) {
        let w = self.worker.load(Ordering::Acquire);
        let c = self.core.load(Ordering::Acquire);
        ((w != NO_WORKER).then_some(w), (c != NO_WORKER).then_some(c))
    }

    /// Whether someone asked the running body to stop (cooperative).
    pub fn cancel_requested(&self) -> bool {
        self.cancel_requested.load(Ordering::Acquire)
    }

    /// Asks a running body to stop at its next check.
    pub fn request_cancel(&self) {
        self.cancel_requested.store(true, Ordering::Release);
    }

    fn advance(&self, allowed: impl Fn(TokenState) -> bool, to: TokenState) -> bool {
        self.advance_raw(allowed, to as u8)
    }

    fn advance_raw(&self, allowed: impl Fn(TokenState) -> bool, to: u8) -> bool {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            // A token being resolved is as good as resolved: no other move.
            if cur == RESOLVING || !allowed(TokenState::from_u8(cur)) {
                return false;
            }
            match self.state.compare_exchange_weak(cur, to, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// `CREATED`/`ADMITTED` -> `WAITING` (held back: paused, limits, dependencies).
    pub fn hold(&self) -> bool {
        self.advance(|s| matches!(s, TokenState::Created | TokenState::Admitted), TokenState::Waiting)
    }

    /// `EXECUTING` -> `WAITING`: the body failed and will be tried again.
    pub fn requeue(&self) -> bool {
        self.advance(|s| s == TokenState::Executing, TokenState::Waiting)
    }

    /// `CREATED`/`WAITING` -> `ADMITTED`, stamping the admission time (a
    /// token admitted straight from `CREATED` reuses its creation stamp:
    /// one clock read less on the hot path).
    pub fn admit(&self) -> bool {
        let t = if self.state() == TokenState::Created { self.times[Stamp::Created as usize].load(Ordering::Relaxed) } else { now_ns() };
        let ok = self.advance(|s| matches!(s, TokenState::Created | TokenState::Waiting), TokenState::Admitted);
        if ok {
            self.times[Stamp::Admitted as usize].store(t, Ordering::Release);
        }
        ok
    }

    /// `EXECUTING` -> `ADMITTED` for a token that was taken and is handed back
    /// before its body ran (an outside lane's requeue). Its start and worker
    /// are cleared first (the body never ran, whether or not the token was
    /// resolved meanwhile), and it keeps its first admission stamp, so its
    /// times read as if it had waited in the queue all along. False when it
    /// was resolved first.
    pub fn hand_back(&self) -> bool {
        self.times[Stamp::Started as usize].store(0, Ordering::Release);
        self.worker.store(NO_WORKER, Ordering::Release);
        self.core.store(NO_WORKER, Ordering::Release);
        self.advance(|s| s == TokenState::Executing, TokenState::Admitted)
    }

    /// Records which worker runs the token (an outside lane places a token
    /// on one of its workers after it started it).
    pub fn set_worker(&self, worker: u32) {
        self.worker.store(worker, Ordering::Release);
    }

    /// Any pending state -> `EXECUTING` on `worker` (pinned to `core`).
    /// False when the token was resolved first (then the body must not run).
    pub fn start(&self, worker: u32, core: Option<u32>) -> bool {
        let t = now_ns();
        let ok = self.advance(TokenState::is_pending, TokenState::Executing);
        if ok {
            self.worker.store(worker, Ordering::Release);
            self.core.store(core.unwrap_or(NO_WORKER), Ordering::Release);
            let admitted = &self.times[Stamp::Admitted as usize];
            if admitted.load(Ordering::Acquire) == 0 {
                admitted.store(t, Ordering::Release);
            }
            self.times[Stamp::Started as usize].store(t, Ordering::Release);
        }
        ok
    }

    /// Moves to the terminal state `to` if `allowed(current)`, running `fill`
    /// on the slot under the lock, and wakes blocked waiters. Returns
    /// `fill`'s value, or None when the token was already resolved or the
    /// current state is not allowed.
    pub fn resolve<R>(&self, allowed: impl Fn(TokenState) -> bool, to: TokenState, fill: impl FnOnce(&mut S) -> R) -> Option<R> {
        self.resolve_at(allowed, to, None, fill)
    }

    /// `resolve` with the finish time already read (`None`: read it now).
    pub fn resolve_at<R>(
        &self,
        allowed: impl Fn(TokenState) -> bool,
        to: TokenState,
        finished_ns: Option<u64>,
        fill: impl FnOnce(&mut S) -> R,
    ) -> Option<R> {
        debug_assert!(to.is_terminal());
        let mut slot = self.slot.lock();
        // Under the lock no other resolver runs; lock-free moves (start,
        // hold) may still race, so `resolving_from` is set before each try.
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if cur == RESOLVING || TokenState::from_u8(cur).is_terminal() || !allowed(TokenState::from_u8(cur)) {
                return None;
            }
            self.resolving_from.store(cur, Ordering::Release);
            match self.state.compare_exchange_weak(cur, RESOLVING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.times[Stamp::Finished as usize].store(finished_ns.unwrap_or_else(now_ns), Ordering::Release);
        let out = fill(&mut slot);
        self.state.store(to as u8, Ordering::Release);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.cv.notify_all();
            if crate::engine::cpu::waiter_parked_here() {
                WOKE_WAITER.with(|w| w.set(true));
            }
        }
        Some(out)
    }

    /// Locks the slot (to read the outcome or register a listener).
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.slot.lock()
    }

    /// The slot if it is free now (a process forked while another thread
    /// held it would otherwise wait for ever).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, S>> {
        self.slot.try_lock()
    }

    /// True once someone began to wait for the token.
    pub fn is_awaited(&self) -> bool {
        self.awaited.load(Ordering::Acquire)
    }

    /// Spins up to `limit` until someone waits for the token (or it started or is done).
    pub fn spin_until_awaited(&self, limit: Duration) {
        let start = Instant::now();
        while !self.is_awaited() && self.state().is_pending() && start.elapsed() < limit {
            std::hint::spin_loop();
        }
    }

    /// Spins (no sleep) up to `limit` for the token to finish; true when done.
    pub fn spin_until_done(&self, limit: Duration) -> bool {
        self.awaited.store(true, Ordering::Release);
        let start = Instant::now();
        let mut round = 0u32;
        while !self.is_done() {
            if start.elapsed() >= limit {
                return false;
            }
            // No yield (see `wait`).
            for _ in 0..(1u32 << round.min(6)) {
                std::hint::spin_loop();
            }
            round += 1;
        }
        true
    }

    /// Blocks until the token is done or `timeout` passes; true when done.
    /// Spins briefly first, so a fast completion costs no sleep.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.wait_spinning(timeout, true)
    }

    /// `wait`, spinning first only when `spin`: a token that another process
    /// runs ends after a round trip of a hundred microseconds or more, and a
    /// waiter spinning for it takes a CPU from that process.
    pub fn wait_spinning(&self, timeout: Option<Duration>, spin: bool) -> bool {
        if self.is_done() {
            return true;
        }
        self.awaited.store(true, Ordering::Release);
        // A short spin (wall time, no yield: a yield can hand the core to a
        // CPU-bound neighbour for its whole slice), then park. The state is
        // read at least every 16 pause hints (well under a microsecond): a
        // coarser backoff (up to 128 hints, several microseconds on cores
        // whose pause is slow) added its own delay to a round trip, by as
        // much as a tenth, and made it depend on code layout.
        if spin {
            let start = Instant::now();
            for round in 0..u32::MAX {
                for _ in 0..(1u32 << round.min(4)) {
                    std::hint::spin_loop();
                }
                if self.is_done() {
                    return true;
                }
                if round >= 7 && start.elapsed() >= WAIT_SPIN {
                    break;
                }
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut slot = self.slot.lock();
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let _parked = crate::engine::cpu::Parked::here();
        while !self.is_done() {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut slot, d).timed_out() {
                        break;
                    }
                }
                None => self.cv.wait(&mut slot),
            }
        }
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        self.is_done()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn unix_now() -> f64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
    }

    #[test]
    fn unix_times_follow_a_stepped_wall_clock() {
        let stamp = now_ns();
        assert!((ns_to_unix(stamp) - unix_now()).abs() < 0.5);
        // As if the wall clock had been stepped 12 s since the offset was taken
        // (held offset now 12 s off): the next conversion measures it again.
        let c = clock();
        c.unix_offset.fetch_sub(12_000_000_000, ClockOrdering::Relaxed);
        assert!((ns_to_unix(stamp) - unix_now()).abs() < 0.5, "a stale offset was used");
        // Within the slack the held offset stays, so stamps keep their order.
        let later = now_ns();
        assert!(ns_to_unix(stamp) <= ns_to_unix(later));
    }

    #[test]
    fn happy_path_stamps_and_resolves_once() {
        let t = TokenCell::new(None::<u32>);
        assert_eq!(t.state(), TokenState::Created);
        assert!(t.admit());
        assert!(t.start(3, Some(1)));
        assert_eq!(t.placement(), (Some(3), Some(1)));
        assert_eq!(t.resolve(|s| s == TokenState::Executing, TokenState::Completed, |s| *s = Some(7)), Some(()));
        assert!(t.resolve(|_| true, TokenState::Killed, |_| ()).is_none());
        assert_eq!(*t.lock(), Some(7));
        assert!(t.time(Stamp::Created) <= t.time(Stamp::Admitted));
        assert!(t.time(Stamp::Started) <= t.time(Stamp::Finished));
    }

    #[test]
    fn cancelled_token_never_starts() {
        let t = TokenCell::new(());
        t.admit();
        assert!(t.resolve(TokenState::is_pending, TokenState::Cancelled, |_| ()).is_some());
        assert!(!t.start(0, None));
        assert_eq!(t.state(), TokenState::Cancelled);
    }

    #[test]
    fn started_token_cannot_be_cancelled() {
        let t = TokenCell::new(());
        assert!(t.start(0, None));
        assert!(t.resolve(TokenState::is_pending, TokenState::Cancelled, |_| ()).is_none());
        assert_eq!(t.state(), TokenState::Executing);
    }

    #[test]
    fn cancel_races_start_exactly_one_wins() {
        for _ in 0..2000 {
            let t = Arc::new(TokenCell::new(()));
            t.admit();
            let t2 = t.clone();
            let h = std::thread::spawn(move || t2.start(0, None));
            let cancelled = t.resolve(TokenState::is_pending, TokenState::Cancelled, |_| ()).is_some();
            let started = h.join().unwrap();
            assert!(cancelled ^ started);
        }
    }

    #[test]
    fn wait_times_out_then_sees_completion() {
        let t = Arc::new(TokenCell::new(()));
        assert!(!t.wait(Some(Duration::from_millis(20))));
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            t2.start(0, None);
            t2.resolve(|_| true, TokenState::Completed, |_| ());
        });
        assert!(t.wait(Some(Duration::from_secs(10))));
        h.join().unwrap();
    }

    #[test]
    fn state_names_and_order() {
        let names: Vec<_> = TokenState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), 9);
        assert!(TokenState::ALL[..4].iter().all(|s| !s.is_terminal()));
        assert!(TokenState::ALL[4..].iter().all(|s| s.is_terminal()));
    }
}
