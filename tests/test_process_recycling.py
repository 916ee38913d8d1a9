"""Recycling of process-lane workers: ``process_max_tasks_per_child`` and ``process_max_rss``."""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import pytest

import tokengate
from support import child_pids, running_coordinator, wait_until
from tokengate import OperationsCoordinator, TaskKilledError, task_token_guard

PROC = {"process_pool": True}
MiB = 1 << 20

#: What hog() keeps alive in a worker process (each worker imports this module afresh).
_KEEP: list[bytes] = []


@task_token_guard(tags=PROC)
def square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


@task_token_guard(tags=PROC)
def hog(mb: int) -> int:
    """Keeps ``mb`` MiB resident in the worker (a module global, written, so the pages are touched)."""
    _KEEP.append(b"\x01" * (mb * MiB))
    return os.getpid()


@task_token_guard(tags=PROC)
def rss_now() -> tuple[int, int]:
    with open("/proc/self/statm") as f:
        return os.getpid(), int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@task_token_guard(tags=PROC)
def hold(path: str, s: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(s)
    return os.getpid()


@task_token_guard(tags=PROC)
def mark(path: str) -> str:
    Path(path).write_text("ran")
    return "ran"


def _reaped(pids: list[int], limit: float = 5.0) -> bool:
    """True once none of ``pids`` exists any more, not even as a zombie (it was reaped)."""
    return wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), limit, 0.01)


def _lane_stats(c: OperationsCoordinator) -> dict:
    return c.get_stats()["lanes"]["process"]


# -- process_max_tasks_per_child ----------------------------------------------------------------


def test_a_worker_retires_after_max_tasks_per_child_tokens() -> None:
    before = child_pids()
    c = OperationsCoordinator(max_workers=2, process_workers=1, process_max_tasks_per_child=2).start()
    try:
        out = tokengate.gather([square(i) for i in range(6)], timeout=30)
        assert [v for _, v in out] == [i * i for i in range(6)]
        per_pid = collections.Counter(pid for pid, _ in out)
        assert len(per_pid) == 3 and set(per_pid.values()) == {2}, per_pid
        # The third process retires after its second token too; a fresh one holds the slot.
        assert wait_until(lambda: _lane_stats(c)["recycled"] == 3, 10), _lane_stats(c)
        stats = _lane_stats(c)
        assert stats["completed"] == 6 and stats["failed"] == 0 and stats["crashed"] == 0
        assert stats["replaced"] == 0 and stats["recycled_rss"] == 0 and stats["spawned"] == 4
        assert stats["max_tasks_per_child"] == 2 and stats["alive"] == 1
        assert not set(per_pid) & set(c._process_lane.pids)
        assert _reaped(list(per_pid)), "a retired worker process was not reaped"
        new_pid = c._process_lane.pids[0]
    finally:
        assert c.stop()
    assert _reaped([new_pid])
    assert child_pids() - before == set()


def test_sending_ahead_stops_at_the_tokens_a_worker_has_left() -> None:
    # Short tokens are sent up to 16 at a time once a worker measured them (its first token,
    # which imports this module, keeps it at one at a time for about 14 tokens); a worker with
    # fewer tokens left than that gets only what it has left.
    with running_coordinator(
        max_workers=2, process_workers=1, process_prefetch=16, process_max_tasks_per_child=25
    ) as c:
        out = tokengate.gather([square(i) for i in range(75)], timeout=30)
        assert [v for _, v in out] == [i * i for i in range(75)]
        per_pid = collections.Counter(pid for pid, _ in out)
        assert len(per_pid) == 3 and set(per_pid.values()) == {25}, per_pid
        stats = _lane_stats(c)
        assert stats["failed"] == 0 and stats["crashed"] == 0 and stats["replaced"] == 0


def test_every_token_in_a_fresh_process_across_slots() -> None:
    with running_coordinator(max_workers=2, process_workers=2, process_max_tasks_per_child=1) as c:
        out = tokengate.gather([square(i) for i in range(16)], timeout=30)
        assert [v for _, v in out] == [i * i for i in range(16)]
        assert len({pid for pid, _ in out}) == 16
        assert wait_until(lambda: _lane_stats(c)["recycled"] == 16, 10), _lane_stats(c)
        assert _lane_stats(c)["failed"] == 0 and _lane_stats(c)["crashed"] == 0


