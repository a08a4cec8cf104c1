"""CaloChallenge and LEMURS files (real HDF5 files written with h5py), format dispatch and validation."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloforge.datasets import formats
from caloforge.datasets.formats import calochallenge, lemurs, native
from caloforge.platform.geometry import load_detector

SMALL_MESH = (6, 4, 3)
DS2_MESH = (45, 16, 9)


def _official_ds2_file(path: Path, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A file laid out like the official dataset-2 files: h5py, gzip, ``incident_energies`` (N, 1) and
    ``showers`` (N, 6480), voxel (layer, alpha, r) at layer·144 + alpha·9 + r (values encode the index)."""
    rng = np.random.default_rng(seed)
    layer, alpha, r = np.meshgrid(np.arange(45), np.arange(16), np.arange(9), indexing="ij")
    code = (layer * 1000 + alpha * 10 + r + 1).astype(np.float64)  # unique, positive, decodable
    flat = np.empty((n, 6480))
    for i in range(n):
        flat[i, (layer * 144 + alpha * 9 + r).ravel()] = (code * (i + 1)).ravel()
    energy = 10 ** rng.uniform(3, 6, (n, 1))
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=energy, compression="gzip")
        f.create_dataset("showers", data=flat.astype(np.float32), compression="gzip")
    return flat, energy


def test_official_ds2_layout_reads_in_canonical_order(tmp_path: Path) -> None:
    path = tmp_path / "dataset_2_like.hdf5"
    flat, energy = _official_ds2_file(path)
    data = calochallenge.read(path, "my-siw", mesh_shape="auto")
    assert data.mesh_shape == DS2_MESH and data.showers_NZPR.dtype == np.float32
    layer, alpha, r = 17, 5, 3
    assert data.showers_NZPR[1, layer, alpha, r] == 2 * (layer * 1000 + alpha * 10 + r + 1)
    np.testing.assert_array_equal(data.conditions.energy_mev, energy[:, 0])
    # the official HighLevelFeatures: layer l is data[:, 144 l : 144 (l+1)]; inside a layer the radial
    # centre of voxel k is r_centres[k % 9] (radial_center_mult = n_alpha × [r centres]); alpha = k // 9
    r_centres = calochallenge.DS2_MESH.r_centers_mm()
    for l in (0, 22, 44):
        block = flat[:, 144 * l : 144 * (l + 1)]
        official_e_layer = block.sum(axis=-1)
        official_ec_r = (np.tile(r_centres, 16) * block).sum(axis=-1) / block.sum(axis=-1)
        ours = data.showers_NZPR[:, l].astype(np.float64)
        np.testing.assert_allclose(ours.sum(axis=(1, 2)), official_e_layer, rtol=1e-6)
        np.testing.assert_allclose(
            (ours.sum(axis=1) * r_centres).sum(axis=1) / ours.sum(axis=(1, 2)), official_ec_r, rtol=1e-6
        )
        official_alpha_sums = block.reshape(-1, 16, 9).sum(axis=2)  # _DrawSingleLayer: reshape(num_alpha, -1)
        np.testing.assert_allclose(ours.sum(axis=2), official_alpha_sums, rtol=1e-6)
    # what the file does not store: documented defaults
    assert np.all(data.conditions.theta_rad == math.pi / 2) and np.all(data.conditions.phi_rad == 0.0)
    assert np.all(data.conditions.pdg == 11) and set(data.conditions.detector) == {"my-siw"}
    over = calochallenge.read(path, "my-siw", mesh_shape="ds2", theta_rad=1.0, phi_rad=0.5, particle="gamma")
    assert np.all(over.conditions.theta_rad == 1.0) and np.all(over.conditions.pdg == 22)


