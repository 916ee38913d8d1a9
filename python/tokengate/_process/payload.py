"""What crosses the process boundary: functions, arguments, results and errors.

* **Functions** importable by name (module-level functions of a real module)
  are sent by reference: the worker imports the module and calls the
  undecorated function (``__wrapped__``); others go by value (cloudpickle).
  Either way a worker receives a function once and caches it. The tokens of
  ``fn.map(..., chunksize=n)`` carry ``("chunk", the function's payload,
  None)``: the worker runs a list of calls of that function in turn.
* **Serialization.** Functions, arguments and results that plain pickle
  cannot handle go through loky's pickler (cloudpickle with loky's
  reducers), so functions defined in ``__main__``, inside other functions,
  or lambdas work. Arguments of plain types go through pickle. Results go
  through pickle first and through loky's pickler only where pickle fails:
  what pickle pickles it pickles as loky's pickler would (by name), without
  the ~11 us loky's pickler takes to set up for each call.
* **Pickling errors.** Arguments are pickled in the calling thread; one that
  cannot be pickled fails *that token* with :class:`UnpicklableError` (a
  ``TypeError`` and ``pickle.PicklingError``) naming the argument and its type.
  A result (or the function) that cannot be pickled fails the token the same
  way; the lane stays usable.
* **Exceptions** a task raised come back with the worker's traceback as
  their ``__cause__`` (:class:`_RemoteTraceback`); one that cannot be
  pickled, or not rebuilt from its pickle, comes back as :class:`RemoteError`.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import TYPE_CHECKING, Any

from ..exceptions import TokengateError

if TYPE_CHECKING:
    from .wrapper import ProcessFunction

_PROTO = pickle.HIGHEST_PROTOCOL
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


class UnpicklableError(TokengateError, pickle.PicklingError, TypeError):
    """An argument, the function or the result of a process token could not be
    pickled to cross the process boundary. The message names what and its type."""


class _RemoteTraceback(Exception):
    """The worker-side traceback, attached as ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(TokengateError):
    """Stands in for a task exception that could not be sent back from the worker
    process (it could not be pickled). The message keeps its type and text."""


# -- serialization --------------------------------------------------------------------


def _cloud_dumps(obj: object) -> bytes:
    """loky's pickler: cloudpickle (by-value functions and classes) plus loky's reducers."""
    from loky.backend.reduction import dumps

    return bytes(dumps(obj, protocol=_PROTO))


def _dumps(obj: object) -> bytes:
    return _cloud_dumps(obj)


_by_name: Any = None
_by_name_tables: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})


def _dumps_result(obj: object) -> bytes:
    """A result, pickled as loky's pickler would, faster: pickle with loky's reducers
    first (functions and classes by name), cloudpickle's by-value pickling only where
    that fails (a function or class the worker received by value, a lambda). Setting
    up loky's pickler takes about 11 us a call; this one under 1 us."""
    global _by_name, _by_name_tables
    if type(obj) in _PLAIN:
        return pickle.dumps(obj, _PROTO)
    import copyreg

    from loky.backend import reduction

    std, loky = _by_name_tables
    if _by_name is None or copyreg.dispatch_table != std or reduction._dispatch_table != loky:
        # First use, or a reducer was registered, replaced or removed since.
        std, loky = dict(copyreg.dispatch_table), dict(reduction._dispatch_table)

        class _ByName(pickle.Pickler):
            # The standard reducers and loky's, as loky's pickler has them (a dict: the
            # C pickler looks types up in it without calling back into Python).
            dispatch_table = {**std, **loky}  # noqa: RUF012

        _by_name, _by_name_tables = _ByName, (std, loky)
    buf = io.BytesIO()
    try:
        _by_name(buf, _PROTO).dump(obj)
    except Exception:
        return _cloud_dumps(obj)
    return buf.getvalue()


def _type_name(obj: object) -> str:
    t = type(obj)
    mod = getattr(t, "__module__", "")
    name = getattr(t, "__qualname__", t.__name__)
    return name if mod in ("builtins", "", None) else f"{mod}.{name}"


def _dump_args(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], lane: str = "the process lane") -> bytes:
    """Pickles (args, kwargs); UnpicklableError naming the first argument that fails."""
    plain = _PLAIN.__contains__
    if all(map(plain, map(type, args))) and all(map(plain, map(type, kwargs.values()))):
        return pickle.dumps((args, kwargs), _PROTO)
    try:
        return _cloud_dumps((args, kwargs))
    except Exception as exc:
        first: BaseException = exc
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
        (f"keyword argument {k!r}", v) for k, v in kwargs.items()
    ]
    for what, value in named:
        try:
            _cloud_dumps(value)
        except Exception as exc:
            raise UnpicklableError(f"{op}: {what} ({_type_name(value)}) cannot be pickled for {lane}: {exc}") from exc
    raise UnpicklableError(f"{op}: the arguments cannot be pickled for {lane}: {first}") from first


def _resolve_qualname(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _function_payload(pf: ProcessFunction, lane: str = "the process lane") -> tuple[str, Any, Any]:
    """The payload of a decorated function (see :func:`function_payload`)."""
    return function_payload(pf._fn, pf._op, lane, pf)


def function_payload(fn: Any, op: str, lane: str, wrapper: Any = None) -> tuple[str, Any, Any]:
    """("ref", module, qualname) when a worker can import ``fn`` (or its decorated
    ``wrapper``) by name, else ("value", pickled function, None)."""
    mod = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(mod, str) and isinstance(qualname, str) and mod != "__main__" and "<locals>" not in qualname:
        module = sys.modules.get(mod)
        try:
            found = _resolve_qualname(module, qualname) if module is not None else None
        except Exception:
            found = None
        if found is fn or (wrapper is not None and found is wrapper):
            return ("ref", mod, qualname)
    try:
        return ("value", _cloud_dumps(fn), None)
    except Exception as exc:
        raise UnpicklableError(f"{op}: the function {qualname or fn!r} cannot be pickled for {lane}: {exc}") from exc
