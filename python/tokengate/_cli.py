"""The ``tokengate`` command line's commands: a client of a coordinator's dashboard server
(``OperationsCoordinator.serve``) and what each command prints.

Only the standard library is used (``urllib.request`` and ``json``), and nothing of the
engine is imported here, so a command costs one interpreter start and one or two requests.
The JSON each command prints with ``--json`` is described in docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

__all__ = [
    "EXIT_AUTH",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_UNKNOWN_OPERATION",
    "EXIT_UNREACHABLE",
    "CliError",
    "Client",
    "client_from_args",
    "parse_metrics",
    "run_command",
]

EXIT_OK = 0
#: The operation named is not one of the coordinator's.
EXIT_UNKNOWN_OPERATION = 1
#: The server refused the token (401), or the action (403: read-only server, or another origin).
#: argparse's usage errors (a missing URL among them) exit with 2 as well.
EXIT_AUTH = 2
#: Nothing answered at the URL: connection refused, timeout, unknown host.
EXIT_UNREACHABLE = 3
#: The server answered with another error (503 once the coordinator stopped, 400, 500), or
#: with something that is not tokengate's JSON.
EXIT_ERROR = 4

URL_ENV = "TOKENGATE_URL"
TOKEN_ENV = "TOKENGATE_TOKEN"

#: States an unresolved token can be in (what ``tasks --state`` filters on).
TASK_STATES = ("created", "waiting", "admitted", "executing")


class CliError(Exception):
    """A failure with the exit status it gives."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Client:
    """Requests to one dashboard server. ``url`` is the server's base URL (with its
    ``url_prefix``, if any); a ``?token=`` in it (as ``server.url`` has) is used when no
    token is given."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CliError(EXIT_AUTH, f"not an http(s) URL: {url!r}")
        if token is None:
            token = urllib.parse.parse_qs(parts.query).get("token", [None])[0]
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        self.base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.token = token or None
        self.timeout = timeout

    def _request(self, method: str, path: str, query: dict[str, str] | None = None) -> bytes:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json, text/plain"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except urllib.error.URLError as exc:
            raise CliError(EXIT_UNREACHABLE, f"cannot reach {self.base}: {exc.reason}") from None
        except OSError as exc:  # a timeout or a reset connection while reading
            raise CliError(EXIT_UNREACHABLE, f"cannot reach {self.base}: {exc}") from None

    def _refusal(self, exc: urllib.error.HTTPError) -> CliError:
        try:
            detail = str(json.loads(exc.read())["error"])
        except Exception:
            detail = exc.reason if isinstance(exc.reason, str) else str(exc)
        if exc.code == 401:
            hint = "" if self.token else f" (give --token or set {TOKEN_ENV})"
            return CliError(EXIT_AUTH, f"the server refused the token: {detail}{hint}")
        if exc.code == 403:
            return CliError(EXIT_AUTH, f"refused: {detail}")
        if exc.code == 404 and "operation" in detail:
            return CliError(EXIT_UNKNOWN_OPERATION, f"unknown operation: {detail}")
        if exc.code == 503:
            return CliError(EXIT_ERROR, f"the coordinator stopped: {detail}")
        return CliError(EXIT_ERROR, f"HTTP {exc.code} from {exc.url}: {detail}")

    def get_json(self, path: str, query: dict[str, str] | None = None) -> Any:
        body = self._request("GET", path, query)
        try:
            return json.loads(body)
        except ValueError:
            raise CliError(EXIT_ERROR, f"not a tokengate server at {self.base} ({path} is not JSON)") from None

    def get_text(self, path: str) -> str:
        return self._request("GET", path).decode("utf-8", "replace")

    def post_json(self, path: str) -> Any:
        body = self._request("POST", path)
        try:
            return json.loads(body)
        except ValueError:
            raise CliError(EXIT_ERROR, f"not a tokengate server at {self.base} ({path} is not JSON)") from None

    def operation_names(self) -> list[str]:
        return [str(op["name"]) for op in self.get_json("api/v1/ops")]


def client_from_args(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get(URL_ENV)
    if not url:
        raise CliError(EXIT_AUTH, f"no coordinator URL: give --url or set {URL_ENV}")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
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
    if verb == "pause":
        return f"{op}: paused ({answer.get('held', 0)} tokens held)"
    if verb == "resume":
        return f"{op}: resumed ({answer.get('released', 0)} tokens released)"
    if verb == "drain":
        return f"{op}: drained ({answer.get('cancelled', 0)} queued tokens cancelled)"
    return f"{op}: {answer.get('killed', 0)} tokens killed"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"')


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """The samples of Prometheus text: ``[{"name": str, "labels": {str: str}, "value": float}]``."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = {
            k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\") for k, v in _LABEL.findall(m[2] or "")
        }
        samples.append({"name": m[1], "labels": labels, "value": float(m[3])})
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
        snap = client.get_json("api/v1/snapshot")
        _emit(args, out, snap, lambda: format_status(snap, client.base))
    elif command == "ops":
        ops = client.get_json("api/v1/ops")
        _emit(args, out, ops, lambda: format_ops(ops))
    elif command == "tasks":
        if args.op is not None:
            _check_operation(client, args.op)
        query = {"limit": str(args.limit)}
        if args.state:
            query["state"] = args.state
        if args.op is not None:
            query["op"] = args.op
        tokens = client.get_json("api/v1/tokens", query)
        _emit(args, out, tokens, lambda: format_tasks(tokens))
    elif command == "metrics":
        text = client.get_text("metrics")
        if args.json:
            _print_json({"samples": parse_metrics(text)}, out)
        else:
            out.write(text if text.endswith("\n") else text + "\n")
    elif command in ("pause", "resume", "drain", "kill"):
        quoted = urllib.parse.quote(args.op, safe="")
        answer = client.post_json(f"api/v1/ops/{quoted}/{command}")
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
    ``err`` as one line: ``tokengate: ...``)."""
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
