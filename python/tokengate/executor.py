"""``tokengate.Executor``: a :mod:`concurrent.futures` executor whose work runs as tokengate tokens.

>>> from tokengate import Executor
>>> with Executor(max_workers=2) as ex:
...     ex.submit(pow, 2, 8).result(timeout=5)
256

It is a drop-in replacement for :class:`concurrent.futures.ThreadPoolExecutor`
(it subclasses it, so ``loop.set_default_executor`` accepts it): ``submit``
returns real :class:`concurrent.futures.Future` objects, so
``concurrent.futures.wait``/``as_completed``, ``asyncio.wrap_future`` and
``loop.run_in_executor`` work unchanged.

How it works
------------
Each ``submit`` queues one token on a tokengate ``Engine`` (through a
module-level ``OperationSpec`` of operation type ``"executor"``). The token
runs a small wrapper on a worker thread that drives the Future exactly as
``ThreadPoolExecutor``'s work item does (``set_running_or_notify_cancel``,
then ``set_result``/``set_exception``). A thread callback on the token settles
the Future when the token resolves without running the wrapper (cancelled
from the queue, drained at shutdown, killed, or failed inside tokengate).
``Future.cancel()`` also cancels the token, so a cancelled call never runs.

Workers
-------
With ``coordinator=None`` (default) the executor owns a private
:class:`OperationsCoordinator` with ``max_workers`` workers, started at
construction and stopped by ``shutdown()``. All workers start at once (a
``ThreadPoolExecutor`` starts its threads lazily). With ``coordinator=``, the
executor submits to that running coordinator and ``shutdown()`` only stops
accepting work and waits for this executor's own calls; the coordinator keeps
running.

Note: a private coordinator is a normal running coordinator, so while the
executor lives, calls of ``@task_token_guard`` functions made outside a task
go to it if it is the most recently started one.

Initializer
-----------
``initializer(*initargs)`` runs once in each worker thread, before the first
call of this executor that the thread runs: a thread-local flag, checked by
the wrapper around every call, records that it ran. If it raises, the error
is logged as ``ThreadPoolExecutor`` logs it (``logging.getLogger('concurrent.futures')
.critical('Exception in initializer:', exc_info=True)``), the executor becomes broken: every call not
yet started fails with :class:`BrokenThreadPool`, and later ``submit`` calls
raise it.

Shutdown
--------
``shutdown(wait=True)`` runs every queued call and joins the private workers.
``cancel_futures=True`` cancels what ThreadPoolExecutor's cancels: each of
its ``max_workers`` threads takes the oldest queued call as soon as it is
free, so the oldest ``max_workers - running`` calls that have not started
still run, and the newer ones are cancelled (a call made just before the
shutdown runs on an idle executor). ``shutdown(wait=False)`` returns at once; the
queued calls still run and the private workers exit after the last one.
Garbage-collecting an executor without ``shutdown`` does the same as
``shutdown(wait=False)``. At interpreter exit, queued calls still run (the
coordinator's exit hook waits for them) and later ``submit`` calls raise
``RuntimeError('cannot schedule new futures after interpreter shutdown')``.
``shutdown(wait=True)`` called from inside one of the executor's own calls
does not wait (it would wait for itself); it behaves as ``wait=False``.

Differences from ``ThreadPoolExecutor``: each call runs in a copy of the
submitting thread's :mod:`contextvars` context; ``max_workers`` must be an
``int``; the ``max_workers`` threads start with the executor (``_threads``
lists those running), not one per call until one is idle.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as _cf
from concurrent.futures import _base
from concurrent.futures.thread import BrokenThreadPool, ThreadPoolExecutor
from typing import Any, TypeVar, cast

from . import _tokengate
from ._coordinator import OperationsCoordinator
from ._progress import ProgressOption, WindowCounter, check_option, handed, shows, start, total_of
from .exceptions import ShutdownError

__all__ = ["BrokenThreadPool", "Executor"]

_T = TypeVar("_T")

#: ThreadPoolExecutor's logger (``concurrent.futures``), where it reports a failed initializer.
LOGGER = logging.getLogger("concurrent.futures")

_PENDING = _base.PENDING
_RUNNING = _base.RUNNING
_CANCELLED = _base.CANCELLED
_CANCELLED_AND_NOTIFIED = _base.CANCELLED_AND_NOTIFIED
_FINISHED = _base.FINISHED
_InvalidStateError = _base.InvalidStateError

_BROKEN_MESSAGE = "A thread initializer failed, the thread pool is not usable anymore"


def _placeholder(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
    """The OperationSpec's nominal function; submit_call passes the real one."""


