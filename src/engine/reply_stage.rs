//! The reply stage: how a process-lane worker sends its replies, short
//! tokens' together.
//!
//! A reply is one frame of multiprocessing's `send_bytes` framing (a 4-byte
//! big-endian signed length, or -1 and an 8-byte length from 2 GiB, then the
//! bytes). [`ReplyStage::put`] copies it into the stage of the worker's
//! [`Board`] and counts the staged bytes there (word n+3); [`ReplyStage::flush`]
//! writes the staged frames to the socket in one write, then counts them sent
//! (word n+4). One write and one wake-up of the supervisor then serve many
//! tokens, and a reply staged when the process died is read from the board by
//! the supervisor: none is lost.
//!
//! # Who may touch what
//!
//! The state (bytes and frames staged, frames sent, the oldest frame's age)
//! and the stage are changed only under one mutex, by the worker's main thread
//! (between tokens) and by the flusher thread. The supervisor reads the stage
//! only once the worker is dead.
//!
//! The flusher thread sends what waited [`STAGE_AGE`] while a call runs on. It
//! needs no interpreter, so a call that holds the GIL (pure Python or C code)
//! does not hold the replies of the tokens before it. It looks every
//! [`FLUSH_TICK`] while frames are staged, and parks once none was staged for
//! [`FLUSH_PARK`]; `put` wakes it. It ends when a write fails (the supervisor
//! closed the socket) or when the stage is dropped.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::board::{Board, STAGE};
use super::wire::header;

/// Staged replies are sent once the oldest has waited this long.
pub const STAGE_AGE: Duration = Duration::from_millis(2);
/// The flusher looks this often while replies are staged ...
pub const FLUSH_TICK: Duration = Duration::from_millis(2);
/// ... and parks once nothing was staged for this long.
pub const FLUSH_PARK: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    used: usize,
    frames: i64,
    since: Instant,
    sent: i64,
    ticking: bool,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    board: Arc<Board>,
    socket: File,
    state: Mutex<State>,
    wake: Condvar,
}

/// A worker's outgoing replies (see the module docs).
#[derive(Debug)]
pub struct ReplyStage {
    shared: Arc<Shared>,
    /// No flusher thread (it could not start): every reply is sent as it is put.
    direct: bool,
}

impl Shared {
    /// Writes the staged frames and counts them sent (under the state lock).
    fn send_staged(&self, st: &mut State) -> io::Result<()> {
        if st.used == 0 {
            return Ok(());
        }
        // SAFETY: the first `used` bytes of the stage (used <= STAGE) hold frames this
        // process copied there under the state lock, which we hold; this stage is the only
        // one of the board (`take_stage`), so nothing writes them while they are read, and
        // the supervisor only copies them out (raw reads, once we are dead).
        let staged = unsafe { std::slice::from_raw_parts(self.board.stage_ptr(), st.used) };
        (&self.socket).write_all(staged)?;
        st.sent += st.frames;
        st.frames = 0;
        st.used = 0;
        self.board.set_sent(st.sent);
        Ok(())
    }

    fn flusher(self: Arc<Self>) {
        let mut st = self.state.lock();
        loop {
            if st.closed {
                return;
            }
            if !st.ticking {
                self.wake.wait(&mut st);
                continue;
            }
            self.wake.wait_for(&mut st, FLUSH_TICK);
            if st.closed {
                return;
            }
            if st.used > 0 {
                if st.since.elapsed() >= STAGE_AGE && self.send_staged(&mut st).is_err() {
                    return; // the supervisor closed the socket: the worker is ending
                }
            } else if st.since.elapsed() >= FLUSH_PARK {
                st.ticking = false;
            }
        }
    }
}

