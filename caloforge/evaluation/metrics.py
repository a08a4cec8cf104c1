"""Fréchet and kernel physics distances (FPD, KPD) on HLF vectors (Kansal et al. 2023, arXiv:2211.10295),
as the CaloChallenge evaluation computes them (``code/evaluate.py``: ``jetnet.evaluation.fpd(reference,
sample, min_samples=10000)`` and ``jetnet.evaluation.kpd(reference, sample, batch_size=10000)`` on the
``prepare_high_data_for_classifier`` vector, :meth:`ShowerFeatures.vector`; jetnet 0.2.5 defaults
otherwise). Reimplemented on numpy/scipy; jetnet is not a dependency.

**Normalisation** (jetnet ``_normalise_features``): both sets are divided, column by column, by the
*reference's* max |x| (columns whose max is 0 are left as they are). ``normalise=False`` skips it.

**FPD.** The Fréchet distance between Gaussians fitted to two samples,
``FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})`` (means, unbiased covariances ``np.cov``), is biased
upwards at finite sample size N, with a bias linear in 1/N (Chong & Forsyth 2020). For each of
``num_points`` batch sizes ``N_i = int(1 / linspace(1/min_samples, 1/max_samples, num_points))`` (regular in
1/N; official 10,000 … 50,000), ``num_batches`` (official 20) pairs of batches are drawn *with replacement*
from the two sets and their FD averaged; ``FD(N) = FPD + b/N`` is fitted by least squares with both
parameters ≥ 0 (jetnet: ``scipy.optimize.curve_fit``; here the same least-squares problem solved
exactly with ``scipy.optimize.nnls``) and FPD is the intercept, its error the intercept's standard
error. Batches drawn with replacement are exactly frequency-weighted versions of the sets (``np.cov(...,
fweights=counts)``), which is how they are computed here (cost ∝ set size, not batch size).
``Tr (Σ₁Σ₂)^{1/2}`` is computed as ``Σ_i √λ_i`` with λ the eigenvalues of the symmetric PSD matrix
``Σ₁^{1/2} Σ₂ Σ₁^{1/2}`` (same spectrum as Σ₁Σ₂; jetnet uses ``scipy.linalg.sqrtm``: same value).

**KPD.** The unbiased quadratic-time estimator of MMD² with the polynomial kernel
``k(x, y) = (x·y / d + 1)^4`` (jetnet's code; the paper's text says degree 3),
``MMD²_u = Σ_{i≠j} k(x_i,x_j)/(m(m−1)) + Σ_{i≠j} k(y_i,y_j)/(n(n−1)) − 2 Σ_{ij} k(x_i,y_j)/(mn)``,
on ``num_batches`` (official 10) pairs of batches of ``batch_size`` (official 10,000) drawn with
replacement; the result is the median over batches and the error half the 16.275–83.725 % inter-percentile
range (``scipy.stats.iqr(..., rng=(16.275, 83.725)) / 2``). Drawn with replacement, a batch's expected
MMD²_u does not depend on its size (two distinct draws are any two rows of a set, possibly the same one),
so batches are capped at the smaller set's size: the same quantity, without B² work on small sets.
MMD²_u can be slightly negative; ≈ 0 means indistinguishable.

Both are conventionally reported ×10³ (CaloChallenge); the API keeps raw values and the report scales.
The random draws come from ``numpy.random.default_rng(seed)``, not jetnet's stream, so values agree with
jetnet's within their errors, not digit for digit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import nnls

Normalisation = Literal["standardise", "maxabs"]
OFFICIAL_FPD = {"min_samples": 10_000, "max_samples": 50_000, "num_points": 10, "num_batches": 20}
OFFICIAL_KPD = {"batch_size": 10_000, "num_batches": 10, "degree": 4}
KPD_ERR_PERCENTILES = (16.275, 83.725)


@dataclass(frozen=True)
class Standardiser:
    """Column-wise affine map fitted on the reference: ``z = (x − shift) / scale``.

    ``standardise``: reference mean and standard deviation (PRDC and the high-level classifier);
    ``maxabs``: no shift, the reference's max |x| (jetnet's FPD/KPD normalisation). Zero scales become 1.
    """

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


def _weighted_moments(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of the sample that repeats row i of ``x`` ``counts[i]`` times."""
    keep = counts > 0
    xs, w = x[keep], counts[keep].astype(np.float64)
    n = w.sum()
    mu = (w @ xs) / n
    xc = xs - mu
    cov = (xc.T * w) @ xc / (n - 1.0)
    return mu, cov


def _resample_counts(rng: np.random.Generator, n_set: int, size: int) -> np.ndarray:
    """How often each of ``n_set`` rows occurs in ``size`` draws with replacement."""
    return np.bincount(rng.integers(0, n_set, size=size), minlength=n_set)


