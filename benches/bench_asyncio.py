"""asyncio: awaiting and gathering tokens against asyncio.to_thread and run_in_executor, in one run.

* serial ``await f(x)`` latency p50, against ``await asyncio.to_thread(f, x)`` and
  ``await loop.run_in_executor(None, f, x)``;
* ``await asyncio.gather(*(f(i) for i in range(10_000)))``, per token, against gather of to_thread;
* event-loop wake-ups (``call_soon_threadsafe``) per 10,000 completions.

Goals: await p50 <= 15 us and >= 4x faster than to_thread; gather <= 3 us per token and
>= 20x faster than gather(to_thread); far fewer than 10,000 wakes per 10,000 completions.

Run: ``python benches/bench_asyncio.py [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

from _common import dump, machine, percentile, table, verdict

from tokengate import OperationsCoordinator, _tokengate, task_token_guard


def noop(x: int) -> int:
    return x


guarded = task_token_guard(operation_type="noop")(noop)


async def serial_us(make, n: int) -> list[float]:
    for _ in range(100):
        await make()
    out = []
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        await make()
        out.append((perf() - t0) * 1e6)
    return out


async def gather_us(make, n: int) -> float:
    t0 = time.perf_counter()
    res = await asyncio.gather(*(make(i) for i in range(n)))
    dt = time.perf_counter() - t0
    assert len(res) == n
    return dt / n * 1e6


_gate = threading.Event()


@task_token_guard(operation_type="gated_noop")
def gated(x: int) -> int:
    _gate.wait(10)
    return x


async def late_completions(n: int) -> tuple[int, int]:
    """Loop wakes and deliveries for ``n`` completions that all arrive from workers after
    ``gather`` registered its callbacks (the tokens wait on a gate opened once it has)."""
    _gate.clear()
    tokens = [gated(i) for i in range(n)]
    before = _tokengate.loop_stats()
    fut = asyncio.gather(*tokens)
    asyncio.get_running_loop().call_soon(_gate.set)
    res = await fut
    after = _tokengate.loop_stats()
    assert res == list(range(n))
    return after["wakes"] - before["wakes"], after["deliveries"] - before["deliveries"]


async def run(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    r: dict[str, float] = {}
    lat = await serial_us(lambda: asyncio.to_thread(noop, 1), args.serial)
    r["to_thread_p50"] = percentile(lat, 50)
    lat = await serial_us(lambda: loop.run_in_executor(None, noop, 1), args.serial)
    r["run_in_executor_p50"] = percentile(lat, 50)
    r["gather_to_thread"] = min([await gather_us(lambda i: asyncio.to_thread(noop, i), args.gather) for _ in range(2)])

    with OperationsCoordinator():
        lat = await serial_us(lambda: guarded(1), args.serial)
        r["tg_await_p50"] = percentile(lat, 50)
        r["tg_await_p90"] = percentile(lat, 90)
        best = float("inf")
        for _ in range(args.runs):
            before = _tokengate.loop_stats()
            per = await gather_us(guarded, args.gather)
            after = _tokengate.loop_stats()
            if per < best:
                best = per
                wakes = after["wakes"] - before["wakes"]
                deliveries = after["deliveries"] - before["deliveries"]
        r["tg_gather"] = best
        r["gather_wakes_per_10k"] = wakes * 10_000 / args.gather
        wakes, deliveries = await late_completions(args.gather)
        r["wakes_per_10k"] = wakes * 10_000 / args.gather
        r["deliveries_per_wake"] = deliveries / max(1, wakes)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serial", type=int, default=5000)
    ap.add_argument("--gather", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    info = machine()
    r = asyncio.run(run(args))
    to_thread_ratio = r["to_thread_p50"] / r["tg_await_p50"]
    gather_ratio = r["gather_to_thread"] / r["tg_gather"]
    rows = [
        (
            "await p50 (us)",
            f"{r['tg_await_p50']:.2f}",
            f"{r['to_thread_p50']:.1f}",
            f"{r['run_in_executor_p50']:.1f}",
            f"{to_thread_ratio:.1f}x",
            "<= 15 us, >= 4x",
            verdict(r["tg_await_p50"] <= 15 and to_thread_ratio >= 4),
        ),
        (
            f"gather {args.gather} (us/token)",
            f"{r['tg_gather']:.2f}",
            f"{r['gather_to_thread']:.1f}",
            "",
            f"{gather_ratio:.1f}x",
            "<= 3 us, >= 20x",
            verdict(r["tg_gather"] <= 3 and gather_ratio >= 20),
        ),
        (
            "loop wakes per 10k late completions",
            f"{r['wakes_per_10k']:.0f}",
            "",
            "",
            "",
            "<< 10000",
            verdict(r["wakes_per_10k"] < 1000),
        ),
    ]
    print(f"machine: {info}")
    print(table(rows, ("measure", "tokengate", "to_thread", "run_in_executor", "ratio vs to_thread", "goal", "")))
    print(
        f"late completions (all arriving from workers after gather registered): {r['deliveries_per_wake']:.0f} "
        f"delivered per loop wake; in the gather run above: {r['gather_wakes_per_10k']:.0f} wakes per 10k "
        "(tokens that finished before gather registered are delivered without a cross-thread wake)"
    )
    dump(args.json, {"machine": info, "results": r})


if __name__ == "__main__":
    main()
