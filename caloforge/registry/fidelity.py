"""The fidelity gate: an optimised or quantised graph is published only if its showers are, for the evaluation
module, the fp32 model's showers.

Numeric parity (``caloforge.registry.parity``) cannot judge an int8 graph — it differs voxel by voxel by
design — so every graph other than the plain one is also judged on distributions. ``fidelity_gate`` draws
``n_showers`` conditions inside the model's trained ranges (``random_conditions``; the bundle's
``lineage.trained``) and per-shower seeds (``derive_seeds(seed, n, purpose=GATE_PURPOSE)``, noise by the seed
convention), generates the showers with the candidate graph and with the parity-checked fp32 graph (same
conditions, same noise: paired samples), and compares them with ``caloforge.evaluation.evaluate``
(``conditions="match"``, no floor, no groups): the low-level classifier AUC between the two samples and the
energy response (E_tot/E_inc: relative scale and resolution). The thresholds are ``FidelityGateConfig``;
``caloforge.registry.export`` publishes nothing whose ``FidelityReport.passed`` is false.

Cost: 2 × ``n_showers`` showers through onnxruntime (``batch`` session profile) plus ``classifier.n_seeds``
small classifiers; see docs/inference_contract.md for measured times.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from caloforge.evaluation.config import ClassifierConfig
from caloforge.platform.geometry import Mesh
from caloforge.platform.shower_model import derive_seeds
from caloforge.registry.card import ValidRanges
from caloforge.registry.onnx_runtime import OnnxShowerGenerator
from caloforge.registry.parity import random_conditions

GATE_PURPOSE = 0x67617465  # "gate": seeds of the gate's conditions and noise
# configs/eval/ci.yaml's classifier: seconds on 2 cores for a few hundred showers
GATE_CLASSIFIER = ClassifierConfig(
    hidden=64, n_layers=2, lr=1e-3, epochs=8, batch_size=256, patience=3, n_seeds=2
)


@dataclass(frozen=True)
class FidelityGateConfig:
    """Bounds of the fidelity gate (YAML: ``configs/export/fidelity_gate.yaml``; CLI ``--gate-config``).

    ``auc_max``: the low-level classifier AUC (candidate vs fp32 showers) must not exceed it (0.5: the two
    are indistinguishable). The AUC of two samples of one distribution scatters around 0.5 with
    σ₀ = √((2m + 1)/(12 m²)) for m test showers per class (``classifier.split[2]`` · ``n_showers``); a gate
    cannot resolve less, so the bound applied is max(``auc_max``, 0.5 + 3σ₀) (0.6 from n_showers ≈ 750 on;
    both are in the report).
    ``response_scale_max`` / ``response_resolution_max``: bounds on |mean(E_tot/E_inc) ratio − 1| and
    |std ratio − 1| between candidate and fp32."""

    n_showers: int = 800
    seed: int = 0
    auc_max: float = 0.6
    response_scale_max: float = 0.01
    response_resolution_max: float = 0.05
    batch_size: int = 64
    threads: int | None = None  # None: every core (the ``batch`` session profile)
    classifier: ClassifierConfig = field(default_factory=lambda: GATE_CLASSIFIER)

    def __post_init__(self) -> None:
        if self.n_showers < 20:
            raise ValueError(f"fidelity_gate.n_showers must be >= 20, got {self.n_showers}")
        if not 0.5 < self.auc_max <= 1.0:
            raise ValueError(f"fidelity_gate.auc_max must be in (0.5, 1], got {self.auc_max}")
        for name in ("response_scale_max", "response_resolution_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"fidelity_gate.{name} must be > 0, got {value}")
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(
                f"fidelity_gate: batch_size/threads must be >= 1, got {self.batch_size}/{self.threads}"
            )

    @classmethod
    def load(cls, path: str | Path) -> FidelityGateConfig:
        from caloforge.config import from_dict, read_yaml

        return from_dict(cls, read_yaml(path), str(path))


@dataclass(frozen=True)
class FidelityReport:
    """Candidate vs fp32 showers: the gate's numbers (stored in the model card)."""

    n_showers: int
    auc: float
    auc_std: float
    response_scale: float
    response_resolution: float
    max_abs_diff_mev: float
    mean_abs_etot_rel_diff: float  # paired: mean over showers of |E_tot(candidate)/E_tot(fp32) − 1|
    auc_max: float
    auc_bound: float  # the bound applied: max(auc_max, 0.5 + 3 σ₀)
    auc_null_sigma: float  # σ₀ of the AUC of two samples of one distribution at this test-split size
    response_scale_max: float
    response_resolution_max: float
    seconds: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = list(self.failures)
        d["passed"] = self.passed
        return {k: round(v, 6) if isinstance(v, float) and math.isfinite(v) else v for k, v in d.items()}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (
            f"classifier AUC {self.auc:.3f} ± {self.auc_std:.3f} (max {self.auc_bound:.3f}), energy response "
            f"scale {self.response_scale:+.4f} (max ±{self.response_scale_max}), resolution "
            f"{self.response_resolution:+.4f} (max ±{self.response_resolution_max}) over {self.n_showers} "
            f"showers: {verdict}"
        )


