"""``OperationsCoordinator(cluster=...)``: what it accepts, and connecting to it.

Dask:

* a ``distributed.Client`` (used as it is; tokengate never closes it);
* ``"dask://HOST:PORT"``: a running Dask scheduler (a client of tokengate's own, closed at stop);
* ``"dask-local"``: a ``LocalCluster`` in this process (threads, no worker processes);
* ``"dask-local:N"``: a ``LocalCluster`` with N worker processes of one thread each.

Ray (one connection per process, as ``ray.init`` allows):

* ``"ray"``: the Ray this process connected to with ``ray.init()`` (left connected at stop);
* ``"ray://HOST:PORT"``: a running Ray cluster's client server (connected, and disconnected at stop);
* ``"ray-local"`` or ``"ray-local:N"``: a local Ray with all cores or N CPUs, on
  loopback, without its dashboard or usage reports, started and stopped with the lane.

Local clusters listen on loopback only and have no dashboard. Their scheduler
fails a task at once when the worker running it is lost
(``distributed.scheduler.allowed-failures = 0``), so the engine's ``retries``
decide whether it runs again; a cluster given by the user keeps its own setting.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import time
from typing import Any

_LOCAL = re.compile(r"dask-local(?::(\d+))?$")
_REMOTE = re.compile(r"dask://([^:/\s]+):(\d+)$")
_RAY_LOCAL = re.compile(r"ray-local(?::(\d+))?$")
_RAY_REMOTE = re.compile(r"ray://[^:/\s]+:\d+$")


def _is_client(value: Any) -> bool:
    return type(value).__name__ == "Client" and type(value).__module__.startswith("distributed")


def check_cluster(value: Any) -> Any:
    """``cluster=`` checked at construction: None, a Client, or one of the strings above."""
    if value is None or _is_client(value):
        return value
    if isinstance(value, str):
        m = _LOCAL.match(value)
        if m is not None:
            if m.group(1) is not None and not 1 <= int(m.group(1)) <= 256:
                raise ValueError(f"cluster={value!r}: the number of worker processes must be 1 to 256")
            return value
        if _REMOTE.match(value) or value == "ray" or _RAY_REMOTE.match(value):
            return value
        m = _RAY_LOCAL.match(value)
        if m is not None:
            if m.group(1) is not None and not 1 <= int(m.group(1)) <= 4096:
                raise ValueError(f"cluster={value!r}: the number of CPUs must be 1 to 4096")
            return value
    raise ValueError(
        "cluster must be a distributed.Client, 'dask://HOST:PORT', 'dask-local', 'dask-local:N', "
        f"'ray', 'ray://HOST:PORT', 'ray-local' or 'ray-local:N', got {value!r}"
    )


def is_ray(value: Any) -> bool:
    """Whether a checked ``cluster=`` value names Ray."""
    return isinstance(value, str) and (value == "ray" or value.startswith(("ray://", "ray-local")))


def ray_module() -> Any:
    """``ray``, imported by name (an optional dependency, untyped)."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("the Ray lane needs Ray: pip install 'tokengate[ray]'") from exc


class RayConnection:
    """This process's connection to Ray, as the lanes that use it see it.

    ``owned``: tokengate made it (``ray-local``, ``ray://``) and closes it when its last
    lane lets go; otherwise it is the user's (``ray.init()``) and stays. ``users`` counts the
    lanes on it, changed under ``_ray_lock`` only. ``closed`` is set once it is let go (and,
    for an owned one, ``ray.shutdown()`` has returned)."""

    __slots__ = ("closed", "owned", "users")

    def __init__(self, owned: bool) -> None:
        self.owned = owned
        self.users = 1
        self.closed = threading.Event()


#: The connection tokengate made and has not closed yet (Ray allows one per process). While
#: it is set, a ``"ray"`` lane joins it; ``ray-local`` and ``ray://`` are refused, or wait
#: while its last lane is closing it.
_ray_owner: RayConnection | None = None
_ray_lock = threading.Lock()

#: How long a new connection waits for the last one to finish closing (seconds).
_RAY_HANDOVER = 30.0


