//! Outside lanes: lanes whose tokens run outside the engine's threads
//! (worker processes, a cluster). The engine keeps their queue; a lane only
//! takes work when it has room, runs it, and reports how it ended.
//!
//! Everything else stays in the engine, the same for every lane: admission
//! and per-operation limits (at submit), tokens as arguments (a token reaches
//! its lane once its inputs resolved), pause (a taken token whose pause began
//! is parked), drain and kill, deadlines (the timer resolves the token),
//! retries (a failed attempt goes back through the timer), and stats.
//!
//! # States of a token on an outside lane
//!
//! `queued` (in the lane's heap) -> `taken` (the lane holds it: it runs, or
//! is sent ahead) -> resolved. A taken token may go back to `queued` at its
//! old place (the lane could not start it: a process died first), or wait in
//! the timer for a retry and come back queued with a new place.
//!
//! # Protocol (everything under the one `state` lock)
//!
//! * `push(key, id, job)`: any thread (a submit, the last input of a token
//!   resolving, the retry timer, a resume). Refused once the lane is closed.
//! * `take(max)`: the lane's one taker (its supervisor or dispatcher thread)
//!   pops up to `max` jobs, largest key first (equal keys: lowest token id),
//!   and collects the stop notices. Each job taken is marked in `taken`.
//! * A token that resolves while taken: if the lane itself resolved it, it
//!   unmarked it first (`release`); otherwise (kill, deadline, a drain) the
//!   resolution leaves a stop notice (`stopped`) for the taker, which stops
//!   the remote work. The books (`on_resolved`) are kept before the token's
//!   terminal state is published, the notice (`notify_resolved`) is left
//!   after it: a taker reads the state the token ended in.
//! * Waking: whenever a push finds `asleep` at `ForAll` (the taker found
//!   nothing at its last take, with room for some), or a stop notice finds it
//!   at `ForAll` or `ForStops` (a take of nothing that had no room: the taker
//!   looks again when its own events give it room, so a push need not wake
//!   it, but a stop must, since the work to stop may run for long), one byte
//!   goes down the wake socket and `asleep` goes back to `No`; the
//!   taker waits on the other end (a selector, or [`epoll_events`] on an
//!   epoll instance that gathers it with the lane's other descriptors).
//! * `close()`: no more pushes; the queue is handed back (its tokens are
//!   cancelled by the caller).
//! * `pending` counts tokens placed on the lane and not resolved (queued,
//!   taken, parked, waiting for inputs or a retry): the lane is idle at 0.

#![allow(unsafe_code)]

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::sync::Mutex;

/// Most outside lanes one engine may have.
pub const MAX_OUTSIDE_LANES: usize = 16;

/// One queued job and its place.
#[derive(Debug)]
pub struct Queued<J> {
    /// Larger runs first: `priority * aging - enqueue time`, in ns.
    pub key: i64,
    /// The token's id; among equal keys, the lower runs first (ids increase along each
    /// submitting thread).
    pub id: u64,
    pub job: J,
}

impl<J> PartialEq for Queued<J> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.id == other.id
    }
}
impl<J> Eq for Queued<J> {}
impl<J> PartialOrd for Queued<J> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<J> Ord for Queued<J> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key).then_with(|| other.id.cmp(&self.id))
    }
}

#[derive(Debug)]
struct State<J> {
    heap: BinaryHeap<Queued<J>>,
    taken: HashSet<u64>,
    stopped: Vec<u64>,
    /// Times each token went back to the queue unstarted (`requeue`), until it resolves.
    requeues: HashMap<u64, u32>,
    asleep: Asleep,
    closed: bool,
}

/// What wakes the taker, which found nothing at its last take (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asleep {
    /// It is awake (or already woken): nothing needs to.
    No,
    /// A push or a stop notice.
    ForAll,
    /// A stop notice only: it had no room, and looks again when its own events give it some.
    ForStops,
}

impl Asleep {
    /// Whether a push (or, with `stop`, a stop notice) wakes the taker now; it is awake after.
    fn wakes(&mut self, stop: bool) -> bool {
        let wake = *self == Asleep::ForAll || (stop && *self == Asleep::ForStops);
        if wake {
            *self = Asleep::No;
        }
        wake
    }
}

