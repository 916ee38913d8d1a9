"""Shared fixtures. Every test is checked for leaked coordinators and OS threads."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from support import os_thread_count, running_coordinator, wait_for_threads
from tokengate import OperationsCoordinator, _tokengate

IS_FREE_THREADED = bool(getattr(sys, "_is_gil_enabled", lambda: True)() is False)


@pytest.fixture(autouse=True)
def _no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no coordinator left running, OS thread count back to baseline within 2 s."""
    baseline = os_thread_count()
    yield
    leaked_engines = _tokengate.active_engine_count()
    if leaked_engines:
        # Stop them so that one leak does not cascade into every later test.
        from tokengate._coordinator import _live

        for c in list(_live.values()):
            c.stop(cancel_pending=True, timeout=5)
    assert leaked_engines == 0, f"{request.node.name} left {leaked_engines} coordinator(s) running"
    n = wait_for_threads(baseline)
    assert n <= baseline, f"{request.node.name}: {n} OS threads after the test, {baseline} before"


@pytest.fixture
def coordinator() -> Iterator[OperationsCoordinator]:
    """A running coordinator with 4 workers, stopped after the test."""
    with running_coordinator(max_workers=4) as c:
        yield c


@pytest.fixture
def one_worker() -> Iterator[OperationsCoordinator]:
    """A running coordinator with a single worker."""
    with running_coordinator(max_workers=1) as c:
        yield c


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An Event released at teardown, so a worker blocked on it always exits."""
    ev = threading.Event()
    try:
        yield ev
    finally:
        ev.set()
