"""Worker side of distributed pretraining: what every Ray Train worker runs (``train_loop_per_worker``).

Each worker assembles the same job as every other training job (``caloforge.training.job``: the model for
the manifest, same init seed on every rank; the objective's loss; the lineage; the standard hooks; the final
EMA bundle), streams its own disjoint shards of the ``train`` split (``ShowerStream`` with the worker's
rank/world size, resampled, with the configured detector/particle mixing) and runs the one training loop
(``caloforge.training.loop.Trainer``). What every job on Ray Train shares — the worker's setup and logs, the
``DeepSpeedBackend``/``DDPBackend``, checkpoints on Ray storage and the resume at a worker-group start
(``ray.train.get_checkpoint()``: after a worker failure, or when a run is resumed by name) — is
``caloforge.training.ray.worker``. Pretraining's own pieces live beside this module: quick validation
(``validation.py``), the worker's hooks (``hooks.py``: resource and MLflow metrics) and the data audit
(``audit.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from caloforge.config import from_dict
from caloforge.datasets.shards import Manifest
from caloforge.datasets.streaming import ShowerStream
from caloforge.platform.shower_model import Lineage
from caloforge.pretrain.audit import AuditedStream
from caloforge.pretrain.config import PretrainConfig
from caloforge.pretrain.hooks import PENDING_FILE, FaultInjection, MlflowMetrics, ResourceMetrics
from caloforge.pretrain.rundir import RunDir
from caloforge.pretrain.validation import QuickValidation
from caloforge.training import job
from caloforge.training.hooks import Hook, PeriodicEval
from caloforge.training.loop import Trainer
from caloforge.training.ray.worker import WorkerContext, make_backend, worker_session

__all__ = ["train_loop_per_worker"]

log = logging.getLogger("caloforge.pretrain")


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``payload`` is built by ``launch.run_pretrain``."""
    cfg = from_dict(PretrainConfig, payload["config"], "pretrain config (from the driver)")
    level = int(payload.get("log_level", logging.INFO))
    with worker_session(payload["storage_path"], payload["run_name"], cfg.cluster, level) as worker:
        _train(cfg, payload, worker)


