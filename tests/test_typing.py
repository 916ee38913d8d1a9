"""Type gates on user code: ``tests/typing/user_code.py`` is checked with ``mypy --strict``
(its ``assert_type`` lines hold and exactly its ``# E:`` lines fail), and its functions run."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import typing
from pathlib import Path
from types import ModuleType

import pytest

import tokengate
from tokengate import TaskToken

USER_CODE = Path(__file__).parent / "typing" / "user_code.py"
EXPECTED = re.compile(r"#\s*E:\s*([a-z-]+)\s*$")
REPORTED = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def expected_errors(source: str) -> set[tuple[int, str]]:
    out = set()
    for n, line in enumerate(source.splitlines(), 1):
        m = EXPECTED.search(line)
        if m:
            out.add((n, m.group(1)))
    return out


def mypy_errors(path: Path, *extra: str) -> tuple[set[tuple[int, str]], str]:
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (the lint group of pyproject.toml)")
    stdout, stderr, _status = api.run(["--strict", "--no-incremental", "--show-error-codes", *extra, str(path)])
    found = set()
    for line in stdout.splitlines():
        m = REPORTED.match(line)
        if m and Path(m.group("path")).name == path.name:
            found.add((int(m.group("line")), m.group("code")))
    return found, stdout + stderr


def test_user_code_type_checks_as_documented() -> None:
    found, report = mypy_errors(USER_CODE)
    expected = expected_errors(USER_CODE.read_text())
    assert len(expected) >= 5
    assert found == expected, f"mypy reported {sorted(found - expected)}, missed {sorted(expected - found)}:\n{report}"


def test_the_check_catches_a_seeded_wrong_type(tmp_path: Path) -> None:
    # The gate itself can fail: one assert_type claims the wrong type.
    source = USER_CODE.read_text().replace(
        "assert_type(t.result(timeout=1), str)", "assert_type(t.result(timeout=1), int)"
    )
    seeded = tmp_path / "seeded.py"
    seeded.write_text(source)
    found, _ = mypy_errors(seeded)
    line = next(n for n, text in enumerate(source.splitlines(), 1) if "assert_type(t.result(timeout=1), int)" in text)
    assert (line, "assert-type") in found


def load_user_code() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tokengate_user_code", USER_CODE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_code_runs() -> None:
    module = load_user_code()
    module.sync_use()
    asyncio.run(module.async_use())


def test_task_token_is_subscriptable_at_runtime() -> None:
    alias = TaskToken[int]
    assert typing.get_origin(alias) is TaskToken and typing.get_args(alias) == (int,)

    def f(t: TaskToken[int]) -> TaskToken[str]:
        raise NotImplementedError

    assert typing.get_type_hints(f) == {"t": TaskToken[int], "return": TaskToken[str]}


def test_raised_errors_and_typing_names_are_exported() -> None:
    for name in ("UnpicklableError", "RemoteError", "TokenFunction", "TokenCall", "TryTokenCall", "MapResults"):
        assert name in tokengate.__all__ and hasattr(tokengate, name), name
