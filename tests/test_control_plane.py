"""Control plane: pause/resume admission and operations, drain, kill, and stop.

Each control returns a count; killed tokens resolve with TaskKilledError,
drained ones are cancelled, and nothing is ever left unresolved.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import support
import tokengate
from support import Env
from tokengate import NotStartedError, OperationsCoordinator, TaskKilledError, TaskToken, task_token_guard

WAIT = 10.0


wait_until = functools.partial(support.wait_until, interval=0.002)


@task_token_guard(operation_type="cp_hold", tags={"weight": "light"})
def hold(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="cp_a", tags={"weight": "light"})
def op_a(log: list[Any], x: Any) -> Any:
    log.append(("a", x))
    return x


@task_token_guard(operation_type="cp_b", tags={"weight": "light"})
def op_b(log: list[Any], x: Any) -> Any:
    log.append(("b", x))
    return x


@task_token_guard(operation_type="cp_a", tags={"weight": "light"})
def op_a_wait(ev: threading.Event, state: dict[str, Any], limit: float = 30.0) -> str:
    """An operation 'cp_a' task that runs until ``ev`` is set, watching its cancel flag."""
    tok = tokengate.current_token()
    assert tok is not None
    end = time.monotonic() + limit
    while not ev.is_set() and time.monotonic() < end:
        if tok.cancel_requested:
            state["saw_cancel"] = True
        time.sleep(0.002)
    state["done"] = True
    return "a-finished"


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=1, blocker=hold) as e:
        yield e


def assert_cancelled(tok: TaskToken[Any]) -> None:
    assert tok.cancelled() and tok.state == "cancelled", tok.state
    with pytest.raises(concurrent.futures.CancelledError):
        tok.result(timeout=0)


# -- pause / resume admission -------------------------------------------------------------


def test_pause_admission_new_calls_wait_then_resume_runs_them_in_order(env: Env) -> None:
    c = env.coord()
    assert c.pause_admission() == 0
    log: list[Any] = []
    toks = [op_a(log, i) for i in range(5)]
    time.sleep(0.2)
    assert log == []
    assert [t.state for t in toks] == ["waiting"] * 5
    adm = c.get_stats()["admission"]
    assert adm["paused"] is True and adm["parked"] == 5
    assert c.resume_admission() == 5
    assert [t.result(timeout=WAIT) for t in toks] == list(range(5))
    assert log == [("a", i) for i in range(5)]
    assert c.get_stats()["admission"]["paused"] is False


def test_pause_admission_holds_tokens_already_queued(env: Env) -> None:
    """'Nothing unstarted starts': tokens queued before the pause wait too."""
    c = env.coord()
    ev, blocker = env.hold_worker()
    log: list[Any] = []
    toks = [op_a(log, i) for i in range(3)] + [op_a.options(priority=2)(log, "p")]
    assert c.pause_admission() == 4
    ev.set()
    blocker.result(timeout=WAIT)  # running tokens finish during a pause
    time.sleep(0.3)
    assert log == [], f"tokens started while admission was paused: {log}"
    assert not any(t.done() or t.running() for t in toks), [t.state for t in toks]
    c.resume_admission()
    assert [t.result(timeout=WAIT) for t in toks] == [0, 1, 2, "p"]


def test_pause_admission_lets_running_tokens_finish(env: Env) -> None:
    c = env.coord()
    ev, blocker = env.hold_worker()
    c.pause_admission()
    ev.set()
    assert blocker.result(timeout=WAIT) == "released"
    c.resume_admission()


# -- pause / resume operation ---------------------------------------------------------------


def test_pause_operation_holds_only_that_operation(env: Env) -> None:
    c = env.coord(max_workers=2)
    assert c.pause_operation("cp_a") == 0
    log: list[Any] = []
    a_toks = [op_a(log, i) for i in range(4)]
    b_toks = [op_b(log, i) for i in range(4)]
    assert [t.result(timeout=WAIT) for t in b_toks] == list(range(4))
    time.sleep(0.1)
    assert all(t.state == "waiting" for t in a_toks), [t.state for t in a_toks]
    assert [x for x in log if x[0] == "a"] == []
    op = c.get_stats()["operations"]["cp_a"]
    assert op["paused"] is True and op["parked"] == 4
    assert c.get_stats()["operations"]["cp_b"]["paused"] is False
    assert c.resume_operation("cp_a") == 4
    assert [t.result(timeout=WAIT) for t in a_toks] == list(range(4))
    assert sorted(x for x in log if x[0] == "a") == [("a", i) for i in range(4)]


def test_pause_operation_holds_tokens_already_queued(env: Env) -> None:
    c = env.coord()
    ev, _ = env.hold_worker()
    log: list[Any] = []
    a_toks = [op_a(log, i) for i in range(3)]
    b_toks = [op_b(log, i) for i in range(3)]
    assert c.pause_operation("cp_a") == 3
    ev.set()
    assert [t.result(timeout=WAIT) for t in b_toks] == [0, 1, 2]
    time.sleep(0.2)
    assert log == [("b", 0), ("b", 1), ("b", 2)]
    assert c.resume_operation("cp_a") == 3
    assert [t.result(timeout=WAIT) for t in a_toks] == [0, 1, 2]


def test_pause_operation_accepts_a_decorated_function(env: Env) -> None:
    c = env.coord()
    c.pause_operation(op_a)  # type: ignore[arg-type]
    tok = op_a([], 1)
    time.sleep(0.1)
    assert tok.state == "waiting"
    assert c.resume_operation(op_a) == 1  # type: ignore[arg-type]
    assert tok.result(timeout=WAIT) == 1


def test_resume_of_an_unpaused_operation_returns_zero(env: Env) -> None:
    c = env.coord()
    assert c.resume_operation("never_used") == 0
    assert c.resume_admission() == 0


# -- drain ------------------------------------------------------------------------------------


def test_drain_pool_cancels_everything_waiting(env: Env) -> None:
    c = env.coord()
    ev, blocker = env.hold_worker()
    log: list[Any] = []
    queued = [op_a(log, i) for i in range(3)] + [
        op_b.options(priority=3)(log, "p"),
        op_b.options(priority=-3)(log, "n"),
    ]
    c.pause_operation("cp_b")
    parked = [op_b(log, "parked1"), op_b(log, "parked2")]
    assert c.drain_pool() == 7
    for t in queued + parked:
        assert_cancelled(t)
    assert blocker.running(), "drain must not touch a running token"
    ev.set()
    assert blocker.result(timeout=WAIT) == "released"
    c.resume_operation("cp_b")
    time.sleep(0.1)
    assert log == []
    assert c.drain_pool() == 0
    assert c.get_stats()["tokens"]["cancelled"] == 7


def test_drain_operation_cancels_only_that_operation(env: Env) -> None:
    c = env.coord()
    ev, _ = env.hold_worker()
    log: list[Any] = []
    a_toks = [op_a(log, i) for i in range(4)]
    b_toks = [op_b(log, i) for i in range(3)]
    assert c.drain_operation("cp_a") == 4
    for t in a_toks:
        assert_cancelled(t)
    ev.set()
    assert [t.result(timeout=WAIT) for t in b_toks] == [0, 1, 2]
    assert log == [("b", 0), ("b", 1), ("b", 2)]
    assert c.drain_operation("cp_a") == 0


def test_drain_operation_of_a_paused_operation(env: Env) -> None:
    c = env.coord()
    c.pause_operation("cp_a")
    log: list[Any] = []
    toks = [op_a(log, i) for i in range(3)]
    assert c.drain_operation("cp_a") == 3
    for t in toks:
        assert_cancelled(t)
    op = c.get_stats()["operations"]["cp_a"]
    assert op["parked"] == 0, f"drained tokens still counted as parked: {op['parked']}"
    assert c.resume_operation("cp_a") == 0
    time.sleep(0.1)
    assert log == []


# -- kill -------------------------------------------------------------------------------------


def test_kill_token_running(env: Env) -> None:
    c = env.coord()
    ev = env.gate()
    state: dict[str, Any] = {}
    tok = op_a_wait(ev, state)
    assert wait_until(tok.running)
    t0 = time.monotonic()
    assert c.kill_token(tok.token_id, "operator said so") == 1
    with pytest.raises(TaskKilledError) as ei:
        tok.result(timeout=WAIT)
    assert time.monotonic() - t0 < 1.0
    assert ei.value.reason == "operator said so"
    assert tok.state == "killed" and tok.cancel_requested
    assert wait_until(lambda: state.get("saw_cancel", False)), "the body never saw its cancel flag"
    assert c.kill_token(tok.token_id, "again") == 0
    ev.set()
    assert wait_until(lambda: state.get("done", False))
    time.sleep(0.05)
    assert tok.state == "killed", "the body's late result replaced the kill"


def test_kill_token_queued_never_runs(env: Env) -> None:
    c = env.coord()
    ev, _ = env.hold_worker()
    log: list[Any] = []
    tok = op_a(log, "x")
    assert c.kill_token(tok.token_id) == 1
    with pytest.raises(TaskKilledError) as ei:
        tok.result(timeout=0)
    assert ei.value.reason == "admin_override"
    ev.set()
    assert op_b(log, "y").result(timeout=WAIT) == "y"
    assert log == [("b", "y")]


def test_kill_token_unknown_or_resolved_returns_zero(env: Env) -> None:
    c = env.coord()
    tok = op_a([], 1)
    tok.result(timeout=WAIT)
    assert c.kill_token(tok.token_id) == 0
    assert c.kill_token(10**15) == 0


def test_kill_all_by_operation(env: Env) -> None:
    c = env.coord(max_workers=2)
    ev = env.gate()
    state: dict[str, Any] = {}
    running = op_a_wait(ev, state)
    assert wait_until(running.running)
    hold_b = hold(ev)
    assert wait_until(hold_b.running)
    log: list[Any] = []
    queued_a = [op_a(log, i) for i in range(3)]
    queued_b = [op_b(log, i) for i in range(2)]
    assert c.kill_all_by_operation("cp_a", "bad batch") == 4
    for t in [running, *queued_a]:
        with pytest.raises(TaskKilledError, match="bad batch"):
            t.result(timeout=0)
    ev.set()
    assert [t.result(timeout=WAIT) for t in queued_b] == [0, 1]
    assert hold_b.result(timeout=WAIT) == "released"
    assert [x for x in log if x[0] == "a"] == []
    assert c.kill_all_by_operation("cp_a") == 0


def test_kill_all_operations_with_none(env: Env) -> None:
    c = env.coord()
    ev, blocker = env.hold_worker()
    c.pause_operation("cp_b")
    log: list[Any] = []
    toks = [op_a(log, 1), op_b(log, 2), op_a.options(priority=4)(log, 3)]
    assert c.kill_all_by_operation(None, "everything") == 4
    for t in [blocker, *toks]:
        assert t.state == "killed"
        assert isinstance(t.exception(timeout=0), TaskKilledError)
    ev.set()
    c.resume_operation("cp_b")
    time.sleep(0.1)
    assert log == []
    assert c.get_stats()["tokens"]["killed"] == 4


def test_killed_parked_token_is_not_run_after_resume(env: Env) -> None:
    c = env.coord()
    c.pause_admission()
    log: list[Any] = []
    toks = [op_a(log, i) for i in range(3)]
    assert toks[1].kill("no")
    c.resume_admission()
    assert toks[0].result(timeout=WAIT) == 0 and toks[2].result(timeout=WAIT) == 2
    assert log == [("a", 0), ("a", 2)]


# -- stop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_pending", [False, True])
def test_stop_cancels_tokens_held_by_a_pause(env: Env, cancel_pending: bool) -> None:
    c = env.coord(max_workers=2)
    c.pause_operation("cp_b")
    log: list[Any] = []
    held_op = [op_b(log, i) for i in range(3)]
    c.pause_admission()
    held_all = [op_a(log, i) for i in range(3)]
    t0 = time.monotonic()
    assert c.stop(cancel_pending=cancel_pending, timeout=WAIT) is True
    assert time.monotonic() - t0 < 5.0
    for t in held_op + held_all:
        assert_cancelled(t)
    assert log == []


@pytest.mark.parametrize("pause", ["admission", "operation"])
def test_stop_of_a_paused_coordinator_with_queued_tokens(env: Env, pause: str) -> None:
    """Tokens queued before a pause and still queued when stop() begins must not keep
    stop() waiting: the pause would hold them forever."""
    c = env.coord()
    ev, blocker = env.hold_worker()
    log: list[Any] = []
    toks = [op_a(log, i) for i in range(3)]
    if pause == "admission":
        c.pause_admission()
    else:
        c.pause_operation("cp_a")
    ev.set()  # the worker finishes the blocker and reaches the queued tokens during stop()
    t0 = time.monotonic()
    joined = c.stop(timeout=3.0)
    elapsed = time.monotonic() - t0
    assert blocker.result(timeout=0) == "released"
    assert all(t.done() for t in toks), [t.state for t in toks]
    assert joined is True and elapsed < 2.0, f"stop() returned {joined} after {elapsed:.2f}s"
    assert log == []


def _stop_with_blocked_callers(producers: int) -> list[str]:
    """One round: admission paused, max_pending full of parked tokens, ``producers`` callers
    blocked in admission, then stop(). Returns what went wrong (empty when nothing did)."""
    c = OperationsCoordinator(max_workers=1, max_pending=2).start()
    engine = c._engine
    assert engine is not None
    c.pause_admission()
    parked = [op_a([], 0), op_a([], 1)]
    out: list[Any] = []

    def producer() -> None:
        try:
            out.append(op_a([], "late"))
        except BaseException as exc:
            out.append(exc)

    threads = [threading.Thread(target=producer, daemon=True) for _ in range(producers)]
    for th in threads:
        th.start()
    problems: list[str] = []
    try:
        assert wait_until(lambda: c.get_stats()["admission"]["blocked_callers"] == producers)
        t0 = time.monotonic()
        joined = c.stop(timeout=1.0)
        stop_s = time.monotonic() - t0
        for th in threads:
            th.join(2.0)
        if not joined or stop_s > 0.9:
            problems.append(f"stop() returned {joined} after {stop_s:.2f}s")
        if any(th.is_alive() for th in threads):
            problems.append(f"{sum(th.is_alive() for th in threads)} caller(s) still blocked after stop()")
        if any(t.state != "cancelled" for t in parked):
            problems.append(f"parked tokens: {[t.state for t in parked]}")
        left = [o.state for o in out if isinstance(o, TaskToken) and not o.done()]
        if left:
            problems.append(f"callers got tokens that never resolve: states {left}")
    finally:
        # Clean up whatever the engine left behind, so a failure cannot hang the session.
        for _ in range(200):
            engine.resume_admission()
            engine.kill_all_by_operation(None, "test cleanup")
            if not any(th.is_alive() for th in threads):
                break
            time.sleep(0.01)
        c.stop(cancel_pending=True, timeout=5)
    return problems


def test_stop_releases_callers_blocked_at_a_paused_full_coordinator() -> None:
    """Callers blocked by max_pending while admission is paused must not end up with tokens
    that nothing resolves, and stop() must not wait for them (racy bug: up to 5 rounds)."""
    for round_ in range(5):
        problems = _stop_with_blocked_callers(producers=3)
        assert not problems, f"round {round_}: " + "; ".join(problems)


# -- not running ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.pause_admission(),
        lambda c: c.resume_admission(),
        lambda c: c.pause_operation("x"),
        lambda c: c.resume_operation("x"),
        lambda c: c.drain_pool(),
        lambda c: c.drain_operation("x"),
        lambda c: c.kill_token(1),
        lambda c: c.kill_all_by_operation(None),
    ],
)
def test_control_plane_needs_a_running_coordinator(call: Callable[[OperationsCoordinator], Any]) -> None:
    c = OperationsCoordinator(max_workers=1)
    with pytest.raises(NotStartedError):
        call(c)
    c.start()
    c.stop()
    with pytest.raises(NotStartedError):
        call(c)
