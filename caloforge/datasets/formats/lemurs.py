"""LEMURS HDF5 files (McKeown, Raikwar, Zaborowska, arXiv:2509.05108; the CaloDiT-2 pretraining data).

One file per detector (the detector is named by the user). Keys:

- ``showers``: (N, R, Phi, Z) = (N, 9, 16, 45) voxel energies — transposed here to CaloForge's (N, Z, P, R);
- ``incident_energy``: (N,) incident energy;
- ``incident_theta``, ``incident_phi``: (N,) incident direction in rad.

Units and calibration (what we chose, and why). The files hold MeV for both the voxels and the incident
energy: the CaloDiT-2 tooling divides both by 1000 to get GeV, and multiplies both by 1000 when saving.
The voxels are *visible* (active-material) energies, not calibrated ones: the same tooling divides them by
the sampling fraction 0.033 when converting the Par04 SiW file to the CaloChallenge format. CaloForge
stores calibrated energies (visible / the detector's nominal sampling fraction, see ``schema.py``), so
:func:`read` multiplies the voxels by ``calibration``, by default ``"auto"`` = 1 / the detector spec's
``sampling_fraction``; pass ``calibration=1.0`` for a file that is already calibrated, or any other factor.
If a file turns out to be in GeV, pass ``energy_unit="GeV"`` (both voxels and incident energies are then
multiplied by 1000). As a guard, the reader logs a warning when the median E_tot/E_inc of the first chunk
after calibration is outside [0.2, 5] — the sign of a wrong unit or calibration.

The particle is not stored; LEMURS showers are electromagnetic (Par04 electron gun), so the default is e-
(``particle=`` overrides).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from caloforge.datasets.formats import (
    DEFAULT_CHUNK_SHOWERS,
    check_conditions,
    check_float32,
    check_rows,
    check_voxels,
    concat_chunks,
    open_h5,
    read_rows,
    require_keys,
    resolve_detector,
)
from caloforge.datasets.schema import ShowerSet
from caloforge.platform.conditioning import Conditions, pdg_of
from caloforge.platform.geometry import DetectorSpec

log = logging.getLogger("caloforge.datasets.formats.lemurs")

KEYS = ("showers", "incident_energy", "incident_theta", "incident_phi")
DEFAULT_PARTICLE = "e-"
DEFAULT_MESH_RPZ = (9, 16, 45)  # (R, Phi, Z) as stored
_UNIT_SCALE = {"MeV": 1.0, "GeV": 1000.0}


def iter_read(
    path: str | Path,
    detector: str | Path | DetectorSpec | None = None,
    *,
    start: int = 0,
    max_showers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SHOWERS,
    calibration: float | Literal["auto"] = "auto",
    energy_unit: Literal["MeV", "GeV"] = "MeV",
    particle: str | int | None = None,
    clip_negative_mev: float | None = None,
) -> Iterator[ShowerSet]:
    """Read a LEMURS file in chunks of ``chunk_size`` showers, transposed to (N, Z, P, R), calibrated.

    Args:
        detector: built-in detector name, detector YAML path or spec; a custom name is accepted only with an
            explicit numeric ``calibration`` (nothing else is needed from the spec: the mesh is in the file).
        calibration: factor applied to the voxels; ``"auto"`` = 1 / detector sampling fraction.
        energy_unit: unit of the file's voxels and incident energies.
        particle: name or PDG id (default e-).
        clip_negative_mev: zero negative voxels down to this magnitude (default: negatives are an error).
    """
    path = Path(path)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if energy_unit not in _UNIT_SCALE:
        raise ValueError(f"energy_unit must be one of {list(_UNIT_SCALE)}, got {energy_unit!r}")
    numeric_cal = not isinstance(calibration, str)
    if not numeric_cal and calibration != "auto":
        raise ValueError(f"calibration must be a factor > 0 or 'auto', got {calibration!r}")
    name, spec = resolve_detector(detector, path=path, custom_ok=numeric_cal)
    if numeric_cal:
        factor = float(calibration)  # type: ignore[arg-type]
    else:
        assert spec is not None  # resolve_detector only returns no spec when custom_ok
        factor = 1.0 / spec.sampling_fraction
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"{path}: calibration must be a finite factor > 0, got {factor}")
    scale = _UNIT_SCALE[energy_unit]
    pdg = pdg_of(particle if particle is not None else DEFAULT_PARTICLE)
    with open_h5(path) as f:
        require_keys(f, path, KEYS, "LEMURS")
        ds = f["showers"]
        if ds.ndim != 4:
            raise ValueError(
                f"{path}: key 'showers' has shape {ds.shape}, expected (N, R, Phi, Z) e.g. (N, 9, 16, 45)"
            )
        if not np.issubdtype(ds.dtype, np.floating):
            raise ValueError(f"{path}: key 'showers' has dtype {ds.dtype}, expected floating point")
        n, n_r, n_p, n_z = (int(v) for v in ds.shape)
        for k in KEYS[1:]:
            if f[k].shape not in ((n,), (n, 1)):
                raise ValueError(
                    f"{path}: key {k!r} has shape {f[k].shape}, expected ({n},) to match 'showers' {ds.shape}"
                )
        if spec is not None and spec.geometry.shape != (n_z, n_p, n_r):
            raise ValueError(
                f"{path}: key 'showers' has (R, Phi, Z) = {(n_r, n_p, n_z)}, but detector {spec.name!r} has "
                "mesh "
                f"(Z, P, R) = {spec.geometry.shape}"
            )
        lo, hi = check_rows(path, n, start, max_showers)
        checked_response = False
        for a in range(lo, hi, chunk_size):
            b = min(hi, a + chunk_size)
            raw = read_rows(ds, a, b, path=path, key="showers")
            raw, n_clipped = check_voxels(
                raw, path=path, key="showers", row0=a, clip_negative_mev=clip_negative_mev
            )
            with np.errstate(over="ignore", invalid="ignore"):
                x = np.ascontiguousarray(raw.transpose(0, 3, 2, 1), dtype=np.float32)
                if factor * scale != 1.0:
                    x *= np.float32(factor * scale)
            check_float32(
                x,
                path=path,
                key="showers",
                row0=a,
                what=f"the conversion to float32 and ×{factor * scale:.6g}",
            )
            cond = Conditions(
                read_rows(f["incident_energy"], a, b, path=path, key="incident_energy")
                .reshape(-1)
                .astype(np.float64)
                * scale,
                read_rows(f["incident_theta"], a, b, path=path, key="incident_theta")
                .reshape(-1)
                .astype(np.float64),
                read_rows(f["incident_phi"], a, b, path=path, key="incident_phi")
                .reshape(-1)
                .astype(np.float64),
                np.full(b - a, pdg, dtype=np.int64),
                np.full(b - a, name),
            )
            check_conditions(
                cond,
                path=path,
                row0=a,
                keys={
                    "energy_mev": "incident_energy",
                    "theta_rad": "incident_theta",
                    "phi_rad": "incident_phi",
                },
            )
            if not checked_response:
                checked_response = True
                ratio = float(np.median(x.reshape(b - a, -1).sum(axis=1, dtype=np.float64) / cond.energy_mev))
                if not 0.2 <= ratio <= 5.0:
                    log.warning(
                        "%s: median E_tot/E_inc = %.3g after calibration %.4g and unit %s: check "
                        "calibration= "
                        "and energy_unit= (expected about 1 for contained EM showers)",
                        path,
                        ratio,
                        factor,
                        energy_unit,
                    )
            yield ShowerSet(
                x,
                cond,
                f"lemurs:{path.name}",
                None,
                {
                    "format": "lemurs",
                    "path": str(path),
                    "start": a,
                    "calibration": factor,
                    "energy_unit": energy_unit,
                    "n_clipped_negative": n_clipped,
                },
            )


def read(path: str | Path, detector: str | Path | DetectorSpec | None = None, **options: Any) -> ShowerSet:
    """Read a LEMURS file (or rows ``start`` .. ``start+max_showers``); options as :func:`iter_read`."""
    return concat_chunks(list(iter_read(path, detector, **options)), path)


__all__ = ["DEFAULT_MESH_RPZ", "DEFAULT_PARTICLE", "KEYS", "iter_read", "read"]
