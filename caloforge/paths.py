"""Where CaloForge keeps things by default: ``$CALOFORGE_HOME`` (default ``./caloforge-home``).

- ``data/``    simulated/converted datasets and shards
- ``runs/``    training / pretraining run directories (resolved config, metrics.jsonl, logs, checkpoints)
- ``mlflow/``  the default MLflow store: ``mlflow.db`` (sqlite) + ``artifacts/``
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
