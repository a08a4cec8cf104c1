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


def test_every_official_histogram_matches_numpy_with_the_official_bins() -> None:
    """On the DS2 mesh, each official-named group equals the official recipe written out with numpy:
    ``h = np.histogram(values, bins, density=True)[0] * np.diff(bins)`` and
    ``S = ½ Σ (h1 − h2)² / (h1 + h2 + 1e-16)`` (``_separation_power``), with the bins of
    ``evaluate_plotting_helper.py`` for datasets 2/3."""
    from caloforge.evaluation import histograms as H
    from caloforge.evaluation.features import compute_features, voxel_log_edges
    from caloforge.platform.geometry import Mesh

    mesh = Mesh(45, 16, (0.0, 4.65, 9.3, 13.95, 18.6, 23.25, 27.9, 32.55, 37.2, 41.85))
    thr = 0.5e-3 / 0.033
    rng = np.random.default_rng(11)

    def showers(scale: float) -> tuple[np.ndarray, np.ndarray]:
        x = rng.lognormal(-1.0, 2.0, (150, *mesh.shape)) * (rng.random((150, *mesh.shape)) < 0.2) * scale
        return x.astype(np.float32), np.full(150, 1.2 * x.sum(axis=(1, 2, 3)).mean())

    (x_ref, e_ref), (x_gen, e_gen) = showers(1.0), showers(1.1)
    vox_max = float(np.where(x_ref < thr, 0, x_ref).max())
    edges = voxel_log_edges(thr, vox_max, 49)
    ref = compute_features(x_ref, e_ref, mesh, thr, edges)
    gen = compute_features(x_gen, e_gen, mesh, thr, edges)
    binning = H.fit_binning(ref, mesh, 50, H.OFFICIAL_GROUPS, threshold_mev=thr, r_max_mm=41.85)
    ours = H.separation_powers(H.histograms(ref, binning), H.histograms(gen, binning))

    def official(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):
            h1 = np.histogram(a, bins, density=True)[0] * np.diff(bins)
            h2 = np.histogram(b, bins, density=True)[0] * np.diff(bins)
        return float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + 1e-16)))

    fixed = {
        "ec_x": np.linspace(-30, 30, 101),
        "ec_y": np.linspace(-30, 30, 101),
        "width_x": np.linspace(0, 30, 101),
        "width_y": np.linspace(0, 30, 101),
        "ec_r": np.linspace(0, 42, 101),
        "width_r": np.linspace(0, 20, 101),
        "sparsity": np.linspace(0, 1, 21),
    }
    attr = {"ec_x": "ec_x_mm", "ec_y": "ec_y_mm", "width_x": "width_x_mm", "width_y": "width_y_mm"}
    attr |= {"ec_r": "ec_r_mm", "width_r": "width_r_mm", "sparsity": "sparsity"}
    for z in (0, 10, 44):
        for g, bins in fixed.items():
            a, b = getattr(ref, attr[g])[:, z], getattr(gen, attr[g])[:, z]
            assert ours[f"{g}/{z}"] == pytest.approx(official(a, b, bins), abs=1e-12), (g, z)
        bins = np.logspace(np.log10(thr), np.log10(ref.e_layer_mev[:, z].max()), 40)
        expected = official(ref.e_layer_mev[:, z], gen.e_layer_mev[:, z], bins)
        assert ours[f"e_layer/{z}"] == pytest.approx(expected, abs=1e-12)
    bins = np.linspace(0.5, 1.5, 101)
    assert ours["etot_einc"] == pytest.approx(
        official(ref.etot_over_einc, gen.etot_over_einc, bins), abs=1e-12
    )
    x_r, x_g = np.where(x_ref < thr, 0, x_ref), np.where(x_gen < thr, 0, x_gen)
    # plot_cell_dist (in float64: on a float32 file np.log10 of the float32 maximum moves the last edge
    # by a float32 rounding)
    bins = np.logspace(np.log10(thr), np.log10(float(x_r.max())), 50)
    assert ours["voxel_energy"] == pytest.approx(official(x_r.ravel(), x_g.ravel(), bins), abs=1e-12)
