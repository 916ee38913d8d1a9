"""@task_token_guard: what it accepts at decoration, at call time, and what the wrapper looks like."""

from __future__ import annotations

import functools
import gc
import inspect
import math
import types
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tokengate import OperationsCoordinator, TaskToken, task_token_guard
from tokengate._tags import KNOWN_TAGS

WAIT = 10.0


# -- what cannot be decorated -----------------------------------------------------------


async def _async_fn(x: int) -> int:
    return x


class _AsyncCallable:
    async def __call__(self, x: int) -> int:
        return x


def _gen_fn(n: int) -> Iterator[int]:
    yield from range(n)


async def _agen_fn(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(_async_fn, id="async-def"),
        pytest.param(functools.partial(_async_fn, 1), id="partial-of-async"),
        pytest.param(functools.partial(functools.partial(_async_fn), 1), id="nested-partial-of-async"),
        pytest.param(_AsyncCallable(), id="async-__call__"),
    ],
)
def test_async_callables_rejected_at_decoration(target: Any) -> None:
    with pytest.raises(TypeError, match="async"):
        task_token_guard(target)
    with pytest.raises(TypeError, match="async"):
        task_token_guard(operation_type="op")(target)


@pytest.mark.parametrize(
    "target",
    [pytest.param(_gen_fn, id="generator"), pytest.param(_agen_fn, id="async-generator")],
)
def test_generators_rejected_at_decoration(target: Any) -> None:
    with pytest.raises(TypeError, match=r"generator|async"):
        task_token_guard(target)
    with pytest.raises(TypeError, match=r"generator|async"):
        task_token_guard(tags={"weight": "light"})(target)


def _plain(x: int) -> int:
    return x


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param(None, id="threads"),
        pytest.param({"process_pool": True}, id="process-lane"),
        pytest.param({"sticky_anchor": "k"}, id="sticky"),
        pytest.param({"cluster": True}, id="cluster"),
    ],
)
def test_a_guarded_function_is_not_guarded_again(tags: Any) -> None:
    # Its call returns a token: each token of the outer function would resolve to another
    # token (a test of this suite once did this by accident and measured nothing).
    inner = task_token_guard(operation_type="inner", tags=tags)(_plain)
    with pytest.raises(
        TypeError, match=r"already a @task_token_guard function \(operation_type 'inner'\).*__wrapped__"
    ):
        task_token_guard(operation_type="outer")(inner)
    with pytest.raises(TypeError, match="already a @task_token_guard function"):
        task_token_guard(inner)
    for through in (functools.partial(inner, 1), inner.options(priority=2)):
        with pytest.raises(TypeError, match="already a @task_token_guard function"):
            task_token_guard(operation_type="outer")(through)
    outer = task_token_guard(operation_type="outer")(inner.__wrapped__)
    assert outer.operation_type == "outer"


def test_a_plain_function_wrapping_a_guarded_one_can_be_guarded() -> None:
    # functools.wraps copies the guarded function's attributes (its spec too) onto the
    # helper, which is still a plain function: its calls wait for the inner token.
    inner = task_token_guard(operation_type="inner_wrapped")(_plain)

    @task_token_guard(operation_type="outer_wrapper")
    @functools.wraps(inner)
    def helper(x: int) -> int:
        return inner(x).result(timeout=10)  # type: ignore[no-any-return]

    assert helper.operation_type == "outer_wrapper"
    with OperationsCoordinator():
        assert helper(7).result(timeout=10) == 7


@pytest.mark.parametrize("target", [5, "not callable", None, object()], ids=["int", "str", "None", "object"])
def test_non_callable_rejected(target: Any) -> None:
    with pytest.raises(TypeError):
        task_token_guard()(target)


# -- tags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tags, type_name",
    [(["weight", "light"], "list"), ("weight=light", "str"), ({"weight"}, "set"), (("weight", "light"), "tuple")],
)
def test_tags_must_be_a_mapping(tags: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match=type_name):
        task_token_guard(tags=tags)


@pytest.mark.parametrize("key", [1, None, ("weight",), b"weight"])
def test_tag_keys_must_be_strings(key: Any) -> None:
    with pytest.raises(TypeError):
        task_token_guard(tags={key: "light"})


