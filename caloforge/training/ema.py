"""Exponential moving average of the trainable weights, with warm-up.

After optimizer update ``t`` (0-based) the shadow weights move as ``ema ← d_t·ema + (1 − d_t)·θ`` with
``d_t = min(decay, (1 + t) / (10 + t))`` when warm-up is on (the TensorFlow/timm convention used by
CaloDiT-2's "EMA rising to 0.999", Raikwar et al. 2025 §3), else ``d_t = decay``. Early on the average
therefore forgets the random initialisation quickly.

The shadow copies are float32 on the model's device, whatever the model's own dtype. Only parameters
with ``requires_grad`` are averaged (frozen ones are constant, so their average is themselves); buffers
are not averaged. Of a parameter that trains only some rows (a ``Trainable`` selection,
``training/trainable.py``) only those rows are averaged: the shadow's other rows stay bitwise the copy
taken at construction (as the weights themselves do).

``apply(model)`` swaps the averaged weights in for evaluation and swaps back on exit; ``copy_to(model)``
writes them in for good (the final model bundle).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from caloforge.training.config import EMAConfig
from caloforge.training.trainable import TrainableSpec, resolve

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
    subset during adaptation; a ``Trainable`` selection averages only the selected rows of its
    row-restricted parameters.
    """

    def __init__(self, model: nn.Module, config: EMAConfig, trainable: TrainableSpec = None) -> None:
        self.config = config
        self.num_updates = 0
        selection = resolve(model, trainable)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(dtype=torch.float32, copy=True) for name, p in selection.params(model)
        }
        # row-restricted parameters: name -> trained row indices (on the shadow's device)
        self._rows: dict[str, torch.Tensor] = {
            name: selection.row_index(name, self.shadow[name].device) for name in selection.rows
        }
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
        shadows, current = [], []
        for (name, shadow), p in zip(self.shadow.items(), self._params(model), strict=True):
            rows = self._rows.get(name)
            if rows is None:
                shadows.append(shadow)
                current.append(p.detach().to(torch.float32))
            else:  # only the trained rows: the others are never written (bitwise unchanged)
                averaged = shadow.index_select(0, rows)
                averaged.lerp_(p.detach().index_select(0, rows).to(torch.float32), 1.0 - decay)
                shadow.index_copy_(0, rows, averaged)
        if shadows:
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
