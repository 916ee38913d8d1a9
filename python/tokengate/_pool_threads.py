"""How ``threading`` sees the engine's threads: :class:`PoolThread`.

The engine starts its worker and I/O-lane threads in Rust, so ``threading``
did not start them. A thread ``threading`` did not start is a ``_DummyThread``
named ``Dummy-N``, which ``join()`` refuses, and which CPython before 3.13
keeps in its table for as long as the interpreter runs. A ``ThreadPoolExecutor``
thread is named after its pool, and joining it waits for it to end. So the
engine (``Engine(python_thread=PoolThread)``) calls ``PoolThread(name, kind)``
(``kind``: ``"worker"`` or ``"io"``) on each of its threads once the thread
attaches to the interpreter, and ``_tokengate_end()`` on that object, on the
same thread, as the thread ends.

A ``PoolThread`` is listed by ``threading.enumerate()`` and is
``threading.current_thread()`` on its thread (so logging's ``%(threadName)s``
names the pool's thread); ``join()`` waits until the thread ended (polling,
from 0.5 ms up to 50 ms between looks: the thread has no lock of
``threading``'s to wait on), and ``is_alive()`` is true until then. In a
forked child the thread does not exist: it reads as ended there.

A :class:`ThreadBook` given to ``PoolThread`` lists the engine's threads
that are running (``Executor._threads`` reads it, as code written for
``ThreadPoolExecutor`` may).
"""

from __future__ import annotations

import os
import threading
import time


class ThreadBook:
    """The running threads of one engine (each :class:`PoolThread` enters and leaves it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[PoolThread] = set()

    def threads(self) -> set[threading.Thread]:
        """A copy of the set of running threads."""
        with self._lock:
            return set(self._threads)

    def _enter(self, thread: PoolThread) -> None:
        with self._lock:
            self._threads.add(thread)

    def _leave(self, thread: PoolThread) -> None:
        with self._lock:
            self._threads.discard(thread)


class PoolThread(threading._DummyThread):
    """One of the engine's threads as ``threading`` sees it (see the module docs)."""

    def __init__(self, name: str, kind: str = "worker", book: ThreadBook | None = None) -> None:
        super().__init__()  # enters this thread in threading's table
        if name:
            self.name = name
        self._daemonic = False  # as a ThreadPoolExecutor thread (nothing joins it at exit: the engine stops it)
        self._tokengate_pid = os.getpid()
        self._tokengate_ended = False
        # The book lists pool workers (what Executor._threads shows), not the I/O lane's threads.
        self._tokengate_book = book if kind == "worker" else None
        if self._tokengate_book is not None:
            self._tokengate_book._enter(self)

    def _tokengate_running(self) -> bool:
        if self._tokengate_pid != os.getpid():
            # A forked child: the thread that forked lives on there as its only thread.
            return self is threading.current_thread()
        return not self._tokengate_ended

    def is_alive(self) -> bool:
        return self._tokengate_running()

    def join(self, timeout: float | None = None) -> None:
        if self is threading.current_thread():
            raise RuntimeError("cannot join current thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0005
        while self._tokengate_running():
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _tokengate_end(self) -> None:
        """Called by the engine, on this thread, as it ends: the thread leaves
        ``threading``'s table (if this object is still its entry)."""
        self._tokengate_ended = True
        if hasattr(self, "_is_stopped"):  # CPython before 3.13: repr() then reads "stopped"
            self._is_stopped = True
        if self._tokengate_book is not None:
            self._tokengate_book._leave(self)
        with threading._active_limbo_lock:  # type: ignore[attr-defined]
            if threading._active.get(self.ident) is self:  # type: ignore[attr-defined]
                del threading._active[self.ident]  # type: ignore[attr-defined]
