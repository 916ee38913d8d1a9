"""The tokengate exception hierarchy.

Every error tokengate raises itself derives from :class:`TokengateError`.
Where the meaning matches a built-in, the class also derives from it (a
``NotStartedError`` is a ``RuntimeError``, a ``TaskTimeoutError`` is a
``TimeoutError``), so code written for the standard library keeps working.

The native module maps its internal errors to these classes in one place
(``src/py/exceptions.rs``). Exceptions raised by a task itself are never
wrapped: ``result()`` and ``await`` re-raise the task's own exception object.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

__all__ = [
    "AdmissionRejectedError",
    "DependencyFailedError",
    "ForkedProcessError",
    "NotStartedError",
    "OperationBlockedError",
    "ShutdownError",
    "TaskCancelledError",
    "TaskKilledError",
    "TaskKilledException",
    "TaskPanicError",
    "TaskTimeoutError",
    "TokengateError",
    "WorkerCrashedError",
    "WorkerLostError",
]


class TokengateError(Exception):
    """Base class of every error raised by tokengate itself."""


class NotStartedError(TokengateError, RuntimeError):
    """A decorated function was called while no ``OperationsCoordinator`` is running.

    Start one first (``coordinator.start()``, ``with OperationsCoordinator():``
    or ``async with OperationsCoordinator():``).
    """


class ShutdownError(TokengateError, RuntimeError):
    """Work was submitted to a coordinator that is stopping or stopped, or
    after interpreter shutdown began. The message follows the wording of
    ``concurrent.futures`` ("cannot schedule new futures after shutdown")."""


class ForkedProcessError(TokengateError, RuntimeError):
    """tokengate was used in a child process created by ``fork()`` after a
    coordinator had started in the parent. Worker threads do not survive a
    fork; start a new coordinator in the child (or use the ``spawn`` start
    method)."""


class TaskCancelledError(TokengateError, concurrent.futures.CancelledError, asyncio.CancelledError):
    """The token was cancelled before it ran.

    It is both a ``concurrent.futures.CancelledError`` and an
    ``asyncio.CancelledError``, so ``except`` clauses written for either API
    (including asyncio's own ``wait_for``, ``gather`` and ``shield``) catch it.
    """


class TaskKilledError(TokengateError):
    """The token was killed (``token.kill(reason)`` or the control plane).

    ``reason`` holds the reason given to ``kill``.
    """

    def __init__(self, reason: str = "admin_override", *args: object) -> None:
        super().__init__(reason, *args)
        self.reason = reason

    def __str__(self) -> str:
        return f"token killed: {self.reason}"


#: The original Py-TokenGate name of :class:`TaskKilledError`.
TaskKilledException = TaskKilledError


class TaskTimeoutError(TokengateError, TimeoutError):
    """The token passed its deadline (``timeout`` tag or per-call timeout)."""


class TaskPanicError(TokengateError):
    """tokengate's own Rust code panicked while running the task. The task's
    token fails with this error; the pool keeps working. Please report it."""


class OperationBlockedError(TokengateError, RuntimeError):
    """Calls of an operation are rejected because it failed too often
    (``auto_block``)."""


class AdmissionRejectedError(TokengateError, RuntimeError):
    """A bounded coordinator could not admit the call (full, paused or timed out)."""


class WorkerCrashedError(TokengateError):
    """A worker process of the process lane died while running the task.

    ``exitcode`` holds its exit code (negative: killed by that signal).
    """

    def __init__(self, message: str = "worker process died", exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class WorkerLostError(WorkerCrashedError):
    """A cluster worker (or its node) was lost while it ran the task, and the token
    had no retry left. A token with ``retries`` >= 1 is sent again instead."""

    def __init__(self, message: str = "cluster worker lost", exitcode: int | None = None) -> None:
        super().__init__(message, exitcode)


class DependencyFailedError(TokengateError):
    """A token passed as an argument failed (or was cancelled, killed, timed
    out), so the call that received it never ran. ``__cause__`` is the input
    token's exception; ``input_token_id`` names it."""

    input_token_id: int | None = None
