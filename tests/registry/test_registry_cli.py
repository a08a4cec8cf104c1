"""``caloforge registry ...`` and ``caloforge export ...`` end to end, in process, on a sqlite store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from registry_helpers import MESH

from caloforge.cli import main
from caloforge.registry.card import CARD_FILE, ModelCard


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Path:
    """$CALOFORGE_HOME with an empty default store (the CLI's default when MLFLOW_TRACKING_URI is unset)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "mlflow").mkdir(parents=True)
    shutil.copyfile(empty_mlflow_db, tmp_path / "home" / "mlflow" / "mlflow.db")
    return tmp_path / "home"


def test_register_list_show_promote_pull_generate(
    home: Path, bundle_dir: Path, adapted_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "register", str(bundle_dir), "--kind", "base", "--metric", "fpd=20.1"]) == 0
    assert "as models:/caloforge-base/1" in capsys.readouterr().out
    assert (
        main(["registry", "register", str(adapted_bundle_dir), "--kind", "distilled", "--alias", "candidate"])
        == 0
    )
    assert "models:/caloforge-lar-pb/1 (@candidate)" in capsys.readouterr().out

    assert main(["registry", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["latest_version"]) for m in listed] == [
        ("caloforge-base", 1),
        ("caloforge-lar-pb", 1),
    ]

    assert main(["registry", "promote", "caloforge-lar-pb", "1", "--reason", "FPD within 5% of teacher"]) == 0
    assert "models:/caloforge-lar-pb/1 is now @champion: FPD within 5% of teacher" in capsys.readouterr().out

    assert main(["registry", "show", "caloforge-lar-pb@champion", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["parent_uri"] == "models:/caloforge-base/1"
    assert sorted(shown["aliases"]) == ["candidate", "champion"]
    assert main(["registry", "show", "caloforge-base"]) == 0
    assert "models:/caloforge-base/1" in capsys.readouterr().out

    assert main(["registry", "search", "--tag", "detector=pbwo4", "--tag", "kind=base", "--json"]) == 0
    assert [v["uri"] for v in json.loads(capsys.readouterr().out)] == ["models:/caloforge-base/1"]

    out = tmp_path / "pulled"
    argv = [
        "registry",
        "pull",
        "caloforge-lar-pb",
        "--alias",
        "champion",
        "--format",
        "onnx",
        "--out",
        str(out),
    ]
    gate = tmp_path / "gate.yaml"  # a small fidelity gate (the default one generates 2 × 800 showers)
    gate.write_text("n_showers: 128\nbatch_size: 128\nclassifier: {hidden: 32, epochs: 4, n_seeds: 1}\n")
    assert main([*argv, "--exporter", "legacy", "--gate-config", str(gate)]) == 0
    printed = capsys.readouterr().out
    assert "(optimized: fp32;" in printed and "parity vs PyTorch" in printed
    assert "fidelity gate vs fp32 (128 showers): classifier AUC" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", CARD_FILE]
    card = ModelCard.load(out / CARD_FILE)
    assert (card.model["name"], card.model["version"], card.model["kind"]) == (
        "caloforge-lar-pb",
        1,
        "distilled",
    )
    assert card.registry["promotions"]["champion"]["reason"] == "FPD within 5% of teacher"
    assert card.exports[0]["num_steps"] == 1
    assert card.exports[0]["variant"] == "optimized" and card.exports[0]["fidelity_gate"]["n_showers"] == 128

    npy = tmp_path / "showers.npy"
    base = [
        "registry",
        "generate",
        str(out),
        "--energy-mev",
        "2e4",
        "--particle",
        "e-",
        "--detector",
        "lar-pb",
    ]
    assert main([*base, "--theta-rad", "0.5", "-n", "3", "--out", str(npy)]) == 0
    showers = np.load(npy)
    assert showers.shape == (3, *MESH) and showers.dtype == np.float32
    # the registered model gives the same showers through PyTorch
    npy2 = tmp_path / "showers_torch.npy"
    argv = ["registry", "generate", "caloforge-lar-pb@champion", "--energy-mev", "2e4", "--particle", "e-"]
    assert main([*argv, "--detector", "lar-pb", "--theta-rad", "0.5", "-n", "3", "--out", str(npy2)]) == 0
    np.testing.assert_allclose(np.load(npy2), showers, rtol=1e-3, atol=1e-5)


def test_export_from_directory_and_uri(home: Path, bundle_dir: Path, tmp_path: Path) -> None:
    assert (
        main(["export", "--model", str(bundle_dir), "--format", "torch", "--out", str(tmp_path / "t")]) == 0
    )
    assert (tmp_path / "t" / "bundle" / "model.safetensors").is_file()
    assert ModelCard.load(tmp_path / "t" / CARD_FILE).model["bundle"] == str(bundle_dir.resolve())
    assert main(["registry", "register", str(bundle_dir), "--kind", "base"]) == 0
    out = tmp_path / "o"
    argv = [
        "export",
        "--model",
        "models:/caloforge-base/1",
        "--out",
        str(out),
        "--steps",
        "3",
        "--exporter",
        "legacy",
        "--variant",
        "plain",
    ]
    assert main(argv) == 0
    exp = ModelCard.load(out / CARD_FILE).exports[0]
    assert (exp["num_steps"], exp["variant"], exp["fidelity_gate"]) == (3, "plain", None)


def test_errors_exit_2_with_a_message(
    home: Path, bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "show", "caloforge-nope@champion"]) == 2
    assert "unknown registered model 'caloforge-nope'" in capsys.readouterr().err
    assert main(["registry", "register", str(bundle_dir), "--kind", "base"]) == 0
    capsys.readouterr()
    assert (
        main(["registry", "pull", "caloforge-base", "--alias", "champion", "--out", str(tmp_path / "p")]) == 2
    )
    assert "has no alias 'champion'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["registry", "promote", "caloforge-base", "1", "--alias", "latest", "--reason", "x"]) == 2
    assert "reserved" in capsys.readouterr().err
    npy = tmp_path / "s.npy"
    argv = ["registry", "generate", str(bundle_dir), "--energy-mev", "5e6", "--particle", "pi+", "--detector"]
    assert main([*argv, "lar-pb", "--theta-rad", "0.5", "--strict", "--out", str(npy)]) == 2
    assert "outside the trained ranges (strict mode): energy_mev" in capsys.readouterr().err
    assert main([*argv, "cms-ecal", "--out", str(npy)]) == 2
    assert "unknown detector(s) ['cms-ecal']" in capsys.readouterr().err
    assert not npy.exists()
