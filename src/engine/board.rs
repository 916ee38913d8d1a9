//! The board: memory the process lane's supervisor shares with one worker
//! process (a file both map), which makes a kill exact and keeps replies safe.
//!
//! # Layout
//!
//! `n + 6` words of 8 bytes (`n`: how many tokens may be listed), then the
//! stage ([`STAGE`] bytes):
//!
//! | word | holds | written by |
//! |---|---|---|
//! | 0 | `seq + 1` of the token the worker runs now (0: none) | worker |
//! | 1 | how many list words are taken | supervisor |
//! | 2 ..= n + 1 | the list: `seq + 1` of tokens sent to the worker that must not start (0: free) | supervisor |
//! | n + 2 | the worker's resident set size in bytes (0: not measured) | worker |
//! | n + 3 | bytes of whole reply frames staged (by the worker's reply stage) | worker |
//! | n + 4 | frames the worker had sent before the first staged one | worker |
//! | n + 5 | supervisor sections in progress | supervisor |
//!
//! A token is named by its number on the wire (`seq`), new at each sending.
//!
//! # Protocol
//!
//! Every word is read and written with sequentially consistent atomics (on
//! x86 a store is an `xchg`, a full fence), so the two sides never take a lock
//! or make a system call on the worker's path:
//!
//! * **The worker, before it starts token `s`** ([`Board::begin`]): stores
//!   `s + 1` in word 0, *then* waits until no supervisor section is in
//!   progress (word n+5 is 0), *then* reads the list: if `s` is listed it
//!   stores 0 in word 0 and skips the token, else it runs it. After it ran it,
//!   and its reply was staged or sent, it stores 0 in word 0 ([`Board::end`]).
//! * **The supervisor's sections** ([`Board::stop`], [`Board::take_back`],
//!   [`Board::unlist`]): one at a time (a mutex of the supervisor's process),
//!   each adds 1 to word n+5, *then* reads word 0 and changes the list, and
//!   subtracts 1 at its end.
//!
//! Dekker's argument gives the guarantees, since each side stores before it
//! loads what the other stores: if a section read word 0 before the worker
//! stored `s + 1`, the worker sees the section in progress and waits until it
//! ended, then reads the list that section wrote. So:
//!
//! * **a kill is exact**: a section that reads `x + 1` in word 0 and SIGKILLs the
//!   process keeps the worker from starting any later token: the worker may
//!   end `x` and publish its next token, but not run it before the section
//!   ends, and a section that killed never ends for that board (its count stays
//!   in word n+5: `kill(2)` may return before the signal lands, and the worker
//!   waits until it does). After the death, word 0 may name that next token,
//!   which never ran: the supervisor, which knows the token it stopped, puts
//!   the others back in its queue;
//! * **a listed token never starts**: a section lists only tokens that are not
//!   in word 0 when it reads it; one the worker publishes later is seen listed;
//! * **taking back is exact**: a section lists tokens sent after the one word 0
//!   names while it runs; the worker, about to start one of them, waits for the
//!   section and skips it.
//!
//! Sections never list or unlist the token the worker is about to start, so the
//! worker may read the list word by word while a later section changes it.
//!
//! The stage and words n+2..n+4 belong to the worker; the supervisor reads
//! them only once the worker is dead (then every store the worker made is
//! visible), except the resident set size, one word read as a reply arrives.
//!
//! A supervisor process that dies in a section leaves word n+5 set: a worker
//! waiting in `begin` then sees that its parent is no longer the one it had
//! when it mapped the board (it looks when a wait grows long, then once a
//! second) and gives up ([`Orphaned`]); on Linux the parent-death signal kills
//! it first.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

/// Bytes of the area where a worker stages replies before it sends them.
pub const STAGE: usize = 1 << 18;

/// The most list words a board may have (so that its size never overflows).
pub const MAX_LIST: usize = 1 << 20;

const RUNNING: usize = 0;
const LISTED: usize = 1;
const LIST: usize = 2;

/// Words of a board with `n` list words (`n <= MAX_LIST`).
pub const fn words(n: usize) -> usize {
    n + 6
}

/// Bytes of a board with `n` list words (the words, then the stage); None above [`MAX_LIST`].
pub const fn size(n: usize) -> Option<usize> {
    if n > MAX_LIST {
        return None;
    }
    Some(8 * words(n) + STAGE)
}

