"""Conditions, condition vocabulary, the shower record and its native HDF5 file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.formats import native
from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.stats import StatsAccumulator, compute_stats
from caloforge.platform.conditioning import (
    N_PARTICLE_TYPES,
    UNKNOWN_PARTICLE_INDEX,
    Conditions,
    ConditionVocab,
    pdg_of,
)


def _set(n: int = 20, seed: int = 0, detector: str = "par04-siw") -> ShowerSet:
    rng = np.random.default_rng(seed)
    x = rng.gamma(0.3, 5.0, size=(n, 6, 4, 3)).astype(np.float32)
    x[x < 1.0] = 0.0
    cond = Conditions.make(rng.uniform(1e3, 1e5, n), np.pi / 2, 0.1, 11, detector)
    return ShowerSet(x, cond, source="test", seed=seed)


def test_particles_and_vocab() -> None:
    assert N_PARTICLE_TYPES == 13
    assert pdg_of("pi+") == 211 and pdg_of("-211") == -211 and pdg_of(22) == 22
    with pytest.raises(ValueError, match="unknown particle 'muon'"):
        pdg_of("muon")
    vocab = ConditionVocab.create(["a", "b"], spare_slots=1)
    cond = Conditions.make([1.0, 2.0], 1.0, 0.0, [11, 999], ["b", "a"])
    t = vocab.encode(cond)
    assert t.detector_idx.tolist() == [1, 0]
    assert t.particle_idx.tolist() == [0, UNKNOWN_PARTICLE_INDEX]
    v2 = vocab.with_detector("c")
    assert v2.detector_index("c") == 2 and v2.n_detector_slots == 3
    with pytest.raises(ValueError, match="no spare detector slot"):
        v2.with_detector("d")
    with pytest.raises(ValueError, match=r"unknown detector\(s\) \['zz'\]"):
        vocab.encode(Conditions.make([1.0], 1.0, 0.0, 11, "zz"))


def test_showerset_validation() -> None:
    cond = Conditions.make([1.0, 2.0], 1.0, 0.0, 11, "a")
    with pytest.raises(ValueError, match=r"3 showers but 2 conditions"):
        ShowerSet(np.zeros((3, 2, 2, 2), np.float32), cond)
    with pytest.raises(ValueError, match="expected float32"):
        ShowerSet(np.zeros((2, 2, 2, 2)), cond)
    with pytest.raises(ValueError, match="expected 4-D"):
        ShowerSet(np.zeros((2, 8), np.float32), cond)


def test_native_round_trip_and_errors(tmp_path: Path) -> None:
    data = _set()
    path = native.write(tmp_path / "d.h5", data)
    back = native.read(path)
    np.testing.assert_array_equal(back.showers_NZPR, data.showers_NZPR)
    for f in Conditions.fields():
        np.testing.assert_array_equal(getattr(back.conditions, f), getattr(data.conditions, f))
    assert back.source == "test" and back.seed == 0
    assert not (tmp_path / "d.h5.tmp").exists()
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.attrs["format"] = native.FORMAT
        f.attrs["format_version"] = 1
        f.create_dataset("showers", data=np.zeros((2, 1, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"bad\.h5: missing key\(s\)"):
        native.read(tmp_path / "bad.h5")
    with pytest.raises(ValueError, match="file not found"):
        native.read(tmp_path / "nope.h5")


def test_batch_from_numpy_keeps_conditions() -> None:
    data = _set(5)
    batch = ShowerBatch.from_numpy(data.showers_NZPR, data.conditions)
    assert len(batch) == 5 and batch.showers_BZPR.shape == (5, 6, 4, 3)
    np.testing.assert_array_equal(batch.conditions().energy_mev, data.conditions.energy_mev)


def test_stats_layer_energy_and_layer_log_max_on_a_hand_made_example() -> None:
    eps = 1e-6
    # Mesh (3, 1, 2): layer 2 is never hit. E_z / E_inc: shower 1 → [0.4, 0, 0], shower 2 → [0.1, 0.3, 0].
    s1 = np.array([[[1.0, 3.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    s2 = np.array([[[2.0, 0.0]], [[4.0, 2.0]], [[0.0, 0.0]]])
    showers = np.stack([s1, s2]).astype(np.float32)
    energy, theta = np.array([10.0, 20.0]), np.array([1.5, 1.6])
    direct = compute_stats(showers, energy, theta)
    np.testing.assert_allclose(
        direct["layer_energy_over_einc_mean"], [0.25, 0.15, 0.0], rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(direct["layer_energy_over_einc_std"], [0.15, 0.15, 0.0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        direct["layer_log_max"], [np.log(3.0 + eps), np.log(4.0 + eps), np.log(eps)], rtol=1e-12, atol=0
    )
    assert direct["layer_log_max"][2] == math.log(direct["log_eps"]), (
        "a never-hit layer's max is ln ε exactly"
    )
    # Accumulated shower by shower and merged, the same numbers (max of maxima, pooled moments).
    acc_1, acc_2 = StatsAccumulator((3, 1, 2)), StatsAccumulator((3, 1, 2))
    acc_1.update(showers[:1], energy[:1], theta[:1])
    acc_2.update(showers[1:], energy[1:], theta[1:])
    merged = acc_1.merge(acc_2).result()
    for key in ("layer_energy_over_einc_mean", "layer_energy_over_einc_std", "layer_log_max"):
        np.testing.assert_allclose(merged[key], direct[key], rtol=1e-12, atol=1e-15, err_msg=key)
    np.testing.assert_allclose(acc_2.result()["layer_energy_over_einc_std"], [0.0, 0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(acc_1.result()["layer_log_max"], [np.log(3.0 + eps), np.log(eps), np.log(eps)])
    assert json.loads(json.dumps(direct)) == direct, "the stats block stays JSON-able"


def test_stats_merge_equals_direct() -> None:
    a, b = _set(30, 1), _set(50, 2)
    both = ShowerSet.concat([a, b])
    direct = compute_stats(both.showers_NZPR, both.conditions.energy_mev, both.conditions.theta_rad)
    acc_a = StatsAccumulator(a.mesh_shape)
    acc_a.update(a.showers_NZPR, a.conditions.energy_mev, a.conditions.theta_rad)
    acc_b = StatsAccumulator(b.mesh_shape)
    acc_b.update(b.showers_NZPR, b.conditions.energy_mev, b.conditions.theta_rad)
    merged = acc_a.merge(acc_b).result()
    for key in ("log_mean", "log_std", "occupancy", "etot_over_einc_mean"):
        assert merged[key] == pytest.approx(direct[key], rel=1e-9)
    for key in ("layer_energy_over_einc_mean", "layer_energy_over_einc_std", "layer_log_max"):
        np.testing.assert_allclose(merged[key], direct[key], rtol=1e-9, err_msg=key)
    x = both.showers_NZPR.astype(np.float64)
    assert direct["log_mean"] == pytest.approx(np.log(x + 1e-6).mean(), rel=1e-9)
    assert direct["log_std"] == pytest.approx(np.log(x + 1e-6).std(), rel=1e-6)
    assert direct["occupancy"] == pytest.approx((x > 0).mean())
    efrac = x.sum(axis=(2, 3)) / both.conditions.energy_mev[:, None]
    np.testing.assert_allclose(direct["layer_energy_over_einc_mean"], efrac.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(direct["layer_energy_over_einc_std"], efrac.std(axis=0), rtol=1e-6)
    np.testing.assert_allclose(direct["layer_log_max"], np.log(x + 1e-6).max(axis=(0, 2, 3)), rtol=1e-12)
