"""``ShowerModelPyfunc``: a ShowerModel bundle as an MLflow pyfunc model.

Users who never import caloforge internals load a registered model by alias and call ``predict`` on a table
of conditions::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/caloforge-lar-pb@champion")
    showers = model.predict(
        {"energy_mev": [1e4, 5e4], "theta_rad": [0.3, 0.5], "phi_rad": [0.0, 1.0],
         "pdg": [11, 211], "detector": ["lar-pb", "lar-pb"], "seed": [1, 2]},   # "seed" is optional
        params={"num_steps": 32},                                            # optional
    )
    showers.shape  # (2, n_z * n_phi * n_r): float32 MeV, voxel index z*(n_phi*n_r) + phi*n_r + r

Input: a pandas DataFrame or a dict of columns: ``energy_mev`` (float, MeV), ``theta_rad``, ``phi_rad``
(float, rad), ``pdg`` (int PDG id), ``detector`` (str, one of the model's detectors), optional ``seed``
(int). Without a ``seed`` column shower i gets ``derive_seeds(params["seed"], N)[i]`` exactly as
``ShowerModel.generate(seed=...)`` does, so a row's shower depends only on (seed, row index).
Params: ``num_steps``, ``sampler`` (default: the bundle's), ``seed`` (default 0), ``strict`` (refuse
conditions outside the trained ranges instead of warning), ``batch_size``.
Output: numpy float32 (N, n_z·n_phi·n_r) in MeV, the CaloChallenge voxel order; reshape with the
``mesh_shape`` in the model's metadata (``model.metadata.metadata["caloforge"]["mesh_shape"]``).

The model is saved as *models from code* (a two-line entry script, no pickled objects) with the bundle
directory as its only artifact. Loading it needs the ``caloforge`` package (and torch) installed in the
Python environment: MLflow's environment capture would record ``torch==X`` without the ``+cpu`` label
(pulling the CUDA wheel), so ``pip_requirements`` are set explicitly and environment re-creation
(``--env-manager virtualenv|conda``) is not supported; serve with ``--env-manager local``.

Trust: MLflow runs the entry script when it loads the model, before any CaloForge code can check anything.
Registration records the sha256 of every file of the model outside the bundle (``caloforge.model_files``:
``MLmodel``, the entry script, the environment files) next to the bundle's (``caloforge.bundle_files``);
``RegistryStore.load_pyfunc`` downloads the model, checks both and that the entry script is exactly
:data:`ENTRY_SCRIPT`, and only then loads it. ``mlflow.pyfunc.load_model("models:/…")`` straight from the
store checks nothing: it is only as safe as the store is write-protected (docs/registry.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import caloforge

if TYPE_CHECKING:
    from caloforge.registry.bundle import BundleInfo

BUNDLE_ARTIFACT = "bundle"
INPUT_COLUMNS: tuple[str, ...] = ("energy_mev", "theta_rad", "phi_rad", "pdg", "detector")
OPTIONAL_COLUMNS: tuple[str, ...] = ("seed",)
ENTRY_SCRIPT = '''"""MLflow models-from-code entry: the CaloForge ShowerModel pyfunc (needs caloforge)."""
from mlflow.models import set_model

from caloforge.registry.pyfunc import ShowerModelPyfunc

set_model(ShowerModelPyfunc())
'''


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No artifact progress bars while caloforge moves bundles around (restores the setting after)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


ENTRY_FILE = "caloforge_shower_model.py"


def model_files(model_dir: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the pyfunc model's files outside ``artifacts/bundle`` (those are the
    bundle's own digests)."""
    from caloforge.registry.bundle import bundle_files

    return {
        rel: digest
        for rel, digest in bundle_files(model_dir).items()
        if not rel.startswith(f"artifacts/{BUNDLE_ARTIFACT}/")
    }


def verify_model_files(model_dir: str | Path, expected: Mapping[str, str], what: str) -> None:
    """Refuse (ValueError) a downloaded pyfunc model whose files outside the bundle differ from the digests
    recorded at registration (also: none recorded, a file added, or an entry script that is not
    :data:`ENTRY_SCRIPT`) — before MLflow would execute any of it."""
    if not expected:
        raise ValueError(
            f"{what}: the registry records no digests of the pyfunc model's files (tag caloforge.model_files "
            "missing); its entry script cannot be verified, so it is not loaded"
        )
    actual = model_files(model_dir)
    differ = sorted(f for f in set(actual) | set(expected) if actual.get(f) != expected.get(f))
    if differ:
        raise ValueError(
            f"{what}: pyfunc model file(s) {differ} differ from the digests recorded at registration "
            "(missing, added or changed in the artifact store); not loaded"
        )
    entries = sorted(Path(model_dir).rglob(ENTRY_FILE))
    if len(entries) != 1 or entries[0].read_text() != ENTRY_SCRIPT:
        raise ValueError(f"{what}: the entry script {ENTRY_FILE} is not CaloForge's; not loaded")


def pip_requirements() -> list[str]:
    """Explicit requirements (MLflow's capture drops the ``+cpu`` label of local torch builds)."""
    import torch

    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return [
        f"caloforge=={caloforge.__version__}",
        f"torch>={torch_minor}",
        f"mlflow>={mlflow.__version__.split('.')[0]}",
        "numpy",
        "pandas",
        "safetensors",
    ]


