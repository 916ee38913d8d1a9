"""Timeouts: the ``timeout`` tag and per-call ``options(timeout=...)``.

A queued token past its deadline never runs and ends 'timeout'. For a running
token the waiters get TaskTimeoutError at the deadline, the state becomes
'timeout', the body sees its cooperative cancel flag, and the overrun is
reported in ``get_stats()['timeouts']``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import support
import tokengate
from support import Env
from tokengate import TaskKilledError, TaskTimeoutError, task_token_guard

WAIT = 10.0


wait_until = functools.partial(support.wait_until, interval=0.002)


@task_token_guard(operation_type="to_hold", tags={"weight": "light"})
def hold(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="to_side", tags={"weight": "light"})
def side(log: list[Any], x: Any) -> Any:
    log.append(x)
    return x


@task_token_guard(operation_type="to_tagged", tags={"weight": "light", "timeout": 0.2})
def tagged_side(log: list[Any], x: Any) -> Any:
    log.append(x)
    return x


@task_token_guard(operation_type="to_slow", tags={"weight": "light"})
def slow(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "finished"


@task_token_guard(operation_type="to_coop", tags={"weight": "light", "timeout": 0.3})
def coop(state: dict[str, Any]) -> str:
    """Polls its cancel flag like a cooperative long task, then lingers past the deadline."""
    tok = tokengate.current_token()
    state["token"] = tok
    assert tok is not None
    state["flag_at_start"] = tok.cancel_requested
    try:
        tok.check_cancelled()
        state["check_at_start"] = "ok"
    except BaseException as exc:
        state["check_at_start"] = exc
    end = time.monotonic() + 10.0
    while not tok.cancel_requested and time.monotonic() < end:
        time.sleep(0.002)
    state["flag_seen_at"] = time.monotonic()
    state["flag"] = tok.cancel_requested
    try:
        tok.check_cancelled()
        state["check"] = "no error"
    except BaseException as exc:
        state["check"] = exc
    time.sleep(state.get("linger", 0.0))
    state["body_done"] = True
    return "late result"


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=1, blocker=hold) as e:
        yield e


# -- queued tokens --------------------------------------------------------------------------


def test_queued_token_past_its_deadline_never_runs(env: Env) -> None:
    c = env.coord()
    ev, blocker = env.hold_worker()
    log: list[Any] = []
    t0 = time.monotonic()
    tok = side.options(timeout=0.2)(log, "queued")
    with pytest.raises(TaskTimeoutError) as ei:
        tok.result(timeout=WAIT)
    assert time.monotonic() - t0 >= 0.15
    assert isinstance(ei.value, TimeoutError)
    assert tok.state == "timeout" and tok.done() and not tok.running()
    assert tok.started_at is None
    ev.set()
    blocker.result(timeout=WAIT)
    after = side(log, "after")  # runs after the expired one would have
    assert after.result(timeout=WAIT) == "after"
    assert log == ["after"], "the expired token ran"
    stats = c.get_stats()
    assert stats["timeouts"]["expired_queued"] == 1
    assert stats["timeouts"]["expired_running"] == 0
    assert stats["tokens"]["timeout"] == 1


def test_timeout_tag_applies_to_every_call(env: Env) -> None:
    env.coord()
    ev, _ = env.hold_worker()
    log: list[Any] = []
    toks = [tagged_side(log, i) for i in range(20)]
    for t in toks:
        assert isinstance(t.exception(timeout=WAIT), TaskTimeoutError)
        assert t.state == "timeout"
    ev.set()
    assert side(log, "x").result(timeout=WAIT) == "x"
    assert log == ["x"]


def test_per_call_timeout_overrides_the_tag(env: Env) -> None:
    env.coord()
    ev, _ = env.hold_worker()
    log: list[Any] = []
    short = tagged_side(log, "short")  # tag: 0.2 s
    long = tagged_side.options(timeout=30.0)(log, "long")
    assert isinstance(short.exception(timeout=WAIT), TaskTimeoutError)
    ev.set()
    assert long.result(timeout=WAIT) == "long"
    assert log == ["long"]


def test_token_finishing_before_its_deadline_is_unaffected(env: Env) -> None:
    c = env.coord()
    tok = side.options(timeout=5.0)([], 7)
    assert tok.result(timeout=WAIT) == 7
    assert tok.state == "completed" and not tok.cancel_requested
    stats = c.get_stats()["timeouts"]
    assert stats["expired_queued"] == 0 and stats["expired_running"] == 0 and stats["overruns"] == 0


# -- running tokens ---------------------------------------------------------------------------


def test_running_token_waiter_gets_timeout_error_at_the_deadline(env: Env) -> None:
    env.coord()
    ev = env.gate()
    t0 = time.monotonic()
    tok = slow.options(timeout=0.3)(ev)
    assert wait_until(tok.running)
    with pytest.raises(TaskTimeoutError):
        tok.result(timeout=WAIT)
    elapsed = time.monotonic() - t0
    assert 0.28 <= elapsed < 1.3, f"waiter released after {elapsed:.3f}s for a 0.3 s deadline"
    assert not ev.is_set(), "the body is still running: the waiter must not wait for it"
    assert tok.state == "timeout" and tok.cancel_requested
    assert tok.finished_at is not None and tok.created_at is not None
    late = tok.finished_at - tok.created_at - 0.3
    assert -0.01 <= late < 0.5, f"resolved {late * 1000:.1f} ms after the deadline"
    ev.set()
    time.sleep(0.1)
    # The body's eventual result is dropped.
    assert tok.state == "timeout"
    assert isinstance(tok.exception(timeout=0), TaskTimeoutError)


def test_async_waiter_gets_timeout_error(env: Env) -> None:
    env.coord()
    ev = env.gate()

    async def main() -> float:
        t0 = time.monotonic()
        tok = slow.options(timeout=0.3)(ev)
        with pytest.raises(TaskTimeoutError):
            await asyncio.wait_for(tok, WAIT)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert 0.25 <= elapsed < 1.3, elapsed


def test_done_callback_fires_once_on_timeout(env: Env) -> None:
    env.coord()
    ev = env.gate()
    seen: list[str] = []
    tok = slow.options(timeout=0.2)(ev)
    tok.add_done_callback(lambda t: seen.append(t.state))
    assert wait_until(lambda: seen != [])
    ev.set()
    time.sleep(0.1)
    assert seen == ["timeout"]


def test_task_sees_the_cooperative_cancel_flag(env: Env) -> None:
    env.coord()
    state: dict[str, Any] = {}
    t0 = time.monotonic()
    tok = coop(state)
    with pytest.raises(TaskTimeoutError):
        tok.result(timeout=WAIT)
    assert wait_until(lambda: state.get("body_done", False))
    assert state["token"].token_id == tok.token_id, "current_token() is not the caller's token"
    assert state["flag_at_start"] is False and state["check_at_start"] == "ok"
    assert state["flag"] is True
    assert isinstance(state["check"], concurrent.futures.CancelledError), state["check"]
    assert 0.25 <= state["flag_seen_at"] - t0 < 1.5
    assert tok.state == "timeout"


def test_overrun_is_reported_in_stats(env: Env) -> None:
    c = env.coord()
    state: dict[str, Any] = {"linger": 0.3}
    tok = coop(state)
    assert isinstance(tok.exception(timeout=WAIT), TaskTimeoutError)
    assert wait_until(lambda: c.get_stats()["timeouts"]["overruns"] == 1)
    t = c.get_stats()["timeouts"]
    assert t["expired_running"] == 1 and t["expired_queued"] == 0
    assert 0.25 <= t["overrun_max_s"] < 5.0, t
    assert t["overrun_total_s"] >= t["overrun_max_s"]
    assert c.get_stats()["operations"]["to_coop"]["health"]["timeouts"] == 1


def test_kill_before_the_deadline_wins(env: Env) -> None:
    c = env.coord()
    ev = env.gate()
    tok = slow.options(timeout=0.2)(ev)
    assert wait_until(tok.running)
    assert tok.kill("first")
    time.sleep(0.4)
    assert tok.state == "killed"
    with pytest.raises(TaskKilledError):
        tok.result(timeout=0)
    t = c.get_stats()["timeouts"]
    assert t["expired_running"] == 0 and t["expired_queued"] == 0


def test_burst_of_expiring_queued_tokens(env: Env) -> None:
    c = env.coord()
    ev, _ = env.hold_worker()
    log: list[Any] = []
    toks = [side.options(timeout=0.1 + (i % 5) * 0.02)(log, i) for i in range(50)]
    for t in toks:
        assert isinstance(t.exception(timeout=WAIT), TaskTimeoutError)
    ev.set()
    assert side(log, "end").result(timeout=WAIT) == "end"
    assert log == ["end"]
    assert c.get_stats()["timeouts"]["expired_queued"] == 50


@pytest.mark.parametrize("bad", [0, -1, "soon", float("nan"), True])
def test_timeout_tag_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError):
        task_token_guard(tags={"timeout": bad})


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_per_call_timeout_is_validated(env: Env, bad: float) -> None:
    env.coord()
    with pytest.raises(ValueError):
        side.options(timeout=bad)([], 1)


def test_current_token_is_none_outside_a_task() -> None:
    assert tokengate.current_token() is None
