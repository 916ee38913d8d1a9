"""The process lane: ``process_pool: True`` tokens run in worker processes."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import support
import tokengate
from support import child_pids, pid_alive, running_coordinator, wait_until
from tokengate import (
    OperationsCoordinator,
    TaskKilledError,
    TaskTimeoutError,
    TaskToken,
    WorkerCrashedError,
    task_token_guard,
)
from tokengate._process import ProcessFunction, UnpicklableError

PROC = {"process_pool": True}


@task_token_guard(tags=PROC)
def module_level_square(x: int) -> tuple[int, int]:
    """Module-level: sent to the worker by reference (the worker imports this module)."""
    return os.getpid(), x * x


class Pair(NamedTuple):
    """A tuple subclass importable by name: plain pickle could carry it, but it is no plain value."""

    a: int
    b: int


def _wait_gone(pids: list[int], limit: float = 5.0) -> list[int]:
    deadline = time.monotonic() + limit
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if pid_alive(p)]
    return left


@pytest.fixture
def lane() -> Iterator[OperationsCoordinator]:
    """A running coordinator whose process lane has 2 processes."""
    with running_coordinator(max_workers=2, process_workers=2) as c:
        yield c


@pytest.fixture
def lane1() -> Iterator[OperationsCoordinator]:
    """A running coordinator whose process lane has 1 process."""
    with running_coordinator(max_workers=2, process_workers=1) as c:
        yield c


# -- basics ----------------------------------------------------------------------------


def test_runs_in_another_process_local_and_module_functions(lane: OperationsCoordinator) -> None:
    base = 10

    @task_token_guard(tags=PROC)
    def local(a: int, b: int = 1) -> tuple[int, int]:  # defined inside a test: goes by value
        return os.getpid(), a + b + base

    assert isinstance(local, ProcessFunction)
    pid, value = local(1, b=2).result(timeout=30)
    assert value == 13 and pid != os.getpid()
    tok = module_level_square(7)
    assert tok.lane == "process" and tok.get_status()["lane"] == "process"
    pid2, sq = tok.result(timeout=30)
    assert sq == 49 and pid2 != os.getpid()
    assert pid in lane._process_lane.pids and pid2 in lane._process_lane.pids
    lam = task_token_guard(tags=PROC)(lambda x: x + 1)
    assert lam(1).result(timeout=30) == 2
    t = local(5)
    t.result(timeout=30)
    assert t.state == "completed" and t.done() and t.worker_id in (0, 1)
    stats = lane.get_stats()
    assert stats["tokens"]["completed"] >= 4
    proc = stats["lanes"]["process"]
    assert proc["workers"] == 2 and proc["completed"] >= 4 and proc["crashed"] == 0


def test_every_way_of_calling_is_submitted_and_counted(lane: OperationsCoordinator) -> None:
    h = task_token_guard(tags=PROC)(abs)
    assert h(0).result(timeout=30) == 0  # the lane starts
    before = lane.get_stats()["lanes"]["process"]["submitted"]
    toks = [h(-1), h(-2.5), h.options(priority=2)(-3), h.try_submit(-4), h(h(-5))]  # plain, options, a token argument
    assert [t.result(timeout=30) if t is not None else None for t in toks] == [1, 2.5, 3, 4, 5]
    assert list(h.map([-6, -7])) == [6, 7]
    # A plain call with an argument that is not a plain value (pickled with cloudpickle).
    assert h(Fraction(-1, 3)).result(timeout=30) == Fraction(1, 3)
    assert lane.get_stats()["lanes"]["process"]["submitted"] - before == 9


@task_token_guard(tags=PROC)
def module_level_fails_at_37(x: int) -> int:
    if x == 37:
        raise ValueError("thirty-seven")
    return x


def test_map_in_chunks_sends_one_token_a_chunk_in_order(lane: OperationsCoordinator) -> None:
    def submitted() -> int:
        return int(lane.get_stats()["lanes"]["process"]["submitted"])

    assert module_level_square(0).result(timeout=30)[1] == 0  # the lane starts
    pids = set(lane._process_lane.pids)
    before = submitted()
    out = list(module_level_square.map(range(1000), chunksize=64))
    assert [v for _, v in out] == [x * x for x in range(1000)]
    assert {pid for pid, _ in out} <= pids
    assert submitted() - before == 16  # ceil(1000 / 64) tokens, as ProcessPoolExecutor.map's chunks
    # A function sent by value, two iterables (the shortest ends the map), awaited.
    offset = 5

    @task_token_guard(tags=PROC)
    def add(a: int, b: int) -> int:
        return a + b + offset

    assert list(add.map(range(10), range(7), chunksize=3)) == [2 * i + offset for i in range(7)]

    async def main() -> list[int]:
        return await add.map(range(5), range(5), chunksize=2)

    assert asyncio.run(main()) == [2 * i + offset for i in range(5)]
    assert submitted() - before == 16 + 3 + 3


@task_token_guard(tags=PROC)
def module_level_pid_after_5_ms(x: int) -> int:
    time.sleep(0.005)
    return os.getpid()


@task_token_guard(tags={**PROC, "timeout": 30})
def module_level_with_timeout(x: int) -> int:
    return x + 1


@task_token_guard(tags={**PROC, "retries": 1})
def module_level_with_retries(x: int) -> int:
    return x + 2


def test_buffer_counts_chunks_so_a_chunked_map_uses_every_process(lane: OperationsCoordinator) -> None:
    assert module_level_pid_after_5_ms(0).result(timeout=30)  # the lane starts
    # 4 chunks of 8 calls, 2 tokens in flight: a chunk for each process (had buffer counted calls,
    # one chunk at a time would have run, in one process).
    pids = set(module_level_pid_after_5_ms.map(range(32), chunksize=8, buffer=2))
    assert pids == set(lane._process_lane.pids), pids


def test_an_operation_with_a_timeout_or_retries_keeps_one_token_a_call(lane: OperationsCoordinator) -> None:
    def submitted() -> int:
        return int(lane.get_stats()["lanes"]["process"]["submitted"])

    assert module_level_square(0).result(timeout=30)[1] == 0  # the lane starts
    before = submitted()
    assert list(module_level_with_timeout.map(range(8), chunksize=4)) == [x + 1 for x in range(8)]
    assert list(module_level_with_retries.map(range(8), chunksize=4)) == [x + 2 for x in range(8)]
    assert submitted() - before == 16  # one deadline and one retry a call, as without chunksize


def test_a_chunk_fails_with_its_calls_exception_after_the_chunks_before_it(lane: OperationsCoordinator) -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="thirty-seven") as info:
        got.extend(module_level_fails_at_37.map(range(100), chunksize=10, buffer=20))  # keeps what came first
    assert got == list(range(30))  # as ProcessPoolExecutor.map: the failing call's chunk is lost
    assert "module_level_fails_at_37" in str(info.value.__cause__)  # the worker's traceback
    # The map was left: its chunks not started are cancelled, and the lane goes idle.
    assert wait_until(lambda: lane._process_lane.outside.pending == 0)


def test_map_chunksize_is_checked_and_a_chunk_takes_no_tokens(lane: OperationsCoordinator) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            module_level_square.map([1], chunksize=bad)
    for wrong in ("2", 2.0, True):
        with pytest.raises(TypeError, match="chunksize must be an int"):
            module_level_square.map([1], chunksize=wrong)  # type: ignore[arg-type]
    h = task_token_guard(tags=PROC)(abs)
    token = h(-3)
    with pytest.raises(TypeError, match="cannot take tokens"):
        list(h.map([1, token], chunksize=2))
    with pytest.raises(TypeError):  # arity: checked for each call before its chunk is sent
        list(module_level_square.map([1, 2], [3, 4], chunksize=2))
    assert list(h.map([token, -4], chunksize=1)) == [3, 4]  # one token a call: a token argument is waited for


def test_a_chunked_map_shows_calls_done_not_chunks(lane: OperationsCoordinator) -> None:
    import io
    from contextlib import redirect_stderr

    stderr = io.StringIO()
    with redirect_stderr(stderr):
        out = list(module_level_square.map(range(200), chunksize=16, progress="force"))
    assert [v for _, v in out] == [x * x for x in range(200)]
    assert stderr.getvalue().splitlines()[-1].startswith("module_level_square: 200/200 (100%)"), stderr.getvalue()


def test_map_chunksize_is_ignored_on_threads_as_by_thread_pool_executor() -> None:
    @task_token_guard
    def own_token(x: int) -> tuple[int, int]:
        token = tokengate.current_token()
        assert token is not None
        return x, token.token_id

    with running_coordinator(max_workers=2):
        out = list(own_token.map(range(50), chunksize=10))
    assert [x for x, _ in out] == list(range(50))
    assert len({tid for _, tid in out}) == 50  # one token a call


def test_a_waiting_thread_never_runs_a_process_token_itself(lane: OperationsCoordinator) -> None:
    # Caller runs (tests/test_caller_runs.py) is for thread tokens only.
    out: list[tuple[int, int]] = []
    th = threading.Thread(target=lambda: out.append(module_level_square(3).result()))
    th.start()
    th.join(30)
    assert out and out[0][1] == 9 and out[0][0] != os.getpid() and out[0][0] in lane._process_lane.pids


def test_wrapper_attributes_and_arity(lane: OperationsCoordinator) -> None:
    def f(a: int, b: int) -> int:
        return a - b

    g = task_token_guard("sub_op", tags={"process_pool": True, "priority": 3})(f)
    assert g.__wrapped__ is f and g.operation_type == "sub_op" and g.tags["process_pool"] is True
    assert g.spec.operation_type == "sub_op"
    with pytest.raises(TypeError):
        g(1)
    with pytest.raises(TypeError):
        g(1, 2, 3)
    assert g(5, b=2).result(timeout=30) == 3
    h = task_token_guard(tags=PROC)(abs)
    assert list(h.map([-1, -2, 3])) == [1, 2, 3]


def test_not_started_raises() -> None:
    @task_token_guard(tags=PROC)
    def f() -> int:
        return 1

    with pytest.raises(tokengate.NotStartedError):
        f()


def test_plain_calls_are_queued_by_the_base_and_the_rest_by_python(
    lane: OperationsCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow: list[tuple[Any, ...]] = []
    call_slow = ProcessFunction._call_slow

    def counting(self: ProcessFunction, *args: Any, **kwargs: Any) -> TaskToken[Any]:
        slow.append(args)
        return call_slow(self, *args, **kwargs)

    monkeypatch.setattr(ProcessFunction, "_call_slow", counting)

    @task_token_guard(tags=PROC)
    def echo(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    assert echo(1).result(timeout=30) == ((1,), {})  # the first call makes the function's payload
    assert len(slow) == 1
    plain = [None, True, False, 7, -(2**70), 1.5, "text", b"bytes"]
    # Small tuples, lists and dicts of plain values, nested up to 3 deep, 256 values in all
    # (each container, item, key and value counts one).
    shared = [1]
    plain += [[1, 2], (1,), (), {"a": 1, 2: [b"x", None]}, ([(1, 2.5)], {"k": ("v",)})]
    plain += [list(range(255)), {i: i for i in range(127)}, [shared, shared]]
    tokens = [echo(v, v) for v in plain[:8]] + [echo(v) for v in plain[8:]]
    assert [t.result(timeout=30)[0] for t in tokens] == [(v, v) for v in plain[:8]] + [(v,) for v in plain[8:]]
    assert [type(t.result()[0][0]) for t in tokens] == [type(v) for v in plain]
    first, second = tokens[-1].result()[0][0]
    assert first is second  # an object met twice stays one object
    assert len(slow) == 1  # plain values only: queued with no Python frame
    from tokengate._process import payload

    for v in plain[8:]:  # plain pickle writes what the lane's pickler (loky's) writes for them
        assert pickle.dumps(((v,), {}), payload._PROTO) == payload._cloud_dumps(((v,), {}))

    class Sub(int):
        pass

    others: list[Any] = [
        Sub(3),
        Fraction(1, 2),
        [1, Fraction(1, 2)],  # a value that is not plain inside a container
        {Sub(1): 2},  # as a dict key
        {1, 2},  # a set
        [[[[1]]]],  # nested 4 deep
        list(range(255)),  # 256 values with the list itself, and the second argument below
        list(range(256)),  # 257 values: refused before its items are looked at
        {i: i for i in range(128)},  # 257 values
        Pair(1, 2),  # subclasses of tuple and dict
        collections.OrderedDict(a=1),
        collections.defaultdict(int, a=1),
    ]
    assert [echo(v, 0).result(timeout=30)[0] for v in others] == [(v, 0) for v in others]
    assert echo(1, k=2).result(timeout=30) == ((1,), {"k": 2})
    assert echo(echo(2)).result(timeout=30) == ((((2,), {}),), {})  # a token as an argument
    with pytest.raises(UnpicklableError, match="TaskToken"):  # a token inside a list: as before
        echo([echo(3)]).result(timeout=30)
    assert len(slow) == 1 + len(others) + 3  # the inner echo(2) and echo(3) were plain


def test_plain_calls_go_to_the_newest_coordinator_and_back_when_it_stops() -> None:
    with running_coordinator(max_workers=2, process_workers=1) as old:
        assert module_level_square(2).result(timeout=30)[1] == 4
        old_pids = old._process_lane.pids
        with running_coordinator(max_workers=2, process_workers=1) as new:
            for x in range(3):  # the first makes the new coordinator's lane, the rest reach it from Rust
                pid, value = module_level_square(x).result(timeout=30)
                assert (pid in new._process_lane.pids, value) == (True, x * x)
            new_pids = new._process_lane.pids
        assert set(new_pids).isdisjoint(old_pids)
        for x in range(3):
            pid, value = module_level_square(x).result(timeout=30)
            assert (pid in old_pids, value) == (True, x * x)
    with pytest.raises(tokengate.NotStartedError):
        module_level_square(5)


def test_exception_and_remote_traceback(lane: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def boom(x: int) -> None:
        raise ValueError(f"bad {x}")

    t = boom(3)
    with pytest.raises(ValueError, match="bad 3") as info:
        t.result(timeout=30)
    assert "boom" in str(info.value.__cause__)  # the worker's traceback
    assert t.state == "failed"


def test_decorated_call_inside_worker_raises_clearly(lane: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def inner(x: int) -> int:
        return x

    @task_token_guard(tags=PROC)
    def outer(x: int) -> int:
        return inner(x).result()  # type: ignore[no-any-return]

    @task_token_guard(tags=PROC)
    def outer_plain(x: int) -> int:
        return inner.__wrapped__(x) + 1  # type: ignore[no-any-return]

    with pytest.raises(tokengate.NotStartedError, match="inside a process-lane worker"):
        outer(1).result(timeout=30)
    assert outer_plain(1).result(timeout=30) == 2


def test_await_and_gather(lane: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def double(x: int) -> int:
        return 2 * x

    async def main() -> list[int]:
        one = await double(1)
        rest = await asyncio.gather(*(double(i) for i in range(2, 6)))
        return [one, *rest]

    assert asyncio.run(main()) == [2, 4, 6, 8, 10]
    assert tokengate.gather([double(i) for i in range(3)], timeout=30) == [0, 2, 4]


# -- crashes ---------------------------------------------------------------------------------


def _crash_and_recover(c: OperationsCoordinator, crash: object, expected_code: int) -> None:
    @task_token_guard(tags=PROC)
    def die(how: str) -> None:
        import ctypes

        if how == "exit":
            os._exit(3)
        elif how == "kill9":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "segv":
            ctypes.string_at(0)
        time.sleep(5)

    @task_token_guard(tags=PROC)
    def slow_ok(x: int) -> tuple[int, int]:
        time.sleep(0.4)
        return os.getpid(), x

    warm = [slow_ok(i) for i in range(2)]  # both processes ready and busy-able
    tokengate.gather(warm, timeout=30)
    bystander = slow_ok(1)  # runs in the other process meanwhile
    time.sleep(0.05)
    t0 = time.monotonic()
    t = die(crash)
    with pytest.raises(WorkerCrashedError) as info:
        t.result(timeout=30)
    assert time.monotonic() - t0 < 30
    assert info.value.exitcode == expected_code
    assert str(expected_code) in str(info.value)
    assert t.state == "failed"
    assert bystander.result(timeout=30)[1] == 1  # only the crashed process's token failed
    later = [slow_ok(i) for i in range(3)]  # the lane replaced the process
    assert [v for _, v in tokengate.gather(later, timeout=30)] == [0, 1, 2]
    stats = c.get_stats()["lanes"]["process"]
    assert stats["crashed"] == 1 and stats["alive"] == 2


def test_crash_os_exit(lane: OperationsCoordinator) -> None:
    _crash_and_recover(lane, "exit", 3)


def test_crash_sigkill(lane: OperationsCoordinator) -> None:
    _crash_and_recover(lane, "kill9", -signal.SIGKILL)


def test_crash_segfault(lane: OperationsCoordinator) -> None:
    _crash_and_recover(lane, "segv", -signal.SIGSEGV)


# -- pickling -----------------------------------------------------------------------------


def test_unpicklable_argument_fails_only_that_token(lane: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def take(x: object, y: object = None) -> str:
        return type(x).__name__

    t = take(threading.Lock())
    with pytest.raises(UnpicklableError, match=r"argument 0 \(_thread\.lock\)") as info:
        t.result(timeout=30)
    assert isinstance(info.value, TypeError)
    assert t.state == "failed"
    with pytest.raises(TypeError, match=r"keyword argument 'y' \(_thread\.RLock\)"):
        take(1, y=threading.RLock()).result(timeout=30)
    assert take(1).result(timeout=30) == "int"  # the lane stays usable


def test_unpicklable_result_fails_only_that_token(lane: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def give(lock: bool) -> object:
        return threading.Lock() if lock else "fine"

    with pytest.raises(UnpicklableError, match=r"result of .*give \(_thread\.lock\)"):
        give(True).result(timeout=30)
    assert give(False).result(timeout=30) == "fine"
    assert lane.get_stats()["lanes"]["process"]["crashed"] == 0


def test_results_that_only_cloudpickle_carries_come_back(lane: OperationsCoordinator) -> None:
    """Results are pickled as loky pickles them: what the parent cannot import by name (a
    lambda, an instance of a class the worker received by value) goes by value."""

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    @task_token_guard(tags=PROC)
    def make(kind: str) -> object:
        if kind == "lambda":
            return lambda y: y + 1
        if kind == "instance":
            return [Point(3), Point(4)]
        return [1, "two", 3.0, None, (4, b"5")]

    assert make("lambda").result(timeout=30)(41) == 42
    points = make("instance").result(timeout=30)
    assert all(type(p) is Point for p in points) and [p.x for p in points] == [3, 4]
    assert make("plain").result(timeout=30) == [1, "two", 3.0, None, (4, b"5")]


class _Reduced:
    """Pickled through a reducer registered with copyreg in a test (see below)."""

    def __init__(self, x: int) -> None:
        self.x = x


def test_arguments_are_pickled_as_loky_pickles_them_with_a_pickler_made_once() -> None:
    """The lane's pickler writes the same bytes as loky's for every kind of value (loky's
    own reducers included: a bound method, a partial), is made once, and is made again
    when a reducer is registered (with copyreg or loky) or another loky pickler is chosen."""
    import copyreg
    import functools

    from loky.backend import reduction

    from tokengate._process import payload

    class Local:
        def __init__(self) -> None:
            self.v = [1, 2]

        def method(self) -> int:
            return 1

    def values() -> list[Any]:
        # Fresh each time: a reducer may change what it pickles (tblib's, which Dask
        # installs, marks an exception it pickled).
        return [
            ((1, (2, 3), [4.0, "5"], {"six": b"7"}), {}),
            ((Local(),), {"f": lambda y: y + 1}),
            (ValueError("x"), "a traceback"),
            frozenset({1, 2}),
            (Local().method, functools.partial(int, base=2), [].append),
        ]

    def same_as_loky() -> None:
        for ours, lokys in zip(values(), values()):
            assert payload._cloud_dumps(ours) == bytes(reduction.dumps(lokys, protocol=payload._PROTO))

    same_as_loky()
    assert payload._picklers() == payload._picklers()
    made = payload._picklers()

    def reduce_it(obj: _Reduced) -> tuple[Any, ...]:
        return (int, (obj.x * 10,))

    for register, unregister in (
        (lambda: copyreg.pickle(_Reduced, reduce_it), lambda: copyreg.dispatch_table.pop(_Reduced)),
        (lambda: reduction.register(_Reduced, reduce_it), lambda: reduction._dispatch_table.pop(_Reduced)),
    ):
        register()
        try:
            assert payload._picklers() != made
            assert pickle.loads(payload._cloud_dumps(_Reduced(4))) == 40
            assert pickle.loads(payload._dumps_result(_Reduced(4))) == 40
            assert payload._cloud_dumps(_Reduced(4)) == bytes(reduction.dumps(_Reduced(4), protocol=payload._PROTO))
        finally:
            unregister()
        restored = pickle.loads(payload._cloud_dumps(_Reduced(4)))
        assert type(restored) is _Reduced and restored.x == 4
    reduction.set_loky_pickler("pickle")
    try:
        assert payload._picklers()[0].__mro__[1] is pickle.Pickler
        assert payload._cloud_dumps(((1, 2), {})) == bytes(reduction.dumps(((1, 2), {}), protocol=payload._PROTO))
    finally:
        reduction.set_loky_pickler()
    same_as_loky()


def test_a_worker_pickles_results_by_name_first_and_by_value_where_that_fails() -> None:
    """By name wherever pickle can (the same bytes as plain pickle with loky's table); a
    lambda, or an instance of a class the worker could not import, by value."""
    from tokengate._process import payload

    value = [Fraction(1, 3), {"k": (1, 2.5)}, range(3)]
    assert payload._dumps_result(value) == pickle.dumps(value, payload._PROTO)
    assert pickle.loads(payload._dumps_result(lambda y: y * 2))(21) == 42

    class Local:
        pass

    assert type(pickle.loads(payload._dumps_result([Local()]))[0]).__name__ == "Local"


def test_arguments_of_every_kind_reach_the_worker(lane: OperationsCoordinator) -> None:
    """Arguments that are not plain values (containers, instances of a class defined in a
    function, a lambda, keywords) are pickled by the lane's pickler and arrive whole."""

    class Box:
        def __init__(self, items: list[int]) -> None:
            self.items = items

    @task_token_guard(tags=PROC)
    def use(box: Any, pairs: Any, fn: Any, scale: Any = None) -> Any:
        return [fn(i) * scale["k"] for i in box.items], sorted(pairs.items()), os.getpid()

    out, pairs, pid = use(Box([1, 2, 3]), {"a": (1, 2), "b": [3]}, lambda y: y + 1, scale={"k": 10}).result(timeout=30)
    assert out == [20, 30, 40] and pairs == [("a", (1, 2)), ("b", [3])]
    assert pid != os.getpid()


# CPython's ExecutorDeadlockTest cases (Lib/test/test_concurrent_futures/test_deadlock.py),
# rewritten for the process lane: pickling breaks, or a process dies, at each step of a
# token's trip. Each fails (or crashes) that token within 30 s and the lane goes on.


class _FailsToPickle:
    """Raises while it is pickled (in whichever process pickles it)."""

    def __reduce__(self) -> tuple:
        raise RuntimeError("boom while pickling")


def _raise_on_load() -> None:
    raise RuntimeError("boom while unpickling")


class _FailsToUnpickle:
    """Pickles fine; raises while it is unpickled (in the other process)."""

    def __reduce__(self) -> tuple:
        return (_raise_on_load, ())


class _ExitsOnUnpickle:
    """Pickles fine; the process that unpickles it exits at once (the worker, for an argument)."""

    def __reduce__(self) -> tuple:
        return (os._exit, (7,))


class _ExitsOnPickle:
    """The process that pickles it exits at once (the worker, for a result)."""

    def __reduce__(self) -> tuple:
        os._exit(8)


@task_token_guard(tags=PROC)
def _take_arg(x: object) -> str:
    return type(x).__name__


@task_token_guard(tags=PROC)
def _give_back(kind: str) -> object:
    return {"fails_to_pickle": _FailsToPickle, "fails_to_unpickle": _FailsToUnpickle, "exits": _ExitsOnPickle}[kind]()


#: case -> (submits the token, the exception it fails with, its message or the worker's exit code)
_PICKLING_BREAKS: dict[str, tuple[Callable[[], TaskToken[Any]], type[BaseException], str | int]] = {
    "argument fails to pickle": (lambda: _take_arg(_FailsToPickle()), UnpicklableError, "boom while pickling"),
    "argument fails to unpickle in the worker": (
        lambda: _take_arg(_FailsToUnpickle()),
        RuntimeError,
        "boom while unpickling",
    ),
    "worker exits while unpickling an argument": (lambda: _take_arg(_ExitsOnUnpickle()), WorkerCrashedError, 7),
    "result fails to pickle in the worker": (
        lambda: _give_back("fails_to_pickle"),
        UnpicklableError,
        "boom while pickling",
    ),
    "result fails to unpickle in the caller": (
        lambda: _give_back("fails_to_unpickle"),
        UnpicklableError,
        "boom while unpickling",
    ),
    "worker exits while pickling a result": (lambda: _give_back("exits"), WorkerCrashedError, 8),
}


@pytest.mark.parametrize("case", list(_PICKLING_BREAKS))
def test_a_pickling_break_at_each_step_fails_only_that_token(lane: OperationsCoordinator, case: str) -> None:
    submit, want, expected = _PICKLING_BREAKS[case]
    crashes = want is WorkerCrashedError
    t0 = time.monotonic()
    tok = submit()
    with pytest.raises(want, match=None if crashes else str(expected)) as info:
        tok.result(timeout=30)
    if crashes:
        assert info.value.exitcode == expected  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 30
    assert tok.state == "failed"
    # the lane goes on: both processes (one replaced after a crash) take new tokens
    assert tokengate.gather([_take_arg(i) for i in range(6)], timeout=30) == ["int"] * 6
    stats = lane.get_stats()["lanes"]["process"]
    assert stats["alive"] == 2
    assert stats["crashed"] == (1 if crashes else 0)


def test_a_worker_killed_from_outside_while_idle_is_replaced(lane: OperationsCoordinator) -> None:
    pid = module_level_square(2).result(timeout=30)[0]
    assert pid in child_pids()
    os.kill(pid, signal.SIGKILL)
    assert not _wait_gone([pid], 10.0)
    # no token was running in it: nothing fails, and the lane gets back to two processes
    assert tokengate.gather([_take_arg(i) for i in range(8)], timeout=30) == ["int"] * 8
    assert wait_until(lambda: lane.get_stats()["lanes"]["process"]["alive"] == 2, 30)


# -- stopping a running token -------------------------------------------------------------


def _sleeper(tmp: Path) -> ProcessFunction:
    @task_token_guard(tags=PROC)
    def sleep_long(name: str) -> str:
        Path(name).write_text(str(os.getpid()))
        time.sleep(30)
        return "never"

    return sleep_long  # type: ignore[return-value]


def _pid_from(path: Path, limit: float = 20.0) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.01)
    raise AssertionError("the task never started")


