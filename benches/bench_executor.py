"""tokengate.Executor against ThreadPoolExecutor and raw tokengate tokens, in one run.

    python benches/bench_executor.py [--workers 8] [--bulk 100000] [--round-trips 2000] [--repeat 3]

Measures, for a no-op function:

* round trip: ``submit(f).result()`` one call at a time (p50 / p90 latency),
  in blocks of 200 with the contenders interleaved (the latency of a
  Condition-based wait is bimodal on a loaded machine, so interleaving matters);
* bulk: submit ``--bulk`` calls, then wait for all of them (per-task cost of
  the submit loop, and of submit + wait together).

Contenders (all with ``--workers`` workers, none pinned to cores):

* ``tokengate.Executor``: ``submit`` returns a ``concurrent.futures.Future``
  bridged to a token (bulk wait: ``concurrent.futures.wait``);
* ``ThreadPoolExecutor``: the standard library (bulk wait: ``concurrent.futures.wait``);
* ``raw tokens``: a ``@task_token_guard`` function on an ``OperationsCoordinator``
  (round trip: ``f().result()``; bulk wait: ``tokengate.gather``).

Bulk runs are repeated ``--repeat`` times, contenders interleaved; the median
is printed. Numbers depend heavily on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import tokengate
from tokengate import OperationsCoordinator, task_token_guard
from tokengate.executor import Executor


def noop() -> None:
    return None


raw_noop = task_token_guard(operation_type="bench_noop")(noop)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def round_trips(call: Callable[[], Any], n: int) -> list[float]:
    """Latency in microseconds of n sequential call-and-wait round trips (after a warm-up)."""
    for _ in range(min(200, n)):
        call()
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        call()
        out.append((clock() - t0) / 1000)
    return out


def bulk(submit: Callable[[], Any], wait_all: Callable[[list[Any]], Any], n: int) -> tuple[float, float]:
    """(submit µs/task, submit+wait µs/task)."""
    gc.collect()
    t0 = time.perf_counter()
    handles = [submit() for _ in range(n)]
    t1 = time.perf_counter()
    wait_all(handles)
    t2 = time.perf_counter()
    del handles
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def wait_futures(fs: list[futures.Future[Any]]) -> None:
    _done, not_done = futures.wait(fs)
    assert not not_done


# -- contenders -------------------------------------------------------------------------
# Each returns (round-trip latencies, (bulk submit, bulk total)); n_bulk=0 skips the bulk part.


def run_executor(workers: int, n_rt: int, n_bulk: int) -> tuple[list[float], tuple[float, float]]:
    with Executor(max_workers=workers) as ex:
        submit = ex.submit
        rt = round_trips(lambda: submit(noop).result(), n_rt) if n_rt else []
        b = bulk(lambda: submit(noop), wait_futures, n_bulk) if n_bulk else (0.0, 0.0)
    return rt, b


def run_thread_pool(workers: int, n_rt: int, n_bulk: int) -> tuple[list[float], tuple[float, float]]:
    with futures.ThreadPoolExecutor(max_workers=workers) as ex:
        submit = ex.submit
        rt = round_trips(lambda: submit(noop).result(), n_rt) if n_rt else []
        b = bulk(lambda: submit(noop), wait_futures, n_bulk) if n_bulk else (0.0, 0.0)
    return rt, b


def run_raw_tokens(workers: int, n_rt: int, n_bulk: int) -> tuple[list[float], tuple[float, float]]:
    with OperationsCoordinator(max_workers=workers, pin_workers=False):
        rt = round_trips(lambda: raw_noop().result(), n_rt) if n_rt else []
        b = bulk(raw_noop, tokengate.gather, n_bulk) if n_bulk else (0.0, 0.0)
    return rt, b


CONTENDERS: list[tuple[str, Callable[[int, int, int], tuple[list[float], tuple[float, float]]]]] = [
    ("tokengate.Executor", run_executor),
    ("ThreadPoolExecutor", run_thread_pool),
    ("raw tokens", run_raw_tokens),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--bulk", type=int, default=100_000, help="calls per bulk run")
    parser.add_argument("--round-trips", type=int, default=4000, help="round trips per contender")
    parser.add_argument("--repeat", type=int, default=3, help="bulk runs per contender (median reported)")
    args = parser.parse_args()

    rts: dict[str, list[float]] = {name: [] for name, _ in CONTENDERS}
    subs: dict[str, list[float]] = {name: [] for name, _ in CONTENDERS}
    totals: dict[str, list[float]] = {name: [] for name, _ in CONTENDERS}
    # Round trips: short blocks, contenders interleaved, so that all see the
    # same machine load; percentiles over the pooled samples.
    blocks = max(1, args.round_trips // 200)
    for _ in range(blocks):
        for name, run in CONTENDERS:
            rt, _unused = run(args.workers, args.round_trips // blocks, 0)
            rts[name].extend(rt)
    for _ in range(args.repeat):
        for name, run in CONTENDERS:
            _unused_rt, (sub, total) = run(args.workers, 0, args.bulk)
            subs[name].append(sub)
            totals[name].append(total)
    p50s = {name: [percentile(v, 0.5)] for name, v in rts.items()}
    p90s = {name: [percentile(v, 0.9)] for name, v in rts.items()}

    med = statistics.median
    print(
        f"# tokengate {tokengate.__version__}, Python {platform.python_version()} "
        f"({sys.implementation.name}), {os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(
        f"# {args.workers} workers; round trips: {args.round_trips} per contender in blocks of "
        f"{args.round_trips // blocks}, interleaved (pooled percentiles); "
        f"bulk: {args.bulk} no-op calls x {args.repeat} (median)"
    )
    print()
    header = (
        f"{'contender':<20} {'rt p50 µs':>10} {'rt p90 µs':>10} {'bulk submit µs/task':>20} {'bulk total µs/task':>19}"
    )
    print(header)
    print("-" * len(header))
    for name, _ in CONTENDERS:
        print(
            f"{name:<20} {med(p50s[name]):>10.1f} {med(p90s[name]):>10.1f} "
            f"{med(subs[name]):>20.2f} {med(totals[name]):>19.2f}"
        )
    print()
    ex, tpe, raw = "tokengate.Executor", "ThreadPoolExecutor", "raw tokens"

    def ratio(a: str, b: str, d: dict[str, list[float]]) -> str:
        return f"{med(d[a]) / med(d[b]):.2f}x"

    print(f"{'ratio':<28} {'rt p50':>8} {'bulk submit':>12} {'bulk total':>11}")
    for a, b in ((ex, tpe), (ex, raw), (tpe, raw)):
        label = f"{a.split('.')[-1]} / {b}"
        print(f"{label:<28} {ratio(a, b, p50s):>8} {ratio(a, b, subs):>12} {ratio(a, b, totals):>11}")
    extra = med(totals[ex]) - med(totals[raw])
    print()
    print(f"# cost of the concurrent.futures.Future bridge (Executor - raw tokens, bulk total): {extra:+.2f} µs/task")


if __name__ == "__main__":
    main()
