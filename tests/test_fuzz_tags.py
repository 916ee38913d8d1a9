"""Hypothesis search over tag values, per-call option values and coordinator numbers.

The contract every input must keep:

* refused at once: ``@task_token_guard(tags=...)``, ``fn.options(...)`` or
  ``OperationsCoordinator(...)`` raises a ``TypeError`` or ``ValueError`` (an
  ``Exception``, never a ``BaseException`` such as pyo3's ``PanicException``)
  whose message names the offending tag, option or argument; or
* accepted: a call returns a token that resolves within a few seconds (its
  value, the body's own exception, or ``TaskTimeoutError`` where a timeout was
  given), after which the coordinator's books show nothing unresolved, pending,
  pinned or open; an accepted coordinator starts, runs a token and stops
  within a few seconds.

Which inputs must be refused and which must be accepted is judged here from the
documented meaning of each tag and option (``README.md``, "Scheduling" and
"Admission and control"), not from the validators under test. Values at the
edge of what a machine word or a ``Duration`` can hold (a priority of 2**63, a
timeout of 1e20 s) may go either way, as long as the outcome is clean.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (the free-threaded leg has no wheel for it)")

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from support import wait_until
from tokengate import (
    DigestPolicy,
    HashPolicy,
    OperationsCoordinator,
    TaskTimeoutError,
    task_token_guard,
)

#: Seconds a token may take to resolve, and the books to come clean, before the input is a failure.
WAIT = 5.0

VALID, INVALID, EITHER = "valid", "invalid", "either"

NAN, INF = math.nan, math.inf

#: Values of every type and at every edge, drawn for any tag or option.
EDGE_VALUES: list[Any] = [
    0,
    1,
    -1,
    2,
    100,
    101,
    2**31,
    -(2**31),
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
    -(10**30),
    True,
    False,
    None,
    NAN,
    INF,
    -INF,
    1e300,
    -1e300,
    1e20,
    1e10,
    1e5,
    0.5,
    0.01,
    1e-300,
    5e-324,
    0.0,
    -0.0,
    -0.5,
    "",
    " ",
    "light",
    "HEAVY",
    "medium",
    "heavyy",
    "fast",
    "SLOW",
    "insane",
    "none",
    "Full",
    "short",
    "true",
    "False",
    "yes",
    "x",
    "\x00",
    [],
    ["op"],
    [1],
    ("a", "b"),
    {},
    b"light",
    HashPolicy.FULL,
    DigestPolicy.FAST,
]

ANY_VALUE = st.one_of(
    st.sampled_from(EDGE_VALUES),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.text(max_size=3), max_size=2),
)

#: Values each tag documents as meaningful, so that accepted calls are drawn often.
GOOD_TAG_VALUES: dict[str, list[Any]] = {
    "weight": ["light", "medium", "heavy", "Light", "HEAVY"],
    "storage_speed": ["SLOW", "moderate", "FAST", "insane"],
    "process_pool": [False],
    "sticky_anchor": ["anchor", "a"],
    "external_calls": [[], ["fuzz_child"], ("a", "b")],
    "hash_policy": ["none", "FAST", "standard", "full", HashPolicy.FULL, HashPolicy.NONE],
    "digest_policy": ["full", "SHORT", "fast", "minimal", DigestPolicy.MINIMAL],
    "allow_retries": [True, False, "true", "False"],
    "retries": [0, 1, 2, 100],
    "priority": [0, 1, -1, 5, 2**31, -(2**31), 2**63 - 1, -(2**63)],
    "timeout": [0.005, 0.05, 1, 2.5, 1e-300, 5e-324, 1e5],
}
TAGS = tuple(GOOD_TAG_VALUES)
#: Keys no tag has (near misses and case variants included).
UNKNOWN_TAG_KEYS = ["wieght", "Priority", "timeouts", "", "retry", "anchor"]
#: Keys that are not strings.
NON_STR_KEYS: list[Any] = [0, 1.5, None, ("weight",), b"weight", True]

GOOD_OPTION_VALUES: dict[str, list[Any]] = {
    "priority": [None, 0, 3, -3, 2**31],
    "timeout": [None, 0.005, 0.05, 2, 1e-300, 1e5],
    "retries": [None, 0, 1, 2, 100],
    "block": [True, False],
    "admission_timeout": [None, 0, 0.5, 10, 1e5],
}
OPTIONS = tuple(GOOD_OPTION_VALUES)
UNKNOWN_OPTION_KEYS = ["prio", "deadline", "retry", "tags"]


# -- the oracle: what the README promises for each value -------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seconds(v: object, *, zero_ok: bool = False, inf_ok: bool = False) -> str:
    """A duration: positive (or 0) and finite, up to a day for sure; far beyond that either way."""
    if not _is_number(v):
        return INVALID
    try:
        f = float(v)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond any float
        return EITHER
    if math.isnan(f) or f < 0 or (f == 0 and not zero_ok) or f == -INF:
        return INVALID
    if f == INF:
        return EITHER if inf_ok else INVALID
    if f > 86_400 * 2:
        return EITHER
    return VALID


def tag_verdict(key: str, v: object) -> str:
    if key == "weight":
        return VALID if isinstance(v, str) and v.lower() in ("light", "medium", "heavy") else INVALID
    if key == "storage_speed":
        return VALID if isinstance(v, str) and v.upper() in ("SLOW", "MODERATE", "FAST", "INSANE") else INVALID
    if key == "process_pool":
        return VALID if isinstance(v, bool) else INVALID
    if key == "sticky_anchor":
        if not isinstance(v, str) or not v:
            return INVALID
        return VALID if v.strip() else EITHER
    if key == "external_calls":
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            return VALID if all(x.strip() for x in v) else EITHER
        return INVALID
    if key == "hash_policy":
        return VALID if isinstance(v, str) and v.lower() in ("none", "fast", "standard", "full") else INVALID
    if key == "digest_policy":
        return VALID if isinstance(v, str) and v.lower() in ("full", "short", "fast", "minimal") else INVALID
    if key == "allow_retries":
        if isinstance(v, bool) or (isinstance(v, str) and v.lower() in ("true", "false")):
            return VALID
        return INVALID
    if key == "retries":
        return VALID if _is_int(v) and 0 <= v <= 100 else INVALID  # type: ignore[operator]
    if key == "priority":
        if not _is_int(v):
            return INVALID
        return VALID if -(2**63) <= v <= 2**63 - 1 else EITHER  # type: ignore[operator]
    if key == "timeout":
        return _seconds(v)
    raise AssertionError(key)


def option_verdict(key: str, v: object) -> str:
    if key not in OPTIONS:
        return INVALID  # no such option
    if v is None and key != "block":
        return VALID
    if key == "priority":
        if not _is_int(v):
            return INVALID
        return VALID if -(2**63) <= v <= 2**63 - 1 else EITHER  # type: ignore[operator]
    if key == "timeout":
        return _seconds(v, inf_ok=True)
    if key == "retries":
        if not _is_int(v) or v < 0:  # type: ignore[operator]
            return INVALID
        return VALID if v <= 100 else EITHER  # type: ignore[operator]
    if key == "block":
        return VALID if isinstance(v, bool) else INVALID
    if key == "admission_timeout":
        return _seconds(v, zero_ok=True, inf_ok=True)
    raise AssertionError(key)


COORDINATOR_ARGS = (
    "aging",
    "io_idle_timeout",
    "convergence_interval",
    "max_workers",
    "workers_per_core",
    "max_pending",
    "history_size",
)


def coordinator_verdict(key: str, v: object) -> str:
    if key in ("aging", "io_idle_timeout", "convergence_interval"):
        verdict = _seconds(v)
        if verdict == VALID and float(v) < 1e-3:  # type: ignore[arg-type]
            return EITHER  # a nanosecond aging or tick: a fix may refuse it
        return verdict
    if key == "max_workers":
        if v is None:
            return VALID
        if not _is_int(v) or v <= 0:  # type: ignore[operator]
            return INVALID
        return VALID if v <= 8 else EITHER  # type: ignore[operator]
    if key == "workers_per_core":
        if not _is_int(v) or v <= 0:  # type: ignore[operator]
            return INVALID
        return VALID if v <= 4 else EITHER  # type: ignore[operator]
    if key == "max_pending":
        if v is None:
            return VALID
        if not _is_int(v) or v <= 0:  # type: ignore[operator]
            return INVALID
        return VALID if v <= 10**6 else EITHER  # type: ignore[operator]
    if key == "history_size":
        if not _is_int(v) or v < 0:  # type: ignore[operator]
            return INVALID
        return VALID if v <= 10**6 else EITHER  # type: ignore[operator]
    raise AssertionError(key)


def overall(verdicts: dict[Any, str]) -> str:
    values = set(verdicts.values())
    return INVALID if INVALID in values else EITHER if EITHER in values else VALID


# -- running one input ------------------------------------------------------------------------------


class Boom(Exception):
    """The body's own failure."""


