"""Worker side of distributed pretraining: what every Ray Train worker runs (``train_loop_per_worker``).

Each worker builds the same ``ShowerModel`` (same init seed), streams its own disjoint shards of the
``train`` split (``ShowerStream`` with the worker's rank/world size, resampled, with the configured
detector/particle mixing) and runs the one training loop (``caloforge.training.loop.Trainer``) through a
``DeepSpeedBackend`` or ``DDPBackend``. Around the loop, as hooks: a progress line on rank 0, metrics.jsonl,
MLflow metrics from rank 0, quick validation on the EMA weights, periodic checkpoints and the test-only
fault injection.

Checkpoints (:class:`RayCheckpointManager`) keep the loop's layout (``meta.json``, one
``trainer_state_rank<r>.pt`` per rank, DeepSpeed's own files under ``deepspeed/``) but are written per rank
into a node-local temporary directory, completed by a per-rank marker ``_complete/rank<r>.json`` listing
that rank's files and sizes, and only then handed to ``ray.train.report``, which merges all ranks' files into
one checkpoint directory in storage. Loading verifies every rank's marker and file sizes first, so a
checkpoint interrupted while being written never loads half-written. At start a worker restores from
``ray.train.get_checkpoint()`` (after a worker failure, or when a run is resumed by name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from caloforge.config import from_dict
from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.shards import Manifest, shard_samples
from caloforge.datasets.streaming import ShowerStream, trained_ranges
from caloforge.platform import seeding
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.geometry import Mesh
from caloforge.platform.shower_model import Lineage, ShowerModel
from caloforge.pretrain.config import PretrainConfig, ValidationConfig
from caloforge.pretrain.raylog import DropPrefixes
from caloforge.pretrain.rundir import RunDir
from caloforge.training.backend import Backend
from caloforge.training.hooks import ConsoleProgress, Hook, MetricsWriter, PeriodicCheckpoint, PeriodicEval
from caloforge.training.loop import Trainer
from caloforge.training.state import META_FILE, CheckpointManager, TrainState, state_file

__all__ = [
    "FAULT_MARKER",
    "FaultInjection",
    "QuickValidation",
    "RayCheckpointManager",
    "train_loop_per_worker",
    "verify_checkpoint",
]

log = logging.getLogger("caloforge.pretrain")

FAULT_MARKER = "fault_injection_fired.json"
COMPLETE_DIR = "_complete"


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


# -- checkpoints -----------------------------------------------------------------------------------------
def _rank_files(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).parts[0] != COMPLETE_DIR
    }


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check a merged checkpoint is complete: ``meta.json``, and for every rank its marker and every file
    the marker lists, with the recorded size. Returns ``meta.json``; raises ``ValueError`` otherwise."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"checkpoint {directory}: no {META_FILE} (incomplete or not a CaloForge checkpoint)")
    meta = json.loads(meta_path.read_text())
    world = int(meta["world_size"])
    problems = []
    for rank in range(world):
        marker = directory / COMPLETE_DIR / f"rank{rank:05d}.json"
        if not marker.is_file():
            problems.append(f"rank {rank} never completed its part ({marker.name} missing)")
            continue
        info = json.loads(marker.read_text())
        if int(info["step"]) != int(meta["step"]):
            problems.append(f"rank {rank} marker is for step {info['step']}, meta.json for {meta['step']}")
        for rel, size in info["files"].items():
            path = directory / rel
            if not path.is_file():
                problems.append(f"rank {rank}: {rel} missing")
            elif path.stat().st_size != int(size):
                problems.append(f"rank {rank}: {rel} has {path.stat().st_size} bytes, {size} were written")
    if problems:
        raise ValueError(f"checkpoint {directory} is incomplete: " + "; ".join(problems))
    return meta


class RayCheckpointManager(CheckpointManager):
    """The loop's checkpoint manager for Ray Train: rank temp dir → completion marker → ``ray.train.report``.

    ``root`` is node-local (each rank has its own); the reported checkpoint lives in Ray's storage as
    ``<run>/checkpoint_<step>``. ``restored`` is the local directory of the checkpoint Ray handed to this
    worker group at start (what :meth:`latest` returns).
    """

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int = 2) -> None:
        super().__init__(root, keep_last)
        self.rank = rank
        self.world_size = world_size
        self.report_metrics: dict[str, float] = {}  # the latest log-step metrics (attached by rank 0)
        self.restored: Path | None = None
        self._previous: Path | None = None

    def latest(self) -> Path | None:
        return self.restored

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        return []

    def save(self, step: int, backend: Backend, state: TrainState) -> Path:
        staging = self.root / self.step_dir_name(step)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        backend.save(staging)  # collective for DeepSpeed; DDP/Torch write on rank 0 only
        torch.save(state.to_dict(), staging / state_file(self.rank))
        if self.rank == 0:
            meta = {
                "format_version": 1,
                "step": step,
                "world_size": self.world_size,
                "backend": type(backend).__name__,
                "saved_at_unix": time.time(),
            }
            (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        marker = {
            "rank": self.rank,
            "step": step,
            "world_size": self.world_size,
            "files": _rank_files(staging),
        }
        (staging / COMPLETE_DIR).mkdir()
        (staging / COMPLETE_DIR / f"rank{self.rank:05d}.json").write_text(json.dumps(marker, indent=2) + "\n")
        metrics = {"step": step, **{k: v for k, v in self.report_metrics.items() if math.isfinite(v)}}
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )
        if self._previous is not None and self._previous != staging and self._previous.exists():
            shutil.rmtree(self._previous)
        self._previous = staging
        if self.rank == 0:
            log.info("checkpoint at step %d reported to Ray storage", step)
        return staging

    def load(self, directory: Path, backend: Backend) -> TrainState:
        verify_checkpoint(directory)
        return super().load(directory, backend)


# -- data ------------------------------------------------------------------------------------------------
def sample_fingerprint(showers_ZPR: np.ndarray) -> str:
    """Identity of one shower sample (blake2b of its float32 voxels), used by the data audit."""
    return hashlib.blake2b(
        np.ascontiguousarray(showers_ZPR, dtype=np.float32).tobytes(), digest_size=12
    ).hexdigest()


class AuditedStream:
    """Pass-through of a stream that records fingerprints of the first ``n`` samples it yields and writes
    them to ``<run>/audit/step<start>_rank<r>.json`` (which shards each rank really read can be checked)."""

    def __init__(self, stream: ShowerStream, n: int, run: RunDir, rank: int, start_step: int = 0) -> None:
        self.stream, self.n, self.run, self.rank, self.start_step = stream, n, run, rank, start_step
        self.fingerprints: list[str] = []
        self._written = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[ShowerBatch]:
        for batch in self.stream:
            if len(self.fingerprints) < self.n:
                x = batch.showers_BZPR.numpy()
                for i in range(min(len(batch), self.n - len(self.fingerprints))):
                    self.fingerprints.append(sample_fingerprint(x[i]))
                if len(self.fingerprints) >= self.n and not self._written:
                    self.run.write_json(
                        f"audit/step{self.start_step:08d}_rank{self.rank:05d}.json",
                        {"rank": self.rank, "start_step": self.start_step, "fingerprints": self.fingerprints},
                    )
                    self._written = True
            yield batch


def _validation_sets(
    manifest: Manifest, split: str, detectors: tuple[str, ...], n: int, seed: int
) -> dict[str, tuple[np.ndarray, Conditions]]:
    """Up to ``n`` held-out showers per detector, spread evenly over its particles (seeded subsample)."""
    out: dict[str, tuple[np.ndarray, Conditions]] = {}
    for det in detectors:
        shards = [s for s in manifest.shards(split) if s.detector == det]
        if not shards:
            continue
        particles = sorted({s.particle for s in shards})
        per_particle = math.ceil(n / len(particles))
        xs: list[np.ndarray] = []
        metas: list[dict] = []
        for particle in particles:
            taken = 0
            for shard in (s for s in shards if s.particle == particle):
                for meta, arr in shard_samples(manifest, shard):
                    xs.append(arr)
                    metas.append(meta)
                    taken += 1
                    if taken >= per_particle:
                        break
                if taken >= per_particle:
                    break
        rng = seeding.rng(seed, len(xs))  # no purpose (historical); same as default_rng([seed, len(xs)])
        keep = np.sort(rng.permutation(len(xs))[:n])
        x = np.stack([xs[i] for i in keep]).astype(np.float32)
        cond = Conditions(
            np.array([metas[i]["energy_mev"] for i in keep], dtype=np.float64),
            np.array([metas[i]["theta_rad"] for i in keep], dtype=np.float64),
            np.array([metas[i]["phi_rad"] for i in keep], dtype=np.float64),
            np.array([metas[i]["pdg"] for i in keep], dtype=np.int64),
            np.array([metas[i]["detector"] for i in keep], dtype=str),
        )
        out[det] = (x, cond)
    return out


class QuickValidation:
    """Generated vs held-out showers per detector, on the EMA weights (called through ``PeriodicEval``).

    Metrics per detector ``d`` (and their means over detectors without the prefix):

    - ``<d>/etot_ratio``: mean generated total energy / mean held-out total energy (1 is perfect);
    - ``<d>/etot_rel_err``: ``|etot_ratio − 1|``;
    - ``<d>/etot_median_ratio``: the same with medians (robust to a few wild showers of a young model);
    - ``<d>/long_profile_sep``: separation power ½ Σ_z (p_z − q_z)² / (p_z + q_z) between the mean normalised
      longitudinal profiles (CaloChallenge's histogram distance; 0 is perfect, 1 disjoint).

    Features come from ``caloforge.evaluation.features.compute_features`` (voxels at or below the model's
    readout threshold are zeroed on both sides).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        detectors: tuple[str, ...],
        config: ValidationConfig,
        mesh_shape: tuple[int, int, int],
    ) -> None:
        self.config = config
        self.sets = _validation_sets(manifest, split, detectors, config.showers_per_detector, config.seed)
        self.meshes: dict[str, Mesh] = {}
        for det in self.sets:
            spec = manifest.detector_spec(det)
            self.meshes[det] = spec.geometry if spec is not None else _unit_mesh(mesh_shape)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from caloforge.evaluation.features import compute_features, voxel_log_edges
        from caloforge.evaluation.histograms import separation_power

        if not isinstance(model, ShowerModel):
            raise ValueError(f"quick validation needs a ShowerModel, got {type(model).__name__}")
        threshold = float(model.config.threshold_mev)
        edges = voxel_log_edges(max(threshold, 1e-6), 1e7, 8)
        out: dict[str, float] = {}
        for det, (ref_x, cond) in self.sets.items():
            gen_x = model.generate(
                cond,
                num_steps=self.config.num_steps,
                sampler=self.config.sampler,
                batch_size=self.config.batch_size,
                seed=self.config.seed,
            )
            mesh = self.meshes[det]
            ref = compute_features(ref_x, cond.energy_mev, mesh, threshold, edges)
            gen = compute_features(gen_x, cond.energy_mev, mesh, threshold, edges)
            ratio = float(gen.e_tot_mev.mean() / max(ref.e_tot_mev.mean(), 1e-12))
            p = gen.e_layer_mev.mean(axis=0)
            q = ref.e_layer_mev.mean(axis=0)
            p = p / p.sum() if p.sum() > 0 else np.full_like(p, 1.0 / len(p))
            q = q / q.sum() if q.sum() > 0 else np.full_like(q, 1.0 / len(q))
            out[f"{det}/etot_ratio"] = ratio
            out[f"{det}/etot_rel_err"] = abs(ratio - 1.0)
            out[f"{det}/etot_median_ratio"] = float(
                np.median(gen.e_tot_mev) / max(float(np.median(ref.e_tot_mev)), 1e-12)
            )
            out[f"{det}/long_profile_sep"] = float(separation_power(p, q))
        if self.sets:
            for key in ("etot_rel_err", "long_profile_sep"):
                out[key] = float(np.mean([out[f"{d}/{key}"] for d in self.sets]))
        return out


