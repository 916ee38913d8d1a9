"""``progress=`` of ``fn.map``, ``gather``, ``as_completed`` and ``Executor.map``: the display ends
at its total, counts items (not chunks), advances while the work runs, falls back to a plain line
without tqdm or rich, stays off when stderr is not a terminal unless forced, and then writes plain
lines with no control character; and it costs little beside the same map without it."""

from __future__ import annotations

import asyncio
import io
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest

import tokengate
from support import CHILD_TIMEOUT, wait_until
from tokengate import Executor, OperationsCoordinator, as_completed, gather, task_token_guard
from tokengate import _progress as progress_mod

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # every control character but \t and \n
PLAIN_LINE = re.compile(r"^[\w.]+: \d+(/\d+ \(\d+%\))? [\d,.\-]+/s \d+\.\ds$")


class Stream(io.StringIO):
    """A stderr that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@task_token_guard(operation_type="progress_sleep")
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task_token_guard(operation_type="progress_square")
def square(x: int) -> int:
    return x * x


def sleep_ms(x: int) -> int:
    time.sleep(0.001)
    return x


@pytest.fixture
def workers() -> Iterator[OperationsCoordinator]:
    with OperationsCoordinator(max_workers=4) as c:
        yield c


# The tests swap stderr in their own body (``with redirect_stderr(...)``): pytest's capture sets
# sys.stderr again between a fixture's set-up and the test.


def counts_shown(text: str, total: int) -> list[int]:
    """The counts drawn as ``N/total``, in order."""
    return [int(n) for n in re.findall(rf"(\d+)/{total}\b", text)]


# -- choosing the display ------------------------------------------------------------------


def test_the_option_is_checked_at_the_call(workers: OperationsCoordinator) -> None:
    with pytest.raises(ValueError, match="progress must be"):
        square.map([1], progress="bar")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be"):
        gather([square(1)], progress=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="progress must be"):
        as_completed([square(1)], progress="yes")  # type: ignore[arg-type]
    with Executor(max_workers=1) as ex, pytest.raises(ValueError, match="progress must be"):
        ex.map(abs, [1], progress="tqdm!")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "tty", "expected"),
    [
        (None, True, None),
        (False, True, None),
        (True, False, None),
        ("plain", False, None),
        ("rich", False, None),
        ("plain", True, "plain"),
        ("rich", True, "rich"),
        ("force", False, "log"),
    ],
)
def test_the_display_chosen(option: Any, tty: bool, expected: str | None) -> None:
    assert progress_mod.choose(option, Stream(tty)) == expected


def test_auto_is_tqdm_when_importable_else_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    assert progress_mod.choose(True, Stream(tty=True)) == "tqdm"
    assert progress_mod.choose("force", Stream(tty=True)) == "tqdm"
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if it were not installed
    assert progress_mod.choose(True, Stream(tty=True)) == "plain"


def test_without_tqdm_or_rich_every_option_draws_a_plain_line(
    workers: OperationsCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty_stderr = Stream(tty=True)
    with redirect_stderr(tty_stderr):
        for name in [m for m in sys.modules if m == "tqdm" or m.startswith(("tqdm.", "rich.")) or m == "rich"]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
        monkeypatch.setitem(sys.modules, "rich", None)
        for option in (True, "auto", "tqdm", "rich", "plain", "force"):
            tty_stderr.seek(0)
            tty_stderr.truncate()
            assert list(square.map(range(50), progress=option)) == [x * x for x in range(50)]
            text = tty_stderr.getvalue()
            assert text.startswith("\r") and text.endswith("\n"), (option, text)
            assert text.rstrip("\n").split("\r")[-1].startswith("progress_square: 50/50 (100%)"), (option, text)


def test_off_when_stderr_is_not_a_terminal(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        assert list(square.map(range(100), progress=True)) == [x * x for x in range(100)]
        assert gather([square(i) for i in range(10)], progress="tqdm") == [i * i for i in range(10)]
        assert len(list(as_completed([square(i) for i in range(10)], progress="rich"))) == 10
        assert stderr.getvalue() == ""
        assert not [t for t in threading.enumerate() if t.name == "tokengate-progress"]


# -- what the display shows ----------------------------------------------------------------


def test_forced_to_a_file_it_writes_plain_lines_ending_at_the_total(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        assert list(nap.map([0.002] * 600, progress="force")) == [0.002] * 600
        text = stderr.getvalue()
        assert not CONTROL.search(text), repr(text)
        lines = text.splitlines()
        assert lines and all(PLAIN_LINE.match(line) for line in lines), lines
        assert lines[-1].startswith("progress_sleep: 600/600 (100%)")


def test_a_redirected_child_gets_no_control_character(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "import time\n"
        "from tokengate import OperationsCoordinator, task_token_guard\n"
        "@task_token_guard(operation_type='child_op')\n"
        "def op(x):\n"
        "    time.sleep(0.002)\n"
        "    return x\n"
        "with OperationsCoordinator(max_workers=4):\n"
        "    assert list(op.map(range(400), progress=True)) == list(range(400))\n"
        "    assert list(op.map(range(400), progress='force')) == list(range(400))\n"
    )
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        subprocess.run([sys.executable, str(script)], stderr=f, check=True, timeout=CHILD_TIMEOUT)
    text = err.read_text()
    assert not CONTROL.search(text), repr(text)
    # progress=True printed nothing (no terminal); "force" printed plain lines, the last at the total.
    assert text.splitlines()[-1].startswith("child_op: 400/400 (100%)"), text


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_tqdm_and_rich_end_at_the_total(workers: OperationsCoordinator, kind: str) -> None:
    tty_stderr = Stream(tty=True)
    with redirect_stderr(tty_stderr):
        pytest.importorskip(kind)
        assert list(square.map(range(1000), progress=kind)) == [x * x for x in range(1000)]  # type: ignore[arg-type]
        shown = counts_shown(tty_stderr.getvalue(), 1000)
        assert shown and shown[-1] == 1000, tty_stderr.getvalue()[-500:]


def test_gather_and_as_completed_end_at_the_total(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        assert gather([nap(0.001) for _ in range(300)], progress="force") == [0.001] * 300
        assert stderr.getvalue().splitlines()[-1].startswith("gather: 300/300 (100%)")
        tokens = [nap(0.001) for _ in range(200)]
        assert {id(t) for t in as_completed(tokens, progress="force")} == {id(t) for t in tokens}
        assert stderr.getvalue().splitlines()[-1].startswith("as_completed: 200/200 (100%)")


def test_gather_shows_the_tokens_done_when_one_fails(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        tokens = [nap(0.001) for _ in range(20)] + [nap(-1)]  # time.sleep(-1) raises
        with pytest.raises(ValueError):
            gather(tokens, progress="force")
        assert stderr.getvalue().splitlines()[-1].startswith("gather: 21/21 (100%)")


def test_a_map_left_early_ends_at_the_items_handed_out(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        results = square.map(range(1000), progress="force", buffer=16)
        for i, _r in enumerate(results):
            if i == 9:
                break
        del results
        assert wait_until(lambda: not [t for t in threading.enumerate() if t.name == "tokengate-progress"])
        assert stderr.getvalue().splitlines()[-1].startswith("progress_square: 10/1000 (1%)")


def test_an_endless_map_shows_a_count_without_total(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):

        def endless() -> Iterator[int]:
            i = 0
            while True:
                yield i
                i += 1

        for i, _ in enumerate(square.map(endless(), progress="force")):
            if i == 99:
                break
        # The map left, its display closed: the thread gone and a last line, a count with no total.
        assert wait_until(lambda: not [t for t in threading.enumerate() if t.name == "tokengate-progress"])
        last = stderr.getvalue().splitlines()[-1]
        assert re.fullmatch(r"progress_square: 100 [\d,.]+/s \d+\.\ds", last), last


def test_async_map_and_as_completed(workers: OperationsCoordinator) -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):

        async def main() -> None:
            assert await nap.map([0.001] * 200, progress="force") == [0.001] * 200
            assert stderr.getvalue().splitlines()[-1].startswith("progress_sleep: 200/200 (100%)")
            tokens = [nap(0.001) for _ in range(100)]
            assert len([t async for t in as_completed(tokens, progress="force")]) == 100
            assert stderr.getvalue().splitlines()[-1].startswith("as_completed: 100/100 (100%)")

        asyncio.run(main())


def test_a_chunked_executor_map_counts_items_and_advances_at_least_10_times(monkeypatch: pytest.MonkeyPatch) -> None:
    tty_stderr = Stream(tty=True)
    with redirect_stderr(tty_stderr):
        # About 2 s of work on 2 workers: 20 ticks; every tick that sees more items done redraws.
        monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain line, whose counts are easy to read
        with Executor(max_workers=2) as ex:
            out = list(ex.map(sleep_ms_4, range(1000), chunksize=50, progress=True))
        assert out == list(range(1000))
        shown = counts_shown(tty_stderr.getvalue(), 1000)
        assert shown[-1] == 1000
        assert shown == sorted(shown)
        assert len(set(shown)) >= 10, shown
        # Items, not chunks: counts that are not multiples of the chunk size show up.
        assert any(n % 50 for n in shown), shown


def sleep_ms_4(x: int) -> int:
    time.sleep(0.004)
    return x


def test_a_fn_map_advances_while_it_runs(workers: OperationsCoordinator) -> None:
    tty_stderr = Stream(tty=True)
    with redirect_stderr(tty_stderr):
        pytest.importorskip("tqdm")
        assert list(nap.map([0.004] * 1000, progress="tqdm")) == [0.004] * 1000
        shown = counts_shown(tty_stderr.getvalue(), 1000)
        assert shown[-1] == 1000 and len(set(shown)) >= 10, shown


def test_tokens_work_with_tqdm_over_as_completed(
    workers: OperationsCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tqdm = pytest.importorskip("tqdm").tqdm
    monkeypatch.setattr(tqdm, "monitor_interval", 0)  # no monitor thread that outlives the test
    tokens = [nap(0.001) for _ in range(100)]
    out = io.StringIO()
    seen = [t.result() for t in tqdm(as_completed(tokens), total=len(tokens), file=out)]
    assert seen == [0.001] * 100 and "100/100" in out.getvalue()
    # len() of as_completed(...) is the number of tokens: tqdm finds the total by itself.
    out = io.StringIO()
    assert len(list(tqdm(as_completed([nap(0.001) for _ in range(30)]), file=out))) == 30
    assert "30/30" in out.getvalue()


def test_redraws_are_driven_by_at_most_10_ticks_a_second(
    workers: OperationsCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty_stderr = Stream(tty=True)
    with redirect_stderr(tty_stderr):
        monkeypatch.setitem(sys.modules, "tqdm", None)
        t0 = time.monotonic()
        assert len(list(nap.map([0.002] * 1500, progress=True))) == 1500
        elapsed = time.monotonic() - t0
        redraws = tty_stderr.getvalue().count("\r")
        assert redraws <= elapsed * 10 + 2, (redraws, elapsed)


def test_overhead_against_the_same_map_without_progress() -> None:
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        # The looser form of benches/bench_progress.py (there: 10,000 items, goal 5 %).
        with OperationsCoordinator(max_workers=8):
            items = [0.001] * 2000
            list(nap.map(items))  # warm-up
            plain, shown = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                list(nap.map(items))
                plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(nap.map(items, progress="force"))
                shown.append(time.perf_counter() - t0)
        ratio = statistics.median(shown) / statistics.median(plain)
        assert ratio < 1.25, (plain, shown)


def test_progress_option_is_exported() -> None:
    assert "ProgressOption" in tokengate.__all__
    assert tokengate.ProgressOption is progress_mod.ProgressOption


def test_the_total_is_the_shortest_known_length() -> None:
    assert progress_mod.total_of([range(10), [1, 2, 3]]) == 3
    assert progress_mod.total_of([iter([1, 2])]) == 2
    assert progress_mod.total_of([range(10), (x for x in range(5))]) is None
    assert progress_mod.total_of([range(10**20)]) is None  # len() would overflow


class Broken(Stream):
    def write(self, text: str) -> int:
        raise OSError("the terminal went away")


def test_a_broken_stream_does_not_break_the_work(workers: OperationsCoordinator) -> None:
    with redirect_stderr(Broken(tty=True)):
        assert list(nap.map([0.001] * 300, progress="plain")) == [0.001] * 300
        assert gather([nap(0.001) for _ in range(50)], progress="force") == [0.001] * 50
    assert not [t for t in threading.enumerate() if t.name == "tokengate-progress"]


def test_len_of_as_completed_counts_each_token_once(workers: OperationsCoordinator) -> None:
    a, b = square(2), square(3)
    twice = as_completed([a, a, b, a])
    assert len(twice) == 2
    assert len(list(twice)) == 2
    assert len(as_completed([])) == 0
    assert bool(as_completed([])) is True  # as before it had a length
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        assert len(list(as_completed([a, b, a, b], progress="force"))) == 2
        assert stderr.getvalue().splitlines()[-1].startswith("as_completed: 2/2 (100%)")


class CountedLength:
    """A container that records each len() (a Django QuerySet runs a query then)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items
        self.lengths = 0

    def __len__(self) -> int:
        self.lengths += 1
        return len(self.items)

    def __iter__(self) -> Iterator[int]:
        return iter(self.items)


