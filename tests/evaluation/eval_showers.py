"""Showers for the evaluation tests: the real built-in simulator, plus known distortions.

"Two samples from the same simulator configuration" are two seeds of ``simulate_dataset`` with identical
settings; distorted samples apply one known change to such a sample (energy scale, radial width, lost soft
hits), so each test knows which HLF group must see it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.simulator import simulate_dataset
from caloforge.platform.geometry import load_detector

N_SHOWERS = 3000
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


def simulated(
    seed: int,
    n: int = N_SHOWERS,
    detector: str = "par04-siw",
    particles: tuple[str, ...] = ("e-",),
    energy_gev: tuple[float, float] = (10.0, 100.0),
) -> ShowerSet:
    """Showers of one simulator configuration (θ = 90°, φ = 0, log-uniform energies); ``seed`` varies."""
    return simulate_dataset(
        load_detector(detector), list(particles), n, energy_gev, True, (90.0, 90.0), (0.0, 0.0), seed
    )


def scale_energy(s: ShowerSet, factor: float) -> ShowerSet:
    """Every voxel × ``factor`` (an energy-scale miscalibration)."""
    return ShowerSet(
        (s.showers_NZPR * np.float32(factor)).astype(np.float32), s.conditions, f"{s.source}*{factor}"
    )


def widen_radially(s: ShowerSet, r_edges_mm: tuple[float, ...], factor: float) -> ShowerSet:
    """The shower stretched radially by ``factor`` (r → factor·r) in every (layer, angle) cell.

    The cumulative radial energy F(r) of each cell, linear inside bins, becomes F(r/factor); energy moved
    beyond the last edge leaves the mesh (lateral leakage, as for a physically wider shower).
    """
    edges = np.asarray(r_edges_mm, dtype=np.float64)
    x = s.showers_NZPR.astype(np.float64)
    cum = np.concatenate([np.zeros((*x.shape[:-1], 1)), np.cumsum(x, axis=-1)], axis=-1)  # F at edges
    src = edges / factor  # F'(e_i) = F(e_i / factor)
    j = np.clip(np.searchsorted(edges, src, side="right") - 1, 0, len(edges) - 2)
    w = (src - edges[j]) / (edges[j + 1] - edges[j])
    f_new = cum[..., j] * (1 - w) + cum[..., j + 1] * w
    out = np.diff(f_new, axis=-1)
    return ShowerSet(np.clip(out, 0, None).astype(np.float32), s.conditions, f"{s.source}-wide{factor}")


def drop_low_voxels(s: ShowerSet, quantile: float) -> ShowerSet:
    """Fewer hits at fixed layer energies: the lowest ``quantile`` of the non-zero voxels of ``s`` are set to
    0 and every layer is rescaled to its original energy, so only the sparsity (and what follows from losing
    the soft, wide hits) changes, not the energy response."""
    x = s.showers_NZPR.astype(np.float64)
    cut = np.quantile(x[x > 0], quantile)
    y = np.where(x < cut, 0.0, x)
    before, after = x.sum(axis=(2, 3), keepdims=True), y.sum(axis=(2, 3), keepdims=True)
    y *= np.divide(before, after, out=np.ones_like(before), where=after > 0)
    return ShowerSet(y.astype(np.float32), s.conditions, f"{s.source}-sparse")
