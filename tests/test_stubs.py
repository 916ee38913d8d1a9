"""The hand-written stub (``_tokengate.pyi``) describes the native module as built:
every stubbed name exists, and every public name of the binary is stubbed."""

from __future__ import annotations

import ast
from pathlib import Path

import tokengate
from tokengate import _tokengate

STUB = Path(tokengate.__file__).with_name("_tokengate.pyi")


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text())


def _names(node: ast.ClassDef) -> set[str]:
    out = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            out.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            out.add(item.target.id)
    return out


def test_every_stubbed_name_exists_in_the_binary() -> None:
    missing = []
    for node in _stub().body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(_tokengate, node.name, None)
            if cls is None:
                missing.append(node.name)
                continue
            missing += [f"{node.name}.{n}" for n in _names(node) if not n.startswith("__") and not hasattr(cls, n)]
        elif isinstance(node, ast.FunctionDef) and not hasattr(_tokengate, node.name):
            missing.append(node.name)
    assert not missing, f"stubbed but not in the binary: {missing}"


def test_every_public_name_of_the_binary_is_stubbed() -> None:
    stub = _stub()
    classes = {n.name: n for n in stub.body if isinstance(n, ast.ClassDef)}
    functions = {n.name for n in stub.body if isinstance(n, ast.FunctionDef)}
    unstubbed = []
    for name in dir(_tokengate):
        if name.startswith("__"):
            continue
        obj = getattr(_tokengate, name)
        if isinstance(obj, type):
            if name not in classes:
                unstubbed.append(name)
                continue
            known = _names(classes[name])
            unstubbed += [f"{name}.{a}" for a in dir(obj) if not a.startswith("__") and a not in known]
        elif callable(obj) and name not in functions:
            unstubbed.append(name)
    assert not unstubbed, f"in the binary but not stubbed: {unstubbed}"
