"""``caloforge adapt`` end to end on real shards, a real base bundle and a real sqlite MLflow registry:
lineage, aliases and the gate, named errors that leave the registry untouched, resume after a failure, a
detector with another mesh, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from adapt_helpers import MODEL, make_shards, tiny_config

from caloforge.adapt.config import GateConfig, RegisterConfig, StrategyConfig
from caloforge.adapt.pipeline import AdaptRequest, plan_adaptation, run_adaptation
from caloforge.cli import main
from caloforge.datasets.shards import Manifest
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.geometry import DETECTORS_DIR, load_detector
from caloforge.platform.objectives import ObjectiveConfig
from caloforge.platform.shower_model import ShowerModel


def _register_base(store, bundle: Path) -> None:
    store.register_bundle(bundle, kind="base", aliases=("champion",))


@pytest.mark.slow
def test_adaptation_registers_a_versioned_child_of_the_base_and_the_gate_decides_champion(
    registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    _register_base(registry, base_bundle)
    request = AdaptRequest("models:/caloforge-base@champion", "lar-pb", lar_pb_shards)
    first = run_adaptation(tiny_config(), request, tmp_path / "run1")
    assert first.registered is not None
    assert first.registered["name"] == "caloforge-lar-pb" and first.registered["version"] == 1
    assert set(first.registered["aliases"]) == {"candidate", "champion"}
    assert first.parent_uri == "models:/caloforge-base/1" and first.parent_version == "1"
    assert first.trainable_parameters == first.total_parameters  # full fine-tuning
    assert first.gate.passed and (first.report_dir / "report.md").is_file()
    for key in ("fpd", "kpd", "auc_high", "floor/fpd"):
        assert key in first.metrics
    version = registry.get("caloforge-lar-pb", version=1)
    tags = version.tags
    assert tags["caloforge.kind"] == "adapted" and tags["caloforge.parent_uri"] == "models:/caloforge-base/1"
    assert tags["caloforge.parent_version"] == "1" and tags["caloforge.adaptation_method"] == "full"
    assert tags["caloforge.target_detector"] == "lar-pb" and tags["caloforge.steps"] == "4"
    assert tags["caloforge.dataset_manifest_hash"] == Manifest.load(lar_pb_shards).fingerprint
    assert int(tags["caloforge.train_showers"]) == Manifest.load(lar_pb_shards).counts["train"]["total"]
    assert float(tags["metric.fpd"]) == pytest.approx(first.metrics["fpd"])
    model = ShowerModel.load(first.model_dir)
    lineage = model.lineage
    assert (lineage.kind, lineage.parent_uri, lineage.parent_version) == (
        "adapted",
        "models:/caloforge-base/1",
        "1",
    )
    assert (lineage.strategy, lineage.objective, lineage.target_detector) == (
        "full",
        "flow_matching",
        "lar-pb",
    )
    assert lineage.trained is not None and lineage.trained.detectors == ("lar-pb",)
    assert "lar-pb" in model.vocab.detectors and {"par04-siw", "pbwo4"} <= set(model.vocab.detectors)

    # A version that fails the gate is registered as a candidate and does not become champion.
    strict = tiny_config(name="strict", gate=GateConfig(max_auc_high=0.5))
    second = run_adaptation(strict, request, tmp_path / "run2")
    assert not second.gate.passed and second.gate.reasons()
    assert second.registered["version"] == 2 and second.registered["aliases"] == ["candidate"]
    assert registry.get("caloforge-lar-pb", alias="champion").version == 1
    assert registry.get("caloforge-lar-pb", version=2).tags["caloforge.gate"].startswith("failed")
    # The registered adapted model pulls like the base does.
    pulled = registry.pull("caloforge-lar-pb@champion", tmp_path / "pulled", "torch")
    card = json.loads(Path(pulled).read_text())
    assert card["model"]["uri"] == "models:/caloforge-lar-pb/1" and card["model"]["kind"] == "adapted"
    assert (
        card["lineage"]["parent_uri"] == "models:/caloforge-base/1" and card["lineage"]["strategy"] == "full"
    )


def test_bad_requests_are_named_errors_and_leave_the_registry_untouched(
    registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    _register_base(registry, base_bundle)
    cfg = tiny_config()
    bad = [
        (AdaptRequest("models:/caloforge-base@nope", "lar-pb", lar_pb_shards), "base:"),
        (AdaptRequest(str(tmp_path), "lar-pb", lar_pb_shards), "config.json"),
        (AdaptRequest("caloforge-base@champion", "lar-pbx", lar_pb_shards), "detector: unknown detector"),
        (AdaptRequest("caloforge-base@champion", "pbwo4", lar_pb_shards), r"holds showers of \['lar-pb'\]"),
        (AdaptRequest("caloforge-base@champion", "lar-pb", tmp_path), "no manifest.json"),
    ]
    # a YAML that reuses the built-in name for another detector
    spec = yaml.safe_load((DETECTORS_DIR / "lar-pb.yaml").read_text())
    spec["front_dead_x0"] = 2.0
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "lar-pb.yaml").write_text(yaml.safe_dump(spec))
    bad.append(
        (
            AdaptRequest("caloforge-base@champion", str(tmp_path / "yaml" / "lar-pb.yaml"), lar_pb_shards),
            "own name",
        )
    )
    for i, (request, match) in enumerate(bad):
        with pytest.raises(ValueError, match=match):
            run_adaptation(cfg, request, tmp_path / f"bad{i}")
    with pytest.raises(ValueError, match="objective 'edm' cannot train a model with parametrisation"):
        run_adaptation(
            tiny_config(objective=ObjectiveConfig(name="edm")),
            AdaptRequest("caloforge-base@champion", "lar-pb", lar_pb_shards),
            tmp_path / "bad-objective",
        )
    # no spare detector slot left in the base
    full = ShowerModel.build(
        MODEL,
        ConditionVocab.create(["par04-siw"], spare_slots=0),
        Manifest.load(lar_pb_shards).stats["pooled"],
        (45, 16, 9),
    )
    with pytest.raises(ValueError, match="spare"):
        run_adaptation(
            cfg, AdaptRequest(str(full.save(tmp_path / "full")), "lar-pb", lar_pb_shards), tmp_path / "x"
        )
    assert [m.name for m in registry.list_models()] == ["caloforge-base"]


@pytest.mark.slow
def test_a_failed_run_resumes_and_registers_exactly_once(
    registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    request = AdaptRequest(str(base_bundle), "lar-pb", lar_pb_shards)
    cfg = tiny_config(fault_injection_step=3, strategy=StrategyConfig(kind="lora"))
    with pytest.raises(RuntimeError, match="fault injection"):
        run_adaptation(cfg, request, tmp_path / "run")
    assert registry.list_models() == []
    with pytest.raises(ValueError, match="pass --resume"):
        run_adaptation(cfg, request, tmp_path / "run")
    resumed = run_adaptation(cfg, request, tmp_path / "run", resume=True)
    assert resumed.steps == 4 and resumed.registered["version"] == 1
    assert (resumed.adapter_dir / "adapter_config.json").is_file()
    log = (tmp_path / "run" / "adapt.log").read_text()
    assert "resumed from" in log and "step_00000002" in log
    again = run_adaptation(cfg, request, tmp_path / "run", resume=True)
    assert again.registered["version"] == 1 and len(registry.versions("caloforge-lar-pb")) == 1
    assert again.parent_uri == str(base_bundle.resolve()) and again.parent_version is None
    with pytest.raises(ValueError, match="another request or config"):
        run_adaptation(
            tiny_config(strategy=StrategyConfig(kind="bias")), request, tmp_path / "run", resume=True
        )


@pytest.mark.slow
def test_a_detector_with_another_mesh_adapts(base_bundle, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    spec = yaml.safe_load((DETECTORS_DIR / "lar-pb.yaml").read_text())
    spec["name"] = "my-calo"
    spec["mesh"] = {"n_z": 18, "n_phi": 8, "r_edges_mm": [0.0, 5.0, 12.0, 20.0, 40.0, 70.0, 100.0]}
    path = tmp_path / "my-calo.yaml"
    path.write_text(yaml.safe_dump(spec))
    shards = make_shards(tmp_path / "data", (str(path),), 90, seed=8)
    cfg = tiny_config(register=RegisterConfig(enabled=False), strategy=StrategyConfig(kind="full"))
    request = AdaptRequest(str(base_bundle), str(path), shards)
    # 'embedding' cannot move the patch layers: the plan says so before anything trains
    embedding = tiny_config(register=RegisterConfig(enabled=False), strategy=StrategyConfig(kind="embedding"))
    plan = plan_adaptation(embedding, request, tmp_path / "plan-embedding")
    assert plan.rebuild_mesh and len(plan.warnings) == 1
    assert "strategy 'embedding' on another mesh" in plan.describe()["warnings"]
    assert plan.describe()["positions"].startswith("my-calo (")
    assert {d.name for d in plan.source_detectors} == set(ShowerModel.load(base_bundle).vocab.detectors)
    with_mesh = StrategyConfig(kind="embedding", mesh_layers=True)
    embedding_mesh = tiny_config(register=RegisterConfig(enabled=False), strategy=with_mesh)
    assert plan_adaptation(embedding_mesh, request, tmp_path / "plan-mesh").warnings == ()
    result = run_adaptation(cfg, request, tmp_path / "run")
    assert plan_adaptation(cfg, request, tmp_path / "plan-full").warnings == ()
    model = ShowerModel.load(result.model_dir)
    assert model.mesh_shape == (18, 8, 6) and model.mesh.r_edges_mm == (
        0.0,
        5.0,
        12.0,
        20.0,
        40.0,
        70.0,
        100.0,
    )
    assert model.lineage.target_detector == "my-calo" and result.registered is None
    # placed in the frame of the base's (built-in) detectors: 18 layers of lar-pb's stack are 8.3 X0, with
    # the layer pitch of 45 layers over 20.7 X0, shallower than the base's detectors (22-25.8 X0): the
    # shallowest frame, so the tokens sit a little closer together than the base's first 18 layers
    base = ShowerModel.load(base_bundle)
    sources = [load_detector(d) for d in base.vocab.detectors]
    depths = [d.depth_x0 for d in sources]
    target = load_detector(path)
    assert target.depth_x0 * 45 / 18 < min(depths)
    assert model.config.position_frame[0] == pytest.approx(min(depths))
    assert model.config.position_extent[0] == pytest.approx(target.depth_x0 / min(depths))
    assert 0.3 < model.config.position_extent[0] < 18 / 45
    radius = np.clip(target.radius_rm, *[f(d.radius_rm for d in sources) for f in (min, max)])
    assert model.config.position_extent[1] == pytest.approx(target.radius_rm / radius)
    showers = model.generate(Conditions.make([1e4, 2e4], 1.5, 0.0, 11, "my-calo"), seed=1)
    assert showers.shape == (2, 18, 8, 6)


@pytest.mark.slow
def test_cli_adapts_registers_and_the_result_pulls_as_onnx(
    registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    _register_base(registry, base_bundle)
    config = tmp_path / "adapt.yaml"
    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "adapt" / "embedding.yaml").read_text())
    cfg["loop"].update(steps=4, batch_size=8, checkpoint_every=2, log_every=2)
    cfg["eval"]["n_showers"] = 30
    cfg["eval"]["metrics"].update(
        classifier={"hidden": 16, "n_layers": 1, "epochs": 2, "batch_size": 32, "n_seeds": 1},
        fpd={"min_samples": 10, "max_samples": 15, "num_points": 2, "num_batches": 2},
        kpd={"batch_size": 10, "num_batches": 2},
    )
    cfg["progress"] = False
    config.write_text(yaml.safe_dump(cfg))
    args = [
        "adapt",
        "--base",
        "caloforge-base@champion",
        "--detector",
        "lar-pb",
        "--data",
        str(lar_pb_shards),
    ]
    assert main([*args, "--config", str(config), "--dry-run"]) == 0
    assert registry.list_models()[0].name == "caloforge-base" and len(registry.list_models()) == 1
    assert (
        main([*args, "--config", str(config), "--run-dir", str(tmp_path / "run"), "--strategy", "bias"]) == 0
    )
    assert registry.get("caloforge-lar-pb", version=1).tags["caloforge.adaptation_method"] == "bias"
    out = tmp_path / "onnx"
    assert (
        main(
            [
                "registry",
                "pull",
                "caloforge-lar-pb",
                "--alias",
                "candidate",
                "--format",
                "onnx",
                "--out",
                str(out),
                "--steps",
                "1",
                "--exporter",
                "legacy",
                "--gate-config",
                str(Path(__file__).parents[2] / "configs" / "export" / "fidelity_gate_ci.yaml"),
            ]
        )
        == 0
    )
    assert any(p.suffix == ".onnx" for p in out.iterdir())
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["kind"] == "adapted" and "optimized" in json.dumps(card["exports"])
