"""Toy showers and tiny models shared by tests/platform and tests/contracts (imported by their conftests)."""

from __future__ import annotations

import numpy as np
import torch

from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig

SMALL_MESH = (12, 8, 6)
DETECTORS = ("det_a", "det_b")


def toy_showers(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, Conditions]:
    """Shower-like toy data in MeV: gamma-shaped longitudinal profile whose depth grows with ln E, an
    exponential radial profile, log-normal voxel fluctuations, sparse hits and the 15.15 keV cut."""
    rng = np.random.default_rng(seed)
    n_z, n_phi, n_r = shape
    energy = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    theta = rng.uniform(1.2, 1.9, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    pdg = rng.choice([11, 22, 211], n)
    det = rng.choice(DETECTORS, n)
    z = (np.arange(n_z) + 0.5) / n_z
    r = (np.arange(n_r) + 0.5) / n_r
    depth = 0.15 + 0.05 * np.log(energy / 1e3)
    long_NZ = z[None, :] ** 2 * np.exp(-z[None, :] / depth[:, None] * 2)
    long_NZ /= long_NZ.sum(axis=1, keepdims=True)
    rad_R = np.exp(-r / 0.25)
    rad_R /= rad_R.sum() * n_phi
    mean_NZPR = energy[:, None, None, None] * long_NZ[:, :, None, None] * rad_R[None, None, None, :]
    x = mean_NZPR * rng.lognormal(0.0, 0.5, (n, *shape)) * (rng.random((n, *shape)) < 0.6)
    x[x < 0.5e-3 / 0.033] = 0.0
    cond = Conditions.make(energy, theta, phi, pdg, det)
    return x.astype(np.float32), cond


def scramble_zero_init(model: ShowerModel, seed: int = 1, std: float = 0.05) -> ShowerModel:
    """Give the zero-initialised adaLN/output layers small random weights so a fresh model has non-trivial
    outputs (a stand-in for training in tests that check plumbing, not quality)."""
    gen = torch.Generator().manual_seed(seed)
    net = model.network
    with torch.no_grad():
        layers = [b.adaLN_modulation for b in net.blocks]
        layers += [net.final_layer.adaLN_modulation, net.final_layer.linear]
        if model.energy_head is not None:
            layers += [b.modulation for b in model.energy_head.blocks] + [model.energy_head.fc_out]
        for layer in layers:
            layer.weight.normal_(0.0, std, generator=gen)
            layer.bias.normal_(0.0, std, generator=gen)
    return model


def make_model(
    objective: str = "flow_matching",
    shape: tuple[int, int, int] = SMALL_MESH,
    transform: str = "log_standardize",
    scramble: bool = True,
    **config_kwargs,
) -> ShowerModel:
    showers, cond = toy_showers(48, shape, seed=11)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    cfg = ShowerModelConfig(backbone="debug", parametrisation=objective, transform=transform, **config_kwargs)
    model = ShowerModel.build(cfg, ConditionVocab.create(DETECTORS, spare_slots=2), stats, shape)
    return scramble_zero_init(model) if scramble else model
