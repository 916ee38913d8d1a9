"""Hooks that run at interpreter exit while threads may still be joined.

``threading._register_atexit`` hooks run when the main thread ends, before
``atexit`` handlers, last-registered first; ``concurrent.futures`` registers
its own there too (it shuts its executors down). A lane that needs its
threads, or a library's executors, at exit registers through
:func:`shutdown_at_exit` when it is made.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_registered: set[Callable[[], None]] = set()
#: Lanes (process and cluster) that are shut down at exit unless they were first.
_lanes: weakref.WeakSet[Any] = weakref.WeakSet()


def at_threads_exit(hook: Callable[[], None]) -> None:
    """Registers ``hook`` to run at interpreter exit (once, however often called)."""
    with _lock:
        if hook in _registered:
            return
        _registered.add(hook)
        register = getattr(threading, "_register_atexit", None)
        try:
            if register is not None:
                register(hook)
            else:  # pragma: no cover - Python without it
                import atexit

                atexit.register(hook)
        except RuntimeError:  # the interpreter is already shutting down
            pass


def _shutdown_lanes() -> None:
    for lane in list(_lanes):
        try:
            lane.shutdown(wait=True, timeout=10.0)
        except Exception:  # pragma: no cover
            pass


def shutdown_at_exit(lane: Any) -> None:
    """Shuts ``lane`` down at interpreter exit: its queued tokens get 10 s to run.
    Registered when the first lane is made, after ``concurrent.futures``' own hook,
    so it runs first, while the engines still run and library executors still accept
    work (the Dask client's done callbacks run on one)."""
    _lanes.add(lane)
    at_threads_exit(_shutdown_lanes)
