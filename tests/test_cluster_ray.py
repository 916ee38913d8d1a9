"""The Ray lane: ``OperationsCoordinator(cluster="ray" | "ray://HOST:PORT" | "ray-local")``.

The tests share one 2-node local Ray cluster (``ray start --head`` and a second
``ray start --address``, loopback, separate ports; the ``ray_nodes`` fixture) that
this process is connected to, through ``cluster="ray"``. The node-loss tests add a
third node and kill it; ``ray-local`` and ``ray://`` run in child interpreters (Ray
allows one connection per process). Set ``TOKENGATE_REQUIRE_RAY=1`` to fail, not
skip, when Ray is missing.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if not os.environ.get("TOKENGATE_REQUIRE_RAY"):
    pytest.importorskip("ray")

import ray

import tokengate
from cluster_functions import fail, flaky, heavy, marked, slow, square, stamp, where
from support import RayNodes, wait_until
from tokengate import (
    DependencyFailedError,
    OperationsCoordinator,
    TaskKilledError,
    TaskTimeoutError,
    WorkerLostError,
)
from tokengate._process import UnpicklableError
from tokengate.metrics import generate_latest

WAIT = 60.0
HERE = Path(__file__).parent
pytestmark = pytest.mark.timeout(300)  # the first test starts the 2-node cluster too


@pytest.fixture(scope="module", autouse=True)
def _connected(ray_nodes: RayNodes) -> RayNodes:
    return ray_nodes


@pytest.fixture
def coord() -> Iterator[OperationsCoordinator]:
    c = OperationsCoordinator(max_workers=2, cluster="ray").start()
    try:
        yield c
    finally:
        c.stop(timeout=30)


def lane_stats(c: OperationsCoordinator) -> dict[str, Any]:
    return dict(c.get_stats()["lanes"]["ray"])


def marked_pids(path: Path) -> set[int]:
    """Pids of the Ray workers that started ``marked`` calls writing to ``path``."""
    return {int(line.split()[1]) for line in path.read_text().splitlines()} if path.exists() else set()


def all_gone(pids: set[int]) -> bool:
    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # gone, also between a check and the read of its status
            return False

    return not any(map(running, pids))


def test_tokens_run_on_the_cluster_nodes(coord: OperationsCoordinator, ray_nodes: RayNodes) -> None:
    toks = [where(i) for i in range(40)]
    got = tokengate.gather(toks, timeout=WAIT)
    assert [x for x, _ in got] == list(range(40))
    assert os.getpid() not in {pid for _, pid in got}
    assert toks[0].lane == "ray" and toks[0].state == "completed"
    stats = lane_stats(coord)
    assert stats["submitted"] == stats["completed"] == 40 and stats["capacity"] == 4.0 and stats["pending"] == 0
    text = generate_latest(coord).decode()
    assert f'tokengate_workers{{pool="{coord._engine.pool_id}",lane="ray"}} 4' in text


def test_await_result_map_and_errors(coord: OperationsCoordinator, tmp_path: Path) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(*[square(i) for i in range(5)]))

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]
    assert list(square.map(range(4))) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="bad 3"):  # the body's own exception, not Ray's wrapper
        fail(3).result(timeout=WAIT)
    tok = flaky(str(tmp_path / "marker"))
    assert tok.result(timeout=WAIT) == "second" and tok.attempts == 2
    stats = lane_stats(coord)
    assert stats["failed"] == 1 and stats["retries"] == 1


def test_a_deadline_ends_a_ray_task(coord: OperationsCoordinator, tmp_path: Path) -> None:
    path = tmp_path / "marks"
    tok = marked.options(timeout=5.0)(1, str(path), 60.0)
    assert wait_until(lambda: marked_pids(path), 10.0)  # started well before its deadline
    with pytest.raises(TaskTimeoutError):
        tok.result(timeout=WAIT)
    pids = marked_pids(path)
    assert len(pids) == 1 and wait_until(lambda: all_gone(pids), 20.0)  # ray.cancel(force=True) ended it


def test_an_argument_that_cannot_be_pickled_fails_at_the_call(coord: OperationsCoordinator) -> None:
    with pytest.raises(UnpicklableError, match=r"cl_square: argument 0 \(_thread\.lock\)"):
        square(threading.Lock())


def test_tokens_as_arguments_go_as_object_refs(coord: OperationsCoordinator) -> None:
    assert square(square(3)).result(timeout=WAIT) == 81
    inp = slow(3, 0.3)
    tok = slow(x=inp, seconds=0.01)  # linked while the input still runs: its ObjectRef is passed on
    assert tok.result(timeout=WAIT) == 3
    assert lane_stats(coord)["linked"] >= 1
    with pytest.raises(DependencyFailedError):
        square(fail(1)).result(timeout=WAIT)
    lane = coord._cluster_lane
    assert wait_until(lambda: lane._kept == {} and lane._wanted == {} and lane._links == {}, 5.0)


def test_tokens_start_in_priority_order(coord: OperationsCoordinator) -> None:
    # Ray starts a worker process per running task: with none idle, a task waits for one to
    # start, and the start order is the workers' order. Start them first.
    tokengate.gather([stamp(i, 0.5) for i in range(8)], timeout=WAIT)
    rng = random.Random(7)
    coord.pause_operation("cl_stamp")
    prios = [rng.randrange(5) for _ in range(100)]
    toks = [stamp.options(priority=p)(i, 0.02) for i, p in enumerate(prios)]
    coord.resume_operation("cl_stamp")
    results = tokengate.gather(toks, timeout=WAIT)
    started = sorted(range(len(toks)), key=lambda i: results[i][1])  # by start time on the cluster
    start_pos = {i: pos for pos, i in enumerate(started)}
    # The engine's order: higher priority first, then the older token.
    rank = {i: r for r, i in enumerate(sorted(range(len(toks)), key=lambda i: (-prios[i], i)))}
    # Ray has no priorities and reorders what it was sent. The lane keeps at most 4 CPUs + 8
    # ahead in flight (24 medium tokens), so a token goes out only after all but 24 of those
    # before it in the engine's order finished: it cannot start more than 24 places early.
    early = {i: rank[i] - start_pos[i] for i in range(len(toks)) if rank[i] - start_pos[i] > 24}
    assert not early, early
    mean = {p: statistics.mean(start_pos[i] for i in range(len(toks)) if prios[i] == p) for p in (0, 4)}
    assert mean[4] + 30 < mean[0], mean


def backlog(coord: OperationsCoordinator, op: str, submit: Any) -> list[Any]:
    """The tokens ``submit()`` made, released at once (the lane finds them all queued)."""
    coord.pause_operation(op)
    try:
        return list(submit())
    finally:
        coord.resume_operation(op)


def test_short_tokens_go_in_batches(coord: OperationsCoordinator) -> None:
    # The lane measures a function with its first pair of tokens (its first batch may wait
    # for Ray to start a worker for it: meanwhile the others go alone).
    tokengate.gather(backlog(coord, "cl_square", lambda: [square(i) for i in range(300)]), timeout=WAIT)
    before = lane_stats(coord)["batched"]
    toks = backlog(coord, "cl_square", lambda: [square(i) for i in range(600)])
    assert [t.result(timeout=WAIT) for t in toks] == [i * i for i in range(600)]
    assert lane_stats(coord)["batched"] - before >= 300  # a backlog of short tokens: most go several to a Ray task
    # A body's exception from a batch keeps the worker's traceback as its cause.
    toks = backlog(coord, "cl_fail", lambda: [fail(i) for i in range(300)])
    errors = [t.exception(timeout=WAIT) for t in toks]
    assert [str(e) for e in errors] == [f"bad {i}" for i in range(300)]
    assert all(isinstance(e, ValueError) for e in errors)
    assert all("raise ValueError" in str(e.__cause__) for e in errors)
    stats = lane_stats(coord)
    assert stats["failed"] == 300 and stats["completed"] == 900


def test_what_cannot_go_in_a_batch_goes_alone(coord: OperationsCoordinator) -> None:
    tokengate.gather(backlog(coord, "cl_square", lambda: [square(i) for i in range(300)]), timeout=WAIT)
    before = lane_stats(coord)["batched"]
    assert before > 0  # the lane has measured square
    # Ray resolves an ObjectRef only at a call's top level: these must not be batched.
    ref = ray.put(7)
    toks = backlog(coord, "cl_square", lambda: [square(ref) for _ in range(200)])
    assert tokengate.gather(toks, timeout=WAIT) == [49] * 200
    # Tokens with a deadline keep their own Ray task (a deadline cancels it).
    toks = backlog(coord, "cl_square", lambda: [square.options(timeout=30.0)(i) for i in range(200)])
    assert tokengate.gather(toks, timeout=WAIT) == [i * i for i in range(200)]
    assert lane_stats(coord)["batched"] == before
    # An input batched before a call linked it reaches that call as its value.
    assert tokengate.gather([square(square(i)) for i in range(300)], timeout=WAIT) == [i**4 for i in range(300)]
    lane = coord._cluster_lane
    assert wait_until(lambda: lane._kept == {} and lane._wanted == {} and lane._links == {}, 5.0)


def test_killing_some_tokens_of_a_batch_spares_the_others(coord: OperationsCoordinator) -> None:
    from tokengate._cluster.ray_lane import _Batch

    tokengate.gather(backlog(coord, "cl_square", lambda: [square(i) for i in range(300)]), timeout=WAIT)
    lane = coord._cluster_lane
    seen: dict[int, Any] = {}

    def batches_in_flight() -> bool:
        try:
            handles = [h for _, h, _ in list(lane._inflight.values())]
        except RuntimeError:  # the dispatcher changed it meanwhile
            return False
        seen.update((id(h), h) for h in handles if type(h) is _Batch and len(h.ids) > 2)
        return len(seen) >= 3

    toks = backlog(coord, "cl_square", lambda: [square(i) for i in range(3000)])
    assert wait_until(batches_in_flight, 30.0, interval=0.0005)
    by_id = {t.token_id: i for i, t in enumerate(toks)}
    # The first token of each of these batches, while the others of it may still run.
    killed = {by_id[b.ids[0]] for b in seen.values() if toks[by_id[b.ids[0]]].kill("test")}
    for i, tok in enumerate(toks):
        if i in killed:
            with pytest.raises(TaskKilledError):
                tok.result(timeout=WAIT)
        else:
            assert tok.result(timeout=WAIT) == i * i
    assert killed and lane_stats(coord)["lost"] == 0


def test_weight_is_num_cpus(coord: OperationsCoordinator) -> None:
    got = tokengate.gather([heavy(i, 0.3) for i in range(12)], timeout=WAIT)
    events = sorted([(s, 1) for _, s, _ in got] + [(e, -1) for _, _, e in got])
    running = most = 0
    for _, d in events:
        running += d
        most = max(most, running)
    assert 2 <= most <= 4  # heavy takes a whole CPU: at most the cluster's 4 at once


def test_killing_an_operation_cancels_its_ray_tasks(coord: OperationsCoordinator, tmp_path: Path) -> None:
    path = tmp_path / "marks"
    toks = [marked(i, str(path), 30.0) for i in range(4)]  # heavy: one per CPU, all 4 run
    assert wait_until(lambda: len(marked_pids(path)) == 4, 30.0)
    assert coord.kill_all_by_operation("cl_marked") == 4
    for t in toks:
        with pytest.raises(TaskKilledError):
            t.result(timeout=0)
    assert wait_until(lambda: all_gone(marked_pids(path)), 20.0)
    assert lane_stats(coord)["cancelled"] == 4


def _lose_a_node(ray_nodes: RayNodes, retries: int, tmp_path: Path) -> tuple[list[Any], float, int]:
    node = ray_nodes.add_node()
    try:
        assert wait_until(lambda: ray.cluster_resources().get("CPU") == 6.0, WAIT)
        marks = tmp_path / "marks"
        with OperationsCoordinator(max_workers=2, cluster="ray") as c:
            toks = [marked.options(retries=retries)(i, str(marks), 0.05) for i in range(100)]
            # Killed once the node has run some of them.
            assert wait_until(lambda: marks.exists() and f"{node} " in marks.read_text(), WAIT)
            t0 = time.monotonic()
            ray_nodes.kill_node(node)
            assert wait_until(lambda: all(t.done() for t in toks), WAIT)
            took = time.monotonic() - t0
            return toks, took, int(lane_stats(c)["lost"])
    finally:
        if node in ray_nodes.nodes:
            ray_nodes.kill_node(node)
        wait_until(lambda: ray.cluster_resources().get("CPU") == 4.0, WAIT)


def test_a_lost_node_is_survived_with_retries(ray_nodes: RayNodes, tmp_path: Path) -> None:
    toks, took, lost = _lose_a_node(ray_nodes, 1, tmp_path)
    assert [t.result(timeout=0) for t in toks] == list(range(100))
    assert took < 15.0 and lost >= 1


def test_a_lost_node_fails_its_tokens_without_retries(ray_nodes: RayNodes, tmp_path: Path) -> None:
    toks, _, lost = _lose_a_node(ray_nodes, 0, tmp_path)
    failed = [t for t in toks if t.state == "failed"]
    assert failed and all(isinstance(t.exception(timeout=0), WorkerLostError) for t in failed)
    assert all(t.result(timeout=0) == i for i, t in enumerate(toks) if t.state == "completed")
    assert lost == len(failed)


_NOT_INIT = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from tokengate import OperationsCoordinator
from cluster_functions import square
with OperationsCoordinator(cluster="ray"):  # valid here: the lane connects on first use
    try:
        square(2)
    except ValueError as exc:
        print(exc)
"""


