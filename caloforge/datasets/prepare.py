"""The shard set of a run: given shards, or ``data.simulate`` (:class:`SimulateConfig`) simulated with the
built-in simulator and sharded (``caloforge train``, ``caloforge pretrain``).

Detector i of a simulate block (or of ``caloforge data simulate --detector a,b,...``) is simulated with the
seed :func:`detector_seed` ``(seed, i)`` = ``derive_seed(seed, Purpose.SIMULATE, i)``
(``caloforge.platform.seeding``), so ``caloforge data simulate --seed 7`` and ``data.simulate.seed: 7``
give identical showers for the same detectors, particles, counts and ranges.

``simulate_and_shard(spec, data_dir)`` writes ``data_dir/raw/<detector>.h5`` (native HDF5) and the shards
``data_dir/shards/``; ``prepare_shards(shards, simulate, data_dir)`` returns the shard directory, simulating
only when ``data_dir/shards`` holds no manifest yet.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from caloforge.datasets.shards import ShardConfig
from caloforge.platform.seeding import Purpose, derive_seed

__all__ = ["SEED_CONVENTION", "SimulateConfig", "detector_seed", "prepare_shards", "simulate_and_shard"]

log = logging.getLogger("caloforge.datasets")


@dataclass(frozen=True)
class SimulateConfig:
    """``data.simulate``: simulate with the built-in simulator (not Geant4) and shard into the run directory.

    Every detector gets ``n_per_detector`` showers, particles drawn uniformly from ``particles``; detector i
    is simulated with ``detector_seed(seed, i)``.
    """

    detectors: tuple[str, ...]
    particles: tuple[str, ...]
    n_per_detector: int = 1000
    energy_gev: tuple[float, float] = (1.0, 100.0)
    log_uniform: bool = True
    theta_deg: tuple[float, float] = (90.0, 90.0)
    phi_deg: tuple[float, float] = (-180.0, 180.0)
    seed: int = 0
    shards: ShardConfig = field(default_factory=lambda: ShardConfig(showers_per_shard=250))

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("simulate.detectors: at least one detector is needed")
        if len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"simulate.detectors: duplicates in {list(self.detectors)}")
        if not self.particles:
            raise ValueError("simulate.particles: at least one particle is needed")
        if self.n_per_detector < 1:
            raise ValueError(f"simulate.n_per_detector must be >= 1, got {self.n_per_detector}")
        if self.seed < 0:
            raise ValueError(f"simulate.seed must be >= 0, got {self.seed}")


# How per-detector simulation seeds are derived (part of the identity of a cached simulated set).
SEED_CONVENTION = "derive_seed(seed, Purpose.SIMULATE, detector index)"


def detector_seed(seed: int, index: int) -> int:
    """The simulator seed of the ``index``-th detector of one simulate call (CLI and ``data.simulate``)."""
    return derive_seed(seed, Purpose.SIMULATE, index)


def simulate_and_shard(spec: SimulateConfig, data_dir: Path) -> Path:
    """Simulate every detector of ``spec`` into ``data_dir/raw/<detector>.h5`` and shard them into
    ``data_dir/shards`` (refused if shards exist there); returns the shard directory."""
    from caloforge.datasets.formats import native
    from caloforge.datasets.shards import SourceSpec, write_shards
    from caloforge.datasets.simulator import simulate_dataset
    from caloforge.platform.geometry import load_detector

    data_dir = Path(data_dir)
    shard_dir = data_dir / "shards"
    raw_dir = data_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, name in enumerate(spec.detectors):
        detector = load_detector(name)
        t0 = time.perf_counter()
        showers = simulate_dataset(
            detector,
            list(spec.particles),
            spec.n_per_detector,
            spec.energy_gev,
            spec.log_uniform,
            spec.theta_deg,
            spec.phi_deg,
            seed=detector_seed(spec.seed, i),
        )
        path = native.write(raw_dir / f"{detector.name}.h5", showers)
        log.info(
            "simulated %d showers of %s in %.1f s -> %s", len(showers), name, time.perf_counter() - t0, path
        )
        sources.append(SourceSpec(path, format="native"))
    write_shards(sources, shard_dir, dataclasses.replace(spec.shards, overwrite=False))
    return shard_dir


def prepare_shards(shards: Path | None, simulate: SimulateConfig | None, data_dir: Path) -> Path:
    """The shard directory: ``shards`` as given, or ``data_dir/shards`` simulated from ``simulate`` (once:
    an existing manifest there is reused). Exactly one of ``shards`` and ``simulate`` must be given."""
    if (shards is None) == (simulate is None):
        raise ValueError("prepare_shards: give exactly one of 'shards' (a shard directory) or 'simulate'")
    if shards is not None:
        return Path(shards)
    assert simulate is not None
    shard_dir = Path(data_dir) / "shards"
    if (shard_dir / "manifest.json").is_file():
        log.info("using the simulated shards in %s", shard_dir)
        return shard_dir
    return simulate_and_shard(simulate, Path(data_dir))
