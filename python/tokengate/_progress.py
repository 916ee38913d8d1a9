"""Progress display for long waits: the ``progress=`` option of ``fn.map``, ``gather``,
``as_completed`` and ``Executor.map``.

The display counts items (one per call), not chunks or tokens of work in flight. It is
driven by a small daemon thread that wakes at most 10 times a second, asks a counter how
many items are done and redraws; nothing runs per token. The counters are cheap: the
number of results handed out so far, plus the finished calls at the front of the window
of calls in flight (at most :data:`LOOKAHEAD` of them are looked at per tick), or, over a
fixed list of tokens, a frontier index that only moves forward.

``progress`` takes:

* ``False`` or ``None`` (the default): no display;
* ``True`` or ``"auto"``: tqdm when it is importable (``pip install tokengate[progress]``),
  else a plain line; shown only when stderr is a terminal;
* ``"tqdm"``, ``"rich"`` or ``"plain"``: that display, shown only when stderr is a terminal;
  a library that is not installed falls back to the plain line (never an ImportError);
* ``"force"``: shown even when stderr is not a terminal; on a terminal as ``"auto"``,
  elsewhere (a log file, a pipe) as plain lines with no carriage return or escape code,
  at most one a second and a last one at the end.

The display ends at the number of items done: its total when the work ran to the end.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import operator
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, TextIO, TypeVar, Union

__all__ = [
    "LOOKAHEAD",
    "TICK_SECONDS",
    "FrontierCounter",
    "HandedCounter",
    "ProgressOption",
    "ProgressSession",
    "WindowCounter",
    "check_option",
    "choose",
    "handed",
    "shows",
    "start",
    "total_of",
]

#: What ``progress=`` accepts (see the module's documentation).
ProgressOption = Union[bool, Literal["auto", "tqdm", "rich", "plain", "force"], None]

#: Seconds between two redraws: at most 10 a second.
TICK_SECONDS = 0.1
#: Calls in flight a tick looks at past the ones known done.
LOOKAHEAD = 1024
#: Seconds between two lines of the plain display off a terminal.
LOG_LINE_SECONDS = 1.0

_MODES = ("auto", "tqdm", "rich", "plain", "force")

T = TypeVar("T")


class _Done(Protocol):
    def done(self) -> bool: ...


def check_option(progress: object) -> None:
    """Raises at the call for a ``progress`` value that is not one of :data:`ProgressOption`."""
    if progress is None or isinstance(progress, bool):
        return
    if not isinstance(progress, str):
        raise TypeError(f"progress must be a bool, None or one of {', '.join(_MODES)}; got {type(progress).__name__}")
    if progress not in _MODES:
        raise ValueError(f"progress must be a bool, None or one of {', '.join(_MODES)}; got {progress!r}")


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # a None entry blocks the import
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def choose(progress: ProgressOption, stream: TextIO) -> str | None:
    """The display ``progress`` gives on ``stream``: "tqdm", "rich", "plain", "log" (plain lines
    off a terminal) or None (no display)."""
    check_option(progress)
    if progress is None or progress is False:
        return None
    mode = "auto" if progress is True else progress
    tty = _isatty(stream)
    if mode == "force":
        if not tty:
            return "log"
        mode = "auto"
    elif not tty:
        return None
    if mode == "auto":
        mode = "tqdm"
    if mode in ("tqdm", "rich") and not _importable(mode):
        return "plain"
    return mode


# -- displays ----------------------------------------------------------------------------------


class _Display(Protocol):
    def show(self, n: int) -> None: ...
    def close(self, n: int) -> None: ...


def _rate(n: int, elapsed: float) -> str:
    return f"{n / elapsed:,.1f}/s" if elapsed > 0 else "-/s"


def plain_line(desc: str, n: int, total: int | None, elapsed: float) -> str:
    """One line of the plain display: ``desc: 250/1000 (25%) 812.3/s 0.3s``."""
    if total:
        head = f"{desc}: {n}/{total} ({100 * n // total}%)"
    else:
        head = f"{desc}: {n}"
    return f"{head} {_rate(n, elapsed)} {elapsed:.1f}s"


class _Plain:
    """A line redrawn in place with a carriage return (on a terminal), or, off one, a new line
    at most once every :data:`LOG_LINE_SECONDS` and at the end."""

    def __init__(self, stream: TextIO, desc: str, total: int | None, in_place: bool) -> None:
        self._stream = stream
        self._desc = desc
        self._total = total
        self._in_place = in_place
        self._t0 = time.monotonic()
        self._last_line = -LOG_LINE_SECONDS
        self._width = 0

    def _write(self, n: int, end: bool) -> None:
        line = plain_line(self._desc, n, self._total, time.monotonic() - self._t0)
        if self._in_place:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self._stream.write("\r" + line + " " * pad + ("\n" if end else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def show(self, n: int) -> None:
        if not self._in_place:
            now = time.monotonic()
            if now - self._last_line < LOG_LINE_SECONDS:
                return
            self._last_line = now
        self._write(n, end=False)

    def close(self, n: int) -> None:
        self._write(n, end=True)


_tqdm_class: Any = None


def _tqdm() -> Any:
    """tqdm's bar class without its monitor thread (a thread that outlives every bar, there to
    redraw bars updated rarely: this module's ticks already redraw)."""
    global _tqdm_class
    if _tqdm_class is None:
        base: Any = importlib.import_module("tqdm").tqdm
        _tqdm_class = type("TokengateTqdm", (base,), {"monitor_interval": 0})
    return _tqdm_class