def test_the_total_is_asked_for_only_when_a_display_shows(workers: OperationsCoordinator) -> None:
    with redirect_stderr(Stream(tty=False)):  # progress=True shows nothing off a terminal
        items = CountedLength(list(range(20)))
        assert list(square.map(items, progress=True)) == [x * x for x in range(20)]
        with Executor(max_workers=2) as ex:
            assert list(ex.map(abs, items, buffersize=4, progress=True)) == list(range(20))
        assert items.lengths == 0
    stderr = Stream(tty=False)
    with redirect_stderr(stderr):
        items = CountedLength(list(range(20)))
        assert list(square.map(items, progress="force")) == [x * x for x in range(20)]
        assert items.lengths == 1 and stderr.getvalue().splitlines()[-1].startswith("progress_square: 20/20")
        with Executor(max_workers=2) as ex:
            assert list(ex.map(abs, items, buffersize=4, progress="force")) == list(range(20))
        assert items.lengths == 2 and stderr.getvalue().splitlines()[-1].startswith("abs: 20/20")


def test_a_thread_that_cannot_start_closes_the_display(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    stdout, stderr = sys.stdout, sys.stderr
    tty_stderr = Stream(tty=True)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    try:
        with redirect_stderr(tty_stderr), monkeypatch.context() as m:
            m.setattr(progress_mod.threading.Thread, "start", no_thread)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                progress_mod.start("rich", "x", 10, lambda: 0)
            # rich's display was stopped: stdout and stderr are no longer its proxies.
            assert sys.stdout is stdout and sys.stderr is tty_stderr
    finally:
        sys.stdout, sys.stderr = stdout, stderr
