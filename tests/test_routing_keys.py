"""Routing keys: ``hash_policy`` (how arguments take part in a sticky key),
``make_hashable`` and ``digest_policy`` (the length of a lead's seed).
"""

from __future__ import annotations

import copy
import functools
import random
import string
import threading
from typing import Any

import pytest

import support
import tokengate
from tokengate import DigestPolicy, HashPolicy, OperationsCoordinator, current_token, make_hashable, task_token_guard
from tokengate._routing import sticky_key

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - the free-threaded leg has no hypothesis wheel
    HAVE_HYPOTHESIS = False

WAIT = 30.0


wait_until = functools.partial(support.wait_until, interval=0.01)


# -- odd argument objects ---------------------------------------------------------------


class Plain:
    """Hashable by identity."""


class Unhashable:
    __hash__ = None  # type: ignore[assignment]


class HashRaises:
    def __hash__(self) -> int:
        raise RuntimeError("no hash for you")


class Hostile:
    """Fails at everything a key function might try."""

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __repr__(self) -> str:
        raise RuntimeError("repr")

    def __len__(self) -> int:
        raise RuntimeError("len")

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"getattr {name}")


class FakeArray:
    shape = (2, 3)
    dtype = "float64"

    def tobytes(self) -> bytes:
        return b"\x00" * 48


def recursive_list() -> list:
    x: list = [1, 2]
    x.append(x)
    return x


def recursive_dict() -> dict:
    d: dict = {"a": 1}
    d["self"] = d
    d["nested"] = [d, {"again": d}]
    return d


