"""The process lane: tokens of ``process_pool: True`` operations run in worker processes.

A decorated function tagged ``process_pool: True`` (and no ``storage_speed``)
is a :class:`ProcessFunction`. Calling it returns an ordinary
:class:`~tokengate.TaskToken` (``result``, ``await``, ``cancel``, ``kill``,
done callbacks, ``gather``/``as_completed``), counted on the running
coordinator like any other token, but the body runs in one of the
coordinator's worker *processes*.

Design
------
* **One lane per running coordinator**, made on its first process token, with
  ``OperationsCoordinator(process_workers=N)`` processes (default: the logical
  cores this process may use). ``coordinator.stop()`` shuts it down.
* **A supervisor thread** (one Python thread per lane) owns everything: a
  priority queue (higher ``priority`` first, FIFO within a priority; a waiting
  token gains +1 per ``aging`` seconds like the thread lane), the deadlines,
  retry back-offs and the worker processes. It waits on one selector over the
  workers' sockets, their pidfds and a wake-up pipe, so crashes, results,
  submissions and deadlines all wake it at once.
* **Sending ahead.** A worker process runs its tokens one after another, in
  the order they were sent. How many it holds follows its measured time per
  token (a moving average): while that is 10 ms or more, one at a time (the
  round trip costs little next to them, and priorities and ``cancel()`` reach
  everything still queued in the lane); below, enough for about 10 ms of work
  and at most ``OperationsCoordinator(process_prefetch=64)``, sent in batches,
  so the process never waits for the supervisor between tokens and one
  message carries many. (A long token among short ones can therefore be sent
  ahead too, and hold the ones behind it.) The supervisor never blocks on a
  worker's socket: what the socket does not take waits in the worker's outbox
  until the selector says it can take more. A token sent to a
  process counts as running (ProcessPoolExecutor's call queue does the same):
  ``cancel()`` no longer stops it, ``kill()`` and deadlines still do. Each
  token's reply is sent the moment it ends; the supervisor handles every reply
  that has arrived each time it wakes.
* **Per-process supervision.** A shared word per process (:class:`_Board`)
  says which token it runs now, so the lane always knows. That is what makes
  the lane crash-safe and killable:

  - a worker that dies (``os._exit``, segfault, ``kill -9``) fails only the
    token it was running, with :class:`~tokengate.WorkerCrashedError` whose
    ``exitcode`` is the process's exit status (negative: the signal); the
    death is seen at once (socket EOF and pidfd, with a 1 s poll as a
    fallback) and the process is replaced;
  - a running token that passes its deadline (``timeout`` tag or per-call) or
    is killed (``token.kill()``, ``kill_token``, ``kill_all_by_operation``)
    has its process SIGKILLed, reaped and replaced: the work really stops;
    one still queued in a process is skipped there and never runs;
  - tokens queued in a process that died or was replaced go back to their
    place in the lane's queue (they never started) and run once elsewhere; a
    token that was queued in three processes that died fails with
    ``WorkerCrashedError`` (its own message may be what kills them).

* **Recycling** (as ProcessPoolExecutor's ``max_tasks_per_child``).
  ``OperationsCoordinator(process_max_tasks_per_child=N)`` retires a worker
  process once it has run N tokens; ``process_max_rss=BYTES`` retires one
  whose resident set is above BYTES when a token ends (that token still
  succeeds). Both default to None: a process serves until ``stop()``. A
  fresh process takes the retired one's slot; recycling never fails, loses
  or repeats a token:

  - a process is never sent more tokens than it has left: sending ahead
    stops at its budget (each token sent uses one unit; one listed on its
    board to be skipped gives its unit back, it never runs there);
  - a *retiring* process (budget used up, or RSS above the ceiling) is sent
    nothing more and runs what it holds. Once every token sent to it has
    answered (nothing in flight, nothing to skip, nothing in its outbox),
    the supervisor closes its socket and starts the replacement in the same
    step: the worker, idle in ``recv``, reads EOF and exits with status 0. It
    is reaped when its pidfd fires (without pidfds, polled on every
    supervisor wake-up), and SIGKILLed if it has not exited 5 s later. Its
    exit is never taken for a crash: its socket and pidfd left the
    selector's worker keys when it retired;
  - RSS is measured by the worker itself, only when ``process_max_rss`` is
    set: after each token, before its reply, it reads
    ``/proc/self/statm`` (one ``pread`` on an fd kept open, under a
    microsecond; the peak ``ru_maxrss`` where there is no ``/proc``) into the
    RSS word of its board (:class:`_Board`), and the supervisor compares that
    word with the ceiling as it handles the reply. In the worker because the
    value is exact for "after this token ended" and costs the one supervisor
    thread nothing: read from the parent, ``/proc/<pid>/statm`` would be a
    syscall per reply on the supervisor, taken while the worker may already
    run the next token sent ahead. The current RSS matters, not the peak: a
    token that frees what it allocated does not retire its process;
  - a retiring process that crashes, or whose running token is killed or
    times out, is replaced like any other (it counts as ``crashed`` or
    ``replaced``, not ``recycled``). While ``stop()`` runs, a retiring
    process is retired only if tokens are still queued for the lane;
    otherwise it is closed with the others (no fresh process is started
    only to be stopped).

  ``get_stats()['lanes']['process']['recycled']`` counts retired processes
  (``recycled_rss``: those retired for their RSS).

* **Why not loky's reusable executor for running tokens.** loky's executor
  cannot stop one running call, and a worker that dies breaks the whole
  executor (every pending future fails with ``TerminatedWorkerError``, not
  only the dead worker's); its process launcher also starts resource-tracker
  helper processes that outlive ``stop()``. We use loky for what the lane
  needs from it, serialization: functions, arguments and results that plain
  pickle cannot handle go through loky's pickler (cloudpickle with loky's
  reducers), so functions defined in ``__main__``, inside other functions, or
  lambdas work. Workers are started with ``subprocess`` (fork+exec of a fresh
  interpreter, keeping only the worker's socket: safe with the Rust threads
  of the parent, no inherited state, and nothing else started).
* **Functions** importable by name (module-level functions of a real module)
  are sent by reference: the worker imports the module and calls the
  undecorated function (``__wrapped__``); others go by value (cloudpickle).
  Either way a worker receives a function once and caches it.
* **Decorated calls inside a worker** raise :class:`~tokengate.NotStartedError`
  with a message saying so: no coordinator runs in a worker process. Call the
  plain function (``fn.__wrapped__(...)``) there instead.
* **Pickling errors.** Arguments are pickled in the calling thread; one that
  cannot be pickled fails *that token* with :class:`UnpicklableError` (a
  ``TypeError`` and ``pickle.PicklingError``) naming the argument and its type.
  A result (or the function) that cannot be pickled fails the token the same
  way; the lane stays usable.
* **Admission.** The coordinator's ``max_pending`` and ``operation_limits``
  apply (checked here, a caller waits or ``try_submit`` returns None);
  ``pause_admission``/``pause_operation`` hold queued process tokens;
  ``drain_*`` cancel the unstarted ones. ``retries`` retries a token whose
  function raised (not a crash, a timeout or a pickling error), with the same
  0.05 s doubling back-off. Tokens passed as arguments are awaited first and
  their values sent (``DependencyFailedError`` if one failed).
* ``weight`` and ``sticky_anchor`` have no further effect: a process runs one
  token at a time. Ctrl-C (SIGINT) is ignored in workers: the parent stops
  them. On Linux a worker also dies with its parent (``PR_SET_PDEATHSIG``).
* **Stopping.** ``stop()`` lets queued process tokens run (``cancel_pending``
  cancels them), then closes every worker and reaps it, with the retired
  processes that are still exiting (SIGKILLed after 2 s); when ``timeout``
  passes first, running process tokens end killed
  (``TaskKilledError('process_lane_stopped')``) and their processes are
  SIGKILLed. Interpreter exit does the same after the engines stopped.
* **Notes.** ``token.worker_id`` is the worker's slot (0..N-1); the lane's
  pids are in ``get_stats()['lanes']['process']['pids']``. Calls go to the
  newest running coordinator (also from inside a task of an older one).
  Thread done callbacks of process tokens run on the supervisor thread:
  keep them short and never wait there for another process token.
"""

