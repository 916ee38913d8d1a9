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
import threading
from typing import Any

from .connect import connect_ray, disconnect_ray, ray_module
from .lane import ClusterLane

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
        key = (call.payload, task.operation_type, cost)
        fn = self._variants.get(key)
        if fn is None:
            if len(self._variants) >= _VARIANTS_MAX:
                self._variants.clear()
            fn = self._variants[key] = self._ray.remote(_bound(call)).options(
                num_cpus=cost, name=task.operation_type, max_retries=0, retry_exceptions=False
            )
        ref = fn.remote(*args, **kwargs)
        seq = task.id
        ref._on_completed(lambda result, seq=seq: self._on_done((seq, result)))
        return ref

    def _settle(self) -> None:
        while self._done:
            seq, result = self._done.popleft()
            entry = self._pop(seq)
            if entry is None:  # stopped meanwhile
                continue
            task, ref = entry
            # A body may return an exception object: only Ray's own errors mean it failed
            # (through a Ray client, any exception: the connection reports its own errors there).
            if isinstance(result, self._ray_error) or (self._client_mode and isinstance(result, Exception)):
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
            try:
                self._ray.cancel(ref, force=force)
            except Exception:
                pass

    def _disconnect(self) -> None:
        disconnect_ray(self._connection)