def _body(x: int, sleep: float, fail: bool) -> int:
    if sleep:
        time.sleep(sleep)
    if fail:
        raise Boom(x)
    return x


def attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``fn()``'s value, or the exception it raised (any ``BaseException`` but Ctrl-C and exit)."""
    try:
        return fn(), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return None, exc


def describe(exc: BaseException | None) -> str:
    return "no exception" if exc is None else f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def check_refusal(where: str, exc: BaseException, names: list[str], inputs: object) -> None:
    """A refusal must be a TypeError/ValueError naming one of ``names``."""
    if not isinstance(exc, Exception):
        raise AssertionError(f"{where} {inputs!r} raised a BaseException, not an Exception: {describe(exc)}")
    if not isinstance(exc, (TypeError, ValueError)):
        raise AssertionError(f"{where} {inputs!r} raised neither TypeError nor ValueError: {describe(exc)}")
    if not any(n in str(exc) for n in names):
        raise AssertionError(f"{where} {inputs!r}: the error does not name any of {names}: {describe(exc)}")


def books_clean(c: OperationsCoordinator) -> bool:
    stats = c.get_stats()
    tokens, admission = stats["tokens"], stats["admission"]
    return (
        tokens["unresolved"] == 0
        and tokens["executing"] == 0
        and admission["pending"] == 0
        and admission["parked"] == 0
        and not c.sticky_snapshot()
        and not c.domain_snapshot()
    )


