"""ONNX export (unrolled sampler + layer-energy head, dynamic batch) checked against PyTorch with real
onnxruntime; torch bundle export; model cards; the names of the ONNX contract."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from registry_helpers import DETECTORS, MESH, rewrite_config, tiny_model

from caloforge.platform.conditioning import Conditions
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.shower_model import ShowerModel, derive_seeds
from caloforge.registry import export as export_module
from caloforge.registry.bundle import bundle_files
from caloforge.registry.card import CARD_FILE, ConditionRangeWarning, ModelCard
from caloforge.registry.export import export_bundle, export_onnx, export_torch
from caloforge.registry.fidelity import small_gate
from caloforge.registry.onnx_graph import (
    ONNX_OUTPUT_NAME,
    SamplerGraph,
    initial_layer_noise,
    initial_noise,
    io_spec,
    onnx_input_names,
    seeded_noise,
)
from caloforge.registry.onnx_runtime import OnnxShowerGenerator, onnx_feeds, ort_session
from caloforge.registry.parity import ParityReport

CONDITION_INPUTS = [
    ("energy_mev", "float32", ["B"]),
    ("theta_rad", "float32", ["B"]),
    ("phi_rad", "float32", ["B"]),
    ("particle_idx", "int64", ["B"]),
    ("detector_idx", "int64", ["B"]),
]

COND = Conditions.make(
    [1.5e3, 3e4, 8e4, 1e4],
    [0.25, 0.5, 0.9, 0.4],
    [0.0, 2.0, -1.0, 3.0],
    [11, 211, 22, 211],
    ["lar-pb", "pbwo4", "pbwo4", "lar-pb"],
)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    """The base bundle exported with its default sampler (Heun × 2) + model card (the default variant,
    ``optimized``; a small fidelity gate)."""
    out = tmp_path_factory.mktemp("onnx") / "base"
    export_bundle(bundle_dir, out, "onnx", exporter="legacy", gate=small_gate(128))
    return out


def test_contract_names_are_pinned() -> None:
    conditions = ("energy_mev", "theta_rad", "phi_rad", "particle_idx", "detector_idx")
    assert onnx_input_names(True) == ("noise", "layer_noise", *conditions)
    assert onnx_input_names(False) == ("noise", *conditions)
    assert ONNX_OUTPUT_NAME == "shower_mev"
    with_head, without = io_spec(MESH, True), io_spec(MESH, False)
    assert [(i["name"], i["dtype"], i["shape"]) for i in with_head["inputs"]] == [
        ("noise", "float32", ["B", *MESH]),
        ("layer_noise", "float32", ["B", MESH[0]]),
        *CONDITION_INPUTS,
    ]
    assert [(i["name"], i["dtype"], i["shape"]) for i in without["inputs"]] == [
        ("noise", "float32", ["B", *MESH]),
        *CONDITION_INPUTS,
    ]
    for spec in (with_head, without):
        assert spec["outputs"] == [
            {"name": "shower_mev", "dtype": "float32", "shape": ["B", *MESH], "unit": "MeV"}
        ]


def test_contract_names_resolve_from_the_export_module() -> None:
    """docs/inference_contract.md and the seed convention stored in every file and card name
    ``caloforge.registry.export``: the names they cite are the ones of the graph/runtime modules."""
    import importlib

    for layer_energy in (False, True):
        text = export_module.seed_convention(layer_energy)
        assert ("/ initial_layer_noise" in text) == layer_energy  # i.e. caloforge.registry.export's
        for ref in (
            "caloforge.registry.export.initial_noise",
            "caloforge.platform.shower_model.derive_seeds",
        ):
            assert ref in text
            module, name = ref.rsplit(".", 1)
            assert callable(getattr(importlib.import_module(module), name))
    assert export_module.initial_noise is initial_noise
    assert export_module.initial_layer_noise is initial_layer_noise
    assert export_module.OnnxShowerGenerator is OnnxShowerGenerator
    assert export_module.SamplerGraph is SamplerGraph
    assert set(export_module.__all__) <= set(dir(export_module))


def test_initial_layer_noise_follows_the_seed_convention() -> None:
    """The numpy helpers draw exactly ShowerModel's noise: voxel noise, then layer noise, from one generator
    per seed (so a shower's layer noise does not depend on the batch, and differs from its voxel noise)."""
    model = tiny_model()
    seeds = np.array([0, 7, 2**62 + 3, 7], dtype=np.int64)
    layer = initial_layer_noise(seeds, MESH)
    assert layer.shape == (4, MESH[0]) and layer.dtype == np.float32
    np.testing.assert_array_equal(layer, model.initial_layer_noise(seeds).numpy())
    np.testing.assert_array_equal(layer[1], layer[3])
    np.testing.assert_array_equal(initial_layer_noise(seeds[2:3], MESH), layer[2:3])
    noise, layer_too = seeded_noise(seeds, MESH, layer_energy=True)
    np.testing.assert_array_equal(noise, model.initial_noise(seeds).numpy())
    np.testing.assert_array_equal(noise, initial_noise(seeds, MESH))
    np.testing.assert_array_equal(layer_too, layer)
    assert seeded_noise(seeds, MESH, layer_energy=False)[1] is None
    assert not np.allclose(layer, noise[:, :, 0, 0])  # the generator continued past the voxel noise
    assert initial_layer_noise(np.zeros(0, dtype=np.int64), MESH).shape == (0, MESH[0])
    with pytest.raises(ValueError, match="1-D integer array"):
        initial_layer_noise(np.array([0.5]), MESH)


def test_onnx_graph_io_metadata_and_card(onnx_dir: Path) -> None:
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert [i.name for i in proto.graph.input] == list(onnx_input_names(True))
    assert dims["noise"][1:] == list(MESH) and isinstance(dims["noise"][0], str)  # dynamic batch
    assert dims["layer_noise"][1:] == [MESH[0]] and isinstance(dims["layer_noise"][0], str)
    assert all(len(dims[n]) == 1 and isinstance(dims[n][0], str) for n in onnx_input_names(True)[2:])
    elem = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert elem["particle_idx"] == elem["detector_idx"] == onnx.TensorProto.INT64
    assert elem["energy_mev"] == elem["noise"] == elem["layer_noise"] == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["detector_index"]) == {"lar-pb": 0, "pbwo4": 1}
    assert json.loads(meta["particle_index"])["211"] == 3
    assert (meta["sampler"], meta["num_steps"]) == ("heun", "2")
    # the tiny model's LayerEnergyConfig; charged hadrons' tracks filled on the axis (default since schema 9)
    head = {
        "sampler": "midpoint",
        "num_steps": 3,
        "nfe": 6,
        "empty_layers": "axis_tracks",
        "space": "linear",
        "condition_voxels": False,
    }
    assert json.loads(meta["layer_energy"]) == head
    assert "layer_noise[i] = torch.randn((Z,), generator=g" in meta["seed_convention"]
    card = ModelCard.load(onnx_dir / CARD_FILE)
    (exp,) = card.exports
    assert exp["format"] == "onnx" and exp["file"] == "model.onnx" and exp["nfe"] == 4
    assert exp["layer_energy"] == head and exp["seed_convention"] == meta["seed_convention"]
    assert [i["name"] for i in exp["inputs"]] == list(onnx_input_names(True))
    assert exp["parity"]["passed"] and exp["parity"]["max_rel_err"] < 1e-3
    assert (exp["variant"], meta["caloforge_variant"], exp["precision"]) == ("optimized", "optimized", "fp32")
    assert exp["fidelity_gate"]["passed"] and exp["parity_of"] == "published graph"
    assert card.valid_ranges.energy_mev == (1000.0, 100000.0)
    assert card.valid_ranges.particles == ("e-", "gamma", "pi+")
    assert card.model["kind"] == "base"
    assert card.lineage["dataset_manifest_hash"] == "sha256:" + "ab" * 8


