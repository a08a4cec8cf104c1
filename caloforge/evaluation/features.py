"""High-level features (HLF) of showers on a cylindrical mesh, vectorised over showers.

Definitions follow the CaloChallenge 2022 evaluation (Krause et al., arXiv:2410.21611; public code
``code/HighLevelFeatures.py`` and ``prepare_high_data_for_classifier`` in ``code/evaluate.py``),
generalised to any (n_z, n_phi, n_r) mesh:

- voxels *below* the evaluation threshold are set to 0 first (official
  ``np.where(shower < min_energy, 0, shower)``; CaloChallenge: 0.5 keV / 0.033 = 15.15 keV for dataset 2);
- per layer z: ``E_z = Σ_{φ,r} E_{zφr}``; ``E_tot = Σ_z E_z``; response ``E_tot / E_inc``;
- transverse coordinates of a voxel from the mesh bin centres: ``x = r_c cos φ_c``, ``y = r_c sin φ_c``
  (the official "eta" and "phi" of datasets 2 and 3);
- centre of energy per layer ``⟨x⟩_z = Σ x E / (E_z + 1e-16)`` (same for y and r) and its width
  ``σ_x = sqrt(max(⟨x²⟩_z − ⟨x⟩_z², 0))``; an empty layer has centre and width 0 (as the official code);
- sparsity per layer: the fraction of voxels of the layer that are *empty* after the threshold
  (official ``_calculate_sparsity``: ``1 − mean(E > 0)``);
- shower depth (ours, no official counterpart): the energy-weighted mean layer ``d = Σ_z z E_z / E_tot``;
- per-shower energy per layer / radial bin / angular bin (the longitudinal, radial and azimuthal profiles)
  and the per-shower histogram of non-zero voxel energies on fixed log bins (the voxel spectrum; bins as
  ``np.histogram``: half-open, the last one closed).

``ShowerFeatures.vector(kind)`` returns the HLF vector used by FPD/KPD, PRDC and the high-level classifier.
``calochallenge`` is the official ``prepare_high_data_for_classifier`` vector, which is also the official
FPD/KPD input (1 + 8 n_z + 1 values, 362 on the dataset-2 mesh):
``[log10 E_inc, log10(E_z + 1e-8) (n_z), ⟨x⟩_z/100, ⟨y⟩_z/100, σ_x,z/100, σ_y,z/100 (n_z each),
log10(E_tot + 1e-8), sparsity_z (n_z), ⟨r⟩_z/100, σ_r,z/100 (n_z each)]`` (energies in MeV, lengths in mm).
``extended`` (ours) appends E_tot/E_inc and the depth (3 + 8 n_z values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from caloforge.platform.geometry import Mesh

HLFVectorKind = Literal["calochallenge", "extended"]
LOG_LAYER_EPS_MEV = 1e-8  # official: np.log10(E_layer + 1e-8), np.log10(E_tot + 1e-8)
LENGTH_SCALE_MM = 1e2  # official HLF vector: centres and widths / 1e2
_DIV_EPS = 1e-16  # official: energy.sum() + 1e-16
CHUNK_SHOWERS = 1024


@dataclass(frozen=True)
class ShowerFeatures:
    """Per-shower high-level features of N showers (float64 unless noted)."""

    e_inc_mev: np.ndarray  # (N,)
    e_layer_mev: np.ndarray  # (N, Z)
    e_r_mev: np.ndarray  # (N, R) energy per radial bin summed over layers and angle
    e_phi_mev: np.ndarray  # (N, P) energy per angular bin summed over layers and radius
    ec_x_mm: np.ndarray  # (N, Z)
    ec_y_mm: np.ndarray  # (N, Z)
    width_x_mm: np.ndarray  # (N, Z)
    width_y_mm: np.ndarray  # (N, Z)
    ec_r_mm: np.ndarray  # (N, Z)
    width_r_mm: np.ndarray  # (N, Z)
    sparsity: np.ndarray  # (N, Z) fraction of empty voxels per layer
    voxel_counts: np.ndarray  # (N, B + 2) int32: non-zero voxels [underflow, B bins, overflow]
    voxel_edges_mev: np.ndarray  # (B + 1,) inner bin edges shared by every shower

    def __post_init__(self) -> None:
        n = len(self.e_inc_mev)
        for f in fields(self):
            if f.name == "voxel_edges_mev":
                continue
            arr = getattr(self, f.name)
            if len(arr) != n:
                raise ValueError(f"ShowerFeatures.{f.name}: {len(arr)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.e_inc_mev)

    @property
    def n_z(self) -> int:
        return self.e_layer_mev.shape[1]

    @property
    def e_tot_mev(self) -> np.ndarray:
        return self.e_layer_mev.sum(axis=1)

    @property
    def etot_over_einc(self) -> np.ndarray:
        return self.e_tot_mev / self.e_inc_mev

    @property
    def depth(self) -> np.ndarray:
        """Energy-weighted mean layer index Σ_z z E_z / E_tot (0 for an empty shower)."""
        z = np.arange(self.n_z, dtype=np.float64)
        return (self.e_layer_mev @ z) / (self.e_tot_mev + _DIV_EPS)

    def subset(self, index: np.ndarray | slice) -> ShowerFeatures:
        kw = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "voxel_edges_mev"}
        return ShowerFeatures(voxel_edges_mev=self.voxel_edges_mev, **kw)

    @staticmethod
    def concat(parts: Sequence[ShowerFeatures]) -> ShowerFeatures:
        if not parts:
            raise ValueError("ShowerFeatures.concat: nothing to concatenate")
        edges = parts[0].voxel_edges_mev
        if any(not np.array_equal(p.voxel_edges_mev, edges) for p in parts):
            raise ValueError("ShowerFeatures.concat: parts use different voxel_edges_mev")
        kw = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(ShowerFeatures)
            if f.name != "voxel_edges_mev"
        }
        return ShowerFeatures(voxel_edges_mev=edges, **kw)

    def vector(self, kind: HLFVectorKind = "calochallenge") -> np.ndarray:
        """The HLF vector (N, D) of the module docstring; ``vector_names`` gives the column names."""
        if kind not in ("calochallenge", "extended"):
            raise ValueError(f"hlf_vector: unknown kind {kind!r} (known: 'calochallenge', 'extended')")
        cols = [
            np.log10(self.e_inc_mev)[:, None],
            np.log10(self.e_layer_mev + LOG_LAYER_EPS_MEV),
            self.ec_x_mm / LENGTH_SCALE_MM,
            self.ec_y_mm / LENGTH_SCALE_MM,
            self.width_x_mm / LENGTH_SCALE_MM,
            self.width_y_mm / LENGTH_SCALE_MM,
            np.log10(self.e_tot_mev + LOG_LAYER_EPS_MEV)[:, None],
            self.sparsity,
            self.ec_r_mm / LENGTH_SCALE_MM,
            self.width_r_mm / LENGTH_SCALE_MM,
        ]
        if kind == "extended":
            cols += [self.etot_over_einc[:, None], self.depth[:, None]]
        return np.concatenate(cols, axis=1)

    def vector_names(self, kind: HLFVectorKind = "calochallenge") -> list[str]:
        z = range(self.n_z)
        names = ["log10_e_inc"]
        names += [f"log10_e_layer_{i}" for i in z]
        for prefix in ("ec_x", "ec_y", "width_x", "width_y"):
            names += [f"{prefix}_{i}" for i in z]
        names.append("log10_e_tot")
        for prefix in ("sparsity", "ec_r", "width_r"):
            names += [f"{prefix}_{i}" for i in z]
        if kind == "extended":
            names += ["etot_einc", "depth"]
        return names


def voxel_log_edges(low_mev: float, high_mev: float, n_bins: int) -> np.ndarray:
    """``n_bins`` log-spaced voxel-energy bins from ``low_mev`` to ``high_mev`` (official: ``np.logspace``,
    50 edges from the threshold to the reference's largest voxel)."""
    if not (0 < low_mev < high_mev) or not np.isfinite(high_mev):
        raise ValueError(f"voxel energy bins need 0 < low < high, got low={low_mev}, high={high_mev}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.logspace(np.log10(low_mev), np.log10(high_mev), n_bins + 1)


def apply_threshold(showers_NZPR: np.ndarray, threshold_mev: float | np.ndarray) -> np.ndarray:
    """Copy of the showers (float64) with voxels ``< threshold`` (per shower or scalar) set to 0.

    As the official ``np.where(shower < min_energy, 0, shower)``: a voxel exactly at the threshold is kept.
    """
    x = np.asarray(showers_NZPR, dtype=np.float64)
    thr = np.asarray(threshold_mev, dtype=np.float64)
    if thr.ndim == 1:
        thr = thr[:, None, None, None]
    return np.where(x < thr, 0.0, x)


def _moments(x_NZQ: np.ndarray, coord_Q: np.ndarray, e_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted mean and width of ``coord`` per layer (official GetECandWidths)."""
    m1 = (x_NZQ @ coord_Q) / (e_z + _DIV_EPS)
    m2 = (x_NZQ @ (coord_Q * coord_Q)) / (e_z + _DIV_EPS)
    return m1, np.sqrt(np.clip(m2 - m1 * m1, 0.0, None))


def compute_features(
    showers_NZPR: np.ndarray,
    energy_mev: np.ndarray,
    mesh: Mesh,
    threshold_mev: float | np.ndarray,
    voxel_edges_mev: np.ndarray,
    chunk: int = CHUNK_SHOWERS,
) -> ShowerFeatures:
    """High-level features of N showers (module docstring), in chunks of ``chunk`` showers.

    ``threshold_mev`` is a scalar or one value per shower; ``voxel_edges_mev`` the shared voxel-spectrum
    bins (non-zero voxels outside them are counted in an underflow / overflow bin).
    """
    x_all = np.asarray(showers_NZPR)
    if x_all.ndim != 4:
        raise ValueError(f"showers: expected (N, n_z, n_phi, n_r), got shape {x_all.shape}")
    n, n_z, n_phi, n_r = x_all.shape
    if (n_z, n_phi, n_r) != mesh.shape:
        raise ValueError(f"showers: mesh shape {(n_z, n_phi, n_r)} != detector mesh {mesh.shape}")
    e_inc = np.asarray(energy_mev, dtype=np.float64).reshape(-1)
    if len(e_inc) != n:
        raise ValueError(f"energy_mev: {len(e_inc)} values for {n} showers")
    if np.any(~np.isfinite(e_inc)) or np.any(e_inc <= 0):
        raise ValueError("energy_mev: incident energies must be finite and > 0")
    if not np.all(np.isfinite(x_all)):
        bad = int(np.count_nonzero(~np.isfinite(x_all)))
        raise ValueError(f"showers: {bad} non-finite voxel values (NaN/inf)")
    thr = np.broadcast_to(np.asarray(threshold_mev, dtype=np.float64), (n,))
    edges = np.asarray(voxel_edges_mev, dtype=np.float64)
    n_bins = len(edges) - 1

    x_pr, y_pr, r_pr = mesh.voxel_coordinates_mm()
    q = n_phi * n_r
    cx, cy, cr = x_pr.reshape(q), y_pr.reshape(q), r_pr.reshape(q)

    out: dict[str, list[np.ndarray]] = {k: [] for k in _CHUNK_KEYS}
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x = apply_threshold(x_all[lo:hi], thr[lo:hi])  # (B, Z, P, R)
        b = hi - lo
        xq = x.reshape(b, n_z, q)
        e_z = xq.sum(axis=2)
        out["e_layer_mev"].append(e_z)
        out["e_r_mev"].append(x.sum(axis=(1, 2)))
        out["e_phi_mev"].append(x.sum(axis=(1, 3)))
        for (mean_key, width_key), coord in (
            (("ec_x_mm", "width_x_mm"), cx),
            (("ec_y_mm", "width_y_mm"), cy),
            (("ec_r_mm", "width_r_mm"), cr),
        ):
            m, w = _moments(xq, coord, e_z)
            out[mean_key].append(m)
            out[width_key].append(w)
        out["sparsity"].append(1.0 - (xq > 0).mean(axis=2))
        nz = xq > 0
        rows = np.broadcast_to(np.arange(b)[:, None, None], xq.shape)[nz]
        vals = xq[nz]
        idx = np.searchsorted(edges, vals, side="right")  # 0: underflow, n_bins + 1: overflow
        idx[vals == edges[-1]] = n_bins  # the last bin is closed, as np.histogram
        width = n_bins + 2
        counts = np.bincount(rows * width + idx, minlength=b * width).reshape(b, width)
        out["voxel_counts"].append(counts.astype(np.int32))
    cat = {k: (np.concatenate(v) if v else _empty(k, n_z, n_phi, n_r, n_bins)) for k, v in out.items()}
    return ShowerFeatures(e_inc_mev=e_inc, voxel_edges_mev=edges, **cat)


_CHUNK_KEYS = (
    "e_layer_mev",
    "e_r_mev",
    "e_phi_mev",
    "ec_x_mm",
    "ec_y_mm",
    "width_x_mm",
    "width_y_mm",
    "ec_r_mm",
    "width_r_mm",
    "sparsity",
    "voxel_counts",
)


def _empty(key: str, n_z: int, n_phi: int, n_r: int, n_bins: int) -> np.ndarray:
    width = {"e_r_mev": n_r, "e_phi_mev": n_phi, "voxel_counts": n_bins + 2}.get(key, n_z)
    return np.zeros((0, width), dtype=np.int32 if key == "voxel_counts" else np.float64)