def _unit_mesh(shape: tuple[int, int, int]) -> Mesh:
    return Mesh(shape[0], shape[1], tuple(float(r) for r in range(shape[2] + 1)))


# -- hooks -----------------------------------------------------------------------------------------------
class ResourceMetrics(Hook):
    """Adds to each log step: ``process_cpu_util`` (CPU seconds of this worker process per wall second since
    the previous log step: ≈ its threads when it has the cores to itself, well below when it is starved or
    waiting) and, on GPUs, ``gpu_mem_allocated_gib`` / ``gpu_mem_peak_gib``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last = (time.process_time(), time.perf_counter())

    def on_train_start(self, trainer: Trainer) -> None:
        self._last = (time.process_time(), time.perf_counter())

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        now = (time.process_time(), time.perf_counter())
        wall = now[1] - self._last[1]
        if wall > 0:
            metrics["process_cpu_util"] = (now[0] - self._last[0]) / wall
        self._last = now
        if self.device.type == "cuda":
            metrics["gpu_mem_allocated_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30


class MlflowMetrics(Hook):
    """Rank 0: log every log-step's metrics to MLflow (and keep them for the next checkpoint report)."""

    def __init__(self, tracker: Any, manager: RayCheckpointManager) -> None:
        self.tracker = tracker
        self.manager = manager

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        self.manager.report_metrics = dict(metrics)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)