def test_onnxruntime_reproduces_generate_at_any_batch_size(onnx_dir: Path, bundle_dir: Path) -> None:
    model = ShowerModel.load(bundle_dir)
    assert model.has_energy_head
    seeds = np.array([3, 1, 4, 1], dtype=np.int64)
    expected = model.generate(COND, seeds=seeds)
    session = ort_session(onnx_dir / "model.onnx", threads=1)
    noise, layer = initial_noise(seeds, MESH), initial_layer_noise(seeds, MESH)
    np.testing.assert_array_equal(noise, model.initial_noise(seeds).numpy())
    full = session.run(None, onnx_feeds(model.vocab.detectors, COND, noise, layer))[0]
    np.testing.assert_allclose(full, expected, rtol=1e-3, atol=1e-5)
    one = session.run(
        None, onnx_feeds(model.vocab.detectors, COND.subset(slice(1, 2)), noise[1:2], layer[1:2])
    )[0]
    np.testing.assert_allclose(one[0], expected[1], rtol=1e-3, atol=1e-5)
    gen = OnnxShowerGenerator.from_card(onnx_dir)
    assert gen.layer_energy
    np.testing.assert_allclose(gen.generate(COND, seeds=seeds), expected, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gen.generate(COND), model.generate(COND), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(
        gen.generate(COND, noise_NZPR=noise, layer_noise_NZ=layer), expected, rtol=1e-3, atol=1e-5
    )


def test_onnx_layer_stage_is_the_heads_sample(onnx_dir: Path, bundle_dir: Path) -> None:
    """The layer energies of the ONNX showers are the head's ODE sample from ``layer_noise`` (minus what the
    re-applied readout threshold cuts; a layer whose sampled energy would leave none of its voxels above the
    threshold keeps the voxel model's own), and another layer noise gives other layer energies on the same
    voxel shape: each layer is the same shower layer rescaled."""
    model = ShowerModel.load(bundle_dir)
    seeds = np.array([3, 1, 4, 1], dtype=np.int64)
    noise, layer = seeded_noise(seeds, MESH, layer_energy=True)
    assert layer is not None
    with torch.inference_mode():
        cond = model.encode_conditions(COND)
        head_mev = model.sample_layer_energies(torch.from_numpy(layer), cond).numpy()
        x = model.sample(torch.from_numpy(noise), cond)
        voxel_only = model.to_mev(x).numpy()
    session = ort_session(onnx_dir / "model.onnx")
    out = session.run(None, onnx_feeds(model.vocab.detectors, COND, noise, layer))[0]
    sums = out.sum(axis=(2, 3))
    threshold = float(model.transform.threshold_mev)
    have, peak = voxel_only.sum(axis=(2, 3)), voxel_only.max(axis=(2, 3))
    own = (have > 0) & (head_mev * peak < threshold * have)  # layers that keep the voxel model's energy
    assert own.any() and (~own & (have > 0)).any()
    per_layer = np.where(own, have, head_mev)
    hit = sums > 0
    assert not (hit & (have == 0)).any()  # no layer the voxel model left empty
    # every layer the voxel model hit: its energy, scaled so that the shower carries the head's total, minus
    # what the re-applied threshold cuts (at most every voxel of the layer, just under the threshold)
    scale = head_mev.sum(axis=1) / np.where(have > 0, per_layer, 0).sum(axis=1)
    np.testing.assert_allclose(
        sums[have > 0],
        (per_layer * scale[:, None])[have > 0],
        atol=MESH[1] * MESH[2] * threshold + 1e-4,
        rtol=1e-4,
    )
    assert np.abs(out.sum(axis=(1, 2, 3)) / voxel_only.sum(axis=(1, 2, 3)) - 1).max() > 0.01  # the head acts
    other = session.run(None, onnx_feeds(model.vocab.detectors, COND, noise, -layer))[0]
    assert np.abs(other.sum(axis=(2, 3)) - sums).max() > 1e-2 * sums.max()
    kept = (out > 0) & (other > 0)  # voxels the re-applied threshold cut on neither side
    layers = np.argwhere(kept.sum(axis=(2, 3)) >= 2)
    assert len(layers) >= 2
    for b, z in layers:
        ratio = other[b, z][kept[b, z]] / out[b, z][kept[b, z]]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)


