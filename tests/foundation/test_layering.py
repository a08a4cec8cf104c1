"""Each outside framework enters through one place; the platform stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "caloforge"

# framework -> files (relative to caloforge/) allowed to import it; an entry ending in "/" admits a folder
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
    # the Ray Train path shared by pretraining and adaptation (caloforge/training/ray/); the local Ray's
    # authentication (environment.py); the adaptation service's Ray jobs
    "ray": {
        "training/ray/launch.py",
        "training/ray/worker.py",
        "training/ray/checkpoints.py",
        "environment.py",
        "adapt/service/rayjobs.py",
    },
    "deepspeed": {"training/deepspeed_backend.py"},
    "peft": {"adapt/strategies.py"},
    "webdataset": {"datasets/shards.py", "datasets/streaming.py"},
    "fastapi": {"adapt/service/app.py"},
    "starlette": {"adapt/service/app.py"},
    "uvicorn": {"adapt/service/cli.py", "adapt/service/embedded.py"},
    "sqlalchemy": {
        "adapt/service/db.py",
        "adapt/service/store.py",
        "adapt/service/auth.py",
        "adapt/service/migrations/",
    },
    "alembic": {"adapt/service/db.py", "adapt/service/migrations/"},
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
            if top in ALLOWED and not any(
                rel == a or (a.endswith("/") and rel.startswith(a)) for a in ALLOWED[top]
            ):
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


# Components import only downward: platform ← datasets ← training ← pretrain / adapt; evaluation and the
# registry sit beside training (the registry may use evaluation: the export's fidelity gate); the CLI is on
# top. ``BASE`` modules (configs, paths, the process environment) are importable from everywhere.
BASE = {"__init__", "config", "paths", "environment"}
MAY_IMPORT = {
    "platform": set(),
    "datasets": {"platform"},
    "training": {"platform", "datasets"},
    "evaluation": {"platform", "datasets"},
    "registry": {"platform", "datasets", "evaluation"},
    "pretrain": {"platform", "datasets", "training", "evaluation", "registry"},
    "adapt": {"platform", "datasets", "training", "evaluation", "registry"},
    "distill": {"platform", "datasets", "training", "evaluation", "registry"},
    # the adaptation service (adapt/service/) runs adaptations and distillations: above both
    "service": {"platform", "datasets", "training", "evaluation", "registry", "adapt", "distill"},
}
TOP = {"cli", "quickstart"}  # may import every component
SERVICE = "caloforge.adapt.service"
# the CLI starts the service; the adapt CLI is its client; the quickstart requests its adaptation from one
SERVICE_USERS = {"cli.py", "adapt/cli.py", "quickstart.py"}


def _component(rel: str) -> str:
    if rel.startswith("adapt/service/"):
        return "service"
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _internal_imports(path: Path) -> set[str]:
    """Every ``caloforge.*`` module imported anywhere in ``path`` (function-level imports included)."""
    return {n for n in _imports(path) if n == "caloforge" or n.startswith("caloforge.")}


def test_components_import_only_downward() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        source = _component(rel)
        if source in BASE or source in TOP or rel.endswith("/cli.py"):
            continue  # component CLIs are the CLI layer: they may use other components' public API
        assert source in MAY_IMPORT, f"{rel}: component {source!r} has no place in the layering (add it)"
        for name in _internal_imports(path):
            target = name.split(".")[1] if "." in name else "__init__"
            if target in (source, *BASE) or target in MAY_IMPORT[source]:
                continue
            offenders.append(f"{rel} imports {name} ({source} may import {sorted(MAY_IMPORT[source])})")
    assert not offenders, offenders


def test_nothing_imports_the_service_and_components_do_not_import_the_cli() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for name in _internal_imports(path):
            if name.startswith(SERVICE) and rel not in SERVICE_USERS and not rel.startswith("adapt/service/"):
                offenders.append(f"{rel} imports {name}")
            if name == "caloforge.cli" and rel != "__main__.py":
                offenders.append(f"{rel} imports the top-level CLI (use caloforge.config / environment)")
    assert not offenders, offenders


def test_pretraining_does_not_reach_into_the_train_runner() -> None:
    offenders = [
        f"{path.relative_to(PKG)} imports {name}"
        for path in sorted((PKG / "pretrain").rglob("*.py"))
        for name in _internal_imports(path)
        if name.startswith("caloforge.training.run") or name.startswith("caloforge.training.cli")
    ]
    assert not offenders, offenders
