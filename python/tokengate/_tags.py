"""Validation of ``task_token_guard`` tags.

Every tag the original Py-TokenGate understood is accepted (see
``../shared/reference/original-tokengate.md`` section 1.2), plus the keys
tokengate adds (``priority``, ``timeout``, ``retries``). Values are checked
at decoration time; the validated, normalised copy is what tokens expose.
"""

from __future__ import annotations

import difflib
import enum
import math
import sys
from collections.abc import Mapping
from typing import Any

if sys.version_info >= (3, 10):
    from typing import TypeGuard
else:  # pragma: no cover
    from typing_extensions import TypeGuard

from . import _tokengate

__all__ = [
    "KNOWN_TAGS",
    "MAX_RETRIES",
    "MAX_SECONDS",
    "STORAGE_TIERS",
    "DigestPolicy",
    "HashPolicy",
    "check_priority",
    "check_retries",
    "check_seconds",
    "validate_tags",
    "weight_of",
]

#: The longest duration any timeout, tag or option may give (``threading.TIMEOUT_MAX``, about 292 years).
MAX_SECONDS: float = _tokengate.MAX_SECONDS
#: Priorities are 64-bit signed integers.
PRIORITY_RANGE = (-(2**63), 2**63 - 1)
MAX_RETRIES = 100


class HashPolicy(str, enum.Enum):
    """Whether and how a call's arguments take part in its sticky routing key."""

    NONE = "none"
    FAST = "fast"
    STANDARD = "standard"
    FULL = "full"


class DigestPolicy(str, enum.Enum):
    """How a lead token's domain seed is digested."""

    FULL = "full"
    SHORT = "short"
    FAST = "fast"
    MINIMAL = "minimal"


WEIGHTS = ("light", "medium", "heavy")
#: Default concurrency of each storage tier (configurable on the coordinator).
STORAGE_TIERS = {"SLOW": 10, "MODERATE": 25, "FAST": 50, "INSANE": 70}

KNOWN_TAGS = (
    "weight",
    "storage_speed",
    "process_pool",
    "cluster",
    "sticky_anchor",
    "external_calls",
    "hash_policy",
    "digest_policy",
    "allow_retries",
    "retries",
    "priority",
    "timeout",
)


def _choices(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


def _bad_value(key: str, value: object, expected: str) -> ValueError:
    return ValueError(f"tag {key!r}: invalid value {value!r}; expected {expected}")


def _enum_value(key: str, value: object, enum_cls: type[enum.Enum]) -> str:
    if isinstance(value, enum_cls):
        return str(value.value)
    valid = [m.value for m in enum_cls]
    if isinstance(value, str) and value.lower() in valid:
        return value.lower()
    names = [m.name for m in enum_cls]
    raise _bad_value(key, value, f"one of {_choices(names)} (a {enum_cls.__name__} or its name)")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seconds(what: str, value: object) -> float:
    """A positive, finite number of seconds up to :data:`MAX_SECONDS`, as a float.
    ``what`` names the setting in the error (``"tag 'timeout'"``, ``"aging"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and value > MAX_SECONDS:
            seconds = math.inf  # too big for a float, and out of range anyway
        else:
            seconds = float(value)
        if math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS:
            return seconds
    raise ValueError(
        f"{what}: invalid value {value!r}; expected a positive, finite number of seconds up to {MAX_SECONDS:.0f}"
    )


def check_priority(what: str, value: object) -> int:
    """An int in the 64-bit signed range (higher runs first)."""
    if _is_int(value) and PRIORITY_RANGE[0] <= value <= PRIORITY_RANGE[1]:
        return value
    raise ValueError(
        f"{what}: invalid value {value!r}; expected an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]} (higher runs first)"
    )


def check_retries(what: str, value: object) -> int:
    """An int from 0 to :data:`MAX_RETRIES`."""
    if _is_int(value) and 0 <= value <= MAX_RETRIES:
        return value
    raise ValueError(f"{what}: invalid value {value!r}; expected an integer from 0 to {MAX_RETRIES}")


def _check(key: str, value: object) -> object:
    if key == "weight":
        if isinstance(value, str) and value.lower() in WEIGHTS:
            return value.lower()
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), WEIGHTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _bad_value(key, value, f"one of {_choices(WEIGHTS)}{hint}")
    if key == "storage_speed":
        if isinstance(value, str) and value.upper() in STORAGE_TIERS:
            return value.upper()
        raise _bad_value(key, value, f"one of {_choices(STORAGE_TIERS)}")
    if key in ("process_pool", "cluster"):
        if isinstance(value, bool):
            return value
        raise _bad_value(key, value, "True or False")
    if key == "sticky_anchor":
        if isinstance(value, str) and value:
            return value
        raise _bad_value(key, value, "a non-empty string")
    if key == "external_calls":
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _bad_value(key, value, "a list of operation names (strings)")
    if key == "hash_policy":
        return _enum_value(key, value, HashPolicy)
    if key == "digest_policy":
        return _enum_value(key, value, DigestPolicy)
    if key == "allow_retries":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad_value(key, value, "True or False")
    if key == "retries":
        return check_retries(f"tag {key!r}", value)
    if key == "priority":
        return check_priority(f"tag {key!r}", value)
    if key == "timeout":
        return check_seconds(f"tag {key!r}", value)
    raise AssertionError(key)  # pragma: no cover


def validate_tags(tags: object) -> dict[str, Any]:
    """Checks ``tags`` and returns a normalised copy (``None`` gives ``{}``): each value has
    its tag's type (``priority`` an int, ``timeout`` a float, ``weight`` a str, ...)."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise TypeError(f"tags must be a mapping (such as a dict), not {type(tags).__name__}")
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not isinstance(key, str):
            raise TypeError(f"tag keys must be strings, not {type(key).__name__} ({key!r})")
        if key not in KNOWN_TAGS:
            close = difflib.get_close_matches(key, KNOWN_TAGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown tag {key!r}{hint}; valid tags: {_choices(KNOWN_TAGS)}")
        out[key] = _check(key, value)
    return out


def weight_of(operation_type: str, tags: Mapping[str, object]) -> str:
    """The weight tag, or the original's name heuristic when it is absent."""
    weight = tags.get("weight")
    if isinstance(weight, str):
        return weight
    name = operation_type.lower()
    if "heavy" in name:
        return "heavy"
    if "light" in name:
        return "light"
    return "medium"
