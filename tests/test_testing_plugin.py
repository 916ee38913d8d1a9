"""tokengate.testing (prove_concurrency, ConcurrencyReport) and its pytest plugin.

Timing margins are wide on purpose: the machine has 2 cores shared with other work.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import tokengate
from tokengate import OperationsCoordinator, task_token_guard
from tokengate.testing import ConcurrencyReport, RunFigures, prove_concurrency


def _plugin_autoloaded() -> bool:
    """True when pytest loads the plugin by itself (its pytest11 entry point is installed)."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "tokengate.testing.plugin" for ep in entry_points(group="pytest11"))


AUTOLOADED = _plugin_autoloaded()
# Before `maturin develop` installs the entry point, load the plugin by hand
# (loading it both ways would register it twice).
pytest_plugins = ["pytester"] + ([] if AUTOLOADED else ["tokengate.testing.plugin"])
PLUGIN_ARGS: list[str] = [] if AUTOLOADED else ["-p", "tokengate.testing.plugin"]


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task_token_guard(operation_type="tests.decorated_nap")
def decorated_nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_fixture_gives_a_running_coordinator(tokengate_coordinator: OperationsCoordinator) -> None:
    assert isinstance(tokengate_coordinator, OperationsCoordinator)
    assert tokengate_coordinator.is_running
    assert decorated_nap(0.0).result(timeout=10) == 0.0


def test_sleep_runs_concurrently_on_the_fixture(tokengate_coordinator: OperationsCoordinator) -> None:
    n = min(8, tokengate_coordinator.total_workers)
    report = prove_concurrency(nap, [0.05] * n, coordinator=tokengate_coordinator)
    assert isinstance(report, ConcurrencyReport)
    assert report.tasks == n and len(report.durations_s) == n and len(report.start_offsets_s) == n
    assert report.workers == tokengate_coordinator.total_workers
    # Ideal is n (8): serial ~0.4 s against ~0.05 s. Wide margins for a busy machine.
    report.assert_speedup(at_least=2.0)
    report.assert_in_flight(at_least=2.0)
    report.assert_jitter(at_most=0.5)
    assert report.serial_s >= 0.05 * n * 0.9
    assert all(d >= 0.04 for d in report.durations_s)
    assert min(report.start_offsets_s) == 0.0
    assert tokengate_coordinator.is_running  # prove_concurrency does not stop a coordinator it was given


def test_decorated_function_and_repeat_without_coordinator() -> None:
    report = prove_concurrency(decorated_nap, [0.03] * 4, repeat=3)
    assert report.repeat == 3 and len(report.runs) == 3
    assert all(isinstance(r, RunFigures) for r in report.runs)
    assert report.workers == 4  # temporary coordinator: one worker per input
    report.assert_speedup(at_least=1.5)
    assert tokengate._tokengate.active_engine_count() == 0  # the temporary coordinator was stopped


def test_unpack_and_name() -> None:
    def add_after(a: float, b: float) -> float:
        time.sleep(0.01)
        return a + b

    report = prove_concurrency(add_after, [(1, 2), (3, 4)], unpack=True, name="adder", warmup=False)
    assert report.name == "adder" and report.tasks == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one input"):
        prove_concurrency(nap, [])
    with pytest.raises(ValueError, match="repeat"):
        prove_concurrency(nap, [0.0], repeat=0)
    stopped = OperationsCoordinator(max_workers=1)
    with pytest.raises(ValueError, match="not running"):
        prove_concurrency(nap, [0.0], coordinator=stopped)


def test_task_exception_propagates() -> None:
    def boom(x: int) -> int:
        raise KeyError(x)

    with pytest.raises(KeyError):
        prove_concurrency(boom, [1, 2], warmup=False)


def _report(speedup_serial: float, wall: float, durations: tuple[float, ...]) -> ConcurrencyReport:
    run = RunFigures(
        serial_s=speedup_serial,
        wall_s=wall,
        serial_durations_s=durations,
        durations_s=durations,
        start_offsets_s=tuple(0.0 for _ in durations),
        submit_s=0.0,
    )
    return ConcurrencyReport(
        name="pure_python",
        tasks=len(durations),
        workers=8,
        repeat=1,
        gil_enabled=True,
        serial_s=run.serial_s,
        wall_s=run.wall_s,
        real_speedup=run.real_speedup,
        in_flight=run.in_flight,
        jitter_s=run.jitter_s,
        durations_s=run.durations_s,
        start_offsets_s=run.start_offsets_s,
        serial_durations_s=run.serial_durations_s,
        runs=(run,),
    )