#: Every executor call is a token of this operation (``token.operation_type == "executor"``).
_SPEC = _tokengate.OperationSpec(_placeholder, "executor", types.MappingProxyType({}), 0, None, True, None)
_submit_call = _SPEC.submit_call

# Set by the exit hook below. Only consulted when the coordinator has no engine
# (the native module refuses submits after interpreter shutdown by itself).
_interpreter_exiting = False

# Private engines stopped without joining their workers (shutdown(wait=False),
# garbage collection). Their workers must be joined before the interpreter
# finalizes: a tokengate worker that exits while the interpreter finalizes
# aborts the process (see _python_exit).
_unjoined_lock = threading.Lock()
_unjoined: list[Any] = []


def _stop_without_join(engine: Any) -> None:
    engine.stop(wait=False)
    with _unjoined_lock:
        _unjoined.append(engine)


def _join_unjoined(timeout: float | None) -> None:
    """Joins the workers of engines stopped without waiting (timeout=0: only those already exited)."""
    with _unjoined_lock:
        engines = list(_unjoined)
    for engine in engines:
        if engine.stop(wait=True, timeout=timeout):
            with _unjoined_lock, contextlib.suppress(ValueError):
                _unjoined.remove(engine)


def _python_exit() -> None:
    # threading._shutdown runs these hooks last-registered first, so this runs
    # before tokengate's own hook (which stops the running coordinators,
    # running what is queued, and joins their workers).
    global _interpreter_exiting
    _interpreter_exiting = True
    _join_unjoined(None)


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - old Python / imported during exit
    pass


def _default_max_workers() -> int:
    """The number ``ThreadPoolExecutor`` picks on this Python."""
    count = getattr(os, "process_cpu_count", os.cpu_count)
    return min(32, (count() or 1) + 4)


class _Future(_cf.Future[Any]):
    """A :class:`concurrent.futures.Future` tied to a token: ``cancel()`` also cancels the token."""

    #: The executor state while the token is unresolved (None after).
    _core: _Core | None = None
    #: The TaskToken running the call (set right after submit).
    _token: Any = None

    def cancel(self) -> bool:
        if not _cf.Future.cancel(self):
            return False
        token = self._token
        if token is not None:
            # Not started yet: it will never run and its callback notifies the
            # waiters now. Already executing: the wrapper sees CANCELLED and
            # notifies them without calling the function.
            token.cancel()
        return True

    # -- called by the executor ----------------------------------------------------

    def _claim(self) -> bool:
        """PENDING -> RUNNING (True). CANCELLED -> notified (False). Anything else: False.

        Unlike ``set_running_or_notify_cancel`` it never raises: the future may
        have been failed already (broken executor, killed token)."""
        with self._condition:
            state = self._state
            if state in (_PENDING, _CANCELLED):
                return self.set_running_or_notify_cancel()
            return False

    def _on_token_done(self, token: Any) -> None:
        """Thread callback of the token: runs on the thread that resolved it."""
        state = self._state
        if state != _FINISHED and state != _CANCELLED_AND_NOTIFIED:
            self._settle_from_token(token)
        core = self._core
        if core is not None:
            self._core = None
            pending = core.pending
            pending.pop(self, None)
            if core.stop_requested and not pending:
                core.deferred_stop()

    def _settle_from_token(self, token: Any) -> None:
        # The token resolved but the wrapper did not settle the future.
        state = token.state
        if state == "completed":
            return  # the wrapper returned early: the future was cancelled and notified
        if state == "cancelled":
            _cf.Future.cancel(self)  # PENDING -> CANCELLED (no-op once RUNNING/FINISHED)
            with self._condition:
                if self._state == _CANCELLED:
                    self.set_running_or_notify_cancel()  # wake futures.wait/as_completed
            return
        # failed (inside tokengate), killed or timed out
        try:
            token.result(0)
        except BaseException as exc:
            error: BaseException | None = exc
        else:  # pragma: no cover - a failed token always has an exception
            error = RuntimeError(f"token resolved as {state} without an exception")
        with self._condition:
            if self._state == _PENDING:
                self.set_running_or_notify_cancel()
            elif self._state == _CANCELLED:
                self.set_running_or_notify_cancel()
                return
            elif self._state != _RUNNING:
                return
        try:
            self.set_exception(error)
        except _InvalidStateError:  # pragma: no cover - the wrapper settled it meanwhile
            pass
        error = None

    def _fail_broken(self, message: str) -> None:
        """Fails a call that has not started with ``BrokenThreadPool`` (and cancels its token)."""
        with self._condition:
            if self._state != _PENDING:
                return
            self.set_running_or_notify_cancel()
        try:
            self.set_exception(BrokenThreadPool(message))
        except _InvalidStateError:  # pragma: no cover
            pass
        token = self._token
        if token is not None:
            token.cancel()


