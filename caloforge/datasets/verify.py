"""Verify a whole shard set before a run starts: ``verify_shards(manifest_dir) -> ShardVerification``.

What is checked (every shard of every split):

- the manifest itself (``Manifest.load``: JSON without NaN/Infinity, shard names that are plain ``*.tar``
  files of the directory, sample counts that fit in the byte sizes, counts per split/detector/particle equal
  to the sums over the shard entries) — before any shard is opened;
- each shard's size (before it is read), sha256 and tar structure, sample by sample (``shard_samples``);
- each sample's ``meta.json``: ``energy_mev`` finite, > 0 and within float32's range, ``theta_rad`` in
  [0, π], ``phi_rad`` finite, ``pdg`` equal to the shard's, ``shape`` equal to the detector's mesh;
- each sample's payload: every voxel finite and >= 0.

Every problem names the shard file (and the sample key and field); all shards are checked and all problems
are reported together in one ``ValueError``.

**Cache.** A successful verification is recorded, keyed by the manifest's fingerprint (its sha256) and the
(size, mtime) of every shard file, in ``verified.json`` next to the manifest — or, when that directory is not
writable, in ``$CALOFORGE_HOME/verified/<fingerprint>.json``. A later call with the same manifest and
untouched shard files returns the recorded report (``cached=True``) without reading the shards; any change
re-verifies. A failed verification is never recorded. Shards are still checked by size and sha256 each time
a stream opens one (``StreamConfig.verify``), so a cache entry cannot hide later damage from training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caloforge import paths
from caloforge.datasets.shards import MANIFEST, Manifest, ShardInfo, shard_samples

log = logging.getLogger("caloforge.datasets.verify")

CACHE_FILE = "verified.json"
CACHE_FORMAT = "caloforge-shard-verification"
CACHE_VERSION = 1  # bump when the checks change: older records then no longer count
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_LISTED = 20


@dataclass(frozen=True)
class ShardVerification:
    """The outcome of a successful :func:`verify_shards`."""

    directory: str
    fingerprint: str  # sha256 of manifest.json
    n_shards: int
    n_samples: dict[str, int]  # per split
    n_bytes: int
    seconds: float  # of the verification that produced this record (not of a cache lookup)
    cached: bool  # True when taken from the cache without reading the shards
    cache_path: str | None  # where the record is (None when it could not be written)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        n = sum(self.n_samples.values())
        how = "recorded earlier, shards unchanged" if self.cached else f"{self.seconds:.1f} s"
        return (
            f"verified {self.n_shards} shards, {n} showers ({self.n_bytes / 2**20:.1f} MiB; {how}): sizes, "
            "sha256, tar structure, counts, finite energies, conditions and voxels"
        )


def verify_shards(
    manifest_dir: str | Path, *, use_cache: bool = True, workers: int | None = None
) -> ShardVerification:
    """Verify every shard of the shard set in ``manifest_dir`` (see the module docstring); returns the
    report, or raises a ValueError listing every problem (each naming its shard file).

    ``use_cache=False`` always reads the shards (the record is still written on success). ``workers``:
    threads reading shards in parallel (default: up to 4)."""
    manifest = Manifest.load(manifest_dir)
    shards = [s for split in manifest.splits for s in manifest.shards(split)]
    signature = _signature(manifest, shards)
    cache_path = _cache_path(manifest)
    if use_cache and signature is not None:
        record = _read_cache(cache_path, manifest.fingerprint, signature)
        if record is not None:
            log.info("shard set %s: verification recorded in %s still holds", manifest.directory, cache_path)
            return ShardVerification(**{**record, "cached": True, "cache_path": str(cache_path)})
    t0 = time.perf_counter()
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1, max(1, len(shards)))
    if n_workers < 1:
        raise ValueError(f"workers must be >= 1, got {n_workers}")
    with ThreadPoolExecutor(n_workers) as pool:
        problems = [p for found in pool.map(lambda s: _check_shard(manifest, s), shards) for p in found]
    if problems:
        listed = problems[:_MAX_LISTED]
        more = f"\n  … and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(
            f"{manifest.directory / MANIFEST}: {len(problems)} problem(s) in {len(shards)} shards:\n  "
            + "\n  ".join(listed)
            + more
        )
    n_samples = {split: sum(s.n_samples for s in manifest.shards(split)) for split in manifest.splits}
    report = ShardVerification(
        directory=str(manifest.directory),
        fingerprint=manifest.fingerprint,
        n_shards=len(shards),
        n_samples=n_samples,
        n_bytes=sum(s.bytes for s in shards),
        seconds=round(time.perf_counter() - t0, 3),
        cached=False,
        cache_path=None,
    )
    signature = _signature(manifest, shards)  # as read: a file replaced meanwhile is not recorded as good
    written = _write_cache(cache_path, report, signature) if signature is not None else None
    report = ShardVerification(**{**report.to_dict(), "cache_path": str(written) if written else None})
    log.info("%s: %s", manifest.directory, report.summary())
    return report


# -- one shard ---------------------------------------------------------------------------------------------
def _check_shard(manifest: Manifest, shard: ShardInfo) -> list[str]:
    where = str(manifest.shard_path(shard))
    try:
        samples = list(shard_samples(manifest, shard, "sha256"))
    except ValueError as exc:
        return [str(exc)]
    if not samples:
        return []
    metas = [m for m, _ in samples]
    keys = [f"{m.get('source', '?')}#{m.get('index', '?')}" for m in metas]
    problems: list[str] = []

    def numbers(field: str) -> np.ndarray | None:
        values = [m.get(field) for m in metas]
        for key, v in zip(keys, values, strict=True):
            if isinstance(v, bool) or not isinstance(v, int | float):
                problems.append(f"{where}: sample {key}: meta {field!r} = {v!r} is not a number")
                return None
        return np.asarray(values, dtype=np.float64)

    def first_bad(field: str, bad: np.ndarray, what: str) -> None:
        i = int(np.flatnonzero(bad)[0])
        problems.append(
            f"{where}: {int(bad.sum())} sample(s) with meta {field!r} {what} "
            f"(first: sample {keys[i]}, value {metas[i].get(field)!r})"
        )

    e, t, p = numbers("energy_mev"), numbers("theta_rad"), numbers("phi_rad")
    if e is not None:
        bad = ~np.isfinite(e) | (e <= 0) | (e > _FLOAT32_MAX)
        if bad.any():
            first_bad("energy_mev", bad, "not finite, > 0 and within float32's range")
    if t is not None:
        bad = ~np.isfinite(t) | (t < 0) | (t > math.pi + 1e-9)
        if bad.any():
            first_bad("theta_rad", bad, "outside [0, π]")
    if p is not None and not np.isfinite(p).all():
        first_bad("phi_rad", ~np.isfinite(p), "not finite")
    pdg_bad = np.array([m.get("pdg") != shard.pdg for m in metas])
    if pdg_bad.any():
        first_bad("pdg", pdg_bad, f"differing from the shard's pdg {shard.pdg}")
    mesh = list(manifest.mesh_shape(shard.detector))
    shape_bad = np.array([m.get("shape") != mesh for m in metas])
    if shape_bad.any():
        first_bad("shape", shape_bad, f"differing from the mesh {mesh} of detector {shard.detector!r}")
    x = np.stack([a for _, a in samples]).reshape(len(samples), -1)
    bad_rows = ~np.isfinite(x).all(axis=1) | (x < 0).any(axis=1)
    if bad_rows.any():
        i = int(np.flatnonzero(bad_rows)[0])
        worst = x[i][~np.isfinite(x[i]) | (x[i] < 0)][0]
        problems.append(
            f"{where}: {int(bad_rows.sum())} sample(s) with NaN, inf or negative voxel energies "
            f"(first: sample {keys[i]}, value {float(worst)!r})"
        )
    return problems


# -- cache -------------------------------------------------------------------------------------------------
def _signature(manifest: Manifest, shards: Sequence[ShardInfo]) -> dict[str, list[int]] | None:
    """{shard name: [size, mtime_ns]} of the files as they are now (None if one is missing: no cache)."""
    out = {}
    for s in shards:
        try:
            st = manifest.shard_path(s).stat()
        except FileNotFoundError:
            return None
        out[s.name] = [st.st_size, st.st_mtime_ns]
    return out


def _cache_path(manifest: Manifest) -> Path:
    if os.access(manifest.directory, os.W_OK):
        return manifest.directory / CACHE_FILE
    return paths.home() / "verified" / f"{manifest.fingerprint}.json"


def _read_cache(path: Path, fingerprint: str, signature: dict[str, list[int]]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable verification record (%s); verifying again", path, exc)
        return None
    if not isinstance(data, dict) or (data.get("format"), data.get("version")) != (
        CACHE_FORMAT,
        CACHE_VERSION,
    ):
        return None
    if data.get("fingerprint") != fingerprint or data.get("files") != signature:
        return None
    report = data.get("report")
    fields = set(ShardVerification.__dataclass_fields__)
    if not isinstance(report, dict) or set(report) != fields or report.get("fingerprint") != fingerprint:
        return None
    return report


def _write_cache(path: Path, report: ShardVerification, signature: dict[str, list[int]]) -> Path | None:
    record = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "fingerprint": report.fingerprint,
        "files": signature,
        "report": report.to_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("%s: cannot record the verification (%s); it will run again next time", path, exc)
        return None
    return path


__all__ = ["CACHE_FILE", "ShardVerification", "verify_shards"]
