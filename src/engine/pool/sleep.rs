//! Sleep and wake-up of idle workers.
//!
//! # Protocol
//!
//! An idle worker is in one of three phases: **spinning** (searching the
//! queues with a short backoff, counted in `spinners`), **sleeping** (parked
//! on its own condvar, counted in `sleepers` and listed in `idle`), or
//! **running** (counted in neither).
//!
//! Both counts live in one `AtomicU64` (`spinners` in the low 32 bits,
//! `sleepers` in the high 32 bits) so that a phase change is one atomic step.
//!
//! * **Submitter** (`notify_work`): push the job, then `fence(SeqCst)`, then
//!   read the counts. If a worker is spinning on another CPU it will find
//!   the job: do nothing. Otherwise, if one sleeps, wake exactly one, among
//!   those that can take shared work now (inside the active pattern, room on
//!   its core), preferring one that parked on another CPU. If none can, the
//!   work waits for a running worker: it looks for more work as soon as its
//!   job ends and its units are free. A burst of submissions therefore wakes
//!   at most one sleeper (one more while every spinner counts on the
//!   submitter's CPU): the woken worker is counted as a spinner at once,
//!   which silences the rest of the burst.
//!
//!   A spinner on the submitter's own CPU does not count: it cannot run
//!   while the submitter does, and on a busy machine (a CPU-bound process
//!   on the other CPU) the two can share one CPU for a long time, each hand-
//!   off then waiting for the submitter to block. Such a submitter wakes a
//!   sleeper that parked on another CPU instead (`Placement`).
//! * **Waker** (`wake_one`): under the `idle` lock pop one sleeper and move
//!   one unit from `sleepers` to `spinners` (the woken worker inherits the
//!   spinning role), then set its slot's `notified` flag and signal it.
//! * **Worker going to sleep** (`sleep`): clear its `notified` flag; under the
//!   `idle` lock list itself and move from `spinners` (if it was spinning) to
//!   `sleepers`; `fence(SeqCst)`; re-check the queues. If work appeared, it
//!   takes itself off the list again (unless a waker already did). Else it
//!   waits until `notified`.
//! * **Chain wake**: a spinner that finds a job leaves the spinning phase and,
//!   if more work is visible, calls `notify_work` itself, so wake-ups spread
//!   one worker at a time while work remains.
//!
//! Why no wake-up is lost: the submitter's push and the sleeper's
//! registration are each followed by a SeqCst fence before the other side's
//! state is read (the store-buffer pattern), so at least one of them sees the
//! other: either the submitter sees the sleeper (and wakes it) or the sleeper
//! sees the job (and does not sleep).
//!
//! Placement is a hint, kept with relaxed atomics beside the counts: a wrong
//! reading can only add a wake-up (a spinner elsewhere would have found the
//! job) or skip one that a spinner on this CPU makes up for once the
//! submitter blocks, as before.
//!
//! Shutdown: `wake_all` pops every sleeper, as `wake_one` does, after the
//! terminate flag is set; a worker checks the flag before it parks.
//!
//! A timed sleep (`sleep_until`, spare workers that retire when idle): when
//! the deadline passes, the worker takes the `idle` lock; if it is still
//! listed it takes itself off (counted as nothing) and times out; if not, a
//! waker already took it off and counted it as a spinner, so it waits for
//! that waker's signal and wakes as any woken worker does.

use std::time::Instant;

use crossbeam_utils::CachePadded;

use crate::engine::cpu;
use crate::engine::sync::{fence, AtomicU64, Condvar, Mutex, Ordering};

const SPINNER: u64 = 1;
const SLEEPER: u64 = 1 << 32;

fn spinners(counts: u64) -> u64 {
    counts & 0xFFFF_FFFF
}

fn sleepers(counts: u64) -> u64 {
    counts >> 32
}

/// How a sleep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woke {
    /// A waker woke it: it is counted as a spinner.
    Signalled,
    /// It found work before it parked: counted as nothing.
    WorkFound,
    /// Its deadline passed: counted as nothing.
    TimedOut,
}

#[derive(Debug, Default)]
pub(crate) struct Slot {
    notified: Mutex<bool>,
    cv: Condvar,
}

