"""Default locations: the artifact root MLflow experiments get next to a sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from caloforge import paths


def test_sqlite_store_keeps_artifacts_next_to_the_database(tmp_path: Path) -> None:
    db = tmp_path / "store" / "mlflow.db"
    assert paths.mlflow_artifact_root(f"sqlite:///{db}") == (tmp_path / "store" / "artifacts").as_uri()


def test_relative_sqlite_path_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert paths.mlflow_artifact_root("sqlite:///sub/m.db") == (tmp_path / "sub" / "artifacts").as_uri()


def test_default_store_artifacts_live_under_caloforge_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = paths.mlflow_artifact_root(paths.mlflow_tracking_uri())
    assert root == (tmp_path / "home" / "mlflow" / "artifacts").as_uri()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "file:///tmp/mlruns", "databricks"])
def test_servers_and_file_stores_choose_their_own_artifact_root(uri: str) -> None:
    assert paths.mlflow_artifact_root(uri) is None