@pytest.mark.subprocess
def test_cluster_ray_needs_ray_init_first() -> None:
    proc = subprocess.run([sys.executable, "-c", _NOT_INIT], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray.init() has not run" in proc.stdout
    from tokengate._cluster.connect import connect_ray

    with pytest.raises(ValueError, match="connected to Ray already"):
        connect_ray("ray-local")


@pytest.mark.parametrize("bad", ["ray-local:0", "ray://host", "ray:/h:1", "rays"])
def test_a_bad_ray_value_is_refused_at_construction(bad: str) -> None:
    with pytest.raises(ValueError, match="cluster"):
        OperationsCoordinator(cluster=bad)


_CHILD = """
import sys, time
sys.path.insert(0, {here!r})
import psutil, ray
from tokengate import OperationsCoordinator
from cluster_functions import square, where
me = psutil.Process()
c = OperationsCoordinator(max_workers=1, cluster={cluster!r}).start()
assert [square(i).result(60) for i in range(4)] == [0, 1, 4, 9]
started = {{p.pid for p in me.children(recursive=True)}}
print("lane", c.get_stats()["lanes"]["ray"]["completed"], "children", len(started), flush=True)
assert c.stop(timeout=30)
print("connected after stop", ray.is_initialized(), flush=True)
deadline = time.monotonic() + 20
while {{p.pid for p in me.children(recursive=True)}} & started and time.monotonic() < deadline:
    time.sleep(0.1)
print("left", len({{p.pid for p in me.children(recursive=True)}} & started), flush=True)
"""


@pytest.mark.subprocess
def test_ray_local_stops_every_process_it_started() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(here=str(HERE), cluster="ray-local:2")],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(HERE)),  # the workers import cluster_functions
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("lane 4 children ") and int(lines[0].split()[-1]) > 0, proc.stdout
    assert lines[1:] == ["connected after stop False", "left 0"], proc.stdout


