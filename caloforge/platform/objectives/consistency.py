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

``feature_weight`` w > 0 adds w · d_feat(f_θ, f_θ⁻), the distance of the two showers' per-layer centres,
widths and soft occupancies (``shower_features.feature_distance``, with a soft readout threshold of width
``feature_tau`` in ln E): the shower analogue of the perceptual distance (LPIPS) with which Song et al.
trained their best one-step consistency models. An L2 distance in ln-energy space lets a one-step map
settle, where it is unsure whether a voxel is hit, below the threshold (too few hits, too narrow and too
regular showers); the feature term weighs what the high-level classifier reads.

``moment_weight`` w_m > 0 adds w_m · ``moment_distance`` of the student's *one-step samples*
f_θ(prior(z'), t_N) for the batch's own conditions from the batch's data x_1: the per-layer means and
standard deviations over the batch of the same features. The consistency loss can only carry the
teacher's showers as far up the noise levels as the student can follow them (its target is itself one
level down); this term compares what the one-step sampler makes with the data directly, so a bias that the
chain of targets keeps (too narrow, too few hits) has a gradient against it. One more student call per
batch. Both weights 0 (the default) is CaloDiT-2's recipe.

f_θ is the student (the module being trained; a consistency parametrisation whose boundary condition
f(x, t_1) = x makes the n = 1 target the teacher's step itself), f_θ⁻ the target network (an EMA of θ
with decay μ, ``LossContext.target``: the job sets the Trainer's ``target_decay``, 0.95 in CaloDiT-2).
The teacher and target calls run without gradients. Draw order from ``generator``: n (B integers), then z
(B·Z·P·R normals), then, with ``moment_weight`` > 0, z' (B·Z·P·R normals).

``consistency_distillation_loss`` is the math on plain callables (a test checks it by hand and on a toy
2-D problem); ``ConsistencyDistillation`` applies it to ``ShowerModel`` student, target and teacher.
"""

from __future__ import annotations

import math
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
from caloforge.platform.objectives.shower_features import (
    LayerFeatures,
    SoftLayerFeatures,
    feature_distance,
    moment_distance,
)

TEACHER_SOLVERS = ("heun", "euler")
DISTANCES = ("l2", "pseudo_huber")
FnXT = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class ConsistencyDistillationConfig:
    """Options of consistency distillation: ``num_scales`` N (noise levels; 32 in CaloDiT-2), the teacher's
    one-step ``teacher_solver`` (``heun``, or ``euler``), the ``distance`` (``l2`` as CaloDiT-2, or
    ``pseudo_huber`` with constant ``huber_c`` on the per-voxel mean), and ``feature_weight`` of the
    per-layer feature distance added to it (0: none; soft threshold width ``feature_tau``), and
    ``moment_weight`` of the one-step samples' feature moments against the data (0: none); see the module
    docstring."""

    num_scales: int = 32
    teacher_solver: Literal["heun", "euler"] = "heun"
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float = 0.00054
    feature_weight: float = 0.0
    feature_tau: float = 1.0
    moment_weight: float = 0.0

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
        for key in ("feature_weight", "moment_weight"):
            w = getattr(self, key)
            if isinstance(w, bool) or not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise ValueError(
                    f"objective.consistency_distillation.{key} must be a finite number >= 0, got {w!r}"
                )
        tau = self.feature_tau
        if isinstance(tau, bool) or not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
            raise ValueError(
                f"objective.consistency_distillation.feature_tau must be a finite number > 0, got {tau!r}"
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
    features: Callable[[torch.Tensor], LayerFeatures] | None = None,
    feature_weight: float = 0.0,
    ctx: LossContext | None = None,
) -> torch.Tensor:
    """Per-sample loss (B,) d(f_θ(x_{n+1}, t_{n+1}), f_θ⁻(x̂_n, t_n)) for 0-based level indices
    ``n_B`` ∈ [0, N − 2] of ``levels_N`` (boundary first): ``l2`` the mean squared difference over the
    non-batch dims m, ``pseudo_huber`` √(m + c²) − c; plus ``feature_weight`` × ``feature_distance`` of
    ``features`` of the two (required when the weight is > 0; see the module docstring). With ``ctx`` the
    parts are recorded: ``consistency`` (d) and, with the feature term, ``features`` (unweighted)."""
    if feature_weight > 0 and features is None:
        raise ValueError("consistency_distillation_loss: feature_weight > 0 needs the features callable")
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
    loss_B = torch.sqrt(mse_B + huber_c**2) - huber_c if distance == "pseudo_huber" else mse_B
    if ctx is not None:
        ctx.record("consistency", loss_B)
    if feature_weight > 0:
        assert features is not None  # checked above
        with torch.no_grad():
            wanted_features = features(wanted)
        feature_B = feature_distance(features(out), wanted_features)
        if ctx is not None:
            ctx.record("features", feature_B)
        loss_B = loss_B + feature_weight * feature_B
    return loss_B


class ConsistencyDistillation(Objective):
    """Consistency distillation of ``ctx.teacher`` into a consistency-parametrised student (see the module
    docstring); needs ``ctx.teacher`` and ``ctx.target``."""

    name = "consistency_distillation"
    parametrisations = tuple(CONSISTENCY_TEACHERS)

    def __init__(self, config: ConsistencyDistillationConfig | None = None) -> None:
        self.config = config if config is not None else ConsistencyDistillationConfig()
        self._features: SoftLayerFeatures | None = None  # built once per student (transform and mesh)

    def features(self, model: Any) -> SoftLayerFeatures:
        """The soft per-layer features of ``model``'s showers (``feature_tau``), built on first use."""
        cached = self._features
        if cached is None or cached.transform is not model.transform or cached.mesh != model.mesh:
            cached = self._features = SoftLayerFeatures(model.transform, model.mesh, self.config.feature_tau)
        return cached

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
        weight, moment_weight = float(self.config.feature_weight), float(self.config.moment_weight)
        features = self.features(model) if weight or moment_weight else None
        b = x1_BZPR.shape[0]
        n_B = torch.randint(0, self.config.num_scales - 1, (b,), generator=generator, device=generator.device)
        noise = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device)
        loss_B = consistency_distillation_loss(
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
            features=features,
            feature_weight=weight,
            ctx=ctx,
        )
        if moment_weight > 0:
            assert features is not None
            prior_noise = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device)
            moments = one_step_moment_loss(
                student=module,
                prior=model.denoiser.prior,
                t_start=float(model.denoiser.time_grid(1)[0]),
                noise_BZPR=prior_noise.to(device=x1_BZPR.device, dtype=x1_BZPR.dtype),
                x1_BZPR=x1_BZPR,
                cond=cond,
                features=features,
            )
            ctx.record("moments", moments)
            loss_B = loss_B + moment_weight * moments
        return loss_B


def one_step_moment_loss(
    student: FnXT,
    prior: Callable[[torch.Tensor], torch.Tensor],
    t_start: float,
    noise_BZPR: torch.Tensor,
    x1_BZPR: torch.Tensor,
    cond: Any,
    features: Callable[[torch.Tensor], LayerFeatures],
) -> torch.Tensor:
    """``moment_distance`` (a scalar) of the one-step samples f(prior(noise), t_start) for ``cond`` from the
    batch ``x1_BZPR`` with the same conditions (see the module docstring)."""
    t_B = torch.full((x1_BZPR.shape[0],), t_start, device=x1_BZPR.device, dtype=torch.float32)
    samples = student(prior(noise_BZPR), t_B, cond).float()
    with torch.no_grad():
        data_features = features(x1_BZPR)
    return moment_distance(features(samples), data_features)


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
    "one_step_moment_loss",
    "teacher_step",
]
