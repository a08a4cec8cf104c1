"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1), driven through
``velocity(x, t, cond)`` like every sampler.

For a consistency-parametrised model (``denoisers.ConsistencyDenoiser`` / ``ConsistencyFMDenoiser``) the
Euler jump from t to the grid end t_end is the consistency function: f(x, t) = x + (t_end − t) v(x, t)
(EDM time: x − σ (x − f)/σ = f; FM time: x + (1 − t) F = f). On a grid t_0 → … → t_{n−1} → t_end:

    x ← prior(z);  for i < n:  f ← x + (t_end − t_i) v(x, t_i)
                               x ← f + (t_{i+1} − t_end) / (t_0 − t_end) · (π_{i+1}(x_0) − f)   (i < n − 1)
    return f

i.e. the next point of the forward process at t_{i+1} from the estimate f and fresh prior noise (EDM:
f + σ_{i+1} z'; FM: t_{i+1} f + (1 − t_{i+1}) z'; with σ instead of √(σ² − σ_min²): the student's f is
the clean estimate, not a σ_min-noisy one). One step (n = 1) is f(prior(z), t_0) and equals the ``euler``
sampler's one step.

**Fresh noise from one noise input.** The exported graph takes one noise tensor per shower (the seed
convention, ``registry/onnx_graph.py``); step i ≥ 1 therefore re-noises with π_i(x_0): the prior sample's
voxels under a fixed pseudo-random permutation (``renoise_permutation``: seeded by (i, voxel count), the
same in PyTorch and ONNX, a constant Gather in the graph). A permutation of i.i.d. N(0, 1) voxels is i.i.d.
N(0, 1); it is not independent of x_0, but x_0 enters the estimate f only through the network. Evaluations:
n (``nfe``). The loop is over a fixed Python grid, so it traces for ONNX.

Shape legend: B batch, Z layers, P angular bins, R radial bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from caloforge.platform.samplers.ode import Sampler, VelocityFn, _time

RENOISE_SEED = 20_230_302  # Song et al. 2023's arXiv date; any fixed number would do


def renoise_permutation(step: int, n_voxels: int) -> torch.Tensor:
    """(n_voxels,) int64: the fixed voxel permutation π_step of multistep consistency sampling (drawn with
    numpy, so an exporter sees a constant, not a random op)."""
    rng = np.random.default_rng(RENOISE_SEED + 7919 * int(step) + int(n_voxels))
    return torch.from_numpy(rng.permutation(int(n_voxels)).astype(np.int64))


class Consistency(Sampler):
    """Multistep consistency sampling (see the module docstring); 1 evaluation per step."""

    name, order, evals_per_step = "consistency", 0, 1

    def step(
        self,
        velocity: VelocityFn,
        x_BZPR: torch.Tensor,
        t_cur: float,
        t_next: float,
        cond: Any,
        singular_end: bool = False,
    ) -> torch.Tensor:
        """One jump to ``t_next`` (treated as the grid end): f(x, t_cur)."""
        return x_BZPR + (t_next - t_cur) * velocity(x_BZPR, _time(t_cur, x_BZPR), cond)

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
        if len(grid) < 2:
            raise ValueError(f"t_grid needs at least 2 points, got {len(grid)}")
        t_start, t_end = grid[0], grid[-1]
        n = len(grid) - 1
        x = x_start_BZPR
        flat = x_start_BZPR.flatten(1)
        for i in range(n):
            f = self.step(velocity, x, grid[i], t_end, cond)
            if i == n - 1:
                return f
            perm = renoise_permutation(i + 1, flat.shape[1]).to(flat.device)
            fresh = flat.index_select(1, perm).view_as(x_start_BZPR)
            x = f + ((grid[i + 1] - t_end) / (t_start - t_end)) * (fresh - f)
        raise AssertionError("unreachable")

    def nfe(self, num_steps: int, final_singular: bool = False) -> int:
        return num_steps


__all__ = ["RENOISE_SEED", "Consistency", "renoise_permutation"]