def deep_list(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


ODD_ARGS = {
    "list": [1, [2, 3]],
    "dict": {"a": [1], "b": {2, 3}},
    "set": {1, 2, 3},
    "unhashable-object": Unhashable(),
    "hash-raises": HashRaises(),
    "hostile": Hostile(),
    "recursive-list": recursive_list(),
    "recursive-dict": recursive_dict(),
    "deep-list": deep_list(5000),
    "fake-array": FakeArray(),
    "mixed": (Hostile(), [Unhashable(), {"k": HashRaises()}], frozenset({1, "x"})),
}


# -- hash_policy ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["none", "NONE", HashPolicy.NONE])
def test_hash_policy_none_routes_by_the_anchor_alone(policy: object) -> None:
    gate = threading.Event()

    @task_token_guard(operation_type="rk_none", tags={"sticky_anchor": "acct", "hash_policy": policy})
    def op(x: Any) -> int | None:
        gate.wait(WAIT)
        return current_token().worker_id

    with OperationsCoordinator() as coord:
        try:
            tokens = [op(1), op(2), op("three"), op([4]), op({"five": 5})]
            assert list(coord.sticky_snapshot()) == ["acct"]
            assert coord.sticky_snapshot()["acct"][1] == 5
        finally:
            gate.set()
        workers = {t.result(timeout=WAIT) for t in tokens}
    assert len(workers) == 1, f"NONE: calls with different arguments ran on workers {workers}"


def test_hash_policy_standard_routes_by_the_arguments() -> None:
    gate = threading.Event()

    @task_token_guard(operation_type="rk_std", tags={"sticky_anchor": "acct", "hash_policy": "standard"})
    def op(x: Any, *, flag: Any = None) -> int | None:
        gate.wait(WAIT)
        return current_token().worker_id

    with OperationsCoordinator() as coord:
        try:
            groups = {
                "one": [op(1) for _ in range(3)],
                "two": [op(2) for _ in range(3)],
                # equal values in distinct objects share a key
                "list": [op([1, {"a": 2}]) for _ in range(3)],
                # dict order does not matter
                "dict": [
                    op({"a": 1, "b": 2}),
                    op({"b": 2, "a": 1}),
                    op(dict([("b", 2), ("a", 1)])),  # noqa: C406 - a third way to build the dict, on purpose
                ],
                "kw": [op(1, flag=[1, 2]), op(1, flag=[1, 2])],
            }
            snap = coord.sticky_snapshot()
            assert len(snap) == 5, snap
            assert sorted(n for _, n in snap.values()) == [2, 3, 3, 3, 3]
            assert all(k.startswith("acct|") for k in snap)
        finally:
            gate.set()
        workers = {name: {t.result(timeout=WAIT) for t in toks} for name, toks in groups.items()}
    for name, ws in workers.items():
        assert len(ws) == 1, f"STANDARD: equal arguments ({name}) ran on workers {ws}"


def test_standard_is_the_default_policy() -> None:
    a = task_token_guard(operation_type="rk_default", tags={"sticky_anchor": "acct"})(lambda x: x)
    assert a.tags.get("hash_policy", "standard") == "standard"
    gate = threading.Event()

    @task_token_guard(operation_type="rk_default2", tags={"sticky_anchor": "acct"})
    def op(x: int) -> int:
        gate.wait(WAIT)
        return x

    with OperationsCoordinator() as coord:
        try:
            tokens = [op(1), op(2)]
            assert len(coord.sticky_snapshot()) == 2
        finally:
            gate.set()
        for t in tokens:
            t.result(timeout=WAIT)


@pytest.mark.parametrize("policy", ["fast", "standard", "full"])
def test_sticky_keys_are_deterministic(policy: str) -> None:
    args = (1, "x", [1, 2, {"a": (3, 4)}], {"k": {5, 6}})
    kwargs = {"flag": True, "opts": {"b": 1, "a": 2}}
    k1 = sticky_key("anc", policy, args, kwargs)
    k2 = sticky_key("anc", policy, copy.deepcopy(args), copy.deepcopy(kwargs))
    k3 = sticky_key("anc", policy, args, dict(reversed(list(kwargs.items()))))
    assert k1 == k2 == k3
    assert k1.startswith("anc|")
    assert sticky_key("anc", policy, (2,), {}) != sticky_key("anc", policy, (1,), {})
    assert sticky_key("anc", "none", args, kwargs) == "anc"


def test_full_keys_are_sha256_and_order_insensitive() -> None:
    k = sticky_key("anc", "full", ({"a": 1, "b": 2},), {})
    digest = k.split("|", 1)[1]
    assert len(digest) == 64 and set(digest) <= set(string.hexdigits.lower())
    assert k == sticky_key("anc", "full", ({"b": 2, "a": 1},), {})


@pytest.mark.parametrize("policy", ["none", "fast", "standard", "full"])
@pytest.mark.parametrize("name", list(ODD_ARGS))
def test_unhashable_arguments_never_make_a_call_fail(policy: str, name: str) -> None:
    arg = ODD_ARGS[name]

    @task_token_guard(operation_type=f"rk_odd_{policy}", tags={"sticky_anchor": "odd", "hash_policy": policy})
    def op(x: Any, *, also: Any = None) -> bool:
        return x is arg and also is arg

    with OperationsCoordinator(max_workers=2) as coord:
        t = op(arg, also=arg)
        assert t.result(timeout=WAIT) is True
        assert wait_until(lambda: coord.sticky_snapshot() == {}, 5)


# -- make_hashable ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ODD_ARGS))
def test_make_hashable_never_raises_on_odd_objects(name: str) -> None:
    obj = ODD_ARGS[name]
    a = make_hashable(obj)
    hash(a)
    b = make_hashable(obj)
    assert hash(a) == hash(b)


class UnhashableStr(str):
    __hash__ = None  # type: ignore[assignment]


class IntHashRaises(int):
    def __hash__(self) -> int:
        raise RuntimeError("no hash for you")


@pytest.mark.parametrize(
    "obj",
    [UnhashableStr("a"), IntHashRaises(3), [UnhashableStr("a")], (1, IntHashRaises(2))],
    ids=["str-subclass-unhashable", "int-subclass-hash-raises", "in-list", "in-tuple"],
)
def test_make_hashable_result_is_hashable_for_scalar_subclasses(obj: Any) -> None:
    """ "A hashable stand-in for any object": also for subclasses of builtin scalars
    whose hash is disabled or raises."""
    a = make_hashable(obj)
    hash(a)  # must not raise
    assert make_hashable(obj) == a


def test_make_hashable_is_value_based_and_order_insensitive() -> None:
    assert make_hashable([1, {"a": 2}]) == make_hashable([1, {"a": 2}])
    assert make_hashable({"a": 1, "b": 2}) == make_hashable({"b": 2, "a": 1})
    assert make_hashable({3, 1, 2}) == make_hashable({2, 3, 1})
    assert make_hashable([1, 2]) != make_hashable([2, 1])
    assert make_hashable({"a": 1}) != make_hashable({"a": 2})
    assert make_hashable(recursive_list()) == make_hashable(recursive_list())
    assert make_hashable(recursive_dict()) == make_hashable(recursive_dict())
    assert make_hashable(FakeArray()) == make_hashable(FakeArray())
    assert tokengate.make_hashable is make_hashable


if HAVE_HYPOTHESIS:
    SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=6)
        | st.binary(max_size=6)
        | st.complex_numbers(allow_nan=False)
    )
    hashable_data = st.recursive(scalars, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3), max_leaves=6)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return (
            st.lists(children, max_size=4)
            | st.tuples(children, children)
            | st.dictionaries(hashable_data, children, max_size=4)
            | st.sets(hashable_data, max_size=4)
            | st.frozensets(hashable_data, max_size=4)
        )

    data = st.recursive(scalars, containers, max_leaves=25)
    objects = st.sampled_from([Plain, Unhashable, HashRaises, Hostile, FakeArray]).map(lambda cls: cls())
    anything = st.recursive(scalars | objects, containers, max_leaves=25)

    @st.composite
    def recursive_structures(draw: st.DrawFn) -> Any:
        base = draw(st.sampled_from(["list", "dict"]))
        inner = draw(st.lists(anything, max_size=3))
        if base == "list":
            x: Any = list(inner)
            x.append(x)
            x.append([x, {"back": x}])
        else:
            x = dict(enumerate(inner))
            x["self"] = x
            x["list"] = [x]
        return x

    def reorder(x: Any, rnd: random.Random) -> Any:
        """A deep copy with every dict's and set's insertion order shuffled."""
        if isinstance(x, dict):
            items = [(k, reorder(v, rnd)) for k, v in x.items()]
            rnd.shuffle(items)
            return dict(items)
        if isinstance(x, (set, frozenset)):
            items = list(x)
            rnd.shuffle(items)
            return type(x)(items)
        if isinstance(x, list):
            return [reorder(v, rnd) for v in x]
        if isinstance(x, tuple):
            return tuple(reorder(v, rnd) for v in x)
        return x

    @SETTINGS
    @given(anything | recursive_structures())
    def test_make_hashable_never_raises_and_is_deterministic(obj: Any) -> None:
        a = make_hashable(obj)
        b = make_hashable(obj)
        assert hash(a) == hash(b)
        assert a == b

    @SETTINGS
    @given(data, st.randoms(use_true_random=False))
    def test_make_hashable_is_value_based_and_ignores_dict_and_set_order(obj: Any, rnd: random.Random) -> None:
        a = make_hashable(obj)
        assert make_hashable(copy.deepcopy(obj)) == a
        assert make_hashable(reorder(obj, rnd)) == a
        assert hash(make_hashable(reorder(obj, rnd))) == hash(a)

    @SETTINGS
    @given(st.lists(data, max_size=3), st.dictionaries(st.text(max_size=4), data, max_size=3))
    def test_sticky_keys_never_raise(args: list, kwargs: dict) -> None:
        for policy in ("none", "fast", "standard", "full"):
            k = sticky_key("a", policy, tuple(args), kwargs)
            assert isinstance(k, str) and k.startswith("a")
            assert k == sticky_key("a", policy, tuple(copy.deepcopy(args)), copy.deepcopy(kwargs))

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_make_hashable_properties() -> None:
        pass


