"""The canonical shower record.

One shower = ``float32[n_z, n_phi, n_r]`` voxel energies in MeV (calibrated: visible energy divided by the
detector's nominal sampling fraction, so E_tot/E_inc ≈ 1 for contained EM showers) + its ``Conditions``
(energy_mev, theta_rad, phi_rad, pdg, detector) + provenance (source, seed).

``ShowerSet`` holds N of them in memory (numpy). Files: ``caloforge.datasets.formats.native`` (our HDF5
layout), ``.calochallenge`` and ``.lemurs``; shards: ``caloforge.datasets.shards``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caloforge.platform.conditioning import Conditions

SIMULATOR_SOURCE = "caloforge-gflash"
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_conditions(
    cond: Conditions, *, path: str | Path, keys: dict[str, str] | None = None, row0: int = 0
) -> None:
    """Incident energies finite, > 0 and within float32's range, θ in [0, π], φ finite: else a ValueError
    naming ``path`` (a file, or what is being checked), the key (``keys``: field -> file key) and the first
    row (``row0`` + index)."""
    keys = keys or {}

    def fail(field: str, mask: np.ndarray, what: str) -> None:
        rows = np.flatnonzero(mask)
        values = getattr(cond, field)[rows[:3]].tolist()
        raise ValueError(
            f"{path}: key {keys.get(field, field)!r}: {len(rows)} value(s) {what} (first at row "
            f"{row0 + int(rows[0])}: {values})"
        )

    e = cond.energy_mev
    if not np.isfinite(e).all():
        fail("energy_mev", ~np.isfinite(e), "are NaN/inf")
    if (e <= 0).any():
        fail("energy_mev", e <= 0, "are <= 0 MeV")
    if (e > FLOAT32_MAX).any():
        fail("energy_mev", e > FLOAT32_MAX, "exceed float32's range")
    t = cond.theta_rad
    bad_t = ~np.isfinite(t) | (t < 0) | (t > math.pi + 1e-9)
    if bad_t.any():
        fail("theta_rad", bad_t, "are outside [0, π] rad")
    p = cond.phi_rad
    if not np.isfinite(p).all():
        fail("phi_rad", ~np.isfinite(p), "are NaN/inf")


@dataclass(frozen=True)
class ShowerSet:
    """N showers on one mesh shape. ``showers_NZPR``: float32 (N, n_z, n_phi, n_r) in MeV."""

    showers_NZPR: np.ndarray
    conditions: Conditions
    source: str = "unknown"
    seed: int | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        x = self.showers_NZPR
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            shape = getattr(x, "shape", None)
            raise ValueError(f"ShowerSet.showers_NZPR: expected 4-D (N, n_z, n_phi, n_r), got {shape}")
        if x.dtype != np.float32:
            raise ValueError(f"ShowerSet.showers_NZPR: expected float32, got {x.dtype}")
        if len(x) != len(self.conditions):
            raise ValueError(
                f"ShowerSet: {len(x)} showers but {len(self.conditions)} conditions (N must match)"
            )

    def __len__(self) -> int:
        return len(self.showers_NZPR)

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return tuple(self.showers_NZPR.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray | slice) -> ShowerSet:
        return ShowerSet(
            self.showers_NZPR[index],
            self.conditions.subset(index),
            self.source,
            self.seed,
            dict(self.metadata),
        )

    @staticmethod
    def concat(parts: Sequence[ShowerSet]) -> ShowerSet:
        if not parts:
            raise ValueError("ShowerSet.concat: nothing to concatenate")
        shapes = {p.mesh_shape for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"ShowerSet.concat: different mesh shapes {sorted(shapes)}")
        sources = sorted({p.source for p in parts})
        return ShowerSet(
            np.concatenate([p.showers_NZPR for p in parts]),
            Conditions.concat([p.conditions for p in parts]),
            "+".join(sources),
            parts[0].seed if len({p.seed for p in parts}) == 1 else None,
            {},
        )

    def total_energy_mev(self) -> np.ndarray:
        return self.showers_NZPR.reshape(len(self), -1).sum(axis=1, dtype=np.float64)
