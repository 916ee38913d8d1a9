"""The Dask lane: a cluster lane (see :mod:`.lane`) on a ``distributed.Client``.

* **Room.** One token per cluster thread (``client.nthreads()``), plus 64 sent
  ahead in the scheduler: Dask starts those in ``priority`` order as threads
  free up. Each token goes out with ``client.submit(RemoteCall, args, kwargs,
  key=..., priority=..., pure=False)``, under a key of its own per attempt
  (prefixed per lane: token ids restart at 1 in every process).
* **Completion.** A future's done callback (on the client's event loop) puts
  the token id in ``_done``; the dispatcher reads each future's status once and
  gathers the finished results in one call per wake-up.
* **Lost workers.** A task whose worker was lost fails with Dask's
  ``KilledWorker`` (at once on tokengate's own local clusters, see
  :mod:`.connect`). A future "lost" since its callback (its worker died with the
  result) is watched again and reported when Dask has recomputed it.
* **Stop notices.** ``client.cancel(force=True)``. Dask cannot interrupt a body
  already running in a worker thread; its result is dropped.
* **Tokens as arguments.** A linked input goes as its Dask future (Dask
  resolves futures anywhere in the arguments).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from .connect import connect
from .lane import ClusterLane


class DaskLane(ClusterLane):
    """The cluster lane of one running coordinator, on Dask."""

    name = "dask"
    send_ahead = 64.0

    def _connect(self, target: Any) -> None:
        self.client, self._cluster, self._owns_client = connect(target)
        self._prefix = uuid.uuid4().hex[:12]

    def _warm_up(self) -> None:
        # The threads Dask starts on first use (its callback thread, say) must exist before exit.
        called = threading.Event()
        future = self.client.submit(int, "0", pure=False)
        future.add_done_callback(lambda _f: called.set())
        if self.client.gather([future]) != [0] or not called.wait(30):  # pragma: no cover
            raise RuntimeError("the Dask cluster did not run a first task within 30 s")

    def _read_capacity(self) -> float:
        try:
            return float(sum(self.client.nthreads().values()))
        except Exception:  # the scheduler is unreachable now: send nothing more until it answers
            return 0.0

    def _send_call(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cost: float) -> Any:
        key = f"{task.operation_type}-{self._prefix}-{task.id}-{task.attempt}"
        future = self.client.submit(task.func, args, kwargs, key=key, priority=task.priority, pure=False)
        self._watch(task.id, future)
        return future

    def _watch(self, seq: int, future: Any) -> None:
        future.add_done_callback(lambda _f, seq=seq: self._on_done(seq))

    def _settle(self) -> None:
        ok: list[tuple[Any, Any]] = []
        failed: list[tuple[Any, Any, str]] = []
        while self._done:
            entry = self._pop(self._done.popleft())
            if entry is None:  # stopped meanwhile
                continue
            status = entry[1].status
            if status == "finished":
                ok.append(entry)
            elif status in ("error", "cancelled"):
                failed.append((*entry, status))
            else:  # lost or pending again: not done after all
                self._again(*entry)
        if ok:
            try:
                values = self.client.gather([f for _, f in ok], errors="raise")
            except Exception:  # one was lost since: watch them again, each ends on its own
                for entry in ok:
                    self._again(*entry)
            else:
                for (task, future), value in zip(ok, values):
                    self._finish_ok(task, value, future)
        for task, future, status in failed:
            if status == "cancelled":
                self._failed(task, self._lost(task, RuntimeError("cancelled"), "the cluster cancelled it"))
                continue
            error: BaseException | None
            try:
                error = future.exception(timeout=5)  # held by the client: no trip to a worker
            except BaseException as err:
                error = err
            if error is None:
                error = RuntimeError("the cluster reported an error without one")
            elif type(error).__name__ == "KilledWorker":
                error = self._lost(task, error, "the cluster worker running it was lost")
            self._failed(task, error)

    def _again(self, task: Any, future: Any) -> None:
        self._watch_again(task, future)
        self._watch(task.id, future)

    def _cancel(self, handles: list[Any], force: bool) -> None:
        self.client.cancel(handles, force=force)

    def _disconnect(self) -> None:
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