def test_model_without_head_exports_the_voxel_only_graph(tmp_path: Path) -> None:
    """``layer_energy.enabled=False``: the old six inputs, no layer stage in the card, parity."""
    model = tiny_model(layer_energy=LayerEnergyConfig(enabled=False))
    assert not model.has_energy_head
    graph = SamplerGraph(model)
    assert graph.input_names == onnx_input_names(False) and len(graph.input_names) == 6
    assert (graph.nfe, graph.layer_nfe) == (4, 0)
    exp = export_onnx(model, tmp_path / "voxel.onnx", exporter="legacy", variant="plain")
    assert exp.parity.passed and not exp.layer_energy
    proto = onnx.load(str(exp.path))
    assert [i.name for i in proto.graph.input] == list(onnx_input_names(False))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["layer_energy"]) is None and "layer_noise" not in meta["seed_convention"]
    info = exp.to_dict()
    assert info["layer_energy"] is None and info["inputs"] == io_spec(MESH, False)["inputs"]
    gen = OnnxShowerGenerator(exp.path, DETECTORS, MESH)
    assert not gen.layer_energy
    seeds = derive_seeds(4, len(COND))
    expected = model.generate(COND, seeds=seeds)
    np.testing.assert_allclose(gen.generate(COND, seeds=seeds), expected, rtol=1e-3, atol=1e-5)
    out = ort_session(exp.path).run(None, onnx_feeds(DETECTORS, COND, initial_noise(seeds, MESH)))[0]
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="takes no layer_noise_NZ"):
        gen.generate(
            COND, noise_NZPR=initial_noise(seeds, MESH), layer_noise_NZ=initial_layer_noise(seeds, MESH)
        )
    # A schema-1 bundle (written before the head existed) loads without it and exports the same graph.
    v1 = tmp_path / "v1"
    model.save(v1)
    model_config = json.loads((v1 / "config.json").read_text())["model_config"]
    del model_config["layer_energy"]
    model_config["pos_max_freq"] = model.config.backbone_config().pos_max_freq  # else read as schema 1's 32
    model_config["pos_max_freq_r"] = model.config.backbone_config().radius_max_freq  # else as the depth's
    rewrite_config(v1, schema_version=1, model_config=model_config)
    exp_v1 = export_onnx(v1, tmp_path / "v1.onnx", exporter="legacy", variant="plain")
    assert exp_v1.parity.passed and not exp_v1.layer_energy
    out_v1 = OnnxShowerGenerator(exp_v1.path, DETECTORS, MESH).generate(COND, seeds=seeds)
    np.testing.assert_allclose(out_v1, expected, rtol=1e-3, atol=1e-5)


