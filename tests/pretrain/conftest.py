"""Shared fixtures of the pretraining tests: one embedded local Ray for all slow tests of this package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """The embedded local Ray ``caloforge pretrain`` starts (2 CPUs, dashboard off, 127.0.0.1), shared by
    the slow tests of this package and shut down after them; ``run_pretrain`` reuses it."""
    import ray

    from caloforge.training.ray.launch import ray_session

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_AUTH_MODE", None)
    with ray_session(num_cpus=2) as mode:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        assert mode == "embedded"
        assert ray.is_initialized()
        assert os.environ["RAY_AUTH_MODE"] == "token"  # drill 10: set explicitly, not Ray's default
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        yield
    assert not ray.is_initialized()


DETECTORS = ("par04-siw", "pbwo4")
PARTICLES = ("e-", "gamma")


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shard set from the built-in simulator: 2 detectors × 2 particles, 48 showers per detector,
    4 showers per shard (so each (detector, particle) group has several train shards per worker)."""
    from caloforge.datasets.formats import native
    from caloforge.datasets.shards import ShardConfig, SourceSpec, SplitFractions, write_shards
    from caloforge.datasets.simulator import simulate_dataset
    from caloforge.platform.geometry import load_detector

    root = tmp_path_factory.mktemp("data")
    sources = []
    for i, det in enumerate(DETECTORS):
        showers = simulate_dataset(
            load_detector(det), list(PARTICLES), 48, (1.0, 50.0), True, (80.0, 100.0), seed=i
        )
        path = root / f"{det}.h5"
        native.write(path, showers)
        sources.append(SourceSpec(path, detector=det))
    config = ShardConfig(showers_per_shard=4, split=SplitFractions(0.75, 0.25, 0.0), seed=0)
    write_shards(sources, root / "shards", config)
    return root / "shards"
