"""Fitting bespoke non-stationary solvers (BNS; Shaul et al. 2024; CaloDREAM) to a frozen model.

The solver family and its storage are ``caloforge.platform.samplers.bespoke``; here its coefficients are
learned: times t_1 … t_{n−1} (t_0, t_n fixed: the model's grid ends; monotone through a softmax over the n
increments, initialised from the model's own grid), a (n,) and the lower triangle of b, started from Euler on
the model's grid. The loss is the mean squared error of the n-step solve against a fine reference solve of
the same noise (e.g. Heun × 64), precomputed once for a fixed training set (CaloDREAM: Adam 1e-3, ≤ 5000
iterations); the network's weights never change (the velocity is called with gradients only w.r.t. x).

``fit_bespoke`` works on any ``velocity(x, t, cond)``: a ``ShowerModel`` (``fit_model_solver``) or a toy
ODE (the tests recover RK4's stability polynomial on a linear ODE).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from caloforge.platform.samplers import BespokeSolver, VelocityFn, bespoke_solve

log = logging.getLogger("caloforge.distill")

__all__ = ["BespokeFit", "BespokeParameters", "fit_bespoke", "polynomial_of_solver"]


class BespokeParameters(nn.Module):
    """The trainable coefficients of one n-step bespoke solver (see the module docstring)."""

    def __init__(self, init: BespokeSolver, learn_times: bool = True) -> None:
        super().__init__()
        t = torch.tensor(init.times, dtype=torch.float64)
        self.t_start, self.t_end = float(t[0]), float(t[-1])
        fractions = (t[1:] - t[:-1]) / (t[-1] - t[0])
        self.time_logits = nn.Parameter(fractions.log(), requires_grad=learn_times)
        self.a = nn.Parameter(torch.tensor(init.a, dtype=torch.float64))
        self.b = nn.Parameter(init.b_matrix())
        self.register_buffer("mask", torch.tril(torch.ones_like(self.b)), persistent=False)
        self.num_steps = init.num_steps

    def times(self) -> torch.Tensor:
        """(n + 1,) float64: t_0, the learned interior times, t_n (exactly the ends)."""
        fractions = torch.softmax(self.time_logits, dim=0)
        inner = self.t_start + (self.t_end - self.t_start) * torch.cumsum(fractions, dim=0)[:-1]
        ends = torch.tensor([self.t_start, self.t_end], dtype=inner.dtype, device=inner.device)
        return torch.cat([ends[:1], inner, ends[1:]])

    def solve(self, velocity: VelocityFn, x0_BZPR: torch.Tensor, cond: Any) -> torch.Tensor:
        dtype = x0_BZPR.dtype
        b = (self.b * self.mask).to(dtype)
        return bespoke_solve(velocity, x0_BZPR, self.times(), self.a.to(dtype), b, cond)

    def to_solver(self, fitted_against: str = "", rmse: float | None = None) -> BespokeSolver:
        with torch.no_grad():
            times = self.times().tolist()
            b = (self.b * self.mask).tolist()
        return BespokeSolver(
            num_steps=self.num_steps,
            times=tuple(times),
            a=tuple(self.a.detach().tolist()),
            b=tuple(tuple(b[i][: i + 1]) for i in range(self.num_steps)),
            fitted_against=fitted_against,
            rmse=rmse,
        )


@dataclass(frozen=True)
class BespokeFit:
    """A fitted solver and its training record: RMSE of the initial (Euler) and final solver on the
    training pairs (and on held-out pairs, when given)."""

    solver: BespokeSolver
    rmse_init: float
    rmse_final: float
    heldout_rmse_init: float | None
    heldout_rmse_final: float | None
    iterations: int


def _rmse(params: BespokeParameters, velocity: VelocityFn, pairs: Sequence[tuple[Any, ...]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x0, ref, cond in pairs:
            err = params.solve(velocity, x0, cond) - ref
            total += float(err.double().pow(2).sum())
            count += err.numel()
    return math.sqrt(total / max(count, 1))


def fit_bespoke(
    velocity: VelocityFn,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor, Any]],
    init: BespokeSolver,
    *,
    iterations: int,
    lr: float = 1e-3,
    learn_times: bool = True,
    heldout: Sequence[tuple[torch.Tensor, torch.Tensor, Any]] = (),
    fitted_against: str = "",
    progress: Callable[[int, float], None] | None = None,
) -> BespokeFit:
    """Fit the coefficients of a ``init.num_steps``-step solver so that it maps each pair's start ``x0``
    (the prior sample) to its reference end ``ref`` (the fine solve of the same ``x0`` and ``cond``).

    ``pairs`` are cycled through, one per iteration, for ``iterations`` Adam steps at ``lr``. The velocity's
    own parameters are not touched (only the solver's are given to the optimizer)."""
    if iterations < 0:
        raise ValueError(f"bns.iterations must be >= 0, got {iterations}")
    if not pairs:
        raise ValueError("fit_bespoke: no training pairs")
    params = BespokeParameters(init, learn_times=learn_times).to(pairs[0][0].device)
    rmse_init = _rmse(params, velocity, pairs)
    held_init = _rmse(params, velocity, heldout) if heldout else None
    opt = torch.optim.Adam([p for p in params.parameters() if p.requires_grad], lr=lr)
    for it in range(iterations):
        x0, ref, cond = pairs[it % len(pairs)]
        loss = (params.solve(velocity, x0, cond) - ref).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(it + 1, float(loss.detach()))
    rmse_final = _rmse(params, velocity, pairs)
    held_final = _rmse(params, velocity, heldout) if heldout else None
    log.info(
        "bespoke %d-step: rmse %.4g -> %.4g (train)%s",
        init.num_steps,
        rmse_init,
        rmse_final,
        f", {held_init:.4g} -> {held_final:.4g} (held out)" if heldout else "",
    )
    solver = params.to_solver(fitted_against, held_final if held_final is not None else rmse_final)
    return BespokeFit(solver, rmse_init, rmse_final, held_init, held_final, iterations)


def polynomial_of_solver(solver: BespokeSolver) -> list[float]:
    """For the linear autonomous ODE dx/dt = M x, the solver maps x_0 to P(M) x_0; P's coefficients
    c_0 … c_n (powers of M). RK4 over h is Σ_k (hM)^k / k!, k ≤ 4; Heun and midpoint 1 + hM + (hM)²/2."""
    n = solver.num_steps
    x0 = [1.0] + [0.0] * n
    us: list[list[float]] = []
    x = x0
    for i in range(n):
        us.append([0.0, *x[:-1]])  # u_i = M x_i: shift the powers by one
        x = [solver.a[i] * x0[k] + sum(solver.b[i][j] * us[j][k] for j in range(i + 1)) for k in range(n + 1)]
    return x
