"""Hooks that run at interpreter exit while threads may still be joined.

``threading._register_atexit`` hooks run when the main thread ends, before
``atexit`` handlers, last-registered first; ``concurrent.futures`` registers
its own there too (it shuts its executors down). A lane that needs its
threads, or a library's executors, at exit registers through
:func:`at_threads_exit` once, when it is first made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_registered: set[Callable[[], None]] = set()


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