def test_write_then_read_round_trip_and_official_reader_contract(
    showers_factory, tmp_path: Path, detector_yaml
) -> None:
    det = detector_yaml("siw-test", DS2_MESH)
    data = showers_factory(12, mesh=DS2_MESH, detector="siw-test", seed=3)
    path = calochallenge.write(tmp_path / "out.h5", data)
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["incident_energies", "showers"]
        e, x = f["incident_energies"][:], f["showers"][:]
        assert e.dtype == np.float64 and e.shape == (12, 1)
        assert x.dtype == np.float32 and x.shape == (12, 6480)
        assert f["showers"].compression == "gzip"
    # index = layer·(n_alpha·n_r) + alpha·n_r + r
    assert x[5, 30 * 144 + 7 * 9 + 2] == data.showers_NZPR[5, 30, 7, 2]
    # the official evaluate.py: check_file, then the low-level classifier input (float64 with float32 voxels)
    assert x.shape[1] == {"2": 6480}["2"] and x.shape[0] == e.shape[0]
    low = np.concatenate([np.log10(e), 100.0 * x / e, np.ones_like(e)], axis=1)
    assert low.dtype == np.float64 and low.shape == (12, 6482)
    back = calochallenge.read(path, det)
    np.testing.assert_array_equal(back.showers_NZPR, data.showers_NZPR)
    np.testing.assert_array_equal(back.conditions.energy_mev, data.conditions.energy_mev)
    # per-shower θ/φ are not storable in the official layout: defaults come back, unless included
    assert np.all(back.conditions.theta_rad == math.pi / 2)
    full = calochallenge.read(calochallenge.write(tmp_path / "full.h5", data, include_conditions=True), det)
    np.testing.assert_array_equal(full.conditions.theta_rad, data.conditions.theta_rad)
    np.testing.assert_array_equal(full.conditions.phi_rad, data.conditions.phi_rad)
    # our writer records the detector and mesh: no arguments needed to read our own file
    assert set(calochallenge.read(path).conditions.detector) == {"siw-test"}


def test_calibration_on_write_and_read(showers_factory, tmp_path: Path, detector_yaml) -> None:
    det = detector_yaml("siw-test", DS2_MESH)
    data = showers_factory(3, mesh=DS2_MESH, detector="siw-test", seed=4)
    f_e = load_detector(det).sampling_fraction
    factor = calochallenge.recalibration_factor(f_e)
    assert factor == pytest.approx(f_e / 0.033)
    path = calochallenge.write(tmp_path / "cal.h5", data, calibration=factor, showers_dtype="float64")
    with h5py.File(path, "r") as f:
        stored = f["showers"][:]
    assert stored.dtype == np.float64
    np.testing.assert_allclose(
        stored, data.showers_NZPR.reshape(3, -1).astype(np.float64) * factor, rtol=1e-12
    )
    back = calochallenge.read(path, det)  # undoes the recorded factor
    np.testing.assert_allclose(back.showers_NZPR, data.showers_NZPR, rtol=1e-6)
    raw = calochallenge.read(path, det, calibration=1.0)
    np.testing.assert_allclose(raw.showers_NZPR, (data.showers_NZPR * factor), rtol=1e-6)


def test_ds3_mesh_is_inferred(tmp_path: Path) -> None:
    path = tmp_path / "ds3.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=np.array([[1e4], [2e5]]))
        f.create_dataset("showers", data=np.ones((2, 40500), dtype=np.float32))
    assert calochallenge.read(path, "ds3-like", mesh_shape="auto").mesh_shape == (45, 50, 18)
    assert calochallenge.DS3_MESH.r_edges_mm[-1] == pytest.approx(41.85)


def test_chunked_reading_matches_full_read(showers_factory, tmp_path: Path, detector_yaml) -> None:
    det = detector_yaml("siw-test", SMALL_MESH)
    data = showers_factory(50, detector="siw-test", seed=5)
    path = calochallenge.write(tmp_path / "c.h5", data)
    chunks = list(calochallenge.iter_read(path, det, start=3, max_showers=40, chunk_size=7))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 7, 5]
    assert [c.metadata["start"] for c in chunks][:2] == [3, 10]
    joined = np.concatenate([c.showers_NZPR for c in chunks])
    np.testing.assert_array_equal(joined, data.showers_NZPR[3:43])
    part = calochallenge.read(path, det, start=45, max_showers=100)
    assert len(part) == 5