def test_timeout_kills_the_process(lane: OperationsCoordinator, tmp_path: Path) -> None:
    sleep_long = _sleeper(tmp_path)
    marker = tmp_path / "pid"
    t = sleep_long.options(timeout=0.5)(str(marker))
    pid = _pid_from(marker)
    assert wait_until(lambda: lane.get_stats()["tokens"]["executing"] == 1), "a running process token is not counted"
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        t.result(timeout=30)
    assert time.monotonic() - t0 < 2.5
    assert t.state == "timeout"
    assert lane.get_stats()["tokens"]["executing"] == 0
    assert _wait_gone([pid]) == []
    # The pid is gone once reaped; the lane counts the replacement just after that.
    assert wait_until(lambda: lane.get_stats()["lanes"]["process"]["replaced"] >= 1, 10.0)
    assert lane.get_stats()["lanes"]["process"]["timeouts"] == 1

    @task_token_guard(tags=PROC)
    def after() -> int:
        return os.getpid()

    assert after().result(timeout=30) != pid


def test_timeout_tag_on_queued_token(lane1: OperationsCoordinator, tmp_path: Path) -> None:
    @task_token_guard(tags=PROC)
    def hold(s: float) -> None:
        time.sleep(s)

    @task_token_guard(tags={"process_pool": True, "timeout": 0.3})
    def mark(path: str) -> None:
        Path(path).write_text("ran")

    h = hold(1.0)
    t = mark(str(tmp_path / "m"))
    with pytest.raises(TaskTimeoutError):
        t.result(timeout=30)
    h.result(timeout=30)
    time.sleep(0.2)
    assert not (tmp_path / "m").exists()


