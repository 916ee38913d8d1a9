"""``task_token_guard``: turns a synchronous function into one that returns a token."""

from __future__ import annotations

import functools
import inspect
import math
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol, TypeVar, cast, overload

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover
    from typing_extensions import ParamSpec

from . import _tokengate
from ._gather import MapResults
from ._progress import ProgressOption
from ._routing import sticky_key
from ._tags import MAX_SECONDS, check_priority, check_retries, check_seconds, validate_tags, weight_of
from ._tokengate import TaskToken

__all__ = ["TokenCall", "TokenFunction", "TryTokenCall", "task_token_guard"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class TokenCall(Protocol[P, R_co]):
    """``fn.options(...)``: the decorated function with per-call options (see :class:`CallWith`)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R_co]: ...
    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R_co]: ...


class TryTokenCall(Protocol[P, R_co]):
    """``fn.options(block=False, ...)`` and ``fn.try_submit``: a call on a full bounded
    coordinator returns ``None`` instead of waiting for admission."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R_co] | None: ...
    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R_co]: ...


class TokenFunction(Protocol[P, R]):
    """What ``@task_token_guard`` makes of a function ``Callable[P, R]``: calling it submits the
    call and returns a ``TaskToken[R]`` at once; ``await fn(x)`` gives an ``R``."""

    @property
    def operation_type(self) -> str: ...
    @property
    def tags(self) -> Mapping[str, Any]: ...
    @property
    def __wrapped__(self) -> Callable[P, R]: ...
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R]: ...
    # Read through an instance (a decorated method), the call binds the instance first:
    # its parameters are no longer P, and typing cannot drop the first one from P.
    @overload
    def __get__(self, instance: None, owner: type | None = None) -> TokenFunction[P, R]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> TokenFunction[..., R]: ...
    def map(
        self,
        *iterables: Iterable[Any],
        buffer: int | None = None,
        progress: ProgressOption = None,
        chunksize: int = 1,
    ) -> MapResults[R]:
        """``fn.map(xs)``: lazy, bounded, ordered results (iterate, ``async for``, or ``await``).

        ``progress``: a progress display of the items done on stderr (``True``: tqdm when
        installed, else a plain line; only on a terminal unless ``"force"``; see
        :data:`tokengate.ProgressOption`). ``chunksize``: on the process lane, calls go to
        the worker processes in chunks of this many, one token each, as with
        ``ProcessPoolExecutor.map`` (not for an operation with a ``timeout`` or ``retries``
        tag); elsewhere it is accepted and ignored, as by ``ThreadPoolExecutor.map``."""

    @overload
    def options(
        self,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        block: Literal[True] = True,
        admission_timeout: float | None = None,
    ) -> TokenCall[P, R]: ...
    @overload
    def options(
        self,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        block: bool,
        admission_timeout: float | None = None,
    ) -> TryTokenCall[P, R]: ...
    def try_submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R] | None:
        """Submits unless the bounded coordinator is full, in which case it returns ``None``."""

    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R]:
        """Waits for admission without blocking the event loop, then returns the token."""


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    if not inspect.isfunction(fn) and not inspect.ismethod(fn):
        call = getattr(type(fn), "__call__", None)  # noqa: B004 - the type's __call__ itself, to inspect it
        if call is not None and (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)):
            return True
    return False


def _is_generator_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isgeneratorfunction(fn):
        return True
    if not inspect.isfunction(fn) and not inspect.ismethod(fn):
        call = getattr(type(fn), "__call__", None)  # noqa: B004 - the type's __call__ itself, to inspect it
        if call is not None and inspect.isgeneratorfunction(call):
            return True
    return False


def _check_function(fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"@task_token_guard needs a callable, not {type(fn).__name__}")
    guarded = _guarded_function(fn)
    if guarded is not None:
        raise TypeError(
            f"@task_token_guard cannot decorate {fn!r}: it is already a @task_token_guard function "
            f"(operation_type {guarded.operation_type!r}), whose call returns a token, so every token "
            "of the new one would resolve to another token. Decorate the plain function "
            f"(its __wrapped__: {guarded.func!r}) instead."
        )
    if _is_async_callable(fn):
        raise TypeError(
            f"@task_token_guard cannot decorate {fn!r}: it is asynchronous (async def). "
            "tokengate runs synchronous functions on worker threads; await coroutines on your event loop."
        )
    if _is_generator_callable(fn):
        raise TypeError(
            f"@task_token_guard cannot decorate {fn!r}: it is a generator function, whose body would run "
            "lazily on the consumer's thread, not on a worker. Return a list instead."
        )