def test_failure_messages_show_the_numbers_and_what_they_mean() -> None:
    # In flight together (ratio 2) but no faster: what a GIL-bound task looks like.
    report = _report(0.100, 0.100, (0.100, 0.100))
    with pytest.raises(AssertionError) as info:
        report.assert_speedup(at_least=1.8)
    msg = str(info.value)
    assert "real speedup 1.00x is below the required 1.80x" in msg
    assert "serial / wall" in msg and "100.000 ms" in msg
    assert "in-flight ratio" in msg and "2.00x" in msg
    assert "GIL" in msg
    with pytest.raises(AssertionError, match=re.escape("above the allowed 0.50x")):
        report.assert_speedup(at_most=0.5)
    with pytest.raises(AssertionError, match=re.escape("in-flight ratio 2.00x is below the required 3.00x")):
        report.assert_in_flight(at_least=3)
    with pytest.raises(TypeError):
        report.assert_speedup()
    assert report.assert_speedup(at_least=0.9, at_most=1.1) is report


# -- the plugin, through pytester -------------------------------------------------------

INNER_TESTS = """
import time
from tokengate.testing import prove_concurrency

def nap(s):
    time.sleep(s)

def test_sleeps(tokengate_coordinator):
    n = min(4, tokengate_coordinator.total_workers)
    prove_concurrency(nap, [0.02] * n, coordinator=tokengate_coordinator).assert_speedup(at_least=1.2)

def test_impossible(tokengate_coordinator):
    prove_concurrency(nap, [0.01, 0.01], coordinator=tokengate_coordinator).assert_speedup(at_least=1000)
"""


@pytest.mark.subprocess
def test_plugin_option_prints_reports_and_failures_are_readable(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "--tokengate-report", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*tokengate concurrency reports*",
            "test_inner.py::test_sleeps",
            "*nap: * tasks on * workers, real speedup *x (of at most *x), in flight *x*",
            "test_inner.py::test_impossible",
        ]
    )
    # The failing assertion says what failed, with the numbers and their meaning.
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: nap: real speedup *x is below the required 1000.00x",
            "*one after another (serial):*ms",
            "*real speedup = serial / wall:*1.0x = no gain*",
            "*in-flight ratio:*sum of task durations / wall*",
        ]
    )
    assert "no prove_concurrency() reports" not in out


@pytest.mark.subprocess
def test_plugin_report_section_only_with_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_quiet="""
import pytest

def test_fixture(tokengate_coordinator):
    assert tokengate_coordinator.is_running

@pytest.mark.tokengate(max_workers=3)
def test_marker(tokengate_coordinator):
    assert tokengate_coordinator.total_workers == 3
"""
    )
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", "--strict-markers", timeout=120)
    result.assert_outcomes(passed=2)
    assert "tokengate concurrency reports" not in result.stdout.str()
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "--tokengate-report", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*tokengate concurrency reports*", "no prove_concurrency() reports in this run"])
    help_result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "--help", timeout=120)
    help_result.stdout.fnmatch_lines(["*--tokengate-report*"])


# -- ceilings, peaks and repeats ---------------------------------------------------------


def test_peak_overlap_counts_the_most_intervals_at_one_moment() -> None:
    from tokengate.testing import peak_overlap

    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # back to back: never two at once
    assert peak_overlap([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3


def test_undecorated_sleep_reaches_the_task_count_and_the_report_says_why_a_cap_exists() -> None:
    # time.sleep, undecorated, runs as an untagged (medium) operation: while it computes, 2 per
    # core; a sleep lends its core's share, so 8 sleeps on 8 workers all run at once.
    report = prove_concurrency(time.sleep, [0.05] * 8, workers=8)
    assert report.weight == "medium"
    assert report.weight_cap >= 2 and report.weight_cap % 2 == 0  # 2 per core
    assert report.peak_in_flight >= 6, report.summary()
    report.assert_speedup(at_least=6)
    if report.weight_cap < 8:
        assert "lend their share" in report.summary()


def test_assert_max_in_flight_holds_under_an_operation_limit_and_fails_without_it() -> None:
    limited = task_token_guard(operation_type="tests.limited_nap", tags={"weight": "light"})(nap)
    with OperationsCoordinator(max_workers=9, operation_limits={"tests.limited_nap": 3}) as c:
        report = prove_concurrency(limited, [0.02] * 9, coordinator=c).assert_max_in_flight(3)
    assert report.peak_in_flight == 3
    with pytest.raises(AssertionError, match="ran at the same moment, more than the allowed 3"):
        prove_concurrency(nap, [0.05] * 9, workers=9).assert_max_in_flight(3)


def test_a_function_holding_a_lock_fails_assert_speedup() -> None:
    lock = threading.Lock()

    def serialised(s: float) -> None:
        with lock:
            time.sleep(s)

    with pytest.raises(AssertionError, match=r"real speedup .* is below the required 2\.00x"):
        prove_concurrency(serialised, [0.02] * 4, workers=4).assert_speedup(at_least=2)


def test_short_runs_repeat_by_default_and_report_their_spread() -> None:
    report = prove_concurrency(nap, [0.005] * 4, workers=4)
    assert report.repeat == 5 and len(report.runs) == 5
    low, high = report.speedup_spread
    assert low <= report.real_speedup <= high
    assert "spread" in report.summary()
    long = prove_concurrency(nap, [0.25] * 2, workers=2)
    assert long.repeat == 1
    assert prove_concurrency(nap, [0.005] * 2, workers=2, repeat=2).repeat == 2


@pytest.mark.subprocess
def test_fixture_fails_a_test_that_leaves_tokens_unfinished(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_leftover="""
import threading, pytest
from tokengate import task_token_guard

@task_token_guard(operation_type="left_behind", tags={"weight": "light"})
def linger():
    threading.Event().wait(0.5)

def test_leaves_tokens(tokengate_coordinator):
    [linger() for _ in range(3)]  # still running when the test returns

@pytest.mark.tokengate(allow_unfinished=True)
def test_may_leave_tokens(tokengate_coordinator):
    [linger() for _ in range(3)]

def test_waits(tokengate_coordinator):
    assert linger().result(timeout=5) is None
"""
    )
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_tokens*",
            "*3 token(s) were unfinished when the test ended and were cancelled: left_behind (3)*",
        ]
    )


