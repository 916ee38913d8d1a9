"""The Dask lane: one dispatcher thread between the engine's queue and a ``distributed.Client``.

# Protocol

* **Room.** The lane keeps at most one token per cluster thread
  (``client.nthreads()``, read again every 0.5 s, so capacity follows workers
  as they come and go) plus 64 sent ahead in the scheduler. The engine's
  queue decides what goes out (priorities, aging, pauses and per-operation
  limits hold across the cluster), and Dask starts what was sent ahead in
  ``priority`` order as threads free up; without it each task would wait a
  scheduler round trip after the one before. Each token goes out with
  ``client.submit(RemoteCall, args, kwargs, key=..., priority=...,
  pure=False)``, under a key of its own per attempt.
* **Completion.** A future's done callback (on the client's event loop)
  appends the token id to ``_done`` and writes a byte to the lane's pipe.
  The dispatcher gathers the finished results in one call per wake-up and
  reports each token once: ``finish``, or ``fail`` (the engine retries it
  while it has ``retries`` left).
* **Lost workers.** A task whose worker was lost fails with Dask's
  ``KilledWorker`` (at once on tokengate's own local clusters, see
  :mod:`.connect`): the token is retried, or fails with
  :class:`~tokengate.exceptions.WorkerLostError`.
* **Tokens as arguments.** The engine holds a token until its input tokens
  resolve. An input that is a token of this lane stays on the cluster: the
  call carries a marker for it (and the input itself, under a keyword the
  engine fills with its value), the lane keeps the input's Dask future when
  it finishes, and sends the dependent with that future in the marker's
  place, so the value goes from worker to worker, not back up from the
  client. An input that finished before the link was made goes as its value.
* **Stop notices.** A taken token killed or timed out comes back from the
  engine: its future is cancelled (``client.cancel(force=True)``). Dask cannot
  interrupt a body already running in a worker thread; its result is dropped.
* **Who touches what.** Only the dispatcher thread touches ``_inflight`` and
  the client's blocking calls; callbacks only append to ``_done`` (a deque)
  and write to the pipe. ``shutdown`` sets flags under ``_lock`` and wakes it.
* **Stopping.** ``shutdown`` lets queued and running tokens finish
  (``cancel_pending``: queued ones are cancelled); the dispatcher exits once
  nothing of the lane is left, or at once on ``abort`` (the timeout passed):
  running tokens end killed (``TaskKilledError('cluster_lane_stopped')``) and
  their futures are cancelled. Then the client closes, and the local cluster
  the lane started.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import threading
import time
import uuid
from typing import Any

from .._exit_hooks import shutdown_at_exit
from .._tokengate import TaskToken
from ..exceptions import TaskKilledError, WorkerLostError
from .connect import connect

#: How often the lane reads the cluster's thread count again (seconds).
_CAPACITY_EVERY = 0.5

#: Tokens sent ahead to the scheduler beyond one per cluster thread. Dask runs
#: them in ``priority`` order as threads free up; without them each task would
#: wait for a scheduler round trip after the one before it.
_SEND_AHEAD = 64

#: How long ``shutdown`` waits for the dispatcher once its timeout passed (seconds).
_ABORT_WAIT = 10.0

_log = logging.getLogger("tokengate.cluster")


def _start_client_threads(client: Any) -> None:
    """Runs one task with a done callback and fetches its result, so that the threads
    Dask starts on first use (the callback thread, say) exist before the interpreter
    exits: at exit, Python 3.12 and later refuse to start a thread, and the lane's tokens
    still finish then (see ``tokengate._exit_hooks.shutdown_at_exit``)."""
    called = threading.Event()
    future = client.submit(int, "0", pure=False)
    future.add_done_callback(lambda _f: called.set())
    if client.gather([future]) != [0] or not called.wait(30):  # pragma: no cover
        raise RuntimeError("the Dask cluster did not run a first task within 30 s")


#: Most input futures the lane keeps for calls not sent yet (a call cancelled meanwhile never
#: takes its input's back: the oldest go first past this).
_KEPT_MAX = 4096

#: The keyword under which a linked input token travels through the engine (its value comes back there).
_INPUT_KEY = "__tokengate_input_{}__"


class _Input:
    """Stands for linked input ``index`` (token ``token_id``) in a cluster call's arguments."""

    __slots__ = ("index", "token_id")

    def __init__(self, index: int, token_id: int) -> None:
        self.index = index
        self.token_id = token_id


