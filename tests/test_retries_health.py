"""Retries (``retries`` / ``allow_retries`` tags, per-call ``options(retries=...)``,
back-off 0.05 s doubling) and per-operation health (the original's Guard House),
including ``auto_block_dangerous``."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import support
from support import Env
from tokengate import (
    OperationBlockedError,
    OperationsCoordinator,
    TaskKilledError,
    TaskTimeoutError,
    task_token_guard,
)

WAIT = 10.0


wait_until = functools.partial(support.wait_until, interval=0.002)


class Flaky:
    """Fails the first ``fail`` calls, then returns the attempt number. Records call times."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: list[float] = []
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.calls.append(time.monotonic())
            n = len(self.calls)
        if n <= self.fail:
            raise ValueError(f"attempt {n}")
        return n


@task_token_guard(operation_type="rh_retry3", tags={"weight": "light", "retries": 3})
def retry3(f: Flaky) -> int:
    return f()


@task_token_guard(operation_type="rh_noretry", tags={"weight": "light", "retries": 3, "allow_retries": False})
def no_retry(f: Flaky) -> int:
    return f()


@task_token_guard(operation_type="rh_plain", tags={"weight": "light"})
def plain(f: Flaky) -> int:
    return f()


@task_token_guard(operation_type="rh_outcome", tags={"weight": "light"})
def outcome(ok: bool) -> str:
    if not ok:
        raise RuntimeError("failed on purpose")
    return "ok"


@task_token_guard(operation_type="rh_sleepy", tags={"weight": "light"})
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@task_token_guard(operation_type="rh_other", tags={"weight": "light"})
def other(x: Any) -> Any:
    return x


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=2) as e:
        yield e


def health(c: OperationsCoordinator, op: str) -> dict[str, Any]:
    return c.get_stats()["operations"][op]["health"]  # type: ignore[no-any-return]


# -- retries ----------------------------------------------------------------------------------


def test_retries_then_success_reaches_the_callers_token(env: Env) -> None:
    c = env.coord()
    f = Flaky(fail=2)
    tok = retry3(f)
    assert tok.result(timeout=WAIT) == 3
    assert tok.attempts == 3 and tok.state == "completed"
    gaps = [b - a for a, b in zip(f.calls, f.calls[1:])]
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095, f"back-off not 0.05 s doubling: {gaps}"
    assert gaps[1] > gaps[0]
    assert c.get_stats()["tokens"]["retries"] == 2


def test_retries_exhausted_raise_the_last_error(env: Env) -> None:
    c = env.coord()
    f = Flaky(fail=100)
    tok = retry3(f)
    with pytest.raises(ValueError, match="attempt 4"):
        tok.result(timeout=WAIT)
    assert tok.attempts == 4 and tok.state == "failed"
    assert len(f.calls) == 4
    stats = c.get_stats()
    assert stats["tokens"]["retries"] == 3
    assert stats["tokens"]["failed"] == 1


def test_token_is_not_resolved_between_attempts(env: Env) -> None:
    env.coord()
    f = Flaky(fail=3)
    tok = retry3(f)
    fired: list[str] = []
    tok._add_thread_callback(lambda t: fired.append(t.state))
    assert wait_until(lambda: len(f.calls) >= 1)
    assert not tok.done() or len(f.calls) == 4
    assert tok.result(timeout=WAIT) == 4
    time.sleep(0.05)
    assert fired == ["completed"], f"callbacks fired {fired}: intermediate failures leaked out"


def test_allow_retries_false_disables_retries(env: Env) -> None:
    env.coord()
    f = Flaky(fail=1)
    tok = no_retry(f)
    with pytest.raises(ValueError, match="attempt 1"):
        tok.result(timeout=WAIT)
    assert tok.attempts == 1 and len(f.calls) == 1


def test_per_call_retries_override_the_tag(env: Env) -> None:
    env.coord()
    f = Flaky(fail=1)
    with pytest.raises(ValueError):
        retry3.options(retries=0)(f).result(timeout=WAIT)
    assert len(f.calls) == 1
    g = Flaky(fail=2)
    assert plain.options(retries=2)(g).result(timeout=WAIT) == 3
    h = Flaky(fail=1)
    with pytest.raises(ValueError):
        plain(h).result(timeout=WAIT)
    assert len(h.calls) == 1, "no retries without a retries tag"


def test_retries_validation() -> None:
    with pytest.raises(ValueError):
        plain.options(retries=-1)
    with pytest.raises(ValueError):
        task_token_guard(tags={"retries": -2})
    with pytest.raises(ValueError):
        task_token_guard(tags={"retries": "3"})
    with pytest.raises(ValueError):
        task_token_guard(tags={"allow_retries": "yes"})


