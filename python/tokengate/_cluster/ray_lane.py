"""The Ray lane: a cluster lane (see :mod:`.lane`) on Ray.

* **Room.** The cluster's CPUs (``ray.cluster_resources()["CPU"]``, the
  alive nodes' total; not ``available_resources()``, which the lane's own
  running tokens lower), plus 8 CPUs' worth sent ahead. A token takes
  ``num_cpus`` by its operation's ``weight``: light 0.25, medium 0.5, heavy 1,
  the share of a core it takes on the engine's own workers (so 32 light, 16
  medium or 8 heavy tokens go ahead; fewer cost more per task, as Ray then
  waits on each completion before the next send). Ray has no task priorities: the engine's
  queue decides the order in which tokens go out, and little is sent ahead, so
  a late urgent token waits for at most those.
* **Sending.** One remote function per function, operation and weight
  (:func:`_bound`; Ray ships it once), with ``options(num_cpus=...,
  name=operation, max_retries=0, retry_exceptions=False)``: the engine's ``retries`` decide whether a token
  runs again, on an error or a lost worker alike, so Ray must not retry on its
  own. Arguments travel at the call's top level, where Ray resolves an
  ``ObjectRef`` to its value: a linked input token goes as its ``ObjectRef``.
* **Batches of short tokens.** While more tokens wait than the room lets
  out, tokens of a function that runs briefly go in batches: one Ray task
  runs up to 64 of them one after another (:func:`~.function.run_batch`),
  about ``batch_seconds`` (2 ms) of work, because Ray's own cost per task
  (about 0.6 ms here) would otherwise dwarf them. The lane learns each
  function's time per token from its batches: an unknown function goes out
  in pairs, one that takes over half the target goes alone (measured again
  every 512 tokens). A batch takes its tokens in the engine's order and uses
  one token's ``num_cpus``. Never batched: tokens with a deadline, with an
  ``ObjectRef`` or a linked token among their arguments (Ray resolves only
  top-level ones), and tokens other calls want as inputs. A batch's replies
  are encoded as the process lane's (an exception carries the worker's
  traceback as its ``__cause__``). Killing one token of a batch that has
  others still running does not stop the batch: the token ends killed and
  its body, a short one by then, runs out; killing all of them cancels it.
* **Completion.** ``ObjectRef._on_completed`` hands the result (or the error)
  to a callback on Ray's thread, which puts ``(token id, result)`` in
  ``_done``; no ``ray.get`` follows.
* **Errors.** A ``RayTaskError`` is reported as the exception the body raised
  (its ``cause``, with the ``RayTaskError`` and its remote traceback as the
  cause's ``__cause__``). A worker or node lost (``WorkerCrashedError``,
  ``NodeDiedError``, ``ObjectLostError`` and its kinds, ``OwnerDiedError``,
  ``LocalRayletDiedError``, ``OutOfMemoryError``) and a task Ray cancelled
  become :class:`~tokengate.exceptions.WorkerLostError`. Through a Ray client
  (``ray://``) any exception handed to the callback is a failure (the
  connection's own errors among them: a ``ConnectionError`` is a lost worker),
  as in Ray's ``ClientObjectRef.future()``.
* **One connection per process.** The lanes of one process share it
  (:class:`~.connect.RayConnection`): a ``"ray"`` lane joins the connection a
  ``ray-local`` or ``ray://`` lane made, and the last lane to stop closes it.
* **Stop notices.** ``ray.cancel(ref, force=True)``: Ray kills the worker
  process running it.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from typing import Any

from .._process.payload import UnpicklableError
from .._process.replies import decode_reply
from ..exceptions import WorkerLostError
from .connect import connect_ray, disconnect_ray, ray_module
from .function import run_batch
from .lane import ClusterLane, has_links

_log = logging.getLogger("tokengate.cluster")

#: num_cpus of a token, by its operation's weight.
_CPUS = {"light": 0.25, "medium": 0.5, "heavy": 1.0}

#: Ray's errors that mean the worker or node running a task was lost.
_LOST = (
    "WorkerCrashedError",
    "NodeDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "LocalRayletDiedError",
    "OutOfMemoryError",
)


#: Most remote functions a lane keeps (one per function and weight); past it they are made again.
_VARIANTS_MAX = 1024

#: Most tokens in one batch.
_BATCH_MAX = 64

#: A function found too slow to batch is measured again after this many of its tokens.
_PROBE_EVERY = 512


class _Batch:
    """The handle of a batch's tokens: its ``ObjectRef``, its tokens' ids, their function's
    payload, and how many of its tokens are not cancelled (the batch is cancelled with the last)."""

    __slots__ = ("ids", "left", "payload", "ref")

    def __init__(self, ref: Any, ids: list[int], payload: Any) -> None:
        self.ref = ref
        self.ids = ids
        self.payload = payload
        self.left = len(ids)


def _bound(call: Any) -> Any:
    """What a Ray worker runs for ``call`` (a :class:`~.function.RemoteCall`): Ray ships the
    function once, so each task carries only its arguments."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return call(args, kwargs)

    return run


