"""``_tokengate.wait_all``: one blocking wait for many tokens (what ``tokengate.gather`` uses)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

import tokengate
from tokengate import OperationsCoordinator, _tokengate, task_token_guard


@task_token_guard(operation_type="wait_all_echo")
def echo(x: int) -> int:
    return x


_gate = threading.Event()


@task_token_guard(operation_type="wait_all_gated")
def gated(x: int) -> int:
    _gate.wait(10)
    return x


def test_returns_true_once_every_token_is_done(coordinator: OperationsCoordinator) -> None:
    for _ in range(20):  # tokens finishing while the latch is being registered
        tokens = [echo(i) for i in range(2000)]
        assert _tokengate.wait_all(tokens) is True
        assert all(t.done() for t in tokens)
        assert [t.result() for t in tokens] == list(range(2000))


def test_waits_for_the_slowest_and_times_out(coordinator: OperationsCoordinator) -> None:
    _gate.clear()
    try:
        tokens = [gated(i) for i in range(3)]
        t0 = time.monotonic()
        assert _tokengate.wait_all(tokens, timeout=0.2) is False
        assert time.monotonic() - t0 >= 0.15
        with pytest.raises(cf.TimeoutError):
            tokengate.gather(tokens, timeout=0.1)
        threading.Timer(0.1, _gate.set).start()
        assert _tokengate.wait_all(tokens, timeout=10) is True
        assert tokengate.gather(tokens) == [0, 1, 2]
    finally:
        _gate.set()


def test_empty_and_already_done(coordinator: OperationsCoordinator) -> None:
    assert _tokengate.wait_all([]) is True
    done = echo(1)
    done.result(timeout=5)
    assert _tokengate.wait_all([done, done], timeout=0) is True


@task_token_guard(operation_type="wait_all_nested")
def nested(n: int) -> tuple[bool, list[int]]:
    inner = [echo(i) for i in range(n)]
    # On a worker it does not block (the caller waits token by token, running queued work).
    return _tokengate.wait_all(inner, timeout=0), tokengate.gather(inner)


def test_on_a_worker_it_returns_at_once_and_gather_still_works(one_worker: OperationsCoordinator) -> None:
    waited, values = nested(50).result(timeout=30)
    assert waited is False
    assert values == list(range(50))


def test_rejects_non_tokens(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(TypeError):
        _tokengate.wait_all([echo(1), 5])  # type: ignore[list-item]


@task_token_guard(operation_type="wait_all_raises_timeout")
def raises_timeout(x: int) -> int:
    raise TimeoutError(f"the body's own {x}")


@task_token_guard(operation_type="wait_all_past_deadline", tags={"timeout": 0.05})
def past_deadline() -> int:
    time.sleep(2)
    return 0


def test_gather_returns_a_tokens_own_timeout_error_in_its_place(coordinator: OperationsCoordinator) -> None:
    """A TimeoutError that is a token's outcome (its body raised one, its deadline passed) is
    a result like any other: with return_exceptions it takes the token's place, without it
    it is raised after the wait. Before, gather raised it at once, even with
    return_exceptions, as if gather's own timeout had passed."""
    for timeout in (None, 30.0):
        tokens = [echo(1), raises_timeout(2), past_deadline(), echo(4)]
        out = tokengate.gather(tokens, timeout=timeout, return_exceptions=True)
        assert out[0] == 1 and out[3] == 4
        assert isinstance(out[1], TimeoutError) and str(out[1]) == "the body's own 2"
        assert isinstance(out[2], tokengate.TaskTimeoutError)
        with pytest.raises(TimeoutError, match="the body's own 2"):
            tokengate.gather(tokens, timeout=timeout)


@task_token_guard(operation_type="wait_all_nested_timeouts")
def nested_timeouts() -> list[object]:
    # On a worker gather waits token by token, with the deadline.
    return tokengate.gather([echo(1), raises_timeout(2)], timeout=30, return_exceptions=True)


def test_on_a_worker_gather_returns_a_tokens_own_timeout_error(one_worker: OperationsCoordinator) -> None:
    out = nested_timeouts().result(timeout=30)
    assert out[0] == 1 and isinstance(out[1], TimeoutError) and str(out[1]) == "the body's own 2"


def test_gather_still_raises_its_own_timeout_for_unfinished_tokens(coordinator: OperationsCoordinator) -> None:
    _gate.clear()
    try:
        tokens = [raises_timeout(1), gated(2)]
        with pytest.raises(cf.TimeoutError):
            tokengate.gather(tokens, timeout=0.1, return_exceptions=True)
        assert not tokens[1].done()
    finally:
        _gate.set()
    assert tokens[1].result(timeout=10) == 2
