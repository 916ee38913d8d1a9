"""What a progress display costs: ``fn.map`` over 10,000 calls of 1 ms each, with
``progress=`` and without, alternating in one process. Goal: at most 5 % slower.

The display draws to a stream that says it is a terminal and drops what it is given, so the
whole drawing path runs (tqdm by default; ``--display plain`` or ``rich``), but no terminal's
speed is measured. Each pair runs the two maps back to back, in alternating order; the
report gives each pair's ratio (with / without) and their median.

Run: ``python benches/bench_progress.py [--items 10000] [--pairs 5] [--display tqdm] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

from _common import dump, machine, table, verdict

from tokengate import OperationsCoordinator, ProgressOption, task_token_guard

DISPLAYS: dict[str, ProgressOption] = {"tqdm": "tqdm", "plain": "plain", "rich": "rich"}


class NullTerminal(io.TextIOBase):
    """A stderr that says it is a terminal and drops what is written."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


@task_token_guard(operation_type="bench_progress")
def one_ms(x: int) -> int:
    time.sleep(0.001)
    return x


def timed_map(items: int, progress: ProgressOption) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in one_ms.map(range(items), progress=progress))
    elapsed = time.perf_counter() - t0
    assert n == items
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--display", choices=tuple(DISPLAYS), default="tqdm")
    ap.add_argument("--workers", type=int, help="coordinator workers (default: 4 per core)")
    ap.add_argument("--json")
    args = ap.parse_args()
    without: list[float] = []
    with_bar: list[float] = []
    with OperationsCoordinator(max_workers=args.workers) as c, contextlib.redirect_stderr(NullTerminal()):
        timed_map(min(args.items, 2000), None)  # warm-up
        for i in range(args.pairs):
            display = DISPLAYS[args.display]
            order = [None, display] if i % 2 == 0 else [display, None]
            for option in order:
                (without if option is None else with_bar).append(timed_map(args.items, option))
        workers = c.total_workers
    ratios = [w / wo for w, wo in zip(with_bar, without)]
    median = statistics.median(ratios)
    rows: list[tuple[str, ...]] = [
        (str(i + 1), f"{wo:.3f}", f"{w:.3f}", f"{r:.3f}") for i, (wo, w, r) in enumerate(zip(without, with_bar, ratios))
    ]
    print(f"fn.map over {args.items} calls of 1 ms, {workers} workers, display {args.display!r}, {args.pairs} pairs")
    print(table(rows, ("pair", "without s", "with s", "ratio")))
    print(f"median ratio {median:.3f}  (goal <= 1.05: {verdict(median <= 1.05)})")
    dump(
        args.json,
        {
            "machine": machine(),
            "items": args.items,
            "workers": workers,
            "display": args.display,
            "without_s": without,
            "with_s": with_bar,
            "ratios": ratios,
            "median_ratio": median,
        },
    )


if __name__ == "__main__":
    main()
