//! HTTP/1.1 on one connection: read one request (httparse parses it), write
//! one reply, close. Every reply says `Connection: close`, so a connection
//! holds no thread once answered.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The longest request head read (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// The longest body read (admin actions send none; anything else is discarded).
const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send its whole request.
pub(super) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long one write may wait for a client that does not read.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One parsed request.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) method: String,
    /// The path and query, as sent.
    pub(super) target: String,
    headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of header `name` (any case).
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The client sent something that is not an HTTP/1.x request (answer 400).
    Malformed,
    /// The client went away or was too slow (answer nothing).
    Gone,
}

/// Reads from `stream` into `buf` before `deadline` (0: the client closed).
fn read_before(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Gone);
    }
    stream.set_read_timeout(Some(left)).map_err(|_| ReadError::Gone)?;
    stream.read(buf).map_err(|_| ReadError::Gone)
}

/// Reads one request from `stream`, all of it within `REQUEST_DEADLINE`.
/// A header that is not UTF-8, a repeated `Content-Length` or any
/// `Transfer-Encoding` makes it malformed.
pub(super) fn read_request(stream: &mut TcpStream) -> Result<Request, ReadError> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = read_before(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(ReadError::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let mut headers = Vec::with_capacity(parsed.headers.len());
                for h in parsed.headers.iter() {
                    let value = std::str::from_utf8(h.value).map_err(|_| ReadError::Malformed)?;
                    headers.push((h.name.to_owned(), value.trim().to_owned()));
                }
                let count = |name: &str| headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).count();
                if count("Content-Length") > 1 || count("Transfer-Encoding") > 0 || count("Host") > 1 || count("Origin") > 1 {
                    return Err(ReadError::Malformed);
                }
                let request = Request {
                    method: parsed.method.unwrap_or_default().to_owned(),
                    target: parsed.path.unwrap_or_default().to_owned(),
                    headers,
                };
                // A body is read and dropped (nothing here takes one), so that the
                // client sees its reply rather than a reset.
                let length: usize = match request.header("Content-Length") {
                    None => 0,
                    Some(l) => l.parse().map_err(|_| ReadError::Malformed)?,
                };
                if length > MAX_BODY {
                    return Err(ReadError::Malformed);
                }
                let mut left = length.saturating_sub(buf.len() - head_len);
                while left > 0 {
                    let take = left.min(chunk.len());
                    let n = read_before(stream, &mut chunk[..take], deadline)?;
                    if n == 0 {
                        return Err(ReadError::Gone);
                    }
                    left -= n;
                }
                return Ok(request);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return Err(ReadError::Malformed),
        }
    }
}

/// A reply ready to send.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        303 => "See Other",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

impl Reply {
    /// A reply with the headers every answer carries.
    pub(super) fn new(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        let headers = vec![
            ("Content-Type", content_type.to_owned()),
            ("Cache-Control", "no-store".to_owned()),
            ("X-Content-Type-Options", "nosniff".to_owned()),
            ("Referrer-Policy", "no-referrer".to_owned()),
        ];
        Reply { status, headers, body }
    }

    pub(super) fn with_header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }

    /// Sends it (no body for a HEAD request) and closes the connection.
    pub(super) fn send(&self, stream: &mut TcpStream, head_only: bool) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", self.body.len()));
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        // A client that went away is no concern of ours.
        let _ = stream.write_all(&bytes);
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}
