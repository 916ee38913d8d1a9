"""The decorated function of a ``process_pool: True`` operation, and the lane it goes to.

A decorated function tagged ``process_pool: True`` (and no ``storage_speed``)
is a :class:`ProcessFunction`. Calling it returns an ordinary
:class:`~tokengate.TaskToken` (``result``, ``await``, ``cancel``, ``kill``,
done callbacks, ``gather``/``as_completed``), counted on the running
coordinator like any other token, but the body runs in one of the
coordinator's worker *processes*.

* Calls go to the newest running coordinator (also from inside a task of an
  older one, :func:`_current_coordinator`), and to its lane, made on its first
  process token (:func:`lane_for`).
* **Decorated calls inside a worker** raise :class:`~tokengate.NotStartedError`
  with a message saying so: no coordinator runs in a worker process. Call the
  plain function (``fn.__wrapped__(...)``) there instead. A process-lane
  function that reaches a worker inside a pickled function is a
  :class:`_WorkerStub`, whose call raises the same error.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, cast

from .._decorator import CallWith, _map
from .._tokengate import OperationSpec, ProcessCall, TaskToken, register_process_lane
from ..exceptions import NotStartedError, ShutdownError
from .lane import ProcessLane
from .payload import _function_payload

_FKEYS = itertools.count(1)
#: True inside a worker process of the lane (set by :func:`.child._child_main`).
_IN_WORKER = False


# -- the decorated function -----------------------------------------------------------


class ProcessFunction(ProcessCall):
    """What ``@task_token_guard(tags={"process_pool": True})`` returns: calling it
    returns a token whose body runs in a worker process of the coordinator's
    process lane. Same attributes as the thread wrapper (``__wrapped__``,
    ``operation_type``, ``tags``, ``spec``, ``map``, ``options``, ``try_submit``,
    ``submit_async``).

    A call with plain positional arguments only is queued by the Rust base
    (``ProcessCall``, ``src/py/process_call.rs``) once the function's payload is
    made and its lane registered; every other call is :meth:`_call_slow`."""

    #: Marks the process-lane wrapper (the worker unwraps it).
    _tokengate_process_lane = True

    def __init__(self, spec: Any, fn: Any) -> None:
        from .._decorator import _arity

        functools.update_wrapper(self, fn)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        self._fn = fn
        self._name = name
        self._op: str = spec.operation_type
        self._min_pos, self._max_pos, self._fast, self._binder = _arity(fn, name)
        tags = spec.tags
        self._priority: int = int(tags.get("priority", 0))
        self._timeout: float | None = tags.get("timeout")
        retries = int(tags.get("retries", 0))
        if tags.get("allow_retries") is False:
            retries = 0
        self._retries = retries
        self._fkey = next(_FKEYS)
        self._payload: tuple[str, Any, Any] | None = None
        self._chunks: _ChunkFunction | None = None  # made by the first chunked map
        self.operation_type = spec.operation_type
        self.tags = spec.tags
        self.spec: OperationSpec = spec
        self.map = functools.partial(_map, self)
        self.options = functools.partial(CallWith, self._submit)
        self.try_submit = CallWith(self._submit, block=False)
        self.submit_async = CallWith(self._submit).submit_async

    def _call_slow(self, *args: Any, **kwargs: Any) -> TaskToken[Any]:
        # A call the base did not queue, every option at its default: the steps of _submit.
        if _IN_WORKER:
            raise NotStartedError(_in_worker_message(self._name))
        self._check_arity(args, kwargs)
        return _lane_now().submit_plain(self, args, kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)

    def __repr__(self) -> str:
        return f"<process-lane function {self._name} operation_type={self._op!r}>"

    def __reduce__(self) -> Any:
        # A reference to this wrapper inside a pickled function (recursion, a helper
        # calling another decorated function) arrives in a worker as a stub whose
        # call raises a clear error.
        return (_worker_stub, (self._fn, self._op))

    def _chunk_submitter(self) -> Callable[[list[tuple[Any, ...]]], TaskToken[list[Any]]] | None:
        """What ``fn.map(..., chunksize=n)`` sends its chunks through; None (one token a call)
        when the operation has a ``timeout`` (a chunk would share one deadline) or ``retries``
        (a retry would run the calls before the failing one again)."""
        if self._timeout is not None or self._retries:
            return None
        return self._submit_chunk

    def _submit_chunk(self, calls: list[tuple[Any, ...]]) -> TaskToken[list[Any]]:
        """One token that runs ``calls`` (argument tuples) one after another in a worker
        process, whose value is the list of their results: a chunk of
        ``fn.map(..., chunksize=n)``, as ``ProcessPoolExecutor.map`` sends them. Each call's
        arguments are checked here; a call that raises fails the chunk with its exception."""
        for args in calls:
            if TaskToken in map(type, args):
                raise TypeError(
                    f"{self._name}.map(chunksize=...): a chunk cannot take tokens as arguments "
                    "(they are waited for one call at a time); use chunksize=1"
                )
            self._check_arity(args, {})
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = _ChunkFunction(self.spec, self._fn)
            chunks._of = self
        return chunks(calls)

    def _payload_of(self) -> tuple[str, Any, Any]:
        payload = self._payload
        if payload is None:
            payload = self._payload = _function_payload(self)
            if not _IN_WORKER:
                self._enable_fast_calls()
        return payload

    def _check_arity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = len(args)
        if not kwargs and self._fast and n >= self._min_pos and (self._max_pos is None or n <= self._max_pos):
            return
        if self._binder is not None:
            self._binder(*args, **kwargs)

    def _submit(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        block: bool = True,
        admission_timeout: float | None = None,
        probe: bool = False,
    ) -> TaskToken[Any] | None:
        if _IN_WORKER:
            raise NotStartedError(_in_worker_message(self._name))
        self._check_arity(args, kwargs)
        return _lane_now().submit(self, args, kwargs, priority, timeout, retries, block, admission_timeout, probe)


class _ChunkFunction(ProcessFunction):
    """The tokens of a chunked map of ``pf`` (see :meth:`ProcessFunction._submit_chunk`): the
    same operation, called with one list of argument tuples; a worker loads ``pf``'s
    function and runs the calls in turn (:func:`.child._run_chunk`)."""

    #: The function whose map this is (set by ``_submit_chunk``).
    _of: ProcessFunction

    def _check_arity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pass  # one list of calls, each checked by _submit_chunk

    def _payload_of(self) -> tuple[str, Any, Any]:
        payload = self._payload
        if payload is None:
            payload = self._payload = ("chunk", self._of._payload_of(), None)
        return payload


def _in_worker_message(name: str) -> str:
    return (
        f"{name}(): decorated calls cannot be made inside a process-lane worker (pid {os.getpid()}): "
        "no OperationsCoordinator runs in a worker process. Call the plain function instead "
        f"({name}.__wrapped__(...))."
    )


class _WorkerStub:
    """A process-lane function as it arrives inside a worker (by reference from a pickled
    function): calling it raises; ``__wrapped__`` is the plain function."""

    def __init__(self, fn: Any, op: str) -> None:
        self.__wrapped__ = fn
        self._op = op
        self._name = getattr(fn, "__qualname__", op)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotStartedError(_in_worker_message(self._name))

    def __reduce__(self) -> Any:
        return (_worker_stub, (self.__wrapped__, self._op))


def _worker_stub(fn: Any, op: str) -> _WorkerStub:
    return _WorkerStub(fn, op)


def process_wrapper(spec: Any, fn: Any) -> ProcessFunction:
    """The decorator's hook: the wrapper of a ``process_pool: True`` function."""
    return ProcessFunction(spec, fn)


