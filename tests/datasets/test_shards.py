"""Sharding real files of every format into real tar shards: manifest, splits, stats, determinism,
integrity."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import webdataset as wds

from caloforge.config import ConfigError, load_config
from caloforge.datasets.formats import calochallenge, native
from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.shards import (
    Manifest,
    ShardConfig,
    ShardJob,
    SourceSpec,
    SplitFractions,
    shard_samples,
    write_shards,
)
from caloforge.datasets.stats import compute_stats
from caloforge.datasets.streaming import load_split
from caloforge.platform.geometry import load_detector

SMALL_MESH = (6, 4, 3)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


@pytest.fixture
def sources(tmp_path: Path, showers_factory, detector_yaml) -> dict:
    """Three real source files: native (det-a, e- and gamma), CaloChallenge (det-b), LEMURS (det-c)."""
    pdg = np.where(np.arange(120) % 3 == 0, 22, 11)
    a = showers_factory(120, detector="det-a", seed=1, pdg=pdg)
    native.write(tmp_path / "a.h5", a)
    b = showers_factory(70, detector="det-b", seed=2, energy_offset_mev=0.5)
    calochallenge.write(tmp_path / "b.h5", b)
    c = showers_factory(50, detector="det-c", seed=3, energy_offset_mev=0.25)
    det_c = detector_yaml("det-c", SMALL_MESH)
    with h5py.File(tmp_path / "c.h5", "w") as f:  # LEMURS layout: (N, R, Phi, Z), visible energies
        f_e = load_detector(det_c).sampling_fraction
        f.create_dataset("showers", data=(c.showers_NZPR.transpose(0, 3, 2, 1) * f_e).astype(np.float32))
        f.create_dataset("incident_energy", data=c.conditions.energy_mev)
        f.create_dataset("incident_theta", data=c.conditions.theta_rad)
        f.create_dataset("incident_phi", data=c.conditions.phi_rad)
    specs = [
        SourceSpec(tmp_path / "a.h5"),
        SourceSpec(tmp_path / "b.h5", "calochallenge", "det-b", mesh_shape=SMALL_MESH),
        SourceSpec(tmp_path / "c.h5", "lemurs", str(det_c)),
    ]
    return {"specs": specs, "sets": {"det-a": a, "det-b": b, "det-c": c}}


def _all_energies(directory: Path) -> dict[str, np.ndarray]:
    return {s: load_split(directory, s).conditions.energy_mev for s in ("train", "val", "test")}


def test_manifest_counts_splits_groups_and_checksums(tmp_path: Path, sources: dict) -> None:
    config = ShardConfig(showers_per_shard=16, split=SplitFractions(0.7, 0.2, 0.1), seed=5)
    m = write_shards(sources["specs"], tmp_path / "shards", config)
    assert m.data["format"] == "caloforge-shards" and m.payload_dtype == "float32"
    assert m.detectors == ["det-a", "det-b", "det-c"] and m.data["particles"] == ["e-", "gamma"]
    # exact split counts per source: round(f·n)
    c = m.counts
    assert c["train"]["per_detector"] == {"det-a": 84, "det-b": 49, "det-c": 35}
    assert c["val"]["per_detector"] == {"det-a": 24, "det-b": 14, "det-c": 10}
    assert c["test"]["total"] == 12 + 7 + 5
    assert (
        c["train"]["per_detector_particle"]["det-a"]["gamma"]
        + c["val"]["per_detector_particle"]["det-a"]["gamma"]
        + c["test"]["per_detector_particle"]["det-a"]["gamma"]
        == 40
    )
    # every shower lands in exactly one split
    energies = _all_energies(m.directory)
    seen = np.sort(np.concatenate(list(energies.values())))
    expected = np.sort(np.concatenate([s.conditions.energy_mev for s in sources["sets"].values()]))
    np.testing.assert_array_equal(seen, expected)
    for split in ("train", "val", "test"):
        shards = m.shards(split)
        assert sum(s.n_samples for s in shards) == c[split]["total"]
        for s in shards:
            assert s.name.startswith(f"{split}-") and s.name.endswith(".tar") and 1 <= s.n_samples <= 16
            data = (m.directory / s.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.bytes
            metas = [meta for meta, _ in shard_samples(m, s)]
            assert {(x["detector"], x["pdg"]) for x in metas} == {(s.detector, s.pdg)}  # one group per shard
    # geometry: DetectorSpec dict when known (YAML), mesh shape otherwise
    assert m.data["detectors"]["det-a"] == {"mesh_shape": [6, 4, 3]}
    assert m.detector_spec("det-c").name == "det-c" and m.detector_spec("det-a") is None
    assert m.data["mesh_shapes"]["det-b"] == [6, 4, 3]
    ranges = m.data["ranges"]["per_detector"]["det-b"]["energy_mev"]
    assert ranges == [
        sources["sets"]["det-b"].conditions.energy_mev.min(),
        sources["sets"]["det-b"].conditions.energy_mev.max(),
    ]
    assert m.verify() == []


def test_manifest_stats_match_direct_compute_on_train_split(tmp_path: Path, sources: dict) -> None:
    m = write_shards(sources["specs"], tmp_path / "shards", ShardConfig(showers_per_shard=32))
    train = load_split(m.directory, "train")
    direct = compute_stats(train.showers_NZPR, train.conditions.energy_mev, train.conditions.theta_rad)
    pooled = m.stats["pooled"]
    assert pooled.keys() == direct.keys() and pooled["n_showers"] == len(train)
    for key, value in direct.items():
        np.testing.assert_allclose(pooled[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    for det in m.detectors:
        sub = load_split(m.directory, "train", detector=det)
        per = compute_stats(sub.showers_NZPR, sub.conditions.energy_mev, sub.conditions.theta_rad)
        for key, value in per.items():
            np.testing.assert_allclose(
                m.stats["per_detector"][det][key], value, rtol=1e-9, atol=1e-12, err_msg=key
            )
    # LEMURS visible energies were calibrated with the detector's sampling fraction on the way in
    c = sources["sets"]["det-c"]
    got = load_split(m.directory, "train", detector="det-c")
    by_energy = dict(zip(c.conditions.energy_mev.tolist(), range(len(c)), strict=True))
    idx = [by_energy[e] for e in got.conditions.energy_mev.tolist()]
    np.testing.assert_allclose(got.showers_NZPR, c.showers_NZPR[idx], rtol=1e-5, atol=1e-9)


def test_same_inputs_and_seed_give_byte_identical_shards(tmp_path: Path, sources: dict) -> None:
    config = ShardConfig(showers_per_shard=20, seed=11, chunk_showers=25)
    m1 = write_shards(sources["specs"], tmp_path / "one", config)
    m2 = write_shards(sources["specs"], tmp_path / "two", config)
    files1 = sorted(p.name for p in m1.directory.iterdir())
    assert files1 == sorted(p.name for p in m2.directory.iterdir())
    for name in files1:
        assert (m1.directory / name).read_bytes() == (m2.directory / name).read_bytes(), name
    with tarfile.open(m1.directory / "train-000000.tar") as tf:
        members = tf.getmembers()
        assert {(x.mtime, x.uname, x.gname, x.mode) for x in members} == {
            (0, "caloforge", "caloforge", 0o444)
        }
        assert tf.pax_headers == {} and all(not x.pax_headers for x in members)
    m3 = write_shards(
        sources["specs"], tmp_path / "three", ShardConfig(showers_per_shard=20, seed=12, chunk_showers=25)
    )
    assert m3.data["shards"] != m1.data["shards"]
    assert _all_energies(m3.directory)["train"].tolist() != _all_energies(m1.directory)["train"].tolist()


def test_shards_are_plain_webdataset(tmp_path: Path, sources: dict) -> None:
    m = write_shards(sources["specs"][:1], tmp_path / "shards", ShardConfig(showers_per_shard=50))
    urls = [str(m.directory / s.name) for s in m.shards("train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == m.counts["train"]["total"]
    first = samples[0]
    meta = json.loads(first["meta.json"])
    assert set(meta) == {"energy_mev", "theta_rad", "phi_rad", "pdg", "detector", "source", "index", "shape"}
    assert meta["source"] == "a.h5" and meta["shape"] == [6, 4, 3]
    x = np.frombuffer(first["shower.f32"], dtype="<f4").reshape(meta["shape"])
    a = sources["sets"]["det-a"]
    np.testing.assert_array_equal(x, a.showers_NZPR[meta["index"]])
    assert meta["energy_mev"] == a.conditions.energy_mev[meta["index"]]


def test_float16_payload_precision_and_overflow(tmp_path: Path, showers_factory) -> None:
    base = showers_factory(200, seed=7)
    # a voxel spectrum spanning the whole float16 normal range: 15.15 keV threshold .. 60 GeV, 30% empty
    rng = np.random.default_rng(7)
    x = (10 ** rng.uniform(np.log10(0.5e-3 / 0.033), np.log10(6e4), base.showers_NZPR.shape)).astype(
        np.float32
    )
    x[rng.random(x.shape) < 0.3] = 0.0
    data = ShowerSet(x, base.conditions, "spectrum", 7)
    native.write(tmp_path / "a.h5", data)
    all_train = ShardConfig(split=SplitFractions(1.0, 0.0, 0.0), payload_dtype="float16")
    m = write_shards([tmp_path / "a.h5"], tmp_path / "f16", all_train)
    assert m.payload_member == "shower.f16"
    got = load_split(m.directory, "train")
    order = np.argsort(got.conditions.energy_mev)
    ref = x[np.argsort(data.conditions.energy_mev)]
    y = got.showers_NZPR[order]
    nz = ref > 0
    assert nz.sum() > 1000
    rel = np.abs(y[nz] - ref[nz]) / ref[nz]
    near_threshold = nz & (ref < 0.1)  # voxels between the 15.15 keV threshold and 100 keV
    assert near_threshold.sum() > 1000
    rel_thr = np.abs(y[near_threshold] - ref[near_threshold]) / ref[near_threshold]
    assert (
        rel.max() <= 2**-11 + 1e-9 and rel_thr.max() <= 2**-11 + 1e-9
    )  # half an ulp of an 11-bit significand
    assert np.all(y[~nz] == 0) and np.all(y[nz] > 0)  # nothing above 61 eV is flushed to zero
    with tarfile.open(m.directory / "train-000000.tar") as tf:
        sizes = {x.name.split(".", 1)[1]: x.size for x in tf.getmembers()}
    assert sizes["shower.f16"] == 2 * 72  # half of float32 (tar pads members to 512 bytes: use big meshes)
    hot = showers_factory(3, seed=8)
    np.minimum(hot.showers_NZPR, 100.0, out=hot.showers_NZPR)
    hot.showers_NZPR[1, 2, 0, 0] = 70000.0  # 70 GeV in one voxel: beyond float16
    native.write(tmp_path / "hot.h5", hot)
    with pytest.raises(ValueError, match=r"hot\.h5: a voxel holds 70000 MeV, beyond float16's maximum 65504"):
        write_shards([tmp_path / "hot.h5"], tmp_path / "hot", all_train)
    assert not (tmp_path / "hot").exists()


def test_writing_is_atomic_and_overwrite_is_explicit(tmp_path: Path, sources: dict, showers_factory) -> None:
    bad = showers_factory(10, seed=9)
    bad.showers_NZPR[4, 0, 0, 0] = np.nan
    native.write(tmp_path / "bad.h5", bad)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"bad\.h5: key 'showers': 1 NaN/inf value\(s\) in 1 shower\(s\) \(first at row 4\)"
    ):
        write_shards(
            [*sources["specs"], SourceSpec(tmp_path / "bad.h5")], out, ShardConfig(showers_per_shard=8)
        )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    first = write_shards(sources["specs"][:1], out, ShardConfig(showers_per_shard=8))
    with pytest.raises(ValueError, match=r"out: already exists \(set overwrite"):
        write_shards(sources["specs"][:1], out, ShardConfig())
    second = write_shards(sources["specs"][1:2], out, ShardConfig(overwrite=True))
    assert second.detectors == ["det-b"] and first.detectors == ["det-a"]
    assert not (out / "train-000010.tar").exists()  # the old set is gone, not merged
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"stranger: exists and is not a shard set; refusing"):
        write_shards(sources["specs"][:1], stranger, ShardConfig(overwrite=True))
    assert (stranger / "notes.txt").read_text() == "keep me"


def _corrupt(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_manifest_entry(m: Manifest, name: str) -> Manifest:
    """Make the manifest agree with a damaged shard's size and checksum (damage predating the manifest)."""
    raw = json.loads((m.directory / "manifest.json").read_text())
    for entry in raw["shards"]["train"]:
        if entry["name"] == name:
            data = (m.directory / name).read_bytes()
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (m.directory / "manifest.json").write_text(json.dumps(raw))
    return Manifest.load(m.directory)


