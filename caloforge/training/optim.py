"""AdamW and the learning-rate schedules of the one training loop.

Schedules are functions of the optimizer-update index ``s`` (0-based: update ``s`` uses
``lr · factor(s)``), used through ``torch.optim.lr_scheduler.LambdaLR``. With ``T`` the run's total
updates, ``W = round(warmup_frac·T)`` warm-up updates and ``m = min_lr_frac``:

- warm-up (all kinds): ``factor(s) = (s + 1) / (W + 1)`` for ``s < W`` (linear, never 0, reaching 1 at
  ``s = W``, so no update is wasted at lr 0);
- ``wsd`` (warmup-stable-decay, CaloDiT-2, Raikwar et al. 2025 §3; Hägele et al. 2024 for the
  square-root cool-down): constant 1 for ``S = round(stable_frac·T)`` updates, then over the last
  ``D = T − W − S`` updates ``factor(s) = m + (1 − m)·(1 − sqrt((s − W − S) / D))``, which reaches ``m``
  at ``s = T`` (one past the last update);
- ``cosine``: after warm-up ``factor(s) = m + (1 − m)·½(1 + cos(π (s − W) / (T − W)))``;
- ``constant``: 1 after warm-up.

Past ``T`` every schedule stays at its end value. Weight decay applies to matrices and embeddings
(``ndim >= 2``) only, not to biases and norm gains (the nanoGPT/DiT convention), and not to parameters
of which only some rows train (``training/trainable.py``: decay would shrink the frozen rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable

import torch
from torch import nn

from caloforge.training.config import OptimConfig, ScheduleConfig
from caloforge.training.trainable import TrainableSpec, resolve

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "schedule_factor",
    "schedule_phases",
]


def schedule_phases(config: ScheduleConfig, total_steps: int) -> tuple[int, int, int]:
    """``(warmup, stable, decay)`` update counts of ``config`` over ``total_steps`` updates.

    ``stable`` only matters for ``wsd``; for ``cosine`` the decay spans everything after warm-up and for
    ``constant`` there is no decay.
    """
    if total_steps < 1:
        raise ValueError(f"schedule: total_steps must be >= 1, got {total_steps}")
    warmup = round(config.warmup_frac * total_steps)
    if config.kind == "wsd":
        stable = min(round(config.stable_frac * total_steps), total_steps - warmup)
        return warmup, stable, total_steps - warmup - stable
    if config.kind == "cosine":
        return warmup, 0, total_steps - warmup
    if config.kind == "constant":
        return warmup, total_steps - warmup, 0
    raise ValueError(f"schedule.kind: unknown schedule {config.kind!r} (known: wsd, cosine, constant)")


def schedule_factor(config: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplicative LR factor as a function of the 0-based optimizer-update index."""
    warmup, stable, decay = schedule_phases(config, total_steps)
    m = config.min_lr_frac
    kind = config.kind

    def factor(step: int) -> float:
        if step < 0:
            raise ValueError(f"schedule: step must be >= 0, got {step}")
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or decay == 0:
            return 1.0
        if kind == "wsd" and step < warmup + stable:
            return 1.0
        progress = min((step - warmup - stable) / decay, 1.0)
        if kind == "wsd":
            return m + (1.0 - m) * (1.0 - math.sqrt(progress))
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(
    params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    *,
    row_restricted: Collection[str] = (),
) -> list[dict]:
    """Split named parameters into a decayed group (``ndim >= 2``) and a non-decayed one (biases, norms,
    and the parameters named in ``row_restricted``, of which only some rows train); empty groups are left
    out."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in row_restricted else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    config: OptimConfig,
    trainable: TrainableSpec = None,
    *,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``trainable`` (default: every parameter of ``model`` with ``requires_grad``).

    ``trainable`` may be a :class:`~caloforge.training.trainable.Trainable` selection: its row-restricted
    parameters go to the non-decayed group, and the caller must also install its gradient masks
    (``selection.mask_gradients(model)``, which the backends do in ``setup``) so that AdamW leaves their
    other rows unchanged.

    ``fused``: PyTorch's single-kernel AdamW (``fused=True``; the backends ask for it on CUDA, where it is
    one launch per step instead of a few per parameter group; CPU keeps the default implementation)."""
    selection = resolve(model, trainable)
    return torch.optim.AdamW(
        param_groups(selection.params(model), config.weight_decay, row_restricted=selection.restricted),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=True if fused else None,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`schedule_factor`; call ``step()`` once after every optimizer update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(config, total_steps))
