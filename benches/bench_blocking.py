"""Blocking work on tokengate against ThreadPoolExecutor, in one run.

* sleeps: 200 untagged ``time.sleep(0.05)`` tokens on the default coordinator, against
  ``ThreadPoolExecutor()`` (goal: at most 0.3 s);
* CPU beside sleeps: pure-Python CPU tokens submitted to the same coordinator while 200 sleeps
  run, against a plain loop of the same bodies (goal: at least 0.85x the loop's throughput);
* mixed: 1,000 blocking tokens (sleeps of 5-50 ms) and 10,000 pure-Python CPU tokens, against
  ``ThreadPoolExecutor(8)`` and ``ThreadPoolExecutor(64)`` on the same work (goal: wall time within
  1.2x of the better of the two).

Each figure is the best of ``--repeat`` runs, tokengate and its baselines alternating.

Run: ``python benches/bench_blocking.py [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import time

from _common import dump, machine, table, verdict

import tokengate
from tokengate import OperationsCoordinator, task_token_guard

CPU_N = 2_000  # iterations of the CPU body: about 60-100 us of pure Python


def cpu_body(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def sleep_body(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


cpu_token = task_token_guard(operation_type="bench_cpu")(cpu_body)
sleep_token = task_token_guard(operation_type="bench_sleep")(sleep_body)


def sleeps_tokengate(n: int) -> float:
    with OperationsCoordinator():
        t0 = time.perf_counter()
        tokengate.gather([sleep_token(0.05) for _ in range(n)])
        return time.perf_counter() - t0


def sleeps_tpe(n: int) -> float:
    with cf.ThreadPoolExecutor() as ex:
        t0 = time.perf_counter()
        list(ex.map(sleep_body, [0.05] * n))
        return time.perf_counter() - t0


def cpu_loop(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        cpu_body(CPU_N)
    return n / (time.perf_counter() - t0)


def cpu_beside_sleeps(n: int) -> float:
    with OperationsCoordinator():
        sleepers = [sleep_token(0.05) for _ in range(200)]
        t0 = time.perf_counter()
        tokengate.gather([cpu_token(CPU_N) for _ in range(n)])
        rate = n / (time.perf_counter() - t0)
        tokengate.gather(sleepers)
        return rate


def mixed_work(seed: int = 1) -> list[tuple[str, float | int]]:
    rnd = random.Random(seed)
    work: list[tuple[str, float | int]] = [("sleep", rnd.uniform(0.005, 0.05)) for _ in range(1_000)]
    work += [("cpu", CPU_N) for _ in range(10_000)]
    rnd.shuffle(work)
    return work


def mixed_tokengate(work: list[tuple[str, float | int]]) -> float:
    with OperationsCoordinator():
        t0 = time.perf_counter()
        tokens = [sleep_token(a) if kind == "sleep" else cpu_token(a) for kind, a in work]
        tokengate.gather(tokens)
        return time.perf_counter() - t0


def mixed_tpe(work: list[tuple[str, float | int]], workers: int) -> float:
    with cf.ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        futures = [ex.submit(sleep_body if kind == "sleep" else cpu_body, a) for kind, a in work]
        cf.wait(futures)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    info = machine()
    best: dict[str, float] = {}

    def keep(name: str, value: float, larger_is_better: bool = False) -> None:
        old = best.get(name)
        if old is None or (value > old if larger_is_better else value < old):
            best[name] = value

    work = mixed_work()
    for _ in range(args.repeat):
        keep("sleeps_tpe", sleeps_tpe(200))
        keep("sleeps_tokengate", sleeps_tokengate(200))
        keep("cpu_loop", cpu_loop(3_000), larger_is_better=True)
        keep("cpu_beside_sleeps", cpu_beside_sleeps(3_000), larger_is_better=True)
        keep("mixed_tpe8", mixed_tpe(work, 8))
        keep("mixed_tpe64", mixed_tpe(work, 64))
        keep("mixed_tokengate", mixed_tokengate(work))
    better_tpe = min(best["mixed_tpe8"], best["mixed_tpe64"])
    rows = [
        (
            "200 x sleep(0.05), s",
            f"{best['sleeps_tokengate']:.3f}",
            f"{best['sleeps_tpe']:.3f} (ThreadPoolExecutor())",
            f"{best['sleeps_tpe'] / best['sleeps_tokengate']:.1f}x",
            verdict(best["sleeps_tokengate"] <= 0.3),
        ),
        (
            "CPU tokens beside sleeps, /s",
            f"{best['cpu_beside_sleeps']:.0f}",
            f"{best['cpu_loop']:.0f} (plain loop)",
            f"{best['cpu_beside_sleeps'] / best['cpu_loop']:.2f}x",
            verdict(best["cpu_beside_sleeps"] >= 0.85 * best["cpu_loop"]),
        ),
        (
            "mixed 1k sleeps + 10k CPU, s",
            f"{best['mixed_tokengate']:.3f}",
            f"{best['mixed_tpe8']:.3f} (TPE 8) / {best['mixed_tpe64']:.3f} (TPE 64)",
            f"{best['mixed_tokengate'] / better_tpe:.2f} of the better",
            verdict(best["mixed_tokengate"] <= 1.2 * better_tpe),
        ),
    ]
    print(f"machine: {info}")
    print(table(rows, ("workload", "tokengate", "baseline", "ratio", "goal")))
    dump(args.json, {"machine": info, "best": best})


if __name__ == "__main__":
    main()
