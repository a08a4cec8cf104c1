"""Webdataset tar shards of showers, with a manifest (``caloforge data shard`` / ``caloforge data inspect``).

Sources (our native HDF5, CaloChallenge and LEMURS files, any mix) are streamed in chunks of
``chunk_showers`` and written into per-split tar shards ``<split>-NNNNNN.tar`` plus ``manifest.json``:

- **Split.** Each source's rows are assigned to train/val/test by a seeded permutation (exact counts
  ``round(f·n)``; seed derived from (seed, SHARD_SPLIT, source index)), independent of chunking.
- **Groups.** A shard holds showers of one (split, detector, particle) group only, so that streams can keep
  one sub-pipeline per detector (or per detector and particle) and mix them with weights.
- **Order.** Rows are shuffled within each chunk (seed derived from (seed, SHARD_CHUNK, source, chunk index)),
  then appended to their group's open shard; a shard is closed after ``showers_per_shard`` samples.
- **Samples.** One webdataset sample per shower, key ``<source index:03d>_<row:010d>``, two members:
  ``shower.f32`` (or ``shower.f16``): the raw little-endian (Z, P, R) voxel array in MeV (decoded with
  ``np.frombuffer``; no pickles, no .npy header), and ``meta.json``: ``energy_mev``, ``theta_rad``,
  ``phi_rad``, ``pdg``, ``detector``, ``source`` (the source's label), ``index`` (row in the source) and
  ``shape``.
- **Payload precision.** float32 (default) is exact. float16 halves the size; its 11-bit significand
  rounds every voxel with a relative error ≤ 2^-11 ≈ 4.9e-4 in its normal range 6.1e-5 .. 65504 MeV (voxels
  near the 15.15 keV CaloChallenge threshold: ≤ 4.9e-4 relative, ~7 eV absolute); values below 6.1e-5 MeV
  (61 eV) are subnormal with a fixed absolute step of 6e-8 MeV, values below 3e-8 MeV become 0, and values
  above 65504 MeV would overflow to inf — the writer refuses those with a ValueError (use float32).
  ``benchmarks/loader.py`` and ``tests/datasets/test_shards.py`` measure this.
- **Determinism.** Same sources + config → byte-identical shards and manifest (tar mtime 0, fixed owner
  names and modes, USTAR headers, sorted JSON, no timestamps).
- **Atomicity.** Everything is written into a temporary sibling directory that is renamed into place at the
  end (an existing shard set is only replaced with ``overwrite``); a failure leaves no partial set behind.
- **Manifest.** format + version, payload, config, sources, ``detectors`` ({name: DetectorSpec as dict}
  when the spec is known — a built-in, a detector YAML given as a source's detector, or the spec a native
  file records — else {"mesh_shape": [...]}; two sources with different specs under one name are an
  error), ``mesh_shapes``,
  ``particles``, ``counts`` per split/detector/particle, ``ranges`` of energy and angles, ``shards`` per split
  (name, detector, particle, pdg, n_samples, bytes, sha256) and ``stats = {"pooled": <stats block>,
  "per_detector": {name: <stats block>}}`` (``caloforge.datasets.stats``) over the TRAIN split, computed on
  the values as stored (after float16 rounding); ``pooled`` is null when detectors have different meshes.

Reading: :func:`shard_samples` parses a shard strictly (size and sha256 against the manifest, USTAR header
checksums, the end-of-archive marker, payload sizes, the sample count): a corrupt or truncated shard raises
a ``ValueError`` naming it before any of its samples is yielded (with sha256 verification; with
``verify="structure"`` a flipped payload byte cannot be detected, everything else still is). The tar members
are grouped into samples as ``webdataset``'s ``group_by_keys`` does, but strictly (no duplicate members or
keys, flat member names); any webdataset reader can read the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import webdataset as wds

import caloforge
from caloforge.config import to_dict
from caloforge.datasets import formats
from caloforge.datasets.formats import native
from caloforge.datasets.stats import StatsAccumulator
from caloforge.platform.conditioning import particle_name, pdg_of
from caloforge.platform.geometry import DetectorSpec, Mesh, builtin_detector_names, load_detector
from caloforge.platform.seeding import Purpose, rng

log = logging.getLogger("caloforge.datasets.shards")

FORMAT = "caloforge-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
META_MEMBER = "meta.json"
PAYLOADS: dict[str, tuple[str, str]] = {"float32": ("shower.f32", "<f4"), "float16": ("shower.f16", "<f2")}
FLOAT16_MAX = 65504.0
SOURCE_FORMATS = ("auto", *formats.FORMATS)
VerifyMode = Literal["sha256", "structure"]

_STATS_ROWS = 64
_MAX_MANIFEST_BYTES = 256 << 20


# -- configuration --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpec:
    """One input file and how to read it (``None`` = the format's default)."""

    path: Path
    format: Literal["auto", "native", "calochallenge", "lemurs"] = "auto"
    detector: str | None = None  # required for calochallenge/lemurs; a check for native files
    particle: str | None = None  # calochallenge/lemurs (files do not store it)
    calibration: float | None = None  # calochallenge: 1 (or our writer's); lemurs: 1/sampling fraction
    energy_unit: Literal["MeV", "GeV"] | None = None  # lemurs
    mesh_shape: tuple[int, int, int] | None = None  # calochallenge (default: the detector's mesh)
    theta_rad: float | None = None  # calochallenge (default π/2)
    phi_rad: float | None = None  # calochallenge (default 0)
    clip_negative_mev: float | None = None
    start: int = 0
    max_showers: int | None = None
    label: str | None = None  # stored as each sample's "source" (default: the file name)

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(
                f"source {self.path}: format must be one of {list(SOURCE_FORMATS)}, got {self.format!r}"
            )
        if self.start < 0:
            raise ValueError(f"source {self.path}: start must be >= 0, got {self.start}")
        if self.max_showers is not None and self.max_showers < 0:
            raise ValueError(f"source {self.path}: max_showers must be >= 0, got {self.max_showers}")
        if self.calibration is not None and not (self.calibration > 0 and math.isfinite(self.calibration)):
            raise ValueError(
                f"source {self.path}: calibration must be a finite factor > 0, got {self.calibration}"
            )
        if self.clip_negative_mev is not None and self.clip_negative_mev < 0:
            raise ValueError(
                f"source {self.path}: clip_negative_mev must be >= 0, got {self.clip_negative_mev}"
            )
        if self.particle is not None:
            pdg_of(self.particle)

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        """``PATH[:format[:detector]]`` (format one of auto/native/calochallenge/lemurs)."""
        if Path(text).exists():
            return cls(Path(text))
        parts = text.split(":")
        if len(parts) > 3 or (len(parts) > 1 and parts[1] not in SOURCE_FORMATS) or not parts[0]:
            raise ValueError(
                f"source {text!r}: expected PATH[:format[:detector]] with format in {list(SOURCE_FORMATS)}"
            )
        fmt = parts[1] if len(parts) > 1 else "auto"
        detector = parts[2] if len(parts) > 2 and parts[2] else None
        return cls(Path(parts[0]), fmt, detector)  # type: ignore[arg-type]

    def read_options(self) -> dict[str, Any]:
        opts = {
            "detector": self.detector,
            "particle": self.particle,
            "calibration": self.calibration,
            "energy_unit": self.energy_unit,
            "mesh_shape": self.mesh_shape,
            "theta_rad": self.theta_rad,
            "phi_rad": self.phi_rad,
            "clip_negative_mev": self.clip_negative_mev,
            "start": self.start or None,
            "max_showers": self.max_showers,
        }
        return {k: v for k, v in opts.items() if v is not None}


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if any(v < 0 or not math.isfinite(v) for v in values) or abs(sum(values) - 1.0) > 1e-9:
            raise ValueError(
                "split fractions must be >= 0 and sum to 1, got "
                f"train={self.train} val={self.val} test={self.test}"
            )


@dataclass(frozen=True)
class ShardConfig:
    """How to shard (the ``shards:`` block of a ``configs/data/*.yaml``)."""

    showers_per_shard: int = 1000
    payload_dtype: Literal["float32", "float16"] = "float32"
    split: SplitFractions = field(default_factory=SplitFractions)
    seed: int = 0
    chunk_showers: int = 2048  # rows read (and shuffled) at a time
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.showers_per_shard < 1:
            raise ValueError(f"showers_per_shard must be >= 1, got {self.showers_per_shard}")
        if self.chunk_showers < 1:
            raise ValueError(f"chunk_showers must be >= 1, got {self.chunk_showers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.payload_dtype not in PAYLOADS:
            raise ValueError(f"payload_dtype must be one of {list(PAYLOADS)}, got {self.payload_dtype!r}")


@dataclass(frozen=True)
class ShardJob:
    """A ``configs/data/*.yaml`` file: sources, output directory and sharding options."""

    out_dir: Path
    sources: tuple[SourceSpec, ...]
    shards: ShardConfig = field(default_factory=ShardConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")


# -- manifest -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    detector: str
    particle: str
    pdg: int
    n_samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("name", "detector", "particle", "pdg", "n_samples", "bytes", "sha256")
        }


class Manifest:
    """A shard set's ``manifest.json`` (read-only view)."""

    def __init__(self, directory: str | Path, data: dict[str, Any], raw: bytes | None = None) -> None:
        self.directory = Path(directory)
        self.data = data
        self._raw = raw if raw is not None else _manifest_bytes(data)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            hint = " (it is a file, not a shard directory)" if directory.is_file() else ""
            raise ValueError(
                f"{path}: manifest not found{hint}; is {directory} a shard set written by "
                "`caloforge data shard`?"
            )
        size = path.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise ValueError(
                f"{path}: manifest is {size} bytes (more than {_MAX_MANIFEST_BYTES}); refusing it"
            )
        raw = path.read_bytes()
        try:
            data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: invalid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a {FORMAT} manifest "
                f"(format = {data.get('format') if isinstance(data, dict) else None!r})"
            )
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {version!r} is not supported by this code (<= {FORMAT_VERSION})"
            )
        for key in ("payload", "detectors", "mesh_shapes", "shards", "counts", "stats"):
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}")
        _validate_manifest(path, data)
        return cls(directory, data, raw)

    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest file: identifies the shard set (stored in stream states)."""
        return hashlib.sha256(self._raw).hexdigest()

    @property
    def payload_dtype(self) -> str:
        return str(self.data["payload"]["dtype"])

    @property
    def payload_member(self) -> str:
        return str(self.data["payload"]["member"])

    @property
    def detectors(self) -> list[str]:
        return sorted(self.data["mesh_shapes"])

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.data["shards"]]

    @property
    def stats(self) -> dict[str, Any]:
        return self.data["stats"]

    @property
    def counts(self) -> dict[str, Any]:
        return self.data["counts"]

    def mesh_shape(self, detector: str) -> tuple[int, int, int]:
        try:
            return tuple(self.data["mesh_shapes"][detector])  # type: ignore[return-value]
        except KeyError:
            raise ValueError(
                f"{self.directory / MANIFEST}: unknown detector {detector!r} (known: {self.detectors})"
            ) from None

    def detector_spec(self, detector: str) -> DetectorSpec | None:
        """The DetectorSpec recorded for ``detector``: every built-in detector and every detector whose spec
        came with its source (a detector YAML, or a native file that records it, as ``caloforge data
        simulate`` writes). None only for a custom detector known by name and mesh shape alone."""
        from caloforge.config import from_dict

        self.mesh_shape(detector)
        entry = self.data["detectors"][detector]
        if set(entry) == {"mesh_shape"}:
            return None
        return from_dict(DetectorSpec, entry, f"{self.directory / MANIFEST}: detectors.{detector}")

    def detector_specs(self) -> dict[str, DetectorSpec]:
        """{name: DetectorSpec} of the detectors whose spec is recorded (see ``detector_spec``)."""
        specs = {d: self.detector_spec(d) for d in self.detectors}
        return {d: s for d, s in specs.items() if s is not None}

    def geometry(self, detector: str) -> Mesh:
        """The recorded mesh geometry (radial edges in mm) of ``detector``; ValueError naming the manifest
        when only its mesh shape is known."""
        spec = self.detector_spec(detector)
        if spec is None:
            raise ValueError(
                f"{self.directory / MANIFEST}: detector {detector!r} has no recorded DetectorSpec (only its "
                f"mesh shape {self.mesh_shape(detector)}), so its geometry is unknown: re-shard with the "
                "detector given as a YAML path (SOURCE as PATH:FORMAT:DETECTOR.yaml, or a native file from "
                "`caloforge data simulate`)"
            )
        return spec.geometry

    def model_mesh(self, detectors: Sequence[str] | None = None) -> Mesh:
        """The one mesh of a model trained on ``detectors`` (default: all): their common recorded geometry;
        when they share the mesh shape but differ in radial edges, radial bin-index edges (0, 1, …, n_r), so
        the model's radius coordinate is the bin fraction. ValueError naming the manifest when a detector has
        no recorded spec or the mesh shapes differ."""
        names = list(detectors) if detectors is not None else self.detectors
        if not names:
            raise ValueError(f"{self.directory / MANIFEST}: model_mesh needs at least one detector")
        meshes = {d: self.geometry(d) for d in names}
        shapes = {m.shape for m in meshes.values()}
        if len(shapes) != 1:
            raise ValueError(
                f"{self.directory / MANIFEST}: detectors {names} have different meshes "
                f"{ {d: m.shape for d, m in meshes.items()} }; one model trains on one mesh shape"
            )
        first = meshes[names[0]]
        if all(m == first for m in meshes.values()):
            return first
        return Mesh(first.n_z, first.n_phi, tuple(float(i) for i in range(first.n_r + 1)))

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["shards"]:
            raise ValueError(f"{self.directory / MANIFEST}: unknown split {split!r} (known: {self.splits})")
        return [ShardInfo(split=split, **entry) for entry in self.data["shards"][split]]

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.directory / check_shard_name(shard.name, str(self.directory / MANIFEST))

    def check_size(self, shard: ShardInfo) -> None:
        """The shard file exists and has the manifest's byte size (a stat, nothing is read)."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise ValueError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise ValueError(
                f"{path}: shard is {size} bytes, the manifest says {shard.bytes} "
                f"({'truncated' if size < shard.bytes else 'extra data'})"
            )

    def verify(self, splits: Sequence[str] | None = None, checksums: bool = True) -> list[str]:
        """Problems with the shard files (missing, wrong size, sha256 mismatch), one line per bad shard."""
        problems = []
        for split in splits if splits is not None else self.splits:
            for shard in self.shards(split):
                try:
                    read_shard_bytes(self, shard, "sha256" if checksums else "structure")
                except ValueError as exc:
                    problems.append(str(exc))
        return problems


