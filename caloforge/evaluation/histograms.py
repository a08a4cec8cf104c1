"""HLF histograms with binning fixed by the reference, and their separation power.

Every high-level feature of :mod:`caloforge.evaluation.features` becomes one or more 1-D histograms,
collected in feature *groups* (``GROUPS``). As in the official CaloChallenge code
(``evaluate_plotting_helper.py``), the binning of each histogram is fixed by the reference sample and the
same bins are used for the sample. Because our meshes and energy ranges vary, the ranges are derived from
the reference rather than hard-coded:

- linear features: ``n_bins`` equal bins over the reference's [0.05 %, 99.95 %] quantile range, widened
  by 5 % on each side; discrete features (at most ``n_bins`` distinct reference values, each repeated
  five times on average, e.g. sparsity on a small mesh) get one bin per value instead;
- ``n_bins`` is capped at max(10, √N_ref) so small (conditional) reference sets are not over-binned;
- energies (per layer, voxels): ``n_bins`` log bins from the smallest positive reference value (or the
  voxel threshold) to the largest, as the official ``np.logspace(log10(min_energy), log10(max), n)``;
- profiles (longitudinal / radial / azimuthal): the mesh bins, filled with energy, so the normalised
  histogram is the mean energy-weighted profile.

Unlike the official code, every value histogram has an underflow and an overflow bin, so that a sample
putting probability outside the reference range is penalised instead of silently dropped.

Separation power (triangular discrimination; CaloChallenge eq. / Diefenbacher et al. 2009.03796 eq. 15)
of two histograms normalised to unit sum: ``S = ½ Σ_i (h1_i − h2_i)² / (h1_i + h2_i)`` (bins with
h1 + h2 = 0 contribute 0). S = 0 for identical and 1 for disjoint histograms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from caloforge.evaluation.features import ShowerFeatures
from caloforge.platform.geometry import Mesh

HistKind = Literal["values", "profile", "spectrum"]

# group -> (kind, per_layer, log bins, axis label)
GROUP_SPECS: dict[str, tuple[HistKind, bool, bool, str]] = {
    "etot_einc": ("values", False, False, r"$E_\mathrm{tot}/E_\mathrm{inc}$"),
    "e_layer": ("values", True, True, "layer energy [MeV]"),
    "ec_x": ("values", True, False, r"$\langle x\rangle$ [mm]"),
    "ec_y": ("values", True, False, r"$\langle y\rangle$ [mm]"),
    "width_x": ("values", True, False, r"$\sigma_x$ [mm]"),
    "width_y": ("values", True, False, r"$\sigma_y$ [mm]"),
    "ec_r": ("values", True, False, r"$\langle r\rangle$ [mm]"),
    "width_r": ("values", True, False, r"$\sigma_r$ [mm]"),
    "sparsity": ("values", True, False, "fraction of empty voxels"),
    "depth": ("values", False, False, "energy-weighted mean layer"),
    "voxel_energy": ("spectrum", False, True, "voxel energy [MeV]"),
    "profile_z": ("profile", False, False, "layer"),
    "profile_r": ("profile", False, False, "r [mm]"),
    "profile_phi": ("profile", False, False, r"$\phi$ [rad]"),
}
GROUPS: tuple[str, ...] = tuple(GROUP_SPECS)
QUANTILE_RANGE = (0.0005, 0.9995)
RANGE_PAD = 0.05
DISCRETE_MIN_REPEAT = 5  # a feature is treated as discrete when each value repeats >= 5 times on average
MIN_BINS = 10

_VALUE_ATTR = {
    "e_layer": "e_layer_mev",
    "ec_x": "ec_x_mm",
    "ec_y": "ec_y_mm",
    "width_x": "width_x_mm",
    "width_y": "width_y_mm",
    "ec_r": "ec_r_mm",
    "width_r": "width_r_mm",
    "sparsity": "sparsity",
}


@dataclass(frozen=True)
class HistDef:
    """One histogram: ``name`` is ``<group>`` or ``<group>/<layer>``."""

    group: str
    layer: int | None

    @property
    def name(self) -> str:
        return self.group if self.layer is None else f"{self.group}/{self.layer}"

    @property
    def kind(self) -> HistKind:
        return GROUP_SPECS[self.group][0]

    @property
    def log(self) -> bool:
        return GROUP_SPECS[self.group][2]

    @property
    def label(self) -> str:
        text = GROUP_SPECS[self.group][3]
        return text if self.layer is None else f"{text}, layer {self.layer}"


def hist_defs(n_z: int, groups: tuple[str, ...] = GROUPS) -> list[HistDef]:
    unknown = sorted(set(groups) - set(GROUP_SPECS))
    if unknown:
        raise ValueError(f"unknown HLF group(s) {unknown} (known: {list(GROUP_SPECS)})")
    out: list[HistDef] = []
    for g in groups:
        if GROUP_SPECS[g][1]:
            out += [HistDef(g, z) for z in range(n_z)]
        else:
            out.append(HistDef(g, None))
    return out


def feature_values(defn: HistDef, feats: ShowerFeatures) -> np.ndarray:
    """Per-shower values (N,) of a ``values`` histogram."""
    if defn.group == "etot_einc":
        return feats.etot_over_einc
    if defn.group == "depth":
        return feats.depth
    arr = getattr(feats, _VALUE_ATTR[defn.group])
    return arr[:, defn.layer]


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


def fit_binning(
    reference: ShowerFeatures, mesh: Mesh, n_bins: int, groups: tuple[str, ...] = GROUPS
) -> dict[str, np.ndarray]:
    """Inner bin edges of every histogram, fixed by ``reference``.

    Value histograms get ``min(n_bins, max(10, √N_ref))`` bins, so that small reference sets (conditional
    groups) are not binned finer than their statistics support.
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    n_bins = min(n_bins, max(MIN_BINS, int(np.sqrt(len(reference)))))
    edges: dict[str, np.ndarray] = {}
    for d in hist_defs(reference.n_z, groups):
        if d.kind == "profile":
            edges[d.name] = profile_edges(d, mesh)
        elif d.kind == "spectrum":
            edges[d.name] = reference.voxel_edges_mev
        elif d.log:
            edges[d.name] = log_edges(feature_values(d, reference), n_bins)
        else:
            edges[d.name] = linear_edges(feature_values(d, reference), n_bins)
    return edges


def value_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts (len(edges) + 1,): [underflow (< edges[0]), inner bins, overflow (>= edges[-1])]."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    idx = np.searchsorted(edges, v, side="right")
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
    feats: ShowerFeatures, binning: dict[str, np.ndarray], groups: tuple[str, ...] = GROUPS
) -> dict[str, np.ndarray]:
    return {d.name: histogram(d, feats, binning[d.name]) for d in hist_defs(feats.n_z, groups)}


def normalise(counts: np.ndarray) -> np.ndarray:
    total = float(np.sum(counts))
    return np.asarray(counts, dtype=np.float64) / total if total > 0 else np.zeros(len(counts))


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """S = ½ Σ (p1 − p2)² / (p1 + p2) of the unit-sum normalisations p of two histograms.

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
    s = p + q
    nz = s > 0
    return float(0.5 * np.sum((p[nz] - q[nz]) ** 2 / s[nz]))


def separation_powers(hist_a: dict[str, np.ndarray], hist_b: dict[str, np.ndarray]) -> dict[str, float]:
    """Separation power per histogram name (keys of ``hist_a``)."""
    return {name: separation_power(hist_a[name], hist_b[name]) for name in hist_a}


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
