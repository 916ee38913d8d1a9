"""``tokengate top``: a live view of a coordinator's operations, redrawn every second.

Per operation: tokens finished per second (between two refreshes), queued and running
tokens, whether it is blocked or paused, the queue wait's p95 and its health. On a terminal
the view is redrawn in place (the alternate screen, plain ANSI codes) until ``q`` or Ctrl-C;
off a terminal each refresh prints the view, then a blank line; ``--json`` prints one JSON
object a refresh (docs/cli.md). ``--once`` or ``--iterations N`` stop after 1 or N refreshes.

On a terminal, SIGTERM and SIGHUP end the view as ``q`` does (the terminal's mode and main
screen restored), with exit status 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, TextIO

from ._cli import EXIT_OK, Client, seconds, table

__all__ = ["Sampler", "format_frame", "run_top"]

_FINISHED = ("completed", "failed", "cancelled", "killed", "timeout")
# At most this many running tokens are listed to count the running ones per operation.
_RUNNING_LIMIT = 10000


class Sampler:
    """Reads one frame's figures from the server; throughput is the change of finished tokens
    since the frame before (None on the first)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._last: tuple[float, dict[str, int], int] | None = None

    def sample(self) -> dict[str, Any]:
        snap = self._client.snapshot()
        running_tokens = self._client.tokens({"state": "executing", "limit": str(_RUNNING_LIMIT)})
        now = time.monotonic()
        running: dict[str, int] = {}
        for tok in running_tokens:
            running[tok["operation"]] = running.get(tok["operation"], 0) + 1
        finished = {op["name"]: sum(int(op[k]) for k in _FINISHED) for op in snap["operations"]}
        total_finished = sum(int(snap["tokens"][k]) for k in _FINISHED)
        last = self._last
        self._last = (now, finished, total_finished)

        def rate(now_count: int, then_count: int | None) -> float | None:
            if last is None or then_count is None or now <= last[0]:
                return None
            return max(0, now_count - then_count) / (now - last[0])

        operations = []
        for op in snap["operations"]:
            name = op["name"]
            n_running = running.get(name, 0)
            operations.append(
                {
                    "name": name,
                    "throughput_per_s": rate(finished[name], None if last is None else last[1].get(name, 0)),
                    "queued": max(0, int(op["pending"]) - n_running),
                    "running": n_running,
                    "blocked": bool(op["blocked"]),
                    "paused": bool(op["paused"]),
                    "wait_p95_s": op["queue_wait"]["p95_s"],
                    "health": op["health"],
                }
            )
        tokens = snap["tokens"]
        return {
            "time": snap["time"],
            "pool": snap["pool"],
            "throughput_per_s": rate(total_finished, None if last is None else last[2]),
            "running": int(tokens["running"]),
            "queued": int(tokens["queued"]),
            "completed": int(tokens["completed"]),
            "failed": int(tokens["failed"]),
            "admission_paused": bool(snap["admission"]["paused"]),
            "operations": operations,
        }


def _per_s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def format_frame(frame: dict[str, Any], base: str, live: bool) -> list[str]:
    clock = time.strftime("%H:%M:%S", time.localtime(frame["time"]))
    head = f"tokengate top  {base}  pool {frame['pool']}  {clock}"
    if live:
        head += "  (q or Ctrl-C quits)"
    lines = [
        head,
        f"tokens/s {_per_s(frame['throughput_per_s'])}  running {frame['running']}  queued {frame['queued']}  "
        f"completed {frame['completed']}  failed {frame['failed']}"
        + ("  ADMISSION PAUSED" if frame["admission_paused"] else ""),
        "",
    ]
    rows = [
        (
            op["name"],
            _per_s(op["throughput_per_s"]),
            op["queued"],
            op["running"],
            "yes" if op["blocked"] else "no",
            "yes" if op["paused"] else "no",
            seconds(op["wait_p95_s"]),
            op["health"],
        )
        for op in frame["operations"]
    ]
    header = ("OPERATION", "TOKENS/S", "QUEUED", "RUNNING", "BLOCKED", "PAUSED", "WAIT P95", "HEALTH")
    lines += table(header, rows, right=(1, 2, 3, 6)) if rows else ["no operations yet"]
    return lines


class _Keys:
    """The terminal on stdin in cbreak mode (keys come at once, unechoed; Ctrl-C still
    interrupts), to see a ``q`` while waiting for the next refresh."""

    def __init__(self, fd: int) -> None:
        import termios
        import tty

        self._fd = fd
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def quit_within(self, timeout: float) -> bool:
        """Waits ``timeout`` seconds; True as soon as ``q`` is pressed."""
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                data = os.read(self._fd, 64)
                if not data or b"q" in data or b"Q" in data:
                    return True

    def restore(self) -> None:
        import termios

        termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)


def _keys() -> _Keys | None:
    try:
        if sys.stdin is None or not sys.stdin.isatty():
            return None
        return _Keys(sys.stdin.fileno())
    except (ImportError, OSError, ValueError, AttributeError):  # no termios (Windows), or no terminal
        return None


def _fit(lines: list[str]) -> list[str]:
    size = shutil.get_terminal_size()
    return [line[: size.columns] for line in lines[: max(1, size.lines - 1)]]


def _exit_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP (where there is one) raise SystemExit(128 + N), so that the view's
    ``finally`` restores the terminal; a second signal while it does is ignored. Returns the
    handlers replaced (none off the main thread, where Python cannot set one)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise SystemExit(128 + signum)

    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, handler)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def run_top(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Refreshes every ``args.interval`` seconds until ``q``, Ctrl-C, or ``args.iterations``
    (``args.once``: 1) refreshes."""
    iterations: int | None = 1 if args.once else args.iterations
    live = not args.json and out.isatty()
    sampler = Sampler(client)
    keys: _Keys | None = None
    shown = 0
    previous = _exit_on_signals() if live else {}
    try:
        if live:
            keys = _keys()
            out.write("\x1b[?1049h\x1b[?25l")  # the alternate screen; the cursor hidden
        while True:
            frame = sampler.sample()
            shown += 1
            if args.json:
                out.write(json.dumps(frame, sort_keys=True) + "\n")
            elif live:
                body = "".join(line + "\x1b[K\n" for line in _fit(format_frame(frame, client.base, live=True)))
                out.write("\x1b[H" + body + "\x1b[J")
            else:
                out.write("\n".join(format_frame(frame, client.base, live=False)) + "\n\n")
            out.flush()
            if iterations is not None and shown >= iterations:
                break
            if keys is not None:
                if keys.quit_within(args.interval):
                    break
            else:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            _leave(keys, out, live)
        finally:
            _restore_signals(previous)
    return EXIT_OK


def _leave(keys: _Keys | None, out: TextIO, live: bool) -> None:
    """The terminal's mode and main screen back, as far as the terminal is still there (after a
    SIGHUP it may be gone)."""
    if keys is not None:
        try:
            keys.restore()
        except Exception:  # termios.error: no terminal any more
            pass
    if live:
        try:
            out.write("\x1b[?25h\x1b[?1049l")
            out.flush()
        except (OSError, ValueError):
            pass
