"""asyncio races: cancel versus complete, cancelling awaiting tasks,
contextvars, async as_completed timeouts and fn.map from coroutines."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import support
import tokengate
from support import os_thread_count, running_coordinator, wait_for_threads
from tokengate import OperationsCoordinator, TaskToken, task_token_guard

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

WAIT = 30.0  # generous: 2 shared cores


def wait_until(pred: Callable[[], bool], limit: float = WAIT) -> bool:
    return support.wait_until(pred, limit)


async def async_wait_until(pred: Callable[[], bool], limit: float = WAIT) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.005)
    return pred()


class Noise:
    """Records every call of the loop's exception handler and every 'asyncio' log record."""

    def __init__(self) -> None:
        self.handler_calls: list[dict[str, Any]] = []
        self.records: list[logging.LogRecord] = []
        outer = self

        class _H(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                outer.records.append(record)

        self._handler = _H(level=logging.DEBUG)
        self._logger = logging.getLogger("asyncio")

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(lambda _loop, ctx: self.handler_calls.append(ctx))

    def __enter__(self) -> Self:
        self._old_level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._old_level)

    def summary(self) -> list[str]:
        out = [str(c.get("message")) + " " + repr(c.get("exception")) for c in self.handler_calls]
        out += [r.getMessage() for r in self.records if r.levelno >= logging.INFO]
        return out


# -- helpers ---------------------------------------------------------------------------------------


@task_token_guard(operation_type="race_park", tags={"weight": "light"})
def park(ev: threading.Event, limit: float = 60.0) -> str:
    ev.wait(limit)
    return "released"


@task_token_guard(operation_type="race_record", tags={"weight": "light"})
def record(log: list[Any], x: Any) -> Any:
    log.append(x)
    return x


@task_token_guard(operation_type="race_watch", tags={"weight": "light"})
def watch_cancel_flag(ev: threading.Event) -> bool:
    ev.wait(WAIT)
    me = tokengate.current_token()
    assert me is not None
    return bool(me.cancel_requested)


@task_token_guard(operation_type="race_triple", tags={"weight": "light"})
def triple(x: int) -> int:
    return x * 3


# -- cancel versus complete --------------------------------------------------------------------


@task_token_guard(operation_type="race_quick", tags={"weight": "light"})
def quick(ledger: bytearray, i: int, spin: int) -> int:
    ledger[i] += 1
    end = time.perf_counter() + spin * 1e-6
    while time.perf_counter() < end:
        pass
    if i % 50 == 7:
        raise ValueError(i)
    return i * 7


async def _awaiter(tok: TaskToken[Any]) -> Any:
    return await tok


async def _cancel_later(task: asyncio.Task[Any], hops: int) -> None:
    for _ in range(hops):
        await asyncio.sleep(0)
    task.cancel()