def test_corrupt_and_truncated_shards_are_reported_by_name(tmp_path: Path, sources: dict) -> None:
    m = write_shards(sources["specs"][:1], tmp_path / "s", ShardConfig(showers_per_shard=30))
    shard = m.shards("train")[1]
    path = m.directory / shard.name
    original = path.read_bytes()
    _corrupt(path, 1536 + 40)  # inside the first payload (meta.json at 0/512, shower.f32 at 1024/1536)
    with pytest.raises(ValueError, match=rf"{shard.name}: sha256 mismatch .*corrupt shard"):
        next(shard_samples(m, shard))
    assert any(shard.name in p for p in m.verify())
    assert len(list(shard_samples(m, shard, verify="structure"))) == shard.n_samples  # (documented limit)
    path.write_bytes(original)
    _corrupt(path, 512 + 2)  # inside the first meta.json
    with pytest.raises(ValueError, match=rf"{shard.name}: sample '000_\d+': invalid meta\.json"):
        next(shard_samples(m, shard, verify="structure"))
    path.write_bytes(original)
    _corrupt(path, 1024 + 100)  # inside the second member's header
    with pytest.raises(
        ValueError, match=rf"{shard.name}: corrupt tar header at byte 1024 \(checksum mismatch\)"
    ):
        next(shard_samples(m, shard, verify="structure"))
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(
        ValueError, match=rf"{shard.name}: shard is \d+ bytes, the manifest says \d+ \(truncated\)"
    ):
        next(shard_samples(m, shard, verify="structure"))
    # damage that predates the manifest: a tar cut at a member boundary, manifest agreeing on size and hash
    with tarfile.open(fileobj=io.BytesIO(original)) as tf:
        members = tf.getmembers()
        cut = members[10].offset  # header of the 6th sample's first member
    path.write_bytes(original[:cut])
    with pytest.raises(ValueError, match=rf"\({shard.name}\): 30 samples of mesh .* need at least"):
        _rewrite_manifest_entry(m, shard.name)  # its sample count no longer fits: refused on load
    # (a cut that a consistent manifest describes: tests/datasets/test_reliability_data.py)
    path.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name}: shard listed in the manifest is missing"):
        next(shard_samples(m, shard))


