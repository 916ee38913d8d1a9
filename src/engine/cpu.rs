//! Which CPU a thread runs on, and where waiters park.
//!
//! A token's resolver wakes its parked waiter; the kernel tends to run the
//! woken thread on the waker's CPU, or on the CPU it slept on. When that is
//! the resolver's own CPU (on a busy machine a waiter and a worker often
//! share one), a resolver that goes on spinning for more work keeps the
//! waiter from running for the whole spin. `Parked` counts the waiters
//! parked on each CPU, so a resolver can tell (`woke_here`).

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The CPU this thread runs on now, if the OS says.
pub fn current() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn sched_getcpu() -> std::ffi::c_int;
        }
        // SAFETY: `sched_getcpu` (glibc and musl) takes no argument and only
        // reads the calling thread's CPU (through the vDSO or rseq).
        let cpu = unsafe { sched_getcpu() };
        usize::try_from(cpu).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Per-CPU counters are kept for this many CPUs (CPU numbers wrap around).
pub const SLOTS: usize = 256;

/// This thread's CPU as a counter slot (`current() % SLOTS`).
pub fn current_slot() -> Option<usize> {
    current().map(|c| c % SLOTS)
}

static PARKED: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];

/// A waiter parked on this CPU (until the guard drops).
#[derive(Debug)]
pub struct Parked(Option<usize>);

impl Parked {
    /// Counts the calling thread as parked on its CPU.
    pub fn here() -> Parked {
        let slot = current_slot();
        if let Some(s) = slot {
            PARKED[s].fetch_add(1, Ordering::Relaxed);
        }
        Parked(slot)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            PARKED[s].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether a waiter is parked on the calling thread's CPU.
pub fn waiter_parked_here() -> bool {
    current_slot().is_some_and(|s| PARKED[s].load(Ordering::Relaxed) > 0)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_parked_guard_counts_on_its_cpu_until_it_drops() {
        if current().is_none() {
            return; // no CPU number on this OS: nothing is counted
        }
        // Other tests may park waiters meanwhile, so only this guard's own count is checked.
        let guard = Parked::here();
        let slot = guard.0.expect("a CPU was read");
        let held = PARKED[slot].load(Ordering::Relaxed);
        assert!(held >= 1, "a parked guard counts on its CPU");
        drop(guard);
        let guard = Parked::here();
        let again = guard.0.expect("a CPU was read");
        assert!(PARKED[again].load(Ordering::Relaxed) >= 1);
    }
}
