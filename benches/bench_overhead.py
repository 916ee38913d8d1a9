"""Per-task overhead of a no-op decorated function against ThreadPoolExecutor, in one run.

* round trip: serial ``f(x).result()`` latency (p50, p90), against ``tpe.submit(f, x).result()``;
* the same from a thread other than the main thread, where a waiting caller runs a token no worker
  has started itself (``caller_runs``), and with ``caller_runs=False``;
* bulk: submit 100,000 calls, then wait for all, per task, against the same with ``tpe.submit``.
  The bulk runs alternate (ThreadPoolExecutor, tokengate, ThreadPoolExecutor, ...) so that both
  see the same phases of a shared machine; reported: the best run of each and the median of the
  per-pair ratios.

Goals: round trip p50 at least 4x faster than ThreadPoolExecutor's, bulk at least 15x.

Run: ``python benches/bench_overhead.py [--n 100000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import threading
import time
from collections.abc import Callable

from _common import dump, latencies_us, machine, percentile, table, verdict

from tokengate import OperationsCoordinator, task_token_guard


def noop(x: int) -> int:
    return x


guarded = task_token_guard(operation_type="noop")(noop)
tagged = task_token_guard(operation_type="noop_tagged", tags={"weight": "light", "priority": 1})(noop)


def bulk_tokengate(fn, n: int) -> float:
    t0 = time.perf_counter()
    tokens = [fn(i) for i in range(n)]
    for t in tokens:
        t.result()
    return (time.perf_counter() - t0) / n * 1e6


def bulk_tpe(ex: cf.ThreadPoolExecutor, n: int) -> float:
    t0 = time.perf_counter()
    futs = [ex.submit(noop, i) for i in range(n)]
    for f in futs:
        f.result()
    return (time.perf_counter() - t0) / n * 1e6


def on_thread(fn: Callable[[], list[float]]) -> list[float]:
    """Runs ``fn`` on a new thread (not the main thread) and returns its result."""
    out: list[list[float]] = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="tasks in the bulk test")
    ap.add_argument("--rt", type=int, default=20_000, help="round trips")
    ap.add_argument("--runs", type=int, default=7, help="alternating bulk runs of each")
    ap.add_argument("--json")
    args = ap.parse_args()
    info = machine()
    results: dict[str, float] = {}

    with cf.ThreadPoolExecutor(max_workers=8) as ex, OperationsCoordinator() as coord:
        workers = coord.total_workers
        ex.submit(noop, 0).result()
        lat = latencies_us(lambda: ex.submit(noop, 1).result(), args.rt)
        results["tpe_rt_p50"], results["tpe_rt_p90"] = percentile(lat, 50), percentile(lat, 90)
        lat = latencies_us(lambda: guarded(1).result(), args.rt)
        results["tg_rt_p50"], results["tg_rt_p90"] = percentile(lat, 50), percentile(lat, 90)
        lat = on_thread(lambda: latencies_us(lambda: ex.submit(noop, 1).result(), args.rt))
        results["tpe_thread_rt_p50"] = percentile(lat, 50)
        lat = on_thread(lambda: latencies_us(lambda: guarded(1).result(), args.rt))
        results["tg_thread_rt_p50"] = percentile(lat, 50)
        with OperationsCoordinator(caller_runs=False):  # the newest coordinator takes the calls
            lat = on_thread(lambda: latencies_us(lambda: guarded(1).result(), args.rt))
        results["tg_thread_rt_p50_no_caller_runs"] = percentile(lat, 50)
        tpe_runs, tg_runs, tagged_runs = [], [], []
        for _ in range(args.runs):
            tpe_runs.append(bulk_tpe(ex, args.n))
            tg_runs.append(bulk_tokengate(guarded, args.n))
            tagged_runs.append(bulk_tokengate(tagged, args.n))
        results["tpe_bulk"], results["tg_bulk"], results["tg_bulk_tagged"] = (
            min(tpe_runs),
            min(tg_runs),
            min(tagged_runs),
        )
        results["bulk_pair_ratios"] = [a / b for a, b in zip(tpe_runs, tg_runs)]  # type: ignore[assignment]

    rt_ratio = results["tpe_rt_p50"] / results["tg_rt_p50"]
    bulk_ratio = results["tpe_bulk"] / results["tg_bulk"]
    pair_median = statistics.median(results["bulk_pair_ratios"])  # type: ignore[arg-type]
    tag_cost = results["tg_bulk_tagged"] / results["tg_bulk"] - 1
    rows = [
        (
            "round trip p50 (us)",
            f"{results['tg_rt_p50']:.2f}",
            f"{results['tpe_rt_p50']:.2f}",
            f"{rt_ratio:.1f}x",
            ">= 4x",
            verdict(rt_ratio >= 4),
        ),
        (
            "round trip p90 (us)",
            f"{results['tg_rt_p90']:.2f}",
            f"{results['tpe_rt_p90']:.2f}",
            f"{results['tpe_rt_p90'] / results['tg_rt_p90']:.1f}x",
            "",
            "",
        ),
        (
            "round trip from a thread p50 (us)",
            f"{results['tg_thread_rt_p50']:.2f}",
            f"{results['tpe_thread_rt_p50']:.2f}",
            f"{results['tpe_thread_rt_p50'] / results['tg_thread_rt_p50']:.1f}x",
            "",
            "",
        ),
        (
            "  the same, caller_runs=False",
            f"{results['tg_thread_rt_p50_no_caller_runs']:.2f}",
            "",
            f"{results['tpe_thread_rt_p50'] / results['tg_thread_rt_p50_no_caller_runs']:.1f}x",
            "",
            "",
        ),
        (
            f"bulk {args.n} (us/task), best runs",
            f"{results['tg_bulk']:.2f}",
            f"{results['tpe_bulk']:.2f}",
            f"{bulk_ratio:.1f}x",
            ">= 15x",
            verdict(bulk_ratio >= 15),
        ),
        ("bulk, median of paired runs", "", "", f"{pair_median:.1f}x", ">= 15x", verdict(pair_median >= 15)),
        (
            "bulk, tagged (us/task)",
            f"{results['tg_bulk_tagged']:.2f}",
            "",
            f"{tag_cost * 100:+.0f}% vs untagged",
            "<= +20%",
            verdict(tag_cost <= 0.20),
        ),
    ]
    print(f"machine: {info}")
    print(f"tokengate: {workers} workers; ThreadPoolExecutor: 8 workers; {args.runs} alternating bulk runs each")
    print(table(rows, ("measure", "tokengate", "ThreadPoolExecutor", "ratio", "goal", "")))
    dump(
        args.json,
        {
            "machine": info,
            "results": results,
            "ratios": {
                "round_trip": rt_ratio,
                "bulk": bulk_ratio,
                "bulk_pair_median": pair_median,
                "tag_cost": tag_cost,
            },
        },
    )


if __name__ == "__main__":
    main()
