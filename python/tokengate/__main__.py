"""``tokengate`` (also ``python -m tokengate``): command-line tools.

``tokengate proof [--quick] [--json PATH] [--plot PATH]`` runs the
burst, window and waves benchmarks beside a plain loop and
``ThreadPoolExecutor`` and prints the figures with PASS/MISS against the goals.

``status``, ``ops``, ``tasks``, ``metrics`` and ``top`` show what a running
coordinator does, and ``pause``, ``resume``, ``drain`` and ``kill`` steer one
of its operations. They talk to the coordinator's dashboard server
(``OperationsCoordinator.serve``; the actions need ``admin=True``) at ``--url``
or ``$TOKENGATE_URL``, with ``--token`` or ``$TOKENGATE_TOKEN``. Exit status:
0 done, 1 unknown operation, 2 token or action refused (and usage errors),
3 nothing answered at the URL, 4 any other error of the server or an answer that
is not tokengate's, 130 Ctrl-C (docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# The client's commands; the names of the action commands are the server's verbs.
READ_COMMANDS = ("status", "ops", "tasks", "metrics", "top")
ACTION_COMMANDS = ("pause", "resume", "drain", "kill")
# The most tokens `tasks --limit` asks for (the server's own bound).
MAX_LIMIT = 10000


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _server_options() -> argparse.ArgumentParser:
    """The options every client command takes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--url",
        help="the dashboard server's URL, as server.url prints it (default: $TOKENGATE_URL); "
        "a ?token= in it is used when no token is given",
    )
    group.add_argument("--token", help="the server's token (default: $TOKENGATE_TOKEN)")
    group.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds to wait for each answer (default 5)"
    )
    return common


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ._cli import TASK_STATES

    common = _server_options()
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON (the schema is in docs/cli.md)")
    parents = [common, as_json]
    sub.add_parser("status", parents=parents, help="the coordinator's totals, admission and lanes")
    sub.add_parser("ops", parents=parents, help="the operations: state, health, counts, wait and run p95")
    tasks = sub.add_parser("tasks", parents=parents, help="unresolved tokens, newest first")
    tasks.add_argument("--state", choices=TASK_STATES, help="only this state")
    tasks.add_argument("--op", metavar="OP", help="only this operation (exit 1 if there is none of that name)")
    tasks.add_argument("--limit", type=_limit, default=100, help=f"at most this many, 1 to {MAX_LIMIT} (default 100)")
    sub.add_parser("metrics", parents=parents, help="the Prometheus text of /metrics (--json: its samples)")
    top = sub.add_parser(
        "top",
        parents=parents,
        help="a live view of the operations (q or Ctrl-C quits)",
        description="Per operation: tokens/s, queued, running, blocked, paused, queue-wait p95 and health, "
        "redrawn every second. q or Ctrl-C quits. Off a terminal, each refresh is printed after the one before.",
    )
    top.add_argument("--interval", type=_positive_float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--iterations", type=_positive_int, metavar="N", help="stop after N refreshes")
    top.add_argument("--once", action="store_true", help="one refresh, then exit (as --iterations 1)")
    verbs = {
        "pause": "hold OP's new tokens (needs a server with admin=True)",
        "resume": "release OP's held tokens and admit new ones",
        "drain": "cancel OP's queued tokens; running ones finish",
        "kill": "kill OP's unresolved tokens (TaskKilledError)",
    }
    for verb, text in verbs.items():
        action = sub.add_parser(verb, parents=parents, help=text)
        action.add_argument("op", metavar="OP", help="the operation's name (operation_type)")


def _prog() -> str:
    return "python -m tokengate" if os.path.basename(sys.argv[0] or "") == "__main__.py" else "tokengate"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or _prog(),
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 done, 1 unknown operation, 2 token or action refused (and usage errors), "
        "3 nothing answered at the URL, 4 any other error of the server or an answer that is not tokengate's, "
        "130 Ctrl-C.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_client_commands(sub)
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
    if args.command in READ_COMMANDS or args.command in ACTION_COMMANDS:
        from ._cli import run_command

        return run_command(args)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
