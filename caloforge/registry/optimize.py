"""Inference-optimised variants of an exported ONNX graph: onnxruntime graph fusions and int8 quantisation.

``build_variant(plain, out, variant)`` turns the plain fp32 graph that ``export_onnx`` wrote (and checked
against PyTorch) into one of ``VARIANTS``:

- ``plain``: the graph as exported (standard ONNX ops only, opset 18; any ONNX runtime);
- ``optimized`` (the default of ``caloforge export`` / ``registry pull``): fp32; the tanh-approximated GELU
  of the backbone's MLP (seven elementwise ops in the exported graph, which onnxruntime's own session fusions
  do not match) fused into one ``FastGelu`` (``fuse_fast_gelu``: onnxruntime.transformers' pattern), then
  onnxruntime's graph optimisations applied offline at ``ORT_ENABLE_EXTENDED`` and saved (``SessionOptions.
  optimized_model_filepath``): constant folding, Gemm/MatMul + bias + activation fusion, LayerNorm fusion,
  erf-GELU / QuickGelu fusion. Attention stays MatMul/Softmax/MatMul: no onnxruntime fusion matches the
  backbone's packed-qkv pattern, and a fused ``Attention`` / ``MultiHeadAttention`` kernel measured no faster
  on one CPU thread at 360 tokens (docs/inference_contract.md). The saved file contains
  onnxruntime contrib ops (domain ``com.microsoft``), so it needs onnxruntime (any execution provider that
  implements them; CPU does) of at least the version that wrote it — the card's ``requires`` says which;
  ``ORT_ENABLE_ALL`` is *not* used for saved files because its layout transforms (NCHWc) are specific to the
  CPU that wrote them;
- ``int8``: dynamic int8 quantisation (``onnxruntime.quantization.quantize_dynamic``: int8 weights, per
  tensor, symmetric; activations quantised per call) of the *token-wise* linear layers — the MatMuls with a
  constant weight whose activation has a token axis (rank ≥ 3: patch embedding, qkv, proj, MLP, final
  layer; ``token_matmuls``) — of the FastGelu-fused standard-op graph, then optimised offline as
  ``optimized`` (ORT fuses ``DynamicQuantizeMatMul``). Quantisation comes *before* onnxruntime's fusions:
  their ``MatMulScaleFusion`` folds the GELU's 0.5 into the next MatMul as a ``FusedMatMul``, which the
  quantiser does not know, so every MLP output layer stayed fp32. The per-shower linear layers (condition
  MLPs, adaLN modulation, the layer-energy head: one row per shower, a few MFLOP) stay fp32: quantising an
  activation of one row costs more than it saves, and the layer energies keep fp32 precision;
- ``int8-attn``: ``int8`` plus the two MatMuls of the attention core (QKᵀ and the attention-weighted
  values: activation × activation, ``attention_matmuls``), both operands quantised per call (uint8, per
  tensor); ~10 % faster than ``int8`` for ``S`` on one thread, a coarser approximation (softmax weights in
  256 levels) that the fidelity gate must accept like any other;
- ``int8-static``: static QDQ int8 quantisation (``quantize_static``) of the weights and activations of the
  same token-wise MatMuls with ranges calibrated on inputs from the model's own training distribution
  (conditions inside the trained ranges, noise by the seed convention; ``calibration_feeds`` in
  ``caloforge.registry.export``).

fp16 is not offered: onnxruntime's CPU execution provider has no fp16 kernels for most of these ops and
inserts casts, which is slower than fp32 on CPU.

No caloforge model code here: only onnx / onnxruntime and files.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("plain", "optimized", "int8", "int8-attn", "int8-static")
DEFAULT_VARIANT = "optimized"
QUANTIZED_OPS = ("MatMul",)  # only the token-wise ones (``token_matmuls``)
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class VariantInfo:
    """What a published graph is: recorded in the model card and the file's ``metadata_props``."""

    variant: str
    precision: str  # "fp32" | "int8 weights, dynamic activations" | ...
    optimizations: tuple[str, ...]
    contrib_ops: tuple[str, ...]  # com.microsoft op types in the file (empty: standard ONNX only)
    requires: str
    calibration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "precision": self.precision,
            "optimizations": list(self.optimizations),
            "contrib_ops": list(self.contrib_ops),
            "requires": self.requires,
            "calibration": self.calibration,
        }


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    return variant