def test_a_head_in_log_below_space_exports_with_parity(tmp_path: Path) -> None:
    """``layer_energy.space = log_below``: the head's inverse (exp below κ) is in the graph, same outputs."""
    model = tiny_model(layer_energy=LayerEnergyConfig(width=16, depth=1, num_steps=3, space="log_below"))
    assert model.energy_transform is not None and model.energy_transform.space == "log_below"
    exp = export_onnx(model, tmp_path / "log_below.onnx", exporter="legacy", variant="plain")
    assert exp.parity.passed and exp.layer_energy
    # the card and the graph's metadata say which space the head's draws are in
    assert exp.to_dict()["layer_energy"]["space"] == "log_below"
    meta = {p.key: p.value for p in onnx.load(str(exp.path)).metadata_props}
    assert json.loads(meta["layer_energy"])["space"] == "log_below"
    seeds = derive_seeds(5, len(COND))
    expected = model.generate(COND, seeds=seeds)
    out = OnnxShowerGenerator(exp.path, DETECTORS, MESH).generate(COND, seeds=seeds)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-5)
    model.save(tmp_path / "bundle")
    loaded = ShowerModel.load(tmp_path / "bundle")
    assert loaded.config.layer_energy.space == "log_below" and loaded.energy_transform.space == "log_below"


