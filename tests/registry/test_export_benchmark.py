"""``benchmarks/export.py``: the goal lines and the interleaved timer on hand-made inputs, and the script end
to end on the smallest budget (real export, variants, fidelity gate and onnxruntime timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import export

        yield export
    finally:
        sys.path.remove(str(BENCH))


def _row(model: str, kind: str, backend: str, cpu_ms: float, passed: bool | None = None) -> dict:
    row = {"model": model, "kind": kind, "graph": "1-step", "backend": backend, "batch": 1}
    row["cpu_ms_per_shower"] = cpu_ms
    return row | ({"gate_passed": passed} if passed is not None else {})


def test_goal_lines_take_the_fastest_gated_graph(bench) -> None:
    rows = [
        _row("S", "size", "torch", 20.0),  # eager torch is not a published graph
        _row("S", "size", "onnx-int8-attn", 30.0, passed=False),  # failed the gate: not counted
        _row("S", "size", "onnx-int8", 44.6, passed=True),
        _row("cd 1-step", "registered student", "onnx-int8", 2.3, passed=True),
        _row("cd 1-step", "registered student", "onnx-plain", 3.0),
    ]
    s_line, student_line = bench.goal_lines(rows)
    assert "best S onnx-int8 44.6 ms" in s_line and "NOT met" in s_line
    assert "best cd 1-step onnx-int8 2.30 ms" in student_line and "goal 5 ms: met" in student_line
    assert bench.goal_lines([_row("debug", "size", "onnx-int8", 3.0, passed=True)]) == []


def test_interleaved_timer_runs_every_backend_each_round(bench) -> None:
    calls: list[str] = []
    res = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4, 5, 60.0)
    assert calls == ["a", "b"] * 6  # one warm-up each, then 5 rounds of both
    assert res["a"]["reps"] == res["b"]["reps"] == 5
    assert (
        res["a"]["cpu_ms_per_shower"] >= 0 and res["a"]["ms_per_shower"] <= res["a"]["median_ms_per_shower"]
    )


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    env = {**os.environ, "CALOFORGE_HOME": str(tmp_path / "home"), "ORT_DISABLE_TELEMETRY": "1"}
    cmd = [sys.executable, str(BENCH / "export.py"), "--quick", "--sizes", "debug", "--students", "none",
           "--variants", "int8", "--gate-showers", "64", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["variants"] == ["plain", "int8"] and record["load_average_start"]
    rows = {(r["backend"], r["batch"]): r for r in record["rows"]}
    assert sorted(rows) == [(b, n) for b in ("onnx-int8", "onnx-plain", "torch") for n in (1, 10)]
    for r in rows.values():
        assert r["model"] == "debug" and r["ms_per_shower"] > 0 and r["reps"] >= 3 and r["load_1min"] >= 0
    assert rows[("onnx-int8", 1)]["gate_passed"] and rows[("onnx-int8", 1)]["gate_n_showers"] == 64
    assert rows[("onnx-int8", 1)]["mb"] < rows[("onnx-plain", 1)]["mb"]
    assert "gate_auc" not in rows[("onnx-plain", 1)]
