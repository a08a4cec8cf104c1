"""Worker side of a job on Ray Train (pretraining, adaptation): what every job's ``train_loop_per_worker``
shares around the one training loop.

:func:`worker_session` sets a worker up and tears it down: the process environment, Ray's and DeepSpeed's
noise, the worker's log (``logs/worker_rank<r>.log`` of the run, console on rank 0), a node-local staging
directory (stale ones of killed workers removed), torch threads = ``cluster.cpus_per_worker``, the device.
The :class:`WorkerContext` it yields builds the per-worker backend (:func:`make_backend`: DeepSpeed ZeRO or
DDP from the job's ``engine`` block), the checkpoint manager on Ray storage (``checkpoints.py``), the hooks
that copy rank-local files into remote run storage, and drives the resume at a worker-group start
(:meth:`WorkerContext.resume`: Ray's checkpoint or a newer complete one, torn uploads removed) and its
``attempts/`` record. The job brings its model, loss, stream, hooks and what rank 0 writes at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from caloforge.training.backend import Backend
from caloforge.training.hooks import Hook
from caloforge.training.loop import Trainer
from caloforge.training.ray.checkpoints import (
    RayCheckpointManager,
    choose_resume_checkpoint,
    remove_incomplete_checkpoints,
)
from caloforge.training.ray.config import ClusterConfig, EngineConfig
from caloforge.training.ray.raylog import DropPrefixes
from caloforge.training.ray.storage import RunDir, UploadRunFiles

__all__ = ["WorkerContext", "make_backend", "worker_session"]

log = logging.getLogger("caloforge.training")


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


# -- logging -------------------------------------------------------------------------------------------
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


# -- the backend ------------------------------------------------------------------------------------------
def make_backend(engine: EngineConfig, device: torch.device) -> Backend:
    """The loop's backend of a Ray Train worker: ``DeepSpeedBackend`` (ZeRO 0/1/2) or ``DDPBackend``, in the
    process group Ray Train set up."""
    if engine.backend == "deepspeed":
        from caloforge.training.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(engine.deepspeed, device)
    from caloforge.training.torch_backend import DDPBackend

    return DDPBackend(device, find_unused_parameters=engine.find_unused_parameters)


# -- the session ----------------------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """One Ray Train worker of a run (:func:`worker_session`)."""

    run: RunDir
    rank: int
    world: int
    device: torch.device
    staging: Path  # node-local, removed when the worker ends
    logs_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def log_file(self) -> Path:
        return self.logs_dir / f"worker_rank{self.rank}.log"

    @property
    def metrics_path(self) -> Path:
        """Where rank 0 writes ``metrics.jsonl``: in the run (local storage) or staged and uploaded."""
        return self.run.local_path / "metrics.jsonl" if self.run.is_local else self.staging / "metrics.jsonl"

    def run_file_hooks(self) -> list[Hook]:
        """Remote storage: a hook copying this rank's log (and rank 0's metrics) into the run at each
        checkpoint and at the end (local storage: none, the files are written in place)."""
        if self.run.is_local:
            return []
        files = {"metrics.jsonl": self.metrics_path} if self.is_main else {}
        files[f"logs/worker_rank{self.rank}.log"] = self.log_file
        return [UploadRunFiles(self.run, files)]

    def checkpoint_manager(
        self, keep_last: int, enospc_at: tuple[int, RunDir] | None = None
    ) -> RayCheckpointManager:
        """The loop's checkpoint manager: rank-local staging, completion markers, ``ray.train.report``."""
        return RayCheckpointManager(
            self.staging / "checkpoints", self.rank, self.world, keep_last=keep_last, enospc_at=enospc_at
        )

    def resume(self, trainer: Trainer, manager: RayCheckpointManager) -> str | None:
        """At a worker-group start: restore ``trainer`` from the newest checkpoint of the run that verifies
        (normally the one Ray hands over: after a failure, or a run resumed by name); returns its URI, or
        ``None`` for a fresh start. Rank 0 first removes torn uploads of a failed group (every rank waits)."""
        checkpoint = ray.train.get_checkpoint()
        ray_name = Path(checkpoint.path).name if checkpoint is not None else None
        if self.is_main:
            remove_incomplete_checkpoints(self.run, keep=ray_name)
        if self.world > 1:
            torch.distributed.barrier()  # every rank lists storage after rank 0 tidied it
        manager.taken = set(self.run.ray_checkpoints())  # before any rank of this group reports
        restored_from = None
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as directory:
            chosen = choose_resume_checkpoint(
                self.run, Path(directory) if directory else None, ray_name, self.staging / "restore"
            )
            if chosen is not None:
                restored_from = f"{self.run.uri}/{chosen[0]}"
                trainer.restore(chosen[1])  # verifies markers, sizes and sha256 digests (again) first
        return restored_from

    def record_attempt(self, trainer: Trainer, restored_from: str | None, **extra: Any) -> None:
        """Rank 0: ``attempts/<ns>.json`` of this worker-group start (the step it starts from, where from)."""
        if not self.is_main:
            return
        self.run.write_json(
            f"attempts/{time.time_ns()}.json",
            {
                "start_step": trainer.step,
                "restored_from": restored_from,
                "pid": os.getpid(),
                "world_size": self.world,
                "host": socket.gethostname(),
                "device": str(self.device),
                **extra,
            },
        )
        if restored_from is not None:
            log.info("restored from %s at step %d", restored_from, trainer.step)


@contextlib.contextmanager
def worker_session(
    storage_path: str, run_name: str, cluster: ClusterConfig, log_level: int = logging.INFO
) -> Iterator[WorkerContext]:
    """Set up this Ray Train worker for the run ``<storage_path>/<run_name>`` (see the module docstring);
    an exception is logged (with its traceback in the worker log) and re-raised for Ray Train."""
    from caloforge.environment import apply_default_env

    apply_default_env()
    _quiet_libraries()
    run = RunDir(storage_path, run_name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cluster.use_gpu else torch.device("cpu")
    _remove_stale_staging(run.name)
    staging = Path(tempfile.mkdtemp(prefix=f"caloforge-{run.name}-rank{rank}-pid{os.getpid()}-"))
    logs_dir = run.local_path / "logs" if run.is_local else staging / "logs"
    worker = WorkerContext(run, rank, world, device, staging, logs_dir)
    file_handler = _setup_logging(rank, log_level, worker.log_file)
    torch.set_num_threads(max(1, int(cluster.cpus_per_worker)))
    try:
        yield worker
    except BaseException:
        log.exception("worker rank %d failed", rank)
        raise
    finally:
        logging.getLogger("caloforge").removeHandler(file_handler)
        file_handler.close()
        shutil.rmtree(staging, ignore_errors=True)