class _Tqdm:
    def __init__(self, stream: TextIO, desc: str, total: int | None) -> None:
        # mininterval=0, miniters=1: every update redraws (this module already limits them to its ticks).
        self._bar: Any = _tqdm()(
            total=total, desc=desc, file=stream, unit="it", mininterval=0, miniters=1, dynamic_ncols=True
        )

    def show(self, n: int) -> None:
        self._bar.update(n - self._bar.n)

    def close(self, n: int) -> None:
        self.show(n)
        self._bar.close()


class _Rich:
    def __init__(self, stream: TextIO, desc: str, total: int | None) -> None:
        rich_console: Any = importlib.import_module("rich.console")
        rich_progress: Any = importlib.import_module("rich.progress")
        # auto_refresh=False: no refresh thread of rich's own; this module's ticks redraw.
        self._progress: Any = rich_progress.Progress(
            *rich_progress.Progress.get_default_columns(),
            rich_progress.MofNCompleteColumn(),
            console=rich_console.Console(file=stream),
            auto_refresh=False,
        )
        self._task: Any = self._progress.add_task(desc, total=total)
        self._progress.start()

    def show(self, n: int) -> None:
        self._progress.update(self._task, completed=n)
        self._progress.refresh()

    def close(self, n: int) -> None:
        self.show(n)
        self._progress.stop()


def _display(kind: str, stream: TextIO, desc: str, total: int | None) -> _Display:
    if kind == "tqdm":
        try:
            return _Tqdm(stream, desc, total)
        except ImportError:
            pass
    elif kind == "rich":
        try:
            return _Rich(stream, desc, total)
        except ImportError:
            pass
    return _Plain(stream, desc, total, in_place=kind != "log")


# -- counters --------------------------------------------------------------------------------


class WindowCounter:
    """Items done in a map that hands results out in order: those handed out (``handed``, which
    the consumer adds to) plus the finished ones at the front of the window still in flight.
    With ``weighted`` (a chunked map), the window holds ``(token, items)`` pairs."""

    __slots__ = ("handed", "weighted", "window")

    def __init__(self, window: deque[Any], weighted: bool = False) -> None:
        self.window = window
        self.weighted = weighted
        self.handed = 0

    def __call__(self) -> int:
        handed = self.handed  # read first: an item moving out of the window meanwhile is missed, not counted twice
        try:
            ahead = list(itertools.islice(self.window, LOOKAHEAD))
        except RuntimeError:  # the consumer changed the window meanwhile: the next tick counts
            return handed
        if self.weighted:
            return handed + sum(int(n) for token, n in ahead if token.done())
        return handed + sum(1 for item in ahead if item.done())


