"""Precision, recall, density and coverage (Naeem et al. 2020, arXiv:2002.09797, eqs. 1–4).

With real samples X_i (i = 1..N), fake samples Y_j (j = 1..M), ``NND_k(·)`` the distance to the k-th
nearest neighbour within the same set (the point itself excluded) and ``B(c, r)`` the closed ball:

- precision ``= (1/M) Σ_j 1[∃ i: Y_j ∈ B(X_i, NND_k(X_i))]`` (fakes inside the real manifold);
- recall    ``= (1/N) Σ_i 1[∃ j: X_i ∈ B(Y_j, NND_k(Y_j))]`` (reals inside the fake manifold);
- density   ``= 1/(k M) Σ_j Σ_i 1[Y_j ∈ B(X_i, NND_k(X_i))]`` (can exceed 1);
- coverage  ``= (1/N) Σ_i 1[∃ j: Y_j ∈ B(X_i, NND_k(X_i))]``.

Distances are Euclidean on the HLF vectors standardised with the reference statistics, computed with
``torch.cdist`` (float32) in row chunks so memory stays O(chunk × N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PRDCResult:
    precision: float
    recall: float
    density: float
    coverage: float


def _kth_nn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row of x."""
    out = []
    for lo in range(0, len(x), chunk):
        d = torch.cdist(x[lo : lo + chunk], x)
        # the k+1 smallest include the point itself at distance 0
        out.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, chunk: int = 1024) -> PRDCResult:
    """PRDC of ``fake`` against ``real`` (module docstring); inputs (N, D) and (M, D), already scaled."""
    xr = torch.as_tensor(np.asarray(real, dtype=np.float32))
    xf = torch.as_tensor(np.asarray(fake, dtype=np.float32))
    if xr.ndim != 2 or xf.ndim != 2 or xr.shape[1] != xf.shape[1]:
        raise ValueError(
            f"prdc: expected (N, D) and (M, D) arrays, got {tuple(xr.shape)} and {tuple(xf.shape)}"
        )
    if k < 1 or len(xr) <= k or len(xf) <= k:
        raise ValueError(f"prdc: need more than k={k} samples in each set, got {len(xr)} and {len(xf)}")
    r_real = _kth_nn_radii(xr, k, chunk)  # (N,)
    r_fake = _kth_nn_radii(xf, k, chunk)  # (M,)

    inside_count = torch.zeros(len(xf), dtype=torch.float64)  # per fake: # real balls containing it
    real_covered = torch.zeros(len(xr), dtype=torch.bool)  # per real: some fake inside its ball
    real_in_fake = torch.zeros(len(xr), dtype=torch.bool)  # per real: inside some fake ball
    for lo in range(0, len(xr), chunk):
        d = torch.cdist(xr[lo : lo + chunk], xf)  # (c, M)
        in_real_ball = d <= r_real[lo : lo + chunk, None]
        inside_count += in_real_ball.sum(dim=0, dtype=torch.float64)
        real_covered[lo : lo + chunk] = in_real_ball.any(dim=1)
        real_in_fake[lo : lo + chunk] = (d <= r_fake[None, :]).any(dim=1)
    return PRDCResult(
        precision=float((inside_count > 0).double().mean()),
        recall=float(real_in_fake.double().mean()),
        density=float(inside_count.sum() / (k * len(xf))),
        coverage=float(real_covered.double().mean()),
    )
