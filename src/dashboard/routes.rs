//! One request, answered: the routes and the order of the checks.
//!
//! 1. `Host` must name the server on a loopback bind (403): a page of
//!    another site whose name resolves to 127.0.0.1 cannot reach it.
//! 2. The path must lie under the URL prefix (404); the prefix itself
//!    redirects to the prefix with a slash, so the page's relative URLs work.
//! 3. `/healthz` answers without a token.
//! 4. The token (401 without it): `Authorization: Bearer`, the cookie, or a
//!    one-time `?token=`, answered with a redirect that sets the cookie and
//!    drops the token from the URL.
//! 5. The method: GET or HEAD on reads, POST on admin routes (405).
//! 6. Admin routes: 403 when read-only, and 403 for an `Origin` other than
//!    the server's own; reads also refuse a foreign `Origin`.
//! 7. The route itself; a backend that cannot answer gives 503 (gone), 404
//!    (no such operation) or 500.

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use super::api::{Action, Backend, OpVerb, Refusal, TokenQuery};
use super::http::{Reply, Request};

/// What the routes answer from, and how they guard it.
pub(super) struct Site {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) token: Option<String>,
    pub(super) admin: bool,
    /// `""` or `/a/b`.
    pub(super) prefix: String,
    pub(super) address: SocketAddr,
    /// More names `Host` and `Origin` may give (lowercase; see `ServeConfig`).
    pub(super) allowed_hosts: Vec<String>,
}

impl Site {
    /// The cookie that carries the token (one per port: cookies ignore ports).
    fn cookie(&self) -> String {
        format!("tokengate_token_{}", self.address.port())
    }
}

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/favicon.svg");
/// The page may load only from its own origin, and may not be framed.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                           base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What a path names (below the prefix).
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Index,
    Asset(&'static str, &'static str),
    Healthz,
    Metrics,
    Snapshot,
    Ops,
    Tokens,
    Events,
    Act(Action),
    NotFound,
}

impl Route {
    fn parse(path: &str) -> Route {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            [""] => Route::Index,
            ["app.js"] => Route::Asset(SCRIPT, "text/javascript; charset=utf-8"),
            ["app.css"] => Route::Asset(STYLE, "text/css; charset=utf-8"),
            ["favicon.svg"] => Route::Asset(ICON, "image/svg+xml"),
            ["healthz"] => Route::Healthz,
            ["metrics"] => Route::Metrics,
            ["api", "v1", "snapshot"] => Route::Snapshot,
            ["api", "v1", "ops"] => Route::Ops,
            ["api", "v1", "tokens"] => Route::Tokens,
            ["api", "v1", "events"] => Route::Events,
            ["api", "v1", "admission", verb] => match *verb {
                "pause" => Route::Act(Action::Admission { pause: true }),
                "resume" => Route::Act(Action::Admission { pause: false }),
                _ => Route::NotFound,
            },
            ["api", "v1", "ops", op, verb] => {
                let op = percent_encoding::percent_decode_str(op).decode_utf8();
                match (op, OpVerb::parse(verb)) {
                    (Ok(op), Some(verb)) if !op.is_empty() => Route::Act(Action::Operation { op: op.into_owned(), verb }),
                    _ => Route::NotFound,
                }
            }
            _ => Route::NotFound,
        }
    }
}

pub(super) fn text(status: u16, body: &str) -> Reply {
    Reply::new(status, "text/plain; charset=utf-8", format!("{body}\n").into_bytes())
}

fn json_reply(status: u16, value: &Value) -> Reply {
    Reply::new(status, "application/json", value.to_string().into_bytes())
}

pub(super) fn error(status: u16, message: &str) -> Reply {
    json_reply(status, &json!({ "error": message }))
}

fn refused(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::Gone => error(503, "the coordinator is not running"),
        Refusal::UnknownOperation(op) => error(404, &format!("no operation {op:?}")),
        Refusal::BadRequest(why) => error(400, &why),
        Refusal::Failed(why) => error(500, &why),
    }
}

/// Equal without a timing that depends on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `host[:port]` as `(host, port)`, the port 80 when absent.
fn split_host(value: &str) -> Option<(String, u16)> {
    let value = value.to_ascii_lowercase();
    let (name, port) = match value.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name.to_owned(), port.parse().ok()?),
        _ => (value, 80),
    };
    Some((name, port))
}

/// True when `Host` names this server. On a loopback bind that is its own
/// address, `localhost`, or an allowed host: a page of another site whose name
/// resolves to 127.0.0.1 is refused (DNS rebinding). On another bind any name
/// may lead here; the token guards it.
fn host_ok(site: &Site, request: &Request) -> bool {
    if !site.address.ip().is_loopback() {
        return true;
    }
    let Some(host) = request.header("Host") else {
        return false;
    };
    if site.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return true;
    }
    let own = match site.address.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    split_host(host).is_some_and(|(name, port)| port == site.address.port() && (name == own || name == "localhost"))
}

/// True when the request sent no `Origin`, or one on the host it asked for
/// (http or https: a TLS proxy in front), or on an allowed host.
fn origin_ok(site: &Site, request: &Request) -> bool {
    let Some(origin) = request.header("Origin") else {
        return true;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return false;
    }
    let same_host = request.header("Host").is_some_and(|h| h.eq_ignore_ascii_case(authority));
    same_host || site.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(authority))
}

enum Auth {
    Granted,
    /// A valid one-time `?token=`: redirect, setting the cookie.
    FromQuery,
    Denied,
}

