"""Shower file formats (h5py enters CaloForge only in this package).

- ``native``: our HDF5 layout (what ``caloforge data simulate`` writes), see ``native.py``.
- ``calochallenge``: CaloChallenge 2022 datasets 2/3 (``incident_energies`` (N, 1), ``showers``
  (N, n_voxels)).
- ``lemurs``: the LEMURS multi-detector dataset (``showers`` (N, R, Phi, Z) + incident energy/θ/φ).

This module holds what the three share: format detection (:func:`detect_format`), a cheap look at a file
(:func:`inspect_file`), chunked reading of any format (:func:`iter_any`, :func:`read_any`), writing
(:func:`write_any`, :class:`NativeWriter` for chunked native output), detector resolution and the loud
validation every reader applies (NaN/inf, negative energies with optional clipping of tiny negatives,
mismatched N, wrong shapes: each a ``ValueError`` naming the file, the key and the problem).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import h5py
import numpy as np

from caloforge.datasets.schema import ShowerSet, check_conditions
from caloforge.platform.geometry import DetectorSpec, builtin_detector_names, load_detector

log = logging.getLogger("caloforge.datasets.formats")

FORMATS = ("native", "calochallenge", "lemurs")
FormatName = Literal["native", "calochallenge", "lemurs"]
DEFAULT_CHUNK_SHOWERS = 2048


# -- detectors ----------------------------------------------------------------------------------------
def resolve_detector(
    detector: str | Path | DetectorSpec | None, *, path: str | Path, custom_ok: bool = False
) -> tuple[str, DetectorSpec | None]:
    """Resolve what the user called the detector of a file into ``(name, spec or None)``.

    ``detector`` is a built-in detector name (``caloforge/platform/detectors/<name>.yaml``), a detector YAML
    path or a ``DetectorSpec``. Any other name is an error unless ``custom_ok`` (the caller was given the mesh
    shape explicitly), in which case the detector is a custom one known only by name.
    """
    if isinstance(detector, DetectorSpec):
        return detector.name, detector
    if detector is None or str(detector) == "":
        raise ValueError(
            f"{path}: this format does not store the detector: pass detector=<name> "
            f"(built-in: {builtin_detector_names()})"
        )
    as_path = Path(str(detector))
    if as_path.suffix in (".yaml", ".yml"):
        spec = load_detector(as_path)
        return spec.name, spec
    name = str(detector)
    if name in builtin_detector_names():
        return name, load_detector(name)
    if custom_ok:
        if any(c.isspace() for c in name) or "/" in name:
            raise ValueError(f"{path}: detector name must be a single word without '/', got {name!r}")
        return name, None
    raise ValueError(
        f"{path}: unknown detector {name!r} (built-in: {builtin_detector_names()}); pass a detector YAML "
        "path, or give mesh_shape=(n_z, n_phi, n_r) to read it as a custom detector"
    )


# -- validation ---------------------------------------------------------------------------------------
def check_voxels(
    x: np.ndarray,
    *,
    path: str | Path,
    key: str,
    row0: int = 0,
    clip_negative_mev: float | None = None,
) -> tuple[np.ndarray, int]:
    """Validate voxel energies (MeV) of a chunk whose first row is file row ``row0``.

    NaN/inf is always an error. Negative energies are an error reporting their count, unless
    ``clip_negative_mev`` is given: then values in ``[-clip_negative_mev, 0)`` are set to 0 (rounding noise
    of upstream tools) and anything below ``-clip_negative_mev`` is still an error. Returns the (possibly
    clipped) array and the number of clipped voxels.
    """
    finite = np.isfinite(x)
    if not finite.all():
        bad = ~finite
        rows = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))
        raise ValueError(
            f"{path}: key {key!r}: {int(bad.sum())} NaN/inf value(s) in {len(rows)} shower(s) "
            f"(first at row {row0 + int(rows[0])})"
        )
    neg = x < 0
    if not neg.any():
        return x, 0
    n_neg = int(neg.sum())
    rows = np.flatnonzero(neg.reshape(len(x), -1).any(axis=1))
    x_min = float(x.min())
    where = f"in {len(rows)} shower(s), first at row {row0 + int(rows[0])}, minimum {x_min:.6g} MeV"
    if clip_negative_mev is None:
        raise ValueError(
            f"{path}: key {key!r}: {n_neg} negative voxel energies {where}; pass clip_negative_mev=<MeV> to "
            "set tiny negatives to 0"
        )
    if clip_negative_mev < 0:
        raise ValueError(f"clip_negative_mev must be >= 0, got {clip_negative_mev}")
    too_negative = x < -clip_negative_mev
    if too_negative.any():
        raise ValueError(
            f"{path}: key {key!r}: {int(too_negative.sum())} voxel energies below -clip_negative_mev="
            f"-{clip_negative_mev} MeV ({n_neg} negative in total {where})"
        )
    return np.where(neg, np.zeros((), dtype=x.dtype), x), n_neg


def check_float32(
    x: np.ndarray, *, path: str | Path, key: str, row0: int = 0, what: str = "the conversion to float32"
) -> np.ndarray:
    """``x`` (float32, computed from values already checked finite) must still be finite: a stored value
    beyond float32's range (±3.4e38, possibly after a calibration factor) became inf. ValueError naming the
    file, the key and the first row."""
    finite = np.isfinite(x)
    if not finite.all():
        rows = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        raise ValueError(
            f"{path}: key {key!r}: {int((~finite).sum())} value(s) in {len(rows)} shower(s) exceed float32's "
            f"range (±{np.finfo(np.float32).max:.3g}) after {what} (first at row {row0 + int(rows[0])})"
        )
    return x


def to_float32(x: np.ndarray, *, path: str | Path, key: str, row0: int = 0, scale: float = 1.0) -> np.ndarray:
    """``x × scale`` as float32 (``x`` checked finite before), refusing values that overflow float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = (x * scale).astype(np.float32) if scale != 1.0 else x.astype(np.float32, copy=False)
    what = "the conversion to float32" + (f" and the calibration ×{scale:.6g}" if scale != 1.0 else "")
    return check_float32(y, path=path, key=key, row0=row0, what=what)


