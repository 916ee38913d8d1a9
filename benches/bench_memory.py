"""Memory of pending tokens: RSS per pending no-op token, and RSS once they resolve.

Each case runs in a fresh child process, which:

1. warms up (1,000 calls run and resolved), then reads its RSS (``VmRSS``): the baseline;
2. makes N calls that cannot start, keeping every token (or future) in a list, and reads its RSS
   again: (that - baseline) / N is the cost of one pending call, the list's 8 bytes included;
3. lets them run, waits for all, drops the list, waits half a second, and reads its RSS: how far
   it is above the baseline once they resolved.

Cases:

* ``tokengate``: ``noop()`` decorated, its operation paused (``pause_operation``), then resumed;
* ``tokengate, int arg``: the same with ``noop(i)`` (the int and the argument tuple add ~96 B);
* ``ThreadPoolExecutor``: ``ex.submit(noop)`` on ``ThreadPoolExecutor(8)`` whose 8 workers wait on
  an event, then released (and the same with ``noop, i``).

Goals: at most 300 B per pending no-op token at N = 1,000,000, and RSS back within 10 % of the
baseline once they resolve.

Run: ``python benches/bench_memory.py [--n 1000000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from _common import dump, machine, table, verdict

GOAL_BYTES = 300
GOAL_RETURN = 0.10


def vmrss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def noop(*args: object) -> None:
    return None


def child(case: str, n: int, with_arg: bool) -> dict[str, Any]:
    import gc

    if case == "tokengate":
        from tokengate import OperationsCoordinator, task_token_guard

        fn = task_token_guard(operation_type="memory_noop")(noop)
        coordinator = OperationsCoordinator().start()
        for t in [fn(i) for i in range(1000)]:
            t.result()
        coordinator.pause_operation("memory_noop")
        submit = fn

        def release() -> None:
            coordinator.resume_operation("memory_noop")

        def stop() -> None:
            coordinator.stop()
    else:
        import concurrent.futures as cf
        import threading

        ex = cf.ThreadPoolExecutor(8)
        for f in [ex.submit(noop, i) for i in range(1000)]:
            f.result()
        gate = threading.Event()
        for _ in range(8):
            ex.submit(gate.wait)

        def submit(*args: object) -> Any:
            return ex.submit(noop, *args)

        def release() -> None:
            gate.set()

        def stop() -> None:
            ex.shutdown()

    gc.collect()
    base = vmrss()
    pending = [submit(i) for i in range(n)] if with_arg else [submit() for _ in range(n)]
    peak = vmrss()
    release()
    for p in pending:
        p.result()
    del pending
    gc.collect()
    time.sleep(0.5)
    after = vmrss()
    stop()
    return {
        "base": base,
        "peak": peak,
        "after": after,
        "per_token": (peak - base) / n,
        "returned": (after - base) / base,
    }


def run_child(case: str, n: int, with_arg: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, "--n", str(n)] + (["--arg"] if with_arg else []),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="pending calls")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--arg", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.arg)))
        return
    results = {}
    for case in ("tokengate", "ThreadPoolExecutor"):
        for with_arg in (False, True):
            results[f"{case}{', int arg' if with_arg else ''}"] = run_child(case, args.n, with_arg)
    rows = []
    for name, r in results.items():
        goal = name == "tokengate"
        rows.append(
            (
                name,
                f"{r['per_token']:.0f}",
                f"{r['base'] / 2**20:.1f}",
                f"{r['after'] / 2**20:.1f} ({r['returned'] * 100:+.0f} %)",
                verdict(r["per_token"] <= GOAL_BYTES and r["returned"] <= GOAL_RETURN) if goal else "",
            )
        )
    print(f"machine: {machine()}")
    print(
        f"{args.n:,} pending calls; goal: at most {GOAL_BYTES} B each (tokengate, no-op), and RSS back within "
        f"{GOAL_RETURN * 100:.0f} % of the baseline once they resolve"
    )
    print(table(rows, ("case", "B per pending call", "baseline RSS (MiB)", "RSS after they resolve (MiB)", "")))
    tg, tpe = results["tokengate"], results["ThreadPoolExecutor"]
    print(
        f"tokengate uses {tpe['per_token'] / tg['per_token']:.1f}x less memory per pending call than ThreadPoolExecutor"
    )
    dump(args.json, {"machine": machine(), "n": args.n, "results": results})


if __name__ == "__main__":
    main()
