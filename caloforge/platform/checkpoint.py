"""Model bundles: a directory with ``config.json`` + ``model.safetensors``; no pickles, no training code.

``config.json`` (schema_version 9)::

    {
      "format": "caloforge.shower_model",
      "schema_version": 9,
      "caloforge_version": "0.1.0", "torch_version": "...",
      "model_config": {...ShowerModelConfig as plain data...},
      "vocab": {"detectors": [...], "n_detector_slots": K},
      "mesh": {"n_z": 45, "n_phi": 16, "r_edges_mm": [...]},
      "lineage": {"kind": "base" | "adapted" | "distilled", "parent_uri": ..., "parent_version": ...,
                  "strategy": ..., "objective": ..., "target_detector": ..., "dataset_manifest_hash": ...,
                  "trained": {"energy_mev": [lo, hi], "theta_rad": [lo, hi], "particles": [...],
                              "detectors": [...]} | null,
                  "created_utc": ..., "extra": {...free-form strings...}},
      "weights": {"file": "model.safetensors", "sha256": "...", "n_tensors": ..., "n_parameters": ...}
    }

The lineage is ``caloforge.platform.lineage.Lineage`` (typed, validated). Older bundles still load:

- version 1 predates the layer-energy head (loads with ``layer_energy.enabled = false``) and the data-range
  clamp (``transform.log_max_Z`` keeps its neutral default);
- versions 1 and 2 kept the lineage as ``parent`` plus strings in ``extra`` (``kind``, ``parent_version``,
  ``adaptation_method``, ``target_detector`` and the trained ranges ``energy_mev_min``/``max``,
  ``theta_rad_min``/``max``, ``particles``); ``_migrate_lineage`` turns them into the typed fields
  (``parent`` → ``parent_uri``, ``adaptation_method`` → ``strategy``, the ranges → ``trained``; ``kind``
  defaults to ``adapted`` when there is a parent, else ``base``) and keeps the rest of ``extra``;
- versions 1–3 were trained with position features up to 32 half periods, versions 1–4 with the radius
  features at the depth's limit (``migrate_model_config`` writes both in);
- versions 1–5 let the layer-energy head empty a layer the voxel model hit (``layer_energy.empty_layers =
  either``; ``voxel_model`` since version 6), so their showers stay what they were;
- versions 6–7 leave a layer empty wherever the voxel model does (``empty_layers = voxel_model``;
  ``hadron_tracks`` since version 8: a charged hadron's layer the voxel model left empty takes the head's
  energy in one voxel), so their showers stay what they were;
- version 8 puts that track in the voxel model's hottest voxel anywhere in the layer (``empty_layers =
  hadron_tracks``; ``axis_tracks`` since version 9: in the hottest voxel of the innermost radial bin, on
  the axis the mesh is centred on), so their showers stay what they were;
- versions 1–6 have no voxel model conditioned on the layer energies (``layer_energy.condition_voxels``,
  false when absent: nothing to migrate; the version tells older code that such a bundle is not for it).

``model.safetensors`` holds ``ShowerModel.state_dict()``: the network weights and the transform buffers
(so users always get MeV). ``model_config.parametrisation`` also fixes which network tensors there are: a
step-conditioned parametrisation (``shortcut``, ``denoisers.DENOISERS[...].step_conditioned``) adds the
step embedding ``denoiser.net.step_embedder.*``; every other parametrisation has exactly the tensors it
always had, so older bundles load unchanged and no schema bump was needed. Likewise
``layer_energy.condition_voxels`` adds ``denoiser.net.layer_token_embed.*`` and
``denoiser.net.layer_profile_embed.*``. The patch coordinates are
derived from the mesh and not stored.

Saving is atomic (write to a temporary sibling directory, then rename); an existing bundle is replaced only
with ``overwrite=True`` and is never left half-written. Loading checks the format, refuses a newer
``schema_version``, verifies the weights' SHA-256 and loads strictly; every failure is a ValueError naming
the file and what is wrong.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import caloforge
from caloforge.config import from_dict, to_dict
from caloforge.platform.backbone import DEFAULT_POS_MAX_FREQ
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.geometry import Mesh
from caloforge.platform.hashing import sha256_file
from caloforge.platform.lineage import LEGACY_FIELD_KEYS, LEGACY_RANGE_KEYS, Lineage
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig

BUNDLE_FORMAT = "caloforge.shower_model"
SCHEMA_VERSION = 9
LEGACY_POS_MAX_FREQ = 32.0  # BackboneConfig.pos_max_freq of bundles before schema 4
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def bundle_config(model: ShowerModel, lineage: Lineage, weights: dict[str, Any]) -> dict[str, Any]:
    """The config.json content of ``model`` (without touching disk)."""
    return {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "caloforge_version": caloforge.__version__,
        "torch_version": torch.__version__,
        "model_config": to_dict(model.config),
        "vocab": model.vocab.to_dict(),
        "mesh": {"n_z": model.mesh.n_z, "n_phi": model.mesh.n_phi, "r_edges_mm": list(model.mesh.r_edges_mm)},
        "lineage": to_dict(lineage),
        "weights": weights,
    }


def save_bundle(
    model: ShowerModel, directory: str | Path, lineage: Lineage | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` as a bundle into ``directory`` (atomically). ``lineage`` defaults to the model's;
    ``created_utc`` is filled with the current time when unset. Returns the bundle path."""
    if not isinstance(model, ShowerModel):
        raise ValueError(f"save_bundle expects a ShowerModel, got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise ValueError(f"{directory}: not empty (pass overwrite=True to replace the bundle)")
    lineage = lineage if lineage is not None else model.lineage
    if lineage.created_utc is None:
        lineage = replace(lineage, created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "bundle_format": BUNDLE_FORMAT})
        weights = {
            "file": WEIGHTS_FILE,
            "sha256": sha256_file(tmp / WEIGHTS_FILE),
            "n_tensors": len(tensors),
            "n_parameters": sum(p.numel() for p in model.parameters()),
        }
        text = json.dumps(bundle_config(model, lineage, weights), indent=2, sort_keys=False) + "\n"
        (tmp / CONFIG_FILE).write_text(text)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.lineage = lineage
    return directory


