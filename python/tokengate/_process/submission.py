"""Submission: what a caller's thread does to put a process token in the engine's queue.

Everything a token meets before a worker process takes it is the engine's,
the same as on the thread lanes: the coordinator's ``max_pending`` and
``operation_limits`` (a caller waits, ``try_submit`` returns None), tokens
passed as arguments (the token waits, holding nothing, until they resolve;
their values are sent, or it fails with ``DependencyFailedError``), pauses
(queued tokens are held), drains and kills, deadlines, and ``retries`` of a
token whose function raised (not a crash, a timeout or a pickling error),
with the operation's back-off. Its queue orders tokens by ``priority``,
FIFO within a priority, a waiting token gaining +1 per ``aging`` seconds
(:meth:`OperationSpec.submit_to`).

The function and the arguments are pickled in the calling thread: the queue
then holds ``(function, pickled arguments)``. A call with tokens among its
arguments is pickled by the supervisor once they resolved and it takes the
token; so is one whose pickling failed here, and the error then fails that
token alone (:class:`UnpicklableError`, naming the argument).
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, cast

from .._tokengate import TaskToken
from .payload import _PLAIN, _PROTO, UnpicklableError, _dump_args
from .state import _LaneState

if TYPE_CHECKING:
    from .wrapper import ProcessFunction


def submit_outside(
    spec: Any,
    outside: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    func: Any,
    priority: int | None,
    timeout: float | None,
    retries: int | None,
    block: bool,
    admission_timeout: float | None,
    probe: bool,
) -> TaskToken[Any] | None:
    """Queues a token of ``spec`` on the outside lane ``outside`` (a process or cluster
    lane), the lane receiving ``func``: ``OperationSpec.submit_to`` with the options given.
    With every option at its default it is passed none of them (fewer to parse)."""
    if priority is None and timeout is None and retries is None and block and admission_timeout is None and not probe:
        return cast("TaskToken[Any] | None", spec.submit_to(outside, args, kwargs, func=func))
    return cast(
        "TaskToken[Any] | None",
        spec.submit_to(
            outside,
            args,
            kwargs,
            func=func,
            priority=priority,
            timeout=timeout,
            retries=retries,
            block=block,
            admission_timeout=admission_timeout,
            probe=probe,
        ),
    )


class _Submission(_LaneState):
    """The lane's part that caller threads run."""

    def submit_plain(self, pf: ProcessFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskToken[Any]:
        """:meth:`submit` with every option at its default (a plain call ``pf(*args)``):
        the common path, with fewer steps."""
        payload = pf._payload
        if payload is not None and all(map(_PLAIN.__contains__, map(type, args))) and not kwargs:
            # Plain values only (no token among them): pickled here, at once.
            data = pickle.dumps((args, kwargs), _PROTO)
            return cast("TaskToken[Any]", pf.spec.submit_to(self.outside, (), {}, func=(pf, data)))
        return cast("TaskToken[Any]", self.submit(pf, args, kwargs, None, None, None, True, None, False))

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
        func: Any = pf
        if TaskToken not in map(type, args) and TaskToken not in map(type, kwargs.values()):
            try:  # pickled here, in the caller's thread (see the module docs)
                pf._payload_of()
                func, args, kwargs = (pf, _dump_args(pf._op, args, kwargs)), (), {}
            except UnpicklableError:
                pass  # pickled again when taken, where the error fails the token
        return submit_outside(
            pf.spec, self.outside, args, kwargs, func, priority, timeout, retries, block, admission_timeout, probe
        )
