"""Fréchet and kernel physics distances (FPD, KPD) on HLF vectors (Kansal et al. 2023, arXiv:2211.10295).

Features are first standardised with the *reference* statistics (``Standardiser``: z = (x − μ_ref)/σ_ref,
σ_ref = 1 for constant columns), so the sample and the data-vs-data floor are measured in the same units.
(JetNet's ``fpd``/``kpd`` instead divide by the reference's max |x|; ``normalisation="maxabs"`` reproduces
that choice when numbers are to be compared with published ones.)

**FPD.** The Fréchet distance between Gaussians fitted to two samples,
``FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})``, is biased upwards at finite sample size N, with a bias
linear in 1/N (Chong & Forsyth 2020). FPD measures FD on ``num_batches`` random subsets for each of
``num_points`` batch sizes spaced regularly in 1/N between ``min_samples`` and ``max_samples``, averages
per size, fits ``FD(N) = FPD + b/N`` (least squares, both parameters ≥ 0, as JetNet) and reports the
intercept and its standard error. Subsets are drawn *without* replacement (JetNet draws with replacement),
so every subset is an i.i.d. sample of its size and the intercept extrapolates to N → ∞ rather than to
the finite empirical sets. ``Tr (Σ₁Σ₂)^{1/2}`` is computed as ``Σ_i √λ_i`` with λ the eigenvalues of the
symmetric PSD matrix ``Σ₁^{1/2} Σ₂ Σ₁^{1/2}`` (same spectrum as Σ₁Σ₂), which is stable and fast.

**KPD.** The unbiased (U-statistic) estimator of MMD² with the polynomial kernel
``k(x, y) = (x·y / d + 1)^degree`` (degree 3 as in the paper and KID; JetNet's code uses 4),
``MMD²_u = Σ_{i≠j} k(x_i,x_j)/(m(m−1)) + Σ_{i≠j} k(y_i,y_j)/(n(n−1)) − 2 Σ_{ij} k(x_i,y_j)/(mn)``,
computed on ``num_batches`` random batches of ``batch_size`` (capped at half the smaller set, so batches
differ and their spread is meaningful); the result is the median over batches and
the error half the 16–84 % inter-percentile range (JetNet). MMD²_u can be slightly negative; ≈ 0 means
indistinguishable.

Both are conventionally reported ×10³ (CaloChallenge); the API keeps raw values and the report scales.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

Normalisation = Literal["standardise", "maxabs"]


@dataclass(frozen=True)
class Standardiser:
    """Column-wise affine map fitted on the reference: ``z = (x − shift) / scale``."""

    shift: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, reference: np.ndarray, normalisation: Normalisation = "standardise") -> Standardiser:
        x = _check_2d(reference, "reference")
        if normalisation == "standardise":
            shift = x.mean(axis=0)
            scale = x.std(axis=0)
        elif normalisation == "maxabs":
            shift = np.zeros(x.shape[1])
            scale = np.abs(x).max(axis=0)
        else:
            raise ValueError(f"normalisation: unknown {normalisation!r} (known: 'standardise', 'maxabs')")
        scale = np.where(scale > 0, scale, 1.0)
        return cls(shift, scale)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_2d(x, "features")
        if x.shape[1] != len(self.shift):
            raise ValueError(f"features: {x.shape[1]} columns, standardiser was fitted on {len(self.shift)}")
        return (x - self.shift) / self.scale


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run small dense linear algebra (d ≈ 200 covariances, eigendecompositions) on one BLAS thread.

    Multi-threaded OpenBLAS gains nothing at these sizes and, on a loaded machine, its spinning threads
    slow ``eigh`` down by two orders of magnitude. Uses ``threadpoolctl`` when installed (it ships with
    scikit-learn); without it this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _check_2d(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (N, D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains {int(np.count_nonzero(~np.isfinite(arr)))} non-finite values")
    return arr


def _sym_sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """FD = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁Σ₂)^{1/2} between N(μ₁, Σ₁) and N(μ₂, Σ₂)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"frechet_distance: shapes mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {cov1.shape}, cov2 {cov2.shape}"
        )
    s1 = _sym_sqrt_psd(cov1)
    m = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def frechet_distance_samples(x: np.ndarray, y: np.ndarray) -> float:
    """FD between Gaussians fitted (mean, unbiased covariance) to two samples (N, D)."""
    return frechet_distance(x.mean(axis=0), np.cov(x, rowvar=False), y.mean(axis=0), np.cov(y, rowvar=False))


@dataclass(frozen=True)
class FPDResult:
    value: float
    error: float
    batch_sizes: np.ndarray
    fd_means: np.ndarray
    slope: float