@pytest.mark.parametrize("typo", ["wieght", "weigth", "Weight", "priorty", "storage-speed"])
def test_unknown_tag_names_key_and_valid_tags(typo: str) -> None:
    with pytest.raises(ValueError) as info:
        task_token_guard(tags={typo: "light"})
    msg = str(info.value)
    assert repr(typo) in msg or typo in msg
    for valid in KNOWN_TAGS:
        assert valid in msg, f"{valid!r} missing from {msg!r}"


def test_unknown_tag_suggests_close_match() -> None:
    with pytest.raises(ValueError, match="did you mean 'weight'"):
        task_token_guard(tags={"wieght": "light"})


def test_bad_weight_names_choices() -> None:
    with pytest.raises(ValueError) as info:
        task_token_guard(tags={"weight": "hevy"})
    msg = str(info.value)
    for choice in ("light", "medium", "heavy"):
        assert choice in msg, msg
    assert "hevy" in msg


@pytest.mark.parametrize("value", [True, False, 1, None, "", "extreme"])
def test_bad_weight_values(value: Any) -> None:
    with pytest.raises(ValueError):
        task_token_guard(tags={"weight": value})


@pytest.mark.parametrize("key", ["timeout", "priority", "retries"])
@pytest.mark.parametrize(
    "value",
    [True, False, math.nan, math.inf, -math.inf],
    ids=["True", "False", "nan", "inf", "-inf"],
)
def test_numeric_tags_reject_bool_nan_inf(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        task_token_guard(tags={key: value})


@pytest.mark.parametrize("key, value", [("timeout", -1), ("timeout", -0.5), ("timeout", 0), ("retries", -1)])
def test_numeric_tags_reject_negative(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        task_token_guard(tags={key: value})


@pytest.mark.parametrize(
    "key, value", [("timeout", 2), ("timeout", 0.5), ("priority", 7), ("retries", 0), ("retries", 3)]
)
def test_numeric_tags_accept_valid(key: str, value: Any) -> None:
    @task_token_guard(tags={key: value})
    def g() -> None:
        pass

    assert g.tags[key] == value  # type: ignore[attr-defined]


def test_mapping_proxy_tags_accepted(coordinator: OperationsCoordinator) -> None:
    proxy = types.MappingProxyType({"weight": "heavy", "priority": 2})

    @task_token_guard(tags=proxy)
    def g() -> int:
        return 3

    assert g.tags["weight"] == "heavy"  # type: ignore[attr-defined]
    tok = g()
    assert tok.result(timeout=WAIT) == 3
    assert tok.tags["priority"] == 2


# -- arity: TypeError at call time ----------------------------------------------------------


@task_token_guard
def _arity_fn(a: int, b: int = 2, *, k: int) -> int:
    _ran.append((a, b, k))
    return a + b + k


_ran: list[tuple[int, int, int]] = []


@pytest.mark.parametrize(
    "args, kwargs, pattern",
    [
        ((), {"k": 1}, "missing"),
        ((1, 2, 3), {"k": 1}, "too many"),
        ((1,), {"k": 1, "zz": 1}, "unexpected keyword|zz"),
        ((1,), {}, "missing|k"),
        ((1, 2), {}, "missing|k"),
    ],
    ids=["too-few", "too-many", "unknown-kwarg", "missing-kwonly", "missing-kwonly-2"],
)
def test_wrong_arity_raises_at_call_time(
    coordinator: OperationsCoordinator, args: tuple[Any, ...], kwargs: dict[str, Any], pattern: str
) -> None:
    _ran.clear()
    with pytest.raises(TypeError, match=pattern):
        _arity_fn(*args, **kwargs)
    ok = _arity_fn(1, k=3)
    assert isinstance(ok, TaskToken)
    assert ok.result(timeout=WAIT) == 6
    assert _ran == [(1, 2, 3)], "the bad call must not run the body"


def test_wrong_arity_positional_only_fast_path(coordinator: OperationsCoordinator) -> None:
    @task_token_guard
    def two(a: int, b: int) -> int:
        return a * b

    with pytest.raises(TypeError):
        two(1)
    with pytest.raises(TypeError):
        two(1, 2, 3)
    with pytest.raises(TypeError):
        two(1, c=2)
    assert two(3, 4).result(timeout=WAIT) == 12
    assert two(a=3, b=5).result(timeout=WAIT) == 15


# -- wrapper metadata ---------------------------------------------------------------------


def _documented(x: int, y: str = "s", *rest: int, flag: bool = False, **extra: Any) -> str:
    """Docstring of the original."""
    return f"{x}{y}{rest}{flag}{extra}"


def test_wraps_metadata() -> None:
    wrapped = task_token_guard(_documented)
    assert wrapped.__name__ == "_documented"
    assert wrapped.__doc__ == "Docstring of the original."
    assert wrapped.__wrapped__ is _documented  # type: ignore[attr-defined]
    assert wrapped.__qualname__ == _documented.__qualname__
    assert wrapped.__module__ == _documented.__module__


def test_signature_matches() -> None:
    wrapped = task_token_guard(operation_type="doc")(_documented)
    assert inspect.signature(wrapped) == inspect.signature(_documented)
    assert str(inspect.signature(wrapped)) == str(inspect.signature(_documented))


def test_nested_qualname() -> None:
    class Outer:
        @task_token_guard
        def meth(self) -> None:
            pass

    assert Outer.meth.__qualname__.endswith("Outer.meth")
    assert Outer.meth.operation_type == Outer.meth.__qualname__  # type: ignore[attr-defined]


def test_method_binds_self(coordinator: OperationsCoordinator) -> None:
    class Box:
        def __init__(self, v: int) -> None:
            self.v = v

        @task_token_guard
        def add(self, x: int) -> int:
            return self.v + x

    a, b = Box(10), Box(100)
    ta, tb = a.add(1), b.add(2)
    assert ta.result(timeout=WAIT) == 11
    assert tb.result(timeout=WAIT) == 102
    with pytest.raises(TypeError):
        a.add()  # missing x, caught at call time
    assert Box.add(a, 5).result(timeout=WAIT) == 15


# -- a sync function that returns a coroutine -------------------------------------------------


def test_sync_function_returning_coroutine_fails_token(coordinator: OperationsCoordinator) -> None:
    made: list[Any] = []

    async def co() -> int:
        return 1

    @task_token_guard
    def returns_coro() -> Any:
        c = co()
        made.append(c)
        return c

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = returns_coro()
        exc = tok.exception(timeout=WAIT)
        assert isinstance(exc, TypeError), exc
        assert "coroutine" in str(exc)
        assert tok.state == "failed"
        with pytest.raises(TypeError):
            tok.result(timeout=WAIT)
        assert len(made) == 1
        assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED
        made.clear()
        del tok, exc
        gc.collect()
    never_awaited = [w for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == [], [str(w.message) for w in never_awaited]


# -- operation_type -------------------------------------------------------------------------


def test_operation_type_defaults_to_qualname(coordinator: OperationsCoordinator) -> None:
    def local_fn() -> int:
        return 1

    wrapped = task_token_guard(local_fn)
    assert wrapped.operation_type == local_fn.__qualname__  # type: ignore[attr-defined]
    assert wrapped.operation_type == "test_operation_type_defaults_to_qualname.<locals>.local_fn"  # type: ignore[attr-defined]
    tok = wrapped()
    assert tok.operation_type == local_fn.__qualname__
    tok.result(timeout=WAIT)

    with_parens = task_token_guard()(local_fn)
    assert with_parens.operation_type == local_fn.__qualname__  # type: ignore[attr-defined]


def test_explicit_operation_type(coordinator: OperationsCoordinator) -> None:
    wrapped = task_token_guard(operation_type="custom_op")(lambda: 1)
    assert wrapped.operation_type == "custom_op"  # type: ignore[attr-defined]
    tok = wrapped()
    assert tok.operation_type == "custom_op"
    tok.result(timeout=WAIT)


@pytest.mark.parametrize("op", [5, 1.5, b"bytes", ["x"]], ids=["int", "float", "bytes", "list"])
def test_operation_type_must_be_str(op: Any) -> None:
    with pytest.raises(TypeError):
        task_token_guard(operation_type=op)


def test_operation_type_must_be_non_empty() -> None:
    with pytest.raises((TypeError, ValueError)):
        task_token_guard(operation_type="")
