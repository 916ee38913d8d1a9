"""Dispatch: the supervisor sends queued tokens to the worker processes, sending ahead.

* **Sending ahead.** A worker process runs its tokens one after another, in
  the order they were sent. How many it holds follows its measured time per
  token (a moving average): while that is 10 ms or more, one at a time (the
  round trip costs little next to them, and priorities and ``cancel()`` reach
  everything still queued in the lane); below, enough for about 10 ms of work
  and at most ``OperationsCoordinator(process_prefetch=64)``, sent in batches,
  so the process never waits for the supervisor between tokens and one
  message carries many. (A long token among short ones can therefore be sent
  ahead too; see the next point.) The supervisor never blocks on a
  worker's socket: what the socket does not take waits in the worker's outbox
  until the selector says it can take more. A token sent to a
  process counts as running (ProcessPoolExecutor's call queue does the same):
  ``cancel()`` no longer stops it, ``kill()`` and deadlines still do.
* **Taken back.** When the queue is empty and a process is idle while another
  holds tokens waiting behind the one it runs, some of those are taken back and
  sent to the idle one (:meth:`_Dispatch._take_back`): all of them once that
  process has not answered for 10 ms (a long call runs there), else half
  (rounded up), so
  that at the end of a burst the processes finish the last tokens side by side,
  not one after the other. The board lists them to be skipped, only while the
  call before them runs, so none of them runs twice.
* **Which process.** Each token goes to the process holding the fewest tokens,
  then to the one with the most room (:func:`_assign`): an idle process is
  never passed over for one that is busy.
* The engine's queue does the rest: a pause holds queued tokens there, and
  the tokens taken come in priority order.
* A token sent to a process and then killed or timed out is stopped through
  the board (see :class:`~tokengate._process.board._Board`): its process is
  SIGKILLed if it runs it now, else the process skips it.
"""

from __future__ import annotations

import heapq
import math
import pickle
import selectors
import time
from typing import TYPE_CHECKING

from .board import KILLED, KILLED_FOR_ROOM
from .payload import _PROTO, UnpicklableError, _dump_args
from .state import _Item, _LaneState

if TYPE_CHECKING:
    from .workers import _Worker

#: The lane keeps about this much work (seconds) sent ahead to each worker process: twice
#: CPython's default switch interval, so a supervisor kept waiting for the GIL by a thread
#: that submits a burst does not leave its processes idle.
_PREFETCH_WORK_S = 0.010

#: Half the tokens waiting in a busy process go to an idle one when they hold at least this
#: much work (seconds, by the process's measured time per token): less is not worth a round.
_BALANCE_S = 0.0005


def _assign(held: list[int], room: list[int], n: int) -> list[int]:
    """Which worker each of ``n`` tokens goes to, given how many tokens each holds and how
    many more it has room for (``n <= sum(room)``): the one holding the fewest first (an idle
    one before any other), then the one with the most room. Room alone sent a long token to
    a busy worker that short tokens had given a deep prefetch, while another, not measured
    yet (room 1), sat idle: two 50 ms tokens then ran one after the other."""
    heap = [(h, -r, k) for k, (h, r) in enumerate(zip(held, room)) if r > 0]
    heapq.heapify(heap)
    out = []
    for _ in range(n):
        h, r, k = heap[0]
        out.append(k)
        if r == -1:
            heapq.heappop(heap)  # full
        else:
            heapq.heapreplace(heap, (h + 1, r + 1, k))
    return out


