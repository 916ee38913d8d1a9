"""``python -m tokengate``: command-line tools.

``python -m tokengate proof [--quick] [--json PATH] [--plot PATH]`` runs the
burst, window and waves benchmarks beside a plain loop and
``ThreadPoolExecutor`` and prints the figures with PASS/MISS against the goals.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tokengate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    proof = sub.add_parser(
        "proof",
        help="benchmark tokengate against a plain loop and ThreadPoolExecutor (burst, window, waves)",
        description=(
            "Runs Py-TokenGate's burst, window and waves benchmarks on tokengate, on a plain loop and on "
            "ThreadPoolExecutor in the same process, and prints every figure with PASS/MISS against the goals."
        ),
    )
    proof.add_argument("--quick", action="store_true", help="small sizes: the whole run takes well under a minute (CI)")
    proof.add_argument("--json", metavar="PATH", help="write every figure as JSON to PATH")
    proof.add_argument("--plot", metavar="PATH", help="write a PNG chart of per-wave throughput (needs matplotlib)")
    proof.add_argument(
        "--only",
        action="append",
        choices=("burst", "window", "waves"),
        help="run only this section (repeatable; default: all three)",
    )
    proof.add_argument("--tasks", type=_positive_int, default=8, help="tasks per burst (default 8)")
    proof.add_argument("--repeats", type=_positive_int, help="bursts per workload (default 3/7 quick, 5/15 full)")
    proof.add_argument(
        "--window-seconds", type=_positive_float, help="seconds of window per runner (default 2 quick, 20 full)"
    )
    proof.add_argument("--max-wave", type=_positive_int, help="largest wave in tokens (default 8192 quick, 65536 full)")
    proof.add_argument("--workers", type=_positive_int, help="tokengate workers (default: 4 per core)")
    proof.add_argument("--tpe-workers", type=_positive_int, default=8, help="ThreadPoolExecutor threads (default 8)")
    proof.add_argument("--seed", type=int, default=1954, help="seed of the window's release sequence")
    proof.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    proof.add_argument("--strict", action="store_true", help="exit with status 1 when a goal is missed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "proof":
        from . import proof

        return proof.main(args)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
