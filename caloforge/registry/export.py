"""Export a ShowerModel for inference outside Python training code: ONNX (sampler unrolled) or the bundle.

**ONNX.** ``SamplerGraph`` is the whole generation path of ``ShowerModel.generate`` (minus the seeded noise
draw) as one module: ``x = denoiser.prior(noise)``, the sampler's steps over the fixed time grid
``denoiser.time_grid(num_steps)`` (a Python list, so the loop unrolls into the graph; samplers have no
value-dependent control flow); for a model with the layer-energy head (``caloforge.platform.energy``, on
by default) the head's ODE from ``layer_noise`` (its sampler and step count from
``config.layer_energy``, grid ``energy.check_energy_grid``, also unrolled) gives the layer energies; then
``to_mev`` — the inverse transform (MeV, readout threshold, ≥ 0) and, with the head, each layer scaled to
its sampled energy (``energy.rescale_layers``). A one-step student (distilled, ``num_steps=1``) is the
same graph with one backbone step. Inputs (batch ``B`` dynamic; ``onnx_input_names(layer_energy)``):

==================  =======  ==============  ===================================================
name                dtype    shape           meaning
==================  =======  ==============  ===================================================
``noise``           float32  (B, Z, P, R)    standard normal voxel noise (see the seed convention)
``layer_noise``     float32  (B, Z)          standard normal layer-energy noise (models with the
                                             head only; absent otherwise)
``energy_mev``      float32  (B,)            incident energy, MeV
``theta_rad``       float32  (B,)            polar angle of the incident direction, rad
``phi_rad``         float32  (B,)            azimuth of the incident direction, rad
``particle_idx``    int64    (B,)            index in ``PARTICLES`` order (12 = unknown)
``detector_idx``    int64    (B,)            index in the model's detector vocabulary
``shower_mev``      float32  (B, Z, P, R)    output: voxel energies in MeV
==================  =======  ==============  ===================================================

Seed convention: shower i of ``ShowerModel.generate(seeds=s)`` draws, from one
``g = torch.Generator().manual_seed(s[i])``, first ``noise[i] = torch.randn((Z, P, R), generator=g)``,
then (with the head) ``layer_noise[i] = torch.randn((Z,), generator=g)``; ``initial_noise(seeds, shape)``
and ``initial_layer_noise(seeds, shape)`` reproduce them, so the ONNX graph fed that noise reproduces
``generate``. Any other N(0, 1) float32 source (e.g. a C++ caller's own RNG) gives equally valid showers,
not the same ones. docs/inference_contract.md is the full contract.

After export the file is checked (``onnx.checker``) and onnxruntime is run against the eager PyTorch
``generate`` on random in-range conditions at two batch sizes; an export that fails parity is deleted and
a ValueError raised — it is never published. Exporters: ``dynamo`` (``torch.export``, opset ≥ 18; opset 17
writes an invalid graph with this torch) or ``legacy`` (TorchScript tracing, opset 17/18, deprecated by
torch but ~20× faster to export).

**torch.** ``--format torch`` writes the bundle itself (config.json + model.safetensors, verified by
loading): it is data only (no pickled code), keeps every sampler and step count available, and loads with
``ShowerModel.load``. TorchScript is in maintenance mode in torch 2.x and a ``torch.export`` program would
freeze one step count while still needing torch — the ONNX file covers the frozen-graph use case.

No mlflow import here: the registry downloads bundles, this module only sees directories and models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import caloforge
from caloforge.platform.conditioning import (
    PARTICLE_INDEX,
    PARTICLES,
    UNKNOWN_PARTICLE_INDEX,
    Conditions,
    ConditionTensors,
)
from caloforge.platform.energy import check_energy_grid
from caloforge.platform.samplers import get_sampler
from caloforge.platform.shower_model import ShowerModel, derive_seeds
from caloforge.platform.shower_model import seeded_noise as platform_seeded_noise
from caloforge.registry.bundle import load_checked, sha256_file
from caloforge.registry.card import CARD_FILE, ModelCard, ValidRanges, build_card

log = logging.getLogger("caloforge.registry")

CONDITION_INPUT_NAMES: tuple[str, ...] = (
    "energy_mev",
    "theta_rad",
    "phi_rad",
    "particle_idx",
    "detector_idx",
)
ONNX_OUTPUT_NAME = "shower_mev"
ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "legacy")
PARITY_PURPOSE = 0x6F6E6E78  # "onnx": seeds of the parity check's random conditions
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL_MEV = 1e-5  # 10 eV, far below the 15 keV readout threshold


def onnx_input_names(layer_energy: bool) -> tuple[str, ...]:
    """Graph input names in order: ``noise``, ``layer_noise`` (models with the head only), the conditions."""
    return (
        ("noise", "layer_noise", *CONDITION_INPUT_NAMES)
        if layer_energy
        else ("noise", *CONDITION_INPUT_NAMES)
    )


class SamplerGraph(nn.Module):
    """noise [+ layer_noise] + conditions → showers in MeV for a fixed sampler and step count (the exported
    graph). ``forward(*inputs)`` takes the tensors named by ``self.input_names`` in that order: with the
    layer-energy head ``(noise, layer_noise, energy_mev, theta_rad, phi_rad, particle_idx, detector_idx)``,
    without it the same minus ``layer_noise``. The head runs with ``config.layer_energy``'s sampler and step
    count, as in ``ShowerModel.generate``."""

    def __init__(self, model: ShowerModel, num_steps: int | None = None, sampler: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.sampler_name = sampler if sampler is not None else model.default_sampler
        self.num_steps = int(num_steps if num_steps is not None else model.default_num_steps)
        self.sampler = get_sampler(self.sampler_name)
        # A Python list: the sampler loop unrolls over it at export (no data-dependent control flow).
        self.grid = [float(t) for t in model.denoiser.time_grid(self.num_steps).tolist()]
        self.final_singular = bool(model.denoiser.final_singular)
        self.layer_energy = model.has_energy_head
        self.input_names = onnx_input_names(self.layer_energy)
        le = model.config.layer_energy
        self.layer_sampler_name = le.sampler if self.layer_energy else None
        self.layer_num_steps = int(le.num_steps) if self.layer_energy else None
        self.layer_sampler = get_sampler(le.sampler) if self.layer_energy else None
        # The head's grid, as ShowerModel.sample_layer_energies builds it, also a Python list.
        self.layer_grid = (
            [float(t) for t in check_energy_grid(le.num_steps).tolist()] if self.layer_energy else []
        )

    @property
    def nfe(self) -> int:
        """Backbone network evaluations per shower."""
        return self.sampler.nfe(self.num_steps, self.final_singular)

    @property
    def layer_nfe(self) -> int:
        """Layer-energy head evaluations per shower (0 without the head; ~1000× cheaper than the backbone)."""
        if self.layer_sampler is None or self.layer_num_steps is None:
            return 0
        return self.layer_sampler.nfe(self.layer_num_steps)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"SamplerGraph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        named = dict(zip(self.input_names, inputs, strict=True))
        cond = ConditionTensors(*(named[name] for name in CONDITION_INPUT_NAMES))
        x_BZPR = self.model.denoiser.prior(named["noise"])
        x_BZPR = self.sampler(
            self.model.velocity, x_BZPR, self.grid, cond, final_singular=self.final_singular
        )
        layer_mev_BZ = self._layer_energies(named["layer_noise"], cond) if self.layer_energy else None
        return self.model.to_mev(x_BZPR, layer_mev_BZ)

    def _layer_energies(self, noise_BZ: torch.Tensor, cond: ConditionTensors) -> torch.Tensor:
        """``ShowerModel.sample_layer_energies`` over the fixed Python grid (unrolled at export)."""
        head, transform, method = self.model.energy_head, self.model.energy_transform, self.layer_sampler
        assert head is not None and transform is not None and method is not None

        def velocity(y_BZ: torch.Tensor, t_B: torch.Tensor, context_BD: torch.Tensor) -> torch.Tensor:
            return head(y_BZ, t_B, context_BD).float()

        context_BD = self.model.network.condition_context(cond)
        y_BZ = method(velocity, noise_BZ.float(), self.layer_grid, context_BD)
        return transform.inverse(y_BZ, cond.energy_mev)


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime vs eager PyTorch ``generate`` on random conditions."""

    batch_sizes: tuple[int, ...]
    n_voxels: int
    max_abs_err_mev: float
    max_rel_err: float
    n_mismatch: int
    n_threshold_flips: int
    rtol: float
    atol_mev: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        return (
            f"max abs err {self.max_abs_err_mev:.3g} MeV, max rel err {self.max_rel_err:.3g} over "
            f"{self.n_voxels} voxels (batches {list(self.batch_sizes)}; tolerance atol {self.atol_mev:g} MeV "
            f"+ rtol {self.rtol:g}; "
            f"{self.n_mismatch} mismatches, {self.n_threshold_flips} threshold flips)"
        )


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
    layer_energy: bool = False
    layer_sampler: str | None = None
    layer_num_steps: int | None = None
    layer_nfe: int = 0

    def layer_energy_info(self) -> dict[str, Any] | None:
        """The layer-energy stage frozen into the graph (None: no head, no ``layer_noise`` input)."""
        if not self.layer_energy:
            return None
        return {"sampler": self.layer_sampler, "num_steps": self.layer_num_steps, "nfe": self.layer_nfe}

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
            "export_seconds": round(self.export_seconds, 2),
        }


