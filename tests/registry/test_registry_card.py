"""Model cards and the trained-range guard."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest

from caloforge.config import to_dict
from caloforge.platform.conditioning import Conditions
from caloforge.platform.lineage import Lineage, TrainedRanges
from caloforge.registry.bundle import inspect_bundle
from caloforge.registry.card import (
    CARD_VERSION,
    ConditionRangeWarning,
    ModelCard,
    ValidRanges,
    build_card,
    ranges_from_lineage,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RANGES = ValidRanges(("lar-pb",), energy_mev=(1e3, 1e5), theta_rad=(0.2, 1.0), particles=("e-", "pi+"))


def test_inside_ranges_is_silent() -> None:
    cond = Conditions.make([1e3, 1e5], [0.2, 1.0], 0.0, [11, 211], "lar-pb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RANGES.check(cond, strict=True) == []


def test_outside_ranges_warns_names_everything_and_strict_refuses() -> None:
    cond = Conditions.make([500.0, 2e4, 3e5], [0.5, 1.2, 0.5], 0.0, [11, 2112, 22], "lar-pb")
    with pytest.warns(ConditionRangeWarning):
        problems = RANGES.check(cond)
    assert problems == [
        "energy_mev: 2 of 3 value(s) outside the trained range [1000, 100000] (given min 500, max 300000)",
        "theta_rad: 1 of 3 value(s) outside the trained range [0.2, 1] (given min 0.5, max 1.2)",
        "particles ['gamma', 'n'] were not in training (trained: ['e-', 'pi+'])",
    ]
    with pytest.raises(ValueError, match=r"strict mode\): energy_mev: 2 of 3"):
        RANGES.check(cond, strict=True)
    with pytest.raises(ValueError, match=r"unknown detector\(s\) \['pbwo4'\]"):
        RANGES.check(Conditions.make([1e4], 0.5, 0.0, 11, "pbwo4"))


def test_ranges_from_lineage_then_detector_configs_then_unrecorded() -> None:
    lineage = Lineage(trained=TrainedRanges(energy_mev=(2e3, 5e5), particles=("11", "pi-", "gamma")))
    r = ranges_from_lineage(lineage, ("lar-pb",))
    assert (r.source, r.detectors, r.energy_mev, r.theta_rad, r.particles) == (
        "lineage",
        ("lar-pb",),
        (2e3, 5e5),
        None,  # not recorded: not checked
        ("e-", "pi-", "gamma"),
    )
    r = ranges_from_lineage(Lineage(extra={"run_dir": "/x"}), ("lar-pb", "pbwo4"))  # built-in detector YAMLs
    assert r.source == "detector-configs" and r.energy_mev == (1e3, 1e6)
    assert r.particles is not None and "pi+" in r.particles
    r = ranges_from_lineage(Lineage(), ("my-private-detector",))
    assert (r.source, r.energy_mev, r.particles) == ("unrecorded", None, None)


def test_card_from_typed_lineage(adapted_bundle_dir: Path) -> None:
    info = inspect_bundle(adapted_bundle_dir)
    assert info.kind == "distilled" and isinstance(info.lineage, Lineage)
    assert info.summary()["pos_max_freq"] == 8.0  # today's default
    assert info.summary()["pos_max_freq_r"] == 3.0  # the radius's own default (schema 5)
    assert info.lineage_tags() == {
        "parent_uri": "models:/caloforge-base/1",
        "parent_version": "1",  # from the registry URI
        "adaptation_method": "consistency",
        "target_detector": "lar-pb",
        "dataset_manifest_hash": "sha256:" + "ab" * 8,
    }
    card = build_card(info).to_dict()
    assert card["model"]["kind"] == "distilled"
    lineage = card["lineage"]
    assert (lineage["kind"], lineage["strategy"], lineage["objective"]) == ("distilled", "consistency", "edm")
    assert lineage["trained"] == {
        "energy_mev": [1e3, 1e5],
        "theta_rad": [0.2, 1.0],
        "particles": ["e-", "gamma", "pi+"],
        "detectors": ["lar-pb", "pbwo4"],
    }
    assert card["valid_ranges"] == {
        "energy_mev": [1e3, 1e5],
        "theta_rad": [0.2, 1.0],
        "particles": ["e-", "gamma", "pi+"],
        "detectors": ["lar-pb", "pbwo4"],
        "source": "lineage",
    }


def test_card_from_the_stored_v2_bundle_reads_its_migrated_ranges() -> None:
    """The schema-2 asset (tests/assets/make_bundle_v2_debug.py) kept everything as lineage.extra strings."""
    info = inspect_bundle(ASSETS / "bundle_v2_debug")
    assert info.schema_version == 2 and info.kind == "adapted"
    assert info.summary()["pos_max_freq"] == 32.0  # what bundles before schema 4 were trained with
    assert info.summary()["pos_max_freq_r"] == 32.0
    assert info.extra == {"run_dir": "/runs/bundle-v2-debug", "steps": "10"}
    assert info.lineage_tags() == {
        "parent_uri": "models:/caloforge-base/1",
        "parent_version": "1",
        "adaptation_method": "full",
        "target_detector": "det-a",
        "dataset_manifest_hash": "33792a3d7968c133fd3ac054d8894ee456f1fa11a834d61a41d96634e1a082ba",
    }
    card = build_card(info)
    assert card.valid_ranges == ValidRanges(
        ("det-a", "det-b"),
        energy_mev=(1135.3288378048267, 91511.2544479989),
        theta_rad=(0.7142178854745943, 2.397547340871947),
        particles=("e-", "gamma", "pi+"),
        source="lineage",
    )
    assert card.model["kind"] == "adapted"
    assert card.lineage == to_dict(info.lineage) and card.lineage["parent_uri"] == "models:/caloforge-base/1"
    assert "parent" not in card.lineage and "energy_mev_min" not in card.lineage["extra"]
    with pytest.warns(ConditionRangeWarning, match=r"energy_mev: 1 of 2 value\(s\) outside"):
        card.valid_ranges.check(Conditions.make([2e3, 2e5], 1.0, 0.0, 11, "det-a"))


def test_card_roundtrip_and_version_check(bundle_dir: Path, tmp_path: Path) -> None:
    card = build_card(inspect_bundle(bundle_dir), metrics={"fpd": 3.0})
    path = card.write(tmp_path / "card.json")
    loaded = ModelCard.load(path)
    assert loaded.to_dict() == card.to_dict()
    assert loaded.metrics == {"fpd": 3.0}
    assert loaded.architecture["mesh_shape"] == [6, 4, 3]
    assert loaded.valid_ranges.source == "lineage"
    data = json.loads(path.read_text())
    data["card_version"] = CARD_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="newer than this caloforge supports"):
        ModelCard.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt model card JSON"):
        ModelCard.load(path)


def test_export_module_does_not_import_mlflow() -> None:
    src = Path(__file__).resolve().parents[2] / "caloforge" / "registry"
    for name in (
        "export.py",
        "onnx_graph.py",
        "onnx_runtime.py",
        "parity.py",
        "card.py",
        "bundle.py",
        "versions.py",
    ):
        tree = ast.parse((src / name).read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        assert "mlflow" not in imported, name
        assert "caloforge.registry.store" not in (src / name).read_text(), name
