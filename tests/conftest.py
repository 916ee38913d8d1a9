"""Shared fixtures. Every test is checked for leaked coordinators and OS threads."""

from __future__ import annotations

import os
import secrets
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from support import os_thread_count, os_thread_names, running_coordinator, wait_for_threads
from tokengate import OperationsCoordinator, _tokengate

# Ray reads its authentication settings once per process: the token of the tests' Ray
# cluster (see ``ray_nodes``) is set before anything imports Ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

IS_FREE_THREADED = bool(getattr(sys, "_is_gil_enabled", lambda: True)() is False)


@pytest.fixture(autouse=True)
def _no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no coordinator left running, OS thread count back to baseline within 2 s."""
    baseline = os_thread_count()
    names = os_thread_names()
    yield
    leaked_engines = _tokengate.active_engine_count()
    if leaked_engines:
        # Stop them so that one leak does not cascade into every later test.
        from tokengate._coordinator import _live

        for c in list(_live.values()):
            c.stop(cancel_pending=True, timeout=5)
    assert leaked_engines == 0, f"{request.node.name} left {leaked_engines} coordinator(s) running"
    n = wait_for_threads(baseline)
    if n > baseline:
        after = os_thread_names()
        new = [t for t in set(after) if after.count(t) > names.count(t)]
        raise AssertionError(f"{request.node.name}: {n} OS threads after the test, {baseline} before (more: {new})")


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


@pytest.fixture(scope="session")
def ray_nodes() -> Iterator[Any]:
    """A 2-node local Ray cluster (see ``support.RayNodes``) that this process is connected
    to with ``ray.init``, for the whole session (Ray allows one connection per process).
    Skips where Ray is missing, unless ``TOKENGATE_REQUIRE_RAY`` is set."""
    if not os.environ.get("TOKENGATE_REQUIRE_RAY"):
        pytest.importorskip("ray")
    import ray

    from support import RayNodes, wait_until

    nodes = RayNodes()
    try:
        nodes.start()
        nodes.add_node()
        ray.init(address=nodes.address, configure_logging=False, log_to_driver=False)
        assert wait_until(lambda: ray.cluster_resources().get("CPU") == 4.0, 60.0)
        # The driver's own threads start on first use and stay: start them before threads are counted.
        done = threading.Event()
        ref = ray.remote(lambda: 8).remote()
        ref._on_completed(lambda _r: done.set())
        assert ray.get(ref, timeout=60) == 8 and done.wait(30)
        yield nodes
    finally:
        ray.shutdown()
        nodes.close()
