"""CaloChallenge 2022 HDF5 files, datasets 2 and 3 (Krause et al., arXiv:2410.21611; github.com/
CaloChallenge/homepage).

Layout (what the official ``code/evaluate.py`` reads, unchanged):

- ``incident_energies``: float64 (N, 1), MeV. The official evaluation needs (N, 1) (it concatenates
  ``log10(E_inc)`` column-wise with the voxels) and float64 (its classifier runs with float64 weights; the
  float64 energies upcast the float32 voxels when they are concatenated).
- ``showers``: (N, n_voxels), MeV, flattened with ``index = layer·(n_alpha·n_r) + alpha·n_r + r`` (radial
  bins fastest, then angular bins, then layers; see ``HighLevelFeatures.py``/``XMLHandler.py``), i.e. a
  reshape to (N, n_z, n_alpha, n_r) is exactly CaloForge's canonical (N, Z, P, R). Angular bin j is centred
  at −π + (j + ½)·2π/n_alpha.
- Energies are *calibrated*: active-layer deposits divided by the sampling fraction (0.033 for the Par04
  SiW calorimeter of datasets 2/3), so E_tot/E_inc ≈ 1; the evaluation zeroes voxels below
  0.5 keV / 0.033 = 15.15 keV (:data:`VOXEL_THRESHOLD_MEV`).

Meshes: dataset 2 is 45 × 16 × 9 (radial edges 0, 4.65, …, 41.85 mm), dataset 3 is 45 × 50 × 18 (edges
0, 2.325, …, 41.85 mm). The reader takes the mesh from (in this order) an explicit ``mesh_shape``, the
detector spec, or — with ``mesh_shape="auto"`` — the number of voxels of the known datasets.

What the files do not store, and what we assume (each overridable by the caller):

- the incident direction: θ = π/2 (normal incidence on a barrel, η = 0; :data:`DEFAULT_THETA_RAD`) and
  φ = 0 (:data:`DEFAULT_PHI_RAD`); both datasets were simulated at one fixed direction;
- the particle: e- (datasets 2/3 are electron showers; :data:`DEFAULT_PARTICLE`);
- the detector: named by the user (a built-in detector, a detector YAML, or a custom name with an
  explicit mesh).

Files written by :func:`write` also carry ``caloforge_*`` attributes (detector, mesh, calibration, and θ/φ/PDG
when constant) — attributes are invisible to the official code — and optionally per-shower
``caloforge_theta_rad``/``caloforge_phi_rad``/``caloforge_pdg`` datasets (``include_conditions=True``; the
official code reads only ``incident_energies`` and ``showers`` and ignores them). :func:`read` uses them
when present, so our own files round-trip.

Calibration: canonical CaloForge energies are visible energy / the detector's nominal sampling fraction
(``DetectorSpec.sampling_fraction``). ``write(..., calibration=c)`` stores ``c·x``; ``read(...,
calibration=c)`` returns ``c·stored`` (default: the inverse of the factor recorded by our writer, else 1).
To express showers of a detector with sampling fraction f in the CaloChallenge convention (0.033) use
``calibration=recalibration_factor(f)`` = f / 0.033.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

import caloforge
from caloforge.datasets.formats import (
    DEFAULT_CHUNK_SHOWERS,
    AtomicH5Writer,
    check_conditions,
    check_rows,
    check_voxels,
    concat_chunks,
    open_h5,
    read_rows,
    require_keys,
    resolve_detector,
    to_float32,
)
from caloforge.datasets.schema import ShowerSet
from caloforge.platform.conditioning import Conditions, pdg_of
from caloforge.platform.geometry import DetectorSpec, Mesh, builtin_detector_names
from caloforge.platform.transforms import CALOCHALLENGE_SAMPLING_FRACTION as SAMPLING_FRACTION
from caloforge.platform.transforms import CALOCHALLENGE_THRESHOLD_MEV as VOXEL_THRESHOLD_MEV

log = logging.getLogger("caloforge.datasets.formats.calochallenge")

ENERGY_KEY = "incident_energies"
SHOWERS_KEY = "showers"
DEFAULT_THETA_RAD = math.pi / 2
DEFAULT_PHI_RAD = 0.0
DEFAULT_PARTICLE = "e-"

DS2_MESH = Mesh(45, 16, tuple(round(4.65 * i, 4) for i in range(10)))
DS3_MESH = Mesh(45, 50, tuple(round(2.325 * i, 4) for i in range(19)))
KNOWN_MESHES: dict[str, Mesh] = {"ds2": DS2_MESH, "ds3": DS3_MESH}

MeshArg = tuple[int, int, int] | Literal["auto", "ds2", "ds3"] | None


def mesh_for_n_voxels(n_voxels: int) -> tuple[int, int, int] | None:
    """The (n_z, n_alpha, n_r) of the known dataset with ``n_voxels`` voxels, or None."""
    for mesh in KNOWN_MESHES.values():
        if mesh.n_voxels == n_voxels:
            return mesh.shape
    return None


def recalibration_factor(
    sampling_fraction: float, target_sampling_fraction: float = SAMPLING_FRACTION
) -> float:
    """Factor turning energies calibrated with ``sampling_fraction`` into ones calibrated with the target.

    visible = x·f, so x' = visible / f_target = x · f / f_target.
    """
    if not (sampling_fraction > 0 and target_sampling_fraction > 0):
        raise ValueError(
            f"sampling fractions must be > 0, got {sampling_fraction}, {target_sampling_fraction}"
        )
    return sampling_fraction / target_sampling_fraction


def _resolve_mesh(
    path: Path, n_voxels: int, spec: DetectorSpec | None, mesh_shape: MeshArg
) -> tuple[int, int, int]:
    if isinstance(mesh_shape, str):
        if mesh_shape == "auto":
            shape = mesh_for_n_voxels(n_voxels)
            if shape is None:
                raise ValueError(
                    f"{path}: key 'showers' has {n_voxels} voxels per shower, which matches no known "
                    f"CaloChallenge dataset ({ {k: m.n_voxels for k, m in KNOWN_MESHES.items()} }); pass "
                    "mesh_shape=(n_z, n_alpha, n_r)"
                )
        elif mesh_shape in KNOWN_MESHES:
            shape = KNOWN_MESHES[mesh_shape].shape
        else:
            raise ValueError(
                f"mesh_shape must be (n_z, n_alpha, n_r), 'auto', 'ds2' or 'ds3', got {mesh_shape!r}"
            )
    elif mesh_shape is not None:
        if len(mesh_shape) != 3 or any(int(v) < 1 for v in mesh_shape):
            raise ValueError(
                f"mesh_shape must be three positive ints (n_z, n_alpha, n_r), got {mesh_shape!r}"
            )
        shape = tuple(int(v) for v in mesh_shape)  # type: ignore[assignment]
    elif spec is not None:
        shape = spec.geometry.shape
    else:
        raise ValueError(f"{path}: the mesh shape is unknown: pass mesh_shape=(n_z, n_alpha, n_r) or 'auto'")
    if spec is not None and spec.geometry.shape != shape:
        raise ValueError(
            f"{path}: mesh_shape {shape} differs from the mesh {spec.geometry.shape} of detector "
            f"{spec.name!r}"
        )
    if int(np.prod(shape)) != n_voxels:
        raise ValueError(
            f"{path}: key 'showers' has {n_voxels} voxels per shower, but mesh {shape} has "
            f"{int(np.prod(shape))}" + (f" (detector {spec.name!r})" if spec is not None else "")
        )
    return shape  # type: ignore[return-value]


def _is_builtin_or_spec(detector: object) -> bool:
    if detector is None or isinstance(detector, DetectorSpec):
        return True
    return Path(str(detector)).suffix in (".yaml", ".yml") or str(detector) in builtin_detector_names()


def _written_calibration(f: h5py.File, path: Path) -> float:
    """1 / the ``caloforge_calibration`` attribute our writer records (stored = factor × ours), else 1."""
    written = _attr(f, "caloforge_calibration")
    if written is None:
        return 1.0
    try:
        factor = float(written)
    except (TypeError, ValueError):
        factor = math.nan
    if not (factor > 0 and math.isfinite(factor) and math.isfinite(1.0 / factor)):
        raise ValueError(
            f"{path}: attribute 'caloforge_calibration' = {written!r}: must be a finite factor > 0 (stored "
            "energies = factor × MeV); the file is damaged, or pass calibration= to override it"
        )
    return 1.0 / factor


def _attr(f: h5py.File, name: str) -> Any:
    value = f.attrs.get(name)
    return value.item() if isinstance(value, np.generic) else value


def iter_read(
    path: str | Path,
    detector: str | Path | DetectorSpec | None = None,
    *,
    mesh_shape: MeshArg = None,
    start: int = 0,
    max_showers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SHOWERS,
    calibration: float | None = None,
    particle: str | int | None = None,
    theta_rad: float | None = None,
    phi_rad: float | None = None,
    clip_negative_mev: float | None = None,
) -> Iterator[ShowerSet]:
    """Read a CaloChallenge file in chunks of ``chunk_size`` showers (rows start .. start + max_showers).

    Args:
        detector: built-in detector name, detector YAML path or spec; any other name needs ``mesh_shape``
            (default: the detector and mesh recorded by our writer, if any).
        mesh_shape: (n_z, n_alpha, n_r), ``"ds2"``, ``"ds3"`` or ``"auto"`` (from the voxel count); default:
            the detector's mesh.
        calibration: factor applied to stored energies (default: 1 / the factor our writer recorded, else 1).
        particle: name or PDG id (default: the file's ``caloforge_pdg``, else e-).
        theta_rad, phi_rad: incident direction (default: the file's ``caloforge_*``, else π/2 and 0).
        clip_negative_mev: zero negative voxels down to this magnitude (default: negatives are an error).
    """
    path = Path(path)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with open_h5(path) as f:
        require_keys(f, path, (ENERGY_KEY, SHOWERS_KEY), "CaloChallenge")
        recorded = _attr(f, "caloforge_detector")  # files written by CaloForge name their detector and mesh
        if detector is None:
            detector = recorded
        if (
            mesh_shape is None
            and "caloforge_mesh_shape" in f.attrs
            and detector is not None
            and str(detector) == recorded
            and not _is_builtin_or_spec(detector)
        ):
            mesh_shape = tuple(int(v) for v in f.attrs["caloforge_mesh_shape"])  # type: ignore[assignment]
        name, spec = resolve_detector(detector, path=path, custom_ok=mesh_shape is not None)
        ds, de = f[SHOWERS_KEY], f[ENERGY_KEY]
        if ds.ndim != 2:
            raise ValueError(f"{path}: key 'showers' has shape {ds.shape}, expected (N, n_voxels)")
        if not np.issubdtype(ds.dtype, np.floating):
            raise ValueError(f"{path}: key 'showers' has dtype {ds.dtype}, expected floating point (MeV)")
        n = ds.shape[0]
        if de.shape not in ((n, 1), (n,)):
            raise ValueError(
                f"{path}: key 'incident_energies' has shape {de.shape}, expected ({n}, 1) to match 'showers' "
                f"{ds.shape}"
            )
        shape = _resolve_mesh(path, int(ds.shape[1]), spec, mesh_shape)
        lo, hi = check_rows(path, n, start, max_showers)
        if calibration is None:
            calibration = _written_calibration(f, path)
        if not (calibration > 0 and math.isfinite(calibration)):
            raise ValueError(f"{path}: calibration must be a finite factor > 0, got {calibration}")
        extras = {k: f[k] for k in ("caloforge_theta_rad", "caloforge_phi_rad", "caloforge_pdg") if k in f}
        for k, d in extras.items():
            if d.shape != (n,):
                raise ValueError(f"{path}: key {k!r} has shape {d.shape}, expected ({n},) to match 'showers'")
        # incident direction and particle: caller override > per-shower datasets > file attributes > defaults
        overrides = {
            "caloforge_theta_rad": theta_rad,
            "caloforge_phi_rad": phi_rad,
            "caloforge_pdg": pdg_of(particle) if particle is not None else None,
        }
        defaults = {
            "caloforge_theta_rad": DEFAULT_THETA_RAD,
            "caloforge_phi_rad": DEFAULT_PHI_RAD,
            "caloforge_pdg": pdg_of(DEFAULT_PARTICLE),
        }
        consts = {k: _attr(f, k) for k in defaults}

        def column(key: str, dtype: type, a: int, b: int) -> np.ndarray:
            if overrides[key] is not None:
                return np.full(b - a, overrides[key], dtype=dtype)
            if key in extras:
                return read_rows(extras[key], a, b, path=path, key=key).astype(dtype)
            return np.full(b - a, defaults[key] if consts[key] is None else consts[key], dtype=dtype)

        source = str(_attr(f, "caloforge_source") or f"calochallenge:{path.name}")
        for a in range(lo, hi, chunk_size):
            b = min(hi, a + chunk_size)
            x = read_rows(ds, a, b, path=path, key=SHOWERS_KEY)
            x, n_clipped = check_voxels(
                x, path=path, key=SHOWERS_KEY, row0=a, clip_negative_mev=clip_negative_mev
            )
            x = to_float32(x.reshape(b - a, *shape), path=path, key=SHOWERS_KEY, row0=a, scale=calibration)
            energy = read_rows(de, a, b, path=path, key=ENERGY_KEY).reshape(-1).astype(np.float64)

            cond = Conditions(
                energy,
                column("caloforge_theta_rad", np.float64, a, b),
                column("caloforge_phi_rad", np.float64, a, b),
                column("caloforge_pdg", np.int64, a, b),
                np.full(b - a, name),
            )
            check_conditions(
                cond,
                path=path,
                keys={"energy_mev": ENERGY_KEY, "theta_rad": "theta_rad", "phi_rad": "phi_rad"},
                row0=a,
            )
            yield ShowerSet(
                x,
                cond,
                source,
                None,
                {
                    "format": "calochallenge",
                    "path": str(path),
                    "start": a,
                    "calibration": float(calibration),
                    "n_clipped_negative": n_clipped,
                },
            )


def read(path: str | Path, detector: str | Path | DetectorSpec | None = None, **options: Any) -> ShowerSet:
    """Read a CaloChallenge file (or rows ``start`` .. ``start+max_showers``); options: :func:`iter_read`."""
    return concat_chunks(list(iter_read(path, detector, **options)), path)


class CaloChallengeWriter(AtomicH5Writer):
    """Write a CaloChallenge file chunk by chunk (temp file, then rename on :meth:`close`)."""

    def __init__(
        self,
        path: str | Path,
        mesh_shape: tuple[int, int, int],
        *,
        calibration: float = 1.0,
        showers_dtype: Literal["float32", "float64"] = "float32",
        include_conditions: bool = False,
        compression: Literal["gzip", "lzf", "none"] = "gzip",
        detector: str | None = None,
        source: str | None = None,
    ) -> None:
        if not (calibration > 0 and math.isfinite(calibration)):
            raise ValueError(f"calibration must be a finite factor > 0, got {calibration}")
        if showers_dtype not in ("float32", "float64"):
            raise ValueError(f"showers_dtype must be 'float32' or 'float64', got {showers_dtype!r}")
        if compression not in ("gzip", "lzf", "none"):
            raise ValueError(f"compression must be 'gzip', 'lzf' or 'none', got {compression!r}")
        super().__init__(path)
        self.mesh_shape = tuple(int(v) for v in mesh_shape)
        self.n_voxels = int(np.prod(self.mesh_shape))
        self.calibration = float(calibration)
        self.dtype = np.dtype(showers_dtype)
        self.include_conditions = include_conditions
        self.n = 0
        self._const: dict[str, Any] = {}
        self._varying: set[str] = set()
        self._detectors: set[str] = set()
        comp = None if compression == "none" else compression
        rows = max(1, min(1024, 2**20 // (self.n_voxels * self.dtype.itemsize)))
        f = self._f
        f.create_dataset(
            ENERGY_KEY,
            shape=(0, 1),
            maxshape=(None, 1),
            dtype=np.float64,
            chunks=(4096, 1),
            compression=comp,
            fletcher32=True,  # chunk checksums (a built-in HDF5 filter every reader has)
        )
        f.create_dataset(
            SHOWERS_KEY,
            shape=(0, self.n_voxels),
            maxshape=(None, self.n_voxels),
            dtype=self.dtype,
            chunks=(rows, self.n_voxels),
            compression=comp,
            fletcher32=True,
        )
        if include_conditions:
            for k, dt in (
                ("caloforge_theta_rad", np.float64),
                ("caloforge_phi_rad", np.float64),
                ("caloforge_pdg", np.int64),
            ):
                f.create_dataset(k, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        f.attrs["caloforge_format"] = "calochallenge"
        f.attrs["caloforge_version"] = caloforge.__version__
        f.attrs["caloforge_mesh_shape"] = np.asarray(self.mesh_shape, dtype=np.int64)
        f.attrs["caloforge_calibration"] = self.calibration
        if detector is not None:
            self._detectors.add(detector)
        if source is not None:
            f.attrs["caloforge_source"] = source

    def append(self, data: ShowerSet) -> None:
        if data.mesh_shape != self.mesh_shape:
            raise ValueError(
                f"{self.path}: cannot append mesh {data.mesh_shape} to a file of mesh {self.mesh_shape}"
            )
        m = len(data)
        if m == 0:
            return
        f, a, b = self._f, self.n, self.n + m
        x = data.showers_NZPR.reshape(m, self.n_voxels).astype(np.float64) * self.calibration
        if self.dtype == np.float32 and np.abs(x).max(initial=0.0) > np.finfo(np.float32).max:
            raise ValueError(f"{self.path}: calibrated voxel energies overflow float32")
        f[SHOWERS_KEY].resize((b, self.n_voxels))
        f[SHOWERS_KEY][a:b] = x.astype(self.dtype)
        f[ENERGY_KEY].resize((b, 1))
        f[ENERGY_KEY][a:b] = data.conditions.energy_mev.astype(np.float64).reshape(-1, 1)
        c = data.conditions
        for key, values in (
            ("caloforge_theta_rad", c.theta_rad),
            ("caloforge_phi_rad", c.phi_rad),
            ("caloforge_pdg", c.pdg),
        ):
            if self.include_conditions:
                f[key].resize((b,))
                f[key][a:b] = values
            uniq = np.unique(values)
            if key in self._varying:
                continue
            if len(uniq) > 1 or (key in self._const and self._const[key] != uniq[0].item()):
                self._varying.add(key)
                self._const.pop(key, None)
            else:
                self._const[key] = uniq[0].item()
        self._detectors.update(np.unique(c.detector).tolist())
        self.n = b

    def _finalize(self, f: h5py.File) -> None:
        for key, value in self._const.items():
            f.attrs[key] = value
        if len(self._detectors) == 1:
            f.attrs["caloforge_detector"] = next(iter(self._detectors))
        elif self._detectors:
            f.attrs["caloforge_detectors"] = sorted(self._detectors)
        if self._varying and not self.include_conditions:
            log.warning(
                "%s: %s vary between showers but the CaloChallenge format cannot store them; they are "
                "dropped "
                "(write with include_conditions=True to keep them as extra datasets)",
                self.path,
                sorted(k.removeprefix("caloforge_") for k in self._varying),
            )


def write(
    path: str | Path,
    data: ShowerSet,
    *,
    calibration: float = 1.0,
    showers_dtype: Literal["float32", "float64"] = "float32",
    include_conditions: bool = False,
    compression: Literal["gzip", "lzf", "none"] = "gzip",
) -> Path:
    """Write ``data`` as a CaloChallenge file the official evaluation reads unchanged (atomically).

    ``incident_energies`` float64 (N, 1) MeV; ``showers`` (N, n_z·n_phi·n_r) ``showers_dtype`` MeV, stored as
    ``calibration`` × our energies, radial bins fastest; gzip-compressed like the official files.
    """
    with CaloChallengeWriter(
        path,
        data.mesh_shape,
        calibration=calibration,
        showers_dtype=showers_dtype,
        include_conditions=include_conditions,
        compression=compression,
        source=data.source,
    ) as w:
        w.append(data)
    return Path(path)


__all__ = [
    "DEFAULT_PARTICLE",
    "DEFAULT_PHI_RAD",
    "DEFAULT_THETA_RAD",
    "DS2_MESH",
    "DS3_MESH",
    "KNOWN_MESHES",
    "SAMPLING_FRACTION",
    "VOXEL_THRESHOLD_MEV",
    "CaloChallengeWriter",
    "iter_read",
    "mesh_for_n_voxels",
    "read",
    "recalibration_factor",
    "write",
]