def _first() -> int:
    return 0


class RayLane(ClusterLane):
    """The cluster lane of one running coordinator, on Ray."""

    name = "ray"
    send_ahead = 8.0
    #: Seconds of work a batch of short tokens aims at; 0 sends every token alone.
    batch_seconds = 0.002

    def _connect(self, target: Any) -> None:
        self._ray = ray_module()
        errors = importlib.import_module("ray.exceptions")
        self._ray_error: type[BaseException] = errors.RayError
        self._task_error: type[BaseException] = errors.RayTaskError
        self._cancelled: type[BaseException] = errors.TaskCancelledError
        self._lost_types = tuple(getattr(errors, n) for n in _LOST if hasattr(errors, n))
        self._connection = connect_ray(target)
        try:
            self._client_mode = bool(importlib.import_module("ray.util.client").ray.is_connected())
        except BaseException:
            disconnect_ray(self._connection)
            raise
        #: Remote function by (the call's payload, operation, num_cpus).
        self._variants: dict[tuple[Any, str, float], Any] = {}
        #: The batch's remote function by (operation, num_cpus).
        self._batch_fns: dict[tuple[str, float], Any] = {}
        #: Seconds per token of each function (by payload), from its batches.
        self._per_token: dict[Any, float] = {}
        #: Tokens of each function sent alone since it was last measured.
        self._alone: dict[Any, int] = {}
        #: Functions (by payload) with a pair of tokens in flight to measure them.
        self._probing: set[Any] = set()
        #: How many tokens per unit of room the next take asks for while tokens wait.
        self._take_factor = 2
        self._ref_types: tuple[type, ...] = (self._ray.ObjectRef,)
        try:
            self._ref_types += (importlib.import_module("ray.util.client.common").ClientObjectRef,)
        except (ImportError, AttributeError):  # pragma: no cover - a Ray without the client
            pass

    def _warm_up(self) -> None:
        # A first task starts a worker, and Ray's callback path is used once before exit.
        called = threading.Event()
        ref = self._ray.remote(_first).options(num_cpus=0, max_retries=0).remote()
        ref._on_completed(lambda _r: called.set())
        if self._ray.get(ref, timeout=60) != 0 or not called.wait(30):  # pragma: no cover
            raise RuntimeError("the Ray cluster did not run a first task within 60 s")

    def _read_capacity(self) -> float:
        try:
            return float(self._ray.cluster_resources().get("CPU", 0.0))
        except Exception:  # the cluster is unreachable now: send nothing more until it answers
            return 0.0

    def _cost(self, task: Any) -> float:
        return _CPUS[task.weight]

    def _send_call(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cost: float) -> Any:
        call = task.func
        fn = self._remote(self._variants, (call.payload, task.operation_type, cost), lambda: _bound(call))
        ref = fn.remote(*args, **kwargs)
        seq = task.id
        ref._on_completed(lambda result, seq=seq: self._on_done((seq, result)))
        return ref

    def _remote(self, cache: dict[Any, Any], key: Any, make: Any) -> Any:
        """The remote function cached under ``key`` (its last two parts: operation, num_cpus),
        made from ``make()`` on first use; Ray must not retry it (see the module docs)."""
        fn = cache.get(key)
        if fn is None:
            if len(cache) >= _VARIANTS_MAX:
                cache.clear()
            op, cost = key[-2:]
            fn = cache[key] = self._ray.remote(make()).options(
                num_cpus=cost, name=op, max_retries=0, retry_exceptions=False
            )
        return fn

    def _is_failure(self, result: Any) -> bool:
        """Whether what Ray handed the callback is a failure of the task, not its value: only
        Ray's own errors (a body may return an exception object); through a Ray client, any
        exception (the connection reports its own errors there)."""
        return isinstance(result, self._ray_error) or (self._client_mode and isinstance(result, Exception))

    # -- batches ---------------------------------------------------------------------------

    def _take_and_send(self) -> bool:
        room = self._room()
        n = max(0, int(room + 1e-9))
        if not self.batch_seconds or n == 0 or self.outside.pending <= len(self._inflight) + n:
            return super()._take_and_send()  # no more waiting than the room lets out: each alone
        tasks, stopped = self.outside.take(n * self._take_factor)
        if stopped:
            self._stop(stopped)
        if tasks:
            self._send_grouped(tasks, room, n)
        return bool(tasks or stopped)

    def _batch_key(self, task: Any) -> Any:
        """(payload, operation, cost) when ``task`` may go in a batch, else None."""
        if task.has_deadline or task.id in self._wanted:
            return None
        kwargs = task.kwargs
        refs = self._ref_types
        if kwargs and (has_links(kwargs) or any(isinstance(v, refs) for v in kwargs.values())):
            return None
        if any(isinstance(a, refs) for a in task.args):
            return None
        return (task.func.payload, task.operation_type, self._cost(task))

    def _batch_size(self, payload: Any) -> int:
        """How many tokens of this function go in one batch: 2 for a function not measured
        yet (one such pair in flight at a time), 1 for a slow one."""
        per_token = self._per_token.get(payload)
        if per_token is None:
            if payload in self._probing:
                return 1
            self._probing.add(payload)
            return 2
        k = int(self.batch_seconds / max(per_token, 1e-7))
        return min(k, _BATCH_MAX) if k >= 2 else 1

    def _sent_alone(self, payload: Any) -> None:
        """A token of this (measured, slow) function went alone: after ``_PROBE_EVERY`` of
        them it is measured again."""
        alone = self._alone[payload] = self._alone.get(payload, 0) + 1
        if alone >= _PROBE_EVERY and payload in self._per_token:
            del self._per_token[payload]
            self._alone[payload] = 0

    def _send_grouped(self, tasks: list[Any], room: float, n: int) -> None:
        """Sends ``tasks`` as batches and single tokens, in the engine's order, while the room
        lasts (at most ``n`` Ray tasks); what does not fit goes back to the queue."""
        units: list[tuple[Any, list[Any]]] = []
        open_batches: dict[Any, list[Any]] = {}
        sizes: dict[Any, int] = {}
        for task in tasks:
            key = self._batch_key(task)
            batch = None if key is None else open_batches.get(key)
            if batch is not None and len(batch) < sizes[key]:
                batch.append(task)
                continue
            size = 1 if key is None else self._batch_size(key[0])
            if size == 1:
                units.append((key, [task]))
                continue
            batch = open_batches[key] = [task]
            sizes[key] = size
            units.append((key, batch))
        for key, batch in open_batches.items():
            if len(batch) == 1:  # a measuring pair that found no second token
                self._probing.discard(key[0])
        sent_units = sent_tokens = 0
        full = True
        for key, unit in units:
            cost = self._cost(unit[0])
            if n > 0 and cost <= room + 1e-9:
                if len(unit) > 1:
                    if not self._send_batch(unit, cost):
                        continue  # handed back, to go alone
                    full = full and len(unit) == sizes[key]
                else:
                    self._send(unit[0])
                    if key is not None and key[0] in self._per_token:
                        self._sent_alone(key[0])
                n -= 1
                room -= cost
                sent_units += 1
                sent_tokens += len(unit)
                continue
            full = False
            if len(unit) > 1:  # no room for it: its tokens go back (a measuring pair is free again)
                self._probing.discard(unit[0].func.payload)
            for task in unit:
                self.outside.requeue(task)
        # Next time, take as many tokens per unit of room as the Ray tasks sent carried; when
        # every one was a full batch and nothing went back, as many as the largest batch
        # wants (so that batches grow to their size).
        if full and sent_units and all(len(unit) > 1 for _, unit in units):
            self._take_factor = max(sizes.values())
        else:
            self._take_factor = max(1, min(_BATCH_MAX, -(-sent_tokens // max(1, sent_units))))
        if len(self._per_token) > _VARIANTS_MAX:
            self._per_token.clear()
            self._alone.clear()

    def _send_batch(self, tasks: list[Any], cost: float) -> bool:
        """Sends one batch; False when it could not be sent (its tokens went back to the
        queue, and its function goes alone for a while)."""
        op = tasks[0].operation_type
        try:
            fn = self._remote(self._batch_fns, (op, cost), lambda: run_batch)
            ref = fn.remote([(task.func, task.args, task.kwargs) for task in tasks], "a Ray worker")
        except Exception:  # pickling, or the connection is closed: each goes alone, and fails alone
            _log.debug("a batch of %d %s tokens could not be sent; they go alone", len(tasks), op, exc_info=True)
            self._not_batched(tasks[0].func.payload)
            for task in tasks:
                self.outside.requeue(task)
            return False
        with self._lock:
            self._counts["batched"] += len(tasks)
        batch = _Batch(ref, [task.id for task in tasks], tasks[0].func.payload)
        share = cost / len(tasks)
        for task in tasks:
            self._inflight[task.id] = (task, batch, share)
        self._used += cost
        ref._on_completed(lambda result: self._on_done((batch, result)))
        return True

    def _not_batched(self, payload: Any) -> None:
        """This function's tokens go alone until it is measured again (after ``_PROBE_EVERY``)."""
        self._probing.discard(payload)
        self._per_token[payload] = math.inf
        self._alone[payload] = 0
        self._take_factor = 1

    def _settle_batch(self, batch: _Batch, result: Any) -> None:
        self._probing.discard(batch.payload)
        if self._is_failure(result):
            self._batch_failed(batch, result)
            return
        replies, per_token = result
        old = self._per_token.get(batch.payload)
        self._per_token[batch.payload] = per_token if old is None else 0.7 * old + 0.3 * per_token
        for i, seq in enumerate(batch.ids):
            entry = self._pop(seq)
            if entry is None:  # stopped meanwhile
                continue
            task = entry[0]
            ok, value = decode_reply(task.operation_type, replies[i])
            if ok:
                self._finish_ok(task, value, None)
            else:  # as on the process lane, a value that cannot be pickled is not retried
                self._failed(task, value, retry=not isinstance(value, UnpicklableError))

    def _batch_failed(self, batch: _Batch, error: BaseException) -> None:
        """The batch's Ray task failed as a whole. Lost with its worker or node: each of its
        tokens is a lost token (the engine's ``retries`` decide; the worker counts once).
        Otherwise no body ran (its arguments did not reach the worker, say): each token goes
        back to the queue, to go alone. Either way the function is no longer batched for a
        while, unless every token of the batch was stopped (its Ray task was cancelled for them)."""
        entries = [entry for entry in map(self._pop, batch.ids) if entry is not None]
        if not entries:
            return
        self._not_batched(batch.payload)
        noted = False
        for task, _ in entries:
            exc = self._error_of(task, error)
            if isinstance(exc, WorkerLostError):
                self._failed(task, exc, note_lost=not noted)
                noted = True
            else:
                self.outside.requeue(task)

    # -- completion ------------------------------------------------------------------------

    def _settle(self) -> None:
        while self._done:
            seq, result = self._done.popleft()
            if type(seq) is _Batch:
                self._settle_batch(seq, result)
                continue
            entry = self._pop(seq)
            if entry is None:  # stopped meanwhile
                continue
            task, ref = entry
            if self._is_failure(result):
                self._failed(task, self._error_of(task, result))
            else:
                self._finish_ok(task, result, ref)

    def _error_of(self, task: Any, error: BaseException) -> BaseException:
        if isinstance(error, self._task_error):
            cause = getattr(error, "cause", None)
            if isinstance(cause, self._lost_types):
                return self._lost(task, cause, "an input of it was lost with its worker or node")
            if not isinstance(cause, BaseException):
                return error
            if cause.__cause__ is None and cause is not error:
                cause.__cause__ = error  # keeps the remote traceback in what is printed
            return cause
        if isinstance(error, self._cancelled):
            return self._lost(task, error, "the cluster cancelled it")
        if isinstance(error, self._lost_types):
            return self._lost(task, error, "the Ray worker or node running it was lost")
        if self._client_mode and isinstance(error, ConnectionError):
            return self._lost(task, error, "the connection to the Ray cluster was lost")
        return error

    def _cancel(self, handles: list[Any], force: bool) -> None:
        for ref in handles:
            if type(ref) is _Batch:
                ref.left -= 1
                if ref.left > 0:  # its other tokens still run (see the module docs)
                    continue
                ref = ref.ref
            try:
                self._ray.cancel(ref, force=force)
            except Exception:
                pass

    def _disconnect(self) -> None:
        disconnect_ray(self._connection)
