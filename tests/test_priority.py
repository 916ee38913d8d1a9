"""Priorities: higher first, FIFO within a priority, aging so that nothing starves.

Every ordering test uses one worker held by a task blocked on an Event while
the tokens are queued, so the queue order is all that decides the run order.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import support
from support import Env
from tokengate import TaskToken, task_token_guard

WAIT = 10.0
NO_AGING = 1000.0  # seconds per priority level: aging cannot matter within a test


wait_until = functools.partial(support.wait_until, interval=0.002)


@task_token_guard(operation_type="prio_block", tags={"weight": "light"})
def block(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="prio_rec", tags={"weight": "light"})
def rec(log: list[Any], item: Any, pause: float = 0.0) -> Any:
    log.append(item)
    if pause:
        time.sleep(pause)
    return item


@task_token_guard(operation_type="prio_tagged", tags={"weight": "light", "priority": 5})
def tagged(log: list[Any], item: Any) -> Any:
    log.append(item)
    return item


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=1, blocker=block) as e:
        yield e


def expected_order(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(priority, seq) sorted as the scheduler must run them: priority desc, then FIFO."""
    return sorted(items, key=lambda it: (-it[0], it[1]))


def run_queued(env: Env, prios: list[int]) -> list[tuple[int, int]]:
    """Queues one rec per priority behind a held worker, releases it, returns the run order."""
    ev, blocker = env.hold_worker()
    log: list[tuple[int, int]] = []
    toks = [rec.options(priority=p)(log, (p, i)) for i, p in enumerate(prios)]
    assert all(not t.done() for t in toks)
    ev.set()
    for t in toks:
        t.result(timeout=WAIT)
    blocker.result(timeout=WAIT)
    return log


def test_higher_priority_runs_first_fifo_within_equal(env: Env) -> None:
    env.coord(aging=NO_AGING)
    prios = [1, 3, 0, 3, -2, 1, 5, 0, -2, 3, 1, 5, 0, -1]
    log = run_queued(env, prios)
    assert log == expected_order(list(zip(prios, range(len(prios)))))


def test_priority_zero_is_plain_fifo(env: Env) -> None:
    env.coord(aging=NO_AGING)
    log = run_queued(env, [0] * 40)
    assert [seq for _, seq in log] == list(range(40))


def test_equal_nonzero_priorities_are_fifo(env: Env) -> None:
    env.coord(aging=NO_AGING)
    log = run_queued(env, [2] * 30)
    assert [seq for _, seq in log] == list(range(30))


def test_negative_priority_runs_after_plain_calls(env: Env) -> None:
    env.coord(aging=NO_AGING)
    log = run_queued(env, [-1, -5, 0, 0, -1, 0])
    assert log == [(0, 2), (0, 3), (0, 5), (-1, 0), (-1, 4), (-5, 1)]


def test_priority_tag_is_the_default_and_options_override_it(env: Env) -> None:
    env.coord(aging=NO_AGING)
    ev, _ = env.hold_worker()
    log: list[str] = []
    plain = rec(log, "plain")
    high = tagged(log, "tag5")
    low = tagged.options(priority=-3)(log, "tag-3")
    higher = rec.options(priority=7)(log, "opt7")
    assert (plain.priority, high.priority, low.priority, higher.priority) == (0, 5, -3, 7)
    ev.set()
    for t in (plain, high, low, higher):
        t.result(timeout=WAIT)
    assert log == ["opt7", "tag5", "plain", "tag-3"]


def test_priority_option_type_is_checked() -> None:
    with pytest.raises(TypeError):
        rec.options(priority="high")
    with pytest.raises(TypeError):
        rec.options(priority=1.5)
    with pytest.raises(ValueError):
        task_token_guard(tags={"priority": "high"})


def test_aging_waiting_token_gains_one_level_per_interval(env: Env) -> None:
    """A priority-1 token that waited 4 intervals outranks a fresh priority 3; a fresh 1 does not."""
    aging = 0.2
    env.coord(aging=aging)
    ev, _ = env.hold_worker()
    log: list[str] = []
    old_low = rec.options(priority=1)(log, "old1")
    time.sleep(4 * aging)  # now worth about 1 + 4 = 5 > 3 (longer sleeps only widen the gap)
    fresh_high = rec.options(priority=3)(log, "fresh3")
    fresh_low = rec.options(priority=1)(log, "fresh1")
    ev.set()
    for t in (old_low, fresh_high, fresh_low):
        t.result(timeout=WAIT)
    assert log == ["old1", "fresh3", "fresh1"]


