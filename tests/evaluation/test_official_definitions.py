"""FPD, KPD and the layer-energy separation power against values worked out by hand from the official
CaloChallenge definitions (``code/evaluate.py``, ``code/evaluate_plotting_helper.py``,
``code/HighLevelFeatures.py`` of CaloChallenge/homepage; FPD/KPD: ``jetnet.evaluation.fpd``/``kpd`` as the
CaloChallenge calls them). Each test runs ``evaluate`` end to end on a tiny pair of shower sets.

The mesh is one layer, one angular bin and one radial bin [0, 2) mm, so a shower is one voxel at r_c = 1 mm,
φ_c = 0: x = 1 mm, y = 0, and every width is 0. The voxel threshold is 1 MeV.
"""

from __future__ import annotations

import numpy as np
import pytest

from caloforge.datasets.schema import ShowerSet
from caloforge.evaluation import EvalConfig, evaluate
from caloforge.evaluation.config import FPDConfig, GroupConfig, KPDConfig
from caloforge.platform.conditioning import Conditions

THR = 1.0


def _set(voxel_mev: list[float], e_inc_mev: float = 1000.0) -> ShowerSet:
    n = len(voxel_mev)
    x = np.asarray(voxel_mev, dtype=np.float32).reshape(n, 1, 1, 1)
    cond = Conditions.make(np.full(n, e_inc_mev), 0.0, 0.0, np.full(n, 11), "toy")
    return ShowerSet(x, cond, "hand")


def _config(metrics: tuple[str, ...]) -> EvalConfig:
    return EvalConfig(
        metrics=metrics,  # type: ignore[arg-type]
        voxel_threshold_mev=THR,
        r_edges_mm=(0.0, 2.0),
        floor=False,
        groups=GroupConfig(enabled=False),
        fpd=FPDConfig(min_samples=20, max_samples=60, num_points=3, num_batches=2),
        kpd=KPDConfig(batch_size=16, num_batches=3),
    )


def test_fpd_and_kpd_follow_the_official_features_normalisation_and_kernel() -> None:
    """Reference: 8 identical showers, E_inc = 1000 MeV, voxel 100 MeV; sample: the same with 10 MeV.

    Official HLF vector (prepare_high_data_for_classifier, n_z = 1, d = 10):
    [log10 E_inc, log10(E_z + 1e-8), <x>/100, <y>/100, σ_x/100, σ_y/100, log10(E_tot + 1e-8), sparsity,
    <r>/100, σ_r/100]
        reference: [3, 2, 0.01, 0, 0, 0, 2, 0, 0.01, 0]
        sample:    [3, 1, 0.01, 0, 0, 0, 1, 0, 0.01, 0]
    jetnet normalisation: divide by the reference's max |x| per column (columns of zeros stay):
        a = [1, 1, 1, 0, 0, 0, 1, 0, 1, 0],  b = [1, 0.5, 1, 0, 0, 0, 0.5, 0, 1, 0]
    Every batch (drawn with replacement) of a constant set has mean a (b) and covariance 0, so at every
    batch size FD = |a − b|² = 0.5² + 0.5² = 0.5, the 1/N fit has slope 0: FPD = 0.5, ×10³ = 500.
    KPD: k(u, v) = (u·v/d + 1)⁴ with a·a = 5, b·b = 3.5, a·b = 4; each batch of constant rows gives
    MMD²_u = k(a, a) + k(b, b) − 2 k(a, b) = 1.5⁴ + 1.35⁴ − 2·1.4⁴ = 5.0625 + 3.32150625 − 7.6832
           = 0.70080625, so KPD (median) ×10³ = 700.80625 with error 0.
    (The previous, non-official definition — z-scored with the reference σ — was undefined here.)
    """
    ref, gen = _set([100.0] * 8), _set([10.0] * 8)
    m = evaluate(gen, ref, _config(("fpd", "kpd"))).metrics
    assert m["fpd"] == pytest.approx(500.0, rel=1e-7)
    assert m["kpd"] == pytest.approx(700.80625, rel=1e-7)
    assert m["kpd_err"] == pytest.approx(0.0, abs=1e-9)


