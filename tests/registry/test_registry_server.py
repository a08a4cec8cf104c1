"""Against a real ``mlflow server`` subprocess (HTTP, proxied artifacts): register → alias → load by alias
through plain MLflow → predict; pull ONNX → onnxruntime matches PyTorch; lineage tags survive REST."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from registry_helpers import MESH

from caloforge.platform.conditioning import Conditions
from caloforge.platform.shower_model import ShowerModel, derive_seeds
from caloforge.registry.card import CARD_FILE, ModelCard
from caloforge.registry.export import OnnxShowerGenerator
from caloforge.registry.store import RegistryStore


@pytest.mark.slow
def test_full_cycle_against_mlflow_server(
    mlflow_server: str,
    bundle_dir: Path,
    adapted_bundle_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    store = RegistryStore()  # MLFLOW_TRACKING_URI honoured unchanged
    assert store.tracking_uri == mlflow_server and store.artifact_root is None

    base = store.register_bundle(bundle_dir, kind="base", metrics={"fpd": 20.1, "auc_high": 0.56})
    store.promote(base.name, base.version, "champion", "first pretrained model")
    student = store.register_bundle(adapted_bundle_dir, kind="distilled", aliases=("candidate",))
    promoted = store.promote(student.name, student.version, "champion", "one-step student passes the gate")
    assert sorted(promoted.aliases) == ["candidate", "champion"]  # aliases over REST (protobuf container)
    assert promoted.lineage["parent_uri"] == "models:/caloforge-base/1"
    assert promoted.lineage["adaptation_method"] == "consistency"
    assert promoted.tags["caloforge.detectors"] == "lar-pb,pbwo4"
    assert store.get("caloforge-base", alias="champion").metrics == {"fpd": 20.1, "auc_high": 0.56}
    assert [m.name for m in store.list_models()] == ["caloforge-base", "caloforge-lar-pb"]
    assert [v.uri for v in store.search({"kind": "distilled", "detector": "lar-pb"})] == [student.uri]
    assert store.artifact_root is None and student.source.startswith("mlflow-artifacts:")

    # a user who never imports caloforge internals
    model = mlflow.pyfunc.load_model("models:/caloforge-lar-pb@champion")
    table = {
        "energy_mev": [3e3, 4e4],
        "theta_rad": [0.4, 0.8],
        "phi_rad": [0.1, -0.1],
        "pdg": [11, 211],
        "detector": ["lar-pb", "lar-pb"],
    }
    showers = model.predict(table)
    cond = Conditions.make(table["energy_mev"], table["theta_rad"], table["phi_rad"], table["pdg"], "lar-pb")
    expected = ShowerModel.load(adapted_bundle_dir).generate(cond, seeds=derive_seeds(0, 2))
    np.testing.assert_array_equal(showers, expected.reshape(2, -1))

    # pull ONNX (default dynamo exporter) + card, run it with onnxruntime
    out = tmp_path / "pulled"
    store.pull("caloforge-lar-pb@champion", out, "onnx")
    card = ModelCard.load(out / CARD_FILE)
    assert card.model["uri"] == "models:/caloforge-lar-pb/1" and card.exports[0]["exporter"] == "dynamo"
    assert card.exports[0]["parity"]["passed"]
    onnx_out = OnnxShowerGenerator.from_card(out).generate(cond, seeds=derive_seeds(0, 2))
    assert onnx_out.shape == (2, *MESH)
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-3, atol=1e-5)
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server
