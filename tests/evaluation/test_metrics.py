"""Separation power, Fréchet distance / FPD, KPD, PRDC and AUC on analytic cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from caloforge.evaluation import histograms as H
from caloforge.evaluation.classifier import auc_score
from caloforge.evaluation.metrics import (
    Standardiser,
    fpd,
    frechet_distance,
    kpd,
    mmd2_poly_unbiased,
)
from caloforge.evaluation.prdc import prdc


# ------------------------------------------------------------------------------------ separation power
def test_separation_power_identical_disjoint_and_known_value() -> None:
    h = np.array([3.0, 1.0, 0.0, 6.0])
    assert H.separation_power(h, 2 * h) == 0.0  # identical after normalisation
    assert H.separation_power(
        np.array([1.0, 2.0, 0.0, 0.0]), np.array([0.0, 0.0, 5.0, 1.0])
    ) == pytest.approx(1.0)
    # p = (1, 0), q = (½, ½): ½[(½)²/(3/2) + (½)²/(½)] = 1/3
    assert H.separation_power(np.array([4.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1.0 / 3.0)
    assert math.isnan(H.separation_power(np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match="shapes differ"):
        H.separation_power(np.ones(3), np.ones(4))


def test_value_histogram_has_under_and_overflow_and_discrete_binning() -> None:
    edges = H.linear_edges(np.random.default_rng(0).normal(size=10_000), 20)
    assert len(edges) == 21 and edges[0] < -3 and edges[-1] > 3
    counts = H.value_counts(np.array([-100.0, 0.0, 0.1, 100.0, np.nan]), edges)
    assert counts[0] == 1 and counts[-1] == 1 and counts.sum() == 4
    # a sample entirely outside the reference range is disjoint from it: S = 1
    ref = H.value_counts(np.random.default_rng(1).uniform(-1, 1, size=1000), edges)
    far = H.value_counts(np.full(1000, 50.0), edges)
    assert H.separation_power(ref, far) == pytest.approx(1.0)
    # a discrete feature gets one bin per value
    disc = np.repeat([0.25, 0.5, 0.75], 100)
    d_edges = H.linear_edges(disc, 20)
    assert len(d_edges) == 4
    assert H.value_counts(disc, d_edges)[1:-1].tolist() == [100, 100, 100]


def test_group_means_ignore_nan() -> None:
    out = H.group_means({"a/0": 0.1, "a/1": 0.3, "b": float("nan"), "c": 0.5})
    assert out["a"] == pytest.approx(0.2) and math.isnan(out["b"]) and out["c"] == 0.5
    assert out["mean"] == pytest.approx(0.35)


# -------------------------------------------------------------------------------------------- FD / FPD
def test_frechet_distance_of_gaussians_in_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 0.0]), np.array([0.5, 1.0, -1.0])
    c1, c2 = np.diag([1.0, 2.0, 0.5]), np.diag([4.0, 2.0, 0.5])
    # diagonal covariances: FD = |Δμ|² + Σ (√a − √b)²
    expected = 0.25 + 1.0 + (1.0 - 2.0) ** 2
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected)
    # non-commuting covariances: compare with the definition via a rotated frame
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    a = rot @ c1 @ rot.T
    b = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.7]])
    w, v = np.linalg.eigh(a)
    sa = (v * np.sqrt(w)) @ v.T
    tr = np.sum(np.sqrt(np.linalg.eigvalsh(sa @ b @ sa)))
    assert frechet_distance(mu1, a, mu1, b) == pytest.approx(np.trace(a) + np.trace(b) - 2 * tr)
    assert frechet_distance(mu1, a, mu1, a) == pytest.approx(0.0, abs=1e-9)


def test_fpd_extrapolates_to_the_true_distance() -> None:
    rng = np.random.default_rng(3)
    d = 4
    x = rng.normal(size=(20_000, d))
    y = rng.normal(size=(20_000, d)) * np.array([1.0, math.sqrt(2.0), 1.0, 1.0]) + np.array([0.5, 0, 0, 0])
    true = 0.25 + (1.0 - math.sqrt(2.0)) ** 2
    res = fpd(x, y, 2000, 20_000, num_points=6, num_batches=4, seed=0, normalise=False)
    assert abs(res.value - true) < max(4 * res.error, 0.02)
    assert res.slope >= 0 and len(res.batch_sizes) == 6
    same = fpd(x, rng.normal(size=(20_000, d)), 2000, 20_000, num_points=6, num_batches=4, normalise=False)
    assert same.value < 0.005  # identical distributions: FPD ≈ 0 (the fit keeps it >= 0)
    with pytest.raises(ValueError, match="feature dimensions"):
        fpd(x, y[:, :3])


# ------------------------------------------------------------------------------------------------ KPD
def _mmd2_brute(x: np.ndarray, y: np.ndarray, degree: int) -> float:
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / d + 1.0) ** degree

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_the_u_statistic_definition() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(7, 3)) + 0.3
    for degree in (1, 3):
        assert mmd2_poly_unbiased(x, y, degree, chunk=4) == pytest.approx(_mmd2_brute(x, y, degree))


def test_kpd_is_zero_for_identical_distributions_and_positive_otherwise() -> None:
    rng = np.random.default_rng(5)
    # batches are drawn with replacement (jetnet); a row drawn twice adds k(x, x) to the "off-diagonal"
    # sums, a positive bias ~ batch_size / set size, so the sets are much larger than a batch here
    x, y = rng.normal(size=(20_000, 10)), rng.normal(size=(20_000, 10))
    same = kpd(x, y, batch_size=500, num_batches=10, seed=1, normalise=False)
    assert abs(same.value) < 3 * same.error + 1e-3
    shifted = kpd(x, y + 0.3, batch_size=500, num_batches=10, seed=1, normalise=False)
    assert shifted.value > 5 * shifted.error and shifted.value > 0.05
    assert len(same.batch_values) == 10
    assert kpd(x[:50], y[:40], batch_size=10_000, num_batches=2).batch_size == 40  # capped: same E


def test_standardiser_uses_reference_statistics() -> None:
    ref = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    st = Standardiser.fit(ref)
    z = st(ref)
    np.testing.assert_allclose(z.mean(axis=0), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(z[:, 1], 0.0)  # constant column: scale 1
    np.testing.assert_allclose(Standardiser.fit(ref, "maxabs")(ref)[:, 0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="columns"):
        st(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        Standardiser.fit(np.array([[np.inf, 1.0]]))


# ----------------------------------------------------------------------------------------------- PRDC
def _prdc_brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float, float]:
    drr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    dff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    drf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    rr = np.sort(drr, axis=1)[:, k]
    rf = np.sort(dff, axis=1)[:, k]
    inside = drf <= rr[:, None]  # (N, M): fake j inside real ball i
    precision = inside.any(axis=0).mean()
    recall = (drf <= rf[None, :]).any(axis=1).mean()
    density = inside.sum() / (k * len(fake))
    coverage = inside.any(axis=1).mean()
    return precision, recall, density, coverage


def test_prdc_matches_brute_force_and_limits() -> None:
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(60, 3)), rng.normal(size=(50, 3)) * 1.3 + 0.2
    got = prdc(real, fake, k=4, chunk=16)
    want = _prdc_brute(real, fake, 4)
    assert (got.precision, got.recall, got.density, got.coverage) == pytest.approx(want, abs=1e-6)
    far = prdc(real, fake + 100.0, k=4)
    assert far.precision == 0.0 and far.recall == 0.0 and far.coverage == 0.0 and far.density == 0.0
    same = prdc(rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3)), k=5)
    assert same.coverage > 0.9 and 0.8 < same.density < 1.2
    with pytest.raises(ValueError, match="more than k"):
        prdc(real[:3], fake, k=5)


# ------------------------------------------------------------------------------------------------ AUC
def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(200) < 0.4
    s = np.round(rng.normal(size=200) + y, 1)  # rounded: ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert auc_score(y, s) == pytest.approx(pairwise)
    assert auc_score(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc_score(np.array([0, 1, 0, 1]), np.zeros(4)) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc_score(np.ones(3), np.zeros(3))