from __future__ import annotations

import fcntl
import functools
import heapq
import itertools
import json
import mmap
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import weakref
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, cast

from ._decorator import CallWith, _map
from ._tokengate import OperationSpec, TaskToken
from .exceptions import (
    AdmissionRejectedError,
    DependencyFailedError,
    NotStartedError,
    ShutdownError,
    TaskKilledError,
    TaskTimeoutError,
    TokengateError,
    WorkerCrashedError,
)

__all__ = ["ProcessFunction", "ProcessLane", "UnpicklableError"]

_PROTO = pickle.HIGHEST_PROTOCOL
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_FKEYS = itertools.count(1)
#: True inside a worker process of the lane.
_IN_WORKER = False
#: A worker's reply: the token's seq and what follows (a pickled value, or (exception, traceback)).
_REPLY = struct.Struct("!qB")
_READY, _OK, _ERROR, _SKIPPED = range(4)
_LEN = struct.Struct("!i")
#: The lane keeps about this much work (seconds) sent ahead to each worker process: twice
#: CPython's default switch interval, so a supervisor kept waiting for the GIL by a thread
#: that submits a burst does not leave its processes idle.
_PREFETCH_WORK_S = 0.010
#: A token goes back to the queue at most this many times when processes die before starting it.
_MAX_REQUEUES = 3
_LEN64 = struct.Struct("!Q")
#: A retired worker process that has not exited this long after its socket closed is SIGKILLed.
_RETIRE_GRACE_S = 5.0


def _frames(buf: bytearray) -> list[bytes]:
    """Cuts the whole messages (multiprocessing's ``send_bytes`` framing) off the front of ``buf``."""
    out = []
    pos = 0
    while len(buf) - pos >= 4:
        (n,) = _LEN.unpack_from(buf, pos)
        head = 4
        if n == -1:
            if len(buf) - pos < 12:
                break
            (n,) = _LEN64.unpack_from(buf, pos + 4)
            head = 12
        if len(buf) - pos - head < n:
            break
        out.append(bytes(buf[pos + head : pos + head + n]))
        pos += head + n
    del buf[:pos]
    return out


def _frame_need(buf: bytearray) -> int:
    """Bytes still missing of the message begun in ``buf`` (0 when none is begun)."""
    if len(buf) < 4:
        return 0
    n: int = _LEN.unpack_from(buf, 0)[0]
    if n == -1:
        n = int(_LEN64.unpack_from(buf, 4)[0]) + 8 if len(buf) >= 12 else 8
    return max(0, n + 4 - len(buf))


class UnpicklableError(TokengateError, pickle.PicklingError, TypeError):
    """An argument, the function or the result of a process token could not be
    pickled to cross the process boundary. The message names what and its type."""


class _RemoteTraceback(Exception):
    """The worker-side traceback, attached as ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(TokengateError):
    """Stands in for a task exception that could not be sent back from the worker
    process (it could not be pickled). The message keeps its type and text."""


# -- serialization --------------------------------------------------------------------


def _cloud_dumps(obj: object) -> bytes:
    """loky's pickler: cloudpickle (by-value functions and classes) plus loky's reducers."""
    from loky.backend.reduction import dumps

    return bytes(dumps(obj, protocol=_PROTO))


def _dumps(obj: object) -> bytes:
    return _cloud_dumps(obj)


def _type_name(obj: object) -> str:
    t = type(obj)
    mod = getattr(t, "__module__", "")
    name = getattr(t, "__qualname__", t.__name__)
    return name if mod in ("builtins", "", None) else f"{mod}.{name}"


def _dump_args(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickles (args, kwargs); UnpicklableError naming the first argument that fails."""
    if all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values()):
        return pickle.dumps((args, kwargs), _PROTO)
    try:
        return _cloud_dumps((args, kwargs))
    except Exception as exc:
        first: BaseException = exc
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
        (f"keyword argument {k!r}", v) for k, v in kwargs.items()
    ]
    for what, value in named:
        try:
            _cloud_dumps(value)
        except Exception as exc:
            raise UnpicklableError(
                f"{op}: {what} ({_type_name(value)}) cannot be pickled for the process lane: {exc}"
            ) from exc
    raise UnpicklableError(f"{op}: the arguments cannot be pickled for the process lane: {first}") from first


def _resolve_qualname(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _function_payload(pf: ProcessFunction) -> tuple[str, Any, Any]:
    """("ref", module, qualname) when the worker can import the decorated function by
    name, else ("value", pickled function, None)."""
    fn = pf._fn
    mod = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(mod, str) and isinstance(qualname, str) and mod != "__main__" and "<locals>" not in qualname:
        module = sys.modules.get(mod)
        try:
            found = _resolve_qualname(module, qualname) if module is not None else None
        except Exception:
            found = None
        if found is pf or found is fn:
            return ("ref", mod, qualname)
    try:
        return ("value", _cloud_dumps(fn), None)
    except Exception as exc:
        raise UnpicklableError(
            f"{pf._op}: the function {qualname or fn!r} cannot be pickled for the process lane: {exc}"
        ) from exc


# -- the decorated function -----------------------------------------------------------


class ProcessFunction:
    """What ``@task_token_guard(tags={"process_pool": True})`` returns: calling it
    returns a token whose body runs in a worker process of the coordinator's
    process lane. Same attributes as the thread wrapper (``__wrapped__``,
    ``operation_type``, ``tags``, ``spec``, ``map``, ``options``, ``try_submit``,
    ``submit_async``)."""

    #: Marks the process-lane wrapper (the worker unwraps it).
    _tokengate_process_lane = True

    def __init__(self, spec: Any, fn: Any) -> None:
        from ._decorator import _arity

        functools.update_wrapper(self, fn)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        self._fn = fn
        self._name = name
        self._op: str = spec.operation_type
        self._min_pos, self._max_pos, self._fast, self._binder = _arity(fn, name)
        tags = spec.tags
        self._priority: int = int(tags.get("priority", 0))
        self._timeout: float | None = tags.get("timeout")
        retries = int(tags.get("retries", 0))
        if tags.get("allow_retries") is False:
            retries = 0
        self._retries = retries
        self._fkey = next(_FKEYS)
        self._payload: tuple[str, Any, Any] | None = None
        self.operation_type = spec.operation_type
        self.tags = spec.tags
        self.spec: OperationSpec = spec
        self.map = functools.partial(_map, self)
        self.options = functools.partial(CallWith, self._submit)
        self.try_submit = CallWith(self._submit, block=False)
        self.submit_async = CallWith(self._submit).submit_async

    def __call__(self, *args: Any, **kwargs: Any) -> TaskToken[Any]:
        return cast("TaskToken[Any]", self._submit(args, kwargs))  # block=True: a token, or it raises

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)

    def __repr__(self) -> str:
        return f"<process-lane function {self._name} operation_type={self._op!r}>"

    def __reduce__(self) -> Any:
        # A reference to this wrapper inside a pickled function (recursion, a helper
        # calling another decorated function) arrives in a worker as a stub whose
        # call raises a clear error.
        return (_worker_stub, (self._fn, self._op))

    def _payload_of(self) -> tuple[str, Any, Any]:
        payload = self._payload
        if payload is None:
            payload = self._payload = _function_payload(self)
        return payload

    def _check_arity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = len(args)
        if not kwargs and self._fast and n >= self._min_pos and (self._max_pos is None or n <= self._max_pos):
            return
        if self._binder is not None:
            self._binder(*args, **kwargs)

    def _submit(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        block: bool = True,
        admission_timeout: float | None = None,
        probe: bool = False,
    ) -> TaskToken[Any] | None:
        if _IN_WORKER:
            raise NotStartedError(_in_worker_message(self._name))
        self._check_arity(args, kwargs)
        coordinator = _current_coordinator()
        if coordinator is None:
            raise NotStartedError(
                "no OperationsCoordinator is running: start one (coordinator.start(), "
                "`with OperationsCoordinator():` or `async with OperationsCoordinator():`) "
                "before calling a @task_token_guard function"
            )
        lane = lane_for(coordinator)
        return lane.submit(self, args, kwargs, priority, timeout, retries, block, admission_timeout, probe)


