"""MLflow run tracking for training jobs: params, metrics, artifacts of one run (rank 0 only).

The only MLflow use outside ``store.py``/``pyfunc.py``; ``mlflow`` is imported lazily (inside
:class:`RunTracker`), so importing this module costs nothing. The store is
``caloforge.paths.mlflow_tracking_uri()`` by default (``$MLFLOW_TRACKING_URI`` when set, else sqlite under
``$CALOFORGE_HOME/mlflow`` with artifacts next to the database, as the registry store does).

A tracker talks to MLflow through an explicit ``MlflowClient`` (no process-global active run), so it is
safe inside Ray workers. Resuming a run (``run_id=...``) keeps one metric timeline: MLflow params are
immutable, so a resumed run records values that changed (e.g. ``loop.steps`` raised for more steps) as
``caloforge.resume.<n>.<param>`` tags instead of failing.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caloforge import paths

__all__ = ["RunTracker", "flatten_params", "library_versions"]

log = logging.getLogger("caloforge.registry")

_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
_BATCH = 100  # params/tags per log_batch call (MLflow's limit)
_METRIC_BATCH = 1000


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": "1", "c": "[1, 2]"}`` (values as MLflow param strings).

    Mappings nest with dots; lists/tuples become JSON; ``None`` becomes ``"null"``; over-long values are
    truncated with a trailing ``…`` (MLflow rejects values over 6000 characters).
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, name + "."))
            else:
                out[name] = "{}"
            continue
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = json.dumps(list(value), default=str)
        else:
            text = str(value)
        if len(text) > _MAX_PARAM_VALUE:
            text = text[: _MAX_PARAM_VALUE - 1] + "…"
        out[name] = text
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries a training run depends on (read from package metadata, nothing imported)."""
    versions = {"python": platform.python_version()}
    for dist in ("caloforge", "torch", "ray", "deepspeed", "mlflow", "numpy", "webdataset"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


class RunTracker:
    """One MLflow run: create it (``run_id=None``) or continue an existing one.

    Args:
        experiment: MLflow experiment name (created when missing).
        run_name: display name of a new run.
        run_id: continue this run instead of creating one (its experiment is used).
        tracking_uri: default ``caloforge.paths.mlflow_tracking_uri()``.
        tags: tags set on the run (new or continued).
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri or paths.mlflow_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.resumed = run_id is not None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as exc:
                raise ValueError(f"MLflow run {run_id!r} not found in {self.tracking_uri}") from exc
            if run.info.lifecycle_stage != "active":
                raise ValueError(f"MLflow run {run_id!r} is deleted; restore it or start a new run")
            self.run_id = run_id
            self.experiment_id = run.info.experiment_id
            self._params = dict(run.data.params)
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.experiment_id = self._experiment_id(experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            self._params = {}
        if tags:
            self.set_tags(tags)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or pick another name")
            return exp.experiment_id
        return self.client.create_experiment(
            name, artifact_location=paths.mlflow_artifact_root(self.tracking_uri)
        )

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log ``params`` (nested mappings are flattened); returns ``{key: (old, new)}`` of changed values.

        On a continued run, keys already logged with the same value are skipped and changed values are
        recorded as ``caloforge.resume.<n>.<key>`` tags (MLflow params cannot change).
        """
        from mlflow.entities import Param

        flat = flatten_params(params)
        new = {k: v for k, v in flat.items() if k not in self._params}
        changed = {
            k: (self._params[k], v) for k, v in flat.items() if k in self._params and self._params[k] != v
        }
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])
        self._params.update(new)
        if changed:
            n = (
                sum(1 for k in self.client.get_run(self.run_id).data.tags if k.endswith(".resumed_at_unix"))
                + 1
            )
            tags = {f"caloforge.resume.{n}.{k}": v for k, (_, v) in changed.items()}
            tags[f"caloforge.resume.{n}.resumed_at_unix"] = f"{time.time():.0f}"
            self.set_tags(tags)
            log.info("MLflow run %s continued with changed params: %s", self.run_id, sorted(changed))
        return changed

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` (NaN/inf values are left out, with a debug line)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            v = float(value)
            if not math.isfinite(v):
                log.debug("metric %s=%s at step %d is not finite: not logged", key, v, step)
                continue
            items.append(Metric(key, v, now, int(step)))
        for i in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _METRIC_BATCH])

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise ValueError(f"log_artifacts: {local_dir} is not a directory")
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
        self.client.set_terminated(self.run_id, status=status)
