"""Reliability: cancellation storm, no lost results (with stop races and injected panics),
start/stop churn, big-argument release, and the misuse cases not covered elsewhere.

Misuse cases of the reliability requirements, and where each is tested:

* async and generator callables, bad tags, wrong arity: test_decorator.py
* a call before start: test_smoke.py ``test_call_without_coordinator_raises``; after stop,
  stop twice, restart: test_coordinator.py, test_executor.py ``test_run_after_shutdown``,
  plus the stop-versus-submit race in :func:`test_no_lost_results` here
* nested submit and wait: test_coordinator.py ``test_nested_decorated_calls``
* deep recursion, Ctrl-C, fork, interpreter exit: test_subprocess.py
* an exception inside a task, injected panics: test_errors.py; panics mixed with cancels and
  stop races: :func:`test_no_lost_results` here
* huge arguments: :func:`test_big_argument_released_rss` and :func:`test_arguments_released_weakref` here
* a coordinator collected without stop: test_executor.py ``test_del_shutdown`` and the section here
* two loops, a finished token, self-wait, a closed loop: the "waiting from the wrong place" section here
* contextvars: test_asyncio_races.py
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import support
import tokengate
from support import fd_count, os_thread_count, rss_mb, wait_for_threads
from tokengate import (
    NotStartedError,
    OperationsCoordinator,
    ShutdownError,
    TaskPanicError,
    TaskToken,
    _tokengate,
    task_token_guard,
)

WAIT = 30.0  # generous: 2 shared cores


def wait_until(pred: Callable[[], bool], limit: float = WAIT) -> bool:
    return support.wait_until(pred, limit)


@task_token_guard(operation_type="rel_park", tags={"weight": "light"})
def park(ev: threading.Event, limit: float = 60.0) -> str:
    ev.wait(limit)
    return "released"


# -- cancellation storm ------------------------------------------------------------------------


@task_token_guard(operation_type="rel_storm", tags={"weight": "light"})
def storm_task(i: int, ledger: bytearray) -> int:
    ledger[i] += 1  # distinct index per task: no lost update between workers
    return i * 2 + 1


def _storm_round(n: int, seed: int) -> dict[str, Any]:
    """One round: park 8 workers, queue ``n`` cheap tokens, 2 threads cancel random tokens
    while the gate opens; then check the ledger. Returns the round's figures."""
    rng = random.Random(seed)
    gate = threading.Event()
    ledger = bytearray(n)
    c = OperationsCoordinator(max_workers=8).start()
    cancellers: list[threading.Thread] = []
    try:
        blockers = [park(gate) for _ in range(8)]
        assert wait_until(lambda: all(b.running() for b in blockers)), [b.state for b in blockers]
        toks = [storm_task(i, ledger) for i in range(n)]

        # Each canceller has its own record of cancel() == True (no shared counters), and its own
        # random picks, overlapping the other's so that some tokens get cancel() twice.
        said_true = [bytearray(n), bytearray(n)]
        picks = [rng.sample(range(n), int(n * 0.35)) for _ in range(2)]
        third_done = [threading.Event(), threading.Event()]

        def cancel_some(k: int) -> None:
            mine, rec, mark = picks[k], said_true[k], len(picks[k]) // 3
            for j, i in enumerate(mine):
                if toks[i].cancel():
                    rec[i] = 1
                if j == mark:
                    third_done[k].set()
            third_done[k].set()

        cancellers = [threading.Thread(target=cancel_some, args=(k,)) for k in range(2)]
        t0 = time.perf_counter()
        for t in cancellers:
            t.start()
        for ev in third_done:
            assert ev.wait(WAIT)
        gate.set()  # the workers start draining while the cancellers keep going
        for t in cancellers:
            t.join(WAIT)
            assert not t.is_alive()
        assert c.stop(wait=True, timeout=120) is True
        elapsed = time.perf_counter() - t0
    finally:
        gate.set()
        for t in cancellers:
            t.join(WAIT)
        c.stop(cancel_pending=True, timeout=30)

    violations: Counter[str] = Counter()
    examples: list[str] = []

    def bad(kind: str, i: int, tok: TaskToken[Any]) -> None:
        violations[kind] += 1
        if len(examples) < 5:
            examples.append(f"{kind}: task {i} state={tok.state} ran={ledger[i]}")

    cancelled = ran = 0
    for i, tok in enumerate(toks):
        said = said_true[0][i] or said_true[1][i]
        if not tok.done():
            bad("not done after stop(wait=True)", i, tok)
            continue
        if tok.cancelled():
            cancelled += 1
            if not said:
                bad("cancelled but no cancel() returned True", i, tok)
            if ledger[i] != 0:
                bad("cancelled but ran", i, tok)
            if tok.state != "cancelled":
                bad("cancelled() true but state differs", i, tok)
        else:
            ran += ledger[i] == 1
            if said:
                bad("cancel() returned True but not cancelled", i, tok)
            if ledger[i] != 1:
                bad(f"not cancelled but ran {ledger[i]} times", i, tok)
            elif tok.state != "completed" or tok.result(timeout=0) != i * 2 + 1:
                bad("wrong state or result", i, tok)
    for b in blockers:
        if b.state != "completed":
            violations["blocker not completed"] += 1
    return {
        "n": n,
        "cancelled": cancelled,
        "ran": ran,
        "violations": sum(violations.values()),
        "by_kind": dict(violations),
        "examples": examples,
        "seconds": round(elapsed, 3),
    }