def books(c: OperationsCoordinator) -> str:
    stats = c.get_stats()
    return (
        f"tokens={stats['tokens']} admission={stats['admission']} "
        f"sticky={c.sticky_snapshot()} domains={c.domain_snapshot()}"
    )


def call_and_resolve(
    c: OperationsCoordinator, submit: Callable[[], Any], *, fail: bool, timed: bool, block: object, inputs: object
) -> None:
    """Calls, waits for the token, and checks its outcome and the books afterwards."""
    token, exc = attempt(submit)
    if exc is not None and not isinstance(exc, Exception):
        raise AssertionError(f"accepted {inputs!r}, but the call raised a BaseException: {describe(exc)}; {books(c)}")
    if exc is not None:
        raise AssertionError(f"accepted {inputs!r}, but the call raised {describe(exc)}; {books(c)}")
    if token is None:
        raise AssertionError(
            f"accepted {inputs!r} (block={block!r}), but the call returned None on a coordinator with room"
        )
    value, exc = attempt(lambda: token.result(timeout=WAIT))
    if not token.done():
        raise AssertionError(
            f"accepted {inputs!r}, but the token is unresolved after {WAIT}s (state {token.state}); {books(c)}"
        )
    if exc is None:
        if fail or value != 7:
            raise AssertionError(f"accepted {inputs!r}: the token returned {value!r} (fail={fail})")
    elif not ((fail and isinstance(exc, Boom)) or (timed and isinstance(exc, TaskTimeoutError))):
        raise AssertionError(
            f"accepted {inputs!r}: the token resolved with {describe(exc)} (fail={fail}, timeout given={timed})"
        )
    if not wait_until(lambda: books_clean(c), WAIT):
        raise AssertionError(f"accepted {inputs!r}: after the token resolved the books are not clean: {books(c)}")


def decorate(tags: object) -> tuple[Any, BaseException | None]:
    def build() -> Any:
        with warnings.catch_warnings():
            # storage_speed with process_pool warns (and this suite turns warnings into errors).
            warnings.simplefilter("ignore", RuntimeWarning)
            return task_token_guard(operation_type="fuzz_op", tags=tags)(_body)  # type: ignore[arg-type]

    return attempt(build)


