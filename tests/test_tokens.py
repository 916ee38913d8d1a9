"""TaskToken: waiting, cancelling, killing, states, metadata, identity and callbacks."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Any

import pytest

import tokengate
from support import start_blocker, wait_until
from tokengate import OperationsCoordinator, TaskKilledError, TaskToken, task_token_guard

WAIT = 10.0  # generous: the machine is small and shared


@task_token_guard
def wait_on(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="ident_op", tags={"weight": "light", "priority": 3})
def ident(x: Any) -> Any:
    return x


@task_token_guard
def record(log: list[Any], x: Any) -> Any:
    log.append(x)
    return x


@task_token_guard
def fail_with(exc: BaseException) -> None:
    raise exc


def blocked_worker(ev: threading.Event) -> TaskToken[str]:
    """Submits a task that holds a worker until ``ev`` is set; returns once it runs."""
    return start_blocker(wait_on, ev)


# -- result / get / exception ---------------------------------------------------------


def test_result_and_get_return_value(coordinator: OperationsCoordinator) -> None:
    tok = ident(41)
    assert tok.result(timeout=WAIT) == 41
    assert tok.get(timeout=WAIT) == 41
    assert tok.exception(timeout=WAIT) is None


@pytest.mark.parametrize("method", ["result", "get", "exception"])
def test_wait_with_timeout_raises_futures_timeout(
    coordinator: OperationsCoordinator, gate: threading.Event, method: str
) -> None:
    tok = wait_on(gate)
    t0 = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        getattr(tok, method)(timeout=0.1)
    elapsed = time.monotonic() - t0
    assert 0.05 <= elapsed < 5.0, elapsed
    assert not tok.done()
    gate.set()
    assert tok.result(timeout=WAIT) == "released"


def test_timeout_error_is_builtin_timeout_error(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    tok = wait_on(gate)
    with pytest.raises(TimeoutError):
        tok.result(timeout=0.05)
    gate.set()
    tok.result(timeout=WAIT)


def test_exception_returns_task_exception(coordinator: OperationsCoordinator) -> None:
    err = ValueError("boom")
    tok = fail_with(err)
    assert tok.exception(timeout=WAIT) is err
    with pytest.raises(ValueError, match="boom"):
        tok.result(timeout=WAIT)
    assert tok.state == "failed"


# -- done / running / cancelled -------------------------------------------------------


def test_done_running_cancelled_through_lifecycle(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    tok = wait_on(gate)
    assert wait_until(tok.running)
    assert tok.running() is True
    assert tok.done() is False
    assert tok.cancelled() is False
    assert tok.state == "executing"
    gate.set()
    assert tok.result(timeout=WAIT) == "released"
    assert tok.done() is True
    assert tok.running() is False
    assert tok.cancelled() is False
    assert tok.state == "completed"


# -- cancel ---------------------------------------------------------------------------


def test_cancel_queued_token_never_runs(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocker = blocked_worker(gate)
    ran: list[int] = []
    queued = [record(ran, i) for i in range(5)]
    for t in queued:
        assert t.state in ("created", "waiting", "admitted"), t.state
        assert not t.running()
    assert queued[1].cancel() is True
    assert queued[3].cancel() is True
    assert queued[1].cancelled() and queued[1].done()
    assert queued[1].state == "cancelled"
    with pytest.raises(concurrent.futures.CancelledError):
        queued[1].result(timeout=WAIT)
    gate.set()
    blocker.result(timeout=WAIT)
    for i in (0, 2, 4):
        assert queued[i].result(timeout=WAIT) == i
    assert queued[3].cancelled()
    assert sorted(ran) == [0, 2, 4], ran
    # cancelling a finished token is refused
    assert queued[0].cancel() is False
    assert not queued[0].cancelled()


def test_cancel_twice_on_queued_token(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocked_worker(gate)
    ran: list[int] = []
    tok = record(ran, 1)
    assert tok.cancel() is True
    # asyncio/concurrent.futures semantics: cancelling an already cancelled future returns True
    assert tok.cancel() is True
    assert tok.cancelled()
    gate.set()
    time.sleep(0.1)
    assert ran == []


def test_cancel_running_token_returns_false(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    tok = blocked_worker(gate)
    assert tok.cancel_requested is False
    assert tok.cancel() is False
    assert tok.cancel_requested is True
    assert not tok.cancelled()
    assert tok.running()
    gate.set()
    assert tok.result(timeout=WAIT) == "released"
    assert tok.state == "completed"


# -- kill -----------------------------------------------------------------------------


def test_kill_queued_token(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocked_worker(gate)
    ran: list[int] = []
    tok = record(ran, 7)
    assert tok.kill("operator said so")
    assert tok.done()
    assert tok.state == "killed"
    assert tok.is_killed()
    with pytest.raises(TaskKilledError) as info:
        tok.result(timeout=WAIT)
    assert info.value.reason == "operator said so"
    assert "operator said so" in str(info.value)
    gate.set()
    time.sleep(0.1)
    assert ran == [], "a killed queued token must not run"


def test_kill_running_token(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    tok = blocked_worker(gate)
    assert tok.kill("too slow")
    assert tok.done()
    assert tok.state == "killed"
    with pytest.raises(TaskKilledError) as info:
        tok.result(timeout=1.0)  # resolves at once, even though the body still runs
    assert info.value.reason == "too slow"
    assert isinstance(tok.exception(timeout=1.0), TaskKilledError)
    gate.set()
    # the body finished on its own; the token stays killed, the pool keeps working
    assert ident(5).result(timeout=WAIT) == 5
    assert tok.state == "killed"


def test_kill_default_reason(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    tok = wait_on(gate)
    tok.kill()
    with pytest.raises(TaskKilledError) as info:
        tok.result(timeout=WAIT)
    assert info.value.reason == "admin_override"


# -- states ---------------------------------------------------------------------------


def test_state_strings_through_lifecycle(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocker = blocked_worker(gate)
    assert blocker.state == "executing"
    second_gate = threading.Event()
    try:
        queued = wait_on(second_gate)
        assert queued.state in ("created", "waiting", "admitted")
        assert queued.state in tokengate.TOKEN_STATES
        gate.set()
        assert blocker.result(timeout=WAIT) == "released"
        assert blocker.state == "completed"
        assert wait_until(lambda: queued.state == "executing")
    finally:
        second_gate.set()
    queued.result(timeout=WAIT)
    assert queued.state == "completed"
    failed = fail_with(RuntimeError("x"))
    failed.exception(timeout=WAIT)
    assert failed.state == "failed"


def test_token_id_unique(coordinator: OperationsCoordinator) -> None:
    toks = [ident(i) for i in range(200)]
    ids = [t.token_id for t in toks]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids)
    for t in toks:
        t.result(timeout=WAIT)


def test_operation_type_on_token(coordinator: OperationsCoordinator) -> None:
    tok = ident(1)
    assert tok.operation_type == "ident_op"
    tok.result(timeout=WAIT)


# -- tags -----------------------------------------------------------------------------


def test_tags_read_only(coordinator: OperationsCoordinator) -> None:
    tok = ident(1)
    tok.result(timeout=WAIT)
    assert tok.tags["weight"] == "light"
    assert tok.tags["priority"] == 3
    with pytest.raises(TypeError):
        tok.tags["weight"] = "heavy"  # type: ignore[index]
    with pytest.raises(TypeError):
        del tok.tags["weight"]  # type: ignore[attr-defined]
    assert tok.tags["weight"] == "light"
    with pytest.raises(TypeError):
        ident.tags["weight"] = "heavy"  # type: ignore[attr-defined]


def test_tags_are_a_copy_of_the_decorator_dict(coordinator: OperationsCoordinator) -> None:
    raw = {"weight": "heavy", "priority": 1}

    @task_token_guard(tags=raw)
    def g() -> int:
        return 1

    raw["weight"] = "light"
    raw["priority"] = 99
    raw["bogus"] = True
    tok = g()
    tok.result(timeout=WAIT)
    assert dict(tok.tags) == {"weight": "heavy", "priority": 1}
    assert dict(g.tags) == {"weight": "heavy", "priority": 1}  # type: ignore[attr-defined]


# -- timestamps and placement ---------------------------------------------------------


def test_timestamps_ordered(coordinator: OperationsCoordinator) -> None:
    before = time.time()

    @task_token_guard
    def slow() -> None:
        time.sleep(0.02)

    tok = slow()
    tok.result(timeout=WAIT)
    after = time.time()
    c, a, s, f = tok.created_at, tok.admitted_at, tok.started_at, tok.finished_at
    assert None not in (c, a, s, f)
    assert c <= a <= s <= f  # type: ignore[operator]
    assert before - 1 <= c and f <= after + 1  # type: ignore[operator]  # unix seconds
    wt, et = tok.wait_time(), tok.execution_time()
    assert wt is not None and wt >= 0
    assert et is not None and et >= 0.015  # it slept 20 ms
    assert et <= f - c + 0.01  # type: ignore[operator]


def test_timestamps_of_queued_token(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocked_worker(gate)
    tok = ident(1)
    assert tok.created_at is not None
    assert tok.started_at is None
    assert tok.finished_at is None
    assert tok.execution_time() is None
    wt = tok.wait_time()
    assert wt is not None and wt >= 0
    gate.set()
    tok.result(timeout=WAIT)


def test_worker_id_in_range(coordinator: OperationsCoordinator) -> None:
    toks = [ident(i) for i in range(50)]
    for t in toks:
        t.result(timeout=WAIT)
        assert t.worker_id in range(coordinator.total_workers), t.worker_id


def test_core_id_is_pinned_core() -> None:
    with OperationsCoordinator(max_workers=2, pin_workers=True) as c:
        toks = [ident(i) for i in range(20)]
        for t in toks:
            t.result(timeout=WAIT)
        # read after the tasks ran: every worker that ran one has pinned itself by now
        pinned = c.get_stats()["topology"]["pinned_cores"]
        assert len(pinned) == 2
        for t in toks:
            assert t.core_id is not None
            assert t.core_id in pinned, (t.core_id, pinned)
            assert t.core_id in os.sched_getaffinity(0)
            assert t.get_status()["core_id"] == t.core_id


def test_pinned_cores_reported_right_after_start() -> None:
    """The topology in get_stats() describes the pool as configured as soon as start() returns."""
    with OperationsCoordinator(max_workers=2, pin_workers=True) as c:
        pinned = c.get_stats()["topology"]["pinned_cores"]
        assert None not in pinned, f"pin_workers=True but get_stats() right after start() reports {pinned}"
        cores = sorted(os.sched_getaffinity(0))
        assert pinned == [cores[i % len(cores)] for i in range(2)]


def test_core_id_none_when_unpinned() -> None:
    with OperationsCoordinator(max_workers=2, pin_workers=False) as c:
        tok = ident(1)
        tok.result(timeout=WAIT)
        assert tok.core_id is None
        assert all(p is None for p in c.get_stats()["topology"]["pinned_cores"])


def test_get_status_keys(coordinator: OperationsCoordinator) -> None:
    tok = ident(3)
    tok.result(timeout=WAIT)
    st = tok.get_status()
    expected = {
        "token_id",
        "state",
        "operation_type",
        "tags",
        "created_at",
        "admitted_at",
        "started_at",
        "finished_at",
        "wait_time",
        "execution_time",
        "worker_id",
        "core_id",
        "cancel_requested",
    }
    assert expected <= set(st), expected - set(st)
    assert st["token_id"] == tok.token_id
    assert st["state"] == "completed"
    assert st["operation_type"] == "ident_op"
    assert st["worker_id"] == tok.worker_id
    assert st["cancel_requested"] is False


def test_repr_contents(coordinator: OperationsCoordinator) -> None:
    tok = ident(3)
    tok.result(timeout=WAIT)
    r = repr(tok)
    assert "TaskToken" in r
    assert str(tok.token_id) in r
    assert "ident_op" in r
    assert "completed" in r


# -- identity -------------------------------------------------------------------------


def test_identity_equality_and_hashing(coordinator: OperationsCoordinator) -> None:
    a, b = ident(1), ident(1)
    assert a.result(timeout=WAIT) == b.result(timeout=WAIT)
    assert a != b
    assert not (a == b)  # noqa: SIM201 - exercises __eq__ itself, not __ne__
    assert a == a
    s = {a, b, a}
    assert len(s) == 2
    assert a in s and b in s
    d = {a: "a", b: "b"}
    assert d[a] == "a" and d[b] == "b"


# -- done callbacks -------------------------------------------------------------------


def test_done_callback_registered_before_completion(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    calls: list[TaskToken[Any]] = []
    called = threading.Event()

    def cb(t: TaskToken[Any]) -> None:
        calls.append(t)
        called.set()

    tok = wait_on(gate)
    tok.add_done_callback(cb)
    time.sleep(0.05)
    assert calls == []
    gate.set()
    tok.result(timeout=WAIT)
    assert called.wait(WAIT)
    time.sleep(0.1)
    assert len(calls) == 1
    assert calls[0] is tok


def test_done_callback_registered_after_completion(coordinator: OperationsCoordinator) -> None:
    calls: list[TaskToken[Any]] = []
    tok = ident(2)
    tok.result(timeout=WAIT)
    tok.add_done_callback(calls.append)
    assert wait_until(lambda: len(calls) >= 1)
    time.sleep(0.05)
    assert len(calls) == 1 and calls[0] is tok


def test_done_callback_on_cancel(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocked_worker(gate)
    calls: list[TaskToken[Any]] = []
    tok = ident(1)
    tok.add_done_callback(calls.append)
    assert tok.cancel()
    assert wait_until(lambda: len(calls) == 1)
    assert calls[0] is tok


def test_done_callback_exception_is_logged(
    coordinator: OperationsCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    good: list[TaskToken[Any]] = []

    def bad(t: TaskToken[Any]) -> None:
        raise RuntimeError("callback exploded")

    # on the standard library's logger for it, as concurrent.futures.Future does
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        tok = ident(9)
        tok.add_done_callback(bad)
        tok.add_done_callback(good.append)
        assert tok.result(timeout=WAIT) == 9
        assert wait_until(lambda: len(good) == 1)
        assert wait_until(lambda: any(r.name == "concurrent.futures" for r in caplog.records))
    recs = [r for r in caplog.records if r.name == "concurrent.futures"]
    assert recs, caplog.records
    text = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in recs)
    assert "callback exploded" in text or any(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in recs), (
        text
    )
    # nothing broke: the token is completed and the pool still works
    assert tok.state == "completed"
    assert ident(10).result(timeout=WAIT) == 10


def test_remove_done_callback(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    calls: list[str] = []

    def cb1(t: TaskToken[Any]) -> None:
        calls.append("cb1")

    def cb2(t: TaskToken[Any]) -> None:
        calls.append("cb2")

    tok = wait_on(gate)
    tok.add_done_callback(cb1)
    tok.add_done_callback(cb2)
    tok.add_done_callback(cb1)
    assert tok.remove_done_callback(cb1) == 2
    assert tok.remove_done_callback(cb1) == 0
    gate.set()
    tok.result(timeout=WAIT)
    assert wait_until(lambda: calls == ["cb2"])
    time.sleep(0.1)
    assert calls == ["cb2"]
