//! The dashboard server: a small HTTP/1.1 server on Rust threads that serves
//! one coordinator's metrics, a JSON API, server-sent events and a static page,
//! and takes admin actions. No Python here: what it serves and does comes from
//! a [`Backend`] (the binding layer's reads the engine's books without the GIL,
//! and takes the GIL only for an admin action).
//!
//! # Threads and protocol
//!
//! * One thread (`tokengate-dashboard`) accepts connections and answers each
//!   in turn: it reads one request (`http.rs`, at most `READ_TIMEOUT`),
//!   answers it (`routes.rs`) and closes the connection.
//! * An event stream gets a thread of its own (at most `MAX_STREAMS`), which
//!   writes one event per `EVENT_EVERY` until the client goes or the server
//!   stops.
//! * `stop()`: set `stopping` and wake the streams (they wait on `wake`),
//!   connect once to the listener to wake the accepting thread, join it and
//!   every stream; the listener is closed when the accepting thread ends. No
//!   thread it started outlives `stop()`, and the port is free when it
//!   returns. Runs once; `Drop` runs it too.
//!
//! # Security (see `routes.rs` for the order of the checks)
//!
//! * Binds 127.0.0.1 unless told otherwise, and refuses a non-loopback address
//!   without a token.
//! * A random token per server (32 bytes from the OS), compared in constant
//!   time: `Authorization: Bearer`, or a cookie that a one-time `?token=` sets
//!   (HttpOnly, SameSite=Strict). `/healthz` alone needs none.
//! * Read-only unless `admin`: admin routes answer 403 and change nothing.
//!   Admin actions are POST only (405 otherwise).
//! * On a loopback bind the `Host` header must name the server (no DNS
//!   rebinding), and an `Origin`, when sent, must be the server's own (no
//!   cross-site requests).
//! * The page loads nothing from another origin (a strict
//!   Content-Security-Policy) and uses relative URLs only, so it works under
//!   a URL prefix behind a reverse proxy.

mod api;
mod http;
mod routes;

pub use api::{Action, Backend, OpVerb, Refusal, TokenQuery};

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

/// Event streams open at once; more are answered 503.
const MAX_STREAMS: usize = 16;
/// One server-sent event per this interval.
const EVENT_EVERY: Duration = Duration::from_secs(1);

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind (127.0.0.1 by default).
    pub host: String,
    /// Port (0: one the OS picks).
    pub port: u16,
    /// Allow admin actions.
    pub admin: bool,
    /// Where the dashboard lives under a reverse proxy (`""` or `/a/b`).
    pub url_prefix: String,
    /// The token clients must show (None: no token, loopback only).
    pub token: Option<String>,
}

/// A running dashboard server.
pub struct Server {
    shared: Arc<Shared>,
    address: SocketAddr,
    prefix: String,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("address", &self.address).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// What the request thread and the streams share.
struct Shared {
    site: routes::Site,
    stopping: AtomicBool,
    /// Wakes the streams when `stopping` is set.
    wake: (Mutex<()>, Condvar),
    streams: Mutex<Vec<JoinHandle<()>>>,
}

/// A random token: 32 bytes from the OS, as hex.
pub fn new_token() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("no randomness for the dashboard token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `""` or `/a/b` (leading slash, no trailing one), from what a user wrote.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let ok = trimmed
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && seg.chars().all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c)));
    if !ok {
        return Err(format!("url_prefix must be path segments of letters, digits and -._~, got {prefix:?}"));
    }
    Ok(format!("/{trimmed}"))
}

