"""What a hostile new user tries: out-of-range numbers, exceptions that stop an event loop,
Ctrl-C in a coroutine, stop() with running bodies, StopIteration, cancel messages, a coordinator
nobody holds, fork inside a task, and errors that must name what is wrong."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from support import default_sigint, describe, run_script, running_coordinator
from tokengate import OperationsCoordinator, _tokengate, current_token, task_token_guard

WAIT = 10.0
HUGE_SECONDS = [1e20, 1e300, 2**63, 10**400, float("inf"), float("nan")]


@task_token_guard(operation_type="hostile_ident", tags={"weight": "light"})
def ident(x: Any) -> Any:
    return x


# -- numbers out of range: clean errors that name the setting -------------------------------------


@pytest.mark.parametrize("value", HUGE_SECONDS, ids=repr)
def test_huge_timeout_tag_is_refused_at_decoration(value: Any) -> None:
    with pytest.raises(ValueError, match="'timeout'"):
        task_token_guard(tags={"timeout": value})(ident.__wrapped__)


@pytest.mark.parametrize("value", HUGE_SECONDS, ids=repr)
def test_huge_timeout_option_is_refused_at_options(value: Any) -> None:
    with pytest.raises(ValueError, match="'timeout'"):
        ident.options(timeout=value)


def test_the_longest_timeout_allowed_runs_and_leaves_nothing_behind(coordinator: OperationsCoordinator) -> None:
    longest = _tokengate.MAX_SECONDS
    assert longest == threading.TIMEOUT_MAX or sys.platform != "linux"
    fn = task_token_guard(operation_type="hostile_longest", tags={"timeout": longest})(ident.__wrapped__)
    assert fn(3).result(timeout=WAIT) == 3
    assert ident.options(timeout=longest)(4).result(timeout=WAIT) == 4
    tokens = coordinator.get_stats()["tokens"]
    assert tokens.get("unresolved", 0) == 0, tokens


@pytest.mark.parametrize("name", ["aging", "io_idle_timeout", "convergence_interval"])
@pytest.mark.parametrize("value", [1e300, 2**63, float("nan"), 0, -1], ids=repr)
def test_huge_or_bad_durations_are_refused_at_construction(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        OperationsCoordinator(**{name: value})


@pytest.mark.parametrize("value", [10**30, -(10**30), 2**63])
def test_priority_out_of_range_names_the_tag(value: int) -> None:
    with pytest.raises(ValueError, match="'priority'"):
        task_token_guard(tags={"priority": value})(ident.__wrapped__)
    with pytest.raises(ValueError, match="'priority'"):
        ident.options(priority=value)


@pytest.mark.parametrize("value", [-1, float("nan"), "1"], ids=repr)
def test_bad_admission_timeout_is_refused_at_options(value: Any) -> None:
    with pytest.raises(ValueError, match="admission_timeout"):
        ident.options(admission_timeout=value)


@pytest.mark.parametrize("name", [" ", "\t\n", ""])
def test_blank_operation_type_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match="operation_type"):
        task_token_guard(operation_type=name)


def test_negative_ids_and_limits_get_errors_that_name_them(coordinator: OperationsCoordinator) -> None:
    assert coordinator.kill_token(-1) == 0  # no token has that id
    assert coordinator.kill_token(2**70) == 0
    with pytest.raises(ValueError, match="limit"):
        coordinator.get_recent_executions(-1)
    assert coordinator.get_recent_executions(2**70) == []


def test_a_panic_in_the_submit_path_is_a_clean_error_and_holds_no_slot() -> None:
    with running_coordinator(max_workers=2, max_pending=3) as c:
        _tokengate.set_fault_injection(1, site="submit")
        try:
            for _ in range(5):  # more calls than max_pending: a held slot would block the fourth
                with pytest.raises(RuntimeError, match="internal error while submitting"):
                    ident(1)
        finally:
            _tokengate.set_fault_injection(0)
        assert ident(2).result(timeout=WAIT) == 2
        tokens = c.get_stats()["tokens"]
        assert tokens.get("unresolved", 0) == 0, tokens
        assert c.stop(timeout=WAIT)


# -- SystemExit and KeyboardInterrupt stop the event loop, as with asyncio.to_thread ----------------

LOOP_STOP_SCRIPT = """
import asyncio, sys, time
from tokengate import OperationsCoordinator, task_token_guard
EXC = {"exit": SystemExit, "interrupt": KeyboardInterrupt}[sys.argv[1]]

