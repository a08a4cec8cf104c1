"""How the STORED schema-2 bundle ``tests/assets/bundle_v2_debug/`` (+ its ``_expected.npz``) was made.

It was written once, by the code of commit 3ea94eb (bundle schema 2, lineage strings in ``extra``), so
that the tests load a bundle exactly as that version wrote it; re-running this script with a newer
caloforge writes a NEWER schema and must not replace the asset.

- data: two real shard sets' worth of seeded synthetic showers on a 6×4×3 mesh (det-a: e- and gamma,
  det-b: pi+), sharded by ``write_shards``; the trained ranges are what
  ``caloforge.datasets.streaming.trained_ranges`` recorded for the ``train`` split's stream groups
  (``energy_mev_min``/``max``, ``theta_rad_min``/``max`` as ``repr(float)`` strings and
  ``particles`` comma-separated), the way ``training/run.py`` and ``pretrain/worker.py`` stored them;
- model: ``ShowerModelConfig(backbone="debug", flow_matching, heun × 2)`` with a small layer-energy head,
  vocabulary det-a, det-b + 2 spare slots, zero-initialised tensors filled with small seeded noise (so the
  output depends on the weights);
- lineage: ``parent="models:/caloforge-base/1"``, the manifest fingerprint, a fixed ``created_utc`` and
  the other registry strings of that era in ``extra`` (``kind``, ``parent_version``,
  ``adaptation_method``, ``target_detector``) beside free-form run info (``run_dir``, ``steps``);
- ``bundle_v2_debug_expected.npz``: showers generated from it for fixed conditions and seeds (the
  loaded model must reproduce them).

Run from the repository root: ``PYTHONPATH=$PWD python tests/assets/make_bundle_v2_debug.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from caloforge.datasets.formats import native
from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.shards import Manifest, ShardConfig, write_shards
from caloforge.datasets.streaming import StreamConfig, plan_groups, trained_ranges
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.shower_model import Lineage, ShowerModel, ShowerModelConfig

ASSETS = Path(__file__).resolve().parent
MESH = (6, 4, 3)


def showers(n: int, detector: str, pdg: int | np.ndarray, seed: int) -> ShowerSet:
    rng = np.random.default_rng(seed)
    n_z, n_p, n_r = MESH
    energy = 10 ** rng.uniform(3, 5, n) + np.arange(n) * 1e-3
    z = (np.arange(n_z) + 0.5) / n_z * 20.0
    long = z[None, :] ** 2 * np.exp(-2.0 * z[None, :] / rng.uniform(4, 8, n)[:, None])
    long /= long.sum(axis=1, keepdims=True)
    radial = np.exp(-np.arange(n_r) / 0.8)
    frac = long[:, :, None, None] * (radial / radial.sum())[None, None, None, :] / n_p
    x = energy[:, None, None, None] * frac * rng.gamma(2.0, 0.5, size=(n, *MESH))
    x[x < 0.5e-3 / 0.033] = 0.0
    cond = Conditions.make(energy, rng.uniform(0.7, 2.4, n), rng.uniform(-np.pi, np.pi, n), pdg, detector)
    return ShowerSet(x.astype(np.float32), cond, "synthetic", seed, {"purpose": "bundle_v2_debug asset"})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        native.write(tmp / "a.h5", showers(60, "det-a", np.where(np.arange(60) % 2 == 0, 11, 22), seed=1))
        native.write(tmp / "b.h5", showers(40, "det-b", 211, seed=2))
        write_shards([tmp / "a.h5", tmp / "b.h5"], tmp / "shards", ShardConfig(showers_per_shard=10, seed=3))
        manifest = Manifest.load(tmp / "shards")
        ranges = trained_ranges(manifest, plan_groups(manifest, "train", StreamConfig()))
        cfg = ShowerModelConfig(
            backbone="debug",
            objective="flow_matching",
            sampler="heun",
            num_steps=2,
            layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=3),
        )
        vocab = ConditionVocab.create(list(manifest.detectors), spare_slots=2)
        lineage = Lineage(
            parent="models:/caloforge-base/1",
            dataset_manifest_hash=manifest.fingerprint,
            created_utc="2025-06-01T12:00:00+00:00",
            extra={
                **ranges,
                "kind": "adapted",
                "parent_version": "1",
                "adaptation_method": "full",
                "target_detector": "det-a",
                "run_dir": "/runs/bundle-v2-debug",
                "steps": "10",
            },
        )
        model = ShowerModel.build(cfg, vocab, manifest.stats["pooled"], MESH, lineage=lineage)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point and not bool(p.any()):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval().save(ASSETS / "bundle_v2_debug", overwrite=True)
    cond = Conditions.make([2e3, 3e4, 8e4], [0.9, 1.5, 2.2], [0.0, 1.0, -2.0], [11, 22, 211], "det-a")
    seeds = np.array([7, 8, 9], dtype=np.int64)
    out = model.generate(cond, seeds=seeds, batch_size=3)
    np.savez(
        ASSETS / "bundle_v2_debug_expected.npz",
        showers=out,
        seeds=seeds,
        **{f: getattr(cond, f) for f in cond.fields()},
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
