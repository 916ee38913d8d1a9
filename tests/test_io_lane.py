"""The ``storage_speed`` tag: an elastic I/O lane with per-tier concurrency.

SLOW 10, MODERATE 25, FAST 50, INSANE 70 tokens at once per tier (configurable);
threads are spawned on demand and retire after ``io_idle_timeout``; a token
waiting for a tier slot holds no thread; ``token.lane == "io"``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import support
from support import os_thread_count as os_threads
from tokengate import OperationsCoordinator, current_token, task_token_guard

WAIT = 30.0


wait_until = functools.partial(support.wait_until, interval=0.01)


class Tracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    @contextmanager
    def inside(self) -> Iterator[None]:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1


def io_stats(coord: OperationsCoordinator) -> dict:
    return coord.get_stats()["lanes"]["io"]


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["WARP", "slowest", "", 3, None])
def test_unknown_tier_is_rejected_at_decoration(tier: object) -> None:
    with pytest.raises(ValueError, match="storage_speed"):
        task_token_guard(operation_type="io_bad", tags={"storage_speed": tier})


@pytest.mark.parametrize(
    ("given", "tier"), [("slow", "SLOW"), ("Moderate", "MODERATE"), ("FAST", "FAST"), ("insane", "INSANE")]
)
def test_tier_names_are_case_insensitive(given: str, tier: str) -> None:
    fn = task_token_guard(operation_type="io_case", tags={"storage_speed": given})(lambda: None)
    assert fn.tags["storage_speed"] == tier


def test_coordinator_rejects_unknown_tiers() -> None:
    with pytest.raises(ValueError):
        OperationsCoordinator(storage_limits={"WARP": 3})
    c = OperationsCoordinator(io_idle_timeout=0.2)
    with pytest.raises(ValueError):
        c.set_storage_limit("WARP", 3)


# -- lane and limits --------------------------------------------------------------------


def test_storage_tokens_run_on_the_io_lane_and_others_on_the_cpu_pool() -> None:
    @task_token_guard(operation_type="io_where", tags={"storage_speed": "FAST"})
    def io_fn() -> str:
        return threading.current_thread().name

    @task_token_guard(operation_type="cpu_where")
    def cpu_fn() -> int | None:
        return current_token().core_id

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        a, b = io_fn(), cpu_fn()
        a.result(timeout=WAIT)
        b.result(timeout=WAIT)
        assert a.lane == "io" and a.get_status()["lane"] == "io"
        assert b.lane == "cpu"
        assert io_stats(coord)["tiers"]["FAST"]["peak"] == 1
        assert io_stats(coord)["threads_started"] >= 1


def test_200_slow_tokens_never_exceed_10_at_once() -> None:
    tr = Tracker()

    @task_token_guard(operation_type="io_slow_200", tags={"storage_speed": "SLOW"})
    def slow(i: int) -> int:
        with tr.inside():
            time.sleep(0.01)
        return i

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        tokens = [slow(i) for i in range(200)]
        assert [t.result(timeout=WAIT) for t in tokens] == list(range(200))
        # A lane thread resolves the token, then gives its tier slot back: poll for the slot.
        assert wait_until(lambda: io_stats(coord)["tiers"]["SLOW"]["running"] == 0)
        tier = io_stats(coord)["tiers"]["SLOW"]
    assert all(t.lane == "io" for t in tokens)
    assert tr.peak <= 10, f"{tr.peak} SLOW tokens ran at once"
    assert tr.peak >= 2
    assert tier["limit"] == 10
    assert tier["peak"] == 10
    assert tier["running"] == 0 and tier["queued"] == 0


def test_io_tokens_do_not_need_a_cpu_worker() -> None:
    """With the only CPU worker blocked, storage tokens still run."""
    release = threading.Event()

    @task_token_guard(operation_type="io_cpu_blocker")
    def blocker() -> bool:
        return release.wait(WAIT)

    @task_token_guard(operation_type="io_free", tags={"storage_speed": "MODERATE"})
    def io_fn(i: int) -> int:
        return i * 2

    with OperationsCoordinator(max_workers=1, io_idle_timeout=0.2):
        b = blocker()
        try:
            assert wait_until(b.running, 10)
            assert [t.result(timeout=WAIT) for t in [io_fn(i) for i in range(20)]] == [2 * i for i in range(20)]
        finally:
            release.set()
        assert b.result(timeout=WAIT) is True


def test_set_storage_limit_lowers_concurrency() -> None:
    tr = Tracker()

    @task_token_guard(operation_type="io_lowered", tags={"storage_speed": "SLOW"})
    def slow(i: int) -> int:
        with tr.inside():
            time.sleep(0.02)
        return i

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        coord.set_storage_limit("slow", 3)
        assert io_stats(coord)["tiers"]["SLOW"]["limit"] == 3
        tokens = [slow(i) for i in range(40)]
        for t in tokens:
            t.result(timeout=WAIT)
        tier = io_stats(coord)["tiers"]["SLOW"]
    assert tr.peak <= 3, f"{tr.peak} SLOW tokens ran at once with the limit at 3"
    assert tier["peak"] == 3


def test_storage_limits_argument_sets_the_limit() -> None:
    tr = Tracker()

    @task_token_guard(operation_type="io_ctor_limit", tags={"storage_speed": "INSANE"})
    def fn(i: int) -> int:
        with tr.inside():
            time.sleep(0.02)
        return i

    with OperationsCoordinator(storage_limits={"insane": 2}, io_idle_timeout=0.2) as coord:
        assert io_stats(coord)["tiers"]["INSANE"]["limit"] == 2
        for t in [fn(i) for i in range(20)]:
            t.result(timeout=WAIT)
    assert tr.peak <= 2


def test_raising_the_limit_starts_queued_tokens() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    @task_token_guard(operation_type="io_raise_limit", tags={"storage_speed": "SLOW"})
    def fn(i: int) -> int:
        started.release()
        release.wait(WAIT)
        return i

    with OperationsCoordinator(storage_limits={"SLOW": 1}, io_idle_timeout=0.2) as coord:
        try:
            tokens = [fn(i) for i in range(5)]
            assert started.acquire(timeout=10)
            assert wait_until(lambda: io_stats(coord)["tiers"]["SLOW"]["queued"] == 4, 5)
            coord.set_storage_limit("SLOW", 5)
            # The four queued tokens start while the first one is still blocked.
            for _ in range(4):
                assert started.acquire(timeout=5), "a queued token did not start after the limit was raised"
            assert io_stats(coord)["tiers"]["SLOW"]["running"] == 5
        finally:
            release.set()
        assert [t.result(timeout=WAIT) for t in tokens] == list(range(5))


def test_a_queued_tier_token_holds_no_thread() -> None:
    release = threading.Event()

    @task_token_guard(operation_type="io_queued", tags={"storage_speed": "SLOW"})
    def fn(i: int) -> int:
        release.wait(WAIT)
        return i

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        before = os_threads()
        try:
            tokens = [fn(i) for i in range(110)]
            assert wait_until(lambda: sum(t.state == "executing" for t in tokens) == 10, 10)
            time.sleep(0.1)  # time for any extra thread to appear
            lane = io_stats(coord)
            assert lane["tiers"]["SLOW"]["queued"] == 100
            assert lane["tiers"]["SLOW"]["running"] == 10
            assert lane["threads"] <= 10, lane
            assert os_threads() - before <= 10, f"{os_threads() - before} threads for 10 running SLOW tokens"
            assert sum(t.state == "executing" for t in tokens) == 10
            assert all(t.state in ("admitted", "waiting", "created") for t in tokens if t.state != "executing")
        finally:
            release.set()
        assert [t.result(timeout=WAIT) for t in tokens] == list(range(110))


@pytest.mark.parametrize(("tier", "limit"), [("FAST", 50), ("MODERATE", 25)])
def test_a_stream_of_tokens_never_starts_more_threads_than_the_tier_limit(tier: str, limit: int) -> None:
    """Only one tier is used, so at most `limit` tokens can run: more threads
    than that would only sit idle (with io_idle_timeout=5 none retires during
    the test, so threads_started is the most threads alive at once)."""

    @task_token_guard(operation_type=f"io_stream_{tier}", tags={"storage_speed": tier})
    def fn(i: int) -> int:
        return i

    with OperationsCoordinator(io_idle_timeout=5.0) as coord:
        for _ in range(3):
            tokens = [fn(i) for i in range(10_000)]
            for t in tokens:
                t.result(timeout=WAIT)
        lane = io_stats(coord)
    assert lane["tiers"][tier]["peak"] <= limit
    assert lane["threads_started"] <= limit, (
        f"{lane['threads_started']} lane threads started for a {tier} tier limited to {limit}"
    )


def test_lane_threads_retire_after_io_idle_timeout() -> None:
    seen: list[int] = []

    @task_token_guard(operation_type="io_retire", tags={"storage_speed": "SLOW"})
    def fn(i: int) -> int:
        time.sleep(0.05)
        seen.append(os_threads())
        return i

    with OperationsCoordinator(io_idle_timeout=0.2) as coord:
        before = os_threads()
        assert io_stats(coord)["threads"] == 0
        tokens = [fn(i) for i in range(20)]
        for t in tokens:
            t.result(timeout=WAIT)
        started = io_stats(coord)["threads_started"]
        assert started >= 2
        assert max(seen) >= before + 2, "the burst ran without extra lane threads"
        assert wait_until(lambda: io_stats(coord)["threads"] == 0, 10), io_stats(coord)
        assert io_stats(coord)["idle_threads"] == 0
        assert wait_until(lambda: os_threads() <= before, 10), f"{os_threads()} OS threads, {before} before the burst"
        # The lane still works after its threads retired (a new thread is spawned).
        assert fn(99).result(timeout=WAIT) == 99
        assert io_stats(coord)["threads_started"] == started + 1


def test_storage_speed_with_process_pool_warns_and_stays_on_threads() -> None:
    with pytest.warns(RuntimeWarning, match="storage_speed"):

        @task_token_guard(operation_type="io_proc", tags={"storage_speed": "FAST", "process_pool": True})
        def fn() -> tuple[int, int]:
            return os.getpid(), threading.get_ident()

    with OperationsCoordinator(io_idle_timeout=0.2):
        t = fn()
        pid, ident = t.result(timeout=WAIT)
    assert t.lane == "io"
    assert pid == os.getpid()
    assert ident != threading.get_ident()


def test_process_pool_alone_does_not_warn() -> None:
    # filterwarnings=error turns any warning into a failure here.
    task_token_guard(operation_type="io_proc_only", tags={"process_pool": True})(lambda: None)
    task_token_guard(operation_type="io_speed_only", tags={"storage_speed": "FAST", "process_pool": False})(
        lambda: None
    )


EXIT_SCRIPT = """
import time
from tokengate import OperationsCoordinator, task_token_guard

