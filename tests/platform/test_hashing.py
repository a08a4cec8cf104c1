"""The one file digest that bundles, registry versions and model cards record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from caloforge.platform.hashing import CHUNK_BYTES, sha256_file


def test_sha256_of_a_file_spanning_several_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (2 * CHUNK_BYTES // 256 + 7)  # 2 MiB + 1792 bytes: three reads
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "absent")
