"""The differentiable per-layer shower features (against the evaluation's definitions), their distance
(by hand), and the consistency loss's feature term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_consistency import fm_objective_case, hand_case

from caloforge.evaluation.features import compute_features, voxel_log_edges
from caloforge.platform.geometry import Mesh
from caloforge.platform.objectives import (
    ConsistencyDistillationConfig,
    consistency_distillation_loss,
)
from caloforge.platform.objectives.consistency import one_step_moment_loss
from caloforge.platform.objectives.shower_features import (
    FEATURE_KINDS,
    LayerFeatures,
    SoftLayerFeatures,
    feature_distance,
    moment_distance,
)
from caloforge.platform.transforms import LayerLogStandardize

MESH = Mesh(n_z=3, n_phi=4, r_edges_mm=(0.0, 5.0, 12.0, 20.0, 40.0))
THRESHOLD = 0.01


def transform() -> LayerLogStandardize:
    return LayerLogStandardize(
        MESH.n_z, log_eps=1e-6, threshold_mev=THRESHOLD, mean_Z=[-8.0, -6.0, -9.0], std_Z=[3.0, 4.0, 2.5]
    )


def showers(n: int = 6, seed: int = 0) -> np.ndarray:
    """MeV showers: hits of ≥ 0.5 MeV (50× the threshold) or exactly empty, one layer of shower 0 empty."""
    rng = np.random.default_rng(seed)
    e = (0.5 + rng.lognormal(0.0, 1.5, size=(n, *MESH.shape))) * (rng.random((n, *MESH.shape)) < 0.6)
    e[0, 2] = 0.0
    return e


def test_features_agree_with_the_evaluation_where_hits_are_far_from_the_threshold() -> None:
    mev = showers()
    tr = transform()
    x = tr(torch.as_tensor(mev, dtype=torch.float32))
    feats = SoftLayerFeatures(tr, MESH, tau=0.05)(x)
    ref = compute_features(
        mev, np.full(len(mev), 100.0), MESH, THRESHOLD, voxel_log_edges(THRESHOLD, 1e3, 10)
    )
    torch.testing.assert_close(feats.energy, torch.as_tensor(ref.e_layer_mev).float(), rtol=1e-4, atol=1e-5)
    for kind in ("ec_x", "ec_y", "ec_r", "width_x", "width_y", "width_r"):
        # the soft width carries δ = 1e-6 mm² under its root: 1e-3 mm for an empty or one-voxel layer
        expected = torch.as_tensor(getattr(ref, f"{kind}_mm")).float()
        torch.testing.assert_close(feats.values[kind], expected, rtol=1e-4, atol=2e-3, msg=kind)
    occupancy = 1.0 - torch.as_tensor(ref.sparsity).float()
    torch.testing.assert_close(feats.values["occupancy"], occupancy, rtol=0, atol=1e-4)


def test_the_soft_threshold_counts_a_voxel_at_the_threshold_half() -> None:
    mev = np.zeros((1, *MESH.shape))
    mev[0, 0, 1, 2] = THRESHOLD  # at the threshold: the transform keeps it (x < threshold is cut)
    mev[0, 0, 2, 2] = 10.0  # far above
    tr = transform()
    feats = SoftLayerFeatures(tr, MESH, tau=1.0)(tr(torch.as_tensor(mev, dtype=torch.float32)))
    n_voxels = MESH.n_phi * (len(MESH.r_edges_mm) - 1)
    g_hot = torch.sigmoid(torch.tensor((np.log(10.0 + 1e-6) - np.log(THRESHOLD + 1e-6)) / 1.0)).item()
    assert feats.values["occupancy"][0, 0].item() == pytest.approx((0.5 + g_hot) / n_voxels, rel=1e-3)
    assert feats.energy[0, 0].item() == pytest.approx(0.5 * THRESHOLD + g_hot * 10.0, rel=1e-3)


def test_feature_distance_by_hand() -> None:
    """Two showers, two layers, only ec_r differs: d = mean_k Σ_z w_z Δ² / s_k² (w, s from b)."""
    energy = torch.tensor([[3.0, 1.0], [1.0, 1.0]])
    ec_r_b = torch.tensor([[10.0, 20.0], [14.0, 16.0]])
    values_b = {k: torch.full((2, 2), 5.0) for k in FEATURE_KINDS}
    values_b["ec_r"] = ec_r_b
    values_a = {k: v.clone() for k, v in values_b.items()}
    values_a["ec_r"] = ec_r_b + torch.tensor([[2.0, 0.0], [0.0, -4.0]])
    b = LayerFeatures(energy=energy, values=values_b)
    a = LayerFeatures(energy=energy.clone(), values=values_a)
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    spread = ec_r_b - ec_r_b.mean(dim=0, keepdim=True)  # [[-2, 2], [2, -2]]
    s2 = float((w * spread**2).sum() / w.sum())  # 4
    # constant kinds: spread 0, floor 1e-4 × 25; their Δ is 0, so they add nothing
    expected = torch.tensor([0.75 * 4.0 / s2, 0.5 * 16.0 / s2]) / len(FEATURE_KINDS)
    torch.testing.assert_close(feature_distance(a, b), expected)
    torch.testing.assert_close(feature_distance(b, b), torch.zeros(2))
    with pytest.raises(ValueError, match="shapes"):
        feature_distance(a, LayerFeatures(energy=torch.ones(3, 2), values=values_b))


def test_feature_distance_has_gradients_where_a_layer_is_empty() -> None:
    tr = transform()
    x_b = tr(torch.as_tensor(showers(seed=1), dtype=torch.float32))
    x_a = (x_b + 0.3 * torch.randn(x_b.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    feats = SoftLayerFeatures(tr, MESH)
    d = feature_distance(feats(x_a), feats(x_b))
    assert d.shape == (6,) and bool((d > 0).all())
    d.sum().backward()
    assert x_a.grad is not None and bool(torch.isfinite(x_a.grad).all()) and x_a.grad.abs().sum() > 0


def test_soft_features_name_bad_inputs() -> None:
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        SoftLayerFeatures(transform(), MESH, tau=0.0)
    with pytest.raises(ValueError, match="has no 'log_energy'"):
        SoftLayerFeatures(torch.nn.Identity(), MESH)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 4, 4\)"):
        SoftLayerFeatures(transform(), MESH)(torch.zeros(2, 3, 4, 5))


def test_consistency_loss_adds_the_weighted_feature_distance() -> None:
    """The hand case of test_consistency with a feature callable: loss = l2 + w · d(features)."""

    def features(x: torch.Tensor) -> LayerFeatures:
        values = {k: x.flatten(1)[:, :1] * (i + 1) for i, k in enumerate(FEATURE_KINDS)}
        return LayerFeatures(energy=torch.ones(x.shape[0], 1), values=values)

    kwargs = hand_case()
    l2 = torch.tensor([(5.75**2 + 1.625**2) / 2, (0.75**2 + 15.0**2) / 2])
    # first voxel: student (6, -3), target (0.25, -3.75); per kind k the values scale by (k + 1), so
    # Δ² / s² does not depend on k: s² = var of (0.25, -3.75) about its mean = 4
    d = torch.tensor([5.75**2 / 4.0, 0.75**2 / 4.0])
    loss = consistency_distillation_loss(**kwargs, features=features, feature_weight=0.5)
    torch.testing.assert_close(loss, l2 + 0.5 * d, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs the features callable"):
        consistency_distillation_loss(**kwargs, feature_weight=0.5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"feature_weight": -1.0}, "feature_weight must be a finite number >= 0"),
        ({"feature_weight": float("nan")}, "feature_weight must be a finite number >= 0"),
        ({"feature_tau": 0}, "feature_tau must be a finite number > 0"),
        ({"moment_weight": -0.1}, "moment_weight must be a finite number >= 0"),
    ],
)
def test_feature_options_name_the_bad_value(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConsistencyDistillationConfig(**overrides)


def test_objective_passes_the_feature_term_on() -> None:
    config = ConsistencyDistillationConfig(num_scales=8, feature_weight=0.2, feature_tau=0.5)
    teacher, student, target, x1, ct, loss, gen, terms = fm_objective_case(config, n=6)
    n = torch.randint(0, 7, (x1.shape[0],), generator=gen)
    z = torch.randn(x1.shape, generator=gen)
    args = (
        student,
        target,
        teacher.velocity,
        student.denoiser.noisy,
        student.denoiser.cd_levels(8),
        x1,
        n,
        z,
        ct,
    )
    features = SoftLayerFeatures(student.transform, student.mesh, tau=0.5)
    expected = consistency_distillation_loss(*args, features=features, feature_weight=0.2)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
    plain = consistency_distillation_loss(*args)
    assert bool((loss.detach() > plain.detach()).any())
    # the recorded parts, unweighted: the total is consistency + 0.2 × features
    assert list(terms) == ["consistency", "features"]
    torch.testing.assert_close(terms["consistency"], plain.detach().mean())
    torch.testing.assert_close(terms["consistency"] + 0.2 * terms["features"], loss.detach().mean())
    loss.mean().backward()
    assert student.network.final_layer.linear.weight.grad is not None


def test_moment_distance_by_hand() -> None:
    """Batch of two, one layer: Σ_z w̄_z ((Δ mean)² + (Δ std)²) / s² per kind, averaged over the kinds."""
    energy = torch.tensor([[2.0], [2.0]])
    values_b = {k: torch.tensor([[1.0], [3.0]]) for k in FEATURE_KINDS}  # mean 2, std 1, s² = 1
    values_a = {k: torch.tensor([[1.0], [3.0]]) for k in FEATURE_KINDS}
    values_a["width_r"] = torch.tensor([[2.0], [6.0]])  # mean 4, std 2
    a = LayerFeatures(energy=energy, values=values_a)
    b = LayerFeatures(energy=energy, values=values_b)
    assert moment_distance(a, b).item() == pytest.approx((2.0**2 + 1.0**2) / len(FEATURE_KINDS), rel=1e-5)
    assert moment_distance(b, b).item() == pytest.approx(0.0, abs=1e-9)
    # the order of the showers does not matter: nothing pairs them
    swapped = LayerFeatures(energy=energy, values={k: v.flip(0) for k, v in values_a.items()})
    assert moment_distance(swapped, b).item() == pytest.approx(moment_distance(a, b).item(), rel=1e-6)


def test_objective_adds_the_one_step_moment_term_after_its_documented_draws() -> None:
    config = ConsistencyDistillationConfig(num_scales=8, moment_weight=0.3)
    teacher, student, target, x1, ct, loss, gen, terms = fm_objective_case(config, n=6)
    n = torch.randint(0, 7, (x1.shape[0],), generator=gen)
    z = torch.randn(x1.shape, generator=gen)
    z_prior = torch.randn(x1.shape, generator=gen)
    levels = student.denoiser.cd_levels(8)
    plain = consistency_distillation_loss(
        student, target, teacher.velocity, student.denoiser.noisy, levels, x1, n, z, ct
    )
    features = SoftLayerFeatures(student.transform, student.mesh)
    t0 = float(student.denoiser.time_grid(1)[0])
    moment = one_step_moment_loss(student, student.denoiser.prior, t0, z_prior, x1, ct, features)
    samples = student(student.denoiser.prior(z_prior), torch.full((6,), t0), ct)
    torch.testing.assert_close(moment, moment_distance(features(samples), features(x1)))
    assert moment.item() > 0
    torch.testing.assert_close(loss.detach(), (plain + 0.3 * moment).detach(), rtol=1e-6, atol=1e-7)
    assert list(terms) == ["consistency", "moments"]
    torch.testing.assert_close(terms["moments"], moment.detach())
    loss.mean().backward()
    assert student.network.final_layer.linear.weight.grad is not None
