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