def test_cancel_versus_complete_10k_rounds() -> None:
    rounds, batch = 10_000, 100
    ledger = bytearray(rounds)
    rng = random.Random(2024)
    lock = threading.Lock()
    thread_calls: Counter[int] = Counter()
    loop_calls: Counter[int] = Counter()
    outcomes: Counter[str] = Counter()
    violations: Counter[str] = Counter()
    examples: list[str] = []
    toks: list[TaskToken[Any]] = []
    modes: list[str] = []

    def bad(kind: str, detail: str) -> None:
        violations[kind] += 1
        if len(examples) < 8:
            examples.append(detail)

    def on_thread(tok: TaskToken[Any]) -> None:
        with lock:
            thread_calls[tok.token_id] += 1

    def on_loop(tok: TaskToken[Any]) -> None:
        loop_calls[tok.token_id] += 1  # runs on the loop thread

    async def main(noise: Noise) -> None:
        noise.install(asyncio.get_running_loop())
        for b in range(0, rounds, batch):
            tasks: list[tuple[int, str, asyncio.Task[Any]]] = []
            helpers: list[asyncio.Task[Any]] = []
            for i in range(b, b + batch):
                tok = quick(ledger, i, rng.choice((0, 0, 5, 20, 100)))
                toks.append(tok)
                tok._add_thread_callback(on_thread)
                tok.add_done_callback(on_loop)
                mode = rng.choice(("cancel", "wait_for_coro", "wait_for_token", "plain"))
                if mode == "cancel":
                    t = asyncio.ensure_future(_awaiter(tok))
                    helpers.append(asyncio.ensure_future(_cancel_later(t, rng.randrange(4))))
                elif mode == "wait_for_coro":
                    t = asyncio.ensure_future(asyncio.wait_for(_awaiter(tok), rng.choice((0, 1e-6, 1e-5, 1e-4, 1e-3))))
                elif mode == "wait_for_token":
                    t = asyncio.ensure_future(asyncio.wait_for(tok, rng.choice((0, 1e-6, 1e-5, 1e-4, 1e-3))))
                else:
                    t = asyncio.ensure_future(_awaiter(tok))
                tasks.append((i, mode, t))
                modes.append(mode)
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            _done, pending = await asyncio.wait([t for _, _, t in tasks] + helpers, timeout=WAIT)
            assert not pending, f"{len(pending)} awaiting tasks hung in batch {b // batch}"
            for i, mode, t in tasks:
                tok = toks[i]
                if t.cancelled():
                    kind = "cancelled"
                else:
                    exc = t.exception()
                    if exc is None:
                        kind = "result"
                        if t.result() != i * 7:
                            bad("wrong result", f"round {i} ({mode}): wrong result {t.result()!r}")
                    elif isinstance(exc, asyncio.TimeoutError) and mode.startswith("wait_for"):
                        kind = "timeout"
                    elif isinstance(exc, ValueError) and exc.args == (i,):
                        kind = "task error"
                    else:
                        kind = "other"
                        bad(
                            f"{mode}: unexpected {type(exc).__module__}.{type(exc).__qualname__}",
                            f"round {i} ({mode}): unexpected {exc!r}",
                        )
                outcomes[f"{mode}:{kind}"] += 1
                if kind in ("result", "task error") and tok.cancelled():
                    bad("outcome from a cancelled token", f"round {i} ({mode}): got an outcome from a cancelled token")
                if mode == "plain" and kind not in ("result", "task error"):
                    bad("plain await not resolved", f"round {i} (plain await): {kind}")
        # every token resolves; give the loop deliveries time to arrive
        assert await async_wait_until(lambda: all(t.done() for t in toks)), "tokens left unresolved"
        assert await async_wait_until(lambda: len(loop_calls) >= rounds and len(thread_calls) >= rounds, 10.0)
        await asyncio.sleep(0.1)
        gc.collect()  # "Future exception was never retrieved" is reported when a future is collected
        await asyncio.sleep(0)

    with OperationsCoordinator(max_workers=2), Noise() as noise:
        asyncio.run(main(noise))
        gc.collect()

    for i, tok in enumerate(toks):
        if thread_calls[tok.token_id] != 1 or loop_calls[tok.token_id] != 1:
            bad(
                "not resolved exactly once",
                f"round {i}: resolved {thread_calls[tok.token_id]} times (thread), {loop_calls[tok.token_id]} (loop)",
            )
        if tok.cancelled():
            # Only asyncio cancels a running token (wait_for cancels the token itself at its timeout
            # on 3.11, and on 3.12+ when the timeout is 0): then the body ran once and its outcome
            # was dropped. Else it never ran.
            if ledger[i] and not (modes[i] == "wait_for_token" and tok.cancel_requested and ledger[i] == 1):
                bad("cancelled token ran", f"round {i} ({modes[i]}): cancelled token ran {ledger[i]} times")
        elif ledger[i] != 1:
            bad("not run exactly once", f"round {i}: {tok.state} token ran {ledger[i]} times")
        elif tok.state not in ("completed", "failed"):
            bad("bad state", f"round {i}: state {tok.state}")
    states = Counter(t.state for t in toks)
    print(f"\n[asyncio-race] {rounds} rounds: states={dict(states)} outcomes={dict(sorted(outcomes.items()))}")
    print(f"[asyncio-race] violations={dict(violations)} noise={len(noise.summary())}")
    assert not violations, f"{sum(violations.values())} violations {dict(violations)}: {examples}"
    assert not noise.summary(), noise.summary()[:10]
    # the race is real: both sides won sometimes
    assert states["cancelled"] > 0 and states["completed"] > 0, states
    assert sum(v for k, v in outcomes.items() if k.endswith((":cancelled", ":timeout"))) > 0