def _retries_small(*values: object) -> bool:
    """A failing body is drawn only where its retries (with back-off) end quickly."""
    return all(v is None or (_is_int(v) and v <= 2) for v in values)


def accepted_invalid(call: Any, what: str) -> None:
    """Fails the example: an invalid input was accepted. Makes the call first (resolving its
    token, if any) so that the message says what the call then gave."""
    token, call_exc = attempt(call)
    if token is not None:
        attempt(lambda: token.result(timeout=WAIT))
    raise AssertionError(f"{what}; the call then gave {describe(call_exc) if call_exc else 'a token'}")


def check_tags(c: OperationsCoordinator, tags: object, sleep: float, fail: bool) -> None:
    """One ``tags=`` input against the contract."""
    fn, exc = decorate(tags)
    if not isinstance(tags, dict):
        if tags is None:
            if exc is not None:
                raise AssertionError(f"tags=None refused: {describe(exc)}")
            return call_and_resolve(c, lambda: fn(7, sleep, fail), fail=fail, timed=False, block=True, inputs=tags)
        if exc is None:
            raise AssertionError(f"tags={tags!r} (not a mapping) accepted")
        return check_refusal("tags=", exc, ["tags"], tags)
    bad_keys = [k for k in tags if not isinstance(k, str) or k not in TAGS]
    verdicts = {k: tag_verdict(k, v) for k, v in tags.items() if k not in bad_keys}
    if bad_keys:
        if exc is None:
            raise AssertionError(f"tags={tags!r} accepted with the key(s) {bad_keys!r}")
        # The error names the first offence it met: an unknown key or a bad value.
        return check_refusal(
            "tags=", exc, [repr(k) for k in bad_keys] + [k for k, v in verdicts.items() if v != VALID], tags
        )
    verdict = overall(verdicts)
    if exc is not None:
        if verdict == VALID:
            raise AssertionError(f"tags={tags!r} (all documented values) refused: {describe(exc)}")
        check_refusal("tags=", exc, [k for k, v in verdicts.items() if v != VALID], tags)
        return
    if tags.get("process_pool") is True and verdict != INVALID:
        return  # decoration is all that is checked of the process lane here (it starts processes)
    fail = fail and _retries_small(tags.get("retries"))
    timed = "timeout" in tags
    if verdict == INVALID:
        bad = {k: tags[k] for k, v in verdicts.items() if v == INVALID}
        accepted_invalid(lambda: fn(7, sleep, fail), f"tags={tags!r} accepted with invalid {bad!r}")
    call_and_resolve(c, lambda: fn(7, sleep, fail), fail=fail, timed=timed, block=True, inputs=tags)


def check_options(
    c: OperationsCoordinator, tags: dict[str, Any], options: dict[str, Any], sleep: float, fail: bool
) -> None:
    """One ``fn.options(**options)`` input (on a function with valid ``tags``) against the contract."""
    fn, exc = decorate(tags)
    assert exc is None, f"valid tags {tags!r} refused: {describe(exc)}"
    if tags.get("process_pool") is True:
        return
    verdicts = {k: option_verdict(k, v) for k, v in options.items()}
    verdict = overall(verdicts)
    bound, exc = attempt(lambda: fn.options(**options))
    inputs = {"tags": tags, "options": options}
    if exc is not None:
        if verdict == VALID:
            raise AssertionError(f"options({options!r}) (all documented values) refused: {describe(exc)}")
        check_refusal("options", exc, [k for k, v in verdicts.items() if v != VALID], inputs)
        return
    fail = fail and _retries_small(tags.get("retries"), options.get("retries"))
    timed = "timeout" in tags or options.get("timeout") is not None
    if verdict == INVALID:
        bad = {k: options[k] for k, v in verdicts.items() if v == INVALID}
        accepted_invalid(lambda: bound(7, sleep, fail), f"options() accepted invalid {bad!r} ({inputs!r})")
    call_and_resolve(
        c, lambda: bound(7, sleep, fail), fail=fail, timed=timed, block=options.get("block", True), inputs=inputs
    )


@task_token_guard(operation_type="fuzz_coordinator_probe", tags={"priority": 1})
def _probe(x: int) -> int:
    return x


