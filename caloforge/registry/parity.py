"""The parity check that gates every ONNX export: onnxruntime against eager PyTorch ``generate``.

``check_parity`` runs the exported file (``OnnxShowerGenerator``) and ``ShowerModel.generate`` on the same
random in-range conditions (``random_conditions``) and per-shower seeds, at each of several batch sizes,
and compares the showers in MeV within ``atol_mev`` + ``rtol``·|x| (defaults ``DEFAULT_ATOL_MEV``,
``DEFAULT_RTOL``), telling readout-threshold flips apart from mismatches. The ``ParityReport`` it returns
is stored in the model card; ``caloforge.registry.export`` publishes nothing that fails it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime vs eager PyTorch ``generate`` on random conditions."""

    batch_sizes: tuple[int, ...]
    n_voxels: int
    max_abs_err_mev: float
    max_rel_err: float
    n_mismatch: int
    n_threshold_flips: int
    rtol: float
    atol_mev: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        return (
            f"max abs err {self.max_abs_err_mev:.3g} MeV, max rel err {self.max_rel_err:.3g} over "
            f"{self.n_voxels} voxels (batches {list(self.batch_sizes)}; tolerance atol {self.atol_mev:g} MeV "
            f"+ rtol {self.rtol:g}; "
            f"{self.n_mismatch} mismatches, {self.n_threshold_flips} threshold flips)"
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


def compare_showers(
    ref: np.ndarray, out: np.ndarray, rtol: float, atol_mev: float, threshold: float
) -> tuple[int, int, float, float]:
    """(mismatches, threshold flips, max |err| MeV, max relative err) of ONNX showers ``out`` against the
    PyTorch ``ref``. A voxel that is not finite on either side is a mismatch (NaN compares false to any
    tolerance, so it must not pass silently); a flip is a mismatch where one side is 0 and the other within
    0.1 % of the readout threshold."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    err = np.abs(out64 - ref64)
    bad = ~(err <= atol_mev + rtol * np.abs(ref64))  # NaN/inf on either side: bad
    flips = bad & ((out64 == 0) | (ref64 == 0)) & (np.maximum(out64, ref64) <= threshold * 1.001)
    finite_err = np.where(np.isfinite(err), err, 0.0)
    big = np.isfinite(ref64) & (np.abs(ref64) > atol_mev)
    max_rel = float((finite_err[big] / np.abs(ref64[big])).max()) if big.any() else 0.0
    return int((bad & ~flips).sum()), int(flips.sum()), float(finite_err.max(initial=0.0)), max_rel


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
    threads: int = 1,
) -> ParityReport:
    """Run onnxruntime and ``model.generate`` on the same random conditions and seeds; compare in MeV.

    The ONNX side draws its noise (and, with the layer-energy head, its layer noise) from the same seeds by
    the seed convention (``OnnxShowerGenerator.generate(seeds=...)``), so the check covers both stages.

    A voxel mismatches when |onnx − torch| > atol + rtol·|torch|, except *threshold flips*: one side is 0
    and the other within 0.1 % of the readout threshold (the cut turned a value sitting on it either way).
    Non-finite ONNX output always fails.
    """
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive, got {list(batch_sizes)}")
    detectors = list(model.vocab.detectors)
    generator = OnnxShowerGenerator(onnx_path, detectors, model.mesh_shape, threads=threads)
    if generator.layer_energy != model.has_energy_head:
        raise ValueError(
            f"{onnx_path}: graph inputs {list(generator.input_names)} do not fit the model "
            f"(layer-energy head: {model.has_energy_head})"
        )
    threshold = float(model.transform.threshold_mev)
    max_abs, max_rel, n_vox, n_bad, n_flip = 0.0, 0.0, 0, 0, 0
    finite = True
    for i, b in enumerate(int(b) for b in batch_sizes):
        cond = random_conditions(detectors, b, seed + i, ranges)
        seeds = derive_seeds(seed + i, b, purpose=PARITY_PURPOSE)
        ref = model.generate(cond, num_steps=num_steps, sampler=sampler, seeds=seeds, batch_size=max(b, 1))
        out = generator.generate(cond, seeds=seeds)
        if out.shape != ref.shape:
            raise ValueError(f"{onnx_path}: output shape {out.shape} != PyTorch {ref.shape} at batch {b}")
        finite &= bool(np.isfinite(out).all()) and bool(np.isfinite(ref).all())
        bad_b, flip_b, abs_b, rel_b = compare_showers(ref, out, rtol, atol_mev, threshold)
        n_flip += flip_b
        n_bad += bad_b
        n_vox += ref.size
        max_abs, max_rel = max(max_abs, abs_b), max(max_rel, rel_b)
    return ParityReport(
        batch_sizes=tuple(int(b) for b in batch_sizes),
        n_voxels=n_vox,
        max_abs_err_mev=max_abs,
        max_rel_err=max_rel,
        n_mismatch=n_bad,
        n_threshold_flips=n_flip,
        rtol=float(rtol),
        atol_mev=float(atol_mev),
        passed=finite and n_bad == 0,
    )


__all__ = [
    "DEFAULT_ATOL_MEV",
    "DEFAULT_RTOL",
    "PARITY_PURPOSE",
    "ParityReport",
    "check_parity",
    "compare_showers",
    "random_conditions",
]
