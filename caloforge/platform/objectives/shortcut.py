"""Shortcut models as a distillation objective (Frans et al. 2025, "One Step Diffusion via Shortcut
Models", §3, Eq. 5–6), for the step-conditioned ``shortcut`` parametrisation
(``denoisers.ShortcutDenoiser``): one network u(x_t, t, d), the average velocity over a step of size d on
the flow-matching path (t = 0 noise, 1 data), so that x_{t+d} ≈ x_t + d u(x_t, t, d).

Per batch of B clean showers x_1 (in model space), noise x_0 ~ N(0, I), x_t = (1 − t) x_0 + t x_1:

- **flow rows** (the last B − ⌊f B⌉, f = ``bootstrap_fraction``): d = 0, t ~ U(0, 1), target v = x_1 − x_0
  (``velocity_target: data``, the default: training without a teacher, as the paper) or the teacher's
  velocity v_T(x_t, t) (``teacher``: distillation, a low-variance target; what ``caloforge distill
  --method shortcut`` uses, ``configs/distill/shortcut.yaml``);
- **bootstrap rows** (the first ⌊f B⌉): a level k ~ U{0, …, K} (``max_level`` K), d = 2^−k, t ~ U(0, 1 − d);
  the target is two half steps of the target network θ⁻ (without gradients):
  u₁ = u_θ⁻(x_t, t, q), x' = x_t + (d/2) u₁, u₂ = u_θ⁻(x', t + d/2, q), target (u₁ + u₂) / 2 with
  q = d/2, except at the finest level (k = K) where q = 0 (the instantaneous velocity);
- **anchor rows** (the next ⌊a B⌉ after them, a = ``anchor_fraction``, default 0; distillation only): d = 1,
  t = 0, x_t = x_0, and the target is the teacher's own solve of the whole path from that noise,
  (x̂_1 − x_0) with x̂_1 = the teacher's ``anchor_sampler`` × ``anchor_steps`` solution (``anchor_targets``,
  no gradients): the one-step map regresses the teacher's ODE map directly (knowledge distillation, Luhman
  & Luhman 2021) instead of only through the chain of self-consistency levels. Costs the teacher's NFE per
  anchor row; the draws do not change (measured in docs/distillation.md);
- loss = ‖u_θ(x_t, t, d) − sg(target)‖² (mean over voxels, per sample).

θ⁻ is the loop's target network (``LossContext.target``, an EMA of θ) when the job sets a target decay, else
the model itself under ``no_grad`` (the paper's choice). No JVP: a step costs one student forward and
backward plus, for the bootstrap rows, two target forwards and, for the flow rows, one teacher forward.
Draw order from ``generator``: x_0 (B·Z·P·R normals), t (B uniforms), k (B integers).

``shortcut_targets`` is the math on plain callables (a test checks it on a toy); ``ShortcutDistillation``
applies it to ``ShowerModel`` student, target and teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors
from caloforge.platform.denoisers import STEP_TEACHERS
from caloforge.platform.objectives.common import (
    LossContext,
    Objective,
    check_objective_inputs,
    unwrap_shower_model,
)
from caloforge.platform.samplers import BESPOKE, SAMPLERS

VELOCITY_TARGETS = ("data", "teacher")
StepFn = Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ShortcutConfig:
    """Options of the shortcut objective: ``bootstrap_fraction`` of the batch trains d > 0 by
    self-consistency (the paper: 1/4); ``max_level`` K: step sizes 1, ½, …, 2^−K (the paper: 7, i.e. 1/128);
    ``velocity_target``: the d = 0 target, ``data`` (x_1 − x_0, the paper) or ``teacher`` (distillation;
    needs ``LossContext.teacher``); ``anchor_fraction`` of the batch learns d = 1 from the teacher's
    ``anchor_sampler`` × ``anchor_steps`` solve (needs ``velocity_target: teacher``; 0: none)."""

    bootstrap_fraction: float = 0.25
    max_level: int = 7
    velocity_target: Literal["data", "teacher"] = "data"
    anchor_fraction: float = 0.0
    anchor_sampler: str = "midpoint"
    anchor_steps: int = 8

    def __post_init__(self) -> None:
        for name in ("bootstrap_fraction", "anchor_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"objective.shortcut.{name} must be in [0, 1], got {value}")
        if self.bootstrap_fraction + self.anchor_fraction > 1.0:
            raise ValueError(
                "objective.shortcut: bootstrap_fraction + anchor_fraction must be <= 1, got "
                f"{self.bootstrap_fraction} + {self.anchor_fraction}"
            )
        if self.anchor_fraction > 0 and self.velocity_target != "teacher":
            raise ValueError(
                "objective.shortcut.anchor_fraction > 0 needs velocity_target: teacher (the anchor is the "
                f"teacher's own solve), got {self.velocity_target!r}"
            )
        anchor_samplers = (*SAMPLERS, BESPOKE)  # the teacher's ODE solvers, or its own learned one
        if self.anchor_sampler not in anchor_samplers:
            raise ValueError(
                f"objective.shortcut.anchor_sampler must be one of {list(anchor_samplers)}, got "
                f"{self.anchor_sampler!r}"
            )
        if (
            isinstance(self.anchor_steps, bool)
            or not isinstance(self.anchor_steps, int)
            or self.anchor_steps < 1
        ):
            raise ValueError(
                f"objective.shortcut.anchor_steps must be an int >= 1, got {self.anchor_steps!r}"
            )
        if (
            isinstance(self.max_level, bool)
            or not isinstance(self.max_level, int)
            or not 0 <= self.max_level <= 16
        ):
            raise ValueError(
                f"objective.shortcut.max_level must be an int in [0, 16], got {self.max_level!r}"
            )
        if self.velocity_target not in VELOCITY_TARGETS:
            raise ValueError(
                f"objective.shortcut.velocity_target must be one of {VELOCITY_TARGETS}, got "
                f"{self.velocity_target!r}"
            )


def shortcut_targets(
    target: StepFn, x_BZPR: torch.Tensor, t_B: torch.Tensor, d_B: torch.Tensor, q_B: torch.Tensor, cond: Any
) -> torch.Tensor:
    """The self-consistency target (u₁ + u₂) / 2 of two half steps d/2 of ``target`` from (x, t), queried
    with step label ``q_B`` (d/2, or 0 at the finest level); no gradients; in ``x_BZPR``'s dtype."""
    half = 0.5 * d_B
    with torch.no_grad():
        u1 = target(x_BZPR, t_B, cond, q_B).to(x_BZPR.dtype)
        x_mid = x_BZPR + half[:, None, None, None].to(x_BZPR.dtype) * u1
        u2 = target(x_mid, t_B + half, cond, q_B).to(x_BZPR.dtype)
    return 0.5 * (u1 + u2)