def test_one_step_student_export(adapted_bundle_dir: Path, tmp_path: Path) -> None:
    model = ShowerModel.load(adapted_bundle_dir)
    assert (SamplerGraph(model).nfe, SamplerGraph(model).layer_nfe) == (1, 6)
    exp = export_onnx(adapted_bundle_dir, tmp_path / "student.onnx", exporter="legacy", variant="plain")
    assert (exp.sampler, exp.num_steps, exp.nfe) == ("euler", 1, 1)
    assert (exp.layer_energy, exp.layer_sampler, exp.layer_num_steps, exp.layer_nfe) == (
        True,
        "midpoint",
        3,
        6,
    )
    assert exp.parity.passed and exp.parity.batch_sizes == (1, 5)
    d = exp.to_dict()  # the plain graph: standard ONNX ops, fp32, parity only
    assert (d["variant"], d["precision"], d["contrib_ops"], d["fidelity_gate"]) == ("plain", "fp32", [], None)
    seeds = derive_seeds(5, 4)
    lar = Conditions.make([2e3, 4e4, 6e4, 9e4], 0.5, 0.0, [11, 22, 211, 11], "lar-pb")
    feeds = onnx_feeds(DETECTORS, lar, *seeded_noise(seeds, MESH, layer_energy=True))
    out = ort_session(exp.path).run(None, feeds)[0]
    np.testing.assert_allclose(out, model.generate(lar, seeds=seeds), rtol=1e-3, atol=1e-5)
    assert (out > 0).any()


