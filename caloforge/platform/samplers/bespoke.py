"""Bespoke non-stationary solvers (BNS; Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast
Sampling of Diffusion and Flow Models"; CaloDREAM's few-step samplers): an n-step solver whose every
coefficient is learned for one frozen model, driven through ``velocity(x, t, cond)`` like every sampler.

    u_j = v(x_j, t_j)                                    (j = 0 … n − 1: n evaluations)
    x_{i+1} = a_i x_0 + Σ_{j ≤ i} b_ij u_j                (i = 0 … n − 1)

with times t_0 … t_n (t_0, t_n the denoiser's grid ends; t_n is never evaluated, so EDM's σ = 0 end is
fine), a (n,) and the lower triangle b (n(n+1)/2): n(n+5)/2 + 1 numbers, CaloDREAM's count. Euler on a
grid t is the member a_i = 1, b_ij = t_{j+1} − t_j (``BespokeSolver.euler``), the usual start of training
(``caloforge.distill.bns``). The network is not touched, so a solver fits base, adapted and LoRA models.

A learned solver is stored in the model's config (``ShowerModelConfig.bespoke``: one ``BespokeSolver`` per
step count, plain JSON numbers in the bundle's config.json) and selected with ``sampler="bespoke"`` and its
``num_steps`` (``ShowerModel.solver``), so ``generate``, the evaluation and the ONNX export use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from caloforge.platform.samplers.ode import Sampler, VelocityFn

BESPOKE = "bespoke"


@dataclass(frozen=True)
class BespokeSolver:
    """The coefficients of one learned ``num_steps``-step solver (see the module docstring).

    ``times``: t_0 … t_n (n + 1); ``a``: (n,); ``b``: row i holds b_i0 … b_ii (i + 1 numbers);
    ``fitted_against``: the reference it was fit to (free text, e.g. ``heun x 64``); ``rmse``: its final
    root-mean-square error against that reference in model space (``None``: not recorded)."""

    num_steps: int
    times: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[tuple[float, ...], ...]
    fitted_against: str = ""
    rmse: float | None = None

    def __post_init__(self) -> None:
        n = self.num_steps
        where = f"bespoke[num_steps={n}]"
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"bespoke.num_steps must be an int >= 1, got {n!r}")
        if len(self.times) != n + 1 or len(self.a) != n or len(self.b) != n:
            raise ValueError(
                f"{where}: need {n + 1} times, {n} a and {n} b rows, got {len(self.times)}, {len(self.a)}, "
                f"{len(self.b)}"
            )
        for i, row in enumerate(self.b):
            if len(row) != i + 1:
                raise ValueError(f"{where}: b[{i}] must have {i + 1} entries, got {len(row)}")
        values = [*self.times, *self.a, *(v for row in self.b for v in row)]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(f"{where}: every coefficient must be a finite number")
        steps = [t1 - t0 for t0, t1 in zip(self.times, self.times[1:], strict=False)]
        if not (all(h > 0 for h in steps) or all(h < 0 for h in steps)):
            raise ValueError(f"{where}: times must be strictly monotone, got {list(self.times)}")
        if self.rmse is not None and not (math.isfinite(self.rmse) and self.rmse >= 0):
            raise ValueError(f"{where}: rmse must be a finite number >= 0, got {self.rmse}")
        object.__setattr__(self, "times", tuple(float(v) for v in self.times))
        object.__setattr__(self, "a", tuple(float(v) for v in self.a))
        object.__setattr__(self, "b", tuple(tuple(float(v) for v in row) for row in self.b))

    @classmethod
    def euler(cls, grid: Sequence[float] | torch.Tensor) -> BespokeSolver:
        """Euler on ``grid`` written as a bespoke solver (a = 1, b_ij = t_{j+1} − t_j)."""
        t = [float(v) for v in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
        n = len(t) - 1
        h = [t[j + 1] - t[j] for j in range(n)]
        return cls(n, tuple(t), (1.0,) * n, tuple(tuple(h[: i + 1]) for i in range(n)))

    @property
    def n_coefficients(self) -> int:
        return self.num_steps * (self.num_steps + 5) // 2 + 1

    def b_matrix(self) -> torch.Tensor:
        """float64 (n, n) lower-triangular b."""
        out = torch.zeros(self.num_steps, self.num_steps, dtype=torch.float64)
        for i, row in enumerate(self.b):
            out[i, : i + 1] = torch.tensor(row, dtype=torch.float64)
        return out


def bespoke_solve(
    velocity: VelocityFn,
    x0_BZPR: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    a: Sequence[float] | torch.Tensor,
    b: Sequence[Sequence[float]] | torch.Tensor,
    cond: Any,
) -> torch.Tensor:
    """x_n of the bespoke solver from x_0 = ``x0_BZPR`` (see the module docstring). Coefficients as
    Python numbers (sampling, ONNX constants) or tensors (training: gradients reach them)."""
    n = len(a)
    x = x0_BZPR
    batch = x0_BZPR.shape[0]
    dtype = x0_BZPR.dtype if x0_BZPR.dtype == torch.float64 else torch.float32
    us: list[torch.Tensor] = []
    for i in range(n):
        t = times[i]
        if isinstance(t, torch.Tensor):
            t_B = t.to(device=x0_BZPR.device, dtype=dtype).expand(batch)
        else:
            t_B = torch.full((batch,), float(t), dtype=dtype, device=x0_BZPR.device)
        us.append(velocity(x, t_B, cond))
        x = a[i] * x0_BZPR
        for j in range(i + 1):
            x = x + b[i][j] * us[j]
    return x


class Bespoke(Sampler):
    """The sampler of one ``BespokeSolver``; its grid is the solver's ``times`` (``ShowerModel.solver``)."""

    name, order, evals_per_step = BESPOKE, 0, 1

    def __init__(self, solver: BespokeSolver) -> None:
        self.solver = solver

    def __call__(
        self,
        velocity: VelocityFn,
        x_start_BZPR: torch.Tensor,
        t_grid: torch.Tensor | Sequence[float],
        cond: Any,
        *,
        final_singular: bool = False,
    ) -> torch.Tensor:
        grid = [float(t) for t in (t_grid.tolist() if isinstance(t_grid, torch.Tensor) else t_grid)]
        if len(grid) != self.solver.num_steps + 1:
            raise ValueError(
                f"bespoke sampler: the grid has {len(grid)} points, the solver {self.solver.num_steps} steps"
            )
        return bespoke_solve(velocity, x_start_BZPR, grid, self.solver.a, self.solver.b, cond)

    def nfe(self, num_steps: int, final_singular: bool = False) -> int:
        return num_steps


__all__ = ["BESPOKE", "Bespoke", "BespokeSolver", "bespoke_solve"]
