"""Quick validation of a pretraining run: generated vs held-out showers per detector, on the EMA weights."""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from caloforge.datasets.shards import Manifest, shard_samples
from caloforge.platform import seeding
from caloforge.platform.conditioning import Conditions
from caloforge.platform.geometry import Mesh
from caloforge.platform.shower_model import ShowerModel
from caloforge.pretrain.config import ValidationConfig

__all__ = ["QuickValidation"]


def _validation_sets(
    manifest: Manifest, split: str, detectors: tuple[str, ...], n: int, seed: int
) -> dict[str, tuple[np.ndarray, Conditions]]:
    """Up to ``n`` held-out showers per detector, spread evenly over its particles (seeded subsample)."""
    out: dict[str, tuple[np.ndarray, Conditions]] = {}
    for det in detectors:
        shards = [s for s in manifest.shards(split) if s.detector == det]
        if not shards:
            continue
        particles = sorted({s.particle for s in shards})
        per_particle = math.ceil(n / len(particles))
        xs: list[np.ndarray] = []
        metas: list[dict] = []
        for particle in particles:
            taken = 0
            for shard in (s for s in shards if s.particle == particle):
                for meta, arr in shard_samples(manifest, shard):
                    xs.append(arr)
                    metas.append(meta)
                    taken += 1
                    if taken >= per_particle:
                        break
                if taken >= per_particle:
                    break
        rng = seeding.rng(seed, len(xs))  # no purpose (historical); same as default_rng([seed, len(xs)])
        keep = np.sort(rng.permutation(len(xs))[:n])
        x = np.stack([xs[i] for i in keep]).astype(np.float32)
        cond = Conditions(
            np.array([metas[i]["energy_mev"] for i in keep], dtype=np.float64),
            np.array([metas[i]["theta_rad"] for i in keep], dtype=np.float64),
            np.array([metas[i]["phi_rad"] for i in keep], dtype=np.float64),
            np.array([metas[i]["pdg"] for i in keep], dtype=np.int64),
            np.array([metas[i]["detector"] for i in keep], dtype=str),
        )
        out[det] = (x, cond)
    return out


class QuickValidation:
    """Generated vs held-out showers per detector, on the EMA weights (called through ``PeriodicEval``).

    Metrics per detector ``d`` (and their means over detectors without the prefix):

    - ``<d>/etot_ratio``: mean generated total energy / mean held-out total energy (1 is perfect);
    - ``<d>/etot_rel_err``: ``|etot_ratio − 1|``;
    - ``<d>/etot_median_ratio``: the same with medians (robust to a few wild showers of a young model);
    - ``<d>/long_profile_sep``: separation power ½ Σ_z (p_z − q_z)² / (p_z + q_z) between the mean normalised
      longitudinal profiles (CaloChallenge's histogram distance; 0 is perfect, 1 disjoint).

    Features come from ``caloforge.evaluation.features.compute_features`` (voxels at or below the model's
    readout threshold are zeroed on both sides).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        detectors: tuple[str, ...],
        config: ValidationConfig,
    ) -> None:
        self.config = config
        self.sets = _validation_sets(manifest, split, detectors, config.showers_per_detector, config.seed)
        self.meshes: dict[str, Mesh] = {det: manifest.geometry(det) for det in self.sets}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from caloforge.evaluation.features import compute_features, voxel_log_edges
        from caloforge.evaluation.histograms import separation_power

        if not isinstance(model, ShowerModel):
            raise ValueError(f"quick validation needs a ShowerModel, got {type(model).__name__}")
        threshold = float(model.config.threshold_mev)
        edges = voxel_log_edges(max(threshold, 1e-6), 1e7, 8)
        out: dict[str, float] = {}
        for det, (ref_x, cond) in self.sets.items():
            gen_x = model.generate(
                cond,
                num_steps=self.config.num_steps,
                sampler=self.config.sampler,
                batch_size=self.config.batch_size,
                seed=self.config.seed,
            )
            mesh = self.meshes[det]
            ref = compute_features(ref_x, cond.energy_mev, mesh, threshold, edges)
            gen = compute_features(gen_x, cond.energy_mev, mesh, threshold, edges)
            ratio = float(gen.e_tot_mev.mean() / max(ref.e_tot_mev.mean(), 1e-12))
            p = gen.e_layer_mev.mean(axis=0)
            q = ref.e_layer_mev.mean(axis=0)
            p = p / p.sum() if p.sum() > 0 else np.full_like(p, 1.0 / len(p))
            q = q / q.sum() if q.sum() > 0 else np.full_like(q, 1.0 / len(q))
            out[f"{det}/etot_ratio"] = ratio
            out[f"{det}/etot_rel_err"] = abs(ratio - 1.0)
            out[f"{det}/etot_median_ratio"] = float(
                np.median(gen.e_tot_mev) / max(float(np.median(ref.e_tot_mev)), 1e-12)
            )
            out[f"{det}/long_profile_sep"] = float(separation_power(p, q))
        if self.sets:
            for key in ("etot_rel_err", "long_profile_sep"):
                out[key] = float(np.mean([out[f"{d}/{key}"] for d in self.sets]))
        return out