def _manifest_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_KEYS = {"name", "detector", "particle", "pdg", "n_samples", "bytes", "sha256"}
_MAX_VOXELS = 1 << 26  # per shower: far above any calorimeter mesh, far below what would exhaust memory


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to {value}")
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_shard_name(name: Any, where: str) -> str:
    """A shard name from a manifest: a plain ``*.tar`` file name inside the shard directory (no directory
    parts, no ``..``, not absolute); anything else is a ValueError naming the manifest."""
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{where}: shard name {name!r} is not a plain '<name>.tar' file name in the shard directory "
            "(directories, '..' and absolute paths are refused)"
        )
    return name


def _min_sample_bytes(n_voxels: int, itemsize: int) -> int:
    """The fewest tar bytes one sample can take: two 512-byte headers, a meta.json of >= 1 block and the
    payload padded to 512."""
    return 3 * 512 + ((n_voxels * itemsize + 511) & ~511)


def _validate_manifest(path: Path, data: dict[str, Any]) -> None:
    """Structure and internal consistency of a manifest, checked before any shard is opened or anything
    is allocated from its numbers: payload, mesh shapes, shard entries (names, sizes, checksums, sample
    counts that fit in their byte sizes, unique names) and the counts per split/detector/particle, which
    must equal the sums over the shard entries. A ValueError names the manifest and the key."""
    payload = data["payload"]
    if not isinstance(payload, dict) or payload.get("dtype") not in PAYLOADS:
        raise ValueError(f"{path}: payload.dtype must be one of {list(PAYLOADS)}, got {payload!r}")
    if payload.get("member") != PAYLOADS[payload["dtype"]][0]:
        raise ValueError(
            f"{path}: payload.member {payload.get('member')!r} does not match payload.dtype "
            f"{payload['dtype']!r} (expected {PAYLOADS[payload['dtype']][0]!r})"
        )
    itemsize = np.dtype(PAYLOADS[payload["dtype"]][1]).itemsize
    meshes, detectors = data["mesh_shapes"], data["detectors"]
    if not isinstance(meshes, dict) or not isinstance(detectors, dict) or set(meshes) != set(detectors):
        raise ValueError(f"{path}: mesh_shapes and detectors must be mappings over the same detector names")
    min_bytes: dict[str, int] = {}
    for det, shape in meshes.items():
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(_is_count(v) and v >= 1 for v in shape)
            or math.prod(shape) > _MAX_VOXELS
        ):
            raise ValueError(
                f"{path}: mesh_shapes.{det} must be three positive ints with at most {_MAX_VOXELS} voxels, "
                f"got {shape!r}"
            )
        min_bytes[det] = _min_sample_bytes(math.prod(shape), itemsize)
    shards, counts = data["shards"], data["counts"]
    if not isinstance(shards, dict) or not set(shards) <= set(SPLITS):
        raise ValueError(f"{path}: shards must map splits {list(SPLITS)} to lists of shards")
    names: set[str] = set()
    sums: dict[str, dict[tuple[str, str], int]] = {}
    for split, entries in shards.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: shards.{split} must be a list")
        per = sums.setdefault(split, {})
        for i, entry in enumerate(entries):
            at = f"{path}: shards.{split}[{i}]"
            if not isinstance(entry, dict) or set(entry) != _SHARD_KEYS:
                found = sorted(entry) if isinstance(entry, dict) else entry
                raise ValueError(f"{at}: expected the keys {sorted(_SHARD_KEYS)}, got {found!r}")
            name = check_shard_name(entry["name"], at)
            if name in names:
                raise ValueError(f"{at}: shard {name!r} is listed twice")
            names.add(name)
            det = entry["detector"]
            if det not in meshes:
                raise ValueError(f"{at} ({name}): unknown detector {det!r} (known: {sorted(meshes)})")
            if not isinstance(entry["particle"], str) or not isinstance(entry["pdg"], int):
                raise ValueError(f"{at} ({name}): particle must be a name and pdg an int")
            if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
                raise ValueError(f"{at} ({name}): sha256 must be 64 lowercase hex digits")
            n, size = entry["n_samples"], entry["bytes"]
            if not _is_count(n) or not _is_count(size):
                raise ValueError(f"{at} ({name}): n_samples and bytes must be ints >= 0, got {n!r}, {size!r}")
            need = n * min_bytes[det] + 1024
            if size < need:
                raise ValueError(
                    f"{at} ({name}): {n} samples of mesh {meshes[det]} need at least {need} bytes, "
                    f"the manifest says the shard has {size}"
                )
            per[(det, entry["particle"])] = per.get((det, entry["particle"]), 0) + n
    if not isinstance(counts, dict):
        raise ValueError(f"{path}: counts must be a mapping")
    for split, per in sums.items():
        c = counts.get(split)
        at = f"{path}: counts.{split}"
        if not isinstance(c, dict):
            raise ValueError(f"{at}: missing (the shards list {sum(per.values())} samples)")
        expected = {
            "total": sum(per.values()),
            "per_detector": _sum_by(per, 0),
            "per_particle": _sum_by(per, 1),
            "per_detector_particle": {
                d: {p: v for (dd, p), v in sorted(per.items()) if dd == d and v} for d in _sum_by(per, 0)
            },
        }
        for key, value in expected.items():
            found = c.get(key)
            if isinstance(found, dict):  # a group with 0 samples may be listed or not
                found = _drop_zeros(found)
            if found != value:
                raise ValueError(
                    f"{at}.{key} = {c.get(key)!r} disagrees with the shard entries, which add up to {value!r}"
                )