/// The queue of one outside lane.
#[derive(Debug)]
pub struct OutsideQueue<J> {
    name: String,
    state: Mutex<State<J>>,
    pending: AtomicI64,
    /// Tokens ever placed on the lane.
    placed: AtomicU64,
    /// Workers the lane lost while they ran its tokens (`note_lost`).
    lost: AtomicU64,
    /// Workers (threads, processes) the lane has now, as it reports them.
    workers: AtomicU64,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

/// What one `take` hands the lane.
#[derive(Debug)]
pub struct Taken<J> {
    pub jobs: Vec<Queued<J>>,
    /// Ids of taken tokens resolved from outside since the last take.
    pub stopped: Vec<u64>,
}

impl<J> OutsideQueue<J> {
    /// A new lane queue called `name` (its tokens' `lane`).
    pub fn new(name: &str) -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(OutsideQueue {
            name: name.to_owned(),
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                taken: HashSet::new(),
                stopped: Vec::new(),
                requeues: HashMap::new(),
                asleep: Asleep::No,
                closed: false,
            }),
            pending: AtomicI64::new(0),
            placed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            workers: AtomicU64::new(0),
            wake_tx,
            wake_rx,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The end the taker waits on (readable after a wake).
    pub fn wake_socket(&self) -> &UnixStream {
        &self.wake_rx
    }

    fn wake(&self) {
        // A full socket already holds a wake-up: nothing lost.
        let _ = (&self.wake_tx).write(&[0]);
    }

    /// Queues `job`; hands it back when the lane is closed.
    pub fn push(&self, key: i64, id: u64, job: J) -> Result<(), J> {
        let wake = {
            let mut st = self.state.lock();
            if st.closed {
                return Err(job);
            }
            st.heap.push(Queued { key, id, job });
            st.asleep.wakes(false)
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Up to `max` jobs, largest key first, and the stop notices. When it
    /// finds neither, the next notice wakes the taker, and so does the next
    /// push if `push_wakes` (a taker with room; or one whose room depends on
    /// what is queued: one with no room looks again once its own events give it some).
    pub fn take(&self, max: usize, push_wakes: bool) -> Taken<J> {
        let mut st = self.state.lock();
        let mut jobs = Vec::with_capacity(max.min(st.heap.len()));
        while jobs.len() < max {
            let Some(q) = st.heap.pop() else { break };
            st.taken.insert(q.id);
            jobs.push(q);
        }
        let stopped = std::mem::take(&mut st.stopped);
        st.asleep = match (jobs.is_empty() && stopped.is_empty(), push_wakes) {
            (false, _) => Asleep::No,
            (true, true) => Asleep::ForAll,
            (true, false) => Asleep::ForStops,
        };
        Taken { jobs, stopped }
    }

    /// Puts a taken job back at its old place (the lane never started it).
    /// Returns how many times this token went back so far, or hands the job
    /// back when the lane is closed.
    pub fn requeue(&self, key: i64, id: u64, job: J) -> Result<u32, J> {
        let (n, wake) = {
            let mut st = self.state.lock();
            if st.closed {
                return Err(job);
            }
            st.taken.remove(&id);
            st.heap.push(Queued { key, id, job });
            let n = st.requeues.entry(id).or_insert(0);
            *n += 1;
            let n = *n;
            (n, st.asleep.wakes(false))
        };
        if wake {
            self.wake();
        }
        Ok(n)
    }

    /// Times token `id` went back to the queue unstarted.
    pub fn requeues(&self, id: u64) -> u32 {
        self.state.lock().requeues.get(&id).copied().unwrap_or(0)
    }

    /// Drops the requeue count of token `id` (it resolved while it was being
    /// handed back, so `on_resolved` may have run before the count was made).
    pub fn forget_requeues(&self, id: u64) {
        self.state.lock().requeues.remove(&id);
    }

    /// The lane resolves (or hands back) token `id` itself: no stop notice for it.
    pub fn release(&self, id: u64) -> bool {
        self.state.lock().taken.remove(&id)
    }

    /// Token `id` of this lane resolves: its books, kept before its terminal state
    /// is published (a waiter woken by the state finds the lane's `pending` count
    /// and requeue count already settled).
    pub fn on_resolved(&self, id: u64) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        let mut st = self.state.lock();
        if !st.requeues.is_empty() {
            st.requeues.remove(&id);
        }
    }

    /// Token `id` resolved and its terminal state is published. If the lane held it
    /// (and did not release it first), its taker is told to stop it: a stop notice
    /// (see `take`). Sent after the state is published, so the taker reads the state the
    /// token ended in (timeout, killed), never the one it left.
    pub fn notify_resolved(&self, id: u64) {
        let wake = {
            let mut st = self.state.lock();
            if !st.taken.remove(&id) {
                return;
            }
            st.stopped.push(id);
            st.asleep.wakes(true)
        };
        if wake {
            self.wake();
        }
    }

    /// A token was placed on this lane (it will resolve exactly once).
    pub fn on_placed(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.placed.fetch_add(1, Ordering::Relaxed);
    }

    /// Tokens ever placed on the lane (its `submitted` count).
    pub fn placed(&self) -> u64 {
        self.placed.load(Ordering::Relaxed)
    }

    /// Tokens placed on the lane and not resolved.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed).max(0) as u64
    }