def body(x):
    time.sleep(0.01)
    return x

fns = [task_token_guard(operation_type=f"exit_{t}", tags={"storage_speed": t})(body)
       for t in ("SLOW", "MODERATE", "FAST", "INSANE")]
c = OperationsCoordinator().start()
tokens = [f(i) for f in fns for i in range(160)]  # 10 + 25 + 50 + 70 lane threads
assert [t.result(timeout=20) for t in tokens] == list(range(160)) * 4
if STOP:
    c.stop()
print("done", flush=True)
"""


@pytest.mark.subprocess
@pytest.mark.parametrize(("stop", "runs"), [(False, 14), (True, 6)], ids=["exit-hook-stops", "stop-then-exit"])
def test_interpreter_exit_after_an_io_burst_is_clean(stop: bool, runs: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """155 lane threads alive when the interpreter exits: every run must exit 0
    (repeated because the failure is a race with interpreter finalization)."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    script = f"STOP = {stop}\n" + textwrap.dedent(EXIT_SCRIPT)
    bad = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
        )
        if proc.returncode != 0 or "done" not in proc.stdout or "Fatal Python error" in proc.stderr:
            bad.append(f"rc={proc.returncode} stderr={proc.stderr.strip()[:300]!r}")
    assert bad == [], f"{len(bad)}/{runs} child interpreters did not exit cleanly:\n" + "\n".join(bad)
