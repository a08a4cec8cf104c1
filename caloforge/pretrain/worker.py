"""Worker side of distributed pretraining: what every Ray Train worker runs (``train_loop_per_worker``).

Each worker assembles the same job as every other training job (``caloforge.training.job``: the model for
the manifest, same init seed on every rank; the objective's loss; the lineage; the standard hooks; the final
EMA bundle), streams its own disjoint shards of the ``train`` split (``ShowerStream`` with the worker's
rank/world size, resampled, with the configured detector/particle mixing) and runs the one training loop
(``caloforge.training.loop.Trainer``) through a ``DeepSpeedBackend`` or ``DDPBackend``. The pieces that are
pretraining's own live beside this module: checkpoints on Ray storage (``checkpoints.py``), quick validation
(``validation.py``), the worker's hooks (``hooks.py``: resource and MLflow metrics, remote run files, the
test-only fault injection) and the data audit (``audit.py``). At start a worker restores from
``ray.train.get_checkpoint()`` (after a worker failure, or when a run is resumed by name).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from caloforge.config import from_dict
from caloforge.datasets.shards import Manifest
from caloforge.datasets.streaming import ShowerStream
from caloforge.platform.shower_model import Lineage
from caloforge.pretrain.audit import AuditedStream
from caloforge.pretrain.checkpoints import (
    RayCheckpointManager,
    choose_resume_checkpoint,
    remove_incomplete_checkpoints,
)
from caloforge.pretrain.config import PretrainConfig
from caloforge.pretrain.hooks import (
    PENDING_FILE,
    FaultInjection,
    MlflowMetrics,
    ResourceMetrics,
    UploadRunFiles,
)
from caloforge.pretrain.raylog import DropPrefixes
from caloforge.pretrain.rundir import RunDir
from caloforge.pretrain.validation import QuickValidation
from caloforge.training import job
from caloforge.training.backend import Backend
from caloforge.training.hooks import Hook, PeriodicEval
from caloforge.training.loop import Trainer

__all__ = ["train_loop_per_worker"]

log = logging.getLogger("caloforge.pretrain")


# -- Ray's noise --------------------------------------------------------------------------------------
def _quiet_libraries() -> None:
    """In our workers: Ray Train's two INFO lines per rank and checkpoint are replaced by one line of ours
    on rank 0 ("checkpoint at step N reported to Ray storage")."""
    logging.getLogger("ray.train.v2._internal.execution.storage").addFilter(
        DropPrefixes("Checkpoint successfully created at")
    )
    logging.getLogger("ray.train.v2._internal.execution.context").addFilter(
        DropPrefixes("Reporting training result")
    )
    # DeepSpeed's ZeRO-2 calls a torch collective torch has renamed; harmless, printed once per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)


# -- the worker ------------------------------------------------------------------------------------------
class _NoTraceback(logging.Formatter):
    """Console format without tracebacks: Ray prints the failing worker's traceback itself (the worker log
    file keeps the full record)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            record.msg = f"{record.msg} (traceback in the worker log and below)"
        return super().format(record)


def _setup_logging(rank: int, level: int, log_file: Path) -> logging.Handler:
    logger = logging.getLogger("caloforge")
    logger.setLevel(min(level, logging.INFO))
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_caloforge_worker", False):
            logger.removeHandler(h)
    text = f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    fmt = logging.Formatter(text, "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else max(level, logging.WARNING))
    console.setFormatter(_NoTraceback(text, "%H:%M:%S"))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file)
    file_handler.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.INFO)
    file_handler.setFormatter(fmt)
    for h in (console, file_handler):
        h._caloforge_worker = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    return file_handler


