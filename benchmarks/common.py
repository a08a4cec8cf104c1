"""Shared by the model and export benchmarks: synthetic showers whose timing does not depend on physics."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import numpy as np

from caloforge.platform.conditioning import PARTICLES, Conditions

MESH = (45, 16, 9)
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# The training recipes the studies build their models from (model, objective, loop). ``debug``: the coarse
# 5 x 4 x 3 patch, fast, its quality saturates early; ``fidelity``: the CPU fidelity recipe (3 x 2 x 3 patch,
# logit-normal t, the voxel model reading the layer energies; docs/model.md), 3.3x the cost of a step.
TRAIN_RECIPES = {"debug": "configs/train/debug.yaml", "fidelity": "configs/train/fidelity-cpu.yaml"}
DETECTORS = ("bench_a", "bench_b")


def synthetic(n: int, seed: int) -> tuple[np.ndarray, Conditions]:
    """Sparse log-normal showers on the 45×16×9 mesh and random conditions (θ in 50°–130°)."""
    rng = np.random.default_rng(seed)
    showers = rng.lognormal(0.0, 2.0, (n, *MESH)) * (rng.random((n, *MESH)) < 0.3)
    cond = Conditions.make(
        np.exp(rng.uniform(np.log(1e3), np.log(1e6), n)),
        rng.uniform(0.9, 2.2, n),
        rng.uniform(-np.pi, np.pi, n),
        rng.choice(list(PARTICLES.values()), n),
        rng.choice(DETECTORS, n),
    )
    return showers.astype(np.float32), cond


def train_recipe(name: str) -> tuple[Path, dict]:
    """A training recipe of ``TRAIN_RECIPES``: its path and its YAML."""
    import yaml

    if name not in TRAIN_RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {sorted(TRAIN_RECIPES)})")
    path = REPO / TRAIN_RECIPES[name]
    return path, yaml.safe_load(path.read_text())


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(record: dict, name: str, device: str, out: Path | None = None) -> Path:
    """Write ``record`` atomically to ``out`` or ``results/<device>_<date>_<name>.json``; returns the path."""
    out = out or RESULTS / f"{device}_{dt.date.today().isoformat()}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")
    return out


def resolved_architecture(model: dict) -> dict:
    """The network a model section of a config resolves to (flavour defaults included), as plain data for
    cache keys: a changed flavour default (such as ``pos_max_freq``) then changes the key, and so does a
    voxel network that reads the layer energies (``layer_energy.condition_voxels``; absent when off, so the
    keys of the networks before it stay what they were)."""
    import dataclasses

    from caloforge.config import from_dict
    from caloforge.platform.shower_model import ShowerModelConfig

    config = from_dict(ShowerModelConfig, model, "model")
    arch = dataclasses.asdict(config.backbone_config())
    if config.layer_energy.enabled and config.layer_energy.condition_voxels:
        arch["layer_condition"] = True
    return arch
