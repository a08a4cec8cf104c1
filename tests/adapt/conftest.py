"""Fixtures of the adaptation tests: real simulated shard sets, a tiny base bundle on two built-in detectors,
and a real sqlite MLflow registry (helpers: ``adapt_helpers.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from adapt_helpers import BASE_DETECTORS, MODEL, make_shards

from caloforge.datasets.shards import Manifest
from caloforge.platform.lineage import Lineage
from caloforge.training.job import model_for_manifest


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
