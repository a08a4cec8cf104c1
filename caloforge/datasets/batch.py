"""``ShowerBatch``: what streams hand to training (torch tensors, raw MeV, untransformed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from caloforge.platform.conditioning import Conditions


@dataclass(frozen=True)
class ShowerBatch:
    """B showers on one mesh. Preprocessing (log/standardise) belongs to the model, not the batch."""

    showers_BZPR: torch.Tensor  # (B, n_z, n_phi, n_r) float32, MeV
    energy_mev: torch.Tensor  # (B,) float64
    theta_rad: torch.Tensor  # (B,) float64
    phi_rad: torch.Tensor  # (B,) float64
    pdg: torch.Tensor  # (B,) int64
    detector: tuple[str, ...]  # (B,) detector names

    def __len__(self) -> int:
        return self.showers_BZPR.shape[0]

    def conditions(self) -> Conditions:
        return Conditions(
            self.energy_mev.numpy().astype(np.float64),
            self.theta_rad.numpy().astype(np.float64),
            self.phi_rad.numpy().astype(np.float64),
            self.pdg.numpy().astype(np.int64),
            np.asarray(self.detector, dtype=str),
        )

    @classmethod
    def from_numpy(cls, showers_BZPR: np.ndarray, cond: Conditions) -> ShowerBatch:
        return cls(
            torch.from_numpy(np.ascontiguousarray(showers_BZPR, dtype=np.float32)),
            torch.from_numpy(np.asarray(cond.energy_mev, dtype=np.float64)),
            torch.from_numpy(np.asarray(cond.theta_rad, dtype=np.float64)),
            torch.from_numpy(np.asarray(cond.phi_rad, dtype=np.float64)),
            torch.from_numpy(np.asarray(cond.pdg, dtype=np.int64)),
            tuple(str(d) for d in cond.detector),
        )
