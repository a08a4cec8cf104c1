"""RegistryStore on a real sqlite MLflow store: registration, tags, aliases, promotion, search, download,
atomicity and every failure mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from registry_helpers import DETECTORS, rewrite_config

from caloforge.platform.checkpoint import SCHEMA_VERSION
from caloforge.registry.store import (
    BASE_MODEL_NAME,
    RegistryStore,
    parse_model_uri,
    register_pretrained_bundle,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> RegistryStore:
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copyfile(empty_mlflow_db, db)
    return RegistryStore(tracking_uri=f"sqlite:///{db}")


@pytest.fixture(scope="module")
def base_v1(store: RegistryStore, bundle_dir: Path):
    return store.register_bundle(
        bundle_dir, kind="base", metrics={"fpd": 20.1, "kpd": 0.3, "auc_low": 0.59}, aliases=("candidate",)
    )


def test_register_base_records_tags_metrics_and_lineage(
    store: RegistryStore, base_v1, bundle_dir: Path
) -> None:
    v = base_v1
    assert (v.name, v.version, v.uri) == (BASE_MODEL_NAME, 1, "models:/caloforge-base/1")
    assert v.kind == "base"
    assert v.detectors == DETECTORS
    assert v.particles == ("e-", "gamma", "pi+")
    assert v.metrics == {"fpd": 20.1, "kpd": 0.3, "auc_low": 0.59}
    assert v.aliases == ("candidate",)
    tags = v.tags
    assert tags["caloforge.version"] == "0.1.0"
    assert tags["caloforge.schema_version"] == str(SCHEMA_VERSION)  # the schema it was saved with
    assert tags["caloforge.dataset_manifest_hash"] == "sha256:" + "ab" * 8
    assert tags["caloforge.detector.lar-pb"] == tags["caloforge.detector.pbwo4"] == "true"
    assert tags["caloforge.particle.211"] == "true"
    assert tags["caloforge.mesh_shape"] == "6x4x3"
    assert "caloforge.target_detector" not in tags  # base models have no target
    files = json.loads(tags["caloforge.bundle_files"])
    assert set(files) == {"config.json", "model.safetensors"}
    # the registration run holds the metrics and is finished
    run = store.client.get_run(v.run_id)
    assert run.data.metrics["fpd"] == pytest.approx(20.1)
    assert run.info.status == "FINISHED"
    # artifacts went next to the sqlite database, not into ./mlruns
    assert Path(store.tracking_uri[len("sqlite:///") :]).parent.as_uri() in v.source


def test_adapted_model_gets_detector_family_name_and_parent_lineage(
    store: RegistryStore, base_v1, adapted_bundle_dir: Path
) -> None:
    v = store.register_bundle(adapted_bundle_dir, kind="distilled", metrics={"fpd": 68.8})
    assert v.name == "caloforge-lar-pb"
    assert v.lineage == {
        "parent_uri": "models:/caloforge-base/1",
        "parent_version": "1",
        "adaptation_method": "consistency",
        "dataset_manifest_hash": "sha256:" + "ab" * 8,
        "target_detector": "lar-pb",
    }
    assert v.kind == "distilled"
    # explicit tags override the bundle's lineage
    v2 = store.register_bundle(
        adapted_bundle_dir, kind="adapted", tags={"adaptation_method": "full", "team": "x"}
    )
    assert (v2.name, v2.version) == ("caloforge-lar-pb", 2)
    assert v2.lineage["adaptation_method"] == "full"
    assert v2.tags["team"] == "x"


def test_get_resolve_and_uri_forms(store: RegistryStore, base_v1) -> None:
    assert store.get(BASE_MODEL_NAME, alias="candidate").version == 1
    assert store.resolve("models:/caloforge-base/1").version == 1
    assert store.resolve("caloforge-base@candidate").version == 1
    assert store.resolve("caloforge-base").version == store.get_model(BASE_MODEL_NAME).latest_version
    assert parse_model_uri("models:/caloforge-lar-pb@champion") == ("caloforge-lar-pb", None, "champion")
    assert parse_model_uri("caloforge-base/7") == ("caloforge-base", 7, None)
    with pytest.raises(ValueError, match="invalid model URI"):
        parse_model_uri("models:/a/b/c")


def test_unknown_model_version_alias_are_clear_errors(store: RegistryStore, base_v1) -> None:
    with pytest.raises(ValueError, match=r"unknown registered model 'caloforge-nope' \(known: \["):
        store.get("caloforge-nope")
    with pytest.raises(ValueError, match="has no alias 'champion'"):
        store.resolve("caloforge-base@champion")
    with pytest.raises(ValueError, match="has no version 99"):
        store.get(BASE_MODEL_NAME, version=99)
    with pytest.raises(ValueError, match="unknown registered model"):
        store.download_bundle("models:/caloforge-nope/1", "/nonexistent/never")


def test_promote_moves_alias_and_records_reason(store: RegistryStore, base_v1, bundle_dir: Path) -> None:
    with pytest.raises(ValueError, match="reason is required"):
        store.promote(BASE_MODEL_NAME, 1, "champion", "  ")
    first = store.promote(BASE_MODEL_NAME, 1, "champion", "best FPD so far")
    assert "champion" in first.aliases
    v2 = store.register_bundle(bundle_dir, kind="base", metrics={"fpd": 15.0})
    promoted = store.promote(BASE_MODEL_NAME, v2.version, "champion", "FPD 20.1 -> 15.0")
    record = json.loads(promoted.tags["caloforge.promotion.champion"])
    assert record["previous_version"] == 1
    assert record["reason"] == "FPD 20.1 -> 15.0"
    assert record["at"].endswith("+00:00")
    assert "promoted to @champion (replacing v1): FPD 20.1 -> 15.0" in promoted.description
    assert store.get(BASE_MODEL_NAME, alias="champion").version == v2.version
    assert "champion" not in store.get(BASE_MODEL_NAME, version=1).aliases
    summary = store.get_model(BASE_MODEL_NAME)
    assert summary.aliases["champion"] == v2.version
    assert summary.aliases["candidate"] == 1


def test_alias_validation(store: RegistryStore, base_v1) -> None:
    for bad in ("latest", "v3", "has space", ""):
        with pytest.raises(ValueError, match="alias"):
            store.set_alias(BASE_MODEL_NAME, 1, bad)
    v = store.set_alias(BASE_MODEL_NAME, 1, "staging")
    assert "staging" in v.aliases
    store.delete_alias(BASE_MODEL_NAME, "staging")
    assert "staging" not in store.get(BASE_MODEL_NAME, version=1).aliases


def test_search_by_tags(store: RegistryStore, base_v1, adapted_bundle_dir: Path) -> None:
    if not store.search({"kind": "distilled"}):
        store.register_bundle(adapted_bundle_dir, kind="distilled")
    lar = store.search({"detector": "lar-pb"})
    assert {v.name for v in lar} >= {"caloforge-base", "caloforge-lar-pb"}
    distilled = store.search({"kind": "distilled"})
    assert distilled and {(v.name, v.kind) for v in distilled} == {("caloforge-lar-pb", "distilled")}
    assert store.search({"detector": "atlas-lar"}) == []
    assert store.search({"particle": "pi+", "kind": "base"})  # particle by name
    assert store.search({"particle": 211, "kind": "base"})  # ... or PDG id
    assert store.search({"particle": "K0L"}) == []
    assert [v.version for v in store.search({"metric.fpd": "20.1"}, name=BASE_MODEL_NAME)] == [1]
    with pytest.raises(ValueError, match="unknown particle"):
        store.search({"particle": "graviton"})


def test_download_bundle_verifies_and_loads(store: RegistryStore, base_v1, tmp_path: Path) -> None:
    out = store.download_bundle("models:/caloforge-base/1", tmp_path / "dl")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        store.download_bundle("models:/caloforge-base/1", tmp_path / "busy")


def test_corrupt_artifact_is_detected_on_download(
    fresh_store: RegistryStore, tmp_path: Path, bundle_dir: Path
) -> None:
    store = fresh_store
    v = store.register_bundle(bundle_dir, kind="base")
    weights = (
        Path(store.model_artifact_uri(v.uri).removeprefix("file://")) / "artifacts/bundle/model.safetensors"
    )
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt artifact of models:/caloforge-base/1: model\.safetensors"):
        store.download_bundle(v.uri, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".caloforge-download-")]


def test_bundle_with_newer_schema_is_refused_before_anything_is_created(
    fresh_store: RegistryStore, tmp_path: Path, bundle_dir: Path
) -> None:
    store = fresh_store
    newer = tmp_path / "newer"
    shutil.copytree(bundle_dir, newer)
    rewrite_config(newer, schema_version=99)
    with pytest.raises(ValueError, match="schema_version 99 is newer"):
        store.register_bundle(newer, kind="base")
    truncated = tmp_path / "truncated"
    shutil.copytree(bundle_dir, truncated)
    (truncated / "model.safetensors").write_bytes((bundle_dir / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        store.register_bundle(truncated, kind="base")
    with pytest.raises(ValueError, match=r"bundle directory .* not found"):
        store.register_bundle(tmp_path / "missing", kind="base")
    assert store.list_models() == []
    assert store.client.get_experiment_by_name("caloforge-registry") is None


def test_invalid_arguments_are_refused_before_anything_is_created(
    fresh_store: RegistryStore, bundle_dir: Path
) -> None:
    store = fresh_store
    with pytest.raises(ValueError, match="kind must be one of"):
        store.register_bundle(bundle_dir, kind="finetuned")
    with pytest.raises(ValueError, match="not finite"):
        store.register_bundle(bundle_dir, kind="base", metrics={"fpd": float("nan")})
    with pytest.raises(ValueError, match="reserved"):
        store.register_bundle(bundle_dir, kind="base", aliases=("latest",))
    with pytest.raises(ValueError, match="needs a target detector"):
        store.register_bundle(bundle_dir, kind="adapted")  # two detectors, no target recorded
    with pytest.raises(ValueError, match="not in the bundle's detectors"):
        store.register_bundle(bundle_dir, kind="adapted", tags={"target_detector": "atlas-lar"})
    with pytest.raises(ValueError, match="invalid registered model name"):
        store.register_bundle(bundle_dir, name="bad name", kind="base")
    with pytest.raises(ValueError, match="unknown MLflow run"):
        store.register_bundle(bundle_dir, kind="base", run_id="0" * 32)
    assert store.list_models() == []


def test_failure_after_creation_rolls_everything_back(
    fresh_store: RegistryStore, tmp_path: Path, bundle_dir: Path
) -> None:
    """The artifact store cannot be written (its root is under a regular file): the run and logged model
    created before the failure are deleted and no registered model or version remains."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the artifact root should be")
    store = RegistryStore(tracking_uri=fresh_store.tracking_uri, artifact_root=blocker / "artifacts")
    with pytest.raises(OSError) as info:
        store.register_bundle(bundle_dir, kind="base", metrics={"fpd": 1.0}, aliases=("candidate",))
    assert not any("rollback: could not" in note for note in getattr(info.value, "__notes__", []))
    assert store.list_models() == []
    assert store.search() == []
    exp = store.client.get_experiment_by_name("caloforge-registry")
    runs = store.client.search_runs([exp.experiment_id], run_view_type=3)  # ALL
    assert runs and all(r.info.lifecycle_stage == "deleted" for r in runs)
    assert store.client.search_logged_models([exp.experiment_id]) == []


