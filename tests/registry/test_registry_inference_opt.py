"""Inference-optimised ONNX variants (ORT fusions, int8 dynamic / static) and the fidelity gate, with real
onnxruntime quantisation on the tiny one-step student; the graphs load in a bare onnxruntime process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from registry_helpers import DETECTORS, MESH

from caloforge.platform.shower_model import ShowerModel
from caloforge.registry import export as export_module
from caloforge.registry.card import CARD_FILE, ModelCard
from caloforge.registry.export import export_bundle
from caloforge.registry.fidelity import FidelityGateConfig, auc_null_sigma, fidelity_gate, small_gate
from caloforge.registry.onnx_graph import onnx_input_names
from caloforge.registry.onnx_runtime import SESSION_PROFILES, OnnxShowerGenerator, ort_session
from caloforge.registry.optimize import (
    attention_matmuls,
    build_variant,
    fuse_fast_gelu,
    op_counts,
    token_matmuls,
)

GATE = small_gate(128)
VARIANTS = ("optimized", "int8", "int8-attn", "int8-static")
DEPTH = 2  # the debug backbone of the tiny model


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory, adapted_bundle_dir: Path) -> dict[str, Path]:
    """The one-step student exported as each non-plain variant (export_bundle, small gate; the plain graph
    is the subject of test_registry_export.py)."""
    root = tmp_path_factory.mktemp("variants")
    for v in VARIANTS:
        export_bundle(
            adapted_bundle_dir,
            root / v,
            "onnx",
            exporter="legacy",
            variant=v,
            gate=GATE,
            calibration_showers=32,
        )
    return {v: root / v for v in VARIANTS}


def _damage(path: Path, seed: int = 0, rel: float = 0.5) -> None:
    """Multiply each float initializer of ``path`` (weights, biases, scales) by 1 + rel·N(0, 1)."""
    proto = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            a = numpy_helper.to_array(init)
            if a.size > 1:
                damaged = (a * (1 + rel * rng.standard_normal(a.shape))).astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(damaged, init.name))
    onnx.save(proto, str(path))


@pytest.mark.slow
def test_cards_and_files_say_what_they_are(variant_dirs: dict[str, Path]) -> None:
    sizes = {}
    for v, d in variant_dirs.items():
        (exp,) = ModelCard.load(d / CARD_FILE).exports
        meta = {
            p.key: p.value for p in onnx.load(str(d / "model.onnx"), load_external_data=False).metadata_props
        }
        assert exp["variant"] == meta["caloforge_variant"] == v
        assert exp["precision"] == meta["precision"]
        assert json.loads(meta["optimizations"]) == exp["optimizations"]
        assert json.loads(meta["detector_index"]) == {"lar-pb": 0, "pbwo4": 1}  # contract metadata kept
        assert exp["size_bytes"] == (d / "model.onnx").stat().st_size
        sizes[v] = exp["size_bytes"]
        gate = exp["fidelity_gate"]
        assert gate["passed"] and gate["n_showers"] == 128 and gate["auc"] <= gate["auc_bound"]
        assert abs(gate["response_scale"]) <= 0.01 and abs(gate["response_resolution"]) <= 0.05
        assert exp["contrib_ops"] and "onnxruntime>=" in exp["requires"]
        assert any("ORT_ENABLE_EXTENDED" in o for o in exp["optimizations"])
    opt = ModelCard.load(variant_dirs["optimized"] / CARD_FILE).exports[0]
    assert opt["precision"] == "fp32" and opt["parity_of"] == "published graph" and opt["parity"]["passed"]
    assert opt["fidelity_gate"]["max_abs_diff_mev"] < 1e-3  # fusions: float rounding only
    i8 = ModelCard.load(variant_dirs["int8"] / CARD_FILE).exports[0]
    assert i8["precision"].startswith("int8") and "DynamicQuantizeMatMul" in i8["contrib_ops"]
    assert i8["parity_of"] == "fp32 graph before quantisation"
    assert any("FastGelu fusion" in o for o in i8["optimizations"]) and "FastGelu" in i8["contrib_ops"]
    # int8: every token-wise linear layer (patch embedding, qkv, proj, fc1, fc2 per block, final layer) and
    # nothing per shower (condition MLPs, adaLN, the layer-energy head stay fp32 Gemms); int8-attn: also the
    # attention core's two MatMuls per block
    counts = {v: op_counts(variant_dirs[v] / "model.onnx") for v in ("optimized", "int8", "int8-attn")}
    dq = "com.microsoft.DynamicQuantizeMatMul"
    assert counts["int8"][dq] == 4 * DEPTH + 2 and counts["int8-attn"][dq] == 6 * DEPTH + 2
    assert counts["int8"]["Gemm"] == counts["optimized"]["Gemm"] == counts["int8-attn"]["Gemm"] > 0
    assert counts["optimized"].get(dq, 0) == 0 and counts["optimized"]["com.microsoft.FastGelu"] == DEPTH
    st = ModelCard.load(variant_dirs["int8-static"] / CARD_FILE).exports[0]
    assert (
        st["calibration"]["n_showers"] == 32 and "trained ranges (lineage)" in st["calibration"]["conditions"]
    )
    # the tiny model's weights are mostly per-shower layers (fp32): the token-wise ones shrink 4×
    assert sizes["int8"] < sizes["optimized"] and sizes["int8-static"] < sizes["optimized"]


@pytest.mark.slow
def test_optimized_graph_matches_the_model(variant_dirs: dict[str, Path], adapted_bundle_dir: Path) -> None:
    model = ShowerModel.load(adapted_bundle_dir)
    gen = OnnxShowerGenerator.from_card(variant_dirs["optimized"])
    lar = export_module.random_conditions(list(DETECTORS), 6, 3, gen.ranges)
    seeds = np.arange(6, dtype=np.int64)
    np.testing.assert_allclose(
        gen.generate(lar, seeds=seeds), model.generate(lar, seeds=seeds), rtol=1e-3, atol=1e-5
    )


@pytest.mark.slow
def test_variants_load_in_a_bare_onnxruntime_process(variant_dirs: dict[str, Path]) -> None:
    """Every variant runs in a process that imports only onnxruntime, numpy and json (no caloforge), with the
    documented inputs (read from the card) and the grid session settings."""
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np, onnxruntime as ort
        out = {}
        for d in sys.argv[1:]:
            card = json.load(open(f"{d}/model_card.json"))
            exp = card["exports"][-1]
            z, p, r = card["architecture"]["mesh_shape"]
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(f"{d}/model.onnx", opts, providers=["CPUExecutionProvider"])
            n, rng = 3, np.random.default_rng(0)
            shapes = {"noise": (n, z, p, r), "layer_noise": (n, z)}
            feeds = {}
            for spec in exp["inputs"]:
                name = spec["name"]
                if name in shapes:
                    feeds[name] = rng.standard_normal(shapes[name], dtype=np.float32)
                elif spec["dtype"] == "int64":
                    feeds[name] = np.zeros(n, np.int64)
                else:
                    feeds[name] = np.full(n, {"energy_mev": 2e4, "theta_rad": 0.5}.get(name, 0.0), np.float32)
            (y,) = sess.run(["shower_mev"], feeds)
            out[exp["variant"]] = {
                "inputs": [i.name for i in sess.get_inputs()],
                "outputs": [o.name for o in sess.get_outputs()],
                "shape": list(y.shape), "dtype": str(y.dtype), "min": float(y.min()), "sum": float(y.sum()),
            }
        out["caloforge_imported"] = any(m.startswith("caloforge") for m in sys.modules)
        print(json.dumps(out))
        """
    )
    dirs = [str(variant_dirs[v]) for v in VARIANTS]
    proc = subprocess.run(
        [sys.executable, "-c", script, *dirs], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("caloforge_imported") is False
    assert sorted(result) == sorted(VARIANTS)
    for r in result.values():
        assert r["inputs"] == list(onnx_input_names(True)) and r["outputs"] == ["shower_mev"]
        assert r["shape"] == [3, *MESH] and r["dtype"] == "float32"
        assert r["min"] >= 0.0 and r["sum"] > 0.0


@pytest.mark.slow
def test_fidelity_gate_rejects_a_damaged_graph(
    variant_dirs: dict[str, Path], adapted_bundle_dir: Path, tmp_path: Path
) -> None:
    model = ShowerModel.load(adapted_bundle_dir)
    card = ModelCard.load(variant_dirs["int8"] / CARD_FILE)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes((variant_dirs["int8"] / "model.onnx").read_bytes())
    _damage(damaged)
    kwargs = {
        "detectors": list(DETECTORS),
        "mesh": model.mesh,
        "threshold_mev": float(model.transform.threshold_mev),
        "ranges": card.valid_ranges,
        "config": GATE,
    }
    fp32 = variant_dirs["optimized"] / "model.onnx"  # fp32, parity-checked against PyTorch
    ok = fidelity_gate(variant_dirs["int8"] / "model.onnx", fp32, **kwargs)
    assert ok.passed, ok.summary()
    bad = fidelity_gate(damaged, fp32, **kwargs)
    assert not bad.passed and bad.failures
    assert bad.auc > ok.auc or abs(bad.response_scale) > 0.01
    assert "FAILED" in bad.summary()


@pytest.mark.slow
def test_damaged_graph_is_not_published(
    adapted_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantised graph damaged between quantisation and the gate: refused; no file, card or directory."""

    def build_and_damage(*args: object, **kwargs: object):
        info = build_variant(*args, **kwargs)  # type: ignore[arg-type]
        _damage(Path(args[1]))  # type: ignore[arg-type]
        return info

    monkeypatch.setattr(export_module, "build_variant", build_and_damage)
    out = tmp_path / "published"
    with pytest.raises(
        ValueError, match=r"int8 graph of model\.onnx failed the fidelity gate, not published"
    ):
        export_bundle(adapted_bundle_dir, out, "onnx", exporter="legacy", variant="int8", gate=GATE)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _toy_block(path: Path) -> None:
    """x (B, T, 8) → linear → tanh-GELU (the exporters' seven ops) → linear → QKᵀ-style MatMul with itself;
    plus a per-row Gemm on c (B, 8): what ``token_matmuls`` / ``attention_matmuls`` tell apart."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in {
            "w1": rng.standard_normal((8, 16)), "w2": rng.standard_normal((16, 8)) / 4,
            "wc": rng.standard_normal((8, 8)), "three": np.array(3.0), "c0": np.array(0.044715),
            "c1": np.array(np.sqrt(2 / np.pi)), "one": np.array(1.0), "half": np.array(0.5),
        }.items()
    ]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Pow", ["h", "three"], ["h3"]),
        helper.make_node("Mul", ["h3", "c0"], ["h3c"]),
        helper.make_node("Add", ["h", "h3c"], ["inner"]),
        helper.make_node("Mul", ["inner", "c1"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["h", "half"], ["hh"]),
        helper.make_node("Mul", ["hh", "t1"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["y", "yt"], ["scores"], name="qk"),
        helper.make_node("Gemm", ["c", "wc"], ["cc"], name="per_row"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 8]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["B", 8]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("cc", TensorProto.FLOAT, None),
        ],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_quantised_nodes_and_gelu_fusion_on_a_toy_graph(tmp_path: Path) -> None:
    """Which MatMuls the int8 variants quantise (token-wise weights; activation × activation for int8-attn;
    never the per-row Gemm), and the FastGelu fusion computes what the seven ops did."""
    import onnxruntime as ort

    src, fused = tmp_path / "toy.onnx", tmp_path / "fused.onnx"
    _toy_block(src)
    assert token_matmuls(src) == ["fc1", "fc2"] and attention_matmuls(src) == ["qk"]
    assert fuse_fast_gelu(src, fused) == 1
    counts = op_counts(fused)
    assert counts["com.microsoft.FastGelu"] == 1 and "Tanh" not in counts and "Pow" not in counts
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 5, 8), dtype=np.float32), "c": np.ones((2, 8), np.float32)}
    run = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
        for p in (src, fused)
    ]
    np.testing.assert_allclose(run[1][0], run[0][0], rtol=1e-4, atol=1e-4)


