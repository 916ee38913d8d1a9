"""Helpers shared by the test modules: polling, process counters, coordinator set-up.

Plain functions and classes only; the fixtures built on them live in conftest.py or in
the test module that uses them. Test modules import them with ``from support import ...``
(the tests folder is on ``sys.path``, as for conftest.py).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokengate import OperationsCoordinator, TaskToken

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self


def wait_until(pred: Callable[[], Any], limit: float = 10.0, interval: float = 0.005) -> bool:
    """Polls ``pred`` every ``interval`` seconds until it is true or ``limit`` seconds passed;
    returns its last value as a bool."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


# -- child interpreters ----------------------------------------------------------------------

CHILD_TIMEOUT = 30  # per child interpreter: generous, the machine is small and shared


def run_script(script: str, cwd: Path | str, timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` (dedented) in a child interpreter; raises ``subprocess.TimeoutExpired`` if it hangs."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """A child's exit code and output, for assertion messages."""
    return f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


# -- process counters -------------------------------------------------------------------------


#: Threads of a process connected to Ray that Ray starts when it needs them (their kernel
#: names, cut at 15 characters): gRPC's pool and timer, and the core worker's I/O thread
#: (started lazily, by a first ray.put for one).
_RAY_THREADS = ("event_engine", "grpc_global_tim", "default-executo", "worker.io")


def os_thread_count() -> int:
    """Threads of this process according to the kernel (Python and Rust threads alike), but
    not Ray's own (in a process connected to Ray): they come and go on their own."""
    if "ray" not in sys.modules:
        return len(os.listdir("/proc/self/task"))
    return sum(name not in _RAY_THREADS for name in os_thread_names())


def os_thread_names() -> list[str]:
    """The kernel's names of this process's threads, sorted."""
    out = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                out.append(f.read().strip())
        except OSError:  # ended meanwhile
            pass
    return sorted(out)


def wait_for_threads(baseline: int, limit: float = 2.0) -> int:
    """Waits (collecting garbage) up to ``limit`` seconds for the OS thread count to fall to
    ``baseline``; returns the last count."""
    deadline = time.monotonic() + limit
    n = os_thread_count()
    while n > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
        n = os_thread_count()
    return n


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


def pid_alive(pid: int) -> bool:
    """True while /proc/<pid> exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_child(pid: int, limit: float) -> int | None:
    """The exit code of this process's forked child ``pid``, or None when it had not exited
    after ``limit`` seconds: it is then described on stderr (each thread's state, kernel wait
    channel and system call from /proc, and its native stacks when gdb is installed, which
    adds at most 12 s), killed and reaped. ``test_subprocess.py`` copies its source into its child scripts
    (``WAIT_CHILD``): it must need nothing but os, signal and time."""
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            lines = [f"forked child {pid} still running after {limit} s:"]
            try:
                for tid in sorted(os.listdir(f"/proc/{pid}/task")):
                    facts = []
                    for name in ("stat", "wchan", "syscall"):
                        try:
                            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                                text = f.read().strip()
                            if name == "stat":  # the state: the field after "(command)"
                                text = text.rsplit(")", 1)[-1].split()[0]
                        except (OSError, IndexError) as exc:
                            text = f"({exc})"
                        facts.append(text)
                    lines.append(f"  thread {tid}: state {facts[0]}, wchan {facts[1]}, syscall {facts[2]}")
            except OSError:
                pass
            os.write(2, ("\n".join(lines) + "\n").encode())
            if os.path.exists("/usr/bin/gdb"):  # at most 12 s; its error lines too (ptrace refused, say)
                os.system(
                    f"timeout -k 2 10 gdb -p {pid} -batch -ex 'thread apply all bt 30' </dev/null 2>&1"
                    " | grep '^#\\|^Thread\\|ptrace\\|denied' 1>&2"
                )
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def log_line(config: Any, text: str) -> None:
    """Writes ``text`` to pytest's terminal output, where CI logs keep it even when the test
    passes (captured output shows only for failures)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - run without them
        print(text, file=sys.__stderr__)
        return
    with capture.global_and_fixture_disabled():  # the test's output is captured meanwhile
        reporter.write_line(text)


def child_pids() -> set[int]:
    """Direct child processes of this process, from /proc (every thread's children)."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return {p for p in out if pid_alive(p)}


# -- coordinators and blocked workers -----------------------------------------------------------


@contextmanager
def running_coordinator(**kw: Any) -> Iterator[OperationsCoordinator]:
    """A started ``OperationsCoordinator(**kw)``, stopped (pending tokens cancelled) on exit."""
    c = OperationsCoordinator(**kw).start()
    try:
        yield c
    finally:
        c.stop(cancel_pending=True, timeout=10)


def start_blocker(
    task: Callable[[threading.Event], TaskToken[str]],
    ev: threading.Event,
    *,
    limit: float = 10.0,
    interval: float = 0.005,
) -> TaskToken[str]:
    """Submits ``task(ev)`` (a task that holds its worker until ``ev`` is set); returns its
    token once it runs."""
    tok = task(ev)
    assert wait_until(tok.running, limit, interval), f"blocker never started: {tok.state}"
    return tok


class Env:
    """Coordinators, gates and helper threads of one test; ``close()`` (or leaving the
    ``with`` block) opens every gate, joins the threads, then stops every coordinator.

    ``max_workers`` is the default for :meth:`coord`; ``blocker`` is the task
    :meth:`hold_worker` submits (``blocker(ev)`` must wait on ``ev``).
    """

    def __init__(
        self,
        max_workers: int = 2,
        blocker: Callable[[threading.Event], TaskToken[str]] | None = None,
    ) -> None:
        self.max_workers = max_workers
        self.blocker = blocker
        self.coords: list[OperationsCoordinator] = []
        self.gates: list[threading.Event] = []
        self.threads: list[threading.Thread] = []

    def coord(self, **kw: Any) -> OperationsCoordinator:
        kw.setdefault("max_workers", self.max_workers)
        c = OperationsCoordinator(**kw).start()
        self.coords.append(c)
        return c

    def gate(self) -> threading.Event:
        ev = threading.Event()
        self.gates.append(ev)
        return ev

    def thread(self, target: Callable[[], None]) -> threading.Thread:
        th = threading.Thread(target=target, daemon=True)
        self.threads.append(th)
        th.start()
        return th

    def hold_worker(self) -> tuple[threading.Event, TaskToken[str]]:
        """Holds a worker with ``blocker`` on a new gate; returns the gate and the blocker's token."""
        assert self.blocker is not None, "Env(blocker=...) is needed for hold_worker()"
        ev = self.gate()
        return ev, start_blocker(self.blocker, ev, interval=0.002)

    def close(self) -> None:
        for g in self.gates:
            g.set()
        for th in self.threads:
            th.join(10.0)
        for c in self.coords:
            c.stop(cancel_pending=True, timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: a shell that runs the suite
    in the background (``cmd &``) ignores SIGINT, its children inherit that, and CPython then
    installs no KeyboardInterrupt handler. The default disposition gives the child its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def started_dask_client(processes: int) -> tuple[Any, Any]:
    """A client of a fresh ``LocalCluster`` of ``processes`` worker processes (as
    ``cluster="dask-local:N"`` starts one), with Dask's own thread pools started: they
    start on first use and stay, so tests count threads after this."""
    import threading

    import distributed

    from tokengate._cluster.connect import local_cluster

    cluster = local_cluster(processes)
    client = distributed.Client(cluster, set_as_default=False)
    done = threading.Event()
    f = client.submit(pow, 2, 3, pure=False)
    f.add_done_callback(lambda _f: done.set())
    assert client.gather([f]) == [8] and done.wait(10)
    client.run(lambda: None)
    return client, cluster


class RayNodes:
    """A local Ray cluster of separate nodes, as ``ray start`` makes one: a head
    (``start``) and more nodes (``add_node``), each with its own ports, on loopback,
    with this process's authentication settings (``RAY_AUTH_*``, see conftest), and with this directory on the workers' ``PYTHONPATH``
    (they import ``cluster_functions`` by name). ``kill_node`` kills one node's raylet
    and its workers, as a lost machine would; ``close`` kills every process of it."""

    def __init__(self) -> None:
        import shutil
        import tempfile

        self.ray = shutil.which("ray", path=os.path.dirname(sys.executable))
        assert self.ray is not None, "the ray command is missing beside this interpreter"
        self.temp_dir = tempfile.mkdtemp(prefix="tgray", dir="/tmp")  # short: Ray puts sockets there
        here = os.path.dirname(os.path.abspath(__file__))
        self.env = dict(
            os.environ,
            RAY_USAGE_STATS_ENABLED="0",
            # A killed node is found dead in about a second, not Ray's default of about 15 s.
            RAY_health_check_initial_delay_ms="0",
            RAY_health_check_period_ms="250",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
        )
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_port = free_port()
        self.nodes: list[int] = []  # raylet pids, head first

    def _raylets(self) -> set[int]:
        import psutil

        out = set()
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            cmd = p.info["cmdline"] or []
            if p.info["name"] == "raylet" and any(self.temp_dir in a for a in cmd):
                out.add(p.info["pid"])
        return out

    def _ray_start(self, *args: str) -> int:
        before = self._raylets()
        subprocess.run(
            [self.ray, "start", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        (raylet,) = self._raylets() - before
        self.nodes.append(raylet)
        return raylet

    def start(self) -> RayNodes:
        self._ray_start(
            "--head",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={self.client_port}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        )
        return self

    def add_node(self) -> int:
        return self._ray_start(f"--address={self.address}", f"--dashboard-agent-listen-port={free_port()}")

    def kill_node(self, raylet: int) -> None:
        import psutil

        proc = psutil.Process(raylet)
        procs = [proc, *proc.children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.nodes.remove(raylet)

    def close(self) -> None:
        import shutil

        import psutil

        procs = []
        for p in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in a for a in p.info["cmdline"] or []):
                procs.append(p)
                try:
                    procs.extend(p.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
