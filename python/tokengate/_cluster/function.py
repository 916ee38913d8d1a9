"""The decorated function of a ``cluster: True`` operation, and what a cluster worker runs.

``ClusterFunction`` has the thread wrapper's attributes (``map``, ``options``,
``try_submit``, ``submit_async``, ...). A call checks, in the caller's thread,
that the function and the arguments can be pickled (an
:class:`~tokengate._process.UnpicklableError` naming the operation and the
argument is raised there), then queues a token on the coordinator's cluster
lane. The worker receives a :class:`RemoteCall`: the function by reference
when it is importable by name (the worker imports it and calls the
undecorated function), else by value; it loads it once per worker process.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, cast

from .._process.payload import _dump_args, _function_payload
from .._process.submission import submit_outside
from .._process.wrapper import ProcessFunction, _current_coordinator
from .._tokengate import TaskToken
from ..exceptions import NotStartedError, ShutdownError
from .connect import is_ray

if TYPE_CHECKING:
    from .lane import ClusterLane

#: Functions loaded on this (worker) process, by payload.
_LOADED: dict[Any, Any] = {}


class RemoteCall:
    """What a cluster worker calls: ``RemoteCall(payload)(args, kwargs)``."""

    __slots__ = ("payload",)

    def __init__(self, payload: tuple[str, Any, Any]) -> None:
        self.payload = payload

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.function()(*args, **kwargs)

    def function(self) -> Any:
        """The function, loaded once per worker process."""
        fn = _LOADED.get(self.payload)
        if fn is None:
            from .._process.child import _load_function

            fn = _LOADED[self.payload] = _load_function(self.payload)
        return fn

    def __reduce__(self) -> Any:
        return (RemoteCall, (self.payload,))

    def __repr__(self) -> str:
        kind, a, b = self.payload
        return f"<tokengate remote call {a}.{b}>" if kind == "ref" else "<tokengate remote call (by value)>"


def run_batch(calls: list[tuple[RemoteCall, tuple[Any, ...], dict[str, Any]]], where: str) -> tuple[list[bytes], float]:
    """What a cluster worker runs for a batch of short calls, one after another: each
    call's reply (a value or an exception with its traceback, encoded as the process
    lane's; see :func:`tokengate._process.replies.decode_reply`), and the mean seconds of
    a call that ran. ``where`` names the worker in the note a decorated call made there gets."""
    from .._process.child import _call_reply, _reply_error

    replies: list[bytes] = []
    took = 0.0  # the calls' own time: loading a function the first time is not the function's
    ran = 0
    for seq, (call, args, kwargs) in enumerate(calls):
        try:
            fn = call.function()
        except BaseException as exc:
            replies.append(_reply_error(seq, exc))
            continue
        began = time.perf_counter()
        replies.append(_call_reply(seq, fn, args, kwargs, where))
        took += time.perf_counter() - began
        ran += 1
    return replies, took / max(1, ran)


class ClusterFunction(ProcessFunction):
    """What ``@task_token_guard(tags={"cluster": True})`` returns: calling it returns a
    token whose body runs on the coordinator's cluster."""

    _remote: RemoteCall | None = None

    def _chunk_submitter(self) -> None:
        """No chunks: ``fn.map(chunksize=n)`` sends one token a call to a cluster."""
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> TaskToken[Any]:
        # ProcessFunction.__call__ goes straight to the process lane, past _submit: a cluster
        # call takes _submit, which finds the cluster lane. block=True: a token, or it raises.
        return cast("TaskToken[Any]", self._submit(args, kwargs))

    def __repr__(self) -> str:
        return f"<cluster function {self._name} operation_type={self._op!r}>"

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
        self._check_arity(args, kwargs)
        coordinator = _current_coordinator()
        if coordinator is None:
            raise NotStartedError(
                "no OperationsCoordinator is running: start one with cluster=... "
                "(for example OperationsCoordinator(cluster='dask-local')) before calling a cluster function"
            )
        remote = self._remote
        if remote is None:
            remote = self._remote = RemoteCall(_function_payload(self, "the cluster"))
        has_tokens = TaskToken in map(type, args) or TaskToken in map(type, kwargs.values())
        # Raises UnpicklableError here, at the call (tokens among the arguments are sent as their values later).
        if has_tokens:
            _dump_args(
                self._op,
                tuple(None if type(a) is TaskToken else a for a in args),
                {k: (None if type(v) is TaskToken else v) for k, v in kwargs.items()},
                "the cluster",
            )
        else:
            _dump_args(self._op, args, kwargs, "the cluster")
        lane = lane_for(coordinator, self._op)
        links: list[int] = []
        if has_tokens:
            args, kwargs, links = lane.link_inputs(args, kwargs)
        try:
            token = submit_outside(
                self.spec,
                lane.outside,
                args,
                kwargs,
                remote,
                priority,
                timeout,
                retries,
                block,
                admission_timeout,
                probe,
            )
        except BaseException:
            lane.release(links)
            raise
        if token is None:
            lane.release(links)
            return None
        if links:
            lane.linked(token, links)
        return token


def cluster_wrapper(spec: Any, fn: Any) -> ClusterFunction:
    """The decorator's hook: the wrapper of a ``cluster: True`` function."""
    return ClusterFunction(spec, fn)


_lane_lock = threading.Lock()


def _lane_class(cluster: Any) -> type[ClusterLane]:
    if is_ray(cluster):
        from .ray_lane import RayLane

        return RayLane
    from .dask_lane import DaskLane

    return DaskLane


def lane_for(coordinator: Any, op: str) -> ClusterLane:
    """The coordinator's cluster lane, connected on first use."""
    lane = coordinator._cluster_lane
    engine = coordinator._engine
    if lane is not None and lane.engine is engine:
        return cast("ClusterLane", lane)
    if coordinator.cluster is None:
        raise ValueError(
            f"{op}: this operation is tagged cluster: True, but the running coordinator has no cluster "
            "(pass OperationsCoordinator(cluster=...): 'dask-local', 'dask://HOST:PORT', a distributed.Client, 'ray-local', 'ray://HOST:PORT' or 'ray')"
        )
    with _lane_lock:  # not coordinator._lock: stop() holds it while it waits for tasks
        engine = coordinator._engine
        if engine is None or not engine.running:
            raise ShutdownError("cannot schedule new futures after shutdown")
        lane = coordinator._cluster_lane
        if lane is None or lane.engine is not engine:
            lane = _lane_class(coordinator.cluster)(engine, coordinator.cluster)
            coordinator._cluster_lane = lane
    if not engine.running:
        lane.shutdown(wait=True, timeout=5.0)
        raise ShutdownError("cannot schedule new futures after shutdown")
    return cast("ClusterLane", lane)
