"""Our own HDF5 layout of the shower record (what ``caloforge data simulate`` writes).

Datasets: ``showers`` float32 (N, n_z, n_phi, n_r) MeV (chunks of 256 showers, lzf); ``energy_mev``,
``theta_rad``, ``phi_rad`` float64 (N,); ``pdg`` int64 (N,); ``detector`` (N,) UTF-8 strings;
``showers_crc32`` uint32 (N,): the CRC32 of each shower's stored voxels, checked on every read (files written
before it are read unchecked). The numeric datasets carry HDF5's fletcher32 chunk checksums. A damaged chunk
is a ValueError naming file, key and row (``formats.read_rows``), not data; a chunk zeroed whole, its
fletcher32 included, passes HDF5's checks (and lzf's) but not the CRC32. Attributes:
``format`` = "caloforge-showers", ``format_version``, ``source``, ``seed`` (-1 when none),
``caloforge_version``, ``metadata_json`` and, when the writer knows them, ``detectors_json``: the full
``DetectorSpec`` of each detector as a JSON object {name: spec as dict} (``read_detector_specs``), so a
detector defined by a user's YAML keeps its geometry, materials and ranges through sharding and training.
Files written before that attribute existed still yield the spec the simulator put in ``metadata_json``
(``detector_spec``).

One writer (``NativeWriter``; ``write`` appends once) and one reader (``iter_native`` in validated chunks;
``read`` concatenates them), so there is one definition of the layout.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

import caloforge
from caloforge.datasets.formats import (
    DEFAULT_CHUNK_SHOWERS,
    AtomicH5Writer,
    check_conditions,
    check_rows,
    check_voxels,
    open_h5,
    read_rows,
    require_keys,
    to_float32,
)
from caloforge.datasets.schema import ShowerSet
from caloforge.platform.conditioning import Conditions
from caloforge.platform.geometry import DetectorSpec

SPECS_ATTR = "detectors_json"
CRC_KEY = "showers_crc32"  # per shower: CRC32 of its float32 voxels as stored (files before it: not checked)

FORMAT = "caloforge-showers"
FORMAT_VERSION = 1


def row_crc32(x: np.ndarray) -> np.ndarray:
    """CRC32 of each row's bytes (N,) uint32."""
    rows = np.ascontiguousarray(x).reshape(len(x), -1)
    return np.fromiter((zlib.crc32(r) for r in rows), dtype=np.uint32, count=len(rows))


def _check_crc(x: np.ndarray, stored: np.ndarray, *, path: Path, row0: int) -> None:
    bad = row_crc32(x) != stored
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: key 'showers': {int(bad.sum())} shower(s) do not match their CRC32 in {CRC_KEY!r} "
            f"(first at row {row0 + i}): the file is damaged"
        )


