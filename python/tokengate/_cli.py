"""The ``tokengate`` command line's commands: a client of a coordinator's dashboard server
(``OperationsCoordinator.serve``) and what each command prints.

This module uses the standard library only (``urllib.request`` and ``json``) and imports no
other module of tokengate's. Run as ``tokengate`` or ``python -m tokengate``, a command still
pays for ``import tokengate`` (the package's ``__init__`` loads the engine), then makes one or
two requests. The JSON each command prints with ``--json`` is described in docs/cli.md.

What the server answers is checked before it is used: an answer that is not HTTP, is cut short,
or is JSON of another shape than tokengate's ends the command with exit status 4 and one line
on stderr, never a traceback. Messages show the URL without its query (where ``?token=`` is)
and without any ``user:password@``.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import IO, Any, TextIO

__all__ = [
    "EXIT_AUTH",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNKNOWN_OPERATION",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "TASK_STATES",
    "CliError",
    "Client",
    "client_from_args",
    "parse_metrics",
    "redact_url",
    "run_command",
]

EXIT_OK = 0
#: The operation named is not one of the coordinator's.
EXIT_UNKNOWN_OPERATION = 1
#: The server refused the token (401), or the action (403: read-only server, or another origin).
EXIT_AUTH = 2
#: A usage error: argparse's own, a missing URL, a URL that cannot be used, a token that cannot
#: be sent. The same status as a refusal, as argparse exits with 2.
EXIT_USAGE = 2
#: Nothing answered at the URL: connection refused, timeout, unknown host, or a connection
#: closed before any answer.
EXIT_UNREACHABLE = 3
#: The server answered with another error (503 once the coordinator stopped, 400, 500, a
#: redirect), or with something that is not tokengate's: not HTTP, cut short, not JSON, or JSON
#: of another shape.
EXIT_ERROR = 4
#: Ctrl-C (but ``top``, for which Ctrl-C is the way to quit: 0).
EXIT_INTERRUPTED = 130

URL_ENV = "TOKENGATE_URL"
TOKEN_ENV = "TOKENGATE_TOKEN"

#: States an unresolved token can be in (what ``tasks --state`` filters on).
TASK_STATES = ("created", "waiting", "admitted", "executing")

# Spaces and control characters, which http.client refuses in a request line or a header.
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")


class CliError(Exception):
    """A failure with the exit status it gives."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def redact_url(url: str) -> str:
    """``url`` as messages may show it: without its query and fragment (``?token=...``) and
    without a ``user:password@``."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    authority, slash, path = rest.partition("/")
    text = head + sep + authority.rpartition("@")[2] + slash + path
    return text.split("?", 1)[0].split("#", 1)[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed (a 3xx answer is an error): the request carries the token,
    which the next request would send to wherever the answer points."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


# -- the shapes of the server's answers (docs/cli.md) --------------------------------------------
#
# A schema is a type or a tuple of types (isinstance), a dict (an object with at least these
# keys, each value of its schema) or a one-item list (an array whose items have its schema).

_NUMBER = (int, float)
_NUMBER_OR_NULL = (int, float, type(None))
_INT_OR_NULL = (int, type(None))
_DISTRIBUTION = {"p95_s": _NUMBER_OR_NULL}
_OPERATION: dict[str, Any] = {
    "name": str,
    "paused": bool,
    "blocked": bool,
    "health": str,
    "pending": int,
    "submitted": int,
    "completed": int,
    "failed": int,
    "cancelled": int,
    "killed": int,
    "timeout": int,
    "queue_wait": _DISTRIBUTION,
    "execution": _DISTRIBUTION,
}
_OPERATIONS = [_OPERATION]
_TOKEN_COUNTS = ("submitted", "unresolved", "running", "queued", "blocked")
_FINISHED = ("completed", "failed", "cancelled", "killed", "timeout")
_SNAPSHOT: dict[str, Any] = {
    "version": str,
    "time": _NUMBER,
    "admin": bool,
    "pool": int,
    "tokens": dict.fromkeys(_TOKEN_COUNTS + _FINISHED, int),
    "admission": {"paused": bool, "pending": int, "max_pending": _INT_OR_NULL, "rejected": int},
    "lanes": [{"lane": str, "workers": int, "running": int, "queued": _INT_OR_NULL}],
    "operations": _OPERATIONS,
}
_TOKENS = [
    {
        "token_id": int,
        "operation": str,
        "state": str,
        "priority": int,
        "age_s": _NUMBER,
        "worker_id": _INT_OR_NULL,
    }
]
#: Each action's answer, and the count in it that the command prints.
_ACTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "pause": ({"operation": str, "held": int}, "held"),
    "resume": ({"operation": str, "released": int}, "released"),
    "drain": ({"operation": str, "cancelled": int}, "cancelled"),
    "kill": ({"operation": str, "killed": int}, "killed"),
}


def _mismatch(value: Any, schema: Any, where: str = "") -> str | None:
    """Where ``value`` departs from ``schema`` (``"tokens.running: not int"``), or None."""
    at = where or "the answer"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{at}: not an object"
        for key, sub in schema.items():
            inner = f"{where}.{key}" if where else key
            if key not in value:
                return f"{inner}: missing"
            found = _mismatch(value[key], sub, inner)
            if found is not None:
                return found
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{at}: not an array"
        for i, item in enumerate(value):
            found = _mismatch(item, schema[0], f"{where}[{i}]")
            if found is not None:
                return found
        return None
    kinds = schema if isinstance(schema, tuple) else (schema,)
    # bool is an int to isinstance; an int field holding true or false is not tokengate's.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        return f"{at}: not {names}"
    return None


class Client:
    """Requests to one dashboard server. ``url`` is the server's base URL (with its
    ``url_prefix``, if any); a ``?token=`` in it (as ``server.url`` has) is used when no
    token is given (None or empty). A URL that cannot be used raises :class:`CliError`
    (exit status 2) at once.

    Redirects are not followed, and for a loopback host (127.0.0.1, ::1, localhost) the proxy
    settings of the environment (``http_proxy``...) are not used."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0) -> None:
        shown = redact_url(url)
        if not url.isascii() or _UNSENDABLE.search(url):
            raise CliError(EXIT_USAGE, f"not a usable URL: {shown!r} (spaces, control or non-ASCII characters)")
        try:
            parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError:
            raise CliError(EXIT_USAGE, f"not a usable URL: {shown!r} (check its host and port)") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(EXIT_USAGE, f"not an http(s) URL: {shown!r}")
        if not token:
            token = urllib.parse.parse_qs(parts.query).get("token", [""])[0]
        if token and not re.fullmatch(r"[\x21-\x7e]+", token):
            raise CliError(EXIT_USAGE, "the token has characters an HTTP header cannot carry")
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        netloc = parts.netloc.rpartition("@")[2]  # a user:password@ is not sent, nor shown
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
        self.token = token or None
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if _is_loopback(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def _request(self, method: str, path: str, query: dict[str, str] | None = None) -> bytes:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json, text/plain"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc, path) from None
        except urllib.error.URLError as exc:
            raise CliError(EXIT_UNREACHABLE, f"cannot reach {self.base}: {exc.reason}") from None
        except OSError as exc:  # a timeout, a reset connection, or one closed with no answer
            raise CliError(EXIT_UNREACHABLE, f"cannot reach {self.base}: {exc}") from None
        except http.client.HTTPException as exc:  # not HTTP (BadStatusLine), or cut short (IncompleteRead)
            raise CliError(
                EXIT_ERROR,
                f"not a tokengate server at {self.base}: a broken HTTP answer to {path} ({type(exc).__name__})",
            ) from None

    def _refusal(self, exc: urllib.error.HTTPError, path: str) -> CliError:
        try:
            detail = str(json.loads(exc.read())["error"])
        except Exception:
            detail = exc.reason if isinstance(exc.reason, str) else f"HTTP {exc.code}"
        if exc.code == 401:
            hint = "" if self.token else f" (give --token or set {TOKEN_ENV})"
            return CliError(EXIT_AUTH, f"the server refused the token: {detail}{hint}")
        if exc.code == 403:
            return CliError(EXIT_AUTH, f"refused: {detail}")
        if exc.code == 404 and "operation" in detail:
            return CliError(EXIT_UNKNOWN_OPERATION, f"unknown operation: {detail}")
        if exc.code == 503:
            return CliError(EXIT_ERROR, f"the coordinator stopped: {detail}")
        if 300 <= exc.code < 400:
            detail += " (redirects are not followed: give the URL the server is at)"
        return CliError(EXIT_ERROR, f"HTTP {exc.code} from {self.base}{path}: {detail}")

    def _unexpected(self, path: str, what: str) -> CliError:
        return CliError(EXIT_ERROR, f"not a tokengate server at {self.base}: unexpected answer to {path} ({what})")

    def _json(self, path: str, body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise self._unexpected(path, "not JSON") from None

    def get_json(self, path: str, query: dict[str, str] | None = None) -> Any:
        """The JSON answer to ``GET path``, of any shape."""
        return self._json(path, self._request("GET", path, query))

    def get_text(self, path: str) -> str:
        return self._request("GET", path).decode("utf-8", "replace")

    def post_json(self, path: str) -> Any:
        """The JSON answer to ``POST path``, of any shape."""
        return self._json(path, self._request("POST", path))

    def _checked(self, path: str, value: Any, schema: Any) -> Any:
        found = _mismatch(value, schema)
        if found is not None:
            raise self._unexpected(path, found)
        return value

    def snapshot(self) -> dict[str, Any]:
        """``/api/v1/snapshot``, checked."""
        path = "api/v1/snapshot"
        snap: dict[str, Any] = self._checked(path, self.get_json(path), _SNAPSHOT)
        return snap

    def operations(self) -> list[dict[str, Any]]:
        """``/api/v1/ops``, checked."""
        path = "api/v1/ops"
        ops: list[dict[str, Any]] = self._checked(path, self.get_json(path), _OPERATIONS)
        return ops

    def tokens(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """``/api/v1/tokens?...``, checked."""
        path = "api/v1/tokens"
        tokens: list[dict[str, Any]] = self._checked(path, self.get_json(path, query), _TOKENS)
        return tokens

    def action(self, verb: str, op: str) -> dict[str, Any]:
        """``POST /api/v1/ops/OP/VERB`` (pause, resume, drain or kill), its answer checked."""
        path = f"api/v1/ops/{urllib.parse.quote(op, safe='')}/{verb}"
        answer: dict[str, Any] = self._checked(path, self.post_json(path), _ACTIONS[verb][0])
        return answer

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``, checked: every line a comment or a sample, and
        tokengate's samples among them."""
        text = self.get_text("metrics")
        try:
            samples = parse_metrics(text)
        except ValueError as exc:
            raise self._unexpected("metrics", str(exc)) from None
        if not any(s["name"].startswith("tokengate_") for s in samples):
            raise self._unexpected("metrics", "no tokengate_ sample")
        return text

    def operation_names(self) -> list[str]:
        return [op["name"] for op in self.operations()]


def client_from_args(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get(URL_ENV)
    if not url:
        raise CliError(EXIT_USAGE, f"no coordinator URL: give --url or set {URL_ENV}")
    # An empty token (--token "", TOKENGATE_TOKEN=) is no token: the URL's ?token= is used.
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return Client(url, token, args.timeout)


# -- formatting --------------------------------------------------------------------------------


def seconds(value: object) -> str:
    """``0.0123`` -> ``"12.3ms"``; None -> ``"-"``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1:
        return f"{value * 1e3:.1f}ms"
    return f"{value:.2f}s"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> list[str]:
    """Columns padded to their widest cell; the columns in ``right`` aligned right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(parts).rstrip())
    return out


def _state_of(op: dict[str, Any]) -> str:
    if op.get("blocked"):
        return "blocked"
    if op.get("paused"):
        return "paused"
    return "active"


def format_status(snap: dict[str, Any], base: str) -> list[str]:
    t, adm = snap["tokens"], snap["admission"]
    ops = snap["operations"]
    limit = "unbounded" if adm["max_pending"] is None else str(adm["max_pending"])
    lanes = ", ".join(
        f"{lane['lane']} {lane['workers']} workers ({lane['running']} running"
        + ("" if lane["queued"] is None else f", {lane['queued']} queued")
        + ")"
        for lane in snap["lanes"]
    )
    return [
        f"tokengate {snap['version']} at {base}  pool {snap['pool']}  {'admin' if snap['admin'] else 'read-only'}",
        (
            f"tokens      {t['submitted']} submitted, {t['unresolved']} unresolved: {t['running']} running, "
            f"{t['queued']} queued, {t['blocked']} blocked"
        ),
        (
            f"outcomes    {t['completed']} completed, {t['failed']} failed, {t['cancelled']} cancelled, "
            f"{t['killed']} killed, {t['timeout']} timed out"
        ),
        (
            f"admission   {'paused' if adm['paused'] else 'open'}, {adm['pending']} pending (limit {limit}), "
            f"{adm['rejected']} rejected"
        ),
        f"lanes       {lanes}",
        (
            f"operations  {len(ops)} ({sum(1 for o in ops if o['paused'])} paused, "
            f"{sum(1 for o in ops if o['blocked'])} blocked)"
        ),
    ]


def format_ops(ops: list[dict[str, Any]]) -> list[str]:
    if not ops:
        return ["no operations yet"]
    rows = [
        (
            op["name"],
            _state_of(op),
            op["health"],
            op["pending"],
            op["submitted"],
            op["completed"],
            op["failed"],
            op["killed"],
            seconds(op["queue_wait"]["p95_s"]),
            seconds(op["execution"]["p95_s"]),
        )
        for op in ops
    ]
    header = ("OPERATION", "STATE", "HEALTH", "PENDING", "SUBMITTED", "COMPLETED", "FAILED", "KILLED")
    return table((*header, "WAIT P95", "RUN P95"), rows, right=range(3, 10))


def format_tasks(tokens: list[dict[str, Any]]) -> list[str]:
    if not tokens:
        return ["no unresolved tokens"]
    rows = [
        (
            tok["token_id"],
            tok["operation"],
            tok["state"],
            tok["priority"],
            seconds(tok["age_s"]),
            "-" if tok["worker_id"] is None else tok["worker_id"],
        )
        for tok in tokens
    ]
    return table(("ID", "OPERATION", "STATE", "PRIORITY", "AGE", "WORKER"), rows, right=(0, 3, 4, 5))


def format_action(verb: str, op: str, answer: dict[str, Any]) -> str:
    count = answer[_ACTIONS[verb][1]]
    if verb == "pause":
        return f"{op}: paused ({count} tokens held)"
    if verb == "resume":
        return f"{op}: resumed ({count} tokens released)"
    if verb == "drain":
        return f"{op}: drained ({count} queued tokens cancelled)"
    return f"{op}: {count} tokens killed"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"')


_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}
_ESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    """A label value's escapes (``\\n``, ``\\\\``, ``\\"``) undone in one pass, left to right;
    another backslash is kept as it is."""
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m[1], m[0]), value)


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """The samples of Prometheus text: ``[{"name": str, "labels": {str: str}, "value": float}]``.
    Raises ValueError for a line that is neither a comment nor a sample."""
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SAMPLE.match(line)
        try:
            value = float(m[3]) if m is not None else None
        except ValueError:
            value = None
        if m is None or value is None:
            raise ValueError(f"not a Prometheus sample: {line[:60]!r}")
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m[2] or "")}
        samples.append({"name": m[1], "labels": labels, "value": value})
    return samples


