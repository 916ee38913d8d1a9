"""Worker processes: starting them, and what happens when one dies or is replaced.

Workers are started with ``subprocess`` (fork+exec of a fresh interpreter
running :data:`_BOOT`, keeping only the worker's socket and its board: safe
with the Rust threads of the parent, no inherited state, and nothing else
started). Each fills a slot (0..N-1, ``token.worker_id``) of the lane.

* A worker that dies (``os._exit``, segfault, ``kill -9``) fails only the
  token it was running, with :class:`~tokengate.WorkerCrashedError` whose
  ``exitcode`` is the process's exit status (negative: the signal); the
  death is seen at once (socket EOF and pidfd, with a 1 s poll as a
  fallback) and the process is replaced.
* A running token that passes its deadline (``timeout`` tag or per-call) or
  is killed (``token.kill()``, ``kill_token``, ``kill_all_by_operation``)
  has its process SIGKILLed, reaped and replaced: the work really stops.
* Tokens queued in a process that died or was replaced go back to their
  place in the lane's queue (they never started) and run once elsewhere (see
  :meth:`~tokengate._process.state._LaneState._requeue`).
* A worker that cannot start is retried at once twice; from the third
  failure in a row on, the queued tokens fail and the slot is retried every
  second.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import Connection

from .._tokengate import BatchOutbox, ReplyReader
from ..exceptions import WorkerCrashedError
from .board import _Board
from .state import _Item, _LaneState


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
        "ready",
        "received",
        "replies",
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
        #: Cuts its replies off what its socket gives (in Rust: ``src/engine/wire.rs``).
        self.replies = ReplyReader()
        #: Whole messages read from its socket (see ``_Board.staged``).
        self.received = 0
        #: Batches the socket did not take yet (the supervisor never blocks on a worker; in
        #: Rust: ``src/engine/wire.rs``).
        self.outbox = BatchOutbox()
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


#: What a worker process runs (``python -c``): the parent's ``sys.path``, then :func:`.child._child_main`.
_BOOT = (
    "import json,os,sys\n"
    "p=os.environ.pop('TOKENGATE_PROCESS_LANE_PATH',None)\n"
    "if p is not None: sys.path[:]=json.loads(p)\n"
    "from tokengate._process.child import _child_main\n"
    "_child_main({fd},{ppid},{board},{slots},{rss})\n"
)


class _Processes(_LaneState):
    """The lane's part that starts, replaces and reaps worker processes (supervisor thread)."""

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

    def _salvage(self, w: _Worker, stopped: _Item | None = None) -> _Item | None:
        """After ``w``'s process exited: handles the replies it sent and those it had staged
        on its board, then puts the tokens it never started back in the queue. Returns the
        one it was running (None if none): ``stopped`` when the supervisor killed it for
        that token (the board may then name a token published and never started, see
        :class:`~tokengate._process.board._Board`), else the one the board names."""
        self._read_replies(w)
        running = stopped.wire if stopped is not None else w.board.running()
        victim = None
        for item in list(w.items):
            if item.wire == running:
                self._finish_item(w, item)
                victim = item
            else:
                self._requeue(item, w.pid)
        w.items.clear()
        return victim

    def _replace(self, w: _Worker, stopped: _Item) -> None:
        """Reaps a worker SIGKILLed because its running token ``stopped`` was killed or
        timed out (reported already), and starts another; tokens it had not started go
        back to the queue."""
        self._reap(w, 5.0)
        victim = self._salvage(w, stopped)
        if victim is not None:
            victim.done = True
            self._running.pop(victim.seq, None)
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
        if item is not None and not item.task.token.done():
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
                    f"the worker process (pid {w.pid}) running token {item.seq} ({item.pf._op}) died: {why}",
                    exitcode=code,
                ),
                retry=False,
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
        while True:  # every queued token fails
            tasks, stopped = self.outside.take(1024)
            for seq in stopped:
                self._stopped(seq)
            if not tasks:  # take() skips dead jobs itself: none means the queue is empty
                break
            for task in tasks:
                self._fail(_Item(task), err, retry=False)
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
