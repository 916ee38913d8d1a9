"""``python -m tokengate proof``: the benchmark functions on tiny sizes, and one ``--quick`` run in a child.

No timing is asserted beyond sanity (positive, finite): the machine is shared.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokengate import OperationsCoordinator, _tokengate, proof
from tokengate.__main__ import build_parser
from tokengate.__main__ import main as cli_main

RUNNER_KEYS = ("tokengate", "threadpool")
BURST_KEYS = ("tokengate", "threadpool", "threads")


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_workloads_compute_what_the_original_computes(tmp_path: Path) -> None:
    assert proof.cpu_crunch(12) == 2 + 3 + 5 + 7 + 11
    assert proof.data_sort(5) == sorted(proof.data_sort(5)) and len(proof.data_sort(400)) == 400
    assert proof.string_transform(31) == proof.string_transform(31) and len(proof.string_transform(1)) == 300
    assert len(proof.hash_chain("wave_seed_3", 120)) == 64
    assert proof.moderate_operation(10) == sum(x for x in range(0, 20, 2) if x % 3 == 0)
    assert proof.complex_operation(3) == sum(i * j for i in range(3) for j in range(3))
    assert proof.heavy_operation(2) == 2 * sum(j * j for j in range(100))
    assert [proof.wave_args(i)[0] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert proof.wave_sizes(64) == [4, 8, 16, 32, 64]
    workloads = proof.burst_workloads(str(tmp_path))
    assert len(workloads) == 6 and all(w.n == 8 for w in workloads)
    assert [w.releases_gil for w in workloads] == [False, False, False, True, True, True]
    for w in workloads:
        for args in w.args_list:
            w.fn(*args)
    assert (tmp_path / "logs" / "out.log").read_text().count("\n") == 8
    assert len(list((tmp_path / "json").iterdir())) == 8
    refs = proof.reference_workloads(sleep_s=0.001, sleeps=3, sha_mb=1, loop_s=0.002)
    assert [w.releases_gil for w in refs] == [True, True, False]
    assert refs[0].n == 3 and refs[1].n == 2 and refs[2].n == 2


def test_bursts_tiny() -> None:
    refs = proof.reference_workloads(sleep_s=0.004, sleeps=4, sha_mb=1, loop_s=0.003)
    out = proof.run_bursts(refs, repeats=2, workers=4, tpe_workers=4)
    assert [b["function"] for b in out] == ["nap", "sha256_digest", "pure_python_loop"]
    for b in out:
        assert len(b["repeats"]) == 2 and _finite_positive(b["serial_s_median"])
        for key in BURST_KEYS:
            s = b[key]
            rep = s["representative"]
            assert len(rep["durations_s"]) == b["tasks"]
            assert rep["min_s"] <= rep["mean_s"] <= rep["max_s"]
            assert rep["submit_spread_ms"] >= 0 and _finite_positive(rep["wall_s"])
            assert math.isclose(rep["ratio"], rep["serial_estimate_s"] / rep["wall_s"])
            assert _finite_positive(s["ratio_median"]) and _finite_positive(s["real_speedup_median"])
            assert s["ratio_range"][0] <= s["ratio_median"] <= s["ratio_range"][1]
    # Sleeps overlap on any interpreter: generous bound (ideal 4x).
    assert out[0]["tokengate"]["real_speedup_median"] > 1.5
    assert _tokengate.active_engine_count() == 0


def test_window_tiny(tmp_path: Path) -> None:
    w = proof.run_window(0.3, str(tmp_path), workers=4, tpe_workers=4, slice_s=0.1)
    assert [o["function"] for o in w["options"]] == [
        "moderate_operation",
        "complex_operation",
        "heavy_operation",
        "append_log",
        "write_json",
        "write_blob",
    ]
    for key in ("serial", *RUNNER_KEYS):
        d = w[key]
        assert d["releases"] >= 1 and d["tasks"] == 8 * d["releases"]
        assert d["elapsed_s"] >= 0.3 * 0.99
        assert math.isclose(d["tasks_per_s"], d["tasks"] / d["elapsed_s"])
        assert math.isclose(d["ratio"], d["serial_estimate_s"] / d["elapsed_s"])
    # Same seed: the runners drew the same release sequence (compare the common prefix's counts loosely).
    assert set(w["tokengate"]["per_option"]) <= {o["label"] for o in w["options"]}
    assert _finite_positive(w["tokengate"]["vs_loop"]) and _finite_positive(w["tokengate"]["vs_threadpool"])


def test_waves_tiny_and_goals() -> None:
    with OperationsCoordinator(max_workers=2) as c:
        runners = proof._Runners(None, 2, coordinator=c)
        try:
            wv = proof.run_waves(32, runners=runners, warmup=8)
        finally:
            runners.close()
        assert c.is_running  # a coordinator passed in is left running
    assert wv["sizes"] == [4, 8, 16, 32] and wv["total_tokens"] == 60 and wv["workers"] == 2
    for row in wv["waves"]:
        for key in ("loop", "process", *RUNNER_KEYS):
            assert _finite_positive(row[key]["tok_s"]) and row[key]["failures"] == 0
        assert row["tokengate"]["submit_s"] <= row["tokengate"]["e2e_s"]
    assert _finite_positive(wv["ratios"]["tokengate_vs_loop"]) and _finite_positive(wv["ratios"]["process_vs_loop"])
    assert wv["process_workers"] >= 1
    goals = proof.evaluate_goals({"waves": wv})
    assert [g["name"] for g in goals[:4]] == [
        "waves end to end vs plain loop",
        "waves end to end vs the original",
        "waves, process lane, vs plain loop",
        "waves, process lane, vs the original",
    ]
    assert all(g["status"] in ("PASS", "MISS") for g in goals[:4])
    assert [g["status"] for g in goals[4:]] == ["SKIP", "SKIP", "SKIP"]  # no bursts run
    assert goals[1]["goal"] == 5.0 and goals[3]["goal"] == 5.0
    assert goals[2]["goal"] == (1.6 if wv["process_workers"] >= 2 else 0.9)  # parallel processes: 1.6x


def test_run_proof_in_process_prints_report() -> None:
    buf = io.StringIO()
    cfg = proof.ProofConfig(quick=True, sections=("waves",), max_wave=16, workers=2, tpe_workers=2, progress=False)
    results = proof.run_proof(cfg, out=buf)
    text = buf.getvalue()
    assert "WAVES" in text and "GOALS" in text and "a MISS is a MISS" in text
    assert "[PASS]" in text or "[MISS]" in text
    assert results["schema"] == proof.SCHEMA and "burst" not in results
    json.dumps(proof._finite(results), allow_nan=False)


def test_free_threaded_run_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: this interpreter has a GIL, so only the wording is checked, not the speedup.
    monkeypatch.setattr(proof, "gil_enabled", lambda: False)
    buf = io.StringIO()
    cfg = proof.ProofConfig(
        sections=("burst",), burst_repeats=1, reference_repeats=1, workers=2, tpe_workers=2, progress=False
    )
    results = proof.run_proof(cfg, out=buf)
    text = buf.getvalue()
    assert results["machine"]["gil_enabled"] is False
    assert "GIL: DISABLED (free-threaded interpreter)" in text
    assert "Free-threaded: pure-Python speedup on threads =" in text
    assert "this interpreter has none" in text


def test_cli_arguments() -> None:
    args = build_parser().parse_args(["proof", "--quick", "--json", "x.json", "--only", "waves", "--only", "burst"])
    assert args.quick and args.json == "x.json" and args.only == ["waves", "burst"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["proof", "--max-wave", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = cli_main(["proof", "--quick", "--plot", str(tmp_path / "w.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install" in err
    assert not (tmp_path / "w.png").exists()


@pytest.fixture(scope="module")
def matplotlib_loaded() -> None:
    """Imported before the per-test thread baseline is taken: NumPy's BLAS starts a thread at import."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("matplotlib.pyplot")


