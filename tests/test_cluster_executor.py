"""tokengate.ClusterExecutor: the executor contract (the parts of CPython's
test_concurrent_futures that a pool of remote workers keeps, as ProcessPoolExecutor
does), on an in-process Dask ``LocalCluster``, on one with 2 worker processes, and on
a 2-node local Ray cluster (the ``ray_nodes`` fixture; skipped where Ray is missing,
unless ``TOKENGATE_REQUIRE_RAY`` is set).

Set ``TOKENGATE_REQUIRE_DASK=1`` to fail, not skip, when ``distributed`` is missing.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

if not os.environ.get("TOKENGATE_REQUIRE_DASK"):
    pytest.importorskip("distributed")

import distributed

from cluster_functions import MyObject, make_dummy_object, mul, raise_value_error, sleep_and_return
from support import started_dask_client
from tokengate import ClusterExecutor, OperationsCoordinator
from tokengate._process import UnpicklableError

WAIT = 60.0


@pytest.fixture(scope="module")
def two_processes() -> Iterator[distributed.Client]:
    c, cluster = started_dask_client(2)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module", autouse=True)
def _pools_started(request: pytest.FixtureRequest) -> None:
    """Dask's own thread pools, and Ray's when it is installed, start on first use and stay:
    start them before threads are counted."""
    with ClusterExecutor("dask-local") as ex:
        assert ex.submit(pow, 2, 3).result(timeout=WAIT) == 8
    if os.environ.get("TOKENGATE_REQUIRE_RAY") or importlib.util.find_spec("ray") is not None:
        request.getfixturevalue("ray_nodes")


@pytest.fixture(params=["in-process", "2 processes", "ray"])
def make(request: pytest.FixtureRequest, two_processes: distributed.Client) -> Any:
    if request.param == "in-process":
        return lambda: ClusterExecutor("dask-local")
    if request.param == "ray":
        request.getfixturevalue("ray_nodes")  # the 2-node Ray cluster this process is connected to
        return lambda: ClusterExecutor("ray")
    return lambda: ClusterExecutor(two_processes)


@pytest.fixture
def executor(make: Any) -> Iterator[ClusterExecutor]:
    ex = make()
    try:
        yield ex
    finally:
        ex.shutdown(wait=True)


def test_submit(executor: ClusterExecutor) -> None:
    assert executor.submit(pow, 2, 8).result(timeout=WAIT) == 256


def test_submit_keyword(executor: ClusterExecutor) -> None:
    assert executor.submit(mul, 2, y=8).result(timeout=WAIT) == 16
    with pytest.raises(TypeError):
        executor.submit(fn=mul, x=2, y=3)  # type: ignore[call-arg]


def test_a_lambda_goes_by_value(executor: ClusterExecutor) -> None:
    base = 5
    assert executor.submit(lambda x: x + base, 1).result(timeout=WAIT) == 6


def test_map(executor: ClusterExecutor) -> None:
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))


def test_map_exception(executor: ClusterExecutor) -> None:
    it = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout(executor: ClusterExecutor) -> None:
    results = []
    with pytest.raises(futures.TimeoutError):
        results.extend(executor.map(sleep_and_return, [0, 0, 6], [1, 2, 3], timeout=2))
    assert results == [1, 2]


def test_map_submits_without_iteration(make: Any) -> None:
    ex = make()
    ex.map(sleep_and_return, [0.0] * 10, range(10))
    lane = ex._lane
    ex.shutdown(wait=True)
    assert lane.stats()["completed"] >= 10


def test_shutdown_race_issue12456(executor: ClusterExecutor) -> None:
    executor.map(str, [2] * 8)
    executor.shutdown()


@pytest.mark.skipif(
    not getattr(sys, "_is_gil_enabled", lambda: True)(),
    reason="free-threaded CPython frees objects shared across threads later (biased reference counting)",
)
def test_no_stale_references(executor: ClusterExecutor) -> None:
    my_object = MyObject()
    collected = threading.Event()
    ref = weakref.ref(my_object, lambda _: collected.set())
    executor.submit(my_object.my_method)  # deliberately discard the future
    del my_object
    assert collected.wait(WAIT), "stale reference not collected"
    assert ref() is None


def test_free_reference(executor: ClusterExecutor) -> None:
    for obj in executor.map(make_dummy_object, range(10)):
        wr = weakref.ref(obj)
        del obj
        deadline = time.monotonic() + WAIT
        while True:
            gc.collect()
            if wr() is None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert wr() is None


def test_exception_is_the_call_own(executor: ClusterExecutor) -> None:
    f = executor.submit(raise_value_error, "boom")
    exc = f.exception(timeout=WAIT)
    assert isinstance(exc, ValueError) and str(exc) == "boom"


def test_an_argument_that_cannot_be_pickled_fails_its_future(executor: ClusterExecutor) -> None:
    f = executor.submit(mul, threading.Lock(), 2)
    with pytest.raises(UnpicklableError, match="argument 0"):
        f.result(timeout=WAIT)


def test_run_after_shutdown(make: Any) -> None:
    ex = make()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 5)


def test_context_manager_shutdown_waits(make: Any) -> None:
    with make() as ex:
        fs = [ex.submit(sleep_and_return, 0.05, i) for i in range(6)]
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == list(range(6))


def test_shutdown_no_wait_still_runs_the_calls(make: Any) -> None:
    ex = make()
    fs = [ex.submit(sleep_and_return, 0.05, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=WAIT) for f in fs] == list(range(4))


def test_cancel_futures_cancels_what_was_not_sent(make: Any) -> None:
    ex = make()
    fs = [ex.submit(sleep_and_return, 0.01, i) for i in range(300)]
    assert _wait_for(lambda: fs[0].running() or fs[0].done())  # the lane has sent the first ones
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    ran = [f for f in fs if not f.cancelled()]
    assert cancelled and ran  # the lane had sent some ahead; the rest never ran
    assert all(f.done() for f in fs)
    assert [f.result() for f in ran] == [fs.index(f) for f in ran]


def test_cancel_of_a_queued_call_and_running(make: Any) -> None:
    ex = make()
    try:
        fs = [ex.submit(sleep_and_return, 0.3, i) for i in range(200)]
        assert fs[-1].cancel() and fs[-1].cancelled()
        assert fs[-1].done()
        assert _wait_for(lambda: fs[0].running())
        assert not fs[0].cancel()  # sent to the cluster: it runs
        for f in fs[1:-1]:
            f.cancel()
        assert fs[0].result(timeout=WAIT) == 0
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def test_wait_and_as_completed(executor: ClusterExecutor) -> None:
    fs = [executor.submit(sleep_and_return, 0.01 * (i % 3), i) for i in range(9)]
    done, not_done = futures.wait(fs, timeout=WAIT)
    assert len(done) == 9 and not not_done
    assert sorted(f.result() for f in futures.as_completed(fs, timeout=WAIT)) == list(range(9))


def test_asyncio_wrap_future(executor: ClusterExecutor) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        return int(await loop.run_in_executor(executor, mul, 6, 7))

    assert asyncio.run(main()) == 42


def test_a_shared_coordinator_keeps_running(two_processes: distributed.Client) -> None:
    with OperationsCoordinator(max_workers=1, cluster=two_processes) as c:
        ex = ClusterExecutor(coordinator=c)
        assert ex.submit(pow, 3, 3).result(timeout=WAIT) == 27
        ex.shutdown()
        assert c.is_running
        assert c.get_stats()["lanes"]["dask"]["completed"] >= 1


def _wait_for(pred: Any, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False
