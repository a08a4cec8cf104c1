"""Rebuild a ``ShowerModel`` for another readout mesh, reusing its mesh-independent weights.

A ``ShowerDiT`` has no per-index table of the mesh: patches are embedded by one linear map, positions come
from the patch centres' physical coordinates (fractions of depth and radius, azimuth harmonics;
``backbone.patch_coordinates``), and the token count simply follows the mesh. So the backbone trained on one
detector's mesh is a valid starting point on another (CaloDiT-2's transfer to new geometries, Raikwar et al.
2025). What depends on the mesh is rebuilt:

- the fitted transforms (``transform.*``, ``energy_transform.*``): fitted from the new data's stats block;
- the patch grid (``patch_coords_TC``, not stored): derived from the new mesh; the patch must divide it;
- the layer-energy head's layer-indexed tensors (``energy_head.fc_in.weight`` (W, n_z),
  ``energy_head.fc_out.weight`` (n_z, W), ``energy_head.fc_out.bias`` (n_z,)): their rows/columns *are*
  the old detector's layers, so with another n_z they keep the new model's fresh initialisation (fc_out
  starts at zero, so the head starts as v = 0); the head's MLP blocks, time and context layers transfer;
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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.geometry import Mesh
from caloforge.platform.shower_model import Lineage, ShowerModel, as_mesh

logger = logging.getLogger("caloforge.platform")

DETECTOR_EMBED = "denoiser.net.detector_embed.weight"
FITTED_PREFIXES = ("transform.", "energy_transform.")


@dataclass(frozen=True)
class TransferReport:
    """What ``rebuild_for_mesh`` did with every tensor of the new model's state dict.

    ``copied``: parameters taken unchanged from the source; ``reinitialised``: parameters that keep the new
    model's fresh initialisation, each with the reason (shape differs from the source's, or the source has
    no such tensor); ``fitted``: buffers fitted from the new stats block; ``detector_rows``: how each row of
    the detector embedding was set (detector name → ``copied`` | ``mean of copied rows``; spare rows are
    absent: they keep their fresh initialisation).
    """

    source_mesh: tuple[int, int, int]
    target_mesh: tuple[int, int, int]
    copied: tuple[str, ...]
    reinitialised: dict[str, str]
    fitted: tuple[str, ...]
    detector_rows: dict[str, str]

    def summary(self) -> str:
        """One line for logs."""
        reinit = ", ".join(f"{k} ({v})" for k, v in self.reinitialised.items()) or "none"
        return (
            f"mesh {self.source_mesh} -> {self.target_mesh}: copied {len(self.copied)} tensors, "
            f"re-initialised {len(self.reinitialised)}: {reinit}; fitted from stats: {len(self.fitted)}"
        )


def rebuild_for_mesh(
    model: ShowerModel,
    mesh: Mesh | tuple[int, int, int],
    stats: Mapping[str, Any],
    *,
    vocab: ConditionVocab | None = None,
    lineage: Lineage | None = None,
    patch_size: tuple[int, int, int] | None = None,
) -> tuple[ShowerModel, TransferReport]:
    """A new ``ShowerModel`` on ``mesh`` with ``model``'s config (``patch_size`` overrides the patch), its
    transforms fitted from ``stats`` (the new data's stats block), and every mesh-independent parameter of
    ``model`` copied (module docstring). Returns the model (on the CPU, in float32, train mode) and a
    ``TransferReport``, which is also logged.

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
    new = ShowerModel.build(
        config, vocab if vocab is not None else model.vocab, stats, target_mesh, lineage=lineage
    )
    report = _copy_mesh_independent(model, new)
    logger.info("rebuild_for_mesh: %s", report.summary())
    return new, report


@torch.no_grad()
def _copy_mesh_independent(source: ShowerModel, target: ShowerModel) -> TransferReport:
    src_params = dict(source.named_parameters())
    copied: list[str] = []
    reinitialised: dict[str, str] = {}
    detector_rows: dict[str, str] = {}
    for name, param in target.named_parameters():
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
    )


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


__all__ = ["TransferReport", "rebuild_for_mesh"]
