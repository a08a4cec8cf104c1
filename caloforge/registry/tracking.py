"""MLflow run tracking for training jobs: params, metrics, artifacts of one run (rank 0 only).

The only MLflow use outside ``store.py``/``pyfunc.py``; ``mlflow`` is imported lazily (inside
:class:`RunTracker`), so importing this module costs nothing. The store is
``caloforge.paths.mlflow_tracking_uri()`` by default (``$MLFLOW_TRACKING_URI`` when set, else sqlite under
``$CALOFORGE_HOME/mlflow`` with artifacts next to the database, as the registry store does).

A tracker talks to MLflow through an explicit ``MlflowClient`` (no process-global active run), so it is
safe inside Ray workers. Resuming a run (``run_id=...``) keeps one metric timeline: MLflow params are
immutable, so a resumed run records values that changed (e.g. ``loop.steps`` raised for more steps) as
``caloforge.resume.<n>.<param>`` tags instead of failing.

:class:`BestEffortTracker` is what a training worker uses: MLflow must never stop a run. Each call waits at
most ``timeout_s`` without MLflow's own retries (``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` set around the call, :func:`short_timeouts`); a failure is logged once per
outage and the call queued; queued calls are replayed in order (metrics with their original timestamps)
at the next call after ``retry_every_s`` and at the end of the run. An unreachable server is reported as
such, never as "run not found" (:func:`is_unreachable`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from caloforge import paths

__all__ = [
    "BestEffortTracker",
    "RunTracker",
    "TrackingUnavailable",
    "flatten_params",
    "is_unreachable",
    "library_versions",
    "replay_pending",
    "short_timeouts",
]

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


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server could not be reached (not: the run or experiment does not exist)."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether an MLflow client error means "could not talk to the server" (connection refused, timeout,
    5xx, retries exhausted) rather than an answer from it (not found, invalid value)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.exceptions.RequestException | OSError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        text = str(exc)
        return any(
            s in text
            for s in ("Max retries exceeded", "Connection refused", "failed with exception", "Read timed out")
        ) or (exc.error_code == "INTERNAL_ERROR" and "API request to" in text)
    return False


@contextlib.contextmanager
def short_timeouts(timeout_s: float, max_retries: int = 0) -> Iterator[None]:
    """MLflow HTTP calls inside wait at most ``timeout_s`` per request, with ``max_retries`` retries
    (MLflow reads these environment variables per request; the previous values are restored after)."""
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
            except Exception as exc:
                if is_unreachable(exc):
                    raise TrackingUnavailable(
                        f"cannot reach the MLflow tracking server at {self.tracking_uri} to continue run "
                        f"{run_id!r}: {exc}"
                    ) from exc
                if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise ValueError(f"MLflow run {run_id!r} not found in {self.tracking_uri}") from exc
                raise
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

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Log finite numeric metrics at ``step`` (NaN/inf values are left out, with a debug line);
        ``timestamp_ms`` default: now."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
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


class BestEffortTracker:
    """MLflow for a training worker: never blocks for long, never fails the run (see the module docstring).

    Args:
        experiment, run_id, tracking_uri: the run to continue (created by the driver).
        timeout_s: the longest one MLflow request may take (no retries).
        retry_every_s: after a failure, queued calls wait this long before the next attempt.
        clock: monotonic seconds (tests may pass their own).

    ``pending`` holds the queued calls: ``("metrics", {...}, step, timestamp_ms)``,
    ``("artifacts", local_dir, artifact_path)``, ``("dict", data, artifact_file)``.
    """

    def __init__(
        self,
        experiment: str,
        run_id: str,
        tracking_uri: str,
        timeout_s: float = 5.0,
        retry_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.experiment, self.run_id, self.tracking_uri = experiment, run_id, tracking_uri
        self.timeout_s, self.retry_every_s, self.clock = timeout_s, retry_every_s, clock
        self.pending: list[tuple[Any, ...]] = []
        self.failures = 0  # failed attempts (each at most timeout_s)
        self.replayed = 0  # calls delivered after having been queued
        self._tracker: RunTracker | None = None
        self._next_try = 0.0
        self._down_since: float | None = None

    @property
    def available(self) -> bool:
        return self._down_since is None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.pending.append(("metrics", dict(metrics), int(step), int(time.time() * 1000)))
        self._try()

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.pending.append(("artifacts", str(local_dir), artifact_path))
        self._try()

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.pending.append(("dict", dict(data), artifact_file))
        self._try()

    def flush(self) -> bool:
        """Try to deliver everything queued now (whatever the retry interval); ``True`` when nothing is
        left."""
        self._next_try = 0.0
        return self._try()

    def _deliver(self, item: tuple[Any, ...]) -> None:
        if self._tracker is None:
            self._tracker = RunTracker(self.experiment, run_id=self.run_id, tracking_uri=self.tracking_uri)
        kind = item[0]
        if kind == "metrics":
            self._tracker.log_metrics(item[1], item[2], timestamp_ms=item[3])
        elif kind == "artifacts":
            self._tracker.log_artifacts(item[1], item[2])
        elif kind == "dict":
            self._tracker.log_dict(item[1], item[2])
        else:
            raise ValueError(f"BestEffortTracker: unknown queued call {kind!r}")

    def _try(self) -> bool:
        if not self.pending:
            return True
        if self.clock() < self._next_try:
            return False
        was_down = self._down_since is not None
        with short_timeouts(self.timeout_s):
            while self.pending:
                try:
                    self._deliver(self.pending[0])
                except Exception as exc:
                    if not is_unreachable(exc):
                        raise
                    self.failures += 1
                    self._next_try = self.clock() + self.retry_every_s
                    if self._down_since is None:
                        self._down_since = self.clock()
                        log.warning(
                            "MLflow at %s is unreachable (%s); training continues, metrics.jsonl is the "
                            "record, %d call(s) queued and retried every %.0f s",
                            self.tracking_uri,
                            str(exc).splitlines()[0][:300],
                            len(self.pending),
                            self.retry_every_s,
                        )
                    return False
                self.pending.pop(0)
                if was_down:
                    self.replayed += 1
        if self._down_since is not None:
            log.warning(
                "MLflow at %s is reachable again after %.0f s: %d queued call(s) replayed",
                self.tracking_uri,
                self.clock() - self._down_since,
                self.replayed,
            )
            self._down_since = None
        return True

    def pending_record(self) -> dict[str, Any]:
        """What is still queued, as JSON (for ``tracking_pending.json`` in the run directory): metrics with
        their steps and timestamps, ``["artifacts", artifact_path]`` (the directory of that name in the run
        directory) and ``["dict", data, artifact_file]``."""
        metrics = [
            {"step": step, "timestamp_ms": ts, "metrics": values}
            for kind, values, step, ts in (i for i in self.pending if i[0] == "metrics")
        ]
        other = [[i[0], i[2]] for i in self.pending if i[0] == "artifacts"]
        other += [["dict", i[1], i[2]] for i in self.pending if i[0] == "dict"]
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "metrics": metrics, "other": other}


def replay_pending(tracker: RunTracker, record: Mapping[str, Any], artifact_dirs: Mapping[str, Path]) -> int:
    """Deliver a :meth:`BestEffortTracker.pending_record` through ``tracker`` (in order; metrics keep their
    steps and timestamps); ``artifact_dirs`` maps an artifact path to the local directory to upload.
    Returns the number of calls delivered; raises what the client raises (nothing is skipped)."""
    n = 0
    for row in record.get("metrics", []):
        tracker.log_metrics(row["metrics"], int(row["step"]), timestamp_ms=int(row["timestamp_ms"]))
        n += 1
    for item in record.get("other", []):
        if item[0] == "artifacts":
            if item[1] not in artifact_dirs:
                raise ValueError(f"replay: no local directory for queued artifacts {item[1]!r}")
            tracker.log_artifacts(artifact_dirs[item[1]], item[1])
        elif item[0] == "dict":
            tracker.log_dict(item[1], item[2])
        else:
            raise ValueError(f"replay: unknown queued call {item[0]!r}")
        n += 1
    return n
