"""The outside-lane interface: what a lane that runs tokens outside the engine's threads
(the process lane, a cluster lane) takes from the engine and reports back.

The engine keeps the queue (priority order with aging), admission, pauses, deadlines,
retries and tokens as arguments; the lane takes work when it has room and reports
each task once (``finish``, ``fail`` or ``requeue``); a taken token resolved from
outside (kill, deadline) comes back as a stop notice.
"""

from __future__ import annotations

import select
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support import wait_until
from tokengate import OperationsCoordinator, ShutdownError, TaskKilledError, task_token_guard

WAIT = 30.0


@task_token_guard(operation_type="outside_work")
def work(x: int) -> int:
    return x * 10


@task_token_guard(operation_type="outside_input")
def source(x: int) -> int:
    time.sleep(0.05)
    return x + 1


@pytest.fixture
def lane() -> Iterator[tuple[OperationsCoordinator, Any]]:
    c = OperationsCoordinator(max_workers=2).start()
    try:
        yield c, c._engine.add_outside_lane("test-lane")
    finally:
        c.stop(cancel_pending=True, timeout=10)


def submit(lane: Any, x: int, **kw: Any) -> Any:
    return work.spec.submit_to(lane, (x,), **kw)


def take_all(lane: Any, n: int = 100) -> tuple[list[Any], list[int]]:
    tasks, stopped = lane.take(n)
    return list(tasks), list(stopped)


def test_takes_in_priority_order_and_finishes(lane: Any) -> None:
    _, ln = lane
    toks = [submit(ln, x, priority=p) for x, p in ((1, 0), (2, 5), (3, 1), (4, 0))]
    assert ln.pending == 4 and ln.stats()["queued"] == 4
    tasks, stopped = take_all(ln)
    assert [t.args[0] for t in tasks] == [2, 3, 1, 4] and stopped == []
    assert all(t.token.state == "executing" and t.token.lane == "test-lane" for t in tasks)
    assert not toks[0].cancel()  # taken counts as running
    for t in tasks:
        assert ln.finish(t, t.func(*t.args))
        assert not ln.finish(t, 0)  # once only
    assert [t.result(timeout=WAIT) for t in toks] == [10, 20, 30, 40]
    assert ln.pending == 0 and ln.stats() == {"queued": 0, "taken": 0, "pending": 0, "submitted": 4}


def test_kill_and_deadline_of_taken_tokens_come_back_as_stop_notices(lane: Any) -> None:
    _, ln = lane
    a = submit(ln, 1)
    b = submit(ln, 2, timeout=0.05)
    tasks, _ = take_all(ln)
    assert len(tasks) == 2
    assert a.kill()
    wait_until(lambda: b.done(), WAIT)
    stopped: list[int] = []
    wait_until(lambda: stopped.extend(ln.take(0)[1]) or len(stopped) == 2, WAIT)
    assert sorted(stopped) == sorted([a.token_id, b.token_id])
    assert (a.state, b.state) == ("killed", "timeout")
    assert not ln.finish(tasks[0], 1) and not ln.fail(tasks[1], ValueError("late"))
    assert ln.pending == 0


def test_a_token_reported_by_the_lane_gives_no_stop_notice(lane: Any) -> None:
    _, ln = lane
    tok = submit(ln, 1)
    (task,), _ = take_all(ln)
    ln.fail(task, ValueError("boom"), retry=False)
    with pytest.raises(ValueError, match="boom"):
        tok.result(timeout=WAIT)
    assert ln.take(0) == ([], [])


def test_fail_retries_through_the_engine_then_fails(lane: Any) -> None:
    _, ln = lane
    tok = submit(ln, 7, retries=1)
    (task,), _ = take_all(ln)
    assert task.attempt == 1 and task.retries_left == 1
    assert ln.fail(task, ValueError("first"))  # retried after the back-off
    assert not tok.done()
    again: list[Any] = []
    wait_until(lambda: again.extend(ln.take(1)[0]) or again, WAIT)
    assert again[0].id == tok.token_id and again[0].attempt == 2 and again[0].args == (7,)
    assert not ln.fail(again[0], ValueError("second"))
    with pytest.raises(ValueError, match="second"):
        tok.result(timeout=WAIT)
    assert tok.attempts == 2 and ln.pending == 0


