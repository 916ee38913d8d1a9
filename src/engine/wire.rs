//! The process lane's framing: multiprocessing's `send_bytes` framing, which
//! both directions of a worker's socket carry.
//!
//! A message is a 4-byte big-endian signed length (or -1 and an 8-byte length,
//! for a message of 2 GiB or more), then the bytes. [`header`] makes the
//! prefix; [`FrameBuf`] holds what was read from a socket and cuts the whole
//! messages off its front, keeping a message cut off by the end of a read for
//! the next one; [`FrameOutbox`] holds framed messages for a socket that must
//! never block its writer, and writes what the socket takes.

use std::io::{self, Read, Write};

/// The length prefix of an `n`-byte message: the bytes, and how many of them are used.
pub fn header(n: usize) -> ([u8; 12], usize) {
    let mut head = [0u8; 12];
    if n < 0x7FFF_FFFF {
        head[..4].copy_from_slice(&(n as i32).to_be_bytes());
        (head, 4)
    } else {
        head[..4].copy_from_slice(&(-1i32).to_be_bytes());
        head[4..].copy_from_slice(&(n as u64).to_be_bytes());
        (head, 12)
    }
}

/// The size of the message at the front of `data`, with its prefix: `(prefix, body)`,
/// or None while the prefix itself is cut off.
fn prefix(data: &[u8]) -> Option<(usize, usize)> {
    let n = i32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    if n == -1 {
        let long = u64::from_be_bytes(data.get(4..12)?.try_into().ok()?);
        return Some((12, usize::try_from(long).unwrap_or(usize::MAX)));
    }
    // A negative length other than -1 is not this framing: read it as empty.
    Some((4, usize::try_from(n).unwrap_or(0)))
}

/// Bytes read from a socket and not yet cut into messages (see the module docs).
#[derive(Debug, Default)]
pub struct FrameBuf {
    /// `data[..end]` holds the bytes; the rest is room for the next read.
    data: Vec<u8>,
    end: usize,
}

/// Reads of at least this many bytes ...
const READ_MIN: usize = 1 << 16;
/// ... and at most this many.
const READ_MAX: usize = 1 << 22;

impl FrameBuf {
    /// Bytes held: the start of a message cut off by the end of a read.
    pub fn held(&self) -> usize {
        self.end
    }

    /// How many more bytes the message at the front needs (0 when unknown or none).
    fn need(&self) -> usize {
        match prefix(&self.data[..self.end]) {
            Some((head, body)) => (head.saturating_add(body)).saturating_sub(self.end),
            None => 0,
        }
    }

    /// Makes room for `n` more bytes and returns it.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.data.len() < self.end + n {
            self.data.resize(self.end + n, 0);
        }
        &mut self.data[self.end..self.end + n]
    }

    /// Appends `bytes`.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// One read from `source` (at least 64 KiB, more when the message at the front needs
    /// it, at most 4 MiB): the bytes read (0: end of file).
    pub fn read_from(&mut self, mut source: impl Read) -> io::Result<usize> {
        let n = self.need().clamp(READ_MIN, READ_MAX);
        let got = source.read(self.room(n))?;
        self.end += got;
        Ok(got)
    }

    /// Calls `each` with every whole message at the front, in order, then drops them
    /// (what is left of a message cut off stays for the next read).
    pub fn cut(&mut self, mut each: impl FnMut(&[u8])) {
        let mut pos = 0;
        while let Some((head, body)) = prefix(&self.data[pos..self.end]) {
            let Some(stop) = (pos + head).checked_add(body).filter(|&s| s <= self.end) else {
                break;
            };
            each(&self.data[pos + head..stop]);
            pos = stop;
        }
        self.data.copy_within(pos..self.end, 0);
        self.end -= pos;
        if self.end == 0 && self.data.len() > READ_MAX {
            self.data = Vec::new(); // a large message passed: give its room back
        }
    }

    /// Drops what is held (a message cut off for good).
    pub fn clear(&mut self) {
        self.end = 0;
    }
}

