"""Adapters from stream batches to the platform objectives (the loop's ``loss_fn``).

``shower_loss_fn(model, objective)`` turns a ``ShowerBatch`` of raw MeV showers into what an objective
(``caloforge.platform.objectives``: ``objective(module, x1_BZPR, cond, generator, ctx) -> loss_B``)
expects: showers in model space through the model's own fitted transform (the preprocessing ships inside
the bundle, so training and generation can never disagree on it) and conditions encoded with the model's
``ConditionVocab``. The objective is called on the module the loop hands over (DDP/DeepSpeed-wrapped, so
gradient sync sees the forward) with the loop's :class:`LossContext`; the transform and vocabulary are
read from the ``ShowerModel`` inside it. A model with the layer-energy head adds
``layer_energy.loss_weight`` × the head's loss (``ShowerModel.energy_loss``, drawn from the same generator
after the objective's draws) to each shower's loss. A model whose voxel network reads the layer energies
(``layer_energy.condition_voxels``) gets the batch's own layer energies attached to its conditions
(``ShowerModel.with_layers``), so every objective — consistency and shortcut distillation included — trains
p(showers | E_z).
"""

from __future__ import annotations

import torch
from torch import nn

from caloforge.datasets.batch import ShowerBatch
from caloforge.platform.objectives import (
    LossContext,
    Objective,
    ObjectiveConfig,
    make_objective,
    unwrap_shower_model,
)
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.loop import LossFn

__all__ = ["shower_loss_fn"]


def shower_loss_fn(model: ShowerModel, objective: Objective | ObjectiveConfig | str | None = None) -> LossFn:
    """The loop's ``loss_fn`` for a ``ShowerModel`` trained with ``objective``.

    Args:
        model: the unwrapped model (the one passed to the Trainer).
        objective: a built :class:`Objective`, an :class:`ObjectiveConfig` (the job config's block), an
            objective name (default options) or ``None`` (the native objective of the model's
            parametrisation). It must be able to train the model's parametrisation (checked here).

    Returns:
        ``loss_fn(module, batch, generator, ctx) -> loss_B`` (float32, per shower).
    """
    if not isinstance(model, ShowerModel):
        raise ValueError(f"shower_loss_fn needs a ShowerModel, got {type(model).__name__}")
    if not isinstance(objective, Objective):
        objective = make_objective(objective, model.config.parametrisation)
    objective.check_model(model)
    chosen: Objective = objective

    def loss_fn(
        module: nn.Module, batch: ShowerBatch, generator: torch.Generator, ctx: LossContext
    ) -> torch.Tensor:
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
        # The layer sums feed both the head's loss and (condition_voxels) the voxel model: computed once.
        with torch.autocast(device_type=device.type, enabled=False):
            x1_BZPR = shower_model.to_model_space(showers_mev_BZPR)
            layer_mev_BZ = (
                shower_model.layer_energies_mev(showers_mev_BZPR) if shower_model.has_energy_head else None
            )
        cond = shower_model.encode_conditions(batch.conditions())
        if layer_mev_BZ is not None:  # a voxel model that reads them learns p(x | E_z) on the data's own E_z
            cond = shower_model.with_layers(cond, layer_mev_BZ)
        loss_B = chosen(module, x1_BZPR, cond, generator, ctx)
        if layer_mev_BZ is not None:
            # The head runs on the unwrapped model, outside the wrapper's forward: DDP's gradient hooks
            # still fire for its parameters (default find_unused_parameters=False; the pretraining config
            # refuses the other mode with the head), and DeepSpeed reduces every gradient.
            weight = shower_model.config.layer_energy.loss_weight
            head_B = shower_model.layer_energy_loss(layer_mev_BZ, cond, generator)
            ctx.record("voxel", loss_B)
            ctx.record("layer_energy", head_B)
            loss_B = loss_B + weight * head_B
        return loss_B

    loss_fn.objective = chosen  # type: ignore[attr-defined]  # what trained the weights (lineage)
    return loss_fn