def seed_convention(layer_energy: bool) -> str:
    """How ``generate`` draws the graph's noise inputs from per-shower seeds (stored in the file and card)."""
    defaults = "without explicit seeds, seed[i] = caloforge.platform.shower_model.derive_seeds(seed, N)[i]."
    if not layer_energy:
        return (
            "noise[i] = torch.randn((Z, P, R), generator=torch.Generator().manual_seed(seed[i]), "
            f"dtype=float32) (caloforge.registry.export.initial_noise); {defaults} "
            "Any N(0,1) float32 noise is valid input."
        )
    return (
        "g = torch.Generator().manual_seed(seed[i]); noise[i] = torch.randn((Z, P, R), generator=g, "
        "dtype=float32), then layer_noise[i] = torch.randn((Z,), generator=g, dtype=float32) "
        f"(caloforge.registry.export.initial_noise / initial_layer_noise); {defaults} "
        "Any independent N(0,1) float32 noise (both inputs) is valid input."
    )


def particle_index_table() -> dict[str, int]:
    """PDG id (as a string key) → ``particle_idx``; any other PDG id → ``UNKNOWN_PARTICLE_INDEX``."""
    return {
        **{str(pdg): PARTICLE_INDEX[pdg] for pdg in PARTICLES.values()},
        "unknown": UNKNOWN_PARTICLE_INDEX,
    }