/// Sleep state shared by the workers of one pool.
#[derive(Debug)]
pub(crate) struct Sleep {
    counts: AtomicU64,
    max_spinners: u64,
    idle: Mutex<Vec<usize>>,
    slots: Vec<Slot>,
    wakes: AtomicU64,
    placement: Placement,
}

/// Where idle workers run: the CPU each spinner counts on and the spinners
/// per CPU, and the CPU each worker last ran on before it parked. A hint
/// (std atomics, relaxed: see the protocol), so the loom models see none of it.
#[derive(Debug)]
struct Placement {
    /// Per worker: 1 + the CPU slot it is counted as spinning on, or 0.
    spin_slot: Box<[std::sync::atomic::AtomicU32]>,
    /// Per worker: 1 + the CPU slot it parked on, or 0 (not known).
    park_slot: Box<[std::sync::atomic::AtomicU32]>,
    /// Per CPU slot: spinners counted there. One cache line each: a
    /// submitter reads its own CPU's count at most submissions, which a
    /// spinner's count on another CPU must not evict.
    spinning_on: Box<[CachePadded<std::sync::atomic::AtomicU32>]>,
}

impl Placement {
    fn new(workers: usize) -> Self {
        let zeros = |n: usize| (0..n).map(|_| std::sync::atomic::AtomicU32::new(0)).collect();
        let spinning_on = (0..cpu::SLOTS).map(|_| CachePadded::new(std::sync::atomic::AtomicU32::new(0))).collect();
        Placement { spin_slot: zeros(workers), park_slot: zeros(workers), spinning_on }
    }

    /// Worker `index` spins from here on, on the CPU it runs on now.
    fn spin_here(&self, index: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(slot) = cpu::current_slot() {
            self.spinning_on[slot].fetch_add(1, Relaxed);
            self.spin_slot[index].store(slot as u32 + 1, Relaxed);
        }
    }

    /// Worker `index` no longer spins.
    fn spin_ends(&self, index: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let slot = self.spin_slot[index].swap(0, Relaxed);
        if slot != 0 {
            self.spinning_on[slot as usize - 1].fetch_sub(1, Relaxed);
        }
    }

    fn parks_here(&self, index: usize) {
        let slot = cpu::current_slot().map_or(0, |s| s as u32 + 1);
        self.park_slot[index].store(slot, std::sync::atomic::Ordering::Relaxed);
    }

    fn parked_on(&self, index: usize, slot: usize) -> bool {
        self.park_slot[index].load(std::sync::atomic::Ordering::Relaxed) == slot as u32 + 1
    }

