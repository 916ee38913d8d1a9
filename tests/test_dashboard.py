"""The dashboard server (``OperationsCoordinator.serve``): its routes answer with what the engine
holds, they are guarded by the token, read-only mode and origin checks, they answer while Python
threads spin, and ``stop()`` frees the port and leaves no thread behind."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import tokengate
from support import log_line, os_thread_names, wait_child
from tokengate import OperationsCoordinator, task_token_guard

ADMIN_ROUTES = ["/api/v1/ops/dash_op/pause", "/api/v1/ops/dash_op/kill", "/api/v1/admission/pause"]
READ_ROUTES = ["/", "/app.js", "/app.css", "/metrics", "/api/v1/snapshot", "/api/v1/ops", "/api/v1/tokens"]


@task_token_guard(operation_type="dash_op")
def dash_op(x: float) -> float:
    time.sleep(x)
    return x


def request(
    server: tokengate.DashboardServer,
    method: str,
    path: str,
    *,
    token: str | None = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request; ``token=""`` sends the server's token, None sends none."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        sent = dict(headers or {})
        bearer = server.token if token == "" else token
        if bearer is not None:
            sent["Authorization"] = f"Bearer {bearer}"
        conn.request(method, path, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(server: tokengate.DashboardServer, path: str) -> Any:
    status, _, body = request(server, "GET", path)
    assert status == 200, body
    return json.loads(body)


def assert_port_free(port: int) -> None:
    # As a server binds: with SO_REUSEADDR (connections the server closed may sit in TIME_WAIT).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.fixture
def coordinator() -> Any:
    with OperationsCoordinator(max_workers=2) as c:
        yield c


def test_serve_returns_a_handle_and_every_route_but_healthz_needs_the_token(coordinator: OperationsCoordinator) -> None:
    with coordinator.serve() as server:
        assert server.host == "127.0.0.1" and server.port > 0 and not server.admin
        assert server.token is not None and len(server.token) == 64
        assert server.url == f"http://127.0.0.1:{server.port}/?token={server.token}"
        assert request(server, "GET", "/healthz", token=None)[0] == 200
        for path in [*READ_ROUTES, "/api/v1/events"]:
            assert request(server, "GET", path, token=None)[0] == 401, path
            assert request(server, "GET", path, token="x" * 64)[0] == 401, path
        for path in ADMIN_ROUTES:
            assert request(server, "POST", path, token=None)[0] == 401, path
        for path in READ_ROUTES:
            assert request(server, "GET", path)[0] == 200, path


def test_the_one_time_token_sets_a_strict_http_only_cookie(coordinator: OperationsCoordinator) -> None:
    with coordinator.serve() as server:
        status, headers, _ = request(server, "GET", f"/?token={server.token}", token=None)
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        status, headers, page = request(server, "GET", "/", token=None, headers={"Cookie": cookie.split(";")[0]})
        assert status == 200
        assert "default-src 'none'" in headers["content-security-policy"]
        # Only relative URLs: nothing is loaded from another origin, and a URL prefix works.
        assert b"http" not in page and b'src="app.js"' in page and b'href="app.css"' in page


def test_snapshot_ops_and_metrics_count_what_ran(coordinator: OperationsCoordinator) -> None:
    tokengate.gather([dash_op(0.02) for _ in range(10)])
    with coordinator.serve() as server:
        snap = get_json(server, "/api/v1/snapshot")
        assert snap["admin"] is False and snap["version"] == tokengate.__version__
        assert snap["tokens"]["completed"] >= 10
        (op,) = [o for o in snap["operations"] if o["name"] == "dash_op"]
        assert op["completed"] == 10 and op["failed"] == 0 and op["health"] == "excellent"
        assert op["execution"]["count"] == 10
        # Exact within 10 % from below (a sleep never ends early); above, a loaded machine adds time.
        assert 0.2 * 0.9 <= op["execution"]["sum_s"] <= 0.2 * 3, op
        assert op["execution"]["p95_s"] >= 0.02
        assert {lane["lane"] for lane in snap["lanes"]} == {"cpu", "io", "process"}
        assert [o["name"] for o in get_json(server, "/api/v1/ops")] == [o["name"] for o in snap["operations"]]
        status, headers, body = request(server, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        assert 'tokengate_tokens_completed_total{pool="' in text and 'operation="dash_op",outcome="ok"} 10' in text
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name for f in text_string_to_metric_families(text)}
        assert "tokengate_tokens_submitted" in families
        promtool = shutil.which("promtool")
        if promtool is not None:
            check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
            assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check


def test_tokens_lists_unresolved_tokens_by_state_and_operation(coordinator: OperationsCoordinator) -> None:
    gate = threading.Event()

    @task_token_guard(operation_type="dash_gate")
    def held() -> None:
        gate.wait(10)

    tokens = [held() for _ in range(4)]
    try:
        with coordinator.serve() as server:
            deadline = time.monotonic() + 5
            while True:
                rows = get_json(server, "/api/v1/tokens?op=dash_gate")
                if sum(r["state"] == "executing" for r in rows) == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            assert len(rows) == 4 and {r["operation"] for r in rows} == {"dash_gate"}
            assert [r["token_id"] for r in rows] == sorted((t.token_id for t in tokens), reverse=True)
            running = get_json(server, "/api/v1/tokens?state=executing")
            assert len(running) == 2 and all(r["worker_id"] is not None for r in running)
            assert len(get_json(server, "/api/v1/tokens?op=dash_gate&limit=1")) == 1
            status, _, body = request(server, "GET", "/api/v1/tokens?state=sleepy")
            assert status == 400 and b"state must be one of" in body
    finally:
        gate.set()
        tokengate.gather(tokens)


def test_read_only_refuses_admin_actions_and_nothing_changes(coordinator: OperationsCoordinator) -> None:
    dash_op(0).result()
    with coordinator.serve() as server:
        for path in ADMIN_ROUTES:
            status, _, body = request(server, "POST", path)
            assert status == 403 and b"read-only" in body, path
        assert request(server, "GET", "/api/v1/ops/dash_op/pause")[0] == 405
    stats = coordinator.get_stats()
    assert stats["operations"]["dash_op"]["paused"] is False
    assert stats["admission"]["paused"] is False


def test_admin_pause_resume_drain_and_kill_reach_the_engine(coordinator: OperationsCoordinator) -> None:
    dash_op(0).result()
    with coordinator.serve(admin=True) as server:
        assert request(server, "POST", "/api/v1/ops/dash_op/pause", headers={"Origin": "http://evil.example"})[0] == 403
        assert request(server, "GET", "/api/v1/ops/dash_op/pause")[0] == 405
        assert coordinator.get_stats()["operations"]["dash_op"]["paused"] is False, "a refused request changed nothing"
        status, _, body = request(server, "POST", "/api/v1/ops/dash_op/pause")
        assert status == 200 and json.loads(body)["paused"] is True
        held = [dash_op(0) for _ in range(3)]
        time.sleep(0.1)
        assert not any(t.done() for t in held)
        (op,) = [o for o in get_json(server, "/api/v1/ops") if o["name"] == "dash_op"]
        assert op["paused"] is True
        own = f"http://127.0.0.1:{server.port}"
        status, _, body = request(server, "POST", "/api/v1/ops/dash_op/resume", headers={"Origin": own})
        assert status == 200 and json.loads(body)["released"] == 3
        tokengate.gather(held)
        gate = threading.Event()

        @task_token_guard(operation_type="dash_kill")
        def stuck() -> None:
            gate.wait(10)

        victims = [stuck() for _ in range(3)]
        try:
            status, _, body = request(server, "POST", "/api/v1/ops/dash_kill/kill")
            assert status == 200 and json.loads(body)["killed"] == 3
            for t in victims:
                with pytest.raises(tokengate.TaskKilledError):
                    t.result(timeout=5)
            text = request(server, "GET", "/metrics")[2].decode()
            assert 'operation="dash_kill",outcome="killed"} 3' in text
        finally:
            gate.set()
        assert request(server, "POST", "/api/v1/ops/no_such_op/drain")[0] == 404
        status, _, body = request(server, "POST", "/api/v1/admission/pause")
        assert status == 200 and coordinator.get_stats()["admission"]["paused"] is True
        assert request(server, "POST", "/api/v1/admission/resume")[0] == 200
        assert coordinator.get_stats()["admission"]["paused"] is False


def test_a_url_prefix_holds_every_route(coordinator: OperationsCoordinator) -> None:
    with coordinator.serve(url_prefix="/tools/tokengate/") as server:
        assert server.url.endswith(f":{server.port}/tools/tokengate/?token={server.token}")
        assert request(server, "GET", "/api/v1/snapshot")[0] == 404
        assert request(server, "GET", "/tools/tokengate/api/v1/snapshot")[0] == 200
        assert request(server, "GET", "/tools/tokengate/healthz", token=None)[0] == 200
        status, headers, _ = request(server, "GET", "/tools/tokengate")
        assert status == 308 and headers["location"] == "/tools/tokengate/"


def test_bad_settings_are_refused_with_a_reason(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(ValueError, match="not a loopback address, without a token"):
        coordinator.serve(host="0.0.0.0", auth=False)
    with pytest.raises(ValueError, match="auth=False"):
        coordinator.serve(token="a" * 32, auth=False)
    with pytest.raises(ValueError, match="url_prefix"):
        coordinator.serve(url_prefix="/../etc")
    with pytest.raises(ValueError, match="at least 16"):
        coordinator.serve(token="short")
    with pytest.raises(ValueError, match="port"):
        coordinator.serve(port=70000)
    with coordinator.serve() as first, pytest.raises(ValueError, match="cannot serve"):
        coordinator.serve(port=first.port)
    with pytest.raises(tokengate.NotStartedError):
        OperationsCoordinator().serve()


def test_no_token_on_loopback_when_asked(coordinator: OperationsCoordinator) -> None:
    with coordinator.serve(auth=False) as server:
        assert server.token is None and "token=" not in server.url
        assert request(server, "GET", "/api/v1/snapshot", token=None)[0] == 200


def dashboard_threads() -> list[str]:
    return [n for n in os_thread_names() if n.startswith("tokengate-dash")]


def open_events(server: tokengate.DashboardServer) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {server.token}"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def test_stop_frees_the_port_and_leaves_no_thread(coordinator: OperationsCoordinator) -> None:
    server = coordinator.serve()
    for path in READ_ROUTES:
        request(server, "GET", path)
    conn, events = open_events(server)  # a stream still open when it stops
    events.fp.readline()
    idle = socket.create_connection((server.host, server.port))  # a client that says nothing
    assert dashboard_threads()
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 1.0
    assert not server.running
    assert dashboard_threads() == [], "a thread of the server outlived stop()"
    assert_port_free(server.port)
    server.stop()  # idempotent
    idle.close()
    conn.close()


def test_coordinator_stop_stops_its_servers() -> None:
    c = OperationsCoordinator(max_workers=1).start()
    server = c.serve()
    port = server.port
    c.stop()
    assert not server.running
    assert_port_free(port)


def test_events_stream_a_snapshot_a_second(coordinator: OperationsCoordinator) -> None:
    with coordinator.serve() as server:
        conn, response = open_events(server)
        assert response.getheader("Content-Type") == "text/event-stream"
        events = []
        t0 = time.monotonic()
        while len(events) < 4:
            line = response.fp.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
        elapsed = time.monotonic() - t0
        # The first comes at once, then one a second: 3 s for 4, give or take a loaded machine.
        assert 2.5 < elapsed < 6, elapsed
        assert all("operations" in e and e["admin"] is False for e in events)
        conn.close()


def test_a_stream_ends_when_the_coordinator_stops() -> None:
    c = OperationsCoordinator(max_workers=1).start()
    server = c._running_engine().serve()  # not stopped with the coordinator, to see the stream end
    try:
        conn, response = open_events(server)
        c.stop()
        lines = response.read().split(b"\n")  # returns once the server closes the stream
        assert b"event: gone" in lines
        conn.close()
    finally:
        server.stop()


def test_a_kill_whose_callback_needs_the_coordinator_lock_does_not_hang_its_stop() -> None:
    # The kill runs on a server thread; the token's callback waits for the coordinator's lock
    # while stop() stops the server. stop() must not hold that lock while it waits for the server.
    c = OperationsCoordinator(max_workers=2).start()
    server = c.serve(admin=True)
    gate, entered, stopping = threading.Event(), threading.Event(), threading.Event()

    @task_token_guard(operation_type="dash_cb")
    def stuck() -> None:
        gate.wait(10)

    def needs_the_lock(_: object) -> None:
        entered.set()
        stopping.wait(10)
        time.sleep(0.2)  # stop() is waiting for the server by now
        with c._lock:
            pass

    token = stuck()
    token.add_done_callback(needs_the_lock)

    def kill() -> None:
        try:
            request(server, "POST", "/api/v1/ops/dash_cb/kill")
        except (ConnectionError, http.client.HTTPException):
            pass  # the server stopped before it answered

    killer = threading.Thread(target=kill)
    killer.start()
    assert entered.wait(10)
    gate.set()  # the killed body may end: stop() then waits for nothing but the server
    stopper = threading.Thread(target=c.stop)
    stopping.set()
    stopper.start()
    stopper.join(10)
    deadlocked = stopper.is_alive()
    killer.join(10)
    stopper.join(10)
    assert not deadlocked, "coordinator.stop() hung while a dashboard action waited for its lock"
    assert token.state == "killed"


def test_a_callback_that_stops_the_coordinator_from_the_server_thread() -> None:
    c = OperationsCoordinator(max_workers=2).start()
    server = c.serve(admin=True)
    gate, stopped = threading.Event(), threading.Event()

    @task_token_guard(operation_type="dash_self")
    def stuck() -> None:
        gate.wait(10)

    token = stuck()

    def stop_it(_: object) -> None:
        c.stop(wait=False)  # on the server's own thread: it cannot wait for itself
        stopped.set()

    token.add_done_callback(stop_it)
    try:
        request(server, "POST", "/api/v1/ops/dash_self/kill")
    except (ConnectionError, http.client.HTTPException):
        pass  # the server closed the connection as it stopped
    assert stopped.wait(10)
    gate.set()
    assert not server.running and not c.is_running
    c.stop()
    assert_port_free(server.port)


def test_dropping_an_untracked_handle_stops_its_server(coordinator: OperationsCoordinator) -> None:
    server = coordinator._running_engine().serve()  # the coordinator keeps no reference to it
    port = server.port
    assert request(server, "GET", "/healthz", token=None)[0] == 200
    del server
    import gc

    gc.collect()
    assert dashboard_threads() == []
    assert_port_free(port)


def _fork_and_stop(server: Any, limit: float) -> int | None:
    """Forks a child that stops its copy of ``server`` and exits: its exit code, or None when
    it did not exit within ``limit`` seconds (it is then killed). A child stuck past 20 s
    prints its Python stack to stderr (faulthandler) and exits 1."""
    pid = os.fork()
    if pid == 0:  # the child: stopping its copy touches nothing of the parent's
        code = 1
        try:
            import faulthandler

            faulthandler.dump_traceback_later(20, exit=True)
            server.stop()
            code = 0 if not server.running else 2
        finally:
            os._exit(code)
    try:
        return wait_child(pid, limit)
    except BaseException:  # interrupted (the suite's per-test timeout): the child must not outlive it
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        raise


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_neither_breaks_nor_holds_the_parents_server(
    coordinator: OperationsCoordinator, pytestconfig: pytest.Config, capfd: pytest.CaptureFixture[str]
) -> None:
    server = coordinator.serve()
    code = _fork_and_stop(server, 30)
    if code != 0:
        # Seen once in CI on free-threaded 3.13 (the child never exited; not reproduced in 30
        # runs alone nor in 20,000 forks of a stress script; test_subprocess's fork test shows
        # the like of it, a child inheriting CPython's stop-the-world mutex locked): one more
        # child must succeed.
        # What wait_child wrote of the child goes to the CI log, kept even when the retry passes.
        described = capfd.readouterr().err
        log_line(
            pytestconfig,
            f"test_dashboard: a forked child stopping its server ended with {code!r}; trying once more\n{described}",
        )
        code = _fork_and_stop(server, 30)
    assert code == 0
    assert request(server, "GET", "/healthz", token=None)[0] == 200, "the parent's server still answers"
    server.stop()
    assert_port_free(server.port)


def spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        x += 1


CLIENT = """
import http.client, json, sys, time
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
times = {}
for path in ("/metrics", "/api/v1/snapshot"):
    seen = times[path] = []
    for _ in range(40):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path, headers={"Authorization": "Bearer " + token})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        conn.close()
        seen.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def test_answers_while_python_threads_spin(coordinator: OperationsCoordinator) -> None:
    # The client is another process: a client in this one would wait for the GIL itself.
    # Without a GIL, spinning threads run at once and 4 of them take every core of a small
    # machine: the server would wait for the OS scheduler, as any process would. There, one
    # core is left free.
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    n = 4 if gil else max(1, (os.cpu_count() or 2) - 1)
    stop = threading.Event()
    spinners = [threading.Thread(target=spin, args=(stop,)) for _ in range(n)]
    with coordinator.serve() as server:
        for t in spinners:
            t.start()
        try:
            out = subprocess.run(
                [sys.executable, "-c", CLIENT, server.host, str(server.port), str(server.token)],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
        finally:
            stop.set()
            for t in spinners:
                t.join()
    for path, seen in json.loads(out).items():
        p95 = sorted(seen)[int(len(seen) * 0.95) - 1]
        # The bound is 20 ms; this leaves room for a loaded CI machine.
        assert p95 < 0.1, (path, p95)


@pytest.mark.slow
def test_events_keep_the_pace_under_load(coordinator: OperationsCoordinator) -> None:
    stop = threading.Event()
    spinners = [threading.Thread(target=spin, args=(stop,)) for _ in range(4)]
    for t in spinners:
        t.start()
    try:
        with coordinator.serve() as server:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
            conn.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {server.token}"})
            response = conn.getresponse()
            count = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                if response.fp.readline().startswith(b"data: "):
                    count += 1
            conn.close()
            assert count >= 9
    finally:
        stop.set()
        for t in spinners:
            t.join()