def auc_null_sigma(n_showers: int, test_fraction: float) -> float:
    """Standard deviation of the AUC (Mann–Whitney) of two equal samples of one distribution with
    m = ``test_fraction`` · ``n_showers`` showers per class: √((2m + 1)/(12 m²))."""
    m = max(round(test_fraction * n_showers), 1)
    return math.sqrt((2 * m + 1) / (12 * m * m))


def _generate(
    path: Path,
    detectors: Sequence[str],
    mesh_shape: Sequence[int],
    cond: Any,
    seeds: np.ndarray,
    cfg: FidelityGateConfig,
) -> np.ndarray:
    gen = OnnxShowerGenerator(path, detectors, mesh_shape, threads=cfg.threads, profile="batch")
    parts = [
        gen.generate(
            cond.subset(np.arange(i, min(i + cfg.batch_size, len(cond)))), seeds=seeds[i : i + cfg.batch_size]
        )
        for i in range(0, len(cond), cfg.batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def fidelity_gate(
    candidate: str | Path,
    reference: str | Path,
    *,
    detectors: Sequence[str],
    mesh: Mesh,
    threshold_mev: float,
    ranges: ValidRanges | None,
    config: FidelityGateConfig | None = None,
) -> FidelityReport:
    """Compare showers of the ``candidate`` graph with the fp32 ``reference`` graph's (module docstring).

    ``mesh`` and ``threshold_mev`` are the model's (its geometry and readout threshold: the evaluation uses
    them for every detector); ``ranges`` bound the conditions (the trained ranges)."""
    from caloforge.datasets.schema import ShowerSet
    from caloforge.evaluation.api import evaluate
    from caloforge.evaluation.config import EvalConfig, GroupConfig, PlotConfig

    cfg = config or FidelityGateConfig()
    t0 = time.perf_counter()
    cond = random_conditions(list(detectors), cfg.n_showers, cfg.seed + GATE_PURPOSE, ranges)
    seeds = derive_seeds(cfg.seed, cfg.n_showers, purpose=GATE_PURPOSE)
    ref = _generate(Path(reference), detectors, mesh.shape, cond, seeds, cfg)
    out = _generate(Path(candidate), detectors, mesh.shape, cond, seeds, cfg)
    failures: list[str] = []
    if not np.isfinite(out).all():
        failures.append(f"{int((~np.isfinite(out)).sum())} non-finite voxel energies")
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    eval_cfg = EvalConfig(
        seed=cfg.seed,
        metrics=("response", "cls_low"),
        floor=False,
        conditions="match",
        voxel_threshold_mev=float(threshold_mev),
        r_edges_mm=tuple(float(v) for v in mesh.r_edges_mm),
        classifier=cfg.classifier,
        groups=GroupConfig(enabled=False),
        plots=PlotConfig(enabled=False),
    )
    if not (ref > threshold_mev).any():
        raise ValueError(
            f"fidelity gate: the fp32 graph {reference} gives no voxel above the {threshold_mev:g} MeV "
            "threshold on the gate's conditions: nothing to compare (an untrained model?)"
        )
    report = evaluate(ShowerSet(out, cond, source="candidate"), ShowerSet(ref, cond, source="fp32"), eval_cfg)
    m = report.metrics
    auc, scale, reso = m["auc_low"], m["response/scale"], m["response/resolution"]
    e_ref, e_out = ref.reshape(len(ref), -1).sum(axis=1), out.reshape(len(out), -1).sum(axis=1)
    nz = e_ref > 0
    rel = float(np.mean(np.abs(e_out[nz] / e_ref[nz] - 1.0))) if nz.any() else float("nan")
    sigma0 = auc_null_sigma(cfg.n_showers, cfg.classifier.split[2])
    bound = max(cfg.auc_max, 0.5 + 3.0 * sigma0)
    if not auc <= bound:
        failures.append(f"classifier AUC {auc:.3f} > {bound:.3f}")
    if not abs(scale) <= cfg.response_scale_max:
        failures.append(f"energy response scale {scale:+.4f} beyond ±{cfg.response_scale_max}")
    if not abs(reso) <= cfg.response_resolution_max:
        failures.append(f"energy resolution {reso:+.4f} beyond ±{cfg.response_resolution_max}")
    return FidelityReport(
        n_showers=cfg.n_showers,
        auc=float(auc),
        auc_std=float(m["auc_low_std"]),
        response_scale=float(scale),
        response_resolution=float(reso),
        max_abs_diff_mev=float(np.abs(out.astype(np.float64) - ref).max()),
        mean_abs_etot_rel_diff=rel,
        auc_max=cfg.auc_max,
        auc_bound=bound,
        auc_null_sigma=sigma0,
        response_scale_max=cfg.response_scale_max,
        response_resolution_max=cfg.response_resolution_max,
        seconds=time.perf_counter() - t0,
        failures=tuple(failures),
    )


def small_gate(n_showers: int = 128, **changes: Any) -> FidelityGateConfig:
    """A cheaper gate (fewer showers, one classifier seed) for tests and quick benchmarks."""
    return replace(
        FidelityGateConfig(n_showers=n_showers, batch_size=n_showers),
        classifier=replace(GATE_CLASSIFIER, n_seeds=1, epochs=6),
        **changes,
    )


__all__ = [
    "GATE_PURPOSE",
    "FidelityGateConfig",
    "FidelityReport",
    "auc_null_sigma",
    "fidelity_gate",
    "small_gate",
]
