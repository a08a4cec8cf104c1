"""Streams of ``ShowerBatch`` from shard sets (webdataset pipelines), for training and evaluation.

``ShowerStream(manifest_dir, StreamConfig, split, rank, world_size, seed)`` is an iterable of
``ShowerBatch`` (raw MeV, untransformed; batches are collated in the producing process).

**Slots.** A stream runs ``num_workers`` DataLoader workers (or the calling process when 0) on each of
``world_size`` ranks: ``world_size × max(1, num_workers)`` slots, slot = rank·W + worker. Shards are
assigned to slots *before* anything is shuffled (slot ``s`` takes shards ``s, s+S, s+2S, …`` of each group,
in manifest order), so ranks and workers read disjoint shards.

**Groups and mixing.** Each detector — or each (detector, particle) when explicit weights are given per
particle as ``"detector/particle"`` keys — is a group with its own webdataset sub-pipeline (shards in a
seeded order → strict tar parsing → seeded shuffle buffer of ``shuffle_buffer`` samples). A seeded draw picks
the group that supplies each sample (``mix_level="sample"``) or each whole batch (``"batch"``) with
probabilities ``proportional`` to the group sizes n_g, ``temperature``-scaled (∝ n_g^(1/T): T = 1 is
proportional, large T tends to uniform) or ``explicit`` (``weights``; groups not named get 0). All groups of
a stream must share one mesh shape (checked up front), so every batch has one shape.

**Modes.** ``resampled`` (pretraining): every slot loops over its shards forever, reshuffling the shard
order on each pass; when a group has fewer shards than slots, every slot reads all of them (with its own
order and shuffle seed) — a warning says so. The stream never ends: every rank can take exactly the same
number of batches per step budget, so distributed training never hangs on uneven data; batches are always
full. ``single_pass`` (evaluation): each slot reads its shards once; together the slots cover every sample
of the split's weighted groups exactly once (complete and disjoint across ranks × workers); the last batch
of a slot may be short (``drop_last`` drops it), and ranks may get different numbers of batches.

**Seeds.** Every draw is derived from (seed, purpose, epoch, group, slot[, pass]) through
``caloforge.platform.seeding``; the same manifest, config, split, rank, world_size and seed give the same
batches in the same order (the DataLoader returns worker batches round-robin in order).

**Resumption** (``state_dict()`` / ``load_state_dict()``; states are small dicts of ints and strings).

- ``single_pass``: the state is (epoch, batches yielded in that epoch). A stream that loads it replays the
  same epoch deterministically and skips the batches already yielded (they are read and decoded again, not
  returned), so the batches before and after the interruption together cover the pass exactly once, in the
  same order as an uninterrupted run. Requires the same manifest, split, seed, rank, world_size,
  num_workers and mixing/batch settings (checked; a mismatch is a ValueError naming the key). A completed
  pass increments the epoch, and the next pass uses a fresh order.
- ``resampled``: exact replay would cost a re-read of everything seen, so the state is (generation,
  batches yielded, batches yielded in total) and each ``iter()`` starts a new *generation* whose seeds
  derive from (seed, generation). Loading a state makes the next ``iter()`` use generation + 1: the resumed
  stream is a fresh stream with the same mixing weights, shard pool and shuffle settings — statistically
  identical to continuing, and deterministic (resuming twice from one state gives identical batches) —
  but it does not continue the interrupted shard/buffer positions, and it does not avoid samples already
  seen in the interrupted generation (sampling is with replacement across passes anyway). Changing
  world_size or num_workers on resume is allowed in this mode.

**Memory.** Per slot and group: the shard being read (read whole, to verify it before use) and the
shards the shuffle buffer still references, about (shuffle_buffer / showers_per_shard + 2) shards.

``load_split(manifest_dir, split)`` reads a whole split (or its first ``max_showers``) into a ShowerSet for
evaluation, in manifest order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.shards import Manifest, ShardInfo, VerifyMode, shard_samples
from caloforge.platform.conditioning import Conditions
from caloforge.platform.lineage import TrainedRanges
from caloforge.platform.seeding import Purpose, derive_seed, rng

log = logging.getLogger("caloforge.datasets.streaming")

STATE_VERSION = 1


@dataclass(frozen=True)
class StreamConfig:
    """How to stream a split (see the module docstring)."""

    batch_size: int = 256
    shuffle_buffer: int = 2048  # samples per group sub-pipeline; 0 or 1 = no shuffling
    mixing: Literal["proportional", "temperature", "explicit"] = "proportional"
    temperature: float = 1.0  # mixing="temperature": p_g ∝ n_g^(1/temperature)
    weights: dict[str, float] = field(default_factory=dict)  # mixing="explicit": "det" or "det/particle"
    mix_level: Literal["sample", "batch"] = "sample"
    mode: Literal["resampled", "single_pass"] = "resampled"
    num_workers: int = 0
    prefetch_factor: int = 2
    verify: Literal["sha256", "structure"] = "sha256"  # per shard, when it is opened
    drop_last: bool = False  # single_pass: drop each slot's last short batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.mixing not in ("proportional", "temperature", "explicit"):
            raise ValueError(f"mixing must be proportional, temperature or explicit, got {self.mixing!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mixing == "explicit":
            if not self.weights:
                raise ValueError("mixing 'explicit' needs weights: {detector or detector/particle: weight}")
            bad = {k: w for k, w in self.weights.items() if not (w >= 0 and np.isfinite(w))}
            if bad:
                raise ValueError(f"weights must be finite and >= 0, got {bad}")
            if sum(self.weights.values()) <= 0:
                raise ValueError(f"weights must not all be 0, got {self.weights}")
            per_particle = ["/" in k for k in self.weights]
            if any(per_particle) and not all(per_particle):
                raise ValueError(
                    "weights: use either detector keys or detector/particle keys, not both: "
                    f"{sorted(self.weights)}"
                )
        elif self.weights:
            raise ValueError(f"weights are only used with mixing 'explicit' (mixing is {self.mixing!r})")
        if self.mix_level not in ("sample", "batch"):
            raise ValueError(f"mix_level must be 'sample' or 'batch', got {self.mix_level!r}")
        if self.mode not in ("resampled", "single_pass"):
            raise ValueError(f"mode must be 'resampled' or 'single_pass', got {self.mode!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.verify not in ("sha256", "structure"):
            raise ValueError(f"verify must be 'sha256' or 'structure', got {self.verify!r}")


@dataclass(frozen=True)
class StreamGroup:
    """One mixing group: a detector (or detector/particle) with its shards and its mixing probability."""

    key: str
    detector: str
    particle: str | None
    shards: tuple[ShardInfo, ...]
    n_samples: int
    probability: float


def plan_groups(manifest: Manifest, split: str, config: StreamConfig) -> list[StreamGroup]:
    """The mixing groups of ``split`` with their probabilities (weight-0 groups left out)."""
    shards = manifest.shards(split)
    if not shards:
        raise ValueError(f"{manifest.directory}: split {split!r} has no shards")
    per_particle = config.mixing == "explicit" and any("/" in k for k in config.weights)
    by_key: dict[str, list[ShardInfo]] = {}
    for sh in shards:
        by_key.setdefault(f"{sh.detector}/{sh.particle}" if per_particle else sh.detector, []).append(sh)
    sizes = {k: sum(s.n_samples for s in v) for k, v in by_key.items()}
    if config.mixing == "explicit":
        for key in config.weights:
            det = key.split("/", 1)[0]
            if det not in manifest.detectors:
                raise ValueError(
                    f"mixing weights: unknown detector {det!r} in key {key!r} "
                    f"(detectors in {manifest.directory}: "
                    f"{manifest.detectors})"
                )
            if key not in by_key:
                raise ValueError(
                    f"mixing weights: {key!r} has no shards in split {split!r} (groups: {sorted(by_key)})"
                )
        raw = {k: float(config.weights.get(k, 0.0)) for k in by_key}
        dropped = sorted(k for k, w in raw.items() if w == 0)
        if dropped:
            log.info("split %s: groups %s have weight 0 and are left out of the stream", split, dropped)
    elif config.mixing == "temperature":
        raw = {k: float(n) ** (1.0 / config.temperature) for k, n in sizes.items()}
    else:
        raw = {k: float(n) for k, n in sizes.items()}
    total = sum(raw.values())
    groups = [
        StreamGroup(
            key=k,
            detector=by_key[k][0].detector,
            particle=by_key[k][0].particle if per_particle else None,
            shards=tuple(sorted(by_key[k], key=lambda s: s.name)),
            n_samples=sizes[k],
            probability=raw[k] / total,
        )
        for k in sorted(by_key)
        if raw[k] > 0
    ]
    meshes = {g.detector: manifest.mesh_shape(g.detector) for g in groups}
    if len(set(meshes.values())) > 1:
        raise ValueError(
            f"split {split!r}: detectors mixed in one stream must share a mesh shape, got {meshes}; "
            "stream them "
            "separately (explicit weights selecting one mesh)"
        )
    return groups


def trained_ranges(manifest: Manifest, groups: list[StreamGroup]) -> TrainedRanges:
    """What a model trained on ``groups`` has seen (``Lineage.trained``): ``energy_mev`` and ``theta_rad``,
    the union of the groups' detectors' train-split ranges in the manifest stats (``energy_mev_min``/``max``,
    ``theta_rad_min``/``max``), ``particles``, the particles of the groups' shards, and ``detectors``, the
    groups' detectors (all sorted). The model card's valid ranges
    (``caloforge.registry.card.ranges_from_lineage``) come from these."""
    if not groups:
        raise ValueError("trained_ranges: no stream groups")
    per_detector = (manifest.stats or {}).get("per_detector") or {}
    detectors = sorted({g.detector for g in groups})
    missing = [d for d in detectors if d not in per_detector]
    if missing:
        raise ValueError(f"{manifest.directory}: manifest stats have no per-detector block for {missing}")
    blocks = [per_detector[d] for d in detectors]
    particles = sorted({sh.particle for g in groups for sh in g.shards})
    return TrainedRanges(
        energy_mev=(
            float(min(b["energy_mev_min"] for b in blocks)),
            float(max(b["energy_mev_max"] for b in blocks)),
        ),
        theta_rad=(
            float(min(b["theta_rad_min"] for b in blocks)),
            float(max(b["theta_rad_max"] for b in blocks)),
        ),
        particles=tuple(particles),
        detectors=tuple(detectors),
    )


def _group_samples(
    manifest: Manifest,
    group: StreamGroup,
    gi: int,
    cfg: StreamConfig,
    seed: int,
    epoch: int,
    slot: int,
    n_slots: int,
) -> Iterator[tuple[dict, np.ndarray]]:
    shards = list(group.shards)
    resampled = cfg.mode == "resampled"
    mine = shards[slot::n_slots] if (not resampled or len(shards) >= n_slots) else shards

    def shard_order() -> Iterator[ShardInfo]:
        for p in range(1 << 62):
            order = rng(seed, Purpose.STREAM_SHARDS, epoch, gi, slot, p).permutation(len(mine))
            for j in order:
                yield mine[j]
            if not resampled or not mine:
                return

    def expand(source: Iterator[ShardInfo]) -> Iterator[tuple[dict, np.ndarray]]:
        for shard in source:
            yield from shard_samples(manifest, shard, cfg.verify)

    stages: list[Any] = [shard_order, expand]
    if cfg.shuffle_buffer > 1:
        shuffle_rng = random.Random(derive_seed(seed, Purpose.STREAM_SHUFFLE, epoch, gi, slot))
        stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=shuffle_rng))
    return iter(wds.DataPipeline(*stages))


def _collate(samples: list[tuple[dict, np.ndarray]]) -> ShowerBatch:
    metas = [m for m, _ in samples]
    x = np.stack([a for _, a in samples])
    cond = Conditions(
        np.array([m["energy_mev"] for m in metas], dtype=np.float64),
        np.array([m["theta_rad"] for m in metas], dtype=np.float64),
        np.array([m["phi_rad"] for m in metas], dtype=np.float64),
        np.array([m["pdg"] for m in metas], dtype=np.int64),
        np.array([m["detector"] for m in metas], dtype=str),
    )
    return ShowerBatch.from_numpy(x.astype(np.float32, copy=False), cond)


def _slot_batches(
    manifest: Manifest,
    groups: list[StreamGroup],
    cfg: StreamConfig,
    seed: int,
    epoch: int,
    slot: int,
    n_slots: int,
) -> Iterator[ShowerBatch]:
    its = [_group_samples(manifest, g, gi, cfg, seed, epoch, slot, n_slots) for gi, g in enumerate(groups)]
    weights = np.array([g.probability for g in groups])
    active = weights > 0
    mix = rng(seed, Purpose.STREAM_MIX, epoch, slot)
    size = cfg.batch_size
    full_only = cfg.drop_last or cfg.mode == "resampled"

    def probabilities() -> np.ndarray:
        p = np.where(active, weights, 0.0)
        return p / p.sum()

    if cfg.mix_level == "sample":
        while True:
            samples: list[tuple[dict, np.ndarray]] = []
            while len(samples) < size and active.any():
                for g in mix.choice(len(groups), size=size - len(samples), p=probabilities()):
                    try:
                        samples.append(next(its[g]))
                    except StopIteration:
                        active[g] = False
                        break  # redraw the rest with the remaining groups
            if not samples or (len(samples) < size and full_only):
                return
            yield _collate(samples)
            if len(samples) < size:
                return
    else:
        while active.any():
            g = int(mix.choice(len(groups), p=probabilities()))
            samples = list(islice(its[g], size))
            if len(samples) < size:
                active[g] = False
            if samples and not (len(samples) < size and full_only):
                yield _collate(samples)


class _SlotDataset(torch.utils.data.IterableDataset):
    """Runs one slot's pipeline: the rank's share for a DataLoader worker (or the whole rank without)."""

    def __init__(
        self,
        manifest: Manifest,
        groups: list[StreamGroup],
        cfg: StreamConfig,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__()
        self.manifest, self.groups, self.cfg = manifest, groups, cfg
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def __iter__(self) -> Iterator[ShowerBatch]:
        info = torch.utils.data.get_worker_info()
        per_rank = max(1, self.cfg.num_workers)
        slot = self.rank * per_rank + (info.id if info is not None else 0)
        return _slot_batches(
            self.manifest, self.groups, self.cfg, self.seed, self.epoch, slot, self.world_size * per_rank
        )


def _identity(x: Any) -> Any:
    return x


class ShowerStream:
    """An iterable of ``ShowerBatch`` over one split of a shard set (see the module docstring)."""

    def __init__(
        self,
        manifest_dir: str | Path,
        config: StreamConfig | None = None,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.manifest = Manifest.load(manifest_dir)
        self.config = config or StreamConfig()
        self.split = split
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.groups = plan_groups(self.manifest, split, self.config)
        self.mesh_shape = self.manifest.mesh_shape(self.groups[0].detector)
        n_slots = self.world_size * max(1, self.config.num_workers)
        if self.config.mode == "resampled":
            few = [g.key for g in self.groups if len(g.shards) < n_slots]
            if few:
                log.warning(
                    "groups %s have fewer shards than the %d slots (ranks × workers): every slot reads all "
                    "their "
                    "shards (write smaller shards for disjoint coverage)",
                    few,
                    n_slots,
                )
            self._epoch = -1  # generation in use (-1: none yet)
        else:
            self._epoch = 0  # pass in progress
        self._batches = 0  # batches yielded in the current epoch/generation
        self._total = 0

    @property
    def probabilities(self) -> dict[str, float]:
        """Mixing probability of each group (detector or detector/particle)."""
        return {g.key: g.probability for g in self.groups}

    @property
    def batches_yielded(self) -> int:
        return self._total

    def _batch_source(self, epoch: int) -> Iterator[ShowerBatch]:
        ds = _SlotDataset(
            self.manifest, self.groups, self.config, self.seed, epoch, self.rank, self.world_size
        )
        if self.config.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=self.config.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.config.prefetch_factor,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[ShowerBatch]:
        if self.config.mode == "resampled":
            self._epoch += 1
            self._batches = 0
            skip = 0
        else:
            skip = self._batches
        return self._run(self._epoch, skip)

    def _run(self, epoch: int, skip: int) -> Iterator[ShowerBatch]:
        source = self._batch_source(epoch)
        try:
            for i, batch in enumerate(source):
                if i < skip:
                    continue
                self._batches = i + 1
                self._total += 1
                yield batch
            if self.config.mode == "single_pass":
                self._epoch = epoch + 1
                self._batches = 0
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "version": STATE_VERSION,
            "kind": "caloforge.ShowerStream",
            "manifest": self.manifest.fingerprint,
            "split": self.split,
            "mode": c.mode,
            "seed": self.seed,
            "epoch": self._epoch,
            "batches_in_epoch": self._batches,
            "batches_total": self._total,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": c.num_workers,
            "batch_size": c.batch_size,
            "mixing": "|".join(
                str(v)
                for v in (
                    c.mixing,
                    c.temperature,
                    sorted(c.weights.items()),
                    c.mix_level,
                    c.shuffle_buffer,
                    c.drop_last,
                )
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "caloforge.ShowerStream" or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a ShowerStream state (version {STATE_VERSION}): kind={state.get('kind')!r} "
                f"version={state.get('version')!r}"
            )
        mine = self.state_dict()
        keys = ["manifest", "split", "mode", "seed"]
        if self.config.mode == "single_pass":
            keys += ["rank", "world_size", "num_workers", "batch_size", "mixing"]
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"stream state key {key!r}: the state has {state.get(key)!r}, this stream {mine[key]!r}; "
                    "resuming needs the same value"
                )
        self._total = int(state["batches_total"])
        if self.config.mode == "single_pass":
            self._epoch = int(state["epoch"])
            self._batches = int(state["batches_in_epoch"])
        else:
            self._epoch = int(state["epoch"])  # the next iter() starts generation epoch + 1
            self._batches = 0


def load_split(
    manifest_dir: str | Path,
    split: str,
    max_showers: int | None = None,
    detector: str | None = None,
    verify: VerifyMode = "sha256",
) -> ShowerSet:
    """A whole split (or its first ``max_showers`` in manifest order; one ``detector`` if given) in memory."""
    manifest = Manifest.load(manifest_dir)
    shards = manifest.shards(split)
    if detector is not None:
        manifest.mesh_shape(detector)
        shards = [s for s in shards if s.detector == detector]
    meshes = {s.detector: manifest.mesh_shape(s.detector) for s in shards}
    if len(set(meshes.values())) > 1:
        raise ValueError(f"split {split!r} mixes meshes {meshes}: pass detector= to load one of them")
    if max_showers is not None and max_showers < 0:
        raise ValueError(f"max_showers must be >= 0, got {max_showers}")
    total = sum(s.n_samples for s in shards)
    n = total if max_showers is None else min(total, max_showers)
    if n == 0:
        raise ValueError(
            f"{manifest.directory}: split {split!r} has no showers"
            + (f" of detector {detector!r}" if detector else "")
        )
    for shard in shards:  # the counts are only trusted once the files have the sizes they imply
        manifest.check_size(shard)
    shape = next(iter(meshes.values()))
    x = np.empty((n, *shape), dtype=np.float32)
    metas: list[dict] = []
    for shard in shards:
        for meta, arr in shard_samples(manifest, shard, verify):
            x[len(metas)] = arr
            metas.append(meta)
            if len(metas) == n:
                break
        if len(metas) == n:
            break
    cond = Conditions(
        np.array([m["energy_mev"] for m in metas], dtype=np.float64),
        np.array([m["theta_rad"] for m in metas], dtype=np.float64),
        np.array([m["phi_rad"] for m in metas], dtype=np.float64),
        np.array([m["pdg"] for m in metas], dtype=np.int64),
        np.array([m["detector"] for m in metas], dtype=str),
    )
    return ShowerSet(
        x,
        cond,
        f"shards:{manifest.directory.name}:{split}",
        int(manifest.data["config"]["seed"]),
        {"manifest_dir": str(manifest.directory), "split": split, "manifest_sha256": manifest.fingerprint},
    )


__all__ = ["ShowerStream", "StreamConfig", "StreamGroup", "load_split", "plan_groups", "trained_ranges"]
