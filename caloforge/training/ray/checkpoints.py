"""Checkpoints on Ray Train (every job on the Ray path: pretraining, adaptation): per-rank staging,
completion markers, ``ray.train.report``.

:class:`RayCheckpointManager` keeps the loop's layout (``meta.json``, one ``trainer_state_rank<r>.pt`` per
rank, DeepSpeed's own files under ``deepspeed/``) but each rank writes into a node-local temporary directory,
completes it with a per-rank marker ``_complete/rank<r>.json`` listing that rank's files with their sizes and
sha256 digests, and only then hands it to ``ray.train.report``, which merges all ranks' files into one
checkpoint directory in storage. Loading verifies every rank's marker, sizes and digests first
(:func:`verify_checkpoint`), so a checkpoint interrupted while being written, or damaged later, never loads.

Resuming (:func:`choose_resume_checkpoint`): Ray hands a restarted worker group its latest reported
checkpoint; when that one does not verify, the newest older ``checkpoint_*`` in the run's storage that does
is used instead (every rank makes the same choice from the same files). The run then re-reports the steps
after it under fresh directory names (``checkpoint_<step>_r<n>`` when ``checkpoint_<step>`` is taken), so a
damaged directory is never overwritten in place and Ray's own ``num_to_keep`` bookkeeping stays valid.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
import torch

from caloforge.training.backend import Backend
from caloforge.training.ray.storage import FAULT_MARKER, RunDir
from caloforge.training.state import (
    META_FILE,
    CheckpointManager,
    TrainState,
    file_digests,
    finite_metrics,
    state_file,
    verify_files,
)

__all__ = [
    "COMPLETE_DIR",
    "RayCheckpointManager",
    "checkpoint_step",
    "choose_resume_checkpoint",
    "remove_incomplete_checkpoints",
    "verify_checkpoint",
]

log = logging.getLogger("caloforge.training")

COMPLETE_DIR = "_complete"


_RAY_DIR = re.compile(r"^checkpoint_(\d{8,})(?:_r(\d+))?$")


def checkpoint_step(name: str) -> tuple[int, int] | None:
    """``(step, re-report index)`` of a ``checkpoint_<step>[_r<n>]`` directory name, else ``None``."""
    match = _RAY_DIR.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


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
        problems += verify_files(directory, info["files"], who=f"rank {rank}: ")
    if problems:
        raise ValueError(f"checkpoint {directory} is incomplete or damaged: " + "; ".join(problems))
    return meta


def _never_completed(run: RunDir, name: str) -> bool:
    """A checkpoint directory some rank never completed: no ``meta.json``, or a rank's marker missing.
    Ray Train registers a checkpoint only once every rank has reported it, so such a directory is a torn
    upload of a worker group that died mid-report, never one Ray tracks."""
    if not run.exists(f"{name}/{META_FILE}"):
        return True
    try:
        world = int(run.read_json(f"{name}/{META_FILE}")["world_size"])
    except (ValueError, KeyError, TypeError):
        return True
    return any(not run.exists(f"{name}/{COMPLETE_DIR}/rank{r:05d}.json") for r in range(world))


def remove_incomplete_checkpoints(run: RunDir, keep: str | None) -> list[str]:
    """Rank 0 at a worker-group start: delete ``checkpoint_*`` directories of the run's storage that some
    rank never completed (see :func:`_never_completed`), except ``keep`` (the one Ray handed over); returns
    their names. Complete but damaged ones are left to Ray's ``num_to_keep`` (Ray tracks them)."""
    removed = []
    for name in run.ray_checkpoints():
        if name != keep and checkpoint_step(name) is not None and _never_completed(run, name):
            run.remove_dir(name)
            removed.append(name)
    if removed:
        log.warning("removed torn checkpoint upload(s) of a failed worker group: %s", ", ".join(removed))
    return removed


