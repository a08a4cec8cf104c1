"""Everything needed to resume a run, saved together and atomically (torchtitan's stateful checkpointer;
edm's training-state pickles, without pickled classes).

A checkpoint is a directory ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` holding

- what the backend writes (``Backend.save``: model + optimizer + LR scheduler; ``TorchBackend`` writes
  ``model.pt`` and ``optim.pt``, DeepSpeed its own per-rank files),
- ``trainer_state_rank<RRRRR>.pt`` per rank: the :class:`TrainState` (step, EMA shadow, the rank's stream
  position, RNG states: python, numpy, torch CPU, CUDA when present, and the loop's generator),
- ``meta.json`` (step, world size, format version, the loop's latest log-step metrics, and ``files``: the
  size and sha256 of every other file of the checkpoint), written last.

Atomicity: everything is written into ``.tmp_step_<N>/``, fsynced, then renamed to ``step_<N>/``, and only
then does the ``latest`` symbolic link move (``os.replace`` of a fresh link, also atomic). A crash at any
point leaves either the previous ``latest`` or the new one, never a half-written directory under a
``step_*`` name; stale ``.tmp_*`` directories are never read and are removed by the next save. Older
checkpoints beyond ``keep_last`` are deleted after the new one is committed.

Verification: :meth:`CheckpointManager.verify` checks every file against the sizes and sha256 digests in
``meta.json`` before anything is read, and :meth:`CheckpointManager.resume_point` (what ``Trainer.restore``
asks for) returns the newest checkpoint that verifies, logging each newer one that did not (a torn copy, a
damaged disk block, a file changed on shared storage): a damaged latest checkpoint costs the steps since the
previous one, never the run.

All files are plain state dicts written with ``torch.save`` and read with ``torch.load(weights_only=True)``;
numpy arrays inside stream states are stored as tagged tensors and restored as numpy arrays.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caloforge.platform.hashing import sha256_file
from caloforge.training.backend import Backend

__all__ = [
    "CheckpointManager",
    "TrainState",
    "capture_rng",
    "decode_state",
    "encode_state",
    "file_digests",
    "finite_metrics",
    "restore_rng",
    "state_file",
    "verify_files",
]

log = logging.getLogger("caloforge.training")

FORMAT_VERSION = 1
LATEST = "latest"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_NDARRAY_TAG = "__caloforge_ndarray__"


def finite_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The finite float entries of ``metrics`` (what a checkpoint records; JSON has no NaN)."""
    out = {}
    for key, value in (metrics or {}).items():
        v = float(value)
        if v == v and abs(v) != float("inf"):
            out[key] = v
    return out