def io_spec(mesh_shape: Sequence[int], layer_energy: bool) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes, shapes and units of the ONNX inputs/outputs (pinned by a test). ``layer_energy``: the
    model has the layer-energy head (``ShowerModel.has_energy_head``), so the graph takes ``layer_noise``."""
    z, p, r = (int(v) for v in mesh_shape)
    vec = ["B"]
    layer_noise = [
        {"name": "layer_noise", "dtype": "float32", "shape": ["B", z], "unit": "1 (standard normal)"}
    ]
    return {
        "inputs": [
            {"name": "noise", "dtype": "float32", "shape": ["B", z, p, r], "unit": "1 (standard normal)"},
            *(layer_noise if layer_energy else []),
            {"name": "energy_mev", "dtype": "float32", "shape": vec, "unit": "MeV"},
            {"name": "theta_rad", "dtype": "float32", "shape": vec, "unit": "rad"},
            {"name": "phi_rad", "dtype": "float32", "shape": vec, "unit": "rad"},
            {"name": "particle_idx", "dtype": "int64", "shape": vec, "unit": "index (particle_index)"},
            {"name": "detector_idx", "dtype": "int64", "shape": vec, "unit": "index (detector_index)"},
        ],
        "outputs": [{"name": ONNX_OUTPUT_NAME, "dtype": "float32", "shape": ["B", z, p, r], "unit": "MeV"}],
    }


def seeded_noise(
    seeds: np.ndarray | Sequence[int], mesh_shape: Sequence[int], layer_energy: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(noise (N, Z, P, R), layer_noise (N, Z) or None) float32 numpy by the seed convention
    (``caloforge.platform.shower_model.seeded_noise``, which ``ShowerModel.generate`` uses)."""
    noise, layer_noise = platform_seeded_noise(
        np.asarray(seeds), tuple(int(v) for v in mesh_shape), layer_energy
    )
    return noise.numpy(), None if layer_noise is None else layer_noise.numpy()


def initial_noise(seeds: np.ndarray | Sequence[int], mesh_shape: Sequence[int]) -> np.ndarray:
    """(N, Z, P, R) float32 voxel noise by the seed convention (= ``ShowerModel.initial_noise``)."""
    return seeded_noise(seeds, mesh_shape, layer_energy=False)[0]