def _in_worker_message(name: str) -> str:
    return (
        f"{name}(): decorated calls cannot be made inside a process-lane worker (pid {os.getpid()}): "
        "no OperationsCoordinator runs in a worker process. Call the plain function instead "
        f"({name}.__wrapped__(...))."
    )


class _WorkerStub:
    """A process-lane function as it arrives inside a worker (by reference from a pickled
    function): calling it raises; ``__wrapped__`` is the plain function."""

    def __init__(self, fn: Any, op: str) -> None:
        self.__wrapped__ = fn
        self._op = op
        self._name = getattr(fn, "__qualname__", op)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotStartedError(_in_worker_message(self._name))

    def __reduce__(self) -> Any:
        return (_worker_stub, (self.__wrapped__, self._op))


def _worker_stub(fn: Any, op: str) -> _WorkerStub:
    return _WorkerStub(fn, op)


def process_wrapper(spec: Any, fn: Any) -> ProcessFunction:
    """The decorator's hook: the wrapper of a ``process_pool: True`` function."""
    return ProcessFunction(spec, fn)


# -- finding the lane -----------------------------------------------------------------


#: (coordinator starts seen, weak reference to the newest running coordinator, its engine's pool id)
_newest: tuple[int, Any, int] = (-1, None, -1)


def _current_coordinator() -> Any:
    """The newest running coordinator that takes decorated calls (highest pool id).

    Cached until another coordinator starts or the cached one stops."""
    global _newest
    from ._coordinator import _live, _starts

    starts, ref, pool_id = _newest
    if starts == _starts[0] and ref is not None:
        c = ref()
        engine = c._engine if c is not None else None
        if engine is not None and engine.pool_id == pool_id and engine.running and c.register_global:
            return c
    starts = _starts[0]
    best = None
    best_id = -1
    for c in list(_live.values()):
        engine = c._engine
        if engine is not None and c.register_global and engine.running:
            pool_id = engine.pool_id
            if pool_id > best_id:
                best, best_id = c, pool_id
    _newest = (starts, None, -1) if best is None else (starts, weakref.ref(best), best_id)
    return best


_lane_lock = threading.Lock()


def lane_for(coordinator: Any) -> ProcessLane:
    """The coordinator's process lane, made on first use."""
    lane = coordinator._process_lane
    engine = coordinator._engine
    if lane is not None and lane.engine is engine:
        return cast(ProcessLane, lane)
    # Not coordinator._lock: stop() holds it while it waits for running tasks,
    # and a task may be the one making the first process call.
    with _lane_lock:
        engine = coordinator._engine
        if engine is None or not engine.running:
            raise ShutdownError("cannot schedule new futures after shutdown")
        lane = coordinator._process_lane
        if lane is None or lane.engine is not engine:
            workers = coordinator.process_workers
            if workers is None:
                from ._coordinator import _logical_cores

                workers = _logical_cores()
            lane = ProcessLane(
                engine,
                workers,
                aging=coordinator.aging,
                coordinator=coordinator,
                prefetch=coordinator.process_prefetch,
                max_tasks_per_child=coordinator.process_max_tasks_per_child,
                max_rss=coordinator.process_max_rss,
            )
            coordinator._process_lane = lane
    if not engine.running:
        # stop() began meanwhile and may have missed this lane: shut it down here.
        lane.shutdown(wait=True, timeout=5.0)
        raise ShutdownError("cannot schedule new futures after shutdown")
    return cast(ProcessLane, lane)


# -- the lane ---------------------------------------------------------------------------


class _Item:
    """One process token in the lane."""

    __slots__ = (
        "args",
        "attempt",
        "deadline",
        "done",
        "inputs",
        "key",
        "lock",
        "pf",
        "priority",
        "remaining",
        "requeues",
        "retries",
        "seq",
        "started",
        "timeout",
        "token",
        "worker",
    )

    def __init__(
        self, seq: int, token: Any, pf: ProcessFunction, priority: int, timeout: float | None, retries: int
    ) -> None:
        self.seq = seq
        self.token = token
        self.pf = pf
        self.args: bytes | None = None
        self.priority = priority
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.retries = retries
        self.attempt = 0
        self.started = False
        self.done = False
        self.worker: _Worker | None = None
        self.inputs: list[Any] | None = None
        self.remaining = 0
        self.lock: threading.Lock | None = None
        #: Its place in the lane's queue (kept when it goes back after a process died).
        self.key = 0.0
        #: Times a process died with this token sent to it but not started.
        self.requeues = 0


class _Board:
    """Memory the supervisor shares with one worker process, so that a kill is exact.

    Word 0 holds ``seq + 1`` of the token the worker runs now (0: none); only
    the worker writes it. Word 1 counts the listed tokens, words 2..n+1 hold
    ``seq + 1`` of tokens already sent to the worker that must not start (0:
    free); only the supervisor writes those. Word n+2 holds the worker's
    resident set size in bytes, written by the worker after each token and
    before its reply (only with ``process_max_rss``; 0: not measured), read by
    the supervisor as it handles the reply (no lock: one aligned word, and the
    reply orders the write before the read). Both sides decide under a POSIX
    record lock on the shared file:

    * the worker, before it starts a token: skip it if it is listed, else
      publish it in word 0;
    * the supervisor, to stop a token it sent: if word 0 names it, SIGKILL the
      process *while holding the lock* (so the worker cannot move on to its
      next token), else list it (so it never starts).

    A token is therefore either running and killed with its process, or
    skipped and never run; no other token is harmed. After a process died,
    word 0 tells which token it was running.
    """

    __slots__ = ("fd", "map", "n", "words")

    def __init__(self, fd: int, n: int) -> None:
        self.fd = fd
        self.n = n
        self.map = mmap.mmap(fd, 8 * (n + 3))
        self.words = memoryview(self.map).cast("q")

    @classmethod
    def create(cls, n: int) -> _Board:
        try:
            fd = os.memfd_create("tokengate-process-lane", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, 8 * (n + 3))
            return cls(fd, n)
        except BaseException:
            os.close(fd)
            raise

    def running(self) -> int | None:
        """Seq of the token the worker was running (read after it died), or None."""
        v = self.words[0]
        return v - 1 if v else None

    def rss(self) -> int:
        """The worker's resident set size (bytes) after its latest token (0: not measured)."""
        return int(self.words[self.n + 2])

    # worker side
    def begin(self, seq: int) -> bool:
        """Publishes ``seq`` as running, unless the supervisor listed it: then False."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if words[1] and seq + 1 in words[2 : self.n + 2].tolist():
                return False
            words[0] = seq + 1
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def end(self) -> None:
        """The token finished and its reply was sent (a kill that reads the stale word
        meanwhile only replaces an idle process)."""
        self.words[0] = 0

    def set_rss(self, value: int) -> None:
        """Publishes the worker's resident set size (bytes), before the reply of the token
        that just ended."""
        self.words[self.n + 2] = value

    # supervisor side
    def stop(self, seq: int, kill: Any) -> bool:
        """Stops token ``seq``: True if it was running (``kill()`` was called under
        the lock), False if it is listed to be skipped."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if words[0] == seq + 1:
                kill()
                return True
            for i in range(2, self.n + 2):
                if words[i] == 0:
                    words[i] = seq + 1
                    words[1] += 1
                    return False
            kill()  # pragma: no cover - the lane never has more tokens out than words
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def unlist(self, seq: int) -> None:
        """Frees the word of a listed token (its reply arrived)."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            for i in range(2, self.n + 2):
                if words[i] == seq + 1:
                    words[i] = 0
                    words[1] -= 1
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmaps and closes the board (idempotent: a retired worker's board is closed
        when it retires, never twice, so its fd number is never closed after reuse)."""
        if self.fd < 0:
            return
        try:
            self.words.release()
            self.map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