def check_coordinator(kwargs: dict[str, Any]) -> None:
    """One ``OperationsCoordinator(**kwargs)`` input against the contract."""
    verdicts = {k: coordinator_verdict(k, v) for k, v in kwargs.items()}
    verdict = overall(verdicts)
    c, exc = attempt(lambda: OperationsCoordinator(**kwargs))
    if exc is not None:
        if verdict == VALID:
            raise AssertionError(f"OperationsCoordinator({kwargs!r}) (all documented values) refused: {describe(exc)}")
        check_refusal("OperationsCoordinator", exc, [k for k, v in verdicts.items() if v != VALID], kwargs)
        return
    _started, exc = attempt(c.start)
    try:
        if exc is not None and not isinstance(exc, Exception):
            raise AssertionError(
                f"OperationsCoordinator({kwargs!r}) constructed, but start() raised a BaseException: {describe(exc)}"
            )
        if exc is not None:
            raise AssertionError(f"OperationsCoordinator({kwargs!r}) constructed, but start() raised {describe(exc)}")
        if verdict == INVALID:
            bad = {k: kwargs[k] for k, v in verdicts.items() if v == INVALID}
            raise AssertionError(f"OperationsCoordinator({kwargs!r}) accepted invalid {bad!r} and started")
        token, exc = attempt(lambda: _probe(7))
        if exc is not None:
            raise AssertionError(f"OperationsCoordinator({kwargs!r}) started, but a call raised {describe(exc)}")
        value, exc = attempt(lambda: token.result(timeout=WAIT))
        if exc is not None or value != 7:
            raise AssertionError(
                f"OperationsCoordinator({kwargs!r}) started, but a token gave {value!r} / {describe(exc)}"
            )
    finally:
        began = time.monotonic()
        joined, stop_exc = attempt(lambda: c.stop(timeout=WAIT))
        took = time.monotonic() - began
    if stop_exc is not None or not joined or took > WAIT:
        raise AssertionError(
            f"OperationsCoordinator({kwargs!r}): stop() gave {joined!r} / {describe(stop_exc)} after {took:.1f}s"
        )


# -- strategies -------------------------------------------------------------------------------------


#: Mostly documented values, with one or two values drawn from anywhere, so that a bad value is
#: usually the only one in its input (a dict of many random values is refused by its first).
_valid_tag_dicts = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in GOOD_TAG_VALUES.items()})
_valid_option_dicts = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in GOOD_OPTION_VALUES.items()})


@st.composite
def tags_inputs(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["dict", "dict", "dict", "dict", "dict", "dict", "extra key", "none", "not a mapping"]))
    if kind == "none":
        return None
    if kind == "not a mapping":
        return draw(st.sampled_from([[], [("weight", "light")], "weight", 5, ("light",), {"weight"}]))
    tags: dict[Any, Any] = dict(draw(_valid_tag_dicts))
    for key in draw(st.lists(st.sampled_from(TAGS), max_size=2, unique=True)):
        tags[key] = draw(ANY_VALUE)
    if kind == "extra key":
        key = draw(st.one_of(st.sampled_from(UNKNOWN_TAG_KEYS), st.sampled_from(NON_STR_KEYS), st.text(max_size=8)))
        tags[key] = draw(ANY_VALUE)
    return tags


@st.composite
def options_inputs(draw: st.DrawFn) -> dict[str, Any]:
    options: dict[str, Any] = dict(draw(_valid_option_dicts))
    for key in draw(st.lists(st.sampled_from(OPTIONS), max_size=2, unique=True)):
        options[key] = draw(ANY_VALUE)
    if draw(st.integers(0, 9)) == 0:
        options[draw(st.sampled_from(UNKNOWN_OPTION_KEYS))] = draw(ANY_VALUE)
    return options


_DURATIONS = [0.5, 1, 0.05, 5.0]
GOOD_COORDINATOR_VALUES: dict[str, list[Any]] = {
    "aging": _DURATIONS,
    "io_idle_timeout": _DURATIONS,
    "convergence_interval": _DURATIONS,
    "max_workers": [None, 1, 2, 4],
    "workers_per_core": [1, 2, 4],
    "max_pending": [None, 1, 100, 10**6],
    "history_size": [0, 1, 100],
}
#: Numbers drawn for every argument: none of them starts more than a handful of threads, and the
#: huge ones exceed any thread count a machine can start (the engine refuses over 4096 workers).
COORDINATOR_EDGES: list[Any] = [
    0,
    -1,
    2**32,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
    5000,
    True,
    False,
    None,
    NAN,
    INF,
    -INF,
    1e300,
    1e20,
    1e10,
    1e-300,
    5e-324,
    0.0,
    -0.5,
    2.5,
    "1",
    [1],
]