def read_rows(ds: Any, a: int, b: int, *, path: str | Path, key: str) -> np.ndarray:
    """``ds[a:b]`` of an HDF5 dataset; a read error (a damaged chunk, a file cut short) is a ValueError naming
    the file, the key and the first row that cannot be read, instead of h5py's bare ``OSError``."""
    try:
        return ds[a:b]
    except (OSError, RuntimeError) as exc:
        lo, hi = a, b  # ds[a:lo] reads, ds[a:hi] does not: bisect to the first unreadable row
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                ds[a:mid]
            except (OSError, RuntimeError):
                hi = mid
            else:
                lo = mid
        raise ValueError(
            f"{path}: key {key!r}: cannot read row {lo} (rows {a}..{b - 1} requested): the file is damaged "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def check_rows(path: str | Path, n_total: int, start: int, max_showers: int | None) -> tuple[int, int]:
    """Validate ``start``/``max_showers`` against a file of ``n_total`` showers; returns ``(start, stop)``."""
    if start < 0:
        raise ValueError(f"{path}: start must be >= 0, got {start}")
    if max_showers is not None and max_showers < 0:
        raise ValueError(f"{path}: max_showers must be >= 0, got {max_showers}")
    if start > n_total:
        raise ValueError(f"{path}: start={start} is beyond the {n_total} showers in the file")
    stop = n_total if max_showers is None else min(n_total, start + max_showers)
    return start, stop


def require_keys(f: h5py.File, path: str | Path, keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in f]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} for the {fmt} format (found: {sorted(f.keys())})")