class _Worker:
    """One worker process: its socket, its board and the tokens sent to it, in order."""

    __slots__ = (
        "avg",
        "board",
        "conn",
        "funcs",
        "items",
        "left",
        "mark",
        "outbox",
        "over_rss",
        "pid",
        "pidfd",
        "proc",
        "rbuf",
        "ready",
        "retired_at",
        "skips",
        "slot",
        "spawned_at",
    )

    def __init__(
        self, slot: int, proc: subprocess.Popen[bytes], conn: Connection, pidfd: int | None, board: _Board
    ) -> None:
        self.slot = slot
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self.pidfd = pidfd
        self.board = board
        self.ready = False
        #: Tokens sent and not answered, in the order the worker runs them.
        self.items: deque[_Item] = deque()
        #: Seqs listed on the board to be skipped, until their reply arrives.
        self.skips: set[int] = set()
        self.funcs: set[int] = set()
        self.rbuf = bytearray()
        #: Bytes the socket did not take yet (the supervisor never blocks on a worker).
        self.outbox = bytearray()
        self.spawned_at = time.monotonic()
        #: When the worker began its current token, as the supervisor sees it.
        self.mark = 0.0
        #: Moving average of a token's time in the worker (None: nothing measured yet).
        self.avg: float | None = None
        #: Tokens it may still be sent before it retires (None: no ``process_max_tasks_per_child``).
        self.left: int | None = None
        #: Its RSS was above ``process_max_rss`` after a token: it retires.
        self.over_rss = False
        #: When it retired (its socket closed), while it is reaped.
        self.retired_at = 0.0

    @property
    def load(self) -> int:
        return len(self.items) + len(self.skips)


_BOOT = (
    "import json,os,sys\n"
    "p=os.environ.pop('TOKENGATE_PROCESS_LANE_PATH',None)\n"
    "if p is not None: sys.path[:]=json.loads(p)\n"
    "from tokengate._process import _child_main\n"
    "_child_main({fd},{ppid},{board},{slots},{rss})\n"
)

_LANES: weakref.WeakSet[ProcessLane] = weakref.WeakSet()


