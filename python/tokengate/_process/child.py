"""A worker process of the lane: its main loop (:func:`_child_main`, started by
:data:`.workers._BOOT`) and how it runs one token.

* A worker runs the tokens sent to it one after another, in the order they
  were sent. Each message is a batch; each token gets its own reply (see
  :mod:`.wire`). Before it starts a token it asks its board
  (:class:`~tokengate._process.board._Board`): a listed token is skipped,
  any other is published as running.
* Replies of short tokens go out together: a reply is staged on the board,
  and the staged replies are sent in one write before the worker waits for
  more work, before it starts a token of a function whose calls are not known
  to take under :data:`_SHORT_CALL`, and once the oldest has waited 2 ms:
  between tokens, and while a call runs on, from a flusher thread of Rust's
  that needs no interpreter (``ReplyOutbox``, ``src/engine/reply_stage.rs``).
  One write and one wake-up of the supervisor then serve many tokens. A staged
  reply is never lost: the supervisor reads the stage of a process that died.
* It loads each function once (by reference or by value, see
  :mod:`.payload`) and caches it.
* With ``process_max_rss`` it publishes its resident set size on its board
  after each token, before that token's reply.
* No coordinator runs in a worker: a decorated call made there raises
  :class:`~tokengate.NotStartedError`. Ctrl-C (SIGINT) is ignored in workers:
  the parent stops them. On Linux a worker also dies with its parent
  (``PR_SET_PDEATHSIG``). EOF on its socket makes it exit (that is also how a
  retired worker is told to exit).
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
import traceback
from collections import deque
from multiprocessing.connection import Connection
from time import perf_counter
from typing import Any

from .._tokengate import ProcessBoard, ReplyOutbox
from ..exceptions import NotStartedError
from . import wrapper
from .payload import _PROTO, RemoteError, UnpicklableError, _cloud_dumps, _dumps_result, _resolve_qualname, _type_name
from .wire import _ERROR, _OK, _READY, _REPLY, _SKIPPED
from .wrapper import _WorkerStub

#: A function whose calls take less than this (moving average) runs with earlier replies staged.
_SHORT_CALL = 0.001


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


def _run_chunk(fn: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
    """The calls of one chunk of ``fn.map(..., chunksize=n)``, in turn: their results."""
    return [fn(*args) for args in calls]


def _load_function(payload: Any) -> Any:
    kind, a, b = payload
    if kind == "chunk":  # a chunked map's: the function's own payload
        return functools.partial(_run_chunk, _load_function(a))
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
        data = _cloud_dumps((exc, tb))
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt
        return head + data
    except BaseException as err:
        stand_in = RemoteError(
            f"{_type_name(exc)}: {exc} (the exception could not be sent back from the worker process: {err!r})"
        )
        return head + _cloud_dumps((stand_in, tb))


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
        return _call_reply(seq, fn, args, kwargs, "a process-lane worker")
    finally:
        _flush_std_streams()


def _call_reply(seq: int, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> bytes:
    """Calls ``fn`` and encodes what it returned or raised as the reply for ``seq``
    (decoded by :func:`tokengate._process.replies.decode_reply`); ``where`` names the kind
    of worker in the note a decorated call made there gets."""
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        if isinstance(exc, NotStartedError) and hasattr(exc, "add_note") and where not in str(exc):
            exc.add_note(
                f"tokengate: this call ran inside {where} (pid {os.getpid()}), where no "
                "coordinator runs; call the plain function (fn.__wrapped__) there"
            )
        return _reply_error(seq, exc)
    try:
        data = _dumps_result(value)
        return _REPLY.pack(seq, _OK) + data
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
    until EOF. Each message is a batch; each token gets its own reply (see the module docs).
    ``measure_rss``: publish the RSS on the board after each token (``process_max_rss``).
    EOF is also how a retired worker is told to exit (the lane sends it nothing more
    and closes its socket only once every token it was sent has answered)."""
    wrapper._IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal(ppid)
    os.set_inheritable(fd, False)
    os.set_inheritable(board_fd, False)
    conn = Connection(fd)
    board = ProcessBoard(board_fd, slots)
    funcs: dict[int, Any] = {}
    payloads: dict[int, Any] = {}
    local: deque[tuple[int, int, Any, bytes]] = deque()
    rss = _rss_reader() if measure_rss else None
    out = ReplyOutbox(board, fd, 1)  # after the ready message
    calls: dict[int, float] = {}  # function key -> moving average seconds per call
    code = 0
    try:
        conn.send_bytes(_REPLY.pack(-1, _READY) + pickle.dumps(os.getpid(), _PROTO))
        while True:
            if not local:
                out.flush()
                try:
                    msg = conn.recv_bytes()
                except (EOFError, OSError):
                    break
                for seq, fkey, fpayload, args_payload in pickle.loads(msg):
                    if fpayload is not None and fkey not in funcs:
                        payloads[fkey] = fpayload  # kept even if this token is skipped
                    local.append((seq, fkey, fpayload, args_payload))
            seq, fkey, _, args_payload = local.popleft()
            call = calls.get(fkey)
            if out.due(call, _SHORT_CALL):
                out.flush()
            if not board.begin(seq):
                out.put(_REPLY.pack(seq, _SKIPPED))
                continue
            began = perf_counter()
            reply = _run_task(funcs, payloads, seq, fkey, args_payload)
            took = perf_counter() - began
            calls[fkey] = took if call is None else 0.8 * call + 0.2 * took
            if rss is not None:
                try:
                    board.set_rss(rss())
                except Exception:  # a token closed the fd, say: never lose the reply for it
                    pass
            out.put(reply)
            board.end()
    except (EOFError, OSError):
        pass
    except BaseException:  # pragma: no cover
        traceback.print_exc()
        code = 1
    _flush_std_streams()
    os._exit(code)
