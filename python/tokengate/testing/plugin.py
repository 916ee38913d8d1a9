"""pytest plugin of tokengate (entry point ``tokengate`` in the ``pytest11`` group).

* ``tokengate_coordinator`` fixture: a running ``OperationsCoordinator``,
  stopped after the test. Its arguments come from ``--tokengate-workers`` and
  from a ``@pytest.mark.tokengate(**kwargs)`` marker on the test
  (``max_workers=4``, ``pin_workers=False``, ...). Tokens still unfinished
  when the test ends are cancelled, and the test fails naming their
  operations, unless the marker says ``allow_unfinished=True``.
* ``--tokengate-report``: prints every ``prove_concurrency`` report made
  during the run in the terminal summary; ``--tokengate-report-json PATH``
  writes them to PATH as JSON. Under pytest-xdist the workers send their
  reports to the controller, which prints and writes them all.
* ``@pytest.mark.concurrency(min_speedup=, max_in_flight=, min_in_flight=)``
  turns a test into a proof: every ``prove_concurrency`` report it makes must
  meet the bounds (and it must make one).

Loading the plugin does not import tokengate's native extension; the fixture does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from . import ConcurrencyReport, _report_hooks, unfinished_tokens

if TYPE_CHECKING:
    from tokengate import OperationsCoordinator

_STOP_TIMEOUT = 30.0


class _Reports:
    """Collects the reports of one pytest session (as plain data, so that pytest-xdist workers
    can send them), tagged with the test that made them; keeps this process's report objects
    of the running test for its ``concurrency`` marker."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.of_current: list[ConcurrencyReport] = []

    def __call__(self, report: ConcurrencyReport) -> None:
        self.items.append((self.current or "<outside a test>", report.to_dict()))
        self.of_current.append(report)


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
        "--tokengate-report-json",
        default=None,
        metavar="PATH",
        help="write the tokengate.testing.prove_concurrency reports to PATH as JSON",
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
        "tokengate(**kwargs): OperationsCoordinator arguments of the tokengate_coordinator fixture "
        "(and allow_unfinished=True: tokens left running do not fail the test)",
    )
    config.addinivalue_line(
        "markers",
        "concurrency(min_speedup=None, max_in_flight=None, min_in_flight=None): every prove_concurrency() "
        "report of the test must meet these bounds",
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
        reports.of_current = []


_BOUNDS = ("min_speedup", "max_in_flight", "min_in_flight")


@pytest.hookimpl(trylast=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # trylast: pytest's own implementation, which runs the test, has run (and passed) by now.
    marker = item.get_closest_marker("concurrency")
    reports = item.config.stash.get(_reports_key, None)
    if marker is None or reports is None:
        return
    __tracebackhide__ = True
    unknown = set(marker.kwargs) - set(_BOUNDS)
    if marker.args or unknown or not marker.kwargs:
        raise pytest.UsageError(
            f"@pytest.mark.concurrency takes keyword bounds among {', '.join(_BOUNDS)}; got "
            f"{list(marker.args) + sorted(unknown) or 'none'}"
        )
    if not reports.of_current:
        raise AssertionError("@pytest.mark.concurrency: the test made no prove_concurrency() report to check")
    for report in reports.of_current:
        if marker.kwargs.get("min_speedup") is not None:
            report.assert_speedup(at_least=marker.kwargs["min_speedup"])
        if marker.kwargs.get("min_in_flight") is not None:
            report.assert_in_flight(at_least=marker.kwargs["min_in_flight"])
        if marker.kwargs.get("max_in_flight") is not None:
            report.assert_max_in_flight(marker.kwargs["max_in_flight"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    # An xdist worker hands its reports to the controller (pytest_testnodedown below).
    workeroutput = getattr(session.config, "workeroutput", None)
    reports = session.config.stash.get(_reports_key, None)
    if workeroutput is not None and reports is not None:
        workeroutput["tokengate_reports"] = json.dumps(reports.items)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    reports = node.config.stash.get(_reports_key, None)
    sent = getattr(node, "workeroutput", {}).get("tokengate_reports")
    if reports is not None and sent:
        reports.items.extend((nodeid, data) for nodeid, data in json.loads(sent))


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
        unfinished = unfinished_tokens(coordinator)
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


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    term = config.getoption("tokengate_report", False)
    path = config.getoption("tokengate_report_json", None)
    if (not term and path is None) or hasattr(config, "workerinput"):
        return
    reports = config.stash.get(_reports_key, None)
    items = reports.items if reports is not None else []
    terminalreporter.section("tokengate concurrency reports")
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"test": nodeid, **data} for nodeid, data in items], f, indent=2)
        terminalreporter.write_line(f"{len(items)} report(s) written to {path}")
    if not items:
        terminalreporter.write_line("no prove_concurrency() reports in this run")
        return
    if term:
        for nodeid, data in items:
            terminalreporter.write_line(f"{nodeid}")
            terminalreporter.write_line(f"  {data['one_line']}")
