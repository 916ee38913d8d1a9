"""OperationsCoordinator: lifecycle, stop modes, stats, several coordinators, leaks."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from support import fd_count, os_thread_count, start_blocker, wait_for_threads, wait_until
from tokengate import NotStartedError, OperationsCoordinator, TaskToken, _tokengate, task_token_guard

WAIT = 10.0


@task_token_guard
def wait_on(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard
def record(log: list[Any], x: Any) -> Any:
    log.append(x)
    return x


@task_token_guard
def square(x: int) -> int:
    return x * x


@task_token_guard
def boom(msg: str) -> None:
    raise ValueError(msg)


def block_worker(ev: threading.Event) -> TaskToken[str]:
    return start_blocker(wait_on, ev)


# -- lifecycle -----------------------------------------------------------------------------


def test_start_stop_idempotent() -> None:
    c = OperationsCoordinator(max_workers=2)
    assert not c.is_running
    assert c.stop() is True  # stop before start: no-op
    assert c.start() is c
    engine = c._engine
    assert engine is not None
    assert c.start() is c
    assert c._engine is engine, "a second start() must not create a new pool"
    assert c.is_running
    assert square(3).result(timeout=WAIT) == 9
    assert c.stop() is True
    assert not c.is_running
    assert c._engine is None
    assert c.stop() is True
    assert c.stop(cancel_pending=True, timeout=1) is True
    assert _tokengate.active_engine_count() == 0


def test_start_after_stop() -> None:
    c = OperationsCoordinator(max_workers=2)
    for i in range(3):
        c.start()
        assert c.is_running
        assert square(i + 2).result(timeout=WAIT) == (i + 2) ** 2
        assert c.stop() is True
        assert not c.is_running
        with pytest.raises(NotStartedError):
            square(1)


def test_context_managers() -> None:
    with OperationsCoordinator(max_workers=2) as c:
        assert c.is_running
        assert square(4).result(timeout=WAIT) == 16
    assert not c.is_running


def test_max_workers_one() -> None:
    c = OperationsCoordinator(max_workers=1)
    assert c.total_workers == 1
    with c:
        stats = c.get_stats()
        assert stats["active"] is True
        assert stats["topology"]["total_workers"] == 1
        assert stats["pool"]["workers"] == 1
        toks = [square(i) for i in range(20)]
        assert {t.result(timeout=WAIT) for t in toks} == {i * i for i in range(20)}
        assert {t.worker_id for t in toks} == {0}
    assert c.get_stats()["topology"]["total_workers"] == 1
    assert c.get_stats()["active"] is False


def test_total_workers_from_workers_per_core() -> None:
    c = OperationsCoordinator(workers_per_core=2)
    assert c.total_workers == 2 * len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "value, exc",
    [(0, ValueError), (-1, ValueError), (True, TypeError), ("x", TypeError), (1.5, TypeError), (None, TypeError)],
)
def test_workers_per_core_validation(value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="workers_per_core"):
        OperationsCoordinator(workers_per_core=value)


@pytest.mark.parametrize("value", [0, -3, True, "2", 2.0])
def test_max_workers_validation(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="max_workers"):
        OperationsCoordinator(max_workers=value)


# -- stop modes ----------------------------------------------------------------------------


def test_stop_wait_resolves_every_token() -> None:
    c = OperationsCoordinator(max_workers=4).start()
    toks = [square(i) for i in range(2000)]
    assert c.stop(wait=True) is True
    assert all(t.done() for t in toks), sum(not t.done() for t in toks)
    states = {t.state for t in toks}
    assert states == {"completed"}, states
    assert [t.result(timeout=0) for t in toks] == [i * i for i in range(2000)]


def test_stop_cancel_pending(gate: threading.Event) -> None:
    c = OperationsCoordinator(max_workers=1).start()
    blocker = block_worker(gate)
    ran: list[int] = []
    queued = [record(ran, i) for i in range(50)]

    # Release the blocker only once stop() has cancelled the queue (or after 10 s, failing the test).
    def release() -> None:
        wait_until(lambda: all(t.cancelled() for t in queued))
        gate.set()

    helper = threading.Thread(target=release)
    helper.start()
    try:
        assert c.stop(cancel_pending=True) is True
    finally:
        gate.set()
        helper.join()
    assert blocker.result(timeout=0) == "released", "the running task finishes normally"
    assert [t.state for t in queued] == ["cancelled"] * 50
    assert ran == []


def test_stop_timeout_returns_promptly_and_cancels_queue(gate: threading.Event) -> None:
    c = OperationsCoordinator(max_workers=1).start()
    blocker = block_worker(gate)
    ran: list[int] = []
    queued = [record(ran, i) for i in range(20)]
    t0 = time.monotonic()
    joined = c.stop(timeout=0.2)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, elapsed
    assert joined is False, "the blocked worker could not have exited"
    assert not c.is_running
    assert all(t.cancelled() for t in queued), [t.state for t in queued]
    with pytest.raises(NotStartedError):
        square(1)
    gate.set()
    assert blocker.result(timeout=WAIT) == "released"
    assert c.stop() is True
    assert ran == []
    assert wait_until(lambda: _tokengate.active_engine_count() == 0)


def test_stop_wait_false_returns_at_once(gate: threading.Event) -> None:
    c = OperationsCoordinator(max_workers=1).start()
    blocker = block_worker(gate)
    t0 = time.monotonic()
    c.stop(wait=False)
    assert time.monotonic() - t0 < 5.0
    assert not c.is_running
    gate.set()
    assert blocker.result(timeout=WAIT) == "released"
    assert wait_until(lambda: _tokengate.active_engine_count() == 0)


def test_thread_count_returns_to_baseline() -> None:
    baseline = os_thread_count()
    c = OperationsCoordinator(max_workers=3).start()
    try:
        [t.result(timeout=WAIT) for t in [square(i) for i in range(30)]]
        assert os_thread_count() >= baseline + 3, "three worker threads should exist while running"
    finally:
        c.stop()
    assert wait_for_threads(baseline) <= baseline


# -- stats -----------------------------------------------------------------------------------


def test_get_stats_counts_by_state(gate: threading.Event) -> None:
    with OperationsCoordinator(max_workers=1) as c:
        blocker = block_worker(gate)
        ok = [square(i) for i in range(5)]
        bad = [boom(f"e{i}") for i in range(3)]
        cancelled = [square(100 + i) for i in range(2)]
        killed = square(7)
        assert all(t.cancel() for t in cancelled)
        assert killed.kill("stats")
        during = c.get_stats()["tokens"]
        assert during["executing"] == 1
        assert during["submitted"] == 12
        gate.set()
        blocker.result(timeout=WAIT)
        for t in ok + bad:
            t.exception(timeout=WAIT)
        assert wait_until(lambda: c.get_stats()["tokens"]["unresolved"] == 0)
        tokens = c.get_stats()["tokens"]
    assert tokens["submitted"] == 12
    assert tokens["completed"] == 6
    assert tokens["failed"] == 3
    assert tokens["cancelled"] == 2
    assert tokens["killed"] == 1
    assert tokens["timeout"] == 0
    assert tokens["executing"] == 0
    assert tokens["unresolved"] == 0


def test_get_stats_schema(coordinator: OperationsCoordinator) -> None:
    stats = coordinator.get_stats()
    assert stats["active"] is True
    assert set(stats["topology"]) >= {
        "physical_cores",
        "logical_cores",
        "workers_per_core",
        "total_workers",
        "pinned_cores",
    }
    assert set(stats["tokens"]) >= {
        "submitted",
        "unresolved",
        "executing",
        "completed",
        "failed",
        "killed",
        "timeout",
        "cancelled",
    }
    assert stats["topology"]["total_workers"] == 4
    assert isinstance(stats["pool"], dict) and stats["pool"]


# -- several coordinators ---------------------------------------------------------------------


def test_two_coordinators_calls_go_to_newest() -> None:
    older = OperationsCoordinator(max_workers=1).start()
    try:
        newer = OperationsCoordinator(max_workers=2).start()
        try:
            toks = [square(i) for i in range(10)]
            [t.result(timeout=WAIT) for t in toks]
            assert newer.get_stats()["tokens"]["submitted"] == 10
            assert older.get_stats()["tokens"]["submitted"] == 0
        finally:
            assert newer.stop() is True
        # the older one is still running and now takes the calls
        assert older.is_running
        assert square(5).result(timeout=WAIT) == 25
        assert older.get_stats()["tokens"]["submitted"] == 1
    finally:
        older.stop()


@task_token_guard
def _inner(x: int) -> int:
    return x + 1


@task_token_guard
def _outer(x: int) -> int:
    child = _inner(x)
    return child.result(timeout=WAIT) * 10


def test_nested_decorated_calls(coordinator: OperationsCoordinator) -> None:
    toks = [_outer(i) for i in range(3)]  # fewer outers than workers: no self-starvation
    assert [t.result(timeout=WAIT) for t in toks] == [10, 20, 30]
    assert coordinator.get_stats()["tokens"]["submitted"] == 6


def test_nested_call_stays_on_task_coordinator() -> None:
    older = OperationsCoordinator(max_workers=2).start()
    try:
        newer = OperationsCoordinator(max_workers=2).start()
        try:
            engine = older._engine
            assert engine is not None
            tok = _outer.spec.submit_call(_outer.__wrapped__, (4,), engine=engine)  # type: ignore[attr-defined]
            assert tok.result(timeout=WAIT) == 50
            assert older.get_stats()["tokens"]["submitted"] == 2
            assert newer.get_stats()["tokens"]["submitted"] == 0
        finally:
            newer.stop()
    finally:
        older.stop()


def test_calls_after_stop_raise_not_started() -> None:
    c = OperationsCoordinator(max_workers=1).start()
    c.stop()
    t0 = time.monotonic()
    with pytest.raises(NotStartedError):
        square(1)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(RuntimeError):  # NotStartedError is a RuntimeError
        square(2)


# -- churn -------------------------------------------------------------------------------------


def test_start_stop_cycles_leave_no_threads_or_fds() -> None:
    # warm up once so that lazily created process-wide resources are not counted as leaks
    base = os_thread_count()
    with OperationsCoordinator(max_workers=2):
        square(1).result(timeout=WAIT)
    wait_for_threads(base)
    threads0 = os_thread_count()
    fds0 = fd_count()
    for cycle in range(50):
        c = OperationsCoordinator(max_workers=2).start()
        toks = [square(i) for i in range(20)]
        assert c.stop() is True, f"cycle {cycle}"
        assert all(t.state == "completed" for t in toks), cycle
    threads = wait_for_threads(threads0)
    assert threads <= threads0, (threads, threads0)
    assert fd_count() <= fds0, (fd_count(), fds0)
    assert _tokengate.active_engine_count() == 0


# -- the adaptive pattern ------------------------------------------------------------------------


def test_the_adaptive_pattern_stops_looking_when_off_and_looks_again_when_on() -> None:
    with OperationsCoordinator(max_workers=2, convergence_interval=0.02) as c:
        engine = c._engine
        assert engine is not None

        def looks() -> int:
            return int(c.get_stats()["convergence"]["looks"])

        assert wait_until(lambda: looks() >= 3, limit=WAIT), "the pattern never looked"
        engine.set_convergence(False)
        time.sleep(0.1)  # the look already scheduled ends the chain
        stopped = looks()
        time.sleep(0.15)
        assert looks() == stopped, "the pattern went on looking while off"
        engine.set_convergence(True)
        assert wait_until(lambda: looks() >= stopped + 3, limit=WAIT), "turned on again, the pattern never looked again"
        engine.set_convergence(True)  # on twice: still one chain of looks
        time.sleep(0.2)
        before = looks()
        time.sleep(0.2)
        # One chain: about 10 looks in 0.2 s (fewer on a slow machine), never twice as many.
        assert looks() - before <= 15, f"{looks() - before} looks in 0.2 s at a 0.02 s interval: two chains"