def _lemurs_file(
    path: Path, n: int, mesh_zpr: tuple[int, int, int], seed: int = 0, **override: np.ndarray
) -> dict:
    rng = np.random.default_rng(seed)
    n_z, n_p, n_r = mesh_zpr
    keys = {
        "showers": rng.gamma(1.0, 0.05, (n, n_r, n_p, n_z)).astype(np.float32),
        "incident_energy": 10 ** rng.uniform(3, 6, n),
        "incident_theta": rng.uniform(0.5, 2.5, n),
        "incident_phi": rng.uniform(-3, 3, n),
    }
    keys.update(override)
    with h5py.File(path, "w") as f:
        for k, v in keys.items():
            f.create_dataset(k, data=v)
    return keys


def test_lemurs_read_transposes_and_calibrates(tmp_path: Path, detector_yaml) -> None:
    det = detector_yaml("lem-a", SMALL_MESH)
    raw = _lemurs_file(tmp_path / "lem.h5", 9, SMALL_MESH)
    data = lemurs.read(tmp_path / "lem.h5", det)
    assert data.mesh_shape == SMALL_MESH
    f_e = load_detector(det).sampling_fraction
    # (N, R, Phi, Z) -> (N, Z, P, R); visible energies / sampling fraction
    z, p, r = 4, 1, 2
    assert data.showers_NZPR[3, z, p, r] == pytest.approx(raw["showers"][3, r, p, z] / f_e, rel=1e-6)
    np.testing.assert_allclose(data.showers_NZPR, raw["showers"].transpose(0, 3, 2, 1) / f_e, rtol=1e-6)
    np.testing.assert_array_equal(data.conditions.energy_mev, raw["incident_energy"])
    np.testing.assert_array_equal(data.conditions.theta_rad, raw["incident_theta"])
    np.testing.assert_array_equal(data.conditions.phi_rad, raw["incident_phi"])
    assert data.metadata["calibration"] == pytest.approx(1 / f_e)
    gev = lemurs.read(tmp_path / "lem.h5", det, energy_unit="GeV", calibration=1.0)
    np.testing.assert_allclose(gev.conditions.energy_mev, raw["incident_energy"] * 1000)
    np.testing.assert_allclose(gev.showers_NZPR, raw["showers"].transpose(0, 3, 2, 1) * 1000, rtol=1e-6)
    custom = lemurs.read(tmp_path / "lem.h5", "unlisted-detector", calibration=2.0, particle="gamma")
    assert set(custom.conditions.detector) == {"unlisted-detector"} and np.all(custom.conditions.pdg == 22)


def test_lemurs_warns_on_implausible_response(
    tmp_path: Path, detector_yaml, caplog: pytest.LogCaptureFixture
) -> None:
    det = detector_yaml("lem-a", SMALL_MESH)
    _lemurs_file(tmp_path / "lem.h5", 4, SMALL_MESH)  # ~0.05 MeV voxels vs GeV energies: far from 1
    with caplog.at_level(logging.WARNING, logger="caloforge.datasets.formats.lemurs"):
        lemurs.read(tmp_path / "lem.h5", det)
    assert "E_tot/E_inc" in caplog.text


# -- loud validation ----------------------------------------------------------------------------------
def _cc(path: Path, energies: np.ndarray, showers: np.ndarray, extra: dict | None = None) -> Path:
    with h5py.File(path, "w") as f:
        if energies is not None:
            f.create_dataset("incident_energies", data=energies)
        if showers is not None:
            f.create_dataset("showers", data=showers)
        for k, v in (extra or {}).items():
            f.create_dataset(k, data=v)
    return path


GOOD_E = np.full((4, 1), 1e4)
GOOD_X = np.ones((4, 72), dtype=np.float32)


