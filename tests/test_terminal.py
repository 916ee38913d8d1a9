"""``tokengate top`` and a progress bar in a real terminal: each runs in a tmux pane (120 x 40)
and the test reads the screen back (``capture-pane``) and the pane's state (``display-message``:
the alternate screen, the cursor). top leaves the terminal as it found it after q, Ctrl-C,
SIGTERM and SIGHUP. Skipped when tmux is missing, unless
TOKENGATE_REQUIRE_TMUX=1 (CI sets it: scripts/test.sh)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tokengate
from support import wait_until
from tokengate import OperationsCoordinator, task_token_guard

pytestmark = pytest.mark.subprocess

TMUX = shutil.which("tmux")
if TMUX is None and os.environ.get("TOKENGATE_REQUIRE_TMUX") == "1":
    raise RuntimeError("TOKENGATE_REQUIRE_TMUX=1 but tmux is not on PATH (scripts/install-tmux.sh installs it)")
if TMUX is None:
    pytest.skip("tmux is not installed (TOKENGATE_REQUIRE_TMUX=1 makes this an error)", allow_module_level=True)


# Runs the command given, then prints its exit status and the terminal's mode (line: canonical
# input, as before the command; cbreak: a command left it in its own mode), and waits to be killed.
# The shell outlives a Ctrl-C sent to the command: a trap, not an ignored SIGINT, which the
# command would inherit. Any POSIX shell runs it the same (dash, bash).
WRAPPER = """
trap : INT
"$@"
status=$?
case "$(stty -a 2>/dev/null)" in
  *-icanon*) mode=cbreak ;;
  *) mode=line ;;
