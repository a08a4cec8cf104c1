"""Differentiable per-layer shower features, and a distance between two showers in them.

A one-step generator trained with an L2 distance in model space (ln-energies per voxel) settles, where it
is unsure whether a voxel is hit, on the mean of "empty" (ln ε, about 10 units below the smallest hit) and
"hit": a value below the readout threshold. Its showers then have too few hits, a voxel-energy spectrum
cut at the low end, and centres and widths that fluctuate less from shower to shower than the data's —
what the high-level classifier picks out. Song et al. 2023 found the distance to matter as much as the
method for one-step consistency models (LPIPS against L2 on images); :func:`feature_distance` is the shower
analogue: the per-layer quantities the CaloChallenge high-level features are made of, computed with a soft
readout threshold so that they have gradients.

From model-space showers x̂ (B, Z, P, R), via the model's transform (``log_energy``: ln(E + ε) per voxel;
``log_max_Z``: the inverse's per-layer clamp; ``log_eps``, ``threshold_mev``) and its mesh:

    l = ln(E + ε);   E = exp(min(l, l_max,z)) − ε  (≥ 0);   g = sigmoid((l − ln(E_thr + ε)) / τ)
    e = E · g  (soft-thresholded energies);   E_z = Σ_{P,R} e
    ⟨c⟩_z = Σ c e / E_z,   σ_c,z = sqrt(⟨c²⟩_z − ⟨c⟩_z² + δ)  for c = x, y, r (bin centres in mm,
            x = r_c cos φ_c, y = r_c sin φ_c, as ``evaluation.features``)
    occupancy_z = mean_{P,R} g  (the soft fraction of hit voxels: 1 − the evaluation's sparsity)

``τ`` (``tau``, in units of ln E) is how soft the threshold is: a voxel at the threshold counts half, one τ
above it 73 %.

:func:`feature_distance` between a shower batch ``a`` and the ``b`` it should match, per shower:

    d = mean_k Σ_z w_z (f_k,z(a) − f_k,z(b))² / s_k²,   w_z = E_z(b) / Σ_z E_z(b)

over the seven kinds k (centres and widths in x, y, r; occupancy), each in units of its spread s_k over
the batch ``b`` (the energy-weighted variance of f_k,z(b) about its per-layer batch mean, all layers
pooled, at least 10⁻⁴ of the feature's mean square) — as a classifier that standardises its inputs sees
them. Weights and scales come from ``b`` without gradients (``b`` is the target: the teacher's or the
target network's showers). Layers with little energy weigh little, as in the evaluation, whose width and
centre features of near-empty layers are noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from caloforge.platform.geometry import Mesh

FEATURE_KINDS = ("ec_x", "ec_y", "ec_r", "width_x", "width_y", "width_r", "occupancy")
_WIDTH_DELTA_MM2 = 1e-6  # δ inside the width's square root (mm²): a finite gradient for a one-voxel layer
_DIV_EPS = 1e-12
_SCALE_FLOOR = 1e-4  # s_k² ≥ 1e-4 × the mean square of the feature


@dataclass(frozen=True)
class LayerFeatures:
    """Per-layer features of a batch, each (B, Z): ``energy`` E_z (MeV, soft threshold) and the
    ``values`` of :data:`FEATURE_KINDS`."""

    energy: torch.Tensor
    values: dict[str, torch.Tensor]


class SoftLayerFeatures:
    """x̂ (B, Z, P, R) in model space → :class:`LayerFeatures` (module docstring), for ``transform`` (a
    ``_LogTransform``: ``log_energy``, ``log_max_Z``, ``log_eps``, ``threshold_mev``) on ``mesh``."""

    def __init__(self, transform: nn.Module, mesh: Mesh, tau: float = 1.0) -> None:
        if isinstance(tau, bool) or not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"SoftLayerFeatures: tau must be a finite number > 0, got {tau!r}")
        for attr in ("log_energy", "log_max_Z", "log_eps", "threshold_mev"):
            if not hasattr(transform, attr):
                raise ValueError(
                    f"SoftLayerFeatures: the transform {type(transform).__name__} has no {attr!r} (a log "
                    "transform of platform/transforms.py is needed)"
                )
        self.transform = transform
        self.mesh = mesh
        self.tau = float(tau)
        coords_3Q = np.stack(mesh.voxel_coordinates_mm()).reshape(3, -1)  # x, y, r of each (φ, r) voxel
        self.coords_3Q = torch.as_tensor(coords_3Q, dtype=torch.float32)

    def __call__(self, x_BZPR: torch.Tensor) -> LayerFeatures:
        if x_BZPR.ndim != 4 or tuple(x_BZPR.shape[1:]) != self.mesh.shape:
            mesh = ", ".join(map(str, self.mesh.shape))
            raise ValueError(f"SoftLayerFeatures: expected (B, {mesh}), got {tuple(x_BZPR.shape)}")
        tr = self.transform
        log_e = tr.log_energy(x_BZPR)  # type: ignore[operator]
        eps = tr.log_eps.float()  # type: ignore[union-attr]
        log_max = tr.log_max_Z.float()[None, :, None, None]  # type: ignore[index]
        log_thr = torch.log(tr.threshold_mev.float() + eps)  # type: ignore[union-attr]
        energy = (torch.exp(torch.minimum(log_e, log_max)) - eps).clamp_min(0.0)
        gate = torch.sigmoid((log_e - log_thr) / self.tau)
        b, n_z = x_BZPR.shape[:2]
        e_BZQ = (energy * gate).reshape(b, n_z, -1)
        e_z = e_BZQ.sum(dim=2)
        coords = self.coords_3Q.to(device=x_BZPR.device, dtype=e_BZQ.dtype)
        m1 = torch.einsum("bzq,cq->bzc", e_BZQ, coords) / (e_z[..., None] + _DIV_EPS)
        m2 = torch.einsum("bzq,cq->bzc", e_BZQ, coords * coords) / (e_z[..., None] + _DIV_EPS)
        width = torch.sqrt((m2 - m1 * m1).clamp_min(0.0) + _WIDTH_DELTA_MM2)
        values = {
            "ec_x": m1[..., 0],
            "ec_y": m1[..., 1],
            "ec_r": m1[..., 2],
            "width_x": width[..., 0],
            "width_y": width[..., 1],
            "width_r": width[..., 2],
            "occupancy": gate.reshape(b, n_z, -1).mean(dim=2),
        }
        return LayerFeatures(energy=e_z, values=values)


def _weights_and_scales(b: LayerFeatures) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_z (B, Z) = E_z / Σ_z E_z of ``b`` and s_k² per kind (module docstring), without gradients."""
    with torch.no_grad():
        e_z = b.energy.float()
        w_BZ = e_z / (e_z.sum(dim=1, keepdim=True) + _DIV_EPS)
        w_total = w_BZ.sum().clamp_min(_DIV_EPS)
        scales = {}
        for kind in FEATURE_KINDS:
            fb = b.values[kind].float()
            spread = fb - fb.mean(dim=0, keepdim=True)
            scale2 = (w_BZ * spread * spread).sum() / w_total
            # a floor for a feature that does not vary over the batch (one shower; y on a 1-bin φ mesh)
            floor = _SCALE_FLOOR * (w_BZ * fb * fb).sum() / w_total + _DIV_EPS
            scales[kind] = torch.maximum(scale2, floor)
    return w_BZ, scales


