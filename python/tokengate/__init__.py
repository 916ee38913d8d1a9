"""tokengate: run ordinary Python functions concurrently on a Rust worker pool.

>>> from tokengate import task_token_guard, OperationsCoordinator
>>> @task_token_guard(operation_type="string_ops", tags={"weight": "light"})
... def upper(s: str) -> str:
...     return s.upper()
>>> with OperationsCoordinator():
...     upper("abc").result(timeout=5)
'ABC'
"""

from __future__ import annotations

import logging as _logging
from typing import Any

from . import _tokengate, metrics
from ._cluster.executor import ClusterExecutor
from ._coordinator import OperationsCoordinator
from ._decorator import TokenCall, TokenFunction, TryTokenCall, task_token_guard
from ._gather import MapResults, as_completed, gather
from ._process import RemoteError, UnpicklableError
from ._progress import ProgressOption
from ._routing import make_hashable
from ._tags import DigestPolicy, HashPolicy
from ._tokengate import DashboardServer, TaskToken
from .exceptions import (
    AdmissionRejectedError,
    DependencyFailedError,
    ForkedProcessError,
    NotStartedError,
    OperationBlockedError,
    ShutdownError,
    TaskCancelledError,
    TaskKilledError,
    TaskKilledException,
    TaskPanicError,
    TaskTimeoutError,
    TokengateError,
    WorkerCrashedError,
    WorkerLostError,
)
from .executor import Executor

__version__: str = _tokengate.__version__

# Silent by default: loggers tokengate.gate, .pool, .worker, .token, .executor
# propagate to "tokengate", which has a NullHandler (configure logging to see them).
_logging.getLogger("tokengate").addHandler(_logging.NullHandler())

#: The original's lifecycle states, plus ``cancelled``.
TOKEN_STATES = ("created", "waiting", "admitted", "executing", "completed", "failed", "killed", "timeout", "cancelled")


def current_token() -> TaskToken[Any] | None:
    """The token whose task runs on this thread (None outside a task)."""
    return _tokengate.current_token()


__all__ = [
    "TOKEN_STATES",
    "AdmissionRejectedError",
    "ClusterExecutor",
    "DashboardServer",
    "DependencyFailedError",
    "DigestPolicy",
    "Executor",
    "ForkedProcessError",
    "HashPolicy",
    "MapResults",
    "NotStartedError",
    "OperationBlockedError",
    "OperationsCoordinator",
    "ProgressOption",
    "RemoteError",
    "ShutdownError",
    "TaskCancelledError",
    "TaskKilledError",
    "TaskKilledException",
    "TaskPanicError",
    "TaskTimeoutError",
    "TaskToken",
    "TokenCall",
    "TokenFunction",
    "TokengateError",
    "TryTokenCall",
    "UnpicklableError",
    "WorkerCrashedError",
    "WorkerLostError",
    "__version__",
    "as_completed",
    "current_token",
    "gather",
    "make_hashable",
    "metrics",
    "task_token_guard",
]
