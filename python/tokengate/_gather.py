"""Waiting for many tokens: ``gather``, ``as_completed`` and ``fn.map``.

All three work from synchronous code and from coroutines. ``map`` reads its
input lazily and keeps at most ``buffer`` tokens in flight, so mapping over
an endless or huge iterable uses bounded memory; results come back in input
order.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Generic, TypeVar

from . import _tokengate
from ._progress import (
    FrontierCounter,
    HandedCounter,
    ProgressOption,
    WindowCounter,
    check_option,
    handed,
    start,
    total_of,
)
from ._tokengate import TaskToken

__all__ = ["DEFAULT_MAP_BUFFER", "as_completed", "gather", "map_tokens"]

T = TypeVar("T")

#: Tokens ``fn.map`` keeps in flight when ``buffer`` is not given.
DEFAULT_MAP_BUFFER = 1024


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_tokens(tokens: Iterable[Any]) -> list[TaskToken[Any]]:
    out = list(tokens)
    for t in out:
        if not isinstance(t, TaskToken):
            raise TypeError(f"expected TaskToken objects, got {type(t).__name__}")
    return out


def gather(
    tokens: Iterable[TaskToken[T]],
    *,
    timeout: float | None = None,
    return_exceptions: bool = False,
    progress: ProgressOption = None,
) -> list[T]:
    """Waits for every token and returns their results in order.

    The first failure is raised (after all tokens were waited for, unless the
    timeout passed) unless ``return_exceptions`` is true, in which case
    exceptions take the place of results.

    ``progress``: a progress display of the tokens done on stderr (``True``:
    tqdm when installed, else a plain line; only on a terminal unless
    ``"force"``; see :data:`tokengate.ProgressOption`).
    """
    toks = _check_tokens(tokens)
    check_option(progress)
    deadline = _deadline(timeout)
    session = start(progress, "gather", len(toks), FrontierCounter(toks)) if progress else None
    try:
        # One blocking wait for all (woken once, by the last resolution), then
        # results in order from done tokens; on a worker thread, or after a
        # timeout, the loop below waits token by token.
        done = _tokengate.wait_all(toks, timeout)
        # All done: no result waits, so no timeout to keep (and no clock read per token).
        return _results(toks, None if done else deadline, return_exceptions)
    finally:
        if session is not None:
            session.close()


def _is_outcome(t: TaskToken[Any], exc: BaseException) -> bool:
    """Whether ``exc``, raised by ``t.result()``, is the token's outcome: not when the
    token is not done (the wait ended), nor for an interrupt that is not the token's own
    exception (it landed while the result was read)."""
    if not t.done():
        return False
    if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    try:
        return t.exception(timeout=0) is exc
    except BaseException:
        return False


def _results(toks: list[TaskToken[T]], deadline: float | None, return_exceptions: bool) -> list[T]:
    results: list[Any] = []
    first_error: BaseException | None = None
    for t in toks:
        if deadline is not None and not t.done():
            try:
                t.exception(timeout=_remaining(deadline))  # waits; the outcome is read below
            except Exception:
                if not t.done():
                    raise  # the timeout passed: the wait's end, not the token's
        try:
            results.append(t.result())
        except BaseException as exc:
            if not _is_outcome(t, exc):
                raise  # an interrupt while waiting (or one that landed meanwhile)
            # The token's own outcome, whatever it is (a TimeoutError too: its deadline passed).
            if first_error is None:
                first_error = exc
            results.append(exc)
    if first_error is not None and not return_exceptions:
        raise first_error
    return results


class _AsCompleted(Generic[T]):
    """Iterator (sync) and async iterator over tokens in completion order."""

    def __init__(self, tokens: Iterable[TaskToken[T]], timeout: float | None, progress: ProgressOption) -> None:
        # A token given twice is handed out once.
        self._unique = {id(t): t for t in _check_tokens(tokens)}
        self._timeout = timeout
        check_option(progress)
        self._progress = progress

    def __len__(self) -> int:
        """The number of tokens it hands out (each token once, however often it was given)."""
        return len(self._unique)

    def __bool__(self) -> bool:
        # Always true, as before it had a length: `if as_completed(ts):` does not depend on ts.
        return True

    def __iter__(self) -> Iterator[TaskToken[T]]:
        deadline = _deadline(self._timeout)
        done: queue.SimpleQueue[TaskToken[T]] = queue.SimpleQueue()
        pending = dict(self._unique)
        for t in pending.values():
            t._add_thread_callback(done.put)
        counter = HandedCounter()
        session = start(self._progress, "as_completed", len(pending), counter) if self._progress else None
        try:
            while pending:
                try:
                    t = done.get(timeout=_remaining(deadline))
                except queue.Empty:
                    raise FuturesTimeoutError(f"{len(pending)} (of {len(self._unique)}) tokens unfinished") from None
                if pending.pop(id(t), None) is not None:
                    counter.handed += 1
                    yield t
        finally:
            if session is not None:
                session.close()

    def __aiter__(self) -> AsyncIterator[TaskToken[T]]:
        return self._agen()

    async def _agen(self) -> AsyncIterator[TaskToken[T]]:
        done: asyncio.Queue[TaskToken[T]] = asyncio.Queue()
        pending = dict(self._unique)
        for t in pending.values():
            t.add_done_callback(done.put_nowait)  # delivered on this loop
        deadline = _deadline(self._timeout)
        counter = HandedCounter()
        session = start(self._progress, "as_completed", len(pending), counter) if self._progress else None
        try:
            while pending:
                try:
                    t = await asyncio.wait_for(done.get(), _remaining(deadline))
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{len(pending)} (of {len(self._unique)}) tokens unfinished") from None
                if pending.pop(id(t), None) is not None:
                    counter.handed += 1
                    yield t
        finally:
            if session is not None:
                session.close()


def as_completed(
    tokens: Iterable[TaskToken[T]], timeout: float | None = None, *, progress: ProgressOption = None
) -> _AsCompleted[T]:
    """Yields tokens as they finish: ``for t in as_completed(ts)`` or ``async for t in as_completed(ts)``.

    Raises ``TimeoutError`` if they are not all done within ``timeout`` seconds.
    ``progress``: a progress display of the tokens handed out, on stderr (see
    :data:`tokengate.ProgressOption`). ``len()`` of the result is the number of
    tokens it yields (a token given twice is yielded once), so ``tqdm(as_completed(ts))``
    knows its total.
    """
    return _AsCompleted(tokens, timeout, progress)


def _cancel_unstarted(window: Iterable[TaskToken[Any]]) -> None:
    """Cancels the window's tokens that have not started (a map left early). Running ones run
    on: on an event loop's thread ``cancel()`` would cancel them too (asyncio's contract)."""
    for t in window:
        if not t.running():
            t.cancel()


class MapResults(Generic[T]):
    """Lazy, bounded, ordered results of ``fn.map(iterable)``.

    Iterate it (``for r in fn.map(xs)``), iterate it asynchronously
    (``async for r in fn.map(xs)``), or await it for a list
    (``await fn.map(xs)``). It can be consumed once.

    With ``chunked``, each item is a chunk (a list of calls) whose token's value is the
    list of their results, handed out one by one; progress counts calls.
    """

    def __init__(
        self,
        fn: Callable[[Any], TaskToken[T]],
        iterable: Iterable[Any],
        buffer: int,
        *,
        progress: ProgressOption = None,
        total: int | Callable[[], int | None] | None = None,
        desc: str = "map",
        chunked: bool = False,
    ) -> None:
        check_option(progress)
        self._fn = fn
        self._it = iter(iterable)
        self._buffer = buffer
        self._used = False
        self._progress = progress
        self._total = total
        self._desc = desc
        self._chunked = chunked

    def _take(self) -> Iterator[Any]:
        if self._used:
            raise RuntimeError("map results can be consumed only once")
        self._used = True
        return self._it

    def _open(self, weighted: bool) -> tuple[Iterator[Any], collections.deque[Any], WindowCounter, Any]:
        """The input, the window of tokens in flight (with ``weighted``, ``(token, calls)``
        pairs: the progress display counts calls), its counter and the progress display."""
        it = self._take()
        window: collections.deque[Any] = collections.deque()
        counter = WindowCounter(window, weighted=weighted)
        session = start(self._progress, self._desc, self._total, counter) if self._progress else None
        return it, window, counter, session

    @staticmethod
    def _close(window: collections.deque[Any], counter: WindowCounter, session: Any) -> None:
        """A map ended or left early: the tokens not started are cancelled; the display closes."""
        _cancel_unstarted((token for token, _ in window) if counter.weighted else window)
        if session is not None:
            session.close(counter.handed)

    def __iter__(self) -> Iterator[T]:
        if self._chunked:
            yield from self._iter_chunks()
            return
        it, window, counter, session = self._open(weighted=False)
        try:
            for item in it:
                window.append(self._fn(item))
                if len(window) >= self._buffer:
                    yield handed(counter, window.popleft().result())
            while window:
                yield handed(counter, window.popleft().result())
        finally:
            self._close(window, counter, session)

    def _iter_chunks(self) -> Iterator[T]:
        it, window, counter, session = self._open(weighted=True)
        try:
            for chunk in it:
                window.append((self._fn(chunk), len(chunk)))
                if len(window) >= self._buffer:
                    for value in window.popleft()[0].result():
                        yield handed(counter, value)
            while window:
                for value in window.popleft()[0].result():
                    yield handed(counter, value)
        finally:
            self._close(window, counter, session)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[T]:
        if self._chunked:
            async for value in self._aiter_chunks():
                yield value
            return
        it, window, counter, session = self._open(weighted=False)
        try:
            for item in it:
                window.append(self._fn(item))
                if len(window) >= self._buffer:
                    yield handed(counter, await window.popleft())
            while window:
                yield handed(counter, await window.popleft())
        finally:
            self._close(window, counter, session)

    async def _aiter_chunks(self) -> AsyncIterator[T]:
        it, window, counter, session = self._open(weighted=True)
        try:
            for chunk in it:
                window.append((self._fn(chunk), len(chunk)))
                if len(window) >= self._buffer:
                    for value in await window.popleft()[0]:
                        yield handed(counter, value)
            while window:
                for value in await window.popleft()[0]:
                    yield handed(counter, value)
        finally:
            self._close(window, counter, session)

    async def _collect(self) -> list[T]:
        return [r async for r in self._aiter()]

    def __await__(self) -> Generator[Any, None, list[T]]:
        return self._collect().__await__()


def _chunks(calls: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    """Lists of ``size`` argument tuples (the last may be shorter), read lazily."""
    while chunk := list(itertools.islice(calls, size)):
        yield chunk


def map_tokens(
    fn: Callable[..., TaskToken[T]],
    *iterables: Iterable[Any],
    buffer: int | None = None,
    progress: ProgressOption = None,
    desc: str = "map",
    chunksize: int = 1,
    submit_chunk: Callable[[list[tuple[Any, ...]]], TaskToken[list[T]]] | None = None,
) -> MapResults[T]:
    """``fn.map(iterable, ..., buffer=..., progress=..., chunksize=...)``: see :class:`MapResults`.
    With several iterables, ``fn`` takes one item of each, and the shortest ends the map (as
    ``map`` does). ``progress`` shows the items done on stderr (see
    :data:`tokengate.ProgressOption`); its total is the shortest iterable's length, when they
    all have one. With ``chunksize`` above 1 and a ``submit_chunk`` (the lane's way to run
    a list of calls as one token), calls go in chunks of ``chunksize``, one token each, and
    ``buffer`` counts tokens, so chunks; without one, ``chunksize`` is accepted and ignored,
    as by ``ThreadPoolExecutor.map``."""
    if buffer is None:
        buffer = DEFAULT_MAP_BUFFER
    if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer <= 0:
        raise ValueError(f"buffer must be a positive int, got {buffer!r}")
    if not isinstance(chunksize, int) or isinstance(chunksize, bool):
        raise TypeError(f"chunksize must be an int, got {chunksize!r}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
    if not iterables:
        raise TypeError("map() needs at least one iterable")
    check_option(progress)

    def count_items() -> int | None:  # asked for once a display is chosen, before an item is taken
        return total_of(iterables)

    total = count_items if progress else None
    if chunksize > 1 and submit_chunk is not None:
        return MapResults(
            submit_chunk,  # type: ignore[arg-type]
            _chunks(zip(*iterables), chunksize),
            buffer,
            progress=progress,
            total=total,
            desc=desc,
            chunked=True,
        )
    if len(iterables) == 1:
        return MapResults(fn, iterables[0], buffer, progress=progress, total=total, desc=desc)

    def call(args: tuple[Any, ...]) -> TaskToken[T]:
        return fn(*args)

    return MapResults(call, zip(*iterables), buffer, progress=progress, total=total, desc=desc)
