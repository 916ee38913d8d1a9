"""A cluster lane against calling its cluster directly, on one local cluster, in one run.

    python benches/bench_cluster.py [--cluster dask|ray] [--tokens 2000] [--rounds 7] [--workers 2] [--json out.json]

Dask: a ``LocalCluster`` of ``--workers`` processes (one thread each, loopback)
is started once; a coordinator uses it through ``cluster=client``. Ray: a
local Ray with ``--workers`` CPUs (``ray.init(address="local")``); a
coordinator uses it through ``cluster="ray"``. Each round, in alternating order:

* **direct**: ``--tokens`` calls of a no-op (Dask: ``client.submit(noop, i,
  pure=False)``, then ``client.gather``; Ray: ``noop.remote(i)``, then
  ``ray.get`` of the list);
* **tokengate**: ``--tokens`` calls of a ``cluster: True`` no-op (weight heavy:
  one CPU each on Ray, as ``ray.remote``'s default), then ``tokengate.gather``;
* Ray only, **tokengate, no batches**: the same with the lane's batching of short
  tokens turned off (``RayLane.batch_seconds = 0``), each token its own Ray task.

The cost per task is the round's wall time over ``--tokens``; the table shows
the median (p50) over rounds and the ratio tokengate / direct (goal <= 1.25x).
Single round trips (one call, then its result) are shown for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_busy_fraction, dump, machine, table, verdict

import tokengate
from tokengate import OperationsCoordinator, task_token_guard


def noop(x: int) -> int:
    return x


noop_token = task_token_guard(operation_type="bench_cluster_noop", tags={"cluster": True, "weight": "heavy"})(noop)


def dask_cluster(workers: int) -> tuple[Any, Callable[[int], list[int]], Callable[[int], int], Callable[[], None]]:
    """(cluster=, run n no-ops directly, one direct round trip, close)."""
    import distributed

    from tokengate._cluster.connect import local_cluster

    cluster = local_cluster(workers)
    client = distributed.Client(cluster, set_as_default=False)

    def many(n: int) -> list[int]:
        return list(client.gather([client.submit(noop, i, pure=False) for i in range(n)]))

    def close() -> None:
        client.close()
        cluster.close()

    return client, many, lambda i: int(client.submit(noop, i, pure=False).result()), close


def ray_cluster(workers: int) -> tuple[Any, Callable[[int], list[int]], Callable[[int], int], Callable[[], None]]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=workers, include_dashboard=False, configure_logging=False)
    remote = ray.remote(noop)

    def many(n: int) -> list[int]:
        return list(ray.get([remote.remote(i) for i in range(n)]))

    return "ray", many, lambda i: int(ray.get(remote.remote(i))), ray.shutdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--round-trips", type=int, default=50)
    ap.add_argument("--cluster", choices=("dask", "ray"), default="dask")
    ap.add_argument("--json")
    args = ap.parse_args()

    busy = cpu_busy_fraction()
    target, many, one, close = (dask_cluster if args.cluster == "dask" else ray_cluster)(args.workers)
    n = args.tokens
    direct: list[float] = []
    lane: list[float] = []
    unbatched: list[float] = []
    rt_direct: list[float] = []
    rt_lane: list[float] = []
    try:
        with OperationsCoordinator(max_workers=2, cluster=target) as coord:
            # Warm up both paths (functions shipped, pools and workers started).
            many(50)
            tokengate.gather([noop_token(i) for i in range(50)], timeout=120)

            def run_direct() -> None:
                t0 = time.perf_counter()
                assert many(n) == list(range(n))
                direct.append((time.perf_counter() - t0) / n)

            def run_lane() -> None:
                t0 = time.perf_counter()
                toks = [noop_token(i) for i in range(n)]
                assert tokengate.gather(toks, timeout=600) == list(range(n))
                lane.append((time.perf_counter() - t0) / n)

            def run_unbatched() -> None:
                cluster_lane = coord._cluster_lane
                cluster_lane.batch_seconds = 0.0
                try:
                    t0 = time.perf_counter()
                    toks = [noop_token(i) for i in range(n)]
                    assert tokengate.gather(toks, timeout=600) == list(range(n))
                    unbatched.append((time.perf_counter() - t0) / n)
                finally:
                    del cluster_lane.batch_seconds

            runs = [run_direct, run_lane] + ([run_unbatched] if args.cluster == "ray" else [])
            for r in range(args.rounds):
                for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
                    run()
            for i in range(args.round_trips):
                t0 = time.perf_counter()
                one(i)
                rt_direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                noop_token(i).result(timeout=60)
                rt_lane.append(time.perf_counter() - t0)
    finally:
        close()

    p50_direct = statistics.median(direct)
    p50_lane = statistics.median(lane)
    ratio = p50_lane / p50_direct
    rt_ratio = statistics.median(rt_lane) / statistics.median(rt_direct)
    rows = [
        (
            f"{n} no-op tasks, {'client.submit + gather' if args.cluster == 'dask' else 'f.remote() + ray.get'}, per task (p50 of {args.rounds})",
            f"{p50_direct * 1e6:.0f} us",
            "1.00x",
            "",
        ),
        (
            f"{n} no-op tokens on the {args.cluster} lane, per task (p50)",
            f"{p50_lane * 1e6:.0f} us",
            f"{ratio:.2f}x",
            f"{verdict(ratio <= 1.25)} goal <= 1.25x",
        ),
        (
            "single round trip p50, direct",
            f"{statistics.median(rt_direct) * 1e6:.0f} us",
            "1.00x",
            "reference",
        ),
        (
            "single round trip p50, token.result()",
            f"{statistics.median(rt_lane) * 1e6:.0f} us",
            f"{rt_ratio:.2f}x",
            "reference",
        ),
    ]
    if unbatched:
        ub_ratio = statistics.median(unbatched) / p50_direct
        rows.insert(
            2,
            (
                "the same, no batches (each token its own Ray task), per task (p50)",
                f"{statistics.median(unbatched) * 1e6:.0f} us",
                f"{ub_ratio:.2f}x",
                f"{verdict(ub_ratio <= 1.25)} goal <= 1.25x",
            ),
        )
    print(table(rows, ("measure", "time", "ratio", "note")))
    print("per-round per-task us, direct:", " ".join(f"{v * 1e6:.0f}" for v in direct))
    print("per-round per-task us, lane:  ", " ".join(f"{v * 1e6:.0f}" for v in lane))
    if unbatched:
        print("per-round per-task us, lane, no batches:", " ".join(f"{v * 1e6:.0f}" for v in unbatched))
    print(f"CPU busy before the run: {busy:.2f}")
    dump(
        args.json,
        {
            "machine": machine(),
            "cluster": args.cluster,
            "direct_s": direct,
            "lane_s": lane,
            "lane_unbatched_s": unbatched,
            "ratio": ratio,
            "rt_ratio": rt_ratio,
        },
    )


if __name__ == "__main__":
    main()
