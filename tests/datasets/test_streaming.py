"""ShowerStream over real shard sets: coverage across ranks × workers, mixing, determinism, resumption,
errors.

Every synthetic shower has a distinct incident energy, which serves as its identity here.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.formats import native
from caloforge.datasets.shards import ShardConfig, SplitFractions, shard_samples, write_shards
from caloforge.datasets.streaming import ShowerStream, StreamConfig, load_split, plan_groups, trained_ranges

SMALL_MESH = (6, 4, 3)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, showers_factory) -> Path:
    """det-a: 240 e- showers; det-b: 160 showers, half e-, half gamma; 10 showers per shard."""
    tmp = tmp_path_factory.mktemp("stream")
    native.write(tmp / "a.h5", showers_factory(240, detector="det-a", seed=1))
    pdg = np.where(np.arange(160) % 2 == 0, 11, 22)
    native.write(tmp / "b.h5", showers_factory(160, detector="det-b", seed=2, pdg=pdg, energy_offset_mev=0.5))
    write_shards([tmp / "a.h5", tmp / "b.h5"], tmp / "shards", ShardConfig(showers_per_shard=10, seed=3))
    return tmp / "shards"


def _energies(batches: list[ShowerBatch]) -> np.ndarray:
    return np.concatenate([b.energy_mev.numpy() for b in batches]) if batches else np.array([])


def test_batches_are_collated_tensors(shard_dir: Path) -> None:
    stream = ShowerStream(shard_dir, StreamConfig(batch_size=16, shuffle_buffer=64))
    batch = next(iter(stream))
    assert isinstance(batch, ShowerBatch) and len(batch) == 16
    assert batch.showers_BZPR.shape == (16, *SMALL_MESH) and batch.showers_BZPR.dtype == torch.float32
    assert batch.energy_mev.dtype == torch.float64 and batch.pdg.dtype == torch.int64
    assert set(batch.detector) <= {"det-a", "det-b"} and len(batch.detector) == 16
    train = load_split(shard_dir, "train")
    idx = {e: i for i, e in enumerate(train.conditions.energy_mev.tolist())}
    for k in range(16):  # each sample is exactly the stored shower with its own conditions
        i = idx[float(batch.energy_mev[k])]
        np.testing.assert_array_equal(batch.showers_BZPR[k].numpy(), train.showers_NZPR[i])
        assert (
            batch.detector[k] == train.conditions.detector[i] and int(batch.pdg[k]) == train.conditions.pdg[i]
        )


def _single_pass(shard_dir: Path, world_size: int, num_workers: int, **kw) -> list[np.ndarray]:
    cfg = StreamConfig(batch_size=7, shuffle_buffer=20, mode="single_pass", num_workers=num_workers, **kw)
    return [
        _energies(list(ShowerStream(shard_dir, cfg, "train", rank, world_size, seed=4)))
        for rank in range(world_size)
    ]


def _assert_disjoint_complete(parts: list[np.ndarray], expected: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(expected) and len(np.unique(joined)) == len(joined)  # complete, no duplicates
    np.testing.assert_array_equal(np.sort(joined), np.sort(expected))
    assert all(len(p) > 0 for p in parts)


def test_single_pass_covers_split_exactly_once_across_ranks(shard_dir: Path) -> None:
    expected = load_split(shard_dir, "train").conditions.energy_mev
    _assert_disjoint_complete(_single_pass(shard_dir, world_size=4, num_workers=0), expected)
    _assert_disjoint_complete(
        _single_pass(shard_dir, world_size=1, num_workers=0, mix_level="batch"), expected
    )
    val = load_split(shard_dir, "val").conditions.energy_mev
    parts = [
        _energies(list(ShowerStream(shard_dir, StreamConfig(batch_size=5, mode="single_pass"), "val", r, 2)))
        for r in range(2)
    ]
    _assert_disjoint_complete(parts, val)


@pytest.mark.slow
def test_single_pass_2_ranks_x_2_workers_disjoint_and_complete(shard_dir: Path) -> None:
    expected = load_split(shard_dir, "train").conditions.energy_mev
    parts = _single_pass(shard_dir, world_size=2, num_workers=2)
    _assert_disjoint_complete(parts, expected)
    # each (rank, worker) slot reads its own shards: the same split as 4 ranks × 0 workers
    four = _single_pass(shard_dir, world_size=4, num_workers=0)
    assert sorted(np.sort(np.concatenate(four[0:2])).tolist()) == sorted(np.sort(parts[0]).tolist())


def test_resampled_stream_is_infinite_full_and_rank_disjoint(shard_dir: Path) -> None:
    n_train = load_split(shard_dir, "train").conditions.energy_mev.size
    cfg = StreamConfig(batch_size=32, shuffle_buffer=50)
    per_rank = [list(islice(iter(ShowerStream(shard_dir, cfg, "train", r, 2, seed=1)), 15)) for r in range(2)]
    for batches in per_rank:
        assert len(batches) == 15 and all(len(b) == 32 for b in batches)  # 480 > 320 train showers: it wraps
    a, b = (_energies(x) for x in per_rank)
    assert len(a) > n_train and not set(a.tolist()) & set(b.tolist())  # ranks read disjoint shards


def test_same_seed_same_order_other_seed_other_order(shard_dir: Path) -> None:
    cfg = StreamConfig(batch_size=16, shuffle_buffer=40)
    runs = [list(islice(iter(ShowerStream(shard_dir, cfg, seed=s)), 6)) for s in (5, 5, 6)]
    for x, y in zip(runs[0], runs[1], strict=True):
        assert torch.equal(x.showers_BZPR, y.showers_BZPR) and torch.equal(x.energy_mev, y.energy_mev)
        assert x.detector == y.detector
    assert not np.array_equal(_energies(runs[0]), _energies(runs[2]))


def test_explicit_mixing_weights_are_observed(shard_dir: Path) -> None:
    cfg = StreamConfig(
        batch_size=50, shuffle_buffer=20, mixing="explicit", weights={"det-a": 0.2, "det-b": 0.8}
    )
    stream = ShowerStream(shard_dir, cfg, seed=7)
    assert stream.probabilities == pytest.approx({"det-a": 0.2, "det-b": 0.8})
    dets = np.concatenate([np.asarray(b.detector) for b in islice(iter(stream), 40)])
    frac = float(np.mean(dets == "det-b"))
    assert abs(frac - 0.8) < 4 * np.sqrt(0.8 * 0.2 / len(dets))  # 4σ with 2000 draws: ±0.036
    per_particle = StreamConfig(
        batch_size=50, mixing="explicit", weights={"det-b/gamma": 3.0, "det-a/e-": 1.0}
    )
    stream = ShowerStream(shard_dir, per_particle, seed=8)
    assert stream.probabilities == pytest.approx({"det-a/e-": 0.25, "det-b/gamma": 0.75})
    batches = list(islice(iter(stream), 30))
    pdg = np.concatenate([b.pdg.numpy() for b in batches])
    dets = np.concatenate([np.asarray(b.detector) for b in batches])
    assert set(zip(dets.tolist(), pdg.tolist(), strict=True)) == {
        ("det-a", 11),
        ("det-b", 22),
    }  # det-b e-: weight 0
    assert abs(np.mean(pdg == 22) - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(pdg))


def test_trained_ranges_cover_the_streamed_groups_only(shard_dir: Path) -> None:
    from caloforge.datasets.shards import Manifest
    from caloforge.platform.lineage import Lineage, TrainedRanges
    from caloforge.registry.card import ranges_from_lineage

    manifest = Manifest.load(shard_dir)
    stats = manifest.stats["per_detector"]
    both = trained_ranges(manifest, plan_groups(manifest, "train", StreamConfig()))
    assert both == TrainedRanges(
        energy_mev=(
            min(stats[d]["energy_mev_min"] for d in ("det-a", "det-b")),
            max(stats[d]["energy_mev_max"] for d in ("det-a", "det-b")),
        ),
        theta_rad=(
            min(stats[d]["theta_rad_min"] for d in ("det-a", "det-b")),
            max(stats[d]["theta_rad_max"] for d in ("det-a", "det-b")),
        ),
        particles=("e-", "gamma"),
        detectors=("det-a", "det-b"),
    )
    # det-b's e- left out by explicit weights: det-b's ranges, and only the particle that was streamed
    only_b_gamma = trained_ranges(
        manifest,
        plan_groups(manifest, "train", StreamConfig(mixing="explicit", weights={"det-b/gamma": 1.0})),
    )
    assert only_b_gamma.energy_mev == (stats["det-b"]["energy_mev_min"], stats["det-b"]["energy_mev_max"])
    assert only_b_gamma.theta_rad == (stats["det-b"]["theta_rad_min"], stats["det-b"]["theta_rad_max"])
    assert (only_b_gamma.particles, only_b_gamma.detectors) == (("gamma",), ("det-b",))
    # what the model card makes of them
    card = ranges_from_lineage(Lineage(trained=only_b_gamma), ("det-b",))
    assert card.source == "lineage" and card.particles == ("gamma",)
    assert card.energy_mev == only_b_gamma.energy_mev and card.theta_rad == only_b_gamma.theta_rad
    with pytest.raises(ValueError, match="no stream groups"):
        trained_ranges(manifest, [])


def test_proportional_temperature_and_batch_level_mixing(shard_dir: Path) -> None:
    from caloforge.datasets.shards import Manifest

    m = Manifest.load(shard_dir)
    n = m.counts["train"]["per_detector"]
    prop = {g.key: g.probability for g in plan_groups(m, "train", StreamConfig())}
    assert prop == pytest.approx({d: n[d] / sum(n.values()) for d in n})
    hot = {
        g.key: g.probability
        for g in plan_groups(m, "train", StreamConfig(mixing="temperature", temperature=4.0))
    }
    z = sum(v**0.25 for v in n.values())
    assert hot == pytest.approx({d: n[d] ** 0.25 / z for d in n})
    cfg = StreamConfig(
        batch_size=8, mix_level="batch", mixing="explicit", weights={"det-a": 0.5, "det-b": 0.5}
    )
    batches = list(islice(iter(ShowerStream(shard_dir, cfg, seed=2)), 40))
    assert all(len(set(b.detector)) == 1 for b in batches)  # one detector per batch
    assert 8 <= sum(b.detector[0] == "det-a" for b in batches) <= 32


def test_resume_single_pass_continues_exactly(shard_dir: Path) -> None:
    cfg = StreamConfig(batch_size=9, shuffle_buffer=30, mode="single_pass")
    full = list(ShowerStream(shard_dir, cfg, seed=3))
    first = ShowerStream(shard_dir, cfg, seed=3)
    head = list(islice(iter(first), 5))
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    assert state["epoch"] == 0 and state["batches_in_epoch"] == 5
    resumed = ShowerStream(shard_dir, cfg, seed=3)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for x, y in zip(head + tail, full, strict=True):
        assert torch.equal(x.energy_mev, y.energy_mev) and torch.equal(x.showers_BZPR, y.showers_BZPR)
    assert resumed.state_dict()["epoch"] == 1 and resumed.batches_yielded == len(full)
    other = ShowerStream(shard_dir, StreamConfig(batch_size=10, mode="single_pass"), seed=3)
    with pytest.raises(ValueError, match=r"stream state key 'batch_size': the state has 9, this stream 10"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"stream state key 'split'"):
        ShowerStream(shard_dir, cfg, split="val", seed=3).load_state_dict(state)


def test_resume_resampled_gives_a_fresh_deterministic_stream(shard_dir: Path) -> None:
    cfg = StreamConfig(batch_size=16, shuffle_buffer=40)
    run = ShowerStream(shard_dir, cfg, seed=9)
    it = iter(run)
    before = list(islice(it, 4))
    state = run.state_dict()
    assert (state["epoch"], state["batches_in_epoch"], state["batches_total"]) == (0, 4, 4)
    continued = list(islice(it, 4))
    resumed = []
    for _ in range(2):
        s = ShowerStream(shard_dir, cfg, seed=9)
        s.load_state_dict(state)
        resumed.append(list(islice(iter(s), 4)))
        assert s.state_dict()["epoch"] == 1 and s.state_dict()["batches_total"] == 8
    for x, y in zip(resumed[0], resumed[1], strict=True):  # deterministic from the state
        assert torch.equal(x.energy_mev, y.energy_mev)
    assert not np.array_equal(_energies(resumed[0]), _energies(continued))  # a new generation, not a replay
    assert not np.array_equal(_energies(resumed[0]), _energies(before))
    fresh = ShowerStream(shard_dir, cfg, seed=9)
    fresh_batches = list(islice(iter(fresh), 4))
    for x, y in zip(fresh_batches, before, strict=True):  # generation 0 again without a state
        assert torch.equal(x.energy_mev, y.energy_mev)


def test_stream_configuration_errors(shard_dir: Path, tmp_path: Path, showers_factory) -> None:
    with pytest.raises(ValueError, match=r"mixing weights: unknown detector 'det-z' in key 'det-z'"):
        ShowerStream(shard_dir, StreamConfig(mixing="explicit", weights={"det-a": 1.0, "det-z": 1.0}))
    with pytest.raises(ValueError, match=r"mixing weights: 'det-a/gamma' has no shards in split 'train'"):
        ShowerStream(shard_dir, StreamConfig(mixing="explicit", weights={"det-a/gamma": 1.0}))
    with pytest.raises(ValueError, match=r"unknown split 'dev' \(known: \['train', 'val', 'test'\]\)"):
        ShowerStream(shard_dir, split="dev")
    with pytest.raises(ValueError, match=r"manifest not found"):
        ShowerStream(tmp_path / "none")
    with pytest.raises(ValueError, match=r"weights are only used with mixing 'explicit'"):
        StreamConfig(weights={"det-a": 1.0})
    with pytest.raises(ValueError, match=r"use either detector keys or detector/particle keys"):
        StreamConfig(mixing="explicit", weights={"det-a": 1.0, "det-b/e-": 1.0})
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size"):
        ShowerStream(shard_dir, rank=2, world_size=2)
    native.write(tmp_path / "a.h5", showers_factory(30, detector="det-a", seed=1))
    native.write(tmp_path / "c.h5", showers_factory(30, mesh=(5, 4, 3), detector="det-c", seed=2))
    mixed = write_shards(
        [tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "mixed", ShardConfig(showers_per_shard=8)
    )
    with pytest.raises(ValueError, match=r"detectors mixed in one stream must share a mesh shape"):
        ShowerStream(mixed.directory)
    only_c = ShowerStream(
        mixed.directory, StreamConfig(mixing="explicit", weights={"det-c": 1.0}, batch_size=4)
    )
    assert next(iter(only_c)).showers_BZPR.shape == (4, 5, 4, 3)
    with pytest.raises(ValueError, match=r"mixes meshes .* pass detector="):
        load_split(mixed.directory, "train")
    assert len(load_split(mixed.directory, "train", detector="det-c", max_showers=5)) == 5


@pytest.fixture
def own_shards(tmp_path: Path, showers_factory) -> Path:
    native.write(tmp_path / "a.h5", showers_factory(100, detector="det-a", seed=11))
    all_train = ShardConfig(showers_per_shard=10, split=SplitFractions(1.0, 0.0, 0.0))
    return write_shards([tmp_path / "a.h5"], tmp_path / "own", all_train).directory


def test_corrupt_shard_stops_the_stream_naming_it(own_shards: Path) -> None:
    from caloforge.datasets.shards import Manifest

    m = Manifest.load(own_shards)
    bad = m.shards("train")[3]
    bad_energies = {meta["energy_mev"] for meta, _ in shard_samples(m, bad)}
    path = own_shards / bad.name
    data = bytearray(path.read_bytes())
    data[1536 + 8] ^= 0x01  # one bit of one voxel of the first sample
    path.write_bytes(bytes(data))
    seen: list[float] = []
    with pytest.raises(ValueError, match=rf"{bad.name}: sha256 mismatch"):
        for batch in ShowerStream(
            own_shards, StreamConfig(batch_size=4, shuffle_buffer=0, mode="single_pass")
        ):
            seen.extend(batch.energy_mev.tolist())
    assert seen and not bad_energies & set(seen)  # nothing of the corrupt shard was yielded
    path.unlink()
    with pytest.raises(ValueError, match=rf"{bad.name}: shard listed in the manifest is missing"):
        list(ShowerStream(own_shards, StreamConfig(batch_size=4, mode="single_pass")))


@pytest.mark.slow
def test_worker_errors_reach_the_caller_naming_the_shard(own_shards: Path) -> None:
    from caloforge.datasets.shards import Manifest

    bad = Manifest.load(own_shards).shards("train")[0]
    path = own_shards / bad.name
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(
        ValueError, match=rf"{bad.name}: shard is \d+ bytes, the manifest says \d+ \(truncated\)"
    ):
        list(ShowerStream(own_shards, StreamConfig(batch_size=4, mode="single_pass", num_workers=2)))


def test_load_split_limits(shard_dir: Path) -> None:
    part = load_split(shard_dir, "val", max_showers=7)
    assert len(part) == 7 and part.metadata["split"] == "val"
    one = load_split(shard_dir, "test", detector="det-b")
    assert set(one.conditions.detector) == {"det-b"}
    with pytest.raises(ValueError, match=r"unknown detector 'det-q'"):
        load_split(shard_dir, "test", detector="det-q")
