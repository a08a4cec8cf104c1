"""Helpers shared by the objectives: find the ShowerModel inside distributed/adapter wrappers and check
that an objective matches the model it trains.

Objectives must *call* the wrapper (``module(x_t, t, cond)``) so DDP/DeepSpeed see the forward, but they
read hyper-parameters (σ_data, coupling, …) from the wrapped ``ShowerModel``. Wrappers are unwrapped through
their public handles: ``.module`` (DDP, FSDP, DeepSpeed engine), ``._orig_mod`` (``torch.compile``) and
``.get_base_model()`` (peft ``PeftModel``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors

if TYPE_CHECKING:
    from caloforge.platform.shower_model import ShowerModel

_MAX_WRAP_DEPTH = 8


def unwrap_shower_model(module: nn.Module) -> ShowerModel:
    """The ``ShowerModel`` inside ``module`` (itself, or under DDP/DeepSpeed/compile/peft wrappers)."""
    from caloforge.platform.shower_model import ShowerModel

    current: object = module
    for _ in range(_MAX_WRAP_DEPTH):
        if isinstance(current, ShowerModel):
            return current
        if isinstance(current, nn.Module) and "_orig_mod" in current._modules:
            current = current._modules["_orig_mod"]
        elif isinstance(current, nn.Module) and "module" in current._modules:
            current = current._modules["module"]
        elif hasattr(current, "get_base_model"):
            current = current.get_base_model()  # type: ignore[union-attr]
        else:
            break
    raise ValueError(
        f"objective: expected a ShowerModel (optionally wrapped by DDP/DeepSpeed/torch.compile/peft), "
        f"got {type(module).__name__}"
    )


def check_objective_inputs(
    model: ShowerModel, objective: str, x1_BZPR: torch.Tensor, cond: ConditionTensors
) -> None:
    """ValueError when the model was built for another objective or the batch does not fit the model."""
    if model.config.objective != objective:
        raise ValueError(
            f"objective {objective!r} cannot train a model built with objective={model.config.objective!r} "
            "(the network output means something else)"
        )
    if x1_BZPR.ndim != 4 or tuple(x1_BZPR.shape[1:]) != model.mesh_shape:
        mesh = ", ".join(map(str, model.mesh_shape))
        raise ValueError(f"x1_BZPR must have shape (B, {mesh}), got {tuple(x1_BZPR.shape)}")
    if len(cond) != x1_BZPR.shape[0]:
        raise ValueError(f"cond has {len(cond)} rows but x1_BZPR has batch {x1_BZPR.shape[0]}")
