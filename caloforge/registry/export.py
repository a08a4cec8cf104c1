"""Export a ShowerModel for inference outside Python training code: ONNX (sampler unrolled) or the bundle.

**ONNX.** ``export_onnx`` writes ``SamplerGraph`` (``caloforge.registry.onnx_graph``: the unrolled sampler
and layer-energy head, its inputs/outputs and the seed convention) to a file, checks it (``onnx.checker``)
and stores the contract in its ``metadata_props``; then onnxruntime is run against the eager PyTorch
``generate`` on random in-range conditions at two batch sizes (``caloforge.registry.parity``). An export
that fails parity is deleted and a ValueError raised — it is never published. Then the graph that is published
is built from it (``variant``, ``caloforge.registry.optimize``: ``plain``, ``optimized`` — the default:
onnxruntime's graph fusions saved offline —, ``int8`` dynamic or ``int8-static`` calibrated quantisation);
every variant but ``plain`` must pass the fidelity gate (``caloforge.registry.fidelity``: its showers against
the fp32 graph's, classifier AUC and energy response), the ``optimized`` one also the parity check; a graph
that fails is not published. Exporters: ``dynamo``
(``torch.export``, opset ≥ 18; opset 17 writes an invalid graph with this torch) or ``legacy``
(TorchScript tracing, opset 17/18, deprecated by torch but ~20× faster to export).

**torch.** ``--format torch`` writes the bundle itself (config.json + model.safetensors, verified by
loading): it is data only (no pickled code), keeps every sampler and step count available, and loads with
``ShowerModel.load``. TorchScript is in maintenance mode in torch 2.x and a ``torch.export`` program would
freeze one step count while still needing torch — the ONNX file covers the frozen-graph use case.

``export_bundle`` does either into a directory and writes the model card next to it (``caloforge export``,
``caloforge registry pull``).

The names of the inference contract stay importable from here (docs/inference_contract.md and the stored
seed convention name ``caloforge.registry.export``): the graph's names, ``SamplerGraph``, the seeded noise
(``caloforge.registry.onnx_graph``), ``OnnxShowerGenerator``, ``ort_session``, ``onnx_feeds``
(``caloforge.registry.onnx_runtime``) and ``check_parity``, ``ParityReport``, ``random_conditions``
(``caloforge.registry.parity``).

No mlflow import here: the registry downloads bundles, this module only sees directories and models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import caloforge
from caloforge.platform.hashing import sha256_file
from caloforge.platform.shower_model import ShowerModel
from caloforge.registry.bundle import load_checked
from caloforge.registry.card import CARD_FILE, ModelCard, ValidRanges, build_card
from caloforge.registry.onnx_graph import (
    CONDITION_INPUT_NAMES,
    ONNX_OUTPUT_NAME,
    SamplerGraph,
    initial_layer_noise,
    initial_noise,
    io_spec,
    onnx_input_names,
    particle_index_table,
    seed_convention,
    seeded_noise,
)
from caloforge.registry.onnx_runtime import OnnxShowerGenerator, onnx_feeds, ort_session
from caloforge.registry.optimize import DEFAULT_VARIANT, VARIANTS, VariantInfo, build_variant, check_variant
from caloforge.registry.parity import (
    DEFAULT_ATOL_MEV,
    DEFAULT_MAX_MISMATCH_FRACTION,
    DEFAULT_OUTLIER_LIMIT,
    DEFAULT_RTOL,
    ParityReport,
    check_allowance,
    check_parity,
    random_conditions,
)

if TYPE_CHECKING:
    from caloforge.registry.fidelity import FidelityGateConfig, FidelityReport

log = logging.getLogger("caloforge.registry")

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "legacy")
CALIBRATION_PURPOSE = 0x63616C69  # "cali": seeds of the int8-static calibration inputs
DEFAULT_CALIBRATION_SHOWERS = 64


@dataclass(frozen=True)
class OnnxExport:
    """A published ONNX file and how it was made."""

    path: Path
    sha256: str
    opset: int
    exporter: str
    sampler: str
    num_steps: int
    nfe: int
    mesh_shape: tuple[int, int, int]
    detectors: tuple[str, ...]
    parity: ParityReport
    export_seconds: float
    # the layer-energy stage frozen into the graph, as the card records it (``SamplerGraph.
    # layer_energy_info``: sampler, num_steps, nfe, empty_layers, space, condition_voxels); None: no head
    layer_info: dict[str, Any] | None = None
    variant: VariantInfo | None = None  # None: an OnnxExport made before variants (plain)
    fidelity: FidelityReport | None = None  # None for the plain graph (parity only)
    parity_of: str = "published graph"

    @property
    def layer_energy(self) -> bool:
        """Whether the graph samples the layer energies itself (and so takes a ``layer_noise`` input)."""
        return self.layer_info is not None

    @property
    def layer_sampler(self) -> str | None:
        return self.layer_info["sampler"] if self.layer_info is not None else None

    @property
    def layer_num_steps(self) -> int | None:
        return self.layer_info["num_steps"] if self.layer_info is not None else None

    @property
    def layer_nfe(self) -> int:
        """Layer-energy head evaluations per shower (0 without the head)."""
        return self.layer_info["nfe"] if self.layer_info is not None else 0

    @property
    def layer_empty_layers(self) -> str | None:
        """Which stage may empty a layer (``layer_energy.empty_layers``; None without the head)."""
        return self.layer_info["empty_layers"] if self.layer_info is not None else None

    def layer_energy_info(self) -> dict[str, Any] | None:
        """The layer-energy stage frozen into the graph (None: no head, no ``layer_noise`` input)."""
        return dict(self.layer_info) if self.layer_info is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "onnx",
            "file": self.path.name,
            "sha256": self.sha256,
            "opset": self.opset,
            "exporter": self.exporter,
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "nfe": self.nfe,
            "mesh_shape": list(self.mesh_shape),
            "layer_energy": self.layer_energy_info(),
            **io_spec(self.mesh_shape, self.layer_energy),
            "detector_index": {d: i for i, d in enumerate(self.detectors)},
            "particle_index": particle_index_table(),
            "seed_convention": seed_convention(self.layer_energy),
            "parity": self.parity.to_dict(),
            "parity_of": self.parity_of,
            **(
                self.variant or VariantInfo("plain", "fp32", (), (), "any ONNX runtime with opset 18")
            ).to_dict(),
            "fidelity_gate": self.fidelity.to_dict() if self.fidelity is not None else None,
            "size_bytes": self.path.stat().st_size if self.path.is_file() else None,
            "export_seconds": round(self.export_seconds, 2),
        }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's informational chatter (torchvision op registration, legacy deprecation)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_graph(graph: SamplerGraph, path: Path, opset: int, exporter: str) -> None:
    z, p, r = graph.model.mesh_shape
    b = 2
    gen = torch.Generator().manual_seed(0)
    example = {
        "noise": torch.randn((b, z, p, r), generator=gen),
        "layer_noise": torch.randn((b, z), generator=gen),
        "energy_mev": torch.full((b,), 1e4),
        "theta_rad": torch.full((b,), 0.5),
        "phi_rad": torch.zeros(b),
        "particle_idx": torch.zeros(b, dtype=torch.int64),
        "detector_idx": torch.zeros(b, dtype=torch.int64),
    }
    names = graph.input_names
    args = tuple(example[name] for name in names)
    with _quiet_exporter(), torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            torch.onnx.export(
                graph,
                args,
                str(path),
                input_names=list(names),
                output_names=[ONNX_OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"inputs": tuple({0: batch} for _ in names)},  # forward(self, *inputs)
                external_data=False,
                verbose=False,
            )
        else:
            torch.onnx.export(
                graph,
                args,
                str(path),
                input_names=list(names),
                output_names=[ONNX_OUTPUT_NAME],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in (*names, ONNX_OUTPUT_NAME)},
            )


def _annotate(path: Path, input_names: Sequence[str], metadata: Mapping[str, Any]) -> None:
    """Check the graph and store the contract in the file's metadata_props."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    names = [i.name for i in proto.graph.input]
    if names != list(input_names) or [o.name for o in proto.graph.output] != [ONNX_OUTPUT_NAME]:
        raise ValueError(
            f"{path}: unexpected graph inputs {names} / outputs {[o.name for o in proto.graph.output]}"
        )
    fixed = {
        i.name: i.type.tensor_type.shape.dim[0].dim_value
        for i in proto.graph.input
        if i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].dim_param
    }
    if fixed:
        raise ValueError(
            f"{path}: the exporter fixed the batch size of inputs {fixed} (a Python int taken from a tensor "
            "shape in the model's forward specialises it); the published graph must take any batch"
        )
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "caloforge"
    proto.producer_version = caloforge.__version__
    onnx.save(proto, str(path))