def test_fail_can_end_a_token_killed_without_retry(lane: Any) -> None:
    _, ln = lane
    tok = submit(ln, 1, retries=3)
    (task,), _ = take_all(ln)
    assert not ln.fail(task, TaskKilledError("gone"), state="killed")
    assert tok.state == "killed"
    with pytest.raises(ValueError, match="state must be"):
        ln.fail(task, ValueError(), state="sideways")


def test_requeue_puts_a_task_back_at_its_place(lane: Any) -> None:
    _, ln = lane
    first = submit(ln, 1)
    admitted = first.admitted_at
    (task,), _ = take_all(ln, 1)
    later = submit(ln, 2)
    assert first.started_at is not None
    assert ln.requeue(task) == 1 and ln.requeue(task) == 0  # once only
    assert first.started_at is None and first.state == "admitted"
    tasks, _ = take_all(ln)
    assert [t.id for t in tasks] == [first.token_id, later.token_id]
    assert tasks[0].requeues == 1 and tasks[0].attempt == 1  # going back unstarted is no attempt
    assert first.admitted_at == admitted  # it waited in the queue all along
    for t in tasks:
        ln.finish(t, 0)
    assert first.result(timeout=WAIT) == 0 and ln.pending == 0


def test_a_pause_holds_a_requeued_token(lane: Any) -> None:
    c, ln = lane
    tok = submit(ln, 1)
    (task,), _ = take_all(ln)
    c.pause_admission()
    assert ln.requeue(task) == 1
    assert ln.take(10) == ([], [])
    assert tok.state == "waiting"
    c.resume_admission()
    (task,), _ = take_all(ln)
    ln.finish(task, 2)
    assert tok.result(timeout=WAIT) == 2


def test_take_skips_tokens_resolved_while_queued(lane: Any) -> None:
    _, ln = lane
    dead = [submit(ln, x) for x in range(20)]
    live = submit(ln, 99)
    for t in dead:
        assert t.cancel()
    tasks, _ = take_all(ln, 1)  # one take reaches the live token behind the dead ones
    assert [t.id for t in tasks] == [live.token_id]
    ln.finish(tasks[0], 0)
    assert ln.take(1) == ([], []) and ln.pending == 0


def test_a_task_dropped_unreported_kills_its_token(lane: Any) -> None:
    import gc

    _, ln = lane
    tok = submit(ln, 1)
    tasks, _ = take_all(ln)
    del tasks
    gc.collect()
    assert tok.state == "killed" and ln.pending == 0 and ln.stats()["taken"] == 0


def test_a_pause_holds_queued_tokens_in_the_engine(lane: Any) -> None:
    c, ln = lane
    tok = submit(ln, 3)
    c.pause_operation("outside_work")
    assert ln.take(10) == ([], [])
    assert tok.state == "waiting"
    c.resume_operation("outside_work")
    (task,), _ = take_all(ln)
    ln.finish(task, 5)
    assert tok.result(timeout=WAIT) == 5


def test_tokens_as_arguments_reach_the_lane_once_resolved(lane: Any) -> None:
    _, ln = lane
    inp = source(1)
    tok = submit(ln, inp)
    assert ln.pending == 1
    got: list[Any] = []
    wait_until(lambda: got.extend(ln.take(1)[0]) or got, WAIT)
    assert got[0].args == (2,)
    ln.finish(got[0], 99)
    assert tok.result(timeout=WAIT) == 99


def test_wake_fd_turns_readable_when_work_arrives(lane: Any) -> None:
    _, ln = lane
    assert ln.take(4) == ([], [])  # found nothing: the next push wakes
    assert select.select([ln.wake_fd], [], [], 0)[0] == []
    submit(ln, 1)
    assert select.select([ln.wake_fd], [], [], 5)[0] == [ln.wake_fd]
    ln.clear_wake()
    assert select.select([ln.wake_fd], [], [], 0)[0] == []
    tasks, _ = take_all(ln)
    ln.finish(tasks[0], 0)