@dataclass(frozen=True)
class FPDResult:
    value: float
    error: float
    batch_sizes: np.ndarray
    fd_means: np.ndarray
    slope: float


def _fit_intercept(inv_n: np.ndarray, fd: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares fit ``fd = a + b·inv_n`` with a, b ≥ 0 (jetnet: ``curve_fit(..., bounds=([0, 0],
    [inf, inf]))``), solved exactly as a non-negative least-squares problem; the intercept's standard error
    is curve_fit's: ``sqrt(inv(JᵀJ)₀₀ · SS_res / (m − 2))``."""
    design = np.stack([np.ones_like(inv_n), inv_n], axis=1)
    params, _ = nnls(design, fd)
    m = len(fd)
    ss = float(np.sum((design @ params - fd) ** 2))
    cov = np.linalg.pinv(design.T @ design) * (ss / (m - 2) if m > 2 else np.inf)
    err = float(np.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else float("nan")
    return params, err


def fpd_batch_sizes(min_samples: int, max_samples: int, num_points: int) -> np.ndarray:
    """jetnet's batch sizes: ``int(1 / linspace(1/min_samples, 1/max_samples, num_points))``."""
    return (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int64)


def fpd(
    real: np.ndarray,
    gen: np.ndarray,
    min_samples: int = OFFICIAL_FPD["min_samples"],
    max_samples: int = OFFICIAL_FPD["max_samples"],
    num_points: int = OFFICIAL_FPD["num_points"],
    num_batches: int = OFFICIAL_FPD["num_batches"],
    seed: int = 0,
    normalise: bool = True,
) -> FPDResult:
    """FPD as the CaloChallenge computes it (module docstring); inputs are raw feature vectors (N, D)."""
    x, y = _check_2d(real, "real features"), _check_2d(gen, "generated features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"fpd: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    if num_points < 2 or num_batches < 1:
        raise ValueError(f"fpd: need num_points >= 2 and num_batches >= 1, got {num_points}, {num_batches}")
    if not 2 <= min_samples <= max_samples:
        raise ValueError(f"fpd: need 2 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"fpd: too few samples ({len(x)} real, {len(y)} generated); need at least 2 each")
    if normalise:
        norm = Standardiser.fit(x, "maxabs")
        x, y = norm(x), norm(y)
    sizes = fpd_batch_sizes(min_samples, max_samples, num_points)
    rng = np.random.default_rng(seed)
    means = []
    with single_threaded_blas():
        for n in sizes:
            vals = []
            for _ in range(num_batches):
                mu1, cov1 = _weighted_moments(x, _resample_counts(rng, len(x), int(n)))
                mu2, cov2 = _weighted_moments(y, _resample_counts(rng, len(y), int(n)))
                vals.append(frechet_distance(mu1, cov1, mu2, cov2))
            means.append(float(np.mean(vals)))
    fd = np.asarray(means)
    params, err = _fit_intercept(1.0 / sizes.astype(np.float64), fd)
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


def mmd2_poly_unbiased(
    x: np.ndarray, y: np.ndarray, degree: int = OFFICIAL_KPD["degree"], chunk: int = 2048
) -> float:
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
    batch_size: int  # the batch size used: min(batch_size, len(real), len(gen))


def kpd(
    real: np.ndarray,
    gen: np.ndarray,
    batch_size: int = OFFICIAL_KPD["batch_size"],
    num_batches: int = OFFICIAL_KPD["num_batches"],
    degree: int = OFFICIAL_KPD["degree"],
    seed: int = 0,
    normalise: bool = True,
) -> KPDResult:
    """KPD as the CaloChallenge computes it: median over batches (drawn with replacement) of MMD²_u and half
    the 16.275–83.725 % range; inputs are raw feature vectors (N, D) (module docstring)."""
    x, y = _check_2d(real, "real features"), _check_2d(gen, "generated features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kpd: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    if num_batches < 1 or degree < 1 or batch_size < 2:
        raise ValueError(
            f"kpd: need num_batches >= 1, degree >= 1, batch_size >= 2, got {num_batches}, {degree}, "
            f"{batch_size}"
        )
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"kpd: need at least 2 samples each ({len(x)} real, {len(y)} generated)")
    if normalise:
        norm = Standardiser.fit(x, "maxabs")
        x, y = norm(x), norm(y)
    # with replacement, E[MMD²_u] of a batch does not depend on its size B (a pair of distinct draws is
    # any pair of rows, the same row included, whatever B): B > set size only costs B² work
    batch = min(batch_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            mmd2_poly_unbiased(
                x[rng.integers(0, len(x), size=batch)],
                y[rng.integers(0, len(y), size=batch)],
                degree,
            )
            for _ in range(num_batches)
        ]
    )
    lo, hi = np.percentile(vals, KPD_ERR_PERCENTILES)
    return KPDResult(float(np.median(vals)), float(0.5 * (hi - lo)), vals, batch)
