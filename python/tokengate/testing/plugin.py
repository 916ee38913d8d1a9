"""pytest plugin of tokengate (entry point ``tokengate`` in the ``pytest11`` group).

* ``tokengate_coordinator`` fixture: a running ``OperationsCoordinator``,
  stopped after the test. Its arguments come from ``--tokengate-workers`` and
  from a ``@pytest.mark.tokengate(**kwargs)`` marker on the test
  (``max_workers=4``, ``pin_workers=False``, ...). Tokens still unfinished
  when the test ends are cancelled, and the test fails naming their
  operations, unless the marker says ``allow_unfinished=True``.
* ``--tokengate-report``: prints every ``prove_concurrency`` report made
  during the run in the terminal summary.

Loading the plugin does not import tokengate's native extension; the fixture does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from . import ConcurrencyReport, _report_hooks

if TYPE_CHECKING:
    from tokengate import OperationsCoordinator

_STOP_TIMEOUT = 30.0


class _Reports:
    """Collects the reports of one pytest session, tagged with the test that made them."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.items: list[tuple[str, ConcurrencyReport]] = []

    def __call__(self, report: ConcurrencyReport) -> None:
        self.items.append((self.current or "<outside a test>", report))


_reports_key = pytest.StashKey[_Reports]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokengate", "tokengate concurrency checks")
    group.addoption(
        "--tokengate-report",
        action="store_true",
        default=False,
        help="print the tokengate.testing.prove_concurrency reports in the terminal summary",
    )
    group.addoption(
        "--tokengate-workers",
        type=int,
        default=None,
        metavar="N",
        help="worker count of the tokengate_coordinator fixture (default: tokengate's, 4 per core)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tokengate(**kwargs): OperationsCoordinator arguments of the tokengate_coordinator fixture",
    )
    reports = _Reports()
    config.stash[_reports_key] = reports
    _report_hooks.append(reports)


def pytest_unconfigure(config: pytest.Config) -> None:
    reports = config.stash.get(_reports_key, None)
    if reports is not None and reports in _report_hooks:
        _report_hooks.remove(reports)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    reports = item.config.stash.get(_reports_key, None)
    if reports is not None:
        reports.current = item.nodeid


@pytest.fixture
def tokengate_coordinator(request: pytest.FixtureRequest) -> Iterator[OperationsCoordinator]:
    """A running ``tokengate.OperationsCoordinator``, stopped (queued work cancelled) after the test."""
    from tokengate import OperationsCoordinator

    kwargs: dict[str, Any] = {}
    workers = request.config.getoption("tokengate_workers", None)
    if workers is not None:
        kwargs["max_workers"] = workers
    marker = request.node.get_closest_marker("tokengate")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("@pytest.mark.tokengate takes keyword arguments only (OperationsCoordinator's)")
        kwargs.update(marker.kwargs)
    allow_unfinished = bool(kwargs.pop("allow_unfinished", False))
    coordinator = OperationsCoordinator(**kwargs)
    coordinator.start()
    try:
        yield coordinator
    finally:
        unfinished = _unfinished(coordinator)
        if not coordinator.stop(cancel_pending=True, timeout=_STOP_TIMEOUT):
            pytest.fail(
                f"tokengate_coordinator: worker threads still running {_STOP_TIMEOUT:g} s after stop(); "
                "a task of this test did not return",
                pytrace=False,
            )
        if unfinished and not allow_unfinished:
            total = sum(unfinished.values())
            ops = ", ".join(f"{op} ({n})" for op, n in sorted(unfinished.items()))
            pytest.fail(
                f"tokengate_coordinator: {total} token(s) were unfinished when the test ended and were cancelled: "
                f"{ops}. Wait for them in the test (token.result(), tokengate.gather), or mark the test "
                "@pytest.mark.tokengate(allow_unfinished=True).",
                pytrace=False,
            )


def _unfinished(coordinator: OperationsCoordinator) -> dict[str, int]:
    """Unresolved tokens per operation."""
    ops = coordinator.get_stats().get("operations", {})
    return {op: int(d["pending"]) for op, d in ops.items() if d.get("pending")}


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not config.getoption("tokengate_report", False):
        return
    reports = config.stash.get(_reports_key, None)
    items = reports.items if reports is not None else []
    terminalreporter.section("tokengate concurrency reports")
    if not items:
        terminalreporter.write_line("no prove_concurrency() reports in this run")
        return
    for nodeid, report in items:
        terminalreporter.write_line(f"{nodeid}")
        terminalreporter.write_line(f"  {report.one_line()}")
