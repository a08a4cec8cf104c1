"""High-level features on hand-made showers whose features are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caloforge.evaluation.features import (
    ShowerFeatures,
    compute_features,
    voxel_log_edges,
)
from caloforge.platform.geometry import Mesh

MESH = Mesh(4, 8, (0.0, 2.0, 4.0, 8.0))  # r centres 1, 3, 6 mm; φ centres −π + (j + ½)π/4
EDGES = voxel_log_edges(0.01, 1000.0, 10)


def features(x: np.ndarray, e_inc: float | np.ndarray = 100.0, thr: float = 0.0) -> ShowerFeatures:
    x = np.asarray(x, dtype=np.float32)
    e = np.broadcast_to(np.asarray(e_inc, dtype=np.float64), (len(x),))
    return compute_features(x, e, MESH, thr, EDGES)


def test_single_voxel_centre_is_its_bin_centre_and_width_zero() -> None:
    x = np.zeros((1, *MESH.shape))
    x[0, 2, 5, 1] = 10.0
    f = features(x)
    phi = MESH.phi_centers_rad()[5]
    assert f.ec_x_mm[0, 2] == pytest.approx(3.0 * math.cos(phi))
    assert f.ec_y_mm[0, 2] == pytest.approx(3.0 * math.sin(phi))
    assert f.ec_r_mm[0, 2] == pytest.approx(3.0)
    assert f.width_x_mm[0, 2] == pytest.approx(0.0, abs=1e-6)
    assert f.width_r_mm[0, 2] == pytest.approx(0.0, abs=1e-6)
    # empty layers: centre and width 0 (official 0/(0 + 1e-16)), all voxels empty
    assert f.ec_x_mm[0, 0] == 0.0 and f.width_x_mm[0, 0] == 0.0
    assert f.sparsity[0, 0] == 1.0
    assert f.sparsity[0, 2] == pytest.approx(1.0 - 1.0 / (8 * 3))
    assert f.e_layer_mev[0].tolist() == [0.0, 0.0, 10.0, 0.0]
    assert f.depth[0] == pytest.approx(2.0)
    assert f.etot_over_einc[0] == pytest.approx(0.1)


def test_two_opposite_voxels_have_known_centre_and_width() -> None:
    # equal energies at φ_j and φ_j + π in radial bin 2 (r = 6): centre 0, width_x = 6 |cos φ_j|
    x = np.zeros((1, *MESH.shape))
    x[0, 1, 1, 2] = 5.0
    x[0, 1, 5, 2] = 5.0
    f = features(x)
    phi = MESH.phi_centers_rad()[1]
    assert f.ec_x_mm[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert f.ec_y_mm[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert f.width_x_mm[0, 1] == pytest.approx(6.0 * abs(math.cos(phi)))
    assert f.width_y_mm[0, 1] == pytest.approx(6.0 * abs(math.sin(phi)))
    assert f.ec_r_mm[0, 1] == pytest.approx(6.0)
    # energy-weighted radial moments: two radii 1 and 6 with weights 1:3 in one layer
    y = np.zeros((1, *MESH.shape))
    y[0, 3, 0, 0] = 1.0
    y[0, 3, 0, 2] = 3.0
    g = features(y)
    mean = (1 * 1 + 3 * 6) / 4
    assert g.ec_r_mm[0, 3] == pytest.approx(mean)
    assert g.width_r_mm[0, 3] == pytest.approx(math.sqrt((1 * 1 + 3 * 36) / 4 - mean**2))


def test_threshold_profiles_spectrum_and_depth() -> None:
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, (5, *MESH.shape)) * (rng.random((5, *MESH.shape)) < 0.5)
    thr = 0.3
    x[0, 0, 0, 0] = thr  # exactly at the threshold: kept (official np.where(x < min_energy, 0, x))
    f = features(x, e_inc=np.arange(1, 6) * 50.0, thr=thr)
    kept = np.where(x < thr, 0.0, x)
    assert f.e_layer_mev[0, 0] >= thr
    np.testing.assert_allclose(f.e_layer_mev, kept.sum(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(f.e_r_mev, kept.sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(f.e_phi_mev, kept.sum(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(f.sparsity, 1.0 - (kept > 0).mean(axis=(2, 3)))
    z = np.arange(MESH.n_z)
    np.testing.assert_allclose(f.depth, (kept.sum(axis=(2, 3)) @ z) / kept.sum(axis=(1, 2, 3)), rtol=1e-6)
    # the voxel spectrum counts every kept voxel once, in the right log bin
    assert f.voxel_counts.sum(axis=1).tolist() == (kept > 0).sum(axis=(1, 2, 3)).tolist()
    expected = np.histogram(kept[0][kept[0] > 0], bins=EDGES)[0]
    np.testing.assert_array_equal(f.voxel_counts[0, 1:-1], expected)
    assert f.voxel_counts[:, 0].sum() == 0  # nothing between 0 and the lowest edge (0.01 < thr)


def test_rotation_by_half_turn_flips_centres() -> None:
    rng = np.random.default_rng(1)
    x = rng.exponential(1.0, (3, *MESH.shape))
    f = features(x)
    g = features(np.roll(x, MESH.n_phi // 2, axis=2))  # φ → φ + π
    np.testing.assert_allclose(g.ec_x_mm, -f.ec_x_mm, atol=1e-9)
    np.testing.assert_allclose(g.ec_y_mm, -f.ec_y_mm, atol=1e-9)
    np.testing.assert_allclose(g.width_x_mm, f.width_x_mm, atol=1e-9)
    np.testing.assert_allclose(g.ec_r_mm, f.ec_r_mm)


def test_chunking_subset_concat_and_vector() -> None:
    rng = np.random.default_rng(2)
    x = rng.exponential(1.0, (7, *MESH.shape)).astype(np.float32)
    e = np.full(7, 100.0)
    whole = compute_features(x, e, MESH, 0.1, EDGES)
    chunked = compute_features(x, e, MESH, 0.1, EDGES, chunk=3)
    np.testing.assert_allclose(whole.vector("extended"), chunked.vector("extended"))
    joined = ShowerFeatures.concat([whole.subset(slice(0, 4)), whole.subset(slice(4, 7))])
    np.testing.assert_array_equal(joined.voxel_counts, whole.voxel_counts)
    v = whole.vector()
    # the official prepare_high_data_for_classifier vector: 1 + 8 n_z + 1 columns
    assert v.shape == (7, 2 + 8 * MESH.n_z) and len(whole.vector_names()) == v.shape[1]
    ext = whole.vector("extended")
    assert ext.shape[1] == len(whole.vector_names("extended")) == 4 + 8 * MESH.n_z
    z = MESH.n_z
    np.testing.assert_allclose(v[:, 0], np.log10(e))
    np.testing.assert_allclose(v[:, 1 : 1 + z], np.log10(whole.e_layer_mev + 1e-8))
    np.testing.assert_allclose(v[:, 1 + z : 1 + 2 * z], whole.ec_x_mm / 100)
    np.testing.assert_allclose(v[:, 1 + 4 * z : 1 + 5 * z], whole.width_y_mm / 100)
    np.testing.assert_allclose(v[:, 1 + 5 * z], np.log10(whole.e_tot_mev + 1e-8))
    np.testing.assert_allclose(v[:, 2 + 5 * z : 2 + 6 * z], whole.sparsity)
    np.testing.assert_allclose(v[:, 2 + 7 * z :], whole.width_r_mm / 100)
    np.testing.assert_allclose(ext[:, -2:], np.stack([whole.etot_over_einc, whole.depth], axis=1))
    names = whole.vector_names()
    assert names[1 + 5 * z] == "log10_e_tot" and names[-1] == f"width_r_{z - 1}"


def test_coordinates_match_the_calochallenge_convention() -> None:
    x, y, r = MESH.voxel_coordinates_mm()
    assert x.shape == (MESH.n_phi, MESH.n_r)
    np.testing.assert_allclose(np.hypot(x, y), r)
    np.testing.assert_allclose(
        np.arctan2(y[:, 0], x[:, 0]) % (2 * np.pi), MESH.phi_centers_rad() % (2 * np.pi)
    )


@pytest.mark.parametrize(
    ("shape", "energy", "match"),
    [
        ((2, 4, 8, 4), [1.0, 1.0], "mesh shape"),
        ((2, 4, 8, 3), [1.0], "2 showers"),
        ((2, 4, 8, 3), [1.0, -1.0], "> 0"),
    ],
)
def test_bad_inputs_are_value_errors(shape: tuple, energy: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_features(np.zeros(shape, np.float32), np.asarray(energy), MESH, 0.0, EDGES)
    with pytest.raises(ValueError, match="non-finite"):
        bad = np.zeros((1, *MESH.shape), np.float32)
        bad[0, 0, 0, 0] = np.nan
        compute_features(bad, np.ones(1), MESH, 0.0, EDGES)


def test_layer_profiles_and_their_deviations_by_hand() -> None:
    from caloforge.evaluation.api import layer_profile_deviations, layer_profiles

    # reference: layer 1 holds 2 voxels of 5 MeV at r = 1 and r = 3 (width 1 mm), layer 2 one voxel of
    # 90 MeV (width 0), layer 3 a 0.5 MeV voxel (0.5 % of the energy: below the 1 % cut), layer 0 empty
    ref = np.zeros((2, *MESH.shape))
    ref[:, 1, 0, 0] = ref[:, 1, 0, 1] = 5.0
    ref[:, 2, 3, 2] = 90.0
    ref[:, 3, 0, 0] = 0.5
    # sample: shower 0 as the reference; shower 1 has a third hit in layer 1 (r = 6), layer 3 hit twice
    gen = ref.copy()
    gen[1, 1, 4, 2] = 5.0
    gen[1, 3, 2, 2] = 0.5
    fr, fg = features(ref), features(gen)
    pr = layer_profiles(fr)
    assert pr["hits"].tolist() == pytest.approx([0.0, 2.0, 1.0, 1.0])
    assert pr["width_r"].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-6)
    assert pr["energy_frac"].tolist() == pytest.approx([0.0, 10.0 / 100.5, 90.0 / 100.5, 0.5 / 100.5])
    # sample layer 1: hits (2 + 3)/2 = 2.5; widths 1 and std of {1, 3, 6} = sqrt(38/9) → mean
    width_3 = math.sqrt((1 + 9 + 36) / 3 - (10 / 3) ** 2)
    dev = layer_profile_deviations(fr, fg)
    # only layers 1 and 2 carry > 1 % of the reference energy; layer 2 has width 0 in both: no deviation
    assert dev["hits"].tolist() == pytest.approx([2.5 / 2.0 - 1.0, 0.0])
    assert dev["width_r"].tolist() == pytest.approx([(1.0 + width_3) / 2.0 - 1.0, 0.0])
