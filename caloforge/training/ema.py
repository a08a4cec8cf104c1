"""Exponential moving average of the trainable weights, with warm-up.

After optimizer update ``t`` (0-based) the shadow weights move as ``ema ← d_t·ema + (1 − d_t)·θ`` with
``d_t = min(decay, (1 + t) / (10 + t))`` when warm-up is on (the TensorFlow/timm convention used by
CaloDiT-2's "EMA rising to 0.999", Raikwar et al. 2025 §3), else ``d_t = decay``. Early on the average
therefore forgets the random initialisation quickly.

The shadow copies are float32 on the model's device, whatever the model's own dtype. Only parameters
with ``requires_grad`` are averaged (frozen ones are constant, so their average is themselves); buffers
are not averaged. ``apply(model)`` swaps the averaged weights in for evaluation and swaps back on exit;
``copy_to(model)`` writes them in for good (the final model bundle).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from caloforge.training.config import EMAConfig

__all__ = ["EMA", "ema_decay"]


def ema_decay(config: EMAConfig, t: int) -> float:
    """Decay used at the ``t``-th (0-based) EMA update."""
    if t < 0:
        raise ValueError(f"ema: update index must be >= 0, got {t}")
    if not config.warmup:
        return config.decay
    return min(config.decay, (1.0 + t) / (10.0 + t))


class EMA:
    """Float32 shadow of ``model``'s trainable parameters (by name).

    ``trainable``: the parameters to average (default: all with ``requires_grad``), e.g. the optimizer's
    subset during adaptation.
    """

    def __init__(
        self, model: nn.Module, config: EMAConfig, trainable: list[nn.Parameter] | None = None
    ) -> None:
        self.config = config
        self.num_updates = 0
        chosen = {id(p) for p in trainable} if trainable is not None else None
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(dtype=torch.float32, copy=True)
            for name, p in model.named_parameters()
            if (p.requires_grad if chosen is None else id(p) in chosen)
        }
        if not self.shadow:
            raise ValueError("ema: the model has no trainable parameters to average")
        self._backup: dict[str, torch.Tensor] | None = None

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(named))
        if missing:
            raise ValueError(f"ema: model lacks averaged parameter(s) {missing[:5]}")
        return [named[name] for name in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current weights into the average; returns the decay used."""
        decay = ema_decay(self.config, self.num_updates)
        params = self._params(model)
        shadows = list(self.shadow.values())
        current = [p.detach().to(torch.float32) for p in params]
        torch._foreach_lerp_(shadows, current, 1.0 - decay)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s trainable weights with the averaged ones (cast to their dtype)."""
        for p, s in zip(self._params(model), self.shadow.values(), strict=True):
            p.copy_(s.to(dtype=p.dtype))

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights inside the block; the training weights come back after."""
        if self._backup is not None:
            raise RuntimeError("ema.apply is not re-entrant")
        params = self._params(model)
        self._backup = {n: p.detach().clone() for n, p in zip(self.shadow, params, strict=True)}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, self._backup.values(), strict=True):
                    p.copy_(b)
            self._backup = None

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra = sorted(set(shadow) ^ set(self.shadow))[:5]
            raise ValueError(f"ema: checkpoint parameters differ from the model's (e.g. {extra})")
        with torch.no_grad():
            for name, s in self.shadow.items():
                if shadow[name].shape != s.shape:
                    raise ValueError(
                        f"ema: shape of {name!r} is {tuple(shadow[name].shape)} in the checkpoint, "
                        f"{tuple(s.shape)} in the model"
                    )
                s.copy_(shadow[name])
        self.num_updates = int(state["num_updates"])
