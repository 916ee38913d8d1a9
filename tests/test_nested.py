"""Nested submit and wait.

A task that waits on a token (``result()``) runs queued jobs inline meanwhile
(help while waiting), so recursive fan-out finishes even with ``max_workers=1``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import tokengate
from support import running_coordinator
from tokengate import OperationsCoordinator, current_token, task_token_guard

LIMIT = 10.0  # the bound for the recursive workloads


@pytest.fixture
def solo() -> Iterator[OperationsCoordinator]:
    # Stopping with cancel_pending also unblocks a task stuck waiting on a queued token.
    with running_coordinator(max_workers=1) as c:
        yield c


@task_token_guard(operation_type="nest_fib")
def fib(n: int) -> int:
    if n < 2:
        return n
    a, b = fib(n - 1), fib(n - 2)
    return a.result() + b.result()


@task_token_guard(operation_type="nest_fan")
def fan(depth: int, width: int) -> int:
    if depth == 0:
        return 1
    kids = [fan(depth - 1, width) for _ in range(width)]
    return sum(k.result() for k in kids)


@task_token_guard(operation_type="nest_chain")
def chain(n: int) -> int:
    if n == 0:
        return 0
    return chain(n - 1).result() + 1


def fib_plain(n: int) -> int:
    return n if n < 2 else fib_plain(n - 1) + fib_plain(n - 2)


def timed_result(token: tokengate.TaskToken, limit: float = LIMIT) -> tuple[object, float]:
    t0 = time.monotonic()
    value = token.result(timeout=limit)
    return value, time.monotonic() - t0


def test_recursive_fan_out_on_one_worker(solo: OperationsCoordinator) -> None:
    value, elapsed = timed_result(fan(4, 3))
    assert value == 3**4
    assert elapsed < LIMIT
    assert solo.get_stats()["tokens"]["completed"] == sum(3**d for d in range(5))


@pytest.mark.parametrize("n", [10, 15])
def test_fib_recursion_on_one_worker(solo: OperationsCoordinator, n: int) -> None:
    value, elapsed = timed_result(fib(n))
    assert value == fib_plain(n)
    assert elapsed < LIMIT


def test_fib_recursion_on_two_workers() -> None:
    c = OperationsCoordinator(max_workers=2).start()
    try:
        value, _ = timed_result(fib(15))
        assert value == fib_plain(15)
    finally:
        c.stop(cancel_pending=True, timeout=10)


def test_nesting_depth_four_times_the_workers() -> None:
    workers = 2
    c = OperationsCoordinator(max_workers=workers).start()
    try:
        value, _ = timed_result(chain(4 * workers))
        assert value == 4 * workers
        # several such chains at once: every worker is a waiter
        tokens = [chain(4 * workers) for _ in range(2 * workers)]
        assert [t.result(timeout=LIMIT) for t in tokens] == [4 * workers] * (2 * workers)
    finally:
        c.stop(cancel_pending=True, timeout=10)


def test_fan_out_of_waiters_wider_than_the_pool() -> None:
    c = OperationsCoordinator(max_workers=2).start()
    try:
        value, _ = timed_result(fan(2, 12))
        assert value == 144
    finally:
        c.stop(cancel_pending=True, timeout=10)


def test_gather_inside_a_task_on_one_worker(solo: OperationsCoordinator) -> None:
    @task_token_guard(operation_type="nest_gather_parent")
    def parent(n: int) -> list[int]:
        return tokengate.gather([fib(i) for i in range(n)], timeout=LIMIT)

    assert parent(8).result(timeout=LIMIT) == [fib_plain(i) for i in range(8)]


def test_a_nested_wait_with_a_timeout_returns_on_time(solo: OperationsCoordinator) -> None:
    """A waiter on one worker whose child cannot finish gets TimeoutError, not a hang."""
    release = threading.Event()

    @task_token_guard(operation_type="nest_blocked_child", tags={"storage_speed": "SLOW"})
    def child() -> int:
        release.wait(LIMIT)
        return 1

    @task_token_guard(operation_type="nest_timeout_parent")
    def parent() -> str:
        t0 = time.monotonic()
        try:
            child().result(timeout=0.2)
        except TimeoutError:
            return f"timeout after {time.monotonic() - t0:.2f}"
        return "no timeout"

    try:
        out = parent().result(timeout=LIMIT)
    finally:
        release.set()
    assert out.startswith("timeout after")
    assert float(out.split()[-1]) < 5


def test_nested_calls_stay_on_the_tasks_coordinator() -> None:
    """Calls made inside a task go to that task's coordinator, not the newest one."""
    first = OperationsCoordinator(max_workers=1).start()
    second = OperationsCoordinator(max_workers=1).start()
    try:
        before = first.get_stats()["tokens"]["submitted"]
        outer = fib.spec.submit_call(fib.__wrapped__, (6,), engine=first._engine)
        assert outer.result(timeout=LIMIT) == fib_plain(6)
        # fib(6) makes 24 nested calls, all on `first`
        assert first.get_stats()["tokens"]["submitted"] - before == 25
        assert second.get_stats()["tokens"]["submitted"] == 0
    finally:
        second.stop(cancel_pending=True, timeout=10)
        first.stop(cancel_pending=True, timeout=10)


def test_current_token_is_restored_after_helping(solo: OperationsCoordinator) -> None:
    """A waiter that ran other tasks inline still sees its own token afterwards."""

    @task_token_guard(operation_type="nest_ident_child")
    def child() -> int | None:
        return current_token().token_id

    @task_token_guard(operation_type="nest_ident_parent")
    def parent() -> tuple[int | None, int | None, list[int | None]]:
        me = current_token().token_id
        kids = [child() for _ in range(5)]
        ids = [k.result(timeout=LIMIT) for k in kids]
        return me, current_token().token_id, ids

    t = parent()
    me, after, ids = t.result(timeout=LIMIT)
    assert me == after == t.token_id
    assert len(set(ids)) == 5 and t.token_id not in ids
