"""The model registry: ShowerModel bundles as versions of MLflow registered models.

One registered model per detector family: ``caloforge-base`` for pretrained foundation models and
``caloforge-<detector>`` for models adapted or distilled to one detector. Each version carries the bundle
directory (config.json + model.safetensors) as the artifacts of a ``caloforge.registry.pyfunc`` model, so
``mlflow.pyfunc.load_model("models:/caloforge-lar-pb@champion")`` works, plus searchable tags:

========================================  ===============================================================
tag                                       value
========================================  ===============================================================
``caloforge.kind``                        ``base`` | ``adapted`` | ``distilled``
``caloforge.detectors``                   comma-separated detector names the model knows
``caloforge.detector.<name>``             ``true`` (one per detector: exact search by detector)
``caloforge.target_detector``             the detector an adapted/distilled model is for
``caloforge.particles``                   comma-separated particle names it was trained on
``caloforge.particle.<pdg>``              ``true`` (one per particle, PDG id: exact search by particle)
``caloforge.adaptation_method``           e.g. ``full``, ``lora``, ``embedding``, ``consistency`` (or absent)
``caloforge.parent_uri``                  the model it was adapted/distilled from (URI or path)
``caloforge.parent_version``              its version (or ``@alias``) when the parent is a registry URI
``caloforge.dataset_manifest_hash``       hash of the shard manifest it was trained on
``caloforge.version``                     caloforge version that registered it
``caloforge.schema_version``              bundle schema version
``caloforge.bundle_files``                JSON ``{file: sha256}`` of the bundle (checked on download)
``caloforge.mesh_shape``                  e.g. ``45x16x9``
``caloforge.logged_model_id``             the MLflow logged model holding the artifacts
``metric.<name>``                         evaluation metrics (``fpd``, ``kpd``, ``auc_low``, ...)
``caloforge.promotion.<alias>``           JSON ``{at, reason, previous_version}`` of the last promotion
========================================  ===============================================================

Store: ``caloforge.paths.mlflow_tracking_uri()`` by default (sqlite + local artifacts under
``$CALOFORGE_HOME/mlflow``); ``MLFLOW_TRACKING_URI`` (e.g. ``http://127.0.0.1:5000`` of an ``mlflow server``)
is honoured unchanged. Only this module and ``pyfunc.py`` import mlflow. Registration is atomic: the
bundle is validated by loading it before anything is created, and a failure after creation deletes the
model version, the registered model (when this call created it), the logged model and its artifacts and
the registration run (MLflow soft-deletes runs: ``mlflow gc`` purges them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

import caloforge
from caloforge import paths
from caloforge.registry.bundle import BundleInfo, inspect_bundle, parse_model_uri, verify_bundle_files
from caloforge.registry.pyfunc import quiet_mlflow, save_pyfunc_model

log = logging.getLogger("caloforge.registry")

KINDS: tuple[str, ...] = ("base", "adapted", "distilled")
ALIASES: tuple[str, ...] = ("champion", "candidate")  # the documented ones; others are allowed
BASE_MODEL_NAME = "caloforge-base"
REGISTRY_EXPERIMENT = "caloforge-registry"
TAG = "caloforge."
METRIC_TAG = "metric."
BUNDLE_ARTIFACT = "bundle"  # key of the bundle directory in the pyfunc model's artifacts

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ALIAS_RE = re.compile(r"^[A-Za-z_][\w-]{0,254}$")
# Short keys accepted by search(); "detector"/"particle" are membership tests.
_SHORT_KEYS = {
    "kind",
    "detectors",
    "target_detector",
    "particles",
    "adaptation_method",
    "parent_uri",
    "parent_version",
    "dataset_manifest_hash",
    "version",
    "schema_version",
}


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model, as the registry reports it."""

    name: str
    version: int
    source: str
    run_id: str | None
    model_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""
    created_ms: int = 0

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: what ``mlflow.pyfunc.load_model`` and ``caloforge export`` take."""
        return f"models:/{self.name}/{self.version}"

    @property
    def kind(self) -> str:
        return self.tags.get(TAG + "kind", "")

    @property
    def detectors(self) -> tuple[str, ...]:
        raw = self.tags.get(TAG + "detectors", "")
        return tuple(d for d in raw.split(",") if d)

    @property
    def particles(self) -> tuple[str, ...]:
        raw = self.tags.get(TAG + "particles", "")
        return tuple(p for p in raw.split(",") if p)

    @property
    def metrics(self) -> dict[str, float]:
        return {k[len(METRIC_TAG) :]: float(v) for k, v in self.tags.items() if k.startswith(METRIC_TAG)}

    @property
    def lineage(self) -> dict[str, str]:
        keys = (
            "parent_uri",
            "parent_version",
            "adaptation_method",
            "dataset_manifest_hash",
            "target_detector",
        )
        return {k: self.tags[TAG + k] for k in keys if TAG + k in self.tags}

    @property
    def bundle_files(self) -> dict[str, str]:
        raw = self.tags.get(TAG + "bundle_files")
        return json.loads(raw) if raw else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "aliases": list(self.aliases),
            "kind": self.kind,
            "detectors": list(self.detectors),
            "particles": list(self.particles),
            "metrics": self.metrics,
            "lineage": self.lineage,
            "source": self.source,
            "run_id": self.run_id,
            "model_id": self.model_id,
            "description": self.description,
            "created": _iso(self.created_ms),
            "tags": dict(sorted(self.tags.items())),
        }


@dataclass(frozen=True)
class RegisteredModelSummary:
    """A registered model: its name, latest version and alias -> version map."""

    name: str
    latest_version: int | None
    aliases: dict[str, int]
    description: str
    tags: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "latest_version": self.latest_version,
            "aliases": dict(self.aliases),
            "description": self.description,
            "tags": dict(self.tags),
        }


def default_model_name(kind: str, target_detector: str | None) -> str:
    """``caloforge-base`` for base models, ``caloforge-<detector>`` for adapted/distilled ones."""
    _check_kind(kind)
    if kind == "base":
        return BASE_MODEL_NAME
    if not target_detector:
        raise ValueError(
            f"kind={kind!r} needs a target detector to name the registered model: pass name=... or "
            "tags={'target_detector': '<detector>'} (or record lineage.target_detector in the bundle)"
        )
    return f"caloforge-{target_detector}"


def validate_alias(alias: str) -> str:
    """MLflow's alias rules, checked before anything is written (``latest`` and ``v<N>`` are reserved)."""
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise ValueError(f"invalid alias {alias!r}: use letters, digits, '_' and '-' (e.g. {list(ALIASES)})")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow")
    return alias


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid registered model name {name!r}: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit"
        )
    return name


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds") if ms else ""