# -- leaks, priorities, the marker, JSON reports, pytest-xdist --------------------------


def test_assert_no_leaks_names_a_running_coordinator_and_passes_once_it_stops() -> None:
    from tokengate.testing import assert_no_leaks

    release = threading.Event()
    held = task_token_guard(operation_type="tests.leak_held", tags={"weight": "light"})(release.wait)
    with (
        pytest.raises(
            AssertionError,
            match=r"coordinator \(2 workers\) still running, with unresolved tokens: tests.leak_held \(1\)",
        ),
        assert_no_leaks(timeout=0.2),
    ):
        c = OperationsCoordinator(max_workers=2).start()
        held(30)
    release.set()
    c.stop()
    with assert_no_leaks(), OperationsCoordinator(max_workers=2):
        assert held(1).result(timeout=10)


def test_prove_priority_order_sees_the_engine_run_higher_priorities_first() -> None:
    from tokengate.testing import prove_priority_order

    report = prove_priority_order(nap, [1, 5, 3, 5, -2, 0], arg=0.001)
    assert report.started == (5, 5, 3, 1, 0, -2)
    report.assert_ordered()
    from tokengate.testing import PriorityReport

    with pytest.raises(AssertionError, match=r"calls started in priority order \[1, 5\], expected \[5, 1\]"):
        PriorityReport(name="x", submitted=(1, 5), started=(1, 5)).assert_ordered()


# pytest-asyncio warns when this is unset; the inner runs in this process would show it.
INNER_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

MARKED_TESTS = """
import time, pytest
from tokengate.testing import prove_concurrency

def nap(s):
    time.sleep(s)

@pytest.mark.concurrency(min_speedup=2, max_in_flight=4)
def test_meets_its_bounds():
    prove_concurrency(nap, [0.03] * 4, workers=4)

@pytest.mark.concurrency(max_in_flight=2)
def test_too_many_at_once():
    prove_concurrency(nap, [0.03] * 4, workers=4)

@pytest.mark.concurrency(min_in_flight=3)
def test_never_overlaps():
    prove_concurrency(nap, [0.01] * 3, workers=1)

@pytest.mark.concurrency(min_speedup=2)
def test_makes_no_report():
    pass
"""


def test_concurrency_marker_turns_a_test_into_a_proof_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_marked=MARKED_TESTS)
    pytester.makeini(INNER_INI)
    result = pytester.runpytest_inprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "*AssertionError: nap: 4 tasks ran at the same moment, more than the allowed 2",
            "*AssertionError: nap: in-flight ratio *x is below the required 3.00x",
            "*@pytest.mark.concurrency: the test made no prove_concurrency() report to check",
        ]
    )