def _sum_by(per: dict[tuple[str, str], int], i: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in sorted(per.items()):
        if v:
            out[k[i]] = out.get(k[i], 0) + v
    return out


def _drop_zeros(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_zeros(v)
            if v:
                out[k] = v
        elif v != 0:
            out[k] = v
    return out


# -- reading one shard ------------------------------------------------------------------------------------
_ZERO_BLOCK = bytes(512)
_OCTAL = re.compile(rb"[0-7]+")
_MAX_PAX_BYTES = 1 << 16  # a pax header of a CaloForge shard holds a few short records (ours write none)


def read_shard_bytes(manifest: Manifest, shard: ShardInfo, verify: VerifyMode = "sha256") -> bytes:
    """The shard file's bytes after checking existence, size (before reading a byte) and
    (``verify="sha256"``) the checksum."""
    if verify not in ("sha256", "structure"):
        raise ValueError(f"verify must be 'sha256' or 'structure', got {verify!r}")
    path = manifest.shard_path(shard)
    manifest.check_size(shard)
    with open(path, "rb") as f:
        data = f.read(shard.bytes + 1)  # never more than the manifest allows, even if the file grows now
    if len(data) != shard.bytes:
        raise ValueError(f"{path}: shard changed size while being read ({len(data)} bytes read)")
    if verify == "sha256":
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ValueError(
                f"{path}: sha256 mismatch (file {digest[:16]}…, manifest {shard.sha256[:16]}…): corrupt shard"
            )
    return data


def _pax_records(data: bytes | memoryview, where: str, off: int) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"`` of a pax extended header (strict: every record advances, stays
    inside the header and ends with a newline; a key appears once)."""
    buf, i, n = bytes(data), 0, len(data)
    if n > _MAX_PAX_BYTES:
        raise ValueError(f"{where}: pax header at byte {off} is {n} bytes (more than {_MAX_PAX_BYTES})")
    records: dict[str, str] = {}
    while i < n and buf[i] != 0:
        space = buf.find(b" ", i, min(n, i + 20))
        digits = buf[i:space] if space > i else b""
        if not digits.isdigit():
            raise ValueError(f"{where}: corrupt pax header at byte {off}: record at {i} has no length")
        length = int(digits)
        if length <= space - i + 2 or i + length > n or buf[i + length - 1] != 0x0A:
            raise ValueError(
                f"{where}: corrupt pax header at byte {off}: record at {i} has length {length} "
                f"(header is {n} bytes)"
            )
        try:
            text = buf[space + 1 : i + length - 1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: corrupt pax header at byte {off} ({exc})") from None
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise ValueError(f"{where}: corrupt pax header at byte {off}: record {text[:40]!r} has no key=")
        if key in records:
            raise ValueError(f"{where}: pax header at byte {off} repeats the record {key!r}")
        records[key] = value
        i += length
    return records


def _tar_size(field: bytes, where: str, off: int) -> int:
    """The size field of a tar header: octal digits, or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[0] & 0x80:  # base-256: big-endian two's complement over the remaining bytes
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        elif field[0] != 0x80:
            raise ValueError(f"{where}: corrupt tar header at byte {off}: size field {field!r}")
    else:
        digits = field.strip(b"\0 ")
        if digits and not _OCTAL.fullmatch(digits):
            raise ValueError(f"{where}: corrupt tar header at byte {off}: size field {field!r} is not octal")
        value = int(digits, 8) if digits else 0
    if value < 0:
        raise ValueError(f"{where}: corrupt tar header at byte {off}: negative size {value}")
    return value


def _member_name(name: str, where: str, off: int) -> str:
    """A member name of a CaloForge shard: ``<key>.<suffix>``, flat (no directories, no ``..``)."""
    if (
        not name
        or "/" in name
        or "\\" in name
        or name.startswith(".")
        or "." not in name
        or any(ord(c) < 32 for c in name)
    ):
        raise ValueError(
            f"{where}: tar member at byte {off} has the name {name!r}: shard members are flat "
            "'<key>.<suffix>' names (no directories, no '..', no absolute paths)"
        )
    return name


def _tar_members(data: bytes, where: str, check_headers: bool) -> Iterator[dict[str, Any]]:
    """Regular-file members of a tar archive (USTAR; pax headers honoured) as webdataset file samples.

    Raises on a header checksum mismatch (when ``check_headers``), a negative or non-octal size, a member
    running past the end, a corrupt pax header (records that do not advance, a pax header followed by
    another one or by nothing), member names that are not flat ``<key>.<suffix>``, a missing end-of-archive
    marker (truncation at a member boundary) and unsupported member types. Every header advances the
    offset by at least 512 bytes, so parsing ends after at most ``len(data) / 512`` headers.
    """
    view = memoryview(data)
    n, off = len(data), 0
    pax: dict[str, str] | None = None
    while True:
        if off + 512 > n:
            raise ValueError(f"{where}: truncated tar (no end-of-archive marker after byte {off})")
        header = data[off : off + 512]
        if header[0] == 0 and header == _ZERO_BLOCK:
            if pax is not None:
                raise ValueError(f"{where}: pax header at the end of the archive describes no member")
            return
        if check_headers:
            stored = header[148:156].split(b"\0", 1)[0].strip()
            computed = sum(header[:148]) + 256 + sum(header[156:])
            if not stored or not _OCTAL.fullmatch(stored) or int(stored, 8) != computed:
                raise ValueError(f"{where}: corrupt tar header at byte {off} (checksum mismatch)")
        size = _tar_size(header[124:136], where, off)
        try:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[345] and header[257:262] == b"ustar":
                name = f"{header[345:500].split(bytes(1), 1)[0].decode()}/{name}"
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: corrupt tar header at byte {off} ({exc})") from None
        kind = header[156:157]
        if pax is not None and "size" in pax:
            if not pax["size"].isdigit():
                raise ValueError(f"{where}: corrupt pax header before byte {off}: size {pax['size']!r}")
            size = int(pax["size"])
        start = off + 512
        if size > n - start:
            raise ValueError(
                f"{where}: truncated tar (member {name!r} at byte {off} declares {size} bytes, "
                f"{n - start} remain in the file)"
            )
        end = start + size
        off = start + ((size + 511) & ~511)
        if kind == b"0" or kind == b"\0":
            fname = pax.get("path", name) if pax is not None else name
            pax = None
            yield {
                "fname": _member_name(fname, where, start - 512),
                "data": view[start:end],
                "__url__": where,
            }
        elif kind == b"x":  # pax extended header for the next member
            if pax is not None:
                raise ValueError(f"{where}: two pax headers in a row at byte {start - 512}")
            pax = _pax_records(view[start:end], where, start - 512)
        elif kind == b"g":  # global pax headers carry nothing we use
            if pax is not None:
                raise ValueError(f"{where}: a global pax header follows a pax header at byte {start - 512}")
            _pax_records(view[start:end], where, start - 512)
        else:
            raise ValueError(
                f"{where}: unsupported tar member type {kind!r} for {name!r} (not a CaloForge shard?)"
            )


def _group_members(members: Iterator[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Members grouped into webdataset samples ``{"__key__", "__url__", suffix: data}`` (as webdataset's
    ``group_by_keys``), strictly: a sample's members are adjacent, no member repeats within a sample and no
    key names two samples."""
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    for m in members:
        key, _, suffix = m["fname"].partition(".")
        if current is None or key != current["__key__"]:
            if key in seen:
                raise ValueError(f"{where}: sample key {key!r} appears twice (duplicate sample)")
            seen.add(key)
            current = {"__key__": key, "__url__": where}
            samples.append(current)
        if suffix in current:
            raise ValueError(f"{where}: sample {key!r} holds member {m['fname']!r} twice (duplicate member)")
        current[suffix] = m["data"]
    return samples


def _reject_constant(text: str) -> Any:
    raise ValueError(f"non-finite number {text}")


def shard_samples(
    manifest: Manifest, shard: ShardInfo, verify: VerifyMode = "sha256"
) -> Iterator[tuple[dict, np.ndarray]]:
    """``(meta, showers_ZPR)`` for every sample of one shard; the array is a read-only view of the shard.

    The whole shard is checked (bytes, tar structure, members, JSON, payload sizes, detector, sample count)
    before its first sample is yielded. Every error is a ValueError naming the shard file.
    """
    data = read_shard_bytes(manifest, shard, verify)
    where = str(manifest.shard_path(shard))
    member, dtype = manifest.payload_member, np.dtype(PAYLOADS[manifest.payload_dtype][1])
    shape = manifest.mesh_shape(shard.detector)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    samples = _group_members(_tar_members(data, where, check_headers=verify != "sha256"), where)
    if len(samples) != shard.n_samples:
        raise ValueError(f"{where}: shard holds {len(samples)} samples, the manifest says {shard.n_samples}")
    for sample in samples:
        extra = sorted(k for k in sample if not k.startswith("__") and k not in (META_MEMBER, member))
        if META_MEMBER not in sample or member not in sample or extra:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(
                f"{where}: sample {sample['__key__']!r} must hold exactly {META_MEMBER!r} and {member!r} "
                f"(has {found})"
            )
        if len(sample[member]) != n_bytes:
            raise ValueError(
                f"{where}: sample {sample['__key__']!r}: payload has {len(sample[member])} bytes, "
                f"mesh {shape} of {dtype} needs {n_bytes}"
            )
    try:  # one JSON document for the whole shard: much cheaper than one parse per sample
        metas = json.loads(
            b"[" + b",".join(bytes(x[META_MEMBER]) for x in samples) + b"]", parse_constant=_reject_constant
        )
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        for x in samples:
            try:
                json.loads(bytes(x[META_MEMBER]), parse_constant=_reject_constant)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{where}: sample {x['__key__']!r}: invalid {META_MEMBER} ({exc})") from None
        raise ValueError(f"{where}: invalid {META_MEMBER} members") from None
    for x, meta in zip(samples, metas, strict=True):
        if not isinstance(meta, dict) or meta.get("detector") != shard.detector:
            found = meta.get("detector") if isinstance(meta, dict) else meta
            raise ValueError(
                f"{where}: sample {x['__key__']!r} is of detector {found!r}, the shard of {shard.detector!r}"
            )
    for x, meta in zip(samples, metas, strict=True):
        yield meta, np.frombuffer(x[member], dtype=dtype).reshape(shape)


# -- writing ----------------------------------------------------------------------------------------------
class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


class _OpenShard:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 (closed in finish)
        self.hashing = _HashingFile(self.file)
        self.tar = wds.TarWriter(
            self.hashing, encoder=False, mtime=0, user="caloforge", group="caloforge", mode=0o444
        )
        # plain USTAR headers: deterministic, no pax records, ~1/3 cheaper to write (webdataset 1.0.2's
        # TarWriter accepts format= but does not hand it to tarfile, so set it on the stream)
        self.tar.tarstream.format = tarfile.USTAR_FORMAT
        self.count = 0

    def finish(self) -> tuple[int, str]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.hashing.n, self.hashing.sha.hexdigest()


class _ShardSetWriter:
    def __init__(self, directory: Path, config: ShardConfig) -> None:
        self.directory = directory
        self.config = config
        self.member, self.dtype = PAYLOADS[config.payload_dtype]
        self.open: dict[tuple[str, str, int], _OpenShard] = {}
        self.next_index = dict.fromkeys(SPLITS, 0)
        self.shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        self.mesh_shapes: dict[str, tuple[int, int, int]] = {}
        self.train_stats: dict[str, StatsAccumulator] = {}
        self.counts: dict[str, dict[str, dict[int, int]]] = {s: {} for s in SPLITS}
        self.ranges: dict[str, dict[str, list[float]]] = {}

    def add(
        self, chunk: Any, split_ids: np.ndarray, source_id: int, label: str, rows: np.ndarray, where: str
    ) -> None:
        x = chunk.showers_NZPR
        cond = chunk.conditions
        for det in np.unique(cond.detector).tolist():
            shape = self.mesh_shapes.setdefault(det, chunk.mesh_shape)
            if shape != chunk.mesh_shape:
                raise ValueError(
                    f"{where}: detector {det!r} has mesh {chunk.mesh_shape} here but {shape} in an "
                    "earlier source"
                )
        if self.config.payload_dtype == "float16":
            peak = float(x.max(initial=0.0))
            if peak > FLOAT16_MAX:
                raise ValueError(
                    f"{where}: a voxel holds {peak:.6g} MeV, beyond float16's maximum {FLOAT16_MAX:g}: use "
                    "payload_dtype float32"
                )
        payload = x.astype(self.dtype, copy=False)  # little-endian float32/float16
        decoded = payload.astype(np.float32, copy=False)
        for det in np.unique(cond.detector).tolist():
            dmask = cond.detector == det
            r = self.ranges.setdefault(
                det,
                {
                    "energy_mev": [math.inf, -math.inf],
                    "theta_rad": [math.inf, -math.inf],
                    "phi_rad": [math.inf, -math.inf],
                },
            )
            for key in r:
                values = getattr(cond, key)[dmask]
                r[key] = [min(r[key][0], float(values.min())), max(r[key][1], float(values.max()))]
            tmask = dmask & (split_ids == 0)
            if tmask.any():
                acc = self.train_stats.setdefault(det, StatsAccumulator(chunk.mesh_shape))
                train_rows = np.flatnonzero(tmask)
                for a in range(0, len(train_rows), _STATS_ROWS):  # cache-sized temporaries: 5× faster
                    sel = train_rows[a : a + _STATS_ROWS]
                    acc.update(decoded[sel], cond.energy_mev[sel], cond.theta_rad[sel])
        for split_id, split in enumerate(SPLITS):
            smask = split_ids == split_id
            if not smask.any():
                continue
            for det in np.unique(cond.detector[smask]).tolist():
                sdmask = smask & (cond.detector == det)
                for pdg in np.unique(cond.pdg[sdmask]).tolist():
                    idx = np.flatnonzero(sdmask & (cond.pdg == pdg))
                    per = self.counts[split].setdefault(det, {})
                    per[pdg] = per.get(pdg, 0) + len(idx)
                    for i in idx:
                        meta = {
                            "energy_mev": float(cond.energy_mev[i]),
                            "theta_rad": float(cond.theta_rad[i]),
                            "phi_rad": float(cond.phi_rad[i]),
                            "pdg": int(pdg),
                            "detector": det,
                            "source": label,
                            "index": int(rows[i]),
                            "shape": list(chunk.mesh_shape),
                        }
                        self._write(
                            split, det, int(pdg), f"{source_id:03d}_{int(rows[i]):010d}", meta, payload[i]
                        )

    def _write(self, split: str, det: str, pdg: int, key: str, meta: dict, x: np.ndarray) -> None:
        group = (split, det, pdg)
        shard = self.open.get(group)
        if shard is None:
            name = f"{split}-{self.next_index[split]:06d}.tar"
            self.next_index[split] += 1
            shard = self.open[group] = _OpenShard(self.directory / name)
        shard.tar.write(
            {
                "__key__": key,
                META_MEMBER: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
                self.member: x.tobytes(),
            }
        )
        shard.count += 1
        if shard.count >= self.config.showers_per_shard:
            self._close(group)

    def _close(self, group: tuple[str, str, int]) -> None:
        shard = self.open.pop(group)
        n_bytes, sha = shard.finish()
        split, det, pdg = group
        self.shards[split].append(
            ShardInfo(shard.path.name, split, det, particle_name(pdg), pdg, shard.count, n_bytes, sha)
        )

    def close_all(self) -> None:
        for group in sorted(self.open):
            self._close(group)

    def abort(self) -> None:
        """Close what is open (the directory is deleted next); errors here chain onto the original one."""
        shards, self.open = list(self.open.values()), {}
        for shard in shards:
            try:
                shard.tar.close()
            finally:
                shard.file.close()


def _split_ids(n: int, fractions: SplitFractions, seed: int, source_id: int) -> np.ndarray:
    n_train = round(fractions.train * n)
    n_val = min(n - n_train, round(fractions.val * n))
    perm = rng(seed, Purpose.SHARD_SPLIT, source_id).permutation(n)
    ids = np.full(n, 2, dtype=np.int8)
    ids[perm[:n_train]] = 0
    ids[perm[n_train : n_train + n_val]] = 1
    return ids


def _detector_entry(name: str, spec: DetectorSpec | None, mesh_shape: tuple[int, int, int]) -> dict[str, Any]:
    if spec is None and name in builtin_detector_names():
        spec = load_detector(name)
    if spec is not None:
        if spec.geometry.shape != tuple(mesh_shape):
            raise ValueError(
                f"detector {name!r}: showers have mesh {mesh_shape}, its spec says {spec.geometry.shape}"
            )
        return to_dict(spec)
    return {"mesh_shape": list(mesh_shape)}


def write_shards(
    sources: Sequence[SourceSpec | str],
    out_dir: str | Path,
    config: ShardConfig | None = None,
    progress: bool = False,
) -> Manifest:
    """Convert ``sources`` into a shard set in ``out_dir`` (atomically); returns its manifest."""
    config = config or ShardConfig()
    specs = [s if isinstance(s, SourceSpec) else SourceSpec.parse(s) for s in sources]
    if not specs:
        raise ValueError("write_shards: no sources given")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not config.overwrite:
            raise ValueError(f"{out_dir}: already exists (set overwrite to replace a shard set)")
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
            raise ValueError(f"{out_dir}: exists and is not a shard set; refusing to replace it")
    labels = _labels(specs)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writer = _ShardSetWriter(tmp, config)
    try:
        sources_meta, specs_by_detector = _write_sources(specs, labels, writer, config, progress)
        writer.close_all()
        manifest = _build_manifest(writer, config, sources_meta, specs_by_detector)
        raw = _manifest_bytes(manifest)
        with open(tmp / MANIFEST, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %s", out_dir, {s: len(v) for s, v in writer.shards.items()})
    return Manifest(out_dir, manifest, raw)


def _labels(specs: list[SourceSpec]) -> list[str]:
    labels = [s.label or s.path.name for s in specs]
    seen: dict[str, int] = {}
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
    return [f"{lab}#{i}" if seen[lab] > 1 else lab for i, lab in enumerate(labels)]


def _write_sources(
    specs: list[SourceSpec], labels: list[str], writer: _ShardSetWriter, config: ShardConfig, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, DetectorSpec | None]]:
    from tqdm import tqdm

    sources_meta: list[dict[str, Any]] = []
    spec_of: dict[str, DetectorSpec | None] = {}
    for si, spec in enumerate(specs):
        info = formats.inspect_file(spec.path, spec.format)
        lo, hi = formats.check_rows(spec.path, info.n_showers, spec.start, spec.max_showers)
        n = hi - lo
        split_ids = _split_ids(n, config.split, config.seed, si)
        if info.format == "native":  # the file records its specs; a declared YAML must agree (iter_native)
            for name, det_spec in native.read_detector_specs(spec.path).items():
                _record_spec(spec_of, name, det_spec, spec.path)
            if spec.detector is not None and native.declares_spec(spec.detector):
                name, det_spec = formats.resolve_detector(spec.detector, path=spec.path)
                _record_spec(spec_of, name, det_spec, spec.path)
        elif spec.detector is not None:
            name, det_spec = formats.resolve_detector(
                spec.detector,
                path=spec.path,
                custom_ok=spec.mesh_shape is not None or spec.calibration is not None,
            )
            _record_spec(spec_of, name, det_spec, spec.path)
        done = 0
        bar = tqdm(total=n, desc=f"shard {spec.path.name}", unit="shower", disable=not progress)
        chunks = formats.iter_any(
            spec.path, info.format, chunk_size=config.chunk_showers, **spec.read_options()
        )
        source_name = None
        for ci, chunk in enumerate(chunks):
            m = len(chunk)
            source_name = chunk.source
            perm = rng(config.seed, Purpose.SHARD_CHUNK, si, ci).permutation(m)
            writer.add(
                chunk.subset(perm),
                split_ids[done : done + m][perm],
                si,
                labels[si],
                lo + done + perm,
                str(spec.path),
            )
            done += m
            bar.update(m)
        bar.close()
        if done != n:
            raise ValueError(f"{spec.path}: read {done} showers, expected {n}")
        sources_meta.append(
            {
                "label": labels[si],
                "path": str(spec.path),
                "format": info.format,
                "detector": spec.detector,
                "source": source_name,
                "rows": [lo, hi],
                "n_showers": n,
                "options": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in spec.read_options().items()
                },
            }
        )
    return sources_meta, spec_of


def _record_spec(
    spec_of: dict[str, DetectorSpec | None], name: str, spec: DetectorSpec | None, path: Path
) -> None:
    """Remember ``name``'s spec; two sources with different specs for one detector name are an error."""
    known = spec_of.get(name)
    if spec is None:
        spec_of.setdefault(name, None)
    elif known is None:
        spec_of[name] = spec
    elif known != spec:
        raise ValueError(
            f"{path}: detector {name!r} comes with a different DetectorSpec than in an earlier source "
            "(one name, one detector: rename one of them)"
        )


def _build_manifest(
    writer: _ShardSetWriter,
    config: ShardConfig,
    sources_meta: list[dict[str, Any]],
    spec_of: dict[str, DetectorSpec | None],
) -> dict[str, Any]:
    if not writer.mesh_shapes:
        raise ValueError("write_shards: the sources hold no showers")
    detectors = sorted(writer.mesh_shapes)
    pdgs = sorted({pdg for split in writer.counts.values() for per in split.values() for pdg in per})
    counts: dict[str, Any] = {}
    for split in SPLITS:
        per = writer.counts[split]
        counts[split] = {
            "total": sum(sum(p.values()) for p in per.values()),
            "per_detector": {d: sum(per[d].values()) for d in sorted(per)},
            "per_particle": {
                particle_name(pdg): sum(per[d].get(pdg, 0) for d in per)
                for pdg in pdgs
                if any(pdg in per[d] for d in per)
            },
            "per_detector_particle": {
                d: {particle_name(p): c for p, c in sorted(per[d].items())} for d in sorted(per)
            },
        }
    per_detector_stats = {d: acc.result() for d, acc in sorted(writer.train_stats.items())}
    pooled = None
    accs = [writer.train_stats[d] for d in sorted(writer.train_stats)]
    if accs and len({a.mesh_shape for a in accs}) == 1:
        merged = accs[0]
        for a in accs[1:]:
            merged = merged.merge(a)
        pooled = merged.result()
    elif accs:
        log.warning("detectors have different meshes: no pooled stats in the manifest")
    pooled_ranges = {
        key: [
            min(writer.ranges[d][key][0] for d in detectors),
            max(writer.ranges[d][key][1] for d in detectors),
        ]
        for key in ("energy_mev", "theta_rad", "phi_rad")
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "caloforge_version": caloforge.__version__,
        "payload": {
            "dtype": config.payload_dtype,
            "member": PAYLOADS[config.payload_dtype][0],
            "byte_order": "little",
            "layout": "(n_z, n_phi, n_r) C order, MeV",
            "meta_member": META_MEMBER,
        },
        "config": to_dict(config),
        "sources": sources_meta,
        "detectors": {d: _detector_entry(d, spec_of.get(d), writer.mesh_shapes[d]) for d in detectors},
        "mesh_shapes": {d: list(writer.mesh_shapes[d]) for d in detectors},
        "particles": [particle_name(p) for p in pdgs],
        "counts": counts,
        "ranges": {"pooled": pooled_ranges, "per_detector": {d: writer.ranges[d] for d in detectors}},
        "shards": {
            s: [sh.to_dict() for sh in sorted(writer.shards[s], key=lambda sh: sh.name)] for s in SPLITS
        },
        "stats": {"pooled": pooled, "per_detector": per_detector_stats},
    }


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "PAYLOADS",
    "SPLITS",
    "Manifest",
    "ShardConfig",
    "ShardInfo",
    "ShardJob",
    "SourceSpec",
    "SplitFractions",
    "read_shard_bytes",
    "shard_samples",
    "write_shards",
]
