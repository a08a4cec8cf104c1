"""Fixtures of the adaptation tests: real simulated shard sets, a tiny base bundle trained on two built-in
detectors, a real sqlite MLflow registry, and a tiny adaptation config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from caloforge.adapt.config import AdaptConfig, AdaptEvalConfig, GateConfig
from caloforge.datasets.prepare import SimulateConfig, simulate_and_shard
from caloforge.datasets.shards import Manifest, ShardConfig, SplitFractions
from caloforge.evaluation.config import ClassifierConfig, EvalConfig, FPDConfig, KPDConfig, PlotConfig
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.lineage import Lineage
from caloforge.platform.shower_model import ShowerModelConfig
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.job import model_for_manifest

BASE_DETECTORS = ("par04-siw", "pbwo4")
MODEL = ShowerModelConfig(
    backbone="debug",
    patch_size=(9, 4, 3),
    parametrisation="flow_matching",
    sampler="euler",
    num_steps=2,
    layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=2),
)


def make_shards(out: Path, detectors: tuple[str, ...], n: int, seed: int = 3) -> Path:
    spec = SimulateConfig(
        detectors=detectors,
        particles=("e-", "pi+"),
        n_per_detector=n,
        energy_gev=(2.0, 50.0),
        seed=seed,
        shards=ShardConfig(showers_per_shard=40, split=SplitFractions(train=0.6, val=0.1, test=0.3)),
    )
    return simulate_and_shard(spec, out)


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model on par04-siw and pbwo4 with one spare detector slot, as a bundle. Untrained, but its
    zero-initialised tensors (adaLN-Zero, final layer, the head's output) are filled with small seeded noise,
    as training would, so every parameter reaches the output and gets gradients."""
    root = tmp_path_factory.mktemp("adapt-base")
    shards = make_shards(root / "data", BASE_DETECTORS, 60)
    model = model_for_manifest(MODEL, Manifest.load(shards), spare_detector_slots=1)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02, generator=gen)
    return model.save(root / "bundle", lineage=Lineage(kind="base", objective="flow_matching"))


@pytest.fixture(scope="session")
def lar_pb_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lar-pb (held out of the base): 100 showers, 30 % test."""
    return make_shards(tmp_path_factory.mktemp("adapt-lar-pb"), ("lar-pb",), 100, seed=5)


@pytest.fixture(scope="session")
def empty_registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from caloforge.registry.store import RegistryStore

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    RegistryStore(tracking_uri=f"sqlite:///{path}").list_models()
    return path


@pytest.fixture
def registry(tmp_path: Path, empty_registry_db: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite registry that ``RegistryStore()`` (no arguments) opens, and CALOFORGE_HOME in tmp."""
    from caloforge.registry.store import RegistryStore

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_registry_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    return RegistryStore()


def tiny_config(**changes) -> AdaptConfig:
    """Four optimizer steps and a small evaluation: seconds on 2 cores."""
    base = dict(
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
        gate=GateConfig(max_auc_high=1.0, max_fpd_over_floor=1e9),
        progress=False,
        torch_threads=1,
    )
    base.update(changes)
    return AdaptConfig(**base)
