"""``OperationsCoordinator``: starts and stops the worker pool that runs tokens."""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from types import TracebackType
from typing import Any

from . import _tokengate

__all__ = ["OperationsCoordinator"]

_live: weakref.WeakSet[OperationsCoordinator] = weakref.WeakSet()


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value}")
    return value


class OperationsCoordinator:
    """Owns the worker pool. While it runs, calls of ``@task_token_guard``
    functions return tokens that its workers execute.

    ``workers_per_core`` (default 4, as in Py-TokenGate) times the number of
    logical cores this process may use gives the worker count; ``max_workers``
    sets it directly instead. Worker ``i`` is pinned to core ``i mod n``
    unless ``pin_workers=False``.

    ``start()`` and ``stop()`` are idempotent and a stopped coordinator can
    be started again. It is also a context manager (``with``) and an async
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
        enable_convergence: bool = True,
        auto_block_dangerous: bool = False,
    ) -> None:
        self.workers_per_core: int = _positive_int("workers_per_core", workers_per_core)  # type: ignore[assignment]
        self.max_workers = _positive_int("max_workers", max_workers, allow_none=True)
        if not isinstance(pin_workers, bool):
            raise TypeError(f"pin_workers must be a bool, not {type(pin_workers).__name__}")
        if not isinstance(thread_name_prefix, str) or not thread_name_prefix:
            raise TypeError("thread_name_prefix must be a non-empty string")
        if stack_size is not None:
            _positive_int("stack_size", stack_size)
        self.pin_workers = pin_workers
        self.thread_name_prefix = thread_name_prefix
        self.stack_size = stack_size
        self.enable_convergence = bool(enable_convergence)
        self.auto_block_dangerous = bool(auto_block_dangerous)
        self._engine: _tokengate.Engine | None = None
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

    def start(self) -> OperationsCoordinator:
        """Starts the workers (no-op when running). Returns ``self``."""
        with self._lock:
            if self.is_running:
                return self
            stack = max(self.stack_size or 0, threading.stack_size())
            self._engine = _tokengate.Engine(
                self.total_workers,
                workers_per_core=self.workers_per_core,
                pin_cores=self.pin_workers,
                stack_size=stack,
                thread_name=self.thread_name_prefix,
            )
            _live.add(self)
            return self

    def stop(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> bool:
        """Stops the workers (no-op when stopped).

        ``wait``: block until every submitted token has resolved and the worker
        threads have exited. ``cancel_pending``: cancel tokens that have not
        started instead of running them. ``timeout``: stop waiting after this
        many seconds (tokens still queued are then cancelled; a running task
        cannot be interrupted and finishes on its own).

        Returns True when every worker thread exited.
        """
        with self._lock:
            engine = self._engine
            if engine is None:
                return True
            joined = engine.stop(wait=wait, cancel_pending=cancel_pending, timeout=timeout)
            if joined or not wait:
                self._engine = None
            return joined

    def __enter__(self) -> OperationsCoordinator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Ctrl-C: do not run what is still queued.
        self.stop(cancel_pending=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

    async def __aenter__(self) -> OperationsCoordinator:
        return self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        cancel = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, asyncio.CancelledError))
        # Stopping waits for the workers; do it off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.stop(cancel_pending=cancel))

    # -- monitoring ----------------------------------------------------------------

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
            return {"active": False, "topology": topology, "tokens": {}, "pool": {}}
        stats: dict[str, Any] = engine.stats()
        stats["active"] = True
        return stats

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<OperationsCoordinator {state} workers={self.total_workers}>"


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
