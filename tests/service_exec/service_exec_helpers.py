"""Helpers of the service execution tests: a tiny base bundle, tiny target shards, a tiny adaptation config
file, job specs and waiting for Ray (a module of its own: ``conftest`` is not importable unambiguously)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from caloforge.adapt.config import AdaptConfig, AdaptEvalConfig, GateConfig
from caloforge.config import dump_yaml
from caloforge.datasets.prepare import SimulateConfig, simulate_and_shard
from caloforge.datasets.shards import Manifest, ShardConfig, SplitFractions
from caloforge.evaluation.config import ClassifierConfig, EvalConfig, FPDConfig, KPDConfig, PlotConfig
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.lineage import Lineage
from caloforge.platform.shower_model import ShowerModelConfig
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.job import model_for_manifest

MODEL = ShowerModelConfig(
    backbone="debug",
    patch_size=(9, 4, 3),
    parametrisation="flow_matching",
    sampler="euler",
    num_steps=2,
    layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=2),
)


def make_shards(out: Path, detectors: tuple[str, ...], n: int, seed: int) -> Path:
    spec = SimulateConfig(
        detectors=detectors,
        particles=("e-", "pi+"),
        n_per_detector=n,
        energy_gev=(2.0, 50.0),
        seed=seed,
        shards=ShardConfig(showers_per_shard=40, split=SplitFractions(train=0.6, val=0.1, test=0.3)),
    )
    return simulate_and_shard(spec, out)


def make_base_bundle(root: Path) -> Path:
    """An untrained base on par04-siw and pbwo4 with a spare detector slot (its zero-initialised tensors
    filled with small seeded noise, as in tests/adapt/conftest.py)."""
    shards = make_shards(root / "data", ("par04-siw", "pbwo4"), 60, seed=3)
    model = model_for_manifest(MODEL, Manifest.load(shards), spare_detector_slots=1)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02, generator=gen)
    return model.save(root / "bundle", lineage=Lineage(kind="base", objective="flow_matching"))


def write_tiny_config(path: Path) -> Path:
    """An adaptation config file of four optimizer steps and a small evaluation (seconds on 2 cores)."""
    config = AdaptConfig(
        name="tiny",
        loop=LoopConfig(
            steps=4,
            batch_size=8,
            log_every=2,
            checkpoint_every=2,
            seed=0,
            optim=OptimConfig(lr=1e-3),
            schedule=ScheduleConfig(kind="constant"),
            ema=EMAConfig(decay=0.5),
        ),
        eval=AdaptEvalConfig(
            n_showers=30,
            metrics=EvalConfig(
                metrics=("sep_power", "response", "fpd", "kpd", "cls_high"),
                floor_metrics=("fpd", "kpd", "cls_high"),
                classifier=ClassifierConfig(hidden=16, n_layers=1, epochs=2, batch_size=32, n_seeds=1),
                fpd=FPDConfig(min_samples=10, max_samples=15, num_points=2, num_batches=2),
                kpd=KPDConfig(batch_size=10, num_batches=2),
                plots=PlotConfig(dpi=40),
            ),
        ),
        gate=GateConfig(max_auc_high=1.0),
        progress=False,
        torch_threads=1,
    )
    path.write_text(dump_yaml(config))
    return path


def write_spec(job_dir: Path, *, data: Path, config: Path, **changes: Any) -> dict[str, Any]:
    """``job_dir/spec.json`` as the executor writes it (the contract's job spec)."""
    spec: dict[str, Any] = {
        "base": "caloforge-base@champion",
        "detector": {"name": "lar-pb"},
        "data": str(data),
        "strategy": "full",
        "config": str(config),
        "hyperparameters": {},
        "distillation": None,
        "registration": {"model_name": None, "alias": "candidate"},
        "seed": 0,
        "metadata": {},
        # the legacy exporter writes the tiny graph in a second (dynamo: ~30 s here; tested in tests/registry)
        "export": {"exporter": "legacy"},
    }
    spec.update(changes)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    return spec


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def make_home(root: Path, base_bundle: Path, mp: pytest.MonkeyPatch) -> Path:
    """``root/home`` as CALOFORGE_HOME with its default sqlite registry (MLFLOW_TRACKING_URI unset, as for
    the service), the base registered as ``caloforge-base@champion``."""
    from caloforge.registry.store import RegistryStore

    home = root / "home"
    mp.setenv("CALOFORGE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    RegistryStore().register_bundle(base_bundle, kind="base", aliases=("champion",))
    return home
