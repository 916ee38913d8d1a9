"""Tokens as arguments.

Passing a TaskToken (top-level positional or keyword argument) to a decorated
function makes a dependency: the new token waits (state ``waiting``, holding no
worker) until its inputs resolve, and the body receives their values. A failed,
cancelled, killed or timed-out input fails the dependent with
``DependencyFailedError`` (``__cause__`` = the input's exception).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

from support import wait_until
from tokengate import (
    DependencyFailedError,
    OperationsCoordinator,
    TaskKilledError,
    TaskTimeoutError,
    TaskToken,
    task_token_guard,
)

WAIT = 30.0


@task_token_guard(operation_type="dep_inc")
def inc(x: int) -> int:
    assert not isinstance(x, TaskToken)
    return x + 1


@task_token_guard(operation_type="dep_combine")
def combine(a: int, b: int, *, c: int = 0, d: int = 0) -> tuple:
    return a, b, c, d, [type(v).__name__ for v in (a, b, c, d)]


@task_token_guard(operation_type="dep_plain")
def plain(x: int) -> int:
    return x


# -- waiting holds no worker ------------------------------------------------------------


@pytest.mark.parametrize("source", ["io-lane", "external"])
def test_a_dependent_waits_without_holding_a_worker(source: str) -> None:
    release = threading.Event()
    ran: list[int] = []

    @task_token_guard(operation_type="dep_slow_input", tags={"storage_speed": "SLOW"})
    def slow_input() -> int:
        release.wait(WAIT)
        return 20

    @task_token_guard(operation_type="dep_consumer")
    def consumer(x: int) -> int:
        ran.append(x)
        return x * 2

    with OperationsCoordinator(max_workers=1, io_idle_timeout=0.2) as coord:
        if source == "io-lane":
            inp = slow_input()
            assert wait_until(inp.running, 10)
        else:
            inp = slow_input.spec.external_token()
            assert inp._start()
        deps = [consumer(inp) for _ in range(3)]
        try:
            for d in deps:
                assert d.state == "waiting"
                assert not d.running() and not d.done()
                assert d.worker_id is None
            # The only CPU worker is free: an independent token runs at once.
            assert plain(5).result(timeout=10) == 5
            assert inc(inc(1)).result(timeout=10) == 3
            assert all(d.state == "waiting" for d in deps)
            assert ran == []
            assert coord.get_stats()["tokens"]["executing"] <= 1  # the input at most, no dependent
        finally:
            if source == "io-lane":
                release.set()
            else:
                assert inp._set_result(20)
        assert [d.result(timeout=WAIT) for d in deps] == [40, 40, 40]
        assert ran == [20, 20, 20]
        assert all(d.wait_time() is not None for d in deps)


def test_a_saturated_pool_does_not_deadlock_on_dependencies() -> None:
    """More dependents than workers, all waiting on inputs queued behind them."""
    gate = threading.Event()

    @task_token_guard(operation_type="dep_gated")
    def gated(x: int) -> int:
        gate.wait(WAIT)
        return x

    with OperationsCoordinator(max_workers=2):
        first = gated(1)
        deps = [inc(first) for _ in range(20)]
        gate.set()
        assert [d.result(timeout=WAIT) for d in deps] == [2] * 20


# -- values -----------------------------------------------------------------------------


def test_values_are_substituted_positional_and_keyword() -> None:
    with OperationsCoordinator():
        a, b, c = plain(1), plain(2), plain(3)
        t = combine(a, b, c=c, d=4)
        assert t.result(timeout=WAIT) == (1, 2, 3, 4, ["int"] * 4)
        t2 = combine(10, b, d=a)
        assert t2.result(timeout=WAIT) == (10, 2, 0, 1, ["int"] * 4)


def test_an_already_resolved_input_is_substituted() -> None:
    with OperationsCoordinator():
        a = plain(7)
        assert a.result(timeout=WAIT) == 7
        assert inc(a).result(timeout=WAIT) == 8
        assert combine(a, a, c=a, d=a).result(timeout=WAIT)[:4] == (7, 7, 7, 7)


def test_the_same_input_token_feeds_many_dependents() -> None:
    with OperationsCoordinator():
        a = plain(41)
        deps = [inc(a) for _ in range(50)]
        assert [d.result(timeout=WAIT) for d in deps] == [42] * 50


def test_a_chain_of_100_dependent_tokens_finishes() -> None:
    with OperationsCoordinator(max_workers=2) as coord:
        t = inc(0)
        tokens = [t]
        for _ in range(99):
            t = inc(t)
            tokens.append(t)
        t0 = time.monotonic()
        assert t.result(timeout=WAIT) == 100
        assert time.monotonic() - t0 < 10
        assert [x.result(timeout=WAIT) for x in tokens] == list(range(1, 101))
        assert wait_until(lambda: coord.get_stats()["tokens"]["unresolved"] == 0, 5)


def test_a_chain_of_100_built_on_a_blocked_input_finishes_after_it() -> None:
    release = threading.Event()

    @task_token_guard(operation_type="dep_chain_root", tags={"storage_speed": "FAST"})
    def root() -> int:
        release.wait(WAIT)
        return 0

    with OperationsCoordinator(max_workers=1, io_idle_timeout=0.2):
        t = root()
        chain = [t]
        for _ in range(100):
            t = inc(t)
            chain.append(t)
        assert all(x.state == "waiting" for x in chain[1:])
        release.set()
        assert t.result(timeout=WAIT) == 100


def test_fan_in_of_many_inputs() -> None:
    @task_token_guard(operation_type="dep_sum")
    def total(*xs: int) -> int:
        return sum(xs)

    with OperationsCoordinator():
        inputs = [plain(i) for i in range(100)]
        assert total(*inputs).result(timeout=WAIT) == sum(range(100))


# -- failures ---------------------------------------------------------------------------


@task_token_guard(operation_type="dep_fails")
def fails(msg: str) -> int:
    raise ValueError(msg)


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_a_failed_input_fails_the_dependent(how: str) -> None:
    ran: list[object] = []

    @task_token_guard(operation_type="dep_never_runs")
    def never(x: object = None, *, y: object = None) -> None:
        ran.append((x, y))

    with OperationsCoordinator():
        inp = fails("boom")
        dep = never(inp) if how == "positional" else never(y=inp)
        with pytest.raises(DependencyFailedError) as info:
            dep.result(timeout=WAIT)
        cause = info.value.__cause__
        assert isinstance(cause, ValueError) and cause.args == ("boom",)
        assert cause is inp.exception(timeout=WAIT)
        assert info.value.input_token_id == inp.token_id
        assert dep.state == "failed"
        assert isinstance(dep.exception(timeout=1), DependencyFailedError)
    assert ran == []


def test_failure_propagates_down_a_chain() -> None:
    with OperationsCoordinator():
        t = fails("root")
        chain = [t]
        for _ in range(10):
            t = inc(t)
            chain.append(t)
        for x in chain[1:]:
            with pytest.raises(DependencyFailedError):
                x.result(timeout=WAIT)
        assert chain[1].exception(timeout=1).__cause__ is chain[0].exception(timeout=1)


def test_a_cancelled_input_fails_the_dependent() -> None:
    with OperationsCoordinator() as coord:
        coord.pause_operation("dep_plain")
        try:
            inp = plain(1)
            dep = inc(inp)
            assert dep.state == "waiting"
            assert inp.cancel()
        finally:
            coord.resume_operation("dep_plain")
        with pytest.raises(DependencyFailedError) as info:
            dep.result(timeout=WAIT)
        assert isinstance(info.value.__cause__, cf.CancelledError)
        assert info.value.input_token_id == inp.token_id


def test_an_external_input_cancelled_before_it_started_fails_the_dependent() -> None:
    with OperationsCoordinator():
        inp = plain.spec.external_token()
        dep = inc(inp)
        assert inp.cancel()
        with pytest.raises(DependencyFailedError) as info:
            dep.result(timeout=WAIT)
        assert isinstance(info.value.__cause__, cf.CancelledError)


def test_a_killed_input_fails_the_dependent() -> None:
    release = threading.Event()

    @task_token_guard(operation_type="dep_kill_input", tags={"storage_speed": "SLOW"})
    def blocked() -> int:
        release.wait(WAIT)
        return 1

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        try:
            inp = blocked()
            assert wait_until(inp.running, 10)
            dep = inc(inp)
            assert coord.kill_token(inp.token_id, "operator") == 1
            with pytest.raises(DependencyFailedError) as info:
                dep.result(timeout=WAIT)
        finally:
            release.set()
    cause = info.value.__cause__
    assert isinstance(cause, TaskKilledError) and cause.reason == "operator"


def test_a_timed_out_input_fails_the_dependent() -> None:
    @task_token_guard(operation_type="dep_slow_body", tags={"timeout": 0.05})
    def slow() -> int:
        time.sleep(0.3)
        return 1

    with OperationsCoordinator():
        dep = inc(slow())
        with pytest.raises(DependencyFailedError) as info:
            dep.result(timeout=WAIT)
    assert isinstance(info.value.__cause__, TaskTimeoutError)


def test_a_waiting_dependent_can_be_cancelled_and_never_runs() -> None:
    release = threading.Event()
    ran: list[int] = []

    @task_token_guard(operation_type="dep_cancel_in", tags={"storage_speed": "SLOW"})
    def blocked() -> int:
        release.wait(WAIT)
        return 1

    @task_token_guard(operation_type="dep_cancel_out")
    def consumer(x: int) -> int:
        ran.append(x)
        return x

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        try:
            inp = blocked()
            dep = consumer(inp)
            assert dep.state == "waiting"
            assert dep.cancel()
            assert dep.cancelled()
        finally:
            release.set()
        assert inp.result(timeout=WAIT) == 1
        with pytest.raises(cf.CancelledError):
            dep.result(timeout=WAIT)
        assert wait_until(lambda: coord.get_stats()["tokens"]["unresolved"] == 0, 5)
    assert ran == []


def test_stop_resolves_waiting_dependents() -> None:
    release = threading.Event()

    @task_token_guard(operation_type="dep_stop_in", tags={"storage_speed": "SLOW"})
    def blocked() -> int:
        release.wait(WAIT)
        return 1

    coord = OperationsCoordinator(io_idle_timeout=0.2).start()
    try:
        inp = blocked()
        deps = [inc(inp) for _ in range(5)]
        assert wait_until(inp.running, 10)
    finally:
        release.set()
        assert coord.stop(timeout=10)
    assert [d.result(timeout=1) for d in deps] == [2] * 5