def read_bundle_config(directory: str | Path) -> dict[str, Any]:
    """The parsed, version-checked config.json of a bundle (no weights are read)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ValueError(f"{directory}: bundle directory not found")
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a CaloForge model bundle?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path}: format {fmt!r} is not {BUNDLE_FORMAT!r}")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: schema_version must be an int >= 1, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version} is newer than this CaloForge ({caloforge.__version__}) "
            f"supports ({SCHEMA_VERSION}); upgrade caloforge to load it"
        )
    for key in ("model_config", "vocab", "mesh", "lineage", "weights"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: {key!r} missing or not an object")
    return data


def _set_absent_pos_limit(out: dict[str, Any], key: str, in_backbone: Any, as_override: Any) -> None:
    """Write the position limit ``key`` an older bundle was trained with: into its explicit backbone dict
    (``in_backbone``, unless the dict names one) or, for a flavour name, as the model's override."""
    backbone = out.get("backbone")
    if isinstance(backbone, dict):
        out["backbone"] = {key: in_backbone, **backbone}
    else:
        out[key] = as_override


def migrate_model_config(model_config: dict[str, Any], schema_version: int) -> dict[str, Any]:
    """A ``model_config`` of an older bundle in today's terms (a copy; today's is returned unchanged).

    - v1 bundles predate the layer-energy head: ``layer_energy.enabled = false``;
    - v1/v2 bundles name the training objective (``objective``) where the model now records its
      parametrisation (same names: ``edm`` and ``flow_matching`` are both), and keep the objective's
      options in the model config: ``edm.p_mean``/``edm.p_std`` and the ``flow_matching`` block move out
      (they describe how the weights were trained, not what they compute);
    - v1–v3 bundles were trained with position features up to 32 half periods (the backbones' default
      then; 8 since v4): ``pos_max_freq = 32`` unless the bundle names one;
    - v1–v4 bundles' radius features follow ``pos_max_freq`` (the field ``pos_max_freq_r`` came with v4's
      last release and its default, 3, with v5): the radius limit is set to the depth's;
    - v1–v5 bundles generate with the head's energy applied to every hit layer, also where it empties the
      layer: ``layer_energy.empty_layers = either`` unless the bundle names it (``voxel_model`` since v6);
      v6–v7 bundles with ``voxel_model`` unless they name it (``hadron_tracks`` since v8), v8 bundles with
      ``hadron_tracks`` (``axis_tracks`` since v9).
    """
    out = dict(model_config)
    if schema_version < 4 and out.get("pos_max_freq") is None:
        _set_absent_pos_limit(out, "pos_max_freq", LEGACY_POS_MAX_FREQ, LEGACY_POS_MAX_FREQ)
    if schema_version < 5 and out.get("pos_max_freq_r") is None:
        depth = out.get("pos_max_freq")  # a flavour's radius followed its depth limit at v4
        # in an explicit backbone, None: as that backbone's pos_max_freq
        _set_absent_pos_limit(out, "pos_max_freq_r", None, DEFAULT_POS_MAX_FREQ if depth is None else depth)
    if schema_version < 2 and "layer_energy" not in out:
        out["layer_energy"] = {"enabled": False}
    layer_energy = out.get("layer_energy", {})
    if schema_version < 6 and isinstance(layer_energy, dict):  # anything else: from_dict names the error
        out["layer_energy"] = {"empty_layers": "either", **layer_energy}
    elif schema_version < 8 and isinstance(layer_energy, dict):
        out["layer_energy"] = {"empty_layers": "voxel_model", **layer_energy}
    elif schema_version < 9 and isinstance(layer_energy, dict):
        out["layer_energy"] = {"empty_layers": "hadron_tracks", **layer_energy}
    if "objective" in out and "parametrisation" not in out:
        out["parametrisation"] = out.pop("objective")
    out.pop("flow_matching", None)
    if isinstance(out.get("edm"), dict):
        out["edm"] = {k: v for k, v in out["edm"].items() if k not in ("p_mean", "p_std")}
    return out