def test_export_failing_parity_is_not_published(bundle_dir: Path, tmp_path: Path) -> None:
    """Zero tolerance: the float32 differences between onnxruntime and torch kernels fail the check; no
    file, no card and no output directory are left behind."""
    with pytest.raises(ValueError, match="failed the onnxruntime parity check, not published") as info:
        export_bundle(bundle_dir, tmp_path / "published", "onnx", exporter="legacy", rtol=0.0, atol_mev=0.0)
    assert "max abs err" in str(info.value) and "mismatches" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_with_a_fixed_batch_size_is_not_published(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a shape check that turns a tensor size into a Python int does to the dynamo export: the batch
    axis is frozen at the example's size. The export names the inputs and publishes nothing."""

    def frozen_batch_export(graph, path: Path, opset: int, exporter: str) -> None:
        z, p, r = graph.model.mesh_shape
        example = {
            "noise": torch.zeros(2, z, p, r),
            "layer_noise": torch.zeros(2, z),
            "energy_mev": torch.full((2,), 1e4),
            "theta_rad": torch.full((2,), 0.5),
            "phi_rad": torch.zeros(2),
            "particle_idx": torch.zeros(2, dtype=torch.int64),
            "detector_idx": torch.zeros(2, dtype=torch.int64),
        }
        args = tuple(example[name] for name in graph.input_names)
        with torch.no_grad():  # no dynamic axes: every input keeps batch 2
            torch.onnx.export(
                graph,
                args,
                str(path),
                input_names=list(graph.input_names),
                output_names=["shower_mev"],
                opset_version=opset,
                dynamo=False,
            )

    monkeypatch.setattr(export_module, "_export_graph", frozen_batch_export)
    with pytest.raises(ValueError, match=r"fixed the batch size of inputs \{'noise': 2"):
        export_onnx(bundle_dir, tmp_path / "m.onnx", exporter="legacy")
    assert list(tmp_path.iterdir()) == []


def test_export_argument_errors(bundle_dir: Path, tmp_path: Path, onnx_dir: Path) -> None:
    with pytest.raises(ValueError, match="dynamo exporter needs opset >= 18"):
        export_onnx(bundle_dir, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="max_mismatch_fraction must be in"):
        export_onnx(bundle_dir, tmp_path / "m.onnx", exporter="legacy", max_mismatch_fraction=1.0)
    with pytest.raises(ValueError, match="outlier_limit must be >= 1"):
        export_onnx(bundle_dir, tmp_path / "m.onnx", exporter="legacy", outlier_limit=0.5)
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_onnx(bundle_dir, tmp_path / "m.bin", exporter="legacy")
    with pytest.raises(ValueError, match="unknown sampler"):
        export_onnx(bundle_dir, tmp_path / "m.onnx", exporter="legacy", sampler="ddim")
    with pytest.raises(ValueError, match="exists"):
        export_onnx(bundle_dir, onnx_dir / "model.onnx", exporter="legacy")
    with pytest.raises(ValueError, match="already holds"):
        export_bundle(bundle_dir, onnx_dir, "onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        export_bundle(bundle_dir, tmp_path / "x", "tflite")
    assert not (tmp_path / "x").exists()


def test_corrupt_or_edited_onnx_is_refused(onnx_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pulled"
    shutil.copytree(onnx_dir, copy)
    with (copy / "model.onnx").open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00" * 16)
    with pytest.raises(ValueError, match="corrupt"):
        OnnxShowerGenerator.from_card(copy)
    (copy / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        ort_session(copy / "model.onnx")


def test_onnx_generator_guards_conditions(onnx_dir: Path) -> None:
    gen = OnnxShowerGenerator.from_card(onnx_dir)
    seeds = derive_seeds(0, len(COND))
    with pytest.raises(ValueError, match="pass layer_noise_NZ with noise_NZPR"):
        gen.generate(COND, noise_NZPR=initial_noise(seeds, MESH))
    with pytest.raises(ValueError, match="without noise_NZPR"):
        gen.generate(COND, layer_noise_NZ=initial_layer_noise(seeds, MESH))
    with pytest.raises(ValueError, match=r"layer_noise must be \(N, Z\)"):
        gen.generate(COND, noise_NZPR=initial_noise(seeds, MESH), layer_noise_NZ=np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"unknown detector\(s\) \['atlas-lar'\]"):
        gen.generate(Conditions.make([1e4], 0.5, 0.0, 11, "atlas-lar"))
    far = Conditions.make([1e4, 2e6], [0.5, 1.5], 0.0, [11, 2212], "lar-pb")
    with pytest.warns(ConditionRangeWarning) as record:
        out = gen.generate(far)
    text = str(record[0].message)
    assert "energy_mev: 1 of 2" in text and "theta_rad: 1 of 2" in text and "['p']" in text
    assert out.shape == (2, *MESH)
    with pytest.raises(ValueError, match="strict mode"):
        gen.generate(far, strict=True)


def test_torch_format_is_a_verified_bundle_copy(bundle_dir: Path, tmp_path: Path) -> None:
    card = export_bundle(bundle_dir, tmp_path / "out", "torch")
    copy = tmp_path / "out" / "bundle"
    assert bundle_files(copy) == bundle_files(bundle_dir)
    assert card.exports[0]["format"] == "torch" and card.exports[0]["dir"] == "bundle"
    a = ShowerModel.load(copy).generate(COND)
    np.testing.assert_array_equal(a, ShowerModel.load(bundle_dir).generate(COND))
    with pytest.raises(ValueError, match="apply to --format onnx"):
        export_bundle(bundle_dir, tmp_path / "o2", "torch", num_steps=4)
    with pytest.raises(ValueError, match="not empty"):
        export_torch(bundle_dir, tmp_path / "out")


@pytest.mark.slow
def test_dynamo_exporter_n_steps(bundle_dir: Path, tmp_path: Path) -> None:
    """The default exporter (torch.export → ONNX, opset 18) with a step count other than the bundle's."""
    exp = export_onnx(bundle_dir, tmp_path / "dyn.onnx", num_steps=2, sampler="midpoint", variant="plain")
    assert (exp.exporter, exp.opset, exp.num_steps, exp.nfe) == ("dynamo", 18, 2, 4)
    assert exp.parity.passed
    assert (exp.layer_energy, exp.layer_nfe) == (True, 6)
    model = ShowerModel.load(bundle_dir)
    seeds = derive_seeds(9, len(COND))
    out = ort_session(exp.path).run(
        None,
        onnx_feeds(model.vocab.detectors, COND, initial_noise(seeds, MESH), initial_layer_noise(seeds, MESH)),
    )[0]
    ref = model.generate(COND, seeds=seeds, num_steps=2, sampler="midpoint")
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-5)


def test_parity_comparison_counts_non_finite_voxels_on_either_side_as_mismatches() -> None:
    from caloforge.registry.parity import compare_showers

    ref = np.array([[1.0, 2.0, 0.0, np.nan]])
    out = np.array([[1.0, 2.0000001, 0.0151, 7.0]])
    c = compare_showers(ref, out, rtol=1e-3, atol_mev=1e-4, threshold=0.01515)
    assert (c.n_mismatch, c.n_threshold_flips) == (1, 1)  # the NaN reference voxel is bad
    assert c.max_abs_err_mev == pytest.approx(0.0151) and c.max_tolerance_ratio == math.inf
    c = compare_showers(out, ref, rtol=1e-3, atol_mev=1e-4, threshold=0.01515)
    assert c.n_mismatch == 1 and c.max_tolerance_ratio == math.inf  # and so is a NaN ONNX voxel
    verdict = ParityReport.judge(
        (1,), 4000, [c], rtol=1e-3, atol_mev=1e-4, max_mismatch_fraction=1e-3, outlier_limit=10.0
    )
    assert not verdict.passed  # one NaN voxel in 4000 is within the fraction, never within the limit


def test_parity_tolerates_a_rounding_tail_but_not_a_wrong_voxel_or_a_broad_shift() -> None:
    """What an N-step solve's compounded float32 rounding looks like (most voxels ~1e-6 relative, a few
    small deposits a few times the tolerance) passes; one voxel far off, or many voxels a little off, fail."""
    from caloforge.registry.parity import compare_showers

    rng = np.random.default_rng(0)
    ref = np.exp(rng.normal(0.0, 2.0, (3, 6480)))  # 19,440 voxels, 0.002 MeV to a few hundred MeV
    rounding = ref * (1 + rng.normal(0.0, 1e-6, ref.shape))

    def judge(out: np.ndarray) -> ParityReport:
        c = compare_showers(ref, out, rtol=1e-3, atol_mev=1e-5, threshold=0.015)
        return ParityReport.judge(
            (1, 2), ref.size, [c], rtol=1e-3, atol_mev=1e-5, max_mismatch_fraction=1e-3, outlier_limit=10
        )

    assert judge(rounding).passed and judge(rounding).n_mismatch == 0
    tail = rounding.copy()
    tail[0, :3] = ref[0, :3] * (1 + np.array([1.3e-3, 3.2e-3, -2.4e-3]))  # the measured tail (midpoint 16)
    report = judge(tail)
    assert report.passed and report.n_mismatch == 3 and 2.0 < report.max_tolerance_ratio < 3.3
    assert "3 mismatches (allowed 19" in report.summary()
    one_off = tail.copy()
    k = int(np.argmax(ref[1]))
    one_off[1, k] = ref[1, k] * 1.02  # one voxel 2 % off: 20× its tolerance
    assert not judge(one_off).passed and judge(one_off).n_mismatch == 4
    broad = rounding.copy()
    broad[2, :40] *= 1.002  # 40 voxels 0.2 % off: each within the limit, too many of them
    report = judge(broad)
    assert not report.passed and report.n_mismatch == 40 and report.max_tolerance_ratio < 2.1
    assert judge(rounding * 1.002).n_mismatch > 19_000  # a global scale error: every voxel
    # no absolute tolerance: empty voxels (tolerance 0, error 0) leave the others' ratios alone
    with_empty = np.concatenate([ref, np.zeros((3, 10))], axis=1)
    c = compare_showers(with_empty, with_empty * (1 + 1e-6), rtol=1e-3, atol_mev=0.0, threshold=0.015)
    assert c.n_mismatch == 0 and c.max_tolerance_ratio < 0.01
    c = compare_showers(ref, ref * (1 + 1e-6), rtol=0.0, atol_mev=0.0, threshold=0.015)
    assert c.max_tolerance_ratio == math.inf  # no tolerance at all: any difference is infinitely off