fn authorize(shared: &Site, request: &Request, query: &[(String, String)]) -> Auth {
    let Some(token) = shared.token.as_deref() else {
        return Auth::Granted;
    };
    if let Some(value) = request.header("Authorization") {
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        let granted = scheme.eq_ignore_ascii_case("Bearer") && same_secret(credentials.trim(), token);
        return if granted { Auth::Granted } else { Auth::Denied };
    }
    let name = shared.cookie();
    let cookie = request
        .header("Cookie")
        .into_iter()
        .flat_map(|c| c.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v);
    if cookie.is_some_and(|c| same_secret(c, token)) {
        return Auth::Granted;
    }
    match query.iter().find(|(k, _)| k == "token") {
        Some((_, t)) if same_secret(t, token) => Auth::FromQuery,
        _ => Auth::Denied,
    }
}

/// What a request gets.
pub(super) enum Answer {
    Reply(Reply),
    /// The connection becomes an event stream.
    Events,
}

/// Answers one request (see the module docs for the order of the checks).
pub(super) fn answer(shared: &Site, request: &Request) -> Answer {
    let reply = Answer::Reply;
    let url = request.target.clone();
    let (path, query_text) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let query: Vec<(String, String)> = form_urlencoded::parse(query_text.as_bytes()).into_owned().collect();
    if !host_ok(shared, request) {
        return reply(error(403, "the Host header does not name this server"));
    }
    let Some(rest) = path.strip_prefix(shared.prefix.as_str()) else {
        return reply(error(404, "not found"));
    };
    if rest.is_empty() {
        let to = if query_text.is_empty() { format!("{}/", shared.prefix) } else { format!("{}/?{query_text}", shared.prefix) };
        return reply(text(308, "moved").with_header("Location", &to));
    }
    // No empty segment: `//x` would name another host in a redirect.
    if !rest.starts_with('/') || rest.contains("//") {
        return reply(error(404, "not found"));
    }
    let route = Route::parse(rest);
    if route == Route::NotFound {
        return reply(error(404, "not found"));
    }
    let method = request.method.as_str();
    let reading = matches!(method, "GET" | "HEAD");
    if route == Route::Healthz {
        return reply(if reading { text(200, "ok") } else { not_allowed("GET") });
    }
    match authorize(shared, request, &query) {
        Auth::Granted => {}
        Auth::Denied => {
            let r = error(401, "a token is needed: Authorization: Bearer <token>, or open the URL the server printed");
            return reply(r.with_header("WWW-Authenticate", "Bearer"));
        }
        Auth::FromQuery => return reply(set_cookie_and_redirect(shared, path, &query)),
    }
    if let Route::Act(action) = &route {
        if method != "POST" {
            return reply(not_allowed("POST"));
        }
        if !shared.admin {
            return reply(error(403, "read-only: start the server with admin=True to allow admin actions"));
        }
        if !origin_ok(shared, request) {
            return reply(error(403, "cross-origin request refused"));
        }
        let response = match shared.backend.act(action) {
            Ok(done) => json_reply(200, &done),
            Err(why) => refused(why),
        };
        return reply(response);
    }
    if route == Route::Events && method != "GET" {
        return reply(not_allowed("GET"));
    }
    if !reading {
        return reply(not_allowed("GET, HEAD"));
    }
    if !origin_ok(shared, request) {
        return reply(error(403, "cross-origin request refused"));
    }
    let response = match route {
        Route::Index => Reply::new(200, "text/html; charset=utf-8", INDEX.as_bytes().to_vec())
            .with_header("Content-Security-Policy", PAGE_POLICY)
            .with_header("X-Frame-Options", "DENY"),
        Route::Asset(body, content_type) => Reply::new(200, content_type, body.as_bytes().to_vec()),
        Route::Metrics => match shared.backend.metrics() {
            Ok(text) => Reply::new(200, "text/plain; version=0.0.4; charset=utf-8", text.into_bytes()),
            Err(why) => refused(why),
        },
        Route::Snapshot => match shared.backend.snapshot() {
            Ok(mut snapshot) => {
                if let Value::Object(map) = &mut snapshot {
                    map.insert("admin".into(), Value::Bool(shared.admin));
                }
                json_reply(200, &snapshot)
            }
            Err(why) => refused(why),
        },
        Route::Ops => shared.backend.operations().map_or_else(refused, |v| json_reply(200, &v)),
        Route::Tokens => {
            let get = |k: &str| query.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
            let limit = match get("limit").map(|l| l.parse::<usize>()) {
                None => 100,
                Some(Ok(n)) if (1..=10_000).contains(&n) => n,
                Some(_) => return reply(error(400, "limit must be a whole number from 1 to 10000")),
            };
            let q = TokenQuery { state: get("state"), op: get("op"), limit };
            shared.backend.tokens(&q).map_or_else(refused, |v| json_reply(200, &v))
        }
        Route::Events => return Answer::Events,
        Route::Healthz | Route::Act(_) | Route::NotFound => unreachable!("answered above"),
    };
    reply(response)
}

fn not_allowed(allow: &str) -> Reply {
    error(405, &format!("method not allowed (allowed: {allow})")).with_header("Allow", allow)
}

/// The answer to a valid `?token=`: the cookie, and the same URL without the token.
fn set_cookie_and_redirect(shared: &Site, path: &str, query: &[(String, String)]) -> Reply {
    let token = shared.token.as_deref().unwrap_or_default();
    let kept: Vec<&(String, String)> = query.iter().filter(|(k, _)| k != "token").collect();
    let mut to = path.to_owned();
    if !kept.is_empty() {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in kept {
            q.append_pair(k, v);
        }
        to = format!("{to}?{}", q.finish());
    }
    let cookie_path = if shared.prefix.is_empty() { "/".to_owned() } else { format!("{}/", shared.prefix) };
    text(303, "see other")
        .with_header("Location", &to)
        .with_header("Set-Cookie", &format!("{}={token}; Path={cookie_path}; HttpOnly; SameSite=Strict", shared.cookie()))
}
