#!/usr/bin/env python3
"""Check the crate's module graph: no import circle, floors point down, files stay small.

Reads every `src/**/*.rs`, turns each file into a module path (`src/py/token.rs`
is `py::token`, `src/engine/pool/mod.rs` is `engine::pool`) and collects the
modules it names through `use` lines and inline `crate::`, `super::` and
`self::` paths. A `mod x;` declaration is not a dependency; naming a child's
item is. Then it fails on:

* a cycle: two or more modules that reach each other through such names;
* a floor pointing up: a module outside `py` naming anything under `py`
  (the engine knows nothing of Python);
* a file of `src/` over the line limit (700).

`--graph` prints the edges (for a reader, or for `dot`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

LINE_LIMIT = 700
BINDING_FLOOR = "py"


def module_of(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("lib", "main", "mod"):
        parts.pop()
    return "::".join(parts)


def strip_comments_and_strings(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(?:\\.|[^'\\])'", "' '", text)
    return re.sub(r"//[^\n]*", "", text)


def expand_use_tree(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"] (aliases and globs dropped)."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", tree))
    out: list[str] = []

    def walk(prefix: str, s: str) -> None:
        depth, start, items = 0, 0, []
        for i, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(s[start:i])
                start = i + 1
        items.append(s[start:])
        for item in filter(None, items):
            brace = item.find("{")
            if brace >= 0:
                walk(prefix + item[:brace], item[brace + 1 : item.rfind("}")])
            else:
                out.append((prefix + item).rstrip(":"))

    walk("", tree)
    return out


def resolve(segments: list[str], here: str, modules: set[str]) -> str | None:
    """The module (a key of `modules`) that a path written in module `here` names."""
    scope = here.split("::") if here else []
    first = segments[0]
    if first == "crate":
        absolute = segments[1:]
    elif first in ("super", "self"):
        rest = segments
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                scope = scope[:-1]
            rest = rest[1:]
        absolute = scope + rest
    elif "::".join(scope + [first]) in modules:
        absolute = scope + segments  # a bare path naming a child module
    else:
        return None
    for n in range(len(absolute), -1, -1):
        candidate = "::".join(absolute[:n])
        if candidate in modules:
            return candidate
    return None


def split_inline_modules(text: str, scope: list[str]) -> list[tuple[list[str], str]]:
    """`text` without its inline `mod x { ... }` blocks, and each block's text
    (recursively), with the scope its paths resolve in."""
    out: list[tuple[list[str], str]] = []
    outer, pos = [], 0
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        if m.start() < pos:
            continue  # inside a block already taken
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        outer.append(text[pos : m.start()])
        out.extend(split_inline_modules(text[m.end() : i - 1], scope + [m.group(1)]))
        pos = i
    outer.append(text[pos:])
    return [(scope, "".join(outer)), *out]


def collect(src: Path) -> tuple[dict[str, set[str]], dict[str, Path]]:
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(f, src): f for f in files}
    names = set(modules)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        text = strip_comments_and_strings(path.read_text())
        for scope, part in split_inline_modules(text, module.split("::") if module else []):
            paths: list[str] = []
            for use in re.finditer(r"\buse\s+([^;]+);", part):
                paths.extend(expand_use_tree(use.group(1)))
            rest = re.sub(r"\buse\s+[^;]+;", " ", part)
            paths.extend(m.group(0) for m in re.finditer(r"(?<![\w:])\w+(?:::\w+)+", rest))
            for p in paths:
                segments = [s for s in p.split("::") if s]
                if not segments or segments[0] in ("std", "core", "alloc", "pyo3"):
                    continue
                target = resolve(segments, "::".join(scope), names)
                # The crate root only declares modules.
                if target and target != module:
                    edges[module].add(target)
    return edges, modules


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    parser.add_argument("--graph", action="store_true", help="print every edge")
    args = parser.parse_args()
    src = Path(args.src)
    edges, modules = collect(src)
    if args.graph:
        for m in sorted(edges):
            for t in sorted(edges[m]):
                print(f"{m or 'crate'} -> {t or 'crate'}")
    problems: list[str] = []
    for component in cycles(edges):
        problems.append("import circle: " + ", ".join(component))
    for m, targets in sorted(edges.items()):
        inside = m == BINDING_FLOOR or m.startswith(BINDING_FLOOR + "::")
        if m and not inside:
            up = sorted(t for t in targets if t == BINDING_FLOOR or t.startswith(BINDING_FLOOR + "::"))
            if up:
                problems.append(f"floor pointing up: {m} names {', '.join(up)}")
    for path in modules.values():
        lines = len(path.read_text().splitlines())
        if lines > LINE_LIMIT:
            problems.append(f"{path.relative_to(src.parent)}: {lines} lines (limit {LINE_LIMIT})")
    for p in problems:
        print(p)
    print(f"module graph: {len(modules)} modules, {sum(map(len, edges.values()))} edges, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