def handed(counter: WindowCounter | HandedCounter, value: T) -> T:
    """``value``, counted as handed out: ``yield handed(counter, x)`` keeps no reference to it in
    the generator's frame while the consumer holds it."""
    counter.handed += 1
    return value


class HandedCounter:
    """Items handed out so far (``as_completed`` hands each out as it finishes)."""

    __slots__ = ("handed",)

    def __init__(self) -> None:
        self.handed = 0

    def __call__(self) -> int:
        return self.handed


class FrontierCounter:
    """Finished items of a fixed list: a frontier index that moves over the done ones at the
    front, plus the done ones among the next :data:`LOOKAHEAD`."""

    __slots__ = ("frontier", "items")

    def __init__(self, items: Sequence[_Done]) -> None:
        self.items = items
        self.frontier = 0

    def __call__(self) -> int:
        items, i, n = self.items, self.frontier, len(self.items)
        while i < n and items[i].done():
            i += 1
        self.frontier = i
        return i + sum(1 for item in itertools.islice(items, i + 1, i + 1 + LOOKAHEAD) if item.done())


# -- the ticking thread ----------------------------------------------------------------------


class ProgressSession:
    """A display and the thread that redraws it from ``count()`` every :data:`TICK_SECONDS`."""

    def __init__(self, display: _Display, count: Callable[[], int], total: int | None) -> None:
        self._display = display
        self._count = count
        self._total = total
        self._shown = 0
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tokengate-progress", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            # No thread (RuntimeError: can't start new thread): the display is closed before the
            # error goes on, else rich's would leave sys.stdout and sys.stderr redirected.
            self._closed = True
            try:
                display.close(0)
            except Exception:
                pass
            raise

    def _clamp(self, n: int) -> int:
        return n if self._total is None else min(n, self._total)

    def _run(self) -> None:
        try:
            while not self._stop.wait(TICK_SECONDS):
                n = self._clamp(self._count())
                if n > self._shown:
                    self._shown = n
                    self._display.show(n)
        except Exception:  # a broken stream must not break the work: stop redrawing
            return

    def close(self, done: int | None = None) -> None:
        """Stops the thread and draws the last count: ``done`` when given (the exact number of
        items finished), else one more ``count()``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        n = self._clamp(self._count() if done is None else done)
        try:
            self._display.close(max(n, 0))
        except Exception:  # the stream went away
            pass


def shows(progress: ProgressOption) -> bool:
    """Whether ``progress`` shows a display on stderr now."""
    stream = sys.stderr
    return stream is not None and choose(progress, stream) is not None


def start(
    progress: ProgressOption,
    desc: str,
    total: int | Callable[[], int | None] | None,
    count: Callable[[], int],
) -> ProgressSession | None:
    """A running :class:`ProgressSession` on stderr, or None when ``progress`` shows nothing.
    ``total`` may be a function, called only once a display was chosen: the length of a lazy
    container (a database query, say) is not asked for when nothing is shown."""
    stream = sys.stderr
    if stream is None:  # pythonw, or a closed stderr
        return None
    kind = choose(progress, stream)
    if kind is None:
        return None
    if callable(total):
        total = total()
    try:
        display = _display(kind, stream, desc, total)
    except Exception:  # a stream that fails at the first draw: no display, the work goes on
        return None
    return ProgressSession(display, count, total)


def total_of(iterables: Iterable[object]) -> int | None:
    """The number of items a map over ``iterables`` (zipped) will see, when they tell it: the
    shortest length; None when one of them has no length."""
    try:
        hints = [operator.length_hint(it, -1) for it in iterables]
    except (OverflowError, TypeError, ValueError):  # range(10**20), or a __length_hint__ that fails
        return None
    if not hints or min(hints) < 0:
        return None
    return min(hints)
