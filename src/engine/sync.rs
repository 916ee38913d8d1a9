//! Every atomic, lock and condvar the engine uses comes from here, so that a
//! model checker can swap them in one place (tokio's `loom` shim pattern).
//!
//! Normally: `std` atomics and `parking_lot` locks. Under `--cfg loom`:
//! loom's types behind the same (parking_lot-shaped) API, so the sleep/wake
//! protocol in `pool/sleep.rs` is model-checked as written
//! (`scripts/loom.sh`, tests in `pool/loom_tests.rs`). Statics use `std`
//! atomics directly: loom's constructors are not `const`.

#[cfg(not(loom))]
mod imp {
    pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard};
    pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
    pub(crate) use std::sync::Arc;
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
    pub(crate) use loom::sync::Arc;
    use std::ops::{Deref, DerefMut};
    use std::time::Instant;

    /// loom's mutex with parking_lot's `lock()` (no poisoning).
    #[derive(Debug)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().expect("loom mutex poisoned")))
        }

        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok().map(|g| MutexGuard(Some(g)))
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex::new(T::default())
        }
    }

    /// A guard that a condvar can take and give back in place.
    #[derive(Debug)]
    pub struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard in use")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard in use")
        }
    }

    /// Result of a timed wait.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct WaitTimeoutResult(bool);

    impl WaitTimeoutResult {
        pub(crate) fn timed_out(self) -> bool {
            self.0
        }
    }

    /// loom's condvar with parking_lot's `wait(&mut guard)`.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }

        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect("guard in use");
            guard.0 = Some(self.0.wait(inner).expect("loom mutex poisoned"));
        }

        pub(crate) fn wait_until<T>(&self, guard: &mut MutexGuard<'_, T>, deadline: Instant) -> WaitTimeoutResult {
            let inner = guard.0.take().expect("guard in use");
            let dur = deadline.saturating_duration_since(Instant::now());
            let (g, r) = self.0.wait_timeout(inner, dur).expect("loom mutex poisoned");
            guard.0 = Some(g);
            WaitTimeoutResult(r.timed_out())
        }

        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

pub(crate) use imp::*;