def _legacy_range(extra: Mapping[str, str], name: str, where: str) -> list[float] | None:
    lo, hi = extra.get(f"{name}_min"), extra.get(f"{name}_max")
    if lo is None and hi is None:
        return None
    if lo is None or hi is None:
        missing = f"{name}_min" if lo is None else f"{name}_max"
        raise ValueError(f"{where}: lineage.extra has only one bound of {name} ({missing} missing)")
    try:
        return [float(lo), float(hi)]
    except ValueError:
        raise ValueError(
            f"{where}: lineage.extra {name}_min/_max must be numbers, got {lo!r}, {hi!r}"
        ) from None


def _migrate_lineage(lineage: Mapping[str, Any], version: int, where: str) -> dict[str, Any]:
    """The schema-3 ``lineage`` object of a config.json written with schema ``version`` (a new dict).

    Schema 1/2: ``parent`` → ``parent_uri``; ``extra`` strings ``kind``, ``parent_version``,
    ``adaptation_method`` (→ ``strategy``) and ``target_detector`` become fields; the trained ranges
    (``energy_mev_min``/``max``, ``theta_rad_min``/``max``, comma-separated ``particles`` names or PDG ids)
    become ``trained`` (detectors were not recorded); empty strings count as unrecorded; ``kind`` defaults to
    ``adapted`` with a parent, else ``base``. Unknown keys are kept, so that loading names them.
    """
    if version >= 3:
        return dict(lineage)
    old = dict(lineage)
    extra = old.pop("extra", None) or {}
    if not isinstance(extra, Mapping) or not all(isinstance(v, str) for v in extra.values()):
        raise ValueError(f"{where}: lineage.extra must be an object of strings, got {extra!r}")
    extra = {
        k: v for k, v in extra.items() if not (k in (*LEGACY_FIELD_KEYS, *LEGACY_RANGE_KEYS) and v == "")
    }
    parent = old.pop("parent", None) or None
    new: dict[str, Any] = {"parent_uri": parent}
    new.update({field: extra.pop(key) for key, field in LEGACY_FIELD_KEYS.items() if key in extra})
    new.setdefault("kind", "adapted" if parent is not None else "base")
    names = [p.strip() for p in extra.get("particles", "").split(",") if p.strip()]
    trained = {
        "energy_mev": _legacy_range(extra, "energy_mev", where),
        "theta_rad": _legacy_range(extra, "theta_rad", where),
        "particles": names or None,
        "detectors": None,  # not recorded before schema 3
    }
    if any(v is not None for v in trained.values()):
        new["trained"] = trained
    for key in LEGACY_RANGE_KEYS:
        extra.pop(key, None)
    return {**new, **old, "extra": extra}  # old: dataset_manifest_hash, created_utc (+ unknown keys)