def _ort() -> Any:
    import onnxruntime as ort

    return ort


def optimize_offline(src: Path, dst: Path) -> None:
    """Apply onnxruntime's ``ORT_ENABLE_EXTENDED`` graph optimisations to ``src`` and save them to ``dst``."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise ValueError(f"{src}: onnxruntime did not write the optimised graph to {dst}")


def fuse_fast_gelu(src: Path, dst: Path) -> int:
    """Write ``src`` with every tanh-approximated GELU (``0.5·x·(1 + tanh(√(2/π)(x + 0.044715 x³)))``,
    ``F.gelu(approximate="tanh")`` as the exporters decompose it) replaced by one ``com.microsoft.FastGelu``
    (onnxruntime.transformers' ``FusionFastGelu``: the same formula in one kernel); returns how many."""
    import onnx
    from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(src))
    model = OnnxModel(proto)
    FusionFastGelu(model).apply()
    model.prune_graph(allow_remove_graph_inputs=False)
    fused = sum(n.op_type == "FastGelu" and n.domain == MS_DOMAIN for n in proto.graph.node)
    if fused and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(proto, str(dst))
    return fused


def token_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes of ``path`` with a constant weight (an initializer as second input) whose
    activation has rank ≥ 3 (batch, tokens, features): the backbone's token-wise linear layers. Ranks from
    ONNX shape inference, so ``path`` should hold standard ops only (inference stops at contrib ops)."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    weights = {i.name for i in proto.graph.initializer}
    ranks = _ranks(proto)
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "MatMul" and not n.domain and n.input[1] in weights and ranks.get(n.input[0], 0) >= 3
    ]


def attention_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes of ``path`` whose two operands are activations of rank ≥ 3 (no
    initializer): the attention core's QKᵀ and weights × V. Ranks as in ``token_matmuls``."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    weights = {i.name for i in proto.graph.initializer}
    ranks = _ranks(proto)
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "MatMul"
        and not n.domain
        and not weights.intersection(n.input)
        and min(ranks.get(n.input[0], 0), ranks.get(n.input[1], 0)) >= 3
    ]


def _ranks(proto: Any) -> dict[str, int]:
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*proto.graph.value_info, *proto.graph.input)
        if v.type.tensor_type.HasField("shape")
    }


def _quantize(
    src: Path,
    dst: Path,
    variant: str,
    feeds: Sequence[Mapping[str, np.ndarray]] | None,
    nodes: Sequence[str],
) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    # the optimised graph holds contrib ops that ONNX shape inference cannot type: their outputs are float
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if not nodes:
        raise ValueError(f"{src}: no token-wise MatMul with a constant weight to quantise")
    if variant in ("int8", "int8-attn"):
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=list(nodes),
            # int8-attn: also activation × activation MatMuls (both operands quantised per call)
            extra_options={**extra, "MatMulConstBOnly": variant == "int8"},
        )  # fmt: skip
        return
    if not feeds:
        raise ValueError("int8-static quantisation needs calibration inputs")

    class FeedReader(CalibrationDataReader):
        """The calibration inputs, one dict per calibration batch."""

        def __init__(self, data: Sequence[Mapping[str, np.ndarray]]) -> None:
            self.data = [dict(f) for f in data]
            self.pos = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.pos += 1
            return self.data[self.pos - 1] if self.pos <= len(self.data) else None

        def rewind(self) -> None:
            self.pos = 0

    quantize_static(
        str(src),
        str(dst),
        FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_quantize=list(nodes),
        # int32 bias quantisation needs an input scale, which ORT cannot find behind contrib ops: keep fp32
        extra_options={**extra, "ActivationSymmetric": True, "QuantizeBias": False},
    )


def contrib_ops(path: Path) -> tuple[str, ...]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return tuple(sorted({n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}))


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node))


