"""Inference-optimised variants of an exported ONNX graph: onnxruntime graph fusions and int8 quantisation.

``build_variant(plain, out, variant)`` turns the plain fp32 graph that ``export_onnx`` wrote (and checked
against PyTorch) into one of ``VARIANTS``:

- ``plain``: the graph as exported (standard ONNX ops only, opset 18; any ONNX runtime);
- ``optimized`` (the default of ``caloforge export`` / ``registry pull``): fp32 with onnxruntime's graph
  optimisations applied offline at ``ORT_ENABLE_EXTENDED`` and saved (``SessionOptions.
  optimized_model_filepath``): constant folding, Gemm/MatMul + bias + activation fusion, LayerNorm fusion,
  GELU / QuickGelu fusion, and attention fusion where the pattern matches. The saved file contains
  onnxruntime contrib ops (domain ``com.microsoft``), so it needs onnxruntime (any execution provider that
  implements them; CPU does) of at least the version that wrote it — the card's ``requires`` says which;
  ``ORT_ENABLE_ALL`` is *not* used for saved files because its layout transforms (NCHWc) are specific to the
  CPU that wrote them;
- ``int8``: the ``optimized`` graph with dynamic int8 quantisation of the weights of every MatMul/Gemm
  (``onnxruntime.quantization.quantize_dynamic``; activations quantised per call), re-optimised so ORT fuses
  ``DynamicQuantizeMatMul``;
- ``int8-static``: static QDQ int8 quantisation (``quantize_static``) of MatMul/Gemm weights and activations
  with ranges calibrated on inputs from the model's own training distribution (conditions inside the trained
  ranges, noise by the seed convention; ``calibration_feeds`` in ``caloforge.registry.export``).

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

VARIANTS = ("plain", "optimized", "int8", "int8-static")
DEFAULT_VARIANT = "optimized"
QUANTIZED_OPS = ("MatMul", "Gemm")


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


def _quantize(src: Path, dst: Path, variant: str, feeds: Sequence[Mapping[str, np.ndarray]] | None) -> None:
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
    if variant == "int8":
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
            extra_options=extra,
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
            fused = Path(tmp) / "fused.onnx"
            optimize_offline(plain, fused)
            opts = (
                "ort:ORT_ENABLE_EXTENDED (offline: fused LayerNorm, GELU, MatMul+bias, attention if matched)",
            )
            if variant == "optimized":
                fused.replace(out)
                info = VariantInfo(variant, "fp32", opts, contrib_ops(out), requires_ort)
            else:
                quant = Path(tmp) / "quant.onnx"
                _quantize(fused, quant, variant, calibration_feeds)
                optimize_offline(quant, out)
                if variant == "int8":
                    precision = (
                        "int8 weights of MatMul/Gemm (per tensor, symmetric), activations quantised per call"
                    )
                    how = "onnxruntime.quantization.quantize_dynamic"
                else:
                    precision = (
                        "int8 weights and activations of MatMul/Gemm (QDQ, calibrated), fp32 elsewhere"
                    )
                    how = "onnxruntime.quantization.quantize_static (QDQ, MinMax calibration)"
                info = VariantInfo(
                    variant,
                    precision,
                    (*opts, how, "ort:ORT_ENABLE_EXTENDED after quantisation"),
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
    "build_variant",
    "check_variant",
    "contrib_ops",
    "op_counts",
    "optimize_offline",
]