/// Framed messages waiting for a socket that must never block its writer (the
/// supervisor's side of a worker's socket: a worker busy with a long token may leave
/// it full). One owner: no lock.
#[derive(Debug, Default)]
pub struct FrameOutbox {
    /// `data[start..]` is still to be written.
    data: Vec<u8>,
    start: usize,
}

/// An emptied outbox keeps at most this much room (a batch is usually a few KiB).
const OUTBOX_KEEP: usize = 1 << 18;

impl FrameOutbox {
    /// Frames `msg` after what waits.
    pub fn push(&mut self, msg: &[u8]) {
        if self.start > 0 && self.start >= self.data.len() / 2 {
            self.data.drain(..self.start); // most of it went: move the rest to the front
            self.start = 0;
        }
        let (head, n) = header(msg.len());
        self.data.extend_from_slice(&head[..n]);
        self.data.extend_from_slice(msg);
    }

    /// Bytes still to be written.
    pub fn pending(&self) -> usize {
        self.data.len() - self.start
    }

    /// Writes what `sink` takes: `Ok(true)` when nothing is left, `Ok(false)` when the
    /// sink would block with bytes left (an interrupted write is retried); any other
    /// error is returned.
    pub fn write_to(&mut self, mut sink: impl Write) -> io::Result<bool> {
        while self.start < self.data.len() {
            match sink.write(&self.data[self.start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.data.clear();
        self.start = 0;
        if self.data.capacity() > OUTBOX_KEEP {
            self.data = Vec::new(); // a large batch went: give its room back
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let (h, n) = header(m.len());
            out.extend_from_slice(&h[..n]);
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn messages_are_cut_whole_from_reads_ending_anywhere() {
        let msgs: Vec<Vec<u8>> = (0..300u32).map(|i| vec![(i % 251) as u8; [0usize, 1, 5, 100, 70_000][(i * 7 % 5) as usize]]).collect();
        let stream = framed(&msgs);
        for step in [1usize, 3, 4, 7, 100, 5000, 100_000] {
            let mut buf = FrameBuf::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(step) {
                buf.extend(chunk);
                buf.cut(|m| got.push(m.to_vec()));
            }
            assert_eq!(got, msgs, "reads of {step} bytes");
            assert_eq!(buf.held(), 0);
        }
    }

    #[test]
    fn a_read_is_sized_for_the_message_at_the_front() {
        let msg = vec![9u8; 200_000];
        let stream = framed(std::slice::from_ref(&msg));
        let mut buf = FrameBuf::default();
        buf.extend(&stream[..10]);
        assert_eq!(buf.need(), 200_004 - 10);
        let mut source = &stream[10..];
        assert_eq!(buf.read_from(&mut source).unwrap(), 200_004 - 10, "one read takes the rest");
        let mut got = Vec::new();
        buf.cut(|m| got.push(m.len()));
        assert_eq!(got, vec![200_000]);
        assert_eq!(header(0x8000_0000).1, 12);
    }

    /// A sink that takes at most `room` bytes, then would block (or fails with `err`).
    struct Sink {
        got: Vec<u8>,
        room: usize,
        err: Option<io::ErrorKind>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(kind) = self.err.take() {
                return Err(kind.into());
            }
            let n = buf.len().min(self.room);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_outbox_writes_what_the_socket_takes_and_keeps_the_rest_in_order() {
        let msgs: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; usize::from(i) * 37]).collect();
        let mut out = FrameOutbox::default();
        let mut sink = Sink { got: Vec::new(), room: 0, err: Some(io::ErrorKind::Interrupted) };
        for (k, m) in msgs.iter().enumerate() {
            out.push(m);
            sink.room += 301; // the socket takes a little at a time
            let done = out.write_to(&mut sink).unwrap();
            assert_eq!(done, out.pending() == 0, "after message {k}");
        }
        while out.pending() > 0 {
            sink.room += 1000;
            out.write_to(&mut sink).unwrap();
        }
        assert_eq!(sink.got, framed(&msgs), "every message whole, in order (the interrupted write retried)");
        let mut broken = Sink { got: Vec::new(), room: 10, err: Some(io::ErrorKind::BrokenPipe) };
        out.push(b"x");
        assert_eq!(out.write_to(&mut broken).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(out.pending(), 5, "a failed write loses nothing");
    }
}