/// How [`Board::stop`] stopped a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// It was running: the process was killed.
    Killed,
    /// It had not started: it is listed, and the worker will skip it.
    Listed,
    /// It had not started, but no list word was free, so the process was killed: the
    /// token that was running there (if any) died with it. The lane never sends a
    /// worker more tokens than it has list words.
    KilledForRoom,
}

/// The supervisor's process died while the worker waited in [`Board::begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphaned;

/// This process's parent (the supervisor's process, for a worker).
fn parent_pid() -> u32 {
    #[cfg(unix)]
    {
        std::os::unix::process::parent_id()
    }
    #[cfg(not(unix))]
    {
        0
    }
}

/// One mapping of a board (see the module docs); each side maps it once.
#[derive(Debug)]
pub struct Board {
    map: MmapRaw,
    n: usize,
    /// Sections of this process, one at a time (the supervisor's side).
    sections: Mutex<()>,
    /// A reply stage of this process uses the stage (one at most).
    stage_taken: AtomicBool,
    /// This process's parent when it mapped the board (for a worker: the supervisor's).
    parent: u32,
}

/// A supervisor section in progress: counted in word n+5 until it drops, unless it
/// killed the worker (see the module docs).
struct Section<'a> {
    board: &'a Board,
    killed: bool,
    _one: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        if !self.killed {
            self.board.word(self.board.n + 5).fetch_sub(1, SeqCst);
        }
    }
}

