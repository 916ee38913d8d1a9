"""Waiting for many tokens: ``gather``, ``as_completed`` and ``fn.map``.

All three work from synchronous code and from coroutines. ``map`` reads its
input lazily and keeps at most ``buffer`` tokens in flight, so mapping over
an endless or huge iterable uses bounded memory; results come back in input
order.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Generic, TypeVar

from . import _tokengate
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


def gather(tokens: Iterable[TaskToken[T]], *, timeout: float | None = None, return_exceptions: bool = False) -> list[T]:
    """Waits for every token and returns their results in order.

    The first failure is raised (after all tokens were waited for, unless the
    timeout passed) unless ``return_exceptions`` is true, in which case
    exceptions take the place of results.
    """
    toks = _check_tokens(tokens)
    deadline = _deadline(timeout)
    # One blocking wait for all (woken once, by the last resolution), then
    # results in order from done tokens; on a worker thread, or after a
    # timeout, the loop below waits token by token.
    _tokengate.wait_all(toks, timeout)
    results: list[Any] = []
    first_error: BaseException | None = None
    for t in toks:
        try:
            results.append(t.result(timeout=_remaining(deadline)))
        except FuturesTimeoutError:
            raise
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not t.done():
                raise
            if first_error is None:
                first_error = exc
            results.append(exc)
    if first_error is not None and not return_exceptions:
        raise first_error
    return results


class _AsCompleted(Generic[T]):
    """Iterator (sync) and async iterator over tokens in completion order."""

    def __init__(self, tokens: Iterable[TaskToken[T]], timeout: float | None) -> None:
        self._tokens = _check_tokens(tokens)
        self._timeout = timeout

    def __iter__(self) -> Iterator[TaskToken[T]]:
        deadline = _deadline(self._timeout)
        done: queue.SimpleQueue[TaskToken[T]] = queue.SimpleQueue()
        pending = {id(t): t for t in self._tokens}
        for t in pending.values():
            t._add_thread_callback(done.put)
        while pending:
            try:
                t = done.get(timeout=_remaining(deadline))
            except queue.Empty:
                raise FuturesTimeoutError(f"{len(pending)} (of {len(self._tokens)}) tokens unfinished") from None
            if pending.pop(id(t), None) is not None:
                yield t

    def __aiter__(self) -> AsyncIterator[TaskToken[T]]:
        return self._agen()

    async def _agen(self) -> AsyncIterator[TaskToken[T]]:
        done: asyncio.Queue[TaskToken[T]] = asyncio.Queue()
        pending = {id(t): t for t in self._tokens}
        for t in pending.values():
            t.add_done_callback(done.put_nowait)  # delivered on this loop
        deadline = _deadline(self._timeout)
        while pending:
            try:
                t = await asyncio.wait_for(done.get(), _remaining(deadline))
            except asyncio.TimeoutError:
                raise TimeoutError(f"{len(pending)} (of {len(self._tokens)}) tokens unfinished") from None
            if pending.pop(id(t), None) is not None:
                yield t


def as_completed(tokens: Iterable[TaskToken[T]], timeout: float | None = None) -> _AsCompleted[T]:
    """Yields tokens as they finish: ``for t in as_completed(ts)`` or ``async for t in as_completed(ts)``.

    Raises ``TimeoutError`` if they are not all done within ``timeout`` seconds.
    """
    return _AsCompleted(tokens, timeout)


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
    """

    def __init__(self, fn: Callable[[Any], TaskToken[T]], iterable: Iterable[Any], buffer: int) -> None:
        self._fn = fn
        self._it = iter(iterable)
        self._buffer = buffer
        self._used = False

    def _take(self) -> Iterator[Any]:
        if self._used:
            raise RuntimeError("map results can be consumed only once")
        self._used = True
        return self._it

    def __iter__(self) -> Iterator[T]:
        it = self._take()
        window: collections.deque[TaskToken[T]] = collections.deque()
        try:
            for item in it:
                window.append(self._fn(item))
                if len(window) >= self._buffer:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            _cancel_unstarted(window)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[T]:
        it = self._take()
        window: collections.deque[TaskToken[T]] = collections.deque()
        try:
            for item in it:
                window.append(self._fn(item))
                if len(window) >= self._buffer:
                    yield await window.popleft()
            while window:
                yield await window.popleft()
        finally:
            _cancel_unstarted(window)

    async def _collect(self) -> list[T]:
        return [r async for r in self._aiter()]

    def __await__(self) -> Generator[Any, None, list[T]]:
        return self._collect().__await__()


def map_tokens(fn: Callable[..., TaskToken[T]], *iterables: Iterable[Any], buffer: int | None = None) -> MapResults[T]:
    """``fn.map(iterable, ..., buffer=...)``: see :class:`MapResults`. With several
    iterables, ``fn`` takes one item of each, and the shortest ends the map (as ``map`` does)."""
    if buffer is None:
        buffer = DEFAULT_MAP_BUFFER
    if not isinstance(buffer, int) or isinstance(buffer, bool) or buffer <= 0:
        raise ValueError(f"buffer must be a positive int, got {buffer!r}")
    if not iterables:
        raise TypeError("map() needs at least one iterable")
    if len(iterables) == 1:
        return MapResults(fn, iterables[0], buffer)

    def call(args: tuple[Any, ...]) -> TaskToken[T]:
        return fn(*args)

    return MapResults(call, zip(*iterables), buffer)