# -- the commands ------------------------------------------------------------------------------


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _print_lines(lines: Sequence[str], out: TextIO) -> None:
    out.write("\n".join(lines) + "\n")


def _emit(args: argparse.Namespace, out: TextIO, value: Any, lines: Callable[[], Sequence[str]]) -> None:
    """``value`` as JSON with ``--json``, else the lines made from it."""
    if args.json:
        _print_json(value, out)
    else:
        _print_lines(lines(), out)


def _check_operation(client: Client, op: str) -> None:
    if op not in client.operation_names():
        raise CliError(EXIT_UNKNOWN_OPERATION, f"unknown operation {op!r}")


def _command(args: argparse.Namespace, out: TextIO) -> int:
    client = client_from_args(args)
    command = args.command
    if command == "status":
        snap = client.snapshot()
        _emit(args, out, snap, lambda: format_status(snap, client.base))
    elif command == "ops":
        ops = client.operations()
        _emit(args, out, ops, lambda: format_ops(ops))
    elif command == "tasks":
        if args.op is not None:
            _check_operation(client, args.op)
        query = {"limit": str(args.limit)}
        if args.state:
            query["state"] = args.state
        if args.op is not None:
            query["op"] = args.op
        tokens = client.tokens(query)
        _emit(args, out, tokens, lambda: format_tasks(tokens))
    elif command == "metrics":
        text = client.metrics()
        if args.json:
            _print_json({"samples": parse_metrics(text)}, out)
        else:
            out.write(text if text.endswith("\n") else text + "\n")
    elif command in _ACTIONS:
        answer = client.action(command, args.op)
        _emit(args, out, answer, lambda: [format_action(command, args.op, answer)])
    elif command == "top":
        from ._top import run_top

        return run_top(client, args, out)
    else:  # pragma: no cover - the parser knows every command
        raise AssertionError(command)
    out.flush()
    return EXIT_OK


def run_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs one parsed command against its coordinator; returns the exit status (errors go to
    ``err`` as one line: ``tokengate: ...``; Ctrl-C gives 130 and no message)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        return _command(args, out)
    except CliError as exc:
        err.write(f"tokengate: {exc.message}\n")
        err.flush()
        return exc.code
    except BrokenPipeError:  # `tokengate metrics | head`
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