@pytest.mark.parametrize(
    ("energies", "showers", "match"),
    [
        (GOOD_E, None, r"missing key\(s\) \['showers'\]"),
        (np.full((4, 2), 1e4), GOOD_X, r"key 'incident_energies' has shape \(4, 2\), expected \(4, 1\)"),
        (np.full((3, 1), 1e4), GOOD_X, r"key 'incident_energies' has shape \(3, 1\), expected \(4, 1\)"),
        (GOOD_E, np.ones((4, 70), dtype=np.float32), r"70 voxels per shower, but mesh \(6, 4, 3\) has 72"),
        (
            GOOD_E,
            np.where(np.arange(72) == 5, np.nan, 1.0)[None].repeat(4, 0),
            r"key 'showers': 4 NaN/inf value\(s\) in 4 shower\(s\) \(first at row 0\)",
        ),
        (
            GOOD_E,
            np.where(np.arange(288).reshape(4, 72) == 80, np.inf, 1.0),
            r"1 NaN/inf value\(s\) in 1 shower\(s\) \(first at row 1\)",
        ),
        (
            GOOD_E,
            np.where(np.arange(288).reshape(4, 72) % 100 == 1, -0.2, 1.0),
            r"key 'showers': 3 negative voxel energies in 3 shower\(s\), first at row 0",
        ),
        (
            np.array([[1e4], [0.0], [1e4], [-5.0]]),
            GOOD_X,
            r"key 'incident_energies': 2 value\(s\) are <= 0 MeV \(first at row 1",
        ),
        (
            np.array([[1e4], [np.nan], [1e4], [1e4]]),
            GOOD_X,
            r"key 'incident_energies': 1 value\(s\) are NaN/inf",
        ),
    ],
)
def test_calochallenge_bad_input_is_a_clear_error(
    tmp_path: Path, detector_yaml, energies, showers, match
) -> None:
    det = detector_yaml("det-a", SMALL_MESH)
    path = _cc(tmp_path / "bad_file.h5", energies, showers)
    with pytest.raises(ValueError, match=match) as err:
        calochallenge.read(path, det)
    assert "bad_file.h5" in str(err.value)


def test_negative_clipping_only_when_asked(tmp_path: Path, detector_yaml) -> None:
    det = detector_yaml("det-a", SMALL_MESH)
    x = GOOD_X.copy()
    x[1, 3], x[2, 7] = -1e-7, -3e-6
    path = _cc(tmp_path / "neg.h5", GOOD_E, x)
    with pytest.raises(
        ValueError, match=r"2 negative voxel energies .* minimum -3e-06 MeV.*clip_negative_mev"
    ):
        calochallenge.read(path, det)
    data = calochallenge.read(path, det, clip_negative_mev=1e-5)
    assert data.metadata["n_clipped_negative"] == 2 and data.showers_NZPR.min() == 0.0
    assert data.showers_NZPR.reshape(4, -1)[1, 3] == 0.0
    with pytest.raises(ValueError, match=r"1 voxel energies below -clip_negative_mev=-1e-06 MeV"):
        calochallenge.read(path, det, clip_negative_mev=1e-6)


def test_detector_and_mesh_errors(tmp_path: Path, detector_yaml) -> None:
    path = _cc(tmp_path / "f.h5", GOOD_E, GOOD_X)
    with pytest.raises(ValueError, match=r"f\.h5: unknown detector 'nope'.*mesh_shape"):
        calochallenge.read(path, "nope")
    with pytest.raises(ValueError, match=r"f\.h5: this format does not store the detector"):
        calochallenge.read(path)
    with pytest.raises(
        ValueError, match=r"72 voxels per shower, which matches no known CaloChallenge dataset"
    ):
        calochallenge.read(path, "nope", mesh_shape="auto")
    wrong = detector_yaml("other", (4, 6, 3))
    with pytest.raises(
        ValueError, match=r"mesh_shape \(6, 4, 3\) differs from the mesh \(4, 6, 3\) of detector 'other'"
    ):
        calochallenge.read(path, wrong, mesh_shape=(6, 4, 3))
    with pytest.raises(ValueError, match=r"missing\.h5: file not found"):
        calochallenge.read(tmp_path / "missing.h5", wrong)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"text\.h5: not a readable HDF5 file"):
        formats.read_any(tmp_path / "text.h5")
    with pytest.raises(ValueError, match=r"start=10 is beyond the 4 showers"):
        calochallenge.read(path, "custom", mesh_shape=SMALL_MESH, start=10)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"incident_theta": np.full(5, 4.0)}, r"key 'incident_theta': 5 value\(s\) are outside \[0, π\] rad"),
        ({"incident_phi": np.full(4, 0.1)}, r"key 'incident_phi' has shape \(4,\), expected \(5,\)"),
        (
            {"showers": np.ones((5, 3, 4, 6, 1), dtype=np.float32)},
            r"key 'showers' has shape \(5, 3, 4, 6, 1\)",
        ),
        ({"incident_energy": -np.ones(5)}, r"key 'incident_energy': 5 value\(s\) are <= 0 MeV"),
    ],
)
def test_lemurs_bad_input_is_a_clear_error(tmp_path: Path, detector_yaml, override, match) -> None:
    det = detector_yaml("lem-a", SMALL_MESH)
    path = tmp_path / "bad_lemurs.h5"
    _lemurs_file(path, 5, SMALL_MESH, **override)
    with pytest.raises(ValueError, match=match) as err:
        lemurs.read(path, det)
    assert "bad_lemurs.h5" in str(err.value)