def signature(default_steps: int, default_sampler: str) -> ModelSignature:
    """Input columns, output tensor and params of the pyfunc (enforced by MLflow before ``predict``)."""
    inputs = Schema(
        [
            ColSpec("double", "energy_mev"),
            ColSpec("double", "theta_rad"),
            ColSpec("double", "phi_rad"),
            ColSpec("long", "pdg"),
            ColSpec("string", "detector"),
            ColSpec("long", "seed", required=False),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("num_steps", "long", int(default_steps)),
            ParamSpec("sampler", "string", default_sampler),
            ParamSpec("seed", "long", 0),
            ParamSpec("strict", "boolean", False),
            ParamSpec("batch_size", "long", 256),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=None, params=params)


def conditions_from_table(table: pd.DataFrame | Mapping[str, Any]) -> tuple[Any, np.ndarray | None]:
    """(Conditions, seeds or None) from a DataFrame or dict of columns; ValueError naming bad columns."""
    from caloforge.platform.conditioning import Conditions

    if isinstance(table, Mapping):
        table = pd.DataFrame({k: np.atleast_1d(np.asarray(v)) for k, v in table.items()})
    if not isinstance(table, pd.DataFrame):
        raise ValueError(
            f"predict: expected a pandas DataFrame or a dict of columns, got {type(table).__name__}"
        )
    missing = [c for c in INPUT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"predict: missing column(s) {missing} (need {list(INPUT_COLUMNS)}, optional 'seed')"
        )
    unknown = sorted(set(table.columns) - set(INPUT_COLUMNS) - set(OPTIONAL_COLUMNS))
    if unknown:
        raise ValueError(
            f"predict: unknown column(s) {unknown} (allowed: {[*INPUT_COLUMNS, *OPTIONAL_COLUMNS]})"
        )
    try:
        cond = Conditions.make(
            np.array(table["energy_mev"], dtype=np.float64),
            np.array(table["theta_rad"], dtype=np.float64),
            np.array(table["phi_rad"], dtype=np.float64),
            np.array(table["pdg"], dtype=np.int64),
            np.array(table["detector"].astype(str), dtype=str),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"predict: could not read the condition columns: {exc}") from exc
    for name in ("energy_mev", "theta_rad", "phi_rad"):
        if not np.isfinite(getattr(cond, name)).all():
            raise ValueError(f"predict: column {name!r} has non-finite values")
    if (cond.energy_mev <= 0).any():
        raise ValueError("predict: column 'energy_mev' must be > 0")
    seeds = None
    if "seed" in table.columns:
        col = table["seed"]
        if col.isna().any():
            raise ValueError(
                "predict: column 'seed' has missing values (give every row a seed or drop the column)"
            )
        seeds = np.array(col, dtype=np.int64)
    return cond, seeds


class ShowerModelPyfunc(PythonModel):
    """MLflow pyfunc wrapper around a ShowerModel bundle (artifact ``bundle``)."""

    def load_context(self, context: PythonModelContext) -> None:
        from caloforge.registry.bundle import load_checked

        bundle = context.artifacts.get(BUNDLE_ARTIFACT)
        if bundle is None:
            raise ValueError(
                f"pyfunc model has no {BUNDLE_ARTIFACT!r} artifact (artifacts: {sorted(context.artifacts)})"
            )
        self.model, self.info = load_checked(bundle)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Showers in MeV for a table of conditions: float32 (N, n_z·n_phi·n_r) (see the module docstring)."""
        from caloforge.platform.shower_model import derive_seeds

        params = dict(params or {})
        cond, seeds = conditions_from_table(model_input)
        self.info.ranges.check(cond, strict=bool(params.get("strict", False)))
        if seeds is None:
            seeds = derive_seeds(int(params.get("seed", 0)), len(cond))
        showers = self.model.generate(
            cond,
            num_steps=int(params.get("num_steps") or self.info.num_steps),
            sampler=str(params.get("sampler") or self.info.sampler),
            seeds=seeds,
            batch_size=int(params.get("batch_size") or 256),
        )
        return showers.reshape(len(cond), -1)


def save_pyfunc_model(
    path: str | Path,
    bundle_dir: str | Path,
    mlflow_model: Model | None = None,
    info: BundleInfo | None = None,
) -> Path:
    """Write the MLflow model directory (MLmodel, entry script, ``artifacts/bundle``) to ``path``.

    ``info``: the bundle's ``inspect_bundle`` result when the caller already has it (else it is loaded).
    """
    from caloforge.registry.bundle import inspect_bundle

    info = info if info is not None else inspect_bundle(bundle_dir)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="caloforge-pyfunc-") as tmp:
        entry = Path(tmp) / ENTRY_FILE
        entry.write_text(ENTRY_SCRIPT)
        # MLflow stores a directory artifact under its base name: copy to a fixed name so the bundle always
        # lives at <model>/artifacts/bundle (what RegistryStore.download_bundle fetches).
        staged = Path(tmp) / BUNDLE_ARTIFACT
        shutil.copytree(bundle_dir, staged)
        with quiet_mlflow(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=str(entry),
                artifacts={BUNDLE_ARTIFACT: str(staged)},
                signature=signature(info.num_steps, info.sampler),
                pip_requirements=pip_requirements(),
                mlflow_model=mlflow_model,
                metadata={"caloforge": info.pyfunc_metadata()},
            )
    return path


__all__ = [
    "ENTRY_FILE",
    "ENTRY_SCRIPT",
    "INPUT_COLUMNS",
    "ShowerModelPyfunc",
    "conditions_from_table",
    "model_files",
    "pip_requirements",
    "save_pyfunc_model",
    "signature",
    "verify_model_files",
]
