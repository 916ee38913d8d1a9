"""Helpers shared by the test modules: polling, process counters, coordinator set-up.

Plain functions and classes only; the fixtures built on them live in conftest.py or in
the test module that uses them. Test modules import them with ``from support import ...``
(the tests folder is on ``sys.path``, as for conftest.py).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tokengate import OperationsCoordinator, TaskToken


def wait_until(pred: Callable[[], Any], limit: float = 10.0, interval: float = 0.005) -> bool:
    """Polls ``pred`` every ``interval`` seconds until it is true or ``limit`` seconds passed;
    returns its last value as a bool."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


# -- process counters -------------------------------------------------------------------------


def os_thread_count() -> int:
    """Threads of this process according to the kernel (Python and Rust threads alike)."""
    return len(os.listdir("/proc/self/task"))


def wait_for_threads(baseline: int, limit: float = 2.0) -> int:
    """Waits (collecting garbage) up to ``limit`` seconds for the OS thread count to fall to
    ``baseline``; returns the last count."""
    deadline = time.monotonic() + limit
    n = os_thread_count()
    while n > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
        n = os_thread_count()
    return n


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


# -- coordinators and blocked workers -----------------------------------------------------------


@contextmanager
def running_coordinator(**kw: Any) -> Iterator[OperationsCoordinator]:
    """A started ``OperationsCoordinator(**kw)``, stopped (pending tokens cancelled) on exit."""
    c = OperationsCoordinator(**kw).start()
    try:
        yield c
    finally:
        c.stop(cancel_pending=True, timeout=10)


def start_blocker(
    task: Callable[[threading.Event], TaskToken[str]],
    ev: threading.Event,
    *,
    limit: float = 10.0,
    interval: float = 0.005,
) -> TaskToken[str]:
    """Submits ``task(ev)`` (a task that holds its worker until ``ev`` is set); returns its
    token once it runs."""
    tok = task(ev)
    assert wait_until(tok.running, limit, interval), f"blocker never started: {tok.state}"
    return tok


class Env:
    """Coordinators, gates and helper threads of one test; ``close()`` (or leaving the
    ``with`` block) opens every gate, joins the threads, then stops every coordinator.

    ``max_workers`` is the default for :meth:`coord`; ``blocker`` is the task
    :meth:`hold_worker` submits (``blocker(ev)`` must wait on ``ev``).
    """

    def __init__(
        self,
        max_workers: int = 2,
        blocker: Callable[[threading.Event], TaskToken[str]] | None = None,
    ) -> None:
        self.max_workers = max_workers
        self.blocker = blocker
        self.coords: list[OperationsCoordinator] = []
        self.gates: list[threading.Event] = []
        self.threads: list[threading.Thread] = []

    def coord(self, **kw: Any) -> OperationsCoordinator:
        kw.setdefault("max_workers", self.max_workers)
        c = OperationsCoordinator(**kw).start()
        self.coords.append(c)
        return c

    def gate(self) -> threading.Event:
        ev = threading.Event()
        self.gates.append(ev)
        return ev

    def thread(self, target: Callable[[], None]) -> threading.Thread:
        th = threading.Thread(target=target, daemon=True)
        self.threads.append(th)
        th.start()
        return th

    def hold_worker(self) -> tuple[threading.Event, TaskToken[str]]:
        """Holds a worker with ``blocker`` on a new gate; returns the gate and the blocker's token."""
        assert self.blocker is not None, "Env(blocker=...) is needed for hold_worker()"
        ev = self.gate()
        return ev, start_blocker(self.blocker, ev, interval=0.002)

    def close(self) -> None:
        for g in self.gates:
            g.set()
        for th in self.threads:
            th.join(10.0)
        for c in self.coords:
            c.stop(cancel_pending=True, timeout=10)

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