def test_kill_terminates_the_process(lane: OperationsCoordinator, tmp_path: Path) -> None:
    sleep_long = _sleeper(tmp_path)
    marker = tmp_path / "pid"
    t = sleep_long(str(marker))
    pid = _pid_from(marker)
    assert t.running()
    t0 = time.monotonic()
    assert t.kill("enough")
    with pytest.raises(TaskKilledError, match="enough"):
        t.result(timeout=30)
    assert time.monotonic() - t0 < 2.0
    assert _wait_gone([pid]) == []
    marker2 = tmp_path / "pid2"
    t2 = sleep_long(str(marker2))
    pid2 = _pid_from(marker2)
    assert lane.kill_all_by_operation(sleep_long.operation_type, "bulk") == 1
    with pytest.raises(TaskKilledError):
        t2.result(timeout=30)
    assert _wait_gone([pid2]) == []
    assert module_level_square(3).result(timeout=30)[1] == 9


def test_asyncio_cancel_of_a_running_token_stops_the_process(lane: OperationsCoordinator, tmp_path: Path) -> None:
    # A timeout around asyncio.gather cancels the running token itself (asyncio's contract on
    # the loop's thread): the gather ends at once and, as for kill, the process is stopped.
    sleep_long = _sleeper(tmp_path)
    marker = tmp_path / "pid"

    async def main() -> float:
        t = sleep_long(str(marker))
        await asyncio.get_running_loop().run_in_executor(None, _pid_from, marker)
        assert t.running()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.gather(t), 0.2)
        assert t.state == "cancelled"
        return time.monotonic() - t0

    assert asyncio.run(main()) < 2.0
    assert _wait_gone([_pid_from(marker)], 10.0) == []
    assert module_level_square(3).result(timeout=30)[1] == 9


