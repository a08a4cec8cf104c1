"""The parity check that gates every ONNX export: onnxruntime against eager PyTorch ``generate``.

``check_parity`` runs the exported file (``OnnxShowerGenerator``) and ``ShowerModel.generate`` on the same
random in-range conditions (``random_conditions``) and per-shower seeds, at each of several batch sizes,
and compares the showers in MeV within ``atol_mev`` + ``rtol``·|x| (defaults ``DEFAULT_ATOL_MEV``,
``DEFAULT_RTOL``), telling readout-threshold flips apart from mismatches. The ``ParityReport`` it returns
is stored in the model card; ``caloforge.registry.export`` publishes nothing that fails it.

Why a few voxels may exceed the tolerance: onnxruntime's and torch's float32 kernels round differently
(~1e-6 relative per call), and an N-step solve compounds that once per network evaluation. Measured on a
32–64-evaluation graph of a 6,000-step model (19,000 voxels): median relative error 1e-6, 99.99th
percentile 6e-4–1e-3, and 1–3 voxels at 1.3e-3–3.2e-3 — all small deposits (0.04–0.09 MeV, i.e. tens to
hundreds of eV off) where the log transform turns a rounding step into the largest relative error. A wrong
export (a misplaced input, a wrong constant, a dropped term) moves most voxels, and by far more. So the
check passes when at most ``max_mismatch_fraction`` of the voxels (default 0.1 %) exceed the tolerance and
none exceeds ``outlier_limit`` (default 10) times it; non-finite output always fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from caloforge.platform import seeding
from caloforge.platform.conditioning import PARTICLES, Conditions
from caloforge.platform.seeding import Purpose
from caloforge.platform.shower_model import ShowerModel, derive_seeds
from caloforge.registry.card import ValidRanges
from caloforge.registry.onnx_runtime import OnnxShowerGenerator

PARITY_PURPOSE = Purpose.ONNX_PARITY  # seeds of the parity check's random conditions and noise
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL_MEV = 1e-5  # 10 eV, far below the 15 keV readout threshold
DEFAULT_MAX_MISMATCH_FRACTION = 1e-3  # of the voxels compared, beyond the tolerance but within the limit
DEFAULT_OUTLIER_LIMIT = 10.0  # no voxel beyond this many times its tolerance


class VoxelComparison(NamedTuple):
    n_mismatch: int
    n_threshold_flips: int
    max_abs_err_mev: float
    max_rel_err: float
    max_tolerance_ratio: float  # inf where a voxel is not finite


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime vs eager PyTorch ``generate`` on random conditions."""

    batch_sizes: tuple[int, ...]
    n_voxels: int
    max_abs_err_mev: float
    max_rel_err: float
    n_mismatch: int
    n_threshold_flips: int
    max_tolerance_ratio: float  # the worst voxel's |onnx − torch| / (atol + rtol·|torch|), flips aside
    rtol: float
    atol_mev: float
    max_mismatch_fraction: float
    outlier_limit: float
    passed: bool

    @classmethod
    def judge(
        cls,
        batch_sizes: tuple[int, ...],
        n_voxels: int,
        comparisons: Sequence[VoxelComparison],
        *,
        rtol: float,
        atol_mev: float,
        max_mismatch_fraction: float,
        outlier_limit: float,
    ) -> ParityReport:
        """The verdict over all compared batches: at most ``max_mismatch_fraction`` of ``n_voxels``
        mismatched, none (flips aside) beyond ``outlier_limit`` times its tolerance; a non-finite voxel has
        an infinite ratio, so it always fails."""
        n_bad = sum(c.n_mismatch for c in comparisons)
        worst = max((c.max_tolerance_ratio for c in comparisons), default=0.0)
        return cls(
            batch_sizes=batch_sizes,
            n_voxels=n_voxels,
            max_abs_err_mev=max((c.max_abs_err_mev for c in comparisons), default=0.0),
            max_rel_err=max((c.max_rel_err for c in comparisons), default=0.0),
            n_mismatch=n_bad,
            n_threshold_flips=sum(c.n_threshold_flips for c in comparisons),
            max_tolerance_ratio=worst,
            rtol=float(rtol),
            atol_mev=float(atol_mev),
            max_mismatch_fraction=float(max_mismatch_fraction),
            outlier_limit=float(outlier_limit),
            passed=n_bad <= int(max_mismatch_fraction * n_voxels) and worst <= outlier_limit,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        return (
            f"max abs err {self.max_abs_err_mev:.3g} MeV, max rel err {self.max_rel_err:.3g} over "
            f"{self.n_voxels} voxels (batches {list(self.batch_sizes)}; tolerance atol {self.atol_mev:g} MeV "
            f"+ rtol {self.rtol:g}; {self.n_mismatch} mismatches (allowed "
            f"{int(self.max_mismatch_fraction * self.n_voxels)}, each within {self.outlier_limit:g}× the "
            f"tolerance; worst {self.max_tolerance_ratio:.3g}×), {self.n_threshold_flips} threshold flips)"
        )


def random_conditions(
    detectors: Sequence[str], n: int, seed: int, ranges: ValidRanges | None = None
) -> Conditions:
    """``n`` random conditions inside ``ranges`` (log-uniform energy; default 1 GeV–1 TeV, θ ∈ [0.1, 1.4])."""
    rng = seeding.rng(int(seed), PARITY_PURPOSE)
    e_lo, e_hi = ranges.energy_mev if ranges and ranges.energy_mev else (1e3, 1e6)
    t_lo, t_hi = ranges.theta_rad if ranges and ranges.theta_rad else (0.1, 1.4)
    names = list(ranges.particles) if ranges and ranges.particles else list(PARTICLES)
    energy = np.exp(rng.uniform(math.log(e_lo), math.log(e_hi), n))
    return Conditions.make(
        energy,
        rng.uniform(t_lo, t_hi, n),
        rng.uniform(-math.pi, math.pi, n),
        np.array([PARTICLES[names[i]] for i in rng.integers(0, len(names), n)], dtype=np.int64),
        np.array([detectors[i] for i in rng.integers(0, len(detectors), n)]),
    )


def check_allowance(max_mismatch_fraction: float, outlier_limit: float) -> None:
    """ValueError unless 0 <= ``max_mismatch_fraction`` < 1 and ``outlier_limit`` >= 1."""
    if not 0 <= max_mismatch_fraction < 1:
        raise ValueError(f"max_mismatch_fraction must be in [0, 1), got {max_mismatch_fraction}")
    if not outlier_limit >= 1:
        raise ValueError(f"outlier_limit must be >= 1 (times the tolerance), got {outlier_limit}")


def compare_showers(
    ref: np.ndarray, out: np.ndarray, rtol: float, atol_mev: float, threshold: float
) -> VoxelComparison:
    """ONNX showers ``out`` against the PyTorch ``ref``, voxel by voxel. A voxel that is not finite on
    either side is a mismatch (NaN compares false to any tolerance, so it must not pass silently) at an
    infinite tolerance ratio; a flip is a mismatch where one side is 0 and the other within 0.1 % of the
    readout threshold, counted apart and left out of the ratio."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    err = np.abs(out64 - ref64)
    tol = atol_mev + rtol * np.abs(ref64)
    bad = ~(err <= tol)  # NaN/inf on either side: bad
    flips = bad & ((out64 == 0) | (ref64 == 0)) & (np.maximum(out64, ref64) <= threshold * 1.001)
    finite_err = np.where(np.isfinite(err), err, 0.0)
    big = np.isfinite(ref64) & (np.abs(ref64) > atol_mev)
    max_rel = float((finite_err[big] / np.abs(ref64[big])).max()) if big.any() else 0.0
    e, t = err[~flips], tol[~flips]
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero tolerance: 0 if equal, else infinitely off
        per_voxel = np.where(t > 0, e / np.where(t > 0, t, 1.0), np.where(e == 0, 0.0, math.inf))
    per_voxel = np.where(np.isfinite(e) & np.isfinite(t), per_voxel, math.inf)  # NaN/inf: infinitely off
    ratio = float(per_voxel.max(initial=0.0))
    return VoxelComparison(
        int((bad & ~flips).sum()), int(flips.sum()), float(finite_err.max(initial=0.0)), max_rel, ratio
    )


def check_parity(
    model: ShowerModel,
    onnx_path: str | Path,
    num_steps: int,
    sampler: str,
    *,
    batch_sizes: Sequence[int] = (1, 5),
    seed: int = 0,
    ranges: ValidRanges | None = None,
    rtol: float = DEFAULT_RTOL,
    atol_mev: float = DEFAULT_ATOL_MEV,
    max_mismatch_fraction: float = DEFAULT_MAX_MISMATCH_FRACTION,
    outlier_limit: float = DEFAULT_OUTLIER_LIMIT,
    threads: int = 1,
) -> ParityReport:
    """Run onnxruntime and ``model.generate`` on the same random conditions and seeds; compare in MeV.

    The ONNX side draws its noise (and, with the layer-energy head, its layer noise) from the same seeds by
    the seed convention (``OnnxShowerGenerator.generate(seeds=...)``), so the check covers both stages.

    A voxel mismatches when |onnx − torch| > atol + rtol·|torch|, except *threshold flips*: one side is 0
    and the other within 0.1 % of the readout threshold (the cut turned a value sitting on it either way).
    The check passes when at most ``max_mismatch_fraction`` of the voxels mismatch and none is more than
    ``outlier_limit`` times its tolerance off (the module docstring says why). Non-finite output always
    fails.
    """
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive, got {list(batch_sizes)}")
    check_allowance(max_mismatch_fraction, outlier_limit)
    detectors = list(model.vocab.detectors)
    generator = OnnxShowerGenerator(onnx_path, detectors, model.mesh_shape, threads=threads)
    if generator.layer_energy != model.has_energy_head:
        raise ValueError(
            f"{onnx_path}: graph inputs {list(generator.input_names)} do not fit the model "
            f"(layer-energy head: {model.has_energy_head})"
        )
    threshold = float(model.transform.threshold_mev)
    comparisons, n_vox = [], 0
    for i, b in enumerate(int(b) for b in batch_sizes):
        cond = random_conditions(detectors, b, seed + i, ranges)
        seeds = derive_seeds(seed + i, b, purpose=PARITY_PURPOSE)
        ref = model.generate(cond, num_steps=num_steps, sampler=sampler, seeds=seeds, batch_size=max(b, 1))
        out = generator.generate(cond, seeds=seeds)
        if out.shape != ref.shape:
            raise ValueError(f"{onnx_path}: output shape {out.shape} != PyTorch {ref.shape} at batch {b}")
        comparisons.append(compare_showers(ref, out, rtol, atol_mev, threshold))
        n_vox += ref.size
    return ParityReport.judge(
        tuple(int(b) for b in batch_sizes),
        n_vox,
        comparisons,
        rtol=rtol,
        atol_mev=atol_mev,
        max_mismatch_fraction=max_mismatch_fraction,
        outlier_limit=outlier_limit,
    )


__all__ = [
    "DEFAULT_ATOL_MEV",
    "DEFAULT_MAX_MISMATCH_FRACTION",
    "DEFAULT_OUTLIER_LIMIT",
    "DEFAULT_RTOL",
    "PARITY_PURPOSE",
    "ParityReport",
    "VoxelComparison",
    "check_allowance",
    "check_parity",
    "compare_showers",
    "random_conditions",
]
