"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2, CD with λ = 1 and the L2
distance; as CaloDiT-2, CaloClouds II and the ATLAS note do it).

A frozen teacher's probability-flow ODE is discretised into N noise levels t_1 (the data end) … t_N (the
noise end) — the student's ``cd_levels(N)``: EDM's ρ grid σ_min … σ_max for ``consistency`` students of
``edm`` teachers, FM's uniform grid t = 1 … 0 for ``consistency_fm`` students of ``flow_matching``
teachers. Per sample:

    n ~ U{1, …, N − 1};  z ~ N(0, I);  x_{n+1} = noisy(x_1, z, t_{n+1})        (EDM: x_1 + σ z)
    x̂_n = one teacher solver step t_{n+1} → t_n from x_{n+1}                   (Heun, 2 teacher calls)
    loss = d(f_θ(x_{n+1}, t_{n+1}), f_θ⁻(x̂_n, t_n))

with the distance d (``distance``) either ``l2``: the mean squared difference over the voxels, or
``pseudo_huber`` (Song & Dhariwal 2023, "Improved techniques for training consistency models"):
√(m + c²) − c with m that mean squared difference and c = ``huber_c`` (iCT's c = 0.00054·√d for the
sum over d dimensions is 0.00054 on the mean) — quadratic in a shower's error when it is small, linear when
it is large, so the showers far off (a teacher step through a sharp part of the flow) weigh less than
under l2 (the distance is per shower: m is already the mean over its voxels).

