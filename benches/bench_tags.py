"""What scheduling tags cost: the bulk no-op benchmark of bench_overhead.py (submit N calls,
then wait for all) for an untagged function and for one function per tag, in one run.

Variants: untagged (its weight is then the name heuristic's: ``medium``); ``weight: light``;
``priority: 1``; ``timeout: 60``;
``sticky_anchor`` with ``hash_policy: NONE`` (every call pinned to one worker);
``storage_speed: FAST`` (the elastic I/O lane, 50 at once).

Goal: at most +20% per task over untagged for the cheap tags (weight,
priority, timeout). Sticky and I/O tokens take another path by design
(one worker; a lane of threads); their cost is reported, not judged.

Runs are interleaved (one bulk of every variant per round) so that outside
load spreads evenly over the variants; the best round of each is kept.

Run: ``python benches/bench_tags.py [--n 100000] [--runs 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from _common import dump, machine, table, verdict

from tokengate import OperationsCoordinator, task_token_guard


def noop(x: int) -> int:
    return x


VARIANTS: list[tuple[str, dict[str, Any] | None, bool]] = [
    # name, tags, judged against the +20% goal
    ("untagged", None, False),
    ("weight light", {"weight": "light"}, True),
    ("priority 1", {"priority": 1}, True),
    ("timeout 60", {"timeout": 60}, True),
    ("sticky NONE", {"sticky_anchor": "bench", "hash_policy": "none"}, False),
    ("storage FAST", {"storage_speed": "FAST"}, False),
]


def bulk(fn: Callable[[int], Any], n: int) -> float:
    """Microseconds per task: submit n calls, then wait for every result."""
    t0 = time.perf_counter()
    tokens = [fn(i) for i in range(n)]
    for t in tokens:
        t.result()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="tasks per bulk")
    ap.add_argument("--runs", type=int, default=5, help="rounds (best kept per variant)")
    ap.add_argument("--json")
    args = ap.parse_args()
    info = machine()

    fns = {
        name: task_token_guard(operation_type=f"bench_{name.replace(' ', '_')}", tags=tags)(noop)
        for name, tags, _ in VARIANTS
    }
    samples: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    with OperationsCoordinator(io_idle_timeout=30.0) as coord:  # no lane thread retires mid-run
        workers = coord.total_workers
        for fn in fns.values():  # warm every path (lane threads, timer, heap)
            bulk(fn, min(args.n, 2_000))
        for _ in range(args.runs):
            for name, fn in fns.items():
                samples[name].append(bulk(fn, args.n))
        stats = coord.get_stats()

    best = {name: min(v) for name, v in samples.items()}
    base = best["untagged"]
    rows = []
    for name, _, judged in VARIANTS:
        cost = best[name] / base - 1
        rows.append(
            (
                name,
                f"{best[name]:.2f}",
                f"{min(samples[name]):.2f}..{max(samples[name]):.2f}",
                "" if name == "untagged" else f"{cost * 100:+.0f}%",
                "<= +20%" if judged else "",
                verdict(cost <= 0.20) if judged else "",
            )
        )
    print(f"machine: {info}")
    print(f"tokengate: {workers} workers; bulk of {args.n} no-op tasks; best of {args.runs} interleaved rounds")
    print(table(rows, ("variant", "us/task", "range", "vs untagged", "goal", "")))
    print(
        f"io lane: {stats['lanes']['io']['threads_started']} threads started (FAST limit 50, no retirement); "
        f"FAST peak {stats['lanes']['io']['tiers']['FAST']['peak']}"
    )
    dump(
        args.json,
        {
            "machine": info,
            "n": args.n,
            "workers": workers,
            "us_per_task": best,
            "samples": samples,
            "overhead_vs_untagged": {k: v / base - 1 for k, v in best.items()},
        },
    )


if __name__ == "__main__":
    main()
