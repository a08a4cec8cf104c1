"""ONNX export (unrolled sampler, dynamic batch) checked against PyTorch with real onnxruntime; torch
bundle export; model cards; the names of the ONNX contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from registry_helpers import MESH

from caloforge.platform.conditioning import Conditions
from caloforge.platform.shower_model import ShowerModel, derive_seeds
from caloforge.registry.bundle import bundle_files
from caloforge.registry.card import CARD_FILE, ConditionRangeWarning, ModelCard
from caloforge.registry.export import (
    ONNX_INPUT_NAMES,
    ONNX_OUTPUT_NAME,
    OnnxShowerGenerator,
    SamplerGraph,
    export_bundle,
    export_onnx,
    export_torch,
    initial_noise,
    io_spec,
    onnx_feeds,
    ort_session,
)

COND = Conditions.make(
    [1.5e3, 3e4, 8e4, 1e4],
    [0.25, 0.5, 0.9, 0.4],
    [0.0, 2.0, -1.0, 3.0],
    [11, 211, 22, 211],
    ["lar-pb", "pbwo4", "pbwo4", "lar-pb"],
)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    """The base bundle exported with its default sampler (Heun × 2) + model card."""
    out = tmp_path_factory.mktemp("onnx") / "base"
    export_bundle(bundle_dir, out, "onnx", exporter="legacy")
    return out


def test_contract_names_are_pinned() -> None:
    assert ONNX_INPUT_NAMES == ("noise", "energy_mev", "theta_rad", "phi_rad", "particle_idx", "detector_idx")
    assert ONNX_OUTPUT_NAME == "shower_mev"
    spec = io_spec(MESH)
    assert [(i["name"], i["dtype"]) for i in spec["inputs"]] == [
        ("noise", "float32"),
        ("energy_mev", "float32"),
        ("theta_rad", "float32"),
        ("phi_rad", "float32"),
        ("particle_idx", "int64"),
        ("detector_idx", "int64"),
    ]
    assert spec["outputs"] == [
        {"name": "shower_mev", "dtype": "float32", "shape": ["B", *MESH], "unit": "MeV"}
    ]


def test_onnx_graph_io_metadata_and_card(onnx_dir: Path) -> None:
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert dims["noise"][1:] == list(MESH) and isinstance(dims["noise"][0], str)  # dynamic batch
    assert all(len(dims[n]) == 1 and isinstance(dims[n][0], str) for n in ONNX_INPUT_NAMES[1:])
    elem = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert elem["particle_idx"] == elem["detector_idx"] == onnx.TensorProto.INT64
    assert elem["energy_mev"] == elem["noise"] == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["detector_index"]) == {"lar-pb": 0, "pbwo4": 1}
    assert json.loads(meta["particle_index"])["211"] == 3
    assert (meta["sampler"], meta["num_steps"]) == ("heun", "2")
    card = ModelCard.load(onnx_dir / CARD_FILE)
    (exp,) = card.exports
    assert exp["format"] == "onnx" and exp["file"] == "model.onnx" and exp["nfe"] == 4
    assert exp["parity"]["passed"] and exp["parity"]["max_rel_err"] < 1e-3
    assert card.valid_ranges.energy_mev == (1000.0, 100000.0)
    assert card.valid_ranges.particles == ("e-", "gamma", "pi+")
    assert card.model["kind"] == "base"
    assert card.lineage["dataset_manifest_hash"] == "sha256:" + "ab" * 8


def test_onnxruntime_reproduces_generate_at_any_batch_size(onnx_dir: Path, bundle_dir: Path) -> None:
    model = ShowerModel.load(bundle_dir)
    seeds = np.array([3, 1, 4, 1], dtype=np.int64)
    expected = model.generate(COND, seeds=seeds)
    session = ort_session(onnx_dir / "model.onnx", threads=1)
    noise = initial_noise(seeds, MESH)
    np.testing.assert_array_equal(noise, model.initial_noise(seeds).numpy())
    full = session.run(None, onnx_feeds(model.vocab.detectors, COND, noise))[0]
    np.testing.assert_allclose(full, expected, rtol=1e-3, atol=1e-5)
    one = session.run(None, onnx_feeds(model.vocab.detectors, COND.subset(slice(1, 2)), noise[1:2]))[0]
    np.testing.assert_allclose(one[0], expected[1], rtol=1e-3, atol=1e-5)
    gen = OnnxShowerGenerator.from_card(onnx_dir)
    np.testing.assert_allclose(gen.generate(COND, seeds=seeds), expected, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gen.generate(COND), model.generate(COND), rtol=1e-3, atol=1e-5)


def test_one_step_student_export(adapted_bundle_dir: Path, tmp_path: Path) -> None:
    model = ShowerModel.load(adapted_bundle_dir)
    assert SamplerGraph(model).nfe == 1
    exp = export_onnx(adapted_bundle_dir, tmp_path / "student.onnx", exporter="legacy")
    assert (exp.sampler, exp.num_steps, exp.nfe) == ("euler", 1, 1)
    assert exp.parity.passed and exp.parity.batch_sizes == (1, 5)
    seeds = derive_seeds(5, 4)
    lar = Conditions.make([2e3, 4e4, 6e4, 9e4], 0.5, 0.0, [11, 22, 211, 11], "lar-pb")
    out = ort_session(exp.path).run(None, onnx_feeds(("lar-pb", "pbwo4"), lar, initial_noise(seeds, MESH)))[0]
    np.testing.assert_allclose(out, model.generate(lar, seeds=seeds), rtol=1e-3, atol=1e-5)
    assert (out > 0).any()


def test_export_failing_parity_is_not_published(bundle_dir: Path, tmp_path: Path) -> None:
    """Zero tolerance: the float32 differences between onnxruntime and torch kernels fail the check; no
    file, no card and no output directory are left behind."""
    with pytest.raises(ValueError, match="failed the onnxruntime parity check, not published") as info:
        export_bundle(bundle_dir, tmp_path / "published", "onnx", exporter="legacy", rtol=0.0, atol_mev=0.0)
    assert "max abs err" in str(info.value) and "mismatches" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_argument_errors(bundle_dir: Path, tmp_path: Path, onnx_dir: Path) -> None:
    with pytest.raises(ValueError, match="dynamo exporter needs opset >= 18"):
        export_onnx(bundle_dir, tmp_path / "m.onnx", opset=17)
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
    exp = export_onnx(bundle_dir, tmp_path / "dyn.onnx", num_steps=2, sampler="midpoint")
    assert (exp.exporter, exp.opset, exp.num_steps, exp.nfe) == ("dynamo", 18, 2, 4)
    assert exp.parity.passed
    model = ShowerModel.load(bundle_dir)
    seeds = derive_seeds(9, len(COND))
    out = ort_session(exp.path).run(
        None, onnx_feeds(model.vocab.detectors, COND, initial_noise(seeds, MESH))
    )[0]
    ref = model.generate(COND, seeds=seeds, num_steps=2, sampler="midpoint")
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-5)
