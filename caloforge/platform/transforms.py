"""Invertible, fitted preprocessing between MeV voxels and the model space (modules with buffers).

The transform ships inside the model bundle (its buffers are in the state dict), so users always get MeV
back (AllShowers' Transformation modules). Both transforms are fitted from a stats block of
``caloforge.datasets.stats`` (``log_eps``, ``log_mean``/``log_std``, ``layer_log_mean``/``layer_log_std``).

- ``LogStandardize`` (CaloDiT-2, Raikwar et al. 2025): voxels below the readout threshold are set to 0
  (default 15.15 keV = 0.5 keV / 0.033, the CaloChallenge dataset-2 cut), then
  x̂ = (ln(x + ε) − μ) / σ with scalar μ, σ over all voxels. Inverse: x = exp(x̂σ + μ) − ε, then voxels
  below the threshold → 0 and clamp ≥ 0 (the same cut the evaluation applies to Geant4).
- ``LayerLogStandardize``: the voxel-level part of CaloDREAM's per-layer normalisation (Favaro et al. 2025).
  CaloDREAM normalises each voxel by its layer energy (u = x / E_z, then a logit) and models the 45 layer
  energies with a second, autoregressive network. A single-network model cannot know E_z at generation
  time, so we normalise per layer with per-layer log statistics instead: x̂_z = (ln(x + ε) − μ_z) / σ_z
  (μ_z, σ_z = ``layer_log_mean[z]``, ``layer_log_std[z]``). This equalises the very different dynamic
  ranges of early/late layers the way CaloDREAM's per-layer normalisation does, without the extra
  layer-energy model. Inverse as above with the per-layer μ_z, σ_z.

The exponent of the inverse is clamped per layer at the largest ln(x + ε) of the training data
(``layer_log_max`` + ln 2, buffer ``log_max_Z``), so a generated voxel never exceeds twice the hottest voxel
the data had in that layer (an undertrained model's rare overshoots would otherwise dominate its layer; the
factor 2 leaves headroom for a detector added by adaptation); stats blocks
without that key (and unfitted transforms) fall back to ``MAX_LOG`` = 80 (e^80 ≈ 5.5e34 < float32 max), so a
badly behaved model cannot produce inf/NaN MeV.

Shape legend: B batch, Z layers, P angular bins, R radial bins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

CALOCHALLENGE_SAMPLING_FRACTION = 0.033  # Par04 SiW calorimeter of CaloChallenge datasets 2 and 3
# 15.15 keV: the CaloChallenge evaluation's voxel cut, 0.5 keV visible / sampling fraction 0.033
CALOCHALLENGE_THRESHOLD_MEV = 0.5e-3 / CALOCHALLENGE_SAMPLING_FRACTION
MAX_LOG = 80.0
MIN_STD = 1e-6  # floor for σ of a layer that was never hit (all voxels equal ε)
LOG_MAX_MARGIN = math.log(2.0)  # clamp at 2× the data's hottest voxel per layer (headroom for adaptation)


def _stat_scalar(stats: Mapping[str, Any], key: str, positive: bool = False) -> float:
    if key not in stats:
        raise ValueError(f"stats block has no {key!r} (keys: {sorted(stats)})")
    value = stats[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"stats[{key!r}] must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"stats[{key!r}] must be > 0, got {value!r}")
    return float(value)


def _stat_vector(stats: Mapping[str, Any], key: str, n_z: int) -> list[float]:
    if key not in stats:
        raise ValueError(f"stats block has no {key!r} (keys: {sorted(stats)})")
    value = stats[key]
    if not isinstance(value, list | tuple) or len(value) != n_z:
        got = len(value) if isinstance(value, list | tuple) else type(value).__name__
        raise ValueError(f"stats[{key!r}] must be a list of n_z={n_z} numbers, got {got}")
    out = [float(v) for v in value]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"stats[{key!r}] has non-finite entries")
    return out


def _optional_log_max(stats: Mapping[str, Any], n_z: int) -> list[float] | None:
    """``layer_log_max`` when the stats block has it (older manifests do not: no data-range clamp).
    Layers never hit in the data (max = ln ε) get no clamp beyond ``MAX_LOG``."""
    if "layer_log_max" not in stats:
        return None
    eps = _stat_scalar(stats, "log_eps", positive=True)
    values = _stat_vector(stats, "layer_log_max", n_z)
    return [v + LOG_MAX_MARGIN if v > math.log(eps) else MAX_LOG for v in values]


class _LogTransform(nn.Module):
    """Shared parts: threshold handling and the (μ, σ) broadcast over (B, Z, P, R)."""

    log_eps: torch.Tensor
    threshold_mev: torch.Tensor
    fitted: torch.Tensor
    log_max_Z: torch.Tensor

    def __init__(
        self, n_z: int, log_eps: float, threshold_mev: float, fitted: bool, log_max_Z: list[float] | None
    ) -> None:
        super().__init__()
        if n_z < 1:
            raise ValueError(f"n_z must be >= 1, got {n_z}")
        if not log_eps > 0:
            raise ValueError(f"log_eps must be > 0, got {log_eps}")
        if not threshold_mev >= 0:
            raise ValueError(f"threshold_mev must be >= 0, got {threshold_mev}")
        self.n_z = n_z
        self.register_buffer("log_eps", torch.tensor(float(log_eps), dtype=torch.float32))
        self.register_buffer("threshold_mev", torch.tensor(float(threshold_mev), dtype=torch.float32))
        # True once fitted from a stats block (saved with the weights, so a loaded bundle knows it too).
        self.register_buffer("fitted", torch.tensor(bool(fitted)))
        log_max = torch.full((n_z,), MAX_LOG) if log_max_Z is None else torch.tensor(log_max_Z)
        if log_max.shape != (n_z,):
            raise ValueError(f"log_max_Z must have n_z={n_z} entries, got {tuple(log_max.shape)}")
        self.register_buffer("log_max_Z", log_max.float().clamp(max=MAX_LOG))

    def _check(self, x_BZPR: torch.Tensor, what: str) -> None:
        if x_BZPR.ndim != 4 or x_BZPR.shape[1] != self.n_z:
            raise ValueError(
                f"{what}: expected (B, n_z={self.n_z}, n_phi, n_r), got shape {tuple(x_BZPR.shape)}"
            )

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) broadcastable to (B, Z, P, R)."""
        raise NotImplementedError(f"{type(self).__name__} must define _mean_std")

    def forward(self, showers_mev_BZPR: torch.Tensor) -> torch.Tensor:
        """MeV → model space (sub-threshold voxels count as 0)."""
        self._check(showers_mev_BZPR, f"{type(self).__name__}.forward")
        mean, std = self._mean_std()
        x = showers_mev_BZPR.float()
        x = torch.where(x < self.threshold_mev.float(), torch.zeros_like(x), x)
        return (torch.log(x + self.log_eps.float()) - mean.float()) / std.float()

    def log_energy(self, x_BZPR: torch.Tensor) -> torch.Tensor:
        """Model space → ln(E + ε) per voxel, unclamped and before the threshold: how the model ranks
        the voxels of a layer, also where none of them reaches the threshold (``energy.rescale_layers``)."""
        self._check(x_BZPR, f"{type(self).__name__}.log_energy")
        mean, std = self._mean_std()
        return x_BZPR.float() * std.float() + mean.float()

    def inverse(self, x_BZPR: torch.Tensor) -> torch.Tensor:
        """Model space → MeV: exp(min(x̂σ + μ, log_max_z)) − ε; below threshold → 0; clamp ≥ 0."""
        self._check(x_BZPR, f"{type(self).__name__}.inverse")
        mean, std = self._mean_std()
        log_max = self.log_max_Z[None, :, None, None]
        log_x = torch.minimum(x_BZPR.float() * std.float() + mean.float(), log_max)
        e = torch.exp(log_x) - self.log_eps.float()
        return torch.where(e < self.threshold_mev.float(), torch.zeros_like(e), e).clamp_min(0.0)