def read_detector_specs(path: str | Path) -> dict[str, DetectorSpec]:
    """The ``DetectorSpec`` recorded for each detector of a native file ({} when none is recorded).

    Reads the ``detectors_json`` attribute, else (files written before it) the simulator's
    ``metadata_json["detector_spec"]``. A spec whose mesh differs from the file's showers is a ValueError."""
    from caloforge.config import from_dict

    path = Path(path)
    with open_h5(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (attribute 'format' = {f.attrs.get('format')!r})")
        if SPECS_ATTR in f.attrs:
            raw = json.loads(f.attrs[SPECS_ATTR])
            key = SPECS_ATTR
        else:
            legacy = json.loads(f.attrs.get("metadata_json", "{}")).get("detector_spec")
            raw = {legacy["name"]: legacy} if isinstance(legacy, dict) and "name" in legacy else {}
            key = "metadata_json.detector_spec"
        shape = tuple(int(v) for v in f["showers"].shape[1:]) if "showers" in f else None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: attribute {key!r} must be a JSON object {{name: spec}}")
    specs = {}
    for name, entry in raw.items():
        spec = from_dict(DetectorSpec, entry, f"{path}: {key}.{name}")
        if spec.name != name:
            raise ValueError(f"{path}: {key}.{name} holds the spec of detector {spec.name!r}")
        if shape is not None and spec.geometry.shape != shape:
            raise ValueError(
                f"{path}: {key}.{name} has mesh {spec.geometry.shape}, the file's showers {shape}"
            )
        specs[name] = spec
    return specs


def iter_native(
    path: str | Path,
    *,
    detector: str | Path | DetectorSpec | None = None,
    start: int = 0,
    max_showers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SHOWERS,
    clip_negative_mev: float | None = None,
) -> Iterator[ShowerSet]:
    """Read the native layout in chunks of ``chunk_size`` showers, validated.

    ``detector``, when given (a name, a detector YAML path or a ``DetectorSpec``), must be the (only)
    detector named in the rows read; a spec given that way must equal the one the file records.
    """
    path = Path(path)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if detector is not None:
        detector = _declared_detector(path, detector)
    with open_h5(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (attribute 'format' = {f.attrs.get('format')!r})")
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION or version < 1:
            raise ValueError(
                f"{path}: unsupported format_version {version} (this code reads 1..{FORMAT_VERSION})"
            )
        require_keys(f, path, ("showers", "energy_mev", "theta_rad", "phi_rad", "pdg", "detector"), "native")
        ds = f["showers"]
        if ds.ndim != 4:
            raise ValueError(f"{path}: key 'showers' has shape {ds.shape}, expected (N, n_z, n_phi, n_r)")
        if not np.issubdtype(ds.dtype, np.floating):
            raise ValueError(f"{path}: key 'showers' has dtype {ds.dtype}, expected floating point (MeV)")
        n = ds.shape[0]
        for k in ("energy_mev", "theta_rad", "phi_rad", "pdg", "detector"):
            if f[k].shape != (n,):
                raise ValueError(
                    f"{path}: key {k!r} has shape {f[k].shape}, expected ({n},) to match 'showers'"
                )
        has_crc = CRC_KEY in f
        if has_crc and (f[CRC_KEY].shape != (n,) or ds.dtype != np.float32):
            raise ValueError(
                f"{path}: key {CRC_KEY!r} has shape {f[CRC_KEY].shape} for {ds.dtype} showers, expected "
                f"({n},) for float32 showers"
            )
        lo, hi = check_rows(path, n, start, max_showers)
        source = str(f.attrs.get("source", "unknown"))
        seed = int(f.attrs.get("seed", -1))
        meta = json.loads(f.attrs.get("metadata_json", "{}"))
        for a in range(lo, hi, chunk_size):
            b = min(hi, a + chunk_size)
            x = read_rows(ds, a, b, path=path, key="showers")
            if has_crc:
                _check_crc(x, read_rows(f[CRC_KEY], a, b, path=path, key=CRC_KEY), path=path, row0=a)
            x, n_clipped = check_voxels(
                x, path=path, key="showers", row0=a, clip_negative_mev=clip_negative_mev
            )
            x = to_float32(x, path=path, key="showers", row0=a)

            def column(key: str, dtype: type, a: int = a, b: int = b) -> np.ndarray:
                return read_rows(f[key], a, b, path=path, key=key).astype(dtype)

            cond = Conditions(
                column("energy_mev", np.float64),
                column("theta_rad", np.float64),
                column("phi_rad", np.float64),
                column("pdg", np.int64),
                np.asarray(read_rows(f["detector"].asstr(), a, b, path=path, key="detector"), dtype=str),
            )
            check_conditions(cond, path=path, keys={}, row0=a)
            if detector is not None:
                others = sorted(set(np.unique(cond.detector).tolist()) - {detector})
                if others:
                    raise ValueError(
                        f"{path}: key 'detector': rows {a}..{b - 1} name detector(s) {others}, but the "
                        "source "
                        f"was declared as detector {detector!r}"
                    )
            yield ShowerSet(
                x,
                cond,
                source,
                None if seed < 0 else seed,
                {**meta, "format": "native", "path": str(path), "start": a, "n_clipped_negative": n_clipped},
            )


def declares_spec(detector: str | Path | DetectorSpec) -> bool:
    """Whether a declared detector is a spec (a ``DetectorSpec`` or a detector YAML path), not just a name."""
    return isinstance(detector, DetectorSpec) or Path(str(detector)).suffix in (".yaml", ".yml")


def _declared_detector(path: Path, detector: str | Path | DetectorSpec) -> str:
    """The name of a declared detector; a declared spec (not a bare name) must equal the file's recorded
    one."""
    from caloforge.datasets.formats import resolve_detector

    if not declares_spec(detector):
        return str(detector)
    name, spec = resolve_detector(detector, path=path)
    if spec is not None:
        recorded = read_detector_specs(path).get(name)
        if recorded is not None and recorded != spec:
            raise ValueError(
                f"{path}: the file records a different DetectorSpec for {name!r} than the declared "
                f"{str(detector) if not isinstance(detector, DetectorSpec) else 'spec'}"
            )
    return name


class NativeWriter(AtomicH5Writer):
    """Append ShowerSets chunk by chunk (temp file, then rename on close; removed on abort).

    ``write`` is this writer with one append; large conversions append chunk by chunk without holding the
    data in memory. ``detectors``: the specs recorded in ``detectors_json`` (each must have the file's mesh).
    """

    def __init__(
        self,
        path: str | Path,
        mesh_shape: tuple[int, int, int],
        source: str = "unknown",
        seed: int | None = None,
        metadata: dict | None = None,
        detectors: Sequence[DetectorSpec] = (),
    ) -> None:
        self.mesh_shape = tuple(int(v) for v in mesh_shape)
        specs = _specs_json(path, self.mesh_shape, detectors)
        super().__init__(path)
        self.n = 0
        f = self._f
        f.create_dataset(
            "showers",
            shape=(0, *self.mesh_shape),
            maxshape=(None, *self.mesh_shape),
            dtype=np.float32,
            chunks=(256, *self.mesh_shape),
            compression="lzf",
            fletcher32=True,  # per-chunk checksums: a damaged chunk is a read error, not data
        )
        for k in ("energy_mev", "theta_rad", "phi_rad"):
            f.create_dataset(
                k, shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(4096,), fletcher32=True
            )
        f.create_dataset("pdg", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,), fletcher32=True)
        f.create_dataset(
            CRC_KEY, shape=(0,), maxshape=(None,), dtype=np.uint32, chunks=(4096,), fletcher32=True
        )
        f.create_dataset(
            "detector", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(4096,)
        )
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["source"] = source
        f.attrs["seed"] = -1 if seed is None else int(seed)
        f.attrs["caloforge_version"] = caloforge.__version__
        f.attrs["metadata_json"] = json.dumps(metadata or {}, sort_keys=True)
        if specs is not None:
            f.attrs[SPECS_ATTR] = specs

    def append(self, data: ShowerSet) -> None:
        if data.mesh_shape != self.mesh_shape:
            raise ValueError(
                f"{self.path}: cannot append mesh {data.mesh_shape} to a file of mesh {self.mesh_shape}"
            )
        m = len(data)
        if m == 0:
            return
        f, a, b = self._f, self.n, self.n + m
        for k in ("showers", "energy_mev", "theta_rad", "phi_rad", "pdg", "detector", CRC_KEY):
            f[k].resize((b, *f[k].shape[1:]))
        f["showers"][a:b] = data.showers_NZPR
        f[CRC_KEY][a:b] = row_crc32(data.showers_NZPR)
        c = data.conditions
        f["energy_mev"][a:b] = c.energy_mev
        f["theta_rad"][a:b] = c.theta_rad
        f["phi_rad"][a:b] = c.phi_rad
        f["pdg"][a:b] = c.pdg
        f["detector"][a:b] = c.detector.astype(object)
        self.n = b


def _specs_json(
    path: str | Path, mesh_shape: tuple[int, ...], detectors: Sequence[DetectorSpec]
) -> str | None:
    from caloforge.config import to_dict

    if not detectors:
        return None
    specs: dict[str, dict] = {}
    for spec in detectors:
        if not isinstance(spec, DetectorSpec):
            raise ValueError(f"{path}: detectors must be DetectorSpecs, got {type(spec).__name__}")
        if spec.geometry.shape != mesh_shape:
            raise ValueError(
                f"{path}: detector {spec.name!r} has mesh {spec.geometry.shape}, the file {mesh_shape}"
            )
        if spec.name in specs:
            raise ValueError(f"{path}: detector {spec.name!r} given twice")
        specs[spec.name] = to_dict(spec)
    return json.dumps(specs, sort_keys=True)


def write(path: str | Path, data: ShowerSet, detectors: Sequence[DetectorSpec] | None = None) -> Path:
    """Write ``data`` atomically (temp file + rename), so a crash never leaves a half-written file.

    ``detectors``: the specs to record (``detectors_json``); None records the spec the simulator puts in
    ``data.metadata["detector_spec"]`` (``caloforge.datasets.simulator``), if any."""
    if detectors is None:
        detectors = _specs_from_metadata(data.metadata, path)
    with NativeWriter(Path(path), data.mesh_shape, data.source, data.seed, data.metadata, detectors) as w:
        w.append(data)
    return Path(path)


def _specs_from_metadata(metadata: dict, path: str | Path) -> list[DetectorSpec]:
    from caloforge.config import from_dict

    entry = metadata.get("detector_spec")
    if entry is None:
        return []
    return [from_dict(DetectorSpec, entry, f"{path}: metadata.detector_spec")]


def read(path: str | Path) -> ShowerSet:
    """The whole file as one ShowerSet (validated; see ``iter_native`` for chunked reading)."""
    path = Path(path)
    parts = list(iter_native(path))
    if not parts:
        raise ValueError(f"{path}: no showers")
    first = parts[0]
    per_chunk = ("format", "path", "start", "n_clipped_negative")
    meta = {k: v for k, v in first.metadata.items() if k not in per_chunk}
    if len(parts) == 1:
        return ShowerSet(first.showers_NZPR, first.conditions, first.source, first.seed, meta)
    return ShowerSet(
        np.concatenate([p.showers_NZPR for p in parts]),
        Conditions.concat([p.conditions for p in parts]),
        first.source,
        first.seed,
        meta,
    )