def test_gate_config_and_session_profiles(tmp_path: Path) -> None:
    cfg = FidelityGateConfig.load(Path(__file__).parents[2] / "configs" / "export" / "fidelity_gate.yaml")
    assert cfg == FidelityGateConfig()
    # the AUC of two samples of one distribution: σ₀ = √((2m+1)/(12m²)), m = 0.2·n per class
    assert auc_null_sigma(500, 0.2) == pytest.approx(np.sqrt(201 / (12 * 100**2)))
    assert max(cfg.auc_max, 0.5 + 3 * auc_null_sigma(cfg.n_showers, 0.2)) == cfg.auc_max  # n resolves 0.6
    with pytest.raises(ValueError, match="auc_max must be in"):
        FidelityGateConfig(auc_max=0.5)
    bad = tmp_path / "gate.yaml"
    bad.write_text("n_showers: 10\n")
    with pytest.raises(ValueError, match="n_showers must be >= 20"):
        FidelityGateConfig.load(bad)
    assert SESSION_PROFILES["grid"].intra_op_threads == 1 and not SESSION_PROFILES["grid"].allow_spinning
    with pytest.raises(ValueError, match="session profile must be one of"):
        ort_session(tmp_path / "x.onnx", profile="gpu")
    with pytest.raises(ValueError, match="variant must be one of"):
        export_bundle(tmp_path, tmp_path / "o", "onnx", variant="fp16")