# -- finding the lane -----------------------------------------------------------------


#: (coordinator starts seen, weak reference to the newest running coordinator, its engine's pool id)
_newest: tuple[int, Any, int] = (-1, None, -1)


_books: tuple[Any, Any] | None = None


def _coordinator_books() -> tuple[Any, Any]:
    """The coordinator module's running coordinators and start count (imported once:
    that module imports this one)."""
    global _books
    if _books is None:
        from .._coordinator import _live, _starts

        _books = (_live, _starts)
    return _books


def _current_coordinator() -> Any:
    """The newest running coordinator that takes decorated calls (highest pool id).

    Cached until another coordinator starts or the cached one stops."""
    global _newest
    _live, _starts = _coordinator_books()
    starts, ref, pool_id = _newest
    if starts == _starts[0] and ref is not None:
        c = ref()
        engine = c._engine if c is not None else None
        if engine is not None and engine.pool_id == pool_id and engine.running and c.register_global:
            return c
    starts = _starts[0]
    best = None
    best_id = -1
    for c in list(_live.values()):
        engine = c._engine
        if engine is not None and c.register_global and engine.running:
            pool_id = engine.pool_id
            if pool_id > best_id:
                best, best_id = c, pool_id
    _newest = (starts, None, -1) if best is None else (starts, weakref.ref(best), best_id)
    return best


def _lane_now() -> ProcessLane:
    """The process lane of the newest running coordinator (made on first use)."""
    coordinator = _current_coordinator()
    if coordinator is None:
        raise NotStartedError(
            "no OperationsCoordinator is running: start one (coordinator.start(), "
            "`with OperationsCoordinator():` or `async with OperationsCoordinator():`) "
            "before calling a @task_token_guard function"
        )
    return lane_for(coordinator)


_lane_lock = threading.Lock()


def lane_for(coordinator: Any) -> ProcessLane:
    """The coordinator's process lane, made on first use."""
    lane = coordinator._process_lane
    engine = coordinator._engine
    if lane is not None and lane.engine is engine:
        return cast(ProcessLane, lane)
    # Not coordinator._lock: stop() holds it while it waits for running tasks,
    # and a task may be the one making the first process call.
    with _lane_lock:
        engine = coordinator._engine
        if engine is None or not engine.running:
            raise ShutdownError("cannot schedule new futures after shutdown")
        lane = coordinator._process_lane
        if lane is None or lane.engine is not engine:
            workers = coordinator.process_workers
            if workers is None:
                from .._coordinator import _logical_cores

                workers = _logical_cores()
            lane = ProcessLane(
                engine,
                workers,
                coordinator=coordinator,
                prefetch=coordinator.process_prefetch,
                max_tasks_per_child=coordinator.process_max_tasks_per_child,
                max_rss=coordinator.process_max_rss,
            )
            coordinator._process_lane = lane
            register_process_lane(lane.outside)  # plain calls reach it with no Python frame
    if not engine.running:
        # stop() began meanwhile and may have missed this lane: shut it down here.
        lane.shutdown(wait=True, timeout=5.0)
        raise ShutdownError("cannot schedule new futures after shutdown")
    return cast(ProcessLane, lane)
