"""Test helpers shared across test folders (importable from every test: ``tests/`` is on ``sys.path`` through
its ``conftest.py``): the tiny base model's config and simulated shard sets of given detectors."""

from __future__ import annotations

from pathlib import Path

from caloforge.datasets.prepare import SimulateConfig, simulate_and_shard
from caloforge.datasets.shards import ShardConfig, SplitFractions
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.shower_model import ShowerModelConfig

BASE_DETECTORS = ("par04-siw", "pbwo4")
MODEL = ShowerModelConfig(
    backbone="debug",
    patch_size=(9, 4, 3),
    parametrisation="flow_matching",
    sampler="euler",
    num_steps=2,
    layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=2),
)


def make_shards(out: Path, detectors: tuple[str, ...], n: int, seed: int = 3) -> Path:
    """``n`` simulated e- and pi+ showers per detector (2-50 GeV), sharded 60/10/30 into ``out``."""
    spec = SimulateConfig(
        detectors=detectors,
        particles=("e-", "pi+"),
        n_per_detector=n,
        energy_gev=(2.0, 50.0),
        seed=seed,
        shards=ShardConfig(showers_per_shard=40, split=SplitFractions(train=0.6, val=0.1, test=0.3)),
    )
    return simulate_and_shard(spec, out)