f_θ is the student (the module being trained; a consistency parametrisation whose boundary condition
f(x, t_1) = x makes the n = 1 target the teacher's step itself), f_θ⁻ the target network (an EMA of θ
with decay μ, ``LossContext.target``: the job sets the Trainer's ``target_decay``, 0.95 in CaloDiT-2).
The teacher and target calls run without gradients. Draw order from ``generator``: n (B integers), then z
(B·Z·P·R normals).

``consistency_distillation_loss`` is the math on plain callables (a test checks it by hand and on a toy
2-D problem); ``ConsistencyDistillation`` applies it to ``ShowerModel`` student, target and teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors
from caloforge.platform.denoisers import CONSISTENCY_TEACHERS
from caloforge.platform.objectives.common import (
    LossContext,
    Objective,
    check_objective_inputs,
    unwrap_shower_model,
)

TEACHER_SOLVERS = ("heun", "euler")
DISTANCES = ("l2", "pseudo_huber")
FnXT = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class ConsistencyDistillationConfig:
    """Options of consistency distillation: ``num_scales`` N (noise levels; 32 in CaloDiT-2), the teacher's
    one-step ``teacher_solver`` (``heun``, or ``euler``), the ``distance`` (``l2`` as CaloDiT-2, or
    ``pseudo_huber`` with constant ``huber_c`` on the per-voxel mean; see the module docstring)."""

    num_scales: int = 32
    teacher_solver: Literal["heun", "euler"] = "heun"
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float = 0.00054

    def __post_init__(self) -> None:
        if isinstance(self.num_scales, bool) or self.num_scales < 2:
            raise ValueError(
                f"objective.consistency_distillation.num_scales must be >= 2, got {self.num_scales!r}"
            )
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(
                f"objective.consistency_distillation.teacher_solver must be one of {TEACHER_SOLVERS}, got "
                f"{self.teacher_solver!r}"
            )
        if self.distance not in DISTANCES:
            raise ValueError(
                f"objective.consistency_distillation.distance must be one of {DISTANCES}, got "
                f"{self.distance!r}"
            )
        if isinstance(self.huber_c, bool) or not (isinstance(self.huber_c, int | float) and self.huber_c > 0):
            raise ValueError(
                f"objective.consistency_distillation.huber_c must be a number > 0, got {self.huber_c!r}"
            )


def teacher_step(
    velocity: FnXT,
    x_BZPR: torch.Tensor,
    t_cur_B: torch.Tensor,
    t_next_B: torch.Tensor,
    cond: Any,
    solver: str,
) -> torch.Tensor:
    """One ``heun`` (or ``euler``) step per sample from ``t_cur_B`` to ``t_next_B`` of dx/dt = velocity."""
    h = (t_next_B - t_cur_B)[:, None, None, None].to(x_BZPR.dtype)
    d_cur = velocity(x_BZPR, t_cur_B, cond).to(x_BZPR.dtype)
    x_euler = x_BZPR + h * d_cur
    if solver == "euler":
        return x_euler
    d_next = velocity(x_euler, t_next_B, cond).to(x_BZPR.dtype)
    return x_BZPR + h * (0.5 * d_cur + 0.5 * d_next)


def consistency_distillation_loss(
    student: FnXT,
    target: FnXT,
    teacher_velocity: FnXT,
    noisy: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    levels_N: torch.Tensor,
    x1_BZPR: torch.Tensor,
    n_B: torch.Tensor,
    noise_BZPR: torch.Tensor,
    cond: Any,
    teacher_solver: str = "heun",
    distance: str = "l2",
    huber_c: float = 0.00054,
) -> torch.Tensor:
    """Per-sample loss (B,) d(f_θ(x_{n+1}, t_{n+1}), f_θ⁻(x̂_n, t_n)) for 0-based level indices
    ``n_B`` ∈ [0, N − 2] of ``levels_N`` (boundary first): ``l2`` the mean squared difference over the
    non-batch dims m, ``pseudo_huber`` √(m + c²) − c (see the module docstring)."""
    if distance not in DISTANCES:
        raise ValueError(
            f"consistency_distillation_loss: distance must be one of {DISTANCES}, got {distance!r}"
        )
    levels = levels_N.to(device=x1_BZPR.device, dtype=torch.float32)
    t_hi_B, t_lo_B = levels[n_B + 1], levels[n_B]
    x_hi = noisy(x1_BZPR, noise_BZPR, t_hi_B)
    with torch.no_grad():
        x_lo = teacher_step(teacher_velocity, x_hi, t_hi_B, t_lo_B, cond, teacher_solver)
        wanted = target(x_lo, t_lo_B, cond).float()
    out = student(x_hi, t_hi_B, cond).float()
    mse_B = (out - wanted).pow(2).flatten(1).mean(dim=1)
    if distance == "pseudo_huber":
        return torch.sqrt(mse_B + huber_c**2) - huber_c
    return mse_B


class ConsistencyDistillation(Objective):
    """Consistency distillation of ``ctx.teacher`` into a consistency-parametrised student (see the module
    docstring); needs ``ctx.teacher`` and ``ctx.target``."""

    name = "consistency_distillation"
    parametrisations = tuple(CONSISTENCY_TEACHERS)

    def __init__(self, config: ConsistencyDistillationConfig | None = None) -> None:
        self.config = config if config is not None else ConsistencyDistillationConfig()

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
        ctx = ctx if ctx is not None else LossContext()
        teacher = unwrap_shower_model(ctx.require_teacher(self.name))
        target = unwrap_shower_model(ctx.require_target(self.name))
        check_teacher(model, teacher)
        levels = model.denoiser.cd_levels(self.config.num_scales)
        b = x1_BZPR.shape[0]
        n_B = torch.randint(0, self.config.num_scales - 1, (b,), generator=generator, device=generator.device)
        noise = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device)
        return consistency_distillation_loss(
            student=module,
            target=target,
            teacher_velocity=teacher.velocity,
            noisy=model.denoiser.noisy,
            levels_N=levels,
            x1_BZPR=x1_BZPR,
            n_B=n_B.to(x1_BZPR.device),
            noise_BZPR=noise.to(device=x1_BZPR.device, dtype=x1_BZPR.dtype),
            cond=cond,
            teacher_solver=self.config.teacher_solver,
            distance=self.config.distance,
            huber_c=float(self.config.huber_c),
        )


def check_teacher(student: Any, teacher: Any) -> None:
    """ValueError unless ``teacher`` (a ShowerModel) can teach ``student``: a parametrisation with the
    student's time convention, the same mesh and detector vocabulary."""
    param, t_param = student.config.parametrisation, teacher.config.parametrisation
    allowed = CONSISTENCY_TEACHERS.get(param, ())
    if t_param not in allowed:
        raise ValueError(
            f"consistency distillation: a {param!r} student distils a teacher parametrised {list(allowed)}, "
            f"got {t_param!r}"
        )
    if teacher.mesh_shape != student.mesh_shape:
        raise ValueError(
            f"consistency distillation: teacher mesh {teacher.mesh_shape} != {student.mesh_shape}"
        )
    if tuple(teacher.vocab.detectors) != tuple(student.vocab.detectors):
        raise ValueError(
            f"consistency distillation: teacher detectors {list(teacher.vocab.detectors)} != student's "
            f"{list(student.vocab.detectors)}"
        )


__all__ = [
    "TEACHER_SOLVERS",
    "ConsistencyDistillation",
    "ConsistencyDistillationConfig",
    "check_teacher",
    "consistency_distillation_loss",
    "teacher_step",
]