def test_a_token_skipped_in_the_worker_gives_its_unit_back(tmp_path: Path) -> None:
    with running_coordinator(max_workers=2, process_workers=1, process_prefetch=4, process_max_tasks_per_child=40) as c:
        warm = tokengate.gather([square(i) for i in range(30)], timeout=30)  # short tokens: sent ahead from now on
        (pid,) = {p for p, _ in warm}
        a = hold(str(tmp_path / "a"), 0.8)
        b = mark(str(tmp_path / "b"))
        assert wait_until(lambda: _lane_stats(c)["in_flight"] == 2, 10), _lane_stats(c)  # b waits in the worker
        assert b.kill("not needed")
        with pytest.raises(TaskKilledError):
            b.result(timeout=5)
        assert a.result(timeout=30) == pid
        rest = tokengate.gather([square(i) for i in range(10)], timeout=30)
        # 30 + a ran there; b never did, so 9 more fit in its 40 (8 without b's unit back).
        assert [p for p, _ in rest].count(pid) == 9, rest
        assert not (tmp_path / "b").exists(), "a token killed while queued in a worker ran anyway"
        assert wait_until(lambda: _lane_stats(c)["recycled"] == 1, 10), _lane_stats(c)


def test_stop_runs_the_queued_tokens_through_recycling() -> None:
    before = child_pids()
    c = OperationsCoordinator(max_workers=2, process_workers=1, process_max_tasks_per_child=2).start()
    tokens = [hold(os.devnull, 0.05) for _ in range(5)]
    assert c.stop(timeout=30)
    pids = [t.result(timeout=0) for t in tokens]
    assert len(set(pids)) == 3 and max(collections.Counter(pids).values()) == 2
    assert _reaped(pids)
    assert child_pids() - before == set()


# -- process_max_rss ---------------------------------------------------------------------------


def _worker_rss() -> int:
    """RSS of a worker process that has imported this module (what a ceiling must leave room for)."""
    with running_coordinator(max_workers=1, process_workers=1) as c:
        _, rss = rss_now().result(timeout=30)
        assert _lane_stats(c)["recycled"] == 0
    return rss


def test_a_worker_over_max_rss_retires_after_its_token() -> None:
    ceiling = _worker_rss() + 25 * MiB
    with running_coordinator(max_workers=2, process_workers=1, process_max_rss=ceiling) as c:
        pids = {square(i).result(timeout=30)[0] for i in range(5)}
        assert len(pids) == 1 and _lane_stats(c)["recycled"] == 0  # below the ceiling: reused
        (first,) = pids
        assert hog(50).result(timeout=30) == first  # the token that grew it still succeeds
        second, value = square(7).result(timeout=30)
        assert value == 49 and second != first
        stats = _lane_stats(c)
        assert stats["recycled"] == 1 and stats["recycled_rss"] == 1 and stats["max_rss"] == ceiling
        assert stats["failed"] == 0 and stats["crashed"] == 0 and stats["replaced"] == 0
        assert _reaped([first])
        assert {square(i).result(timeout=30)[0] for i in range(5)} == {second}  # the fresh one is reused


def test_without_recycling_options_worker_processes_are_reused() -> None:
    with running_coordinator(max_workers=2, process_workers=1) as c:
        out = tokengate.gather([square(i) for i in range(6)], timeout=30)
        first = out[0][0]
        assert hog(50).result(timeout=30) == first
        assert {pid for pid, _ in out} == {first} and square(1).result(timeout=30)[0] == first
        stats = _lane_stats(c)
        assert stats["recycled"] == 0 and stats["spawned"] == 1
        assert stats["max_tasks_per_child"] is None and stats["max_rss"] is None


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["process_max_tasks_per_child", "process_max_rss"])
def test_recycling_options_are_validated(name: str) -> None:
    assert getattr(OperationsCoordinator(), name) is None
    assert getattr(OperationsCoordinator(**{name: None}), name) is None
    assert getattr(OperationsCoordinator(**{name: 3}), name) == 3
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"{name} must be from 1 to \d+, got {bad}"):
            OperationsCoordinator(**{name: bad})
    for wrong in (1.5, True, "2"):
        with pytest.raises(TypeError, match=rf"{name} must be an int or None, not {type(wrong).__name__}"):
            OperationsCoordinator(**{name: wrong})