impl Board {
    /// Maps the board of `n` list words that `file` holds (at least [`size`]`(n)`
    /// bytes, zeroed when created).
    pub fn map(file: &File, n: usize) -> io::Result<Board> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let len = size(n).ok_or_else(|| invalid(format!("a board holds at most {MAX_LIST} list words, not {n}")))?;
        if file.metadata()?.len() < len as u64 {
            return Err(invalid(format!("the board's file holds fewer than the {len} bytes of {n} list words")));
        }
        let map = MmapOptions::new().len(len).map_raw(file)?;
        Ok(Board { map, n, sections: Mutex::new(()), stage_taken: AtomicBool::new(false), parent: parent_pid() })
    }

    /// Claims the stage for this process's one reply stage (false if it was claimed).
    pub(crate) fn take_stage(&self) -> bool {
        !self.stage_taken.swap(true, SeqCst)
    }

    fn word(&self, i: usize) -> &AtomicI64 {
        assert!(i < words(self.n), "board word {i} out of range");
        // SAFETY: the mapping is `size(n)` bytes long (checked when mapped, as the file's
        // length, with n <= MAX_LIST so that it does not overflow) and page-aligned, so word `i`
        // (checked above) lies inside it at an 8-byte-aligned address; it stays mapped
        // while `self` lives, which bounds the returned reference. Both processes touch
        // the words only through atomics (the stage, which follows, is never read as
        // words), so no plain access races with these.
        unsafe { &*(self.map.as_mut_ptr().add(8 * i) as *const AtomicI64) }
    }

    /// The stage's first byte (the worker's reply stage says who may touch it).
    pub(crate) fn stage_ptr(&self) -> *mut u8 {
        // SAFETY: the stage starts `8 * words(n)` bytes into a mapping of `size(n)` bytes.
        unsafe { self.map.as_mut_ptr().add(8 * words(self.n)) }
    }

    // -- the worker's side ---------------------------------------------------------

    /// Publishes `seq` as running, unless the supervisor listed it: then false, and
    /// the worker skips it. Waits (briefly, yielding) while a section is in progress;
    /// [`Orphaned`] if the supervisor's process died meanwhile.
    pub fn begin(&self, seq: i64) -> Result<bool, Orphaned> {
        let running = self.word(RUNNING);
        running.store(seq + 1, SeqCst);
        let busy = self.word(self.n + 5);
        let mut spins = 0u32;
        let mut looked = None;
        while busy.load(SeqCst) != 0 {
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::thread::yield_now();
                continue;
            }
            // A section takes microseconds, or a kill that lands at once: at the first
            // long wait, then once a second, look whether the parent is still the one
            // that was there when the board was mapped.
            if looked.is_none_or(|at: std::time::Instant| at.elapsed() >= Duration::from_secs(1)) {
                if parent_pid() != self.parent {
                    return Err(Orphaned);
                }
                looked = Some(std::time::Instant::now());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if self.word(LISTED).load(SeqCst) != 0 && self.listed(seq) {
            running.store(0, SeqCst);
            return Ok(false);
        }
        Ok(true)
    }

    /// The token that began ended, and its reply was staged or sent.
    pub fn end(&self) {
        self.word(RUNNING).store(0, SeqCst);
    }

    /// Publishes the worker's resident set size (bytes), before the reply of the token
    /// that just ended.
    pub fn set_rss(&self, bytes: i64) {
        self.word(self.n + 2).store(bytes, SeqCst);
    }

    /// The stage holds `used` bytes of whole frames.
    pub(crate) fn set_staged(&self, used: usize) {
        self.word(self.n + 3).store(used as i64, SeqCst);
    }

    /// The stage was sent and is empty; `sent` frames went out in all. In this order:
    /// a death between the two leaves an empty stage, never staged frames counted as
    /// sent before themselves.
    pub(crate) fn set_sent(&self, sent: i64) {
        self.word(self.n + 3).store(0, SeqCst);
        self.word(self.n + 4).store(sent, SeqCst);
    }

    fn listed(&self, seq: i64) -> bool {
        (LIST..LIST + self.n).any(|i| self.word(i).load(SeqCst) == seq + 1)
    }

    // -- the supervisor's side -----------------------------------------------------

    fn section(&self) -> Section<'_> {
        let one = self.sections.lock();
        self.word(self.n + 5).fetch_add(1, SeqCst);
        Section { board: self, killed: false, _one: one }
    }

    /// Takes a free list word for `seq` (false when none is free).
    fn list(&self, seq: i64) -> bool {
        for i in LIST..LIST + self.n {
            if self.word(i).load(SeqCst) == 0 {
                self.word(i).store(seq + 1, SeqCst);
                self.word(LISTED).fetch_add(1, SeqCst);
                return true;
            }
        }
        false
    }

    /// Seq of the token the worker was running (read after it died), if any.
    pub fn running(&self) -> Option<i64> {
        match self.word(RUNNING).load(SeqCst) {
            0 => None,
            v => Some(v - 1),
        }
    }

    /// The worker's resident set size after its latest token (0: not measured).
    pub fn rss(&self) -> i64 {
        self.word(self.n + 2).load(SeqCst)
    }

    /// How many frames the worker had sent before its staged ones, and the reply
    /// frames it staged and had not sent (read once it is dead).
    pub fn staged(&self) -> (i64, Vec<u8>) {
        let used = self.word(self.n + 3).load(SeqCst);
        let before = self.word(self.n + 4).load(SeqCst);
        let data = match usize::try_from(used) {
            Ok(used) if used > 0 && used <= STAGE => {
                let mut out = vec![0u8; used];
                // SAFETY: `used` bytes of the stage lie inside the mapping (checked
                // against STAGE) and `out` holds as many; the regions do not overlap.
                // Raw copies, no reference: a caller that asks while the worker lives
                // (the lane asks once it is dead) gets torn bytes, never undefined behaviour.
                unsafe { std::ptr::copy_nonoverlapping(self.stage_ptr(), out.as_mut_ptr(), used) };
                out
            }
            _ => Vec::new(),
        };
        (before, data)
    }

    /// Stops token `seq`: if the worker runs it, calls `kill` inside the section (the
    /// worker cannot start another before the kill lands) and returns [`Stop::Killed`];
    /// else lists it, so that it never starts ([`Stop::Listed`]). With no list word free
    /// it kills too ([`Stop::KilledForRoom`]).
    pub fn stop<E>(&self, seq: i64, kill: impl FnOnce() -> Result<(), E>) -> Result<Stop, E> {
        let mut section = self.section();
        let how = if self.word(RUNNING).load(SeqCst) == seq + 1 {
            Stop::Killed
        } else if self.list(seq) {
            return Ok(Stop::Listed);
        } else {
            Stop::KilledForRoom
        };
        kill()?;
        section.killed = true;
        Ok(how)
    }

    /// Lists up to `limit` of `seqs` (tokens sent to the worker, in the order it runs
    /// them) that come after the one it runs now, and returns them: none of them has
    /// started, and the worker will skip them. None while it runs none of `seqs`
    /// (between two tokens it may be about to start any of them).
    ///
    /// With `share_from` set, only half of the tokens waiting behind the running one
    /// (rounded up) may go, and none unless that comes to `share_from` tokens or more:
    /// counted here, where the running one is known (the tokens before it in `seqs`
    /// ended, their replies not read yet).
    pub fn take_back(&self, seqs: &[i64], limit: usize, share_from: Option<usize>) -> Option<Vec<i64>> {
        let _section = self.section();
        let running = self.word(RUNNING).load(SeqCst) - 1;
        let at = seqs.iter().position(|&s| s == running)?;
        let waiting = &seqs[at + 1..];
        let limit = match share_from {
            None => limit,
            Some(least) => {
                let half = limit.min(waiting.len().div_ceil(2));
                if half < least.max(1) {
                    return Some(Vec::new());
                }
                half
            }
        };
        let mut out = Vec::new();
        for &seq in waiting.iter().take(limit) {
            if !self.list(seq) {
                break;
            }
            out.push(seq);
        }
        Some(out)
    }

    /// Frees the list word of a listed token (its reply arrived).
    pub fn unlist(&self, seq: i64) {
        let _section = self.section();
        for i in LIST..LIST + self.n {
            if self.word(i).load(SeqCst) == seq + 1 {
                self.word(i).store(0, SeqCst);
                self.word(LISTED).fetch_sub(1, SeqCst);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    fn pair(n: usize) -> (Board, Board, File) {
        let file = tempfile_of(size(n).unwrap());
        (Board::map(&file, n).unwrap(), Board::map(&file, n).unwrap(), file)
    }

    pub(crate) fn tempfile_of(len: usize) -> File {
        let path = std::env::temp_dir().join(format!("tokengate-board-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len as u64).unwrap();
        file
    }

    #[test]
    fn a_listed_token_is_skipped_and_one_sent_again_runs() {
        let (worker, supervisor, _f) = pair(4);
        assert_eq!(worker.begin(6), Ok(true));
        assert_eq!(supervisor.take_back(&[5, 6, 7, 8], 4, None), Some(vec![7, 8]));
        assert_eq!(supervisor.take_back(&[9], 4, None), None);
        worker.end();
        assert_eq!(worker.begin(7), Ok(false));
        assert_eq!(supervisor.running(), None);
        assert_eq!(worker.begin(10), Ok(true));
        assert_eq!(supervisor.running(), Some(10));
        worker.end();
        assert_eq!(supervisor.take_back(&[10, 11], 4, None), None);
        supervisor.unlist(7);
        supervisor.unlist(8);
        assert_eq!(supervisor.word(LISTED).load(SeqCst), 0);
    }

    #[test]
    fn sharing_takes_half_of_those_waiting_behind_the_running_one() {
        let (worker, supervisor, _f) = pair(8);
        assert_eq!(worker.begin(3), Ok(true));
        // 1 and 2 ended (replies unread), 3 runs, 4..=8 wait: 3 of those 5 go, not half of 8.
        assert_eq!(supervisor.take_back(&[1, 2, 3, 4, 5, 6, 7, 8], 8, Some(1)), Some(vec![4, 5, 6]));
        for seq in [4, 5, 6] {
            supervisor.unlist(seq);
        }
        // Fewer than `share_from` would go: none is listed.
        assert_eq!(supervisor.take_back(&[3, 4, 5, 6, 7, 8], 8, Some(4)), Some(vec![]));
        assert_eq!(supervisor.word(LISTED).load(SeqCst), 0);
        // The idle side's room caps it too.
        assert_eq!(supervisor.take_back(&[3, 4, 5, 6, 7, 8], 2, Some(1)), Some(vec![4, 5]));
        // Nothing waits: none, whatever `share_from` says.
        assert_eq!(supervisor.take_back(&[3], 8, Some(0)), Some(vec![]));
        worker.end();
    }

    #[test]
    fn a_worker_whose_supervisor_died_in_a_section_gives_up() {
        let file = tempfile_of(size(2).unwrap());
        let mut worker = Board::map(&file, 2).unwrap();
        worker.word(worker.n + 5).store(1, SeqCst); // a section that never ends
        worker.parent = worker.parent.wrapping_add(1); // as if reparented since the mapping
        assert_eq!(worker.begin(1), Err(Orphaned));
    }

    #[test]
    fn stop_kills_the_running_token_and_lists_any_other() {
        let (worker, supervisor, _f) = pair(2);
        assert_eq!(worker.begin(1), Ok(true));
        let killed = std::cell::Cell::new(0);
        let kill = || -> Result<(), ()> {
            killed.set(killed.get() + 1);
            Ok(())
        };
        assert_eq!(supervisor.stop(1, kill), Ok(Stop::Killed));
        assert_eq!(supervisor.word(supervisor.n + 5).load(SeqCst), 1, "a section that killed stays counted");
        supervisor.word(supervisor.n + 5).store(0, SeqCst); // as if the worker were replaced
        assert_eq!(supervisor.stop(2, kill), Ok(Stop::Listed));
        assert_eq!(killed.get(), 1);
        worker.end();
        assert_eq!(worker.begin(2), Ok(false));
        // Two words: the third listing finds none free and kills.
        assert_eq!(supervisor.stop(3, kill), Ok(Stop::Listed));
        assert_eq!(supervisor.stop(4, kill), Ok(Stop::KilledForRoom));
        supervisor.word(supervisor.n + 5).store(0, SeqCst);
        assert_eq!(killed.get(), 2);
        assert_eq!(supervisor.stop(5, || Err("no")), Err("no"));
        assert_eq!(supervisor.word(supervisor.n + 5).load(SeqCst), 0, "a failed kill ends its section");
    }

    /// The worker runs tokens 0, 1, 2, ... while the supervisor, in another thread,
    /// stops the one it is near (killed when it runs, listed ahead of it). A kill must
    /// find the worker in that token or between tokens; a token whose `begin` started
    /// after it was listed must be skipped.
    #[test]
    fn a_kill_never_hits_a_later_token_and_a_listed_one_never_runs() {
        use std::sync::atomic::AtomicUsize;
        const TOTAL: usize = 2_000;
        let (worker, supervisor, _f) = pair(8);
        let worker = Arc::new(worker);
        let clock = Arc::new(AtomicUsize::new(1));
        let current = Arc::new(AtomicI64::new(-1));
        let progress = Arc::new(AtomicI64::new(-1));
        let listed_at: Arc<Vec<AtomicUsize>> = Arc::new((0..TOTAL).map(|_| AtomicUsize::new(usize::MAX)).collect());
        let violations = Arc::new(AtomicUsize::new(0));
        let w = {
            let (worker, clock, current, progress, listed_at, violations) =
                (worker.clone(), clock.clone(), current.clone(), progress.clone(), listed_at.clone(), violations.clone());
            std::thread::spawn(move || {
                for seq in 0..TOTAL {
                    let asked = clock.fetch_add(1, SeqCst);
                    if worker.begin(seq as i64) == Ok(true) {
                        current.store(seq as i64, SeqCst);
                        if asked > listed_at[seq].load(SeqCst) {
                            violations.fetch_add(1, SeqCst);
                        }
                        let body = std::time::Instant::now(); // the token's call
                        while body.elapsed() < Duration::from_micros(20) {
                            std::hint::spin_loop();
                        }
                        current.store(-1, SeqCst);
                        worker.end();
                    }
                    progress.store(seq as i64, SeqCst);
                }
            })
        };
        let (mut kills, mut lists) = (0, 0);
        let mut pending: Vec<i64> = Vec::new();
        let mut round = 0i64;
        while progress.load(SeqCst) < TOTAL as i64 - 1 {
            round += 1;
            std::thread::sleep(Duration::from_micros(30)); // sections are seldom
            let seq = progress.load(SeqCst) + 1 + (round % 3) * 2;
            if seq >= TOTAL as i64 || pending.len() >= 6 || pending.contains(&seq) {
                let passed = progress.load(SeqCst);
                pending.retain(|&s| {
                    if s <= passed {
                        supervisor.unlist(s);
                        false
                    } else {
                        true
                    }
                });
                continue;
            }
            let how = supervisor
                .stop::<()>(seq, || {
                    // A kill takes time: the worker must not move on meanwhile.
                    std::thread::sleep(Duration::from_micros(100));
                    let now = current.load(SeqCst);
                    assert!(now == seq || now == -1, "the kill of {seq} found the worker in {now}");
                    Ok(())
                })
                .unwrap();
            if how == Stop::Killed {
                kills += 1;
                // The signal may land after kill(2) returned: until then the worker must
                // still not start a later token.
                std::thread::sleep(Duration::from_micros(100));
                let now = current.load(SeqCst);
                assert!(now == seq || now == -1, "after the kill of {seq} the worker ran {now}");
                // The kill "landed": here the worker goes on, as a new process would.
                supervisor.word(supervisor.n + 5).fetch_sub(1, SeqCst);
            } else {
                listed_at[seq as usize].store(clock.fetch_add(1, SeqCst), SeqCst);
                pending.push(seq);
                lists += 1;
            }
        }
        w.join().unwrap();
        assert_eq!(violations.load(SeqCst), 0, "listed tokens ran");
        assert!(kills > 0 && lists > 0, "{kills} kills, {lists} listings");
    }
}