def test_wait_events_returns_the_events_or_nothing_after_the_timeout(lane: Any) -> None:
    _, ln = lane
    ep = select.epoll()
    try:
        ep.register(ln.wake_fd, select.EPOLLIN)
        assert ln.take(4) == ([], [])  # found nothing: the next push wakes
        t0 = time.monotonic()
        assert ln.wait_events(ep.fileno(), 0.05) == []
        assert time.monotonic() - t0 >= 0.045
        # Timeouts as everywhere else in tokengate: 0 or less polls, NaN is refused.
        t0 = time.monotonic()
        assert ln.wait_events(ep.fileno(), -1.0) == []
        assert time.monotonic() - t0 < 1
        with pytest.raises(ValueError, match="timeout must be a number of seconds, not NaN"):
            ln.wait_events(ep.fileno(), float("nan"))
        with pytest.raises(ValueError, match="not a file descriptor"):
            ln.wait_events(-1, 0)
        pusher = threading.Timer(0.05, lambda: submit(ln, 1))
        pusher.start()
        t0 = time.monotonic()
        # The push from the other thread ends an infinite wait.
        assert ln.wait_events(ep.fileno(), float("inf")) == [(ln.wake_fd, select.EPOLLIN)]
        assert time.monotonic() - t0 < 10
        pusher.join()
        epfd = ep.fileno()
    finally:
        ep.close()
    with pytest.raises(OSError):
        ln.wait_events(epfd, 0)  # closed: an error, not an event
    ln.clear_wake()
    tasks, _ = take_all(ln)
    ln.finish(tasks[0], 0)


def test_a_submitting_thread_steps_aside_for_the_taker_once_it_woke(lane: Any) -> None:
    """A thread that keeps the interpreter while it submits a burst lets the lane's taker,
    woken by the burst, run: it does not wait for CPython's switch interval (set to 1 s
    here) or for the end of the burst (0.6 s)."""
    _, ln = lane
    assert ln.take(4) == ([], [])  # found nothing: the next push wakes the taker
    resumed: list[float] = []
    ep = select.epoll()
    ep.register(ln.wake_fd, select.EPOLLIN)

    def taker() -> None:
        ln.wait_events(ep.fileno(), 20)
        resumed.append(time.monotonic())  # needs the interpreter

    old = sys.getswitchinterval()
    t = threading.Thread(target=taker)
    t.start()
    time.sleep(0.1)  # the taker waits
    sys.setswitchinterval(1.0)
    try:
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 0.6:
            submit(ln, n)
            n += 1
            sum(range(3000))  # pure Python between submits: the interpreter stays held
    finally:
        sys.setswitchinterval(old)
    t.join(20)
    ep.close()
    assert resumed, "the taker never woke"
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    assert resumed[0] - t0 < 0.3, (
        f"the taker ran {resumed[0] - t0:.2f} s into a 0.6 s burst of {n} submits; threads: {others}"
    )
    assert ln.stats()["queued"] == n


def test_close_cancels_the_queue_and_refuses_more(lane: Any) -> None:
    _, ln = lane
    toks = [submit(ln, x) for x in range(3)]
    assert ln.close() == 3 and ln.closed
    assert all(t.state == "cancelled" for t in toks)
    with pytest.raises(ShutdownError):
        submit(ln, 9)
    assert ln.pending == 0


def test_stop_with_cancel_pending_cancels_queued_lane_tokens() -> None:
    c = OperationsCoordinator(max_workers=1).start()
    ln = c._engine.add_outside_lane("test-lane")
    toks = [submit(ln, x) for x in range(3)]
    c.stop(cancel_pending=True, timeout=10)
    assert all(t.state == "cancelled" for t in toks)
    assert ln.pending == 0


def test_admission_limits_count_lane_tokens() -> None:
    c = OperationsCoordinator(max_workers=1, max_pending=2).start()
    try:
        ln = c._engine.add_outside_lane("test-lane")
        toks = [submit(ln, x) for x in range(2)]
        assert submit(ln, 3, block=False) is None
        tasks, _ = take_all(ln)
        ln.finish(tasks[0], 1)
        assert submit(ln, 4, block=False) is not None
        assert toks[0].result(timeout=WAIT) == 1
        rest, _ = take_all(ln)
        for t in tasks[1:] + rest:
            ln.finish(t, 0)
        assert ln.pending == 0
    finally:
        c.stop(cancel_pending=True, timeout=10)
