"""Training objectives by name: ``OBJECTIVES[name](module, x1_BZPR, cond, generator) -> loss_B``.

``x1_BZPR`` is a batch already in model (transformed) space, ``cond`` its ``ConditionTensors``, ``module``
the possibly wrapped ``ShowerModel`` (objectives call ``module(x_t, t, cond)``; options come from the
model's ``ShowerModelConfig``), ``generator`` the only source of randomness. The result is the per-sample
loss (B,) in float32; the training loop averages it.

- ``flow_matching``: conditional flow matching, linear path (Lipman et al. 2023); ``coupling = "ot"`` adds
  minibatch OT pairing within condition groups (Tong et al. 2023; AllShowers).
- ``edm``: EDM denoising loss with log-normal σ and λ(σ) weighting (Karras et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors
from caloforge.platform.objectives.common import unwrap_shower_model
from caloforge.platform.objectives.coupling import (
    condition_groups,
    mean_pair_distance,
    ot_couple,
    ot_permutation,
)
from caloforge.platform.objectives.edm import EDMConfig, edm_loss
from caloforge.platform.objectives.flow_matching import COUPLINGS, FlowMatchingConfig, flow_matching_loss

ObjectiveFn = Callable[[nn.Module, torch.Tensor, ConditionTensors, torch.Generator], torch.Tensor]

OBJECTIVES: dict[str, ObjectiveFn] = {
    "flow_matching": flow_matching_loss,
    "edm": edm_loss,
}


def get_objective(name: str) -> ObjectiveFn:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r} (known: {sorted(OBJECTIVES)})") from None


__all__ = [
    "COUPLINGS",
    "OBJECTIVES",
    "EDMConfig",
    "FlowMatchingConfig",
    "ObjectiveFn",
    "condition_groups",
    "edm_loss",
    "flow_matching_loss",
    "get_objective",
    "mean_pair_distance",
    "ot_couple",
    "ot_permutation",
    "unwrap_shower_model",
]
