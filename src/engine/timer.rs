//! A timer thread: items scheduled for a deadline are handed to a callback
//! when it passes. Used for token deadlines and retry back-off.
//!
//! # Protocol
//!
//! * `schedule` pushes `(deadline, seq, item)` into a min-heap under the
//!   lock and signals the condvar if the new deadline is the earliest.
//! * The thread sleeps until the earliest deadline (or a signal), pops every
//!   expired entry, releases the lock, and calls `on_expire` with the batch
//!   (never under the lock, so the callback may schedule more).
//! * `shutdown` sets `stop` under the lock and signals; the thread returns.
//!   Items still scheduled are dropped (their owner resolves them).
//! * The thread is started on the first `schedule`, so a coordinator that
//!   never uses deadlines has no timer thread.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::sync::{Condvar, Mutex};
use std::sync::Arc;

struct Entry<T> {
    deadline: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

struct State<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
    stop: bool,
    started: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

/// A lazily started timer thread calling `on_expire` with expired items.
pub struct Timer<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    on_expire: Arc<dyn Fn(Vec<T>) + Send + Sync>,
    name: String,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> std::fmt::Debug for Timer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").field("name", &self.name).field("scheduled", &self.len()).finish()
    }
}

impl<T: Send + 'static> Timer<T> {
    /// A timer whose thread (started on first use) is called `name`.
    pub fn new(name: impl Into<String>, on_expire: impl Fn(Vec<T>) + Send + Sync + 'static) -> Self {
        Timer {
            shared: Arc::new(Shared {
                state: Mutex::new(State { heap: BinaryHeap::new(), seq: 0, stop: false, started: false }),
                cv: Condvar::new(),
            }),
            on_expire: Arc::new(on_expire),
            name: name.into(),
            handle: Mutex::new(None),
        }
    }

    /// Hands `item` to the callback once `deadline` passes. Returns false
    /// (dropping nothing: the item is returned) after shutdown.
    pub fn schedule(&self, deadline: Instant, item: T) -> Result<(), T> {
        let mut st = self.shared.state.lock();
        if st.stop {
            return Err(item);
        }
        if !st.started {
            st.started = true;
            let shared = self.shared.clone();
            let on_expire = self.on_expire.clone();
            let spawned = std::thread::Builder::new().name(self.name.clone()).spawn(move || run(&shared, &*on_expire));
            match spawned {
                Ok(h) => *self.handle.lock() = Some(h),
                Err(_) => {
                    st.started = false;
                    return Err(item);
                }
            }
        }
        st.seq += 1;
        let seq = st.seq;
        let earliest = st.heap.peek().is_none_or(|Reverse(e)| deadline < e.deadline);
        st.heap.push(Reverse(Entry { deadline, seq, item }));
        if earliest {
            self.shared.cv.notify_one();
        }
        Ok(())
    }

    /// Items waiting for their deadline.
    pub fn len(&self) -> usize {
        self.shared.state.lock().heap.len()
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the thread, joins it (up to `timeout`), and returns the items never expired.
    pub fn shutdown(&self, timeout: Duration) -> Vec<T> {
        let rest = {
            let mut st = self.shared.state.lock();
            st.stop = true;
            self.shared.cv.notify_all();
            std::mem::take(&mut st.heap).into_iter().map(|Reverse(e)| e.item).collect()
        };
        if let Some(h) = self.handle.lock().take() {
            let deadline = Instant::now() + timeout;
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        rest
    }
}

fn run<T>(shared: &Shared<T>, on_expire: &(dyn Fn(Vec<T>) + Send + Sync)) {
    let mut st = shared.state.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        while st.heap.peek().is_some_and(|Reverse(e)| e.deadline <= now) {
            if let Some(Reverse(e)) = st.heap.pop() {
                expired.push(e.item);
            }
        }
        if !expired.is_empty() {
            drop(st);
            on_expire(expired);
            st = shared.state.lock();
            continue;
        }
        match st.heap.peek().map(|Reverse(e)| e.deadline) {
            Some(d) => {
                shared.cv.wait_until(&mut st, d);
            }
            None => shared.cv.wait(&mut st),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn fires_in_deadline_order() {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let t = Timer::new("t", move |items: Vec<u32>| {
            for i in items {
                tx.lock().unwrap().send(i).unwrap();
            }
        });
        let now = Instant::now();
        t.schedule(now + Duration::from_millis(60), 3).unwrap();
        t.schedule(now + Duration::from_millis(20), 1).unwrap();
        t.schedule(now + Duration::from_millis(40), 2).unwrap();
        let got: Vec<u32> = (0..3).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert!(now.elapsed() >= Duration::from_millis(60));
        assert!(t.shutdown(Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn shutdown_returns_pending_and_refuses_more() {
        let t = Timer::new("t", |_: Vec<u32>| {});
        t.schedule(Instant::now() + Duration::from_secs(60), 7).unwrap();
        assert_eq!(t.shutdown(Duration::from_secs(1)), vec![7]);
        assert_eq!(t.schedule(Instant::now(), 8), Err(8));
    }

    #[test]
    fn unused_timer_starts_no_thread() {
        let t = Timer::new("t", |_: Vec<u32>| {});
        assert!(t.handle.lock().is_none());
        assert!(t.shutdown(Duration::from_millis(10)).is_empty());
    }
}
