"""``evaluate(sample, reference, config) -> EvalReport`` and ``evaluate_model(model, reference, n, config)``.

One evaluation compares a sample (generated showers) with a reference (simulated showers) on the same mesh:

1. voxels at or below the evaluation threshold are zeroed in both sets (per detector: readout threshold /
   sampling fraction, the CaloChallenge 0.5 keV / 0.033 rule; or ``voxel_threshold_mev``);
2. high-level features (:mod:`.features`) are computed per shower with each detector's mesh geometry;
3. pooled metrics: separation power per HLF group (:mod:`.histograms`; the official CaloChallenge
   binning for the official histograms, reference-fixed binning for ours), response summaries, FPD/KPD
   (:mod:`.metrics`, the official definition: the official HLF vector divided by the reference max |x|,
   batches drawn with replacement), PRDC (:mod:`.prdc`) on the HLF vector standardised with reference
   statistics, and the low-/high-level classifier tests (:mod:`.classifier`);
4. the data-vs-data floor: the same metrics between two random halves of the reference (``floor/...``),
   using the same binning and standardisation as the model comparison. Since both halves come from one
   distribution, the floor is pure sampling noise; its separation powers are rescaled from the halves'
   sizes (n_a, n_b) to the model comparison's (N_s, N_r) by (1/N_s + 1/N_r)/(1/n_a + 1/n_b), which is
   exact to leading order. FPD is extrapolated to N → ∞, KPD is unbiased and the AUC is 0.5 in
   expectation at any size, so those need no correction (their spreads are those of the halves). FPD and
   KPD draw their batches with replacement (as jetnet), so both comparisons use the same batch sizes
   whatever the set sizes; they measure the distance between the finite sets, which between two samples
   of one distribution is also c (1/n₁ + 1/n₂) to leading order, so floor FPD/KPD (and their errors) are
   rescaled by the same factor;
5. conditional metrics per detector / particle / incident-energy bin (``group/<det>/<particle>/<bin>/...``),
   with binning fixed by each group's reference.

Metric keys (flat ``dict[str, float]``; ``fpd``/``kpd`` and their errors are ×10³ like the CaloChallenge):
``sep_power/<group>``, ``sep_power/mean``, ``response/{scale,resolution,depth_shift,radial_width,sparsity}``,
``response/layer_{hits,width_r}_max_dev`` (largest |gen/ref − 1| of a per-layer mean over the layers with
> 1 % of the energy, ``layer_profile_deviations``),
``fpd``, ``fpd_err``, ``kpd``, ``kpd_err``, ``prdc/{precision,recall,density,coverage}``, ``auc_low``,
``auc_low_std``, ``auc_high``, ``auc_high_std``, ``cls_{low,high}/{jsd,best_epoch,w_gen_qNN,...}``,
``n_sample``, ``n_reference``; every one again under ``floor/``; groups under ``group/...`` and
``floor/group/...``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from caloforge.datasets.schema import ShowerSet, check_conditions
from caloforge.evaluation import histograms as H
from caloforge.evaluation.classifier import (
    ClassifierResult,
    low_level_inputs,
    low_level_scaling,
    two_sample_classifier,
)
from caloforge.evaluation.config import EvalConfig, MetricName
from caloforge.evaluation.features import ShowerFeatures, compute_features, voxel_log_edges
from caloforge.evaluation.group_classifier import group_classifier_aucs
from caloforge.evaluation.metrics import Standardiser, fpd, kpd
from caloforge.evaluation.prdc import prdc
from caloforge.evaluation.report import EvalReport, PlotData
from caloforge.platform.conditioning import Conditions, particle_name
from caloforge.platform.geometry import DetectorSpec, Mesh, builtin_detector_names, load_detector
from caloforge.platform.seeding import derive_seed, derive_seeds, rng
from caloforge.platform.transforms import CALOCHALLENGE_THRESHOLD_MEV

if TYPE_CHECKING:
    from caloforge.platform.energy import EmptyLayerMode
    from caloforge.platform.shower_model import ShowerModel

log = logging.getLogger("caloforge.evaluation")

SCALE_1E3 = ("fpd", "fpd_err", "kpd", "kpd_err")
_WARNED: set[str] = set()


# ----------------------------------------------------------------------------------------------- inputs
def _check_inputs(sample: ShowerSet, reference: ShowerSet, config: EvalConfig) -> None:
    if not isinstance(sample, ShowerSet) or not isinstance(reference, ShowerSet):
        raise ValueError("evaluate: sample and reference must be ShowerSet instances")
    if sample.mesh_shape != reference.mesh_shape:
        raise ValueError(
            f"evaluate: sample mesh shape {sample.mesh_shape} != reference mesh shape {reference.mesh_shape}"
        )
    for name, s in (("sample", sample), ("reference", reference)):
        if len(s) < 4:
            raise ValueError(f"evaluate: {name} has {len(s)} showers; need at least 4")
        finite = np.isfinite(s.showers_NZPR).reshape(len(s), -1).all(axis=1)
        if not finite.all():
            raise ValueError(
                f"evaluate: {name} ({s.source}) has non-finite voxel energies in {int((~finite).sum())} "
                f"shower(s) (first at row {int(np.flatnonzero(~finite)[0])})"
            )
        check_conditions(s.conditions, path=f"evaluate: {name} ({s.source})")  # NaN energies and angles
    if config.conditions == "match":
        check_matching_conditions(sample.conditions, reference.conditions)


def check_matching_conditions(sample: Conditions, reference: Conditions) -> None:
    """Raise ``ValueError`` naming the first shower whose conditions differ (``conditions: match``)."""
    if len(sample) != len(reference):
        raise ValueError(
            f"conditions=match: sample has {len(sample)} showers, reference {len(reference)} (must be equal)"
        )
    checks = (
        ("energy_mev", np.isclose(sample.energy_mev, reference.energy_mev, rtol=1e-6, atol=0.0)),
        ("theta_rad", np.isclose(sample.theta_rad, reference.theta_rad, rtol=0.0, atol=1e-6)),
        ("phi_rad", np.isclose(sample.phi_rad, reference.phi_rad, rtol=0.0, atol=1e-6)),
        ("pdg", sample.pdg == reference.pdg),
        ("detector", sample.detector == reference.detector),
    )
    for name, ok in checks:
        if not np.all(ok):
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"conditions=match: {name} differs at shower {i} "
                f"(sample {getattr(sample, name)[i]!r}, reference {getattr(reference, name)[i]!r}); "
                f"{int((~ok).sum())} showers differ"
            )


def _subsample(s: ShowerSet, n: int | None, seed: int, purpose: str) -> ShowerSet:
    if n is None or len(s) <= n:
        return s
    idx = np.sort(rng(seed, purpose).choice(len(s), size=n, replace=False))
    return s.subset(idx)


def _detector_mesh(
    name: str,
    shape: tuple[int, int, int],
    config: EvalConfig,
    specs: Mapping[str, DetectorSpec],
    fallback: Mesh | None = None,
) -> Mesh:
    """``config.r_edges_mm``, else the given spec's geometry, else the built-in detector's, else ``fallback``
    (a model bundle's mesh)."""
    if config.r_edges_mm is not None:
        mesh = Mesh(shape[0], shape[1], tuple(config.r_edges_mm))
    elif name in specs:
        mesh = specs[name].geometry
    elif name in builtin_detector_names():
        mesh = load_detector(name).geometry
    elif fallback is not None:
        log.info("detector %r: no DetectorSpec given, using the model bundle's mesh geometry", name)
        mesh = fallback
    else:
        raise ValueError(
            f"evaluate: detector {name!r} is not a built-in detector and has no DetectorSpec (from a shard "
            "set or native file that records it, or --detector DETECTOR.yaml), so its mesh geometry is "
            "unknown; give its spec or pass r_edges_mm in the EvalConfig"
        )
    if mesh.shape != shape:
        raise ValueError(f"evaluate: showers have mesh shape {shape}, detector {name!r} has {mesh.shape}")
    return mesh


def _detector_threshold(name: str, config: EvalConfig, specs: Mapping[str, DetectorSpec]) -> float:
    if config.voxel_threshold_mev is not None:
        return float(config.voxel_threshold_mev)
    if name in specs:
        spec = specs[name]
    elif name in builtin_detector_names():
        spec = load_detector(name)
    else:
        if name not in _WARNED:
            _WARNED.add(name)
            log.warning(
                "detector %r is neither built-in nor given a DetectorSpec: using the CaloChallenge voxel "
                "threshold %.4g MeV",
                name,
                CALOCHALLENGE_THRESHOLD_MEV,
            )
        return CALOCHALLENGE_THRESHOLD_MEV
    return float(spec.readout_threshold_mev / spec.sampling_fraction)


def _thresholds(cond: Conditions, per_detector: Mapping[str, float]) -> np.ndarray:
    """Per-shower voxel threshold (MeV) from the per-detector thresholds."""
    dets, inverse = np.unique(cond.detector, return_inverse=True)
    per_det = np.array([per_detector[str(d)] for d in dets], dtype=np.float64)
    return per_det[inverse.reshape(-1)]


@dataclass
class _Side:
    """One shower set prepared for comparison."""

    showers: np.ndarray  # (N, Z, P, R) float32, raw MeV
    cond: Conditions
    thresholds: np.ndarray  # (N,) MeV
    feats: ShowerFeatures
    hlf: np.ndarray  # (N, D) standardised HLF vector (PRDC, high-level classifier)
    hlf_raw: np.ndarray  # (N, D) HLF vector as computed (FPD/KPD normalise it themselves, as jetnet)

    def __len__(self) -> int:
        return len(self.cond)

    def subset(self, idx: np.ndarray) -> _Side:
        return _Side(
            self.showers[idx],
            self.cond.subset(idx),
            self.thresholds[idx],
            self.feats.subset(idx),
            self.hlf[idx],
            self.hlf_raw[idx],
        )


@dataclass
class _Context:
    config: EvalConfig
    meshes: dict[str, Mesh]
    thresholds: dict[str, float]
    voxel_edges: np.ndarray
    standardiser: Standardiser | None = None
    low_shift_scale: tuple[float, float] = (0.0, 1.0)
    cond_detectors: tuple[str, ...] = ()
    cond_pdgs: tuple[int, ...] = ()
    cond_log_e: tuple[float, float] = (0.0, 1.0)
    cond_angles: dict[str, tuple[float, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    timing_prefix: str = ""

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Accumulate wall and process-CPU time under ``timing_prefix + name`` (groups under ``groups/``)."""
        t0, c0 = time.perf_counter(), time.process_time()
        key = self.timing_prefix + name
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0
            self.cpu_timings[key] = self.cpu_timings.get(key, 0.0) + time.process_time() - c0


def _features(s: ShowerSet, thresholds: np.ndarray, ctx: _Context) -> ShowerFeatures:
    parts, order = [], []
    for det in np.unique(s.conditions.detector):
        idx = np.flatnonzero(s.conditions.detector == det)
        parts.append(
            compute_features(
                s.showers_NZPR[idx],
                s.conditions.energy_mev[idx],
                ctx.meshes[str(det)],
                thresholds[idx],
                ctx.voxel_edges,
            )
        )
        order.append(idx)
    feats = ShowerFeatures.concat(parts)
    inverse = np.empty(len(s), dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(len(s))
    return feats.subset(inverse)


def _voxel_edges(reference: ShowerSet, thresholds: np.ndarray, n_bins: int) -> np.ndarray:
    x = reference.showers_NZPR
    above = x > thresholds[:, None, None, None].astype(np.float32)
    if not np.any(above):
        raise ValueError(f"evaluate: reference ({reference.source}) has no voxel above the voxel threshold")
    vals = x[above]
    low = float(thresholds.min()) if float(thresholds.min()) > 0 else float(vals.min())
    return voxel_log_edges(low, float(vals.max()), n_bins)  # official: up to the largest reference voxel


def _prepare(s: ShowerSet, ctx: _Context) -> _Side:
    thresholds = _thresholds(s.conditions, ctx.thresholds)
    with ctx.timer("features"):
        feats = _features(s, thresholds, ctx)
        hlf = feats.vector(ctx.config.hlf_vector)
    return _Side(s.showers_NZPR, s.conditions, thresholds, feats, hlf, hlf)


# ------------------------------------------------------------------------------------- classifier inputs
def _condition_columns(cond: Conditions, ctx: _Context) -> np.ndarray:
    mu, sd = ctx.cond_log_e
    cols = [((np.log10(cond.energy_mev) - mu) / sd)[:, None]]
    for name, (m, s) in ctx.cond_angles.items():
        cols.append(((getattr(cond, name) - m) / s)[:, None])
    if len(ctx.cond_detectors) > 1:
        cols.append((cond.detector[:, None] == np.asarray(ctx.cond_detectors)[None, :]).astype(np.float64))
    if len(ctx.cond_pdgs) > 1:
        cols.append((cond.pdg[:, None] == np.asarray(ctx.cond_pdgs)[None, :]).astype(np.float64))
    return np.concatenate(cols, axis=1)


def _fit_condition_scaling(ref: _Side, ctx: _Context) -> None:
    c = ref.cond
    le = np.log10(c.energy_mev)
    ctx.cond_log_e = (float(le.mean()), float(le.std()) or 1.0)
    ctx.cond_angles = {
        name: (float(getattr(c, name).mean()), float(getattr(c, name).std()))
        for name in ("theta_rad", "phi_rad")
        if float(getattr(c, name).std()) > 0
    }
    ctx.cond_detectors = tuple(sorted(np.unique(c.detector).tolist()))
    ctx.cond_pdgs = tuple(sorted(int(p) for p in np.unique(c.pdg)))


def _low_inputs(side: _Side, ctx: _Context) -> np.ndarray:
    shift, scale = ctx.low_shift_scale
    vox = low_level_inputs(side.showers, side.cond.energy_mev, side.thresholds, shift, scale)
    return np.concatenate([vox, _condition_columns(side.cond, ctx).astype(np.float32)], axis=1)


# -------------------------------------------------------------------------------------------- compare
def _response(ref: ShowerFeatures, gen: ShowerFeatures) -> dict[str, float]:
    """Physics summaries: relative energy scale and resolution of E_tot/E_inc, depth shift (layers),
    relative energy-weighted radial width, and the mean sparsity difference."""

    def radial_width(f: ShowerFeatures) -> float:
        return float(np.mean((f.e_layer_mev * f.width_r_mm).sum(axis=1) / (f.e_tot_mev + 1e-16)))

    rr, rg = ref.etot_over_einc, gen.etot_over_einc
    return {
        "response/scale": float(rg.mean() / rr.mean() - 1.0),
        "response/resolution": float(rg.std() / rr.std() - 1.0) if rr.std() > 0 else float("nan"),
        "response/depth_shift": float(gen.depth.mean() - ref.depth.mean()),
        "response/radial_width": radial_width(gen) / radial_width(ref) - 1.0,
        "response/sparsity": float(gen.sparsity.mean() - ref.sparsity.mean()),
        **{
            f"response/layer_{name}_max_dev": float(np.max(np.abs(dev), initial=0.0))
            for name, dev in layer_profile_deviations(ref, gen).items()
        },
    }


LAYER_PROFILE_MIN_ENERGY_FRAC = 0.01


def layer_profiles(f: ShowerFeatures) -> dict[str, np.ndarray]:
    """Per-layer means over showers (Z,): ``energy_frac`` (mean E_z / mean E_tot), ``hits`` (non-empty
    voxels), ``width_r`` (energy-weighted radial width in mm, over showers with energy in the layer)."""
    n_vox = f.e_r_mev.shape[1] * f.e_phi_mev.shape[1]
    hit = f.e_layer_mev > 0
    n_hit = hit.sum(axis=0)
    width = np.where(n_hit > 0, (f.width_r_mm * hit).sum(axis=0) / np.maximum(n_hit, 1), 0.0)
    return {
        "energy_frac": f.e_layer_mev.mean(axis=0) / max(float(f.e_tot_mev.mean()), 1e-16),
        "hits": (1.0 - f.sparsity).mean(axis=0) * n_vox,
        "width_r": width,
    }


def layer_profile_deviations(
    ref: ShowerFeatures, gen: ShowerFeatures, min_energy_frac: float = LAYER_PROFILE_MIN_ENERGY_FRAC
) -> dict[str, np.ndarray]:
    """gen/ref − 1 of the mean hits and the mean radial width per layer, over the layers holding more
    than ``min_energy_frac`` of the reference's mean energy (issue #16's per-layer goals: within 10 %)."""
    pr, pg = layer_profiles(ref), layer_profiles(gen)
    keep = pr["energy_frac"] > min_energy_frac
    return {
        key: np.where(keep & (pr[key] > 0), pg[key] / np.where(pr[key] > 0, pr[key], 1.0) - 1.0, 0.0)[keep]
        for key in ("hits", "width_r")
    }


@dataclass
class _Comparison:
    metrics: dict[str, float]
    hist_ref: dict[str, np.ndarray] | None = None
    hist_gen: dict[str, np.ndarray] | None = None
    hist_sep: dict[str, float] | None = None
    classifiers: dict[str, ClassifierResult] = field(default_factory=dict)


def _compare(
    ref: _Side,
    gen: _Side,
    metrics: tuple[MetricName, ...],
    binning: dict[str, np.ndarray],
    ctx: _Context,
    purpose: str,
    fpd_ok: bool = True,
) -> _Comparison:
    """All requested metrics of ``gen`` against ``ref``."""
    cfg = ctx.config
    out: dict[str, float] = {"n_sample": float(len(gen)), "n_reference": float(len(ref))}
    res = _Comparison(out)
    if "sep_power" in metrics:
        with ctx.timer("sep_power"):
            res.hist_ref = H.histograms(ref.feats, binning)
            res.hist_gen = H.histograms(gen.feats, binning)
            res.hist_sep = H.separation_powers(res.hist_ref, res.hist_gen)
            out.update({f"sep_power/{g}": v for g, v in H.group_means(res.hist_sep).items()})
    if "response" in metrics:
        out.update(_response(ref.feats, gen.feats))
    if "fpd" in metrics and fpd_ok:
        with ctx.timer("fpd"):
            f = cfg.fpd
            r = fpd(
                ref.hlf_raw,
                gen.hlf_raw,
                f.min_samples,
                f.max_samples,
                f.num_points,
                f.num_batches,
                derive_seed(cfg.seed, f"fpd/{purpose}"),
            )
            out["fpd"], out["fpd_err"] = r.value, r.error
    if "kpd" in metrics:
        with ctx.timer("kpd"):
            k = cfg.kpd
            r2 = kpd(
                ref.hlf_raw,
                gen.hlf_raw,
                k.batch_size,
                k.num_batches,
                k.degree,
                derive_seed(cfg.seed, f"kpd/{purpose}"),
            )
            out["kpd"], out["kpd_err"] = r2.value, r2.error
    if "prdc" in metrics:
        with ctx.timer("prdc"):
            p = cfg.prdc
            g = rng(cfg.seed, f"prdc/{purpose}")
            ir = g.permutation(len(ref))[: p.max_samples]
            ig = g.permutation(len(gen))[: p.max_samples]
            if min(len(ir), len(ig)) > p.k:
                pr = prdc(ref.hlf[ir], gen.hlf[ig], p.k)
                out.update(
                    {f"prdc/{n}": getattr(pr, n) for n in ("precision", "recall", "density", "coverage")}
                )
    for kind in ("low", "high"):
        if f"cls_{kind}" not in metrics:
            continue
        with ctx.timer(f"cls_{kind}"):
            if kind == "low":
                xr, xg = _low_inputs(ref, ctx), _low_inputs(gen, ctx)
            else:
                xr = np.concatenate([ref.hlf, _condition_columns(ref.cond, ctx)[:, 1:]], axis=1)
                xg = np.concatenate([gen.hlf, _condition_columns(gen.cond, ctx)[:, 1:]], axis=1)
            cr = two_sample_classifier(xr, xg, cfg.classifier, cfg.seed, f"{kind}/{purpose}")
            del xr, xg
        res.classifiers[kind] = cr
        out.update(cr.metrics(kind))
    if "cls_groups" in metrics:
        with ctx.timer("cls_groups"):
            out.update(
                group_classifier_aucs(
                    ref.hlf_raw,
                    gen.hlf_raw,
                    _condition_columns(ref.cond, ctx)[:, 1:],
                    _condition_columns(gen.cond, ctx)[:, 1:],
                    ref.feats.vector_names(cfg.hlf_vector),
                    cfg.group_classifier,
                    cfg.seed,
                    purpose,
                )
            )
    for key in SCALE_1E3:
        if key in out:
            out[key] *= 1e3
    return res


# --------------------------------------------------------------------------------------------- groups
def _safe(text: str) -> str:
    """Metric-key-safe label (MLflow allows letters, digits, _ - . space : /)."""
    return text.replace("+", "plus").replace(" ", "_").replace("/", "_")


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _energy_edges_gev(reference: Conditions, config: EvalConfig) -> np.ndarray | None:
    g = config.groups
    if g.energy_bin_edges_gev:
        return np.asarray(g.energy_bin_edges_gev, dtype=np.float64)
    if g.energy_bins == 0:
        return None
    e = reference.energy_mev / 1e3
    lo, hi = float(e.min()), float(e.max())
    if hi <= lo * (1 + 1e-9):
        return np.array([lo * 0.999, hi * 1.001])
    return np.geomspace(lo, hi, g.energy_bins + 1)


def _group_labels(cond: Conditions, config: EvalConfig, e_edges: np.ndarray | None) -> list[np.ndarray]:
    """Per shower, the key-path components of every enabled grouping level."""
    g = config.groups
    comps: list[np.ndarray] = []
    if g.by_detector:
        comps.append(np.array([_safe(str(d)) for d in cond.detector], dtype=object))
    if g.by_particle:
        names = {int(p): _safe(particle_name(int(p))) for p in np.unique(cond.pdg)}
        comps.append(np.array([names[int(p)] for p in cond.pdg], dtype=object))
    if e_edges is not None:
        e = cond.energy_mev / 1e3
        idx = np.searchsorted(e_edges, e, side="right") - 1
        idx[e == e_edges[-1]] = len(e_edges) - 2  # right-inclusive last bin
        if not config.groups.energy_bin_edges_gev:  # automatic bins span the reference: open-ended ends
            idx = np.clip(idx, 0, len(e_edges) - 2)
        labels = [f"E{_fmt(a)}-{_fmt(b)}GeV" for a, b in itertools.pairwise(e_edges)]
        comps.append(
            np.array([labels[i] if 0 <= i < len(labels) else "E_out_of_range" for i in idx], dtype=object)
        )
    return comps


def _group_keys(comps: list[np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Nested group key -> shower indices (``det``, ``det/particle``, ``det/particle/ebin``)."""
    out: dict[str, np.ndarray] = {}
    for level in range(1, len(comps) + 1):
        keys = np.array(["/".join(str(c[i]) for c in comps[:level]) for i in range(n)], dtype=object)
        for k in sorted(set(keys.tolist())):
            out[k] = np.flatnonzero(keys == k)
    return out


# -------------------------------------------------------------------------------------------- public
def evaluate(
    sample: ShowerSet,
    reference: ShowerSet,
    config: EvalConfig | None = None,
    *,
    detectors: Mapping[str, DetectorSpec] | None = None,
    mesh: Mesh | None = None,
) -> EvalReport:
    """Compare ``sample`` with ``reference`` (module docstring); returns an ``EvalReport``.

    Each detector's geometry and voxel threshold come from ``detectors`` (the specs a shard manifest or a
    native file records: ``Manifest.detector_specs``, ``native.read_detector_specs``), else from the
    built-in detector of that name; ``mesh`` (a model bundle's) is the geometry of a detector with neither
    (``config.r_edges_mm`` / ``voxel_threshold_mev`` override all of them)."""
    config = config or EvalConfig()
    specs = dict(detectors or {})
    t_start, c_start = time.perf_counter(), time.process_time()
    _check_inputs(sample, reference, config)
    if (
        config.conditions == "match"
        and config.max_showers is not None
        and len(reference) > config.max_showers
    ):
        idx = np.sort(
            rng(config.seed, "subsample/matched").choice(len(reference), config.max_showers, replace=False)
        )
        sample, reference = sample.subset(idx), reference.subset(idx)
    else:
        sample = _subsample(sample, config.max_showers, config.seed, "subsample/sample")
        reference = _subsample(reference, config.max_showers, config.seed, "subsample/reference")
    detectors = sorted(
        set(np.unique(reference.conditions.detector).tolist())
        | set(np.unique(sample.conditions.detector).tolist())
    )
    meshes = {d: _detector_mesh(d, reference.mesh_shape, config, specs, mesh) for d in detectors}
    per_detector = {d: _detector_threshold(d, config, specs) for d in detectors}
    ref_thr = _thresholds(reference.conditions, per_detector)
    ctx = _Context(config, meshes, per_detector, _voxel_edges(reference, ref_thr, config.voxel_bins))

    log.info(
        "evaluate: %d sample vs %d reference showers on mesh %s",
        len(sample),
        len(reference),
        reference.mesh_shape,
    )
    ref = _prepare(reference, ctx)
    gen = _prepare(sample, ctx)
    ctx.standardiser = Standardiser.fit(ref.hlf, config.normalisation)
    ref.hlf, gen.hlf = ctx.standardiser(ref.hlf), ctx.standardiser(gen.hlf)
    _fit_condition_scaling(ref, ctx)
    if "cls_low" in config.metrics or "cls_low" in config.floor_metrics:
        ctx.low_shift_scale = low_level_scaling(ref.showers, ref.cond.energy_mev, ref.thresholds)
    binning = _fit_binning(ref, meshes, ctx)

    metrics: dict[str, float] = {}
    main = _compare(ref, gen, config.metrics, binning, ctx, "model")
    metrics.update(main.metrics)

    floor_sep: dict[str, float] | None = None
    half_a = half_b = None
    if config.floor:
        perm = rng(config.seed, "floor/split").permutation(len(ref))
        half_a, half_b = np.sort(perm[: len(ref) // 2]), np.sort(perm[len(ref) // 2 :])
        fl = _compare(ref.subset(half_a), ref.subset(half_b), config.floor_metrics, binning, ctx, "floor")
        factor = _floor_scale(len(gen), len(ref), len(half_a), len(half_b))
        metrics.update({f"floor/{k}": v for k, v in _rescale_sep(fl.metrics, factor).items()})
        floor_sep = {k: v * factor for k, v in (fl.hist_sep or {}).items()}

    group_table = _evaluate_groups(ref, gen, ctx, half_a, half_b, metrics) if config.groups.enabled else []

    ctx.timings["total"] = time.perf_counter() - t_start
    ctx.cpu_timings["total"] = time.process_time() - c_start
    plot_data = PlotData(
        binning=binning,
        hist_ref=main.hist_ref or {},
        hist_gen=main.hist_gen or {},
        n_z=reference.mesh_shape[0],
        classifier_weights={k: (c.weights_ref, c.weights_gen) for k, c in main.classifiers.items()},
        classifier_history={k: c.history for k, c in main.classifiers.items()},
    )
    info: dict[str, Any] = {
        "n_sample": len(sample),
        "n_reference": len(reference),
        "sample_source": sample.source,
        "reference_source": reference.source,
        "mesh_shape": list(reference.mesh_shape),
        "detectors": detectors,
        "particles": sorted({particle_name(int(p)) for p in np.unique(reference.conditions.pdg)}),
        "voxel_threshold_mev": per_detector,
        "hlf_vector": config.hlf_vector,
        "hlf_dim": int(ref.hlf.shape[1]),
        "groups": group_table,
        **(
            {
                "layer_profiles": {
                    "min_energy_frac": LAYER_PROFILE_MIN_ENERGY_FRAC,
                    "reference": {k: v.tolist() for k, v in layer_profiles(ref.feats).items()},
                    "sample": {k: v.tolist() for k, v in layer_profiles(gen.feats).items()},
                }
            }
            if "response" in config.metrics
            else {}
        ),
        "timings_s": {k: round(v, 4) for k, v in ctx.timings.items()},
        "cpu_timings_s": {k: round(v, 4) for k, v in ctx.cpu_timings.items()},
    }
    return EvalReport(
        metrics=metrics,
        config=config,
        info=info,
        hist_sep_power=main.hist_sep or {},
        floor_hist_sep_power=floor_sep or {},
        plot_data=plot_data,
    )


def _floor_scale(n_sample: int, n_reference: int, n_a: int, n_b: int) -> float:
    """Size correction of floor separation powers (module docstring, step 4).

    Between two samples of one distribution, E[S] = c (1/n₁ + 1/n₂) to leading order (per bin,
    E(p̂₁ − p̂₂)² = p(1 − p)(1/n₁ + 1/n₂)); the floor is measured at (n_a, n_b) and rescaled to the
    model comparison's (N_sample, N_reference).
    """
    return (1.0 / n_sample + 1.0 / n_reference) / (1.0 / n_a + 1.0 / n_b)


FLOOR_SCALED = ("fpd", "fpd_err", "kpd", "kpd_err")


def _rescale_sep(metrics: dict[str, float], factor: float) -> dict[str, float]:
    """Floor values that are pure finite-size noise, c (1/n₁ + 1/n₂) to leading order, rescaled to the model
    comparison's sizes: separation powers, and FPD/KPD, which (batches drawn with replacement, as jetnet)
    measure the distance between the two finite sets (KPD's bias from rows drawn twice is ∝ 1/n too)."""
    return {
        k: (v * factor if k.startswith("sep_power/") or k in FLOOR_SCALED else v) for k, v in metrics.items()
    }


def _fit_binning(ref: _Side, meshes: dict[str, Mesh], ctx: _Context) -> dict[str, np.ndarray]:
    """Histogram binning from the reference side: official energy bins start at the smallest voxel
    threshold, official length ranges scale with the largest outer radius of the detectors."""
    return H.fit_binning(
        ref.feats,
        _profile_mesh(meshes),
        ctx.config.n_bins,
        threshold_mev=float(ref.thresholds.min()) if len(ref) else min(ctx.thresholds.values()),
        r_max_mm=max(m.r_edges_mm[-1] for m in meshes.values()),
    )


def _profile_mesh(meshes: dict[str, Mesh]) -> Mesh:
    """The mesh whose radial edges bin the pooled radial profile: the detectors' common edges, or radial
    bin indices (0, 1, …, n_r) when detectors sharing the mesh shape differ in their radial edges."""
    first = next(iter(meshes.values()))
    if all(m.r_edges_mm == first.r_edges_mm for m in meshes.values()):
        return first
    log.info("detectors differ in radial edges: the pooled radial profile is binned in radial bin index")
    return Mesh(first.n_z, first.n_phi, tuple(float(i) for i in range(first.n_r + 1)))


def _evaluate_groups(
    ref: _Side,
    gen: _Side,
    ctx: _Context,
    half_a: np.ndarray | None,
    half_b: np.ndarray | None,
    metrics: dict[str, float],
) -> list[dict[str, Any]]:
    cfg = ctx.config
    gcfg = cfg.groups
    e_edges = _energy_edges_gev(ref.cond, cfg)
    ref_groups = _group_keys(_group_labels(ref.cond, cfg, e_edges), len(ref))
    gen_groups = _group_keys(_group_labels(gen.cond, cfg, e_edges), len(gen))
    if half_a is not None and half_b is not None:
        pos_a = np.zeros(len(ref), dtype=bool)
        pos_a[half_a] = True
    table: list[dict[str, Any]] = []
    keys = sorted(set(ref_groups) | set(gen_groups))
    ctx.timing_prefix = "groups/"
    for key in tqdm(keys, desc="eval groups", disable=None, leave=False):
        ri = ref_groups.get(key, np.array([], dtype=np.int64))
        gi = gen_groups.get(key, np.array([], dtype=np.int64))
        prefix = f"group/{key}"
        metrics[f"{prefix}/n_sample"] = float(len(gi))
        metrics[f"{prefix}/n_reference"] = float(len(ri))
        row: dict[str, Any] = {"group": key, "n_sample": len(gi), "n_reference": len(ri)}
        table.append(row)
        if min(len(ri), len(gi)) < gcfg.min_showers:
            row["skipped"] = f"fewer than {gcfg.min_showers} showers"
            continue
        r_side, g_side = ref.subset(ri), gen.subset(gi)
        group_meshes = {d: ctx.meshes[d] for d in np.unique(r_side.cond.detector).tolist()}
        binning = _fit_binning(r_side, group_meshes, ctx)
        fpd_ok = min(len(ri), len(gi)) >= gcfg.fpd_min_showers
        floor_metrics = tuple(m for m in gcfg.metrics if m in cfg.floor_metrics)
        with_floor = cfg.floor and half_a is not None and bool(floor_metrics)
        if with_floor:
            a_idx, b_idx = ri[pos_a[ri]], ri[~pos_a[ri]]
            with_floor = min(len(a_idx), len(b_idx)) >= max(gcfg.min_showers // 2, 4)
        comp = _compare(r_side, g_side, gcfg.metrics, binning, ctx, f"group/{key}", fpd_ok)
        metrics.update({f"{prefix}/{k}": v for k, v in comp.metrics.items() if not k.startswith("n_")})
        row.update({k: v for k, v in comp.metrics.items() if not k.startswith("n_")})
        if with_floor:
            fl = _compare(
                ref.subset(a_idx),
                ref.subset(b_idx),
                floor_metrics,
                binning,
                ctx,
                f"floor/group/{key}",
                fpd_ok,
            )
            factor = _floor_scale(len(gi), len(ri), len(a_idx), len(b_idx))
            fl_m = {k: v for k, v in _rescale_sep(fl.metrics, factor).items() if not k.startswith("n_")}
            metrics.update({f"floor/{prefix}/{k}": v for k, v in fl_m.items()})
            row.update({f"floor/{k}": v for k, v in fl_m.items()})
    ctx.timing_prefix = ""
    return table


def evaluate_model(
    model: ShowerModel | str | Path,
    reference: ShowerSet,
    n: int | None = None,
    config: EvalConfig | None = None,
    *,
    num_steps: int | None = None,
    sampler: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    detectors: Mapping[str, DetectorSpec] | None = None,
) -> EvalReport:
    """Generate ``n`` showers with the conditions of ``n`` reference showers and evaluate them.

    ``model`` is a ``ShowerModel`` or a bundle directory (loaded on ``device``, default cpu; a model object
    must already be on ``device`` when one is given). The ``n`` reference showers are a seeded random subset
    (all when ``n`` is None); per-shower generation seeds derive from ``config.seed``, so the same call gives
    the same numbers. The comparison runs with ``conditions="match"``. ``detectors``: as for ``evaluate``;
    the model's mesh is the geometry of a detector without a spec.
    """
    from dataclasses import replace

    from caloforge.platform.shower_model import ShowerModel

    config = config or EvalConfig()
    if not isinstance(model, ShowerModel):
        model = load_model(model, device)
    sample, reference = generate_sample(
        model,
        reference,
        n,
        config.seed,
        num_steps=num_steps,
        sampler=sampler,
        batch_size=batch_size,
        device=device,
    )
    report = evaluate(
        sample, reference, replace(config, conditions="match"), detectors=detectors, mesh=model.mesh
    )
    report.info["generation_s"] = sample.metadata["generation_s"]
    report.info["generation_ms_per_shower"] = round(1e3 * sample.metadata["generation_s"] / len(sample), 4)
    return report


def load_model(
    bundle: str | Path, device: str | None = None, empty_layers: EmptyLayerMode | None = None
) -> ShowerModel:
    """A model bundle directory loaded on ``device`` (default cpu); ``empty_layers``: generate with that
    ``layer_energy.empty_layers`` instead of the bundle's own (``ShowerModel.set_sampling_defaults``)."""
    from caloforge.platform.shower_model import ShowerModel

    path = Path(bundle)
    if not path.is_dir():
        raise ValueError(f"model bundle {path}: not a directory")
    model = ShowerModel.load(path, device=device or "cpu")
    if empty_layers is not None:
        model.set_sampling_defaults(empty_layers=empty_layers)
    return model


def generate_sample(
    model: ShowerModel | str | Path,
    reference: ShowerSet,
    n: int | None,
    seed: int,
    *,
    num_steps: int | None = None,
    sampler: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> tuple[ShowerSet, ShowerSet]:
    """(generated, reference subset): ``n`` showers generated with the conditions of ``n`` reference showers.

    The reference subset is seeded (all showers when ``n`` is None); generation seeds are one per shower,
    derived from (``seed``, "model/generate", index), so a repeated call gives the same showers.
    """
    from caloforge.platform.shower_model import ShowerModel

    if not isinstance(model, ShowerModel):
        model = load_model(model, device)
    if model.mesh_shape != reference.mesh_shape:
        raise ValueError(f"model mesh {model.mesh_shape} != reference mesh shape {reference.mesh_shape}")
    if n is not None:
        if n < 4:
            raise ValueError(f"evaluate_model: n must be >= 4, got {n}")
        if n > len(reference):
            raise ValueError(f"evaluate_model: n={n} exceeds the {len(reference)} reference showers")
        reference = _subsample(reference, n, seed, "model/reference")
    seeds = derive_seeds(seed, len(reference), "model/generate")
    t0 = time.perf_counter()
    showers = model.generate(
        reference.conditions,
        num_steps=num_steps,
        sampler=sampler,
        seeds=seeds,
        batch_size=batch_size,
        device=device,
    )
    gen_s = time.perf_counter() - t0
    showers = np.asarray(showers, dtype=np.float32)
    if showers.shape != reference.showers_NZPR.shape:
        raise ValueError(
            f"evaluate_model: model generated shape {showers.shape}, expected {reference.showers_NZPR.shape}"
        )
    meta = {"generation_s": round(gen_s, 4), "num_steps": num_steps, "sampler": sampler}
    return ShowerSet(showers, reference.conditions, source="model", seed=seed, metadata=meta), reference