class LogStandardize(_LogTransform):
    """x̂ = (ln(x + ε) − μ)/σ with scalar μ, σ (CaloDiT-2)."""

    def __init__(
        self,
        n_z: int,
        log_eps: float = 1e-6,
        threshold_mev: float = CALOCHALLENGE_THRESHOLD_MEV,
        mean: float = 0.0,
        std: float = 1.0,
        fitted: bool = False,
        log_max_Z: list[float] | None = None,
    ) -> None:
        super().__init__(n_z, log_eps, threshold_mev, fitted, log_max_Z)
        if not std > 0:
            raise ValueError(f"LogStandardize std must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float32))

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.std

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], n_z: int, threshold_mev: float) -> LogStandardize:
        return cls(
            n_z,
            log_eps=_stat_scalar(stats, "log_eps", positive=True),
            threshold_mev=threshold_mev,
            mean=_stat_scalar(stats, "log_mean"),
            std=max(_stat_scalar(stats, "log_std"), MIN_STD),
            fitted=True,
            log_max_Z=_optional_log_max(stats, n_z),
        )


class LayerLogStandardize(_LogTransform):
    """x̂_z = (ln(x + ε) − μ_z)/σ_z with per-layer statistics (voxel-level part of CaloDREAM's scheme)."""

    def __init__(
        self,
        n_z: int,
        log_eps: float = 1e-6,
        threshold_mev: float = CALOCHALLENGE_THRESHOLD_MEV,
        mean_Z: list[float] | None = None,
        std_Z: list[float] | None = None,
        fitted: bool = False,
        log_max_Z: list[float] | None = None,
    ) -> None:
        super().__init__(n_z, log_eps, threshold_mev, fitted, log_max_Z)
        mean = torch.zeros(n_z) if mean_Z is None else torch.tensor(mean_Z, dtype=torch.float32)
        std = torch.ones(n_z) if std_Z is None else torch.tensor(std_Z, dtype=torch.float32)
        if mean.shape != (n_z,) or std.shape != (n_z,):
            raise ValueError(f"LayerLogStandardize: mean/std must have n_z={n_z} entries")
        if not bool((std > 0).all()):
            raise ValueError("LayerLogStandardize: every per-layer std must be > 0")
        self.register_buffer("layer_mean", mean)
        self.register_buffer("layer_std", std)

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer_mean[None, :, None, None], self.layer_std[None, :, None, None]

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], n_z: int, threshold_mev: float) -> LayerLogStandardize:
        return cls(
            n_z,
            log_eps=_stat_scalar(stats, "log_eps", positive=True),
            threshold_mev=threshold_mev,
            mean_Z=_stat_vector(stats, "layer_log_mean", n_z),
            std_Z=[max(v, MIN_STD) for v in _stat_vector(stats, "layer_log_std", n_z)],
            fitted=True,
            log_max_Z=_optional_log_max(stats, n_z),
        )


TRANSFORMS: dict[str, type[_LogTransform]] = {
    "log_standardize": LogStandardize,
    "layer_log_standardize": LayerLogStandardize,
}


def build_transform(
    name: str, n_z: int, threshold_mev: float, stats: Mapping[str, Any] | None
) -> LogStandardize | LayerLogStandardize:
    """Fitted transform ``name`` from ``stats``; with ``stats=None`` an unfitted one whose buffers a state
    dict (e.g. from a bundle) fills in."""
    try:
        cls = TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r} (known: {sorted(TRANSFORMS)})") from None
    if stats is None:
        return cls(n_z, threshold_mev=threshold_mev)  # type: ignore[return-value]
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a stats block (mapping), got {type(stats).__name__}")
    return cls.from_stats(stats, n_z, threshold_mev)  # type: ignore[attr-defined]


__all__ = [
    "CALOCHALLENGE_SAMPLING_FRACTION",
    "CALOCHALLENGE_THRESHOLD_MEV",
    "TRANSFORMS",
    "LayerLogStandardize",
    "LogStandardize",
    "build_transform",
]
