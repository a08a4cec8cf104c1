"""Reliability drills of the data side (issue 15, drills 7–9, and the small config/evaluation fixes).

Every bad input must end in a ``ValueError`` that names the file (shard, manifest or HDF5 file) and, where
there is one, the key and the row — never a hang (each case has a time limit), never a raw ``OSError`` or a
traceback, never an inf or NaN handed on. Each test also checks what was kept (the other shards, the rows
before the damage).

The drills double as the count in docs/reliability.md: every parametrized case is one bad input.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloforge.cli import main
from caloforge.config import ConfigError, load_config, read_yaml
from caloforge.datasets.formats import calochallenge, lemurs, native
from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.shards import SPLITS, Manifest, ShardConfig, shard_samples, write_shards
from caloforge.datasets.streaming import load_split
from caloforge.datasets.verify import CACHE_FILE, verify_shards
from caloforge.evaluation.api import evaluate
from caloforge.platform.conditioning import Conditions
from caloforge.platform.geometry import load_detector

SMALL_MESH = (6, 4, 3)


# -- a small real shard set ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, showers_factory: Callable[..., ShowerSet]) -> Path:
    synthetic_showers = showers_factory
    root = tmp_path_factory.mktemp("pristine")
    pdg = np.where(np.arange(40) % 2 == 0, 22, 11)
    native.write(root / "a.h5", synthetic_showers(40, detector="det-a", seed=5, pdg=pdg))
    write_shards([root / "a.h5"], root / "shards", ShardConfig(showers_per_shard=8, seed=3))
    return root / "shards"


@pytest.fixture
def shard_set(pristine: Path, tmp_path: Path) -> Manifest:
    shutil.copytree(pristine, tmp_path / "shards")
    return Manifest.load(tmp_path / "shards")


def _raw(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _write_raw(directory: Path, raw: dict, recount: bool = True) -> None:
    """Write a (tampered) manifest; ``recount`` makes its counts agree with its shard entries."""
    if recount:
        for split in SPLITS:
            per: dict[str, dict[str, int]] = {}
            for e in raw["shards"].get(split, []):
                d = per.setdefault(e["detector"], {})
                d[e["particle"]] = d.get(e["particle"], 0) + e["n_samples"]
            raw["counts"][split] = {
                "total": sum(sum(d.values()) for d in per.values()),
                "per_detector": {k: sum(d.values()) for k, d in per.items()},
                "per_particle": {
                    p: sum(d.get(p, 0) for d in per.values()) for p in {p for d in per.values() for p in d}
                },
                "per_detector_particle": per,
            }
    (directory / "manifest.json").write_text(json.dumps(raw, indent=1))


def _replace_shard(m: Manifest, name: str, data: bytes, n_samples: int | None = None) -> Manifest:
    """Put ``data`` in place of shard ``name`` with a manifest that agrees on its size, sha256 (and count):
    damage that predates the manifest, so it reaches the tar parser."""
    (m.directory / name).write_bytes(data)
    raw = _raw(m.directory)
    for e in raw["shards"]["train"]:
        if e["name"] == name:
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            fits = max(0, (len(data) - 1024) // 2048)  # samples of 3 headers + 72 float32 that fit
            e["n_samples"] = n_samples if n_samples is not None else min(e["n_samples"], fits)
    _write_raw(m.directory, raw)
    return Manifest.load(m.directory)


# -- hand-built tar members ---------------------------------------------------------------------------------
def _header(name: bytes, size_field: bytes, kind: bytes = b"0", prefix: bytes = b"") -> bytes:
    """A USTAR header with a correct checksum (so that both verify modes reach the size/name checks)."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000444\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field.ljust(12, b"\0")[:12]
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[345 : 345 + len(prefix)] = prefix
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _member(name: str, data: bytes, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    field = size_field if size_field is not None else b"%011o\0" % len(data)
    return _header(name.encode(), field, kind) + data + bytes(-len(data) % 512)


def _pax(records: bytes) -> bytes:
    return _member("PaxHeader", records, b"x")


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def _tar(blocks: list[bytes]) -> bytes:
    return b"".join(blocks) + bytes(1024)


def _fuzz_cases() -> dict[str, Callable[[list[tuple[str, bytes]]], tuple[bytes, int | None]]]:
    """name -> mutation of the shard's members -> (tar bytes, n_samples the manifest claims or None)."""

    def plain(ms: list[tuple[str, bytes]]) -> list[bytes]:
        return [_member(n, d) for n, d in ms]

    def first_size(field: bytes) -> Callable:
        return lambda ms: (_tar([_member(ms[0][0], ms[0][1], size_field=field), *plain(ms[1:])]), None)

    def before_first(block: bytes) -> Callable:
        return lambda ms: (_tar([block, *plain(ms)]), None)

    def renamed(name: str) -> Callable:
        return lambda ms: (_tar([_member(name, ms[0][1]), *plain(ms[1:])]), None)

    return {
        "negative size -512 (octal)": first_size(b"-0000001000"),
        "negative size -1": first_size(b"-1"),
        "size with sign +": first_size(b"+0000001000"),
        "size not octal": first_size(b"0000000009x"),
        "base-256 negative size": first_size(b"\xff" * 12),
        "base-256 huge size": first_size(b"\x80" + (1 << 80).to_bytes(11, "big")),
        "base-256 bad marker": first_size(b"\xc0" + bytes(11)),
        "huge octal size (8 GiB)": first_size(b"77777777777"),
        "size one block too large": lambda ms: (
            _tar([*plain(ms[:-1]), _member(ms[-1][0], ms[-1][1], size_field=b"%011o" % 10**6)]),
            None,
        ),
        "zero-length pax record": before_first(_pax(b"0 path=x\n")),
        "negative pax record length": before_first(_pax(b"-5 path=x\n")),
        "pax record longer than its header": before_first(_pax(b"99 path=x\n")),
        "pax record without newline": before_first(_pax(b"12 path=abcd")),
        "pax record without key": before_first(_pax(b"8 =abcd\n")),
        "pax record repeated": before_first(_pax(b"11 path=ab\n11 path=cd\n")),
        "pax size negative": before_first(_pax(b"15 size=-512\n\n")),
        "pax size huge": before_first(_pax(b"22 size=99999999999\n")),
        "pax header of 70 KB": before_first(_pax(b"70009 comment=" + b"y" * 69994 + b"\n")),
        "two pax headers in a row (repeated headers)": before_first(_pax(b"9 a=bcd\n") + _pax(b"9 a=bcd\n")),
        "global header after a pax header": before_first(_pax(b"9 a=bcd\n") + _member("g", b"", b"g")),
        "pax header describing nothing": lambda ms: (_tar([*plain(ms), _pax(b"9 a=bcd\n")]), None),
        "pax path traversal": before_first(_pax(b"26 path=../../evil.meta.json\n")),
        "traversal name": renamed("../../etc/passwd.meta.json"),
        "absolute name": renamed("/etc/passwd.meta.json"),
        "directory in name": renamed("sub/" + "x.meta.json"),
        "name without suffix": renamed("000_0000000001"),
        "hidden name": renamed(".meta.json"),
        "ustar prefix directory": lambda ms: (
            _tar(
                [
                    _header(ms[0][0].encode(), b"%011o\0" % len(ms[0][1]), prefix=b"/tmp")
                    + ms[0][1]
                    + bytes(-len(ms[0][1]) % 512),
                    *plain(ms[1:]),
                ]
            ),
            None,
        ),
        "symlink member": before_first(_header(b"x.meta.json", b"00000000000", b"2")),
        "repeated member header (duplicate member)": lambda ms: (_tar(plain([ms[0], *ms])), None),
        "duplicate sample (key twice)": lambda ms: (_tar(plain([*ms, ms[0], ms[1]])), len(ms) // 2 + 1),
        "extra member in a sample": lambda ms: (_tar(plain([ms[0], ms[1], (ms[0][0] + ".x", b"1")])), 1),
        "no end-of-archive marker": lambda ms: (b"".join(plain(ms[:4])), None),
        "cut inside a member": lambda ms: (b"".join(plain(ms[:4]))[:-700], None),
        "only zeros": lambda ms: (bytes(8192), None),
        "random bytes": lambda ms: (np.random.default_rng(7).bytes(8192), None),
    }


FUZZ = _fuzz_cases()


# -- drill 7: tar fuzz ------------------------------------------------------------------------------------
@pytest.mark.timeout(5)
@pytest.mark.parametrize("case", sorted(FUZZ))
def test_drill7_tar_fuzz_is_a_named_error_never_a_hang(shard_set: Manifest, case: str) -> None:
    shard = shard_set.shards("train")[0]
    original = (shard_set.directory / shard.name).read_bytes()
    members = _members(original)
    rebuilt = _tar([_member(n, d) for n, d in members])  # the hand-built baseline parses
    m = _replace_shard(shard_set, shard.name, rebuilt)
    assert len(list(shard_samples(m, m.shards("train")[0], verify="structure"))) == shard.n_samples
    data, n_samples = FUZZ[case](members)
    m = _replace_shard(m, shard.name, data, n_samples)
    bad = m.shards("train")[0]
    for mode in ("sha256", "structure"):
        with pytest.raises(ValueError, match=rf"{bad.name}") as info:
            next(shard_samples(m, bad, verify=mode))  # type: ignore[arg-type]
        assert not isinstance(info.value, OSError)
    # kept: every other shard still reads in full
    other = m.shards("train")[1]
    assert len(list(shard_samples(m, other))) == other.n_samples


@pytest.mark.timeout(10)
def test_drill7_verification_names_every_bad_shard_and_caches_only_success(shard_set: Manifest) -> None:
    first = verify_shards(shard_set.directory)
    assert not first.cached and first.n_shards == len([s for sp in SPLITS for s in shard_set.shards(sp)])
    assert sum(first.n_samples.values()) == 40 and (shard_set.directory / CACHE_FILE).is_file()
    again = verify_shards(shard_set.directory)
    assert again.cached and again.fingerprint == first.fingerprint
    touched = shard_set.directory / shard_set.shards("val")[0].name
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert not verify_shards(shard_set.directory).cached  # a shard touched since: verified again
    # two damaged shards (damage the manifest agrees with): both named in one error, nothing recorded
    names = [s.name for s in shard_set.shards("train")[:2]]
    members = _members((shard_set.directory / names[0]).read_bytes())
    m = _replace_shard(shard_set, names[0], FUZZ["zero-length pax record"](members)[0])
    m = _replace_shard(m, names[1], FUZZ["traversal name"](members)[0])
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as info:
        verify_shards(m.directory)
    assert names[0] in str(info.value) and names[1] in str(info.value) and "pax" in str(info.value)
    assert json.loads((m.directory / CACHE_FILE).read_text())["fingerprint"] == first.fingerprint  # stale
    # kept: the undamaged shards still read
    other = m.shards("train")[2]
    assert len(list(shard_samples(m, other))) == other.n_samples


# -- drill 8: manifest tampering ----------------------------------------------------------------------------
def _tamper_entry(key: str, value: object, recount: bool = True) -> Callable[[dict], bool]:
    def apply(raw: dict) -> bool:
        raw["shards"]["train"][0][key] = value
        return recount

    return apply


def _set(path: tuple, value: object) -> Callable[[dict], bool]:
    def apply(raw: dict) -> bool:
        node = raw
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return False

    return apply


def _nan_range(raw: dict) -> bool:
    raw["ranges"]["pooled"]["energy_mev"][0] = math.nan  # json.dumps writes the NaN literal
    return False


def _listed_twice(raw: dict) -> bool:
    raw["shards"]["train"].append(dict(raw["shards"]["train"][0]))
    return True


MANIFEST_CASES: dict[str, tuple[Callable[[dict], bool], str]] = {
    "traversal name": (_tamper_entry("name", "../outside.tar"), r"'\.\./outside\.tar' is not a plain"),
    "absolute name": (_tamper_entry("name", "/tmp/outside.tar"), r"'/tmp/outside\.tar' is not a plain"),
    "directory in name": (_tamper_entry("name", "sub/x.tar"), r"'sub/x\.tar' is not a plain"),
    "name not a string": (_tamper_entry("name", 7), r"shard name 7 is not a plain"),
    "absurd sample count": (_tamper_entry("n_samples", 10**12), r"shards\.train\[0\].*need at least"),
    "negative sample count": (_tamper_entry("n_samples", -1), r"n_samples and bytes must be ints >= 0"),
    "bytes as text": (_tamper_entry("bytes", "8192"), r"n_samples and bytes must be ints"),
    "sha256 not hex": (_tamper_entry("sha256", "x" * 64), r"sha256 must be 64 lowercase hex"),
    "unknown detector": (_tamper_entry("detector", "det-z"), r"unknown detector 'det-z'"),
    "listed twice": (_listed_twice, r"is listed twice"),
    "total disagrees": (_set(("counts", "train", "total"), 10**9), r"counts\.train\.total = 1000000000"),
    "per detector disagrees": (
        _set(("counts", "val", "per_detector", "det-a"), 1),
        r"counts\.val\.per_detector = \{'det-a': 1\} disagrees",
    ),
    "per detector/particle disagrees": (
        _set(("counts", "test", "per_detector_particle"), {"det-a": {"e-": 99}}),
        r"counts\.test\.per_detector_particle",
    ),
    "count for a shard-less split missing": (_set(("counts",), {}), r"counts\.\w+: missing"),
    "NaN range": (_nan_range, r"invalid JSON \(non-finite number NaN"),
    "overflowing number": (
        _set(("ranges", "pooled", "theta_rad"), "__1e999__"),
        r"invalid JSON \(number 1e999 overflows",
    ),
    "absurd mesh": (_set(("mesh_shapes", "det-a"), [10**5, 10**5, 10**5]), r"mesh_shapes\.det-a must be"),
    "payload member traversal": (
        _set(("payload", "member"), "../../x"),
        r"payload\.member '\.\./\.\./x' does not match",
    ),
    "payload dtype unknown": (_set(("payload", "dtype"), "float64"), r"payload\.dtype must be one of"),
}


@pytest.mark.timeout(5)
@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_drill8_tampered_manifest_is_refused_before_any_shard_is_read(
    shard_set: Manifest, case: str, capsys: pytest.CaptureFixture
) -> None:
    tamper, pattern = MANIFEST_CASES[case]
    raw = _raw(shard_set.directory)
    recount = tamper(raw)
    _write_raw(shard_set.directory, raw, recount=recount)
    text = (shard_set.directory / "manifest.json").read_text().replace('"__1e999__"', "1e999")
    (shard_set.directory / "manifest.json").write_text(text)
    (shard_set.directory.parent / "outside.tar").write_bytes(b"not to be read")
    for shard in shard_set.directory.glob("*.tar"):  # rejected on the manifest alone: no shard is needed
        shard.unlink()
    with pytest.raises(ValueError, match=pattern) as info:
        Manifest.load(shard_set.directory)
    assert "manifest.json" in str(info.value)
    assert main(["data", "inspect", str(shard_set.directory)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=pattern):
        load_split(shard_set.directory, "train")


@pytest.mark.timeout(5)
def test_drill8_consistent_absurd_counts_are_refused_before_allocating(
    shard_set: Manifest, capsys: pytest.CaptureFixture
) -> None:
    raw = _raw(shard_set.directory)
    raw["shards"]["train"][0]["n_samples"] = 10**12  # 10^12 × 288 bytes: np.empty would ask for 288 TB
    raw["shards"]["train"][0]["bytes"] = 10**12 * 4096
    _write_raw(shard_set.directory, raw)
    m = Manifest.load(shard_set.directory)  # self-consistent: only the file sizes can refute it
    name = m.shards("train")[0].name
    with pytest.raises(ValueError, match=rf"{name}: shard is \d+ bytes, the manifest says 4096000000000000"):
        load_split(m.directory, "train")  # (before np.empty((10^12, 6, 4, 3)))
    with pytest.raises(ValueError, match=rf"1 problem\(s\)[\s\S]*{name}: shard is"):
        verify_shards(m.directory)
    assert main(["data", "inspect", str(m.directory)]) == 2
    assert name in capsys.readouterr().err
    # kept: the other shards still read
    assert len(list(shard_samples(m, m.shards("train")[1]))) == m.shards("train")[1].n_samples


def _meta_edit(edit: Callable[[dict], None]) -> Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]:
    def apply(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        out = list(ms)
        for i, (n, d) in enumerate(out):
            if n.endswith("meta.json"):
                meta = json.loads(d)
                edit(meta)
                out[i] = (n, json.dumps(meta).encode())
                break
        return out

    return apply


def _nan_voxel(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    out = list(ms)
    for i, (n, d) in enumerate(out):
        if n.endswith("shower.f32"):
            x = np.frombuffer(d, np.float32).copy()
            x[5] = np.nan
            out[i] = (n, x.tobytes())
            break
    return out


SAMPLE_CASES: dict[str, tuple[Callable, str]] = {
    "NaN energy": (_meta_edit(lambda m: m.update(energy_mev=math.nan)), r"invalid meta\.json \(non-finite"),
    "Infinity theta": (_meta_edit(lambda m: m.update(theta_rad=math.inf)), r"invalid meta\.json"),
    "negative energy": (_meta_edit(lambda m: m.update(energy_mev=-5.0)), r"'energy_mev' not finite, > 0"),
    "energy beyond float32": (_meta_edit(lambda m: m.update(energy_mev=1e39)), r"'energy_mev' not finite"),
    "theta outside [0, pi]": (_meta_edit(lambda m: m.update(theta_rad=4.0)), r"'theta_rad' outside"),
    "energy as text": (_meta_edit(lambda m: m.update(energy_mev="1e3")), r"'energy_mev' = '1e3' is not a"),
    "pdg differs from the shard's": (_meta_edit(lambda m: m.update(pdg=2212)), r"'pdg' differing"),
    "shape differs from the mesh": (_meta_edit(lambda m: m.update(shape=[3, 4, 6])), r"'shape' differing"),
    "NaN voxel": (_nan_voxel, r"NaN, inf or negative voxel energies"),
}


@pytest.mark.timeout(5)
@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_drill8_bad_conditions_in_a_shard_fail_verification(
    shard_set: Manifest, case: str, capsys: pytest.CaptureFixture
) -> None:
    edit, pattern = SAMPLE_CASES[case]
    shard = shard_set.shards("train")[0]
    members = edit(_members((shard_set.directory / shard.name).read_bytes()))
    m = _replace_shard(shard_set, shard.name, _tar([_member(n, d) for n, d in members]))
    with pytest.raises(ValueError, match=rf"{shard.name}: .*{pattern}"):
        verify_shards(m.directory)
    assert main(["data", "inspect", str(m.directory)]) == 2
    assert shard.name in capsys.readouterr().err
    assert not (m.directory / CACHE_FILE).exists()  # a failed verification is not recorded


# -- drill 9: HDF5 damage -----------------------------------------------------------------------------------
_FACTORY: list[Callable[..., ShowerSet]] = []


@pytest.fixture(autouse=True)
def _factory(showers_factory: Callable[..., ShowerSet]) -> None:
    _FACTORY[:] = [showers_factory]


def _showers(n: int, seed: int = 0) -> ShowerSet:
    return _FACTORY[0](n, seed=seed)


def _write_format(fmt: str, path: Path, data: ShowerSet, dtype: str = "float32") -> dict:
    """Write ``data`` as ``fmt`` (our writers; LEMURS by hand, chunked, gzip); returns the read options."""
    if fmt == "native":
        native.write(path, data)
        return {}
    if fmt == "calochallenge":
        calochallenge.write(path, data, showers_dtype=dtype)  # type: ignore[arg-type]
        return {"detector": "det-a", "mesh_shape": SMALL_MESH}
    with h5py.File(path, "w") as f:
        x = data.showers_NZPR.transpose(0, 3, 2, 1).astype(dtype)
        f.create_dataset("showers", data=x, chunks=(min(64, len(x)), *x.shape[1:]), compression="gzip")
        f.create_dataset("incident_energy", data=data.conditions.energy_mev)
        f.create_dataset("incident_theta", data=data.conditions.theta_rad)
        f.create_dataset("incident_phi", data=data.conditions.phi_rad)
    return {"detector": "det-a", "calibration": 1.0}


def _iter(fmt: str, path: Path, **options: object):
    reader = {
        "native": native.iter_native,
        "calochallenge": calochallenge.iter_read,
        "lemurs": lemurs.iter_read,
    }
    return reader[fmt](path, **options)  # type: ignore[operator]


FORMATS = ("native", "calochallenge", "lemurs")


@pytest.mark.timeout(5)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_drill9_truncated_file_is_a_named_error(tmp_path: Path, fmt: str, fraction: float) -> None:
    path = tmp_path / f"{fmt}.h5"
    options = _write_format(fmt, path, _showers(300))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match=rf"{path.name}: not a readable HDF5 file \(.*truncated") as info:
        list(_iter(fmt, path, **options))
    assert not isinstance(info.value, OSError)


@pytest.mark.timeout(5)
@pytest.mark.parametrize("fmt", FORMATS)
def test_drill9_zeroed_chunk_names_file_key_and_row_and_keeps_the_rows_before(
    tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"{fmt}.h5"
    n = {"native": 600, "calochallenge": 2500, "lemurs": 300}[fmt]
    options = _write_format(fmt, path, _showers(n))
    with h5py.File(path, "r") as f:
        ds = f["showers"]
        rows_per_chunk = ds.chunks[0]
        info = ds.id.get_chunk_info(1)  # the second chunk: rows rows_per_chunk .. 2·rows_per_chunk-1
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset : info.byte_offset + info.size] = bytes(info.size)
    path.write_bytes(bytes(raw))
    kept: list[ShowerSet] = []
    # gzip (CaloChallenge, LEMURS): HDF5 cannot decompress it; native (lzf decodes zeros as zeros, the
    # zeroed fletcher32 matches zeros): the per-shower CRC32 does not match
    pattern = {
        "native": rf"{path.name}: key 'showers': {rows_per_chunk} shower\(s\) do not match their CRC32 in "
        rf"'showers_crc32' \(first at row {rows_per_chunk}\)",
    }.get(fmt, rf"{path.name}: key 'showers': cannot read row {rows_per_chunk} ")
    with pytest.raises(ValueError, match=pattern) as e:
        for chunk in _iter(fmt, path, chunk_size=rows_per_chunk, **options):
            kept.append(chunk)
    assert not isinstance(e.value, OSError)
    assert fmt == "native" or isinstance(e.value.__cause__, OSError)
    assert sum(len(c) for c in kept) == rows_per_chunk  # the rows before the damaged chunk were read
    assert all(np.isfinite(c.showers_NZPR).all() for c in kept)


@pytest.mark.timeout(5)
@pytest.mark.parametrize("fmt", FORMATS)
def test_drill9_values_beyond_float32_are_refused_not_turned_into_inf(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"{fmt}.h5"
    options = _write_format(fmt, path, _showers(50), dtype="float64")
    if fmt == "native":  # our writer stores float32: rewrite the dataset as float64
        with h5py.File(path, "a") as f:
            x = f["showers"][...].astype(np.float64)
            del f["showers"], f[native.CRC_KEY]  # as another tool would write it
            f.create_dataset("showers", data=x)
    with h5py.File(path, "a") as f:
        ds = f["showers"]
        assert ds.dtype == np.float64
        row = ds[17]
        row.reshape(-1)[3] = 1e39
        ds[17] = row
    kept = list(_iter(fmt, path, chunk_size=16, max_showers=16, **options))
    assert np.isfinite(kept[0].showers_NZPR).all()
    with pytest.raises(
        ValueError, match=rf"{path.name}: key 'showers': 1 value\(s\) .*float32's range .*row 17"
    ):
        list(_iter(fmt, path, chunk_size=16, **options))


@pytest.mark.timeout(5)
def test_drill9_calibration_overflow_and_huge_incident_energy(tmp_path: Path) -> None:
    path = tmp_path / "cc.h5"
    options = _write_format("calochallenge", path, _showers(20))
    with h5py.File(path, "a") as f:
        f["showers"][4, 0] = 1e38  # finite in float32, beyond it after ×10
    with pytest.raises(ValueError, match=r"cc\.h5: key 'showers'.*calibration ×10 \(first at row 4\)"):
        list(calochallenge.iter_read(path, calibration=10.0, **options))
    with h5py.File(path, "a") as f:
        f["showers"][4, 0] = 1.0
        f["incident_energies"][9, 0] = 1e39
    with pytest.raises(
        ValueError, match=r"cc\.h5: key 'incident_energies': 1 value\(s\) exceed float32's range"
    ):
        list(calochallenge.iter_read(path, **options))


@pytest.mark.timeout(5)
@pytest.mark.parametrize("value", [0.0, -2.0, math.nan, math.inf, 1e-320, "abc"])
def test_drill9_calibration_attribute_must_be_a_positive_factor(tmp_path: Path, value: object) -> None:
    path = tmp_path / "cc.h5"
    options = _write_format("calochallenge", path, _showers(10))
    with h5py.File(path, "a") as f:
        f.attrs["caloforge_calibration"] = value
    with pytest.raises(ValueError, match=r"cc\.h5: attribute 'caloforge_calibration' = .*finite factor > 0"):
        list(calochallenge.iter_read(path, **options))
    assert len(calochallenge.read(path, calibration=1.0, **options)) == 10  # kept: an explicit factor reads


@pytest.mark.timeout(5)
@pytest.mark.parametrize("fmt", FORMATS)
def test_drill9_integer_showers_are_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"{fmt}.h5"
    options = _write_format(fmt, path, _showers(10))
    with h5py.File(path, "a") as f:
        x = f["showers"][...]
        del f["showers"]
        f.create_dataset("showers", data=np.rint(x).astype(np.int32))
    with pytest.raises(ValueError, match=rf"{path.name}: key 'showers' has dtype int32, expected floating"):
        list(_iter(fmt, path, **options))


@pytest.mark.timeout(5)
def test_drill9_zeroed_energies_name_the_key_and_row(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    native.write(path, _showers(30))
    with h5py.File(path, "a") as f:
        f["energy_mev"][12:20] = 0.0
    with pytest.raises(
        ValueError, match=r"a\.h5: key 'energy_mev': 8 value\(s\) are <= 0 MeV \(first at row 12"
    ):
        native.read(path)


# -- evaluation inputs --------------------------------------------------------------------------------------
@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("energy_mev", math.nan, r"key 'energy_mev': 1 value\(s\) are NaN/inf \(first at row 7"),
        ("theta_rad", math.nan, r"key 'theta_rad': 1 value\(s\) are outside \[0, π\] rad \(first at row 7"),
        ("phi_rad", math.inf, r"key 'phi_rad': 1 value\(s\) are NaN/inf \(first at row 7"),
    ],
)
def test_evaluation_refuses_nan_energies_and_angles(field: str, value: float, pattern: str) -> None:
    ref = _showers(40, seed=1)
    c = ref.conditions
    cols = {k: getattr(c, k).copy() for k in ("energy_mev", "theta_rad", "phi_rad")}
    cols[field][7] = value
    sample = ShowerSet(ref.showers_NZPR, Conditions(**cols, pdg=c.pdg, detector=c.detector), "bad-sample")
    with pytest.raises(ValueError, match=rf"evaluate: sample \(bad-sample\): {pattern}"):
        evaluate(sample, ref)


# -- config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["[1,", "{a: 1", "!!python/object/apply:os.system ['true']", "'unclosed", "{a: 1, a: 2}"]
)
def test_malformed_set_value_is_a_named_error_not_a_traceback(
    value: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    assert main(["data", "shard", str(tmp_path / "x.h5"), "--set", f"shards.seed={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--set " in err and "shards.seed=" in err and "the value is not valid YAML" in err
    assert "Traceback" not in err


def test_duplicate_yaml_keys_are_refused_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("shards:\n  seed: 1\n  showers_per_shard: 4\n  seed: 2\nsources: []\n")
    with pytest.raises(
        ConfigError, match=r"(?s)job\.yaml: invalid YAML.*duplicate key 'seed' \(first at line 2\)"
    ):
        read_yaml(path)
    path.write_text("a: 1\nb: {x: 1}\na: 1\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'a'"):
        read_yaml(path)
    # kept: YAML merge keys may still override what they bring in
    path.write_text("base: &b {seed: 1, chunk_showers: 8}\nshards:\n  <<: *b\n  seed: 2\n")
    assert read_yaml(path)["shards"] == {"seed": 2, "chunk_showers": 8}
    path.write_text("seed: 4\nseed: 5\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(ShardConfig, path)


def test_shipped_yamls_have_no_duplicate_keys() -> None:
    root = Path(__file__).resolve().parents[2]
    files = sorted(root.glob("configs/**/*.yaml")) + sorted(root.glob("caloforge/platform/detectors/*.yaml"))
    assert len(files) > 5
    for path in files:
        assert isinstance(read_yaml(path), dict), path
    assert load_detector("par04-siw").name == "par04-siw"
