"""What every part of the lane's supervisor shares: its tokens and its books.

The engine keeps the lane's queue (priorities and aging, admission, pause,
deadlines, retries, tokens as arguments: see
:class:`~tokengate._tokengate.OutsideLane`); the lane takes what its
processes have room for and reports how each token ended.

:class:`_Item` is one process token the lane took. :class:`_LaneState` holds
the lane's state (its engine queue, worker slots and counts, the wake-up
pipe and the selector) and the steps every part takes on a token: finish it
on its worker, put it back in the queue, fail it, count it. The parts are
mixins over it, put together as :class:`~tokengate._process.lane.ProcessLane`:
submission (caller threads), dispatch (sending ahead), replies and timers,
worker processes, and recycling.

Tokens queued in a process that died or was replaced go back to their place
in the lane's queue (they never started) and run once elsewhere; a token that
was queued in three processes that died fails with
:class:`~tokengate.WorkerCrashedError` (its own message may be what kills
them).
"""

from __future__ import annotations

import itertools
import os
import selectors
import threading
import weakref
from typing import TYPE_CHECKING, Any

from ..exceptions import WorkerCrashedError
from .payload import UnpicklableError

if TYPE_CHECKING:
    from .workers import _Worker
    from .wrapper import ProcessFunction

#: A token goes back to the queue at most this many times when processes die before starting it.
_MAX_REQUEUES = 3


class _Item:
    """One process token the lane took from the engine's queue (see
    :class:`~tokengate._tokengate.OutsideLane`), until it reports how it ended."""

    __slots__ = ("args", "done", "pf", "seq", "task", "wire", "worker")

    def __init__(self, task: Any) -> None:
        #: The engine's task (``task.token`` is the token; read where needed, not per token).
        self.task = task
        #: The token id (stop notices name it).
        self.seq: int = task.id
        #: Its number on the wire, new each time it is sent to a process (see ``_Dispatch._send``):
        #: a reply, a board entry or a skip of an earlier sending never matches a later one.
        self.wire = -1
        func = task.func
        # (function, pickled arguments) when the caller pickled them (see .submission).
        self.pf: ProcessFunction = func[0] if type(func) is tuple else func
        self.args: bytes | None = func[1] if type(func) is tuple else None
        self.done = False
        self.worker: _Worker | None = None