esac
echo "[exit $status] [tty $mode]"
exec sleep 120
"""


class Pane:
    """One tmux server of its own (its own socket, a unique name), one window of 120 x 40
    running ``command`` through :data:`WRAPPER`, which prints ``[exit N] [tty MODE]`` when the
    command ends: the test reads the exit status from the screen (tmux's own pane_dead_status
    can stay unset here). tmux runs the pane's command with ``default-shell -c``, set to /bin/sh
    whatever $SHELL is. :meth:`start` runs it; :meth:`close` kills the server."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"tg-test-{uuid.uuid4().hex[:12]}"
        self._dir = tmp_path

    def start(self, command: list[str]) -> None:
        conf = self._dir / f"{self.socket}.conf"
        # default-size: the window is 120 x 40 from its first line on (else it starts at 80 x 24 and
        # is resized, and the first lines scroll away).
        conf.write_text("set -g default-size 120x40\nset -g default-shell /bin/sh\n")
        wrapper = self._dir / f"{self.socket}.sh"
        wrapper.write_text(WRAPPER)
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        env["TERM"] = "xterm-256color"
        env["SHELL"] = "/bin/sh"
        shell = shlex.join(["/bin/sh", str(wrapper), *command])
        self._tmux("-f", str(conf), "new-session", "-d", "-s", "t", "-x", "120", "-y", "40", shell, env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        assert TMUX is not None
        result = subprocess.run(
            [TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=20, env=env, check=True
        )
        return result.stdout

    def screen(self) -> str:
        # From the start of the history: what scrolled off the top is kept.
        return self._tmux("capture-pane", "-p", "-S", "-", "-t", "t")

    def display(self, fmt: str) -> str:
        """A tmux format of the pane: ``#{alternate_on}`` is 1 while it shows the alternate screen."""
        return self._tmux("display-message", "-p", "-t", "t", fmt).strip()

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def ended(self, limit: float = 20.0) -> tuple[int, str]:
        """Waits for the command to end; its exit status and the terminal's mode then."""
        screen = self.wait_for("[exit ", limit)
        found = re.search(r"\[exit (\d+)\] \[tty (\w+)\]", screen)
        assert found is not None, screen
        return int(found[1]), found[2]

    def exit_status(self, limit: float = 20.0) -> int:
        """Waits for the command to end; its exit status."""
        return self.ended(limit)[0]

    def wait_for(self, text: str, limit: float = 20.0) -> str:
        seen = ""

        def shown() -> bool:
            nonlocal seen
            seen = self.screen()
            return text in seen

        assert wait_until(shown, limit=limit, interval=0.1), f"{text!r} not on the screen:\n{seen}"
        return seen

    def close(self) -> None:
        """Kills the server (and the pane's processes), and removes its socket file, which tmux
        leaves behind."""
        try:
            socket_path = self.display("#{socket_path}")
        except subprocess.CalledProcessError:  # no server: it never started, or it ended
            socket_path = ""
        subprocess.run([str(TMUX), "-L", self.socket, "kill-server"], capture_output=True, timeout=20)
        if socket_path.endswith(self.socket):
            Path(socket_path).unlink(missing_ok=True)


@pytest.fixture
def open_pane(tmp_path: Path) -> Iterator[Callable[[list[str]], Pane]]:
    """Opens panes running a command; every one's tmux server is killed at the end, even when
    its start failed half-way."""
    made: list[Pane] = []

    def open_(command: list[str]) -> Pane:
        pane = Pane(tmp_path)
        made.append(pane)
        pane.start(command)
        return pane

    try:
        yield open_
    finally:
        for pane in made:
            pane.close()


@task_token_guard(operation_type="tty_op")
def tty_op(gate: threading.Event) -> None:
    gate.wait(30)


@task_token_guard(operation_type="tty_quick")
def tty_quick(x: int) -> int:
    return x


PROGRESS_SCRIPT = """
import sys, time
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard(operation_type="tty_map")
def step(x):
    time.sleep(0.008)
    return x

with OperationsCoordinator(max_workers=4):  # about 1.2 s
    out = list(step.map(range(600), progress=sys.argv[1]))
assert out == list(range(600))
print("MAP DONE")
"""


@pytest.mark.parametrize("option", ["auto", "plain", "rich"])
def test_a_progress_bar_in_a_terminal_ends_at_its_total(
    tmp_path: Path, open_pane: Callable[[list[str]], Pane], option: str
) -> None:
    if option == "rich":
        pytest.importorskip("rich")
    script = tmp_path / "bar.py"
    script.write_text(PROGRESS_SCRIPT)
    pane = open_pane([sys.executable, str(script), option])
    # While it runs, the bar shows a count short of the total.
    running = pane.wait_for("tty_map")
    assert re.search(r"\b([0-9]|[1-9][0-9]|[1-5][0-9][0-9])/600\b", running), running
    assert pane.exit_status() == 0, pane.screen()
    screen = pane.screen()
    lines = [line for line in screen.splitlines() if line.strip()]
    # One bar, redrawn in place: a single line with the count, right above the last print.
    bar = [line for line in lines if "/600" in line]
    assert len(bar) == 1 and lines.index(bar[0]) == lines.index("MAP DONE") - 1, screen
    assert "600/600" in bar[0] and "100%" in bar[0], screen
    if option == "plain" or (option == "auto" and not _importable("tqdm")):
        assert bar[0].startswith("tty_map: 600/600 (100%)"), screen
    elif option == "auto":
        assert bar[0].startswith("tty_map: 100%|") and "600/600" in bar[0], screen


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture
def served() -> Iterator[tuple[tokengate.DashboardServer, list[tokengate.TaskToken[None]]]]:
    gate = threading.Event()
    with OperationsCoordinator(max_workers=2) as c:
        tokengate.gather([tty_quick(i) for i in range(10)])
        tokens = [tty_op(gate) for _ in range(5)]
        assert wait_until(lambda: sum(t.running() for t in tokens) == 2)
        server = c.serve(admin=True)
        try:
            yield server, tokens
        finally:
            gate.set()
            for t in tokens:
                t.cancel()
            tokengate.gather(tokens, return_exceptions=True, timeout=30)


def top_command(server: tokengate.DashboardServer) -> list[str]:
    return [sys.executable, "-m", "tokengate", "top", "--url", server.url, "--interval", "0.3"]


def test_top_draws_the_operations_and_q_quits(
    open_pane: Callable[[list[str]], Pane], served: tuple[tokengate.DashboardServer, list[tokengate.TaskToken[None]]]
) -> None:
    server, tokens = served
    pane = open_pane(top_command(server))
    screen = pane.wait_for("tty_op")
    lines = screen.splitlines()
    assert lines[0].startswith("tokengate top  http://127.0.0.1:") and "q or Ctrl-C quits" in lines[0]
    header = next(line for line in lines if line.startswith("OPERATION"))
    assert header.split() == [
        "OPERATION",
        "TOKENS/S",
        "QUEUED",
        "RUNNING",
        "BLOCKED",
        "PAUSED",
        "WAIT",
        "P95",
        "HEALTH",
    ]
    (row,) = [line.split() for line in lines if line.startswith("tty_op ")]
    assert row[2:6] == ["3", "2", "no", "no"], screen
    # Redrawn in place: a queued token cancelled shows on a later refresh, under the same one header.
    assert tokens[-1].cancel()
    assert wait_until(lambda: _row(pane.screen(), "tty_op")[2:4] == ["2", "2"], limit=10, interval=0.1), pane.screen()
    assert sum(line.startswith("OPERATION") for line in pane.screen().splitlines()) == 1
    assert pane.display("#{alternate_on}") == "1"
    pane.keys("q")
    assert pane.ended(limit=10) == (0, "line"), pane.screen()
    # The alternate screen is left: the view is gone from the pane.
    assert "OPERATION" not in pane.screen()
    assert pane.display("#{alternate_on}") == "0"


def _row(screen: str, name: str) -> list[str]:
    rows = [line.split() for line in screen.splitlines() if line.startswith(name + " ")]
    return rows[0] if rows else []


def test_top_quits_cleanly_on_ctrl_c(
    open_pane: Callable[[list[str]], Pane], served: tuple[tokengate.DashboardServer, list[tokengate.TaskToken[None]]]
) -> None:
    server, _ = served
    pane = open_pane(top_command(server))
    pane.wait_for("tty_op")
    time.sleep(0.5)
    pane.keys("C-c")
    assert pane.ended(limit=10) == (0, "line"), pane.screen()
    assert "Traceback" not in pane.screen()
    assert pane.display("#{alternate_on}") == "0"


# `python -c` running top after writing its pid to argv[1], so that the test can signal it.
TOP_WITH_PID = (
    "import os, sys\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(str(os.getpid()))\n"
    "from tokengate.__main__ import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_top_restores_the_terminal_on_sigterm_and_sighup(
    tmp_path: Path,
    open_pane: Callable[[list[str]], Pane],
    served: tuple[tokengate.DashboardServer, list[tokengate.TaskToken[None]]],
    name: str,
) -> None:
    server, _ = served
    pid_file = tmp_path / "top.pid"
    pane = open_pane([sys.executable, "-c", TOP_WITH_PID, str(pid_file), *top_command(server)[3:]])
    pane.wait_for("tty_op")
    assert pane.display("#{alternate_on}") == "1"
    signum = getattr(signal, name)
    os.kill(int(pid_file.read_text()), signum)
    # The main screen, the cursor and the terminal's line mode back; the exit status says which signal.
    assert pane.ended(limit=10) == (128 + signum, "line"), pane.screen()
    assert pane.display("#{alternate_on}") == "0"
    assert pane.display("#{cursor_flag}") == "1"
    screen = pane.screen()
    assert "OPERATION" not in screen and "Traceback" not in screen, screen
