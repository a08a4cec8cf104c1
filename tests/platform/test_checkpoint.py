"""Bundles: save → load in a fresh process → identical showers; clear errors for bad bundles."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

import caloforge
from caloforge.platform.checkpoint import SCHEMA_VERSION, load_bundle, read_bundle_config, save_bundle
from caloforge.platform.lineage import Lineage, TrainedRanges
from caloforge.platform.shower_model import ShowerModel

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from caloforge.platform.conditioning import Conditions
    from caloforge.platform.shower_model import ShowerModel
    bundle, cond_path, out_path = sys.argv[1:4]
    c = np.load(cond_path)
    cond = Conditions(c["energy_mev"], c["theta_rad"], c["phi_rad"], c["pdg"], c["detector"])
    model = ShowerModel.load(bundle)
    assert "caloforge.training" not in sys.modules and "caloforge.datasets" not in sys.modules
    np.save(out_path, model.generate(cond, seeds=c["seeds"], batch_size=3))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[ShowerModel, Path]:
    model = make_model("edm", transform="layer_log_standardize", num_steps=4, sampler="heun")
    lineage = Lineage(
        kind="adapted",
        parent_uri="registry://base/3",
        strategy="full",
        objective="edm",
        dataset_manifest_hash="abc123",
        trained=TrainedRanges(energy_mev=(1e3, 1e5), particles=("e-",), detectors=("det_a",)),
        extra={"run": "test"},
    )
    path = save_bundle(model, tmp_path_factory.mktemp("bundles") / "model", lineage=lineage)
    return model, path


def test_fresh_process_loads_the_bundle_and_generates_identical_showers(saved, tmp_path: Path) -> None:
    model, path = saved
    _, cond = toy_showers(5, SMALL_MESH, seed=30)
    seeds = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    np.savez(tmp_path / "cond.npz", seeds=seeds, **{f: getattr(cond, f) for f in cond.fields()})
    expected = model.generate(cond, seeds=seeds, batch_size=3)
    subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(tmp_path / "cond.npz"), str(tmp_path / "out.npy")],
        check=True,
        cwd=REPO,
        timeout=120,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_bundle_contents(saved) -> None:
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    data = read_bundle_config(path)
    assert data["schema_version"] == SCHEMA_VERSION and data["caloforge_version"] == caloforge.__version__
    assert data["vocab"] == {"detectors": ["det_a", "det_b"], "n_detector_slots": 4}
    assert data["mesh"] == {"n_z": 12, "n_phi": 8, "r_edges_mm": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    assert data["model_config"]["parametrisation"] == "edm" and data["model_config"]["backbone"] == "debug"
    lineage = data["lineage"]
    assert lineage["created_utc"].endswith("+00:00")
    assert lineage == {
        "kind": "adapted",
        "parent_uri": "registry://base/3",
        "parent_version": None,
        "strategy": "full",
        "objective": "edm",
        "target_detector": None,
        "dataset_manifest_hash": "abc123",
        "trained": {"energy_mev": [1e3, 1e5], "theta_rad": None, "particles": ["e-"], "detectors": ["det_a"]},
        "created_utc": lineage["created_utc"],
        "extra": {"run": "test"},
    }
    # safetensors, not a pickle: 8-byte little-endian header size, then a JSON header naming every tensor.
    raw = (path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    loaded = load_bundle(path)
    assert loaded.lineage == model.lineage and not loaded.training
    assert loaded.lineage.trained == TrainedRanges(
        energy_mev=(1e3, 1e5), particles=("e-",), detectors=("det_a",)
    )
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert bool(loaded.transform.fitted)


def test_bundle_keeps_the_residual_stream_choice(tmp_path: Path) -> None:
    model = make_model("flow_matching", residual_stream="autocast")
    loaded = load_bundle(save_bundle(model, tmp_path / "model"))
    assert loaded.config.residual_stream == "autocast" and loaded.network.autocast_stream is True


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_bundles_are_value_errors(saved, tmp_path: Path) -> None:
    _, path = saved
    with pytest.raises(ValueError, match="bundle directory not found"):
        load_bundle(tmp_path / "nothing")

    newer = _copy(path, tmp_path / "newer")
    cfg = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**cfg, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match=f"schema_version {SCHEMA_VERSION + 1} is newer"):
        load_bundle(newer)

    no_weights = _copy(path, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: missing weights file"):
        load_bundle(no_weights)

    corrupt = _copy(path, tmp_path / "corrupt")
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt \(sha256"):
        load_bundle(corrupt)

    truncated = _copy(path, tmp_path / "truncated")
    (truncated / "config.json").write_text((path / "config.json").read_text()[:40])
    with pytest.raises(ValueError, match=r"config\.json: corrupt JSON"):
        load_bundle(truncated)

    other = _copy(path, tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**cfg, "format": "something.else"}))
    with pytest.raises(ValueError, match=r"format 'something\.else' is not 'caloforge\.shower_model'"):
        load_bundle(other)

    deeper = _copy(path, tmp_path / "deeper")
    changed = {**cfg, "model_config": {**cfg["model_config"], "backbone": "S"}}
    (deeper / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"(tensors do not fit the model)|(state dict mismatch)"):
        load_bundle(deeper)


def test_save_is_atomic_and_refuses_to_clobber(tmp_path: Path) -> None:
    model = make_model("flow_matching")
    target = tmp_path / "bundle"
    model.save(target)
    first = (target / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not empty \\(pass overwrite=True"):
        model.save(target)
    with torch.no_grad():
        model.network.final_layer.linear.bias.add_(1.0)
    model.save(target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "temporary directories left behind"
    reloaded = ShowerModel.load(target)
    torch.testing.assert_close(
        reloaded.network.final_layer.linear.bias, model.network.final_layer.linear.bias
    )
    with pytest.raises(ValueError, match="expects a ShowerModel"):
        save_bundle(torch.nn.Linear(1, 1), tmp_path / "x")  # type: ignore[arg-type]


def test_weights_file_must_stay_inside_the_bundle(saved, tmp_path: Path) -> None:
    """``weights.file`` is a file name of the bundle: a path out of it, or a link out of it, is refused
    before anything is read (issue 15)."""
    _, path = saved
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((path / "model.safetensors").read_bytes())
    for name in ("../elsewhere.safetensors", str(outside), "sub/model.safetensors", ".."):
        bundle = _copy(path, tmp_path / f"b{abs(hash(name))}")
        cfg = json.loads((bundle / "config.json").read_text())
        cfg["weights"]["file"] = name
        (bundle / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=r"weights\.file .* must be a file name inside the bundle"):
            load_bundle(bundle)
    linked = _copy(path, tmp_path / "linked")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"leads outside the bundle"):
        load_bundle(linked)