def load_bundle(directory: str | Path, device: torch.device | str = "cpu") -> ShowerModel:
    """Rebuild a ``ShowerModel`` from a bundle (eval mode, on ``device``)."""
    directory = Path(directory)
    data = read_bundle_config(directory)
    cfg_path = directory / CONFIG_FILE
    model_config = migrate_model_config(data["model_config"], data["schema_version"])
    config = from_dict(ShowerModelConfig, model_config, f"{cfg_path}: model_config")
    try:
        vocab = ConditionVocab.from_dict(data["vocab"])
        m = data["mesh"]
        mesh = Mesh(int(m["n_z"]), int(m["n_phi"]), tuple(float(r) for r in m["r_edges_mm"]))
        lineage_data = _migrate_lineage(data["lineage"], data["schema_version"], str(cfg_path))
        old_objective = data["model_config"].get("objective")
        if data["schema_version"] < 3 and isinstance(old_objective, str):
            # v1/v2 models were trained by the objective their config named (then also their
            # parametrisation): that is what trained the weights.
            lineage_data.setdefault("objective", old_objective)
        lineage = from_dict(Lineage, lineage_data, f"{cfg_path}: lineage")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path}: invalid vocab/mesh/lineage: {exc!r}") from exc
    weights = data["weights"]
    name = weights.get("file", WEIGHTS_FILE)
    # weights.file names a file of this bundle: no directories, no "..", no link leading out of it
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{cfg_path}: weights.file {name!r} must be a file name inside the bundle")
    weights_path = directory / name
    if weights_path.is_symlink() or not weights_path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{cfg_path}: weights.file {name!r} leads outside the bundle (a link)")
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: missing weights file")
    expected = weights.get("sha256")
    if not isinstance(expected, str):
        raise ValueError(f"{cfg_path}: weights.sha256 missing")
    actual = sha256_file(weights_path)
    if actual != expected:
        raise ValueError(f"{weights_path}: corrupt (sha256 {actual[:12]}… != recorded {expected[:12]}…)")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: unreadable safetensors file: {exc}") from exc
    model = ShowerModel(config, vocab, mesh, stats=None, lineage=lineage)
    if data["schema_version"] < 2:  # v1 bundles predate the data-range clamp: keep its neutral default
        tensors.setdefault("transform.log_max_Z", model.transform.log_max_Z.clone())
    expected_keys = set(model.state_dict())
    missing, unexpected = sorted(expected_keys - set(tensors)), sorted(set(tensors) - expected_keys)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path}: tensors do not fit the model: {exc}") from exc
    return model.to(device).eval()


__all__ = [
    "BUNDLE_FORMAT",
    "CONFIG_FILE",
    "SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "bundle_config",
    "load_bundle",
    "migrate_model_config",
    "read_bundle_config",
    "save_bundle",
]