def test_wait_for_token_timeout_raises_timeout_error(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    """asyncio.wait_for(token, t) on a token that cannot start in time: asyncio.TimeoutError, token cancelled."""
    ran: list[int] = []

    async def main() -> TaskToken[Any]:
        blocker = park(gate)
        assert await async_wait_until(blocker.running)
        queued = record(ran, 1)
        try:
            await asyncio.wait_for(queued, 0.05)
        except BaseException as exc:
            caught: BaseException = exc
        else:
            raise AssertionError("wait_for returned")
        assert isinstance(caught, asyncio.TimeoutError), (
            f"expected asyncio.TimeoutError, got {type(caught).__module__}.{type(caught).__qualname__}: {caught!r}"
        )
        assert queued.cancelled()
        gate.set()
        assert await blocker == "released"
        return queued

    asyncio.run(main())
    assert ran == []


@pytest.mark.parametrize("return_exceptions", [False, True])
def test_gather_with_cancelled_token_resolves(
    one_worker: OperationsCoordinator, gate: threading.Event, return_exceptions: bool
) -> None:
    """asyncio.gather over tokens, one of which is cancelled, resolves (CancelledError) without noise."""
    noise = Noise()

    async def main() -> None:
        noise.install(asyncio.get_running_loop())
        blocker = park(gate)
        assert await async_wait_until(blocker.running)
        fine = triple(2)
        doomed = triple(3)
        outer = asyncio.gather(fine, doomed, return_exceptions=return_exceptions)
        await asyncio.sleep(0.01)
        assert doomed.cancel() is True
        gate.set()
        done, _ = await asyncio.wait([outer], timeout=5.0)
        assert outer in done, f"gather never resolved; loop exception handler got {noise.summary()}"
        if return_exceptions:
            res = outer.result()
            assert res[0] == 6 and isinstance(res[1], asyncio.CancelledError), res
        else:
            with pytest.raises(asyncio.CancelledError):
                outer.result()
        # an already cancelled token given to gather
        outer2 = asyncio.gather(doomed, return_exceptions=return_exceptions)
        done, _ = await asyncio.wait([outer2], timeout=5.0)
        assert outer2 in done, f"gather of a cancelled token never resolved; handler got {noise.summary()}"
        assert await blocker == "released"

    with noise:
        asyncio.run(main())
    assert not noise.summary(), noise.summary()


# -- cancelling the awaiting task ----------------------------------------------------------------


def test_cancelling_awaiter_cancels_unstarted_token(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    ran: list[int] = []

    async def main() -> TaskToken[Any]:
        blocker = park(gate)
        assert await async_wait_until(blocker.running)
        queued = record(ran, 1)
        task = asyncio.ensure_future(_awaiter(queued))
        await asyncio.sleep(0.05)  # the task is suspended on the queued token
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert queued.cancelled() and queued.state == "cancelled"
        gate.set()
        assert await blocker == "released"
        assert await record(ran, 2) == 2  # the worker has passed the cancelled job
        return queued

    queued = asyncio.run(main())
    assert ran == [2], "the cancelled token ran"
    assert queued.done()


def test_cancelling_awaiter_sets_cancel_flag_of_running_token(
    one_worker: OperationsCoordinator, gate: threading.Event
) -> None:
    async def main() -> None:
        tok = watch_cancel_flag(gate)
        assert await async_wait_until(tok.running)
        task = asyncio.ensure_future(_awaiter(tok))
        await asyncio.sleep(0.05)
        assert not tok.cancel_requested
        task.cancel()
        assert await async_wait_until(lambda: tok.cancel_requested, 5.0), "cancel flag not set on the running token"
        assert tok.running() and not tok.cancelled()  # a running token is not cancelled
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        # the body saw the flag; its own outcome is kept on the token
        assert tok.result(timeout=WAIT) is True
        assert tok.state == "completed"

    asyncio.run(main())


@pytest.mark.parametrize(
    "how",
    [
        "task.cancel",
        pytest.param(
            "asyncio.timeout",
            marks=pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout is new in 3.11"),
        ),
    ],
)
def test_cancelled_await_of_running_token_returns_promptly(
    one_worker: OperationsCoordinator, gate: threading.Event, how: str
) -> None:
    """The awaiting side is released at once (as with asyncio.wrap_future / run_in_executor and
    the original tokengate); the running body keeps running with its cancel flag set."""

    async def main() -> float:
        tok = watch_cancel_flag(gate)
        assert await async_wait_until(tok.running)
        t0 = time.monotonic()
        if how == "task.cancel":
            task = asyncio.ensure_future(_awaiter(tok))
            await asyncio.sleep(0.05)
            task.cancel()
            coro: Any = task
            expected: type[BaseException] = asyncio.CancelledError
        else:

            async def with_timeout() -> Any:
                async with asyncio.timeout(0.1):  # type: ignore[attr-defined]
                    return await tok

            coro = with_timeout()
            expected = TimeoutError
        outer = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait([outer], timeout=3.0)
        waited = time.monotonic() - t0
        gate.set()  # release the worker whatever happened
        if not done:
            await asyncio.wait([outer], timeout=WAIT)
        assert outer in done, (
            f"{how}: the awaiting side was still blocked {waited:.1f} s after the cancel/timeout; it was released only "
            f"when the token finished ({outer!r}, state {tok.state})"
        )
        with pytest.raises(expected):
            outer.result()
        assert tok.cancel_requested
        assert await tok is True  # the token itself still completes
        return waited

    asyncio.run(main())


def test_wait_for_on_the_token_itself(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    """``asyncio.wait_for(token, t)`` on a running token raises ``TimeoutError`` at the timeout on
    every version, and sets the body's cancel flag. From Python 3.12, ``wait_for`` awaits through
    ``asyncio.timeout`` (for a timeout above 0): only that await ends, and the token completes. On 3.11 it cancels the
    token itself (its future) and waits for it to be done: on a thread running an event loop a
    token keeps asyncio's contract and is cancelled even while its body runs (before, 3.11's
    ``wait_for`` waited for the body and returned its result, with no timeout at all)."""

    async def main() -> None:
        tok = watch_cancel_flag(gate)
        assert await async_wait_until(tok.running)
        outer = asyncio.ensure_future(asyncio.wait_for(tok, 0.1))
        assert await async_wait_until(lambda: tok.cancel_requested, 5.0), "timeout did not set the cancel flag"
        done, _ = await asyncio.wait([outer], timeout=3.0)
        gate.set()
        assert outer in done, "wait_for was not released at its timeout"
        with pytest.raises(TimeoutError):
            outer.result()
        if sys.version_info >= (3, 12):
            assert await tok is True
            assert tok.state == "completed"
        else:
            assert tok.cancelled() and tok.state == "cancelled"
            with pytest.raises(asyncio.CancelledError):
                await tok
            await asyncio.sleep(0.1)  # the body returns meanwhile: its result is dropped
            assert tok.state == "cancelled"

    asyncio.run(main())


def test_asyncio_gather_of_running_tokens_is_cancelled_at_once(gate: threading.Event) -> None:
    """``asyncio.gather(*tokens)`` holds the tokens themselves as its children. Cancelling it (a
    timeout around it, Ctrl-C in ``asyncio.run``) cancels them, running ones included (asyncio's
    contract: a cancelled future is done at once), and the gather ends now, not when the bodies
    do. The bodies run on with their cancel flags set; a token that had not started never runs.
    Off the event loop's thread, ``cancel()`` keeps the concurrent.futures contract."""

    async def main() -> None:
        toks = [watch_cancel_flag(gate) for _ in range(3)]  # 2 workers: 2 run, 1 waits
        assert await async_wait_until(lambda: sum(t.running() for t in toks) == 2)
        running = [t for t in toks if t.running()]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*toks), 0.1)
        waited = time.monotonic() - t0
        gate.set()
        assert waited < 2.0, f"the gather ended {waited:.1f} s after its timeout of 0.1 s"
        assert [t.state for t in toks] == ["cancelled"] * 3
        assert all(t.cancel_requested for t in running)

    with running_coordinator(max_workers=2):
        asyncio.run(main())
        # off the loop: a running token is not cancelled, only flagged
        gate.clear()
        tok = watch_cancel_flag(gate)
        assert wait_until(tok.running, WAIT)
        assert tok.cancel() is False and tok.cancel_requested
        gate.set()
        assert tok.result(timeout=WAIT) is True


# -- contextvars -------------------------------------------------------------------------------

var: contextvars.ContextVar[str] = contextvars.ContextVar("tokengate_test_var", default="unset")


@task_token_guard(operation_type="race_ctx_get", tags={"weight": "light"})
def ctx_get() -> str:
    return var.get()


@task_token_guard(operation_type="race_ctx_set", tags={"weight": "light"})
def ctx_set_then_get(value: str) -> tuple[str, str]:
    before = var.get()
    var.set(value)
    return before, var.get()


def test_contextvar_visible_in_task_sync(one_worker: OperationsCoordinator) -> None:
    token = var.set("caller-sync")
    try:
        assert ctx_get().result(timeout=WAIT) == "caller-sync"
        # a value set inside a task stays there: not in the caller, not in the next task on the same worker
        assert ctx_set_then_get("inside").result(timeout=WAIT) == ("caller-sync", "inside")
        assert var.get() == "caller-sync"
        assert ctx_get().result(timeout=WAIT) == "caller-sync"
        var.set("caller-later")
        assert ctx_get().result(timeout=WAIT) == "caller-later"  # the context is copied at call time
    finally:
        var.reset(token)
    assert ctx_get().result(timeout=WAIT) == "unset"


def test_contextvar_snapshot_taken_at_call_time(one_worker: OperationsCoordinator, gate: threading.Event) -> None:
    blocker = park(gate)
    assert wait_until(blocker.running)
    token = var.set("at-call")
    try:
        queued = ctx_get()
        var.set("changed-after-call")
        gate.set()
        assert queued.result(timeout=WAIT) == "at-call"
    finally:
        var.reset(token)


def test_contextvar_visible_in_task_await(coordinator: OperationsCoordinator) -> None:
    async def one(k: int) -> tuple[str, tuple[str, str], str]:
        var.set(f"coro-{k}")
        await asyncio.sleep(0)
        seen = await ctx_get()
        inner = await ctx_set_then_get(f"inside-{k}")
        return seen, inner, var.get()

    async def main() -> list[Any]:
        var.set("main")
        out = await asyncio.gather(*(one(k) for k in range(20)))
        assert var.get() == "main"
        assert await ctx_get() == "main"
        return out

    out = asyncio.run(main())
    for k, (seen, inner, after) in enumerate(out):
        assert seen == f"coro-{k}"
        assert inner == (f"coro-{k}", f"inside-{k}")
        assert after == f"coro-{k}", "a value set inside the task leaked back to the awaiting coroutine"
    assert var.get() == "unset"


# -- as_completed and map ------------------------------------------------------------------------


def test_async_as_completed_timeout(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    async def main() -> list[int]:
        fast = [triple(i) for i in range(10)]
        slow = park(gate)
        seen: list[int] = []
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async for t in tokengate.as_completed(fast + [slow], timeout=0.5):
                seen.append(t.result(timeout=0))
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 10.0, elapsed
        assert not slow.done()
        gate.set()
        assert await slow == "released"
        # without a timeout problem it yields every token once
        again = [t async for t in tokengate.as_completed([*(triple(i) for i in range(5)), slow], timeout=WAIT)]
        assert len(again) == 6 and slow in again
        return seen

    seen = asyncio.run(main())
    assert sorted(seen) == [i * 3 for i in range(10)]


def test_sync_as_completed_timeout(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    fast = [triple(i) for i in range(10)]
    slow = park(gate)
    seen: list[int] = []
    with pytest.raises(TimeoutError):
        for t in tokengate.as_completed(fast + [slow], timeout=0.5):
            seen.append(t.result(timeout=0))
    assert sorted(seen) == [i * 3 for i in range(10)]


def test_await_map_100k_ordered(coordinator: OperationsCoordinator) -> None:
    async def main() -> list[int]:
        return await triple.map(range(100_000))  # type: ignore[attr-defined,no-any-return]

    t0 = time.perf_counter()
    out = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    print(f"\n[map] await fn.map(range(100_000)): {elapsed:.2f} s")
    assert out == [i * 3 for i in range(100_000)]
    stats = coordinator.get_stats()["tokens"]
    assert stats["submitted"] == 100_000 and stats["unresolved"] == 0


def test_sync_map_break_leaks_nothing(gate: threading.Event) -> None:
    base = os_thread_count()
    pulled: list[int] = []
    ran: list[int] = []

    @task_token_guard(operation_type="race_gated", tags={"weight": "light"})
    def gated(x: int) -> int:
        if x >= 10:
            gate.wait(WAIT)  # items past the ones consumed stay in flight until the loop is left
        ran.append(x)
        return x

    def source() -> Iterator[int]:
        for i in range(100_000):
            pulled.append(i)
            yield i

    with OperationsCoordinator(max_workers=2) as c:
        got = []
        for r in gated.map(source(), buffer=32):  # type: ignore[attr-defined]
            got.append(r)
            if len(got) == 10:
                break
        assert got == list(range(10))
        # the input was read lazily: at most the window beyond what was consumed
        assert len(pulled) <= 10 + 32 + 1, len(pulled)
        # leaving the loop cancelled the queued part of the window at once
        tokens = c.get_stats()["tokens"]
        assert tokens["cancelled"] >= len(pulled) - 10 - 2, tokens  # all but the (at most 2) running ones
        gate.set()
        # the running ones finish: nothing is left unresolved
        assert wait_until(lambda: c.get_stats()["tokens"]["unresolved"] == 0, 10.0), c.get_stats()["tokens"]
        tokens = c.get_stats()["tokens"]
        assert tokens["submitted"] == len(pulled)
        assert tokens["completed"] + tokens["cancelled"] == tokens["submitted"], tokens
        n_ran = len(ran)
    assert n_ran == tokens["completed"], (n_ran, tokens)
    assert sorted(ran)[:10] == list(range(10))
    assert wait_for_threads(base) <= base
