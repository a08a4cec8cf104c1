"""Model bundles: a directory with ``config.json`` + ``model.safetensors``; no pickles, no training code.

``config.json`` (schema_version 2; version 1 bundles predate the layer-energy head and load with
``layer_energy.enabled = false``)::

    {
      "format": "caloforge.shower_model",
      "schema_version": 2,
      "caloforge_version": "0.1.0", "torch_version": "...",
      "model_config": {...ShowerModelConfig as plain data...},
      "vocab": {"detectors": [...], "n_detector_slots": K},
      "mesh": {"n_z": 45, "n_phi": 16, "r_edges_mm": [...]},
      "lineage": {"parent": ..., "dataset_manifest_hash": ..., "created_utc": ..., "extra": {...}},
      "weights": {"file": "model.safetensors", "sha256": "...", "n_tensors": ..., "n_parameters": ...}
    }

``model.safetensors`` holds ``ShowerModel.state_dict()``: the network weights and the transform buffers
(so users always get MeV). The patch coordinates are derived from the mesh and not stored.

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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import caloforge
from caloforge.config import from_dict, to_dict
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.geometry import Mesh
from caloforge.platform.hashing import sha256_file as _sha256
from caloforge.platform.shower_model import Lineage, ShowerModel, ShowerModelConfig

BUNDLE_FORMAT = "caloforge.shower_model"
SCHEMA_VERSION = 2
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
        "lineage": asdict(lineage),
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
            "sha256": _sha256(tmp / WEIGHTS_FILE),
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


def load_bundle(directory: str | Path, device: torch.device | str = "cpu") -> ShowerModel:
    """Rebuild a ``ShowerModel`` from a bundle (eval mode, on ``device``)."""
    directory = Path(directory)
    data = read_bundle_config(directory)
    cfg_path = directory / CONFIG_FILE
    model_config = dict(data["model_config"])
    if data["schema_version"] < 2 and "layer_energy" not in model_config:
        model_config["layer_energy"] = {"enabled": False}  # v1 bundles have no layer-energy head
    config = from_dict(ShowerModelConfig, model_config, f"{cfg_path}: model_config")
    try:
        vocab = ConditionVocab.from_dict(data["vocab"])
        m = data["mesh"]
        mesh = Mesh(int(m["n_z"]), int(m["n_phi"]), tuple(float(r) for r in m["r_edges_mm"]))
        lineage = from_dict(Lineage, data["lineage"], f"{cfg_path}: lineage")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path}: invalid vocab/mesh/lineage: {exc!r}") from exc
    weights = data["weights"]
    weights_path = directory / str(weights.get("file", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: missing weights file")
    expected = weights.get("sha256")
    if not isinstance(expected, str):
        raise ValueError(f"{cfg_path}: weights.sha256 missing")
    actual = _sha256(weights_path)
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
    "read_bundle_config",
    "save_bundle",
]