def _call_into(future: _Future, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Calls ``fn`` and settles ``future`` with its result or exception (a kill may have settled it first)."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        try:
            future.set_exception(exc)
        except _InvalidStateError:  # killed meanwhile
            pass
    else:
        try:
            future.set_result(result)
        except _InvalidStateError:  # killed meanwhile
            pass


def _run_plain(future: _Future, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """What a token runs (no initializer): ThreadPoolExecutor's ``_WorkItem.run``."""
    if not future.set_running_or_notify_cancel():
        return
    _call_into(future, fn, args, kwargs)


def _run_initialized(
    core: _Core, future: _Future, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """What a token runs when the executor has an initializer."""
    local = core.local
    if not getattr(local, "initialized", False):
        if core.broken:
            future._fail_broken(str(core.broken))
            return
        try:
            assert core.initializer is not None  # this runner is used only with an initializer
            core.initializer(*core.initargs)
        except BaseException:
            LOGGER.critical("Exception in initializer:", exc_info=True)
            core.initializer_failed()
            return
        local.initialized = True
    if not future._claim():
        return
    _call_into(future, fn, args, kwargs)


class _Core:
    """The executor's state, shared with its futures and workers (never the Executor itself,
    so that an executor can be garbage-collected while its calls still run)."""

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        owned: bool,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_workers: int,
    ) -> None:
        self.coordinator = coordinator
        self.max_workers = max_workers
        self.owned = owned
        # The private engine, kept to join its workers even after a deferred stop.
        self.engine: Any = coordinator._engine if owned else None
        self.initializer = initializer
        self.initargs = initargs
        self.local = threading.local()
        self.lock = threading.Lock()
        #: Unresolved futures in submission order (a dict used as an ordered set).
        self.pending: dict[_Future, None] = {}
        self.shutdown = False
        self.broken: str | bool = False
        self.stop_requested = False  # stop the private engine once nothing is pending
        self.stopped = False

    # -- submit --------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Future:
        # No lock is held across the native submit (a bounded coordinator may
        # block it). Races with shutdown() are benign: the future joins
        # `pending` before the token is queued, and a token queued after the
        # engine stopped is refused with the shutdown error.
        if self.broken:
            raise BrokenThreadPool(self.broken)
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        engine = self.engine if self.owned else self.coordinator._engine
        if engine is None:
            if _interpreter_exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            raise RuntimeError("cannot schedule new futures after shutdown")
        f = _Future()
        f._core = self
        pending = self.pending
        pending[f] = None
        try:
            if self.initializer is None:
                token = _submit_call(_run_plain, (f, fn, args, kwargs), None, engine)
            else:
                token = _submit_call(_run_initialized, (self, f, fn, args, kwargs), None, engine)
        except ShutdownError as exc:
            # Exactly what concurrent.futures raises (the engine stopped, or the interpreter is exiting).
            pending.pop(f, None)
            f._core = None
            raise RuntimeError(str(exc)) from None
        except BaseException:
            pending.pop(f, None)
            f._core = None
            raise
        f._token = token
        token._add_thread_callback(f._on_token_done)
        return f

    # -- broken --------------------------------------------------------------------

    def initializer_failed(self) -> None:
        with self.lock:
            self.broken = _BROKEN_MESSAGE
            waiting = list(self.pending)
        for f in waiting:
            f._fail_broken(_BROKEN_MESSAGE)

    # -- shutdown ------------------------------------------------------------------

    def in_own_call(self) -> bool:
        """True on a worker thread running one of this executor's calls."""
        token = _tokengate.current_token()
        if token is None:
            return False
        token_id = token.token_id
        for f in list(self.pending):
            t = f._token
            if t is not None and t.token_id == token_id:
                return True
        return False

    def cancel_unclaimed(self) -> None:
        """``shutdown(cancel_futures=True)``: cancels the calls that no worker could have
        taken. As in ThreadPoolExecutor, whose ``max_workers`` threads each take the oldest
        queued call as soon as they are free: the oldest ``max_workers - running`` calls
        that have not started run; the newer ones are cancelled."""
        with self.lock:
            order = list(self.pending)
        free = self.max_workers - sum(1 for f in order if f.running())
        for f in order:
            if f.done() or f.running():
                continue
            if free > 0:
                free -= 1
                continue
            f.cancel()

    def request_stop(self) -> None:
        """shutdown(wait=False) / garbage collection: refuse new work; the private
        engine stops (without waiting) once the last pending call resolved."""
        with self.lock:
            self.shutdown = True
            if not self.owned or self.stopped:
                return
            self.stop_requested = True
            if self.pending:
                return
        self.deferred_stop()

    def deferred_stop(self) -> None:
        # May run on a worker thread (inside a token callback): use the engine
        # directly, never the coordinator's lock (another thread may hold it
        # while it joins this worker).
        with self.lock:
            if self.stopped or self.pending:
                return
            self.stopped = True
        engine = self.engine
        if engine is not None:
            _stop_without_join(engine)

    def stop_and_join(self) -> None:
        """shutdown(wait=True) of the private coordinator: run what is queued (what
        ``cancel_futures`` cancelled is already resolved), then join the workers."""
        engine = self.engine
        if engine is not None:
            engine.stop(wait=True)
        with self.lock:
            self.stopped = True
        self.coordinator.stop(wait=True)

    def wait_own(self) -> None:
        """shutdown(wait=True) on a shared coordinator: wait for this executor's calls."""
        while True:
            waiting = [f for f in list(self.pending) if not f.done()]
            if not waiting:
                return
            _cf.wait(waiting)


def _finalize(core: _Core) -> None:
    # Garbage collection without shutdown(): as shutdown(wait=False).
    core.request_stop()


class Executor(ThreadPoolExecutor):
    """A :class:`concurrent.futures.Executor` backed by tokengate tokens (see the module docs).

    ``max_workers``: workers of the private coordinator (default: what
    ``ThreadPoolExecutor`` picks, ``min(32, cpu_count + 4)``).
    ``thread_name_prefix``: its worker threads are named ``f"{prefix}_{i}"``, as
    ``ThreadPoolExecutor``'s are (the OS keeps the first 15 bytes).
    ``initializer(*initargs)``: runs once in each worker thread before its first call.
    ``coordinator``: submit to this running coordinator instead of a private one
    (``shutdown()`` then leaves it running; ``max_workers``, ``thread_name_prefix``,
    ``pin_workers`` and ``stack_size`` configure a private one and cannot be combined with it).
    ``pin_workers``, ``stack_size``: passed to the private coordinator (workers are not pinned by default).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        coordinator: OperationsCoordinator | None = None,
        pin_workers: bool = False,
        stack_size: int | None = None,
    ) -> None:
        # ThreadPoolExecutor.__init__ is not called: it would set up a queue and threads of its own.
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if not isinstance(thread_name_prefix, str):
            raise TypeError(f"thread_name_prefix must be a str, not {type(thread_name_prefix).__name__}")
        initargs = tuple(initargs)
        if coordinator is not None:
            if not isinstance(coordinator, OperationsCoordinator):
                raise TypeError(f"coordinator must be an OperationsCoordinator, not {type(coordinator).__name__}")
            given = [
                name
                for name, value in (
                    ("max_workers", max_workers),
                    ("thread_name_prefix", thread_name_prefix or None),
                    ("pin_workers", pin_workers or None),
                    ("stack_size", stack_size),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} configure(s) a private coordinator and cannot be combined with coordinator="
                )
            if not coordinator.is_running:
                raise RuntimeError("coordinator is not running: start it first")
            owned = False
            self._max_workers = coordinator.total_workers
            self._thread_name_prefix = coordinator.thread_name_prefix
        else:
            if max_workers is None:
                max_workers = _default_max_workers()
            _join_unjoined(0)  # forget engines of earlier executors whose workers exited
            # ThreadPoolExecutor's default, from its counter: threads named "ThreadPoolExecutor-0_0".
            self._thread_name_prefix = thread_name_prefix or f"ThreadPoolExecutor-{ThreadPoolExecutor._counter()}"  # type: ignore[attr-defined]
            coordinator = OperationsCoordinator(
                max_workers=max_workers,
                pin_workers=pin_workers,
                thread_name_prefix=self._thread_name_prefix,
                stack_size=stack_size,
                register_global=False,  # decorated calls never land on an executor's workers
            )
            coordinator.start()
            owned = True
            self._max_workers = max_workers
        # ThreadPoolExecutor's attribute, typed there as returning None (the call's value is ignored).
        self._initializer = cast("Callable[..., None] | None", initializer)
        self._initargs = initargs
        self._coordinator = coordinator
        self._core = _Core(coordinator, owned, initializer, initargs, self._max_workers)
        self._finalizer = weakref.finalize(self, _finalize, self._core)
        self._finalizer.atexit = False

    # -- ThreadPoolExecutor's state, for code that looks at it ---------------------

    @property
    def _shutdown(self) -> bool:  # type: ignore[override]
        return self._core.shutdown

    @property
    def _broken(self) -> str | bool:  # type: ignore[override]
        return self._core.broken

    @property
    def _threads(self) -> set[threading.Thread]:  # type: ignore[override]
        """The worker threads running now (``threading.Thread`` objects; join() waits for
        one to end). ThreadPoolExecutor's set also keeps threads that ended."""
        return self._coordinator._thread_book.threads()

    @property
    def coordinator(self) -> OperationsCoordinator:
        """The coordinator whose workers run the calls (private or the one given)."""
        return self._coordinator

    # -- Executor API --------------------------------------------------------------

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _cf.Future[_T]:
        """Schedules ``fn(*args, **kwargs)`` and returns a :class:`concurrent.futures.Future` for it."""
        return self._core.submit(fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        progress: ProgressOption = None,
    ) -> Iterator[_T]:
        """Like :func:`map`, with the calls running concurrently (results in order).

        ``timeout``: seconds for the whole iteration (``TimeoutError`` after).
        ``chunksize`` is accepted and ignored, as by ``ThreadPoolExecutor``.
        ``buffersize``: at most this many calls submitted ahead of the consumer
        (None: submit all at once), as in Python 3.14.
        ``progress``: a progress display on stderr of the items done (one per
        call, whatever ``chunksize``), from the first result asked for (``True``:
        tqdm when installed, else a plain line; only on a terminal unless
        ``"force"``; see :data:`tokengate.ProgressOption`).
        """
        if buffersize is not None and (not isinstance(buffersize, int) or isinstance(buffersize, bool)):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        check_option(progress)
        end_time = None if timeout is None else timeout + time.monotonic()

        # The length is read before the first calls take items, and only when a display will
        # show it (len() of a lazy container may run a query).
        total = total_of(iterables) if progress and buffersize and shows(progress) else None
        zipped = zip(*iterables)
        fs: deque[_cf.Future[_T]]
        if buffersize:
            fs = deque(self.submit(fn, *args) for args in itertools.islice(zipped, buffersize))
        else:
            fs = deque(self.submit(fn, *args) for args in zipped)
            total = len(fs)
        executor_ref = weakref.ref(self)
        desc = str(getattr(fn, "__name__", "map")) if progress else "map"

        # A closure, so that the calls are submitted before the first value is asked for.
        def result_iterator() -> Iterator[_T]:
            counter = WindowCounter(fs)
            session = start(progress, desc, total, counter) if progress else None
            try:
                while fs:
                    if buffersize:
                        executor = executor_ref()
                        if executor is not None:
                            args = next(zipped, None)
                            if args is not None:
                                fs.append(executor.submit(fn, *args))
                        executor = None
                    # Careful not to keep a reference to the popped future.
                    if end_time is None:
                        yield handed(counter, _result_or_cancel(fs.popleft()))
                    else:
                        yield handed(counter, _result_or_cancel(fs.popleft(), end_time - time.monotonic()))
            finally:
                for future in fs:
                    future.cancel()
                if session is not None:
                    session.close(counter.handed)

        return result_iterator()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops accepting work. ``cancel_futures``: cancel the calls no worker could
        have taken yet (see the module docs: as ThreadPoolExecutor).
        ``wait``: return once every call finished (and the private workers exited)."""
        core = self._core
        with core.lock:
            core.shutdown = True
        if cancel_futures:
            core.cancel_unclaimed()
        if wait and not core.in_own_call():
            if core.owned:
                core.stop_and_join()
            else:
                core.wait_own()
            self._finalizer.detach()
        else:
            core.request_stop()

    def __repr__(self) -> str:
        core = self._core
        state = "broken" if core.broken else "shutdown" if core.shutdown else "running"
        kind = "private" if core.owned else "shared"
        return f"<tokengate.Executor {state} max_workers={self._max_workers} coordinator={kind}>"

    # ThreadPoolExecutor internals that must never run here.
    def _adjust_thread_count(self) -> None:  # pragma: no cover
        raise NotImplementedError("tokengate.Executor has no thread pool of its own")

    def _initializer_failed(self) -> None:  # pragma: no cover
        self._core.initializer_failed()


def _result_or_cancel(fut: _cf.Future[_T], timeout: float | None = None) -> _T:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        # Break a reference cycle with the exception in fut._exception.
        del fut