_SHARED = """
import ray
from tokengate import ClusterExecutor, OperationsCoordinator
def run_on(c, x):
    ex = ClusterExecutor(coordinator=c)  # its calls go to c's cluster lane
    try:
        return ex.submit(pow, x, 2).result(60)
    finally:
        ex.shutdown()
owner = OperationsCoordinator(max_workers=1, cluster="ray-local:2", register_global=False).start()
joined = OperationsCoordinator(max_workers=1, cluster="ray", register_global=False).start()
third = OperationsCoordinator(max_workers=1, cluster="ray-local:2", register_global=False).start()
print(run_on(owner, 3), run_on(joined, 4))  # the joined lane shares the owner's connection
try:
    run_on(third, 1)
except ValueError as exc:
    print("refused:", "connected to Ray already" in str(exc))
assert third.stop(timeout=30)
assert owner.stop(timeout=30)
print("after the owner stopped", ray.is_initialized(), run_on(joined, 5))
assert joined.stop(timeout=30)
print("after the last stopped", ray.is_initialized())
"""


@pytest.mark.subprocess
def test_coordinators_share_the_connection_and_the_last_closes_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SHARED],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=str(HERE)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "9 16",
        "refused: True",
        "after the owner stopped True 25",
        "after the last stopped False",
    ], proc.stdout


@pytest.mark.subprocess
def test_a_ray_client_address(ray_nodes: RayNodes) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(here=str(HERE), cluster=f"ray://127.0.0.1:{ray_nodes.client_port}")],
        capture_output=True,
        text=True,
        timeout=180,
        env=ray_nodes.env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "lane 4 children 0" and lines[1:] == ["connected after stop False", "left 0"], proc.stdout
