"""Smoke tests: the quick subset run on every interpreter (3.11, 3.12, 3.13, 3.13t)."""

from __future__ import annotations

import asyncio

import pytest

import tokengate
from tokengate import NotStartedError, OperationsCoordinator, task_token_guard


@task_token_guard(operation_type="string_ops", tags={"weight": "light"})
def upper(s: str) -> str:
    return s.upper()


def test_issue_example_with_block() -> None:
    with OperationsCoordinator() as coordinator:
        token = upper("abc")
        assert isinstance(token, tokengate.TaskToken)
        assert token.result(timeout=5) == "ABC"
        assert token.get(timeout=5) == "ABC"
        assert coordinator.is_running
    assert not coordinator.is_running


def test_explicit_start_stop() -> None:
    coordinator = OperationsCoordinator()
    coordinator.start()
    try:
        assert upper("x").result(timeout=5) == "X"
    finally:
        coordinator.stop()


def test_async_with_and_await() -> None:
    async def main() -> list[str]:
        async with OperationsCoordinator():
            one = await upper("a")
            many = await asyncio.gather(*(upper(str(i)) for i in range(100)))
            return [one, *many]

    out = asyncio.run(main())
    assert out[0] == "A" and out[1:] == [str(i) for i in range(100)]


def test_usage_1_start_inside_asyncio_run() -> None:
    async def main() -> str:
        coordinator = OperationsCoordinator()
        coordinator.start()
        try:
            return await upper("q")
        finally:
            coordinator.stop()

    assert asyncio.run(main()) == "Q"


def test_call_without_coordinator_raises() -> None:
    with pytest.raises(NotStartedError, match="no OperationsCoordinator is running"):
        upper("a")


def test_version() -> None:
    assert isinstance(tokengate.__version__, str)
