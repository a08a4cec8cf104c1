"""Fixtures of the service tests: one real service, validate-only (``execute: false``): uvicorn in a thread on
127.0.0.1, SQLite in WAL mode under a temporary $CALOFORGE_HOME, simulated lar-pb shards in the data root, a
base bundle (a registry base, in a real ``mlflow server``: test_service_acceptance.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from service_helpers import ThreadServer, make_base_bundle, make_shards

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = "bootstrap-token-for-the-tests-0123456789"


@dataclass
class Service:
    url: str
    home: Path
    data: Path
    base_bundle: Path
    store: object
    config: object
    tokens: dict[str, str]


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from caloforge.adapt.service.app import create_app
    from caloforge.adapt.service.auth import TokenStore
    from caloforge.adapt.service.config import ServiceConfig
    from caloforge.adapt.service.store import JobStore

    root = tmp_path_factory.mktemp("service")
    saved = {
        k: os.environ.get(k)
        for k in ("CALOFORGE_HOME", "MLFLOW_TRACKING_URI", "CALOFORGE_SERVICE_BOOTSTRAP_TOKEN")
    }
    home = root / "home"
    os.environ["CALOFORGE_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["CALOFORGE_SERVICE_BOOTSTRAP_TOKEN"] = BOOTSTRAP
    try:
        data_root = home / "data"
        data = make_shards(data_root / "lar-pb", ("lar-pb",), 80, seed=5)
        bundle = make_base_bundle(home / "models")
        config = ServiceConfig(
            configs_dir=REPO / "configs",
            data_roots=(data_root,),
            execute=False,
            poll_interval_s=0.05,
            max_body_bytes=16 * 1024,
            max_detector_yaml_bytes=4 * 1024,
        )
        store = JobStore(config.resolved_database_url())
        tokens = TokenStore(store)
        made = {
            "submitter": tokens.create("submitter", ["submit", "read"]),
            "reader": tokens.create("reader", ["read"]),
            "other": tokens.create("other", ["submit"]),
            "admin": BOOTSTRAP,
        }
        server = ThreadServer(create_app(config, store=store))
        yield Service(server.url, home, data, bundle, store, config, made)
        server.stop()
        store.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
