//! The ledger's tests.

use super::registry::{RegistryShard, SHRINK_AT};
use super::*;

/// A token as the books see it.
#[derive(Debug)]
struct Tok {
    id: u64,
    op: Arc<str>,
    cell: TokenCell<()>,
    slot: AtomicU64,
}

impl Booked for Tok {
    type Slot = ();

    fn id(&self) -> u64 {
        self.id
    }

    fn cell(&self) -> &TokenCell<()> {
        &self.cell
    }

    fn registry_slot(&self) -> &AtomicU64 {
        &self.slot
    }

    fn op_name(&self) -> &str {
        &self.op
    }
}

fn token(id: u64, op: &str) -> Arc<Tok> {
    Arc::new(Tok { id, op: op.into(), cell: TokenCell::new(()), slot: AtomicU64::new(u64::MAX) })
}

#[test]
fn the_registry_holds_unresolved_tokens_and_the_history_their_ends() {
    let ledger: Ledger<Tok, ()> = Ledger::new(0, 10, false, true);
    let (a, b) = (ledger.op("a"), ledger.op("b"));
    let tokens: Vec<Arc<Tok>> = (1..=4).map(|i| token(i, if i % 2 == 0 { "b" } else { "a" })).collect();
    for t in &tokens {
        ledger.record_submitted(if &*t.op == "a" { &a } else { &b });
        ledger.register(t);
        assert!(t.cell.admit());
    }
    assert_eq!(ledger.live_tokens(None).len(), 4);
    assert_eq!(ledger.live_tokens(Some("b")).iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 4]);
    assert_eq!(ledger.lookup(3).map(|t| t.id), Some(3));
    assert_eq!(ledger.unresolved(), 4);

    let done = &tokens[2];
    assert!(done.cell.start(0, None));
    done.cell.resolve_at(|_| true, TokenState::Completed, None, |_| ledger.on_resolved(done, &a, TokenState::Completed, false, None));
    assert!(ledger.lookup(3).is_none(), "a resolved token leaves the registry");
    assert_eq!(ledger.live_tokens(Some("a")).iter().map(|t| t.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(ledger.unresolved(), 3);
    let history = ledger.history();
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].token_id, &*ledger.op_name(history[0].op_index)), (3, "a"));
    assert_eq!(history[0].state, TokenState::Completed);
    assert_eq!(ledger.totals().1[Outcome::Ok as usize], 1);
}

#[test]
fn a_resolved_burst_gives_its_registry_back_and_counts_down_its_frees() {
    let ledger: Ledger<Tok, ()> = Ledger::new(0, 0, false, true);
    let op = ledger.op("burst");
    let tokens: Vec<Arc<Tok>> = (0..SHRINK_AT as u64).map(|i| token(i, "burst")).collect();
    for t in &tokens {
        ledger.register(t);
    }
    let shard = &ledger.registry[thread_shard()];
    assert!(shard.lock().slots.capacity() >= SHRINK_AT);
    for t in &tokens {
        t.cell.resolve_at(|_| true, TokenState::Completed, None, |_| ledger.on_resolved(t, &op, TokenState::Completed, false, None));
    }
    let emptied = shard.lock();
    assert_eq!((emptied.slots.capacity(), emptied.free.capacity()), (0, 0), "an emptied large shard is freed");
    drop(emptied);
    let expected = (SHRINK_AT - SHRINK_AT / 256) as i64;
    assert_eq!(ledger.to_free.load(std::sync::atomic::Ordering::Relaxed), expected);
    for _ in 0..expected {
        ledger.on_token_freed();
    }
    assert_eq!(ledger.to_free.load(std::sync::atomic::Ordering::Relaxed), 0, "the countdown ends (and memory was released)");
    ledger.on_token_freed();
    assert_eq!(ledger.to_free.load(std::sync::atomic::Ordering::Relaxed), 0, "no countdown: nothing counted");

    // A small shard that empties keeps its vectors (no countdown).
    let few: Vec<Arc<Tok>> = (0..10).map(|i| token(i, "burst")).collect();
    for t in &few {
        ledger.register(t);
    }
    for t in &few {
        t.cell.resolve_at(|_| true, TokenState::Completed, None, |_| ledger.on_resolved(t, &op, TokenState::Completed, false, None));
    }
    assert!(shard.lock().slots.capacity() >= 10);
    assert_eq!(ledger.to_free.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn a_large_shard_lists_freed_slots_without_growing_and_reuses_every_hole() {
    let mut shard = RegistryShard::<Tok>::default();
    let tokens: Vec<Arc<Tok>> = (0..2 * SHRINK_AT as u64).map(|i| token(i, "t")).collect();
    let indices: Vec<u32> = tokens.iter().map(|t| shard.insert(Arc::downgrade(t))).collect();
    let kept = *indices.last().unwrap();
    let capacity = shard.free.capacity();
    for (t, &i) in tokens.iter().zip(&indices).take(tokens.len() - 1) {
        assert_eq!(shard.remove(i, t), None, "one token still lives: no burst ended");
    }
    assert_eq!(shard.free.capacity(), capacity, "remove (a resolving thread) grew the free list");
    let len = shard.slots.len();
    let more: Vec<Arc<Tok>> = (0..len as u64 - 1).map(|i| token(i, "t")).collect();
    let mut taken = std::collections::HashSet::new();
    for t in &more {
        let i = shard.insert(Arc::downgrade(t));
        assert!(i != kept && taken.insert(i), "slot {i} handed out while in use");
    }
    assert_eq!(shard.slots.len(), len, "every hole is reused before the shard grows");
    assert!(shard.slots.iter().all(Option::is_some));
}

#[test]
fn a_run_elsewhere_counts_toward_health_at_resolution() {
    let ledger: Ledger<Tok, ()> = Ledger::new(0, 0, false, true);
    let op = ledger.op("p");
    for id in 0..6 {
        let t = token(id, "p");
        ledger.record_submitted(&op);
        ledger.register(&t);
        t.cell.admit();
        t.cell.start(0, None);
        t.cell.resolve_at(|_| true, TokenState::Failed, None, |_| ledger.on_resolved(&t, &op, TokenState::Failed, true, None));
    }
    assert_eq!(op.health_counts().runs, 6);
    assert_eq!(op.health_class(), "problematic");
    assert!(ledger.history().is_empty(), "history_size 0 keeps no records");
}