# -- digest_policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "length"),
    [("full", 64), ("short", 16), ("fast", 16), ("minimal", 8), (DigestPolicy.SHORT, 16), ("MINIMAL", 8), (None, 64)],
)
def test_digest_policy_sets_the_seed_length(policy: object, length: int) -> None:
    tags: dict[str, Any] = {"external_calls": ["rk_dig_child"]}
    if policy is not None:
        tags["digest_policy"] = policy

    @task_token_guard(operation_type="rk_dig_child")
    def child() -> str | None:
        return current_token().conductor_seed

    @task_token_guard(operation_type="rk_dig_lead", tags=tags)
    def lead() -> str | None:
        return child().result(timeout=WAIT)

    with OperationsCoordinator() as coord:
        leads = [lead() for _ in range(3)]
        child_seeds = [t.result(timeout=WAIT) for t in leads]
        assert wait_until(lambda: coord.domain_snapshot() == {}, 5)
    seeds = [t.conductor_seed for t in leads]
    for seed, child_seed in zip(seeds, child_seeds):
        assert isinstance(seed, str) and len(seed) == length, seed
        assert set(seed) <= set(string.hexdigits.lower())
        assert child_seed == seed
    assert len(set(seeds)) == 3


def test_unknown_policies_are_rejected() -> None:
    with pytest.raises(ValueError):
        task_token_guard(operation_type="rk_bad_hash", tags={"sticky_anchor": "a", "hash_policy": "sha1"})
    with pytest.raises(ValueError):
        task_token_guard(operation_type="rk_bad_digest", tags={"external_calls": [], "digest_policy": "long"})
