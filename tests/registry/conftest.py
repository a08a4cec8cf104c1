"""Fixtures of the registry tests: tiny real ShowerModel bundles, a real sqlite MLflow store, and (for the
slow test) a real ``mlflow server`` subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import tiny_model

from caloforge.environment import free_port


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, empty MLflow sqlite database, migrated once (each migration costs seconds on 2 busy cores);
    tests copy it to get a fresh store."""
    from caloforge.registry.store import RegistryStore

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    RegistryStore(tracking_uri=f"sqlite:///{path}").list_models()
    return path


@pytest.fixture
def fresh_store(tmp_path: Path, empty_mlflow_db: Path):
    """A RegistryStore on its own empty sqlite database under ``tmp_path/mlflow``."""
    from caloforge.registry.store import RegistryStore

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_mlflow_db, db)
    return RegistryStore(tracking_uri=f"sqlite:///{db}")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model bundle (flow matching, Heun × 2 steps) on detectors lar-pb and pbwo4."""
    path = tmp_path_factory.mktemp("bundles") / "base"
    tiny_model(lineage={"kind": "base", "objective": "flow_matching"}).save(path)
    return path


@pytest.fixture(scope="session")
def adapted_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step student for lar-pb (EDM, Euler × 1 = one D(x; σ_max)), child of caloforge-base v1."""
    path = tmp_path_factory.mktemp("bundles") / "adapted"
    model = tiny_model(
        parametrisation="edm",
        sampler="euler",
        num_steps=1,
        init_scale=0.1,
        lineage={
            "kind": "distilled",
            "parent_uri": "models:/caloforge-base/1",
            "strategy": "consistency",
            "objective": "edm",
            "target_detector": "lar-pb",
        },
        seed=1,
    )
    model.save(path)
    return path


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` (1 worker, job execution off) on 127.0.0.1; yields its URI, then stops it."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"),
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited early:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker: our own process group
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
