"""``OperationsCoordinator``: starts and stops the worker pool that runs tokens."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

from . import _tokengate
from ._pool_threads import PoolThread, ThreadBook
from ._tags import STORAGE_TIERS, check_seconds
from .exceptions import NotStartedError

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

__all__ = ["OperationsCoordinator"]

#: Every started coordinator, by id() (a subclass may define __eq__ and so be unhashable).
_live: weakref.WeakValueDictionary[int, OperationsCoordinator] = weakref.WeakValueDictionary()
#: Started coordinators that take decorated calls, by id(): a running service is
#: held here until stop() (or interpreter exit), whether or not the caller kept it.
_services: dict[int, OperationsCoordinator] = {}
#: How many times a coordinator started (lets the process lane cache the newest running one).
_starts = [0]


#: The most worker threads one pool may have.
MAX_WORKERS: int = _tokengate.MAX_WORKERS
#: The most tokens the process lane sends ahead to one worker process.
MAX_PREFETCH = 4096
#: Counts and sizes are 64-bit.
_MAX_COUNT = 2**63 - 1


@overload
def _positive_int(name: str, value: object, *, allow_none: Literal[False] = False, maximum: int = ...) -> int: ...
@overload
def _positive_int(name: str, value: object, *, allow_none: bool, maximum: int = ...) -> int | None: ...
def _positive_int(name: str, value: object, *, allow_none: bool = False, maximum: int = _MAX_COUNT) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be an int{none}, not {type(value).__name__}")
    if not 0 < value <= maximum:
        raise ValueError(f"{name} must be from 1 to {maximum}, got {value}")
    return value


class OperationsCoordinator:
    """Owns the worker pool. While it runs, calls of ``@task_token_guard``
    functions return tokens that its workers execute.

    ``workers_per_core`` (default 4, as in Py-TokenGate) times the number of
    logical cores this process may use gives the worker count; ``max_workers``
    sets it directly instead. Worker ``i`` is pinned to core ``i mod n``
    unless ``pin_workers=False``. ``process_workers`` (default: the logical
    cores) sizes the process lane that runs ``process_pool: True`` tokens;
    ``process_prefetch`` (default 64) is the most tokens it sends ahead to one
    worker process (it sends about 10 ms of work; 1: one at a time; see
    ``tokengate._process``). ``process_max_tasks_per_child`` (an int >= 1, or
    None: the default, never) retires a worker process once it has run that
    many tokens, as ProcessPoolExecutor's ``max_tasks_per_child`` does (it is
    never sent more than it has left); ``process_max_rss`` (bytes > 0, or None:
    the default, no ceiling) retires one whose resident set is above it when a
    token ends (that token still succeeds). A retiring process finishes what it
    was sent, then exits; a fresh one takes its slot, and no token fails
    because of it (``get_stats()['lanes']['process']['recycled']`` counts them).

    ``cluster`` (default None) is where ``cluster: True`` tokens run: a
    ``distributed.Client``, ``"dask://HOST:PORT"``, ``"dask-local"`` (a Dask
    ``LocalCluster`` in this process) or ``"dask-local:N"`` (N worker
    processes); or Ray: ``"ray-local"`` / ``"ray-local:N"`` (a local Ray
    started for the lane), ``"ray://HOST:PORT"`` or ``"ray"`` (the Ray this
    process connected to with ``ray.init()``). Connected on the first such
    token, closed by ``stop()`` (a client or connection passed in stays
    open). See ``tokengate._cluster``.

    ``caller_runs`` (default True): a thread other than the main thread that
    calls ``token.result()`` without a timeout on a token no worker has
    started yet runs the token itself, as a worker would (it takes the
    token's units on a core with room; the token's ``worker_id`` is None),
    instead of sleeping until a worker has run it. That saves two thread
    switches per token. Heavy, pinned and lead tokens, tokens with a
    deadline and threads running an asyncio loop always leave the body to
    the workers. ``kill()`` resolves such a token at once for every
    other waiter, but the caller running it returns when the body does;
    ``stop()`` waits for it as for any running body. See the README's
    "Caller runs". ``caller_runs=False`` keeps every body on the workers.

    ``blocking_aware`` (default True; Linux): core units bound the tokens
    that use a CPU, not those that wait. A running token that blocks (a
    lock, a queue, a barrier, a socket, a sleep; not a wait for the GIL)
    lends its units while it waits, so another worker starts queued work,
    and takes them back, even past the core's budget, when it runs again.
    So ``max_workers=N`` runs up to N blocking tokens at once, as
    ``ThreadPoolExecutor(N)`` does, and never more. Without ``max_workers``,
    spare threads start while tokens are blocked and work is queued, up to
    ``blocking_threads`` (default 256) beyond the workers, and retire after
    5 s without work. ``blocking_aware=False`` keeps units bound to running
    tokens whatever they do (and starts no spare thread).

    A started coordinator is a service: it runs until ``stop()`` or
    interpreter exit, whether or not the caller keeps a reference to it
    (one made with ``register_global=False``, as an ``Executor``'s is, stops
    when it is garbage-collected). ``start()`` and ``stop()`` are idempotent
    and a stopped coordinator can be started again. It is also a context manager (``with``) and an async
    context manager (``async with``). Several coordinators may run at once:
    decorated calls go to the most recently started one (calls made inside
    a task stay on the task's coordinator).
    """

    def __init__(
        self,
        workers_per_core: int = 4,
        max_workers: int | None = None,
        *,
        pin_workers: bool = True,
        thread_name_prefix: str = "tokengate-worker",
        stack_size: int | None = None,
        max_pending: int | None = None,
        operation_limits: Mapping[str, int] | None = None,
        history_size: int = 100,
        aging: float = 0.5,
        enable_convergence: bool = True,
        auto_block_dangerous: bool = False,
        register_global: bool = True,
        storage_limits: Mapping[str, int] | None = None,
        io_idle_timeout: float = 5.0,
        convergence_interval: float = 5.0,
        process_workers: int | None = None,
        process_prefetch: int = 64,
        process_max_tasks_per_child: int | None = None,
        process_max_rss: int | None = None,
        caller_runs: bool = True,
        blocking_aware: bool = True,
        blocking_threads: int = 256,
        cluster: Any = None,
    ) -> None:
        self.workers_per_core: int = _positive_int("workers_per_core", workers_per_core, maximum=MAX_WORKERS)
        self.max_workers = _positive_int("max_workers", max_workers, allow_none=True, maximum=MAX_WORKERS)
        if max_workers is None and self.total_workers > MAX_WORKERS:
            raise ValueError(
                f"workers_per_core={workers_per_core} gives {self.total_workers} workers on {_logical_cores()} cores, "
                f"more than {MAX_WORKERS}; pass max_workers instead"
            )
        if not isinstance(pin_workers, bool):
            raise TypeError(f"pin_workers must be a bool, not {type(pin_workers).__name__}")
        if not isinstance(thread_name_prefix, str) or not thread_name_prefix:
            raise TypeError("thread_name_prefix must be a non-empty string")
        if stack_size is not None:
            _positive_int("stack_size", stack_size, maximum=1 << 30)
        self.pin_workers = pin_workers
        self.thread_name_prefix = thread_name_prefix
        self.stack_size = stack_size
        self.max_pending = _positive_int("max_pending", max_pending, allow_none=True)
        if operation_limits is not None and not isinstance(operation_limits, Mapping):
            raise TypeError(
                f"operation_limits must be a mapping of operation name to limit, not {type(operation_limits).__name__}"
            )
        self.operation_limits: dict[str, int] = {}
        for op, limit in (operation_limits or {}).items():
            if not isinstance(op, str):
                raise TypeError(f"operation_limits keys must be operation names (str), not {op!r}")
            self.operation_limits[op] = _positive_int(f"operation_limits[{op!r}]", limit)
        if not isinstance(history_size, int) or isinstance(history_size, bool) or not 0 <= history_size <= _MAX_COUNT:
            raise ValueError(f"history_size must be an int from 0 to {_MAX_COUNT}, got {history_size!r}")
        self.history_size = history_size
        self.aging = check_seconds("aging", aging)
        self.enable_convergence = bool(enable_convergence)
        #: False: decorated calls never go to this coordinator (an Executor's private one).
        self.register_global = bool(register_global)
        if storage_limits is not None and not isinstance(storage_limits, Mapping):
            raise TypeError(f"storage_limits must be a mapping of tier to limit, not {type(storage_limits).__name__}")
        self.storage_limits: dict[str, int] = dict(STORAGE_TIERS)
        for tier, limit in (storage_limits or {}).items():
            key = tier.upper() if isinstance(tier, str) else tier
            if key not in STORAGE_TIERS:
                raise ValueError(f"unknown storage tier {tier!r}; valid tiers: {', '.join(STORAGE_TIERS)}")
            self.storage_limits[key] = _positive_int(f"storage_limits[{tier!r}]", limit)
        self.io_idle_timeout = check_seconds("io_idle_timeout", io_idle_timeout)
        self.convergence_interval = check_seconds("convergence_interval", convergence_interval)
        self.auto_block_dangerous = bool(auto_block_dangerous)
        if not isinstance(caller_runs, bool):
            raise TypeError(f"caller_runs must be a bool, not {type(caller_runs).__name__}")
        self.caller_runs = caller_runs
        if not isinstance(blocking_aware, bool):
            raise TypeError(f"blocking_aware must be a bool, not {type(blocking_aware).__name__}")
        self.blocking_aware = blocking_aware
        if (
            not isinstance(blocking_threads, int)
            or isinstance(blocking_threads, bool)
            or not 0 <= blocking_threads <= MAX_WORKERS
        ):
            raise ValueError(f"blocking_threads must be an int from 0 to {MAX_WORKERS}, got {blocking_threads!r}")
        self.blocking_threads = blocking_threads
        # -- process lane: worker processes of process_pool tokens (default: logical cores),
        # started on the first such token, shut down by stop().
        self.process_workers = _positive_int("process_workers", process_workers, allow_none=True, maximum=MAX_WORKERS)
        #: Tokens the lane sends ahead to one worker process (1: one at a time).
        self.process_prefetch: int = _positive_int("process_prefetch", process_prefetch, maximum=MAX_PREFETCH)
        #: Tokens after which a worker process is replaced (None: never).
        self.process_max_tasks_per_child = _positive_int(
            "process_max_tasks_per_child", process_max_tasks_per_child, allow_none=True
        )
        #: RSS (bytes) above which a worker process is replaced after a token (None: no ceiling).
        self.process_max_rss = _positive_int("process_max_rss", process_max_rss, allow_none=True)
        self._process_lane: Any = None
        # -- end of the process lane
        #: Where ``cluster: True`` tokens run (see tokengate._cluster.connect); connected on first use.
        from ._cluster import check_cluster

        self.cluster: Any = check_cluster(cluster)
        self._cluster_lane: Any = None
        self._engine: _tokengate.Engine | None = None
        #: The running threads of the engine (see ``_pool_threads``).
        self._thread_book = ThreadBook()
        self._last_engine: _tokengate.Engine | None = None
        self._servers: list[_tokengate.DashboardServer] = []
        self._lock = threading.RLock()

    # -- lifecycle -----------------------------------------------------------------

    @property
    def total_workers(self) -> int:
        """Number of CPU workers a start creates."""
        if self.max_workers is not None:
            return self.max_workers
        return _logical_cores() * self.workers_per_core

    @property
    def is_running(self) -> bool:
        engine = self._engine
        return engine is not None and engine.running

    def start(self) -> Self:
        """Starts the workers (no-op when running). Returns ``self``."""
        with self._lock:
            if self.is_running:
                return self
            stack = max(self.stack_size or 0, threading.stack_size())
            self._thread_book = ThreadBook()
            self._engine = _tokengate.Engine(
                self.total_workers,
                workers_per_core=self.workers_per_core,
                pin_cores=self.pin_workers,
                stack_size=stack,
                thread_name=self.thread_name_prefix,
                max_pending=self.max_pending or 0,
                history_size=self.history_size,
                auto_block=self.auto_block_dangerous,
                aging=self.aging,
                register=self.register_global,
                storage_limits=[self.storage_limits[t] for t in STORAGE_TIERS],
                io_idle_timeout=self.io_idle_timeout,
                convergence=self.enable_convergence,
                convergence_interval=self.convergence_interval,
                caller_runs=self.caller_runs,
                blocking_monitor=self.blocking_aware and (_GIL_WINDOW is not None or not _gil_enabled()),
                gil_window=_GIL_WINDOW,
                # With max_workers, the workers are all the threads there are (as in ThreadPoolExecutor).
                spare_threads=0 if self.max_workers is not None else self.blocking_threads,
                # threading sees each thread by its pool's name, joinable; the book lists them.
                python_thread=functools.partial(PoolThread, book=self._thread_book),
            )
            for op, limit in self.operation_limits.items():
                self._engine.set_operation_limit(op, limit)
            _live[id(self)] = self
            if self.register_global:
                _services[id(self)] = self
            _starts[0] += 1
            return self

    def stop(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> bool:
        """Stops the workers (no-op when stopped).

        ``wait``: block until every submitted token has resolved and the worker
        threads have exited. ``cancel_pending``: cancel tokens that have not
        started instead of running them. ``timeout``: stop waiting after this
        many seconds (tokens still queued are then cancelled; a running task
        cannot be interrupted and finishes on its own). With ``cancel_pending``,
        and once ``timeout`` has passed, running tokens are asked to stop: their
        ``cancel_requested`` flag is set, which a body can check
        (``tokengate.current_token().cancel_requested``).

        Returns True when every worker thread exited.
        """
        with self._lock:
            servers, self._servers = self._servers, []
        # Outside the lock: an admin action in flight may run a token's callback that takes it.
        for server in servers:
            try:
                server.stop()
            except Exception:  # a server that cannot stop must not keep the engine running
                logging.getLogger("tokengate").exception("stopping a dashboard server failed")
        with self._lock:
            _services.pop(id(self), None)
            engine = self._engine
            if engine is None:
                return True
            joined = engine.stop(wait=wait, cancel_pending=cancel_pending, timeout=timeout)
            # -- shut the process lane down (no worker process outlives stop()).
            lane, self._process_lane = self._process_lane, None
            if lane is not None:
                lane_done = lane.shutdown(wait=wait, cancel_pending=cancel_pending, timeout=timeout)
                joined = joined and (lane_done or not wait)
            # -- end of the process lane
            cluster_lane, self._cluster_lane = self._cluster_lane, None
            if cluster_lane is not None:
                lane_done = cluster_lane.shutdown(wait=wait, cancel_pending=cancel_pending, timeout=timeout)
                joined = joined and (lane_done or not wait)
            self._last_engine = engine  # history stays readable after stop
            if joined or not wait:
                self._engine = None
            return joined

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Ctrl-C: do not run what is still queued.
        self.stop(cancel_pending=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        cancel = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, asyncio.CancelledError))
        # Stopping waits for the workers; do it off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.stop(cancel_pending=cancel))

    # -- dashboard -----------------------------------------------------------------

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        admin: bool = False,
        url_prefix: str = "",
        token: str | None = None,
        auth: bool = True,
        allowed_hosts: Sequence[str] = (),
    ) -> _tokengate.DashboardServer:
        """Serves a live dashboard, Prometheus metrics and a JSON API for this coordinator.

        The server runs on a Rust thread, so it answers while Python threads hold the GIL. It binds
        ``host`` (127.0.0.1) on ``port`` (0: a free one). Every route but ``/healthz`` needs the
        token: ``Authorization: Bearer <token>``, or the one-time ``?token=`` in the returned
        handle's ``url``, which sets an HttpOnly, SameSite=Strict cookie. ``token``: your own (at
        least 16 letters, digits or ``._~-``; default: 32 random bytes). ``auth=False`` serves without a
        token, on a loopback address only. Admin actions (pause, resume, drain, kill) need
        ``admin=True``; they are POST only and refused from another origin. ``url_prefix``: the path
        it is served under behind a reverse proxy; ``allowed_hosts``: the names (``host[:port]``) the
        proxy sends in ``Host`` and browsers in ``Origin``, which a loopback bind otherwise refuses
        (DNS rebinding). Routes and schemas: README, "Dashboard".

        Returns the server's handle: ``url``, ``token``, ``port``, ``stop()`` (the port is free when
        it returns). :meth:`stop` stops it too.
        """
        if not isinstance(host, str):
            raise TypeError(f"host must be a str, got {type(host).__name__}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
        if not isinstance(url_prefix, str):
            raise TypeError(f"url_prefix must be a str, got {type(url_prefix).__name__}")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a str or None, got {type(token).__name__}")
        for name, flag in (("admin", admin), ("auth", auth)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if isinstance(allowed_hosts, str) or not all(isinstance(h, str) for h in allowed_hosts):
            raise TypeError("allowed_hosts must be a sequence of str")
        with self._lock:
            server = self._running_engine().serve(
                host,
                port,
                admin=admin,
                url_prefix=url_prefix,
                token=token,
                auth=auth,
                allowed_hosts=list(allowed_hosts),
            )
            self._servers = [s for s in self._servers if s.running] + [server]
            return server

    # -- control plane -------------------------------------------------------------

    def _running_engine(self) -> _tokengate.Engine:
        engine = self._engine
        if engine is None or not engine.running:
            raise NotStartedError("the coordinator is not running: call start() first")
        return engine

    def pause_admission(self) -> int:
        """No queued token starts, and new calls wait, until :meth:`resume_admission`.
        Running tokens finish. Returns how many unstarted tokens are held back."""
        return self._running_engine().pause_admission()

    def resume_admission(self) -> int:
        """Ends :meth:`pause_admission`. Returns how many held tokens were released."""
        return self._running_engine().resume_admission()

    def pause_operation(self, operation_type: str) -> int:
        """Tokens of ``operation_type`` wait (others flow) until :meth:`resume_operation`.
        Returns how many unstarted tokens of it are held back."""
        return self._running_engine().pause_operation(_op_name(operation_type))

    def resume_operation(self, operation_type: str) -> int:
        """Ends :meth:`pause_operation`. Returns how many held tokens were released."""
        return self._running_engine().resume_operation(_op_name(operation_type))

    def drain_pool(self) -> int:
        """Cancels every token that has not started. Returns how many."""
        return self._running_engine().drain_pool()

    def drain_operation(self, operation_type: str) -> int:
        """Cancels every unstarted token of ``operation_type``. Returns how many."""
        return self._running_engine().drain_operation(_op_name(operation_type))

    def kill_token(self, token_id: int, reason: str = "admin_override") -> int:
        """Kills one token (its waiters get ``TaskKilledError(reason)``). Returns 1, or 0 if it
        was already resolved or unknown."""
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise TypeError(f"token_id must be an int (a token's .id), not {type(token_id).__name__}")
        if not 0 <= token_id < 2**64:
            return 0  # no token has such an id
        return self._running_engine().kill_token(token_id, str(reason))

    def kill_all_by_operation(self, operation_type: str | None, reason: str = "admin_override") -> int:
        """Kills every unresolved token of ``operation_type`` (of every operation with None).
        Returns how many."""
        op = None if operation_type is None else _op_name(operation_type)
        return self._running_engine().kill_all_by_operation(op, str(reason))

    def set_max_pending(self, limit: int | None) -> None:
        """Changes the global limit on unresolved tokens (None: unlimited)."""
        self.max_pending = _positive_int("max_pending", limit, allow_none=True)
        if self._engine is not None:
            self._engine.set_max_pending(self.max_pending)

    def set_operation_limit(self, operation_type: str, limit: int | None) -> None:
        """Changes the limit on unresolved tokens of one operation (None: unlimited)."""
        op = _op_name(operation_type)
        value = _positive_int("limit", limit, allow_none=True)
        if value is None:
            self.operation_limits.pop(op, None)
        else:
            self.operation_limits[op] = value
        if self._engine is not None:
            self._engine.set_operation_limit(op, value)

    def set_storage_limit(self, tier: str, limit: int) -> None:
        """Changes how many tokens of a storage tier (SLOW, MODERATE, FAST, INSANE) run at once."""
        key = tier.upper() if isinstance(tier, str) else tier
        if key not in STORAGE_TIERS:
            raise ValueError(f"unknown storage tier {tier!r}; valid tiers: {', '.join(STORAGE_TIERS)}")
        self.storage_limits[key] = _positive_int("limit", limit)
        if self._engine is not None:
            self._engine.set_storage_limit(key, limit)

    def sticky_snapshot(self) -> dict[str, tuple[int, int]]:
        """Sticky keys in flight: key -> (worker, tokens in flight). Empty once they all resolved."""
        engine = self._engine
        return {} if engine is None else engine.sticky_snapshot()

    def domain_snapshot(self) -> dict[str, tuple[int | None, int]]:
        """Open lead domains: seed -> (core, tokens pending). Empty once leads and children resolved."""
        engine = self._engine
        return {} if engine is None else engine.domain_snapshot()

    def unblock_operation(self, operation_type: str) -> bool:
        """Accepts calls of an auto-blocked operation again (its health counts restart)."""
        return self._running_engine().unblock_operation(_op_name(operation_type))

    # -- monitoring ----------------------------------------------------------------

    def get_recent_executions(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` execution records (newest first) from a ring of ``history_size``."""
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")
        engine = self._engine or self._last_engine
        if engine is None:
            return []
        return engine.recent_executions(min(limit, 2**32))

    def dump_execution_history(self, filepath: str | os.PathLike[str] | None = None) -> str:
        """Writes the kept execution records to a JSON file
        (``{"timestamp", "total_executions", "executions"}``) and returns its path."""
        engine = self._engine or self._last_engine
        records = engine.execution_history() if engine is not None else []
        path = os.fspath(filepath) if filepath is not None else f"tokengate_history_{int(time.time())}.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"timestamp": time.time(), "total_executions": len(records), "executions": records}, f, indent=2)
        return path

    def get_guard_house_stats(self) -> dict[str, Any]:
        """Health per operation (the original's Guard House): attempts, successes, failures,
        timeouts, min/mean/max time and a health class."""
        return {op: d["health"] for op, d in self.get_stats().get("operations", {}).items()}

    def get_stats(self) -> dict[str, Any]:
        """Topology, token counts by state, and pool state (see the README for the schema)."""
        engine = self._engine
        if engine is None or not engine.running:
            topology = {
                "physical_cores": _physical_cores(),
                "logical_cores": _logical_cores(),
                "workers_per_core": self.workers_per_core,
                "total_workers": self.total_workers,
                "pinned_cores": [],
            }
            return {
                "active": False,
                "topology": topology,
                "tokens": {},
                "pool": {},
                "admission": {},
                "timeouts": {},
                "operations": {},
            }
        stats: dict[str, Any] = engine.stats()
        stats["active"] = True
        lane = self._process_lane
        if lane is not None and lane.engine is engine:
            stats.setdefault("lanes", {})["process"] = lane.stats()
        cluster_lane = self._cluster_lane
        if cluster_lane is not None and cluster_lane.engine is engine:
            stats.setdefault("lanes", {})[cluster_lane.name] = cluster_lane.stats()
        return stats

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<OperationsCoordinator {state} workers={self.total_workers}>"


