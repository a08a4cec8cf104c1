"""Model cards and the trained-range guard."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest

from caloforge.platform.conditioning import Conditions
from caloforge.registry.bundle import inspect_bundle
from caloforge.registry.card import (
    CARD_VERSION,
    ConditionRangeWarning,
    ModelCard,
    ValidRanges,
    build_card,
    ranges_from_lineage,
)

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
    lineage = {"extra": {"energy_mev_min": "2000", "energy_mev_max": "5e5", "particles": "11, pi-,gamma"}}
    r = ranges_from_lineage(lineage, ("lar-pb",))
    assert (r.source, r.energy_mev, r.theta_rad, r.particles) == (
        "lineage",
        (2e3, 5e5),
        None,
        ("e-", "pi-", "gamma"),
    )
    r = ranges_from_lineage({"extra": {}}, ("lar-pb", "pbwo4"))  # built-in detector YAMLs
    assert r.source == "detector-configs" and r.energy_mev == (1e3, 1e6)
    assert r.particles is not None and "pi+" in r.particles
    r = ranges_from_lineage({}, ("my-private-detector",))
    assert (r.source, r.energy_mev, r.particles) == ("unrecorded", None, None)
    with pytest.raises(ValueError, match="invalid range"):
        ranges_from_lineage({"extra": {"energy_mev_min": "10", "energy_mev_max": "1"}}, ("lar-pb",))


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
