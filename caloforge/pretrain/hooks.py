"""The pretraining worker's own hooks around the one loop: resource metrics and MLflow metrics. Copying
rank-local files into remote run storage and the test-only fault injection are the shared Ray worker's
(``caloforge.training.ray.storage``; re-exported here)."""

from __future__ import annotations

import time
from typing import Any

import torch

from caloforge.training.hooks import Hook
from caloforge.training.loop import Trainer
from caloforge.training.ray.storage import FAULT_MARKER, FaultInjection, UploadRunFiles

__all__ = [
    "FAULT_MARKER",
    "PENDING_FILE",
    "FaultInjection",
    "MlflowMetrics",
    "ResourceMetrics",
    "UploadRunFiles",
]

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
