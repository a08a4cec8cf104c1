"""benchmarks/evaluation.py runs end to end at a small size: one table row per metric (the classifier per
HLF group included) and a JSON record with its timings and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_evaluation_benchmark_times_every_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import evaluation

    ci = evaluation.ROOT / "configs" / "eval" / "ci.yaml"
    assert evaluation.main(["--n", "300", "--config", str(ci), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("*_evaluation.json")
    record = json.loads(path.read_text())
    steps = {r["step"] for r in record["results"]}
    assert steps == {*evaluation.STEPS, "total"}
    assert all(r["wall_s"] >= 0 for r in record["results"])
    assert "most telling" in out and "cls_groups" in out
    groups = [k for k in record["metrics"] if k.startswith("cls_groups/")]
    assert len(groups) == 10 and all(0.35 < record["metrics"][k] < 0.65 for k in groups)
