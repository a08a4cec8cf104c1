"""Explicit ODE samplers on a denoiser-supplied time grid, driven only through ``velocity(x, t, cond)``.

One set of samplers serves every denoiser (see ``caloforge.platform.denoisers`` for the time convention):
x starts at ``denoiser.prior(noise)`` = x(t_0) and is integrated along t_0 → t_N with h = t_{i+1} − t_i
(h < 0 for EDM's σ grid). ``cond`` is passed through untouched.

- ``euler``: x + h v(x, t) (1st order, 1 evaluation per step).
- ``midpoint``: explicit midpoint rule, x + h v(x + ½h v(x, t), t + ½h) (2nd order, 2 per step).
- ``heun``: Heun's 2nd-order method, x + ½h (v(x, t) + v(x + h v(x, t), t + h)). On the EDM grid this is
  exactly Karras et al. 2022, Algorithm 1 (deterministic, S_churn = 0).
- ``rk4``: classical 4th-order Runge–Kutta (4 per step).

When the grid ends at a point where ``velocity`` is singular (``final_singular``, EDM's σ = 0), the last
step is an Euler step for every sampler: x_N = x + (0 − σ) (x − D)/σ = D(x; σ_{N−1}), the denoised estimate,
as in EDM Algorithm 1 line 9 ("if t_{i+1} ≠ 0 then apply 2nd order correction"). Evaluations for N steps:
euler N, midpoint/heun 2N (2N − 1 with a singular end), rk4 4N (4N − 3).

The step loop runs over a fixed Python grid (no value-dependent control flow), so a whole sampling run —
or one ``step`` — can be traced for ONNX export.

Shape legend: B batch, Z layers, P angular bins, R radial bins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _time(t: float, x_BZPR: torch.Tensor) -> torch.Tensor:
    """(B,) time in x's floating dtype (float32 for model tensors; float64 keeps analytic tests exact)."""
    dtype = x_BZPR.dtype if x_BZPR.dtype == torch.float64 else torch.float32
    return torch.full((x_BZPR.shape[0],), float(t), dtype=dtype, device=x_BZPR.device)


class Sampler:
    """Base: subclasses define ``step``; ``__call__`` runs the grid."""

    name: str = ""
    order: int = 0
    evals_per_step: int = 0

    def step(
        self,
        velocity: VelocityFn,
        x_BZPR: torch.Tensor,
        t_cur: float,
        t_next: float,
        cond: Any,
        singular_end: bool = False,
    ) -> torch.Tensor:
        """One step t_cur → t_next. ``singular_end``: velocity is undefined at t_next (take Euler)."""
        raise NotImplementedError(f"{type(self).__name__} must define step")

    def __call__(
        self,
        velocity: VelocityFn,
        x_start_BZPR: torch.Tensor,
        t_grid: torch.Tensor | Sequence[float],
        cond: Any,
        *,
        final_singular: bool = False,
    ) -> torch.Tensor:
        """Integrate from x(t_grid[0]) = ``x_start_BZPR`` to t_grid[-1]."""
        grid = [float(t) for t in (t_grid.tolist() if isinstance(t_grid, torch.Tensor) else t_grid)]
        if len(grid) < 2:
            raise ValueError(f"t_grid needs at least 2 points, got {len(grid)}")
        x = x_start_BZPR
        last = len(grid) - 2
        for i in range(len(grid) - 1):
            x = self.step(velocity, x, grid[i], grid[i + 1], cond, singular_end=final_singular and i == last)
        return x

    def nfe(self, num_steps: int, final_singular: bool = False) -> int:
        """Number of velocity evaluations for ``num_steps`` steps."""
        return self.evals_per_step * num_steps - (self.evals_per_step - 1) * int(final_singular)


class Euler(Sampler):
    name, order, evals_per_step = "euler", 1, 1

    def step(
        self,
        velocity: VelocityFn,
        x_BZPR: torch.Tensor,
        t_cur: float,
        t_next: float,
        cond: Any,
        singular_end: bool = False,
    ) -> torch.Tensor:
        return x_BZPR + (t_next - t_cur) * velocity(x_BZPR, _time(t_cur, x_BZPR), cond)


class Midpoint(Sampler):
    name, order, evals_per_step = "midpoint", 2, 2

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
        k1 = velocity(x_BZPR, _time(t_cur, x_BZPR), cond)
        if singular_end:
            return x_BZPR + h * k1
        k2 = velocity(x_BZPR + 0.5 * h * k1, _time(t_cur + 0.5 * h, x_BZPR), cond)
        return x_BZPR + h * k2


class Heun(Sampler):
    name, order, evals_per_step = "heun", 2, 2

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
        d_cur = velocity(x_BZPR, _time(t_cur, x_BZPR), cond)
        x_euler = x_BZPR + h * d_cur
        if singular_end:
            return x_euler
        d_next = velocity(x_euler, _time(t_next, x_BZPR), cond)
        return x_BZPR + h * (0.5 * d_cur + 0.5 * d_next)


class RK4(Sampler):
    name, order, evals_per_step = "rk4", 4, 4

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
        k1 = velocity(x_BZPR, _time(t_cur, x_BZPR), cond)
        if singular_end:
            return x_BZPR + h * k1
        t_mid = _time(t_cur + 0.5 * h, x_BZPR)
        k2 = velocity(x_BZPR + 0.5 * h * k1, t_mid, cond)
        k3 = velocity(x_BZPR + 0.5 * h * k2, t_mid, cond)
        k4 = velocity(x_BZPR + h * k3, _time(t_next, x_BZPR), cond)
        return x_BZPR + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


__all__ = ["RK4", "Euler", "Heun", "Midpoint", "Sampler", "VelocityFn"]
