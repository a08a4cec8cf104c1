"""Pretraining checkpoints on Ray Train: per-rank staging, completion markers, ``ray.train.report``.

:class:`RayCheckpointManager` keeps the loop's layout (``meta.json``, one ``trainer_state_rank<r>.pt`` per
rank, DeepSpeed's own files under ``deepspeed/``) but each rank writes into a node-local temporary directory,
completes it with a per-rank marker ``_complete/rank<r>.json`` listing that rank's files and sizes, and only
then hands it to ``ray.train.report``, which merges all ranks' files into one checkpoint directory in
storage. Loading verifies every rank's marker and file sizes first (:func:`verify_checkpoint`), so a
checkpoint interrupted while being written never loads half-written.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
import torch

from caloforge.training.backend import Backend
from caloforge.training.state import META_FILE, CheckpointManager, TrainState, finite_metrics, state_file

__all__ = ["COMPLETE_DIR", "RayCheckpointManager", "verify_checkpoint"]

log = logging.getLogger("caloforge.pretrain")

COMPLETE_DIR = "_complete"


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
        self.restored: Path | None = None
        self._previous: Path | None = None

    def latest(self) -> Path | None:
        return self.restored

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        return []

    def save(
        self, step: int, backend: Backend, state: TrainState, metrics: Mapping[str, float] | None = None
    ) -> Path:
        """Write this rank's part, complete it with its marker and report it (with the loop's latest
        log-step ``metrics``, handed over by the Trainer) to Ray Train."""
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
                "metrics": finite_metrics(metrics),
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
        ray.train.report(
            {"step": step, **finite_metrics(metrics)},
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
