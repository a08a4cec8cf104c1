"""Log an ``EvalReport`` to MLflow.

The architecture keeps mlflow imports inside ``caloforge/registry/``; this tiny hook imports mlflow lazily,
inside the function, so importing ``caloforge.evaluation`` never imports mlflow. (It may move to
``caloforge/registry/`` later; callers use ``caloforge.evaluation.log_report_to_mlflow``.) It talks to the
store through an ``MlflowClient`` bound to an explicit tracking URI and never changes mlflow's global state.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from caloforge import paths

if TYPE_CHECKING:
    from caloforge.evaluation.report import EvalReport

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
DEFAULT_EXPERIMENT = "caloforge-evaluation"


def mlflow_key(key: str, prefix: str = "") -> str:
    """MLflow metric names allow letters, digits and ``_ - . space : /``; anything else becomes ``_``."""
    return _UNSAFE.sub("_", prefix + key.replace("+", "plus"))


def log_report_to_mlflow(
    report: EvalReport,
    run_id: str | None = None,
    prefix: str = "eval/",
    step: int = 0,
    artifacts: bool = True,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """Log every finite metric (as ``<prefix><key>``) and, optionally, the written report as artifacts
    (under ``evaluation/``). Returns the run id.

    ``run_id`` None: the active mlflow run when there is one (and no ``tracking_uri`` was given), else a new
    run in ``experiment`` (created when missing), ended afterwards. ``tracking_uri`` defaults to
    ``caloforge.paths.mlflow_tracking_uri()`` ($MLFLOW_TRACKING_URI, else the local sqlite store).
    """
    import mlflow
    from mlflow.entities import Metric

    if run_id is None and tracking_uri is None and (active := mlflow.active_run()) is not None:
        run_id, tracking_uri = active.info.run_id, mlflow.get_tracking_uri()
    uri = tracking_uri or paths.mlflow_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    own_run = run_id is None
    if own_run:
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, paths.mlflow_artifact_root(uri))
        )
        run_id = client.create_run(exp_id, run_name="caloforge-evaluate").info.run_id
    assert run_id is not None
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        items = [
            Metric(mlflow_key(k, prefix), float(v), now, step)
            for k, v in sorted(report.metrics.items())
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        for i in range(0, len(items), BATCH):
            client.log_batch(run_id, metrics=items[i : i + BATCH])
        if artifacts:
            with tempfile.TemporaryDirectory(prefix="caloforge-eval-") as tmp:
                out = report.write(Path(tmp) / "evaluation")
                client.log_artifacts(run_id, str(out), artifact_path="evaluation")
        status = "FINISHED"
    finally:
        if own_run:
            client.set_terminated(run_id, status)
    return run_id
