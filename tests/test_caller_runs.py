"""Caller runs: a thread outside the pool (not the main thread) that waits without a
timeout on a token no worker has started runs the token itself, within the core
limits, and only where nothing but the clock and the thread tell the difference.

Most tests hold the only worker with a blocker first, so that the token is still
queued when the caller waits (otherwise an idle worker may take it first).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support import Env, start_blocker, wait_until
from tokengate import OperationsCoordinator, TaskKilledError, TaskToken, task_token_guard

WAIT = 10.0


@task_token_guard(operation_type="cr_block", tags={"weight": "light"})
def block(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="cr_where", tags={"weight": "light"})
def where(x: Any = None) -> tuple[int, Any]:
    return threading.get_ident(), x


@task_token_guard(operation_type="cr_where_heavy", tags={"weight": "heavy"})
def where_heavy() -> int:
    return threading.get_ident()


@task_token_guard(operation_type="cr_wait_on", tags={"weight": "light"})
def wait_on(ev: threading.Event, limit: float = 30.0) -> int:
    ev.wait(limit)
    return threading.get_ident()


@task_token_guard(operation_type="cr_medium", tags={"weight": "medium"})
def medium_where() -> int:
    return threading.get_ident()


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=1) as e:
        yield e


def on_thread(env: Env, fn: Callable[[], Any]) -> tuple[int, list[Any]]:
    """Runs ``fn`` on a new thread and waits for it; returns the thread's ident and
    ``[value]`` or ``[exception]``."""
    out: list[Any] = []
    ident: list[int] = []

    def run() -> None:
        ident.append(threading.get_ident())
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    th = env.thread(run)
    th.join(WAIT)
    assert not th.is_alive(), "the waiting thread never returned"
    return ident[0], out


def hold_only_worker(env: Env, **kw: Any) -> threading.Event:
    env.coord(max_workers=1, **kw)
    ev = env.gate()
    start_blocker(block, ev)
    return ev


def test_a_waiting_thread_runs_a_queued_token_itself(env: Env) -> None:
    hold_only_worker(env)
    tokens: list[TaskToken[Any]] = []

    def submit_and_wait() -> Any:
        tokens.append(where("x"))
        return tokens[0].result()

    ident, out = on_thread(env, submit_and_wait)
    assert out == [(ident, "x")], "the body did not run on the waiting thread"
    tok = tokens[0]
    assert tok.state == "completed" and tok.worker_id is None and tok.execution_time() is not None


def test_every_token_runs_once_when_callers_and_workers_race() -> None:
    lock = threading.Lock()
    runs: dict[int, int] = {}

    @task_token_guard(operation_type="cr_count", tags={"weight": "light"})
    def count(i: int) -> int:
        with lock:
            runs[i] = runs.get(i, 0) + 1
        return i * 2

    per_thread, threads = 400, 4
    inline = [0]
    with Env(max_workers=2) as env:
        env.coord()
        errors: list[BaseException] = []

        def caller(base: int) -> None:
            try:
                for i in range(base, base + per_thread):
                    tok = count(i)
                    assert tok.result() == i * 2
                    if tok.worker_id is None:
                        with lock:
                            inline[0] += 1
            except BaseException as exc:
                errors.append(exc)

        ths = [env.thread(lambda b=k * per_thread: caller(b)) for k in range(threads)]
        for th in ths:
            th.join(60)
        assert not errors, errors[:3]
    assert runs == dict.fromkeys(range(per_thread * threads), 1)
    assert inline[0] > 0, "no caller ever ran its own token"


def test_the_main_thread_never_runs_a_token(env: Env) -> None:
    ev = hold_only_worker(env)
    tok = where()
    threading.Timer(0.3, ev.set).start()
    ident, _ = tok.result(timeout=WAIT)
    assert ident != threading.get_ident()
    assert tok.worker_id == 0


def test_a_wait_with_a_timeout_leaves_the_token_to_the_workers(env: Env) -> None:
    ev = hold_only_worker(env)

    def timed() -> Any:
        tok = where()
        try:
            return tok.result(timeout=0.3)
        finally:
            assert tok.state == "admitted"

    _, out = on_thread(env, timed)
    assert isinstance(out[0], concurrent.futures.TimeoutError), out
    ev.set()


@pytest.mark.parametrize(
    ("coord", "submit"),
    [
        pytest.param({}, lambda: where.options(timeout=30)(), id="deadline"),
        pytest.param({}, lambda: where_heavy(), id="heavy"),
        pytest.param({"caller_runs": False}, lambda: where(), id="caller_runs=False"),
    ],
)
def test_bodies_that_must_run_on_workers_do(
    env: Env, coord: dict[str, Any], submit: Callable[[], TaskToken[Any]]
) -> None:
    ev = hold_only_worker(env, **coord)
    tokens: list[TaskToken[Any]] = []

    def wait() -> Any:
        tokens.append(submit())
        threading.Timer(0.3, ev.set).start()
        return tokens[0].result()

    ident, out = on_thread(env, wait)
    assert tokens[0].worker_id == 0, "ran on the caller"
    assert out[0] != ident and (not isinstance(out[0], tuple) or out[0][0] != ident), out


def test_a_paused_operation_is_not_run_by_its_caller(env: Env) -> None:
    c = env.coord(max_workers=1)
    ev = env.gate()
    start_blocker(block, ev)
    c.pause_operation("cr_where")
    tokens: list[TaskToken[Any]] = []
    ident: list[int] = []

    def wait() -> Any:
        ident.append(threading.get_ident())
        tokens.append(where())
        return tokens[0].result()

    th = env.thread(wait)
    assert wait_until(lambda: bool(tokens))
    time.sleep(0.3)
    assert th.is_alive() and tokens[0].state == "waiting"
    c.resume_operation("cr_where")
    ev.set()
    assert tokens[0].result(timeout=WAIT)[0] != ident[0]
    th.join(WAIT)


def test_the_core_limit_holds_for_callers() -> None:
    # One core with one unit: the blocker holds it, so the caller may not run its token.
    with Env(max_workers=1) as env:
        # the blocker stands in for a token that uses its core: its units are not lent
        ev = hold_only_worker(env, workers_per_core=1, blocking_aware=False)
        tokens: list[TaskToken[Any]] = []
        th = env.thread(lambda: tokens.append(where()) or tokens[0].result())
        assert wait_until(lambda: bool(tokens))
        time.sleep(0.3)
        assert tokens[0].state == "admitted", "the caller ran a token past the core's units"
        ev.set()
        assert tokens[0].result(timeout=WAIT)
        th.join(WAIT)
        assert tokens[0].worker_id == 0


def test_a_caller_blocked_in_a_nested_wait_lends_its_units() -> None:
    # Budget 2 on the only core: the blocker holds 1, the caller's token the other.
    # The caller's body waits on a medium token (2 units, deadline: workers only),
    # which fits only if the blocked caller gives its unit back.
    with Env(max_workers=1) as env:
        ev = hold_only_worker(env, workers_per_core=2)

        @task_token_guard(operation_type="cr_outer", tags={"weight": "light"})
        def outer() -> tuple[int, int]:
            inner = medium_where.options(timeout=30)()
            ev.set()
            return threading.get_ident(), inner.result()

        tokens: list[TaskToken[Any]] = []
        ident, out = on_thread(env, lambda: tokens.append(outer()) or tokens[0].result())
        assert tokens[0].worker_id is None, "the outer token was meant to run on its caller"
        body_ident, inner_ident = out[0]
        assert body_ident == ident and inner_ident != ident


def test_kill_resolves_other_waiters_at_once_and_the_runner_after_the_body(env: Env) -> None:
    hold_only_worker(env)
    go = env.gate()
    tokens: list[TaskToken[Any]] = []
    out: list[Any] = []

    def run() -> None:
        tokens.append(wait_on(go))
        try:
            out.append(tokens[0].result())
        except BaseException as exc:
            out.append(exc)

    th = env.thread(run)
    assert wait_until(lambda: bool(tokens) and tokens[0].state == "executing")
    assert tokens[0].worker_id is None
    assert tokens[0].kill("test")
    with pytest.raises(TaskKilledError):
        tokens[0].result(timeout=1.0)
    assert th.is_alive() and out == [], "the caller returned before the body it runs"
    go.set()
    th.join(WAIT)
    assert isinstance(out[0], TaskKilledError), out
    assert tokens[0].state == "killed"


def test_stop_waits_for_a_token_a_caller_runs(env: Env) -> None:
    c = env.coord(max_workers=1)
    ev = env.gate()
    start_blocker(block, ev)
    go = env.gate()
    tokens: list[TaskToken[Any]] = []
    th = env.thread(lambda: tokens.append(wait_on(go)) or tokens[0].result())
    assert wait_until(lambda: bool(tokens) and tokens[0].state == "executing")
    ev.set()
    threading.Timer(0.3, go.set).start()
    t0 = time.monotonic()
    assert c.stop(timeout=WAIT)
    assert time.monotonic() - t0 >= 0.2, "stop() returned while a caller still ran a token"
    assert tokens[0].state == "completed"
    th.join(WAIT)


def test_stop_with_wait_inside_a_token_a_caller_runs_raises(env: Env) -> None:
    c = env.coord(max_workers=1)
    ev = env.gate()
    start_blocker(block, ev)

    @task_token_guard(operation_type="cr_stopper", tags={"weight": "light"})
    def stopper() -> str:
        try:
            c.stop()
        except RuntimeError as exc:
            return str(exc)
        return "stopped"

    _, out = on_thread(env, lambda: stopper().result())
    assert "from inside one of its own tasks" in out[0], out
    ev.set()


@task_token_guard(operation_type="cr_flaky", tags={"weight": "light"})
def flaky(log: list[tuple[float, str]], fail_first: int, on_first: Callable[[], None] | None = None) -> str:
    log.append((time.monotonic(), threading.current_thread().name))
    if len(log) == 1 and on_first is not None:
        on_first()
    if len(log) <= fail_first:
        raise ValueError(f"attempt {len(log)} fails")
    return "ok"


@pytest.mark.parametrize("how", ["drain", "stop"])
def test_drain_and_stop_leave_a_token_its_caller_runs(env: Env, how: str) -> None:
    # The token's job is still queued after its caller took the call: cancelling what is
    # queued must not cancel a token that runs.
    c = env.coord(max_workers=1)
    ev = env.gate()
    start_blocker(block, ev)
    go = env.gate()
    tokens: list[TaskToken[Any]] = []
    out: list[Any] = []
    th = env.thread(lambda: tokens.append(wait_on(go)) or out.append(tokens[0].result()))
    assert wait_until(lambda: bool(tokens) and tokens[0].state == "executing")
    assert tokens[0].worker_id is None
    if how == "drain":
        assert c.drain_pool() == 0
    else:
        c.stop(wait=False, cancel_pending=True)
    assert tokens[0].state == "executing"
    go.set()
    th.join(WAIT)
    assert tokens[0].state == "completed" and out and isinstance(out[0], int)


def test_a_retry_of_a_token_its_caller_ran_keeps_its_back_off(env: Env) -> None:
    ev = hold_only_worker(env)
    log: list[tuple[float, str]] = []
    tokens: list[TaskToken[Any]] = []

    def run() -> Any:
        # The first attempt frees the worker, which then pops the first attempt's job.
        tokens.append(flaky.options(retries=2)(log, 2, lambda: threading.Timer(0.01, ev.set).start()))
        return tokens[0].result()

    _, out = on_thread(env, run)
    assert out == ["ok"] and tokens[0].attempts == 3
    assert log[0][1] != log[1][1], "the first attempt was meant to run on its caller"
    gaps = [b[0] - a[0] for a, b in zip(log, log[1:])]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.08, f"a retry skipped its back-off (0.05 s, then 0.1 s): {gaps}"


def test_a_retry_of_a_token_its_caller_ran_waits_for_its_paused_operation(env: Env) -> None:
    c = env.coord(max_workers=1)
    ev = env.gate()
    start_blocker(block, ev)
    log: list[tuple[float, str]] = []
    tokens: list[TaskToken[Any]] = []

    def first_attempt() -> None:
        c.pause_operation("cr_flaky")
        threading.Timer(0.01, ev.set).start()

    th = env.thread(lambda: tokens.append(flaky.options(retries=1)(log, 1, first_attempt)) or tokens[0].result())
    time.sleep(0.5)
    assert len(log) == 1 and tokens[0].state == "waiting", f"the retry ran while its operation was paused: {log}"
    c.resume_operation("cr_flaky")
    assert tokens[0].result(timeout=WAIT) == "ok"
    th.join(WAIT)


def test_a_body_back_from_a_nested_wait_never_shares_a_heavy_tokens_core() -> None:
    with Env(max_workers=2) as env:
        c = env.coord(max_workers=2, workers_per_core=2, enable_convergence=False)
        if len(c.get_stats()["pool"]["core_units"]) < 2:
            pytest.skip("needs two cores")
        seen: list[tuple[list[int], list[int]]] = []
        heavy_gate = env.gate()
        # Both workers are held until the parent runs, so the parent can only run on its caller.
        release_workers = env.gate()
        for _ in range(2):
            start_blocker(block, release_workers)

        @task_token_guard(operation_type="cr_heavy_child", tags={"weight": "heavy"})
        def heavy_child() -> str:
            heavy_gate.wait(WAIT)
            return "heavy"

        @task_token_guard(operation_type="cr_light_parent", tags={"weight": "light"})
        def parent() -> str:
            release_workers.set()
            child = heavy_child()
            with pytest.raises(concurrent.futures.TimeoutError):
                child.result(timeout=0.3)  # lends this body's unit; the heavy child may take any core
            pool = c.get_stats()["pool"]
            seen.append((pool["core_units"], pool["core_heavy"]))
            heavy_gate.set()
            return child.result()

        tokens: list[TaskToken[Any]] = []
        _, out = on_thread(env, lambda: tokens.append(parent()) or tokens[0].result())
        assert out == ["heavy"] and tokens[0].worker_id is None
        units, heavy = seen[0]
        for used, h in zip(units, heavy):
            assert not h or used <= 2, f"a body took units on a core a heavy token holds: {seen[0]}"


def test_a_thread_running_an_event_loop_never_runs_a_token(env: Env) -> None:
    hold_only_worker(env)
    ev = env.gates[0]
    out: list[Any] = []

    @task_token_guard(operation_type="cr_asyncio_run", tags={"weight": "light"})
    def uses_asyncio_run() -> int:
        async def inner() -> int:
            return 42

        return asyncio.run(inner())

    def loop_thread() -> None:
        async def main() -> None:
            tok = uses_asyncio_run()
            threading.Timer(0.2, ev.set).start()
            out.append(tok.result())  # a blocking wait inside a coroutine, on purpose
            out.append(tok.worker_id)

        asyncio.run(main())

    th = env.thread(loop_thread)
    th.join(WAIT)
    assert out == [42, 0], out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_the_thread_that_forks_is_the_childs_main_thread() -> None:
    # The main-thread answer is cached per thread: a fork must invalidate it.
    result: list[int] = []

    def in_thread() -> None:
        with Env(max_workers=1) as env:
            ev = hold_only_worker(env)  # or, free-threaded, the worker may start it first
            assert where().result()[0] == threading.get_ident()  # caches "not the main thread"
            ev.set()
        pid = os.fork()
        if pid == 0:  # the child: this thread is its main thread now
            code = 0
            try:
                c = OperationsCoordinator(max_workers=1).start()
                ran_here = sum(where().result()[0] == threading.get_ident() for _ in range(20))
                c.stop()
                code = 10 if ran_here else 0
            except BaseException:
                code = 20
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        result.append(os.waitstatus_to_exitcode(status))

    th = threading.Thread(target=in_thread)
    th.start()
    th.join(60)
    assert result == [0], "the child's main thread ran tokens itself (10) or failed (20)"
