"""benchmarks/fidelity.py --quick runs end to end: training with evaluations along the run, the final
evaluation, CaloChallenge files the official code reads, the curve and the JSON record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fidelity_benchmark_quick_runs_end_to_end(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks import fidelity

    out, results = tmp_path / "fid", tmp_path / "fid.json"
    assert fidelity.main(["--quick", "--threads", "2", "--out-dir", str(out), "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    assert record["steps"] == 6 and record["quick"] is True
    assert [row["step"] for row in record["curve"]] == [3, 6]
    flops = [row["train_flops"] for row in record["curve"]]
    assert flops[1] == pytest.approx(2 * flops[0]) and flops[0] > 0
    for row in record["curve"]:
        assert 0.0 <= row["auc_low"] <= 1.0 and 0.0 <= row["auc_high"] <= 1.0 and "fpd" in row
    m = record["metrics"]
    for key in ("auc_low", "auc_high", "fpd", "kpd", "floor/fpd", "sep_power/e_layer", "sep_power/width_r"):
        assert np.isfinite(m[key]), key
    assert record["loss_curve"] and record["loss_curve"][-1]["step"] == 6
    for name in ("sample_cc.h5", "reference_cc.h5"):
        with h5py.File(out / name, "r") as f:
            assert f["showers"].shape == (200, 6480) and f["incident_energies"].shape == (200, 1)
    with h5py.File(out / "reference_cc.h5", "r") as f:
        e = f["incident_energies"][:, 0]
    assert e.min() >= 1e3 and e.max() <= 1e6  # 1 GeV - 1 TeV in MeV
    assert (out / "curve.png").stat().st_size > 5_000
    assert (out / "layers.png").stat().st_size > 5_000
    # the per-layer table covers the layers with > 1 % of the data's energy, and the goals are judged
    rows = record["layers"]["rows"]
    fracs = record["layers"]["reference"]["energy_frac"]
    assert [r["layer"] for r in rows] == [z for z, f in enumerate(fracs) if f > 0.01] and rows
    worst = max(abs(r["hits_ratio"] - 1.0) for r in rows)
    assert m["response/layer_hits_max_dev"] == pytest.approx(worst)
    assert [g["met"] for g in record["goals"]] == [
        m["response/layer_hits_max_dev"] <= 0.1,
        m["response/layer_width_r_max_dev"] <= 0.1,
        m["auc_high"] <= 0.8,
    ]
    assert (out / "report" / "report.md").is_file()


@pytest.mark.slow
def test_fidelity_benchmark_quick_on_the_detector_mix(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks import fidelity

    out, results = tmp_path / "fid", tmp_path / "fid.json"
    argv = ["--quick", "--data", "mix", "--threads", "2", "--out-dir", str(out), "--results", str(results)]
    assert fidelity.main(argv) == 0
    record = json.loads(results.read_text())
    detectors = ["fe-sci", "odd-like", "par04-scipb", "par04-siw", "pbwo4", "wsi-granular"]
    assert record["data"]["detectors"] == detectors and record["data"]["particles"] == ["e-", "gamma", "pi+"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["info"]["detectors"] == detectors
    assert report["info"]["particles"] == ["e-", "gamma", "pi+"]
    assert report["info"]["n_reference"] == 6 * (200 // 6)  # --n-eval split evenly over the detectors
    assert record["goals"] == []  # judged on dataset 2 only
    assert not (out / "sample_cc.h5").exists() and (out / "layers.png").is_file()
    assert np.isfinite(record["metrics"]["auc_high"]) and len(record["curve"]) == 2
    assert record["model"] is None and record["empty_layers"] == "axis_tracks"  # a new bundle's default
    # --model: the trained bundle evaluated again on the same held-out set, without training, another mode
    again, results2 = tmp_path / "again", tmp_path / "again.json"
    argv2 = ["--quick", "--data", "mix", "--threads", "2", "--model", str(out / "run" / "model")]
    argv2 += ["--empty-layers", "voxel_model", "--out-dir", str(again), "--results", str(results2)]
    assert fidelity.main(argv2) == 0
    rerun = json.loads(results2.read_text())
    assert rerun["model"] == str(out / "run" / "model") and rerun["empty_layers"] == "voxel_model"
    assert rerun["steps"] is None and rerun["curve"] == [] and rerun["train_config"] is None
    assert not (again / "run").exists() and not (again / "curve.png").exists()
    assert rerun["n_eval"] == record["n_eval"] and np.isfinite(rerun["metrics"]["auc_high"])
