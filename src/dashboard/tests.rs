//! The server against a fake backend, over real sockets: routes, the token,
//! read-only mode, methods, Host and Origin checks, event streams, stop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicUsize;

use super::*;

#[derive(Default)]
struct Fake {
    actions: Mutex<Vec<Action>>,
    snapshots: AtomicUsize,
}

impl Backend for Fake {
    fn metrics(&self) -> Result<String, Refusal> {
        Ok("# HELP x y\n# TYPE x gauge\nx 1\n".into())
    }

    fn snapshot(&self) -> Result<Value, Refusal> {
        let n = self.snapshots.fetch_add(1, Ordering::SeqCst);
        Ok(serde_json::json!({ "n": n }))
    }

    fn operations(&self) -> Result<Value, Refusal> {
        Ok(serde_json::json!([{ "name": "a" }]))
    }

    fn tokens(&self, query: &TokenQuery) -> Result<Value, Refusal> {
        Ok(serde_json::json!({ "state": query.state, "op": query.op, "limit": query.limit }))
    }

    fn act(&self, action: &Action) -> Result<Value, Refusal> {
        if let Action::Operation { op, .. } = action {
            if op == "missing" {
                return Err(Refusal::UnknownOperation(op.clone()));
            }
        }
        self.actions.lock().unwrap().push(action.clone());
        Ok(serde_json::json!({ "ok": true }))
    }
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn start(admin: bool, prefix: &str) -> (Server, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let config = ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        admin,
        url_prefix: prefix.into(),
        token: Some(TOKEN.into()),
        allowed_hosts: vec!["dash.example.org".into()],
    };
    (Server::start(config, fake.clone()).expect("the server starts"), fake)
}

