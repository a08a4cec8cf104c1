"""The ``Backend`` seam between the one training loop and the hardware/distribution engine.

The loop (``training/loop.py``) knows only this interface. A backend owns: device placement, wrapping
(DDP / DeepSpeed engine), mixed precision, gradient accumulation (including the 1/accum loss scaling),
gradient clipping, the optimizer and LR scheduler, and saving/loading their state. The loop owns: step
counting, EMA, the data stream and its position, RNG states, hooks and the ``TrainState``.

Implementations: ``TorchBackend`` and ``DDPBackend`` (here), ``DeepSpeedBackend``
(``caloforge/training/deepspeed_backend.py``).

Per micro-batch the loop does::

    with backend.autocast(), backend.accumulate():
        loss_B = loss_fn(backend.module, batch, generator)
    backend.backward(loss_B.mean())
    update = backend.step()          # None until the accumulation boundary, then a StepInfo
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from caloforge.training.config import LoopConfig
from caloforge.training.trainable import TrainableSpec


@dataclass(frozen=True)
class StepInfo:
    """What happened at an optimizer update.

    ``grad_norm`` and ``skipped`` may be 0-dim device tensors: a backend that decides on the device (fused
    AdamW's ``found_inf``) never forces a GPU→host sync per step; the loop reads them only at log steps.
    """

    grad_norm: float | torch.Tensor  # total norm before clipping (nan if unavailable)
    lr: float  # learning rate used for this update
    skipped: bool | torch.Tensor = False  # e.g. non-finite gradients


class Backend(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def setup(self, model: nn.Module, config: LoopConfig, trainable: TrainableSpec = None) -> None:
        """Place/wrap ``model``, build AdamW over ``trainable`` (default: params with requires_grad) and the
        LR schedule from ``config`` (horizon ``config.steps`` optimizer updates). A ``Trainable`` selection's
        gradient masks are installed here (``Trainable.mask_gradients``), so row-restricted parameters
        change only in their selected rows."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The module to call in ``loss_fn`` (wrapped for DDP / DeepSpeed)."""

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The unwrapped model (for EMA, evaluation and saving bundles)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch mean loss (the backend applies 1/grad_accum scaling)."""

    @abstractmethod
    def step(self) -> StepInfo | None:
        """Call once per micro-batch after ``backward``; updates at the accumulation boundary only."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Save model + optimizer + scheduler state into ``directory`` (every rank calls it)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote (after ``setup``)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context for a micro-batch forward; DDP uses it to skip gradient sync off the boundary."""
        return contextlib.nullcontext()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        return None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def iter_trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)
