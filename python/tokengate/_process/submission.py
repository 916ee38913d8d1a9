"""Submission: what a caller's thread does to put a process token in the lane's queue.

* **Admission.** The coordinator's ``max_pending`` and ``operation_limits``
  apply (checked here, a caller waits or ``try_submit`` returns None);
  ``pause_admission``/``pause_operation`` hold queued process tokens;
  ``drain_*`` cancel the unstarted ones. ``retries`` retries a token whose
  function raised (not a crash, a timeout or a pickling error), with the same
  0.05 s doubling back-off. Tokens passed as arguments are awaited first and
  their values sent (``DependencyFailedError`` if one failed).
* The function and the arguments are pickled in the calling thread (see
  :mod:`.payload`); then the token joins the lane's priority queue (higher
  ``priority`` first, FIFO within a priority; a waiting token gains +1 per
  ``aging`` seconds like the thread lane) and the supervisor is woken.
* A token that ends from outside while a process holds it (``kill()``, a
  deadline) wakes the supervisor, which stops it there
  (:meth:`_Submission._on_token_done`).
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import TYPE_CHECKING, Any

from .._tokengate import TaskToken
from ..exceptions import AdmissionRejectedError, DependencyFailedError, ShutdownError
from .payload import UnpicklableError, _dump_args
from .state import _Item, _LaneState

if TYPE_CHECKING:
    from .wrapper import ProcessFunction


class _Submission(_LaneState):
    """The lane's part that caller threads run (and the done callbacks of its tokens)."""

    def submit(
        self,
        pf: ProcessFunction,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None,
        timeout: float | None,
        retries: int | None,
        block: bool,
        admission_timeout: float | None,
        probe: bool,
    ) -> TaskToken[Any] | None:
        coordinator = self._coordinator() if self._coordinator is not None else None
        limited = coordinator is not None and (
            coordinator.max_pending is not None or pf._op in coordinator.operation_limits
        )
        if limited:
            with self._admit_lock:
                if not self._admit(coordinator, pf._op, block, admission_timeout):
                    return None
                token = pf.spec.external_token(self.engine)
        else:
            token = pf.spec.external_token(self.engine)
        item = _Item(
            next(self._seq),
            token,
            pf,
            pf._priority if priority is None else priority,
            pf._timeout if timeout is None else timeout,
            pf._retries if retries is None else retries,
        )
        token._add_thread_callback(self._on_token_done)
        inputs = [a for a in args if type(a) is TaskToken]
        inputs += [v for v in kwargs.values() if type(v) is TaskToken]
        with self._lock:
            self._counts["submitted"] += 1
            if item.deadline is not None:
                heapq.heappush(self._timers, (item.deadline, item.seq, "deadline", item))
                self._wake_locked()
        if inputs:
            self._wait_for_inputs(item, args, kwargs, inputs)
        else:
            self._prepare(item, args, kwargs)
        return token

    def _admit(self, coordinator: Any, op: str, block: bool, admission_timeout: float | None) -> bool:
        deadline = None if admission_timeout is None else time.monotonic() + float(admission_timeout)
        delay = 0.0005
        while True:
            if not self.engine.running:
                raise ShutdownError("cannot schedule new futures after shutdown")
            stats = self.engine.stats()
            max_pending = coordinator.max_pending
            op_limit = coordinator.operation_limits.get(op)
            full_global = max_pending is not None and stats["admission"]["pending"] >= max_pending
            op_stats = stats["operations"].get(op)
            full_op = op_limit is not None and op_stats is not None and op_stats["pending"] >= op_limit
            if not (full_global or full_op):
                return True
            if not block:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                what = f"operation {op!r}" if full_op else "the coordinator"
                raise AdmissionRejectedError(f"{what} is full and no slot freed within {admission_timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _prepare(self, item: _Item, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pickles function and arguments in the calling thread, then queues the item."""
        try:
            item.pf._payload_of()
            item.args = _dump_args(item.pf._op, args, kwargs)
        except UnpicklableError as exc:
            with self._lock:
                self._counts["unpicklable"] += 1
            item.done = True
            item.token._set_exception(exc)
            return
        self._enqueue(item)

    def _enqueue(self, item: _Item) -> None:
        key = item.key = (time.monotonic() - self._t0) / self._aging - item.priority
        with self._lock:
            if self._exited:
                item.done = True
                exited = True
            else:
                exited = False
                heapq.heappush(self._heap, (key, item.seq, item))
                self._wake_locked()
        if exited:
            item.token._set_exception(ShutdownError("cannot schedule new futures after shutdown"))

    def _wait_for_inputs(self, item: _Item, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[Any]) -> None:
        item.inputs = inputs
        item.remaining = len(inputs) + 1
        item.lock = threading.Lock()
        with self._lock:
            self._waiting_inputs.add(item)

        def input_done(_token: Any) -> None:
            assert item.lock is not None
            with item.lock:
                item.remaining -= 1
                ready = item.remaining == 0
            if ready:
                self._inputs_ready(item, args, kwargs)

        for t in inputs:
            t._add_thread_callback(input_done)
        input_done(None)

    def _inputs_ready(self, item: _Item, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._lock:
            self._waiting_inputs.discard(item)
        if item.token.done():
            item.done = True
            return
        for t in item.inputs or ():
            if t.state != "completed":
                try:
                    cause = t.exception(timeout=0)
                except BaseException as exc:  # cancelled
                    cause = exc
                err = DependencyFailedError(
                    f"input token {t.token_id} ({t.operation_type}) ended {t.state}: the call that received it never ran"
                )
                err.input_token_id = t.token_id
                err.__cause__ = cause
                item.done = True
                item.token._set_exception(err)
                return
        sub = {id(t): t.result(timeout=0) for t in item.inputs or ()}
        args = tuple(sub[id(a)] if type(a) is TaskToken else a for a in args)
        kwargs = {k: (sub[id(v)] if type(v) is TaskToken else v) for k, v in kwargs.items()}
        self._prepare(item, args, kwargs)

    def _on_token_done(self, token: Any) -> None:
        """Any token of the lane resolved. One still running in a process was killed or
        timed out from outside: the supervisor terminates its process."""
        item = self._running.get(token.token_id)
        if item is not None and not item.done:
            with self._lock:
                self._events.append(item)
                self._wake_locked()
