"""Helpers shared by the registry tests: tiny real ShowerModels and bundle edits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.lineage import Lineage, TrainedRanges
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig

MESH = (6, 4, 3)
DETECTORS = ("lar-pb", "pbwo4")
TRAINED = TrainedRanges(
    energy_mev=(1e3, 1e5), theta_rad=(0.2, 1.0), particles=("e-", "gamma", "pi+"), detectors=DETECTORS
)
# A small layer-energy head (the default one unrolls 16 midpoint steps into every ONNX graph: slow exports).
# Three steps, unlike the voxel sampler's two, so a graph that mixed up the two grids would fail parity.
TINY_HEAD = LayerEnergyConfig(width=16, depth=1, num_steps=3)


def tiny_model(
    parametrisation: str = "flow_matching",
    sampler: str = "heun",
    num_steps: int = 2,
    detectors: tuple[str, ...] = DETECTORS,
    lineage: dict[str, object] | None = None,
    seed: int = 0,
    init_scale: float = 0.03,
    layer_energy: LayerEnergyConfig = TINY_HEAD,
) -> ShowerModel:
    """A debug-size model on a 6×4×3 mesh, transform fitted on simulated-looking showers, and every
    zero-initialised tensor (adaLN-Zero, final layer) filled with small seeded noise so the network's
    output depends on its inputs (an untrained DiT would otherwise be the identity; the layer-energy head
    would give v = 0). ``lineage``: fields of its ``Lineage`` beside the manifest hash and ``TRAINED``."""
    rng = np.random.default_rng(seed)
    x = (rng.lognormal(-2.0, 1.5, size=(128, *MESH)) * (rng.random((128, *MESH)) > 0.4)).astype(np.float32)
    stats = compute_stats(x, rng.uniform(1e3, 1e5, 128), rng.uniform(0.2, 1.0, 128))
    cfg = ShowerModelConfig(
        backbone="debug",
        parametrisation=parametrisation,
        sampler=sampler,
        num_steps=num_steps,
        layer_energy=layer_energy,
    )
    fields = {"dataset_manifest_hash": "sha256:" + "ab" * 8, "trained": TRAINED, **(lineage or {})}
    model = ShowerModel.build(
        cfg, ConditionVocab.create(list(detectors), spare_slots=2), stats, MESH, Lineage(**fields)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point and not bool(p.any()):
                p.copy_(init_scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def rewrite_config(bundle: Path, **changes: object) -> None:
    """Edit a bundle's config.json in place (used to make broken bundles)."""
    cfg_path = bundle / "config.json"
    data = json.loads(cfg_path.read_text())
    data.update(changes)
    cfg_path.write_text(json.dumps(data))
