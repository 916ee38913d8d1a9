"""``tokengate.ClusterExecutor``: a :mod:`concurrent.futures` executor whose calls run on a cluster.

>>> from tokengate import ClusterExecutor
>>> with ClusterExecutor("dask-local") as ex:  # doctest: +SKIP
...     ex.submit(pow, 2, 8).result(timeout=30)
256

Each ``submit`` queues one token on a private coordinator's cluster lane (or
on ``coordinator=``'s): the engine's queue, admission and pauses apply, and
the cluster runs the call. ``submit`` returns a real
:class:`concurrent.futures.Future` (``wait``, ``as_completed``,
``asyncio.wrap_future`` work), settled by a thread callback of the token.

As in :class:`concurrent.futures.ProcessPoolExecutor`, a call counts as
running once the lane sent it to the cluster (``Future.running()`` is then
True): ``cancel()`` stops a call only while it waits in the engine's queue.
``shutdown(cancel_futures=True)`` cancels those; the ones the lane sent run.
A function or argument that cannot be pickled fails that future with
``UnpicklableError`` (as ProcessPoolExecutor fails it with a pickling error).
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections.abc import Callable
from concurrent import futures as _cf
from concurrent.futures import _base
from typing import Any

from .. import _tokengate
from .._coordinator import OperationsCoordinator
from .._process.payload import UnpicklableError, _dump_args, function_payload
from .function import RemoteCall, lane_for

__all__ = ["ClusterExecutor"]

_OP = "cluster_executor"


def _placeholder(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
    """The OperationSpec's nominal function; each call passes its own."""


#: Every call of a cluster executor is a token of this operation.
_SPEC = _tokengate.OperationSpec(_placeholder, _OP, types.MappingProxyType({}), 0, None, True, None)

#: RemoteCall of each function submitted so far (functions that take weak references).
_REMOTE: weakref.WeakKeyDictionary[Any, RemoteCall] = weakref.WeakKeyDictionary()


def _remote_call(fn: Callable[..., Any]) -> RemoteCall:
    try:
        remote = _REMOTE.get(fn)
    except TypeError:  # not weak-referenceable (a builtin, say)
        return RemoteCall(function_payload(fn, _OP, "the cluster"))
    if remote is None:
        remote = _REMOTE[fn] = RemoteCall(function_payload(fn, _OP, "the cluster"))
    return remote


class _ClusterFuture(_cf.Future[Any]):
    """A Future tied to a cluster token: ``cancel()`` cancels the token while it is queued."""

    _token: Any = None

    def cancel(self) -> bool:
        token = self._token
        if token is not None and not token.done() and not token.cancel():
            return False  # the lane sent it: it runs
        return _cf.Future.cancel(self)

    def running(self) -> bool:
        token = self._token
        if token is not None and self._state == _base.PENDING:
            return bool(token.state == "executing")
        return super().running()

    def _settle(self, token: Any) -> None:
        """Thread callback of the token (on the thread that resolved it)."""
        if token.state == "cancelled":
            _cf.Future.cancel(self)
            with self._condition:
                if self._state == _base.CANCELLED:
                    self.set_running_or_notify_cancel()
            return
        with self._condition:
            if self._state != _base.PENDING:
                return
            self.set_running_or_notify_cancel()
        try:
            value = token.result(0)
        except BaseException as exc:
            self.set_exception(exc)
        else:
            self.set_result(value)


class ClusterExecutor(_cf.Executor):
    """Runs calls on a cluster through tokengate's cluster lane (see the module docs).

    ``cluster``: a ``distributed.Client``, ``"dask://HOST:PORT"``, ``"dask-local"``,
    ``"dask-local:N"``, ``"ray"``, ``"ray://HOST:PORT"``, ``"ray-local"`` or
    ``"ray-local:N"`` (see ``OperationsCoordinator(cluster=...)``). With
    ``coordinator=`` (a running coordinator that has a cluster) the calls go to
    its cluster lane and ``shutdown()`` leaves it running."""

    def __init__(self, cluster: Any = "dask-local", *, coordinator: OperationsCoordinator | None = None) -> None:
        self._owned = coordinator is None
        if coordinator is None:
            coordinator = OperationsCoordinator(max_workers=1, cluster=cluster, register_global=False).start()
        self._coordinator = coordinator
        try:
            self._lane = lane_for(coordinator, _OP)
        except BaseException:
            if self._owned:
                coordinator.stop()
            raise
        self._lock = threading.Lock()
        self._pending: dict[_ClusterFuture, None] = {}
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _cf.Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        future = _ClusterFuture()
        try:
            remote = _remote_call(fn)
            if not any(type(a) is _tokengate.TaskToken for a in (*args, *kwargs.values())):
                _dump_args(_OP, args, kwargs, "the cluster")
        except UnpicklableError as exc:
            future.set_running_or_notify_cancel()
            future.set_exception(exc)
            return future
        token = _SPEC.submit_to(self._lane.outside, args, kwargs, func=remote)
        assert token is not None  # a blocking submit returns a token or raises
        future._token = token
        with self._lock:
            self._pending[future] = None
        token._add_thread_callback(functools.partial(self._done, future))
        return future

    def _done(self, future: _ClusterFuture, token: Any) -> None:
        future._settle(token)
        with self._lock:
            self._pending.pop(future, None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            _cf.wait(pending)
        if self._owned:
            self._coordinator.stop(wait=wait)
