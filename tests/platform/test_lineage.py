"""Typed lineage: validation, and bundles of schema 1/2 (a STORED v2 bundle) migrated to schema 3 on load.

``tests/assets/bundle_v2_debug`` was written by the schema-2 code (commit 3ea94eb) with
``tests/assets/make_bundle_v2_debug.py`` (see its docstring): a debug-backbone model on a 6×4×3 mesh whose
lineage holds ``parent`` and, as ``extra`` strings, the trained ranges exactly as ``trained_ranges`` wrote
them plus ``kind``, ``parent_version``, ``adaptation_method``, ``target_detector`` and run info.
``bundle_v2_debug_expected.npz`` holds showers it generated for fixed conditions and seeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from caloforge.config import to_dict
from caloforge.platform.checkpoint import SCHEMA_VERSION, load_bundle, read_bundle_config, save_bundle
from caloforge.platform.conditioning import Conditions
from caloforge.platform.lineage import Lineage, TrainedRanges

ASSETS = Path(__file__).resolve().parents[1] / "assets"
V2 = ASSETS / "bundle_v2_debug"
# The typed lineage the stored v2 bundle's strings migrate to (numbers: the repr strings it holds).
V2_LINEAGE = Lineage(
    kind="adapted",
    parent_uri="models:/caloforge-base/1",
    parent_version="1",
    strategy="full",
    objective="flow_matching",  # from the v2 model_config: the objective it named trained the weights
    target_detector="det-a",
    dataset_manifest_hash="33792a3d7968c133fd3ac054d8894ee456f1fa11a834d61a41d96634e1a082ba",
    trained=TrainedRanges(
        energy_mev=(1135.3288378048267, 91511.2544479989),
        theta_rad=(0.7142178854745943, 2.397547340871947),
        particles=("e-", "gamma", "pi+"),
        detectors=None,  # not recorded before schema 3
    ),
    created_utc="2025-06-01T12:00:00+00:00",
    extra={"run_dir": "/runs/bundle-v2-debug", "steps": "10"},
)


def _copy_with_lineage(tmp_path: Path, name: str, lineage: dict, schema_version: int = 2) -> Path:
    """A copy of the stored v2 bundle with an edited config.json lineage (weights untouched)."""
    dst = shutil.copytree(V2, tmp_path / name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(schema_version=schema_version, lineage=lineage)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_the_stored_v2_bundle_is_still_schema_2() -> None:
    data = read_bundle_config(V2)
    assert data["schema_version"] == 2 and SCHEMA_VERSION == 9
    assert data["lineage"]["parent"] == "models:/caloforge-base/1"
    assert data["lineage"]["extra"]["particles"] == "e-,gamma,pi+"


def test_stored_v2_bundle_loads_with_typed_lineage_and_identical_showers() -> None:
    model = load_bundle(V2)
    assert model.lineage == V2_LINEAGE
    expected = np.load(ASSETS / "bundle_v2_debug_expected.npz")
    cond = Conditions(*(expected[f] for f in Conditions.fields()))
    out = model.generate(cond, seeds=expected["seeds"], batch_size=3)
    # float32 GEMM rounding differs between CPUs; wrong or misloaded weights differ by O(1)
    np.testing.assert_allclose(out, expected["showers"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("schema", "generated"),
    [(7, "voxel_model"), (8, "hadron_tracks")],  # what schemas 6-7 and 8 generated
)
def test_a_bundle_that_does_not_name_its_empty_layer_mode_keeps_its_schema_s(
    tmp_path: Path, schema: int, generated: str
) -> None:
    raw = json.loads((V2 / "config.json").read_text())
    path = _copy_with_lineage(tmp_path, f"v{schema}", raw["lineage"], schema_version=schema)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_config"]["layer_energy"] = {
        k: v for k, v in cfg["model_config"].get("layer_energy", {}).items() if k != "empty_layers"
    }
    cfg["lineage"] = to_dict(V2_LINEAGE)
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_bundle(path).config.layer_energy.empty_layers == generated


def test_v1_lineage_migrates_the_same_way(tmp_path: Path) -> None:
    raw = json.loads((V2 / "config.json").read_text())["lineage"]
    v1 = _copy_with_lineage(tmp_path, "v1", raw, schema_version=1)
    assert load_bundle(v1).lineage == V2_LINEAGE


def test_migrated_bundle_round_trips_as_today_s_schema(tmp_path: Path) -> None:
    model = load_bundle(V2)
    assert model.config.pos_max_freq == 32.0  # what it was trained with (the default before schema 4)
    assert model.config.pos_max_freq_r == 32.0  # the radius followed the depth before schema 5
    assert model.config.layer_energy.empty_layers == "either"  # the head may empty layers before schema 6
    assert model.config.layer_energy.condition_voxels is False  # no layer-conditioned voxel model before 7
    path = save_bundle(model, tmp_path / "v9")
    data = read_bundle_config(path)
    assert data["schema_version"] == SCHEMA_VERSION and data["model_config"]["pos_max_freq"] == 32.0
    assert data["model_config"]["pos_max_freq_r"] == 32.0
    assert data["model_config"]["layer_energy"]["empty_layers"] == "either"
    assert data["model_config"]["layer_energy"]["condition_voxels"] is False
    assert data["lineage"] == to_dict(V2_LINEAGE)
    assert data["lineage"]["trained"]["energy_mev"] == [1135.3288378048267, 91511.2544479989]
    assert "parent" not in data["lineage"] and "energy_mev_min" not in data["lineage"]["extra"]
    assert load_bundle(path).lineage == V2_LINEAGE


def test_legacy_defaults_partial_ranges_and_pdg_ids(tmp_path: Path) -> None:
    base = _copy_with_lineage(
        tmp_path,
        "base",
        {
            "parent": None,
            "extra": {"energy_mev_min": "2000", "energy_mev_max": "5e5", "particles": "11, pi-"},
        },
    )
    assert load_bundle(base).lineage == Lineage(
        kind="base",
        objective="flow_matching",  # the objective the v2 model_config named
        trained=TrainedRanges(energy_mev=(2e3, 5e5), particles=("e-", "pi-")),
        extra={},
    )
    child = _copy_with_lineage(
        tmp_path, "child", {"parent": "/models/x", "extra": {"parent_version": "", "run": "r"}}
    )
    assert load_bundle(child).lineage == Lineage(
        kind="adapted", parent_uri="/models/x", objective="flow_matching", extra={"run": "r"}
    )


@pytest.mark.parametrize(
    ("lineage", "message"),
    [
        ({"extra": {"energy_mev_min": "10"}}, "only one bound of energy_mev"),
        ({"extra": {"theta_rad_min": "a", "theta_rad_max": "1"}}, "theta_rad_min/_max must be numbers"),
        ({"extra": {"energy_mev_min": "10", "energy_mev_max": "1"}}, r"trained\.energy_mev: invalid range"),
        ({"extra": {"particles": "e-,muon"}}, r"trained\.particles: unknown particle 'muon'"),
        ({"extra": {"kind": "fine-tuned"}}, r"kind: 'fine-tuned' is not one of"),
        ({"surprise": 1}, r"lineage: surprise: unknown key"),
    ],
)
def test_bad_legacy_lineage_is_a_value_error_naming_the_file(
    tmp_path: Path, lineage: dict, message: str
) -> None:
    bad = _copy_with_lineage(tmp_path, "bad", lineage)
    with pytest.raises(ValueError, match=message) as info:
        load_bundle(bad)
    assert str(bad / "config.json") in str(info.value)


def test_schema_3_does_not_take_the_old_layout(tmp_path: Path) -> None:
    raw = json.loads((V2 / "config.json").read_text())["lineage"]
    old_as_v3 = _copy_with_lineage(tmp_path, "v3", raw, schema_version=3)
    with pytest.raises(ValueError, match=r"lineage: parent: unknown key"):
        load_bundle(old_as_v3)


def test_trained_ranges_validate_and_normalise() -> None:
    t = TrainedRanges(energy_mev=[1e3, 2e3], particles=["11", 22, "pi+"], detectors=["det-a"])
    assert t == TrainedRanges(energy_mev=(1e3, 2e3), particles=("e-", "gamma", "pi+"), detectors=("det-a",))
    assert isinstance(t.energy_mev, tuple)
    for kwargs, message in [
        ({}, "trained: nothing recorded"),
        ({"energy_mev": (2.0, 1.0)}, r"trained\.energy_mev: invalid range"),
        ({"theta_rad": (0.0, float("nan"))}, r"trained\.theta_rad: invalid range"),
        ({"theta_rad": (0.1,)}, r"trained\.theta_rad: expected \(lo, hi\)"),
        ({"energy_mev": ("1", "2")}, r"trained\.energy_mev: bounds must be numbers"),
        ({"particles": ()}, r"trained\.particles: empty"),
        ({"particles": "e-"}, r"trained\.particles: expected names or PDG ids|expected a tuple"),
        ({"particles": ("e-", "11")}, r"trained\.particles: duplicate names"),
        ({"detectors": ("det-a", " det-b")}, r"trained\.detectors: names must be non-empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainedRanges(**kwargs)


def test_lineage_validates_every_field() -> None:
    ok = Lineage(
        kind="distilled", parent_uri="models:/caloforge-base/2", parent_version="2", strategy="consistency"
    )
    assert ok.kind == "distilled" and ok.trained is None and ok.extra == {}
    for kwargs, message in [
        ({"kind": "tuned"}, r"lineage\.kind: 'tuned' is not one of \['base', 'adapted', 'distilled'\]"),
        ({"parent_version": "3"}, r"lineage\.parent_version: '3' given without a parent_uri"),
        ({"strategy": ""}, r"lineage\.strategy: expected a non-empty string"),
        ({"objective": 3}, r"lineage\.objective: expected a non-empty string"),
        ({"created_utc": "yesterday"}, r"lineage\.created_utc: not an ISO-8601 time"),
        ({"trained": {"energy_mev": (1, 2)}}, r"lineage\.trained: expected TrainedRanges"),
        ({"extra": {"steps": 3}}, r"lineage\.extra: keys and values must be strings"),
        ({"extra": {"kind": "base"}}, r"lineage\.extra: \['kind'\] are typed fields now"),
        (
            {"extra": {"energy_mev_min": "1"}},
            r"typed fields now \(\{'energy_mev_min': 'lineage\.trained'\}\)",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            Lineage(**kwargs)


def test_shower_model_reexports_the_one_lineage_class() -> None:
    from caloforge.platform import shower_model

    assert shower_model.Lineage is Lineage
