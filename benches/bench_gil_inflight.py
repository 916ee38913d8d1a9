"""How many GIL-bound tokens in flight pay: the proof's waves operations on several pool shapes.

    python benches/bench_gil_inflight.py [--tokens 16384] [--rounds 4] [--json out.json]

Under the GIL, pure-Python tokens cannot run in parallel, so the number of
them in flight at once (at most workers, and at most the core units: one per
light token, ``workers_per_core`` per core) does not change how much runs, only
how the interpreter is handed round. This runs the proof's four wave
operations (``tokengate.proof.WAVE_OPERATIONS``, tagged as in the proof) end
to end (submit all, then ``tokengate.gather``) on one coordinator per shape,
each round against a plain loop over the same calls in alternating order,
and reports per shape:

* ratio: loop time / tokengate time (median over rounds; 1.0 = no overhead);
* body CPU: the bodies' thread CPU time, summed (the work itself);
* body wall: the bodies' wall time, summed; above body CPU by the time the
  bodies waited for the GIL (a body runs once it holds it, and is made to
  hand it over every switch interval while others wait).

Shapes: the default (4 units per core, 4 workers per core), 2 and 1 units
per core with the same workers, and 2 workers with 4 units per core. On a
free-threaded interpreter the same run shows the parallel case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import dump, machine, table  # noqa: E402

from tokengate import OperationsCoordinator, gather, task_token_guard  # noqa: E402
from tokengate.proof import WAVE_OPERATIONS, wave_args  # noqa: E402

#: The weight each wave operation carries in the proof.
WEIGHTS = {"cpu_crunch": "light", "string_transform": "light", "data_sort": "medium", "hash_chain": "heavy"}


def timed(k: int, args: tuple[Any, ...]) -> tuple[float, float]:
    """Runs wave operation ``k``; returns (thread CPU seconds, wall seconds) of the call."""
    c, w = time.thread_time(), time.perf_counter()
    WAVE_OPERATIONS[k](*args)
    return time.thread_time() - c, time.perf_counter() - w


def guarded_ops() -> list[Any]:
    ops = []
    for k, fn in enumerate(WAVE_OPERATIONS):

        def body(*args: Any, k: int = k) -> tuple[float, float]:
            return timed(k, args)

        ops.append(task_token_guard(operation_type=f"gil_inflight.{fn.__name__}", tags={"weight": WEIGHTS[fn.__name__]})(body))
    return ops


def run_shape(name: str, kwargs: dict[str, Any], items: list[tuple[int, tuple[Any, ...]]], rounds: int) -> dict[str, Any]:
    ops = guarded_ops()
    ratios, cpu, wall = [], [], []
    with OperationsCoordinator(**kwargs) as coord:
        gather([ops[k](*a) for k, a in items[:256]])  # warm up
        workers = coord.get_stats()["pool"]["workers"]
        for r in range(rounds):
            runs: dict[str, float] = {}
            for who in ("loop", "tokengate") if r % 2 == 0 else ("tokengate", "loop"):
                t0 = time.perf_counter()
                if who == "loop":
                    for k, a in items:
                        timed(k, a)
                else:
                    res = gather([ops[k](*a) for k, a in items])
                    cpu.append(sum(c for c, _ in res))
                    wall.append(sum(w for _, w in res))
                runs[who] = time.perf_counter() - t0
            ratios.append(runs["loop"] / runs["tokengate"])
    return {
        "shape": name,
        "kwargs": kwargs,
        "workers": workers,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "body_cpu_s": statistics.median(cpu),
        "body_wall_s": statistics.median(wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    items = [wave_args(i) for i in range(args.tokens)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    shapes = [
        ("4 units/core (default)", {}),
        ("2 units/core, same workers", {"workers_per_core": 2, "max_workers": 4 * cores}),
        ("1 unit/core, same workers", {"workers_per_core": 1, "max_workers": 4 * cores}),
        ("2 workers, 4 units/core", {"max_workers": 2}),
    ]
    results = [run_shape(name, kw, items, args.rounds) for name, kw in shapes]
    info = machine()
    print(f"{args.tokens} tokens of the proof's four wave operations, {args.rounds} rounds per shape; {info}")
    rows = [
        (
            r["shape"],
            str(r["workers"]),
            f"{r['ratio_median']:.3f}",
            " ".join(f"{x:.2f}" for x in r["ratios"]),
            f"{r['body_cpu_s']:.2f} s",
            f"{r['body_wall_s']:.2f} s",
        )
        for r in results
    ]
    print(table(rows, ("shape", "workers", "loop/tokengate", "rounds", "body CPU", "body wall")))
    dump(args.json, {"machine": info, "tokens": args.tokens, "rounds": args.rounds, "shapes": results})


if __name__ == "__main__":
    main()
