"""The layer-energy head (``caloforge.platform.energy``) and its wiring into ShowerModel, bundles and DDP."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from toy_models import DETECTORS, SMALL_MESH, make_model, scramble_zero_init, toy_showers

from caloforge.config import ConfigError, from_dict, to_dict
from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.stats import compute_stats
from caloforge.environment import free_port
from caloforge.platform.conditioning import PARTICLES, Conditions, ConditionVocab, charged_hadron_mask
from caloforge.platform.energy import (
    LayerEnergyConfig,
    LayerEnergyFlow,
    LayerEnergyTransform,
    energy_flow_loss,
    rescale_layers,
)
from caloforge.platform.objectives import LossContext
from caloforge.platform.samplers import SAMPLERS
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig, seeded_noise
from caloforge.platform.transforms import MAX_LOG
from caloforge.training.tasks import shower_loss_fn

N_Z = SMALL_MESH[0]
SMALL_HEAD = LayerEnergyConfig(width=32, depth=2, num_steps=4, draws=3)


def _assert_same_showers(model: ShowerModel, a: np.ndarray, b: np.ndarray) -> None:
    """As the contract suite: equal up to float32 GEMM reduction order (batch-size dependent on CPU)."""
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1.05 * model.config.threshold_mev)


# ---- config -------------------------------------------------------------------------------------------


def test_config_validation_and_yaml_round_trip() -> None:
    for kwargs, match in (
        ({"width": 0}, r"layer_energy.width must be an int >= 1, got 0"),
        ({"depth": True}, r"layer_energy.depth must be an int >= 1, got True"),
        ({"num_steps": 2.0}, r"layer_energy.num_steps must be an int >= 1, got 2.0"),
        ({"draws": -1}, r"layer_energy.draws must be an int >= 1, got -1"),
        ({"sampler": "dpm"}, r"layer_energy.sampler: unknown 'dpm' \(known: \['euler', 'heun'"),
        ({"loss_weight": -0.5}, r"layer_energy.loss_weight must be >= 0, got -0.5"),
    ):
        with pytest.raises(ValueError, match=match):
            LayerEnergyConfig(**kwargs)
    assert LayerEnergyConfig(loss_weight=0).loss_weight == 0
    cfg = ShowerModelConfig(backbone="debug", layer_energy=LayerEnergyConfig(width=16, sampler="rk4"))
    data = to_dict(cfg)
    assert data["layer_energy"]["width"] == 16 and data["layer_energy"]["sampler"] == "rk4"
    assert from_dict(ShowerModelConfig, data) == cfg
    assert from_dict(ShowerModelConfig, {}).layer_energy == LayerEnergyConfig(), "on by default"
    with pytest.raises(ConfigError, match=r"model.yaml: layer_energy: layer_energy.width must be an int"):
        from_dict(ShowerModelConfig, {"layer_energy": {"width": 0}}, "model.yaml")
    with pytest.raises(ConfigError, match=r"model.yaml: layer_energy.widht: unknown key"):
        from_dict(ShowerModelConfig, {"layer_energy": {"widht": 8}}, "model.yaml")


# ---- LayerEnergyTransform -----------------------------------------------------------------------------


def test_transform_round_trip_and_formula() -> None:
    mean, std = [0.1, 0.4, 0.2, 0.05], [0.05, 0.2, 0.1, 0.02]
    transform = LayerEnergyTransform(4, mean, std)
    assert bool(transform.fitted)
    energy = torch.tensor([1e3, 5e4, 2e5])
    layers = torch.tensor([[100.0, 400.0, 0.0, 30.0], [0.0, 0.0, 0.0, 0.0], [3e4, 9e4, 5e4, 1.0]])
    y = transform(layers, energy)
    u = layers.double() / energy.double()[:, None]
    expected = (u - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    # Non-negative layer energies come back to float precision (the total is kept, nothing is negative).
    torch.testing.assert_close(transform.inverse(y, energy), layers, rtol=1e-5, atol=1e-3)
    # σ of a layer (almost) never hit is floored at 1e-3 × the largest σ, so y stays finite.
    floored = LayerEnergyTransform(3, [0.1, 0.2, 0.0], [0.5, 0.1, 0.0])
    torch.testing.assert_close(floored.std_Z, torch.tensor([0.5, 0.1, 5e-4]))
    unfitted = LayerEnergyTransform(3)
    assert not bool(unfitted.fitted)
    assert torch.equal(unfitted.mean_Z, torch.zeros(3)) and torch.equal(unfitted.std_Z, torch.ones(3))
    with pytest.raises(ValueError, match=r"LayerEnergyTransform.forward: expected \(B, n_z=4\), got shape"):
        transform(torch.zeros(3, 5), energy)
    with pytest.raises(ValueError, match=r"LayerEnergyTransform.inverse: energy_mev_B must be \(3,\)"):
        transform.inverse(torch.zeros(3, 4), energy[:2])
    with pytest.raises(ValueError, match="mean/std must have n_z=4 entries"):
        LayerEnergyTransform(4, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="non-finite"):
        LayerEnergyTransform(2, [0.0, float("nan")], [1.0, 1.0])


def test_log_below_space_keeps_a_track_resolved_and_the_large_layers_linear() -> None:
    from caloforge.platform.energy import LOG_BELOW_DELTA, LOG_BELOW_KAPPA

    mean, std = [0.001, 0.05, 0.02], [0.002, 0.03, 0.02]
    log_below = LayerEnergyTransform(3, mean, std, space="log_below")
    linear = LayerEnergyTransform(3, mean, std)
    energy = torch.tensor([1e5, 1e5, 2e3])
    # a 5 MeV track at 100 GeV, an empty layer, a large layer; the same at 2 GeV
    layers = torch.tensor([[5.0, 0.0, 3e4], [5.4, 2e4, 0.0], [5.0, 300.0, 20.0]])
    y = log_below(layers, energy)
    # g(u) by hand: u below κ in log scale, above as is; the scale floored at 0.01
    u = layers.double() / energy.double()[:, None]
    kappa = LOG_BELOW_KAPPA
    g = torch.where(u >= kappa, u, kappa * (1 + torch.log((u + LOG_BELOW_DELTA) / kappa)))
    s = torch.tensor(std, dtype=torch.float64).clamp_min(0.01)
    torch.testing.assert_close(
        y.double(), (g - torch.tensor(mean, dtype=torch.float64)) / s, rtol=1e-5, atol=1e-5
    )
    # every layer comes back, the empty one to 0 (no total is redistributed in this space)
    torch.testing.assert_close(log_below.inverse(y, energy), layers, rtol=1e-4, atol=1e-3)
    # the track: 8 % more energy moves y by ln(1.08) κ / s = 0.077 standard units, in linear space by 0.002
    more = layers.clone()
    more[0, 0] *= 1.08
    assert (log_below(more, energy) - y)[0, 0] > 0.07
    assert (linear(more, energy) - linear(layers, energy))[0, 0] < 0.003
    # continuous at κ, and the large layer is linear: equal steps in E_z, equal steps in y
    at = torch.tensor([[0.0, kappa * 1e5 * (1 - 1e-6), 0.0], [0.0, kappa * 1e5 * (1 + 1e-6), 0.0]])
    y_at = log_below(at, energy[:2])
    assert abs(float(y_at[0, 1] - y_at[1, 1])) < 1e-4
    big = torch.tensor([[0.0, 2e4, 0.0], [0.0, 3e4, 0.0], [0.0, 4e4, 0.0]])
    d = torch.diff(log_below(big, torch.full((3,), 1e5))[:, 1])
    torch.testing.assert_close(d[0], d[1])
    # a conditioned voxel model reads the empty layer and the track apart (clamp at -10, not -5)
    empty = torch.zeros(1, 3)
    gap = log_below.condition(layers[:1], energy[:1]).u_BZ - log_below.condition(empty, energy[:1]).u_BZ
    gap_linear = linear.condition(layers[:1], energy[:1]).u_BZ - linear.condition(empty, energy[:1]).u_BZ
    assert float(gap[0, 0]) > 1.0 and float(gap_linear[0, 0]) < 0.05
    with pytest.raises(ValueError, match=r"space must be one of \('linear', 'log_below'\), got 'log'"):
        LayerEnergyTransform(3, mean, std, space="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer_energy\.space must be one of"):
        LayerEnergyConfig(space="log")  # type: ignore[arg-type]


def test_inverse_drops_negative_layers_and_keeps_the_unclamped_total() -> None:
    transform = LayerEnergyTransform(3, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # y = u = E_z / E_inc
    energy = torch.tensor([1000.0, 1000.0, 2000.0, 500.0])
    y = torch.tensor(
        [
            [0.2, -0.05, 0.1],  # Σu = 0.25 kept: positive layers × 0.25 / 0.3, the negative one → 0
            [0.3, 0.1, 0.05],  # nothing negative: unchanged
            [-0.1, 0.05, -0.2],  # Σu < 0: the shower gets no energy at all
            [0.0, 0.0, 0.0],  # nothing anywhere: zeros (no division by zero)
        ]
    )
    out = transform.inverse(y, energy)
    expected = torch.tensor(
        [
            [0.2 * 0.25 / 0.3 * 1000, 0.0, 0.1 * 0.25 / 0.3 * 1000],
            [300.0, 100.0, 50.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=1), torch.tensor([250.0, 450.0, 0.0, 0.0]), rtol=1e-5, atol=1e-4)


# ---- rescale_layers -----------------------------------------------------------------------------------


def _shower(seed: int, shape: tuple[int, int, int] = (4, 3, 2)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 10.0 + 1.0  # every voxel hit, 1–11 MeV


def test_rescale_layers_hits_the_targets_and_conserves_the_total() -> None:
    full = _shower(0)
    hole = _shower(1)
    hole[2] = 0.0  # the voxel model left layer 2 empty
    empty = torch.zeros(4, 3, 2)
    showers = torch.stack([full, hole, empty])
    targets = torch.tensor([[10.0, 50.0, 30.0, 10.0], [10.0, 50.0, 30.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    out = rescale_layers(showers, targets, 0.0)
    sums = out.sum(dim=(2, 3))
    # Every layer with hits gets exactly its target; the voxel pattern inside a layer is kept.
    torch.testing.assert_close(sums[0], targets[0], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(
        out[0] / out[0].sum(dim=(1, 2), keepdim=True), full / full.sum(dim=(1, 2), keepdim=True)
    )
    # Layer 2 cannot take its 30 MeV: it stays empty and the others share it in proportion (Σ = 100).
    assert not out[1, 2].any()
    torch.testing.assert_close(
        sums[1], torch.tensor([10.0, 50.0, 0.0, 10.0]) * 100.0 / 70.0, rtol=1e-5, atol=0.0
    )
    torch.testing.assert_close(sums[1].sum(), targets[1].sum(), rtol=1e-6, atol=0.0)
    # A shower with no voxel at all stays empty, whatever the targets.
    assert not out[2].any()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_rescale_layers_keeps_the_total_when_every_hit_layer_gets_zero() -> None:
    shower = torch.zeros(1, 2, 2, 2)
    shower[0, 0] = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # hits only in layer 0
    out = rescale_layers(shower, torch.tensor([[0.0, 5.0]]), 0.0)
    # layer 1 cannot take its 5 MeV and layer 0 has a target of 0: the shower as a whole carries Σ = 5
    torch.testing.assert_close(out, shower * 5.0 / 4.0, rtol=1e-6, atol=0.0)


def test_rescale_layers_reapplies_the_threshold() -> None:
    shower = torch.zeros(1, 2, 2, 2)
    shower[0, 0] = torch.tensor([[1.0, 9.0], [0.0, 0.0]])  # layer 0: 10 MeV in two voxels
    shower[0, 1] = torch.tensor([[4.0, 4.0], [2.0, 0.0]])  # layer 1: 10 MeV in three voxels
    targets = torch.tensor([[1.0, 20.0]])  # layer 0 → 0.1 (0.9 MeV), layer 1 → 2 (8, 8, 4 MeV)
    out = rescale_layers(shower, targets, 0.5)
    expected = torch.zeros(1, 2, 2, 2)
    expected[0, 0] = torch.tensor([[0.0, 0.9], [0.0, 0.0]])  # 0.1 MeV < 0.5 MeV threshold → 0
    expected[0, 1] = torch.tensor([[8.0, 8.0], [4.0, 0.0]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # The loss to the threshold is the removed voxel only: Σ = 21 − 0.1.
    torch.testing.assert_close(out.sum(), torch.tensor(20.9), rtol=1e-6, atol=0.0)
    thresholded = rescale_layers(shower, targets, torch.tensor(0.5))
    torch.testing.assert_close(thresholded, out, rtol=0, atol=0)


def test_rescale_layers_keeps_a_hit_layer_whose_target_would_empty_it() -> None:
    shower = torch.zeros(1, 3, 2, 2)
    shower[0, 0] = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # layer 0: 4 MeV, hottest voxel 3 MeV
    shower[0, 1] = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # layer 1: 8 MeV, hottest voxel 2 MeV
    shower[0, 2] = torch.tensor([[5.0, 0.0], [0.0, 5.0]])  # layer 2: 10 MeV
    # layer 0: target 0 (the head's flow left it negative); layer 1: 1 MeV, i.e. 0.25 MeV per voxel, below
    # the 0.5 MeV threshold; layer 2: 20 MeV. Σ = 21 MeV.
    targets = torch.tensor([[0.0, 1.0, 20.0]])
    legacy = rescale_layers(shower, targets, 0.5, "either")
    assert not legacy[0, 0].any() and not legacy[0, 1].any()  # the head's energies empty layers 0 and 1
    # layer 2 keeps its 20 MeV; layer 1's 1 MeV (4 × 0.25) went to the threshold
    torch.testing.assert_close(legacy.sum(), torch.tensor(20.0), rtol=1e-6, atol=0)
    out = rescale_layers(shower, targets, 0.5, "voxel_model")
    # Layers 0 and 1 keep the voxel model's own energies (4 and 8 MeV), layer 2 takes its 20 MeV, and the
    # shower is scaled to the head's total: 21 / 32 of each.
    expected = torch.cat([shower[:, :2], shower[:, 2:] * 2.0], dim=1) * (21.0 / 32.0)
    torch.testing.assert_close(out, torch.where(expected < 0.5, 0.0, expected), rtol=1e-6, atol=1e-6)
    assert out[0, 0].any() and out[0, 1].any()
    torch.testing.assert_close(out.sum(), torch.tensor(21.0), rtol=1e-6, atol=0)  # nothing fell below 0.5 MeV
    # An empty layer's energy is spread over the others: Σ = 21 MeV on the 12 MeV of layers 0 and 1.
    hole = shower.clone()
    hole[0, 2] = 0.0
    spread = rescale_layers(hole, targets, 0.5, "voxel_model")
    torch.testing.assert_close(spread, hole * 21.0 / 12.0, rtol=1e-6, atol=1e-6)
    # A target just large enough for the hottest voxel to reach the threshold is applied as it is.
    exact = rescale_layers(shower, torch.tensor([[4.0 * 0.5 / 3.0, 8.0, 10.0]]), 0.5, "voxel_model")
    torch.testing.assert_close(exact.sum(dim=(2, 3)), torch.tensor([[0.5, 8.0, 10.0]]), rtol=1e-5, atol=1e-6)


def test_rescale_layers_hadron_tracks_fills_a_charged_hadron_s_layer_the_voxel_model_left_empty() -> None:
    # The voxel model's ln(E + ε) scores: layer 1 has no voxel above the threshold (a layer crossed by a
    # pion's track, which the sampler smeared out), its hottest score at (1, 0); layer 2 too, with two tied
    # hottest voxels. Shower 0 is a charged hadron, shower 1 (the same voxels) is not.
    score = torch.full((2, 4, 2, 2), -13.8)
    score[:, 1] = torch.tensor([[-5.0, -6.0], [-3.0, -9.0]])
    score[:, 2] = torch.tensor([[-4.0, -4.0], [-7.0, -8.0]])
    shower = torch.zeros(2, 4, 2, 2)  # in MeV after the threshold: only layers 0 and 3 hit
    shower[:, 0] = torch.tensor([[2.0, 6.0], [0.0, 0.0]])  # 8 MeV
    shower[:, 3] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # 4 MeV
    targets = torch.tensor([[16.0, 3.0, 2.0, 0.25]]).repeat(
        2, 1
    )  # layer 3's 0.25 MeV: too little for a voxel
    track = torch.tensor([True, False])
    out = rescale_layers(shower, targets, 0.5, "hadron_tracks", score, track)
    expected = torch.zeros(4, 2, 2)
    expected[0] = torch.tensor([[4.0, 12.0], [0.0, 0.0]])  # scaled to its target
    expected[1, 1, 0] = 3.0  # the head's 3 MeV in the hottest voxel
    expected[2, 0] = torch.tensor([1.0, 1.0])  # 2 MeV split between the tied voxels
    expected[3] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # a hit layer keeps its own 4 MeV (voxel_model)
    expected = expected * targets[0].sum() / expected.sum()  # the whole shower carries the head's total
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)
    # The other shower is generated as with voxel_model: layers 1 and 2 stay empty, their energy is spread.
    before = rescale_layers(shower, targets, 0.5, "voxel_model")
    torch.testing.assert_close(out[1], before[1], rtol=0, atol=0)
    assert not before[0, 1].any() and not before[0, 2].any()
    torch.testing.assert_close(before[0].sum(), out[0].sum(), rtol=1e-6, atol=0)
    # A layer that both stages leave empty (target below the threshold) stays empty.
    low = rescale_layers(
        shower, torch.tensor([[16.0, 0.4, 0.0, 4.0]]).repeat(2, 1), 0.5, "hadron_tracks", score, track
    )
    assert not low[0, 1].any() and not low[0, 2].any()
    with pytest.raises(ValueError, match="needs voxel_score_BZPR"):
        rescale_layers(shower, targets, 0.5, "hadron_tracks", score)


def test_rescale_layers_axis_tracks_puts_the_track_in_the_innermost_radial_bin() -> None:
    # One charged hadron, mesh (Z=3, P=4, R=3). Layer 1 was left empty by the voxel model; its scores sit
    # near ln ε everywhere (a smeared track), the largest of them in the outer radial bin (phi 3, r 2),
    # the largest of the innermost radial bin at phi 2. hadron_tracks fills (3, 2); axis_tracks (2, 0).
    score = torch.full((1, 3, 4, 3), -13.8)
    score[0, 1, 3, 2] = -13.2
    score[0, 1, 2, 0] = -13.5
    score[0, 1, 0, 1] = -13.4
    shower = torch.zeros(1, 3, 4, 3)
    shower[0, 0, 0, 0] = 5.0
    shower[0, 2] = 1.0  # 12 MeV spread over the layer
    targets = torch.tensor([[5.0, 4.0, 12.0]])
    track = torch.tensor([True])
    anywhere = rescale_layers(shower, targets, 0.5, "hadron_tracks", score, track)
    on_axis = rescale_layers(shower, targets, 0.5, "axis_tracks", score, track)
    assert anywhere[0, 1].nonzero().tolist() == [[3, 2]] and on_axis[0, 1].nonzero().tolist() == [[2, 0]]
    torch.testing.assert_close(on_axis[0, 1, 2, 0], torch.tensor(4.0))
    # the other layers are the same in both modes; the shower keeps the head's total
    torch.testing.assert_close(on_axis[0, [0, 2]], anywhere[0, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(on_axis.sum(), targets.sum())
    # ties within the innermost bin split the energy evenly between them, nothing outside it
    tied = score.clone()
    tied[0, 1, :, 0] = -13.7
    split = rescale_layers(shower, targets, 0.5, "axis_tracks", tied, track)
    torch.testing.assert_close(split[0, 1, :, 0], torch.full((4,), 1.0))
    assert not split[0, 1, :, 1:].any()
    # a layer the voxel model hit is the voxel model's, also off the axis; a shower that is not a charged
    # hadron keeps its empty layer
    hit = shower.clone()
    hit[0, 1, 1, 2] = 2.0
    torch.testing.assert_close(
        rescale_layers(hit, targets, 0.5, "axis_tracks", score, track),
        rescale_layers(hit, targets, 0.5, "voxel_model"),
    )
    neutral = rescale_layers(shower, targets, 0.5, "axis_tracks", score, torch.tensor([False]))
    assert not neutral[0, 1].any()
    with pytest.raises(ValueError, match=r"axis_tracks.*needs voxel_score_BZPR"):
        rescale_layers(shower, targets, 0.5, "axis_tracks", score)


def test_charged_hadrons_are_the_track_particles() -> None:
    names = list(PARTICLES)
    idx = torch.tensor(
        [names.index(n) for n in ("pi+", "pi-", "e-", "gamma", "p", "n", "K0L", "K-")] + [len(names)]
    )
    assert charged_hadron_mask(idx).tolist() == [True, True, False, False, True, False, False, True, False]


def test_a_model_s_empty_layer_mode_can_be_changed_and_generates_accordingly() -> None:
    model = make_model(layer_energy=SMALL_HEAD)
    assert model.config.layer_energy.empty_layers == "axis_tracks"  # the default since schema 9
    model.set_sampling_defaults(empty_layers="voxel_model")
    assert model.config.layer_energy.empty_layers == "voxel_model"
    with pytest.raises(ValueError, match="empty_layers must be one of"):
        model.set_sampling_defaults(empty_layers="head")  # type: ignore[arg-type]
    assert model.config.layer_energy.empty_layers == "voxel_model"  # unchanged by the refused call
    cond = Conditions(
        np.array([5e3, 5e4]),
        np.array([1.2, 1.6]),
        np.array([0.0, 0.3]),
        np.array([11, 211]),
        np.array([DETECTORS[0], DETECTORS[0]]),
    )
    seeds = np.array([3, 4])
    with torch.inference_mode():
        noise, layer_noise = seeded_noise(seeds, model.mesh_shape, layer_energy=True)
        enc = model.encode_conditions(cond)
        layers = model.sample_layer_energies(layer_noise, enc)
        x = model.sample(noise, model.with_layers(enc, layers), num_steps=2)
        raw = model.transform.inverse(x)
        score = model.transform.log_energy(x)
    track = torch.tensor([False, True])  # e- and pi+
    for mode in ("voxel_model", "hadron_tracks", "axis_tracks"):
        model.set_sampling_defaults(empty_layers=mode)
        extra = (score, track) if mode != "voxel_model" else ()
        expected = rescale_layers(raw, layers, model.transform.threshold_mev, mode, *extra)
        np.testing.assert_allclose(
            model.generate(cond, num_steps=2, seeds=seeds), expected.numpy(), rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="needs cond"):
        model.to_mev(x, layers)


def test_rescale_layers_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="empty_layers must be one of"):
        rescale_layers(torch.ones(1, 2, 2, 2), torch.ones(1, 2), 0.0, "head")
    with pytest.raises(ValueError, match=r"layer_energy\.empty_layers must be one of"):
        LayerEnergyConfig(empty_layers="head")  # type: ignore[arg-type]


# ---- energy_flow_loss and gradients -------------------------------------------------------------------


def _tiny_head(n_z: int = 5, context: int = 8) -> LayerEnergyFlow:
    head = LayerEnergyFlow(n_z, context, width=16, depth=2, seed=4)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained-looking head (the FiLM and output layers start at zero)
        for layer in [b.modulation for b in head.blocks] + [head.fc_out]:
            layer.weight.normal_(0.0, 0.1, generator=gen)
            layer.bias.normal_(0.0, 0.1, generator=gen)
    return head


def test_energy_flow_loss_is_the_cfm_loss_averaged_over_draws() -> None:
    head = _tiny_head()
    data = torch.Generator().manual_seed(0)
    y1 = torch.randn(4, 5, generator=data)
    context = torch.randn(4, 8, generator=data)
    loss = energy_flow_loss(head, y1, context, torch.Generator().manual_seed(3), draws=6)
    assert loss.shape == (4,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    again = energy_flow_loss(head, y1, context, torch.Generator().manual_seed(3), draws=6)
    torch.testing.assert_close(loss, again, rtol=0, atol=0)
    other = energy_flow_loss(head, y1, context, torch.Generator().manual_seed(4), draws=6)
    assert not torch.allclose(loss, other)
    # By hand: y₀ for all (shower, draw) rows, then t; row r belongs to shower r // draws.
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(24, 5, generator=gen)
    t = torch.rand(24, generator=gen)
    manual = torch.zeros(4)
    with torch.no_grad():
        for r in range(24):
            b = r // 6
            y_t = (1 - t[r]) * y0[r] + t[r] * y1[b]
            v = head(y_t[None], t[r : r + 1], context[b : b + 1])[0]
            manual[b] += ((v - (y1[b] - y0[r])) ** 2).mean() / 6
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-5, atol=1e-6)
    # A fresh head (v = 0) has loss E|y₁ − y₀|² per draw: the mean of ‖y₁ − y₀‖²/Z over the draws.
    fresh = LayerEnergyFlow(5, 8, width=16, depth=2)
    zero_v = energy_flow_loss(fresh, y1, context, torch.Generator().manual_seed(3), draws=6)
    expected = ((y1.repeat_interleave(6, dim=0) - y0) ** 2).mean(dim=1).view(4, 6).mean(dim=1)
    torch.testing.assert_close(zero_v.detach(), expected, rtol=1e-6, atol=1e-7)


def test_head_loss_gradients_reach_the_shared_context_and_the_head() -> None:
    model = make_model("flow_matching", layer_energy=SMALL_HEAD)
    assert model.energy_head is not None
    showers, cond = toy_showers(6, SMALL_MESH, seed=9)
    cond = cond.subset(slice(0, 6))
    ct = model.encode_conditions(cond)
    model.zero_grad(set_to_none=True)
    loss = model.energy_loss(torch.from_numpy(showers), ct, torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    net = model.network
    # The shared condition context: detector, particle and kinematics embeddings.
    det_grad = net.detector_embed.weight.grad
    assert det_grad is not None
    used = sorted({DETECTORS.index(d) for d in cond.detector.tolist()})
    assert all(det_grad[i].abs().sum() > 0 for i in used)
    assert not det_grad[len(DETECTORS) :].any(), "spare detector slots are not in the batch"
    assert net.particle_embed.weight.grad is not None and net.particle_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.kin_embedder.parameters())
    # Every parameter of the head; nothing of the noise-level embedding or the DiT blocks.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.energy_head.parameters())
    assert all(p.grad is None for p in net.t_embedder.parameters())
    assert all(p.grad is None for p in net.blocks.parameters())


def test_head_loss_under_bf16_autocast_and_with_bf16_weights() -> None:
    model = make_model("flow_matching", layer_energy=SMALL_HEAD)
    assert model.energy_head is not None
    showers, cond = toy_showers(5, SMALL_MESH, seed=6)
    x, ct = torch.from_numpy(showers), model.encode_conditions(cond)
    reference = model.energy_loss(x, ct, torch.Generator().manual_seed(0)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model.energy_loss(x, ct, torch.Generator().manual_seed(0))
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast.detach(), reference, rtol=2e-2, atol=1e-3)
    model.network.bfloat16()  # what a bf16 DeepSpeed engine does to the weights; the MeV inputs stay fp32
    model.energy_head.bfloat16()
    cast = model.energy_loss(x, ct, torch.Generator().manual_seed(0))
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast.detach(), reference, rtol=2e-2, atol=1e-3)
    cast.mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.energy_head.parameters())


# ---- generation ---------------------------------------------------------------------------------------


def test_initial_layer_noise_continues_the_voxel_noise_generator() -> None:
    model = make_model("edm", scramble=False, layer_energy=SMALL_HEAD)
    seeds = np.array([5, 9, 5], dtype=np.int64)
    noise = model.initial_layer_noise(seeds)
    assert noise.shape == (3, N_Z) and noise.dtype == torch.float32
    for i, s in enumerate(seeds.tolist()):
        gen = torch.Generator().manual_seed(s)
        voxel = torch.randn(SMALL_MESH, generator=gen)
        torch.testing.assert_close(model.initial_noise(seeds[i : i + 1])[0], voxel, rtol=0, atol=0)
        torch.testing.assert_close(noise[i], torch.randn((N_Z,), generator=gen), rtol=0, atol=0)
    # Row i depends on seeds[i] only (not on the batch or its position in it).
    torch.testing.assert_close(model.initial_layer_noise(np.array([9]))[0], noise[1], rtol=0, atol=0)
    torch.testing.assert_close(noise[0], noise[2], rtol=0, atol=0)
    torch.testing.assert_close(model.initial_layer_noise(torch.tensor([9, 5]))[1], noise[0], rtol=0, atol=0)
    assert not torch.allclose(noise[0], noise[1])
    assert model.initial_layer_noise(np.zeros(0, dtype=np.int64)).shape == (0, N_Z)
    with pytest.raises(ValueError, match="seeds must be a 1-D integer array"):
        model.initial_layer_noise(np.array([1.0, 2.0]))


def test_sample_layer_energies_runs_the_head_ode() -> None:
    model = make_model("flow_matching", layer_energy=SMALL_HEAD)
    assert model.energy_head is not None
    _, cond = toy_showers(3, SMALL_MESH, seed=4)
    ct = model.encode_conditions(cond)
    noise = model.initial_layer_noise(np.array([1, 2, 3]))
    calls = []
    handle = model.energy_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            layers = model.sample_layer_energies(noise, ct)
            assert len(calls) == SAMPLERS["midpoint"].nfe(4)  # the config's sampler × num_steps
            calls.clear()
            assert model.sample_layer_energies(noise, ct, num_steps=1).shape == (3, N_Z)
            assert len(calls) == SAMPLERS["midpoint"].nfe(1)
    finally:
        handle.remove()
    assert layers.shape == (3, N_Z) and layers.dtype == torch.float32
    assert torch.isfinite(layers).all() and (layers >= 0).all() and (layers.sum(dim=1) > 0).all()
    with pytest.raises(
        ValueError, match=r"sample_layer_energies noise_BZ: expected \(3, 12\), got \(2, 12\)"
    ):
        model.sample_layer_energies(noise[:2], ct)
    with pytest.raises(ValueError, match="layer-energy num_steps must be an int >= 1"):
        model.sample_layer_energies(noise, ct, num_steps=0)
    with pytest.raises(ValueError, match=r"to_mev layer_mev_BZ: expected \(3, 12\), got \(3, 11\)"):
        model.to_mev(torch.zeros(3, *SMALL_MESH), layers[:, :11])


def test_generate_with_the_head_depends_only_on_the_seed() -> None:
    model = make_model("edm", num_steps=3, sampler="euler", layer_energy=SMALL_HEAD)
    _, cond = toy_showers(6, SMALL_MESH, seed=5)
    seeds = np.arange(200, 206, dtype=np.int64)
    full = model.generate(cond, seeds=seeds, batch_size=6)
    assert np.isfinite(full).all() and (full >= 0).all() and (full > 0).any()
    np.testing.assert_array_equal(model.generate(cond, seeds=seeds, batch_size=6), full)
    split = model.generate(cond, seeds=seeds, batch_size=4)
    order = np.array([5, 2, 0, 4, 1, 3])
    shuffled = model.generate(cond.subset(order), seeds=seeds[order])
    alone = model.generate(cond.subset(slice(3, 4)), seeds=seeds[3:4])
    for other in (split, shuffled[np.argsort(order)]):
        _assert_same_showers(model, full, other)
    _assert_same_showers(model, full[3:4], alone)
    assert not np.allclose(model.generate(cond, seeds=seeds + 1), full)


def _generate_in_stages(empty_layers: str, seeds: np.ndarray):
    """A model's showers and the stages they are made of: voxel model alone, head's layer energies."""
    head = dataclasses.replace(SMALL_HEAD, empty_layers=empty_layers)
    model = make_model("edm", num_steps=3, sampler="euler", layer_energy=head)
    _, toy = toy_showers(8, SMALL_MESH, seed=6)
    # Incident energies down to 5 MeV, so that some rescaled voxels fall below the 15 keV threshold.
    cond = Conditions.make(np.geomspace(5.0, 1e4, 8), toy.theta_rad, toy.phi_rad, toy.pdg, toy.detector)
    out = model.generate(cond, seeds=seeds)
    with torch.inference_mode():
        ct = model.encode_conditions(cond)
        x = model.sample(model.initial_noise(seeds), ct)
        layers = model.sample_layer_energies(model.initial_layer_noise(seeds), ct)
        unscaled = model.to_mev(x)
    return model, out, unscaled, layers


def test_generated_total_is_the_heads_total_up_to_the_threshold() -> None:
    seeds = np.arange(8, dtype=np.int64) + 40
    model, out, unscaled, layers = _generate_in_stages("either", seeds)
    threshold = model.config.threshold_mev
    before_cut = rescale_layers(unscaled, layers, 0.0, "either")
    np.testing.assert_array_equal(out, torch.where(before_cut < threshold, 0.0, before_cut).numpy())
    target = layers.sum(dim=1).double().numpy()
    total = out.astype(np.float64).sum(axis=(1, 2, 3))
    assert (unscaled.sum(dim=(2, 3)) > 0).all(), "every layer of the voxel model's showers has hits"
    assert (target > 1.0).all(), "a meaningful check needs non-empty targets"
    # Scaling conserves Σ_z E_z (float32 rounding over ≤ 576 voxels: < 1e-5 relative); with every layer hit
    # each layer gets exactly its sampled energy.
    np.testing.assert_allclose(before_cut.sum(dim=(2, 3)).numpy(), layers.numpy(), rtol=1e-5, atol=0)
    # The threshold then removes the voxels the scaling pushed below it, each < threshold, so
    # 0 ≤ target − total < n_cut · threshold (+ the 1e-5 rounding above).
    n_cut = ((before_cut > 0).sum(dim=(1, 2, 3)) - (torch.from_numpy(out) > 0).sum(dim=(1, 2, 3))).numpy()
    assert (n_cut >= 0).all() and (n_cut > 0).sum() >= 3, "some showers must lose voxels to the threshold"
    deficit = target - total
    assert (deficit >= -1e-5 * target).all()
    assert (deficit <= n_cut * threshold + 1e-5 * target).all()
    assert (deficit[n_cut > 0] > 0).all()
    np.testing.assert_allclose(total[n_cut == 0], target[n_cut == 0], rtol=1e-5, atol=0)


def test_generated_showers_keep_every_layer_the_voxel_model_hit() -> None:
    seeds = np.arange(8, dtype=np.int64) + 40
    model, out, unscaled, layers = _generate_in_stages("voxel_model", seeds)
    threshold = model.config.threshold_mev
    np.testing.assert_array_equal(out, rescale_layers(unscaled, layers, threshold, "voxel_model").numpy())
    hit = unscaled.sum(dim=(2, 3)).numpy() > 0
    assert hit.all(), "every layer of the voxel model's showers has hits"
    # The head's energies alone empty layers the voxel model hit; letting the voxel model decide keeps more
    # of them (this toy's voxel model is untrained, so the kept layers carry much of the energy and the
    # scaling to the head's total still pushes some below the threshold: docstring of rescale_layers).
    _, legacy, _, _ = _generate_in_stages("either", seeds)
    n_empty, n_empty_legacy = (out.sum(axis=(2, 3)) == 0).sum(), (legacy.sum(axis=(2, 3)) == 0).sum()
    assert n_empty_legacy >= 3 and n_empty < n_empty_legacy
    # The totals are the head's, up to the voxels the scaling pushed below the threshold (each < threshold).
    target = layers.sum(dim=1).double().numpy()
    total = out.astype(np.float64).sum(axis=(1, 2, 3))
    n_lost = (unscaled > 0).sum(dim=(1, 2, 3)).numpy() - (out > 0).sum(axis=(1, 2, 3))
    assert (total <= target * (1 + 1e-5)).all()
    assert (target - total <= n_lost * threshold + 1e-5 * target).all()
    np.testing.assert_allclose(total[target > 1e3], target[target > 1e3], rtol=1e-4)


def test_unfitted_head_transform_is_refused() -> None:
    model = make_model("flow_matching", scramble=False, layer_energy=SMALL_HEAD)
    _, cond = toy_showers(2, SMALL_MESH, seed=1)
    assert model.energy_transform is not None
    model.energy_transform.fitted.fill_(False)
    with pytest.raises(ValueError, match="transform is not fitted"):
        model.generate(cond, num_steps=1)


# ---- stats --------------------------------------------------------------------------------------------


def test_stats_without_layer_energy_keys_name_the_key_and_the_fix() -> None:
    showers, cond = toy_showers(8, SMALL_MESH, seed=2)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    vocab = ConditionVocab.create(DETECTORS)
    cfg = ShowerModelConfig(backbone="debug", layer_energy=SMALL_HEAD)
    old = {k: v for k, v in stats.items() if not k.startswith("layer_energy_over_einc")}
    with pytest.raises(
        ValueError, match=r"no \['layer_energy_over_einc_mean', 'layer_energy_over_einc_std'\]"
    ) as e:
        ShowerModel.build(cfg, vocab, old, SMALL_MESH)
    assert "re-shard the data" in str(e.value) and "model.layer_energy.enabled=false" in str(e.value)
    no_std = {k: v for k, v in stats.items() if k != "layer_energy_over_einc_std"}
    with pytest.raises(ValueError, match=r"no \['layer_energy_over_einc_std'\]"):
        ShowerModel.build(cfg, vocab, no_std, SMALL_MESH)
    short = {**stats, "layer_energy_over_einc_mean": stats["layer_energy_over_einc_mean"][:11]}
    with pytest.raises(ValueError, match=r"stats\['layer_energy_over_einc_mean'\] must be a list of n_z=12"):
        ShowerModel.build(cfg, vocab, short, SMALL_MESH)
    # The fix the message names works: without the head, the old stats block is enough.
    without = ShowerModelConfig(backbone="debug", layer_energy=LayerEnergyConfig(enabled=False))
    assert not ShowerModel.build(without, vocab, old, SMALL_MESH).has_energy_head
    # And the head's transform is fitted from the stats block's E_z / E_inc mean and std.
    model = ShowerModel.build(cfg, vocab, stats, SMALL_MESH)
    assert model.energy_transform is not None and bool(model.energy_transform.fitted)
    torch.testing.assert_close(
        model.energy_transform.mean_Z, torch.tensor(stats["layer_energy_over_einc_mean"])
    )


# ---- bundles ------------------------------------------------------------------------------------------


def test_a_v1_bundle_loads_without_the_head(tmp_path: Path) -> None:
    showers, cond = toy_showers(48, SMALL_MESH, seed=11)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    # A v1-era model: no head, and stats without layer_log_max (so no data-range clamp: MAX_LOG).
    v1_stats = {k: v for k, v in stats.items() if k != "layer_log_max"}
    cfg = ShowerModelConfig(
        backbone="debug",
        num_steps=3,
        sampler="euler",
        layer_energy=LayerEnergyConfig(enabled=False),
        pos_max_freq=32.0,  # what bundles before schema 4 were trained with
        pos_max_freq_r=32.0,  # and before schema 5 the radius followed it
    )
    model = scramble_zero_init(
        ShowerModel.build(cfg, ConditionVocab.create(DETECTORS, 2), v1_stats, SMALL_MESH)
    )
    assert torch.equal(model.transform.log_max_Z, torch.full((N_Z,), MAX_LOG))
    path = model.save(tmp_path / "bundle")
    gen_cond = cond.subset(slice(0, 4))
    expected = model.generate(gen_cond, seed=3)

    # Rewrite it as a schema_version 1 bundle: no layer_energy key, no transform.log_max_Z tensor.
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["transform.log_max_Z"]
    save_file(tensors, str(weights), metadata={"format": "pt", "bundle_format": "caloforge.shower_model"})
    data = json.loads((path / "config.json").read_text())
    del data["model_config"]["layer_energy"]
    data["schema_version"] = 1
    data["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    data["weights"]["n_tensors"] = len(tensors)
    (path / "config.json").write_text(json.dumps(data))

    loaded = ShowerModel.load(path)
    assert not loaded.has_energy_head and loaded.config.layer_energy.enabled is False
    assert torch.equal(loaded.transform.log_max_Z, torch.full((N_Z,), MAX_LOG))
    np.testing.assert_array_equal(loaded.generate(gen_cond, seed=3), expected)

    # A current (v2) bundle must have the clamp buffer: the v1 default is not applied there.
    data["schema_version"] = 2
    data["model_config"]["layer_energy"] = {"enabled": False}
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"transform\.log_max_Z"):
        ShowerModel.load(path)


def test_a_bundle_with_the_head_round_trips(tmp_path: Path) -> None:
    model = make_model("edm", num_steps=2, sampler="euler", layer_energy=SMALL_HEAD)
    path = model.save(tmp_path / "bundle")
    assert json.loads((path / "config.json").read_text())["model_config"]["layer_energy"]["width"] == 32
    loaded = ShowerModel.load(path)
    assert loaded.has_energy_head and loaded.config.layer_energy == SMALL_HEAD
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _, cond = toy_showers(3, SMALL_MESH, seed=8)
    np.testing.assert_array_equal(loaded.generate(cond, seed=1), model.generate(cond, seed=1))


# ---- DDP ----------------------------------------------------------------------------------------------


def test_shower_loss_with_the_head_through_ddp() -> None:
    """DDP's default mode (find_unused_parameters=False): the head's gradients are reduced like every other
    parameter's although its loss runs on the unwrapped model. (The other mode would miss the head in its
    graph search; the pretraining config refuses it with the head, tests/pretrain/test_pretrain_config.py.)"""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model("flow_matching", layer_energy=SMALL_HEAD)
    showers, cond = toy_showers(5, SMALL_MESH, seed=6)
    batch = ShowerBatch.from_numpy(showers, cond)
    loss_fn = shower_loss_fn(model)
    plain = loss_fn(model, batch, torch.Generator().manual_seed(0), LossContext())
    plain.mean().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert any(n.startswith("energy_head.") for n in plain_grads)
    model.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        loss = loss_fn(wrapped, batch, torch.Generator().manual_seed(0), LossContext())
        loss.mean().backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-6, atol=1e-8, msg=name)