def test_kill_during_backoff_stops_retrying(env: Env) -> None:
    env.coord()
    f = Flaky(fail=100)
    tok = plain.options(retries=5)(f)
    assert wait_until(lambda: len(f.calls) >= 1)
    time.sleep(0.01)  # inside the first 0.05 s back-off
    assert tok.kill("enough")
    with pytest.raises(TaskKilledError):
        tok.result(timeout=0)
    n = len(f.calls)
    time.sleep(0.5)
    assert len(f.calls) <= n + 1, f"attempts went on after the kill: {len(f.calls)}"
    assert tok.state == "killed"


def test_deadline_during_retries_ends_in_timeout(env: Env) -> None:
    env.coord()
    f = Flaky(fail=100)
    tok = plain.options(retries=10, timeout=0.3)(f)
    with pytest.raises(TaskTimeoutError):
        tok.result(timeout=WAIT)
    assert tok.state == "timeout"
    n = len(f.calls)
    time.sleep(0.5)
    assert len(f.calls) <= n + 1, "attempts went on after the deadline"


def test_stop_waits_for_the_remaining_attempts(env: Env) -> None:
    c = env.coord()
    f = Flaky(fail=100)
    tok = plain.options(retries=2)(f)
    assert wait_until(lambda: len(f.calls) >= 1)
    assert c.stop(timeout=WAIT) is True
    assert tok.state == "failed" and len(f.calls) == 3


def test_stop_cancel_pending_cancels_a_token_waiting_for_its_retry(env: Env) -> None:
    """A token in its back-off has not started its next attempt: cancel_pending cancels it."""
    c = env.coord()
    f = Flaky(fail=100)
    tok = plain.options(retries=8)(f)  # back-offs add up to 12.75 s
    assert wait_until(lambda: len(f.calls) >= 2)
    t0 = time.monotonic()
    joined = c.stop(cancel_pending=True, timeout=3.0)
    elapsed = time.monotonic() - t0
    assert tok.done(), f"token left {tok.state} after stop()"
    assert joined is True and elapsed < 2.0, f"stop(cancel_pending=True) returned {joined} after {elapsed:.2f}s"
    assert len(f.calls) <= 3, f"{len(f.calls)} attempts: retries went on during stop(cancel_pending=True)"


@pytest.mark.parametrize("how", ["drain_pool", "drain_operation"])
def test_drain_cancels_a_token_waiting_for_its_retry(env: Env, how: str) -> None:
    c = env.coord()
    f = Flaky(fail=100)
    tok = plain.options(retries=3)(f)
    assert wait_until(lambda: len(f.calls) >= 1)
    assert wait_until(lambda: tok.state == "waiting", 1.0)
    n = c.drain_pool() if how == "drain_pool" else c.drain_operation("rh_plain")
    assert n == 1, f"{how} returned {n} for a token waiting for its retry"
    assert tok.state == "cancelled"
    time.sleep(0.4)
    assert len(f.calls) == 1, "the drained token was tried again"


# -- health -----------------------------------------------------------------------------------


def run_outcomes(oks: list[bool]) -> None:
    for ok in oks:
        outcome(ok).exception(timeout=WAIT)


@pytest.mark.parametrize(
    ("successes", "failures", "expected"),
    [
        (4, 0, "unknown"),
        (0, 4, "unknown"),
        (20, 0, "excellent"),
        (19, 1, "excellent"),  # 95 %
        (18, 2, "healthy"),  # 90 %
        (16, 4, "healthy"),  # 80 %
        (15, 5, "at_risk"),  # 75 %
        (5, 5, "at_risk"),  # 50 %
        (4, 6, "problematic"),
        (0, 5, "problematic"),
    ],
)
def test_health_class(env: Env, successes: int, failures: int, expected: str) -> None:
    c = env.coord(max_workers=1)
    run_outcomes([True] * successes + [False] * failures)
    h = health(c, "rh_outcome")
    assert (h["attempts"], h["successes"], h["failures"]) == (successes + failures, successes, failures)
    assert h["health"] == expected
    assert h["success_rate"] == pytest.approx(successes / (successes + failures))


def test_health_times(env: Env) -> None:
    c = env.coord(max_workers=1)
    for s in (0.01, 0.05, 0.03):
        sleepy(s).result(timeout=WAIT)
    h = health(c, "rh_sleepy")
    assert h["attempts"] == 3 and h["timeouts"] == 0
    assert 0.009 <= h["min_time"] <= h["mean_time"] <= h["max_time"]
    assert 0.045 <= h["max_time"] < 2.0
    assert h["mean_time"] == pytest.approx(0.03, abs=0.03)