def test_source_specs_and_configs(tmp_path: Path) -> None:
    assert SourceSpec.parse("x/y.h5") == SourceSpec(Path("x/y.h5"))
    assert SourceSpec.parse("d.hdf5:calochallenge:par04-siw") == SourceSpec(
        Path("d.hdf5"), "calochallenge", "par04-siw"
    )
    assert SourceSpec.parse("d.h5:lemurs") == SourceSpec(Path("d.h5"), "lemurs")
    with pytest.raises(ValueError, match=r"expected PATH\[:format\[:detector\]\]"):
        SourceSpec.parse("d.h5:hdf5")
    with pytest.raises(ValueError, match=r"split fractions must be >= 0 and sum to 1"):
        SplitFractions(0.5, 0.2, 0.2)
    with pytest.raises(ValueError, match=r"showers_per_shard must be >= 1"):
        ShardConfig(showers_per_shard=0)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "out_dir: out\nsources:\n  - {path: a.h5, format: lemurs, detector: d}\n"
        "shards: {seed: 3, payload_dtype: float64}\n"
    )
    with pytest.raises(ConfigError, match=r"job\.yaml: shards\.payload_dtype: 'float64' is not one of"):
        load_config(ShardJob, cfg)
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert configs, "configs/data/*.yaml: expected example shard configs"
    for path in configs:
        job = load_config(ShardJob, path)
        assert job.sources and job.shards.showers_per_shard >= 1


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere/manifest\.json: manifest not found"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match=r"not a caloforge-shards manifest"):
        Manifest.load(tmp_path / "bad")


