"""HLF histograms with binning fixed by the reference, and their separation power.

Every high-level feature of :mod:`caloforge.evaluation.features` becomes one or more 1-D histograms,
collected in feature *groups* (``GROUPS``). Groups that share a name with the official CaloChallenge code
(``OFFICIAL_GROUPS``; ``code/evaluate_plotting_helper.py``) compute the official quantity:

==================  =================================================================================
group               official binning (datasets 2/3; lengths scaled by R/41.85 mm on other meshes)
==================  =================================================================================
``etot_einc``       ``linspace(0.5, 1.5, 101)`` (``plot_Etot_Einc``)
``e_layer/<z>``     ``logspace(log10 E_thr, log10 max_ref E_z, 40)`` (``plot_E_layers``)
``ec_x``, ``ec_y``  ``linspace(-30, 30, 101)`` mm (``plot_ECEtas`` / ``plot_ECPhis``)
``width_x/y``       ``linspace(0, 30, 101)`` mm (``plot_ECWidthEtas`` / ``plot_ECWidthPhis``)
``ec_r``            ``linspace(0, 42, 101)`` mm (``plot_ECR``)
``width_r``         ``linspace(0, 20, 101)`` mm (``plot_ECWidthR``)
``sparsity``        ``linspace(0, 1, 21)`` (``plot_sparsity``)
``voxel_energy``    ``logspace(log10 E_thr, log10 max_ref voxel, 50)`` over all voxels (``plot_cell_dist``)
==================  =================================================================================

E_thr is the voxel threshold (the official ``min_energy``, 15.15 keV on dataset 2; the smallest of the
detectors' thresholds when several are pooled) and R the outer radius of the mesh (41.85 mm on the
CaloChallenge meshes, where the official ranges apply unchanged). Bins are ``np.histogram``'s: half-open,
the last one closed. As in the official code (``plt.hist(..., density=True)`` times the bin widths),
values outside the range are dropped and each histogram is normalised to unit sum over its bins, so an
empty layer (E_z below E_thr) does not enter ``e_layer``.

Our own groups, under their own names: ``etot_einc_adaptive`` and ``e_layer_adaptive`` (the same features
binned from the reference: ``n_bins`` equal bins over its [0.05 %, 99.95 %] quantile range widened by 5 %,
or log bins from its smallest positive to its largest value, capped at max(10, √N_ref) bins, *plus an
underflow and an overflow bin that count*: probability outside the reference range, e.g. empty layers or a
response far from 1, is penalised instead of dropped), ``depth`` (energy-weighted mean layer, adaptive
binning with under/overflow) and the profiles ``profile_z/r/phi`` (the mesh bins filled with energy, so
the normalised histogram is the mean energy-weighted profile).

Separation power (triangular discrimination; official ``_separation_power``, Diefenbacher et al.
2009.03796 eq. 15) of two histograms normalised to unit sum: ``S = ½ Σ_i (h1_i − h2_i)² / (h1_i + h2_i +
1e-16)``. S = 0 for identical and 1 for disjoint histograms; NaN when either histogram is empty.

Every histogram is stored as ``[underflow, inner bins..., overflow]`` (``len(edges) + 1`` counts); the
official groups use only the inner bins for S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from caloforge.evaluation.features import ShowerFeatures
from caloforge.platform.geometry import Mesh

HistKind = Literal["values", "profile", "spectrum"]
Binning = Literal["official", "adaptive", "mesh"]


@dataclass(frozen=True)
class GroupSpec:
    kind: HistKind
    per_layer: bool
    binning: Binning
    log: bool
    label: str
    attr: str  # ShowerFeatures attribute (or property) holding the per-shower values


GROUP_SPECS: dict[str, GroupSpec] = {
    # the official CaloChallenge histograms
    "etot_einc": GroupSpec(
        "values", False, "official", False, r"$E_\mathrm{tot}/E_\mathrm{inc}$", "etot_over_einc"
    ),
    "e_layer": GroupSpec("values", True, "official", True, "layer energy [MeV]", "e_layer_mev"),
    "ec_x": GroupSpec("values", True, "official", False, r"$\langle x\rangle$ [mm]", "ec_x_mm"),
    "ec_y": GroupSpec("values", True, "official", False, r"$\langle y\rangle$ [mm]", "ec_y_mm"),
    "width_x": GroupSpec("values", True, "official", False, r"$\sigma_x$ [mm]", "width_x_mm"),
    "width_y": GroupSpec("values", True, "official", False, r"$\sigma_y$ [mm]", "width_y_mm"),
    "ec_r": GroupSpec("values", True, "official", False, r"$\langle r\rangle$ [mm]", "ec_r_mm"),
    "width_r": GroupSpec("values", True, "official", False, r"$\sigma_r$ [mm]", "width_r_mm"),
    "sparsity": GroupSpec("values", True, "official", False, "fraction of empty voxels", "sparsity"),
    "voxel_energy": GroupSpec("spectrum", False, "official", True, "voxel energy [MeV]", "voxel_counts"),
    # ours
    "etot_einc_adaptive": GroupSpec(
        "values", False, "adaptive", False, r"$E_\mathrm{tot}/E_\mathrm{inc}$", "etot_over_einc"
    ),
    "e_layer_adaptive": GroupSpec("values", True, "adaptive", True, "layer energy [MeV]", "e_layer_mev"),
    "depth": GroupSpec("values", False, "adaptive", False, "energy-weighted mean layer", "depth"),
    "profile_z": GroupSpec("profile", False, "mesh", False, "layer", "e_layer_mev"),
    "profile_r": GroupSpec("profile", False, "mesh", False, "r [mm]", "e_r_mev"),
    "profile_phi": GroupSpec("profile", False, "mesh", False, r"$\phi$ [rad]", "e_phi_mev"),
}
GROUPS: tuple[str, ...] = tuple(GROUP_SPECS)
OFFICIAL_GROUPS: tuple[str, ...] = tuple(g for g, s in GROUP_SPECS.items() if s.binning == "official")
QUANTILE_RANGE = (0.0005, 0.9995)
RANGE_PAD = 0.05
DISCRETE_MIN_REPEAT = 5  # a feature is treated as discrete when each value repeats >= 5 times on average
MIN_BINS = 10
SEP_EPS = 1e-16  # official: (h1 - h2)**2 / (h1 + h2 + 1e-16)

# official datasets 2/3: (low, high, number of edges); lengths in mm on a mesh of outer radius 41.85 mm
CALOCHALLENGE_R_MAX_MM = 41.85
OFFICIAL_LINEAR: dict[str, tuple[float, float, int, bool]] = {  # (low, high, edges, scales with R)
    "etot_einc": (0.5, 1.5, 101, False),
    "ec_x": (-30.0, 30.0, 101, True),
    "ec_y": (-30.0, 30.0, 101, True),
    "width_x": (0.0, 30.0, 101, True),
    "width_y": (0.0, 30.0, 101, True),
    "ec_r": (0.0, 42.0, 101, True),
    "width_r": (0.0, 20.0, 101, True),
    "sparsity": (0.0, 1.0, 21, False),
}
OFFICIAL_E_LAYER_EDGES = 40  # np.logspace(log10(min_energy), log10(max E_layer of the reference), 40)
OFFICIAL_VOXEL_EDGES = 50  # np.logspace(log10(min_energy), log10(max voxel of the reference), 50)


@dataclass(frozen=True)
class HistDef:
    """One histogram: ``name`` is ``<group>`` or ``<group>/<layer>``."""

    group: str
    layer: int | None

    @property
    def name(self) -> str:
        return self.group if self.layer is None else f"{self.group}/{self.layer}"

    @property
    def spec(self) -> GroupSpec:
        return GROUP_SPECS[self.group]

    @property
    def kind(self) -> HistKind:
        return self.spec.kind

    @property
    def log(self) -> bool:
        return self.spec.log

    @property
    def official(self) -> bool:
        return self.spec.binning == "official"

    @property
    def label(self) -> str:
        text = self.spec.label
        return text if self.layer is None else f"{text}, layer {self.layer}"


def hist_defs(n_z: int, groups: tuple[str, ...] = GROUPS) -> list[HistDef]:
    unknown = sorted(set(groups) - set(GROUP_SPECS))
    if unknown:
        raise ValueError(f"unknown HLF group(s) {unknown} (known: {list(GROUP_SPECS)})")
    out: list[HistDef] = []
    for g in groups:
        if GROUP_SPECS[g].per_layer:
            out += [HistDef(g, z) for z in range(n_z)]
        else:
            out.append(HistDef(g, None))
    return out


def feature_values(defn: HistDef, feats: ShowerFeatures) -> np.ndarray:
    """Per-shower values (N,) of a ``values`` histogram."""
    arr = getattr(feats, defn.spec.attr)
    return arr if defn.layer is None else arr[:, defn.layer]


def linear_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Reference-driven linear binning (module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.array([-0.5, 0.5])
    uniq = np.unique(v)
    if uniq.size == 1 or (uniq.size <= n_bins and v.size >= DISCRETE_MIN_REPEAT * uniq.size):
        if uniq.size == 1:
            half = 0.5 * max(abs(uniq[0]), 1.0) * 1e-3
            return np.array([uniq[0] - half, uniq[0] + half])
        mids = 0.5 * (uniq[1:] + uniq[:-1])
        return np.concatenate([[uniq[0] - (mids[0] - uniq[0])], mids, [uniq[-1] + (uniq[-1] - mids[-1])]])
    lo, hi = np.quantile(v, QUANTILE_RANGE)
    if hi <= lo:
        lo, hi = float(uniq[0]), float(uniq[-1])
    pad = RANGE_PAD * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n_bins + 1)


def log_edges(values: np.ndarray, n_bins: int, low: float | None = None) -> np.ndarray:
    """Log binning from ``low`` (default: the smallest positive reference value) to the largest value."""
    v = np.asarray(values, dtype=np.float64)
    pos = v[np.isfinite(v) & (v > 0)]
    if pos.size == 0:
        return np.array([0.5, 2.0]) * (low if low and low > 0 else 1.0)
    lo = float(pos.min()) if low is None or low <= 0 else float(low)
    hi = float(pos.max())
    if hi <= lo:
        hi = lo * 1.01
    return np.logspace(np.log10(lo), np.log10(hi * (1 + 1e-9)), n_bins + 1)


def profile_edges(defn: HistDef, mesh: Mesh) -> np.ndarray:
    if defn.group == "profile_z":
        return np.arange(mesh.n_z + 1, dtype=np.float64)
    if defn.group == "profile_r":
        return np.asarray(mesh.r_edges_mm, dtype=np.float64)
    return np.linspace(-np.pi, np.pi, mesh.n_phi + 1)


def official_edges(
    defn: HistDef, reference: ShowerFeatures, threshold_mev: float, r_max_mm: float
) -> np.ndarray:
    """The official CaloChallenge bin edges of ``defn`` (module docstring table)."""
    if defn.group == "voxel_energy":
        return reference.voxel_edges_mev
    if defn.group == "e_layer":
        values = feature_values(defn, reference)
        lo = threshold_mev
        if not lo > 0:  # no threshold: start at the smallest positive reference value
            pos = values[values > 0]
            lo = float(pos.min()) if pos.size else 1e-3
        hi = float(np.max(values, initial=0.0))
        if hi <= lo:  # the layer is empty in the whole reference: a decade above the lower edge
            hi = lo * 10.0
        return np.logspace(np.log10(lo), np.log10(hi), OFFICIAL_E_LAYER_EDGES)
    lo, hi, n_edges, scaled = OFFICIAL_LINEAR[defn.group]
    s = r_max_mm / CALOCHALLENGE_R_MAX_MM if scaled else 1.0
    return np.linspace(lo * s, hi * s, n_edges)


def fit_binning(
    reference: ShowerFeatures,
    mesh: Mesh,
    n_bins: int,
    groups: tuple[str, ...] = GROUPS,
    *,
    threshold_mev: float,
    r_max_mm: float,
) -> dict[str, np.ndarray]:
    """Inner bin edges of every histogram, fixed by ``reference`` (module docstring).

    ``threshold_mev`` is the lower edge of the official energy bins, ``r_max_mm`` the mesh's outer radius
    (scales the official length ranges). Adaptive histograms get ``min(n_bins, max(10, √N_ref))`` bins, so
    that small (conditional) reference sets are not binned finer than their statistics support.
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    if not r_max_mm > 0:
        raise ValueError(f"r_max_mm must be > 0, got {r_max_mm}")
    n_bins = min(n_bins, max(MIN_BINS, int(np.sqrt(len(reference)))))
    edges: dict[str, np.ndarray] = {}
    for d in hist_defs(reference.n_z, groups):
        if d.kind == "profile":
            edges[d.name] = profile_edges(d, mesh)
        elif d.official:
            edges[d.name] = official_edges(d, reference, threshold_mev, r_max_mm)
        elif d.log:
            edges[d.name] = log_edges(feature_values(d, reference), n_bins)
        else:
            edges[d.name] = linear_edges(feature_values(d, reference), n_bins)
    return edges


