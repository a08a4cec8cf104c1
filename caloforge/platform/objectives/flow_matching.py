"""Conditional flow matching on the linear path, optionally with minibatch OT coupling.

Lipman et al. 2023 ("Flow Matching for Generative Modeling", Eq. 22–23 with σ_min = 0), as CaloDREAM
(Favaro et al. 2025): x_0 ~ N(0, I) noise, x_1 data (in model space), t ~ U(0, 1) (``time_sampling:
uniform``) or logit-normal, t = sigmoid(m + s·n) with n ~ N(0, 1) (``logit_normal``, Esser et al. 2024, SD3:
more weight on the middle of the path), x_t = (1 − t) x_0 + t x_1, loss ‖v_θ(x_t, t, c) − (x_1 − x_0)‖² (mean
over voxels, per sample).
With ``coupling = "ot"`` the noise is first re-ordered by the minibatch OT plan within condition groups
(Tong et al. 2023, OT-CFM; see ``coupling.py`` for the grouping).

Draw order from ``generator`` (fixed, for reproducibility): x_0 (B·Z·P·R normals), then t (B uniforms or,
logit-normal, B normals).
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
from caloforge.platform.objectives.coupling import condition_groups, ot_couple

COUPLINGS = ("independent", "ot")
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Options of the flow-matching objective."""

    coupling: str = "independent"  # "independent" | "ot" (minibatch OT within condition groups)
    ot_energy_bins_per_decade: int = 4
    ot_theta_bins: int = 0  # 0: θ is not part of the OT group key
    time_sampling: str = "uniform"  # "uniform" | "logit_normal" (t = sigmoid(logit_mean + logit_std · n))
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"objective.flow_matching.time_sampling must be one of {TIME_SAMPLINGS}, "
                f"got {self.time_sampling!r}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"objective.flow_matching.logit_std must be > 0, got {self.logit_std}")
        if self.coupling not in COUPLINGS:
            raise ValueError(
                f"objective.flow_matching.coupling must be one of {COUPLINGS}, got {self.coupling!r}"
            )
        if self.ot_energy_bins_per_decade < 1:
            raise ValueError(
                "objective.flow_matching.ot_energy_bins_per_decade must be >= 1, got "
                f"{self.ot_energy_bins_per_decade}"
            )
        if self.ot_theta_bins < 0:
            raise ValueError(f"objective.flow_matching.ot_theta_bins must be >= 0, got {self.ot_theta_bins}")


class FlowMatchingLoss(Objective):
    """Per-sample CFM loss (B,) of a velocity-parametrised model (see the module docstring)."""

    name = "flow_matching"
    parametrisations = ("flow_matching",)

    def __init__(self, config: FlowMatchingConfig | None = None) -> None:
        self.config = config if config is not None else FlowMatchingConfig()

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
        x0_BZPR = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device)
        t_B = sample_time(b, generator, options)
        x0_BZPR = x0_BZPR.to(device=x1_BZPR.device, dtype=x1_BZPR.dtype)
        t_B = t_B.to(x1_BZPR.device)
        if options.coupling == "ot":
            groups = condition_groups(cond, options.ot_energy_bins_per_decade, options.ot_theta_bins)
            x0_BZPR = ot_couple(x0_BZPR, x1_BZPR, groups)
        t_b = t_B[:, None, None, None].to(x1_BZPR.dtype)
        x_t_BZPR = (1.0 - t_b) * x0_BZPR + t_b * x1_BZPR
        v_BZPR = module(x_t_BZPR, t_B, cond)
        target_BZPR = x1_BZPR - x0_BZPR
        return (v_BZPR.float() - target_BZPR.float()).pow(2).mean(dim=(1, 2, 3))


def sample_time(b: int, generator: torch.Generator, options: FlowMatchingConfig) -> torch.Tensor:
    """(B,) flow times in (0, 1) on the generator's device: uniform, or logit-normal (``options``)."""
    if options.time_sampling == "logit_normal":
        n_B = torch.randn(b, generator=generator, device=generator.device)
        return torch.sigmoid(options.logit_mean + options.logit_std * n_B)
    return torch.rand(b, generator=generator, device=generator.device)


__all__ = ["COUPLINGS", "TIME_SAMPLINGS", "FlowMatchingConfig", "FlowMatchingLoss", "sample_time"]
