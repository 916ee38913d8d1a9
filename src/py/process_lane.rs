//! The process lane's board, reply stage, reply reader and batch outbox, for Python: thin
//! faces of [`crate::engine::board`] (its module docs give the protocol),
//! [`crate::engine::reply_stage`] and [`crate::engine::wire`]. The supervisor
//! and each worker process map the same board file; every fd passed stays the
//! caller's (used during the call, never closed here).

#![allow(unsafe_code)]

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::exceptions::{orphaned_error, os_error};
use crate::engine::board::{self, Board, Stop};
use crate::engine::reply_stage::ReplyStage;
use crate::engine::wire::{FrameBuf, FrameOutbox};

/// The caller's open descriptor `fd` as a file for this call, never closed here.
fn borrowed_file(fd: RawFd) -> PyResult<ManuallyDrop<File>> {
    if fd < 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("not a file descriptor: {fd}")));
    }
    // SAFETY: the caller passes a descriptor it holds open for this call; the file is
    // wrapped in ManuallyDrop, so dropping it does not close the descriptor.
    Ok(ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }))
}

/// A file of its own on the caller's descriptor `fd` (a copy: F_DUPFD_CLOEXEC).
fn file_of(fd: RawFd) -> PyResult<File> {
    borrowed_file(fd)?.try_clone().map_err(os_error)
}

/// The memory the supervisor shares with one worker process (see `_process/board.py`).
#[pyclass(frozen, module = "tokengate._tokengate")]
#[derive(Debug)]
pub struct ProcessBoard {
    board: Arc<Board>,
}

#[pymethods]
impl ProcessBoard {
    /// Maps the board of `n` list words held by file descriptor `fd` (at least
    /// `ProcessBoard.size(n)` bytes).
    #[new]
    fn new(fd: RawFd, n: usize) -> PyResult<Self> {
        Self::size(n)?;
        let file = file_of(fd)?;
        Ok(ProcessBoard { board: Arc::new(Board::map(&file, n).map_err(os_error)?) })
    }

    /// Bytes of a board with `n` list words.
    #[staticmethod]
    fn size(n: usize) -> PyResult<usize> {
        board::size(n).ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!("a process-lane board holds at most {} list words, not {n}", board::MAX_LIST))
        })
    }

    /// (worker) Publishes `seq` as running, unless it is listed: then False. EOFError if
    /// the supervisor's process died while it waited.
    fn begin(&self, seq: i64) -> PyResult<bool> {
        self.board.begin(seq).map_err(|_| orphaned_error())
    }

    /// (worker) The token that began ended; its reply was staged or sent.
    fn end(&self) {
        self.board.end()
    }

    /// (worker) Publishes the resident set size, before the reply of the token that ended.
    fn set_rss(&self, bytes: i64) {
        self.board.set_rss(bytes)
    }

    /// Seq of the token the worker was running (read after it died), or None.
    fn running(&self) -> Option<i64> {
        self.board.running()
    }

    /// The worker's resident set size after its latest token (0: not measured).
    fn rss(&self) -> i64 {
        self.board.rss()
    }

    /// How many frames the worker had sent before its staged ones, and the reply frames
    /// it staged and had not sent (read once it is dead).
    fn staged<'py>(&self, py: Python<'py>) -> (i64, Bound<'py, PyBytes>) {
        let (before, data) = self.board.staged();
        (before, PyBytes::new(py, &data))
    }

    /// Stops token `seq`: 1 if it was running (`kill()` was called, and the worker cannot
    /// start another), 0 if it is listed to be skipped, 2 if no list word was free and
    /// `kill()` was called (the token running there died with the process).
    fn stop(&self, seq: i64, kill: &Bound<'_, PyAny>) -> PyResult<u8> {
        Ok(match self.board.stop(seq, || kill.call0().map(drop))? {
            Stop::Listed => 0,
            Stop::Killed => 1,
            Stop::KilledForRoom => 2,
        })
    }

    /// Lists up to `limit` of `seqs` sent after the running one (None while it runs none
    /// of them) and returns them: the worker skips them. With `share_from`, at most half
    /// of those waiting (rounded up), and none unless that comes to `share_from` or more.
    #[pyo3(signature = (seqs, limit, share_from=None))]
    fn take_back(&self, seqs: Vec<i64>, limit: usize, share_from: Option<usize>) -> Option<Vec<i64>> {
        self.board.take_back(&seqs, limit, share_from)
    }

    /// Frees the list word of a listed token (its reply arrived).
    fn unlist(&self, seq: i64) {
        self.board.unlist(seq)
    }
}

/// A worker's outgoing replies: staged on its board, sent together (see
/// `crate::engine::reply_stage`).
#[pyclass(frozen, module = "tokengate._tokengate")]
#[derive(Debug)]
pub struct ReplyOutbox {
    stage: ReplyStage,
}