def file_digests(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``directory`` whose first
    path component is not in ``exclude``."""
    directory = Path(directory)
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.parts[0] not in exclude:
            out[rel.as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def verify_files(directory: Path, files: Mapping[str, Any], who: str = "") -> list[str]:
    """Problems of ``directory`` against a :func:`file_digests` record (empty: every file is there with its
    size and content). Sizes are compared first, so a short file costs no hashing."""
    directory = Path(directory)
    problems = []
    for rel, expected in files.items():
        if not isinstance(expected, Mapping) or "sha256" not in expected or "size" not in expected:
            problems.append(f"{who}{rel}: no recorded sha256 (written before content digests were kept)")
            continue
        path = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{who}{rel}: path leaves the checkpoint")
        elif not path.is_file():
            problems.append(f"{who}{rel} missing")
        elif path.stat().st_size != int(expected["size"]):
            problems.append(f"{who}{rel} has {path.stat().st_size} bytes, {expected['size']} were written")
        elif (actual := sha256_file(path)) != expected["sha256"]:
            problems.append(
                f"{who}{rel} is damaged (sha256 {actual[:12]}… != recorded {str(expected['sha256'])[:12]}…)"
            )
    return problems


def state_file(rank: int) -> str:
    """The per-rank ``TrainState`` file name inside a checkpoint directory."""
    return f"trainer_state_rank{rank:05d}.pt"


# -- values safe for torch.load(weights_only=True) ------------------------------------------------------
def encode_state(obj: Any) -> Any:
    """Make a nested state (dicts, lists, tuples, scalars, tensors, numpy) loadable with ``weights_only``."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {
            _NDARRAY_TAG: torch.from_numpy(arr.view(np.uint8).reshape(-1).copy()),
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: encode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [encode_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(encode_state(v) for v in obj)
    if obj is None or isinstance(obj, bool | int | float | str | bytes | torch.Tensor):
        return obj
    raise ValueError(f"checkpoint: cannot store a value of type {type(obj).__name__} in a training state")


def decode_state(obj: Any) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if _NDARRAY_TAG in obj:
            raw = obj[_NDARRAY_TAG].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode_state(v) for v in obj)
    return obj


# -- RNG states -------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Global RNG states of this process: python, numpy (legacy global), torch CPU and every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` returned (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has CUDA RNG states for %d devices, this process sees %d: not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


@dataclass
class TrainState:
    """The loop's own part of a checkpoint (per rank); model/optimizer/scheduler belong to the backend."""

    step: int
    ema: dict | None
    stream: dict | None
    rng: dict
    generator: torch.Tensor
    extra: dict = field(default_factory=dict)  # samples_seen, skipped_updates, the loop config, …

    def to_dict(self) -> dict:
        return encode_state(
            {
                "format_version": FORMAT_VERSION,
                "step": self.step,
                "ema": self.ema,
                "stream": self.stream,
                "rng": self.rng,
                "generator": self.generator,
                "extra": self.extra,
            }
        )

    @classmethod
    def from_dict(cls, data: dict, source: str) -> TrainState:
        data = decode_state(data)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: training-state format {data.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        return cls(
            step=int(data["step"]),
            ema=data["ema"],
            stream=data["stream"],
            rng=data["rng"],
            generator=data["generator"],
            extra=dict(data["extra"]),
        )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for sub in sorted(path.rglob("*")):
        if sub.is_file() and not sub.is_symlink():
            _fsync_file(sub)
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(sub)
    _fsync_dir(path)


class CheckpointManager:
    """Atomic save / discovery / load of checkpoints under ``root`` (``<run_dir>/checkpoints``).

    Every rank calls :meth:`save` and :meth:`load` (they contain barriers); rank 0 alone renames and
    prunes. The root must be visible to all ranks (a shared or local filesystem).
    """

    def __init__(self, root: Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoints (a ``step_*`` directory with its ``meta.json``), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for sub in self.root.iterdir():
            match = _STEP_DIR.match(sub.name)
            if match and sub.is_dir() and not sub.is_symlink() and (sub / META_FILE).is_file():
                found.append((int(match.group(1)), sub))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint to resume from: ``latest`` when it points at a committed checkpoint, else the
        newest committed one (e.g. a copy that lost its link), else ``None``."""
        link = self.root / LATEST
        if link.is_symlink() or link.exists():
            target = link.resolve()
            if _STEP_DIR.match(target.name) and (target / META_FILE).is_file():
                return target
            log.warning("%s does not point at a complete checkpoint; using the newest complete one", link)
        complete = self.complete_checkpoints()
        return complete[-1][1] if complete else None

    def verify(self, directory: Path) -> dict[str, Any]:
        """``meta.json`` of a checkpoint whose files all match the sizes and sha256 digests it records;
        ``ValueError`` naming every missing, short or damaged file otherwise."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"checkpoint {directory}: no {META_FILE} (incomplete or not a checkpoint)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"checkpoint {directory}: {META_FILE} is not valid JSON ({exc})") from exc
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError(
                f"checkpoint {directory}: {META_FILE} records no file digests (written by an older CaloForge "
                "or not a checkpoint); it cannot be verified"
            )
        problems = verify_files(directory, files)
        if problems:
            raise ValueError(f"checkpoint {directory} does not verify: " + "; ".join(problems))
        return meta

    def resume_candidates(self) -> list[Path]:
        """Checkpoints to try, best first: ``latest()``, then the other committed ones, newest first."""
        first = self.latest()
        others = [p for _, p in reversed(self.complete_checkpoints()) if p != first]
        return ([first] if first is not None else []) + others

    def resume_point(self) -> Path | None:
        """The newest checkpoint that verifies (``None`` when there is none at all). A newer one that does
        not verify is logged and skipped; when checkpoints exist but none verifies, ``ValueError`` (a run
        must not silently start again from step 0)."""
        candidates = self.resume_candidates()
        problems = []
        for path in candidates:
            try:
                self.verify(path)
            except ValueError as exc:
                log.error("%s; falling back to an older checkpoint", exc)
                problems.append(str(exc))
                continue
            if problems:
                log.warning("resuming from %s: %d newer checkpoint(s) did not verify", path, len(problems))
            return path
        if problems:
            raise ValueError("no checkpoint verifies: " + " | ".join(problems))
        return None

    def save(
        self, step: int, backend: Backend, state: TrainState, metrics: Mapping[str, float] | None = None
    ) -> Path:
        """Commit a checkpoint of ``step``; ``metrics`` (the loop's latest log-step metrics, handed over
        explicitly by the Trainer) are recorded in ``meta.json``."""
        final = self.root / self.step_dir_name(step)
        tmp = self.root / f".tmp_{final.name}"
        if backend.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_*"):  # left behind by a crash mid-save
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            tmp.mkdir()
        backend.barrier()
        tmp.mkdir(parents=True, exist_ok=True)  # no-op on a shared filesystem
        backend.save(tmp)
        torch.save(state.to_dict(), tmp / state_file(backend.rank))
        backend.barrier()
        if backend.is_main:
            meta = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": backend.world_size,
                "backend": type(backend).__name__,
                "saved_at_unix": time.time(),
                "metrics": finite_metrics(metrics),
                "files": file_digests(tmp, exclude=(META_FILE,)),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. resumed exactly at a checkpoint): swap it out
                old = self.root / f".tmp_old_{final.name}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            _fsync_dir(self.root)
            link_tmp = self.root / f".tmp_{LATEST}"
            link_tmp.symlink_to(final.name, target_is_directory=True)
            os.replace(link_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            self._prune(keep=final)
        backend.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = self.complete_checkpoints()
        # Checkpoints newer than the one just committed were never made `latest` (a crash between rename and
        # link update, then a resume from the older one): they belong to an abandoned timeline.
        keep_step = int(_STEP_DIR.match(keep.name).group(1))  # type: ignore[union-attr]
        older = [(s, p) for s, p in complete if s <= keep_step]
        doomed = [p for s, p in complete if s > keep_step] + [p for _, p in older[: -self.keep_last]]
        for path in doomed:
            if path != keep:
                shutil.rmtree(path)

    def load(self, directory: Path, backend: Backend) -> TrainState:
        """Verify (:meth:`verify`), then restore the backend's state and return this rank's
        :class:`TrainState`."""
        directory = Path(directory)
        meta = self.verify(directory)
        if meta.get("world_size") != backend.world_size:
            raise ValueError(
                f"checkpoint {directory}: saved with world_size={meta.get('world_size')}, resuming with "
                f"{backend.world_size}; stream positions and RNG states are per rank"
            )
        backend.load(directory)
        path = directory / state_file(backend.rank)
        if not path.is_file():
            raise ValueError(f"checkpoint {directory}: missing {path.name}")
        state = TrainState.from_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))
        if state.step != meta.get("step"):
            raise ValueError(
                f"checkpoint {directory}: state step {state.step} != meta step {meta.get('step')}"
            )
        backend.barrier()
        return state