def _guarded_function(fn: Any) -> Any:
    """The spec of ``fn`` when it is a decorated function (or one called through
    ``functools.partial``, a bound method or ``.options(...)``), else None. A plain
    function that merely carries a decorated function's attributes
    (``functools.wraps(decorated)`` copies them) is not one: a decorated function's spec
    guards the very function it wraps."""
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    if isinstance(inner, types.MethodType):
        inner = inner.__func__
    if isinstance(inner, CallWith):
        inner = getattr(inner._submit, "__self__", inner._submit)
    if isinstance(inner, _tokengate.OperationSpec):  # .options(...) of a thread-lane function
        return inner
    try:
        spec = getattr(inner, "spec", None)
        if isinstance(spec, _tokengate.OperationSpec) and spec.func is getattr(inner, "__wrapped__", None):
            return spec
    except Exception:  # an object whose attribute lookup raises: not one of ours
        return None
    return None


def _arity(fn: Callable[..., Any], name: str) -> tuple[int, int | None, bool, Callable[..., None] | None]:
    """(min positional, max positional or None for *args, fast path allowed, binder)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0, None, True, None  # builtins without a signature: the call itself will check
    min_pos = 0
    max_pos: int | None = 0
    required_kwonly = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            assert max_pos is not None
            max_pos += 1
            if p.default is p.empty:
                min_pos += 1
        elif p.kind is p.VAR_POSITIONAL:
            max_pos = None
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            required_kwonly = True

    def binder(*args: Any, **kwargs: Any) -> None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None

    return min_pos, max_pos, not required_kwonly, binder


@overload
def task_token_guard(operation_type: Callable[P, R]) -> TokenFunction[P, R]: ...


@overload
def task_token_guard(
    operation_type: str | None = None, tags: Mapping[str, Any] | None = None
) -> Callable[[Callable[P, R]], TokenFunction[P, R]]: ...


def task_token_guard(operation_type: Any = None, tags: Mapping[str, Any] | None = None) -> Any:
    """Decorate a synchronous function so that calling it returns a :class:`TaskToken` at once
    while a worker of the running :class:`OperationsCoordinator` runs the body.

    ``operation_type`` names the operation (default: the function's qualified name);
    ``tags`` is a mapping of scheduling tags, validated now (unknown keys and bad values
    raise ``ValueError``) and copied (later changes to the caller's dict change nothing).
    """
    if (callable(operation_type) or isinstance(operation_type, (staticmethod, classmethod))) and tags is None:
        return task_token_guard()(operation_type)
    if operation_type is not None and (not isinstance(operation_type, str) or not operation_type.strip()):
        raise TypeError(f"operation_type must be a non-empty string or None, not {operation_type!r}")
    validated = validate_tags(tags)

    def decorate(fn: Callable[P, R]) -> TokenFunction[P, R]:
        # Above @staticmethod or @classmethod: guard the function and wrap the guard
        # again, so that it binds as the descriptor would (no instance, or the class).
        if isinstance(fn, (staticmethod, classmethod)):
            return cast("TokenFunction[P, R]", type(fn)(decorate(fn.__func__)))
        _check_function(fn)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        op = operation_type or name
        op_tags = dict(validated)
        op_tags.setdefault("weight", weight_of(op, validated))
        min_pos, max_pos, fast, binder = _arity(fn, name)
        retries = validated.get("retries", 0)
        if validated.get("allow_retries") is False:
            retries = 0
        spec = _tokengate.OperationSpec(
            fn,
            op,
            types.MappingProxyType(op_tags),
            min_pos,
            max_pos,
            fast,
            binder,
            priority=validated.get("priority", 0),
            timeout=validated.get("timeout"),
            retries=retries,
            weight=op_tags["weight"],
            storage_speed=validated.get("storage_speed"),
            external_calls=list(validated["external_calls"]) if "external_calls" in validated else None,
            digest_policy=validated.get("digest_policy", "full"),
        )
        clash = [t for t in ("process_pool", "storage_speed", "sticky_anchor", "external_calls") if validated.get(t)]
        if validated.get("cluster") and clash:
            raise ValueError(
                f"{op}: cluster: True cannot be combined with {', '.join(clash)} (they place tokens on this process's threads)"
            )
        if validated.get("storage_speed") and validated.get("process_pool"):
            warnings.warn(
                f"{op}: storage_speed and process_pool both set; the token stays on threads (the I/O lane)",
                RuntimeWarning,
                stacklevel=2,
            )
        anchor = validated.get("sticky_anchor")
        wrapper: Any
        if isinstance(anchor, str):
            policy = str(validated.get("hash_policy", "standard"))
            submit_with = spec.submit_with

            def wrapper(*args: Any, **kwargs: Any) -> TaskToken[Any] | None:
                return submit_with(args, kwargs, sticky_key=sticky_key(anchor, policy, args, kwargs))

        else:
            # Calling it submits, with no Python frame in between (see GuardedFunction in src/py/spec.rs).
            wrapper = _tokengate.GuardedFunction(spec)

        try:
            functools.update_wrapper(wrapper, fn)
        except AttributeError:  # pragma: no cover - callables without __name__
            wrapper.__wrapped__ = fn
        wrapper.operation_type = op
        wrapper.tags = spec.tags
        wrapper.spec = spec
        wrapper.map = functools.partial(_map, wrapper)
        wrapper.options = functools.partial(CallWith, spec.submit_with)
        wrapper.try_submit = CallWith(spec.submit_with, block=False)
        wrapper.submit_async = CallWith(spec.submit_with).submit_async
        if validated.get("cluster"):
            # A cluster lane (python/tokengate/_cluster/) runs these tokens.
            from ._cluster import cluster_wrapper

            return cast("TokenFunction[P, R]", cluster_wrapper(spec, fn))
        if validated.get("process_pool") and not validated.get("storage_speed"):
            # The process lane (python/tokengate/_process/) runs these tokens.
            from ._process import process_wrapper

            wrapper = process_wrapper(spec, fn)
        return cast("TokenFunction[P, R]", wrapper)

    return decorate


class CallWith:
    """A decorated function with per-call options: ``fn.options(priority=5, timeout=2.0)(x)``.

    ``priority`` (int, higher first), ``timeout`` (seconds until the token's deadline),
    ``retries`` (extra attempts after a failure) override the tags for these calls.
    ``block=False`` makes a call on a full bounded coordinator return ``None``
    instead of waiting (``fn.try_submit(x)`` is that form); ``admission_timeout``
    bounds the wait, then raises ``AdmissionRejectedError``. ``submit`` is the
    lane's ``submit(args, kwargs, **options)`` (thread or process lane).
    """

    __slots__ = ("_kw", "_submit")

    def __init__(
        self,
        submit: Callable[..., Any],
        *,
        priority: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        block: bool = True,
        admission_timeout: float | None = None,
    ) -> None:
        if priority is not None:
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise TypeError(f"option 'priority' must be an int, not {type(priority).__name__}")
            check_priority("option 'priority'", priority)
        if retries is not None:
            check_retries("option 'retries'", retries)
        if timeout is not None:
            timeout = check_seconds("option 'timeout'", timeout)
        if not isinstance(block, bool):
            raise TypeError(f"option 'block' must be a bool, not {type(block).__name__}")
        if admission_timeout is not None:
            if (
                not isinstance(admission_timeout, (int, float))
                or isinstance(admission_timeout, bool)
                or (isinstance(admission_timeout, float) and math.isnan(admission_timeout))
                or admission_timeout < 0
            ):
                raise ValueError(
                    f"option 'admission_timeout': invalid value {admission_timeout!r}; expected a non-negative "
                    "number of seconds (0: do not wait; None: wait as long as it takes)"
                )
            if admission_timeout > MAX_SECONDS:
                admission_timeout = None  # longer than any wait can be: no bound
        self._submit = submit
        self._kw = {
            "priority": priority,
            "timeout": timeout,
            "retries": retries,
            "block": block,
            "admission_timeout": admission_timeout,
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._submit(args, kwargs, **self._kw)

    async def submit_async(self, *args: Any, **kwargs: Any) -> TaskToken[Any]:
        """Waits for admission without blocking the event loop, then returns the token."""
        import asyncio
        import time

        from .exceptions import AdmissionRejectedError

        limit = self._kw["admission_timeout"]
        deadline = None if limit is None else time.monotonic() + float(limit)
        kw = dict(self._kw, block=False, probe=True)
        delay = 0.0002
        while True:
            token: TaskToken[Any] | None = self._submit(args, kwargs, **kw)
            if token is not None:
                return token
            if deadline is not None and time.monotonic() >= deadline:
                # One counted attempt, so the rejection shows in the stats.
                token = self._submit(args, kwargs, **dict(kw, probe=False))
                if token is not None:
                    return token
                raise AdmissionRejectedError(f"no admission slot freed within {limit}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.005)


def _map(
    fn: Callable[..., TaskToken[Any]],
    *iterables: Iterable[Any],
    buffer: int | None = None,
    progress: ProgressOption = None,
    chunksize: int = 1,
) -> Any:
    from ._gather import map_tokens

    desc = str(getattr(fn, "operation_type", "map")) if progress else "map"
    # A lane that runs a list of calls as one token (the process lane) takes chunks.
    chunker = getattr(fn, "_chunk_submitter", None)
    submit_chunk = chunker() if chunker is not None else None
    return map_tokens(
        fn, *iterables, buffer=buffer, progress=progress, desc=desc, chunksize=chunksize, submit_chunk=submit_chunk
    )
