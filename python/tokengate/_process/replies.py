"""Replies and timers: what the supervisor does with what a worker sends back, and with
deadlines and retry back-offs that come due.

* Each token's reply is sent the moment it ends; the supervisor handles every
  reply that has arrived each time it wakes. A reply also updates the
  worker's moving average time per token (see :mod:`.dispatch`) and, with
  ``process_max_rss``, compares the RSS the worker published on its board
  with the ceiling (see :mod:`.recycling`).
* A token whose function raised is retried (``retries``) after a back-off of
  0.05 s doubling per attempt; the exception that fails it carries the
  worker's traceback as its ``__cause__``.
* A running token that passes its deadline (``timeout`` tag or per-call) has
  its process SIGKILLed, reaped and replaced: the work really stops; one still
  queued in a process is skipped there and never runs. A reply that arrived
  in time wins.
"""

from __future__ import annotations

import heapq
import os
import pickle
import time
from typing import TYPE_CHECKING

from ..exceptions import TaskTimeoutError
from .payload import UnpicklableError, _RemoteTraceback
from .state import _LaneState
from .wire import _OK, _READY, _REPLY, _SKIPPED, _frame_need, _frames

if TYPE_CHECKING:
    from .workers import _Worker


class _Replies(_LaneState):
    """The lane's part that reads replies and fires timers (supervisor thread)."""

    def _read(self, w: _Worker) -> None:
        """Reads what the socket holds (one read) and handles every whole reply in it."""
        try:
            data = os.read(w.conn.fileno(), min(max(1 << 16, _frame_need(w.rbuf)), 1 << 22))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died(w)
            return
        w.rbuf += data
        for frame in _frames(w.rbuf):
            self._handle(w, frame)

    def _drain(self, w: _Worker) -> None:
        """Handles every reply already in ``w``'s socket, without waiting (the socket is
        non-blocking; after the process exited this is what it sent before it died)."""
        fd = w.conn.fileno() if not w.conn.closed else -1
        while fd >= 0:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:  # BlockingIOError: nothing more now
                break
            if not data:
                break
            w.rbuf += data
        for frame in _frames(w.rbuf):
            self._handle(w, frame)

    def _handle(self, w: _Worker, data: bytes) -> None:
        seq, kind = _REPLY.unpack_from(data)
        if kind == _READY:
            w.ready = True
            self._startup_failures = 0
            return
        if seq in w.skips:
            w.skips.discard(seq)
            w.board.unlist(seq)
        elif self.max_rss is not None and not w.over_rss and w.board.rss() > self.max_rss:
            w.over_rss = True  # a token ended with the process above the ceiling: it retires
            self._retiring.add(w)
        item = next((it for it in w.items if it.seq == seq), None)
        if item is None:
            return  # a token that was killed meanwhile
        self._finish_item(w, item)
        now = time.monotonic()
        took = now - w.mark
        w.avg = took if w.avg is None else 0.8 * w.avg + 0.2 * took
        w.mark = now
        if kind == _SKIPPED:  # pragma: no cover - the worker skips only listed tokens
            self._requeue(item, w.pid)
            return
        try:
            payload = pickle.loads(memoryview(data)[_REPLY.size :])
        except BaseException as exc:
            self._fail(item, UnpicklableError(f"{item.pf._op}: the worker's reply could not be unpickled: {exc!r}"))
            return
        if kind == _OK:
            if not item.token.done():  # counted first: a waiter woken by the result sees it
                self._count("completed")
            item.token._set_result(payload)
            return
        value, tb = payload
        if tb:
            try:
                value.__cause__ = _RemoteTraceback(tb)
            except Exception:
                pass
        if item.attempt < item.retries and not isinstance(value, UnpicklableError) and not item.token.done():
            item.attempt += 1
            self._count("retries")
            when = time.monotonic() + 0.05 * (2 ** (item.attempt - 1))
            with self._lock:
                heapq.heappush(self._timers, (when, item.seq, "retry", item))
            self._running[item.token.token_id] = item  # still ours (kill during back-off)
            return
        self._fail(item, value)

    def _fire_timers(self, now: float) -> None:
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, kind, item = heapq.heappop(self._timers)
            if kind == "retry":
                self._running.pop(item.token.token_id, None)
                if item.token.done() or item.done:
                    item.done = True
                    continue
                key = item.key = (now - self._t0) / self._aging - item.priority
                with self._lock:
                    heapq.heappush(self._heap, (key, item.seq, item))
                continue
            # deadline
            w = item.worker
            if w is not None and self._workers[w.slot] is w:
                self._drain(w)  # a reply that arrived in time wins
            if item.token.done():
                continue
            exc = TaskTimeoutError(f"token {item.token.token_id} ({item.pf._op}) passed its deadline ({item.timeout}s)")
            w = item.worker
            item.done = True
            if w is not None:
                self._stop_item(w, item)  # a running process is gone before waiters wake
            self._running.pop(item.token.token_id, None)
            if not item.token.done():
                self._count("timeouts")
            item.token._set_exception(exc, "timeout")