class FaultInjection(Hook):
    """Test-only: raise in worker ``rank`` after step ``step`` — once per run (a marker in the run directory
    keeps the restarted worker group, and later ``--resume`` launches, from raising again)."""

    def __init__(self, rank: int, step: int, my_rank: int, run: RunDir) -> None:
        self.rank, self.step, self.my_rank, self.run = rank, step, my_rank, run

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.my_rank != self.rank or step != self.step or self.run.exists(FAULT_MARKER):
            return
        self.run.write_json(
            FAULT_MARKER, {"rank": self.rank, "step": step, "at_unix": time.time(), "pid": os.getpid()}
        )
        raise RuntimeError(f"fault injection (test-only): worker rank {self.rank} fails after step {step}")


class _UploadRunFiles(Hook):
    """Remote storage: copy rank-local logs and metrics.jsonl into the run directory at each checkpoint."""

    def __init__(self, run: RunDir, files: dict[str, Path]) -> None:
        self.run, self.files = run, files

    def upload(self) -> None:
        for rel, path in self.files.items():
            if path.is_file():
                self.run.upload_file(path, rel)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.upload()

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        self.upload()


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


def _bundle_model(trainer: Trainer) -> ShowerModel:
    """The EMA weights in a standalone CPU model (DeepSpeed's parameters are views of one flat buffer)."""
    model = trainer.averaged_model()
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.detach().clone()
    return model.to("cpu")  # type: ignore[return-value]


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``payload`` is built by ``launch.run_pretrain``."""
    from caloforge.cli import apply_default_env
    from caloforge.training.tasks import shower_loss_fn

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
        mesh_shape = manifest.mesh_shape(detectors[0])
        vocab = ConditionVocab.create(detectors, cfg.spare_detector_slots)
        micro = cfg.loop.micro_batch_size(world)
        stream_cfg = dataclasses.replace(cfg.data.stream, batch_size=micro)
        stream: Any = ShowerStream(manifest.directory, stream_cfg, "train", rank, world, seed=cfg.loop.seed)
        # The trained ranges go into the bundle's lineage: the registry's model card reads them.
        extra = {**trained_ranges(manifest, stream.groups), "run_uri": run.uri}
        lineage = Lineage(dataset_manifest_hash=manifest.fingerprint, extra=extra)
        model = ShowerModel.build(cfg.model, vocab, manifest.stats["pooled"], mesh_shape, lineage=lineage)
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

        manager = RayCheckpointManager(
            staging / "checkpoints", rank, world, keep_last=cfg.cluster.num_to_keep
        )
        if rank == 0 and payload.get("mlflow_run_id"):
            from caloforge.registry.tracking import RunTracker

            tracker = RunTracker(
                cfg.tracking.experiment,
                run_id=payload["mlflow_run_id"],
                tracking_uri=payload["mlflow_tracking_uri"],
            )
        metrics_path = run.local_path / "metrics.jsonl" if run.is_local else staging / "metrics.jsonl"
        hooks: list[Any] = [ResourceMetrics(device), ConsoleProgress(enabled=False)]
        if cfg.validation.enabled:
            validation = (
                QuickValidation(manifest, cfg.data.val_split, detectors, cfg.validation, mesh_shape)
                if rank == 0
                else None
            )
            every = cfg.validation.every or cfg.loop.steps
            hooks.append(
                PeriodicEval(every, validation or _no_validation, main_only=True, use_ema=True, prefix="val")
            )
        hooks += [MetricsWriter(metrics_path), MlflowMetrics(tracker, manager)]
        if cfg.loop.checkpoint_every:
            hooks.append(PeriodicCheckpoint(cfg.loop.checkpoint_every))
        if not run.is_local:
            files = {"metrics.jsonl": metrics_path} if rank == 0 else {}
            files[f"logs/worker_rank{rank}.log"] = logs_dir / f"worker_rank{rank}.log"
            hooks.append(_UploadRunFiles(run, files))
        if cfg.fault_injection is not None:
            hooks.append(FaultInjection(cfg.fault_injection.rank, cfg.fault_injection.step, rank, run))

        audited = AuditedStream(stream, cfg.data.audit_samples, run, rank) if cfg.data.audit_samples else None
        if audited is not None:
            stream = audited
        trainer = Trainer(
            model,
            shower_loss_fn(model),
            backend,
            stream,
            cfg.loop,
            hooks,
            run_dir=staging,
            keep_last=cfg.cluster.num_to_keep,
        )
        trainer.checkpoints = manager
        if rank == 0:
            log.info(
                "engine ready after %.1f s (model, stream, %s)",
                time.perf_counter() - t_start,
                type(backend).__name__,
            )
        checkpoint = ray.train.get_checkpoint()  # after a failure, or a run resumed by name
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.restore(Path(directory))  # verifies the completeness markers first
        if audited is not None:
            audited.start_step = trainer.step
        if rank == 0:
            run.write_json(
                f"attempts/{time.time_ns()}.json",
                {
                    "start_step": trainer.step,
                    "restored_from": checkpoint.path if checkpoint is not None else None,
                    "world_size": world,
                    "host": socket.gethostname(),
                    "device": str(device),
                    "engine": cfg.engine.backend,
                },
            )
            if checkpoint is not None:
                log.info("restored from %s at step %d", checkpoint.path, trainer.step)
        result = trainer.fit()
        if rank == 0:
            _finish(trainer, result, run, tracker, cfg, staging, hooks)
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
    hooks: list[Any],
) -> None:
    """Rank 0 after the loop: the final bundle (EMA weights), final metrics, MLflow artifacts."""
    metrics = dict(result.metrics)
    if not result.history:  # resumed at the final step: nothing trained, evaluate what is there
        log.info("run already at step %d of %d: nothing to train", trainer.step, cfg.loop.steps)
        evals = [h for h in hooks if isinstance(h, PeriodicEval)]
        if evals:
            metrics.update({f"val/{k}": v for k, v in trainer.evaluate(evals[0].fn).items()})
    model = _bundle_model(trainer)
    bundle = staging / "bundle"
    model.save(bundle, overwrite=True)
    run.upload_dir(bundle, "bundle")
    final = {"step": trainer.step, "metrics": {k: float(v) for k, v in metrics.items()}, "bundle": "bundle"}
    run.write_json("final_metrics.json", final)
    if tracker is not None:
        tracker.log_artifacts(bundle, "bundle")
        tracker.log_dict(final, "final_metrics.json")
    log.info("final bundle (EMA weights) written to %s/bundle", run.uri)