def _make_backend(cfg: PretrainConfig, device: torch.device) -> Backend:
    if cfg.engine.backend == "deepspeed":
        from caloforge.pretrain.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg.engine.deepspeed, device)
    from caloforge.training.torch_backend import DDPBackend

    return DDPBackend(device, find_unused_parameters=cfg.engine.find_unused_parameters)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``payload`` is built by ``launch.run_pretrain``."""
    from caloforge.environment import apply_default_env

    apply_default_env()
    _quiet_libraries()
    cfg = from_dict(PretrainConfig, payload["config"], "pretrain config (from the driver)")
    run = RunDir(payload["storage_path"], payload["run_name"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else torch.device("cpu")
    _remove_stale_staging(run.name)
    staging = Path(tempfile.mkdtemp(prefix=f"caloforge-{run.name}-rank{rank}-pid{os.getpid()}-"))
    logs_dir = run.local_path / "logs" if run.is_local else staging / "logs"
    file_handler = _setup_logging(
        rank, int(payload.get("log_level", logging.INFO)), logs_dir / f"worker_rank{rank}.log"
    )
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    tracker = None
    t_start = time.perf_counter()
    try:
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
        backend = _make_backend(cfg, device)
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
        manager = RayCheckpointManager(
            staging / "checkpoints", rank, world, keep_last=cfg.cluster.num_to_keep, enospc_at=enospc
        )
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
        metrics_path = run.local_path / "metrics.jsonl" if run.is_local else staging / "metrics.jsonl"
        evals = []
        if cfg.validation.enabled:
            validation = (
                QuickValidation(manifest, cfg.data.val_split, detectors, cfg.validation)
                if rank == 0
                else None
            )
            every = cfg.validation.every or cfg.loop.steps
            evals.append(
                PeriodicEval(every, validation or _no_validation, main_only=True, use_ema=True, prefix="val")
            )
        extra: list[Hook] = [ResourceMetrics(device)]
        if tracker is not None:
            extra.append(MlflowMetrics(tracker))
        if not run.is_local:
            files = {"metrics.jsonl": metrics_path} if rank == 0 else {}
            files[f"logs/worker_rank{rank}.log"] = logs_dir / f"worker_rank{rank}.log"
            extra.append(UploadRunFiles(run, files))
        if fault is not None and fault.kind != "enospc":
            extra.append(FaultInjection(fault.rank, fault.step, rank, run, fault.kind))
        hooks = job.standard_hooks(metrics_path, progress=False, evals=evals, extra=extra)

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
        checkpoint = ray.train.get_checkpoint()  # after a failure, or a run resumed by name
        ray_name = Path(checkpoint.path).name if checkpoint is not None else None
        if rank == 0:
            remove_incomplete_checkpoints(run, keep=ray_name)
        if world > 1:
            torch.distributed.barrier()  # every rank lists storage after rank 0 tidied it
        manager.taken = set(run.ray_checkpoints())  # before any rank of this group reports
        restored_from = None
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as directory:
            # the newest checkpoint in storage that verifies (normally Ray's latest)
            chosen = choose_resume_checkpoint(
                run, Path(directory) if directory else None, ray_name, staging / "restore"
            )
            if chosen is not None:
                restored_from = f"{run.uri}/{chosen[0]}"
                trainer.restore(chosen[1])  # verifies markers, sizes and sha256 digests (again) first
        if audited is not None:
            audited.start_step = trainer.step
        if rank == 0:
            run.write_json(
                f"attempts/{time.time_ns()}.json",
                {
                    "start_step": trainer.step,
                    "restored_from": restored_from,
                    "pid": os.getpid(),
                    "world_size": world,
                    "host": socket.gethostname(),
                    "device": str(device),
                    "engine": cfg.engine.backend,
                },
            )
            if restored_from is not None:
                log.info("restored from %s at step %d", restored_from, trainer.step)
        result = trainer.fit()
        if rank == 0:
            _finish(trainer, result, run, tracker, cfg, staging, evals, lineage)
    except BaseException:
        log.exception("worker rank %d failed", rank)
        raise
    finally:
        logging.getLogger("caloforge").removeHandler(file_handler)
        file_handler.close()
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(run_name: str) -> None:
    """Delete staging directories of this run left on this node by workers that Ray killed (a worker-group
    restart aborts the surviving ranks without running their cleanup)."""
    for path in Path(tempfile.gettempdir()).glob(f"caloforge-{run_name}-rank*-pid*-*"):
        match = re.search(r"-pid(\d+)-[^-]*$", path.name)
        if match is None or not path.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's process
            continue


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
