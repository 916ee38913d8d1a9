"""A queued call's context copy is kept out of the cyclic GC while it waits (src/py/ffi.rs).

These tests stress the paths where that copy is released: after running, after a retry, when
the token is cancelled unrun, when a stop drops queued work, and when the garbage collector
runs meanwhile. A mistake here corrupts the GC's lists and crashes the interpreter, so each
test ends with full collections.
"""

from __future__ import annotations

import contextvars
import gc
import threading
import weakref

from tokengate import OperationsCoordinator, task_token_guard

VAR: contextvars.ContextVar[object] = contextvars.ContextVar("VAR", default=None)


@task_token_guard(operation_type="ctx_gc_read")
def read_var() -> object:
    return VAR.get()


_attempts: dict[str, int] = {}


@task_token_guard(operation_type="ctx_gc_flaky", tags={"retries": 2})
def flaky(key: str) -> object:
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] < 3:
        raise RuntimeError("not yet")
    return VAR.get()


def test_each_token_sees_its_callers_value_with_collections_in_between(coordinator: OperationsCoordinator) -> None:
    tokens = []
    for i in range(2000):
        VAR.set(i)
        tokens.append(read_var())
        if i % 500 == 0:
            gc.collect()
    assert [t.result(timeout=30) for t in tokens] == list(range(2000))
    gc.collect()


def test_retries_run_in_the_same_context(coordinator: OperationsCoordinator) -> None:
    VAR.set("retried")
    token = flaky("a")
    assert token.result(timeout=30) == "retried"
    assert token.attempts == 3
    gc.collect()


def test_cycles_among_context_values_are_still_collected(coordinator: OperationsCoordinator) -> None:
    class Node:
        pass

    def submit_with_cycle() -> weakref.ref[Node]:
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        ctx = contextvars.copy_context()

        def run() -> object:
            VAR.set(node)
            return read_var()

        token = ctx.run(run)
        assert token.result(timeout=30) is node
        return weakref.ref(node)

    ref = submit_with_cycle()
    for _ in range(3):
        gc.collect()
    assert ref() is None, "a reference cycle held only through a token's context was not collected"


def test_cancelled_and_dropped_calls_release_their_contexts() -> None:
    gate = threading.Event()

    @task_token_guard(operation_type="ctx_gc_gate")
    def wait_gate() -> None:
        gate.wait(10)

    for _ in range(3):
        coord = OperationsCoordinator(max_workers=1)
        coord.start()
        try:
            VAR.set(object())
            blocker = wait_gate()
            queued = [read_var() for _ in range(500)]
            for t in queued[::2]:
                t.cancel()
            gc.collect()
        finally:
            gate.set()
            coord.stop(cancel_pending=True, timeout=30)
            gate.clear()
        blocker.result(timeout=5)
        assert all(t.done() for t in queued)
        gc.collect()
    # A capture after the stops releases whatever a thread outside Python parked.
    with OperationsCoordinator(max_workers=1):
        VAR.set("after")
        assert read_var().result(timeout=10) == "after"
    for _ in range(2):
        gc.collect()


EMPTY_CALLER_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("EMPTY_CALLER_VAR", default="unset")
_left: dict[str, contextvars.Token[str]] = {}


@task_token_guard(operation_type="ctx_retry_empty_caller", tags={"retries": 1})
def set_then_fail(key: str) -> str:
    if key not in _attempts:
        _attempts[key] = 1
        EMPTY_CALLER_VAR.set("set by the first attempt")
        raise RuntimeError("first attempt")
    return EMPTY_CALLER_VAR.get()


def test_retries_of_a_caller_with_no_variable_set_share_one_context(coordinator: OperationsCoordinator) -> None:
    # A caller whose context is empty: the attempts still run in one context, as for any caller.
    token = contextvars.Context().run(set_then_fail, "empty-caller")
    assert token.result(timeout=30) == "set by the first attempt"


@task_token_guard(operation_type="ctx_leave_a_token")
def leave_context_empty_with_a_token() -> None:
    first = EMPTY_CALLER_VAR.set("a")
    _left["second"] = EMPTY_CALLER_VAR.set("secret")
    EMPTY_CALLER_VAR.reset(first)  # the context is empty again, but "second" belongs to it


@task_token_guard(operation_type="ctx_use_a_token")
def reset_with_the_left_token() -> str:
    try:
        EMPTY_CALLER_VAR.reset(_left["second"])
    except ValueError:
        return "refused"
    return f"reset in the same context, reads {EMPTY_CALLER_VAR.get()!r}"


def test_calls_of_empty_callers_never_share_a_context() -> None:
    with OperationsCoordinator(max_workers=1):
        empty = contextvars.Context()
        empty.run(leave_context_empty_with_a_token).result(timeout=30)
        assert contextvars.Context().run(reset_with_the_left_token).result(timeout=30) == "refused"