class DaskLane:
    """The cluster lane of one running coordinator, on Dask."""

    name = "dask"

    def __init__(self, engine: Any, target: Any) -> None:
        self.engine = engine
        self.client, self._cluster, self._owns_client = connect(target)
        try:
            _start_client_threads(self.client)
            self.outside = engine.add_outside_lane("dask")
        except BaseException:
            self._close_client()
            raise
        self._lock = threading.Lock()
        self._done: collections.deque[int] = collections.deque()
        self._inflight: dict[int, tuple[Any, Any]] = {}
        #: Inputs of calls not sent yet: token id -> how many calls wait for it.
        self._wanted: dict[int, int] = {}
        #: Futures of finished input tokens that calls still want, by token id.
        self._kept: dict[int, Any] = {}
        #: Inputs each linked call (by token id) has not sent or released yet.
        self._links: dict[int, list[int]] = {}
        self._capacity = 0
        self._capacity_at = 0.0
        self._closing = False
        self._cancel_pending = False
        self._abort = False
        self._exited = threading.Event()
        self._counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "retries": 0,
            "lost": 0,
            "cancelled": 0,
            "linked": 0,
        }
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._prefix = uuid.uuid4().hex[:12]
        self._thread = threading.Thread(target=self._run, name="tokengate-dask-lane", daemon=True)
        shutdown_at_exit(self)
        self._thread.start()

    # -- control --------------------------------------------------------------------------

    def submitted(self) -> None:
        with self._lock:
            self._counts["submitted"] += 1

    def link_inputs(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], list[int]]:
        """A cluster call's arguments with each unresolved input token of a Dask lane
        linked (see the module docs), and the linked token ids: hand them to
        :meth:`linked` with the call's token, or to :meth:`release` if there is none.
        Other tokens stay as they are (the engine sends their values)."""
        out_kwargs: dict[str, Any] = {}
        ids: list[int] = []

        def link(v: Any) -> Any:
            if type(v) is not TaskToken or v.lane != "dask" or v.done():
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
        """Inputs ``ids`` are wanted by one call less (its future, once none wants it, goes)."""
        with self._lock:
            for tid in ids:
                left = self._wanted.get(tid, 1) - 1
                if left > 0:
                    self._wanted[tid] = left
                else:
                    self._wanted.pop(tid, None)
                    self._kept.pop(tid, None)

    def _unlink(self, task: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with linked inputs replaced: a kept future (first send
        only), or the value the engine filled in."""
        args, kwargs = task.args, task.kwargs
        if _INPUT_KEY.format(0) not in kwargs:
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
            future = kept.get(v.token_id)
            return future if future is not None else values[v.index]

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
            # The dispatcher may be inside a call to the scheduler; it ends what it holds
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

    def _on_done(self, seq: int) -> None:
        """A future finished (the client's event loop thread)."""
        self._done.append(seq)
        self._wake()

    # -- dispatcher thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # pragma: no cover - a bug: fail what is left rather than hang
            _log.exception("the Dask lane's dispatcher failed")
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
                self._settle()
                now = time.monotonic()
                if now - self._capacity_at >= _CAPACITY_EVERY:
                    self._capacity_at = now
                    self._capacity = self._read_capacity()
                    self.outside.set_workers(self._capacity)
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
        room = max(0, self._capacity + (_SEND_AHEAD if self._capacity else 0) - len(self._inflight))
        tasks, stopped = self.outside.take(room)
        if stopped:
            self._stop(stopped)
        for task in tasks:
            self._send(task)
        return bool(tasks or stopped)

    def _read_capacity(self) -> int:
        try:
            return int(sum(self.client.nthreads().values()))
        except Exception:  # the scheduler is unreachable now: send nothing more until it answers
            return 0

    def _send(self, task: Any) -> None:
        # Token ids restart at 1 in every process: the lane's prefix keeps keys apart on a shared scheduler.
        key = f"{task.operation_type}-{self._prefix}-{task.id}-{task.attempt}"
        try:
            args, kwargs = self._unlink(task)
            future = self.client.submit(task.func, args, kwargs, key=key, priority=task.priority, pure=False)
        except Exception as exc:  # pickling, or the client is closed
            with self._lock:
                self._counts["failed"] += 1
            self.outside.fail(task, exc, retry=False)
            return
        self._watch(task, future)

    def _watch(self, task: Any, future: Any) -> None:
        seq = task.id
        self._inflight[seq] = (task, future)
        future.add_done_callback(lambda _f, seq=seq: self._on_done(seq))

    def _settle(self) -> None:
        """Reports every future that finished, with one gather for the results. Each
        future's status is read once: one "lost" since its callback (its worker died
        with the result) is watched again, and reported when Dask has recomputed it."""
        ok: list[tuple[Any, Any]] = []
        failed: list[tuple[Any, Any, str]] = []
        while self._done:
            entry = self._inflight.pop(self._done.popleft(), None)
            if entry is None:  # stopped meanwhile
                continue
            status = entry[1].status
            if status == "finished":
                ok.append(entry)
            elif status in ("error", "cancelled"):
                failed.append((*entry, status))
            else:  # lost or pending again: not done after all
                self._watch(*entry)
        if ok:
            try:
                values = self.client.gather([f for _, f in ok], errors="raise")
            except Exception:  # one was lost since: watch them again, each ends on its own
                for entry in ok:
                    self._watch(*entry)
            else:
                for (task, future), value in zip(ok, values):
                    if task.id in self._wanted:  # an input of calls not sent yet: keep it on the cluster
                        with self._lock:
                            if task.id in self._wanted:
                                self._kept[task.id] = future
                                if len(self._kept) > _KEPT_MAX:  # calls cancelled before they were sent
                                    oldest = next(iter(self._kept))
                                    self._kept.pop(oldest)
                                    self._wanted.pop(oldest, None)
                    self._finish_ok(task, value)
        for task, future, status in failed:
            if status == "cancelled":
                self._failed(
                    task, WorkerLostError(f"token {task.id} ({task.operation_type}): the cluster cancelled it")
                )
                continue
            error: BaseException | None
            try:
                error = future.exception(timeout=5)  # held by the client: no trip to a worker
            except BaseException as err:
                error = err
            self._failed(
                task, error if error is not None else RuntimeError("the cluster reported an error without one")
            )

    def _finish_ok(self, task: Any, value: Any) -> None:
        if not task.token.done():  # counted first: a waiter woken by the result sees it
            with self._lock:
                self._counts["completed"] += 1
        self.outside.finish(task, value)

    def _failed(self, task: Any, exc: BaseException) -> None:
        if type(exc).__name__ == "KilledWorker":
            lost = WorkerLostError(f"token {task.id} ({task.operation_type}): the cluster worker running it was lost")
            lost.__cause__ = exc
            exc = lost
        if isinstance(exc, WorkerLostError):
            self.outside.note_lost()
        with self._lock:
            if isinstance(exc, WorkerLostError):
                self._counts["lost"] += 1
            self._counts["retries" if task.retries_left > 0 else "failed"] += 1
        self.outside.fail(task, exc)

    def _stop(self, stopped: list[int]) -> None:
        futures = []
        for seq in stopped:
            entry = self._inflight.pop(seq, None)
            if entry is not None:
                futures.append(entry[1])
        if futures:
            with self._lock:
                self._counts["cancelled"] += len(futures)
            try:
                self.client.cancel(futures, force=True)
            except Exception:
                pass

    def _finish(self) -> None:
        """Dispatcher exit: cancel what is queued, end what runs, close the client."""
        self.outside.close()
        self.outside.set_workers(0)
        futures = []
        for task, future in list(self._inflight.values()):
            futures.append(future)
            self.outside.fail(task, TaskKilledError("cluster_lane_stopped"), retry=False, state="killed")
        self._inflight.clear()
        if futures:
            try:
                self.client.cancel(futures, force=True)
            except Exception:
                pass
        self._close_client()
        with self._lock:
            fds, self._rfd, self._wfd = (self._rfd, self._wfd), -1, -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._exited.set()

    def _close_client(self) -> None:
        if self._owns_client:
            try:
                self.client.close()
            except Exception:
                pass
        if self._cluster is not None:
            try:
                self._cluster.close()
            except Exception:
                pass
