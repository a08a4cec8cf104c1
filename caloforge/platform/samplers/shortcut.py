"""Few-step sampling of a step-conditioned flow model (shortcut models, Frans et al. 2025, "One Step
Diffusion via Shortcut Models", §3; ``denoisers.ShortcutDenoiser``), driven through
``velocity(x, t, cond, step)`` — the model's average velocity u(x, t, d) over a step of size d:

    x ← prior(z);  for i < n:  x ← x + h_i u(x, t_i, h_i),  h_i = t_{i+1} − t_i

on the flow-matching grid t_i = i/n (1 evaluation per step). With d = 0 the network is the instantaneous
velocity, so a step-conditioned network that ignores its step input (a flow-matching teacher's weights with
the zero-initialised step embedding) sampled this way *is* the teacher's Euler solver. The step size enters
as a (B,) tensor of the same dtype as the time; the loop is over a fixed Python grid, so it traces for ONNX.

Shape legend: B batch, Z layers, P angular bins, R radial bins.
"""

from __future__ import annotations

from typing import Any

import torch

from caloforge.platform.samplers.ode import Sampler, VelocityFn, _time

SHORTCUT = "shortcut"


class Shortcut(Sampler):
    """x + h u(x, t, h) per step (see the module docstring); ``velocity`` must take the step size as its
    fourth argument (``ShowerModel.velocity`` of a step-conditioned model)."""

    name, order, evals_per_step = SHORTCUT, 0, 1

    def step(
        self,
        velocity: VelocityFn,
        x_BZPR: torch.Tensor,
        t_cur: float,
        t_next: float,
        cond: Any,
        singular_end: bool = False,
    ) -> torch.Tensor:
        h = t_next - t_cur
        u = velocity(x_BZPR, _time(t_cur, x_BZPR), cond, _time(h, x_BZPR))  # type: ignore[call-arg]
        return x_BZPR + h * u


__all__ = ["SHORTCUT", "Shortcut"]
