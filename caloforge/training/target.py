"""The target network θ⁻ of consistency-style objectives: a frozen copy of the trained model whose weights
follow them as an exponential moving average with its own decay μ (Song et al. 2023, "Consistency
Models", Alg. 2: θ⁻ ← stopgrad(μ θ⁻ + (1 − μ) θ); CaloDiT-2 and CaloClouds II use μ = 0.95).

It is not the evaluation EMA (decay ~0.999 with warm-up, averaged for the final bundle): the two serve
different purposes and have different decays. Both are the same average (``ema.EMA``, constant decay here,
over the same trainable selection, so rows that do not train stay bitwise unchanged); the target keeps a
module copy that the loss can call. The loop keeps one when the job sets ``target_decay`` and hands it to
the loss as ``LossContext.target``; its weights are saved in every checkpoint, so a resumed run continues
with the same θ⁻.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from caloforge.training.config import EMAConfig
from caloforge.training.ema import EMA
from caloforge.training.trainable import TrainableSpec

__all__ = ["TargetNetwork"]


class TargetNetwork:
    """A frozen, eval-mode copy of ``model`` updated by :meth:`update` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float, trainable: TrainableSpec = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.average = EMA(model, EMAConfig(enabled=True, decay=decay, warmup=False), trainable)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ for the trained parameters (frozen ones are equal already)."""
        self.average.update(model)
        self.average.copy_to(self.module)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
        self.average.copy_to(self.module)
