"""Fixtures of the distillation tests (one intra-op thread: two shared cores, tiny tensors)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


import dataclasses  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from caloforge.datasets.prepare import SimulateConfig, simulate_and_shard  # noqa: E402
from caloforge.datasets.shards import Manifest, ShardConfig, SplitFractions  # noqa: E402
from caloforge.platform.energy import LayerEnergyConfig  # noqa: E402
from caloforge.platform.lineage import Lineage  # noqa: E402
from caloforge.platform.shower_model import ShowerModelConfig  # noqa: E402
from caloforge.training.job import model_for_manifest  # noqa: E402

DETECTORS = ("par04-siw",)
TEACHER = ShowerModelConfig(
    backbone="debug",
    patch_size=(9, 4, 3),
    parametrisation="edm",
    sampler="heun",
    num_steps=4,
    layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=2),
)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SimulateConfig(
        detectors=DETECTORS,
        particles=("e-", "pi+"),
        n_per_detector=80,
        energy_gev=(2.0, 50.0),
        seed=3,
        shards=ShardConfig(showers_per_shard=40, split=SplitFractions(train=0.6, val=0.1, test=0.3)),
    )
    return simulate_and_shard(spec, tmp_path_factory.mktemp("distill-data"))


@pytest.fixture(scope="session")
def teacher_bundle(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EDM teacher (untrained; zero-initialised tensors filled with small seeded noise, as training
    would)."""
    return _untrained_teacher(TEACHER, shards, tmp_path_factory.mktemp("distill-teacher"), 11, "edm")


@pytest.fixture(scope="session")
def empty_registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from caloforge.registry.store import RegistryStore

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    RegistryStore(tracking_uri=f"sqlite:///{path}").list_models()
    return path


@pytest.fixture
def registry(tmp_path: Path, empty_registry_db: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite registry that ``RegistryStore()`` opens, and CALOFORGE_HOME in tmp."""
    from caloforge.registry.store import RegistryStore

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_registry_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    return RegistryStore()


FM_TEACHER = dataclasses.replace(TEACHER, parametrisation="flow_matching", sampler="euler")


@pytest.fixture(scope="session")
def fm_teacher_bundle(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flow-matching teacher (untrained, zero-initialised tensors filled with small seeded noise)."""
    return _untrained_teacher(
        FM_TEACHER, shards, tmp_path_factory.mktemp("distill-fm-teacher"), 12, "flow_matching"
    )


@pytest.fixture(scope="session")
def conditioned_teacher_bundle(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flow-matching teacher whose voxel model reads the layer energies (``condition_voxels``; untrained,
    zero-initialised tensors — the layer maps included — filled with small seeded noise)."""
    config = dataclasses.replace(
        FM_TEACHER, layer_energy=dataclasses.replace(FM_TEACHER.layer_energy, condition_voxels=True)
    )
    return _untrained_teacher(
        config, shards, tmp_path_factory.mktemp("distill-conditioned-teacher"), 13, "flow_matching"
    )


def _untrained_teacher(
    config: ShowerModelConfig, shards: Path, root: Path, seed: int, objective: str
) -> Path:
    """A base bundle of ``config`` on the shards whose zero-initialised tensors are filled with small seeded
    noise (as training would), so that every path through the network is exercised."""
    model = model_for_manifest(config, Manifest.load(shards), spare_detector_slots=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02, generator=gen)
    return model.save(root / "bundle", lineage=Lineage(kind="base", objective=objective))
