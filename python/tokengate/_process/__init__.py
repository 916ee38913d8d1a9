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
* **A supervisor thread** (one per lane) owns the queue, the deadlines, the
  retry back-offs and the worker processes, and waits on one selector over
  the workers' sockets, their pidfds and a wake-up pipe (:mod:`.lane`).
* **Sending ahead**: short tokens go to a process in batches, so it never
  waits for the supervisor between them (:mod:`.dispatch`); their replies
  come back together, staged on the process's board (:mod:`.child`).
* **Per-process supervision**: a shared word per process says which token it
  runs now (:mod:`.board`), so a worker that dies fails only that token, and
  a token killed or past its deadline really stops (:mod:`.workers`).
* **Recycling**: a process retires after ``process_max_tasks_per_child``
  tokens or above ``process_max_rss`` bytes (:mod:`.recycling`).
* **Why not loky's reusable executor for running tokens.** loky's executor
  cannot stop one running call, and a worker that dies breaks the whole
  executor (every pending future fails with ``TerminatedWorkerError``, not
  only the dead worker's); its process launcher also starts resource-tracker
  helper processes that outlive ``stop()``. We use loky for what the lane
  needs from it, serialization: functions, arguments and results that plain
  pickle cannot handle go through loky's pickler (cloudpickle with loky's
  reducers), so functions defined in ``__main__``, inside other functions, or
  lambdas work (:mod:`.payload`). Workers are started with ``subprocess``
  (fork+exec of a fresh interpreter, keeping only the worker's socket: safe
  with the Rust threads of the parent, no inherited state, and nothing else
  started).
* ``weight`` and ``sticky_anchor`` have no further effect: a process runs one
  token at a time. Ctrl-C (SIGINT) is ignored in workers: the parent stops
  them. On Linux a worker also dies with its parent (``PR_SET_PDEATHSIG``).
* **Notes.** ``token.worker_id`` is the worker's slot (0..N-1); the lane's
  pids are in ``get_stats()['lanes']['process']['pids']``. Calls go to the
  newest running coordinator (also from inside a task of an older one).
  Thread done callbacks of process tokens run on the supervisor thread:
  keep them short and never wait there for another process token.

Modules, one per mechanism, from the caller to the worker
---------------------------------------------------------
* :mod:`.wrapper`: :class:`ProcessFunction`, the decorated function, and
  finding the coordinator and its lane (:func:`lane_for`);
* :mod:`.payload`: pickling functions, arguments, results and errors
  (:class:`UnpicklableError`, :class:`RemoteError`);
* :mod:`.wire`: the messages between the supervisor and a worker, and their
  framing (cut and written in Rust: ``src/engine/wire.rs``);
* :mod:`.state`: a token in the lane and the state the lane's parts share;
* :mod:`.submission`: admission, tokens as arguments, and queueing, in the
  caller's thread;
* :mod:`.dispatch`: sending queued tokens to the workers, and stopping one
  sent already;
* :mod:`.replies`: handling the workers' replies, retries and deadlines;
* :mod:`.board`: the memory shared with each worker that makes a kill exact
  (its protocol in Rust: ``src/engine/board.rs``; a worker's reply stage:
  ``src/engine/reply_stage.rs``);
* :mod:`.workers`: starting worker processes, their deaths and replacements;
* :mod:`.recycling`: retiring worker processes and reaping the retired;
* :mod:`.lane`: :class:`ProcessLane`, its supervisor loop, stopping, and
  interpreter exit;
* :mod:`.child`: the worker process's main loop.
"""

from __future__ import annotations

from .lane import ProcessLane
from .payload import RemoteError as RemoteError
from .payload import UnpicklableError
from .wrapper import ProcessFunction
from .wrapper import lane_for as lane_for
from .wrapper import process_wrapper as process_wrapper

__all__ = ["ProcessFunction", "ProcessLane", "UnpicklableError"]
