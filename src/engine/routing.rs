//! Routing tables: sticky anchors and lead domains, both pinning tokens to
//! workers while they are in flight.
//!
//! # Sticky anchors
//!
//! `StickyTable` maps a routing key (anchor plus, by `hash_policy`, the
//! arguments; computed in Python by `tokengate._routing.sticky_key`) to
//! `(worker, in_flight)`. The first token of a key picks the active worker
//! with the fewest pinned keys; later tokens of that key go to the same
//! worker's inbox (only that worker takes it). Each token's resolution decrements
//! `in_flight` (`Route::release`, called exactly once, by the resolution
//! itself: `TokenInner::resolve*` in `src/py/token.rs`), and the key is removed at zero, whatever the
//! way the token ended (the original leaked pins of tokens with arguments).
//!
//! # Lead domains
//!
//! A token tagged `external_calls` is a lead. Its domain (seed -> core,
//! pending count) is created when the lead is made (pending 1); the lead's
//! core (an index in the pool's cores, `Pool::core_of`) is recorded when it
//! starts. A decorated call made while a lead
//! (or one of its children) runs on this thread joins the domain
//! (pending + 1, same seed) and is pinned, round-robin, to a worker of the
//! lead's core. The domain is removed when pending falls to 0, i.e. once the
//! lead and every child have resolved (the original released it twice per
//! token, so twice as early).

use std::collections::HashMap;
use std::sync::Arc;

use crate::engine::sync::Mutex;

/// Where a token's routing state must be released when it resolves: no pin
/// (most tokens), or a pin kept in a box so that a token carries one word.
#[derive(Debug, Default)]
pub struct Route(Option<Box<Pin>>);

/// A routing pin.
#[derive(Debug)]
enum Pin {
    /// Pinned through a sticky key.
    Sticky(Arc<StickyTable>, String),
    /// Part of a lead's domain (the lead itself or a child).
    Domain(Arc<DomainTable>, Arc<str>),
}

impl Route {
    /// Pinned through sticky key `key` of `table`.
    pub fn sticky(table: Arc<StickyTable>, key: String) -> Route {
        Route(Some(Box::new(Pin::Sticky(table, key))))
    }

    /// Part of the domain `seed` of `table` (the lead itself or a child).
    pub fn domain(table: Arc<DomainTable>, seed: Arc<str>) -> Route {
        Route(Some(Box::new(Pin::Domain(table, seed))))
    }

    /// Releases this token's share of its pin (called once, at resolution).
    pub fn release(&self) {
        match self.0.as_deref() {
            None => {}
            Some(Pin::Sticky(table, key)) => table.release(key),
            Some(Pin::Domain(table, seed)) => table.release(seed),
        }
    }

    /// The domain seed, for leads and their children.
    pub fn seed(&self) -> Option<&str> {
        match self.0.as_deref() {
            Some(Pin::Domain(_, seed)) => Some(seed),
            _ => None,
        }
    }
}

/// Sticky key -> (worker, tokens in flight).
#[derive(Debug)]
pub struct StickyTable {
    map: Mutex<HashMap<String, (usize, usize)>>,
    pins: Mutex<Vec<usize>>,
}

impl StickyTable {
    pub fn new(workers: usize) -> Self {
        StickyTable { map: Mutex::new(HashMap::new()), pins: Mutex::new(vec![0; workers]) }
    }

    /// The worker of `key`, pinning it (to the least pinned of `candidates`) on first use.
    pub fn acquire(&self, key: &str, candidates: &[usize]) -> usize {
        let mut map = self.map.lock();
        if let Some(entry) = map.get_mut(key) {
            entry.1 += 1;
            return entry.0;
        }
        let mut pins = self.pins.lock();
        let worker = candidates.iter().copied().min_by_key(|&w| (pins[w], w)).unwrap_or(0);
        pins[worker] += 1;
        map.insert(key.to_owned(), (worker, 1));
        worker
    }

    fn release(&self, key: &str) {
        let mut map = self.map.lock();
        let remove = match map.get_mut(key) {
            Some(entry) => {
                entry.1 -= 1;
                entry.1 == 0
            }
            None => false,
        };
        if remove {
            if let Some((worker, _)) = map.remove(key) {
                self.pins.lock()[worker] -= 1;
            }
        }
    }

    /// key -> (worker, in flight), for monitoring and tests.
    pub fn snapshot(&self) -> Vec<(String, usize, usize)> {
        let mut v: Vec<_> = self.map.lock().iter().map(|(k, (w, n))| (k.clone(), *w, *n)).collect();
        v.sort();
        v
    }
}

/// One lead's domain.
#[derive(Debug)]
struct Domain {
    /// The pool core the lead started on (None until it starts).
    core: Option<usize>,
    pending: usize,
    next: usize,
}

/// Seed -> domain.
#[derive(Debug, Default)]
pub struct DomainTable {
    map: Mutex<HashMap<Arc<str>, Domain>>,
}

impl DomainTable {
    /// Opens the domain of a new lead (pending 1).
    pub fn open(&self, seed: Arc<str>) {
        self.map.lock().insert(seed, Domain { core: None, pending: 1, next: 0 });
    }

    /// Records the core the lead started on.
    pub fn set_core(&self, seed: &str, core: usize) {
        if let Some(d) = self.map.lock().get_mut(seed) {
            d.core = Some(core);
        }
    }

    /// Adds a child; returns the worker to pin it to (round-robin over
    /// `workers_of(core)`), or None if the domain is gone or has no core yet.
    pub fn join(&self, seed: &str, workers_of: impl Fn(usize) -> Vec<usize>, avoid: Option<usize>) -> Option<Option<usize>> {
        let mut map = self.map.lock();
        let d = map.get_mut(seed)?;
        d.pending += 1;
        let Some(core) = d.core else {
            return Some(None);
        };
        let mut workers = workers_of(core);
        if workers.len() > 1 {
            workers.retain(|&w| Some(w) != avoid);
        }
        if workers.is_empty() {
            return Some(None);
        }
        let w = workers[d.next % workers.len()];
        d.next += 1;
        Some(Some(w))
    }

    fn release(&self, seed: &str) {
        let mut map = self.map.lock();
        let remove = match map.get_mut(seed) {
            Some(d) => {
                d.pending -= 1;
                d.pending == 0
            }
            None => false,
        };
        if remove {
            map.remove(seed);
        }
    }

    /// seed -> (core, pending), for monitoring and tests.
    pub fn snapshot(&self) -> Vec<(String, Option<usize>, usize)> {
        let mut v: Vec<_> = self.map.lock().iter().map(|(k, d)| (k.to_string(), d.core, d.pending)).collect();
        v.sort();
        v
    }
}
