"""``caloforge.platform`` stays pure: torch/numpy/scipy/stdlib (+POT), nothing from the outer layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[2] / "caloforge" / "platform"

ALLOWED_EVERYWHERE = {"torch", "numpy", "scipy", "ot"}
ALLOWED_IN = {
    # The bundle format itself (safetensors) is the only I/O library, used by the one I/O module.
    "checkpoint.py": {"safetensors"},
    # Optional progress bar of generate(progress=True), imported lazily.
    "shower_model.py": {"tqdm"},
}
ALLOWED_CALOFORGE = ("caloforge.platform", "caloforge.config")
FORBIDDEN_AT_RUNTIME = (
    "h5py",
    "mlflow",
    "ray",
    "deepspeed",
    "webdataset",
    "peft",
    "onnx",
    "caloforge.datasets",
    "caloforge.training",
    "caloforge.registry",
    "caloforge.pretrain",
    "caloforge.adapt",
    "caloforge.evaluation",
)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_platform_sources_import_only_allowed_libraries() -> None:
    stdlib = set(sys.stdlib_module_names)
    problems = []
    files = sorted(PLATFORM.rglob("*.py"))
    assert len(files) >= 12
    for path in files:
        allowed = ALLOWED_EVERYWHERE | ALLOWED_IN.get(path.name, set())
        for name in imported_modules(path):
            root = name.split(".")[0]
            if root in stdlib or root in allowed or name == "caloforge":
                continue
            if name.startswith(ALLOWED_CALOFORGE):
                continue
            problems.append(f"{path.relative_to(PLATFORM)}: {name}")
    assert not problems, problems


def test_importing_the_platform_loads_no_outer_layer() -> None:
    code = (
        "import sys\n"
        "import caloforge.platform.shower_model, caloforge.platform.checkpoint\n"
        "import caloforge.platform.objectives, caloforge.platform.samplers, caloforge.platform.transforms\n"
        f"bad = [m for m in sys.modules if m.startswith({FORBIDDEN_AT_RUNTIME!r})]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"outer layers imported by the platform: {out.stdout}"