def _train(cfg: PretrainConfig, payload: dict[str, Any], worker: WorkerContext) -> None:
    run, rank, world, device, staging = worker.run, worker.rank, worker.world, worker.device, worker.staging
    tracker = None
    t_start = time.perf_counter()
    manifest = Manifest.load(payload["manifest_dir"])
    if manifest.fingerprint != payload["manifest_hash"]:
        raise ValueError(
            f"data.shards: {payload['manifest_dir']} changed since the run was launched (manifest sha256 "
            f"{manifest.fingerprint[:12]} != {payload['manifest_hash'][:12]})"
        )
    detectors = tuple(payload["detectors"])
    micro = cfg.loop.micro_batch_size(world)
    stream_cfg = dataclasses.replace(cfg.data.stream, batch_size=micro)
    stream: Any = ShowerStream(manifest.directory, stream_cfg, "train", rank, world, seed=cfg.loop.seed)
    model = job.model_for_manifest(cfg.model, manifest, cfg.spare_detector_slots, detectors=detectors)
    loss_fn, objective = job.loss_for(model, cfg.objective)
    # The trained ranges go into the bundle's lineage: the registry's model card reads them.
    lineage = job.training_lineage(manifest, stream.groups, objective, extra={"run_uri": run.uri})
    backend = make_backend(cfg.engine, device)
    if rank == 0:
        log.info(
            "worker group of %d on %s: %s, %.2fM parameters, micro-batch %d × %d accumulation, mixing %s",
            world,
            device,
            cfg.model.backbone if isinstance(cfg.model.backbone, str) else "custom backbone",
            sum(p.numel() for p in model.parameters()) / 1e6,
            micro,
            cfg.loop.grad_accum,
            ", ".join(f"{k} {v:.2f}" for k, v in stream.probabilities.items()),
        )

    fault = cfg.fault_injection
    enospc = (fault.step, run) if fault and fault.kind == "enospc" and fault.rank == rank else None
    manager = worker.checkpoint_manager(cfg.cluster.num_to_keep, enospc_at=enospc)
    if rank == 0 and payload.get("mlflow_run_id"):
        from caloforge.registry.tracking import BestEffortTracker

        # best effort: connects lazily, short timeouts, queues and replays while MLflow is down
        tracker = BestEffortTracker(
            cfg.tracking.experiment,
            run_id=payload["mlflow_run_id"],
            tracking_uri=payload["mlflow_tracking_uri"],
            timeout_s=cfg.tracking.timeout_s,
            retry_every_s=cfg.tracking.retry_every_s,
        )
    evals = []
    if cfg.validation.enabled:
        validation = (
            QuickValidation(manifest, cfg.data.val_split, detectors, cfg.validation) if rank == 0 else None
        )
        every = cfg.validation.every or cfg.loop.steps
        evals.append(
            PeriodicEval(every, validation or _no_validation, main_only=True, use_ema=True, prefix="val")
        )
    extra: list[Hook] = [ResourceMetrics(device)]
    if tracker is not None:
        extra.append(MlflowMetrics(tracker))
    extra += worker.run_file_hooks()
    if fault is not None and fault.kind != "enospc":
        extra.append(FaultInjection(fault.rank, fault.step, rank, run, fault.kind))
    hooks = job.standard_hooks(worker.metrics_path, progress=False, evals=evals, extra=extra)

    audited = AuditedStream(stream, cfg.data.audit_samples, run, rank) if cfg.data.audit_samples else None
    if audited is not None:
        stream = audited
    trainer = Trainer(model, loss_fn, backend, stream, cfg.loop, hooks, checkpoints=manager)
    if rank == 0:
        log.info(
            "engine ready after %.1f s (model, stream, %s)",
            time.perf_counter() - t_start,
            type(backend).__name__,
        )
    restored_from = worker.resume(trainer, manager)
    if audited is not None:
        audited.start_step = trainer.step
    worker.record_attempt(trainer, restored_from, engine=cfg.engine.backend)
    result = trainer.fit()
    if rank == 0:
        _finish(trainer, result, run, tracker, cfg, staging, evals, lineage)


def _no_validation(model: nn.Module) -> dict[str, float]:
    return {}  # ranks other than 0 (PeriodicEval runs main_only)


def _finish(
    trainer: Trainer,
    result: Any,
    run: RunDir,
    tracker: Any,
    cfg: PretrainConfig,
    staging: Path,
    evals: list[PeriodicEval],
    lineage: Lineage,
) -> None:
    """Rank 0 after the loop: the final bundle (EMA weights), final metrics, MLflow artifacts."""
    metrics = dict(result.metrics)
    if not result.history:  # resumed at the final step: nothing trained, evaluate what is there
        log.info("run already at step %d of %d: nothing to train", trainer.step, cfg.loop.steps)
        if evals:
            metrics.update({f"val/{k}": v for k, v in trainer.evaluate(evals[0].fn).items()})
    bundle = staging / "bundle"
    job.save_final_bundle(trainer, bundle, lineage)
    run.upload_dir(bundle, "bundle")
    final = {"step": trainer.step, "metrics": {k: float(v) for k, v in metrics.items()}, "bundle": "bundle"}
    run.write_json("final_metrics.json", final)
    if tracker is not None:
        tracker.log_artifacts(bundle, "bundle")
        tracker.log_dict(final, "final_metrics.json")
        if not tracker.flush():
            # the driver replays this file when MLflow is back (at the end of this launch, or the next)
            run.write_json(PENDING_FILE, tracker.pending_record())
            log.warning(
                "MLflow still unreachable at the end of training: %d call(s) left in %s/%s for the driver",
                len(tracker.pending),
                run.uri,
                PENDING_FILE,
            )
    log.info("final bundle (EMA weights) written to %s/bundle", run.uri)
