"""scripts/check-module-graph.py: the crate's modules form no circle, the engine names nothing of
the binding layer, and no file of src/ is over the line limit. The check must catch each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check-module-graph.py"

pytestmark = pytest.mark.skipif(not (ROOT / "src").is_dir(), reason="needs the source tree")


def run(src: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--src", str(src)], capture_output=True, text=True, timeout=60)


def write(src: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_crate_passes() -> None:
    result = run(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problems" in result.stdout


def test_a_circle_through_use_lines_fails(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "lib.rs": "pub mod engine;\nmod py;\n",
            "engine/mod.rs": "pub mod pool;\n",
            "engine/pool.rs": "pub struct Pool;\n",
            "py/mod.rs": "mod a;\nmod b;\nmod c;\n",
            "py/a.rs": "use super::b::B;\npub struct A;\n",
            "py/b.rs": "use super::{c::C, d as _};\npub struct B;\n",
            "py/c.rs": "pub struct C(crate::py::a::A);\n",
        },
    )
    result = run(tmp_path)
    assert result.returncode == 1
    assert "import circle: py::a, py::b, py::c" in result.stdout


def test_an_engine_module_naming_the_binding_layer_fails(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "lib.rs": "pub mod engine;\nmod py;\n",
            "engine/mod.rs": "pub mod pool;\n",
            "engine/pool.rs": "pub fn f() { crate::py::g(); }\n",
            "py/mod.rs": "pub fn g() {}\n",
        },
    )
    result = run(tmp_path)
    assert result.returncode == 1
    assert "floor pointing up: engine::pool names py" in result.stdout


def test_inline_test_modules_and_comments_are_not_edges(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "lib.rs": "pub mod engine;\n",
            "engine/mod.rs": "pub mod a;\npub mod b;\npub use a::A;\n",
            "engine/a.rs": "use super::b::B;\npub struct A(B);\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
            "engine/b.rs": "// super::a::A would be a circle\npub struct B;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        },
    )
    result = run(tmp_path)
    assert result.returncode == 0, result.stdout


def test_a_long_file_fails(tmp_path: Path) -> None:
    write(tmp_path, {"lib.rs": "pub mod engine;\n", "engine/mod.rs": "// x\n" * 701})
    result = run(tmp_path)
    assert result.returncode == 1
    assert "engine/mod.rs: 701 lines (limit 700)" in result.stdout
