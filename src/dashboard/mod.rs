//! The dashboard server: a small HTTP/1.1 server on Rust threads that serves
//! one coordinator's metrics, a JSON API, server-sent events and a static page,
//! and takes admin actions. No Python here: what it serves and does comes from
//! a [`Backend`] (the binding layer's reads the engine's books without the GIL,
//! and takes the GIL only for an admin action).
//!
//! # Threads and protocol
//!
//! * One thread (`tokengate-dashboard`) accepts connections and hands each to
//!   a thread of its own (at most `MAX_CONNECTIONS` at once; more are answered
//!   503), so a slow client, a held event stream or an admin action waiting
//!   for the GIL never delays another request.
//! * A connection thread reads one request within `http::REQUEST_DEADLINE`,
//!   answers it (`routes.rs`) within `http::WRITE_TIMEOUT` per write, and
//!   closes the connection; an event stream writes one event per
//!   `EVENT_EVERY` until the client goes, the coordinator stops or the server
//!   stops.
//! * Every live connection's socket is kept (a clone) in `Shared::conns`.
//! * `stop()` (one at a time: `stop_lock`): set `stopping` and wake the
//!   streams (`wake`), shut the listening socket down (the accepting thread's
//!   `accept` returns at once) and every live connection's socket (their reads
//!   and writes fail at once), then join every thread but the calling one (an
//!   admin action may reach `stop()` from a connection thread, through a
//!   callback of a token it resolved). No thread it started outlives `stop()`,
//!   and the port is free when it returns. In a process forked after the
//!   server started, `stop()` only marks it stopped: its threads exist in the
//!   parent alone, and shutting the shared sockets down would stop the
//!   parent's server. `Drop` does not wait: it shuts the sockets down and lets
//!   the threads end (the binding layer stops a server with the GIL released
//!   before it drops it).

mod api;
mod http;
mod routes;

pub use api::{Action, Backend, OpVerb, Refusal, TokenQuery};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use serde_json::Value;

/// Connections served at once (event streams included); more are answered 503.
const MAX_CONNECTIONS: usize = 64;
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
    /// Host names (with `:port` unless it is 80) a reverse proxy may send in
    /// `Host`, besides the server's own address (a loopback bind refuses any
    /// other, against DNS rebinding); an `Origin` naming one of them is accepted too.
    pub allowed_hosts: Vec<String>,
}

/// A running dashboard server.
pub struct Server {
    shared: Arc<Shared>,
    address: SocketAddr,
    prefix: String,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("address", &self.address).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// What the server's threads share.
struct Shared {
    site: routes::Site,
    stopping: AtomicBool,
    /// Wakes the streams when `stopping` is set.
    wake: (Mutex<()>, Condvar),
    /// A clone of the listening socket, to shut it down.
    listener: TcpListener,
    conns: Mutex<Conns>,
    /// The accepting thread.
    accepting: Mutex<Option<JoinHandle<()>>>,
    /// One `stop()` at a time (a second caller returns once the first is done).
    stop_lock: Mutex<()>,
    /// The process that started the server (see "Threads and protocol").
    pid: u32,
}

/// The live connections and their threads.
#[derive(Default)]
struct Conns {
    next: u64,
    /// A clone of each live connection's socket, by id.
    live: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
    streams: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// A token the server accepts: at least 16 of `A-Z a-z 0-9 . _ ~ -` (it
/// travels in a header, a cookie and a URL, unescaped).
fn check_token(token: &str) -> Result<(), String> {
    if token.len() < 16 {
        return Err("a dashboard token must be at least 16 characters".into());
    }
    if !token.chars().all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c)) {
        return Err("a dashboard token may hold only letters, digits and . _ ~ -".into());
    }
    Ok(())
}