def _now_iso() -> str:
    return dt.datetime.now(tz=dt.UTC).isoformat(timespec="seconds")


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _finite_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"metric name {key!r}: use letters, digits, '_', '.' and '-'")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r}: expected a number, got {value!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"metric {key!r} is not finite ({v}); refusing to register it")
        out[key] = v
    return out


class RegistryStore:
    """Register, find, promote and download ShowerModel bundles in an MLflow model registry."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        artifact_root: str | Path | None = None,
        experiment: str = REGISTRY_EXPERIMENT,
    ) -> None:
        """Open the store.

        Args:
            tracking_uri: MLflow tracking URI; default ``caloforge.paths.mlflow_tracking_uri()`` (honours
                ``MLFLOW_TRACKING_URI``, else ``sqlite:///$CALOFORGE_HOME/mlflow/mlflow.db``).
            registry_uri: model registry URI (default: the tracking URI).
            artifact_root: artifact location of the registration experiment when this call creates it
                (default: ``artifacts/`` next to a sqlite database; the server's default otherwise).
            experiment: experiment holding registration runs (when no ``run_id`` is given).
        """
        self.tracking_uri = tracking_uri or paths.mlflow_tracking_uri()
        self.registry_uri = registry_uri or self.tracking_uri
        if artifact_root is None:
            self.artifact_root = paths.mlflow_artifact_root(self.tracking_uri)
        else:
            self.artifact_root = (
                artifact_root if isinstance(artifact_root, str) else Path(artifact_root).resolve().as_uri()
            )
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    def __repr__(self) -> str:
        return f"RegistryStore(tracking_uri={self.tracking_uri!r})"

    # ------------------------------------------------------------------ registration
    def register_bundle(
        self,
        bundle_dir: str | Path,
        name: str | None = None,
        kind: str = "base",
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        run_id: str | None = None,
        description: str | None = None,
        aliases: Sequence[str] = (),
    ) -> RegisteredVersion:
        """Register a ShowerModel bundle directory as a new version; atomic (nothing is left on failure).

        Args:
            bundle_dir: directory written by ``ShowerModel.save`` (config.json + model.safetensors).
            name: registered model name; default ``caloforge-base`` (kind base) or
                ``caloforge-<target_detector>`` (adapted/distilled).
            kind: ``base`` | ``adapted`` | ``distilled``.
            tags: lineage overrides and extra tags. Short keys (``target_detector``, ``adaptation_method``,
                ``parent_uri``, ``parent_version``, ``dataset_manifest_hash``) become ``caloforge.<key>``;
                other keys are stored as given. They override what the bundle's lineage says.
            metrics: evaluation metrics (``fpd``, ``kpd``, ``auc_low``, ``auc_high``, ...), stored as
                ``metric.<name>`` version tags and logged on the registration run.
            run_id: an existing MLflow run (e.g. the pretraining run) to attach the model to; default: a new
                run in the ``caloforge-registry`` experiment.
            description: version description (promotions append to it).
            aliases: aliases to point at the new version (e.g. ``("candidate",)``).
        """
        _check_kind(kind)
        metrics_ = _finite_metrics(metrics)
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
            version = self._register_staged(info, name, kind, extra, metrics_, run_id, description, aliases)
        log.info("registered %s as %s", bundle_dir, version.uri)
        return version

    def _register_staged(
        self,
        info: BundleInfo,
        name: str | None,
        kind: str,
        extra: dict[str, str],
        metrics_: dict[str, float],
        run_id: str | None,
        description: str | None,
        aliases: Sequence[str],
    ) -> RegisteredVersion:
        version_tags = self._version_tags(info, kind, extra, metrics_)
        target = version_tags.get(TAG + "target_detector")
        name = _check_name(name) if name is not None else default_model_name(kind, target)
        if target and target not in info.detectors:
            raise ValueError(
                f"target_detector {target!r} is not in the bundle's detectors {list(info.detectors)}"
            )
        if run_id is not None:
            self._check_run(run_id)

        created: dict[str, Any] = {}
        try:
            return self._register(
                info, name, kind, version_tags, metrics_, run_id, description, aliases, created
            )
        except BaseException as exc:
            self._rollback(created, exc)
            raise

    def _version_tags(
        self, info: BundleInfo, kind: str, extra: dict[str, str], metrics: dict[str, float]
    ) -> dict[str, str]:
        lineage = {k: v for k, v in info.lineage_tags().items() if v}
        tags: dict[str, str] = {
            TAG + "kind": kind,
            TAG + "detectors": ",".join(info.detectors),
            TAG + "particles": ",".join(info.particles),
            TAG + "version": caloforge.__version__,
            TAG + "schema_version": str(info.schema_version),
            TAG + "mesh_shape": "x".join(str(v) for v in info.mesh_shape),
            TAG + "bundle_files": json.dumps(info.files, sort_keys=True),
        }
        tags.update({TAG + f"detector.{d}": "true" for d in info.detectors})
        tags.update({TAG + f"particle.{p}": "true" for p in info.pdgs})
        tags.update({TAG + k: v for k, v in lineage.items()})
        for key, value in extra.items():
            tags[TAG + key if key in _SHORT_KEYS else key] = value
        tags.update({METRIC_TAG + k: repr(v) for k, v in metrics.items()})
        if kind == "base":
            tags.pop(TAG + "target_detector", None)
        elif TAG + "target_detector" not in tags and len(info.detectors) == 1:
            tags[TAG + "target_detector"] = info.detectors[0]
        for key, value in tags.items():
            if len(key) > 250 or len(value) > 100_000:
                raise ValueError(
                    f"tag {key[:60]!r}: key longer than 250 or value longer than 100000 characters"
                )
        return tags

    def _register(
        self,
        info: BundleInfo,
        name: str,
        kind: str,
        version_tags: dict[str, str],
        metrics: dict[str, float],
        run_id: str | None,
        description: str | None,
        aliases: Sequence[str],
        created: dict[str, Any],
    ) -> RegisteredVersion:
        c = self.client
        if run_id is None:
            experiment_id = self._experiment_id()
            run = c.create_run(
                experiment_id,
                run_name=f"register-{name}",
                tags={TAG + "purpose": "registration", TAG + "kind": kind},
            )
            run_id = run.info.run_id
            created["run_id"] = run_id
        else:
            experiment_id = c.get_run(run_id).info.experiment_id
        logged = c.create_logged_model(
            experiment_id,
            name="model",
            source_run_id=run_id,
            tags={TAG + "kind": kind, TAG + "detectors": version_tags[TAG + "detectors"]},
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
            save_pyfunc_model(local, info.path, mlflow_model=mlflow_model, info=info)
            c.log_model_artifacts(logged.model_id, str(local))
        c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        if "run_id" in created:
            for key, value in metrics.items():
                c.log_metric(run_id, key, value, model_id=logged.model_id)
            c.set_terminated(run_id, "FINISHED")

        try:
            c.get_registered_model(name)
        except MlflowException as exc:
            if not _not_found(exc):
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
        # source = the storage location, not models:/<model_id>: MLflow's sqlite registry resolves the latter
        # through the *global* tracking URI, which need not be this store's.
        mv = c.create_model_version(
            name,
            source=logged.artifact_location,
            run_id=run_id,
            tags={**version_tags, TAG + "logged_model_id": logged.model_id},
            description=description
            or f"{kind} model registered {_now_iso()} by caloforge {caloforge.__version__}",
            model_id=logged.model_id,
        )
        created["version"] = (name, mv.version)
        for alias in aliases:
            c.set_registered_model_alias(name, alias, mv.version)
        return self.get(name, version=int(mv.version))

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
                ("delete logged-model artifacts", lambda: _delete_artifacts(lm.artifact_location, self))
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

    # ------------------------------------------------------------------ aliases and promotion
    def set_alias(self, name: str, version: int | str, alias: str) -> RegisteredVersion:
        """Point ``alias`` of ``name`` at ``version`` (moving it from any other version)."""
        validate_alias(alias)
        mv = self.get(name, version=int(version))
        self.client.set_registered_model_alias(name, alias, str(mv.version))
        return self.get(name, version=mv.version)

    def delete_alias(self, name: str, alias: str) -> None:
        self.get(name, alias=alias)  # clear error when unknown
        self.client.delete_registered_model_alias(name, alias)

    def promote(
        self, name: str, version: int | str, alias: str = "champion", reason: str = ""
    ) -> RegisteredVersion:
        """Move ``alias`` to ``version`` and record who replaced whom, when and why.

        The record is a version tag ``caloforge.promotion.<alias>`` (JSON: at, reason, previous_version)
        plus a line appended to the version description.
        """
        validate_alias(alias)
        if not reason or not reason.strip():
            raise ValueError("promote: a reason is required (it is recorded with the promotion)")
        mv = self.get(name, version=int(version))
        previous: int | None = None
        with contextlib.suppress(ValueError):  # alias not set yet: nothing to replace
            previous = self.get(name, alias=alias).version
        if previous == mv.version:  # re-promotion: recorded again, nothing replaced
            previous = None
        at = _now_iso()
        record = {"at": at, "reason": reason.strip(), "previous_version": previous}
        self.client.set_registered_model_alias(name, alias, str(mv.version))
        self.client.set_model_version_tag(
            name, str(mv.version), f"{TAG}promotion.{alias}", json.dumps(record)
        )
        line = (
            f"[{at}] promoted to @{alias}"
            + (f" (replacing v{previous})" if previous else "")
            + f": {reason.strip()}"
        )
        desc = (mv.description + "\n" if mv.description else "") + line
        self.client.update_model_version(name, str(mv.version), description=desc)
        log.info("models:/%s/%s is now @%s (%s)", name, mv.version, alias, reason.strip())
        return self.get(name, version=mv.version)

    # ------------------------------------------------------------------ queries
    def get(self, name: str, version: int | str | None = None, alias: str | None = None) -> RegisteredVersion:
        """One version by number or alias (neither: the latest). Unknown name/version/alias -> ValueError."""
        if version is not None and alias is not None:
            raise ValueError("get: give a version or an alias, not both")
        c = self.client
        try:
            rm = c.get_registered_model(name)
        except MlflowException as exc:
            if _not_found(exc) or "not found" in str(exc).lower():
                known = [m.name for m in self.list_models()]
                raise ValueError(f"unknown registered model {name!r} (known: {known})") from None
            raise
        aliases = _alias_map(rm.aliases)
        try:
            if alias is not None:
                if alias not in aliases:
                    raise ValueError(
                        f"registered model {name!r} has no alias {alias!r} "
                        f"(aliases: {sorted(aliases) or 'none'})"
                    )
                mv = c.get_model_version_by_alias(name, alias)
            else:
                if version is None:
                    versions = self._versions(f"name = '{_quote(name)}'")
                    if not versions:
                        raise ValueError(f"registered model {name!r} has no versions")
                    version = max(v.version for v in versions)
                mv = c.get_model_version(name, str(int(version)))
        except MlflowException as exc:
            if _not_found(exc) or "not found" in str(exc).lower():
                raise ValueError(f"registered model {name!r} has no version {version}") from None
            raise
        return _to_version(mv, aliases)

    def resolve(self, uri: str) -> RegisteredVersion:
        """A version from ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME@ALIAS`` or ``NAME``."""
        name, version, alias = parse_model_uri(uri)
        return self.get(name, version=version, alias=alias)

    def versions(self, name: str) -> list[RegisteredVersion]:
        """All versions of one registered model, oldest first."""
        self.get_model(name)
        return self._versions(f"name = '{_quote(name)}'")

    def get_model(self, name: str) -> RegisteredModelSummary:
        for m in self.list_models():
            if m.name == name:
                return m
        raise ValueError(f"unknown registered model {name!r} (known: {[m.name for m in self.list_models()]})")

    def list_models(self) -> list[RegisteredModelSummary]:
        """All registered models, by name."""
        out = []
        token = None
        while True:
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            for rm in page:
                latest = [int(v.version) for v in (rm.latest_versions or [])]
                out.append(
                    RegisteredModelSummary(
                        name=rm.name,
                        latest_version=max(latest) if latest else None,
                        aliases=_alias_map(rm.aliases),
                        description=rm.description or "",
                        tags=dict(rm.tags or {}),
                    )
                )
            token = page.token
            if not token:
                break
        return sorted(out, key=lambda m: m.name)

    def search(
        self, tags: Mapping[str, str] | None = None, name: str | None = None
    ) -> list[RegisteredVersion]:
        """Versions whose tags match all of ``tags`` (exact), optionally within one registered model.

        Keys: ``detector`` / ``particle`` (membership: a detector name; a particle name or PDG id), the short
        keys ``kind``, ``target_detector``, ``adaptation_method``, ``parent_uri``, ``parent_version``,
        ``dataset_manifest_hash``, ``version``, ``schema_version`` (prefixed with ``caloforge.``), or any full
        tag key (e.g. ``metric.fpd`` or ``caloforge.kind``).
        """
        from caloforge.platform.conditioning import pdg_of

        clauses = []
        if name is not None:
            clauses.append(f"name = '{_quote(name)}'")
        for key, value in (tags or {}).items():
            value = str(value)
            if key == "detector":
                key, value = f"{TAG}detector.{value}", "true"
            elif key == "particle":
                key, value = f"{TAG}particle.{pdg_of(value)}", "true"
            elif key in _SHORT_KEYS:
                key = TAG + key
            if "`" in key:
                raise ValueError(f"search: invalid tag key {key!r}")
            clauses.append(f"tags.`{key}` = '{_quote(value)}'")
        return self._versions(" AND ".join(clauses) or None)

    def _versions(self, filter_string: str | None) -> list[RegisteredVersion]:
        out: list[ModelVersion] = []
        token = None
        while True:
            page = self.client.search_model_versions(filter_string, max_results=10_000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                break
        alias_cache: dict[str, dict[str, int]] = {}
        result = []
        for mv in out:
            if mv.name not in alias_cache:
                alias_cache[mv.name] = _alias_map(self.client.get_registered_model(mv.name).aliases)
            result.append(_to_version(mv, alias_cache[mv.name]))
        return sorted(result, key=lambda v: (v.name, v.version))

    # ------------------------------------------------------------------ artifacts
    def download_bundle(self, uri: str, dst: str | Path) -> Path:
        """Download the bundle of a registered version into ``dst`` (created; must not exist or be empty).

        The files are checked against the sha256 digests recorded at registration (a corrupt or missing
        artifact is a ``ValueError``), then the bundle is loaded once to make sure it is usable.
        """
        mv = self.resolve(uri)
        dst = Path(dst)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise ValueError(f"download_bundle: destination {dst} exists and is not an empty directory")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".caloforge-download-", dir=dst.parent) as tmp:
            root = self.client.get_model_version_download_uri(mv.name, str(mv.version))
            try:
                with quiet_mlflow():
                    local = mlflow.artifacts.download_artifacts(
                        artifact_uri=f"{root.rstrip('/')}/artifacts/{BUNDLE_ARTIFACT}",
                        dst_path=tmp,
                        tracking_uri=self.tracking_uri,
                    )
            except (MlflowException, OSError) as exc:
                raise ValueError(f"{mv.uri}: could not download the bundle artifact ({exc})") from exc
            verify_bundle_files(local, mv.bundle_files, what=mv.uri)
            inspect_bundle(local, what=mv.uri)
            if dst.exists():
                dst.rmdir()
            shutil.move(local, dst)
        return dst

    def pull(
        self,
        uri: str,
        out_dir: str | Path,
        fmt: str = "onnx",
        *,
        num_steps: int | None = None,
        sampler: str | None = None,
        opset: int | None = None,
        exporter: str = "dynamo",
        rtol: float | None = None,
        atol_mev: float | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Download a registered version and export it (``onnx`` or ``torch``) with its model card into
        ``out_dir``; returns the card path. Nothing is written when the download or export fails."""
        from caloforge.registry import export as ex

        mv = self.resolve(uri)
        with tempfile.TemporaryDirectory(prefix="caloforge-pull-") as tmp:
            bundle = self.download_bundle(mv.uri, Path(tmp) / "bundle")
            ex.export_bundle(
                bundle,
                out_dir,
                fmt,
                num_steps=num_steps,
                sampler=sampler,
                opset=opset if opset is not None else ex.DEFAULT_OPSET,
                exporter=exporter,
                rtol=rtol if rtol is not None else ex.DEFAULT_RTOL,
                atol_mev=atol_mev if atol_mev is not None else ex.DEFAULT_ATOL_MEV,
                overwrite=overwrite,
                registered=mv.to_dict(),
            )
        return Path(out_dir) / "model_card.json"

    def model_artifact_uri(self, uri: str) -> str:
        """Where the pyfunc model of a version lives (for ``mlflow.pyfunc.load_model``)."""
        mv = self.resolve(uri)
        return self.client.get_model_version_download_uri(mv.name, str(mv.version))


def register_pretrained_bundle(
    bundle_dir: str | Path,
    run_id: str | None,
    metrics: Mapping[str, float] | None = None,
    store: RegistryStore | None = None,
    tags: Mapping[str, str] | None = None,
    aliases: Sequence[str] = ("candidate",),
) -> RegisteredVersion:
    """The hook the pretraining job calls: register its final bundle as a version of ``caloforge-base``.

    ``run_id`` is the pretraining MLflow run (the model is attached to it); ``metrics`` its final evaluation.
    The new version gets the ``candidate`` alias; promoting it to ``champion`` is a separate, reasoned step.
    """
    store = store or RegistryStore()
    return store.register_bundle(
        bundle_dir,
        name=BASE_MODEL_NAME,
        kind="base",
        tags=tags,
        metrics=metrics,
        run_id=run_id,
        aliases=aliases,
    )


def _to_version(mv: ModelVersion, aliases: Mapping[str, int]) -> RegisteredVersion:
    version = int(mv.version)
    return RegisteredVersion(
        name=mv.name,
        version=version,
        source=mv.source or "",
        run_id=mv.run_id or None,
        model_id=getattr(mv, "model_id", None) or (mv.tags or {}).get(TAG + "logged_model_id") or None,
        tags=dict(mv.tags or {}),
        aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
        description=mv.description or "",
        created_ms=int(mv.creation_timestamp or 0),
    )


def _alias_map(aliases: Any) -> dict[str, int]:
    """alias -> version from MLflow's entity (a dict locally, a protobuf container over REST)."""
    if aliases is None:
        return {}
    if isinstance(aliases, Mapping):
        return {str(k): int(v) for k, v in aliases.items()}
    out = {}
    for item in list(aliases):
        out[str(item.alias)] = int(item.version)
    return out


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _delete_artifacts(artifact_uri: str, store: RegistryStore) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(
        artifact_uri, tracking_uri=store.tracking_uri, registry_uri=store.registry_uri
    )
    repo.delete_artifacts()
