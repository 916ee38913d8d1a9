"""Every ```python block of README.md and docs/testing.md runs, in a fresh interpreter, without an error.

Each block runs on its own in a child interpreter (with warnings as errors and a
timeout). A block that builds on the one before it says so with the comment
``<!-- readme-test: continued -->`` on the line right before its fence: it then
runs in the same interpreter, after the earlier block. A block can be left out
only with ``<!-- readme-test: skip (why) -->`` right before its fence, the reason
given; leave one out only when it cannot run here (it needs a network, say). A block
that needs an optional dependency says so with ``<!-- readme-test: needs (module) -->``:
it is skipped where that module is missing (on the free-threaded leg, say), unless
``TOKENGATE_REQUIRE_DASK`` is set and the module is Dask's ``distributed``, or
``TOKENGATE_REQUIRE_RAY`` and ``ray``.

A block that defines ``async def main()`` and never calls it gets
``asyncio.run(main())`` appended, so an example's coroutine is really run.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = [README, README.parent / "docs" / "testing.md"]
TIMEOUT = 120

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<what>[a-z]+)\s*(?:\((?P<why>[^)]*)\))?\s*-->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # "skip", "continued" or None
    reason: str


def python_blocks(text: str) -> list[Block]:
    """The fenced blocks whose info string is ``python`` (or ``py``), with the marker before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m["fence"], m["info"].lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and not lines[i].strip()[len(fence) :].strip()
        ):
            body.append(lines[i][len(m["indent"]) :] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        i += 1  # the closing fence
        if info not in ("python", "py", "python3"):
            continue
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker, reason = None, ""
        mm = _MARKER.match(lines[prev]) if prev >= 0 else None
        if mm:
            marker, reason = mm["what"], (mm["why"] or "").strip()
        blocks.append(Block(start + 1, "\n".join(body) + "\n", marker, reason))
    return blocks


def with_main_run(code: str) -> str:
    """``code``, plus ``asyncio.run(main())`` when it defines ``async def main`` and never calls it."""
    tree = ast.parse(code)
    defines = any(isinstance(n, ast.AsyncFunctionDef) and n.name == "main" for n in tree.body)
    calls = any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "main" for n in ast.walk(tree)
    )
    if defines and not calls:
        return code + "\nimport asyncio as _asyncio\n_asyncio.run(main())\n"
    return code


def programs(text: str, name: str = "README.md") -> list[tuple[str, str]]:
    """(id, source) of each program to run: a block, with the blocks marked ``continued`` after it.
    A block marked ``needs (module)`` starts with a line naming the module (see ``needed``)."""
    out: list[tuple[str, list[Block]]] = []
    for block in python_blocks(text):
        if block.marker == "skip":
            continue
        if block.marker == "continued":
            if not out:
                raise ValueError(f"{name}:{block.line}: 'continued' on the first python block")
            out[-1][1].append(block)
        elif block.marker is None:
            out.append((f"{name}:{block.line}", [block]))
        elif block.marker == "needs":
            needs = Block(block.line, f"# readme-test needs: {block.reason}\n", None, "")
            out.append((f"{name}:{block.line}", [needs, block]))
        else:
            raise ValueError(f"{name}:{block.line}: unknown readme-test marker {block.marker!r}")
    return [(name, "".join(with_main_run(b.code) for b in blocks)) for name, blocks in out]


def run_program(source: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", source],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


_TEXT = README.read_text(encoding="utf-8")
_TEXTS = {doc.relative_to(README.parent).as_posix(): doc.read_text(encoding="utf-8") for doc in DOCS}
_PROGRAMS = [p for name, text in _TEXTS.items() for p in programs(text, name)]


def test_the_readme_has_python_examples() -> None:
    assert _PROGRAMS, "no runnable ```python block found in README.md"


def test_every_skipped_block_says_why() -> None:
    unexplained = [
        f"{name}:{b.line}"
        for name, text in _TEXTS.items()
        for b in python_blocks(text)
        if b.marker == "skip" and not b.reason
    ]
    assert not unexplained, f"{unexplained}: a skipped block needs a reason: <!-- readme-test: skip (why) -->"


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("source", [s for _, s in _PROGRAMS], ids=[n for n, _ in _PROGRAMS])
def test_readme_example_runs(source: str, tmp_path: Path) -> None:
    needed = re.match(r"# readme-test needs: (\S+)\n", source)
    required = {"distributed": "TOKENGATE_REQUIRE_DASK", "ray": "TOKENGATE_REQUIRE_RAY"}
    if needed and not os.environ.get(required.get(needed[1], "-")):
        pytest.importorskip(needed[1])
    proc = run_program(source, tmp_path)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n--- stderr ---\n{proc.stderr}\n--- source ---\n{source}"


# -- the harness itself --------------------------------------------------------------------------


_SAMPLE = """\
Intro.

```python
print("one")
```

<!-- readme-test: continued -->
```python
print("two")
```

<!-- readme-test: skip (needs a network) -->
```python
import urllib.request
```

```sh
echo not python
```

```python
async def main():
    print("main ran")
```
"""


def test_the_harness_finds_blocks_markers_and_unrun_mains() -> None:
    blocks = python_blocks(_SAMPLE)
    assert [(b.line, b.marker, b.reason) for b in blocks] == [
        (3, None, ""),
        (8, "continued", ""),
        (13, "skip", "needs a network"),
        (21, None, ""),
    ]
    progs = programs(_SAMPLE)
    assert [name for name, _ in progs] == ["README.md:3", "README.md:21"]
    assert progs[0][1] == 'print("one")\nprint("two")\n'
    assert "_asyncio.run(main())" in progs[1][1]
    runs_main = "async def main(): ...\nimport asyncio\nasyncio.run(main())\n"
    assert with_main_run(runs_main) == runs_main


def test_the_harness_fails_a_block_that_raises(tmp_path: Path) -> None:
    ((_name, source),) = programs("```python\nfrom tokengate import gather\ntokengate.as_completed\n```\n")
    proc = run_program(source, tmp_path)
    assert proc.returncode != 0 and "NameError" in proc.stderr
    ((_name, source),) = programs("```python\nasync def main():\n    raise SystemExit(3)\n```\n")
    assert run_program(source, tmp_path).returncode == 3  # the appended asyncio.run(main()) ran it
