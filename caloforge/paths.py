"""Where CaloForge keeps things by default: ``$CALOFORGE_HOME`` (default ``./caloforge-home``).

- ``data/``    simulated/converted datasets and shards
- ``runs/``    training / pretraining run directories (resolved config, metrics.jsonl, logs, checkpoints)
- ``mlflow/``  the default MLflow store: ``mlflow.db`` (sqlite) + ``artifacts/`` (``mlflow_artifact_root``)
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("CALOFORGE_HOME", "caloforge-home")).resolve()


def data_dir() -> Path:
    return home() / "data"


def runs_dir() -> Path:
    return home() / "runs"


def mlflow_dir() -> Path:
    return home() / "mlflow"


def mlflow_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (e.g. a deployed ``mlflow server``), else the local sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    mlflow_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlflow_dir() / 'mlflow.db'}"


def mlflow_artifact_root(tracking_uri: str) -> str | None:
    """Artifact location (a ``file://`` URI) for experiments created against ``tracking_uri``.

    A sqlite store keeps its artifacts in ``artifacts/`` next to the database (for the default store:
    ``$CALOFORGE_HOME/mlflow/artifacts``); MLflow would otherwise use ``./mlruns`` of the working directory.
    None for file stores and tracking servers, which decide themselves.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "artifacts").resolve().as_uri()
    return None