@pytest.mark.subprocess
def test_reports_come_back_from_xdist_workers_and_go_to_json(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (test extra)")
    pytester.makepyfile(
        test_many="""
import time, pytest
from tokengate.testing import prove_concurrency

def nap(s):
    time.sleep(s)

@pytest.mark.parametrize("n", range(4))
def test_proof(n):
    prove_concurrency(nap, [0.01] * 2, workers=2, name=f"nap{n}").assert_speedup(at_least=1.2)
"""
    )
    out = tmp_path / "reports.json"
    result = pytester.runpytest_subprocess(
        *PLUGIN_ARGS,
        "-n",
        "2",
        "--tokengate-report",
        "--tokengate-report-json",
        str(out),
        "-p",
        "no:cacheprovider",
        timeout=180,
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*tokengate concurrency reports*", "4 report(s) written to *"])
    for n in range(4):
        result.stdout.fnmatch_lines([f"test_many.py::test_proof[[]{n}[]]", f"  nap{n}: 2 tasks on 2 workers*"])
    data = json.loads(out.read_text())
    assert sorted(d["name"] for d in data) == ["nap0", "nap1", "nap2", "nap3"]
    assert all(d["test"].startswith("test_many.py::test_proof[") and d["real_speedup"] > 1 for d in data)


def test_report_option_leaves_the_paths_after_it_to_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one="def test_x():\n    pass\n", test_two="def test_y():\n    assert False\n")
    pytester.makeini(INNER_INI)
    result = pytester.runpytest_inprocess(*PLUGIN_ARGS, "--tokengate-report", "test_one.py", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*tokengate concurrency reports*", "no prove_concurrency() reports in this run"])


# Burns {cpu} seconds of CPU time, says so on stdout, then waits for its stdin to close.
_BURN_THEN_BLOCK = """
import sys, time
t = time.process_time()
while time.process_time() - t < {cpu}:
    pass
print("ready", flush=True)
sys.stdin.read()
"""

# Runs a grandchild that burns and ends (waited for: its time is in this process's cutime),
# then one that burns and blocks (alive: only a walk of the process tree finds it), says it
# is ready once that one is, and ends it when its own stdin closes.
_NESTED = """
import subprocess, sys
subprocess.run([sys.executable, "-c", {burn_short!r}], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
child = subprocess.Popen([sys.executable, "-c", {burn_block!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print("ready", flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="CpuMeter reads /proc")
def test_cpu_meter_counts_the_cpu_of_its_own_descendants_once() -> None:
    """A proof's own worker processes (the process lane's) are not "other processes": the
    meter's own share is this process's CPU time and that of all its descendants, each
    counted once: a child waited for, a live child, a live grandchild and a grandchild its
    parent waited for. Checked against getrusage(RUSAGE_CHILDREN) once all were waited for."""
    import resource
    import subprocess
    import sys

    from tokengate.testing import CpuMeter

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def self_cpu() -> float:
        t = os.times()
        return t.user + t.system

    burn_short = _BURN_THEN_BLOCK.format(cpu=0.2).replace("sys.stdin.read()", "")
    burn_block = _BURN_THEN_BLOCK.format(cpu=0.3)
    meter = CpuMeter()
    assert meter.ok
    tick = os.sysconf("SC_CLK_TCK")
    true0, self0, own0 = children_cpu(), self_cpu(), meter.snapshot()[2]
    subprocess.run([sys.executable, "-c", burn_short], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    codes = [burn_block, _NESTED.format(burn_short=burn_short, burn_block=burn_block)]
    live = [
        subprocess.Popen([sys.executable, "-c", c], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for c in codes
    ]
    try:
        for p in live:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        # All of them burnt what they burn and block: nothing of theirs runs until their stdin closes.
        seen = (meter.snapshot()[2] - own0) / tick - (self_cpu() - self0)
    finally:
        for p in live:
            assert p.stdin is not None
            p.stdin.close()
        for p in live:
            p.wait(30)
            assert p.stdout is not None
            p.stdout.close()
    true = children_cpu() - true0  # everything, now that all were waited for (exits included)
    # 4 burns of 0.2-0.3 s (1.0 s), interpreter start-ups besides; what ran after the reading
    # is the exits only, and /proc counts whole ticks per process.
    assert true >= 1.0
    assert true - 0.15 <= seen <= true + 0.05, f"meter saw {seen:.3f} s of its descendants' CPU, they used {true:.3f} s"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="CpuMeter reads /proc")
def test_cpu_meter_loses_no_child_reaped_by_another_thread_meanwhile() -> None:
    """A child that another thread reaps while a snapshot reads /proc is neither in the scan
    nor (yet) in os.times(): the snapshot reads again. Without that, about 1 snapshot in 40
    here lost a whole child's CPU time, so the reading went down."""
    import subprocess
    import sys

    from tokengate.testing import CpuMeter

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.03: pass\n"
    stop = threading.Event()

    def run_children() -> None:
        while not stop.is_set():
            subprocess.run([sys.executable, "-c", burn], check=True)

    meter = CpuMeter()
    runner = threading.Thread(target=run_children)
    runner.start()
    drops = []
    try:
        last = meter.snapshot()[2]
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline or n < 200:
            own = meter.snapshot()[2]
            if own < last - 0.5:  # whole ticks; less is rounding of the seconds os.times() gives
                drops.append(round(last - own))
            last = own
            n += 1
    finally:
        stop.set()
        runner.join(30)
    assert not drops, f"{len(drops)} of {n} readings went down (by {drops} ticks): a reaped child was lost"