    fn spinning_on(&self, slot: usize) -> u64 {
        u64::from(self.spinning_on[slot].load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Sleep {
    pub(crate) fn new(workers: usize, max_spinners: usize) -> Self {
        Sleep {
            counts: AtomicU64::new(0),
            max_spinners: max_spinners as u64,
            idle: Mutex::new(Vec::with_capacity(workers)),
            slots: (0..workers).map(|_| Slot::default()).collect(),
            wakes: AtomicU64::new(0),
            placement: Placement::new(workers),
        }
    }

    /// Worker `index` enters the spinning phase if fewer than `max_spinners` workers spin.
    pub(crate) fn try_begin_spin(&self, index: usize) -> bool {
        let mut cur = self.counts.load(Ordering::Relaxed);
        loop {
            if spinners(cur) >= self.max_spinners {
                return false;
            }
            match self.counts.compare_exchange_weak(cur, cur + SPINNER, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => {
                    self.placement.spin_here(index);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Worker `index` leaves the spinning phase (it found a job or is exiting).
    pub(crate) fn end_spin(&self, index: usize) {
        self.placement.spin_ends(index);
        self.counts.fetch_sub(SPINNER, Ordering::SeqCst);
    }

    /// Called after new work was published: wakes one sleeper that
    /// `can_take` it, if nobody spins on another CPU (see the protocol). (A worker that could not take the
    /// work, because its core is full or it is outside the active pattern,
    /// would go back to sleep and the wake-up would be lost.)
    #[inline]
    pub(crate) fn notify_work(&self, can_take: impl Fn(usize) -> bool) {
        fence(Ordering::SeqCst);
        let counts = self.counts.load(Ordering::SeqCst);
        if sleepers(counts) == 0 {
            return;
        }
        let here = cpu::current_slot();
        if spinners(counts) == 0 {
            self.wake_one(&can_take, here, false);
        } else if let Some(here) = here {
            // Spinners that share this CPU are not running: wake one elsewhere.
            if spinners(counts) <= self.placement.spinning_on(here) {
                self.wake_one(&can_take, Some(here), true);
            }
        }
    }

    /// Wakes the most recently parked worker that `can_take` work, handing it
    /// the spinning role: one that parked on a CPU other than `here` if there
    /// is one, else (unless `elsewhere_only`) any.
    fn wake_one(&self, can_take: &impl Fn(usize) -> bool, here: Option<usize>, elsewhere_only: bool) {
        let index = {
            let mut idle = self.idle.lock();
            let elsewhere = |i: usize| can_take(i) && here.is_none_or(|h| !self.placement.parked_on(i, h));
            let found = match idle.iter().rposition(|&i| elsewhere(i)) {
                None if !elsewhere_only => idle.iter().rposition(|&i| can_take(i)),
                found => found,
            };
            let Some(pos) = found else {
                return;
            };
            let index = idle.remove(pos);
            self.counts.fetch_sub(SLEEPER - SPINNER, Ordering::SeqCst);
            index
        };
        self.signal(index);
    }

    /// Wakes worker `index` if it sleeps (a job was pinned to it). If it is
    /// not listed as sleeping it is running or searching and will see its
    /// inbox; the inbox push and the sleeper's registration are ordered by
    /// the `idle` lock, so the check cannot miss a worker about to park.
    pub(crate) fn wake_worker(&self, index: usize) {
        fence(Ordering::SeqCst);
        let found = {
            let mut idle = self.idle.lock();
            match idle.iter().position(|&i| i == index) {
                Some(pos) => {
                    idle.swap_remove(pos);
                    self.counts.fetch_sub(SLEEPER - SPINNER, Ordering::SeqCst);
                    true
                }
                None => false,
            }
        };
        if found {
            self.signal(index);
        }
    }

    /// Wakes every sleeping worker (a pattern change: they re-check their role).
    pub(crate) fn wake_all_idle(&self) {
        self.wake_all();
    }

    /// Wakes every sleeping worker (shutdown).
    pub(crate) fn wake_all(&self) {
        let woken: Vec<usize> = {
            let mut idle = self.idle.lock();
            let n = idle.len() as u64;
            self.counts.fetch_sub(n * (SLEEPER - SPINNER), Ordering::SeqCst);
            idle.drain(..).collect()
        };
        for index in woken {
            self.signal(index);
        }
    }

    fn signal(&self, index: usize) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[index];
        let mut notified = slot.notified.lock();
        *notified = true;
        slot.cv.notify_one();
    }

    /// Parks worker `index` until woken. `was_spinning` says whether it is
    /// counted as a spinner now. `work_available` is re-checked after the
    /// worker is registered as a sleeper.
    ///
    /// Returns true when a waker woke it (it is now counted as a spinner),
    /// false when it found work before parking (it is counted as nothing).
    pub(crate) fn sleep(&self, index: usize, was_spinning: bool, work_available: impl Fn() -> bool) -> bool {
        self.sleep_until(index, was_spinning, work_available, None) == Woke::Signalled
    }

    /// `sleep`, up to `deadline` (see the protocol).
    pub(crate) fn sleep_until(
        &self,
        index: usize,
        was_spinning: bool,
        work_available: impl Fn() -> bool,
        deadline: Option<Instant>,
    ) -> Woke {
        let slot = &self.slots[index];
        *slot.notified.lock() = false;
        if was_spinning {
            self.placement.spin_ends(index);
        }
        self.placement.parks_here(index);
        {
            let mut idle = self.idle.lock();
            idle.push(index);
            let delta = if was_spinning { SLEEPER - SPINNER } else { SLEEPER };
            self.counts.fetch_add(delta, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        if work_available() {
            let mut idle = self.idle.lock();
            if self.unlist(&mut idle, index) {
                return Woke::WorkFound;
            }
            // A waker already took us off the list and made us a spinner;
            // fall through to consume its signal.
        }
        let mut notified = slot.notified.lock();
        while !*notified {
            match deadline {
                None => slot.cv.wait(&mut notified),
                Some(d) => {
                    if slot.cv.wait_until(&mut notified, d).timed_out() && !*notified {
                        drop(notified);
                        if self.unlist(&mut self.idle.lock(), index) {
                            return Woke::TimedOut;
                        }
                        // Taken off by a waker: its signal is on the way.
                        notified = slot.notified.lock();
                        while !*notified {
                            slot.cv.wait(&mut notified);
                        }
                    }
                }
            }
        }
        // Woken as a spinner: count it where it runs now.
        self.placement.spin_here(index);
        Woke::Signalled
    }

    /// Takes `index` off the sleepers' list if it is still there (counted as nothing then).
    fn unlist(&self, idle: &mut Vec<usize>, index: usize) -> bool {
        match idle.iter().position(|&i| i == index) {
            Some(pos) => {
                idle.swap_remove(pos);
                self.counts.fetch_sub(SLEEPER, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Number of signals sent to sleeping workers so far.
    pub(crate) fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// (spinning, sleeping) workers right now.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let c = self.counts.load(Ordering::Relaxed);
        (spinners(c), sleepers(c))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Pins the calling thread to `cpu`; false where that is not possible.
    fn pin(cpu: usize) -> bool {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) && cpu::current() == Some(cpu)
    }

    /// Two CPUs this process may run on, or None (the test then has nothing to show).
    fn two_cpus() -> Option<(usize, usize)> {
        let ids = core_affinity::get_core_ids()?;
        (ids.len() >= 2).then(|| (ids[0].id, ids[1].id))
    }

    /// A worker pinned to `cpu` parks (as worker `index`); the handle returns whether it was signalled.
    fn park_on(sleep: &Arc<Sleep>, index: usize, cpu: usize) -> std::thread::JoinHandle<bool> {
        let handle = std::thread::spawn({
            let sleep = sleep.clone();
            move || {
                assert!(pin(cpu));
                let deadline = Instant::now() + Duration::from_secs(2);
                sleep.sleep_until(index, false, || false, Some(deadline)) == Woke::Signalled
            }
        });
        while sleep.counts().1 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        handle
    }

    #[test]
    fn a_spinner_on_the_submitters_cpu_does_not_silence_the_wake_up() {
        let Some((here, there)) = two_cpus() else { return };
        let sleep = Arc::new(Sleep::new(2, 1));
        let parked = park_on(&sleep, 1, there);
        std::thread::spawn({
            let sleep = sleep.clone();
            move || {
                assert!(pin(here));
                // Worker 0 spins on this CPU: it cannot run while the submitter does.
                assert!(sleep.try_begin_spin(0));
                sleep.notify_work(|_| true);
            }
        })
        .join()
        .unwrap();
        assert!(parked.join().unwrap(), "the worker parked on the other CPU was woken");
        assert_eq!(sleep.wakes(), 1);
        assert_eq!(sleep.counts(), (2, 0), "the woken worker is counted as a spinner");
    }

    #[test]
    fn a_spinner_on_another_cpu_silences_the_wake_up() {
        let Some((here, there)) = two_cpus() else { return };
        let sleep = Arc::new(Sleep::new(2, 1));
        let parked = park_on(&sleep, 1, here);
        let spinner = {
            let sleep = sleep.clone();
            std::thread::spawn(move || {
                assert!(pin(there));
                assert!(sleep.try_begin_spin(0));
            })
        };
        spinner.join().unwrap();
        std::thread::spawn({
            let sleep = sleep.clone();
            move || {
                assert!(pin(here));
                sleep.notify_work(|_| true);
            }
        })
        .join()
        .unwrap();
        assert_eq!(sleep.wakes(), 0, "the spinner elsewhere finds the work");
        assert!(!parked.join().unwrap(), "the parked worker slept on until its deadline");
        sleep.end_spin(0);
        assert_eq!(sleep.counts(), (0, 0));
    }
}