    /// The lane lost a worker while it ran one of its tokens.
    pub fn note_lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    /// Workers lost so far (see `note_lost`).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// The lane has `n` workers now (threads or processes that run its tokens).
    pub fn set_workers(&self, n: u64) {
        self.workers.store(n, Ordering::Relaxed);
    }

    /// Workers the lane reported last.
    pub fn workers(&self) -> u64 {
        self.workers.load(Ordering::Relaxed)
    }

    /// (queued, taken).
    pub fn counts(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.heap.len(), st.taken.len())
    }

    /// Hands back every queued job (a drain, or a stop that cancels).
    pub fn take_unstarted(&self) -> Vec<J> {
        let heap = std::mem::take(&mut self.state.lock().heap);
        heap.into_sorted_vec().into_iter().rev().map(|q| q.job).collect()
    }

    /// No more pushes; hands back what was queued.
    pub fn close(&self) -> Vec<J> {
        self.state.lock().closed = true;
        self.take_unstarted()
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }
}

/// The outside lanes of one engine, by index (a token names its lane by index).
#[derive(Debug)]
pub struct OutsideLanes<J> {
    slots: [std::sync::OnceLock<std::sync::Arc<OutsideQueue<J>>>; MAX_OUTSIDE_LANES],
    added: Mutex<usize>,
}

impl<J> Default for OutsideLanes<J> {
    fn default() -> Self {
        OutsideLanes { slots: std::array::from_fn(|_| std::sync::OnceLock::new()), added: Mutex::new(0) }
    }
}

impl<J> OutsideLanes<J> {
    /// Adds a lane; its index, or None when the engine has `MAX_OUTSIDE_LANES` already.
    pub fn add(&self, queue: std::sync::Arc<OutsideQueue<J>>) -> Option<usize> {
        let mut added = self.added.lock();
        let index = *added;
        if index >= MAX_OUTSIDE_LANES {
            return None;
        }
        let _ = self.slots[index].set(queue);
        *added += 1;
        Some(index)
    }

    /// Lane `index` (it exists: only tokens placed on it name it).
    pub fn get(&self, index: usize) -> Option<&std::sync::Arc<OutsideQueue<J>>> {
        self.slots.get(index).and_then(|s| s.get())
    }

    /// Every lane added so far.
    pub fn all(&self) -> impl Iterator<Item = &std::sync::Arc<OutsideQueue<J>>> {
        self.slots.iter().map_while(|s| s.get())
    }
}

/// Most events one [`epoll_events`] returns.
pub const EPOLL_EVENTS: usize = 64;