def test_layer_energy_separation_power_uses_the_official_binning_and_normalisation() -> None:
    """Official plot_E_layers: bins = logspace(log10(min_energy), log10(max_ref E_layer), 40), i.e. 39 bins;
    plt.hist(density=True) × bin widths = counts / (entries inside the bins); values outside the bins
    (here the empty layers, E_z = 0 < min_energy, and a sample value above the reference maximum) are
    dropped; S = ½ Σ (p − q)² / (p + q + 1e-16).

    min_energy = 1 MeV and the reference maximum is 10⁴ MeV (its round trip through log10 is exact, so the
    maximum stays inside the last, closed bin), so each bin is w = 4/39 decade wide and 10^(w (k + ½)) MeV
    falls in bin k.
        reference log10(E_z)/w: 0.5, 0.5, 10.5, 39 (10⁴ MeV), E_z = 0 -> bins 0, 0, 10, 38: p = (½, ¼, ¼)
        sample    log10(E_z)/w: 0.5, 10.5, 10.5, 50 (> 10⁴), E_z = 0  -> bins 0, 10, 10:     q = (⅓, ⅔, 0)
    S = ½ [(½ − ⅓)²/(⅚) + (¼ − ⅔)²/(11/12) + (¼)²/(¼)] = ½ (1/30 + 25/132 + 1/4) = 13/55 ≈ 0.23636.
    """
    w = 4 / 39
    t_ref = [0.5 * w, 0.5 * w, 10.5 * w, 4.0]
    t_gen = [0.5 * w, 10.5 * w, 10.5 * w, 50 * w]
    ref = _set([THR * 10**t for t in t_ref] + [0.0])
    gen = _set([THR * 10**t for t in t_gen] + [0.0])
    rep = evaluate(gen, ref, _config(("sep_power",)))
    edges = rep.plot_data.binning["e_layer/0"]
    assert len(edges) == 40 and edges[0] == pytest.approx(THR)
    assert edges[-1] == 1e4
    # the same counts as the official tool (np.histogram via plt.hist), out-of-range values dropped
    e_ref = np.array([np.float32(THR * 10**t) for t in t_ref] + [0.0])
    assert np.flatnonzero(np.histogram(e_ref, edges)[0]).tolist() == [0, 10, 38]
    assert rep.hist_sep_power["e_layer/0"] == pytest.approx(13 / 55, rel=1e-9)
    assert rep.metrics["sep_power/e_layer"] == pytest.approx(13 / 55, rel=1e-9)
    # our own variant, under its own name, counts the empty layers (underflow) and the overflow
    assert "e_layer_adaptive/0" in rep.hist_sep_power
    assert rep.hist_sep_power["e_layer_adaptive/0"] != pytest.approx(13 / 55)


def test_fpd_extrapolates_to_the_frechet_distance_of_the_two_sets() -> None:
    """Batches drawn with replacement (jetnet) are i.i.d. samples of the *empirical* sets, so FD(N) → the FD
    between Gaussians with the sets' means and population (ddof = 0) covariances as N → ∞.

    Reference: the 4 points {0, 2}² (mean (1, 1), covariance diag(1, 1)); sample: {1, 5}² (mean (3, 3),
    covariance diag(4, 4)). Divided by the reference max |x| = (2, 2): reference {0, 1}² (mean ½, variance
    ¼ per axis), sample {½, 5/2}² (mean 3/2, variance 1): FD = |Δμ|² + Σ_axes (√¼ − √1)² = 2 + 2·¼ = 2.5.
    Without the normalisation FD = 8 + 2·(1 − 2)² = 10.
    """
    from caloforge.evaluation.metrics import fpd

    ref = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    gen = np.array([[1.0, 1.0], [5.0, 1.0], [1.0, 5.0], [5.0, 5.0]])
    res = fpd(ref, gen, 2000, 20_000, num_points=6, num_batches=20, seed=0)
    assert res.value == pytest.approx(2.5, abs=max(4 * res.error, 0.01))
    raw = fpd(ref, gen, 2000, 20_000, num_points=6, num_batches=20, seed=0, normalise=False)
    assert raw.value == pytest.approx(10.0, abs=max(4 * raw.error, 0.04))