class _LaneState:
    """The state of one process lane, shared by the parts of :class:`~tokengate._process.lane.ProcessLane`."""

    def __init__(
        self,
        engine: Any,
        workers: int,
        *,
        coordinator: Any = None,
        prefetch: int = 64,
        max_tasks_per_child: int | None = None,
        max_rss: int | None = None,
    ) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers <= 0:
            raise ValueError(f"process_workers must be a positive int, got {workers!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch <= 0:
            raise ValueError(f"process_prefetch must be a positive int, got {prefetch!r}")
        for name, value in (("process_max_tasks_per_child", max_tasks_per_child), ("process_max_rss", max_rss)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.engine = engine
        self.size = workers
        self.prefetch = prefetch
        #: A worker process retires after this many tokens (None: never).
        self.max_tasks_per_child = max_tasks_per_child
        #: A worker process retires when its RSS (bytes) is above this after a token (None: never).
        self.max_rss = max_rss
        self._coordinator = weakref.ref(coordinator) if coordinator is not None else None
        self._lock = threading.Lock()
        #: The engine's queue of this lane's tokens: the lane takes what it has room for.
        self.outside = engine.add_outside_lane("process")
        #: Tokens taken and not reported, by id.
        self._running: dict[int, _Item] = {}
        self._workers: list[_Worker | None] = [None] * workers
        self._respawn_at: list[float] = [0.0] * workers
        #: Workers that retire once every token sent to them has answered.
        self._retiring: set[_Worker] = set()
        #: Retired workers (socket closed) not reaped yet.
        self._retired: list[_Worker] = []
        self._startup_failures = 0
        self._sleeping = False
        self._closing = False
        self._cancel_pending = False
        self._abort = False
        self._exited = False
        self._wires = itertools.count()  # wire numbers (see _Item.wire)
        #: The supervisor's counts (``submitted`` is the engine's: ``outside.stats()``).
        self._counts = {
            "completed": 0,
            "failed": 0,
            "crashed": 0,
            "timeouts": 0,
            "killed": 0,
            "retries": 0,
            "spawned": 0,
            "replaced": 0,
            "unpicklable": 0,
            "recycled": 0,
            "recycled_rss": 0,
            # Tokens taken back from a process busy with a long call (see .dispatch).
            "taken_back": 0,
        }
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._rfd, selectors.EVENT_READ, None)
        self._sel.register(self.outside.wake_fd, selectors.EVENT_READ, ("outside", None))

    def _wake_locked(self) -> None:
        if self._sleeping and not self._exited:
            self._sleeping = False
            try:
                os.write(self._wfd, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _finish_item(self, w: _Worker, item: _Item) -> None:
        try:
            w.items.remove(item)
        except ValueError:
            pass
        item.worker = None

    def _requeue(self, item: _Item, pid: int) -> None:
        """A token sent to a process that died before starting it goes back to its place
        in the queue; after the third such death it fails (a token whose message itself
        kills the worker, say by exhausting its memory, must not loop for ever)."""
        item.worker = None
        self._running.pop(item.seq, None)
        if item.done:
            return
        n = item.task.requeues + 1
        if n >= _MAX_REQUEUES:
            self._count("crashed")
            self._fail(
                item,
                WorkerCrashedError(
                    f"token {item.seq} ({item.pf._op}): {n} worker processes died with it "
                    f"queued in them, before it started (the last: pid {pid})"
                ),
                retry=False,
            )
            return
        item.done = True
        self.outside.requeue(item.task)

    def _fail(self, item: _Item, exc: BaseException, retry: bool = True, state: str = "failed") -> None:
        """Reports ``item`` ended with ``exc``: the engine retries it (``retries``) unless
        ``retry`` is False or the exception is a pickling error; else its token ends
        ``state`` ("failed", "killed")."""
        item.done = True
        self._running.pop(item.seq, None)
        retry = retry and state == "failed" and not isinstance(exc, UnpicklableError)
        if not item.task.token.done():  # counted first: a waiter woken by the error sees it
            if retry and item.task.retries_left > 0:
                self._count("retries")
            else:
                self._count({"failed": "failed", "killed": "killed"}[state])
                if isinstance(exc, UnpicklableError):
                    self._count("unpicklable")
        else:
            self._count_stopped(item)
        self.outside.fail(item.task, exc, retry=retry, state=state)

    def _finish_ok(self, item: _Item, value: Any) -> None:
        item.done = True
        self._running.pop(item.seq, None)
        counts = self._counts
        counts["completed"] += 1  # counted first: a waiter woken by the result sees it
        if not self.outside.finish(item.task, value):
            counts["completed"] -= 1
            self._count_stopped(item)

    def _count_stopped(self, item: _Item) -> None:
        """Counts how ``item``'s token was stopped from outside (killed, or its deadline
        passed), if it was: once, by its stop notice (``_Dispatch._stopped``), or by its
        process's reply when that came first (the notice then finds the item done)."""
        state = item.task.token.state
        if state in ("timeout", "killed"):
            self._count("timeouts" if state == "timeout" else "killed")

    def _count(self, key: str) -> None:
        """Counts an event of the supervisor thread. It alone writes these counts: no lock
        (tokens submitted are counted by the engine, see ``outside.stats()``)."""
        self._counts[key] += 1

    def _queued(self) -> int:
        """Tokens in the engine's queue for this lane."""
        return int(self.outside.stats()["queued"])

    # The parts of the lane call into each other: these five are defined by dispatch
    # (_stop_item, _stopped), replies (_read_replies) and worker processes (_replace, _died).

    def _stopped(self, seq: int) -> None:  # pragma: no cover - see _Dispatch
        raise NotImplementedError

    def _stop_item(self, w: _Worker, item: _Item) -> None:  # pragma: no cover - see _Dispatch
        raise NotImplementedError

    def _read_replies(self, w: _Worker) -> None:  # pragma: no cover - see _Replies
        raise NotImplementedError

    def _replace(self, w: _Worker, stopped: _Item) -> None:  # pragma: no cover - see _Processes
        raise NotImplementedError

    def _died(self, w: _Worker) -> None:  # pragma: no cover - see _Processes
        raise NotImplementedError
