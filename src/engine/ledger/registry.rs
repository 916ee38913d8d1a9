//! The registry of unresolved tokens, one shard per group of submitting
//! threads: a slab of weak handles (one word per token), so that a token can
//! be found by id (`kill_token`) and listed, without keeping it alive.
//!
//! A shard that grew large for a burst of pending tokens gives its vectors
//! back when the burst has resolved, and tells the ledger how large it was (see
//! `Ledger::on_token_freed`).
//!
//! Only the submitting thread grows a shard's vectors. `remove` runs on the
//! resolving thread, often a pool worker, and glibc keeps for good the memory
//! a worker's own arena grew to (`malloc_trim` does not shrink such an arena's
//! heap): so in a large shard `remove` lists a freed slot only while the free
//! list has room, and `insert` finds the others by a scan once they are half
//! the shard.

use std::sync::Weak;

/// Weak handles of the tokens submitted from the threads of one shard.
#[derive(Debug)]
pub(super) struct RegistryShard<T> {
    /// A token's slot holds a weak handle on it (one word: its id is read through it).
    pub(super) slots: Vec<Option<Weak<T>>>,
    /// Empty slots to reuse; in a large shard not every empty slot is listed.
    pub(super) free: Vec<u32>,
    /// Slots that hold a token.
    live: usize,
}

impl<T> Default for RegistryShard<T> {
    fn default() -> Self {
        RegistryShard { slots: Vec::new(), free: Vec::new(), live: 0 }
    }
}

/// A shard this large that empties gives its memory back (`RegistryShard::remove`).
pub(super) const SHRINK_AT: usize = 1 << 16;

impl<T> RegistryShard<T> {
    pub(super) fn insert(&mut self, token: Weak<T>) -> u32 {
        if self.free.is_empty() && self.slots.len() >= SHRINK_AT && (self.slots.len() - self.live) * 2 >= self.slots.len() {
            // Every empty slot is unlisted, and they are at least half the
            // shard: one scan lists them (amortized over the inserts they take).
            let empty = self.slots.iter().enumerate().rev().filter(|(_, s)| s.is_none());
            self.free.extend(empty.map(|(i, _)| i as u32));
        }
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(token);
                i
            }
            None => {
                self.slots.push(Some(token));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Frees the slot. When that empties a large shard (a burst of pending
    /// tokens has resolved), its vectors are given back and the burst's size
    /// is returned.
    pub(super) fn remove(&mut self, index: u32, token: &T) -> Option<usize> {
        let slot = self.slots.get_mut(index as usize)?;
        if !slot.as_ref().is_some_and(|w| std::ptr::eq(w.as_ptr(), token)) {
            return None;
        }
        *slot = None;
        self.live -= 1;
        if self.live == 0 && self.slots.len() >= SHRINK_AT {
            let burst = self.slots.len();
            self.slots = Vec::new();
            self.free = Vec::new();
            return Some(burst);
        }
        if self.slots.len() < SHRINK_AT || self.free.len() < self.free.capacity() {
            self.free.push(index);
        }
        None
    }

    pub(super) fn handles(&self) -> impl Iterator<Item = &Weak<T>> {
        self.slots.iter().flatten()
    }
}