def test_cancel_before_start_never_runs(lane1: OperationsCoordinator, tmp_path: Path) -> None:
    @task_token_guard(tags=PROC)
    def hold(s: float) -> None:
        time.sleep(s)

    @task_token_guard(tags=PROC)
    def mark(path: str) -> None:
        Path(path).write_text("ran")

    h = hold(0.5)
    t = mark(str(tmp_path / "m"))
    assert t.cancel()
    assert t.cancelled() and t.state == "cancelled"
    with pytest.raises(Exception) as info:
        t.result(timeout=1)
    assert isinstance(info.value, concurrent.futures.CancelledError)
    h.result(timeout=30)
    assert mark(str(tmp_path / "n")).result(timeout=30) is None
    assert not (tmp_path / "m").exists() and (tmp_path / "n").exists()


# -- scheduling ------------------------------------------------------------------------------


def test_priority_orders_the_queue(lane1: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def stamp(tag: str) -> int:
        return time.monotonic_ns()

    @task_token_guard(tags=PROC)
    def hold(s: float) -> None:
        time.sleep(s)

    hold(0.01).result(timeout=30)
    h = hold(0.5)
    time.sleep(0.1)
    low = [stamp("low") for _ in range(2)]
    high = stamp.options(priority=10)("high")
    tokengate.gather([h, *low, high], timeout=30)
    assert high.result() < min(t.result() for t in low)


def test_operation_limit_applies(tmp_path: Path) -> None:
    with OperationsCoordinator(max_workers=2, process_workers=1, operation_limits={"plim": 1}) as c:

        @task_token_guard("plim", tags=PROC)
        def hold(s: float) -> float:
            time.sleep(s)
            return s

        first = hold(0.3)
        assert hold.try_submit(0.0) is None
        assert first.result(timeout=30) == 0.3
        second = hold.try_submit(0.0)
        assert second is not None and second.result(timeout=30) == 0.0
        ops = c.get_stats()["operations"]["plim"]
        assert ops["max_pending"] == 1 and ops["pending"] == 0


def test_retries_and_token_arguments(lane: OperationsCoordinator, tmp_path: Path) -> None:
    counter = tmp_path / "count"

    @task_token_guard(tags={"process_pool": True, "retries": 2})
    def flaky(path: str) -> int:
        p = Path(path)
        n = int(p.read_text()) if p.exists() else 0
        p.write_text(str(n + 1))
        if n < 1:
            raise RuntimeError("first attempt fails")
        return n + 1

    assert flaky(str(counter)).result(timeout=30) == 2
    assert lane.get_stats()["lanes"]["process"]["retries"] == 1

    @task_token_guard
    def on_thread(x: int) -> int:
        return x + 100

    @task_token_guard(tags=PROC)
    def add(a: int, b: int) -> int:
        return a + b

    assert add(on_thread(1), b=on_thread(2)).result(timeout=30) == 203

    @task_token_guard
    def fails() -> int:
        raise KeyError("no")

    with pytest.raises(tokengate.DependencyFailedError) as info:
        add(fails(), 1).result(timeout=30)
    assert isinstance(info.value.__cause__, KeyError)


def test_two_cpu_tasks_run_in_parallel(lane: OperationsCoordinator) -> None:
    def spin(n: int) -> int:
        s = 0
        for i in range(n):
            s += i * i
        return s

    n = 20_000
    while True:  # calibrate: ~50 ms of pure-Python work here
        t0 = time.perf_counter()
        spin(n)
        if time.perf_counter() - t0 >= 0.05:
            break
        n *= 2
    cpu = task_token_guard(tags=PROC)(spin)
    tokengate.gather([cpu(1000), cpu(1000)], timeout=30)  # both processes have the function
    best = 0.0
    for _ in range(15):  # the machine is shared: retry until a quiet moment
        t0 = time.perf_counter()
        spin(n)
        spin(n)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokengate.gather([cpu(n), cpu(n)], timeout=30)
        parallel = time.perf_counter() - t0
        best = max(best, serial / parallel)
        if best > 1.3:
            break
        time.sleep(0.1)
    assert best > 1.3, f"speedup {best:.2f}"


def test_pause_admission_holds_process_tokens(lane1: OperationsCoordinator) -> None:
    @task_token_guard(tags=PROC)
    def one() -> int:
        return 1

    assert one().result(timeout=30) == 1
    lane1.pause_admission()
    t = one()
    time.sleep(0.3)
    assert not t.done() and not t.running()
    lane1.resume_admission()
    assert t.result(timeout=30) == 1


def test_workers_that_cannot_start_fail_queued_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokengate._process.workers as lane_module

    monkeypatch.setattr(lane_module, "_BOOT", "import os\nos._exit(7)  # {fd} {ppid}\n")
    with OperationsCoordinator(max_workers=1, process_workers=1) as c:

        @task_token_guard(tags=PROC)
        def f() -> int:
            return 1

        t = f()
        with pytest.raises(WorkerCrashedError, match="while starting") as info:
            t.result(timeout=30)
        assert info.value.exitcode == 7
        assert c.get_stats()["lanes"]["process"]["spawned"] >= 3


# -- configuration, stop, orphans -------------------------------------------------------------


def test_process_count_default_and_configurable() -> None:
    with OperationsCoordinator(max_workers=1) as c:
        assert c.process_workers is None
        assert module_level_square(2).result(timeout=30)[1] == 4
        assert c.get_stats()["lanes"]["process"]["workers"] == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        OperationsCoordinator(process_workers=0)
    with pytest.raises(TypeError):
        OperationsCoordinator(process_workers=1.5)  # type: ignore[arg-type]


def test_storage_speed_with_process_pool_stays_on_threads() -> None:
    with pytest.warns(RuntimeWarning, match="stays on threads"):

        @task_token_guard(tags={"process_pool": True, "storage_speed": "FAST"})
        def io_op() -> int:
            return os.getpid()

    assert not isinstance(io_op, ProcessFunction)
    with OperationsCoordinator(max_workers=1):
        assert io_op().result(timeout=30) == os.getpid()


def test_stop_leaves_no_processes(tmp_path: Path) -> None:
    before = child_pids()
    c = OperationsCoordinator(max_workers=2, process_workers=2).start()
    seen = {module_level_square(i).result(timeout=30)[0] for i in range(6)}
    pids = set(c._process_lane.pids) | seen
    assert pids and all(pid_alive(p) for p in c._process_lane.pids)
    assert c.stop()
    assert _wait_gone(sorted(pids), 1.0) == []
    assert child_pids() - before == set()
    assert c.get_stats()["active"] is False

    # Stopping with a token still running: after the timeout its process is killed.
    c = OperationsCoordinator(max_workers=2, process_workers=2).start()
    sleep_long = _sleeper(tmp_path)
    marker = tmp_path / "pid"
    t = sleep_long(str(marker))
    pid = _pid_from(marker)
    lane_pids = c._process_lane.pids
    t0 = time.monotonic()
    c.stop(timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert t.done()
    with pytest.raises(TaskKilledError):
        t.result()
    assert _wait_gone([pid, *lane_pids], 1.0) == []
    assert child_pids() - before == set()
    with pytest.raises(tokengate.NotStartedError):
        module_level_square(1)


@pytest.mark.subprocess
def test_workers_die_with_their_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            from tokengate import OperationsCoordinator, task_token_guard

            @task_token_guard(tags={"process_pool": True})
            def pid():
                return os.getpid()

            c = OperationsCoordinator(max_workers=1, process_workers=2).start()
            pid().result(timeout=30)
            print(" ".join(map(str, c._process_lane.pids)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no stop(), no atexit
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert _wait_gone(pids, 5.0) == []


@pytest.mark.subprocess
def test_interpreter_exit_runs_queued_process_tokens(tmp_path: Path) -> None:
    script = tmp_path / "exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from tokengate import OperationsCoordinator, task_token_guard

            def work(x):
                time.sleep(0.05)
                return x

            work = task_token_guard(tags={"process_pool": True})(work)
            c = OperationsCoordinator(max_workers=1, process_workers=1).start()
            toks = [work(i) for i in range(4)]
            toks[-1].add_done_callback(lambda t: print("last", t.result(), flush=True))
            # no stop(): interpreter exit runs queued work, then the lane shuts down
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "last 3" in proc.stdout


# -- sending ahead (process_prefetch) --------------------------------------------------------


@task_token_guard(tags=PROC)
def quick(x: int) -> int:
    return x


@pytest.fixture
def ahead() -> Iterator[OperationsCoordinator]:
    """One worker process that has measured short tokens, so it is sent several at once."""
    with running_coordinator(max_workers=2, process_workers=1, process_prefetch=4) as c:
        assert tokengate.gather([quick(i) for i in range(30)], timeout=30) == list(range(30))
        yield c


def _sent_ahead(coord: OperationsCoordinator, n: int) -> None:
    """Waits until the worker process holds ``n`` tokens (one running, the rest queued there)."""
    assert support.wait_until(lambda: coord.get_stats()["lanes"]["process"]["in_flight"] == n, 10), coord.get_stats()[
        "lanes"
    ]["process"]


def _marker(tmp: Path) -> ProcessFunction:
    @task_token_guard(tags=PROC)
    def mark(path: str) -> str:
        Path(path).write_text("ran")
        return "ran"

    return mark  # type: ignore[return-value]


@task_token_guard(tags=PROC)
def hold_then(path: str, s: float, code: int | None = None) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(s)
    if code is not None:
        os._exit(code)
    return os.getpid()


def _b_queued_behind_a(coord: OperationsCoordinator, tmp: Path, hold_s: float, b_timeout: float | None = None) -> tuple:
    """Token ``a`` holds the one worker for ``hold_s``; ``b`` (writes ``tmp/b``) waits in that process."""
    mark = _marker(tmp)
    a = hold_then(str(tmp / "a"), hold_s)
    b = (mark.options(timeout=b_timeout) if b_timeout else mark)(str(tmp / "b"))
    _sent_ahead(coord, 2)
    return a, b


@task_token_guard(tags=PROC)
def nap_here(s: float) -> int:
    time.sleep(s)
    return os.getpid()


@task_token_guard(tags=PROC)
def nap_and_mark(path: str, i: int, s: float) -> int:
    time.sleep(s)
    with open(path, "a") as f:  # one short append per run: the runs can be counted
        f.write(f"{i}\n")
    return i


def _both_processes_warm(coord: OperationsCoordinator) -> list[Any]:
    """Both processes of the lane ready, this module loaded in each; their workers."""
    from tokengate._process.wrapper import lane_for

    workers = lane_for(coord)._workers
    seen: set[int] = set()

    def both_ran() -> bool:
        seen.update(tokengate.gather([nap_here(0.01) for _ in range(4)], timeout=30))
        return len(seen) == 2

    assert support.wait_until(both_ran, 30)
    assert support.wait_until(lambda: all(w is not None and w.ready for w in workers), 10)
    return workers


def _idle_with_short_measured_times(coord: OperationsCoordinator, workers: list[Any], times: dict[int, float]) -> None:
    """Waits until the lane is idle (its supervisor sets a process's measured time per
    token after it resolved the tokens of a reply: that too), then sets those times."""
    assert support.wait_until(lambda: coord.get_stats()["lanes"]["process"]["in_flight"] == 0, 10)

    def settled() -> bool:
        for w in workers:
            w.avg = times[w.slot]
        time.sleep(0.05)
        return all(w.avg == times[w.slot] for w in workers)

    assert support.wait_until(settled, 10)


def test_a_token_goes_to_the_process_holding_the_fewest_first() -> None:
    from tokengate._process.dispatch import _assign

    # One process measured short tokens (room 63), the other nothing yet (room 1): both idle.
    assert _assign([0, 0], [63, 1], 2) == [0, 1]
    assert _assign([1, 0], [3, 1], 3) == [1, 0, 0]
    assert _assign([0, 0, 0], [2, 2, 2], 6) == [0, 1, 2, 0, 1, 2]
    assert _assign([5, 0], [10, 4], 6) == [1, 1, 1, 1, 0, 0]  # a full one takes no more
    assert _assign([0], [0], 0) == []


def test_long_tokens_after_short_ones_go_to_an_idle_process_first(lane: OperationsCoordinator) -> None:
    """Tokens measured short give a process a deep prefetch, tokens measured longer a shallow
    one: two long tokens must still run side by side, one per process."""
    workers = _both_processes_warm(lane)  # this module's import must not count below
    for short in (0, 1):
        # The measured times short tokens leave: a deep prefetch for one process.
        _idle_with_short_measured_times(lane, workers, {short: 0.0001, 1 - short: 0.004})
        t0 = time.monotonic()
        pids = tokengate.gather([nap_here(0.4), nap_here(0.4)], timeout=30)
        took = time.monotonic() - t0
        assert pids[0] != pids[1], "both long tokens were sent to one process"
        assert took < 0.75, f"two 0.4 s tokens on two processes took {took:.2f} s"


def test_tokens_waiting_behind_a_long_call_go_to_an_idle_process(lane: OperationsCoordinator, tmp_path: Path) -> None:
    """Short tokens sent ahead to a process behind a long call are taken back for the idle
    process: they finish long before the long call does, and each runs exactly once."""
    workers = _both_processes_warm(lane)
    _idle_with_short_measured_times(lane, workers, {0: 0.0001, 1: 0.0001})  # deep prefetch for both
    marks = tmp_path / "marks"
    # Held by a pause, then taken in one go: the long one and about half the short ones go
    # to one process, in that order.
    op = nap_and_mark.operation_type
    lane.pause_operation(op)
    long = nap_and_mark(str(marks), -1, 2.0)
    shorts = [nap_and_mark(str(marks), i, 0.01) for i in range(20)]
    t0 = time.monotonic()
    lane.resume_operation(op)
    assert tokengate.gather(shorts, timeout=30) == list(range(20))
    took = time.monotonic() - t0
    assert took < 1.2, f"20 short tokens took {took:.2f} s beside a 2 s one: some waited behind it"
    assert not long.done()
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(20))  # each ran once
    assert long.result(timeout=30) == -1
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(-1, 20))
    assert lane.get_stats()["lanes"]["process"]["taken_back"] >= 1


class _FakeBoard:
    """A board whose worker runs the token at ``running_at`` of those it holds (the ones
    before it ended, their replies unread), sharing as the real board does."""

    def __init__(self, running_at: int = 0) -> None:
        self.listed: list[int] = []
        self.running_at = running_at

    def take_back(self, seqs: list[int], limit: int, share_from: int | None = None) -> list[int]:
        waiting = seqs[self.running_at + 1 :]
        if share_from is not None:
            limit = min(limit, (len(waiting) + 1) // 2)
            if limit < max(1, share_from):
                return []
        out = waiting[:limit]
        self.listed += out
        return out


def _balancing_lane(held: int, avg: float, answered_s: float, running_at: int = 0) -> tuple[Any, Any, list[Any], float]:
    """A dispatcher over two fake workers, one idle and ``busy``, which holds ``held``
    tokens (it runs the one at ``running_at``), measured at ``avg`` s a token, last answered
    ``answered_s`` before the time returned; and the list of the tokens it sends."""
    from collections import deque
    from types import SimpleNamespace

    from tokengate._process.dispatch import _Dispatch

    sent: list[Any] = []

    class Lane(_Dispatch):
        def _room(self, w: Any) -> int:
            return 64 - w.load

        def _spread(self, workers: list[Any], room: list[int], items: list[Any]) -> None:
            sent.extend(items)

    lane = Lane.__new__(Lane)
    now = time.monotonic()

    def worker(slot: int, n: int) -> Any:
        items = deque(SimpleNamespace(wire=slot * 1000 + i, worker=None) for i in range(n))
        return SimpleNamespace(
            slot=slot,
            items=items,
            load=n,
            mark=now - answered_s,
            avg=avg,
            board=_FakeBoard(running_at),
            skips=set(),
            left=None,
        )

    idle, busy = worker(0, 0), worker(1, held)
    lane._workers = [idle, busy]
    lane._counts = {"taken_back": 0}
    return lane, busy, sent, now


def test_the_last_tokens_of_a_burst_are_shared_with_an_idle_process() -> None:
    """The queue is empty, one process idle, the other holds tokens waiting behind the one
    it runs: half of those go to the idle process (they finish side by side, not one after
    the other), listed on the board so that the busy one skips them."""
    lane, busy, sent, now = _balancing_lane(held=21, avg=0.001, answered_s=0.001)
    lane._take_back(now)
    assert [it.wire for it in sent] == list(range(1001, 1011))  # 10 of the 20 waiting
    assert busy.board.listed == [it.wire for it in sent] and busy.skips == set(busy.board.listed)
    assert [it.wire for it in busy.items] == [1000, *range(1011, 1021)]
    assert lane._counts["taken_back"] == 10
    # Tokens that hold too little work to be worth a round stay.
    lane, busy, sent, now = _balancing_lane(held=21, avg=0.00001, answered_s=0.001)
    lane._take_back(now)
    assert sent == [] and len(busy.items) == 21
    # Behind a long call (no answer for 10 ms or more): all of them, as the idle process takes.
    lane, busy, sent, now = _balancing_lane(held=21, avg=0.00001, answered_s=0.05)
    lane._take_back(now)
    assert len(sent) == 20 and [it.wire for it in busy.items] == [1000]
    # Two replies not read yet: half of the 18 that really wait, not half of all 21.
    lane, busy, sent, now = _balancing_lane(held=21, avg=0.001, answered_s=0.001, running_at=2)
    lane._take_back(now)
    assert [it.wire for it in sent] == list(range(1003, 1012))
    # Half of those waiting is too little work to be worth a round: none.
    lane, busy, sent, now = _balancing_lane(held=21, avg=0.0001, answered_s=0.001, running_at=16)
    lane._take_back(now)
    assert sent == [] and busy.board.listed == []


def test_bursts_of_short_tokens_run_each_token_once_with_tokens_taken_back(
    lane: OperationsCoordinator, tmp_path: Path
) -> None:
    """Bursts whose last tokens are shared out at the end: every token still runs once."""
    _both_processes_warm(lane)
    marks = tmp_path / "marks"
    n = 0
    for _ in range(20):
        toks = [nap_and_mark(str(marks), n + i, 0.0005) for i in range(200)]
        assert tokengate.gather(toks, timeout=60) == list(range(n, n + 200))
        n += 200
        if lane.get_stats()["lanes"]["process"]["taken_back"]:
            break
    assert lane.get_stats()["lanes"]["process"]["taken_back"] >= 1
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(n))


@task_token_guard(tags=PROC)
def started_at() -> float:
    return time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine


def test_a_burst_s_first_tokens_start_while_it_is_submitted(lane: OperationsCoordinator) -> None:
    """A thread that keeps the interpreter while it submits a burst of process tokens
    lets the lane's supervisor send the first ones at once: the processes do not wait for
    CPython's switch interval (1 s here) or for the end of the burst (0.6 s)."""
    _both_processes_warm(lane)
    assert tokengate.gather([started_at() for _ in range(4)], timeout=30)
    time.sleep(0.1)  # the supervisor finished its round and waits
    old = sys.getswitchinterval()
    toks = []
    sys.setswitchinterval(1.0)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:
            toks.append(started_at())
            sum(range(3000))  # pure Python between submits: the interpreter stays held
    finally:
        sys.setswitchinterval(old)
    first = min(tokengate.gather(toks, timeout=60))
    assert first - t0 < 0.3, f"the first of {len(toks)} tokens started {first - t0:.2f} s into a 0.6 s burst"


def test_a_reply_to_an_earlier_sending_never_matches_a_later_one() -> None:
    """A token taken back from a process and later sent to it again: the skip of its first
    sending (listed, its reply still to come) must not touch the second."""
    from collections import deque
    from types import SimpleNamespace

    from tokengate._process.replies import _Replies
    from tokengate._process.wire import _OK, _SKIPPED

    finished: list[Any] = []
    replies = object.__new__(_Replies)
    replies.max_rss = None
    replies._retiring = set()
    replies._running = {}
    replies._counts = {"completed": 0}
    replies.outside = SimpleNamespace(finish=lambda task, value: finished.append(value) or True)
    unlisted: list[int] = []
    w = SimpleNamespace(skips={7}, board=SimpleNamespace(unlist=unlisted.append), left=None, items=deque())
    token = SimpleNamespace(done=lambda: False)
    task = SimpleNamespace(token=token)
    item = SimpleNamespace(seq=5, wire=8, pf=SimpleNamespace(_op="op"), task=task, done=False, worker=w)
    w.items.append(item)
    assert replies._handle(w, 7, _SKIPPED, b"") is False  # the first sending, skipped
    assert unlisted == [7] and list(w.items) == [item] and not finished
    assert replies._handle(w, 8, _OK, pickle.dumps(42)) is True
    assert finished == [42] and not w.items


def test_a_reply_that_comes_after_a_kill_counts_the_kill_once() -> None:
    """A token killed (or timed out) while its reply was on its way: the reply finds the
    token ended, and the stop notice then finds the item done. The kill is counted once,
    by whichever comes first; before, a reply that came first left it uncounted."""
    from collections import deque
    from types import SimpleNamespace

    from tokengate._process.dispatch import _Dispatch
    from tokengate._process.replies import _Replies
    from tokengate._process.wire import _OK

    class Lane(_Replies, _Dispatch):
        pass

    for state, key in (("killed", "killed"), ("timeout", "timeouts")):
        lane = object.__new__(Lane)
        lane.max_rss = None
        lane._retiring = set()
        lane._counts = {"completed": 0, "killed": 0, "timeouts": 0}
        lane.outside = SimpleNamespace(finish=lambda task, value: False)  # the token had ended
        w = SimpleNamespace(skips=set(), board=None, left=None, items=deque())
        task = SimpleNamespace(token=SimpleNamespace(state=state, done=lambda: True))
        item = SimpleNamespace(seq=5, wire=8, pf=SimpleNamespace(_op="op"), task=task, done=False, worker=w)
        lane._running = {5: item}
        w.items.append(item)
        assert lane._handle(w, 8, _OK, pickle.dumps(42)) is True
        lane._stopped(5)  # the stop notice, after the reply
        assert lane._counts == {"completed": 0, "killed": 0, "timeouts": 0, key: 1}


def test_prefetch_must_be_a_positive_int() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="process_prefetch"):
            OperationsCoordinator(process_prefetch=bad)
    for wrong in (1.5, True, "4"):
        with pytest.raises(TypeError, match="process_prefetch"):
            OperationsCoordinator(process_prefetch=wrong)  # type: ignore[arg-type]


def test_kill_of_a_token_queued_in_the_worker_skips_it(ahead: OperationsCoordinator, tmp_path: Path) -> None:
    a, b = _b_queued_behind_a(ahead, tmp_path, 0.8)
    pid = _pid_from(tmp_path / "a")
    # Sent to a process, it counts as running (ProcessPoolExecutor's call queue does the same):
    assert b.running() and not b.cancel()
    assert b.kill("not needed")
    with pytest.raises(TaskKilledError, match="not needed"):
        b.result(timeout=5)
    assert a.result(timeout=30) == pid  # its neighbour ran on, in the same process
    assert quick(1).result(timeout=30) == 1  # the process passed b by
    assert not (tmp_path / "b").exists(), "a token killed while queued in a worker ran anyway"
    stats = ahead.get_stats()["lanes"]["process"]
    assert stats["replaced"] == 0 and stats["pids"] == [pid]


def test_timeout_of_a_token_queued_in_the_worker_skips_it(ahead: OperationsCoordinator, tmp_path: Path) -> None:
    a, b = _b_queued_behind_a(ahead, tmp_path, 0.8, b_timeout=0.3)
    with pytest.raises(TaskTimeoutError):
        b.result(timeout=5)
    assert a.result(timeout=30) > 0
    assert quick(2).result(timeout=30) == 2
    assert not (tmp_path / "b").exists()
    assert ahead.get_stats()["lanes"]["process"]["replaced"] == 0


def test_kill_of_the_running_token_requeues_the_ones_behind_it(ahead: OperationsCoordinator, tmp_path: Path) -> None:
    a, b = _b_queued_behind_a(ahead, tmp_path, 30)
    pid = _pid_from(tmp_path / "a")
    assert a.kill("stop it")
    with pytest.raises(TaskKilledError):
        a.result(timeout=10)
    assert b.result(timeout=30) == "ran"  # started over in the new process, once
    assert _wait_gone([pid]) == []
    assert ahead.get_stats()["lanes"]["process"]["replaced"] == 1


def test_crash_fails_only_the_running_token_not_the_ones_queued_behind(
    ahead: OperationsCoordinator, tmp_path: Path
) -> None:
    mark = _marker(tmp_path)
    a = hold_then(str(tmp_path / "a"), 0.3, 7)
    b = mark(str(tmp_path / "b"))
    c = quick(3)
    _sent_ahead(ahead, 3)
    with pytest.raises(WorkerCrashedError) as info:
        a.result(timeout=30)
    assert info.value.exitcode == 7
    assert b.result(timeout=30) == "ran" and c.result(timeout=30) == 3
    stats = ahead.get_stats()["lanes"]["process"]
    assert stats["crashed"] == 1 and stats["completed"] >= 32


@task_token_guard(operation_type="note_then", tags=PROC)
def note_then(path: str, i: int, hold: float = 0.0, code: int | None = None, grip: bool = False) -> int:
    """Appends ``i`` to ``path``; with ``hold``, then sleeps that long, or with ``grip`` keeps
    the interpreter that long (its switch interval raised: no other Python thread of the
    worker runs); with ``code``, then exits with it."""
    if grip:
        sys.setswitchinterval(100.0)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    if hold:
        end = time.monotonic() + hold
        if grip:
            while time.monotonic() < end:
                pass
        else:
            time.sleep(hold)
        if code is not None:
            os._exit(code)
    return i


@task_token_guard(operation_type="mark_then", tags=PROC)
def mark_then(path: str, i: int, freeze: bool = False) -> int:
    """Appends ``i`` to ``path`` (a few microseconds: no Python file object); with
    ``freeze``, then stops its process (SIGSTOP): every thread of the worker stands still
    until the process is killed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"%d\n" % i)
    os.close(fd)
    if freeze:
        os.kill(os.getpid(), signal.SIGSTOP)
    return i


@pytest.mark.skipif(
    bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    reason="on the free-threaded build the resumed tokens do not reliably reach the worker in one message "
    "(seen: their replies went out as it waited for the next one), so none is staged when it dies; "
    "test_staged_frames_tell_which_reached_the_socket and the Rust tests of the stage cover it there",
)
@pytest.mark.parametrize("end", ["kill", "crash"])
def test_replies_staged_in_a_worker_that_dies_are_not_lost(
    ahead: OperationsCoordinator, tmp_path: Path, end: str
) -> None:
    """Short tokens' replies wait on the board while the worker runs on; when it is killed or
    crashes (here: SIGKILLed while it stands still, well before its flusher thread sends what
    waited 2 ms), they are read from there: each of those tokens resolves with its value and
    runs once (not again elsewhere, as a token it never started would)."""
    staged = 0
    for attempt in range(3):  # a worker that lost 2 ms between tokens sent them before: again
        log = tmp_path / f"log{attempt}"
        # The worker and the supervisor learn the calls are short.
        warm = [mark_then(str(tmp_path / "warm"), i) for i in range(30)]
        assert tokengate.gather(warm, timeout=30) == list(range(30))
        ahead.pause_operation("mark_then")
        short = [mark_then(str(log), i) for i in range(3)]
        last = mark_then(str(log), 99, freeze=True)
        ahead.resume_operation("mark_then")
        assert wait_until(lambda log=log: log.exists() and "99" in log.read_text().split(), 10)
        time.sleep(0.05)  # the process has stopped by now
        staged += not any(t.done() for t in short)
        if end == "kill":
            assert last.kill("stop it")
            with pytest.raises(TaskKilledError):
                last.result(timeout=10)
        else:
            os.kill(ahead.get_stats()["lanes"]["process"]["pids"][0], signal.SIGKILL)
            with pytest.raises(WorkerCrashedError):
                last.result(timeout=30)
        assert tokengate.gather(short, timeout=30) == [0, 1, 2]
        assert log.read_text().split() == ["0", "1", "2", "99"], "a token whose reply was staged ran again"
        if staged:
            break
    assert staged, "the short tokens' replies were never staged when the worker died: this tested nothing"


@pytest.mark.parametrize("grip", [False, True])
def test_a_reply_is_not_held_back_by_a_long_call_after_it(
    ahead: OperationsCoordinator, tmp_path: Path, grip: bool
) -> None:
    """A function known to be short whose next call runs long: the replies staged before that
    call still go out at once (the worker's flusher thread, which needs no interpreter: a call
    that keeps it holds nothing back), so those tokens do not run into their deadlines, and a
    kill of one of them finds it done."""
    log = tmp_path / "log"
    assert tokengate.gather([note_then(str(log), i) for i in range(5)], timeout=30) == list(range(5))
    ahead.pause_operation("note_then")
    short = [note_then.options(timeout=1.0)(str(log), 100 + i) for i in range(2)]  # type: ignore[attr-defined]
    last = note_then(str(log), 99, 3.0, grip=grip)
    ahead.resume_operation("note_then")
    t0 = time.monotonic()
    assert tokengate.gather(short, timeout=10) == [100, 101]
    assert time.monotonic() - t0 < 0.9, "the replies waited for the long call"
    assert not short[0].kill("too late"), "a finished token was killed"
    if grip:
        assert last.kill("done")
    else:
        assert last.result(timeout=30) == 99


def test_batches_wait_in_the_outbox_while_the_socket_is_full_and_arrive_whole() -> None:
    """The supervisor never blocks on a worker's socket: what a full socket does not take
    waits in the outbox, and later flushes send it; the worker reads every batch whole,
    in order. A worker gone makes the flush raise."""
    from multiprocessing.connection import Connection

    from tokengate._tokengate import BatchOutbox

    a, b = socket.socketpair()
    a.setblocking(False)
    out = BatchOutbox()
    batches = [bytes([i]) * (i * 50_000) for i in range(1, 12)]  # 3.3 MB in all: more than the socket holds
    try:
        for data in batches:
            out.push(data)
        assert not out.flush(a.fileno()) and len(out) > 0  # full: the rest waits
        reader = Connection(b.detach())
        got: list[bytes] = []
        th = threading.Thread(target=lambda: got.extend(reader.recv_bytes() for _ in batches))
        th.start()  # the worker's side: a blocking reader
        deadline = time.monotonic() + 30
        while not out.flush(a.fileno()) and time.monotonic() < deadline:
            time.sleep(0.001)
        th.join(30)
        assert got == batches and len(out) == 0
        reader.close()
        out.push(b"late")
        with pytest.raises(OSError):
            out.flush(a.fileno())
    finally:
        a.close()


def test_replies_are_cut_whole_from_reads_of_any_size() -> None:
    """The supervisor cuts replies off reads that end anywhere: inside a length prefix,
    inside a message, between two; empty payloads and ones of 70 KB among them, and one
    message too short to be a reply."""
    import random

    from tokengate._process.wire import _OK, _REPLY
    from tokengate._tokengate import ReplyReader

    def _header(n: int) -> bytes:  # multiprocessing's send_bytes framing
        return struct.pack("!i", n)

    rng = random.Random(7)
    payloads = [bytes([i % 251]) * rng.choice([0, 1, 5, 100, 70_000]) for i in range(200)]
    msgs = [_REPLY.pack(i, _OK) + p for i, p in enumerate(payloads)] + [b"short"]
    stream = b"".join(_header(len(m)) + m for m in msgs)
    want = [(i, _OK, p) for i, p in enumerate(payloads)] + [(-1, 255, b"")]
    for _ in range(30):
        reader = ReplyReader()
        pos = 0
        got: list[tuple[int, int, bytes]] = []
        while pos < len(stream):
            n = rng.choice([1, 3, 4, 7, 100, 5000, 100_000])
            got += reader.feed(stream[pos : pos + n])
            pos += n
        assert got == want and reader.held == 0
    a, b = socket.socketpair()
    try:  # from a socket: one read, sized for a large reply cut off at its front
        a.setblocking(False)
        reader = ReplyReader()
        assert reader.read(a.fileno()) == []  # nothing there yet
        big = _REPLY.pack(7, _OK) + b"x" * 300_000
        b.setblocking(False)
        sent = b.send(_header(len(big)) + big)
        assert sent < len(big)
        while reader.held < sent:  # the first read takes 64 KiB, the next what the reply needs
            assert reader.read(a.fileno()) == []
        b.setblocking(True)
        b.sendall((_header(len(big)) + big)[sent:])
        got = []
        while not got:
            got = reader.read(a.fileno()) or []
        assert got == [(7, _OK, b"x" * 300_000)]
        b.close()
        assert reader.read(a.fileno()) is None  # end of file: the worker is gone
    finally:
        a.close()
        b.close()


def test_a_token_sent_again_is_not_skipped_for_its_earlier_sending() -> None:
    """The board lists by wire number, new at each sending: a token taken back from a
    process (listed there until its skip is answered) and sent to it again still runs."""
    from tokengate._process.board import _Board

    board = _Board.create(4)
    try:
        assert board.shared.begin(6)  # runs the long call ...
        assert board.take_back([5, 6, 7, 8], 4) == [7, 8]  # ... these two wait behind it
        assert board.take_back([9], 4) is None  # not sent before the running one
        board.shared.end()
        assert not board.shared.begin(7)  # the first sending of a token: skipped
        assert board.shared.begin(10)  # the same token sent again, under a new number: runs
        board.shared.end()
        assert board.take_back([10, 11], 4) is None  # between two tokens: nothing taken
    finally:
        board.close()


def test_the_board_shares_half_of_those_waiting_behind_the_running_one() -> None:
    """The real board's sharing (the balancing tests above use a fake that copies the rule):
    tokens before the running one ended (their replies unread), so half of those after it
    go, rounded up, and none when that is fewer than ``share_from``."""
    from tokengate._process.board import _Board

    board = _Board.create(8)
    try:
        assert board.shared.begin(3)
        assert board.take_back([1, 2, 3, 4, 5, 6, 7, 8], 8, 1) == [4, 5, 6]  # 3 of the 5 waiting
        for seq in (4, 5, 6):
            board.unlist(seq)
        assert board.take_back([3, 4, 5, 6, 7, 8], 8, 4) == []  # 3 would go: fewer than 4
        assert board.take_back([3, 4, 5, 6, 7, 8], 2, 1) == [4, 5]  # the idle side's room
        assert board.take_back([3], 8, 0) == []  # nothing waits
        board.shared.end()
    finally:
        board.close()


def test_a_board_refuses_sizes_it_cannot_hold_and_a_second_stage() -> None:
    """Bad sizes are refused before anything is mapped (a size that overflows, a file too
    short, which would crash on first use), and a board has one reply stage."""
    from tokengate._process.board import _Board
    from tokengate._tokengate import ProcessBoard, ReplyOutbox

    with pytest.raises(ValueError, match="at most"):
        ProcessBoard.size(2**61)
    board = _Board.create(4)
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="at most"):
            ProcessBoard(board.fd, 2**61)
        with pytest.raises(OSError, match="fewer than"):
            ProcessBoard(board.fd, 5000)  # the file holds a board of 4 words
        ReplyOutbox(board.shared, a.fileno(), 1, flusher=False)
        with pytest.raises(ValueError, match="reply stage already"):
            ReplyOutbox(board.shared, a.fileno(), 1, flusher=False)
    finally:
        a.close()
        b.close()
        board.close()


def test_staged_frames_tell_which_reached_the_socket() -> None:
    """The board counts the frames a worker sent before its staged ones: after a death, the
    supervisor skips the staged frames it already read from the socket."""
    from tokengate._process.board import _Board
    from tokengate._process.wire import _OK, _REPLY
    from tokengate._tokengate import ReplyOutbox, ReplyReader

    def _frames(data: bytes) -> list[bytes]:
        return [payload for _, _, payload in ReplyReader().feed(data)]

    board = _Board.create(4)
    a, b = socket.socketpair()
    try:
        out = ReplyOutbox(board.shared, a.fileno(), 1, flusher=False)
        r1, r2, r3, r4 = (_REPLY.pack(i, _OK) + b"r%d" % i for i in range(1, 5))
        for reply in (r1, r2):
            out.put(reply)
        out.flush()
        out.put(r3)
        out.put(r4)
        got = _frames(b.recv(1 << 16))
        assert got == [b"r1", b"r2"]
        before, data = board.staged()
        assert before == 3 and _frames(data) == [b"r3", b"r4"]
        received = 1 + len(got)  # the ready message, then r1 and r2
        assert _frames(data)[max(0, received - before) :] == [b"r3", b"r4"]
        assert _frames(data)[max(0, received + 1 - before) :] == [b"r4"]  # r3 had reached it
        out.flush()
        assert _frames(b.recv(1 << 16)) == [b"r3", b"r4"]
        assert board.staged() == (5, b"")
    finally:
        a.close()
        b.close()
        board.close()


def test_room_is_never_negative_and_none_for_a_worker_silent_in_a_long_call() -> None:
    """How many tokens the supervisor sends a worker: none once its budget is spent, even when
    a token stopped after it ran takes its unit back late (left < 0 took a negative count from
    the queue and stopped the lane), and none while it holds a token it has not answered for
    10 ms (what it would be sent would wait behind that call)."""
    from types import SimpleNamespace

    from tokengate._process.dispatch import _Dispatch

    lane = SimpleNamespace(prefetch=64)
    w = SimpleNamespace(ready=True, over_rss=False, avg=1e-4, load=0, left=-1, mark=time.monotonic())
    room = _Dispatch._room
    assert room(lane, w) == 0  # type: ignore[arg-type]
    w.left = None
    assert room(lane, w) == 64  # type: ignore[arg-type]
    w.load, w.mark = 1, time.monotonic() - 0.05
    assert room(lane, w) == 0  # type: ignore[arg-type]
    w.mark = time.monotonic()
    assert room(lane, w) == 63  # type: ignore[arg-type]


def test_long_tokens_are_sent_one_at_a_time(lane1: OperationsCoordinator, tmp_path: Path) -> None:
    """Tokens of 10 ms or more are not sent ahead: priorities and cancel() reach every queued one."""
    hold_then(str(tmp_path / "w"), 0.05).result(timeout=30)
    a = hold_then(str(tmp_path / "a"), 0.5)
    rest = [quick(i) for i in range(5)]
    _pid_from(tmp_path / "a")
    time.sleep(0.1)
    assert lane1.get_stats()["lanes"]["process"]["in_flight"] == 1
    assert all(t.cancel() for t in rest)
    a.result(timeout=30)


@task_token_guard(tags=PROC)
def big_echo(data: bytes, n: int) -> list[bytes]:
    return [data[::-1]] * n


def test_large_arguments_and_results_cross_intact(ahead: OperationsCoordinator) -> None:
    """Replies bigger than one socket read (and several per read) are reassembled in order."""
    data = os.urandom(3 << 20)
    tokens = [big_echo(data, 1), quick(5), big_echo(data[:1000], 2000), quick(6)]
    out = tokengate.gather(tokens, timeout=60)
    assert out[0] == [data[::-1]] and out[1] == 5 and out[3] == 6
    assert out[2] == [data[:1000][::-1]] * 2000


@task_token_guard(tags=PROC)
def echo_bytes(data: bytes) -> bytes:
    return data


def test_full_sockets_both_ways_do_not_deadlock() -> None:
    """Batches and replies bigger than the socket buffers: the supervisor never blocks on a
    worker that is itself blocked sending replies (it keeps the rest in an outbox)."""
    with running_coordinator(max_workers=2, process_workers=1) as c:
        assert tokengate.gather([quick(i) for i in range(200)], timeout=30) == list(range(200))
        data = os.urandom(10_000)
        tokens = [echo_bytes(data) for _ in range(300)]
        assert tokengate.gather(tokens, timeout=60) == [data] * 300
        assert c.get_stats()["lanes"]["process"]["replaced"] == 0


def test_a_crash_with_the_lane_sockets_above_fd_1024() -> None:
    """select() cannot watch fds >= 1024; the lane must not depend on it."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"needs 1200 file descriptors, the limit is {soft}")
    keep = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with OperationsCoordinator(max_workers=2, process_workers=1) as c:
            assert quick(1).result(timeout=30) == 1
            with pytest.raises(WorkerCrashedError):
                hold_then(os.devnull, 0.05, 7).result(timeout=30)
            assert quick(2).result(timeout=30) == 2
            assert c.get_stats()["lanes"]["process"]["crashed"] == 1
    finally:
        for fd in keep:
            os.close(fd)
