"""Adapters from stream batches to the platform objectives (the loop's ``loss_fn``).

``shower_loss_fn(model, objective)`` turns a ``ShowerBatch`` of raw MeV showers into what
``OBJECTIVES[name](module, x1_BZPR, cond, generator)`` expects: showers in model space through the
model's own fitted transform (the preprocessing ships inside the bundle, so training and generation can
never disagree on it) and conditions encoded with the model's ``ConditionVocab``. The objective is called
on the module the loop hands over (DDP/DeepSpeed-wrapped, so gradient sync sees the forward); the
transform and vocabulary are read from the ``ShowerModel`` inside it. A model with the layer-energy head
adds ``layer_energy.loss_weight`` × the head's loss (``ShowerModel.energy_loss``, drawn from the same
generator after the objective's draws) to each shower's loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from caloforge.datasets.batch import ShowerBatch
from caloforge.platform.objectives import OBJECTIVES, unwrap_shower_model
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.loop import LossFn

__all__ = ["shower_loss_fn"]

# ShowerModelConfig section holding each objective's options.
_OPTION_SECTIONS = {"flow_matching": "flow_matching", "edm": "edm"}


def shower_loss_fn(model: ShowerModel, objective_name: str | None = None, **objective_options: Any) -> LossFn:
    """The loop's ``loss_fn`` for a ``ShowerModel`` trained with objective ``objective_name``.

    Args:
        model: the unwrapped model (the one passed to the Trainer). Its ``config.objective`` must be
            ``objective_name``: the objective decides what the network output means.
        objective_name: a key of ``OBJECTIVES`` (default: the model's own objective).
        objective_options: fields of the objective's options dataclass (e.g. ``coupling="ot"`` for
            flow matching, ``p_mean=-1.0`` for EDM). They are written into ``model.config`` here, so the
            saved bundle records how it was trained.

    Returns:
        ``loss_fn(module, batch, generator) -> loss_B`` (float32, per shower).
    """
    if not isinstance(model, ShowerModel):
        raise ValueError(f"shower_loss_fn needs a ShowerModel, got {type(model).__name__}")
    name = model.config.objective if objective_name is None else objective_name
    if name not in OBJECTIVES:
        raise ValueError(f"objective: unknown {name!r} (known: {sorted(OBJECTIVES)})")
    if name != model.config.objective:
        raise ValueError(
            f"objective {name!r} cannot train this model: it was built with objective="
            f"{model.config.objective!r} (the network output means something else)"
        )
    if objective_options:
        section = _OPTION_SECTIONS.get(name)
        if section is None:
            raise ValueError(f"objective {name!r} takes no options, got {sorted(objective_options)}")
        current = getattr(model.config, section)
        known = {f.name for f in dataclasses.fields(current)}
        unknown = sorted(set(objective_options) - known)
        if unknown:
            raise ValueError(f"{section}: unknown option(s) {unknown} (known: {sorted(known)})")
        model.config = dataclasses.replace(
            model.config, **{section: dataclasses.replace(current, **objective_options)}
        )
    objective = OBJECTIVES[name]

    def loss_fn(module: nn.Module, batch: ShowerBatch, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(batch, ShowerBatch):
            raise ValueError(f"shower loss: expected a ShowerBatch, got {type(batch).__name__}")
        shower_model = unwrap_shower_model(module)
        device = shower_model.device
        # One host→device copy of the showers, shared by both stages; on CUDA from pinned memory and
        # asynchronous, so the host queues the step's kernels while it lands.
        showers_mev_BZPR = batch.showers_BZPR
        if device.type == "cuda":
            showers_mev_BZPR = showers_mev_BZPR.pin_memory().to(device, non_blocking=True)
        # Preprocessing in fp32 even inside the loop's bf16 autocast (log/standardise of MeV voxels).
        with torch.autocast(device_type=device.type, enabled=False):
            x1_BZPR = shower_model.to_model_space(showers_mev_BZPR)
        cond = shower_model.encode_conditions(batch.conditions())
        loss_B = objective(module, x1_BZPR, cond, generator)
        if shower_model.has_energy_head:
            # The head runs on the unwrapped model, outside the wrapper's forward: DDP's gradient hooks
            # still fire for its parameters (default find_unused_parameters=False; the pretraining config
            # refuses the other mode with the head), and DeepSpeed reduces every gradient.
            weight = shower_model.config.layer_energy.loss_weight
            loss_B = loss_B + weight * shower_model.energy_loss(showers_mev_BZPR, cond, generator)
        return loss_B

    return loss_fn
