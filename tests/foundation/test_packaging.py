"""The wheel carries everything the package reads at run time (non-editable install, as k8s/Dockerfile)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from caloforge.platform.geometry import builtin_detector_names, load_detector

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_non_editable_install_finds_the_builtin_detectors(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "caloforge", src / "caloforge", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("caloforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = builtin_detector_names()
    assert len(expected) >= 7
    assert {f"caloforge/platform/detectors/{d}.yaml" for d in expected} <= names
    assert "caloforge/py.typed" in names
    assert not any(n.startswith(("configs/", "tests/")) for n in names)

    target = tmp_path / "site"
    install = ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run([*pip, *install], check=True, timeout=300)
    probe = (
        "import caloforge, pathlib;"
        "from caloforge.platform.geometry import builtin_detector_names, load_detector;"
        "print(pathlib.Path(caloforge.__file__).resolve().parent);"
        "print(','.join(builtin_detector_names())); print(load_detector('pbwo4').geometry.shape)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert Path(out[0]) == (target / "caloforge").resolve()  # the installed copy, not the checkout
    assert out[1].split(",") == expected
    assert out[2] == str(load_detector("pbwo4").geometry.shape)
