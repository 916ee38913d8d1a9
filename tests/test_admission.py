"""Bounded admission: max_pending (global) and operation_limits (per operation).

At capacity a plain call blocks (``admission_timeout`` bounds the wait, then
``AdmissionRejectedError``), ``try_submit`` / ``options(block=False)`` return
None, and ``await fn.submit_async(...)`` waits without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support import Env, rss_mb, wait_until
from tokengate import AdmissionRejectedError, OperationsCoordinator, TaskToken, task_token_guard

WAIT = 10.0


@task_token_guard(operation_type="adm_hold", tags={"weight": "light"})
def hold(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="adm_lim", tags={"weight": "light"})
def lim(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "lim"


@task_token_guard(operation_type="adm_noop", tags={"weight": "light"})
def noop(x: Any) -> Any:
    return x


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=2) as e:
        yield e


def blocked_call(env: Env, call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs ``call`` on a helper thread; returns the thread and the list its outcome lands in."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:
            out.append(exc)

    return env.thread(run), out


# -- global limit -----------------------------------------------------------------------


def test_sync_call_blocks_while_full_then_proceeds(env: Env) -> None:
    c = env.coord(max_pending=2)
    ev = env.gate()
    held = [hold(ev), hold(ev)]
    th, out = blocked_call(env, lambda: noop("third"))
    # The helper thread may take a moment to start and reach admission.
    assert wait_until(lambda: c.get_stats()["admission"]["blocked_callers"] == 1), c.get_stats()["admission"]
    time.sleep(0.2)
    assert th.is_alive() and out == [], f"the third call was admitted past max_pending=2: {out}"
    adm = c.get_stats()["admission"]
    assert adm["blocked_callers"] == 1
    assert adm["pending"] == 2 and adm["max_pending"] == 2
    ev.set()
    th.join(WAIT)
    assert not th.is_alive()
    assert isinstance(out[0], TaskToken), out
    assert out[0].result(timeout=WAIT) == "third"
    assert [t.result(timeout=WAIT) for t in held] == ["released"] * 2
    assert c.get_stats()["admission"]["peak_pending"] == 2


def test_global_limit_counts_queued_tokens_not_only_running_ones(env: Env) -> None:
    c = env.coord(max_workers=1, max_pending=3)
    ev = env.gate()
    running = hold(ev)
    assert wait_until(running.running)
    queued = [noop(1), noop(2)]  # cannot start: the only worker is held
    assert noop.try_submit(3) is None
    assert c.get_stats()["admission"]["pending"] == 3
    ev.set()
    assert [t.result(timeout=WAIT) for t in queued] == [1, 2]


def test_admission_timeout_raises_a_clear_error(env: Env) -> None:
    c = env.coord(max_pending=1)
    ev = env.gate()
    hold(ev)
    submitted = c.get_stats()["tokens"]["submitted"]
    t0 = time.monotonic()
    with pytest.raises(AdmissionRejectedError) as ei:
        noop.options(admission_timeout=0.3)(1)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 5.0, elapsed
    assert isinstance(ei.value, RuntimeError)
    msg = str(ei.value)
    assert "max_pending" in msg and "full" in msg, msg
    stats = c.get_stats()
    assert stats["admission"]["rejected"] == 1
    assert stats["tokens"]["submitted"] == submitted, "a rejected call must not create a token"


def test_try_submit_reports_the_rejection_and_admits_when_room(env: Env) -> None:
    c = env.coord(max_pending=1)
    ev = env.gate()
    held = hold(ev)
    t0 = time.monotonic()
    assert noop.try_submit(1) is None
    assert noop.options(block=False)(2) is None
    assert time.monotonic() - t0 < 1.0, "the non-blocking form waited"
    assert c.get_stats()["admission"]["rejected"] == 2
    ev.set()
    held.result(timeout=WAIT)
    assert wait_until(lambda: c.get_stats()["admission"]["pending"] == 0)
    tok = noop.try_submit(3)
    assert tok is not None and tok.result(timeout=WAIT) == 3


def test_set_max_pending_changes_the_limit_of_a_running_coordinator(env: Env) -> None:
    c = env.coord(max_pending=1)
    ev = env.gate()
    hold(ev)
    th, out = blocked_call(env, lambda: noop("waited"))
    time.sleep(0.2)
    assert th.is_alive()
    c.set_max_pending(2)  # wakes the blocked caller
    th.join(WAIT)
    assert not th.is_alive() and out[0].result(timeout=WAIT) == "waited"
    assert c.get_stats()["admission"]["max_pending"] == 2
    c.set_max_pending(None)
    assert c.get_stats()["admission"]["max_pending"] is None
    toks = [noop(i) for i in range(10)]  # unlimited again: none of these blocks
    assert [t.result(timeout=WAIT) for t in toks] == list(range(10))


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"max_pending": 0}, ValueError),
        ({"max_pending": -3}, ValueError),
        ({"max_pending": 2.5}, TypeError),
        ({"operation_limits": {"a": 0}}, ValueError),
        ({"operation_limits": [("a", 1)]}, TypeError),
        ({"operation_limits": {1: 2}}, TypeError),
    ],
)
def test_limit_arguments_are_validated(kwargs: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        OperationsCoordinator(**kwargs)


def test_setters_validate(env: Env) -> None:
    c = env.coord()
    with pytest.raises(ValueError):
        c.set_max_pending(0)
    with pytest.raises(ValueError):
        c.set_operation_limit("adm_lim", -1)
    with pytest.raises(TypeError):
        c.set_operation_limit(3, 1)  # type: ignore[arg-type]


# -- per-operation limit ------------------------------------------------------------------


def test_operation_limit_blocks_only_its_operation(env: Env) -> None:
    c = env.coord(max_workers=3, operation_limits={"adm_lim": 1})
    ev = env.gate()
    first = lim(ev)
    assert lim.try_submit(ev) is None
    # Other operations flow while adm_lim is full.
    assert [noop(i).result(timeout=WAIT) for i in range(5)] == list(range(5))
    with pytest.raises(AdmissionRejectedError, match="adm_lim"):
        lim.options(admission_timeout=0.2)(ev)
    op = c.get_stats()["operations"]["adm_lim"]
    assert op["max_pending"] == 1 and op["pending"] == 1
    assert op["rejected"] == 2 and op["peak_pending"] == 1
    ev.set()
    assert first.result(timeout=WAIT) == "lim"


def test_operation_limit_blocks_a_sync_call_until_a_slot_frees(env: Env) -> None:
    c = env.coord(max_workers=3, operation_limits={"adm_lim": 2})
    ev = env.gate()
    held = [lim(ev), lim(ev)]
    th, out = blocked_call(env, lambda: lim(ev))
    time.sleep(0.3)
    assert th.is_alive() and out == []
    assert c.get_stats()["operations"]["adm_lim"]["pending"] == 2
    ev.set()
    th.join(WAIT)
    assert not th.is_alive()
    assert [t.result(timeout=WAIT) for t in [*held, out[0]]] == ["lim"] * 3
    assert c.get_stats()["operations"]["adm_lim"]["peak_pending"] == 2


def test_set_operation_limit_live(env: Env) -> None:
    c = env.coord(max_workers=3)
    ev = env.gate()
    c.set_operation_limit("adm_lim", 1)
    first = lim(ev)
    assert lim.try_submit(ev) is None
    c.set_operation_limit("adm_lim", 2)
    second = lim.try_submit(ev)
    assert second is not None
    c.set_operation_limit("adm_lim", None)
    more = [lim.try_submit(ev) for _ in range(3)]
    assert all(t is not None for t in more)
    assert c.get_stats()["operations"]["adm_lim"]["max_pending"] is None
    ev.set()
    for t in [first, second, *more]:
        assert t is not None and t.result(timeout=WAIT) == "lim"


# -- async admission ------------------------------------------------------------------------


def test_submit_async_waits_for_admission_without_blocking_the_loop(env: Env) -> None:
    c = env.coord(max_pending=1)
    ev = env.gate()
    hold(ev)

    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        fut = asyncio.ensure_future(noop.submit_async("async"))
        await asyncio.sleep(0.3)
        assert not fut.done(), "submit_async returned while the coordinator was full"
        assert ticks >= 5, f"the event loop was blocked while waiting for admission ({ticks} ticks)"
        ev.set()
        tok = await asyncio.wait_for(fut, WAIT)
        assert await tok == "async"
        tick_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task

    asyncio.run(main())
    assert c.get_stats()["admission"]["peak_pending"] == 1


def test_submit_async_returns_at_once_when_there_is_room(env: Env) -> None:
    env.coord(max_pending=5)

    async def main() -> list[Any]:
        toks = [await noop.submit_async(i) for i in range(5)]
        return [await t for t in toks]

    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == list(range(5))


def test_submit_async_honours_admission_timeout(env: Env) -> None:
    """``options(admission_timeout=...)`` bounds the wait of the async form too."""
    env.coord(max_pending=1)
    ev = env.gate()
    hold(ev)

    async def main() -> float:
        t0 = time.monotonic()
        with pytest.raises(AdmissionRejectedError):
            await asyncio.wait_for(noop.options(admission_timeout=0.2).submit_async(1), 2.0)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert 0.15 <= elapsed < 1.9, elapsed


def test_cancelled_submit_async_leaves_no_token(env: Env) -> None:
    c = env.coord(max_pending=1)
    ev = env.gate()
    held = hold(ev)
    submitted = c.get_stats()["tokens"]["submitted"]

    async def main() -> None:
        fut = asyncio.ensure_future(noop.submit_async(1))
        await asyncio.sleep(0.1)
        fut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fut

    asyncio.run(main())
    ev.set()
    held.result(timeout=WAIT)
    time.sleep(0.1)
    assert c.get_stats()["tokens"]["submitted"] == submitted


def test_rejected_counts_callers_that_gave_up_not_async_polls(env: Env) -> None:
    """An async caller that waited and was then admitted was never rejected."""
    c = env.coord(max_pending=1)
    ev = env.gate()
    hold(ev)

    async def main() -> Any:
        fut = asyncio.ensure_future(noop.submit_async("late"))
        await asyncio.sleep(0.3)
        ev.set()
        tok = await asyncio.wait_for(fut, WAIT)
        return await tok

    assert asyncio.run(main()) == "late"
    assert c.get_stats()["admission"]["rejected"] == 0


# -- streams through a bounded coordinator ---------------------------------------------


def test_map_through_a_coordinator_smaller_than_the_buffer(env: Env) -> None:
    c = env.coord(max_pending=4)
    assert list(noop.map(range(300), buffer=64)) == list(range(300))
    assert c.get_stats()["admission"]["peak_pending"] <= 4


def test_bounded_stream_keeps_pending_and_memory_flat(env: Env) -> None:
    """The producer is throttled by max_pending: pending never passes the limit and RSS stays flat."""
    c = env.coord(max_workers=2, max_pending=64)
    for i in range(5_000):  # warm-up: allocator pools, caches
        noop(i)
    before = rss_mb()
    for i in range(60_000):
        noop(i)
    after = rss_mb()
    assert wait_until(lambda: c.get_stats()["tokens"]["unresolved"] == 0)
    stats = c.get_stats()
    assert stats["admission"]["peak_pending"] <= 64
    assert stats["tokens"]["completed"] == 65_000
    assert after - before < 16.0, f"RSS grew {after - before:.1f} MB over 60k bounded tokens"