@task_token_guard
def boom():
    time.sleep(0.2)  # the await suspends: the exception arrives through the loop
    raise EXC(2)

async def main():
    await boom()

with OperationsCoordinator():
    asyncio.run(main())
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("kind, code", [("exit", 2), ("interrupt", 130)])
def test_system_exit_and_keyboard_interrupt_from_a_body_stop_the_loop(tmp_path: Path, kind: str, code: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOOP_STOP_SCRIPT), kind],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    report = describe(proc)
    # the old drain reported the exception to the loop's handler and the loop ran on for ever
    # an uncaught KeyboardInterrupt ends CPython by SIGINT (-2) or with 130
    assert proc.returncode in (code, -signal.SIGINT), report
    assert "Exception in callback" not in proc.stderr, report
    if kind == "interrupt":
        assert "KeyboardInterrupt" in proc.stderr, report


CTRL_C_SCRIPT = """
import asyncio, time
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard
def slow():
    time.sleep(0.2)
    return 1

async def main():
    await slow()
    print("RESUMED", flush=True)  # a completion resumed this coroutine: Ctrl-C lands in it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pass
    print("NOT INTERRUPTED", flush=True)

with OperationsCoordinator():
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    except KeyboardInterrupt:
        print("CAUGHT", flush=True)
    finally:
        loop.close()
"""


@pytest.mark.subprocess
def test_ctrl_c_in_a_coroutine_resumed_by_a_token_reaches_run_until_complete(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CTRL_C_SCRIPT)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "RESUMED", line
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    report = f"rc={proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    assert "CAUGHT" in out and "NOT INTERRUPTED" not in out, report
    assert proc.returncode == 0, report


# -- stop(cancel_pending=True) asks running bodies to stop -----------------------------------------


@task_token_guard(operation_type="hostile_until_cancelled", tags={"weight": "light"})
def until_cancelled(started: threading.Event) -> str:
    started.set()
    me = current_token()
    assert me is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if me.cancel_requested:
            return "asked to stop"
        time.sleep(0.005)
    return "never asked"


@pytest.mark.parametrize("how", ["cancel_pending", "timeout"])
def test_stop_sets_cancel_requested_on_running_tokens(how: str) -> None:
    c = OperationsCoordinator(max_workers=2).start()
    started = threading.Event()
    tok = until_cancelled(started)
    assert started.wait(WAIT)
    t0 = time.monotonic()
    if how == "cancel_pending":
        c.stop(cancel_pending=True, timeout=WAIT)
    else:
        c.stop(timeout=0.3)  # the timeout passes with the body still running
    assert tok.result(timeout=WAIT) == "asked to stop"
    assert time.monotonic() - t0 < 5, "the body was not asked to stop"
    assert c.stop(timeout=WAIT)


# -- StopIteration and cancel messages on the asyncio path -----------------------------------------


@task_token_guard(operation_type="hostile_stop_iteration", tags={"weight": "light"})
def raises_stop_iteration(delay: float) -> None:
    time.sleep(delay)
    raise StopIteration("from the body")


@pytest.mark.parametrize("delay", [0.0, 0.1])
def test_stop_iteration_in_a_body_is_an_error_when_awaited(coordinator: OperationsCoordinator, delay: float) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="StopIteration") as info:
            await raises_stop_iteration(delay)
        assert isinstance(info.value.__cause__, StopIteration)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.gather(raises_stop_iteration(delay))
        results = await asyncio.gather(raises_stop_iteration(delay), return_exceptions=True)
        assert isinstance(results[0], RuntimeError), results

    asyncio.run(asyncio.wait_for(main(), WAIT))
    # off the loop, the token keeps concurrent.futures' contract: the body's exception itself
    with pytest.raises(StopIteration):
        raises_stop_iteration(0.0).result(timeout=WAIT)


