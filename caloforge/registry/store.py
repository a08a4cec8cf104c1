"""The model registry: ShowerModel bundles as versions of MLflow registered models.

One registered model per detector family: ``caloforge-base`` for pretrained foundation models and
``caloforge-<detector>`` for models adapted or distilled to one detector. Each version carries the bundle
directory (config.json + model.safetensors) as the artifacts of a ``caloforge.registry.pyfunc`` model, so
``mlflow.pyfunc.load_model("models:/caloforge-lar-pb@champion")`` works, plus searchable tags (the table
is in ``caloforge.registry.versions``).

``RegistryStore`` is the one object callers hold; each concept lives in its own module and takes the
store's ``MlflowClient``:

- ``caloforge.registry.versions``: ``RegisteredVersion``, ``RegisteredModelSummary``, the tag set of a
  version, name/alias/kind rules (no mlflow);
- ``caloforge.registry.registration``: ``Registrar``, atomic registration with rollback;
- ``caloforge.registry.lookup``: get/resolve/list/search;
- ``caloforge.registry.promotion``: aliases and recorded promotions;
- ``caloforge.registry.download``: verified bundle download, pull (download + export + card).

Store: ``caloforge.paths.mlflow_tracking_uri()`` by default (sqlite + local artifacts under
``$CALOFORGE_HOME/mlflow``); ``MLFLOW_TRACKING_URI`` (e.g. ``http://127.0.0.1:5000`` of an ``mlflow server``)
is honoured unchanged. mlflow is imported only by these modules, ``pyfunc.py`` and ``tracking.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient

from caloforge import paths
from caloforge.registry import download, lookup, promotion
from caloforge.registry.bundle import parse_model_uri
from caloforge.registry.registration import Registrar
from caloforge.registry.versions import (
    ALIASES,
    BASE_MODEL_NAME,
    KINDS,
    RegisteredModelSummary,
    RegisteredVersion,
    default_model_name,
    validate_alias,
)

if TYPE_CHECKING:
    from caloforge.registry.fidelity import FidelityGateConfig

REGISTRY_EXPERIMENT = "caloforge-registry"


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
        self._registrar = Registrar(
            self.client, self.tracking_uri, self.registry_uri, self.artifact_root, self.experiment
        )

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
        return self._registrar.register(bundle_dir, name, kind, tags, metrics, run_id, description, aliases)

    # ------------------------------------------------------------------ aliases and promotion
    def set_alias(self, name: str, version: int | str, alias: str) -> RegisteredVersion:
        """Point ``alias`` of ``name`` at ``version`` (moving it from any other version)."""
        return promotion.set_alias(self.client, name, version, alias)

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from ``name`` (ValueError when the model or alias is unknown)."""
        promotion.delete_alias(self.client, name, alias)

    def promote(
        self, name: str, version: int | str, alias: str = "champion", reason: str = ""
    ) -> RegisteredVersion:
        """Move ``alias`` to ``version`` and record who replaced whom, when and why.

        The record is a version tag ``caloforge.promotion.<alias>`` (JSON: at, reason, previous_version)
        plus a line appended to the version description.
        """
        return promotion.promote(self.client, name, version, alias, reason)

    # ------------------------------------------------------------------ queries
    def get(self, name: str, version: int | str | None = None, alias: str | None = None) -> RegisteredVersion:
        """One version by number or alias (neither: the latest). Unknown name/version/alias -> ValueError."""
        return lookup.get_version(self.client, name, version, alias)

    def resolve(self, uri: str) -> RegisteredVersion:
        """A version from ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME@ALIAS`` or ``NAME``."""
        return lookup.resolve(self.client, uri)

    def versions(self, name: str) -> list[RegisteredVersion]:
        """All versions of one registered model, oldest first."""
        return lookup.model_versions(self.client, name)

    def get_model(self, name: str) -> RegisteredModelSummary:
        """One registered model by name."""
        return lookup.get_model(self.client, name)

    def list_models(self) -> list[RegisteredModelSummary]:
        """All registered models, by name."""
        return lookup.list_models(self.client)

    def search(
        self, tags: Mapping[str, str] | None = None, name: str | None = None
    ) -> list[RegisteredVersion]:
        """Versions whose tags match all of ``tags`` (exact), optionally within one registered model.

        Keys: ``detector`` / ``particle`` (membership: a detector name; a particle name or PDG id), the short
        keys ``kind``, ``target_detector``, ``adaptation_method``, ``parent_uri``, ``parent_version``,
        ``dataset_manifest_hash``, ``version``, ``schema_version`` (prefixed with ``caloforge.``), or any full
        tag key (e.g. ``metric.fpd`` or ``caloforge.kind``). No tags and no name: every version.
        """
        return lookup.search(self.client, tags, name)

    # ------------------------------------------------------------------ artifacts
    def download_bundle(self, uri: str, dst: str | Path) -> Path:
        """Download the bundle of a registered version into ``dst`` (created; must not exist or be empty).

        The files are checked against the sha256 digests recorded at registration (a corrupt or missing
        artifact is a ``ValueError``), then the bundle is loaded once to make sure it is usable.
        """
        return download.download_bundle(self.client, self.tracking_uri, uri, dst)

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
        max_mismatch_fraction: float | None = None,
        outlier_limit: float | None = None,
        overwrite: bool = False,
        variant: str | None = None,
        gate: FidelityGateConfig | None = None,
        calibration_showers: int | None = None,
    ) -> Path:
        """Download a registered version and export it (``onnx`` or ``torch``) with its model card into
        ``out_dir``; returns the card path. Nothing is written when the download or export fails (a graph
        that fails the parity check or the fidelity gate included). None leaves ``export_bundle``'s default
        (``DEFAULT_OPSET``, the parity check's ``DEFAULT_*`` tolerances, the bundle's sampler and step count,
        variant ``optimized``, ``FidelityGateConfig()``); ``gate`` is a ``FidelityGateConfig``."""
        return download.pull(
            self.client,
            self.tracking_uri,
            uri,
            out_dir,
            fmt,
            num_steps=num_steps,
            sampler=sampler,
            opset=opset,
            exporter=exporter,
            rtol=rtol,
            atol_mev=atol_mev,
            max_mismatch_fraction=max_mismatch_fraction,
            outlier_limit=outlier_limit,
            overwrite=overwrite,
            variant=variant,
            gate=gate,
            calibration_showers=calibration_showers,
        )

    def load_pyfunc(self, uri: str) -> Any:
        """The version's MLflow pyfunc model, loaded only after its entry script, ``MLmodel`` and bundle
        match the digests recorded at registration (``download.load_pyfunc``)."""
        return download.load_pyfunc(self.client, self.tracking_uri, uri)

    def model_artifact_uri(self, uri: str) -> str:
        """Where the pyfunc model of a version lives (for ``mlflow.pyfunc.load_model``, which verifies
        nothing: prefer :meth:`load_pyfunc`)."""
        return download.model_artifact_uri(self.client, uri)


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