class ProcessLane:
    """The worker processes of one running coordinator and the supervisor thread that
    feeds them. Made by :func:`lane_for`; shut down by the coordinator's ``stop()``."""

    def __init__(
        self,
        engine: Any,
        workers: int,
        *,
        aging: float = 0.5,
        coordinator: Any = None,
        prefetch: int = 64,
        max_tasks_per_child: int | None = None,
        max_rss: int | None = None,
    ) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers <= 0:
            raise ValueError(f"process_workers must be a positive int, got {workers!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch <= 0:
            raise ValueError(f"process_prefetch must be a positive int, got {prefetch!r}")
        for name, value in (("process_max_tasks_per_child", max_tasks_per_child), ("process_max_rss", max_rss)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.engine = engine
        self.size = workers
        self.prefetch = prefetch
        #: A worker process retires after this many tokens (None: never).
        self.max_tasks_per_child = max_tasks_per_child
        #: A worker process retires when its RSS (bytes) is above this after a token (None: never).
        self.max_rss = max_rss
        self._aging = float(aging) if aging and aging > 0 else 0.5
        self._coordinator = weakref.ref(coordinator) if coordinator is not None else None
        self._lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self._seq = itertools.count()
        self._t0 = time.monotonic()
        self._heap: list[tuple[float, int, _Item]] = []
        self._timers: list[tuple[float, int, str, _Item]] = []
        self._events: list[_Item] = []
        self._waiting_inputs: set[_Item] = set()
        self._running: dict[int, _Item] = {}
        self._workers: list[_Worker | None] = [None] * workers
        self._respawn_at: list[float] = [0.0] * workers
        #: Workers that retire once every token sent to them has answered.
        self._retiring: set[_Worker] = set()
        #: Retired workers (socket closed) not reaped yet.
        self._retired: list[_Worker] = []
        self._startup_failures = 0
        self._sleeping = False
        self._closing = False
        self._cancel_pending = False
        self._abort = False
        self._exited = False
        self._counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "crashed": 0,
            "timeouts": 0,
            "killed": 0,
            "retries": 0,
            "spawned": 0,
            "replaced": 0,
            "unpicklable": 0,
            "recycled": 0,
            "recycled_rss": 0,
        }
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._rfd, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="tokengate-process-lane", daemon=True)
        _LANES.add(self)
        _ensure_exit_hook()
        self._thread.start()

    # -- submission (caller threads) --------------------------------------------------

    def submit(
        self,
        pf: ProcessFunction,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int | None,
        timeout: float | None,
        retries: int | None,
        block: bool,
        admission_timeout: float | None,
        probe: bool,
    ) -> TaskToken[Any] | None:
        coordinator = self._coordinator() if self._coordinator is not None else None
        limited = coordinator is not None and (
            coordinator.max_pending is not None or pf._op in coordinator.operation_limits
        )
        if limited:
            with self._admit_lock:
                if not self._admit(coordinator, pf._op, block, admission_timeout):
                    return None
                token = pf.spec.external_token(self.engine)
        else:
            token = pf.spec.external_token(self.engine)
        item = _Item(
            next(self._seq),
            token,
            pf,
            pf._priority if priority is None else priority,
            pf._timeout if timeout is None else timeout,
            pf._retries if retries is None else retries,
        )
        token._add_thread_callback(self._on_token_done)
        inputs = [a for a in args if type(a) is TaskToken]
        inputs += [v for v in kwargs.values() if type(v) is TaskToken]
        with self._lock:
            self._counts["submitted"] += 1
            if item.deadline is not None:
                heapq.heappush(self._timers, (item.deadline, item.seq, "deadline", item))
                self._wake_locked()
        if inputs:
            self._wait_for_inputs(item, args, kwargs, inputs)
        else:
            self._prepare(item, args, kwargs)
        return token

    def _admit(self, coordinator: Any, op: str, block: bool, admission_timeout: float | None) -> bool:
        deadline = None if admission_timeout is None else time.monotonic() + float(admission_timeout)
        delay = 0.0005
        while True:
            if not self.engine.running:
                raise ShutdownError("cannot schedule new futures after shutdown")
            stats = self.engine.stats()
            max_pending = coordinator.max_pending
            op_limit = coordinator.operation_limits.get(op)
            full_global = max_pending is not None and stats["admission"]["pending"] >= max_pending
            op_stats = stats["operations"].get(op)
            full_op = op_limit is not None and op_stats is not None and op_stats["pending"] >= op_limit
            if not (full_global or full_op):
                return True
            if not block:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                what = f"operation {op!r}" if full_op else "the coordinator"
                raise AdmissionRejectedError(f"{what} is full and no slot freed within {admission_timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _prepare(self, item: _Item, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pickles function and arguments in the calling thread, then queues the item."""
        try:
            item.pf._payload_of()
            item.args = _dump_args(item.pf._op, args, kwargs)
        except UnpicklableError as exc:
            with self._lock:
                self._counts["unpicklable"] += 1
            item.done = True
            item.token._set_exception(exc)
            return
        self._enqueue(item)

    def _enqueue(self, item: _Item) -> None:
        key = item.key = (time.monotonic() - self._t0) / self._aging - item.priority
        with self._lock:
            if self._exited:
                item.done = True
                exited = True
            else:
                exited = False
                heapq.heappush(self._heap, (key, item.seq, item))
                self._wake_locked()
        if exited:
            item.token._set_exception(ShutdownError("cannot schedule new futures after shutdown"))

    def _wake_locked(self) -> None:
        if self._sleeping and not self._exited:
            self._sleeping = False
            try:
                os.write(self._wfd, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _wait_for_inputs(self, item: _Item, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[Any]) -> None:
        item.inputs = inputs
        item.remaining = len(inputs) + 1
        item.lock = threading.Lock()
        with self._lock:
            self._waiting_inputs.add(item)

        def input_done(_token: Any) -> None:
            assert item.lock is not None
            with item.lock:
                item.remaining -= 1
                ready = item.remaining == 0
            if ready:
                self._inputs_ready(item, args, kwargs)

        for t in inputs:
            t._add_thread_callback(input_done)
        input_done(None)

    def _inputs_ready(self, item: _Item, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._lock:
            self._waiting_inputs.discard(item)
        if item.token.done():
            item.done = True
            return
        for t in item.inputs or ():
            if t.state != "completed":
                try:
                    cause = t.exception(timeout=0)
                except BaseException as exc:  # cancelled
                    cause = exc
                err = DependencyFailedError(
                    f"input token {t.token_id} ({t.operation_type}) ended {t.state}: the call that received it never ran"
                )
                err.input_token_id = t.token_id
                err.__cause__ = cause
                item.done = True
                item.token._set_exception(err)
                return
        sub = {id(t): t.result(timeout=0) for t in item.inputs or ()}
        args = tuple(sub[id(a)] if type(a) is TaskToken else a for a in args)
        kwargs = {k: (sub[id(v)] if type(v) is TaskToken else v) for k, v in kwargs.items()}
        self._prepare(item, args, kwargs)

    def _on_token_done(self, token: Any) -> None:
        """Any token of the lane resolved. One still running in a process was killed or
        timed out from outside: the supervisor terminates its process."""
        item = self._running.get(token.token_id)
        if item is not None and not item.done:
            with self._lock:
                self._events.append(item)
                self._wake_locked()

    # -- control ------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> bool:
        """Stops the lane. Queued tokens still run (``cancel_pending``: they are
        cancelled). ``wait``: block until the lane is idle and every process has
        exited; after ``timeout`` seconds, queued tokens are cancelled and running
        ones killed (their processes terminated). Returns True when the supervisor
        and every process are gone."""
        with self._lock:
            self._closing = True
            self._cancel_pending = self._cancel_pending or cancel_pending
            self._sleeping = True
            self._wake_locked()
        if not wait:
            return False
        if threading.current_thread() is self._thread:  # a done callback stopping its coordinator
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._abort = True
                self._sleeping = True
                self._wake_locked()
            self._thread.join()
        return True

    @property
    def pids(self) -> list[int]:
        """Pids of the worker processes alive now."""
        return [w.pid for w in list(self._workers) if w is not None]

    def pid_of(self, token: Any) -> int | None:
        """Pid of the process running ``token`` (None when it is not running)."""
        item = self._running.get(token.token_id)
        worker = item.worker if item is not None else None
        return worker.pid if worker is not None else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            workers = [w for w in self._workers if w is not None]
            out: dict[str, Any] = dict(self._counts)
            out.update(
                workers=self.size,
                alive=len(workers),
                ready=sum(1 for w in workers if w.ready),
                busy=sum(1 for w in workers if w.items),
                in_flight=sum(len(w.items) for w in workers),
                prefetch=self.prefetch,
                max_tasks_per_child=self.max_tasks_per_child,
                max_rss=self.max_rss,
                queued=sum(1 for _, _, it in self._heap if not it.done and not it.token.done()),
                waiting_inputs=len(self._waiting_inputs),
                pids=[w.pid for w in workers],
                closing=self._closing,
            )
        return out

    # -- supervisor thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            for slot in range(self.size):
                self._spawn(slot)
            self._loop()
        except BaseException:  # pragma: no cover - a bug: fail what is left rather than hang
            import logging

            logging.getLogger("tokengate.pool").exception("process lane supervisor failed")
            self._abort = True
        finally:
            self._finish()

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                events, self._events = self._events, []
                closing, abort, cancel = self._closing, self._abort, self._cancel_pending
            if abort:
                return
            for item in events:
                w = item.worker
                if w is not None:
                    self._stop_item(w, item)
            if closing and cancel:
                self._cancel_queued()
            self._fire_timers(now)
            if self._retiring:
                self._retire_idle(closing)
            if self._retired:
                self._reap_retired(now)
            self._respawn(now)
            held = self._dispatch(closing)
            with self._lock:
                if self._closing and self._idle_locked():
                    self._exited = True
                    return
                if self._events or self._abort or (self._closing and self._cancel_pending and self._heap):
                    continue
                idle = any(self._room(w) for w in self._workers)
                if self._heap and idle and not held:
                    continue  # submitted meanwhile
                wait_s = 0.02 if held else 1.0
                if self._timers:
                    wait_s = min(wait_s, max(0.0, self._timers[0][0] - time.monotonic()))
                if any(t > 0 for t in self._respawn_at):
                    wait_s = min(wait_s, max(0.0, min(t for t in self._respawn_at if t > 0) - time.monotonic()))
                self._sleeping = True
            ready = self._sel.select(wait_s)
            with self._lock:
                self._sleeping = False
            for key, mask in ready:
                if key.data is None:
                    try:
                        while os.read(self._rfd, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                kind, w = key.data
                if kind == "retired":  # a retired process exited
                    self._reaped(w)
                    continue
                if self._workers[w.slot] is not w:
                    continue
                if kind == "conn":
                    if mask & selectors.EVENT_WRITE and not self._flush(w):
                        continue
                    if mask & selectors.EVENT_READ and self._workers[w.slot] is w:
                        self._read(w)
                else:  # pidfd: the process exited
                    self._died(w)
            if not ready:
                self._poll_exits()

    def _idle_locked(self) -> bool:
        if self._running or any(not it.token.done() for it in self._waiting_inputs):
            return False
        if any(not it.done and not it.token.done() for _, _, it in self._heap):
            return False
        return not any(kind == "retry" and not it.token.done() for _, _, kind, it in self._timers)

    def _pause_state(self) -> tuple[bool, frozenset[str]]:
        """The engine's pause flags: (admission paused, paused operations)."""
        try:
            paused, ops = self.engine.pause_state() if self.engine.running else (False, ())
        except Exception:
            paused, ops = False, ()
        return paused, frozenset(ops)

    def _room(self, w: _Worker | None) -> int:
        """How many tokens to send ``w`` now. One at a time while its tokens take 10 ms
        or more (or nothing is measured yet): then the round trip costs little and
        priorities and ``cancel()`` act on everything queued. Shorter tokens are
        sent ahead, enough for about 10 ms of work, at most ``prefetch``; a worker
        is topped up once half of that is done (fewer, larger messages). Never more
        than the tokens it has left before it retires; nothing to a retiring one."""
        if w is None or not w.ready or w.over_rss:
            return 0
        depth = 1 if w.avg is None else max(1, min(self.prefetch, 1 + int(_PREFETCH_WORK_S / max(w.avg, 1e-6))))
        load = w.load
        room = depth - load if load <= depth // 2 else 0
        left = w.left
        return room if left is None or room <= left else left

    def _dispatch(self, closing: bool) -> bool:
        """Sends queued tokens to workers with room. True when a pause holds some back."""
        workers = [w for w in self._workers if w is not None and self._room(w)]
        if not workers or not self._heap:
            return False
        room = [self._room(w) for w in workers]
        paused, paused_ops = self._pause_state()  # one call into the engine, under a microsecond
        held: list[tuple[float, int, _Item]] = []
        batches: dict[int, list[_Item]] = {}
        try:
            while True:
                k = max(range(len(workers)), key=room.__getitem__)  # the emptiest worker first
                if not room[k]:
                    break
                with self._lock:
                    if not self._heap:
                        break
                    entry = heapq.heappop(self._heap)
                item = entry[2]
                if item.done or item.token.done():
                    item.done = True
                    continue
                if paused or item.pf._op in paused_ops:
                    if closing:  # stop() cancels tokens held by a pause
                        if not item.token.cancel():  # sent once already: it counts as running
                            item.token._set_exception(ShutdownError("cannot schedule new futures after shutdown"))
                        item.done = True
                    else:
                        held.append(entry)
                    continue
                w = workers[k]
                if not item.started:
                    if not item.token._start(w.slot):
                        item.done = True  # cancelled, killed or timed out before it started
                        continue
                    item.started = True
                batches.setdefault(k, []).append(item)
                room[k] -= 1
        finally:
            if held:
                with self._lock:
                    for entry in held:
                        heapq.heappush(self._heap, entry)
        for k, items in batches.items():
            self._send(workers[k], items)
        return bool(held)

    def _send(self, w: _Worker, items: list[_Item]) -> None:
        """One message with every token for ``w``; each counts as running from now on (as
        in ProcessPoolExecutor's call queue: ``cancel()`` no longer stops it, ``kill()`` does)."""
        batch = []
        for item in items:
            pf = item.pf
            fpayload = None if pf._fkey in w.funcs else pf._payload
            w.funcs.add(pf._fkey)
            batch.append((item.seq, pf._fkey, fpayload, item.args))
            w.items.append(item)
            item.worker = w
            self._running[item.token.token_id] = item
        if w.load == len(items):  # it was idle: its first token begins now
            w.mark = time.monotonic()
        if w.left is not None:
            w.left -= len(items)  # _room never gives more than it has left
            if w.left <= 0:
                self._retiring.add(w)
        data = pickle.dumps(batch, _PROTO)
        w.outbox += _LEN.pack(len(data)) if len(data) < 0x7FFFFFFF else _LEN.pack(-1) + _LEN64.pack(len(data))
        w.outbox += data
        if not self._flush(w):
            return
        for item in items:
            if item.token.done() and item.worker is w:  # killed while we were sending
                self._stop_item(w, item)

    def _stop_item(self, w: _Worker, item: _Item) -> None:
        """A token sent to ``w`` was killed or timed out: SIGKILL its process if it runs
        now, else have the worker skip it (see :class:`_Board`)."""
        if item not in w.items or self._workers[w.slot] is not w:
            return
        if w.board.stop(item.seq, w.proc.kill):
            self._replace(w, killed=True)
            return
        self._finish_item(w, item)
        w.skips.add(item.seq)
        if w.left is not None:
            w.left += 1  # it never runs there: its unit of the budget comes back

    def _flush(self, w: _Worker) -> bool:
        """Writes what the socket takes of ``w``'s outbox (never blocks: a worker busy with
        a long token may leave its socket full); the selector reports when it can take more.
        False when the worker is gone."""
        fd = w.conn.fileno()
        try:
            while w.outbox:
                n = os.write(fd, w.outbox[: 1 << 20])
                del w.outbox[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._died(w)
            return False
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if w.outbox else 0)
        try:
            if self._sel.get_key(fd).events != events:
                self._sel.modify(fd, events, ("conn", w))
        except (KeyError, ValueError):
            pass
        return True

    def _read(self, w: _Worker) -> None:
        """Reads what the socket holds (one read) and handles every whole reply in it."""
        try:
            data = os.read(w.conn.fileno(), min(max(1 << 16, _frame_need(w.rbuf)), 1 << 22))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died(w)
            return
        w.rbuf += data
        for frame in _frames(w.rbuf):
            self._handle(w, frame)

    def _drain(self, w: _Worker) -> None:
        """Handles every reply already in ``w``'s socket, without waiting (the socket is
        non-blocking; after the process exited this is what it sent before it died)."""
        fd = w.conn.fileno() if not w.conn.closed else -1
        while fd >= 0:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:  # BlockingIOError: nothing more now
                break
            if not data:
                break
            w.rbuf += data
        for frame in _frames(w.rbuf):
            self._handle(w, frame)

    def _handle(self, w: _Worker, data: bytes) -> None:
        seq, kind = _REPLY.unpack_from(data)
        if kind == _READY:
            w.ready = True
            self._startup_failures = 0
            return
        if seq in w.skips:
            w.skips.discard(seq)
            w.board.unlist(seq)
        elif self.max_rss is not None and not w.over_rss and w.board.rss() > self.max_rss:
            w.over_rss = True  # a token ended with the process above the ceiling: it retires
            self._retiring.add(w)
        item = next((it for it in w.items if it.seq == seq), None)
        if item is None:
            return  # a token that was killed meanwhile
        self._finish_item(w, item)
        now = time.monotonic()
        took = now - w.mark
        w.avg = took if w.avg is None else 0.8 * w.avg + 0.2 * took
        w.mark = now
        if kind == _SKIPPED:  # pragma: no cover - the worker skips only listed tokens
            self._requeue(item, w.pid)
            return
        try:
            payload = pickle.loads(memoryview(data)[_REPLY.size :])
        except BaseException as exc:
            self._fail(item, UnpicklableError(f"{item.pf._op}: the worker's reply could not be unpickled: {exc!r}"))
            return
        if kind == _OK:
            if not item.token.done():  # counted first: a waiter woken by the result sees it
                self._count("completed")
            item.token._set_result(payload)
            return
        value, tb = payload
        if tb:
            try:
                value.__cause__ = _RemoteTraceback(tb)
            except Exception:
                pass
        if item.attempt < item.retries and not isinstance(value, UnpicklableError) and not item.token.done():
            item.attempt += 1
            self._count("retries")
            when = time.monotonic() + 0.05 * (2 ** (item.attempt - 1))
            with self._lock:
                heapq.heappush(self._timers, (when, item.seq, "retry", item))
            self._running[item.token.token_id] = item  # still ours (kill during back-off)
            return
        self._fail(item, value)

    def _finish_item(self, w: _Worker, item: _Item) -> None:
        try:
            w.items.remove(item)
        except ValueError:
            pass
        item.worker = None
        self._running.pop(item.token.token_id, None)

    def _requeue(self, item: _Item, pid: int) -> None:
        """A token sent to a process that died before starting it goes back to its place
        in the queue; after the third such death it fails (a token whose message itself
        kills the worker, say by exhausting its memory, must not loop for ever)."""
        item.worker = None
        self._running.pop(item.token.token_id, None)
        if item.done or item.token.done():
            item.done = True
            return
        item.requeues += 1
        if item.requeues >= _MAX_REQUEUES:
            self._count("crashed")
            self._fail(
                item,
                WorkerCrashedError(
                    f"token {item.token.token_id} ({item.pf._op}): {item.requeues} worker processes died with it "
                    f"queued in them, before it started (the last: pid {pid})"
                ),
            )
            return
        with self._lock:
            heapq.heappush(self._heap, (item.key, item.seq, item))

    def _fail(self, item: _Item, exc: BaseException, state: str = "failed") -> None:
        item.done = True
        self._running.pop(item.token.token_id, None)
        if not item.token.done():  # counted first: a waiter woken by the error sees it
            self._count({"failed": "failed", "timeout": "timeouts", "killed": "killed"}[state])
            if isinstance(exc, UnpicklableError):
                self._count("unpicklable")
        item.token._set_exception(exc, state)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _fire_timers(self, now: float) -> None:
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, kind, item = heapq.heappop(self._timers)
            if kind == "retry":
                self._running.pop(item.token.token_id, None)
                if item.token.done() or item.done:
                    item.done = True
                    continue
                key = item.key = (now - self._t0) / self._aging - item.priority
                with self._lock:
                    heapq.heappush(self._heap, (key, item.seq, item))
                continue
            # deadline
            w = item.worker
            if w is not None and self._workers[w.slot] is w:
                self._drain(w)  # a reply that arrived in time wins
            if item.token.done():
                continue
            exc = TaskTimeoutError(f"token {item.token.token_id} ({item.pf._op}) passed its deadline ({item.timeout}s)")
            w = item.worker
            item.done = True
            if w is not None:
                self._stop_item(w, item)  # a running process is gone before waiters wake
            self._running.pop(item.token.token_id, None)
            if not item.token.done():
                self._count("timeouts")
            item.token._set_exception(exc, "timeout")

    # -- processes ----------------------------------------------------------------------

    def _set_worker(self, slot: int, w: _Worker | None) -> None:
        """Fills or empties a slot; the engine's books count the live workers (``tokengate_workers``)."""
        self._workers[slot] = w
        self.engine._note_process_workers(sum(x is not None for x in self._workers))

    def _spawn(self, slot: int) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        env = dict(os.environ)
        env["TOKENGATE_PROCESS_LANE_PATH"] = json.dumps([p for p in sys.path if isinstance(p, str)])
        board = None
        try:
            board = _Board.create(self.prefetch)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT.format(
                        fd=fd, ppid=os.getpid(), board=board.fd, slots=board.n, rss=int(self.max_rss is not None)
                    ),
                ],
                pass_fds=(fd, board.fd),
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            parent_sock.close()
            if board is not None:
                board.close()
            self._set_worker(slot, None)
            self._startup_failed(slot, f"the process lane could not start a worker process: {exc}", None)
            return
        finally:
            child_sock.close()
        parent_sock.setblocking(False)  # the supervisor never blocks on a worker (see _flush)
        conn = Connection(parent_sock.detach())
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(proc.pid)
            except OSError:
                pidfd = None
        w = _Worker(slot, proc, conn, pidfd, board)
        w.left = self.max_tasks_per_child
        self._set_worker(slot, w)
        self._respawn_at[slot] = 0.0
        self._sel.register(conn.fileno(), selectors.EVENT_READ, ("conn", w))
        if pidfd is not None:
            self._sel.register(pidfd, selectors.EVENT_READ, ("pidfd", w))
        self._count("spawned")

    def _retire_idle(self, closing: bool) -> None:
        """Retires every retiring worker that has nothing in flight (see Recycling)."""
        for w in list(self._retiring):
            if self._workers[w.slot] is not w:  # it died or was replaced meanwhile
                self._retiring.discard(w)
            elif not (w.over_rss or (w.left is not None and w.left <= 0)):
                self._retiring.discard(w)  # a skipped token gave budget back
            elif w.load or w.outbox:
                continue  # it still runs what it was sent
            elif closing and not self._heap:
                continue  # stop() closes it with the others: no fresh process just to stop it
            else:
                self._retire(w)

    def _retire(self, w: _Worker) -> None:
        """Closes an idle worker's socket (it reads EOF and exits) and starts a fresh one in
        its slot. The old process is reaped when its pidfd fires (see :meth:`_reaped`)."""
        self._retiring.discard(w)
        self._set_worker(w.slot, None)
        self._close_conn(w)
        w.board.close()
        w.retired_at = time.monotonic()
        if w.pidfd is not None:
            try:
                self._sel.modify(w.pidfd, selectors.EVENT_READ, ("retired", w))
            except (KeyError, ValueError):
                pass
        self._retired.append(w)
        if not self._abort:
            self._spawn(w.slot)
        with self._lock:  # counted last: whoever sees the count sees the fresh process too
            self._counts["recycled"] += 1
            self._counts["recycled_rss"] += w.over_rss

    def _reaped(self, w: _Worker) -> None:
        """A retired process exited (its pidfd fired): reap it and close its pidfd."""
        if w.proc.poll() is None:
            return  # pragma: no cover - a pidfd fires only on exit
        self._close_pidfd(w)
        try:
            self._retired.remove(w)
        except ValueError:
            pass

    def _reap_retired(self, now: float) -> None:
        """Reaps retired processes that exited (without pidfds this is how they are seen);
        SIGKILLs one still there ``_RETIRE_GRACE_S`` after its socket closed."""
        for w in list(self._retired):
            if w.proc.poll() is not None:
                self._reaped(w)
            elif now - w.retired_at > _RETIRE_GRACE_S:
                try:
                    w.proc.kill()
                except OSError:
                    pass

    def _close_conn(self, w: _Worker) -> None:
        """Unregisters and closes the worker's socket (if still open)."""
        if w.conn.closed:
            return
        try:
            self._sel.unregister(w.conn.fileno())
        except (KeyError, ValueError):
            pass
        try:
            w.conn.close()
        except OSError:
            pass

    def _close_pidfd(self, w: _Worker) -> None:
        """Unregisters and closes the worker's pidfd (if it has one)."""
        if w.pidfd is None:
            return
        try:
            self._sel.unregister(w.pidfd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(w.pidfd)
        except OSError:
            pass
        w.pidfd = None

    def _close(self, w: _Worker) -> None:
        self._close_conn(w)
        self._close_pidfd(w)
        w.board.close()

    def _reap(self, w: _Worker, grace: float) -> int:
        try:
            return w.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                w.proc.kill()
            except OSError:
                pass
            return w.proc.wait()

    def _salvage(self, w: _Worker) -> _Item | None:
        """After ``w``'s process exited: handles the replies it sent, then puts the tokens
        it never started back in the queue. Returns the one it was running (None if none)."""
        self._drain(w)
        running = w.board.running()
        victim = None
        for item in list(w.items):
            if item.seq == running:
                self._finish_item(w, item)
                victim = item
            else:
                self._requeue(item, w.pid)
        w.items.clear()
        return victim

    def _replace(self, w: _Worker, killed: bool = False) -> None:
        """SIGKILLs a worker whose running token was killed or timed out (``killed``: that
        was done already) and starts another; tokens it had not started go back to the queue."""
        if not killed:
            try:
                w.proc.kill()
            except OSError:
                pass
        self._reap(w, 5.0)
        victim = self._salvage(w)
        if victim is not None:
            victim.done = True
        self._close(w)
        self._count("replaced")
        self._set_worker(w.slot, None)
        if not self._abort:
            self._spawn(w.slot)

    def _died(self, w: _Worker) -> None:
        """The worker's socket hit EOF or its pidfd fired: it exited."""
        if self._workers[w.slot] is not w:
            return
        code = self._reap(w, 2.0)
        item = self._salvage(w)
        self._close(w)
        self._set_worker(w.slot, None)
        if item is not None and not item.token.done():
            why = f"signal {-code}" if code < 0 else f"exit code {code}"
            try:
                if code < 0:
                    why = f"{signal.Signals(-code).name} (exit code {code})"
            except ValueError:
                pass
            self._count("crashed")
            self._fail(
                item,
                WorkerCrashedError(
                    f"the worker process (pid {w.pid}) running token {item.token.token_id} ({item.pf._op}) died: {why}",
                    exitcode=code,
                ),
            )
        if self._abort:
            return
        if not w.ready:
            self._startup_failed(
                w.slot, f"a worker process of the process lane died while starting: exit code {code}", code
            )
        else:
            self._spawn(w.slot)

    def _startup_failed(self, slot: int, message: str, code: int | None) -> None:
        """A worker could not start. Retried at once twice; from the third failure in a
        row on, the queued tokens fail (a broken environment must not hang them) and
        the slot is retried every second."""
        self._startup_failures += 1
        if self._startup_failures < 3:
            self._spawn(slot)
            return
        err = WorkerCrashedError(message, exitcode=code)
        with self._lock:
            queued, self._heap = self._heap, []
        for _, _, it in queued:
            if not it.done:
                it.done = True
                it.token._set_exception(err)
        self._respawn_at[slot] = time.monotonic() + 1.0

    def _respawn(self, now: float) -> None:
        for slot, at in enumerate(self._respawn_at):
            if at and at <= now and self._workers[slot] is None:
                self._respawn_at[slot] = 0.0
                self._spawn(slot)

    def _poll_exits(self) -> None:
        """Fallback without pidfds: notice an exited process within the 1 s wait."""
        for w in list(self._workers):
            if w is not None and w.pidfd is None and w.proc.poll() is not None:
                self._died(w)

    def _cancel_queued(self) -> None:
        with self._lock:
            queued, self._heap = self._heap, []
        for _, _, item in queued:
            item.done = True
            if not item.token.cancel():
                item.token._set_exception(ShutdownError("cannot schedule new futures after shutdown"))

    def _finish(self) -> None:
        """Supervisor exit: fail what is left, terminate every process, close fds."""
        with self._lock:
            self._exited = True
            queued, self._heap = self._heap, []
            timers, self._timers = self._timers, []
            waiting = list(self._waiting_inputs)
        for _, _, item in queued:
            if not item.done and not item.token.cancel():
                item.token._set_exception(ShutdownError("cannot schedule new futures after shutdown"))
        for item in waiting:
            item.token._set_exception(ShutdownError("cannot schedule new futures after shutdown"))
        for _, _, kind, item in timers:
            if kind == "retry":
                item.token._set_exception(TaskKilledError("process_lane_stopped"), "killed")
        for item in list(self._running.values()):
            item.token._set_exception(TaskKilledError("process_lane_stopped"), "killed")
        self._running.clear()
        workers = [w for w in self._workers if w is not None]
        retired, self._retired = self._retired, []
        self._retiring.clear()
        for w in workers:  # EOF: an idle worker exits at once
            self._close(w)
        for w in workers:
            if w.items:
                try:
                    w.proc.kill()
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        for w in workers + retired:  # retired ones read EOF already and are exiting
            self._reap(w, max(0.0, deadline - time.monotonic()))
        for w in retired:
            self._close(w)
        self._workers = [None] * self.size
        self.engine._note_process_workers(0)
        try:
            self._sel.close()
        except Exception:
            pass
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass


# -- interpreter exit ---------------------------------------------------------------------

_hook_lock = threading.Lock()
_hook_registered = False


def _shutdown_all_lanes() -> None:
    for lane in list(_LANES):
        try:
            lane.shutdown(wait=True, timeout=10.0)
        except Exception:
            pass


def _ensure_exit_hook() -> None:
    """Registers, once, a hook that stops every lane at interpreter exit (after the
    engines stopped, which lets queued process tokens finish first)."""
    global _hook_registered
    with _hook_lock:
        if _hook_registered:
            return
        _hook_registered = True
        register = getattr(threading, "_register_atexit", None)
        try:
            if register is not None:
                register(_shutdown_all_lanes)
            else:  # pragma: no cover
                import atexit

                atexit.register(_shutdown_all_lanes)
        except RuntimeError:  # interpreter already shutting down
            pass


# -- the worker process ---------------------------------------------------------------------


def _set_parent_death_signal(ppid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    if os.getppid() != ppid:  # the parent died before we got here
        os._exit(0)


def _load_function(payload: Any) -> Any:
    kind, a, b = payload
    if kind == "ref":
        import importlib

        obj = _resolve_qualname(importlib.import_module(a), b)
        if getattr(obj, "_tokengate_process_lane", False) or isinstance(obj, _WorkerStub):
            obj = obj.__wrapped__
        return obj
    fn = pickle.loads(a)
    return fn


def _reply_error(seq: int, exc: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb = f'\n"""\n{tb}"""'
    exc.__traceback__ = None
    head = _REPLY.pack(seq, _ERROR)
    try:
        data = _dumps((exc, tb))
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt
        return head + data
    except BaseException as err:
        stand_in = RemoteError(
            f"{_type_name(exc)}: {exc} (the exception could not be sent back from the worker process: {err!r})"
        )
        return head + _dumps((stand_in, tb))


def _run_task(funcs: dict[int, Any], payloads: dict[int, Any], seq: int, fkey: int, args_payload: bytes) -> bytes:
    try:
        fn = funcs.get(fkey)
        if fn is None:
            payload = payloads.get(fkey)
            if payload is None:
                raise RuntimeError("the worker process lost the function of this token")
            fn = funcs[fkey] = _load_function(payload)
        args, kwargs = pickle.loads(args_payload)
    except BaseException as exc:
        return _reply_error(seq, exc)
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        if isinstance(exc, NotStartedError) and hasattr(exc, "add_note") and "process-lane worker" not in str(exc):
            exc.add_note(
                f"tokengate: this call ran inside a process-lane worker (pid {os.getpid()}), where no "
                "coordinator runs; call the plain function (fn.__wrapped__) there"
            )
        return _reply_error(seq, exc)
    finally:
        _flush_std_streams()
    try:
        if type(value) in _PLAIN:
            return _REPLY.pack(seq, _OK) + pickle.dumps(value, _PROTO)
        return _REPLY.pack(seq, _OK) + _dumps(value)
    except BaseException as exc:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        err = UnpicklableError(
            f"the result of {name} ({_type_name(value)}) cannot be pickled to leave the worker process: {exc}"
        )
        return _reply_error(seq, err)


def _flush_std_streams() -> None:
    """Flushes this process's stdout and stderr, ignoring streams that cannot be flushed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _rss_reader() -> Any:
    """A function returning this process's resident set size in bytes: one ``pread`` of
    ``/proc/self/statm`` on an fd kept open (under a microsecond); where there is no
    ``/proc``, the peak (``ru_maxrss``)."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        page = os.sysconf("SC_PAGE_SIZE")

        def current() -> int:
            return int(os.pread(fd, 256, 0).split()[1]) * page

        current()
        return current
    except (OSError, ValueError, IndexError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _child_main(fd: int, ppid: int, board_fd: int, slots: int, measure_rss: int = 0) -> None:
    """Entry point of a worker process: run the tokens sent over the socket, in order,
    until EOF. Each message is a batch; each token gets its own reply as soon as it ends.
    ``measure_rss``: publish the RSS on the board after each token (``process_max_rss``).
    EOF is also how a retired worker is told to exit (the lane sends it nothing more
    and closes its socket only once every token it was sent has answered)."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal(ppid)
    os.set_inheritable(fd, False)
    os.set_inheritable(board_fd, False)
    conn = Connection(fd)
    board = _Board(board_fd, slots)
    funcs: dict[int, Any] = {}
    payloads: dict[int, Any] = {}
    local: deque[tuple[int, int, Any, bytes]] = deque()
    rss = _rss_reader() if measure_rss else None
    code = 0
    try:
        conn.send_bytes(_REPLY.pack(-1, _READY) + pickle.dumps(os.getpid(), _PROTO))
        while True:
            if not local:
                try:
                    msg = conn.recv_bytes()
                except (EOFError, OSError):
                    break
                for seq, fkey, fpayload, args_payload in pickle.loads(msg):
                    if fpayload is not None and fkey not in funcs:
                        payloads[fkey] = fpayload  # kept even if this token is skipped
                    local.append((seq, fkey, fpayload, args_payload))
            seq, fkey, _, args_payload = local.popleft()
            if not board.begin(seq):
                conn.send_bytes(_REPLY.pack(seq, _SKIPPED))
                continue
            reply = _run_task(funcs, payloads, seq, fkey, args_payload)
            if rss is not None:
                try:
                    board.set_rss(rss())
                except Exception:  # a token closed the fd, say: never lose the reply for it
                    pass
            conn.send_bytes(reply)
            board.end()
    except (EOFError, OSError):
        pass
    except BaseException:  # pragma: no cover
        traceback.print_exc()
        code = 1
    _flush_std_streams()
    os._exit(code)