/// Sends one request; returns the status and the whole response text.
fn send(server: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n", server.address().port());
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

const BEARER: (&str, &str) = ("Authorization", "Bearer 0123456789abcdef0123456789abcdef");

#[test]
fn every_route_but_healthz_needs_the_token() {
    let (server, _) = start(true, "");
    assert_eq!(send(&server, "GET", "/healthz", &[]).0, 200);
    for path in ["/", "/app.js", "/app.css", "/metrics", "/api/v1/snapshot", "/api/v1/ops", "/api/v1/tokens", "/api/v1/events"] {
        assert_eq!(send(&server, "GET", path, &[]).0, 401, "{path}");
        assert_eq!(send(&server, "GET", path, &[("Authorization", "Bearer wrong-token-of-some-length")]).0, 401, "{path}");
    }
    for path in ["/api/v1/ops/a/pause", "/api/v1/admission/pause"] {
        assert_eq!(send(&server, "POST", path, &[]).0, 401, "{path}");
    }
    let (status, body) = send(&server, "GET", "/metrics", &[BEARER]);
    assert_eq!(status, 200);
    assert!(body.contains("text/plain; version=0.0.4") && body.ends_with("x 1\n"), "{body}");
}

#[test]
fn a_one_time_token_in_the_url_sets_a_strict_cookie() {
    let (server, _) = start(false, "");
    let (status, text) = send(&server, "GET", &format!("/api/v1/tokens?op=a&token={TOKEN}"), &[]);
    assert_eq!(status, 303);
    assert!(text.contains("Location: /api/v1/tokens?op=a\r\n"), "{text}");
    let port = server.address().port();
    assert!(text.contains(&format!("Set-Cookie: tokengate_token_{port}={TOKEN}; Path=/; HttpOnly; SameSite=Strict")), "{text}");
    let cookie = format!("tokengate_token_{port}={TOKEN}");
    let (status, body) = send(&server, "GET", "/api/v1/tokens?op=a&state=executing&limit=5", &[("Cookie", &cookie)]);
    assert_eq!(status, 200);
    assert!(body.ends_with(r#"{"limit":5,"op":"a","state":"executing"}"#), "{body}");
    assert_eq!(send(&server, "GET", "/api/v1/tokens?limit=0", &[BEARER]).0, 400);
}

#[test]
fn read_only_refuses_admin_actions_and_changes_nothing() {
    let (server, fake) = start(false, "");
    for path in ["/api/v1/ops/a/pause", "/api/v1/ops/a/kill", "/api/v1/admission/pause"] {
        assert_eq!(send(&server, "POST", path, &[BEARER]).0, 403, "{path}");
    }
    assert!(fake.actions.lock().unwrap().is_empty());
    let (_, body) = send(&server, "GET", "/api/v1/snapshot", &[BEARER]);
    assert!(body.contains(r#""admin":false"#), "{body}");
}

#[test]
fn admin_actions_are_post_only_and_same_origin() {
    let (server, fake) = start(true, "");
    assert_eq!(send(&server, "GET", "/api/v1/ops/a/pause", &[BEARER]).0, 405);
    assert_eq!(send(&server, "POST", "/api/v1/snapshot", &[BEARER]).0, 405);
    assert_eq!(send(&server, "POST", "/api/v1/ops/a/pause", &[BEARER, ("Origin", "http://evil.example")]).0, 403);
    let own = format!("http://127.0.0.1:{}", server.address().port());
    assert_eq!(send(&server, "POST", "/api/v1/ops/a%2Fb/pause", &[BEARER, ("Origin", &own)]).0, 200);
    assert_eq!(send(&server, "POST", "/api/v1/admission/resume", &[BEARER]).0, 200);
    assert_eq!(send(&server, "POST", "/api/v1/ops/missing/kill", &[BEARER]).0, 404);
    assert_eq!(send(&server, "POST", "/api/v1/ops/a/explode", &[BEARER]).0, 404);
    let actions = fake.actions.lock().unwrap().clone();
    assert_eq!(
        actions,
        vec![Action::Operation { op: "a/b".into(), verb: OpVerb::Pause }, Action::Admission { pause: false }],
        "only the allowed requests acted"
    );
}

#[test]
fn a_foreign_host_is_refused() {
    let (server, _) = start(true, "");
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = "GET /healthz HTTP/1.1\r\nHost: attacker.example:80\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
}

#[test]
fn a_url_prefix_holds_every_route() {
    let (server, _) = start(true, "/tools/tg/");
    assert!(server.url().contains(":") && server.url().contains("/tools/tg/?token="), "{}", server.url());
    assert_eq!(send(&server, "GET", "/healthz", &[]).0, 404);
    assert_eq!(send(&server, "GET", "/tools/tg/healthz", &[]).0, 200);
    let (status, text) = send(&server, "GET", "/tools/tg", &[BEARER]);
    assert_eq!(status, 308);
    assert!(text.contains("Location: /tools/tg/\r\n"));
    let (status, text) = send(&server, "GET", "/tools/tg/", &[BEARER]);
    assert_eq!(status, 200);
    assert!(text.contains("Content-Security-Policy: default-src 'none'") && text.contains(r#"src="app.js""#), "{text}");
    let (_, text) = send(&server, "GET", &format!("/tools/tg/?token={TOKEN}"), &[]);
    assert!(text.contains("Path=/tools/tg/;"), "{text}");
}

#[test]
fn events_stream_snapshots_and_stop_ends_them_and_frees_the_port() {
    let (server, _) = start(false, "");
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = server.address().port();
    let request = format!("GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("event: snapshot").count() < 2 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"), "{seen}");
    let t0 = std::time::Instant::now();
    server.stop();
    assert!(t0.elapsed() < Duration::from_secs(1), "stop took {:?}", t0.elapsed());
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free after stop");
}

#[test]
fn bad_configurations_are_refused_with_a_reason() {
    let fake: Arc<dyn Backend> = Arc::new(Fake::default());
    let config = |host: &str, prefix: &str, token: Option<&str>| ServeConfig {
        host: host.into(),
        port: 0,
        admin: false,
        url_prefix: prefix.into(),
        token: token.map(Into::into),
        allowed_hosts: vec![],
    };
    let err = Server::start(config("0.0.0.0", "", None), fake.clone()).unwrap_err();
    assert!(err.contains("not a loopback address, without a token"), "{err}");
    let err = Server::start(config("127.0.0.1", "/a/../b", Some(TOKEN)), fake.clone()).unwrap_err();
    assert!(err.contains("url_prefix"), "{err}");
    let err = Server::start(config("127.0.0.1", "", Some("short")), fake.clone()).unwrap_err();
    assert!(err.contains("at least 16"), "{err}");
    let err = Server::start(config("127.0.0.1", "", Some("0123456789abcdef\r\nX: y")), fake.clone()).unwrap_err();
    assert!(err.contains("only letters, digits"), "{err}");
    let err = Server::start(config("example.com", "", Some(TOKEN)), fake.clone()).unwrap_err();
    assert!(err.contains("IP address"), "{err}");
    assert_eq!(new_token().unwrap().len(), 64);
    assert_ne!(new_token().unwrap(), new_token().unwrap());
}

/// Sends raw bytes; returns what came back.
fn raw(server: &Server, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

#[test]
fn header_and_path_tricks_are_refused() {
    let (server, _) = start(true, "/tools/tg");
    let port = server.address().port();
    // A sibling of the prefix is not under it.
    assert_eq!(send(&server, "GET", "/tools/tgx/api/v1/snapshot", &[BEARER]).0, 404);
    assert_eq!(send(&server, "GET", "/tools/tg//api/v1/snapshot", &[BEARER]).0, 404);
    // The Bearer scheme is case-insensitive; the token is not.
    assert_eq!(send(&server, "GET", "/tools/tg/api/v1/ops", &[("Authorization", &format!("bearer {TOKEN}"))]).0, 200);
    assert_eq!(send(&server, "GET", "/tools/tg/api/v1/ops", &[("Authorization", &format!("Bearer {}", TOKEN.to_uppercase()))]).0, 401);
    // Reads refuse a foreign Origin too; https on the same host (a TLS proxy) is the same origin.
    assert_eq!(send(&server, "GET", "/tools/tg/api/v1/ops", &[BEARER, ("Origin", "http://evil.example")]).0, 403);
    let https = format!("https://127.0.0.1:{port}");
    assert_eq!(send(&server, "GET", "/tools/tg/api/v1/ops", &[BEARER, ("Origin", &https)]).0, 200);
    // The event stream is GET only (HEAD would open an endless body).
    assert_eq!(send(&server, "HEAD", "/tools/tg/api/v1/events", &[BEARER]).0, 405);
    // The bare prefix keeps the query when it redirects.
    let (status, text) = send(&server, "GET", &format!("/tools/tg?token={TOKEN}"), &[]);
    assert_eq!(status, 308);
    assert!(text.contains(&format!("Location: /tools/tg/?token={TOKEN}\r\n")), "{text}");
    // Two Content-Length headers, a chunked body, a header that is not UTF-8: 400.
    let twice = format!("GET /tools/tg/healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n");
    assert!(raw(&server, twice.as_bytes()).starts_with("HTTP/1.1 400"));
    let chunked = format!("POST /tools/tg/healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(raw(&server, chunked.as_bytes()).starts_with("HTTP/1.1 400"));
    let mut bad = format!("GET /tools/tg/healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: ").into_bytes();
    bad.extend_from_slice(b"\xff\xfe\r\n\r\n");
    assert!(raw(&server, &bad).starts_with("HTTP/1.1 400"));
}

#[test]
fn an_allowed_host_passes_the_host_and_origin_checks() {
    let (server, fake) = start(true, "");
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = format!(
        "POST /api/v1/admission/pause HTTP/1.1\r\nHost: dash.example.org\r\nOrigin: https://dash.example.org\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(fake.actions.lock().unwrap().len(), 1);
}

#[test]
fn slow_and_silent_clients_delay_no_one_and_stop_ends_them_at_once() {
    let (server, _) = start(false, "");
    let port = server.address().port();
    // A client that connects and says nothing, one that drips a byte, one that never reads its events.
    let _silent = TcpStream::connect(server.address()).unwrap();
    let mut dripping = TcpStream::connect(server.address()).unwrap();
    dripping.write_all(b"G").unwrap();
    let mut deaf = TcpStream::connect(server.address()).unwrap();
    let events = format!("GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    deaf.write_all(events.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    assert_eq!(send(&server, "GET", "/healthz", &[]).0, 200);
    assert!(t0.elapsed() < Duration::from_millis(500), "a held connection delayed another: {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    server.stop();
    assert!(t0.elapsed() < Duration::from_secs(1), "stop took {:?}", t0.elapsed());
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free after stop");
    // stop() joined every thread it started (tests run beside each other here, so the
    // process's thread names say nothing; tests/test_dashboard.py reads them).
    assert!(server.shared.conns.lock().unwrap().threads.is_empty());
    assert!(server.shared.accepting.lock().unwrap().is_none());
}
