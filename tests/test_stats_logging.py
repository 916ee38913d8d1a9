"""Monitoring: the get_stats() schema, the execution history ring
(get_recent_executions, dump_execution_history) and logging (one logger per
channel, silent by default, no print in the library)."""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import support
import tokengate
from support import Env
from tokengate import OperationsCoordinator, TaskTimeoutError, task_token_guard

WAIT = 10.0
PKG = pathlib.Path(tokengate.__file__).resolve().parent
REPO = pathlib.Path(__file__).resolve().parent.parent


wait_until = functools.partial(support.wait_until, interval=0.002)


@task_token_guard(operation_type="sl_ok", tags={"weight": "light"})
def ok(x: Any) -> Any:
    return x


@task_token_guard(operation_type="sl_fail", tags={"weight": "light"})
def fail(msg: str) -> None:
    raise KeyError(msg)


@task_token_guard(operation_type="sl_hold", tags={"weight": "light"})
def hold(ev: threading.Event, limit: float = 30.0) -> str:
    ev.wait(limit)
    return "released"


@pytest.fixture
def env() -> Iterator[Env]:
    with Env(max_workers=2) as e:
        yield e


# -- get_stats ----------------------------------------------------------------------------------

TOKEN_KEYS = {
    "submitted",
    "unresolved",
    "executing",
    "completed",
    "failed",
    "killed",
    "timeout",
    "cancelled",
    "retries",
}
ADMISSION_KEYS = {"paused", "max_pending", "pending", "peak_pending", "blocked_callers", "rejected", "parked"}
TIMEOUT_KEYS = {"armed", "expired_queued", "expired_running", "overruns", "overrun_total_s", "overrun_max_s"}
OP_KEYS = {"pending", "max_pending", "peak_pending", "rejected", "paused", "parked", "blocked", "health"}
HEALTH_KEYS = {
    "attempts",
    "successes",
    "failures",
    "timeouts",
    "min_time",
    "max_time",
    "mean_time",
    "success_rate",
    "health",
}


def test_get_stats_schema(env: Env) -> None:
    c = env.coord(max_pending=50, operation_limits={"sl_ok": 10})
    ok(1).result(timeout=WAIT)
    fail("k").exception(timeout=WAIT)
    s = c.get_stats()
    assert s["active"] is True
    assert {"active", "topology", "tokens", "pool", "admission", "timeouts", "operations"} <= set(s)
    assert set(s["tokens"]) >= TOKEN_KEYS
    assert set(s["admission"]) >= ADMISSION_KEYS
    assert set(s["timeouts"]) >= TIMEOUT_KEYS
    assert {"sl_ok", "sl_fail"} <= set(s["operations"])
    # the cores the workers are spread over, one budget of units each
    assert s["pool"]["cores"] == len(s["pool"]["core_units"]) >= 1
    for op in s["operations"].values():
        assert set(op) >= OP_KEYS
        assert set(op["health"]) >= HEALTH_KEYS
    assert s["admission"]["max_pending"] == 50
    assert s["operations"]["sl_ok"]["max_pending"] == 10
    assert s["operations"]["sl_fail"]["max_pending"] is None
    for key in ADMISSION_KEYS - {"paused", "max_pending"}:
        assert isinstance(s["admission"][key], int), key
    for key in ("overrun_total_s", "overrun_max_s"):
        assert isinstance(s["timeouts"][key], float), key
    json.dumps(s)  # plain data only


def test_stats_of_a_stopped_coordinator_keep_the_schema() -> None:
    c = OperationsCoordinator(max_workers=1)
    s = c.get_stats()
    assert s["active"] is False
    assert {"tokens", "admission", "timeouts", "operations"} <= set(s)


