"""Getting a registered version out of the store: its verified bundle, or an export of it.

``download_bundle`` fetches the bundle artifact of a version's pyfunc model, checks every file against the
sha256 digests recorded at registration (``caloforge.bundle_files``) and loads it once; ``pull`` does that
into a temporary directory and exports the bundle (``caloforge.registry.export.export_bundle``, imported
lazily: it needs torch) with a model card that carries the registry's record of the version.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from caloforge.registry.bundle import inspect_bundle, verify_bundle_files
from caloforge.registry.card import CARD_FILE
from caloforge.registry.lookup import resolve
from caloforge.registry.pyfunc import BUNDLE_ARTIFACT, quiet_mlflow


def download_bundle(client: MlflowClient, tracking_uri: str, uri: str, dst: str | Path) -> Path:
    """The bundle of version ``uri`` in ``dst`` (created; must not exist or be empty), verified."""
    mv = resolve(client, uri)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"download_bundle: destination {dst} exists and is not an empty directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".caloforge-download-", dir=dst.parent) as tmp:
        root = client.get_model_version_download_uri(mv.name, str(mv.version))
        try:
            with quiet_mlflow():
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{root.rstrip('/')}/artifacts/{BUNDLE_ARTIFACT}",
                    dst_path=tmp,
                    tracking_uri=tracking_uri,
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
    client: MlflowClient, tracking_uri: str, uri: str, out_dir: str | Path, fmt: str, **options: Any
) -> Path:
    """Download version ``uri`` and export it as ``fmt`` with its model card into ``out_dir``; returns the
    card path. ``options`` are keyword arguments of ``export_bundle``; None leaves its default."""
    from caloforge.registry.export import export_bundle

    mv = resolve(client, uri)
    with tempfile.TemporaryDirectory(prefix="caloforge-pull-") as tmp:
        bundle = download_bundle(client, tracking_uri, mv.uri, Path(tmp) / "bundle")
        given = {key: value for key, value in options.items() if value is not None}
        export_bundle(bundle, out_dir, fmt, **given, registered=mv.to_dict())
    return Path(out_dir) / CARD_FILE


def load_pyfunc(client: MlflowClient, tracking_uri: str, uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` of version ``uri``, but only after its files are verified: the whole
    model is downloaded, its own files (``MLmodel``, the entry script MLflow executes) and the bundle are
    checked against the digests recorded at registration, then the local, verified copy is loaded."""
    from caloforge.registry.pyfunc import verify_model_files

    mv = resolve(client, uri)
    root = client.get_model_version_download_uri(mv.name, str(mv.version))
    with tempfile.TemporaryDirectory(prefix="caloforge-pyfunc-") as tmp:
        try:
            with quiet_mlflow():
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=root, dst_path=tmp, tracking_uri=tracking_uri
                    )
                )
        except (MlflowException, OSError) as exc:
            raise ValueError(f"{mv.uri}: could not download the model ({exc})") from exc
        verify_model_files(local, mv.model_files, what=mv.uri)
        verify_bundle_files(local / "artifacts" / BUNDLE_ARTIFACT, mv.bundle_files, what=mv.uri)
        with quiet_mlflow():
            return mlflow.pyfunc.load_model(str(local))  # the bundle is read into memory here


def model_artifact_uri(client: MlflowClient, uri: str) -> str:
    """Where the pyfunc model of a version lives (for ``mlflow.pyfunc.load_model``)."""
    mv = resolve(client, uri)
    return client.get_model_version_download_uri(mv.name, str(mv.version))


__all__ = ["download_bundle", "load_pyfunc", "model_artifact_uri", "pull"]