def _check_shapes(a: LayerFeatures, b: LayerFeatures, who: str) -> None:
    if a.energy.shape != b.energy.shape:
        raise ValueError(f"{who}: shapes {tuple(a.energy.shape)} != {tuple(b.energy.shape)}")


def feature_distance(a: LayerFeatures, b: LayerFeatures) -> torch.Tensor:
    """Per-shower distance (B,) of ``a`` from ``b`` (module docstring); weights and scales from ``b``,
    without gradients."""
    _check_shapes(a, b, "feature_distance")
    w_BZ, scales = _weights_and_scales(b)
    terms = [
        (w_BZ * (a.values[k].float() - b.values[k].float()) ** 2).sum(dim=1) / scales[k]
        for k in FEATURE_KINDS
    ]
    return torch.stack(terms).mean(dim=0)


def moment_distance(a: LayerFeatures, b: LayerFeatures) -> torch.Tensor:
    """Scalar distance of the batch ``a``'s per-layer feature distributions from ``b``'s: for each kind,
    Σ_z w̄_z ((mean_a − mean_b)² + (std_a − std_b)²) / s_k² (means and standard deviations over the batch;
    w̄_z the batch mean of ``b``'s energy fractions), averaged over the kinds. For batches with the same
    conditions row by row (a generator's samples for the data's conditions): nothing pairs the showers."""
    _check_shapes(a, b, "moment_distance")
    w_BZ, scales = _weights_and_scales(b)
    w_Z = w_BZ.mean(dim=0)
    terms = []
    for kind in FEATURE_KINDS:
        fa, fb = a.values[kind].float(), b.values[kind].float()
        d_mean = fa.mean(dim=0) - fb.mean(dim=0)
        d_std = torch.sqrt(fa.var(dim=0, unbiased=False) + _DIV_EPS) - torch.sqrt(
            fb.var(dim=0, unbiased=False) + _DIV_EPS
        )
        terms.append((w_Z * (d_mean**2 + d_std**2)).sum() / scales[kind])
    return torch.stack(terms).mean()


__all__ = ["FEATURE_KINDS", "LayerFeatures", "SoftLayerFeatures", "feature_distance", "moment_distance"]