def calibration_feeds(
    model: ShowerModel,
    ranges: ValidRanges | None,
    n: int = DEFAULT_CALIBRATION_SHOWERS,
    seed: int = 0,
    batch: int = 16,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Inputs of static-quantisation calibration from the model's own training distribution: ``n``
    conditions inside the trained ``ranges`` (``random_conditions``), noise by the seed convention from
    ``derive_seeds(seed, n, purpose=CALIBRATION_PURPOSE)``; in batches of ``batch``. Returns (feeds, info)."""
    from caloforge.platform.shower_model import derive_seeds

    if n < 1 or batch < 1:
        raise ValueError(f"calibration: n and batch must be >= 1, got {n}, {batch}")
    detectors = list(model.vocab.detectors)
    cond = random_conditions(detectors, n, seed + CALIBRATION_PURPOSE, ranges)
    noise, layer_noise = seeded_noise(
        derive_seeds(seed, n, purpose=CALIBRATION_PURPOSE), model.mesh_shape, model.has_energy_head
    )
    feeds = []
    for i in range(0, n, batch):
        idx = np.arange(i, min(i + batch, n))
        feeds.append(
            onnx_feeds(
                detectors, cond.subset(idx), noise[idx], None if layer_noise is None else layer_noise[idx]
            )
        )
    info = {
        "n_showers": n,
        "seed": seed,
        "conditions": "random_conditions inside the trained ranges ("
        + (ranges.source if ranges else "defaults")
        + ")",
        "noise": "seed convention, derive_seeds(seed, n, purpose=CALIBRATION_PURPOSE)",
    }
    return feeds, info


def export_onnx(
    model: ShowerModel | str | Path,
    out_path: str | Path,
    *,
    num_steps: int | None = None,
    sampler: str | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    ranges: ValidRanges | None = None,
    rtol: float = DEFAULT_RTOL,
    atol_mev: float = DEFAULT_ATOL_MEV,
    max_mismatch_fraction: float = DEFAULT_MAX_MISMATCH_FRACTION,
    outlier_limit: float = DEFAULT_OUTLIER_LIMIT,
    parity_batch_sizes: Sequence[int] = (1, 5),
    parity_seed: int = 0,
    overwrite: bool = False,
    variant: str = DEFAULT_VARIANT,
    gate: FidelityGateConfig | None = None,
    calibration_showers: int = DEFAULT_CALIBRATION_SHOWERS,
) -> OnnxExport:
    """Export the unrolled sampler of ``model`` (a ShowerModel or bundle directory) to ``out_path``.

    The fp32 graph is published only if onnxruntime matches PyTorch within ``atol_mev`` + ``rtol``·|x| (at
    most ``max_mismatch_fraction`` of the voxels beyond it, none beyond ``outlier_limit`` times it; else
    ValueError and no file: ``caloforge.registry.parity``). ``ranges`` bounds the random parity, gate and
    calibration conditions (default: the bundle's trained ranges). ``variant``
    (``caloforge.registry.optimize.VARIANTS``) is what is written: every variant but ``plain`` must also
    pass the fidelity gate ``gate`` (default ``FidelityGateConfig()``) against the fp32 graph;
    ``optimized`` also the parity check. ``calibration_showers``: ``int8-static``.
    """
    check_variant(variant)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"opset {opset}: the dynamo exporter needs opset >= 18 (17 writes an invalid graph)")
    if exporter == "legacy" and opset < 17:
        raise ValueError(f"opset {opset}: use opset 17 or 18")
    if not (rtol >= 0 and atol_mev >= 0):
        raise ValueError(f"tolerances must be >= 0, got rtol={rtol}, atol_mev={atol_mev}")
    check_allowance(max_mismatch_fraction, outlier_limit)
    if isinstance(model, str | Path):
        model, info = load_checked(model)
        ranges = ranges if ranges is not None else info.ranges
    if not isinstance(model, ShowerModel):
        raise ValueError(
            f"export_onnx expects a ShowerModel or a bundle directory, got {type(model).__name__}"
        )
    if model.device.type != "cpu":
        raise ValueError(f"export_onnx runs on CPU; the model is on {model.device} (pass model.cpu())")
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"{out_path}: the ONNX file name must end in .onnx")
    if out_path.exists() and not overwrite:
        raise ValueError(f"{out_path}: exists (pass overwrite=True / --overwrite to replace it)")
    model = model.eval()
    graph = SamplerGraph(model, num_steps=num_steps, sampler=sampler).eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}.onnx")
    var_tmp = out_path.with_name(f".{out_path.stem}.{variant}.tmp-{os.getpid()}.onnx")
    fidelity: FidelityReport | None = None
    parity_of = "published graph"
    t0 = time.perf_counter()
    try:
        _export_graph(graph, tmp, opset, exporter)
        _annotate(
            tmp,
            graph.input_names,
            {
                "caloforge_version": caloforge.__version__,
                "mesh_shape": list(model.mesh_shape),
                "detector_index": {d: i for i, d in enumerate(model.vocab.detectors)},
                "particle_index": particle_index_table(),
                "sampler": graph.sampler_name,
                "num_steps": str(graph.num_steps),
                "layer_energy": graph.layer_energy_info(),
                "seed_convention": seed_convention(graph.layer_energy),
                "units": "energy_mev MeV; theta_rad, phi_rad rad; shower_mev MeV",
            },
        )
        export_s = time.perf_counter() - t0
        parity = check_parity(
            model,
            tmp,
            graph.num_steps,
            graph.sampler_name,
            batch_sizes=parity_batch_sizes,
            seed=parity_seed,
            ranges=ranges,
            rtol=rtol,
            atol_mev=atol_mev,
            max_mismatch_fraction=max_mismatch_fraction,
            outlier_limit=outlier_limit,
        )
        if not parity.passed:
            raise ValueError(
                f"ONNX export of {out_path.name} failed the onnxruntime parity check, not published: "
                f"{parity.summary()}"
            )
        if variant == "plain":
            vinfo = build_variant(tmp, tmp, "plain")
            tmp.replace(out_path)
        else:
            feeds, calib = (
                calibration_feeds(model, ranges, calibration_showers)
                if variant == "int8-static"
                else (None, None)
            )
            vinfo = build_variant(tmp, var_tmp, variant, feeds, calib)
            if variant == "optimized":
                parity = check_parity(
                    model,
                    var_tmp,
                    graph.num_steps,
                    graph.sampler_name,
                    batch_sizes=parity_batch_sizes,
                    seed=parity_seed,
                    ranges=ranges,
                    rtol=rtol,
                    atol_mev=atol_mev,
                    max_mismatch_fraction=max_mismatch_fraction,
                    outlier_limit=outlier_limit,
                )
                if not parity.passed:
                    raise ValueError(
                        f"the optimized graph of {out_path.name} failed the onnxruntime parity check, not "
                        f"published: {parity.summary()}"
                    )
            else:
                parity_of = "fp32 graph before quantisation"
            fidelity = _gate(model, var_tmp, tmp, ranges, gate)
            if not fidelity.passed:
                raise ValueError(
                    f"the {variant} graph of {out_path.name} failed the fidelity gate, not published: "
                    f"{fidelity.summary()}"
                )
            var_tmp.replace(out_path)
            tmp.unlink()
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        var_tmp.unlink(missing_ok=True)
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"ONNX export to {out_path} failed: {type(exc).__name__}: {exc}") from exc
    log.info(
        "exported %s (%s, %s×%d, nfe %d; layer-energy head %s): %s",
        out_path,
        variant,
        graph.sampler_name,
        graph.num_steps,
        graph.nfe,
        f"{graph.layer_sampler_name}×{graph.layer_num_steps}" if graph.layer_energy else "none",
        parity.summary(),
    )
    return OnnxExport(
        path=out_path,
        sha256=sha256_file(out_path),
        opset=opset,
        exporter=exporter,
        sampler=graph.sampler_name,
        num_steps=graph.num_steps,
        nfe=graph.nfe,
        mesh_shape=tuple(model.mesh_shape),  # type: ignore[arg-type]
        detectors=tuple(model.vocab.detectors),
        parity=parity,
        export_seconds=export_s,
        layer_info=graph.layer_energy_info(),
        variant=vinfo,
        fidelity=fidelity,
        parity_of=parity_of,
    )


def _gate(
    model: ShowerModel,
    candidate: Path,
    fp32: Path,
    ranges: ValidRanges | None,
    gate: FidelityGateConfig | None,
) -> FidelityReport:
    from caloforge.registry.fidelity import fidelity_gate

    report = fidelity_gate(
        candidate,
        fp32,
        detectors=list(model.vocab.detectors),
        mesh=model.mesh,
        threshold_mev=float(model.transform.threshold_mev),
        ranges=ranges,
        config=gate,
    )
    log.info("fidelity gate of %s: %s", candidate.name, report.summary())
    return report


def export_torch(bundle_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """``--format torch``: a verified copy of the bundle (config.json + model.safetensors) in ``out_dir``."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    load_checked(bundle_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(bundle_dir, tmp)
        load_checked(tmp, what=str(out_dir))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


FORMATS = ("onnx", "torch")
TORCH_DIR = "bundle"


def export_bundle(
    bundle_dir: str | Path,
    out_dir: str | Path,
    fmt: str = "onnx",
    *,
    num_steps: int | None = None,
    sampler: str | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    rtol: float = DEFAULT_RTOL,
    atol_mev: float = DEFAULT_ATOL_MEV,
    max_mismatch_fraction: float = DEFAULT_MAX_MISMATCH_FRACTION,
    outlier_limit: float = DEFAULT_OUTLIER_LIMIT,
    overwrite: bool = False,
    registered: Mapping[str, Any] | None = None,
    variant: str = DEFAULT_VARIANT,
    gate: FidelityGateConfig | None = None,
    calibration_showers: int = DEFAULT_CALIBRATION_SHOWERS,
) -> ModelCard:
    """Export a bundle into ``out_dir`` and write its model card next to it.

    ``onnx``: ``out_dir/model.onnx`` (parity-checked) + ``out_dir/model_card.json``; ``torch``:
    ``out_dir/bundle/`` (verified copy) + the card. ``registered`` (``RegisteredVersion.to_dict()``) adds the
    registry's name, version, aliases, metrics and promotion records to the card. Returns the card.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    check_variant(variant)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    card_path = out_dir / CARD_FILE
    target = out_dir / (ONNX_FILE if fmt == "onnx" else TORCH_DIR)
    if not overwrite and (card_path.exists() or target.exists()):
        raise ValueError(
            f"{out_dir}: already holds {target.name} / {CARD_FILE} (pass overwrite=True / --overwrite)"
        )
    model, info = load_checked(bundle_dir)
    card = build_card(info, registered)
    if fmt == "torch" and (num_steps is not None or sampler is not None):
        raise ValueError(
            "--steps/--sampler apply to --format onnx; a torch bundle keeps every sampler and step count"
        )
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "onnx":
            exp = export_onnx(
                model,
                target,
                num_steps=num_steps,
                sampler=sampler,
                opset=opset,
                exporter=exporter,
                ranges=info.ranges,
                rtol=rtol,
                atol_mev=atol_mev,
                max_mismatch_fraction=max_mismatch_fraction,
                outlier_limit=outlier_limit,
                overwrite=overwrite,
                variant=variant,
                gate=gate,
                calibration_showers=calibration_showers,
            )
            card = card.with_export(exp.to_dict())
        else:
            export_torch(bundle_dir, target, overwrite=overwrite)
            card = card.with_export(
                {
                    "format": "torch",
                    "dir": TORCH_DIR,
                    "files": info.files,
                    "load": "caloforge.platform.shower_model.ShowerModel.load(dir)",
                    "default_sampler": info.sampler,
                    "default_num_steps": info.num_steps,
                }
            )
        card.write(card_path)
    except BaseException:
        if created:  # leave no empty output directory behind (the exports clean up their own files)
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    return card


__all__ = [
    "CALIBRATION_PURPOSE",
    "CONDITION_INPUT_NAMES",
    "DEFAULT_ATOL_MEV",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "DEFAULT_VARIANT",
    "EXPORTERS",
    "FORMATS",
    "ONNX_FILE",
    "ONNX_OUTPUT_NAME",
    "TORCH_DIR",
    "VARIANTS",
    "OnnxExport",
    "OnnxShowerGenerator",
    "ParityReport",
    "SamplerGraph",
    "calibration_feeds",
    "check_parity",
    "export_bundle",
    "export_onnx",
    "export_torch",
    "initial_layer_noise",
    "initial_noise",
    "io_spec",
    "onnx_feeds",
    "onnx_input_names",
    "ort_session",
    "particle_index_table",
    "random_conditions",
    "seed_convention",
    "seeded_noise",
]
