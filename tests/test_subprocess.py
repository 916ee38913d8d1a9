"""Process-level behaviour in a child interpreter: fork, Ctrl-C, interpreter exit, deep recursion."""

from __future__ import annotations

import ast
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support import CHILD_TIMEOUT as TIMEOUT
from support import default_sigint, describe, log_line, run_script, wait_child

pytestmark = pytest.mark.subprocess


# -- fork -----------------------------------------------------------------------------------------


#: Prepended to the fork scripts: ``support.wait_child`` (waits for a forked child, with a
#: deadline), its source copied into the child interpreter.
WAIT_CHILD = "from __future__ import annotations\nimport os, signal, time\n\n" + inspect.getsource(wait_child)

FORK_SCRIPT = (
    WAIT_CHILD
    + """
import os, sys, time
from tokengate import ForkedProcessError, OperationsCoordinator, task_token_guard

@task_token_guard
def square(x):
    return x * x

c = OperationsCoordinator(max_workers=2).start()
assert square(3).result(timeout=10) == 9

pid = os.fork()
if pid == 0:
    # child: no worker threads survive a fork; every use must fail fast
    t0 = time.monotonic()
    try:
        tok = square(4)
        try:
            value = tok.result(timeout=5)
            print(f"CHILD: no error, result {value!r}", flush=True)
        except BaseException as e:
            print(f"CHILD: call returned a token whose wait raised {type(e).__name__}: {e}", flush=True)
        os._exit(2)
    except ForkedProcessError as e:
        elapsed = time.monotonic() - t0
        print(f"CHILD: ForkedProcessError after {elapsed:.4f}s: {e}", flush=True)
        if elapsed >= 1.0:
            os._exit(3)
    except BaseException as e:
        print(f"CHILD: wrong exception {type(e).__name__}: {e}", flush=True)
        os._exit(4)
    # leave through normal interpreter shutdown (the exit hooks must not hang in the child)
    sys.exit(0)

code = wait_child(pid, 15)
if code is None:
    print("PARENT: child hung", flush=True)
    sys.exit(5)
print(f"PARENT: child exit code {code}", flush=True)
# the parent's pool is unaffected
assert square(5).result(timeout=10) == 25
c.stop()
sys.exit(0 if code == 0 else 6)
"""
)