def _run_storm(rounds: int, n: int) -> None:
    total_violations = 0
    for r in range(rounds):
        fig = _storm_round(n, seed=1000 + r)
        print(
            f"\n[storm] round {r + 1}/{rounds}: {fig['n']} tasks, {fig['cancelled']} cancelled "
            f"({100.0 * fig['cancelled'] / fig['n']:.1f} %), {fig['ran']} ran, "
            f"{fig['violations']} violations, {fig['seconds']} s"
        )
        # the cancellers must really race the workers: some cancelled, some not
        assert 0 < fig["cancelled"] < fig["n"], fig
        assert fig["violations"] == 0, (
            f"{fig['violations']} violations in round {r + 1}: {fig['by_kind']} {fig['examples']}"
        )
        total_violations += fig["violations"]
    assert total_violations == 0


def test_cancellation_storm_one_round() -> None:
    _run_storm(rounds=1, n=100_000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cancellation_storm_many_rounds() -> None:
    _run_storm(rounds=100, n=100_000)


# -- no lost results ---------------------------------------------------------------------------


@task_token_guard(operation_type="rel_work", tags={"weight": "light"})
def work(ledger: bytearray, i: int, fail: bool) -> int:
    ledger[i] += 1
    if fail:
        raise ValueError(i)
    return i * 3


@pytest.mark.parametrize(
    "stop_mode, faults",
    [("wait", False), ("cancel_pending", False), ("wait", True), ("cancel_pending", True)],
)
def test_no_lost_results(stop_mode: str, faults: bool) -> None:
    """8 submitters; 1 % of tasks raise, 10 % get cancel(), stop() races the submissions (and,
    with ``faults``, tokengate itself panics in 1 % of tasks). Every token a submitter got
    resolves exactly once, in a terminal state consistent with what happened to it."""
    # Submitters keep going until stop() has refused them a while, so the race always happens;
    # per_thread only caps the work if stop() were very late.
    n_threads, per_thread, refusals_to_quit = 8, 50_000, 200
    rng = random.Random(42 if faults else 7)
    stop_after = rng.randrange(10_000, 20_000)
    c = OperationsCoordinator(max_workers=4).start()

    lock = threading.Lock()
    calls: Counter[int] = Counter()

    def on_done(tok: TaskToken[Any]) -> None:
        with lock:
            calls[tok.token_id] += 1

    ledgers = [bytearray(per_thread) for _ in range(n_threads)]
    got: list[list[tuple[int, TaskToken[Any], bool, bool]]] = [[] for _ in range(n_threads)]
    refused: Counter[str] = Counter()
    errors: list[BaseException] = []
    submitted = [0] * n_threads
    attempts = [0] * n_threads
    late_accepts: list[str] = []
    stop_returned = threading.Event()
    go = threading.Barrier(n_threads + 1)

    def submitter(k: int) -> None:
        r = random.Random(k)
        ledger = ledgers[k]
        go.wait()
        my_refusals = 0
        for i in range(per_thread):
            fail = r.random() < 0.01
            after_stop = stop_returned.is_set()
            attempts[k] += 1
            try:
                tok = work(ledger, i, fail)
            except (NotStartedError, ShutdownError) as exc:
                with lock:
                    refused[type(exc).__name__] += 1
                my_refusals += 1
                if my_refusals >= refusals_to_quit:
                    return
                continue
            except BaseException as exc:
                errors.append(exc)
                return
            if after_stop or my_refusals:
                late_accepts.append(
                    f"thread {k} task {i}: accepted after {'stop() returned' if after_stop else 'a refusal'}"
                )
            tok.add_done_callback(on_done)
            said = tok.cancel() if r.random() < 0.10 else False
            got[k].append((i, tok, fail, said))
            submitted[k] += 1
            if i % 64 == 0:
                time.sleep(0)  # let the others in

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(n_threads)]
    if faults:
        _tokengate.set_fault_injection(100)
    try:
        for t in threads:
            t.start()
        go.wait()
        assert wait_until(lambda: sum(submitted) >= stop_after)
        if stop_mode == "wait":
            assert c.stop(wait=True, timeout=120) is True
        else:
            assert c.stop(cancel_pending=True, timeout=120) is True
        stop_returned.set()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
    finally:
        if faults:
            _tokengate.set_fault_injection(0)
        for t in threads:
            t.join(WAIT)
        c.stop(cancel_pending=True, timeout=30)
    assert not errors, errors
    assert not late_accepts, late_accepts[:5]

    all_tokens = [entry for per in got for entry in per]
    n_tokens = len(all_tokens)
    assert n_tokens == sum(submitted)
    # every token resolves (the ones accepted while stop() ran included)
    unresolved = [tok for _, tok, _, _ in all_tokens if not wait_until(tok.done, 10.0)]
    assert not unresolved, f"{len(unresolved)} tokens never resolved, e.g. {unresolved[:3]}"
    # callbacks run on the resolving thread right after done() flips: wait for the last ones,
    # then a little longer so that a second (double) resolution would show
    assert wait_until(lambda: sum(calls.values()) >= n_tokens, 10.0)
    time.sleep(0.2)

    violations: Counter[str] = Counter()
    examples: list[str] = []
    states: Counter[str] = Counter()
    panicked = executed = 0
    for k, per in enumerate(got):
        for i, tok, fail, said in per:
            ran = ledgers[k][i]
            state = tok.state
            states[state] += 1
            problem = None
            if calls[tok.token_id] != 1:
                problem = f"done callback ran {calls[tok.token_id]} times"
            elif state not in ("completed", "failed", "cancelled"):
                problem = "non-terminal state"
            elif said and state != "cancelled":
                problem = "cancel() returned True but not cancelled"
            elif state == "cancelled":
                if ran:
                    problem = "cancelled but ran"
                if not said and stop_mode == "wait":
                    problem = "cancelled without cancel() under stop(wait=True)"
            elif ran > 1:
                problem = f"ran {ran} times"
            else:
                exc = tok.exception(timeout=0)
                if isinstance(exc, TaskPanicError):
                    panicked += 1
                    if not faults:
                        problem = "TaskPanicError without fault injection"
                elif ran != 1:
                    problem = f"{state} but ran {ran} times"
                elif fail:
                    if not (isinstance(exc, ValueError) and exc.args == (i,)):
                        problem = f"expected ValueError({i}), got {exc!r}"
                elif exc is not None or tok.result(timeout=0) != i * 3:
                    problem = f"wrong outcome {exc!r}"
                executed += 1
            if problem:
                violations[problem] += 1
                if len(examples) < 5:
                    examples.append(f"thread {k} task {i}: {problem} (state={state}, ran={ran})")
    extra = set(calls) - {tok.token_id for _, tok, _, _ in all_tokens}
    print(
        f"\n[no-lost-results stop={stop_mode} faults={faults}] tokens={n_tokens} refused={dict(refused)} "
        f"states={dict(states)} panicked={panicked} violations={sum(violations.values())}"
    )
    assert not extra, f"callbacks for unknown tokens: {sorted(extra)[:5]}"
    assert sum(violations.values()) == 0, f"{sum(violations.values())} violations: {dict(violations)} {examples}"
    # the race really happened: some calls were accepted, some refused after stop()
    assert n_tokens >= stop_after
    assert sum(refused.values()) > 0, "no submission raced stop(): the test did not test the race"
    assert n_tokens + sum(refused.values()) == sum(attempts)
    assert max(attempts) < per_thread, "a submitter ran out of work before stop(): the race was not tested"
    if faults:
        # the hook panics in every 100th executed task (panicked bodies never run)
        assert panicked > 0
        assert abs(panicked - executed // 100) <= 1, (panicked, executed)


def test_stop_wait_false_still_runs_queued_tokens(gate: threading.Event) -> None:
    """stop(wait=False) without cancel_pending returns at once, but what was queued still runs
    (the stop() docstring: only ``cancel_pending`` cancels unstarted tokens; TPE's
    shutdown(wait=False) runs queued work too). Found by the churn test below (rare there)."""
    ran: list[int] = []
    c = OperationsCoordinator(max_workers=1).start()
    try:
        blocker = park(gate)
        assert wait_until(blocker.running)
        queued = [record_run(ran, i) for i in range(5)]
        c.stop(wait=False)
        states_after_stop = [t.state for t in queued]
        gate.set()
        assert blocker.result(timeout=WAIT) == "released"
        for t in queued:
            assert wait_until(t.done, WAIT)
        assert [t.state for t in queued] == ["completed"] * 5, (
            f"queued tokens after stop(wait=False): {[t.state for t in queued]} (right after stop: {states_after_stop})"
        )
        assert ran == list(range(5))
    finally:
        gate.set()
        c.stop(timeout=WAIT)
    assert wait_until(lambda: _tokengate.active_engine_count() == 0)


@task_token_guard(operation_type="rel_record_run", tags={"weight": "light"})
def record_run(log: list[int], i: int) -> int:
    log.append(i)
    return i


# -- start/stop churn ----------------------------------------------------------------------------


@task_token_guard(operation_type="rel_square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


def _churn(cycles: int) -> None:
    base = os_thread_count()
    with OperationsCoordinator(max_workers=2):  # warm-up: lazily created process-wide state
        square(1).result(timeout=WAIT)
    wait_for_threads(base)
    threads0, fds0 = os_thread_count(), fd_count()
    t0 = time.perf_counter()
    max_threads = 0
    for cycle in range(cycles):
        mode = cycle % 4
        c = OperationsCoordinator(max_workers=4).start()
        toks = [square(i) for i in range(100)]
        max_threads = max(max_threads, os_thread_count())
        if mode == 0:
            assert c.stop() is True, cycle
        elif mode == 1:
            assert c.stop(cancel_pending=True, timeout=WAIT) is True, cycle
        elif mode == 2:
            c.stop(wait=False)
        else:
            c.stop(timeout=WAIT)
        for i, t in enumerate(toks):
            assert wait_until(t.done, WAIT), (cycle, i, t.state)
            if mode != 1:
                assert t.state == "completed" and t.result(timeout=0) == i * i, (cycle, i, t.state)
            else:
                assert t.state in ("completed", "cancelled"), (cycle, i, t.state)
        if cycle % 100 == 99:
            # a leak grows with the cycles: check along the way too
            n = wait_for_threads(threads0, 5.0)
            assert n <= threads0, f"cycle {cycle}: {n} OS threads, {threads0} before"
    elapsed = time.perf_counter() - t0
    threads = wait_for_threads(threads0, 5.0)
    fds = fd_count()
    print(
        f"\n[churn] {cycles} cycles x 100 tasks in {elapsed:.1f} s; "
        f"threads {threads0}->{threads} (max {max_threads}); fds {fds0}->{fds}"
    )
    assert threads <= threads0, (threads, threads0)
    assert fds <= fds0, (fds, fds0)
    assert _tokengate.active_engine_count() == 0


def test_start_stop_churn() -> None:
    # 1,000 cycles take a few seconds here, well under the 30 s budget: run the full count by default
    _churn(1_000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_start_stop_churn_long() -> None:
    _churn(10_000)


# -- dropped without stop() ----------------------------------------------------------------------


@task_token_guard(operation_type="rel_gated", tags={"weight": "light"})
def gated(gate: threading.Event, x: int) -> int:
    assert gate.wait(WAIT)
    return x + 1


@task_token_guard(operation_type="rel_always_fails_retried", tags={"weight": "light", "retries": 100})
def always_fails_retried() -> None:
    raise ValueError("fails every attempt")


def _submit_to(c: OperationsCoordinator, fn: Any, *args: Any) -> Any:
    """A token of decorated ``fn`` on ``c`` (which takes no decorated calls itself)."""
    return fn.spec.submit_call(fn.__wrapped__, args, None, c._engine)


def test_coordinator_dropped_without_stop_resolves_everything_and_leaves_no_thread() -> None:
    # A started coordinator garbage-collected without stop(). One that takes
    # decorated calls is a service that runs until stop() (see test_coordinator.py); this is
    # one that does not (register_global=False, as an Executor's is). Its workers finish
    # what was queued, a token between its retries resolves, one held by a paused operation
    # resolves cancelled, and every thread of the engine exits, although this thread's engine
    # cache may still hold the engine (it did keep the timer thread alive, and its periodic
    # looks, until this thread submitted again).
    base = os_thread_count()
    for cycle in range(5):
        gate = threading.Event()
        c = OperationsCoordinator(max_workers=2, register_global=False).start()
        retry = _submit_to(c, always_fails_retried)  # retried after 0.05 s, 0.1 s, ... (up to 30 s)
        assert wait_until(lambda retry=retry: retry.attempts >= 2, WAIT), retry.state
        toks = [_submit_to(c, gated, gate, i) for i in range(40)]  # 2 run and wait for the gate, 38 queue
        c.pause_operation("rel_square")
        held = _submit_to(c, square, 3)  # held by the pause: nobody will resume it
        del c
        gc.collect()
        assert _tokengate.active_engine_count() == 0, "the coordinator's engine outlived it"
        gate.set()
        assert [t.result(timeout=WAIT) for t in toks] == [i + 1 for i in range(40)], cycle
        assert wait_until(retry.done, WAIT), (cycle, retry.state)
        # cancelled while its next attempt waited in the timer; or, when that attempt was queued
        # before the drop, it ran once more and failed for good (the engine is gone)
        assert retry.state in ("cancelled", "failed"), (cycle, retry.state)
        assert wait_until(held.done, WAIT) and held.state == "cancelled", (cycle, held.state)
        del toks, retry, held
        n = wait_for_threads(base, 2.0)
        assert n <= base, f"cycle {cycle}: {n} OS threads 2 s after the coordinator was dropped, {base} before"


# -- huge arguments -----------------------------------------------------------------------------


@task_token_guard(operation_type="rel_size", tags={"weight": "light"})
def size_of(b: Any) -> int:
    return len(b)


def _big_argument(nbytes: int) -> None:
    gc.collect()
    before = rss_mb()
    big = b"\x01" * nbytes  # touched pages: really resident
    peak = rss_mb()
    assert peak - before >= nbytes / 2**20 * 0.8, (before, peak)
    with OperationsCoordinator(max_workers=2):
        tok = size_of(big)
        del big
        assert tok.result(timeout=WAIT) == nbytes
        del tok
        gc.collect()
        after = rss_mb()
    margin = nbytes / 2**20 / 4
    print(f"\n[big-arg] {nbytes >> 20} MiB: RSS {before:.0f} -> {peak:.0f} -> {after:.0f} MiB")
    assert after <= before + margin, f"RSS {after:.0f} MiB after the token was dropped, {before:.0f} MiB before"


@pytest.mark.skipif(
    not getattr(sys, "_is_gil_enabled", lambda: True)(),
    reason="free-threaded CPython's mimalloc keeps freed pages mapped, so RSS does not fall back",
)
def test_big_argument_released_rss() -> None:
    _big_argument(256 << 20)


@pytest.mark.slow
def test_gigabyte_argument_released_rss() -> None:
    _big_argument(1 << 30)


class Blob(bytearray):
    """A bytearray that supports weak references."""


def test_arguments_released_weakref(gate: threading.Event) -> None:
    with OperationsCoordinator(max_workers=1) as c:
        # completed: the reference is dropped on completion, before the token is
        blob = Blob(1 << 20)
        ref = weakref.ref(blob)
        tok = size_of(blob)
        del blob
        assert tok.result(timeout=WAIT) == 1 << 20
        assert wait_until(lambda: (gc.collect(), ref() is None)[1], 5.0), "argument kept alive by a completed token"
        del tok
        gc.collect()
        assert ref() is None

        # failed: the same (the exception carries no reference to the argument here)
        @task_token_guard(operation_type="rel_fail_len")
        def fail_len(b: Any) -> int:
            n = len(b)
            del b
            raise ValueError(n)

        blob = Blob(1 << 20)
        ref = weakref.ref(blob)
        tok = fail_len(blob)
        del blob
        assert isinstance(tok.exception(timeout=WAIT), ValueError)
        del tok
        gc.collect()
        assert wait_until(lambda: (gc.collect(), ref() is None)[1], 5.0), "argument kept alive by a failed token"

        # cancelled while queued: released at the latest once the queue has drained
        blocker = park(gate)
        assert wait_until(blocker.running)
        blob = Blob(1 << 20)
        ref = weakref.ref(blob)
        tok = size_of(blob)
        del blob
        assert tok.cancel() is True
        del tok
        gate.set()
        assert blocker.result(timeout=WAIT) == "released"
        assert size_of(b"x").result(timeout=WAIT) == 1  # the queue is drained past the cancelled job
        assert wait_until(lambda: (gc.collect(), ref() is None)[1], 5.0), "argument kept alive by a cancelled token"
        assert c.get_stats()["tokens"]["cancelled"] == 1


# -- waiting from the wrong place ---------------------------------------------------------------


@task_token_guard(operation_type="rel_make")
def make_obj(ev: threading.Event, tag: str) -> dict[str, str]:
    ev.wait(WAIT)
    return {"tag": tag}


def test_await_from_two_loops_same_result(coordinator: OperationsCoordinator, gate: threading.Event) -> None:
    tok = make_obj(gate, "two-loops")
    results: list[Any] = [None, None]
    errors: list[BaseException] = []
    awaiting = threading.Barrier(3)

    def run_loop(k: int) -> None:
        async def main() -> Any:
            awaiting.wait(WAIT)
            return await tok

        try:
            results[k] = asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_loop, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    awaiting.wait(WAIT)
    time.sleep(0.1)  # both loops are now suspended on the token
    assert not tok.done()
    gate.set()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    assert not errors, errors
    assert results[0] == {"tag": "two-loops"}
    assert results[0] is results[1] is tok.result(timeout=0)


def test_await_finished_token_repeatedly(coordinator: OperationsCoordinator) -> None:
    ok = size_of(b"abc")
    assert ok.result(timeout=WAIT) == 3

    @task_token_guard(operation_type="rel_raise")
    def boom() -> None:
        raise KeyError("k")

    bad = boom()
    err = bad.exception(timeout=WAIT)
    assert isinstance(err, KeyError)

    async def main() -> None:
        assert await ok == 3
        assert await ok == 3  # twice on the same loop
        for _ in range(2):
            with pytest.raises(KeyError) as info:
                await bad
            assert info.value is err
        assert await asyncio.gather(ok, ok) == [3, 3]

    asyncio.run(main())
    asyncio.run(main())  # and on a fresh loop


@task_token_guard(operation_type="rel_self_wait")
def wait_on_self(method: str) -> tuple[str, float]:
    me = tokengate.current_token()
    assert me is not None
    t0 = time.monotonic()
    try:
        getattr(me, method)(timeout=5.0)
    except BaseException as exc:
        return type(exc).__name__ + ": " + str(exc), time.monotonic() - t0
    return "no error", time.monotonic() - t0


@pytest.mark.parametrize("method", ["result", "exception", "get"])
def test_self_wait_raises_instead_of_deadlocking(coordinator: OperationsCoordinator, method: str) -> None:
    outcome, waited = wait_on_self(method).result(timeout=WAIT)
    assert outcome.startswith("RuntimeError"), outcome
    assert waited < 2.0, f"self-wait detected only after {waited:.2f} s (it waited for its own timeout)"


def test_closed_loop_gets_no_delivery_and_no_noise(
    coordinator: OperationsCoordinator, gate: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that registered interest in tokens is closed before they finish: the late completions
    must not call the closed loop (no RuntimeError, no warning, no logged error)."""
    handler_calls: list[dict[str, Any]] = []
    seen: list[Any] = []
    toks = [make_obj(gate, f"late-{i}") for i in range(3)]
    done_early = size_of(b"xy")
    assert done_early.result(timeout=WAIT) == 2

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, ctx: handler_calls.append(ctx))

    async def register() -> None:
        toks[0].add_done_callback(seen.append)  # delivered on this loop
        # gather futures waiting on tokens (asyncio registers its callbacks on the tokens)
        futs.append(asyncio.gather(toks[1], return_exceptions=True))
        futs.append(asyncio.gather(toks[2]))
        futs[-1].add_done_callback(seen.append)
        assert await done_early == 2

    futs: list[Any] = []
    caplog.set_level(logging.DEBUG)
    try:
        loop.run_until_complete(register())
        assert asyncio.all_tasks(loop) == set()
    finally:
        loop.close()
    deliveries0 = _tokengate.loop_stats()["deliveries"]
    gate.set()
    for t in toks:
        assert t.result(timeout=WAIT)["tag"].startswith("late-")
    time.sleep(0.2)  # the resolving workers have tried (and must have skipped) the closed loop
    gc.collect()
    assert seen == [], "a callback ran on a closed loop"
    assert handler_calls == [], handler_calls
    assert _tokengate.loop_stats()["deliveries"] == deliveries0
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    # the thread can still await tokens on a new loop afterwards
    assert asyncio.run(_await(size_of(b"abcd"))) == 4


async def _await(tok: TaskToken[Any]) -> Any:
    return await tok