def _op_name(operation_type: object) -> str:
    if isinstance(operation_type, str) and operation_type.strip():
        return operation_type
    name = getattr(operation_type, "operation_type", None)  # a decorated function
    if isinstance(name, str):
        return name
    raise TypeError(f"expected an operation name (str) or a decorated function, not {operation_type!r}")


def _gil_enabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def _gil_window() -> tuple[int, int] | None:
    """Addresses of the interpreter's runtime state (``_PyRuntime``), where the GIL's
    futexes live: a worker waiting on one waits for the GIL, not blocked (see
    ``src/engine/pool/blocking.rs``). None without a GIL, or when the symbol cannot be found
    (then the blocking monitor stays off on a GIL build)."""
    if not _gil_enabled():
        return None
    try:
        import ctypes

        base = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    except (ImportError, ValueError, AttributeError, OSError):  # pragma: no cover - not CPython on Linux
        return None
    # The runtime state is 0.17 MB (3.11) to 0.45 MB (3.12); the GIL's words lie in it.
    return base, base + (512 << 10)


_GIL_WINDOW = _gil_window()


def _logical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _physical_cores() -> int:
    seen = set()
    try:
        for cpu in os.sched_getaffinity(0):
            base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            with open(f"{base}/core_id") as a, open(f"{base}/physical_package_id") as b:
                seen.add((a.read().strip(), b.read().strip()))
    except (OSError, AttributeError):
        return _logical_cores()
    return len(seen) or _logical_cores()


# -- process-wide hooks -------------------------------------------------------------


def _at_exit() -> None:
    _tokengate.begin_interpreter_shutdown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_tokengate.after_fork_in_child)

# Runs in threading._shutdown, before non-daemon threads are joined and
# before atexit handlers: queued work still runs, later submits are refused.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)
else:  # pragma: no cover
    import atexit

    atexit.register(_at_exit)
