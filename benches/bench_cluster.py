"""The Dask lane against calling ``client.submit`` directly, on one local cluster, in one run.

    python benches/bench_cluster.py [--tokens 2000] [--rounds 7] [--workers 2] [--json out.json]

A ``LocalCluster`` of ``--workers`` processes (one thread each, loopback) is
started once; a coordinator uses it through ``cluster=client``. Each round,
in alternating order:

* **direct**: ``client.submit(noop, i, pure=False)`` for ``--tokens`` calls,
  then ``client.gather`` of all of them;
* **tokengate**: ``--tokens`` calls of a ``cluster: True`` no-op, then
  ``tokengate.gather`` of the tokens.

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_busy_fraction, dump, machine, table, verdict

import tokengate
from tokengate import OperationsCoordinator, task_token_guard


def noop(x: int) -> int:
    return x


noop_token = task_token_guard(operation_type="bench_cluster_noop", tags={"cluster": True})(noop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--round-trips", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()

    import distributed

    from tokengate._cluster.connect import local_cluster

    busy = cpu_busy_fraction()
    cluster = local_cluster(args.workers)
    client = distributed.Client(cluster, set_as_default=False)
    n = args.tokens
    direct: list[float] = []
    lane: list[float] = []
    rt_direct: list[float] = []
    rt_lane: list[float] = []
    try:
        with OperationsCoordinator(max_workers=2, cluster=client):
            # Warm up both paths (functions shipped, pools started).
            client.gather([client.submit(noop, i, pure=False) for i in range(50)])
            tokengate.gather([noop_token(i) for i in range(50)], timeout=120)

            def run_direct() -> None:
                t0 = time.perf_counter()
                futures = [client.submit(noop, i, pure=False) for i in range(n)]
                assert client.gather(futures) == list(range(n))
                direct.append((time.perf_counter() - t0) / n)

            def run_lane() -> None:
                t0 = time.perf_counter()
                toks = [noop_token(i) for i in range(n)]
                assert tokengate.gather(toks, timeout=600) == list(range(n))
                lane.append((time.perf_counter() - t0) / n)

            for r in range(args.rounds):
                first, second = (run_direct, run_lane) if r % 2 == 0 else (run_lane, run_direct)
                first()
                second()
            for i in range(args.round_trips):
                t0 = time.perf_counter()
                client.submit(noop, i, pure=False).result()
                rt_direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                noop_token(i).result(timeout=60)
                rt_lane.append(time.perf_counter() - t0)
    finally:
        client.close()
        cluster.close()

    p50_direct = statistics.median(direct)
    p50_lane = statistics.median(lane)
    ratio = p50_lane / p50_direct
    rt_ratio = statistics.median(rt_lane) / statistics.median(rt_direct)
    rows = [
        (
            f"{n} no-op tasks, client.submit + gather, per task (p50 of {args.rounds})",
            f"{p50_direct * 1e6:.0f} us",
            "1.00x",
            "",
        ),
        (
            f"{n} no-op tokens on the Dask lane, per task (p50)",
            f"{p50_lane * 1e6:.0f} us",
            f"{ratio:.2f}x",
            f"{verdict(ratio <= 1.25)} goal <= 1.25x",
        ),
        (
            "single round trip p50, client.submit().result()",
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
    print(table(rows, ("measure", "time", "ratio", "note")))
    print("per-round per-task us, direct:", " ".join(f"{v * 1e6:.0f}" for v in direct))
    print("per-round per-task us, lane:  ", " ".join(f"{v * 1e6:.0f}" for v in lane))
    print(f"CPU busy before the run: {busy:.2f}")
    dump(args.json, {"machine": machine(), "direct_s": direct, "lane_s": lane, "ratio": ratio, "rt_ratio": rt_ratio})


if __name__ == "__main__":
    main()
