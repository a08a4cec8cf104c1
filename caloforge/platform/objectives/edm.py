"""EDM denoising score matching (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Eq. 8 and Table 1 "Training").

ln σ ~ N(P_mean, P_std²); n ~ N(0, σ² I); loss λ(σ) ‖D_θ(x_1 + n; σ, c) − x_1‖² (mean over voxels, per
sample) with λ(σ) = (σ² + σ_data²) / (σ σ_data)². D_θ is the preconditioned denoiser that the ShowerModel's
``forward`` returns for an EDM-parametrised model (``caloforge.platform.denoisers.EDMDenoiser``; σ_data
and the sampling grid are the model's, P_mean and P_std this objective's). CaloDiT-2 defaults:
σ_data = 0.5, P_mean = −1.2, P_std = 1.2; sampling σ_min = 0.002, σ_max = 80, ρ = 7.

Draw order from ``generator``: B normals for ln σ, then B·Z·P·R normals for n (EDM's EDMLoss order).
Draws happen on the generator's device and move to the data's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors
from caloforge.platform.objectives.common import (
    LossContext,
    Objective,
    check_objective_inputs,
    unwrap_shower_model,
)


@dataclass(frozen=True)
class EDMLossConfig:
    """Options of the EDM loss: the training noise distribution ln σ ~ N(P_mean, P_std²). The
    preconditioning (σ_data) and the sampling grid belong to the model (``denoisers.EDMPrecondConfig``)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        if not self.p_std > 0:
            raise ValueError(f"objective.edm.p_std must be > 0, got {self.p_std}")


class EDMLoss(Objective):
    """Per-sample EDM loss (B,) of an EDM-parametrised model (see the module docstring)."""

    name = "edm"
    parametrisations = ("edm",)

    def __init__(self, config: EDMLossConfig | None = None) -> None:
        self.config = config if config is not None else EDMLossConfig()

    def __call__(
        self,
        module: nn.Module,
        x1_BZPR: torch.Tensor,
        cond: ConditionTensors,
        generator: torch.Generator,
        ctx: LossContext | None = None,
    ) -> torch.Tensor:
        model = unwrap_shower_model(module)
        check_objective_inputs(model, self, x1_BZPR, cond)
        options = self.config
        b = x1_BZPR.shape[0]
        rnd_normal_B = torch.randn(b, generator=generator, device=generator.device)
        noise_BZPR = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device)
        sigma_B = (rnd_normal_B * options.p_std + options.p_mean).exp().to(x1_BZPR.device)
        noise_BZPR = noise_BZPR.to(device=x1_BZPR.device, dtype=x1_BZPR.dtype)
        weight_B = model.denoiser.loss_weight(sigma_B)
        denoised_BZPR = module(x1_BZPR + noise_BZPR * sigma_B[:, None, None, None], sigma_B, cond)
        return weight_B * (denoised_BZPR.float() - x1_BZPR.float()).pow(2).mean(dim=(1, 2, 3))


__all__ = ["EDMLoss", "EDMLossConfig"]