@task_token_guard(operation_type="hostile_sleepy", tags={"weight": "light"})
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_cancel_message_reaches_the_awaiting_task(coordinator: OperationsCoordinator) -> None:
    async def main() -> None:
        async def waiter() -> None:
            await sleepy(0.5)

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.05)
        task.cancel("my message")
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert info.value.args == ("my message",)

        # a token asyncio holds as its future (gather) keeps the message too
        tok = sleepy(0.5)
        outer = asyncio.gather(tok)
        await asyncio.sleep(0.05)
        outer.cancel("gather message")
        with pytest.raises(asyncio.CancelledError) as info:
            await outer
        assert "gather message" in info.value.args, info.value.args
        assert tok._cancel_message == "gather message"

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_anyio_cancel_scopes_around_await_token(coordinator: OperationsCoordinator) -> None:
    anyio = pytest.importorskip("anyio")

    async def main() -> list[str]:
        seen = []
        with anyio.move_on_after(0.1) as scope:
            await sleepy(0.5)
        seen.append(f"moved on: {scope.cancelled_caught}")
        with pytest.raises(TimeoutError), anyio.fail_after(0.1):
            await sleepy(0.5)
        seen.append("failed after")
        return seen

    # before, anyio could not tell its own cancellation apart and a CancelledError escaped anyio.run
    assert anyio.run(main) == ["moved on: True", "failed after"]


# -- a started coordinator is a service ------------------------------------------------------------


@pytest.mark.subprocess
def test_a_coordinator_nobody_holds_runs_until_stop_or_exit(tmp_path: Path) -> None:
    proc = run_script(
        """
        import gc
        from tokengate import OperationsCoordinator, task_token_guard

        @task_token_guard
        def double(x):
            return 2 * x

        def setup():
            OperationsCoordinator(max_workers=2).start()  # no reference kept

        setup()
        gc.collect()
        print("RESULT", double(21).result(timeout=10), flush=True)
        """,
        tmp_path,
    )
    report = describe(proc)
    assert proc.returncode == 0 and "RESULT 42" in proc.stdout, report
    assert proc.stderr == "", report


def test_a_stopped_coordinator_nobody_holds_is_released() -> None:
    import weakref

    c = OperationsCoordinator(max_workers=1).start()
    ref = weakref.ref(c)
    c.stop()
    del c
    gc.collect()
    assert ref() is None, "stop() must let go of the coordinator"


# -- fork inside a task ----------------------------------------------------------------------------

