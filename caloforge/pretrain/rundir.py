"""A pretraining run's directory: ``caloforge.training.ray.storage.RunDir`` (shared with adaptation on Ray)
plus pretraining's own files next to Ray Train's and the shared worker's (``attempts/``, ``metrics.jsonl``,
``logs/``, ``fault_injection_fired.json``):

=============================  ==========================================================================
``caloforge_run.json``         run identity: name, created, MLflow run id, manifest hash, resume history
``config.yaml``                the resolved config of the latest launch (``config.<n>.yaml`` of earlier ones)
``versions.json``              library versions of the latest launch
``logs/driver.log``            the driver's log
``bundle/``                    the final ShowerModel bundle (EMA weights)
``final_metrics.json``         the last training + validation metrics
``tracking_pending.json``      MLflow calls rank 0 could not deliver (replayed and removed by the driver)
=============================  ==========================================================================
"""

from __future__ import annotations

from caloforge.training.ray.storage import RunDir, resolve_storage_path, validate_run_name

__all__ = ["RUN_FILE", "RunDir", "resolve_storage_path", "validate_run_name"]

RUN_FILE = "caloforge_run.json"
