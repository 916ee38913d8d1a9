"""The process lane against running in one process and against ProcessPoolExecutor.

    python benches/bench_process.py [--work-ms 50] [--rounds 11] [--round-trips 300] [--burst 2000] [--json out.json]

Measures, in one run, on ``--workers`` processes (default 2):

* CPU speedup: 2 tasks of about ``--work-ms`` ms of pure-Python work, run one
  after the other in this process (serial) and as 2 process-lane tokens at
  once (``tokengate.gather``); speedup = serial / lane. ProcessPoolExecutor
  on the same work for reference. Rounds interleave the contenders; the
  median and best round are shown (goal: lane speedup >= 1.8 on 2 cores).
* No-op overhead per token: ``f().result()`` one at a time (round-trip
  latency, p50 and mean), and a burst of ``--burst`` calls then waiting for
  all (per-token cost), for the lane and for ProcessPoolExecutor (spawn
  context, same worker count); ratio = lane / ProcessPoolExecutor.
* The same burst with a container argument (``f((1, 2.5, "three", [4, 5]))``): what
  pickling an argument that is not a plain value costs each call.
* Short tokens beside a long one: after a burst of no-ops (the lane then sends
  ahead deeply), one 1 s sleep and 20 sleeps of 10 ms at once; the time until
  the 20 are done (a process free of the long one can run them all in 0.2 s),
  for the lane and for ProcessPoolExecutor.

The machine may be shared: ``busy_before`` is the CPU load seen before the run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_busy_fraction, dump, machine, percentile, table, verdict

import tokengate
from tokengate import OperationsCoordinator, task_token_guard


def spin(n: int) -> int:
    """Pure-Python CPU work."""
    s = 0
    for i in range(n):
        s += i * i
    return s


def noop() -> None:
    return None


def take(arg: Any) -> None:
    return None


#: An argument that is not a plain value (it goes through loky's pickler on the lane).
ARG = (1, 2.5, "three", [4, 5])


def nap(s: float) -> float:
    time.sleep(s)
    return s


lane_spin = task_token_guard(operation_type="bench_proc_spin", tags={"process_pool": True})(spin)
lane_noop = task_token_guard(operation_type="bench_proc_noop", tags={"process_pool": True})(noop)
lane_take = task_token_guard(operation_type="bench_proc_take", tags={"process_pool": True})(take)
lane_nap = task_token_guard(operation_type="bench_proc_nap", tags={"process_pool": True})(nap)


def calibrate(ms: float) -> int:
    n = 10_000
    while True:
        t0 = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t0
        if dt >= 0.01:
            n = int(n * (ms / 1000) / dt)
            break
        n *= 2
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        spin(n)
        times.append(time.perf_counter() - t0)
    return int(n * (ms / 1000) / statistics.median(times))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_trips_us(call: Callable[[], Any], n: int) -> list[float]:
    for _ in range(min(100, n)):
        call()
    out = []
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        call()
        out.append((perf() - t0) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work-ms", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--round-trips", type=int, default=300)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    info = machine()
    n = calibrate(args.work_ms)
    coord = OperationsCoordinator(max_workers=2, process_workers=args.workers).start()
    ppe = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"))
    try:
        # Warm both: processes started, functions loaded everywhere.
        tokengate.gather([lane_spin(1000) for _ in range(4 * args.workers)], timeout=60)
        tokengate.gather([lane_noop() for _ in range(4 * args.workers)], timeout=60)
        tokengate.gather([lane_take(ARG) for _ in range(4 * args.workers)], timeout=60)
        [f.result() for f in [ppe.submit(spin, 1000) for _ in range(4 * args.workers)]]
        [f.result() for f in [ppe.submit(noop) for _ in range(4 * args.workers)]]
        [f.result() for f in [ppe.submit(take, ARG) for _ in range(4 * args.workers)]]

        serial_s, lane_s, ppe_s = [], [], []
        for _ in range(args.rounds):
            serial_s.append(timed(lambda: (spin(n), spin(n))))
            lane_s.append(timed(lambda: tokengate.gather([lane_spin(n), lane_spin(n)], timeout=60)))
            ppe_s.append(timed(lambda: [f.result() for f in [ppe.submit(spin, n), ppe.submit(spin, n)]]))
        lane_speed = [s / p for s, p in zip(serial_s, lane_s)]
        ppe_speed = [s / p for s, p in zip(serial_s, ppe_s)]

        # No-op round trips, interleaved in blocks.
        lane_rt: list[float] = []
        ppe_rt: list[float] = []
        block = max(1, args.round_trips // 3)
        for _ in range(3):
            lane_rt += round_trips_us(lambda: lane_noop().result(), block)
            ppe_rt += round_trips_us(lambda: ppe.submit(noop).result(), block)

        def lane_burst() -> None:
            tokengate.gather([lane_noop() for _ in range(args.burst)], timeout=120)

        def ppe_burst() -> None:
            futures_wait([ppe.submit(noop) for _ in range(args.burst)])

        def lane_arg_burst() -> None:
            tokengate.gather([lane_take(ARG) for _ in range(args.burst)], timeout=120)

        def ppe_arg_burst() -> None:
            futures_wait([ppe.submit(take, ARG) for _ in range(args.burst)])

        lane_b, ppe_b, lane_ab, ppe_ab = [], [], [], []
        for _ in range(3):
            lane_b.append(timed(lane_burst) / args.burst * 1e6)
            ppe_b.append(timed(ppe_burst) / args.burst * 1e6)
            lane_ab.append(timed(lane_arg_burst) / args.burst * 1e6)
            ppe_ab.append(timed(ppe_arg_burst) / args.burst * 1e6)

        def lane_beside() -> float:
            tokengate.gather([lane_noop() for _ in range(64)], timeout=60)
            time.sleep(0.1)
            t0 = time.perf_counter()
            long = lane_nap(1.0)
            tokengate.gather([lane_nap(0.01) for _ in range(20)], timeout=60)
            took = time.perf_counter() - t0
            long.result(timeout=60)
            return took

        def ppe_beside() -> float:
            futures_wait([ppe.submit(noop) for _ in range(64)])
            time.sleep(0.1)
            t0 = time.perf_counter()
            long = ppe.submit(nap, 1.0)
            futures_wait([ppe.submit(nap, 0.01) for _ in range(20)])
            took = time.perf_counter() - t0
            long.result()
            return took

        lane_bs, ppe_bs = [], []
        for _ in range(2):
            lane_bs.append(lane_beside())
            ppe_bs.append(ppe_beside())
        lane_stats = coord.get_stats()["lanes"]["process"]
    finally:
        coord.stop()
        ppe.shutdown()

    med = statistics.median
    serial_ms, lane_ms, ppe_ms = med(serial_s) * 1e3, med(lane_s) * 1e3, med(ppe_s) * 1e3
    rows = [
        ("2 x CPU task, serial in this process", f"{serial_ms:.1f} ms", "1.00x", ""),
        (
            "2 x CPU task, process lane",
            f"{lane_ms:.1f} ms",
            f"{med(lane_speed):.2f}x (best {max(lane_speed):.2f}x)",
            verdict(med(lane_speed) >= 1.8) + " goal >= 1.8",
        ),
        (
            "2 x CPU task, ProcessPoolExecutor",
            f"{ppe_ms:.1f} ms",
            f"{med(ppe_speed):.2f}x (best {max(ppe_speed):.2f}x)",
            "reference",
        ),
        (
            "no-op round trip p50, lane",
            f"{percentile(lane_rt, 50):.0f} us",
            f"{percentile(lane_rt, 50) / percentile(ppe_rt, 50):.2f}x PPE",
            "",
        ),
        ("no-op round trip p50, ProcessPoolExecutor", f"{percentile(ppe_rt, 50):.0f} us", "1.00x", ""),
        (
            "no-op round trip mean, lane",
            f"{med([statistics.fmean(lane_rt)]):.0f} us",
            f"{statistics.fmean(lane_rt) / statistics.fmean(ppe_rt):.2f}x PPE",
            "",
        ),
        ("no-op round trip mean, ProcessPoolExecutor", f"{statistics.fmean(ppe_rt):.0f} us", "1.00x", ""),
        (
            f"no-op burst of {args.burst}, lane, per token",
            f"{med(lane_b):.0f} us",
            f"{med(lane_b) / med(ppe_b):.2f}x PPE",
            "",
        ),
        (f"no-op burst of {args.burst}, ProcessPoolExecutor, per token", f"{med(ppe_b):.0f} us", "1.00x", ""),
        (
            f"burst of {args.burst} with a tuple argument, lane, per token",
            f"{med(lane_ab):.0f} us",
            f"{med(lane_ab) / med(ppe_ab):.2f}x PPE",
            "",
        ),
        (
            f"burst of {args.burst} with a tuple argument, ProcessPoolExecutor, per token",
            f"{med(ppe_ab):.0f} us",
            "1.00x",
            "",
        ),
        (
            "20 x 10 ms beside a 1 s token, lane",
            f"{med(lane_bs):.2f} s",
            f"{med(lane_bs) / med(ppe_bs):.2f}x PPE",
            "0.2 s: none waits behind the long one",
        ),
        ("20 x 10 ms beside a 1 s token, ProcessPoolExecutor", f"{med(ppe_bs):.2f} s", "1.00x", ""),
    ]
    print(f"machine: {info}")
    print(
        f"work: spin({n}) ~ {serial_ms / 2:.1f} ms per task; {args.workers} worker processes; "
        f"{args.rounds} rounds (median shown)\n"
    )
    print(table(rows, ("measure", "time", "ratio", "note")))
    print("\nper-round speedup, lane:", " ".join(f"{x:.2f}" for x in lane_speed))
    print("per-round speedup, PPE: ", " ".join(f"{x:.2f}" for x in ppe_speed))
    print(f"CPU busy after the run: {cpu_busy_fraction():.2f} (outside load makes rounds slow)")
    dump(
        args.json,
        {
            "machine": info,
            "n": n,
            "serial_s": serial_s,
            "lane_s": lane_s,
            "ppe_s": ppe_s,
            "lane_speedup": lane_speed,
            "ppe_speedup": ppe_speed,
            "lane_round_trip_us": lane_rt,
            "ppe_round_trip_us": ppe_rt,
            "lane_burst_us": lane_b,
            "ppe_burst_us": ppe_b,
            "lane_tuple_arg_burst_us": lane_ab,
            "ppe_tuple_arg_burst_us": ppe_ab,
            "lane_beside_long_s": lane_bs,
            "ppe_beside_long_s": ppe_bs,
            "lane_stats": lane_stats,
        },
    )


if __name__ == "__main__":
    main()