def choose_resume_checkpoint(
    run: RunDir, latest: Path | None, latest_name: str | None, scratch: Path
) -> tuple[str, Path] | None:
    """``(name, local directory)`` of the checkpoint a worker group resumes from: the newest ``checkpoint_*``
    of the run's storage that verifies, trying Ray's own latest (``latest``, named ``latest_name``; ``None``
    when Ray handed none) in its place. ``None`` when the storage holds no checkpoint; ``ValueError`` when
    none verifies.

    Newer than Ray's latest is possible: Ray Train registers a reported checkpoint only when its controller
    next hears from the workers, so a worker group SIGKILLed right after every rank reported leaves a complete
    checkpoint Ray never recorded (seen in the SIGKILL drill). Every rank makes the same choice from the same
    files. Remote storage: candidates are downloaded into ``scratch``."""
    names = {n for n in run.ray_checkpoints() if checkpoint_step(n) is not None}
    if latest_name is not None:
        names.add(latest_name)
    ordered = sorted(names, key=lambda n: checkpoint_step(n) or (-1, -1), reverse=True)
    problems = []
    for name in ordered:
        local = (
            latest if name == latest_name and latest is not None else run.download_dir(name, scratch / name)
        )
        try:
            meta = verify_checkpoint(local)
        except ValueError as exc:
            log.error("%s; trying an older checkpoint", exc)
            problems.append(str(exc))
            continue
        if problems:
            log.warning(
                "resuming from %s/%s (step %d): %d newer checkpoint(s) did not verify",
                run.uri,
                name,
                int(meta["step"]),
                len(problems),
            )
        if latest_name is not None and name != latest_name and not problems:
            log.warning(
                "resuming from %s/%s (step %d), newer than Ray's latest %s: its worker group died before Ray "
                "recorded it",
                run.uri,
                name,
                int(meta["step"]),
                latest_name,
            )
        return name, local
    if problems:
        raise ValueError("no checkpoint of the run verifies: " + " | ".join(problems))
    return None


class RayCheckpointManager(CheckpointManager):
    """The loop's checkpoint manager for Ray Train: rank temp dir → completion marker → ``ray.train.report``.

    ``root`` is node-local (each rank has its own); the reported checkpoint lives in Ray's storage as
    ``<run>/checkpoint_<step>``. ``restored`` is the local directory of the checkpoint Ray handed to this
    worker group at start (what :meth:`latest` returns).
    """

    def __init__(
        self,
        root: Path,
        rank: int,
        world_size: int,
        keep_last: int = 2,
        enospc_at: tuple[int, RunDir] | None = None,
    ) -> None:
        """``enospc_at=(step, run)``: test-only, the save of ``step`` fails with a real ENOSPC (once per
        run: the fault-injection marker in ``run`` keeps a restarted group from failing again)."""
        super().__init__(root, keep_last)
        self.enospc_at = enospc_at
        self.rank = rank
        self.world_size = world_size
        self.restored: Path | None = None
        self._previous: Path | None = None
        # checkpoint_* names already in storage when this worker group started (re-reported steps after a
        # fallback get a fresh name instead of overwriting them)
        self.taken: set[str] = set()

    def dir_name(self, step: int) -> str:
        """``checkpoint_<step>``, or ``checkpoint_<step>_r<n>`` when that name was taken at start."""
        name, n = f"checkpoint_{step:08d}", 0
        while name in self.taken:
            n += 1
            name = f"checkpoint_{step:08d}_r{n}"
        return name

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
        if self.enospc_at is not None and self.enospc_at[0] == step:
            self._inject_enospc(staging / state_file(self.rank), step, self.enospc_at[1])
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
            "files": file_digests(staging, exclude=(COMPLETE_DIR,)),
        }
        (staging / COMPLETE_DIR).mkdir()
        (staging / COMPLETE_DIR / f"rank{self.rank:05d}.json").write_text(json.dumps(marker, indent=2) + "\n")
        ray.train.report(
            {"step": step, **finite_metrics(metrics)},
            checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
            checkpoint_dir_name=self.dir_name(step),
        )
        if self._previous is not None and self._previous != staging and self._previous.exists():
            shutil.rmtree(self._previous)
        self._previous = staging
        if self.rank == 0:
            log.info("checkpoint at step %d reported to Ray storage", step)
        return staging

    def verify(self, directory: Path) -> dict[str, Any]:
        return verify_checkpoint(directory)

    def _inject_enospc(self, path: Path, step: int, run: RunDir) -> None:
        if run.exists(FAULT_MARKER):
            return
        run.write_json(
            FAULT_MARKER,
            {"rank": self.rank, "step": step, "at_unix": time.time(), "pid": os.getpid(), "kind": "enospc"},
        )
        path.symlink_to("/dev/full")  # the kernel answers every write with ENOSPC