@st.composite
def coordinator_inputs(draw: st.DrawFn) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        draw(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in GOOD_COORDINATOR_VALUES.items()}))
    )
    for key in draw(st.lists(st.sampled_from(COORDINATOR_ARGS), max_size=2, unique=True)):
        kwargs[key] = draw(st.sampled_from(COORDINATOR_EDGES))
    return kwargs


_sleeps = st.sampled_from([0.0, 0.0, 0.02])


# -- the tests --------------------------------------------------------------------------------------


class Shared:
    """One coordinator for all the examples of a test, replaced when an example leaves it dirty
    (an unresolved token would otherwise fail every later example and mislead the shrinking)."""

    def __init__(self) -> None:
        self.coordinator = OperationsCoordinator(max_workers=4, max_pending=64).start()
        self.dirty = False

    def get(self) -> OperationsCoordinator:
        if self.dirty:
            self.coordinator.stop(cancel_pending=True, timeout=0.5)
            self.coordinator = OperationsCoordinator(max_workers=4, max_pending=64).start()
            self.dirty = False
        self.dirty = True  # until the example passes
        return self.coordinator

    def passed(self) -> None:
        self.dirty = False


@pytest.fixture
def shared() -> Iterator[Shared]:
    s = Shared()
    try:
        yield s
    finally:
        s.coordinator.stop(cancel_pending=True, timeout=5)


# The coordinator is shared by the examples on purpose (speed); Shared renews it after a failure.
FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.timeout(120)
@FUZZ
@given(tags=tags_inputs(), sleep=_sleeps, fail=st.booleans())
@example(tags={"timeout": 1e20}, sleep=0.0, fail=False)  # beyond a Duration
@example(tags={"timeout": 1e19}, sleep=0.0, fail=False)  # a Duration, but beyond an Instant
@example(tags={"priority": 10**30}, sleep=0.0, fail=False)
@example(tags={"priority": 2**63}, sleep=0.0, fail=False)
@example(tags={"timeout": 1e-300, "retries": 2}, sleep=0.02, fail=True)
def test_tag_values_are_refused_cleanly_or_run(shared: Shared, tags: object, sleep: float, fail: bool) -> None:
    check_tags(shared.get(), tags, sleep, fail)
    shared.passed()


@pytest.mark.timeout(120)
@FUZZ
@given(tags=_valid_tag_dicts, options=options_inputs(), sleep=_sleeps, fail=st.booleans())
@example(tags={}, options={"admission_timeout": -1}, sleep=0.0, fail=False)
@example(tags={}, options={"admission_timeout": "1"}, sleep=0.0, fail=False)
@example(tags={}, options={"timeout": 1e20}, sleep=0.0, fail=False)
@example(tags={}, options={"timeout": INF}, sleep=0.0, fail=False)
@example(tags={}, options={"retries": 2**40}, sleep=0.0, fail=False)
@example(tags={}, options={"priority": 2**63}, sleep=0.0, fail=False)
@example(tags={}, options={"block": "no"}, sleep=0.0, fail=False)
def test_option_values_are_refused_cleanly_or_run(
    shared: Shared, tags: dict[str, Any], options: dict[str, Any], sleep: float, fail: bool
) -> None:
    check_options(shared.get(), tags, options, sleep, fail)
    shared.passed()


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=coordinator_inputs())
@example(kwargs={"aging": 1e300})
@example(kwargs={"aging": 1e-300})
@example(kwargs={"convergence_interval": 1e19})  # its first tick is beyond an Instant
@example(kwargs={"io_idle_timeout": INF})
@example(kwargs={"max_workers": 5000})
@example(kwargs={"max_pending": 2**64})
def test_coordinator_numbers_are_refused_cleanly_or_run(kwargs: dict[str, Any]) -> None:
    check_coordinator(kwargs)
