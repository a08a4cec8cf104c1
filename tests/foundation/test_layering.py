"""Each outside framework enters through one place; the platform stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "caloforge"

# framework -> files (relative to caloforge/) allowed to import it
ALLOWED = {
    "mlflow": {
        "registry/store.py",
        "registry/registration.py",
        "registry/lookup.py",
        "registry/promotion.py",
        "registry/download.py",
        "registry/pyfunc.py",
        "registry/tracking.py",
        "evaluation/mlflow_hook.py",
    },
    "ray": {"pretrain/launch.py", "pretrain/worker.py", "pretrain/checkpoints.py"},
    "deepspeed": {"pretrain/deepspeed_backend.py"},
    "peft": {"adapt/strategies.py"},
    "webdataset": {"datasets/shards.py", "datasets/streaming.py"},
    "fastapi": {"adapt/service/app.py"},
}
H5PY_DIR = "datasets/formats/"
PLATFORM_FORBIDDEN = {
    "h5py",
    "caloforge.datasets",
    "caloforge.training",
    "caloforge.registry",
    "caloforge.pretrain",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_frameworks_enter_through_one_place() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ALLOWED and rel not in ALLOWED[top]:
                offenders.append(f"{rel} imports {name}")
            if top == "h5py" and not rel.startswith(H5PY_DIR):
                offenders.append(f"{rel} imports h5py")
    assert not offenders, offenders


def test_platform_is_pure() -> None:
    offenders = []
    for path in sorted((PKG / "platform").rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in PLATFORM_FORBIDDEN):
                offenders.append(f"{path.relative_to(PKG)} imports {name}")
    assert not offenders, offenders