impl ReplyStage {
    /// Stages replies on `board` and sends them on `socket`; `sent` frames went out
    /// on it already. `flusher`: start the flusher thread (where it cannot start, each
    /// reply is sent as it is put; without it, staged replies wait for [`Self::flush`]).
    pub fn new(board: Arc<Board>, socket: File, sent: i64, flusher: bool) -> io::Result<ReplyStage> {
        if !board.take_stage() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "this board's stage has a reply stage already"));
        }
        board.set_sent(sent);
        let shared = Arc::new(Shared {
            board,
            socket,
            state: Mutex::new(State { used: 0, frames: 0, since: Instant::now(), sent, ticking: false, closed: false }),
            wake: Condvar::new(),
        });
        let direct = flusher && {
            let s = shared.clone();
            std::thread::Builder::new().name("tokengate-replies".into()).spawn(move || s.flusher()).is_err()
        };
        Ok(ReplyStage { shared, direct })
    }

    /// Stages `reply` as one frame (first sending the stage when the frame does not
    /// fit; a frame larger than the stage goes straight out).
    pub fn put(&self, reply: &[u8]) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        self.put_locked(&mut st, reply)
    }

    /// Stages `reply` if that needs neither a write nor a wait for the flusher (which
    /// may be writing): None when it does, and then nothing was staged (call [`Self::put`]).
    pub fn try_put(&self, reply: &[u8]) -> Option<io::Result<()>> {
        let mut st = self.shared.state.try_lock()?;
        if self.direct || st.used + header(reply.len()).1 + reply.len() > STAGE {
            return None;
        }
        Some(self.put_locked(&mut st, reply))
    }

    fn put_locked(&self, st: &mut State, reply: &[u8]) -> io::Result<()> {
        let (head, hlen) = header(reply.len());
        let size = hlen + reply.len();
        let sh = &*self.shared;
        if st.used + size > STAGE {
            sh.send_staged(st)?;
            if size > STAGE {
                (&sh.socket).write_all(&head[..hlen])?;
                (&sh.socket).write_all(reply)?;
                st.sent += 1;
                sh.board.set_sent(st.sent);
                return Ok(());
            }
        }
        let start = st.used;
        // SAFETY: `start + size <= STAGE` (checked above, the stage being empty when it
        // was not), so both copies stay inside the stage; we hold the state lock, and
        // this stage is the only one of the board (`take_stage`), so nothing else of
        // this process writes the stage; the supervisor reads it only once we are dead.
        // Sources are a local array and a slice that cannot overlap it.
        unsafe {
            let at = sh.board.stage_ptr().add(start);
            std::ptr::copy_nonoverlapping(head.as_ptr(), at, hlen);
            std::ptr::copy_nonoverlapping(reply.as_ptr(), at.add(hlen), reply.len());
        }
        st.used = start + size;
        st.frames += 1;
        sh.board.set_staged(st.used);
        if start == 0 {
            st.since = Instant::now();
            if !st.ticking {
                st.ticking = true;
                sh.wake.notify_one();
            }
        }
        if self.direct {
            sh.send_staged(st)?;
        }
        Ok(())
    }

    /// Whether to send the staged replies before a call that takes `call` seconds on
    /// average (None: not measured yet): yes when some are staged and the call is not
    /// known to be shorter than `short`, or the oldest waited [`STAGE_AGE`].
    /// False while the flusher holds the state (it is sending the staged replies).
    pub fn due(&self, call: Option<f64>, short: f64) -> bool {
        let Some(st) = self.shared.state.try_lock() else {
            return false;
        };
        st.used > 0
            && match call {
                None => true,
                Some(c) => c >= short || st.since.elapsed() >= STAGE_AGE,
            }
    }

    /// Sends the staged replies (then the stage is empty).
    pub fn flush(&self) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        self.shared.send_staged(&mut st)
    }
}

impl Drop for ReplyStage {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::board::size;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn frames(data: &[u8]) -> Vec<Vec<u8>> {
        let mut buf = crate::engine::wire::FrameBuf::default();
        buf.extend(data);
        let mut out = Vec::new();
        buf.cut(|m| out.push(m.to_vec()));
        out
    }