class _Dispatch(_LaneState):
    """The lane's part that sends tokens to worker processes (supervisor thread)."""

    def _room(self, w: _Worker | None) -> int:
        """How many tokens to send ``w`` now. One at a time while its tokens take 10 ms
        or more (or nothing is measured yet): then the round trip costs little and
        priorities and ``cancel()`` act on everything queued. Shorter tokens are
        sent ahead, enough for about 10 ms of work, at most ``prefetch``; a worker
        is topped up once half of that is done (fewer, larger messages). Never more
        than the tokens it has left before it retires; nothing to a retiring one.
        Nothing either to one that holds tokens and has not answered for 10 ms: a
        call there runs long, and what it holds waits behind it."""
        if w is None or not w.ready or w.over_rss:
            return 0
        depth = 1 if w.avg is None else max(1, min(self.prefetch, 1 + int(_PREFETCH_WORK_S / max(w.avg, 1e-6))))
        load = w.load
        room = depth - load if load <= depth // 2 else 0
        if room and load and time.monotonic() - w.mark > _PREFETCH_WORK_S:
            return 0
        left = w.left
        # A token stopped after it ran takes back its unit late (see _handle): left may be < 0.
        return room if left is None or room <= left else max(0, left)

    def _dispatch(self) -> bool:
        """Takes what the workers have room for from the engine's queue (and the stop
        notices of taken tokens resolved from outside), pickles it and sends it. True
        when it took anything: the caller looks again before it sleeps."""
        rooms = [(w, self._room(w)) for w in self._workers if w is not None]
        workers = [w for w, n in rooms if n]
        room = [n for _, n in rooms if n]
        # A retiring worker's fate may hang on what is queued (see _Recycling._retire_idle):
        # then queued work wakes this thread even when no worker has room.
        tasks, stopped = self.outside.take(sum(room), bool(self._retiring) or None)
        ready: list[_Item] = []
        for task in tasks:
            item = _Item(task)
            self._running[item.seq] = item
            if item.args is None:  # not pickled by its caller (see .submission)
                try:
                    item.pf._payload_of()
                    item.args = _dump_args(item.pf._op, task.args, task.kwargs)
                except UnpicklableError as exc:
                    self._fail(item, exc)
                    continue
            ready.append(item)
        self._spread(workers, room, ready)
        # Stops last: stopping a running token replaces its process, which must not happen
        # to a process chosen above before it was sent its tokens.
        for seq in stopped:
            self._stopped(seq)
        return bool(tasks or stopped)

    def _take_back(self, now: float) -> float | None:
        """Tokens sent ahead to a process and waiting behind the call it runs go to idle
        processes, as many as those have room for: all of them once the process has not
        answered for :data:`_PREFETCH_WORK_S` (a long call), else half of them (rounded up), when they
        hold :data:`_BALANCE_S` of work or more (the processes then finish together). Through
        its board, so none of them runs twice. Called when the queue is empty. Returns when
        to look again (a busy process may pass that mark), or None."""
        rooms = [(w, self._room(w)) for w in self._workers if w is not None and not w.load]
        idle = [(w, n) for w, n in rooms if n]
        if not idle:
            return None
        room = sum(n for _, n in idle)
        later = math.inf
        taken: list[_Item] = []
        for v in self._workers:
            if v is None or len(v.items) < 2 or len(taken) >= room:
                continue
            want = room - len(taken)
            share_from = None
            due = v.mark + _PREFETCH_WORK_S
            if now < due:
                later = min(later, due)
                # No long call (yet): half of those waiting (rounded up: one waiting goes to
                # the idle process, which runs it beside the call), when they hold enough
                # work to be worth a round. The board counts those waiting: tokens before
                # the running one may have ended, their replies unread.
                if v.avg is None:
                    continue
                share_from = max(1, math.ceil(_BALANCE_S / max(v.avg, 1e-9)))
                if want < share_from:
                    continue
            wires = v.board.take_back([it.wire for it in v.items], want, share_from)
            if wires is None:
                # Between two tokens (or the one it runs answered meanwhile): look again soon.
                later = min(later, now + 0.002)
                continue
            if not wires:
                continue  # nothing waits behind the call it runs (what came before, answered)
            back = set(wires)
            for item in [it for it in v.items if it.wire in back]:
                self._finish_item(v, item)
                v.skips.add(item.wire)  # its _SKIPPED reply frees the board's word
                if v.left is not None:
                    v.left += 1  # it never runs there
                taken.append(item)
        if taken:
            self._counts["taken_back"] += len(taken)
            self._spread([w for w, _ in idle], [n for _, n in idle], taken)
        return None if later == math.inf else later

    def _spread(self, workers: list[_Worker], room: list[int], items: list[_Item]) -> None:
        """Sends ``items`` to ``workers`` (``room[k]``: how many more worker ``k`` takes;
        ``len(items) <= sum(room)``), each to the one holding the fewest first (:func:`_assign`),
        in one message per worker."""
        if len(workers) == 1:  # one process has room (the usual top-up): it takes them all
            if items:
                self._send(workers[0], items)
            return
        batches: dict[int, list[_Item]] = {}
        for item, k in zip(items, _assign([w.load for w in workers], room, len(items))):
            batches.setdefault(k, []).append(item)
        for k, batch in batches.items():
            self._send(workers[k], batch)

    def _stopped(self, seq: int) -> None:
        """A taken token was resolved from outside (``kill()``, its deadline, a drain): its
        process stops it."""
        item = self._running.pop(seq, None)
        if item is None or item.done:
            return
        item.done = True
        self._count_stopped(item)  # its state was published before the stop notice was sent
        w = item.worker
        if w is not None:
            self._stop_item(w, item)

    def _send(self, w: _Worker, items: list[_Item]) -> None:
        """One message with every token for ``w``; each counts as running from now on (as
        in ProcessPoolExecutor's call queue: ``cancel()`` no longer stops it, ``kill()`` does)."""
        batch = []
        wires = self._wires
        funcs = w.funcs
        queued = w.items.append
        slot = w.slot
        for item in items:
            pf = item.pf
            fkey = pf._fkey
            if fkey in funcs:
                fpayload = None
            else:
                fpayload = pf._payload
                funcs.add(fkey)
            item.wire = wire = next(wires)
            batch.append((wire, fkey, fpayload, item.args))
            queued(item)
            item.worker = w
            item.task.set_worker(slot)
        if w.load == len(items):  # it was idle: its first token begins now
            w.mark = time.monotonic()
        if w.left is not None:
            w.left -= len(items)  # _room never gives more than it has left
            if w.left <= 0:
                self._retiring.add(w)
        w.outbox.push(pickle.dumps(batch, _PROTO))
        self._flush(w)  # a process gone meanwhile is seen there (a killed token comes back as a stop notice)

    def _stop_item(self, w: _Worker, item: _Item) -> None:
        """A token sent to ``w`` was killed or timed out: SIGKILL its process if it runs
        now, else have the worker skip it (see :class:`_Board`)."""
        if item not in w.items or self._workers[w.slot] is not w:
            return
        how = w.board.stop(item.wire, w.proc.kill)
        if how == KILLED:
            self._replace(w, item)
            return
        self._finish_item(w, item)
        if how == KILLED_FOR_ROOM:  # pragma: no cover - never more tokens sent than list words
            # Its death is seen as a crash (_died): the token the board names fails, even
            # one published and not started. Unreachable: a worker holds at most prefetch
            # tokens, and its board has prefetch list words.
            return
        w.skips.add(item.wire)
        if w.left is not None:
            w.left += 1  # it never runs there: its unit comes back (taken again if it had run, see _handle)

    def _flush(self, w: _Worker) -> bool:
        """Writes what the socket takes of ``w``'s outbox (never blocks: a worker busy with
        a long token may leave its socket full); the selector reports when it can take more.
        False when the worker is gone."""
        fd = w.conn.fileno()
        try:
            empty = w.outbox.flush(fd)
        except OSError:
            self._died(w)
            return False
        events = selectors.EVENT_READ | (0 if empty else selectors.EVENT_WRITE)
        try:
            if self._sel.get_key(fd).events != events:
                self._sel.modify(fd, events, ("conn", w))
        except (KeyError, ValueError):
            pass
        return True
