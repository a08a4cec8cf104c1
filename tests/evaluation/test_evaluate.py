"""Acceptance tests of ``evaluate`` on showers of the built-in simulator.

- two samples of one simulator configuration are indistinguishable: AUCs in [0.45, 0.56], FPD consistent
  with the data-vs-data floor, separation powers at the floor;
- each deliberate distortion (5 % energy scale, 10 % wider radial profile, lost soft hits) is seen by the HLF
  group that should see it, and not by the groups it cannot affect;
- conditional groups, input validation, determinism, and the written report (JSON, Markdown, PNGs).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from eval_showers import drop_low_voxels, scale_energy, simulated, widen_radially

from caloforge.datasets.schema import ShowerSet
from caloforge.evaluation import EvalConfig, EvalReport, evaluate
from caloforge.evaluation.config import ALL_METRICS
from caloforge.platform.conditioning import Conditions
from caloforge.platform.geometry import load_detector

CHEAP = ("sep_power", "response", "fpd", "kpd")


@pytest.fixture(scope="module")
def null_report(sim_a: ShowerSet, sim_b: ShowerSet, ci_config: EvalConfig) -> EvalReport:
    every = replace(ci_config, metrics=ALL_METRICS, floor_metrics=ALL_METRICS)  # ci.yaml skips cls_groups
    return evaluate(sim_a, sim_b, every)


@pytest.fixture(scope="module")
def cheap_config(ci_config: EvalConfig) -> EvalConfig:
    return replace(
        ci_config,
        metrics=CHEAP,
        floor_metrics=CHEAP,
        groups=replace(ci_config.groups, enabled=False),
        plots=replace(ci_config.plots, enabled=False),
    )


def _consistent(m: dict[str, float], key: str, n_sigma: float = 3.0) -> bool:
    return abs(m[key] - m[f"floor/{key}"]) <= n_sigma * math.hypot(m[f"{key}_err"], m[f"floor/{key}_err"])


# ------------------------------------------------------------------------------------------------ null
def test_same_simulator_configuration_is_indistinguishable(null_report: EvalReport) -> None:
    m = null_report.metrics
    for key in ("auc_low", "auc_high", "floor/auc_low", "floor/auc_high"):
        assert 0.45 <= m[key] <= 0.56, (key, m[key])
    assert _consistent(m, "fpd"), (m["fpd"], m["fpd_err"], m["floor/fpd"], m["floor/fpd_err"])
    assert _consistent(m, "kpd"), (m["kpd"], m["kpd_err"], m["floor/kpd"], m["floor/kpd_err"])
    for g in (
        "etot_einc",
        "e_layer",
        "ec_x",
        "width_x",
        "width_r",
        "sparsity",
        "depth",
        "voxel_energy",
        "mean",
    ):
        assert m[f"sep_power/{g}"] <= 2.0 * m[f"floor/sep_power/{g}"] + 0.002, g
    assert abs(m["response/scale"]) < 0.01 and abs(m["response/radial_width"]) < 0.02
    assert m["response/layer_hits_max_dev"] < 0.05 and m["response/layer_width_r_max_dev"] < 0.05
    assert m["prdc/coverage"] > 0.9 and 0.8 < m["prdc/density"] < 1.2
    assert abs(m["prdc/precision"] - m["floor/prdc/precision"]) < 0.1
    assert m["n_sample"] == m["n_reference"] == 3000 and m["floor/n_sample"] == 1500
    # weights of an indistinguishable sample stay near 1
    assert 0.5 < m["cls_low/w_gen_q05"] <= m["cls_low/w_gen_q50"] <= m["cls_low/w_gen_q95"] < 2.0
    # no HLF group gives a sample of the same simulator away, nor one half of the reference the other
    groups = [k for k in m if k.startswith("cls_groups/")]
    assert len(groups) == 10 and all(0.42 <= m[k] <= 0.58 for k in groups), {k: m[k] for k in groups}
    assert all(0.40 <= m[f"floor/{k}"] <= 0.60 for k in groups)


def test_report_files_are_complete_and_plots_are_not_blank(null_report: EvalReport, tmp_path: Path) -> None:
    out = null_report.write(tmp_path / "report")
    data = json.loads((out / "report.json").read_text())
    assert data["metrics"]["auc_low"] == pytest.approx(null_report.metrics["auc_low"])
    assert set(data) >= {
        "metrics",
        "hist_sep_power",
        "floor_hist_sep_power",
        "info",
        "config",
        "schema_version",
    }
    # 9 per-layer groups (8 official + e_layer_adaptive) + 7 single histograms
    assert len(data["hist_sep_power"]) == 9 * 45 + 7
    assert data["info"]["hlf_dim"] == 2 + 8 * 45 and data["info"]["detectors"] == ["par04-siw"]
    profiles = data["info"]["layer_profiles"]
    assert set(profiles["reference"]) == set(profiles["sample"]) == {"energy_frac", "hits", "width_r"}
    assert len(profiles["sample"]["hits"]) == 45 and sum(
        profiles["reference"]["energy_frac"]
    ) == pytest.approx(1)
    assert data["info"]["voxel_threshold_mev"]["par04-siw"] == pytest.approx(
        0.0005 / load_detector("par04-siw").sampling_fraction
    )
    back = EvalReport.read(out)
    assert back.metrics.keys() == null_report.metrics.keys() and back.config == null_report.config

    md = (out / "report.md").read_text()
    for text in (
        "| metric | model | floor |",
        "FPD ×10³",
        "AUC low-level",
        "## Separation power per HLF group",
        "## Which features give the model away",
        "| width_r |",
        "## Conditional groups",
        "par04-siw/e-",
        "classifier weights",
        "![sep_power.png](sep_power.png)",
    ):
        assert text in md, text

    expected = {
        f"hist_{g}.png"
        for g in (
            "etot_einc",
            "e_layer",
            "ec_x",
            "ec_y",
            "width_x",
            "width_y",
            "ec_r",
            "width_r",
            "sparsity",
            "depth",
            "voxel_energy",
            "etot_einc_adaptive",
            "e_layer_adaptive",
        )
    }
    expected |= {"profiles.png", "classifier_weights.png", "sep_power.png", "groups.png"}
    assert expected <= {p.name for p in out.glob("*.png")}
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".*tmp*"))
    for name in sorted(expected):
        path = out / name
        assert path.stat().st_size > 10_000, name
        img = mpimg.imread(path)[..., :3]
        assert img.shape[0] > 200 and img.shape[1] > 300, name
        assert img.std() > 0.05, f"{name} looks blank"


# ----------------------------------------------------------------------------------------- distortions
def test_energy_scale_is_seen_by_the_energy_group(sim_a, sim_b, cheap_config) -> None:
    m = evaluate(scale_energy(sim_a, 1.05), sim_b, cheap_config).metrics
    assert m["sep_power/etot_einc"] > 20 * m["floor/sep_power/etot_einc"]
    assert m["response/scale"] == pytest.approx(0.05, abs=0.005)
    # shapes are scale invariant: width and centre groups stay at the floor
    for g in ("width_r", "width_x", "ec_r", "depth"):
        assert m[f"sep_power/{g}"] < 2 * m[f"floor/sep_power/{g}"] + 0.002, g
    assert abs(m["response/radial_width"]) < 0.01


def test_wider_radial_profile_is_seen_by_the_radial_width_group(sim_a, sim_b, cheap_config) -> None:
    wide = widen_radially(sim_a, load_detector("par04-siw").geometry.r_edges_mm, 1.10)
    m = evaluate(wide, sim_b, cheap_config).metrics
    # official binning: 100 bins of 0.2-0.6 mm, so the floor is higher than with adaptive bins
    for g in ("width_r", "ec_r", "width_x", "width_y"):
        assert m[f"sep_power/{g}"] > 5 * m[f"floor/sep_power/{g}"], g
    assert 0.05 < m["response/radial_width"] < 0.15
    assert 0.05 < m["response/layer_width_r_max_dev"] < 0.3
    # the longitudinal development is untouched
    assert m["sep_power/e_layer"] < 2 * m["floor/sep_power/e_layer"] + 0.002
    assert m["sep_power/depth"] < 2 * m["floor/sep_power/depth"] + 0.002
    assert m["fpd"] - m["floor/fpd"] > 5 * math.hypot(m["fpd_err"], m["floor/fpd_err"])
    assert m["kpd"] > 5 * m["kpd_err"]


def test_the_group_classifier_names_the_radial_groups_for_a_wider_profile(sim_a, sim_b, cheap_config) -> None:
    wide = widen_radially(sim_a, load_detector("par04-siw").geometry.r_edges_mm, 1.10)
    cfg = replace(cheap_config, metrics=("cls_groups",), floor_metrics=("cls_groups",))
    m = evaluate(wide, sim_b, cfg).metrics
    radial = [m[f"cls_groups/{g}"] for g in ("width_r", "ec_r", "width_x", "width_y")]
    assert min(radial) > 0.7, m
    # the longitudinal development is untouched
    assert m["cls_groups/e_layer"] < 0.58 and m["cls_groups/e_tot"] < 0.58
    assert max(m[f"floor/cls_groups/{g}"] for g in ("width_r", "e_layer")) < 0.6


def test_missing_soft_hits_are_seen_by_the_sparsity_group(sim_a, sim_b, cheap_config) -> None:
    m = evaluate(drop_low_voxels(sim_a, 0.15), sim_b, cheap_config).metrics
    assert m["sep_power/sparsity"] > 10 * m["floor/sep_power/sparsity"]
    assert m["sep_power/voxel_energy"] > 10 * m["floor/sep_power/voxel_energy"]
    assert m["response/sparsity"] > 0.01  # more empty voxels
    assert m["response/layer_hits_max_dev"] > 0.1
    # layer energies were rescaled (only layers made of soft hits alone lose theirs): the response stays
    assert m["sep_power/etot_einc"] < 2 * m["floor/sep_power/etot_einc"] + 0.002
    assert abs(m["response/scale"]) < 0.005


# ----------------------------------------------------------------------------------------------- groups
def test_metrics_per_detector_particle_and_energy_bin(ci_config: EvalConfig) -> None:
    def mixed(seed: int) -> ShowerSet:
        parts = [
            simulated(seed + i, n=500, detector=det, particles=("e-", "pi+"), energy_gev=(5.0, 80.0))
            for i, det in enumerate(("par04-siw", "pbwo4"))
        ]
        return ShowerSet.concat(parts)

    cfg = replace(
        ci_config,
        metrics=("sep_power", "response", "kpd"),
        floor_metrics=("sep_power", "response", "kpd"),
        groups=replace(ci_config.groups, energy_bin_edges_gev=(5.0, 20.0, 80.0), min_showers=60),
        plots=replace(ci_config.plots, enabled=False),
    )
    rep = evaluate(mixed(10), mixed(20), cfg)
    m = rep.metrics
    for det in ("par04-siw", "pbwo4"):
        assert m[f"group/{det}/n_reference"] == 500
        for part in ("e-", "piplus"):  # "+" is not allowed in MLflow keys
            key = f"group/{det}/{part}"
            assert 150 < m[f"{key}/n_sample"] < 350
            assert f"{key}/sep_power/mean" in m and f"floor/{key}/sep_power/mean" in m
            assert f"{key}/E5-20GeV/kpd" in m and f"{key}/E20-80GeV/response/scale" in m
            assert m[f"{key}/sep_power/mean"] < 2 * m[f"floor/{key}/sep_power/mean"] + 0.01
    assert rep.info["detectors"] == ["par04-siw", "pbwo4"]
    assert {row["group"] for row in rep.info["groups"]} >= {"pbwo4", "pbwo4/piplus", "pbwo4/piplus/E5-20GeV"}
    # the pooled radial profile of detectors with different radial edges is binned in bin index
    assert len(rep.plot_data.binning["profile_r"]) == 10 and rep.plot_data.binning["profile_r"][-1] == 9.0


def test_small_groups_are_reported_but_skipped(sim_a, sim_b, ci_config) -> None:
    cfg = replace(
        ci_config,
        metrics=("sep_power",),
        floor=False,
        groups=replace(ci_config.groups, energy_bins=2, min_showers=5000, metrics=("sep_power",)),
        plots=replace(ci_config.plots, enabled=False),
    )
    rep = evaluate(sim_a, sim_b, cfg)
    assert rep.metrics["group/par04-siw/n_sample"] == 3000
    assert "group/par04-siw/sep_power/mean" not in rep.metrics
    assert all("skipped" in row for row in rep.info["groups"])
    assert not any(k.startswith("floor/") for k in rep.metrics)


def test_a_groups_floor_computes_only_the_floor_metrics(sim_a, sim_b, ci_config) -> None:
    cfg = replace(
        ci_config,
        metrics=("sep_power", "response"),
        floor_metrics=("sep_power",),
        groups=replace(ci_config.groups, energy_bins=0, min_showers=100, metrics=("sep_power", "response")),
        plots=replace(ci_config.plots, enabled=False),
    )
    m = evaluate(sim_a.subset(slice(0, 600)), sim_b.subset(slice(0, 600)), cfg).metrics
    assert "group/par04-siw/response/scale" in m and "group/par04-siw/sep_power/mean" in m
    assert "floor/group/par04-siw/sep_power/mean" in m
    assert not any(k.startswith("floor/") and "/response/" in k for k in m)
    # no metric of the group's list in floor_metrics: no group floor at all
    none = replace(cfg, floor_metrics=("fpd",), metrics=("sep_power",))
    m = evaluate(sim_a.subset(slice(0, 600)), sim_b.subset(slice(0, 600)), none).metrics
    assert "group/par04-siw/sep_power/mean" in m
    assert not any(k.startswith("floor/group/") for k in m)


# ------------------------------------------------------------------------------------ inputs and config
def test_matched_conditions_are_checked(sim_a: ShowerSet, cheap_config: EvalConfig) -> None:
    sim_a = sim_a.subset(slice(0, 500))
    cfg = replace(cheap_config, conditions="match", floor=False, metrics=("response",))
    assert "response/scale" in evaluate(scale_energy(sim_a, 1.0), sim_a, cfg).metrics
    c = sim_a.conditions
    shifted = Conditions(c.energy_mev * 1.01, c.theta_rad, c.phi_rad, c.pdg, c.detector)
    with pytest.raises(ValueError, match=r"energy_mev differs at shower 0"):
        evaluate(ShowerSet(sim_a.showers_NZPR, shifted), sim_a, cfg)
    with pytest.raises(ValueError, match="must be equal"):
        evaluate(sim_a.subset(slice(0, 100)), sim_a, cfg)


def test_bad_inputs_name_what_is_wrong(sim_a: ShowerSet, cheap_config: EvalConfig) -> None:
    other_mesh = ShowerSet(np.zeros((10, 45, 16, 8), np.float32), sim_a.conditions.subset(slice(0, 10)))
    with pytest.raises(ValueError, match=r"mesh shape \(45, 16, 8\) != reference mesh shape \(45, 16, 9\)"):
        evaluate(other_mesh, sim_a, cheap_config)
    bad = sim_a.showers_NZPR[:50].copy()
    bad[3, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(ShowerSet(bad, sim_a.conditions.subset(slice(0, 50))), sim_a, cheap_config)
    c = sim_a.conditions.subset(slice(0, 200))
    custom = ShowerSet(
        sim_a.showers_NZPR[:200],
        Conditions(c.energy_mev, c.theta_rad, c.phi_rad, c.pdg, np.full(200, "my-calo")),
    )
    with pytest.raises(ValueError, match=r"not a built-in detector.*r_edges_mm"):
        evaluate(custom, custom, cheap_config)
    edges = load_detector("par04-siw").geometry.r_edges_mm
    rep = evaluate(
        custom, custom, replace(cheap_config, r_edges_mm=edges, metrics=("sep_power",), floor=False)
    )
    assert rep.metrics["sep_power/mean"] == 0.0  # a set against itself
    assert rep.info["voxel_threshold_mev"]["my-calo"] == pytest.approx(0.5e-3 / 0.033)  # CaloChallenge rule
    with pytest.raises(ValueError, match="n_bins"):
        EvalConfig(n_bins=1)
    with pytest.raises(ValueError, match="duplicate"):
        EvalConfig(metrics=("fpd", "fpd"))


def test_same_config_and_seed_give_the_same_numbers(sim_a, sim_b, cheap_config) -> None:
    cfg = replace(cheap_config, max_showers=600)
    a = evaluate(sim_a, sim_b, cfg).metrics
    b = evaluate(sim_a, sim_b, cfg).metrics
    assert a == b
    c = evaluate(sim_a, sim_b, replace(cfg, seed=1)).metrics
    assert c["fpd"] != a["fpd"] and c["n_sample"] == 600
