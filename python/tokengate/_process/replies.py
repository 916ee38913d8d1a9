"""Replies: what the supervisor does with what a worker sends back.

* A worker sends replies as its tokens end, short tokens' together (see
  :mod:`.child`); the supervisor handles every reply that has arrived each
  time it wakes. Replies also update the worker's moving average time per
  token, the time since the last ones shared among them (see :mod:`.dispatch`), and, with
  ``process_max_rss``, compares the RSS the worker published on its board
  with the ceiling (see :mod:`.recycling`).
* A token whose function raised is reported failed: the engine retries it
  (``retries``, with the operation's back-off) or fails it; the exception
  carries the worker's traceback as its ``__cause__``.
* A running token that passes its deadline (``timeout`` tag or per-call) or
  is killed comes back as a stop notice (see :mod:`.dispatch`): its process
  is SIGKILLed, reaped and replaced, so the work really stops; one still
  queued in a process is skipped there and never runs.
"""

from __future__ import annotations

import pickle
import time
from typing import TYPE_CHECKING, Any

from .._tokengate import ReplyReader
from .payload import UnpicklableError, _RemoteTraceback
from .state import _Item, _LaneState
from .wire import _OK, _READY, _REPLY, _SKIPPED

if TYPE_CHECKING:
    from .workers import _Worker


def decode_reply(op: str, data: bytes | memoryview) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` from a whole reply (made by
    :func:`.child._call_reply`: :data:`_REPLY`, then the payload); see :func:`decode_payload`."""
    view = data if type(data) is memoryview else memoryview(data)
    return decode_payload(op, view[_REPLY.size - 1], view[_REPLY.size :])


def _unreadable(op: str, exc: BaseException) -> UnpicklableError:
    """The error of a token whose reply could not be unpickled (``exc``)."""
    return UnpicklableError(f"{op}: the worker's reply could not be unpickled: {exc!r}")


def decode_payload(op: str, kind: int, payload: bytes | memoryview) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` from a reply's kind and payload; the
    exception carries the worker's traceback as its ``__cause__``, and a payload that
    cannot be unpickled becomes an :class:`UnpicklableError`."""
    try:
        value = pickle.loads(payload)
    except BaseException as exc:
        return False, _unreadable(op, exc)
    if kind == _OK:
        return True, value
    value, tb = value
    if tb:
        try:
            value.__cause__ = _RemoteTraceback(tb)
        except Exception:
            pass
    return False, value


class _Replies(_LaneState):
    """The lane's part that reads replies (supervisor thread)."""

    def _read(self, w: _Worker) -> None:
        """Reads what the socket holds (one read) and handles every whole reply in it."""
        replies = w.replies.read(w.conn.fileno())
        if replies is None:
            self._died(w)
            return
        if replies:
            w.received += len(replies)
            now = time.monotonic()
            ended = 0
            items = w.items
            plain = self.max_rss is None
            loads = pickle.loads
            for wire, kind, payload in replies:
                # The usual reply, a result of the token at the front with no skip listed
                # and no RSS ceiling to check, in fewer steps; _handle takes every reply.
                if kind == _OK and plain and items and items[0].wire == wire and not w.skips:
                    item = items.popleft()
                    item.worker = None
                    try:
                        value = loads(payload)
                    except BaseException as exc:
                        self._fail(item, _unreadable(item.pf._op, exc))
                    else:
                        self._finish_ok(item, value)
                    ended += 1
                else:
                    ended += self._handle(w, wire, kind, payload)
            if ended:
                # Each token's share of the time since the last ones (skipped tokens take none).
                took = (now - w.mark) / ended
                # ``ended`` steps of the moving average toward ``took`` (each: 0.8 old + 0.2 new).
                w.avg = took if w.avg is None else took + (w.avg - took) * 0.8**ended
                w.mark = now

    def _read_replies(self, w: _Worker) -> None:
        """After ``w``'s process exited: handles every reply it sent (what its socket
        holds, read without waiting), then those it had staged on its board and not sent."""
        replies = w.replies.drain(w.conn.fileno()) if not w.conn.closed else []
        w.received += len(replies)
        for wire, kind, payload in replies:
            self._handle(w, wire, kind, payload)
        # A reply cut off when the process died was staged whole (or was a reply too
        # large to stage, lost with the token that was running).
        before, data = w.board.staged()
        # The first staged replies may have reached the socket before the process died.
        for wire, kind, payload in ReplyReader().feed(data)[max(0, w.received - before) :]:
            self._handle(w, wire, kind, payload)

    def _handle(self, w: _Worker, wire: int, kind: int, payload: bytes) -> bool:
        """Handles one reply; True when it ended a token sent to ``w`` (it counts in the
        worker's time per token, see ``_read``)."""
        if kind == _READY:
            w.ready = True
            self._startup_failures = 0
            return False
        if wire in w.skips:
            w.skips.discard(wire)
            w.board.unlist(wire)
            if kind != _SKIPPED and w.left is not None:
                # It was stopped after it ran (its reply was on its way): the unit of
                # the budget given back for it (see ``_stop_item``) is taken again.
                w.left -= 1
                if w.left <= 0:
                    self._retiring.add(w)
        elif self.max_rss is not None and not w.over_rss and w.board.rss() > self.max_rss:
            w.over_rss = True  # a token ended with the process above the ceiling: it retires
            self._retiring.add(w)
        items = w.items
        if items and items[0].wire == wire:  # replies come in the order the tokens were sent
            item = items.popleft()
            item.worker = None
        else:
            found = next((it for it in items if it.wire == wire), None)
            if found is None:
                return False  # a token that was killed meanwhile
            item = found
            self._finish_item(w, item)
        if kind == _SKIPPED:  # pragma: no cover - the worker skips only listed tokens
            self._requeue(item, w.pid)
            return True
        self._ended(item, kind, payload)
        return True

    def _ended(self, item: _Item, kind: int, payload: bytes) -> None:
        """``item`` ended in its process with the reply ``kind`` (:data:`_OK` or
        :data:`_ERROR`) carrying ``payload``: its token resolves (or is retried)."""
        ok, value = decode_payload(item.pf._op, kind, payload)
        if ok:
            self._finish_ok(item, value)
        else:
            self._fail(item, value)
