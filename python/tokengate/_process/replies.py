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

import os
import pickle
import time
from typing import TYPE_CHECKING, Any

from .payload import UnpicklableError, _RemoteTraceback
from .state import _LaneState
from .wire import _OK, _READY, _REPLY, _SKIPPED, _frame_need, _frames, _take_frames

if TYPE_CHECKING:
    from .workers import _Worker


def decode_reply(op: str, data: bytes | memoryview) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` from a token's reply (made by
    :func:`.child._call_reply`); the exception carries the worker's traceback as its
    ``__cause__``, and a reply that cannot be unpickled becomes an :class:`UnpicklableError`."""
    view = data if type(data) is memoryview else memoryview(data)
    kind = view[_REPLY.size - 1]  # the byte after the seq
    try:
        payload = pickle.loads(view[_REPLY.size :])
    except BaseException as exc:
        return False, UnpicklableError(f"{op}: the worker's reply could not be unpickled: {exc!r}")
    if kind == _OK:
        return True, payload
    value, tb = payload
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
        try:
            data = os.read(w.conn.fileno(), min(max(1 << 16, _frame_need(w.rbuf)), 1 << 22))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died(w)
            return
        frames = _take_frames(w.rbuf, data)
        if frames:
            w.received += len(frames)
            now = time.monotonic()
            handle = self._handle
            ended = 0
            for frame in frames:
                ended += handle(w, frame)
            if ended:
                # Each token's share of the time since the last ones (skipped tokens take none).
                took = (now - w.mark) / ended
                # ``ended`` steps of the moving average toward ``took`` (each: 0.8 old + 0.2 new).
                w.avg = took if w.avg is None else took + (w.avg - took) * 0.8**ended
                w.mark = now

    def _read_replies(self, w: _Worker) -> None:
        """After ``w``'s process exited: handles every reply it sent (what its socket
        holds, read without waiting), then those it had staged on its board and not sent."""
        fd = w.conn.fileno() if not w.conn.closed else -1
        while fd >= 0:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:  # BlockingIOError: nothing more now
                break
            if not data:
                break
            w.rbuf += data
        frames = _frames(w.rbuf)
        w.received += len(frames)
        for frame in frames:
            self._handle(w, frame)
        # A frame cut off when the process died was staged whole (or was a reply too
        # large to stage, lost with the token that was running).
        w.rbuf.clear()
        before, data = w.board.staged()
        # The first staged frames may have reached the socket before the process died.
        for frame in _frames(bytearray(data))[max(0, w.received - before) :]:
            self._handle(w, frame)

    def _handle(self, w: _Worker, data: bytes | memoryview) -> bool:
        """Handles one reply; True when it ended a token sent to ``w`` (it counts in the
        worker's time per token, see ``_read``)."""
        wire, kind = _REPLY.unpack_from(data)
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
        ok, value = decode_reply(item.pf._op, data)
        if ok:
            self._finish_ok(item, value)
        else:
            self._fail(item, value)
        return True
