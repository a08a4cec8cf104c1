"""Acceptance: ``configs/train/debug.yaml`` (the ``debug`` ShowerModel, showers simulated from 2 detectors ×
2 particles) trained a few hundred steps lowers the loss along the golden curve and generates showers
whose conditioning is visible (EM vs hadron, detector vs detector) and whose means follow the data.

Reference showers come from the simulator at exactly the generated conditions (each condition simulated
``REFERENCE_REPEATS`` times), so the comparison is not diluted by the spread of incident energies within a
bin. Regenerate the golden loss curve with ``CALOFORGE_REGEN_GOLDEN=1`` (and commit the JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from caloforge.datasets.simulator import simulate
from caloforge.platform.conditioning import Conditions, pdg_of
from caloforge.platform.geometry import load_detector
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.hooks import read_metrics
from caloforge.training.run import load_train_config, train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "train" / "debug.yaml"
GOLDEN = REPO / "tests" / "assets" / "golden_loss_debug.json"
REGEN = os.environ.get("CALOFORGE_REGEN_GOLDEN") == "1"
OVERRIDES = ["progress=false", "eval.every=0"]
GOLDEN_RTOL = 0.10  # per logged loss (each a mean over log_every steps); float kernels differ across CPUs
GOLDEN_MEAN_RTOL = 0.03  # on the mean of the whole curve

DETECTORS = ("par04-siw", "pbwo4")
PARTICLES = ("e-", "pi+")
ENERGY_BINS_GEV = ((2.0, 10.0), (10.0, 100.0))
N_GENERATED = 256  # per (detector, particle, energy bin)
REFERENCE_REPEATS = 4
ENERGY_RTOL = 0.15


def _group_conditions(detector: str, particle: str, lo: float, hi: float, seed: int) -> Conditions:
    """Log-spaced energies across the bin, θ = 90° (as simulated), φ uniform (seeded)."""
    energy_mev = np.exp(np.linspace(np.log(lo), np.log(hi), N_GENERATED)) * 1e3
    phi = np.random.default_rng(seed).uniform(-np.pi, np.pi, N_GENERATED)
    return Conditions.make(energy_mev, np.pi / 2, phi, pdg_of(particle), detector)


def _summary(showers_NZPR: np.ndarray) -> dict[str, float]:
    layer_NZ = showers_NZPR.sum(axis=(2, 3), dtype=np.float64)
    etot_N = layer_NZ.sum(axis=1)
    depth_N = (layer_NZ * np.arange(layer_NZ.shape[1])).sum(axis=1) / np.maximum(etot_N, 1e-12)
    return {
        "energy_gev": float(etot_N.mean() / 1e3),
        "depth_layer": float(depth_N[etot_N > 0].mean()),
        "hits": float((showers_NZPR > 0).sum(axis=(1, 2, 3)).mean()),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    config = load_train_config(DEBUG, OVERRIDES)
    result = train(config, tmp_path_factory.mktemp("debug-run") / "run")
    model = ShowerModel.load(result.model_dir)
    groups = {}
    for i, (detector, particle, (lo, hi)) in enumerate(
        (d, p, b) for d in DETECTORS for p in PARTICLES for b in ENERGY_BINS_GEV
    ):
        cond = _group_conditions(detector, particle, lo, hi, seed=100 + i)
        generated = model.generate(cond, seed=1000 + i, batch_size=N_GENERATED)
        repeated = cond.subset(np.tile(np.arange(N_GENERATED), REFERENCE_REPEATS))
        reference = simulate(load_detector(detector), repeated, seed=2000 + i).showers_NZPR
        groups[(detector, particle, lo)] = {"gen": _summary(generated), "ref": _summary(reference)}
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    return {"config": config, "result": result, "groups": groups, "rows": rows}


def test_loss_follows_the_golden_curve_and_decreases(trained: dict) -> None:
    config, rows = trained["config"], trained["rows"]
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    assert steps[-1] == config.loop.steps
    if REGEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(
            json.dumps(
                {
                    "config": str(DEBUG.relative_to(REPO)),
                    "overrides": OVERRIDES,
                    "torch": torch.__version__,
                    "steps": steps,
                    "loss": losses,
                },
                indent=1,
            )
            + "\n"
        )
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == str(DEBUG.relative_to(REPO)) and golden["overrides"] == OVERRIDES
    assert steps == golden["steps"], "the debug config's schedule changed: regenerate the golden curve"
    np.testing.assert_allclose(losses, golden["loss"], rtol=GOLDEN_RTOL)
    assert np.mean(losses) == pytest.approx(np.mean(golden["loss"]), rel=GOLDEN_MEAN_RTOL)
    first, last = losses[0], float(np.mean(losses[-3:]))
    assert last < 0.7 * first, f"loss went from {first:.3f} to {last:.3f}"


def test_generated_showers_follow_the_conditions(trained: dict) -> None:
    """Conditioning is learned: EM vs hadron, detector vs detector and energy differences of the data
    show up in the generated means with the data's sign and a good part of its size."""
    groups = trained["groups"]
    for detector in DETECTORS:
        for lo, _ in ENERGY_BINS_GEV:
            em, had = groups[(detector, "e-", lo)], groups[(detector, "pi+", lo)]
            assert had["ref"]["depth_layer"] - em["ref"]["depth_layer"] > 6.0
            # hadrons start later and develop deeper; EM showers light up more voxels and deposit more
            assert had["gen"]["depth_layer"] - em["gen"]["depth_layer"] > 3.0, (detector, lo, em, had)
            assert em["gen"]["hits"] > 2.0 * had["gen"]["hits"], (detector, lo, em, had)
            assert em["gen"]["energy_gev"] > 1.5 * had["gen"]["energy_gev"], (detector, lo, em, had)
        for particle in PARTICLES:
            low, high = (groups[(detector, particle, lo)]["gen"] for lo, _ in ENERGY_BINS_GEV)
            low_ref, high_ref = (groups[(detector, particle, lo)]["ref"] for lo, _ in ENERGY_BINS_GEV)
            # more energy: deeper maximum (by at least 40 % of the data's growth: 1.9-3.9 layers), more hit
            # voxels, more deposited energy. Relative to the data since the pions' tracks (bundle schema 8)
            # put the low-energy pions' mean depth where the data has it (pbwo4: 17.5 -> 21.2 layers, data
            # 23.9), which narrows the generated growth more than the data's (0.9 against 1.9 layers there)
            growth_ref = high_ref["depth_layer"] - low_ref["depth_layer"]
            assert growth_ref > 1.5, (detector, particle, low_ref, high_ref)
            assert high["depth_layer"] - low["depth_layer"] > 0.4 * growth_ref, (
                detector,
                particle,
                low,
                high,
            )
            assert high["hits"] > 1.5 * low["hits"], (detector, particle, low, high)
            assert high["energy_gev"] > 2.0 * low["energy_gev"], (detector, particle, low, high)
    for lo, _ in ENERGY_BINS_GEV:
        siw, crystal = groups[("par04-siw", "e-", lo)], groups[("pbwo4", "e-", lo)]
        # in the data the PbWO4 crystal lights up 1.5-2× the voxels of the W/Si sampling calorimeter
        assert crystal["ref"]["hits"] > 1.4 * siw["ref"]["hits"]
        assert crystal["gen"]["hits"] > 1.3 * siw["gen"]["hits"], (lo, siw, crystal)


def test_generated_mean_total_energy_within_15_percent(trained: dict) -> None:
    """The acceptance of #3: mean E_tot per (detector, particle, energy bin) within 15% of the data's.

    Generated and reference showers share the incident energies, so only the E_tot/E_inc fluctuation at
    fixed conditions enters the comparison: with N_GENERATED = 256 its 1σ error on the generated mean is
    ≈ 1% for electrons and ≈ 6% for pions (E_tot/E_inc spread ≈ 0.8 of its mean), i.e. 15% is ≥ 2.5σ."""
    rows = {key: g["gen"]["energy_gev"] / g["ref"]["energy_gev"] for key, g in trained["groups"].items()}
    table = ", ".join(f"{d}/{p}/{lo:g}GeV: {r:.3f}" for (d, p, lo), r in rows.items())
    assert all(abs(r - 1.0) <= ENERGY_RTOL for r in rows.values()), f"generated/data mean E_tot: {table}"