def initial_layer_noise(seeds: np.ndarray | Sequence[int], mesh_shape: Sequence[int]) -> np.ndarray:
    """(N, Z) float32 layer-energy noise by the seed convention (= ``ShowerModel.initial_layer_noise``)."""
    layer_noise = seeded_noise(seeds, mesh_shape, layer_energy=True)[1]
    assert layer_noise is not None
    return layer_noise


def onnx_feeds(
    detectors: Sequence[str],
    conditions: Conditions,
    noise_NZPR: np.ndarray,
    layer_noise_NZ: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The input dict of the ONNX graph for ``conditions`` (unknown detector → ValueError), in graph input
    order. ``layer_noise_NZ`` is required by (and only by) a graph of a model with the layer-energy head."""
    lookup = {d: i for i, d in enumerate(detectors)}
    unknown = sorted(set(np.unique(conditions.detector).tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown} for this model (known: {list(detectors)})")
    if noise_NZPR.ndim != 4 or noise_NZPR.shape[0] != len(conditions):
        raise ValueError(f"noise must be (N={len(conditions)}, Z, P, R), got {noise_NZPR.shape}")
    feeds = {"noise": np.ascontiguousarray(noise_NZPR, dtype=np.float32)}
    if layer_noise_NZ is not None:
        expected = (len(conditions), noise_NZPR.shape[1])
        if layer_noise_NZ.shape != expected:
            raise ValueError(f"layer_noise must be (N, Z) = {expected}, got {layer_noise_NZ.shape}")
        feeds["layer_noise"] = np.ascontiguousarray(layer_noise_NZ, dtype=np.float32)
    return feeds | {
        "energy_mev": conditions.energy_mev.astype(np.float32),
        "theta_rad": conditions.theta_rad.astype(np.float32),
        "phi_rad": conditions.phi_rad.astype(np.float32),
        "particle_idx": np.array(
            [PARTICLE_INDEX.get(int(p), UNKNOWN_PARTICLE_INDEX) for p in conditions.pdg], dtype=np.int64
        ),
        "detector_idx": np.array([lookup[d] for d in conditions.detector], dtype=np.int64),
    }


def ort_session(path: str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with explicit thread counts (``threads`` intra-op, 1 inter-op)."""
    import onnxruntime as ort

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for invalid/corrupt files
        raise ValueError(f"{path}: onnxruntime cannot load this file: {exc}") from exc


def random_conditions(
    detectors: Sequence[str], n: int, seed: int, ranges: ValidRanges | None = None
) -> Conditions:
    """``n`` random conditions inside ``ranges`` (log-uniform energy; default 1 GeV–1 TeV, θ ∈ [0.1, 1.4])."""
    rng = np.random.default_rng([int(seed), PARITY_PURPOSE])
    e_lo, e_hi = ranges.energy_mev if ranges and ranges.energy_mev else (1e3, 1e6)
    t_lo, t_hi = ranges.theta_rad if ranges and ranges.theta_rad else (0.1, 1.4)
    names = list(ranges.particles) if ranges and ranges.particles else list(PARTICLES)
    energy = np.exp(rng.uniform(math.log(e_lo), math.log(e_hi), n))
    return Conditions.make(
        energy,
        rng.uniform(t_lo, t_hi, n),
        rng.uniform(-math.pi, math.pi, n),
        np.array([PARTICLES[names[i]] for i in rng.integers(0, len(names), n)], dtype=np.int64),
        np.array([detectors[i] for i in rng.integers(0, len(detectors), n)]),
    )


def check_parity(
    model: ShowerModel,
    onnx_path: str | Path,
    num_steps: int,
    sampler: str,
    *,
    batch_sizes: Sequence[int] = (1, 5),
    seed: int = 0,
    ranges: ValidRanges | None = None,
    rtol: float = DEFAULT_RTOL,
    atol_mev: float = DEFAULT_ATOL_MEV,
    threads: int = 1,
) -> ParityReport:
    """Run onnxruntime and ``model.generate`` on the same random conditions and seeds; compare in MeV.

    The ONNX side draws its noise (and, with the layer-energy head, its layer noise) from the same seeds by
    the seed convention (``OnnxShowerGenerator.generate(seeds=...)``), so the check covers both stages.

    A voxel mismatches when |onnx − torch| > atol + rtol·|torch|, except *threshold flips*: one side is 0
    and the other within 0.1 % of the readout threshold (the cut turned a value sitting on it either way).
    Non-finite ONNX output always fails.
    """
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive, got {list(batch_sizes)}")
    detectors = list(model.vocab.detectors)
    generator = OnnxShowerGenerator(onnx_path, detectors, model.mesh_shape, threads=threads)
    if generator.layer_energy != model.has_energy_head:
        raise ValueError(
            f"{onnx_path}: graph inputs {list(generator.input_names)} do not fit the model "
            f"(layer-energy head: {model.has_energy_head})"
        )
    threshold = float(model.transform.threshold_mev)
    max_abs, max_rel, n_vox, n_bad, n_flip = 0.0, 0.0, 0, 0, 0
    finite = True
    for i, b in enumerate(int(b) for b in batch_sizes):
        cond = random_conditions(detectors, b, seed + i, ranges)
        seeds = derive_seeds(seed + i, b, purpose=PARITY_PURPOSE)
        ref = model.generate(cond, num_steps=num_steps, sampler=sampler, seeds=seeds, batch_size=max(b, 1))
        out = generator.generate(cond, seeds=seeds)
        if out.shape != ref.shape:
            raise ValueError(f"{onnx_path}: output shape {out.shape} != PyTorch {ref.shape} at batch {b}")
        finite &= bool(np.isfinite(out).all())
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        err = np.abs(out64 - ref64)
        bad = err > atol_mev + rtol * np.abs(ref64)
        flips = bad & ((out64 == 0) | (ref64 == 0)) & (np.maximum(out64, ref64) <= threshold * 1.001)
        n_flip += int(flips.sum())
        n_bad += int((bad & ~flips).sum())
        n_vox += err.size
        max_abs = max(max_abs, float(err.max(initial=0.0)))
        big = np.abs(ref64) > atol_mev
        if big.any():
            max_rel = max(max_rel, float((err[big] / np.abs(ref64[big])).max()))
    return ParityReport(
        batch_sizes=tuple(int(b) for b in batch_sizes),
        n_voxels=n_vox,
        max_abs_err_mev=max_abs,
        max_rel_err=max_rel,
        n_mismatch=n_bad,
        n_threshold_flips=n_flip,
        rtol=float(rtol),
        atol_mev=float(atol_mev),
        passed=finite and n_bad == 0,
    )


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
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "caloforge"
    proto.producer_version = caloforge.__version__
    onnx.save(proto, str(path))


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
    parity_batch_sizes: Sequence[int] = (1, 5),
    parity_seed: int = 0,
    overwrite: bool = False,
) -> OnnxExport:
    """Export the unrolled sampler of ``model`` (a ShowerModel or bundle directory) to ``out_path``.

    Published only if onnxruntime matches PyTorch within ``atol_mev`` + ``rtol``·|x| (else ValueError and
    no file). ``ranges`` bounds the random parity conditions (default: the bundle's trained ranges).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"opset {opset}: the dynamo exporter needs opset >= 18 (17 writes an invalid graph)")
    if exporter == "legacy" and opset < 17:
        raise ValueError(f"opset {opset}: use opset 17 or 18")
    if not (rtol >= 0 and atol_mev >= 0):
        raise ValueError(f"tolerances must be >= 0, got rtol={rtol}, atol_mev={atol_mev}")
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
                "layer_energy": (
                    {
                        "sampler": graph.layer_sampler_name,
                        "num_steps": graph.layer_num_steps,
                        "nfe": graph.layer_nfe,
                    }
                    if graph.layer_energy
                    else None
                ),
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
        )
        if not parity.passed:
            raise ValueError(
                f"ONNX export of {out_path.name} failed the onnxruntime parity check, not published: "
                f"{parity.summary()}"
            )
        tmp.replace(out_path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"ONNX export to {out_path} failed: {type(exc).__name__}: {exc}") from exc
    log.info(
        "exported %s (%s×%d, nfe %d; layer-energy head %s): %s",
        out_path,
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
        layer_energy=graph.layer_energy,
        layer_sampler=graph.layer_sampler_name,
        layer_num_steps=graph.layer_num_steps,
        layer_nfe=graph.layer_nfe,
    )


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
    overwrite: bool = False,
    registered: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Export a bundle into ``out_dir`` and write its model card next to it.

    ``onnx``: ``out_dir/model.onnx`` (parity-checked) + ``out_dir/model_card.json``; ``torch``:
    ``out_dir/bundle/`` (verified copy) + the card. ``registered`` (``RegisteredVersion.to_dict()``) adds the
    registry's name, version, aliases, metrics and promotion records to the card. Returns the card.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
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
                overwrite=overwrite,
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


class OnnxShowerGenerator:
    """Generate showers from an exported ONNX file with onnxruntime (Python reference for C++ callers).

    Whether the graph has the layer-energy stage is read from the file's inputs (``layer_energy``: it takes
    ``layer_noise``); anything but ``onnx_input_names(False)`` / ``onnx_input_names(True)`` is refused."""

    def __init__(
        self,
        onnx_path: str | Path,
        detectors: Sequence[str],
        mesh_shape: Sequence[int],
        ranges: ValidRanges | None = None,
        threads: int = 1,
    ) -> None:
        self.path = Path(onnx_path)
        self.session = ort_session(self.path, threads=threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        if self.input_names not in (onnx_input_names(False), onnx_input_names(True)):
            raise ValueError(
                f"{self.path}: graph inputs {list(self.input_names)} are not those of a caloforge shower "
                f"generator ({list(onnx_input_names(True))}, layer_noise only with the layer-energy head)"
            )
        self.layer_energy = "layer_noise" in self.input_names
        self.detectors = tuple(detectors)
        self.mesh_shape = tuple(int(v) for v in mesh_shape)
        self.ranges = ranges

    @classmethod
    def from_card(cls, directory: str | Path, threads: int = 1) -> OnnxShowerGenerator:
        """From a directory written by ``caloforge registry pull`` / ``caloforge export`` (ONNX + card)."""
        directory = Path(directory)
        card = ModelCard.load(directory / CARD_FILE)
        onnx_exports = [e for e in card.exports if e.get("format") == "onnx"]
        if not onnx_exports:
            raise ValueError(f"{directory / CARD_FILE}: no ONNX export recorded")
        exp = onnx_exports[-1]
        path = directory / exp["file"]
        if not path.is_file():
            raise ValueError(f"{path}: ONNX file listed in the model card is missing")
        if sha256_file(path) != exp["sha256"]:
            raise ValueError(f"{path}: corrupt (sha256 differs from the model card)")
        return cls(
            path, card.architecture["detectors"], card.architecture["mesh_shape"], card.valid_ranges, threads
        )

    def generate(
        self,
        conditions: Conditions,
        seeds: np.ndarray | None = None,
        seed: int = 0,
        noise_NZPR: np.ndarray | None = None,
        strict: bool = False,
        layer_noise_NZ: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 (N, Z, P, R) MeV. Noise (and layer noise, for a graph with the layer-energy head) from
        ``seeds`` (default ``derive_seeds(seed, N)``) by the seed convention, unless given: then
        ``noise_NZPR`` and — exactly when the graph takes it — ``layer_noise_NZ``."""
        if self.ranges is not None:
            self.ranges.check(conditions, strict=strict)
        if noise_NZPR is None:
            if layer_noise_NZ is not None:
                raise ValueError("layer_noise_NZ given without noise_NZPR: pass both, or seeds")
            seeds = derive_seeds(seed, len(conditions)) if seeds is None else np.asarray(seeds)
            noise_NZPR, layer_noise_NZ = seeded_noise(seeds, self.mesh_shape, self.layer_energy)
        elif self.layer_energy and layer_noise_NZ is None:
            raise ValueError(
                f"{self.path.name} has the layer-energy stage: pass layer_noise_NZ with noise_NZPR"
            )
        elif not self.layer_energy and layer_noise_NZ is not None:
            raise ValueError(f"{self.path.name} has no layer-energy stage: it takes no layer_noise_NZ")
        feeds = onnx_feeds(self.detectors, conditions, noise_NZPR, layer_noise_NZ)
        return self.session.run([ONNX_OUTPUT_NAME], feeds)[0]


__all__ = [
    "CONDITION_INPUT_NAMES",
    "ONNX_FILE",
    "ONNX_OUTPUT_NAME",
    "OnnxExport",
    "OnnxShowerGenerator",
    "ParityReport",
    "SamplerGraph",
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
