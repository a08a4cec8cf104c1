"""Rebuild a ``ShowerModel`` for another readout mesh, reusing its mesh-independent weights.

A ``ShowerDiT`` has no per-index table of the mesh: patches are embedded by one linear map, positions come
from the patch centres' physical coordinates (fractions of depth and radius, azimuth harmonics;
``backbone.patch_coordinates``), and the token count simply follows the mesh. So the backbone trained on one
detector's mesh is a valid starting point on another (CaloDiT-2's transfer to new geometries, Raikwar et al.
2025). What depends on the mesh is rebuilt:

- the fitted transforms (``transform.*``, ``energy_transform.*``): fitted from the new data's stats block;
- the patch grid (``patch_coords_TC``, not stored): derived from the new mesh; the patch must divide it;
- the token positions: the depth and radius fractions of a patch centre stand for the physical depth and
  radius the base was trained at. With the specs of the new detector and of the source's detectors
  (``detector``, ``source_detectors``), the new mesh is placed in that frame (``place_mesh``): a base
  trained from scratch has seen a range of frames (each detector's own depth in X0 and radius in
  Molière radii), and the new mesh takes the frame in that range that gives its layers the base's layer
  pitch where it can (a 30-layer, 13.8 X0 cut of a 45-layer, 20.7 X0 stack sits on the base's first 30
  layer positions, not stretched over all 45 where the base saw a whole 22 X0 shower), and is scaled
  physically beyond it; the new model records the frame and its extent in it (``position_frame``,
  ``position_extent``). Without specs the new mesh is its own frame (fractions of it), as a model trained
  on it from scratch;
- the layer-energy head's layer-indexed tensors (``energy_head.fc_in.weight`` (W, n_z),
  ``energy_head.fc_out.weight`` (n_z, W), ``energy_head.fc_out.bias`` (n_z,)): their rows/columns *are*
  the old detector's layers, so they are resampled along the depth coordinate of the position frame:
  the output rows (a velocity per layer) interpolated linearly at the new layer centres (held constant
  beyond the old depth), the input columns (the weight of one layer's standardised energy) summed over
  the old layers each new layer overlaps, by the overlap's share of the old layer; layers deeper than
  the old mesh get no input weight. The head's MLP blocks, time and context layers transfer;
- the patch embedding and output layer (``patch_embed.*``, ``final_layer.linear.*``) transfer only when the
  patch volume is unchanged (a ``patch_size`` override with another volume re-initialises them);
- the detector embedding is copied row by row by detector *name* (a ``vocab`` may reorder, add or drop
  detectors): a detector of the new vocabulary that the source does not know starts at the mean of the
  copied rows (as ``ShowerModel.with_detector``), spare rows keep their fresh initialisation.

Every other parameter (timestep and kinematics embedders, particle embedding, DiT blocks, adaLN, the final
adaLN, an optional learned position projection) is copied when its name and shape match; anything else keeps
the new model's seeded initialisation, and the returned ``TransferReport`` names each tensor's fate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.geometry import DetectorSpec, Mesh
from caloforge.platform.shower_model import Lineage, ShowerModel, as_mesh

logger = logging.getLogger("caloforge.platform")

DETECTOR_EMBED = "denoiser.net.detector_embed.weight"
FITTED_PREFIXES = ("transform.", "energy_transform.")
# The layer-energy head's tensors indexed by layer: rows of outputs (interpolated along depth) and
# columns of inputs (summed over the depth each new layer covers).
LAYER_ROWS = ("energy_head.fc_out.weight", "energy_head.fc_out.bias")
LAYER_COLUMNS = ("energy_head.fc_in.weight",)


@dataclass(frozen=True)
class TransferReport:
    """What ``rebuild_for_mesh`` did with every tensor of the new model's state dict.

    ``copied``: parameters taken unchanged from the source; ``resampled``: the layer-indexed ones resampled
    along depth, each with how; ``reinitialised``: parameters that keep the new model's fresh
    initialisation, each with the reason (shape differs from the source's, or the source has no such
    tensor); ``fitted``: buffers fitted from the new stats block; ``detector_rows``: how each row of the
    detector embedding was set (detector name → ``copied`` | ``mean of copied rows``; spare rows are
    absent: they keep their fresh initialisation). ``positions``: where the new mesh's tokens sit (its
    ``position_extent`` in which frame, or why it is its own frame).
    """

    source_mesh: tuple[int, int, int]
    target_mesh: tuple[int, int, int]
    copied: tuple[str, ...]
    reinitialised: dict[str, str]
    fitted: tuple[str, ...]
    detector_rows: dict[str, str]
    resampled: dict[str, str] = field(default_factory=dict)
    positions: str = ""

    def summary(self) -> str:
        """One line for logs."""
        reinit = ", ".join(f"{k} ({v})" for k, v in self.reinitialised.items()) or "none"
        return (
            f"mesh {self.source_mesh} -> {self.target_mesh}: copied {len(self.copied)} tensors, "
            f"resampled {len(self.resampled)} along depth, re-initialised {len(self.reinitialised)}: "
            f"{reinit}; fitted from stats: {len(self.fitted)}; positions: {self.positions}"
        )


def detector_extent(spec: DetectorSpec) -> tuple[float, float]:
    """A detector's mesh extent in physical units: (depth in X0, outer radius in Molière radii)."""
    return (float(spec.depth_x0), float(spec.radius_rm))


