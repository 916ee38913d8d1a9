"""The lane: the worker processes of one running coordinator and the supervisor thread
that feeds them.

* **The engine keeps the queue** (an outside lane of the engine, see
  :class:`~tokengate._tokengate.OutsideLane`): priorities and aging,
  admission, pauses, deadlines, retries and tokens as arguments are the same
  as on the thread lanes.
* **A supervisor thread** (one Python thread per lane) owns the worker
  processes and the wire. It waits on one selector over the workers' sockets,
  their pidfds, the engine queue's wake-up socket and its own wake-up pipe,
  so crashes, results, submissions, kills and deadlines all wake it at once;
  it takes tokens when a process has room. A thread submitting a burst
  steps aside for it once it woke (see :meth:`ProcessLane._wait`), so the
  processes get their first tokens while the burst is still being submitted.
* **Stopping.** ``stop()`` lets queued process tokens run (``cancel_pending``
  cancels them), then closes every worker and reaps it, with the retired
  processes that are still exiting (SIGKILLed after 2 s); when ``timeout``
  passes first, running process tokens end killed
  (``TaskKilledError('process_lane_stopped')``) and their processes are
  SIGKILLed. Interpreter exit does the same after the engines stopped.

:class:`ProcessLane` puts the lane's parts together: submission
(:mod:`.submission`), dispatch (:mod:`.dispatch`), replies and timers
(:mod:`.replies`), worker processes (:mod:`.workers`) and recycling
(:mod:`.recycling`), over the state they share (:mod:`.state`).
"""

from __future__ import annotations

import os
import select
import selectors
import threading
import time
from typing import Any

from .._exit_hooks import shutdown_at_exit
from .._tokengate import forget_process_lane
from ..exceptions import TaskKilledError
from .dispatch import _Dispatch
from .recycling import _Recycling
from .replies import _Replies
from .submission import _Submission


