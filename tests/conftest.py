"""Shared fixtures. Every test is checked for leaked coordinators and OS threads."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator

import pytest

from tokengate import OperationsCoordinator, _tokengate

IS_FREE_THREADED = bool(getattr(sys, "_is_gil_enabled", lambda: True)() is False)


def os_thread_count() -> int:
    """Threads of this process according to the kernel (Python and Rust threads alike)."""
    return len(os.listdir("/proc/self/task"))


def wait_for_threads(baseline: int, limit: float = 2.0) -> int:
    deadline = time.monotonic() + limit
    n = os_thread_count()
    while n > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
        n = os_thread_count()
    return n


@pytest.fixture(autouse=True)
def _no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no coordinator left running, OS thread count back to baseline within 2 s."""
    baseline = os_thread_count()
    yield
    leaked_engines = _tokengate.active_engine_count()
    if leaked_engines:
        # Stop them so that one leak does not cascade into every later test.
        from tokengate._coordinator import _live

        for c in list(_live):
            c.stop(cancel_pending=True, timeout=5)
    assert leaked_engines == 0, f"{request.node.name} left {leaked_engines} coordinator(s) running"
    n = wait_for_threads(baseline)
    assert n <= baseline, f"{request.node.name}: {n} OS threads after the test, {baseline} before"


@pytest.fixture
def coordinator() -> Iterator[OperationsCoordinator]:
    """A running coordinator with 4 workers, stopped after the test."""
    c = OperationsCoordinator(max_workers=4)
    c.start()
    try:
        yield c
    finally:
        c.stop(cancel_pending=True, timeout=10)


@pytest.fixture
def one_worker() -> Iterator[OperationsCoordinator]:
    """A running coordinator with a single worker."""
    c = OperationsCoordinator(max_workers=1)
    c.start()
    try:
        yield c
    finally:
        c.stop(cancel_pending=True, timeout=10)