def test_plot_with_matplotlib(tmp_path: Path, matplotlib_loaded: None) -> None:
    wv = proof.run_waves(16, workers=2, tpe_workers=2, warmup=4)
    path = tmp_path / "waves.png"
    proof.write_plot({"waves": wv, "machine": {"python": "3", "cpus": 2, "gil_enabled": True}}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.subprocess
@pytest.mark.timeout(400)
def test_quick_run_in_a_child_writes_the_json(tmp_path: Path) -> None:
    path = tmp_path / "proof.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tokengate", "proof", "--quick", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for heading in ("REFERENCE SETS", "CONCURRENCY BURSTS", "CONCURRENCY WINDOW", "WAVES", "GOALS"):
        assert heading in out
    assert "[tokengate proof" in proc.stderr  # progress on stderr, not stdout
    data = json.loads(path.read_text())
    assert data["schema"] == "tokengate-proof/1"
    assert {"machine", "config", "reference", "burst", "window", "waves", "goals", "elapsed_s"} <= set(data)
    assert data["config"]["quick"] is True
    assert isinstance(data["machine"]["gil_enabled"], bool) and data["machine"]["cpus"] >= 1
    assert [b["function"] for b in data["reference"]] == ["nap", "sha256_digest", "pure_python_loop"]
    assert len(data["burst"]) == 6
    for b in data["reference"] + data["burst"]:
        assert isinstance(b["releases_gil"], bool)
        for key in BURST_KEYS:
            rep = b[key]["representative"]
            assert {
                "submit_spread_ms",
                "wall_s",
                "min_s",
                "max_s",
                "mean_s",
                "stdev_s",
                "serial_estimate_s",
                "ratio",
                "real_speedup",
                "durations_s",
            } <= set(rep)
    for key in ("serial", *RUNNER_KEYS):
        assert {"releases", "tasks", "elapsed_s", "ratio", "tasks_per_s"} <= set(data["window"][key])
    wv = data["waves"]
    assert wv["sizes"][0] == 4 and wv["sizes"][-1] == 8192
    assert {"loop", "tokengate", "threadpool", "process"} <= set(wv["totals"])
    assert all(_finite_positive(wv["totals"][k]["tok_s"]) for k in ("loop", "tokengate", "threadpool", "process"))
    names = [g["name"] for g in data["goals"]]
    assert len(names) == 7
    for g in data["goals"]:
        assert g["status"] in ("PASS", "MISS")
        assert f"[{g['status']}] {g['name']}" in out
    assert data["elapsed_s"] < 120  # --quick aims at well under 60 s; leave room for a busy machine
