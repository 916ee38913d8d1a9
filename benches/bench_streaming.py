"""Streaming N no-op tokens through a bounded coordinator keeps RSS flat.

Two modes, each in a fresh child process (so that ``ru_maxrss``, a lifetime
peak, belongs to one mode only):

* ``submit``: ``for i in range(N): noop(i)`` on ``OperationsCoordinator(max_pending=10_000)``;
  the tokens are dropped at once and the bounded coordinator blocks the producer
  whenever 10,000 are unresolved;
* ``map``: ``for r in noop.map(range(N), buffer=B): ...`` on the same coordinator.

For each mode it prints the peak RSS growth over the baseline taken after start-up
and warm-up, both as ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and as the highest
``VmRSS`` of ``/proc/self/status`` sampled every 100,000 tokens, the final VmRSS
growth, and the throughput.

Goal: peak RSS growth < 64 MB for N = 10,000,000.

Run: ``python benches/bench_streaming.py [--n 10000000] [--max-pending 10000] [--buffer 1024] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

GOAL_MB = 64.0
SAMPLE_EVERY = 100_000
WARMUP = 50_000


def vmrss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, n: int, max_pending: int, buffer: int) -> dict[str, Any]:
    from tokengate import OperationsCoordinator, task_token_guard

    @task_token_guard(operation_type="stream_noop", tags={"weight": "light"})
    def noop(x: int) -> None:
        return None

    c = OperationsCoordinator(max_pending=max_pending or None).start()
    try:
        # Warm-up in the same mode: allocator arenas, caches, the first tokens in flight.
        if mode == "submit":
            for i in range(WARMUP):
                noop(i)
        else:
            for _ in noop.map(range(WARMUP), buffer=buffer):
                pass
        base_vm = vmrss_mb()
        base_max = maxrss_mb()
        peak_vm = base_vm
        t0 = time.perf_counter()
        if mode == "submit":
            i = 0
            while i < n:
                stop = min(n, i + SAMPLE_EVERY)
                for k in range(i, stop):
                    noop(k)
                i = stop
                peak_vm = max(peak_vm, vmrss_mb())
        else:
            for k, _ in enumerate(noop.map(range(n), buffer=buffer), 1):
                if k % SAMPLE_EVERY == 0:
                    peak_vm = max(peak_vm, vmrss_mb())
        submit_s = time.perf_counter() - t0
        stats = c.get_stats()
    finally:
        c.stop()
    total_s = time.perf_counter() - t0
    peak_vm = max(peak_vm, vmrss_mb())
    return {
        "mode": mode,
        "n": n,
        "max_pending": max_pending,
        "buffer": buffer if mode == "map" else None,
        "seconds": total_s,
        "producer_seconds": submit_s,
        "tokens_per_s": n / total_s,
        "s_per_million": total_s / n * 1e6,
        "maxrss_growth_mb": maxrss_mb() - base_max,
        "vmrss_peak_growth_mb": peak_vm - base_vm,
        "vmrss_final_growth_mb": vmrss_mb() - base_vm,
        "baseline_vmrss_mb": base_vm,
        "peak_pending": stats["admission"]["peak_pending"],
        "completed": stats["tokens"]["completed"],
    }


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--n",
        str(args.n),
        "--max-pending",
        str(args.max_pending),
        "--buffer",
        str(args.buffer),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000, help="tokens to stream per mode")
    ap.add_argument("--max-pending", type=int, default=10_000, help="the coordinator's max_pending (0: unbounded)")
    ap.add_argument("--buffer", type=int, default=1024, help="fn.map buffer")
    ap.add_argument("--modes", default="submit,map")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.n, args.max_pending, args.buffer)))
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import dump, machine, table, verdict

    info = machine()
    results = [run_child(mode, args) for mode in args.modes.split(",")]
    rows = []
    for r in results:
        peak = max(r["maxrss_growth_mb"], r["vmrss_peak_growth_mb"])
        r["goal_ok"] = peak < GOAL_MB
        label = (
            (f"submit loop (max_pending={r['max_pending'] or 'unbounded'})")
            if r["mode"] == "submit"
            else f"fn.map(buffer={r['buffer']})"
        )
        rows.append(
            (
                label,
                f"{r['n']:,}",
                f"{r['maxrss_growth_mb']:.1f}",
                f"{r['vmrss_peak_growth_mb']:.1f}",
                f"{r['vmrss_final_growth_mb']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['s_per_million']:.2f}",
                f"{r['peak_pending']:,}",
                verdict(r["goal_ok"]),
            )
        )
    print(f"python {info['python']}, {info['cpus']} CPUs, machine busy before: {info['busy_before']:.0%}")
    print(
        table(
            rows,
            (
                "mode",
                "tokens",
                "ru_maxrss +MB",
                "VmRSS peak +MB",
                "VmRSS end +MB",
                "tokens/s",
                "s per 1M",
                "peak pending",
                f"< {GOAL_MB:.0f} MB",
            ),
        )
    )
    dump(args.json, {"machine": info, "goal_mb": GOAL_MB, "results": results})


if __name__ == "__main__":
    main()