def test_fork_after_start_child_gets_forked_process_error(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    # 50 s: the script waits 15 s for a hung child and up to 12 s more to describe it (two
    # runs stay within the suite's 120 s per test).
    proc = run_script(FORK_SCRIPT, tmp_path, timeout=50)
    if proc.returncode == 5:
        # Free-threaded CPython 3.13.5, about 1 run in 2,000: the child raised ForkedProcessError
        # at once, then hung in its exit's gc.collect(), in stop_the_world() waiting on the
        # interpreter's stop-the-world mutex (gdb). The child inherited it locked: a pause of
        # another thread of the parent (a collection, most likely; any thread running Python,
        # the pool's included) held it at the fork. CPython's, not tokengate's; wait_child described the child on
        # stderr (logged here, kept even when the retry passes); one more run must pass.
        log_line(
            pytestconfig, f"test_subprocess: a forked child hung on its way out; trying once more\n{describe(proc)}"
        )
        proc = run_script(FORK_SCRIPT, tmp_path, timeout=50)
    assert proc.returncode == 0, describe(proc)
    assert "CHILD: ForkedProcessError" in proc.stdout, describe(proc)
    assert "PARENT: child exit code 0" in proc.stdout, describe(proc)
    assert "Fatal Python error" not in proc.stderr, describe(proc)


FORK_UNDER_LOAD_SCRIPT = (
    WAIT_CHILD
    + """
import os, sys, threading, time, multiprocessing
from tokengate import ForkedProcessError, OperationsCoordinator, task_token_guard

@task_token_guard(tags={"weight": "light"})
def work(x):
    time.sleep(0.0005)
    return x + 1

c = OperationsCoordinator(max_workers=4).start()
stop = threading.Event()
done = [0]

def submitter():
    # keeps the workers, the queues and their locks busy while the main thread forks
    while not stop.is_set():
        toks = [work(i) for i in range(20)]
        assert [t.result(timeout=10) for t in toks] == [i + 1 for i in range(20)]
        done[0] += 1

threads = [threading.Thread(target=submitter) for _ in range(3)]
for t in threads:
    t.start()

def in_child():
    # Waiting on a token made before the fork (it may be pending in the parent's queues) and
    # a new call fail fast with ForkedProcessError; stop() does nothing (a `with` block or
    # an exit hook in the child must not fail).
    t0 = time.monotonic()
    outcomes = []
    for what, act in (
        ("wait", lambda: pending.result(timeout=5)),
        ("call", lambda: work(1)),
        ("stop", lambda: c.stop()),
    ):
        try:
            act()
            outcomes.append(f"{what}:ok")
        except ForkedProcessError:
            outcomes.append(f"{what}:forked")
        except BaseException as e:
            outcomes.append(f"{what}:{type(e).__name__}")
    return outcomes, time.monotonic() - t0

def good(outcomes, elapsed):
    return outcomes[1:] == ["call:forked", "stop:ok"] and outcomes[0] in ("wait:ok", "wait:forked") and elapsed < 1.0

def mp_child(q):
    q.put(in_child())

bad = []
for n in range(20):
    pending = work(-1)
    if n % 5 == 4:
        ctx = multiprocessing.get_context("fork")
        q = ctx.SimpleQueue()
        p = ctx.Process(target=mp_child, args=(q,))
        p.start()
        p.join(15)
        if p.is_alive():
            p.kill()
            p.join()
            bad.append(f"fork {n}: multiprocessing child hung")
            continue
        outcomes, elapsed = q.get()
        code = p.exitcode
    else:
        pid = os.fork()
        if pid == 0:
            outcomes, elapsed = in_child()
            if not good(outcomes, elapsed):
                os.write(1, f"CHILD {n}: {outcomes} in {elapsed:.3f}s\\n".encode())
            # normal interpreter exit: the exit hooks must not hang in the child
            sys.exit(0 if good(outcomes, elapsed) else 7)
        code = wait_child(pid, 15)
        if code is None:
            bad.append(f"fork {n}: child hung")
            continue
        outcomes, elapsed = ["wait:ok", "call:forked", "stop:ok"], 0.0  # the child checked them
    if code != 0 or not good(outcomes, elapsed):
        bad.append(f"fork {n}: exit code {code}, {outcomes}, {elapsed:.3f}s")
    assert pending.result(timeout=10) == 0

stop.set()
for t in threads:
    t.join(10)
assert done[0] > 0
assert work(5).result(timeout=10) == 6  # the parent's pool is unaffected
c.stop()
print("BAD:", bad, flush=True)
print(f"PARENT: {done[0]} rounds of 20 tokens while forking", flush=True)
sys.exit(1 if bad else 0)
"""
)


def _only_hung_children(proc: subprocess.CompletedProcess[str]) -> bool:
    """Whether every failure FORK_UNDER_LOAD_SCRIPT reported was a child that hung."""
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BAD: [")), None)
    if line is None:
        return False
    bad = ast.literal_eval(line[len("BAD: ") :])
    return bool(bad) and all(entry.endswith("child hung") for entry in bad)


def test_fork_under_load_child_never_hangs(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    # A fork with the pool busy: three threads submit and wait while the main thread
    # forks 20 times (4 of them through multiprocessing's fork context), so locks of the
    # pool, the registry and the allocator may be held at the fork.
    # 50 s a run: about 1 s, and 27 s more for a child that hangs (see the test above).
    proc = run_script(FORK_UNDER_LOAD_SCRIPT, tmp_path, timeout=50)
    if proc.returncode != 0 and _only_hung_children(proc):
        # Free-threaded CPython's fork bug (see the test above): one more run must pass.
        log_line(pytestconfig, f"test_subprocess: forked children hung under load; trying once more\n{describe(proc)}")
        proc = run_script(FORK_UNDER_LOAD_SCRIPT, tmp_path, timeout=50)
    assert proc.returncode == 0, describe(proc)
    assert "BAD: []" in proc.stdout, describe(proc)
    assert "Fatal Python error" not in proc.stderr, describe(proc)


# -- Ctrl-C ---------------------------------------------------------------------------------------


SIGINT_SCRIPT = """
import asyncio, sys, time
import tokengate
from tokengate import OperationsCoordinator, task_token_guard

WAIT = sys.argv[1]

@task_token_guard
def sleepy(s):
    time.sleep(s)
    return s

async def waits(toks):
    if WAIT == "await":
        return await toks[0]
    return await asyncio.gather(*toks)

try:
    with OperationsCoordinator(max_workers=2):
        toks = [sleepy(5.0), sleepy(4.5)]
        print("READY", flush=True)
        try:
            if WAIT == "result":
                toks[0].result()
            else:
                # asyncio.run turns SIGINT into cancelling the main task, then re-raises it
                asyncio.run(waits(toks))
            print("NOT INTERRUPTED", flush=True)
        except KeyboardInterrupt:
            print(f"CAUGHT {time.monotonic():.6f}", flush=True)
            raise
except KeyboardInterrupt:
    # nothing is left unresolved: the with block's stop() waited for both running tokens, or a
    # cancelled asyncio.gather cancelled them (asyncio's contract; their bodies ran on)
    print("EXITING", [t.state for t in toks], flush=True)
    sys.exit(0)
"""


@pytest.mark.parametrize("wait", ["result", "await", "gather"])
def test_ctrl_c_interrupts_a_wait(tmp_path: Path, wait: str) -> None:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SIGINT_SCRIPT), wait],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", line
        time.sleep(1.0)
        sent = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux: comparable with the child's
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        exited = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = line + out
    report = f"rc={proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    caught_lines = [ln for ln in out.splitlines() if ln.startswith("CAUGHT ")]
    assert caught_lines, report
    latency = float(caught_lines[0].split()[1]) - sent
    print(f"SIGINT -> KeyboardInterrupt latency: {latency * 1000:.1f} ms; SIGINT -> exit: {exited - sent:.2f} s")
    assert latency < 0.5, f"KeyboardInterrupt took {latency:.3f}s to reach the waiter\n{report}"
    states = "'cancelled', 'cancelled'" if wait == "gather" else "'completed', 'completed'"
    assert f"EXITING [{states}]" in out, report
    assert proc.returncode == 0, report
    # exit is bounded by the running 5 s task (started ~1 s before SIGINT) plus a wide margin
    assert exited - sent < 10.0, report
    assert "Fatal Python error" not in err, report


# -- interpreter exit ---------------------------------------------------------------------------------


PENDING_AT_EXIT_SCRIPT = """
import time
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard
def work(i):
    time.sleep(0.001)
    with open("ran.txt", "a") as f:
        f.write(f"{i}\\n")
    return i

c = OperationsCoordinator(max_workers=2).start()
toks = [work(i) for i in range(100)]
print("SUBMITTED", flush=True)
# exit without stop(): the exit hook must run the queued work
"""


def test_exit_with_pending_work_runs_it(tmp_path: Path) -> None:
    proc = run_script(PENDING_AT_EXIT_SCRIPT, tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr == "", describe(proc)
    assert "SUBMITTED" in proc.stdout
    ran = (tmp_path / "ran.txt").read_text().split()
    assert sorted(int(x) for x in ran) == list(range(100)), f"{len(ran)} of 100 ran"


ATEXIT_SUBMIT_SCRIPT = """
import atexit, time
from tokengate import OperationsCoordinator, ShutdownError, task_token_guard

@task_token_guard
def square(x):
    return x * x

def late():
    try:
        tok = square(2)
    except ShutdownError as e:
        print(f"SHUTDOWN_ERROR {type(e).__name__}: {e}", flush=True)
        print(f"IS_RUNTIME_ERROR {isinstance(e, RuntimeError)}", flush=True)
        return
    except BaseException as e:
        print(f"WRONG {type(e).__name__}: {e}", flush=True)
        return
    try:
        print(f"ACCEPTED result={tok.result(timeout=5)!r}", flush=True)
    except BaseException as e:
        print(f"ACCEPTED then {type(e).__name__}: {e}", flush=True)

atexit.register(late)
c = OperationsCoordinator(max_workers=2).start()
assert square(3).result(timeout=10) == 9
print("MAIN DONE", flush=True)
"""


def test_submit_from_atexit_raises_shutdown_error(tmp_path: Path) -> None:
    proc = run_script(ATEXIT_SUBMIT_SCRIPT, tmp_path)
    print(proc.stdout)
    assert proc.returncode == 0, describe(proc)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SHUTDOWN_ERROR")]
    assert lines, describe(proc)
    assert "after interpreter shutdown" in lines[0], describe(proc)
    assert "cannot schedule new futures" in lines[0], describe(proc)
    assert "IS_RUNTIME_ERROR True" in proc.stdout, describe(proc)
    assert proc.stderr == "", describe(proc)


RUNNING_AT_EXIT_SCRIPT = """
import time
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard
def slow():
    time.sleep(0.5)
    with open("finished.txt", "w") as f:
        f.write("done")
    return 1

c = OperationsCoordinator(max_workers=2).start()
tok = slow()
while not tok.running():
    time.sleep(0.001)
print("RUNNING", flush=True)
# exit now: stop() is never called and the task is still running
"""


def test_exit_while_task_running_is_clean(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = run_script(RUNNING_AT_EXIT_SCRIPT, tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, describe(proc)
    assert "RUNNING" in proc.stdout
    assert "Fatal Python error" not in proc.stderr, describe(proc)
    assert "panicked" not in proc.stderr, describe(proc)
    assert proc.stderr == "", describe(proc)
    assert (tmp_path / "finished.txt").read_text() == "done", "the running task was cut off at exit"
    assert elapsed < 20, elapsed


# -- deep recursion ------------------------------------------------------------------------------------


DEEP_RECURSION_SCRIPT = """
import json, sys
from tokengate import OperationsCoordinator, task_token_guard

sys.setrecursionlimit(100_000)

@task_token_guard
def deep_dumps(depth):
    nested = []
    for _ in range(depth):
        nested = [nested]
    return len(json.dumps(nested))

with OperationsCoordinator(max_workers=2):
    try:
        n = deep_dumps(20_000).result(timeout=20)
    except RecursionError:
        # CPython 3.12+ bounds C recursion on its own (a plain thread raises it too).
        print("RECURSION_ERROR", flush=True)
    else:
        print(f"LEN {n}", flush=True)
"""


def test_deep_recursion_in_task_does_not_crash(tmp_path: Path) -> None:
    proc = run_script(DEEP_RECURSION_SCRIPT, tmp_path)
    assert proc.returncode == 0, describe(proc)  # -11 would be a segfault on a small worker stack
    if sys.version_info >= (3, 12):
        assert "LEN 40002" in proc.stdout or "RECURSION_ERROR" in proc.stdout, describe(proc)
    else:
        assert "LEN 40002" in proc.stdout, describe(proc)