def connect_ray(value: str) -> RayConnection:
    """Connects this process to the Ray that ``value`` names, or joins the connection it has.
    Hand the result to :func:`disconnect_ray` exactly once, when the lane stops."""
    global _ray_owner
    ray = ray_module()
    deadline = time.monotonic() + _RAY_HANDOVER
    while True:
        with _ray_lock:
            owner = _ray_owner
            if owner is not None and owner.users > 0:  # open and in use
                if value == "ray":
                    owner.users += 1
                    return owner
                raise ValueError(
                    f"cluster={value!r}: this process is connected to Ray already, by a running "
                    "coordinator (Ray allows one connection per process); pass cluster='ray' to share it"
                )
            if owner is None:
                if value == "ray":
                    if not ray.is_initialized():
                        raise ValueError(
                            "cluster='ray' uses the Ray this process connected to, but ray.init() has not "
                            "run: call ray.init(...) first, or pass 'ray-local' or 'ray://HOST:PORT'"
                        )
                    return RayConnection(False)
                if ray.is_initialized():
                    raise ValueError(
                        f"cluster={value!r}: this process is connected to Ray already (ray.init() ran, and "
                        "Ray allows one connection per process); pass cluster='ray' to use that connection"
                    )
                connection = _ray_owner = RayConnection(True)
                break
        # The last lane on it is closing it: wait, then look again.
        if not owner.closed.wait(max(0.0, deadline - time.monotonic())):
            raise ValueError(
                f"cluster={value!r}: the previous Ray connection did not close within {_RAY_HANDOVER:.0f} s"
            )
    try:
        m = _RAY_LOCAL.match(value)
        if m is None:
            _connect_ray_client(ray, value)
        else:
            # A Ray started for the lane reports nothing home unless the user asked it to.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                address="local",  # a new local Ray, never one that ``ray start`` left running
                num_cpus=None if m.group(1) is None else int(m.group(1)),
                include_dashboard=False,
                configure_logging=False,
                _node_ip_address="127.0.0.1",
            )
    except BaseException:
        disconnect_ray(connection)
        raise
    return connection


def _connect_ray_client(ray: Any, address: str) -> None:
    """``ray.init(address)`` for a ``ray://`` address, tried up to 3 times when the cluster's
    client server fails to start the server of this connection (Ray's proxy can trip over
    a server process that exited meanwhile: ``ConnectionAbortedError``)."""
    for attempt in range(3):
        try:
            ray.init(address=address, configure_logging=False)
            return
        except ConnectionAbortedError:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


def disconnect_ray(connection: RayConnection) -> None:
    """One lane lets go of ``connection``; the last one closes it if tokengate made it.
    Never raises."""
    global _ray_owner
    with _ray_lock:
        if connection.users <= 0:  # let go already
            return
        connection.users -= 1
        if connection.users > 0:
            return
    if connection.owned:
        try:
            ray_module().shutdown()
        except Exception:
            pass
    with _ray_lock:
        if _ray_owner is connection:
            _ray_owner = None
    connection.closed.set()


def _modules() -> tuple[Any, Any]:
    """(dask, distributed), imported by name: an optional dependency, untyped, that the
    type gates need not have."""
    try:
        return importlib.import_module("dask"), importlib.import_module("distributed")
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("cluster lanes need Dask: pip install 'tokengate[dask]'") from exc


def local_cluster(processes: int | None) -> Any:
    """A ``LocalCluster`` as ``"dask-local"`` (None: in this process, one thread per core)
    or ``"dask-local:N"`` (N processes of one thread) start it: loopback only, no
    dashboard, ``allowed-failures = 0``."""
    dask, distributed = _modules()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if processes is None:  # in-process: the scheduler talks over inproc://, no socket
            return distributed.LocalCluster(
                processes=False,
                n_workers=1,
                threads_per_worker=os.cpu_count() or 1,
                dashboard_address="127.0.0.1:0",
                scheduler_kwargs={"dashboard": False},
            )
        return distributed.LocalCluster(
            processes=True,
            n_workers=processes,
            threads_per_worker=1,
            dashboard_address="127.0.0.1:0",
            host="127.0.0.1",
            scheduler_kwargs={"dashboard": False},
        )


def connect(value: Any) -> tuple[Any, Any, bool]:
    """(client, cluster it started or None, whether tokengate owns the client)."""
    _, distributed = _modules()
    if _is_client(value):
        return value, None, False
    m = _LOCAL.match(value)
    if m is not None:
        cluster = local_cluster(None if m.group(1) is None else int(m.group(1)))
        try:
            return distributed.Client(cluster, set_as_default=False), cluster, True
        except BaseException:
            cluster.close()
            raise
    m = _REMOTE.match(value)
    assert m is not None  # checked at construction
    return distributed.Client(f"tcp://{m.group(1)}:{m.group(2)}", set_as_default=False), None, True