#[pymethods]
impl ReplyOutbox {
    /// Stages replies on `board` and writes them to socket `fd` (left open, the
    /// caller's), `sent` frames having gone out on it already. `flusher`: a thread that
    /// sends what waited while a call runs on (without it every reply goes out at once).
    #[new]
    #[pyo3(signature = (board, fd, sent, flusher = true))]
    fn new(board: &ProcessBoard, fd: RawFd, sent: i64, flusher: bool) -> PyResult<Self> {
        let socket = file_of(fd)?;
        let stage = ReplyStage::new(board.board.clone(), socket, sent, flusher)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        Ok(ReplyOutbox { stage })
    }

    /// Stages `reply` (a whole message: seq, kind and payload) as one frame. A copy keeps
    /// the GIL (letting it go would hand it to any other thread of the worker for a switch
    /// interval); a write, or a wait for the flusher, lets it go.
    fn put(&self, py: Python<'_>, reply: &[u8]) -> PyResult<()> {
        match self.stage.try_put(reply) {
            Some(done) => done,
            None => py.detach(|| self.stage.put(reply)),
        }
        .map_err(os_error)
    }

    /// Whether to send the staged replies before a call that takes `call` seconds on
    /// average (None: not measured), calls under `short` running with replies staged.
    fn due(&self, call: Option<f64>, short: f64) -> bool {
        self.stage.due(call, short)
    }

    /// Sends the staged replies.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.stage.flush()).map_err(os_error)
    }
}

/// The supervisor's side of one worker's socket: reads replies and cuts them into
/// `(wire, kind, payload)` (see `_process/wire.py` for what a reply holds).
#[pyclass(module = "tokengate._tokengate")]
#[derive(Debug, Default)]
pub struct ReplyReader {
    buf: FrameBuf,
}

/// A reply as Python gets it (see [`reply_tuple`]).
type Reply<'py> = (i64, u8, Bound<'py, PyBytes>);

/// A reply's `(wire, kind, payload)`: its first 9 bytes are the token's number on the
/// wire (8 bytes, big-endian) and its kind; a shorter message reads as `(-1, 255, b"")`.
fn reply_tuple<'py>(py: Python<'py>, msg: &[u8]) -> Reply<'py> {
    match msg.get(..9) {
        Some(head) => (i64::from_be_bytes(head[..8].try_into().expect("8 bytes")), head[8], PyBytes::new(py, &msg[9..])),
        None => (-1, 255, PyBytes::new(py, b"")),
    }
}

impl ReplyReader {
    fn cut<'py>(&mut self, py: Python<'py>) -> Vec<Reply<'py>> {
        let mut out = Vec::new();
        self.buf.cut(|msg| out.push(reply_tuple(py, msg)));
        out
    }
}

#[pymethods]
impl ReplyReader {
    #[new]
    fn new() -> Self {
        ReplyReader::default()
    }

    /// One read of socket `fd` (non-blocking), and the whole replies it completed:
    /// `[]` when nothing was there, None at end of file or on an error (the worker is gone).
    fn read<'py>(&mut self, py: Python<'py>, fd: RawFd) -> PyResult<Option<Vec<Reply<'py>>>> {
        let socket = borrowed_file(fd)?;
        match py.detach(|| self.buf.read_from(&*socket)) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(self.cut(py))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Some(Vec::new())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Some(Vec::new())),
            Err(_) => Ok(None),
        }
    }

    /// Every reply socket `fd` still holds (read without waiting, after the worker
    /// died); a reply cut off by its death is dropped.
    fn drain<'py>(&mut self, py: Python<'py>, fd: RawFd) -> PyResult<Vec<Reply<'py>>> {
        let socket = borrowed_file(fd)?;
        loop {
            match py.detach(|| self.buf.read_from(&*socket)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock: nothing more
            }
        }
        let out = self.cut(py);
        self.buf.clear();
        Ok(out)
    }

    /// Appends `data` (bytes read elsewhere) and returns the whole replies it completed.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Vec<Reply<'py>> {
        self.buf.extend(data);
        self.cut(py)
    }

    /// Bytes held: the start of a reply cut off by the end of a read.
    #[getter]
    fn held(&self) -> usize {
        self.buf.held()
    }
}

/// The supervisor's outbox to one worker's socket: batches of tokens, framed, written
/// without blocking; what the socket does not take waits for the next `flush`.
#[pyclass(module = "tokengate._tokengate")]
#[derive(Debug, Default)]
pub struct BatchOutbox {
    out: FrameOutbox,
}

#[pymethods]
impl BatchOutbox {
    #[new]
    fn new() -> Self {
        BatchOutbox::default()
    }

    /// Frames `data` (one message) after what waits.
    fn push(&mut self, data: &[u8]) {
        self.out.push(data);
    }

    /// Writes what socket `fd` takes (non-blocking): True when nothing is left, False
    /// when the socket is full; OSError when the worker is gone.
    fn flush(&mut self, py: Python<'_>, fd: RawFd) -> PyResult<bool> {
        let socket = borrowed_file(fd)?;
        py.detach(|| self.out.write_to(&*socket)).map_err(os_error)
    }

    /// Bytes still to be written.
    fn __len__(&self) -> usize {
        self.out.pending()
    }
}
