"""Dataset statistics used to fit a model's preprocessing (stored in the shard manifest).

A stats block (JSON-able dict) for a set of showers on one mesh:

- ``n_showers``, ``n_voxels_per_shower``
- ``log_eps``: ε of the log transform (MeV); ``log_mean``, ``log_std``: mean/std of log(x + ε) over all
  voxels (scalar, as CaloDiT-2); ``layer_log_mean``, ``layer_log_std``: the same per layer (n_z lists);
  ``layer_log_max`` (n_z): the largest log(x + ε) seen in each layer (the transforms clamp generated
  voxels to it)
- ``occupancy``: fraction of voxels > 0; ``layer_occupancy`` (n_z)
- ``etot_over_einc_mean``, ``etot_over_einc_std``: total deposited energy / incident energy
- ``layer_frac_mean`` (n_z): mean fraction of E_tot per layer
- ``layer_energy_over_einc_mean``, ``layer_energy_over_einc_std`` (n_z): mean/std of E_z / E_inc per layer
  (fits the layer-energy head's transform, ``caloforge.platform.energy``)
- ``energy_mev_min``/``max``, ``theta_rad_min``/``max``

``StatsAccumulator`` accumulates these in float64 over batches, so sharding never holds the dataset in
memory; ``merge`` combines accumulators (pooled = merge of per-detector).
"""

from __future__ import annotations

import math

import numpy as np

LOG_EPS_MEV = 1e-6
_BLOCK_ROWS = 64


class StatsAccumulator:
    def __init__(self, mesh_shape: tuple[int, int, int], log_eps: float = LOG_EPS_MEV) -> None:
        self.mesh_shape = tuple(int(v) for v in mesh_shape)
        self.log_eps = float(log_eps)
        n_z = self.mesh_shape[0]
        self.n = 0
        self.layer_log_sum = np.zeros(n_z)
        self.layer_log_sq = np.zeros(n_z)
        self.layer_log_max = np.full(n_z, -np.inf)
        self.layer_nonzero = np.zeros(n_z)
        self.layer_frac_sum = np.zeros(n_z)
        self.layer_efrac_sum = np.zeros(n_z)
        self.layer_efrac_sq = np.zeros(n_z)
        self.ratio_sum = 0.0
        self.ratio_sq = 0.0
        self.e_min, self.e_max = math.inf, -math.inf
        self.t_min, self.t_max = math.inf, -math.inf

    def update(self, showers_NZPR: np.ndarray, energy_mev: np.ndarray, theta_rad: np.ndarray) -> None:
        if tuple(showers_NZPR.shape[1:]) != self.mesh_shape:
            raise ValueError(f"stats: shower shape {showers_NZPR.shape[1:]} != mesh {self.mesh_shape}")
        if len(showers_NZPR) > _BLOCK_ROWS:  # bound the float64 temporaries (large blocks are 5-7x slower)
            for i in range(0, len(showers_NZPR), _BLOCK_ROWS):
                sl = slice(i, i + _BLOCK_ROWS)
                self.update(showers_NZPR[sl], np.asarray(energy_mev)[sl], np.asarray(theta_rad)[sl])
            return
        if len(showers_NZPR) == 0:
            return
        x = showers_NZPR.astype(np.float64, copy=False)
        lx = np.log(x + self.log_eps)
        self.n += len(x)
        self.layer_log_sum += lx.sum(axis=(0, 2, 3))
        self.layer_log_sq += (lx * lx).sum(axis=(0, 2, 3))
        self.layer_log_max = np.maximum(self.layer_log_max, lx.max(axis=(0, 2, 3)))
        self.layer_nonzero += (x > 0).sum(axis=(0, 2, 3))
        layer_e = x.sum(axis=(2, 3))
        etot = layer_e.sum(axis=1)
        self.layer_frac_sum += (layer_e / np.maximum(etot, 1e-12)[:, None]).sum(axis=0)
        einc = np.asarray(energy_mev, dtype=np.float64)
        efrac = layer_e / einc[:, None]
        self.layer_efrac_sum += efrac.sum(axis=0)
        self.layer_efrac_sq += (efrac * efrac).sum(axis=0)
        ratio = etot / einc
        self.ratio_sum += ratio.sum()
        self.ratio_sq += (ratio * ratio).sum()
        self.e_min = min(self.e_min, float(np.min(energy_mev)))
        self.e_max = max(self.e_max, float(np.max(energy_mev)))
        self.t_min = min(self.t_min, float(np.min(theta_rad)))
        self.t_max = max(self.t_max, float(np.max(theta_rad)))

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        if other.mesh_shape != self.mesh_shape or other.log_eps != self.log_eps:
            raise ValueError(f"stats: cannot merge mesh {other.mesh_shape} into {self.mesh_shape}")
        out = StatsAccumulator(self.mesh_shape, self.log_eps)
        for k in (
            "n",
            "layer_log_sum",
            "layer_log_sq",
            "layer_nonzero",
            "layer_frac_sum",
            "layer_efrac_sum",
            "layer_efrac_sq",
            "ratio_sum",
            "ratio_sq",
        ):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        out.layer_log_max = np.maximum(self.layer_log_max, other.layer_log_max)
        out.e_min, out.e_max = min(self.e_min, other.e_min), max(self.e_max, other.e_max)
        out.t_min, out.t_max = min(self.t_min, other.t_min), max(self.t_max, other.t_max)
        return out

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("stats: no showers accumulated")
        per_layer = self.n * self.mesh_shape[1] * self.mesh_shape[2]
        total = per_layer * self.mesh_shape[0]
        layer_mean = self.layer_log_sum / per_layer
        layer_var = np.maximum(self.layer_log_sq / per_layer - layer_mean**2, 0.0)
        mean = self.layer_log_sum.sum() / total
        var = max(self.layer_log_sq.sum() / total - mean**2, 0.0)
        r_mean = self.ratio_sum / self.n
        efrac_mean = self.layer_efrac_sum / self.n
        efrac_var = np.maximum(self.layer_efrac_sq / self.n - efrac_mean**2, 0.0)
        return {
            "n_showers": int(self.n),
            "n_voxels_per_shower": int(np.prod(self.mesh_shape)),
            "log_eps": self.log_eps,
            "log_mean": float(mean),
            "log_std": float(math.sqrt(var)),
            "layer_log_mean": layer_mean.tolist(),
            "layer_log_std": np.sqrt(layer_var).tolist(),
            "layer_log_max": self.layer_log_max.tolist(),
            "occupancy": float(self.layer_nonzero.sum() / total),
            "layer_occupancy": (self.layer_nonzero / per_layer).tolist(),
            "etot_over_einc_mean": float(r_mean),
            "etot_over_einc_std": float(math.sqrt(max(self.ratio_sq / self.n - r_mean**2, 0.0))),
            "layer_frac_mean": (self.layer_frac_sum / self.n).tolist(),
            "layer_energy_over_einc_mean": efrac_mean.tolist(),
            "layer_energy_over_einc_std": np.sqrt(efrac_var).tolist(),
            "energy_mev_min": self.e_min,
            "energy_mev_max": self.e_max,
            "theta_rad_min": self.t_min,
            "theta_rad_max": self.t_max,
        }


def compute_stats(showers_NZPR: np.ndarray, energy_mev: np.ndarray, theta_rad: np.ndarray) -> dict:
    acc = StatsAccumulator(tuple(showers_NZPR.shape[1:]))
    acc.update(showers_NZPR, energy_mev, theta_rad)
    return acc.result()
