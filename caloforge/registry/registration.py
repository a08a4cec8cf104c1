"""Registering a ShowerModel bundle as a new model version, atomically.

``Registrar.register`` validates everything it can before writing (kind, name, aliases, metrics, the run
to attach to) and loads a private copy of the bundle (``inspect_bundle``: refuses a newer schema, corrupt
or missing files, a mismatched state dict), so the digests recorded are those of the files uploaded. It
then creates, in order: the registration run (unless ``run_id`` is given), a logged model holding the
bundle as a ``caloforge.registry.pyfunc`` model, the registered model (when missing), the model version
with its tags (``caloforge.registry.versions.version_tags``) and the aliases. A failure after creation
undoes what this call created, newest first: the model version, the registered model (when this call
created it), the logged model and its artifacts and the registration run (MLflow soft-deletes runs:
``mlflow gc`` purges them); cleanup errors are attached to the original exception as notes.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

import caloforge
from caloforge.registry.bundle import BundleInfo, inspect_bundle
from caloforge.registry.lookup import get_version, not_found
from caloforge.registry.pyfunc import model_files, quiet_mlflow, save_pyfunc_model
from caloforge.registry.versions import (
    BASE_MODEL_NAME,
    TAG,
    RegisteredVersion,
    check_kind,
    check_name,
    default_model_name,
    finite_metrics,
    now_iso,
    validate_alias,
    version_tags,
)

log = logging.getLogger("caloforge.registry")


@dataclass(frozen=True)
class _Registration:
    """One validated registration of a staged bundle: what is recorded, and where."""

    info: BundleInfo
    name: str
    kind: str
    tags: dict[str, str]
    metrics: dict[str, float]
    run_id: str | None
    description: str | None
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Registrar:
    """Registers bundles in one MLflow store; new registration runs go to ``experiment`` (created with
    ``artifact_root`` when missing)."""

    client: MlflowClient
    tracking_uri: str
    registry_uri: str
    artifact_root: str | None
    experiment: str

    def register(
        self,
        bundle_dir: str | Path,
        name: str | None,
        kind: str,
        tags: Mapping[str, str] | None,
        metrics: Mapping[str, float] | None,
        run_id: str | None,
        description: str | None,
        aliases: Sequence[str],
    ) -> RegisteredVersion:
        """``RegistryStore.register_bundle`` (its docstring describes the arguments)."""
        check_kind(kind)
        metrics_ = finite_metrics(metrics)
        for alias in aliases:
            validate_alias(alias)
        extra = {str(k): str(v) for k, v in (tags or {}).items()}
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise ValueError(f"{bundle_dir}: bundle directory {bundle_dir} not found")
        # Work on a private copy, so the digests recorded are those of the files uploaded even if the
        # directory changes meanwhile (e.g. a training job overwriting its final bundle).
        with tempfile.TemporaryDirectory(prefix="caloforge-stage-") as stage:
            staged = Path(stage) / "bundle"
            shutil.copytree(bundle_dir, staged)
            # loads the model: refuses a newer schema, corrupt or missing files, a mismatched state dict
            info = inspect_bundle(staged, what=str(bundle_dir))
            tags_ = version_tags(info, kind, extra, metrics_)
            target = tags_.get(TAG + "target_detector")
            name = check_name(name) if name is not None else default_model_name(kind, target)
            if target and target not in info.detectors:
                raise ValueError(
                    f"target_detector {target!r} is not in the bundle's detectors {list(info.detectors)}"
                )
            if run_id is not None:
                self._check_run(run_id)
            request = _Registration(info, name, kind, tags_, metrics_, run_id, description, tuple(aliases))
            created: dict[str, Any] = {}
            try:
                version = self._create(request, created)
            except BaseException as exc:
                self._rollback(created, exc)
                raise
        log.info("registered %s as %s", bundle_dir, version.uri)
        return version

    def _create(self, req: _Registration, created: dict[str, Any]) -> RegisteredVersion:
        """Create run, logged model, registered model, version and aliases; record each in ``created``."""
        c = self.client
        run_id = req.run_id
        if run_id is None:
            experiment_id = self._experiment_id()
            run = c.create_run(
                experiment_id,
                run_name=f"register-{req.name}",
                tags={TAG + "purpose": "registration", TAG + "kind": req.kind},
            )
            run_id = run.info.run_id
            created["run_id"] = run_id
        else:
            experiment_id = c.get_run(run_id).info.experiment_id
        logged = c.create_logged_model(
            experiment_id,
            name="model",
            source_run_id=run_id,
            tags={TAG + "kind": req.kind, TAG + "detectors": req.tags[TAG + "detectors"]},
            model_type="caloforge-shower-model",
        )
        created["logged_model"] = logged
        mlflow_model = Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            run_id=run_id,
            model_id=logged.model_id,
        )
        with tempfile.TemporaryDirectory(prefix="caloforge-register-") as tmp, quiet_mlflow():
            local = Path(tmp) / "model"
            save_pyfunc_model(local, req.info.path, mlflow_model=mlflow_model, info=req.info)
            digests = model_files(local)  # the entry script MLflow runs on load: covered like the bundle
            c.log_model_artifacts(logged.model_id, str(local))
        c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        if "run_id" in created:
            for key, value in req.metrics.items():
                c.log_metric(run_id, key, value, model_id=logged.model_id)
            c.set_terminated(run_id, "FINISHED")

        self._ensure_registered_model(req.name, req.kind, created)
        # source = the storage location, not models:/<model_id>: MLflow's sqlite registry resolves the latter
        # through the *global* tracking URI, which need not be this store's.
        mv = c.create_model_version(
            req.name,
            source=logged.artifact_location,
            run_id=run_id,
            tags={
                **req.tags,
                TAG + "logged_model_id": logged.model_id,
                TAG + "model_files": json.dumps(digests, sort_keys=True),
            },
            description=req.description
            or f"{req.kind} model registered {now_iso()} by caloforge {caloforge.__version__}",
            model_id=logged.model_id,
        )
        created["version"] = (req.name, mv.version)
        for alias in req.aliases:
            c.set_registered_model_alias(req.name, alias, mv.version)
        return get_version(c, req.name, version=int(mv.version))

    def _ensure_registered_model(self, name: str, kind: str, created: dict[str, Any]) -> None:
        """Create the registered model ``name`` unless it exists (a concurrent creation is fine)."""
        c = self.client
        try:
            c.get_registered_model(name)
        except MlflowException as exc:
            if not not_found(exc):
                raise
            try:
                c.create_registered_model(
                    name,
                    tags={
                        TAG + "family": "base" if name == BASE_MODEL_NAME else name.removeprefix("caloforge-")
                    },
                    description=f"CaloForge shower models ({'pretrained base' if kind == 'base' else name}).",
                )
                created["registered_model"] = name
            except MlflowException as create_exc:  # a concurrent registration created it first: fine
                if create_exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise

    def _rollback(self, created: dict[str, Any], exc: BaseException) -> None:
        """Undo a partial registration (newest first); cleanup errors are attached to ``exc`` as notes."""
        c = self.client
        steps: list[tuple[str, Any]] = []
        if "version" in created:
            steps.append(("delete model version", lambda: c.delete_model_version(*created["version"])))
        if "registered_model" in created:
            steps.append(
                ("delete registered model", lambda: c.delete_registered_model(created["registered_model"]))
            )
        if "logged_model" in created:
            lm = created["logged_model"]
            steps.append(
                ("delete logged-model artifacts", lambda: self._delete_artifacts(lm.artifact_location))
            )
            steps.append(("delete logged model", lambda: c.delete_logged_model(lm.model_id)))
        if "run_id" in created:
            steps.append(("delete registration run", lambda: c.delete_run(created["run_id"])))
        for what, step in steps:
            try:
                step()
            except Exception as cleanup_exc:  # report, keep undoing the rest, re-raise the original
                log.error("registration rollback: could not %s: %s", what, cleanup_exc)
                exc.add_note(f"rollback: could not {what}: {cleanup_exc}")
        if steps:
            log.warning("registration failed (%s); rolled back: %s", exc, ", ".join(w for w, _ in steps))

    def _delete_artifacts(self, artifact_uri: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(
            artifact_uri, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
        )
        repo.delete_artifacts()

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise ValueError(
                    f"MLflow experiment {self.experiment!r} is deleted; restore it or pick another"
                )
            return exp.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root)

    def _check_run(self, run_id: str) -> None:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(f"unknown MLflow run {run_id!r} in {self.tracking_uri}") from exc
        if run.info.lifecycle_stage != "active":
            raise ValueError(f"MLflow run {run_id!r} is deleted")


__all__ = ["Registrar"]
