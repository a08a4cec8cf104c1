"""The target network θ⁻ of consistency-style objectives: a frozen copy of the trained model whose weights
follow them as an exponential moving average with its own decay μ (Song et al. 2023, "Consistency
Models", Alg. 2: θ⁻ ← stopgrad(μ θ⁻ + (1 − μ) θ); CaloDiT-2 and CaloClouds II use μ = 0.95).

It is not the evaluation EMA (``ema.py``, decay ~0.999 with warm-up, averaged for the final bundle): the
two serve different purposes and have different decays. The loop keeps it when the job sets
``target_decay`` and hands it to the loss as ``LossContext.target``; its weights are saved in every
checkpoint, so a resumed run continues with the same θ⁻.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["TargetNetwork"]


class TargetNetwork:
    """A frozen, eval-mode copy of ``model`` updated by :meth:`update` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("target network: the model has no trainable parameters to follow")
        self._own = dict(self.module.named_parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ for the trained parameters (frozen ones are equal already)."""
        named = dict(model.named_parameters())
        targets = [self._own[n] for n in self._names]
        current = [named[n].detach().to(self._own[n].dtype) for n in self._names]
        torch._foreach_lerp_(targets, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: self._own[n].detach().clone() for n in self._names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self._names):
            diff = sorted(set(state) ^ set(self._names))[:5]
            raise ValueError(f"target network: checkpoint parameters differ from the model's (e.g. {diff})")
        with torch.no_grad():
            for n in self._names:
                if state[n].shape != self._own[n].shape:
                    raise ValueError(
                        f"target network: {n!r} is {tuple(state[n].shape)} in the checkpoint, "
                        f"{tuple(self._own[n].shape)} in the model"
                    )
                self._own[n].copy_(state[n])