@task_token_guard(operation_type="prio_stream", tags={"weight": "light", "priority": 5})
def stream_high(state: dict[str, Any]) -> None:
    """One link of a self-sustaining stream: each high-priority token queues the next one
    before it ends, so the queue always holds ``depth`` high tokens, however slow the test thread."""
    state["log"].append("high")
    time.sleep(0.002)
    if not state["stop"].is_set() and time.monotonic() < state["until"]:
        state["toks"].append(stream_high.options(priority=state["high"])(state))


@task_token_guard(operation_type="prio_low", tags={"weight": "light"})
def stream_low(state: dict[str, Any]) -> str:
    state["log"].append("low")
    state["stop"].set()
    return "low"


def run_stream(
    env: Env, aging: float, duration: float, depth: int = 8, low_priority: int = -3, high_priority: int = 5
) -> tuple[list[str], TaskToken[str]]:
    """A low-priority token queued first, then a stream of high-priority tokens for up to ``duration`` s."""
    env.coord(aging=aging)
    ev, _ = env.hold_worker()
    state: dict[str, Any] = {
        "log": [],
        "stop": threading.Event(),
        "toks": [],
        "until": time.monotonic() + duration,
        "high": high_priority,
    }
    low = stream_low.options(priority=low_priority)(state)
    time.sleep(0.01)
    state["toks"].extend(stream_high.options(priority=high_priority)(state) for _ in range(depth))
    ev.set()
    low.result(timeout=duration + WAIT)
    i = 0
    while i < len(state["toks"]):  # each link is listed before its parent ends
        state["toks"][i].result(timeout=WAIT)
        i += 1
    return state["log"], low


def test_aging_low_priority_token_runs_during_a_stream_of_high_ones(env: Env) -> None:
    """Aging 0.05 s: a priority -3 token queued before a non-stop stream of priority 5 starts
    once it has waited about 8 x 0.05 s, while the stream is still going."""
    log, low = run_stream(env, aging=0.05, duration=8.0)
    assert low.result(timeout=0) == "low"
    pos = log.index("low")
    assert pos > 0, "the low token ran before any high one: priorities ignored"
    assert pos < len(log) - 1, f"low ran only after the stream ended ({pos} high tokens ran before it)"


def test_plain_call_runs_during_a_stream_of_priority_one_calls(env: Env) -> None:
    """Priority 0 (every call without a priority) must not starve either: a plain call queued
    before a non-stop stream of priority 1 starts after about 1 x 0.05 s of aging."""
    log, low = run_stream(env, aging=0.05, duration=2.0, low_priority=0, high_priority=1)
    assert low.result(timeout=0) == "low"
    pos = log.index("low")
    assert pos < len(log) - 1, (
        f"the plain call starved: it ran only after the 2 s stream ended ({pos} high tokens first)"
    )


def test_without_aging_low_priority_waits_for_the_whole_stream(env: Env) -> None:
    """Control for the test above: with aging 1000 s the low token waits until the stream ends."""
    log, low = run_stream(env, aging=NO_AGING, duration=0.8)
    assert low.result(timeout=0) == "low"
    assert log[-1] == "low"
    assert log.count("high") > 50


def test_without_aging_low_priority_waits_for_every_higher_token(env: Env) -> None:
    """Control for the test above: with aging 1000 s a low token queued first runs last."""
    env.coord(aging=NO_AGING)
    log: list[str] = []
    ev, _ = env.hold_worker()
    low = rec.options(priority=-3)(log, "low")
    time.sleep(0.3)
    highs = [rec.options(priority=5)(log, "high") for _ in range(100)]
    ev.set()
    for t in highs:
        t.result(timeout=WAIT)
    assert low.result(timeout=WAIT) == "low"
    assert log == ["high"] * 100 + ["low"]
