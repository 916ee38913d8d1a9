"""The decorated function is a native callable (``GuardedFunction``) that behaves like a function."""

from __future__ import annotations

import functools
import inspect
import pickle

import pytest

from tokengate import OperationsCoordinator, _tokengate, task_token_guard


@task_token_guard(operation_type="gf_upper")
def upper(s: str, *, suffix: str = "") -> str:
    """Upper-cases s."""
    return s.upper() + suffix


class Counter:
    def __init__(self, base: int) -> None:
        self.base = base

    @task_token_guard(operation_type="gf_add")
    def add(self, x: int) -> int:
        return self.base + x

    @staticmethod
    @task_token_guard(operation_type="gf_static")
    def double(x: int) -> int:
        return 2 * x


def test_metadata_signature_and_repr() -> None:
    assert isinstance(upper, _tokengate.GuardedFunction)
    assert upper.__name__ == "upper"
    assert upper.__qualname__ == "upper"
    assert upper.__module__ == __name__
    assert upper.__doc__ == "Upper-cases s."
    assert upper.__wrapped__.__name__ == "upper"
    assert str(inspect.signature(upper)) == "(s: 'str', *, suffix: 'str' = '') -> 'str'"
    assert "upper" in repr(upper) and "gf_upper" in repr(upper)
    assert upper.spec.operation_type == "gf_upper"


def test_calls_with_positional_and_keyword_arguments(coordinator: OperationsCoordinator) -> None:
    assert upper("ab").result(timeout=10) == "AB"
    assert upper("ab", suffix="!").result(timeout=10) == "AB!"
    assert upper(s="cd").result(timeout=10) == "CD"
    with pytest.raises(TypeError, match="upper"):
        upper()
    with pytest.raises(TypeError, match="upper"):
        upper("a", "b")


def test_binds_as_a_method_and_works_under_staticmethod(coordinator: OperationsCoordinator) -> None:
    c = Counter(10)
    assert c.add(5).result(timeout=10) == 15
    assert Counter.add(c, 1).result(timeout=10) == 11
    assert inspect.ismethod(c.add)
    assert str(inspect.signature(c.add)) == "(x: 'int') -> 'int'"
    assert Counter.double(4).result(timeout=10) == 8
    assert c.double(5).result(timeout=10) == 10
    assert functools.partial(c.add, 2)().result(timeout=10) == 12


def test_pickles_by_reference_like_a_function() -> None:
    assert pickle.loads(pickle.dumps(upper)) is upper
    local = task_token_guard(operation_type="gf_local")(lambda x: x)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local)


def test_attributes_can_be_set_and_weakly_referenced() -> None:
    import weakref

    upper.custom = 1  # type: ignore[attr-defined]
    try:
        assert upper.custom == 1  # type: ignore[attr-defined]
    finally:
        del upper.custom  # type: ignore[attr-defined]
    assert weakref.ref(upper)() is upper
