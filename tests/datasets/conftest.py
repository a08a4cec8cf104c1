"""Shared fixtures of the dataset tests: seeded synthetic showers, detector YAMLs and real files on disk.

Physics does not matter for formats, shards and streams, but the showers are shaped like real ones (a
longitudinal gamma profile, an exponential radial profile, a readout threshold, so most voxels are 0), and
every shower has a distinct incident energy, which the tests use as its identity.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from caloforge.config import dump_yaml
from caloforge.datasets.schema import ShowerSet
from caloforge.platform.conditioning import Conditions
from caloforge.platform.geometry import DetectorSpec, Layer, MeshSpec

SMALL_MESH = (6, 4, 3)
DS2_MESH = (45, 16, 9)


def synthetic_showers(
    n: int,
    mesh: tuple[int, int, int] = SMALL_MESH,
    detector: str = "det-a",
    seed: int = 0,
    pdg: int | np.ndarray = 11,
    energy_offset_mev: float = 0.0,
) -> ShowerSet:
    """``n`` seeded showers on ``mesh`` with log-uniform energies in [1, 1000] GeV (all distinct)."""
    rng = np.random.default_rng(seed)
    n_z, n_p, n_r = mesh
    energy = 10 ** rng.uniform(3, 6, n) + energy_offset_mev + np.arange(n) * 1e-3
    z = (np.arange(n_z) + 0.5) / n_z * 20.0
    t_max = rng.uniform(4, 8, n)[:, None]
    long = z[None, :] ** 2 * np.exp(-2.0 * z[None, :] / t_max)
    long /= long.sum(axis=1, keepdims=True)
    radial = np.exp(-np.arange(n_r) / 0.8)
    radial /= radial.sum()
    frac = long[:, :, None, None] * radial[None, None, None, :] / n_p
    noise = rng.gamma(2.0, 0.5, size=(n, n_z, n_p, n_r))
    x = energy[:, None, None, None] * frac * noise
    x[x < 0.5e-3 / 0.033] = 0.0
    theta = rng.uniform(0.6, np.pi - 0.6, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    cond = Conditions.make(energy, theta, phi, pdg, detector)
    return ShowerSet(x.astype(np.float32), cond, "synthetic", seed, {"purpose": "test"})


def write_detector_yaml(directory: Path, name: str, mesh: tuple[int, int, int] = SMALL_MESH) -> Path:
    """A real detector YAML (SiW sampling calorimeter) with the given mesh; returns its path."""
    n_z, n_p, n_r = mesh
    spec = DetectorSpec(
        name=name,
        description=f"test detector {name}",
        absorber=Layer("W", 1.4),
        active=Layer("Si", 0.3),
        mesh=MeshSpec(n_z, n_p, tuple(round(4.65 * i, 4) for i in range(n_r + 1))),
    )
    path = directory / f"{name}.yaml"
    path.write_text(dump_yaml(spec))
    return path


@pytest.fixture(scope="session")
def showers_factory() -> Callable[..., ShowerSet]:
    return synthetic_showers


@pytest.fixture
def detector_yaml(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "det-a", mesh: tuple[int, int, int] = SMALL_MESH) -> Path:
        return write_detector_yaml(tmp_path, name, mesh)

    return make
