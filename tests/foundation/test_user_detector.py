"""A user-defined detector end to end through the CLI: a detector YAML (written here, with a 30 × 24 × 12
mesh unlike the built-ins' 45 × 16 × 9) → ``caloforge data simulate`` → ``caloforge data shard`` (the
manifest records the full spec) → ``caloforge train`` (the model's mesh is the YAML's geometry) →
``caloforge evaluate`` (geometry and threshold from the manifest's spec) → the model card of
``caloforge export``; and ``rebuild_for_mesh`` moving the trained model back to a built-in mesh."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from caloforge.cli import main
from caloforge.config import dump_yaml, to_dict
from caloforge.datasets.formats import native
from caloforge.datasets.shards import Manifest
from caloforge.datasets.simulator import simulate_dataset
from caloforge.datasets.stats import compute_stats
from caloforge.platform.geometry import DetectorSpec, Layer, MeshSpec, load_detector
from caloforge.platform.shower_model import ShowerModel
from caloforge.platform.transfer import rebuild_for_mesh
from caloforge.registry.bundle import inspect_bundle
from caloforge.registry.card import ModelCard

R_EDGES = (0.0, 2.0, 4.0, 6.0, 9.0, 12.0, 16.0, 20.0, 25.0, 31.0, 38.0, 46.0, 55.0)  # 12 non-uniform bins
EVAL_FAST = [
    "--set", "metrics=[sep_power,response]",
    "--set", "floor_metrics=[sep_power]",
    "--set", "plots.enabled=false",
    "--set", "groups.enabled=false",
]  # fmt: skip


def _detector_yaml(directory: Path) -> Path:
    spec = DetectorSpec(
        name="my-calo",
        description="a user's W/Si ECAL with a 30 x 24 x 12 mesh",
        absorber=Layer("W", 3.5),
        active=Layer("Si", 0.5),
        mesh=MeshSpec(30, 24, R_EDGES),
        sampling_term_sqrt_gev=0.17,
        energy_range_gev=(2.0, 50.0),
        particles=("e-", "gamma"),
    )
    path = directory / "my-calo.yaml"
    path.write_text(dump_yaml(spec))
    return path


def _train_config(directory: Path, shards: Path) -> Path:
    config = {
        "name": "my-calo",
        "data": {"shards": str(shards), "stream": {"shuffle_buffer": 8}, "spare_detector_slots": 1},
        "model": {
            "backbone": "debug",
            "patch_size": [5, 4, 3],  # 6 × 6 × 4 = 144 tokens on 30 × 24 × 12
            "parametrisation": "flow_matching",
            "sampler": "euler",
            "num_steps": 2,
        },
        "loop": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "seed": 0},
        "eval": {"every": 0},
        "device": "cpu",
        "progress": False,
        "torch_threads": 1,
    }
    path = directory / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_user_detector_yaml_through_simulate_shard_train_evaluate_and_card(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    det_yaml = _detector_yaml(tmp_path)
    spec = load_detector(det_yaml)
    raw = tmp_path / "raw"
    simulate = ["data", "simulate", "--detector", str(det_yaml), "--n", "40", "--energy-gev", "5:20"]
    assert main([*simulate, "--seed", "3", "--out", str(raw), "--no-progress"]) == 0
    assert native.read_detector_specs(raw / "my-calo.h5") == {"my-calo": spec}

    shards = tmp_path / "shards"
    assert main(["data", "shard", str(raw / "my-calo.h5"), "--out", str(shards)]) == 0
    manifest = Manifest.load(shards)
    assert manifest.data["detectors"]["my-calo"] == to_dict(spec)  # the full spec, not only the mesh shape
    assert manifest.detector_spec("my-calo") == spec and manifest.model_mesh() == spec.geometry

    run = tmp_path / "run"
    assert main(["train", "--config", str(_train_config(tmp_path, shards)), "--run-dir", str(run)]) == 0
    model = ShowerModel.load(run / "model")
    assert model.mesh == spec.geometry and model.mesh.r_edges_mm == R_EDGES  # not a unit mesh
    assert model.vocab.detectors == ("my-calo",)

    report_dir = tmp_path / "eval"
    evaluate = ["evaluate", "--model", str(run / "model"), "--reference", str(shards), "--split", "train"]
    assert main([*evaluate, "--n", "16", "--out", str(report_dir), *EVAL_FAST]) == 0
    info = json.loads((report_dir / "report.json").read_text())["info"]
    assert info["mesh_shape"] == [30, 24, 12] and info["detectors"] == ["my-calo"]
    # the threshold of the YAML's detector (readout threshold / its sampling fraction), not CaloChallenge's
    expected = spec.readout_threshold_mev / spec.sampling_fraction
    assert info["voxel_threshold_mev"]["my-calo"] == pytest.approx(expected)
    assert expected != pytest.approx(0.5e-3 / 0.033)

    exported = tmp_path / "export"
    assert main(["export", "--model", str(run / "model"), "--format", "torch", "--out", str(exported)]) == 0
    card = ModelCard.load(exported / "model_card.json")
    assert card.architecture["mesh_shape"] == [30, 24, 12] and card.architecture["r_edges_mm"] == list(
        R_EDGES
    )
    assert card.valid_ranges.source == "lineage" and card.valid_ranges.detectors == ("my-calo",)
    assert card.valid_ranges.particles is not None and set(card.valid_ranges.particles) <= {"e-", "gamma"}
    lo, hi = card.valid_ranges.energy_mev
    assert 5e3 <= lo < hi <= 20e3
    capsys.readouterr()

    # the trained backbone moves to a built-in detector's mesh, placed at its physical depth and radius in
    # the user detector's frame (the layer-energy head is resampled along that depth)
    siw = load_detector("par04-siw")
    data = simulate_dataset(siw, ["e-"], 16, (5.0, 20.0), True, (90.0, 90.0), seed=4)
    stats = compute_stats(data.showers_NZPR, data.conditions.energy_mev, data.conditions.theta_rad)
    vocab = model.vocab.with_detector("par04-siw")
    moved, report = rebuild_for_mesh(
        model, siw.geometry, stats, vocab=vocab, detector=siw, source_detectors=[spec]
    )
    assert moved.mesh == siw.geometry and report.detector_rows["par04-siw"] == "mean of copied rows"
    assert report.reinitialised == {}
    assert set(report.resampled) == {
        "energy_head.fc_in.weight",
        "energy_head.fc_out.weight",
        "energy_head.fc_out.bias",
    }
    assert moved.config.position_extent == pytest.approx(
        (siw.depth_x0 / spec.depth_x0, siw.radius_rm / spec.radius_rm)
    )
    assert report.positions.startswith("par04-siw (")
    # the bundle's summary (model cards, MLflow metadata) says where the mesh sits
    info = inspect_bundle(moved.save(tmp_path / "moved"))
    assert info.summary()["position_extent"] == pytest.approx(list(moved.config.position_extent))
    assert info.summary()["position_frame"] == pytest.approx([spec.depth_x0, spec.radius_rm])
    out = moved.generate(data.conditions.subset(slice(0, 2)), num_steps=2, seed=1)
    assert out.shape == (2, 45, 16, 9) and np.isfinite(out).all()
