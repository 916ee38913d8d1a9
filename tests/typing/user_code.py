"""User code as the README shows it, type-checked by tests/test_typing.py with ``mypy --strict``.

``assert_type`` lines must hold; each line marked ``# E: code`` must be reported with that
error code, and no other line may be. ``sync_use`` and ``async_use`` also run, so what the
types promise is what happens."""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type

import tokengate
from tokengate import Executor, MapResults, OperationsCoordinator, TaskToken, TokenFunction, task_token_guard


@task_token_guard(operation_type="string_ops", tags={"weight": "light"})
def upper(s: str) -> str:
    return s.upper()


@task_token_guard
def add(a: int, b: int = 1) -> int:
    return a + b


class Shop:
    @task_token_guard(operation_type="shop")
    def price(self, item: str) -> float:
        return 1.0


def sync_use() -> None:
    with OperationsCoordinator() as c:
        assert_type(c, OperationsCoordinator)
        t = upper("abc")
        assert_type(t, TaskToken[str])
        assert_type(t.result(timeout=1), str)
        assert_type(add(1, b=2), TaskToken[int])
        assert_type(upper.map(["a", "b"]), MapResults[str])
        for r in upper.map(["a"], buffer=8):
            assert_type(r, str)
        assert_type(upper.options(priority=5, timeout=2.0)("x"), TaskToken[str])
        assert_type(upper.options(block=False)("x"), "TaskToken[str] | None")
        assert_type(upper.try_submit("x"), "TaskToken[str] | None")
        assert_type(upper.__wrapped__("x"), str)
        assert_type(upper.operation_type, str)
        assert_type(Shop().price("pen"), TaskToken[float])
        assert_type(tokengate.gather([add(1), add(2)]), list[int])
        for done in tokengate.as_completed([upper("a")]):
            assert_type(done, TaskToken[str])
        fn: TokenFunction[[str], str] = upper
        assert_type(fn("y"), TaskToken[str])
    with Executor(max_workers=2) as ex:
        assert_type(ex.submit(len, "abc").result(), int)


async def async_use() -> None:
    async with OperationsCoordinator():
        assert_type(await upper("abc"), str)
        assert_type(await add(1), int)
        assert_type(await upper.map(["a"]), list[str])
        async for r in upper.map(["a"]):
            assert_type(r, str)
        assert_type(await upper.submit_async("a"), TaskToken[str])
        assert_type(await upper.options(priority=1).submit_async("a"), TaskToken[str])
        values = await asyncio.gather(upper("a"), add(2))
        assert_type(values, tuple[str, int])


def wants_int(n: int) -> None:
    pass


def wrong_use() -> None:
    upper(1)  # E: arg-type
    add("1")  # E: arg-type
    add(1, c=2)  # E: call-arg
    wants_int(upper("a").result())  # E: arg-type
    upper.options(priority="high")  # E: call-overload
    upper.try_submit("x").result()  # E: union-attr