FORK_IN_TASK_SCRIPT = """
import os, sys, time
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard
def fork_and_wait(how):
    pid = os.fork()
    if pid == 0:
        print("CHILD", os.getpid(), flush=True)
        if how == "exit":
            sys.exit(7)
        if how == "raise":
            raise ValueError("in the child")
        return "child value"  # how == "return": the child ends here
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "child hung"

with OperationsCoordinator(max_workers=2):
    print("PARENT GOT", fork_and_wait(sys.argv[1]).result(timeout=20), flush=True)
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("how, code", [("return", 0), ("exit", 7), ("raise", 1)])
def test_a_child_forked_inside_a_task_ends_when_the_body_returns(tmp_path: Path, how: str, code: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FORK_IN_TASK_SCRIPT), how],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=40,
    )
    report = describe(proc)
    assert f"PARENT GOT {code}" in proc.stdout, report
    assert proc.stdout.count("CHILD") == 1, report
    assert proc.returncode == 0, report
    if how == "raise":
        assert "ValueError: in the child" in proc.stderr, report


# -- callables and calls --------------------------------------------------------------------------


class Shapes:
    factor = 10

    @task_token_guard(operation_type="hostile_static")
    @staticmethod
    def static(x: int) -> int:
        return x + 1

    @task_token_guard(operation_type="hostile_class")
    @classmethod
    def klass(cls, x: int) -> int:
        return x * cls.factor


def test_guard_over_staticmethod_and_classmethod(coordinator: OperationsCoordinator) -> None:
    assert Shapes.static(1).result(timeout=WAIT) == 2
    assert Shapes().static(1).result(timeout=WAIT) == 2  # through an instance: no self is passed
    assert Shapes.klass(2).result(timeout=WAIT) == 20
    assert Shapes().klass(3).result(timeout=WAIT) == 30
    assert Shapes.__dict__["static"].__func__.operation_type == "hostile_static"


@task_token_guard(operation_type="hostile_add", tags={"weight": "light"})
def add(a: int, b: int, c: int = 0) -> int:
    return a + b + c


def test_map_takes_several_iterables_like_map(coordinator: OperationsCoordinator) -> None:
    assert list(add.map([1, 2, 3], [10, 20, 30, 40])) == [11, 22, 33]  # the shortest ends it
    assert list(add.map([1], [2], [3])) == [6]

    async def main() -> list[int]:
        return await add.map(range(3), range(3), buffer=2)

    assert asyncio.run(main()) == [0, 2, 4]
    with pytest.raises(TypeError, match="at least one iterable"):
        add.map()


@pytest.mark.subprocess
def test_an_exception_in_a_done_callback_is_reported_by_default(tmp_path: Path) -> None:
    proc = run_script(
        """
        import time
        from tokengate import OperationsCoordinator, task_token_guard

        @task_token_guard
        def f():
            time.sleep(0.05)
            return 1

        def bad(token):
            raise RuntimeError("callback exploded")

        with OperationsCoordinator():
            t = f()
            t.add_done_callback(bad)
            print("RESULT", t.result(timeout=10), flush=True)
            time.sleep(0.2)
        """,
        tmp_path,
    )
    report = describe(proc)
    assert proc.returncode == 0 and "RESULT 1" in proc.stdout, report
    # as concurrent.futures.Future reports it: on its logger, printed without any logging set-up
    assert "exception calling callback for" in proc.stderr, report
    assert "RuntimeError: callback exploded" in proc.stderr, report


class Bare:
    @task_token_guard
    @staticmethod
    def static(x: int) -> int:
        return -x

    @task_token_guard
    @classmethod
    def klass(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"


def test_bare_guard_over_staticmethod_and_classmethod(coordinator: OperationsCoordinator) -> None:
    assert Bare().static(2).result(timeout=WAIT) == -2
    assert Bare.klass(3).result(timeout=WAIT) == "Bare:3"


def test_cancel_with_a_message_keeps_no_frame_alive(coordinator: OperationsCoordinator) -> None:
    # The message is kept, not a raised CancelledError: one that was raised through the
    # awaiting frame would keep that frame (and everything it holds) alive from the token.
    import weakref

    class Marker:
        pass

    refs: list[weakref.ref[Marker]] = []
    kept: list[Any] = []

    async def main() -> None:
        marker = Marker()
        refs.append(weakref.ref(marker))
        t = sleepy(0.3)
        kept.append(t)
        t.cancel("bye")
        with pytest.raises(asyncio.CancelledError) as info:
            await t
        assert info.value.args == ("bye",)
        assert t._cancel_message == "bye"

    asyncio.run(main())
    gc.collect()
    assert refs[0]() is None, "a frame of the awaiting coroutine is still alive"
    assert kept[0].cancelled()


class Unhashable(OperationsCoordinator):
    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = None  # type: ignore[assignment]


def test_an_unhashable_coordinator_subclass_starts_and_stops() -> None:
    c = Unhashable(max_workers=1).start()
    assert ident(5).result(timeout=WAIT) == 5
    assert c.stop(timeout=WAIT)
    assert _tokengate.active_engine_count() == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"process_workers": 10**12}, "process_workers"),
        ({"process_prefetch": 2**62}, "process_prefetch"),
        ({"stack_size": 2**62}, "stack_size"),
    ],
)
def test_sizes_out_of_range_are_refused_at_construction(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        OperationsCoordinator(**kwargs)


def test_a_huge_integer_admission_timeout_means_no_bound(coordinator: OperationsCoordinator) -> None:
    assert ident.options(admission_timeout=10**400)(6).result(timeout=WAIT) == 6
