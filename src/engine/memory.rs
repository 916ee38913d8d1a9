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
//! them (`Ledger::on_token_freed`). Elsewhere it does nothing.

#![allow(unsafe_code)]

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