def _copy_metadata(src: Path, dst: Path, extra: Mapping[str, Any]) -> None:
    """The contract's ``metadata_props`` of ``src`` (onnxruntime's saved graphs drop them) + ``extra``."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    proto = onnx.load(str(dst))
    del proto.metadata_props[:]
    for key, value in {
        **meta,
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()},
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    src_proto = onnx.load(str(src), load_external_data=False)
    proto.producer_name, proto.producer_version = src_proto.producer_name, src_proto.producer_version
    onnx.save(proto, str(dst))


def build_variant(
    plain: str | Path,
    out: str | Path,
    variant: str,
    calibration_feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    calibration_info: Mapping[str, Any] | None = None,
) -> VariantInfo:
    """Write ``variant`` of the plain fp32 graph ``plain`` to ``out`` (module docstring); ``plain`` is kept.
    ``calibration_feeds``: input dicts for ``int8-static`` (``calibration_info`` describes them)."""
    import onnxruntime as ort

    check_variant(variant)
    plain, out = Path(plain), Path(out)
    requires_ort = (
        f"onnxruntime>={ort.__version__} (CPU execution provider; contrib ops, domain com.microsoft)"
    )
    if variant == "plain":
        if out != plain:
            out.write_bytes(plain.read_bytes())
        info = VariantInfo("plain", "fp32", (), (), "any ONNX runtime with opset 18")
    else:
        with tempfile.TemporaryDirectory(prefix=".caloforge-opt-", dir=out.parent) as tmp:
            gelu = Path(tmp) / "gelu.onnx"
            n_gelu = fuse_fast_gelu(plain, gelu)
            opts = (
                f"FastGelu fusion of the tanh-approximated GELU ({n_gelu} nodes)",
                "ort:ORT_ENABLE_EXTENDED (offline: LayerNorm, erf-GELU, MatMul+bias; attention not fused)",
            )
            if variant == "optimized":
                optimize_offline(gelu, out)
                info = VariantInfo(variant, "fp32", opts, contrib_ops(out), requires_ort)
            else:
                quant = Path(tmp) / "quant.onnx"
                # ranks from the standard-op graph (shape inference stops at contrib ops); names are kept
                nodes = token_matmuls(plain) + (attention_matmuls(plain) if variant == "int8-attn" else [])
                _quantize(gelu, quant, variant, calibration_feeds, nodes)
                optimize_offline(quant, out)
                if variant == "int8":
                    precision = (
                        "int8 weights of the token-wise MatMuls (per tensor, symmetric), activations "
                        "quantised per call; fp32 elsewhere (attention core, per-shower layers, energy head)"
                    )
                    how = "onnxruntime.quantization.quantize_dynamic (token-wise MatMuls, before ORT fusions)"
                elif variant == "int8-attn":
                    precision = (
                        "int8 weights of the token-wise MatMuls (per tensor, symmetric) and both operands "
                        "of the attention MatMuls, activations quantised per call; fp32 elsewhere"
                    )
                    how = "onnxruntime.quantization.quantize_dynamic (token-wise + attention MatMuls)"
                else:
                    precision = (
                        "int8 weights and activations of the token-wise MatMuls (QDQ, calibrated), "
                        "fp32 elsewhere"
                    )
                    how = "onnxruntime.quantization.quantize_static (QDQ, MinMax calibration)"
                info = VariantInfo(
                    variant,
                    precision,
                    (opts[0], how, opts[1]),
                    contrib_ops(out),
                    requires_ort,
                    dict(calibration_info) if variant == "int8-static" and calibration_info else None,
                )
    _copy_metadata(
        plain,
        out,
        {
            "caloforge_variant": info.variant,
            "precision": info.precision,
            "optimizations": list(info.optimizations),
        },
    )
    return info


__all__ = [
    "DEFAULT_VARIANT",
    "VARIANTS",
    "VariantInfo",
    "attention_matmuls",
    "build_variant",
    "check_variant",
    "contrib_ops",
    "fuse_fast_gelu",
    "op_counts",
    "optimize_offline",
    "token_matmuls",
]