def test_lemurs_mesh_and_key_errors(tmp_path: Path, detector_yaml) -> None:
    path = tmp_path / "lem.h5"
    _lemurs_file(path, 3, SMALL_MESH)
    other = detector_yaml("lem-b", (45, 16, 9))
    with pytest.raises(
        ValueError, match=r"lem\.h5: key 'showers' has \(R, Phi, Z\) = \(3, 4, 6\), but detector 'lem-b'"
    ):
        lemurs.read(path, other)
    with pytest.raises(ValueError, match=r"unknown detector 'unlisted'"):
        lemurs.read(path, "unlisted")  # a custom name needs an explicit calibration
    with h5py.File(path, "a") as f:
        del f["incident_phi"]
    with pytest.raises(
        ValueError, match=r"lem\.h5: missing key\(s\) \['incident_phi'\] for the LEMURS format"
    ):
        lemurs.read(path, detector_yaml("lem-a", SMALL_MESH))


def test_dispatch_and_native_chunked_writer(showers_factory, tmp_path: Path, detector_yaml) -> None:
    det = detector_yaml("det-a", SMALL_MESH)
    data = showers_factory(30, detector="det-a", seed=6)
    native.write(tmp_path / "n.h5", data)
    calochallenge.write(tmp_path / "c.h5", data)
    _lemurs_file(tmp_path / "l.h5", 5, SMALL_MESH)
    assert [formats.detect_format(tmp_path / n) for n in ("n.h5", "c.h5", "l.h5")] == [
        "native",
        "calochallenge",
        "lemurs",
    ]
    assert formats.inspect_file(tmp_path / "c.h5").showers_shape == (30, 72)
    got = formats.read_any(tmp_path / "n.h5", chunk_size=8)
    np.testing.assert_array_equal(got.showers_NZPR, data.showers_NZPR)
    np.testing.assert_array_equal(got.conditions.phi_rad, data.conditions.phi_rad)
    with pytest.raises(ValueError, match=r"option\(s\) \['mesh_shape'\] do not apply to the native format"):
        formats.read_any(tmp_path / "n.h5", mesh_shape=(6, 4, 3))
    with pytest.raises(
        ValueError,
        match=r"rows 0\.\.29 name detector\(s\) \['det-a'\], but the source was declared as detector 'x'",
    ):
        formats.read_any(tmp_path / "n.h5", detector="x")
    # chunk by chunk into the native layout: native.read sees exactly what native.write would have written
    with formats.NativeWriter(tmp_path / "n2.h5", SMALL_MESH, data.source, data.seed, data.metadata) as w:
        for chunk in formats.iter_any(tmp_path / "c.h5", detector=det, chunk_size=7):
            w.append(chunk)
    again = native.read(tmp_path / "n2.h5")
    np.testing.assert_array_equal(again.showers_NZPR, data.showers_NZPR)
    np.testing.assert_array_equal(again.conditions.energy_mev, data.conditions.energy_mev)
    assert again.source == data.source and again.seed == data.seed and again.metadata == data.metadata
    assert not (tmp_path / "n2.h5.tmp").exists()