class ProcessLane(_Submission, _Dispatch, _Replies, _Recycling):
    """The worker processes of one running coordinator and the supervisor thread that
    feeds them. Made by :func:`lane_for`; shut down by the coordinator's ``stop()``."""

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
        super().__init__(
            engine,
            workers,
            coordinator=coordinator,
            prefetch=prefetch,
            max_tasks_per_child=max_tasks_per_child,
            max_rss=max_rss,
        )
        self._thread = threading.Thread(target=self._run, name="tokengate-process-lane", daemon=True)
        shutdown_at_exit(self)
        self._thread.start()

    # -- control ------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> bool:
        """Stops the lane. Queued tokens still run (``cancel_pending``: they are
        cancelled). ``wait``: block until the lane is idle and every process has
        exited; after ``timeout`` seconds, queued tokens are cancelled and running
        ones killed (their processes terminated). Returns True when the supervisor
        and every process are gone."""
        with self._lock:
            self._closing = True
            self._cancel_pending = self._cancel_pending or cancel_pending
            self._sleeping = True
            self._wake_locked()
        if not wait:
            return False
        if threading.current_thread() is self._thread:  # a done callback stopping its coordinator
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._abort = True
                self._sleeping = True
                self._wake_locked()
            self._thread.join()
        return True

    @property
    def pids(self) -> list[int]:
        """Pids of the worker processes alive now."""
        return [w.pid for w in list(self._workers) if w is not None]

    def pid_of(self, token: Any) -> int | None:
        """Pid of the process running ``token`` (None when it is not running)."""
        item = self._running.get(token.token_id)
        worker = item.worker if item is not None else None
        return worker.pid if worker is not None else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            workers = [w for w in self._workers if w is not None]
            queue = self.outside.stats()
            out: dict[str, Any] = {"submitted": queue["submitted"], **self._counts}
            out.update(
                workers=self.size,
                alive=len(workers),
                ready=sum(1 for w in workers if w.ready),
                busy=sum(1 for w in workers if w.items),
                in_flight=sum(len(w.items) for w in workers),
                prefetch=self.prefetch,
                max_tasks_per_child=self.max_tasks_per_child,
                max_rss=self.max_rss,
                queued=queue["queued"],
                pids=[w.pid for w in workers],
                closing=self._closing,
            )
        return out

    # -- supervisor thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            for slot in range(self.size):
                self._spawn(slot)
            self._loop()
        except BaseException:  # pragma: no cover - a bug: fail what is left rather than hang
            import logging

            logging.getLogger("tokengate.pool").exception("process lane supervisor failed")
            self._abort = True
        finally:
            self._finish()

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                closing, abort, cancel = self._closing, self._abort, self._cancel_pending
            if abort:
                return
            if closing and cancel:
                self.outside.cancel_queued()
            if self._retiring:
                self._retire_idle(closing)
            if self._retired:
                self._reap_retired(now)
            self._respawn(now)
            if self._dispatch():
                continue  # took something: look again before sleeping
            look = self._take_back(time.monotonic())
            with self._lock:
                if self._closing and self._idle():
                    self._exited = True
                    return
                if self._abort or (self._closing and self._cancel_pending and self._queued()):
                    continue
                wait_s = 1.0
                if any(t > 0 for t in self._respawn_at):
                    wait_s = min(wait_s, max(0.0, min(t for t in self._respawn_at if t > 0) - time.monotonic()))
                if look is not None:
                    wait_s = min(wait_s, max(0.0, look - time.monotonic()))
                self._sleeping = True
            ready = self._wait(wait_s)
            with self._lock:
                self._sleeping = False
            for key, mask in ready:
                if key.data is None:
                    try:
                        while os.read(self._rfd, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                kind, w = key.data
                if kind == "outside":  # the engine queued tokens or stop notices
                    self.outside.clear_wake()
                    continue
                if kind == "retired":  # a retired process exited
                    self._reaped(w)
                    continue
                if self._workers[w.slot] is not w:
                    continue
                if kind == "conn":
                    if mask & selectors.EVENT_WRITE and not self._flush(w):
                        continue
                    if mask & selectors.EVENT_READ and self._workers[w.slot] is w:
                        self._read(w)
                else:  # pidfd: the process exited
                    self._died(w)
            if not ready:
                self._poll_exits()

    def _wait(self, wait_s: float) -> list[tuple[selectors.SelectorKey, int]]:
        """The selector's events, waiting at most ``wait_s``, as ``select()`` gives them. On
        Linux the wait is the engine's (``OutsideLane.wait_events`` on the epoll instance): a
        thread that submits to the lane meanwhile hands the interpreter over once this thread
        woke, instead of keeping it for CPython's switch interval while the processes idle."""
        if not isinstance(self._sel, selectors.EpollSelector):  # pragma: no cover - not Linux
            return self._sel.select(wait_s)
        keys = self._sel.get_map()
        ready = []
        for fd, ev in self.outside.wait_events(self._sel.fileno(), wait_s):
            key = keys.get(fd)
            if key is None:
                continue  # unregistered meanwhile
            # As EpollSelector.select reads them (an error or hang-up wakes both directions).
            mask = (selectors.EVENT_WRITE if ev & ~select.EPOLLIN else 0) | (
                selectors.EVENT_READ if ev & ~select.EPOLLOUT else 0
            )
            if mask & key.events:
                ready.append((key, mask & key.events))
        return ready

    def _idle(self) -> bool:
        """Nothing of this lane is left: no token taken and unreported, none queued,
        waiting for inputs or for a retry."""
        return not self._running and self.outside.pending == 0

    def _finish(self) -> None:
        """Supervisor exit: fail what is left, terminate every process, close fds."""
        with self._lock:
            self._exited = True
        self.outside.close()  # queued tokens are cancelled; later ones are refused
        forget_process_lane(self.outside)  # plain calls no longer reach it (see wrapper.lane_for)
        for item in list(self._running.values()):
            self._fail(item, TaskKilledError("process_lane_stopped"), retry=False, state="killed")
        self._running.clear()
        workers = [w for w in self._workers if w is not None]
        retired, self._retired = self._retired, []
        self._retiring.clear()
        for w in workers:  # EOF: an idle worker exits at once
            self._close(w)
        for w in workers:
            if w.items:
                try:
                    w.proc.kill()
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        for w in workers + retired:  # retired ones read EOF already and are exiting
            self._reap(w, max(0.0, deadline - time.monotonic()))
        for w in retired:
            self._close(w)
        self._workers = [None] * self.size
        self.engine._note_process_workers(0)
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
