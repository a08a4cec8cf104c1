"""Our own HDF5 layout of the shower record (what ``caloforge data simulate`` writes).

Datasets: ``showers`` float32 (N, n_z, n_phi, n_r) MeV; ``energy_mev``, ``theta_rad``, ``phi_rad`` float64
(N,); ``pdg`` int64 (N,); ``detector`` (N,) UTF-8 strings. Attributes: ``format`` = "caloforge-showers",
``format_version``, ``source``, ``seed`` (-1 when none), ``caloforge_version``, ``metadata_json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

import caloforge
from caloforge.datasets.schema import ShowerSet
from caloforge.platform.conditioning import Conditions

FORMAT = "caloforge-showers"
FORMAT_VERSION = 1
_KEYS = ("showers", "energy_mev", "theta_rad", "phi_rad", "pdg", "detector")


def write(path: str | Path, data: ShowerSet) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset(
            "showers",
            data=data.showers_NZPR,
            chunks=(min(len(data), 256), *data.mesh_shape) if len(data) else None,
            compression="lzf" if len(data) else None,
        )
        c = data.conditions
        f.create_dataset("energy_mev", data=c.energy_mev.astype(np.float64))
        f.create_dataset("theta_rad", data=c.theta_rad.astype(np.float64))
        f.create_dataset("phi_rad", data=c.phi_rad.astype(np.float64))
        f.create_dataset("pdg", data=c.pdg.astype(np.int64))
        f.create_dataset("detector", data=c.detector.astype(object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["source"] = data.source
        f.attrs["seed"] = -1 if data.seed is None else int(data.seed)
        f.attrs["caloforge_version"] = caloforge.__version__
        f.attrs["metadata_json"] = json.dumps(data.metadata, sort_keys=True)
    tmp.replace(path)
    return path


def read(path: str | Path) -> ShowerSet:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (attribute 'format' = {f.attrs.get('format')!r})")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version} is newer than this code ({FORMAT_VERSION})")
        missing = [k for k in _KEYS if k not in f]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        n = f["showers"].shape[0]
        for k in _KEYS[1:]:
            if f[k].shape != (n,):
                raise ValueError(
                    f"{path}: key {k!r} has shape {f[k].shape}, expected ({n},) to match 'showers'"
                )
        showers = f["showers"][...].astype(np.float32, copy=False)
        cond = Conditions(
            f["energy_mev"][...].astype(np.float64),
            f["theta_rad"][...].astype(np.float64),
            f["phi_rad"][...].astype(np.float64),
            f["pdg"][...].astype(np.int64),
            np.asarray(f["detector"].asstr()[...], dtype=str),
        )
        seed = int(f.attrs["seed"])
        return ShowerSet(
            showers,
            cond,
            str(f.attrs["source"]),
            None if seed < 0 else seed,
            json.loads(f.attrs["metadata_json"]),
        )