def test_simulated_builtin_detectors_end_to_end(tmp_path: Path) -> None:
    """Simulator output (native) + a CaloChallenge file of built-in detectors, sharded and streamed."""
    simulator = pytest.importorskip("caloforge.datasets.simulator")
    from caloforge.config import to_dict
    from caloforge.datasets.streaming import ShowerStream, StreamConfig

    siw, scipb = load_detector("par04-siw"), load_detector("par04-scipb")
    a = simulator.simulate_dataset(siw, ["e-", "gamma"], 60, (1.0, 100.0), True, (80.0, 100.0), seed=1)
    b = simulator.simulate_dataset(scipb, ["e-"], 40, (1.0, 100.0), True, (80.0, 100.0), seed=2)
    native.write(tmp_path / "siw.h5", a)
    calochallenge.write(tmp_path / "scipb_cc.h5", b, include_conditions=True)
    m = write_shards(
        [
            SourceSpec(tmp_path / "siw.h5", detector="par04-siw"),
            SourceSpec(tmp_path / "scipb_cc.h5", "calochallenge", "par04-scipb"),
        ],
        tmp_path / "shards",
        ShardConfig(showers_per_shard=16),
    )
    assert m.data["detectors"]["par04-siw"] == to_dict(siw) and m.detector_spec("par04-scipb") == scipb
    assert m.data["mesh_shapes"] == {"par04-scipb": [45, 16, 9], "par04-siw": [45, 16, 9]}
    assert set(m.data["particles"]) <= {"e-", "gamma"} and m.counts["train"]["total"] == 48 + 32
    for det in ("par04-siw", "par04-scipb"):  # the simulator stores calibrated energies: E_tot/E_inc near 1
        assert 0.6 < m.stats["per_detector"][det]["etot_over_einc_mean"] < 1.2
    train = load_split(m.directory, "train", detector="par04-scipb")
    idx = {e: i for i, e in enumerate(b.conditions.energy_mev.tolist())}
    rows = [idx[e] for e in train.conditions.energy_mev.tolist()]
    np.testing.assert_array_equal(train.showers_NZPR, b.showers_NZPR[rows])
    np.testing.assert_array_equal(train.conditions.theta_rad, b.conditions.theta_rad[rows])
    batch = next(iter(ShowerStream(m.directory, StreamConfig(batch_size=20, shuffle_buffer=32))))
    assert batch.showers_BZPR.shape == (20, 45, 16, 9) and set(batch.detector) <= {"par04-siw", "par04-scipb"}
