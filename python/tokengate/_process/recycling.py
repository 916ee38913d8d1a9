"""Recycling: worker processes retire after a number of tokens or above a resident set size.

As ProcessPoolExecutor's ``max_tasks_per_child``:
``OperationsCoordinator(process_max_tasks_per_child=N)`` retires a worker
process once it has run N tokens; ``process_max_rss=BYTES`` retires one
whose resident set is above BYTES when a token ends (that token still
succeeds). Both default to None: a process serves until ``stop()``. A
fresh process takes the retired one's slot; recycling never fails, loses
or repeats a token:

- a process is never sent more tokens than it has left: sending ahead
  stops at its budget (each token sent uses one unit; one listed on its
  board to be skipped gives its unit back, it never runs there, and takes it
  again if its reply shows it had run already);
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
"""

from __future__ import annotations

import selectors
import time

from .workers import _Processes, _Worker

#: A retired worker process that has not exited this long after its socket closed is SIGKILLed.
_RETIRE_GRACE_S = 5.0


class _Recycling(_Processes):
    """The lane's part that retires worker processes and reaps the retired ones."""

    def _retire_idle(self, closing: bool) -> None:
        """Retires every retiring worker that has nothing in flight (see Recycling)."""
        for w in list(self._retiring):
            if self._workers[w.slot] is not w:  # it died or was replaced meanwhile
                self._retiring.discard(w)
            elif not (w.over_rss or (w.left is not None and w.left <= 0)):
                self._retiring.discard(w)  # a skipped token gave budget back
            elif w.load or w.outbox:
                continue  # it still runs what it was sent
            elif closing and not self._queued():
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
