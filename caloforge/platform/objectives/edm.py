"""EDM denoising score matching (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Eq. 8 and Table 1 "Training").

ln σ ~ N(P_mean, P_std²); n ~ N(0, σ² I); loss λ(σ) ‖D_θ(x_1 + n; σ, c) − x_1‖² (mean over voxels, per
sample) with λ(σ) = (σ² + σ_data²) / (σ σ_data)². D_θ is the preconditioned denoiser that the ShowerModel's
``forward`` returns for an EDM model (``caloforge.platform.denoisers.EDMDenoiser``). CaloDiT-2 defaults:
σ_data = 0.5, P_mean = −1.2, P_std = 1.2; sampling σ_min = 0.002, σ_max = 80, ρ = 7.

Draw order from ``generator``: B normals for ln σ, then B·Z·P·R normals for n (EDM's EDMLoss order).
Draws happen on the generator's device and move to the data's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors
from caloforge.platform.objectives.common import check_objective_inputs, unwrap_shower_model


@dataclass(frozen=True)
class EDMConfig:
    """EDM hyper-parameters: preconditioning (σ_data), training noise distribution (P_mean, P_std) and the
    sampling grid (σ_min, σ_max, ρ)."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"edm.sigma_data must be > 0, got {self.sigma_data}")
        if not self.p_std > 0:
            raise ValueError(f"edm.p_std must be > 0, got {self.p_std}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"edm: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not self.rho > 0:
            raise ValueError(f"edm.rho must be > 0, got {self.rho}")


def edm_loss(
    module: nn.Module, x1_BZPR: torch.Tensor, cond: ConditionTensors, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample EDM loss (B,). ``module`` is the (possibly DDP/DeepSpeed/peft-wrapped) ShowerModel."""
    model = unwrap_shower_model(module)
    check_objective_inputs(model, "edm", x1_BZPR, cond)
    options: EDMConfig = model.config.edm
    b = x1_BZPR.shape[0]
    rnd_normal_B = torch.randn(b, generator=generator, device=generator.device)
    noise_BZPR = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device)
    sigma_B = (rnd_normal_B * options.p_std + options.p_mean).exp().to(x1_BZPR.device)
    noise_BZPR = noise_BZPR.to(device=x1_BZPR.device, dtype=x1_BZPR.dtype)
    weight_B = model.denoiser.loss_weight(sigma_B)
    denoised_BZPR = module(x1_BZPR + noise_BZPR * sigma_B[:, None, None, None], sigma_B, cond)
    return weight_B * (denoised_BZPR.float() - x1_BZPR.float()).pow(2).mean(dim=(1, 2, 3))


__all__ = ["EDMConfig", "edm_loss"]