/// Waits until the epoll instance `epfd` has events, at most `timeout_ms`
/// (negative: no limit), and appends them to `out` as `(fd, events)` (the
/// lane registers each descriptor by its number), at most [`EPOLL_EVENTS`].
/// A signal that cuts the wait short appends nothing.
pub fn epoll_events(epfd: RawFd, timeout_ms: i32, out: &mut Vec<(i32, u32)>) -> std::io::Result<()> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS];
    // SAFETY: `events` holds `EPOLL_EVENTS` initialised entries that live across the call,
    // and that count is passed: the kernel writes at most that many. A bad `epfd` is an
    // error return (EBADF, EINVAL), not undefined behaviour.
    let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), EPOLL_EVENTS as i32, timeout_ms) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        return if err.kind() == std::io::ErrorKind::Interrupted { Ok(()) } else { Err(err) };
    }
    for ev in &events[..n as usize] {
        // The lane registers descriptors by number (`select.epoll` puts it in the data
        // union's `fd`, its first four bytes).
        let data = ev.u64;
        #[cfg(target_endian = "little")]
        let fd = data as u32 as i32;
        #[cfg(target_endian = "big")]
        let fd = (data >> 32) as u32 as i32;
        out.push((fd, ev.events));
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn takes_by_key_then_id() {
        let q = OutsideQueue::new("t").unwrap();
        q.push(0, 1, "a").unwrap();
        q.push(5, 2, "b").unwrap();
        q.push(0, 0, "c").unwrap();
        let t = q.take(10, true);
        assert_eq!(t.jobs.iter().map(|j| j.job).collect::<Vec<_>>(), ["b", "c", "a"]);
        assert_eq!(q.counts(), (0, 3));
    }

    #[test]
    fn stop_notice_only_for_unreleased_taken_tokens() {
        let q = OutsideQueue::new("t").unwrap();
        for id in 1..=3 {
            q.on_placed();
            q.push(0, id, id).unwrap();
        }
        let t = q.take(2, true);
        assert_eq!(t.jobs.len(), 2);
        assert!(q.release(1));
        for id in 1..=3 {
            q.on_resolved(id);
            q.notify_resolved(id);
        }
        // 1 was resolved by the lane, 2 from outside while taken, 3 while still queued.
        let t = q.take(0, false);
        assert_eq!(t.stopped, vec![2]);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn wakes_a_taker_that_found_nothing_once() {
        let q = OutsideQueue::new("t").unwrap();
        let mut buf = [0u8; 8];
        assert!(q.take(4, true).jobs.is_empty());
        q.push(0, 1, ()).unwrap();
        q.push(0, 2, ()).unwrap();
        assert_eq!(q.wake_socket().read(&mut buf).unwrap(), 1);
        assert_eq!(q.take(4, true).jobs.len(), 2);
        q.push(0, 3, ()).unwrap(); // the taker is awake: no byte
        assert!(q.wake_socket().read(&mut buf).is_err());
    }

    #[test]
    fn a_taker_with_no_room_is_woken_by_stops_only() {
        let q = OutsideQueue::new("t").unwrap();
        let mut buf = [0u8; 8];
        q.push(0, 1, ()).unwrap();
        assert_eq!(q.take(1, true).jobs.len(), 1); // token 1 is taken
        assert!(q.take(0, false).jobs.is_empty()); // no room: asleep for stop notices only
        q.push(0, 2, ()).unwrap();
        assert!(q.wake_socket().read(&mut buf).is_err(), "a push does not wake a taker with no room");
        q.notify_resolved(1); // token 1 killed while it runs: its work must stop now
        assert_eq!(q.wake_socket().read(&mut buf).unwrap(), 1);
        q.push(0, 3, ()).unwrap(); // woken, not looked yet: no second byte
        assert!(q.wake_socket().read(&mut buf).is_err());
        let t = q.take(4, true);
        assert_eq!((t.jobs.len(), t.stopped), (2, vec![1]));
        // A taker whose room depends on what is queued asks to be woken by pushes too.
        assert!(q.take(0, true).jobs.is_empty());
        q.push(0, 4, ()).unwrap();
        assert_eq!(q.wake_socket().read(&mut buf).unwrap(), 1);
    }

    #[test]
    fn closed_lane_refuses_and_hands_back() {
        let q = OutsideQueue::new("t").unwrap();
        q.push(0, 1, 1).unwrap();
        assert_eq!(q.close(), vec![1]);
        assert_eq!(q.push(0, 2, 2), Err(2));
    }

    #[test]
    fn lanes_by_index() {
        let lanes: OutsideLanes<()> = OutsideLanes::default();
        for i in 0..MAX_OUTSIDE_LANES {
            assert_eq!(lanes.add(std::sync::Arc::new(OutsideQueue::new("x").unwrap())), Some(i));
        }
        assert_eq!(lanes.add(std::sync::Arc::new(OutsideQueue::new("x").unwrap())), None);
        assert_eq!(lanes.all().count(), MAX_OUTSIDE_LANES);
    }

    #[test]
    fn epoll_events_sees_a_wake_up_and_times_out() {
        use std::os::fd::AsRawFd;
        let q: OutsideQueue<u32> = OutsideQueue::new("x").unwrap();
        let fd = q.wake_socket().as_raw_fd();
        // SAFETY: (test) a new epoll instance, closed below; the event names `fd` by number.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
        // SAFETY: (test) `ev` is a valid event for the call; `epfd` and `fd` are open.
        assert_eq!(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) }, 0);
        let mut out = Vec::new();
        epoll_events(epfd, 10, &mut out).unwrap();
        assert!(out.is_empty(), "nothing queued: the wait times out");
        assert!(q.take(1, true).jobs.is_empty()); // asleep: the next push wakes
        q.push(0, 1, 7).unwrap();
        epoll_events(epfd, 1000, &mut out).unwrap();
        assert_eq!(out, vec![(fd, libc::EPOLLIN as u32)]);
        // SAFETY: (test) `epfd` is this test's own, closed once.
        unsafe { libc::close(epfd) };
        let err = epoll_events(epfd, 0, &mut out).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