def place_mesh(
    source_frame: tuple[float, float] | None,
    source_n_z: int,
    detector: DetectorSpec | None,
    source_detectors: Sequence[DetectorSpec],
) -> tuple[tuple[float, float], tuple[float, float] | None, str]:
    """(position_extent, position_frame, description) of ``detector``'s mesh in the source's frame; (1, 1)
    and no frame when either side is unknown (the description says which).

    A model trained from scratch reads positions as fractions of its mesh, so for its detectors a position
    of 1 stands for each one's own depth and radius: a *range* of frames, from the shallowest to the
    deepest of ``source_detectors`` (in X0; the radius likewise in Molière radii). The new mesh gets the
    frame in that range that comes closest to giving its layers the source's layer pitch (depth ×
    ``source_n_z`` / its n_z, clamped to the range): a detector whose layers are as thick as the
    source's ones sit on the source's own layer grid (the positions the backbone was trained at), one
    beyond the range is scaled physically from the nearest end. The radius frame is the new radius clamped
    to the range. A source with a recorded frame (``source_frame``: it was itself placed) is that one
    frame."""
    if detector is None:
        return (1.0, 1.0), None, "fractions of the new mesh (no detector spec given)"
    depth, radius = detector_extent(detector)
    if source_frame is not None:
        (d_lo, r_lo), (d_hi, r_hi) = source_frame, source_frame
    elif source_detectors:
        extents = np.array([detector_extent(d) for d in source_detectors], dtype=np.float64)
        (d_lo, r_lo), (d_hi, r_hi) = extents.min(axis=0), extents.max(axis=0)
    else:
        return (1.0, 1.0), None, "fractions of the new mesh (no spec of the source's detectors)"
    same_pitch = depth * source_n_z / detector.mesh.n_z
    frame = (float(np.clip(same_pitch, d_lo, d_hi)), float(np.clip(radius, r_lo, r_hi)))
    extent = (depth / frame[0], radius / frame[1])
    where = (
        f"{detector.name} ({depth:.3g} X0, {radius:.3g} R_M) at extent ({extent[0]:.3f}, {extent[1]:.3f}) "
        f"of the frame ({frame[0]:.3g} X0, {frame[1]:.3g} R_M; the source's range {d_lo:.3g}-{d_hi:.3g} X0, "
        f"{r_lo:.3g}-{r_hi:.3g} R_M)"
    )
    return extent, frame, where