def test_token_counters_add_up(env: Env) -> None:
    c = env.coord(max_workers=1)
    ev = env.gate()
    blocker = hold(ev)
    assert wait_until(blocker.running)
    oks = [ok(i) for i in range(5)]
    fails = [fail(str(i)) for i in range(3)]
    cancelled = ok(99)
    assert cancelled.cancel()
    killed = ok(98)
    assert killed.kill()
    timed = ok.options(timeout=0.05)(97)
    assert isinstance(timed.exception(timeout=WAIT), TaskTimeoutError)
    s = c.get_stats()["tokens"]
    assert s["executing"] == 1 and s["unresolved"] == 9
    ev.set()
    for t in oks + fails + [blocker]:
        t.exception(timeout=WAIT)
    assert wait_until(lambda: c.get_stats()["tokens"]["unresolved"] == 0)
    s = c.get_stats()["tokens"]
    assert s["submitted"] == 12
    assert (s["completed"], s["failed"], s["cancelled"], s["killed"], s["timeout"]) == (6, 3, 1, 1, 1)
    assert s["submitted"] == s["completed"] + s["failed"] + s["cancelled"] + s["killed"] + s["timeout"]
    assert s["executing"] == 0


# -- execution history ----------------------------------------------------------------------------

RECORD_KEYS = {
    "token_id",
    "operation_type",
    "state",
    "created_at",
    "started_at",
    "finished_at",
    "wait_time",
    "execution_time",
    "worker_id",
    "core_id",
    "error",
}


def test_recent_executions_newest_first_with_limit(env: Env) -> None:
    c = env.coord(max_workers=1)
    toks = [ok(i) for i in range(10)]
    for t in toks:
        t.result(timeout=WAIT)
    bad = fail("x")
    bad.exception(timeout=WAIT)
    recent = c.get_recent_executions(4)
    assert len(recent) == 4
    assert [r["token_id"] for r in recent] == [bad.token_id] + [t.token_id for t in reversed(toks[-3:])]
    for r in recent:
        assert set(r) >= RECORD_KEYS
    assert recent[0]["state"] == "failed" and recent[0]["error"] == "KeyError"
    assert recent[0]["operation_type"] == "sl_fail"
    done = recent[1]
    assert done["state"] == "completed" and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["wait_time"] >= 0 and done["execution_time"] >= 0
    assert done["worker_id"] == 0
    assert abs(done["finished_at"] - time.time()) < 60, "timestamps must be unix times"
    assert len(c.get_recent_executions()) == 11  # default limit 50


def test_history_is_a_bounded_ring(env: Env) -> None:
    c = env.coord(max_workers=1, history_size=7)
    toks = [ok(i) for i in range(30)]
    for t in toks:
        t.result(timeout=WAIT)
    assert wait_until(lambda: len(c.get_recent_executions(100)) == 7)
    recent = c.get_recent_executions(100)
    assert [r["token_id"] for r in recent] == [t.token_id for t in reversed(toks[-7:])]


def test_history_size_zero_keeps_nothing(env: Env) -> None:
    c = env.coord(history_size=0)
    ok(1).result(timeout=WAIT)
    assert c.get_recent_executions(10) == []


def test_history_records_tokens_that_never_ran(env: Env) -> None:
    c = env.coord(max_workers=1)
    ev = env.gate()
    blocker = hold(ev)
    assert wait_until(blocker.running)
    tok = ok(5)
    tok.cancel()
    rec = c.get_recent_executions(1)[0]
    assert rec["token_id"] == tok.token_id and rec["state"] == "cancelled"
    assert rec["started_at"] is None and rec["execution_time"] is None and rec["worker_id"] is None


def test_history_size_is_validated() -> None:
    with pytest.raises(ValueError):
        OperationsCoordinator(history_size=-1)


def test_dump_execution_history(env: Env, tmp_path: pathlib.Path) -> None:
    c = env.coord(max_workers=1, history_size=5)
    for i in range(8):
        ok(i).result(timeout=WAIT)
    fail("z").exception(timeout=WAIT)
    target = tmp_path / "history.json"
    path = c.dump_execution_history(target)
    assert pathlib.Path(path) == target
    data = json.loads(target.read_text())
    assert set(data) == {"timestamp", "total_executions", "executions"}
    assert data["total_executions"] == len(data["executions"]) == 5
    assert abs(data["timestamp"] - time.time()) < 60
    ids = [r["token_id"] for r in data["executions"]]
    assert ids == sorted(ids), "the dump lists oldest first"
    assert data["executions"][-1]["state"] == "failed"
    assert data["executions"] == list(reversed(c.get_recent_executions(5)))