def test_health_of_an_operation_never_run_has_no_times(env: Env) -> None:
    c = env.coord()
    c.pause_operation("rh_other")
    other(1)
    h = health(c, "rh_other")
    assert h["attempts"] == 0 and h["health"] == "unknown"
    assert h["min_time"] is None and h["mean_time"] is None and h["max_time"] is None
    assert h["success_rate"] is None


def test_retries_count_as_attempts(env: Env) -> None:
    c = env.coord()
    retry3(Flaky(fail=2)).result(timeout=WAIT)
    h = health(c, "rh_retry3")
    assert (h["attempts"], h["successes"], h["failures"]) == (3, 1, 2)


def test_guard_house_stats_match_get_stats(env: Env) -> None:
    c = env.coord()
    run_outcomes([True, False, True])
    other(1).result(timeout=WAIT)
    gh = c.get_guard_house_stats()
    ops = c.get_stats()["operations"]
    assert set(gh) == set(ops) >= {"rh_outcome", "rh_other"}
    assert gh["rh_outcome"]["attempts"] == 3 and gh["rh_outcome"]["failures"] == 1


def test_timed_out_attempts_are_not_counted_as_successes(env: Env) -> None:
    """An attempt that overran its deadline was a timeout for its caller, not a success."""
    c = env.coord(max_workers=1)
    for i in range(5):  # one at a time, so every call starts before its deadline
        tok = sleepy.options(timeout=0.05)(0.15)
        assert isinstance(tok.exception(timeout=WAIT), TaskTimeoutError)
        assert wait_until(lambda i=i: health(c, "rh_sleepy")["attempts"] == i + 1)
    h = health(c, "rh_sleepy")
    assert h["timeouts"] == 5
    assert h["successes"] == 0, f"timed-out attempts counted as successes: {h}"
    assert h["health"] not in {"excellent", "healthy"}, h


# -- auto-block -------------------------------------------------------------------------------


def test_auto_block_rejects_an_operation_failing_over_90_percent(env: Env) -> None:
    c = env.coord(max_workers=1, auto_block_dangerous=True)
    run_outcomes([False] * 10)
    with pytest.raises(OperationBlockedError) as ei:
        outcome(True)
    assert isinstance(ei.value, RuntimeError)
    assert "rh_outcome" in str(ei.value)
    assert c.get_stats()["operations"]["rh_outcome"]["blocked"] is True
    assert other(5).result(timeout=WAIT) == 5, "other operations must not be blocked"
    assert c.unblock_operation("rh_outcome") is True
    assert outcome(True).result(timeout=WAIT) == "ok"
    assert c.get_stats()["operations"]["rh_outcome"]["blocked"] is False
    assert c.unblock_operation("rh_outcome") is False


@pytest.mark.parametrize(
    "oks",
    [
        [False] * 9,  # under 10 attempts
        [True] + [False] * 9,  # exactly 90 % failures: not over 90 %
    ],
)
def test_auto_block_threshold(env: Env, oks: list[bool]) -> None:
    c = env.coord(max_workers=1, auto_block_dangerous=True)
    run_outcomes(oks)
    assert outcome(True).result(timeout=WAIT) == "ok"
    assert c.get_stats()["operations"]["rh_outcome"]["blocked"] is False


def test_no_auto_block_unless_enabled(env: Env) -> None:
    c = env.coord(max_workers=1)
    run_outcomes([False] * 12)
    assert outcome(True).result(timeout=WAIT) == "ok"
    assert c.get_stats()["operations"]["rh_outcome"]["blocked"] is False


def test_health_after_unblock_is_consistent(env: Env) -> None:
    """unblock_operation restarts the health counts: min <= mean <= max must still hold."""
    c = env.coord(max_workers=1, auto_block_dangerous=True)
    run_outcomes([False] * 10)
    with pytest.raises(OperationBlockedError):
        outcome(True)
    c.unblock_operation("rh_outcome")
    outcome(True).result(timeout=WAIT)
    h = health(c, "rh_outcome")
    assert (h["attempts"], h["successes"], h["failures"]) == (1, 1, 0)
    assert h["min_time"] <= h["mean_time"] <= h["max_time"], f"inconsistent times after unblock: {h}"


def test_blocked_token_is_never_created(env: Env) -> None:
    c = env.coord(max_workers=1, auto_block_dangerous=True)
    run_outcomes([False] * 10)
    before = c.get_stats()["tokens"]["submitted"]
    for _ in range(3):
        with pytest.raises(OperationBlockedError):
            outcome(True)
    with pytest.raises(OperationBlockedError):
        outcome.try_submit(True)
    assert c.get_stats()["tokens"]["submitted"] == before