def depth_resampling(
    n_source: int, source_depth: float, n_target: int, target_depth: float
) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n_target, n_source), columns (n_target, n_source)) for layer-indexed tensors of a mesh of
    ``n_source`` equal layers over [0, source_depth] moved to ``n_target`` over [0, target_depth] (depths in
    one frame). ``rows``: linear interpolation at the target layer centres, constant beyond the source's
    first/last centre (for per-layer outputs). ``columns``: the share of each source layer inside each
    target layer (for per-layer inputs: a target layer's weight is the sum of the weights of the depth it
    covers; nothing beyond the source's depth)."""
    src_edges = np.linspace(0.0, source_depth, n_source + 1)
    tgt_edges = np.linspace(0.0, target_depth, n_target + 1)
    src_centres = 0.5 * (src_edges[1:] + src_edges[:-1])
    tgt_centres = 0.5 * (tgt_edges[1:] + tgt_edges[:-1])
    rows = np.stack([np.interp(tgt_centres, src_centres, np.eye(n_source)[s]) for s in range(n_source)], 1)
    lo = np.maximum(tgt_edges[:-1, None], src_edges[None, :-1])
    hi = np.minimum(tgt_edges[1:, None], src_edges[None, 1:])
    columns = np.clip(hi - lo, 0.0, None) / np.diff(src_edges)[None, :]
    columns[columns < 1e-9] = 0.0  # edges that coincide up to rounding share no depth
    return rows, columns


def rebuild_for_mesh(
    model: ShowerModel,
    mesh: Mesh | tuple[int, int, int],
    stats: Mapping[str, Any],
    *,
    vocab: ConditionVocab | None = None,
    lineage: Lineage | None = None,
    patch_size: tuple[int, int, int] | None = None,
    detector: DetectorSpec | None = None,
    source_detectors: Sequence[DetectorSpec] = (),
) -> tuple[ShowerModel, TransferReport]:
    """A new ``ShowerModel`` on ``mesh`` with ``model``'s config (``patch_size`` overrides the patch), its
    transforms fitted from ``stats`` (the new data's stats block), and every mesh-independent parameter of
    ``model`` copied (module docstring). ``detector``: the spec of the new mesh's detector;
    ``source_detectors``: the specs of the detectors ``model`` was trained on; with both (or a source with a
    recorded ``position_frame``) the new mesh is placed at its physical depth and radius in the source's
    position frame. Returns the model (on the CPU, in float32, train mode) and a ``TransferReport``, which
    is also logged.

    ``vocab`` defaults to the source's; ``lineage`` to an empty one. ValueError when the patch does not
    divide the mesh (naming both) or ``stats`` does not fit the mesh.
    """
    if not isinstance(model, ShowerModel):
        raise ValueError(f"rebuild_for_mesh: model must be a ShowerModel, got {type(model).__name__}")
    target_mesh = as_mesh(mesh)
    config = model.config if patch_size is None else replace(model.config, patch_size=tuple(patch_size))
    patch = config.backbone_config().patch_size
    bad = [
        f"{axis}={n} is not a multiple of {p}"
        for axis, n, p in zip(("n_z", "n_phi", "n_r"), target_mesh.shape, patch, strict=True)
        if n % p
    ]
    if bad:
        raise ValueError(
            f"rebuild_for_mesh: patch_size {tuple(patch)} does not divide the mesh {target_mesh.shape} "
            f"({'; '.join(bad)}); pass patch_size= a patch that divides it"
        )
    if detector is not None and detector.geometry.shape != target_mesh.shape:
        raise ValueError(
            f"rebuild_for_mesh: detector {detector.name!r} has the mesh {detector.geometry.shape}, "
            f"not {target_mesh.shape}"
        )
    extent, frame, positions = place_mesh(
        model.config.position_frame, model.mesh_shape[0], detector, source_detectors
    )
    config = replace(config, position_extent=extent, position_frame=frame)
    new = ShowerModel.build(
        config, vocab if vocab is not None else model.vocab, stats, target_mesh, lineage=lineage
    )
    report = replace(_copy_mesh_independent(model, new), positions=positions)
    logger.info("rebuild_for_mesh: %s", report.summary())
    return new, report


@torch.no_grad()
def _copy_mesh_independent(source: ShowerModel, target: ShowerModel) -> TransferReport:
    src_params = dict(source.named_parameters())
    copied: list[str] = []
    reinitialised: dict[str, str] = {}
    detector_rows: dict[str, str] = {}
    resampled = _resample_layer_tensors(source, target)
    for name, param in target.named_parameters():
        if name in resampled:
            continue
        if name == DETECTOR_EMBED:
            detector_rows = _copy_detector_rows(source, target)
            if detector_rows:
                copied.append(name)
            else:
                reinitialised[name] = "no detector in common with the source vocabulary"
            continue
        src = src_params.get(name)
        if src is None:
            reinitialised[name] = "not in the source model"
        elif tuple(src.shape) != tuple(param.shape):
            reinitialised[name] = f"shape {tuple(src.shape)} -> {tuple(param.shape)}"
        else:
            param.copy_(src.detach().to(device=param.device, dtype=param.dtype))
            copied.append(name)
    params = set(dict(target.named_parameters()))
    fitted = tuple(k for k in target.state_dict() if k not in params and k.startswith(FITTED_PREFIXES))
    return TransferReport(
        source_mesh=source.mesh_shape,
        target_mesh=target.mesh_shape,
        copied=tuple(copied),
        reinitialised=reinitialised,
        fitted=fitted,
        detector_rows=detector_rows,
        resampled=resampled,
    )


@torch.no_grad()
def _resample_layer_tensors(source: ShowerModel, target: ShowerModel) -> dict[str, str]:
    """Set the target's layer-indexed head tensors from the source's, resampled along the depth of the
    position frame (``depth_resampling``); name → how. Empty when either model has no layer-energy head
    or the two meshes' layers coincide (then they are plain copies)."""
    src_params, dst_params = dict(source.named_parameters()), dict(target.named_parameters())
    names = [n for n in (*LAYER_ROWS, *LAYER_COLUMNS) if n in src_params and n in dst_params]
    n_src, n_dst = source.mesh_shape[0], target.mesh_shape[0]
    d_src, d_dst = source.config.position_extent[0], target.config.position_extent[0]
    if not names or (n_src == n_dst and d_src == d_dst):
        return {}
    rows, columns = (torch.from_numpy(m) for m in depth_resampling(n_src, d_src, n_dst, d_dst))
    how = f"{n_src} layers over depth 0-{d_src:.3g} -> {n_dst} over 0-{d_dst:.3g}"
    out: dict[str, str] = {}
    for name in names:
        src = src_params[name].detach().to(torch.float64).cpu()
        dst = dst_params[name]
        if name in LAYER_ROWS:
            value, kind = torch.tensordot(rows, src, dims=([1], [0])), "rows interpolated"
        else:
            value, kind = src @ columns.T, "columns summed by overlap"
        dst.copy_(value.to(device=dst.device, dtype=dst.dtype))
        out[name] = f"{kind}: {how}"
    return out


def _copy_detector_rows(source: ShowerModel, target: ShowerModel) -> dict[str, str]:
    """Copy the detector embedding row by row by name; new detectors get the mean of the copied rows."""
    src_w = source.network.detector_embed.weight.detach()
    dst_w = target.network.detector_embed.weight
    rows: dict[str, str] = {}
    known = [d for d in target.vocab.detectors if d in source.vocab.detectors]
    if not known:
        return rows
    for det in known:
        dst_w[target.vocab.detector_index(det)] = src_w[source.vocab.detector_index(det)].to(dst_w)
        rows[det] = "copied"
    mean = torch.stack([src_w[source.vocab.detector_index(d)] for d in known]).mean(dim=0).to(dst_w)
    for det in target.vocab.detectors:
        if det not in rows:
            dst_w[target.vocab.detector_index(det)] = mean
            rows[det] = "mean of copied rows"
    return rows


__all__ = [
    "TransferReport",
    "depth_resampling",
    "detector_extent",
    "place_mesh",
    "rebuild_for_mesh",
]