def test_dump_execution_history_default_path(env: Env, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = env.coord()
    ok(1).result(timeout=WAIT)
    path = c.dump_execution_history()
    assert re.fullmatch(r"tokengate_history_\d+\.json", os.path.basename(path)), path
    data = json.loads((tmp_path / os.path.basename(path)).read_text())
    assert data["total_executions"] == 1


# -- logging ----------------------------------------------------------------------------------


def test_package_logger_is_silent_by_default() -> None:
    logger = logging.getLogger("tokengate")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert not [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]


def test_events_are_logged_per_channel(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tokengate")
    c = env.coord(max_workers=1, auto_block_dangerous=True)
    calls = {"n": 0}

    def flaky_body() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("once")
        return "ok"

    @task_token_guard(operation_type="sl_flaky", tags={"weight": "light", "retries": 1})
    def flaky() -> str:
        return flaky_body()

    assert flaky().result(timeout=WAIT) == "ok"
    for i in range(10):
        fail(str(i)).exception(timeout=WAIT)
    with pytest.raises(tokengate.OperationBlockedError):
        fail("blocked")
    c.stop()
    by_channel: dict[str, list[logging.LogRecord]] = {}
    for r in caplog.records:
        by_channel.setdefault(r.name, []).append(r)
    assert set(by_channel) <= {
        "tokengate.gate",
        "tokengate.pool",
        "tokengate.worker",
        "tokengate.token",
        "tokengate.executor",
    }, set(by_channel)
    assert any("started" in r.getMessage() for r in by_channel.get("tokengate.pool", [])), (
        "no start message on tokengate.pool"
    )
    assert any("stopping" in r.getMessage() for r in by_channel.get("tokengate.pool", [])), (
        "no stop message on tokengate.pool"
    )
    assert any("retry" in r.getMessage() for r in by_channel.get("tokengate.worker", [])), (
        "no retry message on tokengate.worker"
    )
    gate = [r for r in by_channel.get("tokengate.gate", []) if "sl_fail" in r.getMessage()]
    assert gate and gate[0].levelno == logging.WARNING, "no auto-block warning on tokengate.gate"


def test_no_log_lines_per_token(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tokengate")
    env.coord()
    caplog.clear()
    for i in range(200):
        ok(i).result(timeout=WAIT)
    assert len(caplog.records) < 10, f"{len(caplog.records)} log records for 200 plain tokens"


@pytest.mark.subprocess
def test_library_writes_nothing_to_stdout_or_stderr_by_default() -> None:
    code = r"""
import time
import tokengate
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard(operation_type="quiet_fail", tags={"weight": "light", "retries": 1})
def fail():
    raise ValueError("x")

@task_token_guard(operation_type="quiet_ok", tags={"weight": "light"})
def ok(x):
    return x

with OperationsCoordinator(max_workers=2, auto_block_dangerous=True) as c:
    for i in range(30):
        try:
            fail().exception(timeout=10)
        except tokengate.OperationBlockedError:
            break
    else:
        raise SystemExit("never auto-blocked")
    ok.options(timeout=0.01)(1)
    tok = ok(2)
    tok.add_done_callback(lambda t: None)  # (a failing one is reported, as concurrent.futures does)
    tok.result(timeout=10)
    time.sleep(0.05)
"""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", f"stdout: {proc.stdout!r}"
    assert proc.stderr == "", f"stderr: {proc.stderr!r}"


def _library_sources() -> list[pathlib.Path]:
    skip = {"__main__.py", "proof.py"}  # command-line report writers, which print by design
    return [p for p in PKG.rglob("*.py") if p.name not in skip and "testing" not in p.parts]


def test_no_print_in_the_python_library() -> None:
    sources = _library_sources()
    assert len(sources) >= 5
    offenders = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


@pytest.mark.skipif(not (REPO / "src").is_dir(), reason="Rust sources not available")
def test_no_print_in_the_native_library() -> None:
    offenders = []
    for path in (REPO / "src").rglob("*.rs"):
        if path.name == "tests.rs":
            continue
        text = path.read_text()
        text = text.split("#[cfg(test)]")[0]  # unit tests may print
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("//")[0]
            if re.search(r"\b(e?println!|e?print!|dbg!)", code):
                offenders.append(f"{path.relative_to(REPO)}:{i}")
    assert offenders == []