    /// A stage on a fresh board of 4 list words, writing to one end of a socket pair: the
    /// stage, the supervisor's mapping of the board, and the other end.
    fn stage_on_a_pair(flusher: bool) -> (ReplyStage, Board, UnixStream) {
        let file = crate::engine::board::tests::tempfile_of(size(4).unwrap());
        let board = Arc::new(Board::map(&file, 4).unwrap());
        let supervisor = Board::map(&file, 4).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let stage = ReplyStage::new(board, File::from(std::os::fd::OwnedFd::from(a)), 1, flusher).unwrap();
        (stage, supervisor, b)
    }

    #[test]
    fn staged_frames_tell_which_reached_the_socket() {
        let (stage, supervisor, mut b) = stage_on_a_pair(false);
        stage.put(b"r1").unwrap();
        stage.put(b"r2").unwrap();
        stage.flush().unwrap();
        stage.put(b"r3").unwrap();
        stage.put(b"r4").unwrap();
        let mut buf = [0u8; 64];
        let n = b.read(&mut buf).unwrap();
        assert_eq!(frames(&buf[..n]), vec![b"r1".to_vec(), b"r2".to_vec()]);
        let (before, data) = supervisor.staged();
        assert_eq!(before, 3, "the ready message, r1 and r2 went out");
        assert_eq!(frames(&data), vec![b"r3".to_vec(), b"r4".to_vec()]);
        stage.flush().unwrap();
        assert_eq!(supervisor.staged(), (5, Vec::new()));
    }

    #[test]
    fn the_flusher_sends_what_waited() {
        let (stage, supervisor, mut b) = stage_on_a_pair(true);
        stage.put(b"r1").unwrap();
        stage.put(b"r2").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let mut buf = [0u8; 64];
            let n = b.read(&mut buf).unwrap();
            got.extend(frames(&buf[..n]));
        }
        assert_eq!(got, vec![b"r1".to_vec(), b"r2".to_vec()]);
        // The flusher counts the frames sent after its write: the reader may see the bytes
        // first (a preempted flusher), so the count is waited for, not read once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while supervisor.staged() != (3, Vec::new()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(supervisor.staged(), (3, Vec::new()));
        assert!(!stage.due(None, 0.001));
    }

    #[test]
    fn a_board_has_one_stage() {
        let (_stage, supervisor, _b) = stage_on_a_pair(false);
        let (a, _c) = UnixStream::pair().unwrap();
        let second = ReplyStage::new(Arc::new(supervisor), File::from(std::os::fd::OwnedFd::from(a)), 1, false);
        assert!(second.is_ok(), "another mapping (another process) has its own claim");
        let file = crate::engine::board::tests::tempfile_of(size(4).unwrap());
        let board = Arc::new(Board::map(&file, 4).unwrap());
        let (a, _d) = UnixStream::pair().unwrap();
        let (e, _f) = UnixStream::pair().unwrap();
        assert!(ReplyStage::new(board.clone(), File::from(std::os::fd::OwnedFd::from(a)), 1, false).is_ok());
        assert!(ReplyStage::new(board, File::from(std::os::fd::OwnedFd::from(e)), 1, false).is_err());
    }

    #[test]
    fn due_before_a_long_call_or_once_the_oldest_waited() {
        let (stage, _supervisor, _b) = stage_on_a_pair(false);
        assert!(!stage.due(None, 0.001));
        stage.shared.state.lock().used = 1; // as if staged (not sent: no flusher here)
        stage.shared.state.lock().since = Instant::now();
        assert!(stage.due(None, 0.001) && stage.due(Some(0.5), 0.001));
        assert!(!stage.due(Some(0.0001), 0.001));
        stage.shared.state.lock().since = Instant::now() - STAGE_AGE;
        assert!(stage.due(Some(0.0001), 0.001));
        stage.shared.state.lock().used = 0;
    }
}
