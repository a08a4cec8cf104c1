"""Minibatch OT coupling: optimal, within condition groups only, and measurably shorter pairs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.conditioning import Conditions, ConditionTensors
from caloforge.platform.objectives import (
    FlowMatchingConfig,
    ObjectiveConfig,
    condition_groups,
    make_objective,
    mean_pair_distance,
    ot_couple,
    ot_permutation,
)


def tensors(energy: list[float], particle: list[int], detector: list[int], theta: list[float] | None = None):
    n = len(energy)
    return ConditionTensors(
        torch.tensor(energy, dtype=torch.float32),
        torch.tensor(theta if theta is not None else [1.5] * n, dtype=torch.float32),
        torch.zeros(n),
        torch.tensor(particle),
        torch.tensor(detector),
    )


def test_ot_permutation_is_the_exact_optimum() -> None:
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    perm = ot_permutation(x0, x1)
    assert sorted(perm.tolist()) == list(range(6))

    def cost(p) -> float:
        return float(((x0[list(p)] - x1) ** 2).sum())

    best = min(cost(p) for p in itertools.permutations(range(6)))
    assert cost(perm) == pytest.approx(best, rel=1e-9)


def test_condition_groups_follow_detector_particle_and_energy_bin() -> None:
    # 4 bins per decade: 1000 and 1500 MeV share bin ⌊4·log10 E⌋ = 12; 1800 MeV is in bin 13.
    cond = tensors([1000, 1500, 1800, 1000, 1000], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1])
    g = condition_groups(cond, bins_per_decade=4).tolist()
    assert g[0] == g[1]
    assert len({g[0], g[2], g[3], g[4]}) == 4
    assert condition_groups(cond, bins_per_decade=1).tolist()[:3] == [g[0]] * 3
    with_theta = tensors([1000, 1000], [0, 0], [0, 0], theta=[0.3, 2.8])
    assert len(set(condition_groups(with_theta, 4).tolist())) == 1
    assert len(set(condition_groups(with_theta, 4, theta_bins=2).tolist())) == 2
    with pytest.raises(ValueError, match="energy_mev must be > 0"):
        condition_groups(tensors([0.0], [0], [0]))


def test_ot_shortens_pairs_and_never_mixes_groups() -> None:
    model = make_model("flow_matching", scramble=False)
    showers, _ = toy_showers(64, SMALL_MESH, seed=8)
    x1 = model.to_model_space(showers)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    # Two groups of 32: noise may only move within its group.
    group = torch.tensor([0] * 32 + [1] * 32)
    coupled = ot_couple(x0, x1, group)
    for rows in (slice(0, 32), slice(32, 64)):
        original = {tuple(r.tolist()[:5]) for r in x0[rows].reshape(32, -1)}
        assert {tuple(r.tolist()[:5]) for r in coupled[rows].reshape(32, -1)} == original
    random_pairs = mean_pair_distance(x0, x1)
    ot_pairs = mean_pair_distance(coupled, x1)
    assert ot_pairs < 0.97 * random_pairs, (ot_pairs, random_pairs)
    # Singleton groups are left alone.
    torch.testing.assert_close(ot_couple(x0, x1, torch.arange(64)), x0, rtol=0, atol=0)


def test_flow_matching_with_ot_coupling_is_deterministic_and_uses_the_pairing() -> None:
    model = make_model("flow_matching")
    # The coupling is an option of the objective (the job's choice), not of the model.
    options = FlowMatchingConfig(coupling="ot", ot_energy_bins_per_decade=1)
    ot_objective = make_objective(ObjectiveConfig(name="flow_matching", flow_matching=options))
    showers, cond = toy_showers(16, SMALL_MESH, seed=12)
    cond = Conditions.make(np.full(16, 5e3), cond.theta_rad, cond.phi_rad, 11, "det_a")  # one group
    x1, ct = model.to_model_space(showers), model.encode_conditions(cond)
    loss_ind = make_objective("flow_matching")(model, x1, ct, torch.Generator().manual_seed(3))
    loss_ot = ot_objective(model, x1, ct, torch.Generator().manual_seed(3))
    again = ot_objective(model, x1, ct, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_ot, again, rtol=0, atol=0)
    assert not torch.allclose(loss_ind, loss_ot)
    # Same draws, re-paired: the target x1 − x0 is shorter on average with OT.
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(x1.shape, generator=gen)
    coupled = ot_couple(x0, x1, condition_groups(ct, 1))
    assert mean_pair_distance(coupled, x1) < mean_pair_distance(x0, x1)