def _linear(inv_n: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    return intercept + slope * inv_n


def fpd(
    real: np.ndarray,
    gen: np.ndarray,
    min_samples: int = 2000,
    max_samples: int = 10000,
    num_points: int = 10,
    num_batches: int = 10,
    seed: int = 0,
) -> FPDResult:
    """FPD with the 1/N extrapolation (module docstring); inputs already normalised, shape (N, D).

    ``max_samples`` is capped at the smaller sample size and ``min_samples`` at half of that.
    """
    x, y = _check_2d(real, "real features"), _check_2d(gen, "generated features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"fpd: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    if num_points < 2 or num_batches < 1:
        raise ValueError(f"fpd: need num_points >= 2 and num_batches >= 1, got {num_points}, {num_batches}")
    n_avail = min(len(x), len(y))
    n_max = min(max_samples, n_avail)
    n_min = min(min_samples, n_max // 2)
    if n_min < 3:
        raise ValueError(f"fpd: too few samples ({len(x)} real, {len(y)} generated); need at least 6 each")
    sizes = np.unique((1.0 / np.linspace(1.0 / n_min, 1.0 / n_max, num_points)).astype(np.int64))
    rng = np.random.default_rng(seed)
    means = []
    with single_threaded_blas():
        for n in sizes:
            vals = [
                frechet_distance_samples(
                    x[rng.choice(len(x), size=n, replace=False)], y[rng.choice(len(y), size=n, replace=False)]
                )
                for _ in range(num_batches)
            ]
            means.append(float(np.mean(vals)))
    fd = np.asarray(means)
    inv_n = 1.0 / sizes.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        p0 = (max(float(fd.min()), 0.0), max(float((fd[0] - fd[-1]) / (inv_n[0] - inv_n[-1])), 0.0))
        params, cov = curve_fit(_linear, inv_n, fd, p0=p0, bounds=([0.0, 0.0], [np.inf, np.inf]))
    err = float(np.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else float("nan")
    return FPDResult(float(params[0]), err, sizes, fd, float(params[1]))


def _poly_kernel_sum(a: np.ndarray, b: np.ndarray, degree: int, chunk: int) -> tuple[float, float]:
    """(Σ_ij k(a_i, b_j), Σ_i k(a_i, b_i) if same shape else 0) for k = (a·b/d + 1)^degree."""
    d = a.shape[1]
    total = 0.0
    for lo in range(0, len(a), chunk):
        k = (a[lo : lo + chunk] @ b.T / d + 1.0) ** degree
        total += float(k.sum())
    diag = float((((a * b).sum(axis=1) / d + 1.0) ** degree).sum()) if a.shape == b.shape else 0.0
    return total, diag


def mmd2_poly_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, chunk: int = 2048) -> float:
    """Unbiased MMD² with the polynomial kernel (x·y/d + 1)^degree (module docstring)."""
    x, y = _check_2d(x, "x"), _check_2d(y, "y")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"mmd2: need at least 2 samples each, got {m} and {n}")
    sxx, dxx = _poly_kernel_sum(x, x, degree, chunk)
    syy, dyy = _poly_kernel_sum(y, y, degree, chunk)
    sxy, _ = _poly_kernel_sum(x, y, degree, chunk)
    return (sxx - dxx) / (m * (m - 1)) + (syy - dyy) / (n * (n - 1)) - 2.0 * sxy / (m * n)


@dataclass(frozen=True)
class KPDResult:
    value: float
    error: float
    batch_values: np.ndarray


def kpd(
    real: np.ndarray,
    gen: np.ndarray,
    batch_size: int = 5000,
    num_batches: int = 10,
    degree: int = 3,
    seed: int = 0,
) -> KPDResult:
    """KPD: median over batches of MMD²_u and half the 16–84 % range (inputs already normalised)."""
    x, y = _check_2d(real, "real features"), _check_2d(gen, "generated features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kpd: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    if num_batches < 1 or degree < 1:
        raise ValueError(f"kpd: need num_batches >= 1 and degree >= 1, got {num_batches}, {degree}")
    n = min(
        batch_size, len(x) // 2, len(y) // 2
    )  # at most half, so batches differ and the spread means something
    if n < 2:
        raise ValueError(f"kpd: too few samples ({len(x)} real, {len(y)} generated)")
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            mmd2_poly_unbiased(
                x[rng.choice(len(x), size=n, replace=False)],
                y[rng.choice(len(y), size=n, replace=False)],
                degree,
            )
            for _ in range(num_batches)
        ]
    )
    lo, hi = np.percentile(vals, [16.275, 83.725])
    return KPDResult(float(np.median(vals)), float(0.5 * (hi - lo)), vals)