def open_h5(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return h5py.File(path, "r", rdcc_nbytes=64 * 2**20)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc


class AtomicH5Writer:
    """An HDF5 file written to ``<path>.tmp`` and renamed to ``path`` on :meth:`close` (deleted on
    :meth:`abort` or when the ``with`` block raises), so a crash never leaves a half-written file.
    Subclasses create their datasets after ``super().__init__`` and may override :meth:`_finalize`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = h5py.File(self.tmp, "w")

    def _finalize(self, f: h5py.File) -> None:
        """Last writes before the file is closed (attributes gathered while appending)."""

    def close(self) -> Path:
        try:
            self._finalize(self._f)
        except BaseException:
            self.abort()
            raise
        self._f.close()
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- format detection ---------------------------------------------------------------------------------
def detect_format(path: str | Path) -> FormatName:
    """Which of :data:`FORMATS` a file is, from its attributes and keys."""
    from caloforge.datasets.formats import native

    with open_h5(path) as f:
        if f.attrs.get("format") == native.FORMAT:
            return "native"
        if "incident_energies" in f and "showers" in f:
            return "calochallenge"
        if "incident_energy" in f and "showers" in f:
            return "lemurs"
        raise ValueError(
            f"{path}: cannot tell the format: expected attribute format={native.FORMAT!r} (native), keys "
            f"'incident_energies'+'showers' (CaloChallenge) or 'incident_energy'+'showers' (LEMURS); found "
            f"keys {sorted(f.keys())}"
        )


@dataclass(frozen=True)
class FileInfo:
    """What a file holds, read without loading showers."""

    path: Path
    format: FormatName
    n_showers: int
    showers_shape: tuple[int, ...]  # the raw shape of the 'showers' dataset
    showers_dtype: str


def inspect_file(path: str | Path, format: str = "auto") -> FileInfo:
    fmt = detect_format(path) if format == "auto" else _check_format(format)
    with open_h5(path) as f:
        if "showers" not in f:
            raise ValueError(f"{path}: missing key 'showers' (found: {sorted(f.keys())})")
        ds = f["showers"]
        return FileInfo(Path(path), fmt, int(ds.shape[0]), tuple(int(s) for s in ds.shape), str(ds.dtype))


def _check_format(format: str) -> FormatName:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (known: {list(FORMATS)} or 'auto')")
    return format  # type: ignore[return-value]


# -- dispatch -----------------------------------------------------------------------------------------
_OPTIONS = {
    "native": {"detector", "start", "max_showers", "chunk_size", "clip_negative_mev"},
    "calochallenge": {
        "detector",
        "start",
        "max_showers",
        "chunk_size",
        "clip_negative_mev",
        "mesh_shape",
        "calibration",
        "particle",
        "theta_rad",
        "phi_rad",
    },
    "lemurs": {
        "detector",
        "start",
        "max_showers",
        "chunk_size",
        "clip_negative_mev",
        "calibration",
        "particle",
        "energy_unit",
    },
}


def iter_any(path: str | Path, format: str = "auto", **options: Any) -> Iterator[ShowerSet]:
    """Read any supported file in chunks (``chunk_size`` showers each), validated.

    ``options`` are the keyword arguments of the format's ``iter_read`` (``detector``, ``start``,
    ``max_showers``, ``chunk_size``, ``clip_negative_mev`` for all; ``mesh_shape``, ``calibration``,
    ``particle``, ``theta_rad``, ``phi_rad`` for CaloChallenge; ``calibration``, ``particle``,
    ``energy_unit`` for LEMURS). Options that do not apply to the file's format are an error, options set
    to ``None`` are ignored.
    """
    fmt = detect_format(path) if format == "auto" else _check_format(format)
    opts = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(opts) - _OPTIONS[fmt])
    if wrong:
        raise ValueError(
            f"{path}: option(s) {wrong} do not apply to the {fmt} format (allowed: {sorted(_OPTIONS[fmt])})"
        )
    if fmt == "native":
        return iter_native(path, **opts)
    if fmt == "calochallenge":
        from caloforge.datasets.formats import calochallenge

        return calochallenge.iter_read(path, **opts)
    from caloforge.datasets.formats import lemurs

    return lemurs.iter_read(path, **opts)


def read_any(
    path: str | Path, detector: str | Path | DetectorSpec | None = None, format: str = "auto", **options: Any
) -> ShowerSet:
    """Read (part of) any supported file into one ShowerSet; see :func:`iter_any` for the options."""
    return concat_chunks(list(iter_any(path, format, detector=detector, **options)), path)


def concat_chunks(parts: list[ShowerSet], path: str | Path) -> ShowerSet:
    """Join the chunks of one file into one ShowerSet (metadata of the first chunk, summed clip count)."""
    if not parts:
        raise ValueError(f"{path}: no showers in the selected range (check start/max_showers)")
    if len(parts) == 1:
        return parts[0]
    out = ShowerSet.concat(parts)
    meta = dict(parts[0].metadata)
    meta["n_clipped_negative"] = sum(int(p.metadata.get("n_clipped_negative", 0)) for p in parts)
    return ShowerSet(out.showers_NZPR, out.conditions, parts[0].source, parts[0].seed, meta)


def write_any(path: str | Path, data: ShowerSet, format: str = "native", **options: Any) -> Path:
    """Write a ShowerSet as ``native`` (``native.write``) or ``calochallenge`` (``calochallenge.write``)."""
    if format == "native":
        if options:
            raise ValueError(f"{path}: option(s) {sorted(options)} do not apply to the native format")
        from caloforge.datasets.formats import native

        return native.write(path, data)
    if format == "calochallenge":
        from caloforge.datasets.formats import calochallenge

        return calochallenge.write(path, data, **options)
    raise ValueError(f"{path}: cannot write format {format!r} (writable: ['native', 'calochallenge'])")


__all__ = [
    "DEFAULT_CHUNK_SHOWERS",
    "FORMATS",
    "FileInfo",
    "NativeWriter",
    "check_conditions",
    "check_float32",
    "check_rows",
    "check_voxels",
    "concat_chunks",
    "detect_format",
    "inspect_file",
    "iter_any",
    "iter_native",
    "read_any",
    "read_rows",
    "resolve_detector",
    "to_float32",
    "write_any",
]

# Our own layout; imported last because native.py uses the validation helpers above.
from caloforge.datasets.formats.native import NativeWriter, iter_native  # noqa: E402
