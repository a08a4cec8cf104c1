"""Fixtures of the service execution tests: a tiny base bundle, lar-pb shards and a tiny adaptation config
(built once per session), and a CALOFORGE_HOME with a real sqlite MLflow registry holding the base as
``caloforge-base@champion`` (helpers: ``service_exec_helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_exec_helpers import make_base_bundle, make_home, make_shards, write_tiny_config


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("service-exec-assets")
    return {
        "base": make_base_bundle(root / "base"),
        "data": make_shards(root / "lar-pb", ("lar-pb",), 100, seed=5),
        "config": write_tiny_config(root / "tiny.yaml"),
    }


@pytest.fixture
def service_home(tmp_path: Path, tiny_assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_home(tmp_path, tiny_assets["base"], monkeypatch)