def value_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts (len(edges) + 1,): [underflow (< edges[0]), inner bins, overflow (> edges[-1])].

    Inner bins as ``np.histogram``: half-open ``[e_i, e_i+1)``, the last one closed.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    idx = np.searchsorted(edges, v, side="right")
    idx[v == edges[-1]] = len(edges) - 1
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def histogram(defn: HistDef, feats: ShowerFeatures, edges: np.ndarray) -> np.ndarray:
    """Unnormalised histogram of one feature; always (len(edges) + 1,) with under/overflow slots."""
    if defn.kind == "values":
        return value_counts(feature_values(defn, feats), edges)
    if defn.kind == "spectrum":
        if len(feats.voxel_edges_mev) != len(edges) or not np.allclose(feats.voxel_edges_mev, edges):
            raise ValueError("voxel_energy: features were computed with different voxel bins")
        return feats.voxel_counts.sum(axis=0, dtype=np.float64)
    per = {"profile_z": feats.e_layer_mev, "profile_r": feats.e_r_mev, "profile_phi": feats.e_phi_mev}
    inner = per[defn.group].sum(axis=0)
    return np.concatenate([[0.0], inner, [0.0]])


def histograms(
    feats: ShowerFeatures, binning: dict[str, np.ndarray], groups: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Every histogram of ``groups`` (default: those ``binning`` has edges for)."""
    if groups is None:
        groups = tuple(dict.fromkeys(name.split("/")[0] for name in binning))
    return {d.name: histogram(d, feats, binning[d.name]) for d in hist_defs(feats.n_z, groups)}


def normalise(counts: np.ndarray) -> np.ndarray:
    total = float(np.sum(counts))
    return np.asarray(counts, dtype=np.float64) / total if total > 0 else np.zeros(len(counts))


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """S = ½ Σ (p1 − p2)² / (p1 + p2 + 1e-16) of the unit-sum normalisations p of two histograms.

    Returns NaN when either histogram is empty (nothing to compare).
    """
    a, b = np.asarray(h1, dtype=np.float64), np.asarray(h2, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"separation_power: histogram shapes differ {a.shape} vs {b.shape}")
    if np.any(a < 0) or np.any(b < 0):
        raise ValueError("separation_power: histograms must be non-negative")
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    p, q = normalise(a), normalise(b)
    return float(0.5 * np.sum((p - q) ** 2 / (p + q + SEP_EPS)))


def hist_separation_power(name: str, h1: np.ndarray, h2: np.ndarray) -> float:
    """Separation power of histogram ``name`` (stored with under/overflow slots): official groups compare
    the inner bins only (out-of-range values dropped, as the official code), ours every slot."""
    official = GROUP_SPECS[name.split("/")[0]].binning == "official"
    return separation_power(h1[1:-1], h2[1:-1]) if official else separation_power(h1, h2)


def separation_powers(hist_a: dict[str, np.ndarray], hist_b: dict[str, np.ndarray]) -> dict[str, float]:
    """Separation power per histogram name (keys of ``hist_a``)."""
    return {name: hist_separation_power(name, hist_a[name], hist_b[name]) for name in hist_a}


def group_means(per_hist: dict[str, float]) -> dict[str, float]:
    """Mean separation power per group (NaNs ignored) plus ``mean`` over the group means."""
    by_group: dict[str, list[float]] = {}
    for name, value in per_hist.items():
        by_group.setdefault(name.split("/")[0], []).append(value)
    out = {}
    for g, vals in by_group.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[g] = float(arr.mean()) if arr.size else float("nan")
    finite = [v for v in out.values() if np.isfinite(v)]
    out["mean"] = float(np.mean(finite)) if finite else float("nan")
    return out
