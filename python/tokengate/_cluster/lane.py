"""What every cluster lane shares: one dispatcher thread between the engine's queue and a cluster.

A cluster lane (:class:`~.dask_lane.DaskLane`, :class:`~.ray_lane.RayLane`)
subclasses :class:`ClusterLane` and supplies the cluster's side: connecting,
its capacity, sending one call, reading what finished, cancelling, closing.

# Protocol

* **Room.** The lane keeps at most the cluster's capacity in flight (its
  threads or CPUs, read again every 0.5 s, so it follows workers as they come
  and go), measured in the lane's cost per token, plus a little sent ahead
  (``send_ahead``, in the same units): without it each task would wait a
  scheduler round trip after the one before. The engine's queue decides what goes out (priorities,
  aging, pauses and per-operation limits hold across the cluster).
* **Completion.** The cluster's callback (on one of its threads) appends an
  entry to ``_done`` and, unless one is pending, writes a byte to the lane's pipe. The dispatcher
  reads every finished entry per wake-up (:meth:`ClusterLane._settle`) and
  reports each token once: ``finish``, or ``fail`` (the engine retries it while
  it has ``retries`` left).
* **Lost workers.** A task whose worker or node was lost comes back as the
  cluster's own error; the lane turns it into
  :class:`~tokengate.exceptions.WorkerLostError` (the engine retries it, or the
  token fails with it).
* **Tokens as arguments.** The engine holds a token until its input tokens
  resolve. An input that is a token of the same lane stays on the cluster: the
  call carries a marker for it (and the input itself, under a keyword the
  engine fills with its value), the lane keeps the input's handle on the
  cluster (a Dask future, a Ray ``ObjectRef``) when it finishes, and sends the
  dependent with that handle in the marker's place, so the value goes from
  worker to worker, not back through this process. An input that finished
  before the link was made goes as its value.
* **Stop notices.** A taken token killed or timed out comes back from the
  engine: the lane cancels its remote task.
* **Who touches what.** Only the dispatcher thread touches ``_inflight`` and
  the cluster's blocking calls; callbacks only append to ``_done`` (a deque)
  and write to the pipe. ``shutdown`` sets flags under ``_lock`` and wakes it.
* **Stopping.** ``shutdown`` lets queued and running tokens finish
  (``cancel_pending``: queued ones are cancelled); the dispatcher exits once
  nothing of the lane is left, or at once on ``abort`` (the timeout passed):
  running tokens end killed (``TaskKilledError('cluster_lane_stopped')``) and
  their remote tasks are cancelled. Then the lane disconnects, and stops what
  it started.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import threading
import time
from typing import Any

from .._exit_hooks import shutdown_at_exit
from .._tokengate import TaskToken
from ..exceptions import TaskKilledError, WorkerLostError

#: How often the lane reads the cluster's capacity again (seconds).
_CAPACITY_EVERY = 0.5

#: How long ``shutdown`` waits for the dispatcher once its timeout passed (seconds).
_ABORT_WAIT = 10.0

#: Most input handles the lane keeps for calls not sent yet (a call cancelled meanwhile never
#: takes its input's back: the oldest go first past this).
_KEPT_MAX = 4096

#: The keyword under which a linked input token travels through the engine (its value comes back there).
_INPUT_KEY = "__tokengate_input_{}__"

_log = logging.getLogger("tokengate.cluster")


def has_links(kwargs: dict[str, Any]) -> bool:
    """Whether a call's keyword arguments carry linked input tokens (see :meth:`ClusterLane.link_inputs`)."""
    return _INPUT_KEY.format(0) in kwargs


class _Input:
    """Stands for linked input ``index`` (token ``token_id``) in a cluster call's arguments."""

    __slots__ = ("index", "token_id")

    def __init__(self, index: int, token_id: int) -> None:
        self.index = index
        self.token_id = token_id


