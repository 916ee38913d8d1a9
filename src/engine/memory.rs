//! Giving freed memory back to the operating system.
//!
//! glibc's allocator keeps the memory of freed small blocks inside its heap
//! and returns it to the OS only from the heap's top. After a burst of a
//! million pending tokens resolves, nearly all of their memory is free but
//! stays resident (measured: 350 MB kept of 440 MB). `release_free_memory`
//! asks glibc to release every free page (`malloc_trim`, about 10 ms for
//! such a heap). The ledger asks for it when a large burst has resolved (the
//! tokens that were dropped as they finished are free then: the resolving
//! thread runs it once out of the token's lock, `release_if_requested`), and
//! again once nearly all the burst's tokens are freed, for callers that held
//! them (`Ledger::on_token_freed`), and a last time `SETTLE` later, run by a
//! pool's monitor thread (`release_if_due`): the caller frees what held the
//! tokens (a list of a million handles, say) only after the last of them.
//! Elsewhere it does nothing.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long after a burst's tokens were freed the deferred release runs.
pub const SETTLE: Duration = Duration::from_millis(50);

/// When the deferred release is due (`token::now_ns`), 0 when none is.
static RELEASE_AT: AtomicU64 = AtomicU64::new(0);

std::thread_local! {
    static REQUESTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Asks for `release_free_memory` on this thread at its next
/// `release_if_requested` (a caller that holds a lock defers it so).
pub fn request_release() {
    REQUESTED.with(|r| r.set(true));
}

/// Runs a release this thread requested, if any (call it holding no lock).
#[inline]
pub fn release_if_requested() {
    if REQUESTED.with(|r| r.replace(false)) {
        release_free_memory();
    }
}

/// Asks for `release_free_memory` in `SETTLE`, on the next monitor tick after that.
pub fn release_soon() {
    let at = crate::engine::token::now_ns() + SETTLE.as_nanos() as u64;
    RELEASE_AT.store(at, Ordering::Relaxed);
}

/// Runs the deferred release once it is due (a pool's monitor calls it each
/// tick). One relaxed load while none is due.
pub fn release_if_due() {
    let at = RELEASE_AT.load(Ordering::Relaxed);
    if at != 0 && crate::engine::token::now_ns() >= at && RELEASE_AT.compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        release_free_memory();
    }
}

/// Returns the allocator's free pages to the OS (glibc on Linux; a no-op elsewhere).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(loom)))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: `malloc_trim` is glibc's, declared with its C signature; it takes
        // the allocator's own locks and may be called from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}
