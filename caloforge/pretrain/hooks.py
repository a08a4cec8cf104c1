"""The pretraining worker's own hooks around the one loop: resource metrics, MLflow metrics, copying
rank-local files into remote run storage, and the test-only fault injection."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from caloforge.pretrain.rundir import RunDir
from caloforge.training.hooks import Hook
from caloforge.training.loop import Trainer

__all__ = [
    "FAULT_MARKER",
    "PENDING_FILE",
    "FaultInjection",
    "MlflowMetrics",
    "ResourceMetrics",
    "UploadRunFiles",
]

FAULT_MARKER = "fault_injection_fired.json"
PENDING_FILE = "tracking_pending.json"  # MLflow calls rank 0 could not deliver (replayed by the driver)


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
    """Rank 0: hand every log-step's metrics to a ``BestEffortTracker`` (queued and retried while MLflow is
    unreachable; ``metrics.jsonl`` is the record) and try to deliver what is queued at the end."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.tracker.log_metrics(metrics, step)

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.flush()


class FaultInjection(Hook):
    """Test-only: raise in (or SIGKILL) worker ``rank`` after step ``step`` — once per run (a marker in the
    run directory keeps the restarted worker group, and later ``--resume`` launches, from failing again)."""

    def __init__(self, rank: int, step: int, my_rank: int, run: RunDir, kind: str = "raise") -> None:
        self.rank, self.step, self.my_rank, self.run, self.kind = rank, step, my_rank, run, kind

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.my_rank != self.rank or step != self.step or self.run.exists(FAULT_MARKER):
            return
        self.run.write_json(
            FAULT_MARKER,
            {"rank": self.rank, "step": step, "at_unix": time.time(), "pid": os.getpid(), "kind": self.kind},
        )
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injection (test-only): worker rank {self.rank} fails after step {step}")


class UploadRunFiles(Hook):
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