impl Server {
    /// Binds and starts serving. Errors name the problem (a bad prefix or
    /// token, a non-loopback address without a token, an address in use).
    pub fn start(config: ServeConfig, backend: Arc<dyn Backend>) -> Result<Server, String> {
        let prefix = normalize_prefix(&config.url_prefix)?;
        let ip: IpAddr = match config.host.as_str() {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            host => host.parse().map_err(|_| format!("host must be an IP address or \"localhost\", got {host:?}"))?,
        };
        if !ip.is_loopback() && config.token.is_none() {
            return Err(format!("refusing to serve on {ip}, which is not a loopback address, without a token"));
        }
        if let Some(token) = &config.token {
            check_token(token)?;
        }
        let allowed_hosts = config.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        let listener =
            TcpListener::bind(SocketAddr::new(ip, config.port)).map_err(|e| format!("cannot serve on {ip}:{}: {e}", config.port))?;
        let address = listener.local_addr().map_err(|e| format!("the dashboard's address: {e}"))?;
        let for_stop = listener.try_clone().map_err(|e| format!("the dashboard's socket: {e}"))?;
        let site = routes::Site { backend, token: config.token, admin: config.admin, prefix: prefix.clone(), address, allowed_hosts };
        let shared = Arc::new(Shared {
            site,
            stopping: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            listener: for_stop,
            conns: Mutex::new(Conns::default()),
            accepting: Mutex::new(None),
            stop_lock: Mutex::new(()),
            pid: std::process::id(),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tokengate-dashboard".into())
            .spawn(move || accept_loop(&for_thread, &listener))
            .map_err(|e| format!("cannot start the dashboard thread: {e}"))?;
        *lock(&shared.accepting) = Some(thread);
        Ok(Server { shared, address, prefix })
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

    /// Stops serving (see the module docs): no thread it started outlives it
    /// (but the calling one), and the port is free when it returns.
    pub fn stop(&self) {
        let shared = &self.shared;
        let _one_at_a_time = lock(&shared.stop_lock);
        if !shared.begin_stop() {
            return;
        }
        let me = std::thread::current().id();
        let accepting = lock(&shared.accepting).take();
        join_unless(accepting, me);
        loop {
            let threads = std::mem::take(&mut lock(&shared.conns).threads);
            if threads.is_empty() {
                break;
            }
            for t in threads {
                join_unless(Some(t), me);
            }
        }
    }
}

fn join_unless(thread: Option<JoinHandle<()>>, me: ThreadId) {
    if let Some(t) = thread {
        if t.thread().id() != me {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // No waiting here (see the module docs): the threads end on their own.
        let _one_at_a_time = lock(&self.shared.stop_lock);
        self.shared.begin_stop();
    }
}

impl Shared {
    /// Marks the server stopping, wakes the streams and shuts every socket
    /// down. False when it was stopping already, or in a forked child (where
    /// it only marks it).
    fn begin_stop(&self) -> bool {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return false;
        }
        if std::process::id() != self.pid {
            return false;
        }
        {
            let _guard = lock(&self.wake.0);
            self.wake.1.notify_all();
        }
        // Wakes `accept` at once, in every process that holds the socket.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        for stream in lock(&self.conns).live.values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        true
    }

    /// Serves `stream` on a thread of its own (503 when too many are open).
    fn spawn_connection(self: &Arc<Self>, mut stream: TcpStream) {
        let mut conns = lock(&self.conns);
        conns.threads.retain(|t| !t.is_finished());
        let clone = stream.try_clone();
        if conns.live.len() >= MAX_CONNECTIONS || self.stopping.load(Ordering::SeqCst) || clone.is_err() {
            drop(conns);
            let _ = stream.set_write_timeout(Some(http::WRITE_TIMEOUT));
            routes::text(503, "busy").send(&mut stream, false);
            return;
        }
        let id = conns.next;
        conns.next += 1;
        if let Ok(clone) = clone {
            conns.live.insert(id, clone);
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new().name("tokengate-dashboard-conn".into()).spawn(move || {
            serve_connection(&shared, stream);
            lock(&shared.conns).live.remove(&id);
        });
        match spawned {
            Ok(handle) => conns.threads.push(handle),
            Err(_) => {
                conns.live.remove(&id);
            }
        }
    }

    /// Waits up to `EVENT_EVERY`; false once the server stops.
    fn pause_between_events(&self) -> bool {
        let guard = lock(&self.wake.0);
        if self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let _ = self.wake.1.wait_timeout(guard, EVENT_EVERY);
        !self.stopping.load(Ordering::SeqCst)
    }
}

/// The accepting thread, until `stopping`.
fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => shared.spawn_connection(stream),
            // Out of descriptors, say: let connections close, then go on.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Reads one request from `stream` and answers it (an event stream runs here until it ends).
fn serve_connection(shared: &Arc<Shared>, mut stream: TcpStream) {
    match http::read_request(&mut stream) {
        Ok(request) => {
            let head_only = request.method == "HEAD";
            match routes::answer(&shared.site, &request) {
                routes::Answer::Reply(reply) => reply.send(&mut stream, head_only),
                routes::Answer::Events => {
                    let admitted = {
                        let mut conns = lock(&shared.conns);
                        let ok = conns.streams < MAX_STREAMS;
                        conns.streams += usize::from(ok);
                        ok
                    };
                    if admitted {
                        let _ = stream_events(shared, &mut stream);
                        lock(&shared.conns).streams -= 1;
                    } else {
                        routes::text(503, "too many event streams").send(&mut stream, false);
                    }
                }
            }
        }
        Err(http::ReadError::Malformed) => routes::error(400, "not a well-formed HTTP/1.1 request").send(&mut stream, false),
        Err(http::ReadError::Gone) => {}
    }
}

/// Writes `snapshot` events until the client goes away, the coordinator stops
/// (one `gone` event ends the stream) or the server stops.
fn stream_events(shared: &Shared, out: &mut TcpStream) -> std::io::Result<()> {
    use std::io::Write;
    out.set_write_timeout(Some(http::WRITE_TIMEOUT))?;
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\
                X-Content-Type-Options: nosniff\r\n\r\n";
    out.write_all(head.as_bytes())?;
    // The client reconnects after this long if the stream breaks.
    out.write_all(b"retry: 2000\n\n")?;
    loop {
        match shared.site.backend.snapshot() {
            Ok(mut snapshot) => {
                if let Value::Object(map) = &mut snapshot {
                    map.insert("admin".into(), Value::Bool(shared.site.admin));
                }
                write!(out, "event: snapshot\ndata: {snapshot}\n\n")?;
            }
            Err(_) => {
                write!(out, "event: gone\ndata: {{}}\n\n")?;
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
        if !shared.pause_between_events() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests;
