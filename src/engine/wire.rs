//! The process lane's framing: multiprocessing's `send_bytes` framing, which
//! both directions of a worker's socket carry.
//!
//! A message is a 4-byte big-endian signed length (or -1 and an 8-byte length,
//! for a message of 2 GiB or more), then the bytes. [`header`] makes the
//! prefix; [`FrameBuf`] holds what was read from a socket and cuts the whole
//! messages off its front, keeping a message cut off by the end of a read for
//! the next one.

use std::io::{self, Read};

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
}
