//! Per-core capacity: what a token's weight means.
//!
//! Every core (the workers pinned to one core) has a budget of
//! `workers_per_core` units (4 by default; fewer while the adaptive pattern
//! keeps fewer workers per core active). A light
//! token takes 1 unit, a medium token 2 (at most the budget), a heavy token
//! the whole budget: a heavy token has its core to itself, so at most one
//! heavy token runs per core and never more than the number of cores at once;
//! light tokens share a core four ways, medium two ways.
//!
//! # Protocol
//!
//! * A worker takes units on its own core (CAS on `used`) before it
//!   runs a job, and gives them back after. A job whose units do not fit
//!   goes to the pool's `deferred` queue; workers look there first, and take
//!   a deferred job only when it fits their core.
//! * Anti-starvation for heavy jobs: when a heavy job is deferred, the least
//!   loaded core that is not yet reserved is **reserved** for a heavy job
//!   (`CoreBudget::reserved`; at most half of the cores at once): its
//!   workers start no new light or medium job, so its `used` falls to 0 and
//!   one of them takes the heavy job, which ends the reservation (as does a
//!   deferred heavy job it finds already run by a waiter). A heavy job that
//!   starts anywhere else first (another core emptied sooner) ends every
//!   core's reservation unless another heavy job is still deferred: a core
//!   is reserved for a heavy job that waits, never for good.
//!   Light and medium jobs keep flowing on the other cores.
//! * Jobs pinned to a worker (its inbox: sticky anchors, lead domains) must
//!   run there; they take their units even past the budget.
//! * A running job that blocks (off CPU, not waiting for the GIL) gives its
//!   units back while it is blocked and takes them again, past the budget if
//!   need be, when it runs again: see `blocking.rs`.

use crate::engine::sync::{AtomicBool, AtomicU32, Ordering};

/// How much of a core a job needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Weight {
    /// One unit.
    #[default]
    Light,
    /// Two units (at most the core's budget).
    Medium,
    /// The whole core.
    Heavy,
}

impl Weight {
    /// Units of a core with `budget` units.
    pub fn units(self, budget: u32) -> u32 {
        match self {
            Weight::Light => 1,
            Weight::Medium => 2.min(budget),
            Weight::Heavy => budget,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Weight::Light => "light",
            Weight::Medium => "medium",
            Weight::Heavy => "heavy",
        }
    }
}

/// The capacity of one core: its budget of units, the units in use, and
/// whether it is reserved for a heavy job.
#[derive(Debug)]
pub(crate) struct CoreBudget {
    used: AtomicU32,
    units: u32,
    /// Reserved for a heavy job: its workers start no new light or medium job.
    pub(crate) reserved: AtomicBool,
    heavy_running: AtomicU32,
    /// Jobs of this core that are blocked, their units lent (`blocking.rs`).
    lent: AtomicU32,
}

impl CoreBudget {
    pub(crate) fn new(units: u32) -> Self {
        CoreBudget {
            used: AtomicU32::new(0),
            units,
            reserved: AtomicBool::new(false),
            heavy_running: AtomicU32::new(0),
            lent: AtomicU32::new(0),
        }
    }

    /// Units this core offers when `active` workers per core are active.
    pub(crate) fn budget(&self, active: u32) -> u32 {
        self.units.min(active).max(1)
    }

    pub(crate) fn used(&self) -> u32 {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn heavy_running(&self) -> u32 {
        self.heavy_running.load(Ordering::Acquire)
    }

    /// Takes `units` if they fit in `budget`.
    pub(crate) fn try_acquire(&self, units: u32, budget: u32) -> bool {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            if cur + units > budget {
                return false;
            }
            match self.used.compare_exchange_weak(cur, cur + units, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes `units` regardless of the budget (pinned jobs).
    pub(crate) fn force_acquire(&self, units: u32) {
        self.used.fetch_add(units, Ordering::AcqRel);
    }

    pub(crate) fn release(&self, units: u32) {
        self.used.fetch_sub(units, Ordering::AcqRel);
    }

    pub(crate) fn lent(&self) -> u32 {
        self.lent.load(Ordering::Acquire)
    }

    /// A job of this core is blocked: its units are lent (given back by the lender).
    pub(crate) fn lend(&self) {
        self.lent.fetch_add(1, Ordering::AcqRel);
    }

    /// A lent job ran again (took its units back) or ended.
    pub(crate) fn end_loan(&self) {
        self.lent.fetch_sub(1, Ordering::AcqRel);
    }

    /// Becomes the core's only heavy job if none runs (inline runs).
    pub(crate) fn try_heavy_alone(&self) -> bool {
        self.heavy_running.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    pub(crate) fn heavy_started(&self) {
        self.heavy_running.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn heavy_finished(&self) {
        self.heavy_running.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_budget() {
        assert_eq!(Weight::Light.units(4), 1);
        assert_eq!(Weight::Medium.units(4), 2);
        assert_eq!(Weight::Heavy.units(4), 4);
        assert_eq!(Weight::Medium.units(1), 1);
        assert_eq!(Weight::Heavy.units(1), 1);
    }

    #[test]
    fn heavy_needs_an_empty_core() {
        let c = CoreBudget::new(4);
        assert!(c.try_acquire(1, 4));
        assert!(!c.try_acquire(4, 4));
        c.release(1);
        assert!(c.try_acquire(4, 4));
        assert!(!c.try_acquire(1, 4));
    }
}