class ClusterLane:
    """The cluster lane of one running coordinator (see the module docs).

    Subclasses set ``name`` and ``send_ahead`` and implement ``_connect``,
    ``_warm_up``, ``_read_capacity``, ``_send_call``, ``_settle``, ``_cancel``
    and ``_disconnect``; ``_cost`` when a token may take more or less than one
    unit of capacity."""

    name = "cluster"
    #: Capacity units sent beyond the cluster's capacity (see the module docs).
    send_ahead = 0.0

    def __init__(self, engine: Any, target: Any) -> None:
        self.engine = engine
        self._connect(target)
        try:
            self._warm_up()
            self.outside = engine.add_outside_lane(self.name)
            self._start()
        except BaseException:
            outside = getattr(self, "outside", None)
            if outside is not None:
                outside.close()
            self._disconnect()
            raise

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._done: collections.deque[Any] = collections.deque()
        self._signalled = False
        #: Token id -> (task, handle on the cluster, cost) of what was sent and not reported.
        self._inflight: dict[int, tuple[Any, Any, float]] = {}
        self._used = 0.0
        #: Inputs of calls not sent yet: token id -> how many calls wait for it.
        self._wanted: dict[int, int] = {}
        #: Handles of finished input tokens that calls still want, by token id.
        self._kept: dict[int, Any] = {}
        #: Inputs each linked call (by token id) has not sent or released yet.
        self._links: dict[int, list[int]] = {}
        self._capacity = 0.0
        self._capacity_at = 0.0
        self._closing = False
        self._cancel_pending = False
        self._abort = False
        self._exited = threading.Event()
        self._counts = {
            "completed": 0,
            "failed": 0,
            "retries": 0,
            "lost": 0,
            "cancelled": 0,
            "linked": 0,
            "batched": 0,  # tokens sent several to a remote task (the Ray lane's batches)
        }
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._thread = threading.Thread(target=self._run, name=f"tokengate-{self.name}-lane", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self._rfd)
            os.close(self._wfd)
            raise
        shutdown_at_exit(self)

    # -- the cluster's side (subclasses) ----------------------------------------------------

    def _connect(self, target: Any) -> None:
        raise NotImplementedError

    def _warm_up(self) -> None:
        """Runs one first task, so that what the cluster starts on first use exists before the
        interpreter exits (at exit Python 3.12+ refuses to start threads, and the lane's
        tokens still finish then; see ``tokengate._exit_hooks.shutdown_at_exit``)."""
        raise NotImplementedError

    def _read_capacity(self) -> float:
        """What the cluster can run at once, in cost units (0 while it cannot be reached)."""
        raise NotImplementedError

    def _cost(self, task: Any) -> float:
        """Capacity one running token takes (at most 1)."""
        return 1.0

    def _send_call(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cost: float) -> Any:
        """Sends the call; returns its handle, after arranging that the cluster's callback
        puts an entry for ``task.id`` in ``_done`` (see :meth:`_on_done`). Raises when it
        cannot be sent (the token fails, without a retry)."""
        raise NotImplementedError

    def _settle(self) -> None:
        """Reports every entry in ``_done`` through :meth:`_finish_ok` and :meth:`_failed`."""
        raise NotImplementedError

    def _cancel(self, handles: list[Any], force: bool) -> None:
        """Cancels remote tasks (errors are the caller's to ignore)."""
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Closes what the lane opened and stops what it started; never raises."""
        raise NotImplementedError

    # -- control --------------------------------------------------------------------------

    def link_inputs(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], list[int]]:
        """A cluster call's arguments with each unresolved input token of this lane's kind
        linked (see the module docs), and the linked token ids: hand them to
        :meth:`linked` with the call's token, or to :meth:`release` if there is none.
        Other tokens stay as they are (the engine sends their values)."""
        out_kwargs: dict[str, Any] = {}
        ids: list[int] = []

        def link(v: Any) -> Any:
            if type(v) is not TaskToken or v.lane != self.name or v.done():
                return v
            out_kwargs[_INPUT_KEY.format(len(ids))] = v
            ids.append(v.token_id)
            return _Input(len(ids) - 1, v.token_id)

        new_args = tuple(link(a) for a in args)
        new_kwargs = {k: link(v) for k, v in kwargs.items()}
        new_kwargs.update(out_kwargs)
        with self._lock:
            for tid in ids:
                self._wanted[tid] = self._wanted.get(tid, 0) + 1
        return new_args, new_kwargs, ids

    def linked(self, token: Any, ids: list[int]) -> None:
        """``token``'s call wants inputs ``ids``: its first send takes them, or its end
        releases them (each link is released exactly once)."""
        with self._lock:
            self._links[token.token_id] = ids
        token._add_thread_callback(lambda t: self.release(self._take_links(t.token_id)))

    def _take_links(self, token_id: int) -> list[int]:
        with self._lock:
            return self._links.pop(token_id, [])

    def release(self, ids: list[int]) -> None:
        """Inputs ``ids`` are wanted by one call less (its handle, once none wants it, goes)."""
        with self._lock:
            for tid in ids:
                left = self._wanted.get(tid, 1) - 1
                if left > 0:
                    self._wanted[tid] = left
                else:
                    self._wanted.pop(tid, None)
                    self._kept.pop(tid, None)

    def _unlink(self, task: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with linked inputs replaced: a kept handle (first send
        only), or the value the engine filled in."""
        args, kwargs = task.args, task.kwargs
        if not has_links(kwargs):
            return args, kwargs
        kwargs = dict(kwargs)
        values: list[Any] = []
        while _INPUT_KEY.format(len(values)) in kwargs:
            values.append(kwargs.pop(_INPUT_KEY.format(len(values))))
        ids = self._take_links(task.id)  # empty on a retry: the values go
        with self._lock:
            kept = {tid: self._kept[tid] for tid in ids if tid in self._kept}
            self._counts["linked"] += len(kept)
        self.release(ids)

        def resolve(v: Any) -> Any:
            if type(v) is not _Input:
                return v
            handle = kept.get(v.token_id)
            return handle if handle is not None else values[v.index]

        return tuple(resolve(a) for a in args), {k: resolve(v) for k, v in kwargs.items()}

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> bool:
        """Stops the lane (see the module docs). True when the dispatcher has exited."""
        with self._lock:
            self._closing = True
            self._cancel_pending = self._cancel_pending or cancel_pending
        self._wake()
        if not wait or threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._abort = True
            self._wake()
            # The dispatcher may be inside a call to the cluster; it ends what it holds
            # when that returns.
            self._thread.join(_ABORT_WAIT)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        out.update(self.outside.stats())
        out.update(capacity=self._capacity, in_flight=len(self._inflight), closing=self._closing)
        return out

    def _wake(self) -> None:
        with self._lock:  # never a write to a descriptor closed (and maybe reused) at exit
            if self._wfd < 0:
                return
            try:
                os.write(self._wfd, b"\0")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def _on_done(self, entry: Any) -> None:
        """A remote task finished (a thread of the cluster's client). One byte goes to the
        pipe per dispatcher round, not per task: the dispatcher clears ``_signalled``
        before it reads ``_done``, and the entry is appended before the flag is read."""
        self._done.append(entry)
        if not self._signalled:
            self._signalled = True
            self._wake()

    # -- dispatcher thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # pragma: no cover - a bug: fail what is left rather than hang
            _log.exception("the %s lane's dispatcher failed", self.name)
        finally:
            self._finish()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._rfd, selectors.EVENT_READ)
        sel.register(self.outside.wake_fd, selectors.EVENT_READ)
        try:
            while True:
                with self._lock:
                    closing, abort, cancel = self._closing, self._abort, self._cancel_pending
                if abort:
                    return
                if closing and cancel:
                    self.outside.cancel_queued()
                self._signalled = False
                self._settle()
                now = time.monotonic()
                if now - self._capacity_at >= _CAPACITY_EVERY:
                    self._capacity_at = now
                    self._capacity = self._read_capacity()
                    self.outside.set_workers(int(self._capacity))
                if self._take_and_send():
                    continue
                if closing and not self._inflight and not self._done and self.outside.pending == 0:
                    return
                for key, _ in sel.select(_CAPACITY_EVERY):
                    if key.fd == self._rfd:
                        try:
                            while os.read(self._rfd, 4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self.outside.clear_wake()
        finally:
            sel.close()

    def _take_and_send(self) -> bool:
        """Takes what the cluster has room for and sends it; handles the stop notices.
        True when it got anything. (A function of its own: the tasks it took, which
        hold their tokens and so their results, are not kept alive while the lane sleeps.)"""
        # Each token costs at most 1: taking int(room) never passes the room.
        tasks, stopped = self.outside.take(max(0, int(self._room() + 1e-9)))
        if stopped:
            self._stop(stopped)
        for task in tasks:
            self._send(task)
        return bool(tasks or stopped)

    def _room(self) -> float:
        """Capacity units free for sending now (see the module docs)."""
        return self._capacity + (self.send_ahead if self._capacity else 0) - self._used

    def _send(self, task: Any) -> None:
        cost = self._cost(task)
        try:
            args, kwargs = self._unlink(task)
            handle = self._send_call(task, args, kwargs, cost)
        except Exception as exc:  # pickling, or the client is closed
            with self._lock:
                self._counts["failed"] += 1
            self.outside.fail(task, exc, retry=False)
            return
        self._inflight[task.id] = (task, handle, cost)
        self._used += cost

    def _pop(self, token_id: int) -> tuple[Any, Any] | None:
        """(task, handle) of a token in flight, no longer counted in it; None if it is not."""
        entry = self._inflight.pop(token_id, None)
        if entry is None:
            return None
        self._used = max(0.0, self._used - entry[2]) if self._inflight else 0.0
        return entry[0], entry[1]

    def _watch_again(self, task: Any, handle: Any) -> None:
        """Counts a token in flight again (its remote task turned out not to be done)."""
        cost = self._cost(task)
        self._inflight[task.id] = (task, handle, cost)
        self._used += cost

    def _finish_ok(self, task: Any, value: Any, handle: Any) -> None:
        """Reports a token's value; ``handle`` (None when it has none of its own) stays on the
        cluster for the calls that want the token as an input."""
        if handle is not None and task.id in self._wanted:  # an input of calls not sent yet: keep it on the cluster
            with self._lock:
                if task.id in self._wanted:
                    self._kept[task.id] = handle
                    if len(self._kept) > _KEPT_MAX:  # calls cancelled before they were sent
                        oldest = next(iter(self._kept))
                        self._kept.pop(oldest)
                        self._wanted.pop(oldest, None)
        if not task.token.done():  # counted first: a waiter woken by the result sees it
            with self._lock:
                self._counts["completed"] += 1
        self.outside.finish(task, value)

    def _lost(self, task: Any, cause: BaseException, what: str) -> WorkerLostError:
        lost = WorkerLostError(f"token {task.id} ({task.operation_type}): {what}")
        lost.__cause__ = cause
        return lost

    def _failed(self, task: Any, exc: BaseException, retry: bool = True, note_lost: bool = True) -> None:
        """Reports a failed attempt (retried while the token has ``retries`` left, unless not
        ``retry``). A :class:`WorkerLostError` counts a lost worker unless not ``note_lost``
        (the other tokens of a batch lost with the same worker)."""
        lost = isinstance(exc, WorkerLostError)
        if lost and note_lost:
            self.outside.note_lost()
        with self._lock:
            if lost:
                self._counts["lost"] += 1
            self._counts["retries" if retry and task.retries_left > 0 else "failed"] += 1
        self.outside.fail(task, exc, retry=retry)

    def _stop(self, stopped: list[int]) -> None:
        handles = []
        for seq in stopped:
            entry = self._pop(seq)
            if entry is not None:
                handles.append(entry[1])
        if handles:
            with self._lock:
                self._counts["cancelled"] += len(handles)
            try:
                self._cancel(handles, True)
            except Exception:
                pass

    def _finish(self) -> None:
        """Dispatcher exit: cancel what is queued, end what runs, disconnect."""
        self.outside.close()
        self.outside.set_workers(0)
        handles = []
        for task, handle, _ in list(self._inflight.values()):
            handles.append(handle)
            self.outside.fail(task, TaskKilledError("cluster_lane_stopped"), retry=False, state="killed")
        self._inflight.clear()
        self._used = 0.0
        if handles:
            try:
                self._cancel(handles, True)
            except Exception:
                pass
        self._disconnect()
        with self._lock:
            fds, self._rfd, self._wfd = (self._rfd, self._wfd), -1, -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._exited.set()
