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
  or lambdas work. Values of plain types go through pickle. loky's pickler
  class is made once (loky makes its dispatch table again for every call,
  about 11 us), see :func:`_picklers`. A worker pickles results by name
  first, with the same table, and by value only where that fails.
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

import copyreg
import io
import operator
import pickle
import sys
from collections.abc import Mapping
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


#: loky's pickler, made once (see :func:`_picklers`): the two classes, loky's pickler they
#: were made from, copies of the dispatch tables merged into them, and loky's reduction module.
_made: tuple[Any, ...] = (None, None, None, (), None)


def _dispatch_sources(loky_pickler: Any, reduction: Any) -> list[Any]:
    """The dispatch tables loky's pickler merges, lowest priority first: the standard ones
    (a class-level ChainMap on cloudpickle's pickler, whose first map wins), then loky's."""
    table = getattr(loky_pickler._loky_pickler_cls, "dispatch_table", None)
    if not isinstance(table, Mapping):  # plain pickle's pickler (LOKY_PICKLER=pickle): a slot
        table = copyreg.dispatch_table
    maps = getattr(table, "maps", None)
    base = [table] if maps is None else maps[::-1]
    return [*base, reduction._dispatch_table]


def _picklers() -> tuple[Any, Any]:
    """Two pickler classes with the dispatch table loky's pickler has (the standard
    reducers, cloudpickle's and loky's), made once: loky's pickler itself (cloudpickle:
    functions and classes by value where a worker could not import them, by name
    elsewhere), and plain pickle's with the same table (everything by name: no Python
    call per object). loky copies its tables into a new dict for every pickler it
    makes, about 11 us a call; these classes hold that dict (the C pickler looks types
    up in it without calling back into Python), and are made again when a reducer was
    registered, replaced or removed, or another loky pickler was chosen."""
    global _made
    cloud, by_name, loky_pickler, copies, reduction = _made
    if cloud is not None and reduction.get_loky_pickler() is loky_pickler:
        sources = _dispatch_sources(loky_pickler, reduction)
        if len(sources) == len(copies) and all(map(operator.eq, copies, sources)):
            return cloud, by_name
    from loky.backend import reduction as loky_reduction

    loky_pickler = loky_reduction.get_loky_pickler()
    # Copied first, merged from the copies: a reducer registered meanwhile (by another
    # thread) is then missing from both, and the next call makes the classes again.
    copies = [dict(source) for source in _dispatch_sources(loky_pickler, loky_reduction)]
    merged: dict[Any, Any] = {}
    for copy in copies:
        merged.update(copy)

    class _CloudPickler(loky_pickler._loky_pickler_cls):  # type: ignore[misc, name-defined]
        dispatch_table = merged

    class _ByNamePickler(pickle.Pickler):
        dispatch_table = merged

    _made = (_CloudPickler, _ByNamePickler, loky_pickler, copies, loky_reduction)
    return _CloudPickler, _ByNamePickler


def _cloud_dumps(obj: object) -> bytes:
    """``obj`` pickled as loky's pickler pickles it (see :func:`_picklers`)."""
    buf = io.BytesIO()
    _picklers()[0](buf, protocol=_PROTO).dump(obj)
    return buf.getvalue()


def _dumps_result(obj: object) -> bytes:
    """A worker's result: by name first (the same table as loky's pickler, without
    cloudpickle's Python call for each object that is not a built-in value), by loky's
    pickler only where that fails (a function, or an instance of a class, the worker
    received by value, a lambda). Only in a worker: there a by-name reference to
    ``__main__`` fails (the worker's ``__main__`` is not the caller's), so everything
    the caller could not import goes by value."""
    if type(obj) in _PLAIN:
        return pickle.dumps(obj, _PROTO)
    buf = io.BytesIO()
    try:
        _picklers()[1](buf, _PROTO).dump(obj)
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
        return pickle.dumps((args, kwargs), _PROTO)  # no pickler to make: the common case
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