def fetch_bundle(ref: str, target: Path, what: str) -> tuple[Path, str, str | None, str | None]:
    """(bundle dir, URI, version, registered name) of ``ref``: a bundle directory (checked, used in place),
    or a registry reference (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME@ALIAS``) resolved to
    an exact version and downloaded into ``target`` (reused when it holds that version already: a resumed
    run). ``what`` names the input in errors (``base``, ``teacher``, ``cd.student_init``)."""
    from caloforge.platform.shower_model import ShowerModel

    path = Path(ref)
    if path.is_dir():
        ShowerModel.load(path)  # a clear error for a directory that is not a bundle
        return path.resolve(), str(path.resolve()), None, None
    if not (ref.startswith("models:/") or "@" in ref):
        raise ValueError(
            f"{what}: {ref!r} is neither a bundle directory nor a registry URI (models:/NAME/VERSION, "
            "models:/NAME@ALIAS or NAME@ALIAS)"
        )
    store = RegistryStore()
    try:
        version = store.resolve(ref)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    marker = target / ".registry_uri"
    if marker.is_file() and marker.read_text() == version.uri:
        return target, version.uri, str(version.version), version.name
    if target.exists():
        raise ValueError(
            f"{target}: holds another {what} ({marker.read_text() if marker.is_file() else '?'})"
        )
    store.download_bundle(version.uri, target)
    marker.write_text(version.uri)
    return target, version.uri, str(version.version), version.name


__all__ = [
    "ALIASES",
    "BASE_MODEL_NAME",
    "KINDS",
    "REGISTRY_EXPERIMENT",
    "RegisteredModelSummary",
    "RegisteredVersion",
    "RegistryStore",
    "default_model_name",
    "fetch_bundle",
    "parse_model_uri",
    "register_pretrained_bundle",
    "validate_alias",
]