def test_register_pretrained_bundle_attaches_to_the_pretraining_run(
    fresh_store: RegistryStore, tmp_path: Path, bundle_dir: Path
) -> None:
    store = fresh_store
    exp_id = store.client.create_experiment(
        "caloforge-pretrain", artifact_location=(tmp_path / "pa").as_uri()
    )
    run = store.client.create_run(exp_id, run_name="pretrain-S")
    v = register_pretrained_bundle(bundle_dir, run.info.run_id, {"fpd": 11.0}, store=store)
    assert (v.name, v.kind, v.run_id, v.aliases) == (BASE_MODEL_NAME, "base", run.info.run_id, ("candidate",))
    assert v.metrics == {"fpd": 11.0}
    logged = store.client.search_logged_models([exp_id])
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    assert store.client.get_run(run.info.run_id).info.status == "RUNNING"  # the caller's run is left alone


def test_default_store_lives_under_caloforge_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path, bundle_dir: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "mlflow").mkdir(parents=True)
    shutil.copyfile(empty_mlflow_db, tmp_path / "home" / "mlflow" / "mlflow.db")
    store = RegistryStore()
    assert store.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    assert store.artifact_root == (tmp_path / "home" / "mlflow" / "artifacts").as_uri()
    v = store.register_bundle(bundle_dir, kind="base")
    assert v.source.startswith((tmp_path / "home" / "mlflow" / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert RegistryStore().tracking_uri == "http://127.0.0.1:1"
    assert RegistryStore().artifact_root is None


# -- trust boundaries (issue 15) ---------------------------------------------------------------------------
def test_version_without_digest_tags_is_refused(fresh_store: RegistryStore, tmp_path: Path, bundle_dir: Path):
    """A version whose file digests are missing (tag deleted, or registered outside CaloForge) cannot be
    verified, so it is not downloaded nor loaded."""
    store = fresh_store
    v = store.register_bundle(bundle_dir, kind="base")
    assert set(json.loads(v.tags["caloforge.model_files"])) >= {"MLmodel", "caloforge_shower_model.py"}
    store.client.delete_model_version_tag(v.name, str(v.version), "caloforge.bundle_files")
    with pytest.raises(ValueError, match=r"records no file digests .*caloforge\.bundle_files missing"):
        store.download_bundle(v.uri, tmp_path / "dl")
    store.client.delete_model_version_tag(v.name, str(v.version), "caloforge.model_files")
    with pytest.raises(ValueError, match=r"caloforge\.model_files missing"):
        store.load_pyfunc(v.uri)


def test_load_pyfunc_verifies_the_entry_script_before_mlflow_runs_it(
    fresh_store: RegistryStore, tmp_path: Path, bundle_dir: Path
) -> None:
    store = fresh_store
    v = store.register_bundle(bundle_dir, kind="base")
    model = store.load_pyfunc(v.uri)  # genuine: verified, then loaded
    assert model.metadata.metadata["caloforge"]["mesh_shape"] == [6, 4, 3]
    entry = Path(store.model_artifact_uri(v.uri).removeprefix("file://")) / "caloforge_shower_model.py"
    canary = tmp_path / "canary"
    entry.write_text(entry.read_text() + f"\nopen({str(canary)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match=r"\['caloforge_shower_model\.py'\] differ from the digests"):
        store.load_pyfunc(v.uri)
    assert not canary.exists()