impl Server {
    /// Binds and starts serving. Errors name the problem (a bad prefix, a
    /// non-loopback address without a token, an address in use).
    pub fn start(config: ServeConfig, backend: Arc<dyn Backend>) -> Result<Server, String> {
        let prefix = normalize_prefix(&config.url_prefix)?;
        let ip: IpAddr = match config.host.as_str() {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            host => host.parse().map_err(|_| format!("host must be an IP address or \"localhost\", got {host:?}"))?,
        };
        if !ip.is_loopback() && config.token.is_none() {
            return Err(format!("refusing to serve on {ip}, which is not a loopback address, without a token"));
        }
        if config.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err("a dashboard token must be at least 16 characters".into());
        }
        let listener =
            TcpListener::bind(SocketAddr::new(ip, config.port)).map_err(|e| format!("cannot serve on {ip}:{}: {e}", config.port))?;
        let address = listener.local_addr().map_err(|e| format!("the dashboard's address: {e}"))?;
        let shared = Arc::new(Shared {
            site: routes::Site { backend, token: config.token, admin: config.admin, prefix: prefix.clone(), address },
            stopping: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            streams: Mutex::new(Vec::new()),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tokengate-dashboard".into())
            .spawn(move || serve(&for_thread, &listener))
            .map_err(|e| format!("cannot start the dashboard thread: {e}"))?;
        Ok(Server { shared, address, prefix, thread: Mutex::new(Some(thread)) })
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The token clients must show (None: none).
    pub fn token(&self) -> Option<&str> {
        self.shared.site.token.as_deref()
    }

    /// The page's URL, with the one-time `?token=` when there is a token.
    pub fn url(&self) -> String {
        let host = match self.address.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        };
        let base = format!("http://{host}:{}{}/", self.address.port(), self.prefix);
        match self.token() {
            Some(t) => format!("{base}?token={t}"),
            None => base,
        }
    }

    /// True until `stop` ran.
    pub fn is_running(&self) -> bool {
        !self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Stops serving (see the module docs); the port is free when it returns.
    pub fn stop(&self) {
        let shared = &self.shared;
        if shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let _guard = shared.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.1.notify_all();
        }
        // Wakes the accepting thread; it sees `stopping` and ends, closing the listener.
        let _ = TcpStream::connect_timeout(&wake_address(self.address), Duration::from_secs(1));
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
        let streams = std::mem::take(&mut *shared.streams.lock().unwrap_or_else(|e| e.into_inner()));
        for stream in streams {
            let _ = stream.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where to connect to reach a listener on `address` (an unspecified
/// address is reached through loopback).
fn wake_address(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), address.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), address.port()),
        _ => address,
    }
}

/// The accepting thread: one connection at a time, until `stopping`.
fn serve(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => serve_connection(shared, stream),
            // Out of descriptors, say: let connections close, then go on.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Reads one request from `stream` and answers it.
fn serve_connection(shared: &Arc<Shared>, mut stream: TcpStream) {
    match http::read_request(&mut stream) {
        Ok(request) => {
            let head_only = request.method == "HEAD";
            match routes::answer(&shared.site, &request) {
                routes::Answer::Reply(reply) => reply.send(&mut stream, head_only),
                routes::Answer::Events => shared.open_stream(stream),
            }
        }
        Err(http::ReadError::Malformed) => routes::error(400, "not an HTTP/1.1 request").send(&mut stream, false),
        Err(http::ReadError::Gone) => {}
    }
}

impl Shared {
    /// Starts a stream thread for an event-stream request (503 when too many are open).
    fn open_stream(self: &Arc<Self>, mut stream: TcpStream) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.retain(|h| !h.is_finished());
        if streams.len() >= MAX_STREAMS || self.stopping.load(Ordering::SeqCst) {
            drop(streams);
            routes::text(503, "too many event streams").send(&mut stream, false);
            return;
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new().name("tokengate-dashboard-events".into()).spawn(move || {
            let _ = stream_events(&shared, &mut stream);
        });
        if let Ok(handle) = spawned {
            streams.push(handle);
        }
    }

    /// Waits up to `EVENT_EVERY`; false once the server stops.
    fn pause_between_events(&self) -> bool {
        let guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let _ = self.wake.1.wait_timeout(guard, EVENT_EVERY);
        !self.stopping.load(Ordering::SeqCst)
    }
}

/// Writes `snapshot` events until the client goes away or the server stops.
fn stream_events(shared: &Shared, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\
                X-Content-Type-Options: nosniff\r\n\r\n";
    out.write_all(head.as_bytes())?;
    // The client reconnects after this long if the stream breaks.
    out.write_all(b"retry: 2000\n\n")?;
    out.flush()?;
    loop {
        match shared.site.backend.snapshot() {
            Ok(snapshot) => {
                let mut snapshot = snapshot;
                if let Value::Object(map) = &mut snapshot {
                    map.insert("admin".into(), Value::Bool(shared.site.admin));
                }
                write!(out, "event: snapshot\ndata: {snapshot}\n\n")?;
            }
            Err(_) => write!(out, "event: gone\ndata: {{}}\n\n")?,
        }
        out.flush()?;
        if !shared.pause_between_events() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests;