def anchor_targets(
    teacher: Any, x0_BZPR: torch.Tensor, cond: Any, sampler: str, num_steps: int
) -> torch.Tensor:
    """The one-step target of an anchor row: the teacher's own ``sampler`` × ``num_steps`` solve of the
    whole path from the noise x_0 (t = 0 → 1) as an average velocity, (x̂_1 − x_0) / 1; no gradients;
    float32."""
    solve, grid = teacher.solver(sampler, num_steps)
    with torch.no_grad():
        x1 = solve(teacher.velocity, x0_BZPR, grid, cond)
    return (x1 - x0_BZPR).float()


class ShortcutDistillation(Objective):
    """The shortcut objective (see the module docstring) for ``shortcut``-parametrised models; needs
    ``ctx.teacher`` with ``velocity_target: teacher``; uses ``ctx.target`` as θ⁻ when there is one."""

    name = "shortcut"
    parametrisations = tuple(STEP_TEACHERS)

    def __init__(self, config: ShortcutConfig | None = None) -> None:
        self.config = config if config is not None else ShortcutConfig()

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
        opts = self.config
        teacher = None
        if opts.velocity_target == "teacher":
            teacher = unwrap_shower_model(
                ctx.require_teacher(f"objective {self.name} (velocity_target teacher)")
            )
            check_step_teacher(model, teacher)
        target = unwrap_shower_model(ctx.target) if ctx.target is not None else model
        b, dev, dtype = x1_BZPR.shape[0], x1_BZPR.device, x1_BZPR.dtype
        x0 = torch.randn(x1_BZPR.shape, generator=generator, device=generator.device).to(dev, dtype)
        u_B = torch.rand(b, generator=generator, device=generator.device).to(dev)
        k_B = torch.randint(0, opts.max_level + 1, (b,), generator=generator, device=generator.device).to(dev)
        n_boot = round(opts.bootstrap_fraction * b)
        n_anchor = min(round(opts.anchor_fraction * b), b - n_boot)
        rows = torch.arange(b, device=dev)
        boot = rows < n_boot
        anchor = (rows >= n_boot) & (rows < n_boot + n_anchor)
        d_B = torch.where(boot, torch.exp2(-k_B.float()), torch.zeros_like(u_B))
        d_B = torch.where(anchor, torch.ones_like(d_B), d_B)  # t = 0 below: the whole path in one step
        t_B = u_B * (1.0 - d_B)
        t_b = t_B[:, None, None, None].to(dtype)
        x_t = (1.0 - t_b) * x0 + t_b * x1_BZPR
        wanted = torch.empty(x1_BZPR.shape, device=dev, dtype=torch.float32)
        flow = ~(boot | anchor)
        if bool(flow.any()):
            if teacher is not None:
                with torch.no_grad():
                    wanted[flow] = teacher.velocity(x_t[flow], t_B[flow], cond.index(flow)).float()
            else:
                wanted[flow] = (x1_BZPR[flow] - x0[flow]).float()
        if n_boot:
            q_B = torch.where(k_B[boot] < opts.max_level, 0.5 * d_B[boot], torch.zeros_like(d_B[boot]))
            wanted[boot] = shortcut_targets(
                target.velocity, x_t[boot], t_B[boot], d_B[boot], q_B, cond.index(boot)
            )
        if n_anchor:
            assert teacher is not None  # ShortcutConfig: anchors need velocity_target teacher
            wanted[anchor] = anchor_targets(
                teacher, x_t[anchor], cond.index(anchor), opts.anchor_sampler, opts.anchor_steps
            )
        out = module(x_t, t_B, cond, d_B).float()
        loss_B = (out - wanted).pow(2).flatten(1).mean(dim=1)
        # The groups' sizes follow from the options and the batch size alone: the same terms every call.
        groups = (
            ("flow", flow, b - n_boot - n_anchor),
            ("bootstrap", boot, n_boot),
            ("anchor", anchor, n_anchor),
        )
        for name, rows_B, count in groups:
            if count:
                ctx.record(name, loss_B[rows_B])
        return loss_B


def check_step_teacher(student: Any, teacher: Any) -> None:
    """ValueError unless ``teacher`` (a ShowerModel) can teach the step-conditioned ``student``: a
    parametrisation in ``STEP_TEACHERS`` (same time convention), the same mesh and detector vocabulary."""
    param, t_param = student.config.parametrisation, teacher.config.parametrisation
    allowed = STEP_TEACHERS.get(param, ())
    if t_param not in allowed:
        raise ValueError(
            f"shortcut: a {param!r} student distils a teacher parametrised {list(allowed)}, got {t_param!r}"
        )
    if teacher.mesh_shape != student.mesh_shape:
        raise ValueError(f"shortcut: teacher mesh {teacher.mesh_shape} != {student.mesh_shape}")
    if tuple(teacher.vocab.detectors) != tuple(student.vocab.detectors):
        raise ValueError(
            f"shortcut: teacher detectors {list(teacher.vocab.detectors)} != student's "
            f"{list(student.vocab.detectors)}"
        )


__all__ = [
    "VELOCITY_TARGETS",
    "ShortcutConfig",
    "ShortcutDistillation",
    "check_step_teacher",
    "shortcut_targets",
]
