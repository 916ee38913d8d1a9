"""Routing keys: how arguments take part in sticky keys (``hash_policy``) and how
a lead token's domain seed is digested (``digest_policy``).

* ``make_hashable(obj)`` turns any object into a hashable value that never
  raises, is deterministic for equal inputs, and ignores the order of dicts
  and sets. Arrays (anything with ``shape`` and ``dtype``) are keyed by type,
  shape and dtype, not by their contents.
* ``sticky_key(anchor, policy, args, kwargs)``:

  - ``NONE``: the anchor alone: every call with this anchor shares one worker;
  - ``FAST``: the anchor plus a cheap fingerprint: builtin scalars by value,
    containers by type and length, other objects by type and identity;
  - ``STANDARD`` (default): the anchor plus ``make_hashable`` of the
    arguments: calls with equal arguments share a worker;
  - ``FULL``: like ``STANDARD``, digested with SHA-256 over a canonical form,
    so it is also stable across processes (arrays include their bytes).

  The original Py-TokenGate documented the same four levels but its
  ``STANDARD`` silently ignored the arguments; here each does what it says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ._tags import DigestPolicy, HashPolicy

__all__ = ["DigestPolicy", "HashPolicy", "digest", "make_hashable", "sticky_key"]

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def make_hashable(obj: Any) -> Any:
    """A hashable, deterministic stand-in for ``obj`` (never raises)."""
    try:
        return _mh(obj, set())
    except Exception:
        return ("<unhashable>", type(obj).__qualname__, id(obj))


def _mh(obj: Any, active: set[int]) -> Any:
    if type(obj) in _SCALARS:  # exact builtins only: a subclass may not be hashable
        return (type(obj).__name__, obj)
    oid = id(obj)
    if oid in active:
        return ("<cycle>", type(obj).__qualname__)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return ("<array>", type(obj).__qualname__, tuple(getattr(obj, "shape", ())), str(getattr(obj, "dtype", "")))
    active.add(oid)
    try:
        if isinstance(obj, Mapping):
            items = frozenset((_mh(k, active), _mh(v, active)) for k, v in obj.items())
            return ("<map>", type(obj).__qualname__, items)
        if isinstance(obj, (set, frozenset)):
            return ("<set>", type(obj).__qualname__, frozenset(_mh(v, active) for v in obj))
        if isinstance(obj, (list, tuple)):
            return ("<seq>", type(obj).__qualname__, tuple(_mh(v, active) for v in obj))
    finally:
        active.discard(oid)
    try:
        hash(obj)
        return (type(obj).__qualname__, obj)
    except Exception:
        return ("<object>", type(obj).__qualname__, id(obj))


def _fast(obj: Any) -> Any:
    if isinstance(obj, _SCALARS):
        return obj
    try:
        return (type(obj).__name__, len(obj))
    except TypeError:
        return (type(obj).__name__, id(obj))


def _canonical(obj: Any) -> str:
    """A string form that is equal for equal values and independent of hash seeds."""
    if isinstance(obj, _SCALARS):
        return f"{type(obj).__name__}:{obj!r}"
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        tobytes = getattr(obj, "tobytes", None)
        body = hashlib.sha256(tobytes()).hexdigest() if callable(tobytes) else ""
        return f"array:{getattr(obj, 'shape', ())}:{getattr(obj, 'dtype', '')}:{body}"
    if isinstance(obj, Mapping):
        return "{" + ",".join(sorted(f"{_canonical(k)}={_canonical(v)}" for k, v in obj.items())) + "}"
    if isinstance(obj, (set, frozenset)):
        return "<" + ",".join(sorted(_canonical(v) for v in obj)) + ">"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in obj) + "]"
    return f"{type(obj).__qualname__}:{obj!r}"


def sticky_key(anchor: str, policy: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The sticky routing key of one call (a string; see the module docs)."""
    if policy == HashPolicy.NONE.value:
        return anchor
    try:
        if policy == HashPolicy.FAST.value:
            part: Any = (tuple(_fast(a) for a in args), tuple(sorted((k, _fast(v)) for k, v in kwargs.items())))
            return f"{anchor}|{hash(part):x}"
        if policy == HashPolicy.FULL.value:
            text = _canonical(list(args)) + _canonical(dict(kwargs))
            return f"{anchor}|{hashlib.sha256(text.encode('utf-8', 'backslashreplace')).hexdigest()}"
        return f"{anchor}|{hash(make_hashable((args, dict(kwargs)))):x}"
    except Exception:
        return f"{anchor}|<unroutable>"


def digest(policy: str, data: str) -> str:
    """The domain seed of a lead token: FULL sha256 (64 hex), SHORT sha256[:16],
    FAST blake2s with an 8-byte digest (16 hex), MINIMAL sha256[:8]."""
    raw = data.encode("utf-8", "backslashreplace")
    if policy == DigestPolicy.FAST.value:
        return hashlib.blake2s(raw, digest_size=8).hexdigest()
    full = hashlib.sha256(raw).hexdigest()
    if policy == DigestPolicy.SHORT.value:
        return full[:16]
    if policy == DigestPolicy.MINIMAL.value:
        return full[:8]
    return full
