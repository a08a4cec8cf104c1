"""Transforms: fitted from a stats block, invertible to float precision above the readout threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from toy_models import SMALL_MESH, toy_showers

from caloforge.datasets.stats import compute_stats
from caloforge.platform.transforms import (
    CALOCHALLENGE_THRESHOLD_MEV,
    MAX_LOG,
    TRANSFORMS,
    LayerLogStandardize,
    LogStandardize,
    build_transform,
)

THRESHOLD = CALOCHALLENGE_THRESHOLD_MEV


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, dict]:
    showers, cond = toy_showers(64, SMALL_MESH, seed=21)
    return showers, compute_stats(showers, cond.energy_mev, cond.theta_rad)


def test_threshold_is_the_calochallenge_cut() -> None:
    assert pytest.approx(15.15e-3, rel=1e-3) == THRESHOLD


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_round_trip_to_float_precision_above_threshold(name: str, data: tuple[np.ndarray, dict]) -> None:
    showers, stats = data
    transform = build_transform(name, SMALL_MESH[0], THRESHOLD, stats)
    assert bool(transform.fitted)
    # The inverse's exponent is clamped per layer at ln(2 (x_max,z + ε)): twice the data's hottest voxel.
    expected_log_max = torch.tensor(stats["layer_log_max"], dtype=torch.float64) + math.log(2.0)
    torch.testing.assert_close(transform.log_max_Z, expected_log_max.float(), rtol=0, atol=1e-6)
    x_mev = torch.from_numpy(showers)
    back = transform.inverse(transform(x_mev))
    above = x_mev >= THRESHOLD
    assert above.sum() > 1000
    torch.testing.assert_close(back[above], x_mev[above], rtol=2e-5, atol=0.0)
    assert not back[~above].any(), "voxels below the threshold must come back as exactly 0"
    # Energies spanning 1e-2 … 1e6 MeV invert up to the clamp (not only the ones in the data); above it,
    # they come back as the clamp, 2 (x_max,z + ε) − ε.
    grid = torch.logspace(np.log10(THRESHOLD * 1.001), 6, 400).reshape(1, 1, 1, -1).expand(1, 12, 1, 400)
    grid = grid.contiguous()
    x_max_plus_eps = torch.exp(torch.tensor(stats["layer_log_max"], dtype=torch.float64))
    ceiling = (2.0 * x_max_plus_eps - stats["log_eps"]).float()[None, :, None, None]
    clamped = grid > ceiling
    assert clamped.sum() > 400 and (~clamped).sum() > 400, "the grid should straddle the clamp"
    back = transform.inverse(transform(grid))
    torch.testing.assert_close(back, torch.minimum(grid, ceiling).expand_as(grid), rtol=2e-5, atol=0.0)
    # A stats block without ``layer_log_max`` (older manifests) gives no data-range clamp: the whole grid
    # inverts, and only MAX_LOG bounds the exponent.
    old = build_transform(
        name, SMALL_MESH[0], THRESHOLD, {k: v for k, v in stats.items() if k != "layer_log_max"}
    )
    assert torch.equal(old.log_max_Z, torch.full((12,), MAX_LOG))
    torch.testing.assert_close(old.inverse(old(grid)), grid, rtol=2e-5, atol=0.0)


def test_log_standardize_matches_calodit2_formula(data: tuple[np.ndarray, dict]) -> None:
    showers, stats = data
    transform = LogStandardize.from_stats(stats, SMALL_MESH[0], THRESHOLD)
    x = showers.astype(np.float64)
    expected = (np.log(np.where(x < THRESHOLD, 0.0, x) + stats["log_eps"]) - stats["log_mean"]) / stats[
        "log_std"
    ]
    np.testing.assert_allclose(transform(torch.from_numpy(showers)).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Fitted on this data (already cut at the threshold): standardised over all voxels.
    z = transform(torch.from_numpy(showers)).double()
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-3


def test_layer_log_standardize_uses_per_layer_statistics(data: tuple[np.ndarray, dict]) -> None:
    showers, stats = data
    transform = LayerLogStandardize.from_stats(stats, SMALL_MESH[0], THRESHOLD)
    z = transform(torch.from_numpy(showers)).double()
    per_layer_mean = z.mean(dim=(0, 2, 3))
    per_layer_std = z.std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(per_layer_mean, torch.zeros(12, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_layer_std, torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-3)
    layer_means = np.asarray(stats["layer_log_mean"])
    assert layer_means.max() - layer_means.min() > 0.5, "toy layers should differ for this test to mean much"


def test_inverse_clamps_to_finite_non_negative_values() -> None:
    transform = LogStandardize(4, mean=-5.0, std=8.0, fitted=True)
    x = torch.tensor([-1e6, -3.0, 0.0, 1e3, 1e9]).reshape(1, 1, 1, 5).expand(1, 4, 1, 5)
    out = transform.inverse(x.contiguous())
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, -1] > 1e30
    negative = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3).expand(1, 4, 1, 3)
    assert torch.isfinite(transform(negative.contiguous())).all()


def test_unfitted_transform_is_marked_and_stats_are_validated(data: tuple[np.ndarray, dict]) -> None:
    _, stats = data
    assert not bool(build_transform("log_standardize", 12, THRESHOLD, None).fitted)
    with pytest.raises(ValueError, match="stats block has no 'log_mean'"):
        LogStandardize.from_stats({k: v for k, v in stats.items() if k != "log_mean"}, 12, THRESHOLD)
    with pytest.raises(
        ValueError, match=r"stats\['layer_log_mean'\] must be a list of n_z=13 numbers, got 12"
    ):
        LayerLogStandardize.from_stats(stats, 13, THRESHOLD)
    with pytest.raises(ValueError, match=r"stats\['log_eps'\] must be > 0"):
        LogStandardize.from_stats({**stats, "log_eps": 0.0}, 12, THRESHOLD)
    with pytest.raises(ValueError, match="unknown transform 'logit'"):
        build_transform("logit", 12, THRESHOLD, stats)
    with pytest.raises(ValueError, match=r"LogStandardize.forward: expected \(B, n_z=12, n_phi, n_r\)"):
        LogStandardize(12)(torch.zeros(3, 12))
    # Both transforms check the number of layers, in both directions.
    for cls in (LogStandardize, LayerLogStandardize):
        with pytest.raises(ValueError, match=rf"{cls.__name__}.inverse: .*got shape \(3, 13, 2, 2\)"):
            cls(12).inverse(torch.zeros(3, 13, 2, 2))
        with pytest.raises(ValueError, match=rf"{cls.__name__}.forward: .*got shape \(3, 11, 2, 2\)"):
            cls(12)(torch.zeros(3, 11, 2, 2))
    # The data-range clamp: unfitted transforms have none (MAX_LOG); a malformed layer_log_max is an error.
    assert torch.equal(
        build_transform("layer_log_standardize", 12, THRESHOLD, None).log_max_Z, torch.full((12,), 80.0)
    )
    with pytest.raises(
        ValueError, match=r"stats\['layer_log_max'\] must be a list of n_z=12 numbers, got 11"
    ):
        LogStandardize.from_stats({**stats, "layer_log_max": stats["layer_log_max"][:11]}, 12, THRESHOLD)
    with pytest.raises(ValueError, match=r"stats\['layer_log_max'\] has non-finite entries"):
        LayerLogStandardize.from_stats({**stats, "layer_log_max": [math.inf] * 12}, 12, THRESHOLD)
    with pytest.raises(ValueError, match=r"log_max_Z must have n_z=12 entries, got \(3,\)"):
        LogStandardize(12, log_max_Z=[1.0, 2.0, 3.0])


def test_dead_layer_statistics_do_not_divide_by_zero(data: tuple[np.ndarray, dict]) -> None:
    showers, _ = data
    dead = showers.copy()
    dead[:, 11] = 0.0
    stats = compute_stats(dead, np.full(len(dead), 1e4), np.full(len(dead), 1.5))
    assert stats["layer_log_std"][11] == 0.0
    transform = LayerLogStandardize.from_stats(stats, 12, THRESHOLD)
    z = transform(torch.from_numpy(dead))
    assert torch.isfinite(z).all() and not z[:, 11].any()
    assert not transform.inverse(z)[:, 11].any()
    # A layer never hit in the data (max = ln ε) gets no data-range clamp; the others do.
    assert stats["layer_log_max"][11] == math.log(stats["log_eps"])
    assert float(transform.log_max_Z[11]) == MAX_LOG
    assert (transform.log_max_Z[:11] < 20).all()


def test_one_calochallenge_threshold_for_transform_reader_and_evaluation() -> None:
    from caloforge.datasets.formats import calochallenge
    from caloforge.evaluation import api

    assert math.isclose(THRESHOLD, 15.1515e-3, rel_tol=1e-4)  # 0.5 keV visible / sampling fraction 0.033
    assert calochallenge.VOXEL_THRESHOLD_MEV is api.CALOCHALLENGE_THRESHOLD_MEV is THRESHOLD
    assert calochallenge.SAMPLING_FRACTION == 0.033
