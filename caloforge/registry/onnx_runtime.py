"""Running an exported ONNX file with onnxruntime: the Python reference for C++/Geant4 callers.

``ort_session(path, threads, profile)`` is a CPU session with the settings of one of two documented profiles
(``SESSION_PROFILES``; docs/inference_contract.md): ``grid`` — one shower at a time in a Geant4 job on one
core: one intra-op and one inter-op thread, no spin-waiting, sequential execution, memory arena on — and
``batch`` — many showers per call: ``threads`` intra-op threads (default: every core), spinning allowed.
``onnx_feeds`` turns
``Conditions`` (+ noise) into the graph's input dict (names and dtypes of ``caloforge.registry.onnx_graph``);
``OnnxShowerGenerator`` wraps both: it reads from the file's inputs whether the graph has the layer-energy
stage, draws the noise by the seed convention from per-shower seeds, checks the conditions against the
trained ranges of the model card, and ``from_card(dir)`` refuses a file whose sha256 differs from the card.
onnxruntime is imported lazily, inside ``ort_session``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caloforge.platform.conditioning import PARTICLE_INDEX, UNKNOWN_PARTICLE_INDEX, Conditions
from caloforge.platform.hashing import sha256_file
from caloforge.platform.shower_model import derive_seeds
from caloforge.registry.card import CARD_FILE, ModelCard, ValidRanges
from caloforge.registry.onnx_graph import ONNX_OUTPUT_NAME, onnx_input_names, seeded_noise


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


@dataclass(frozen=True)
class SessionProfile:
    """onnxruntime CPU session settings (``ort_session``); the same keys exist in the C/C++ API."""

    name: str
    intra_op_threads: int | None  # None: every core (os.cpu_count())
    inter_op_threads: int = 1
    allow_spinning: bool = False  # session.intra_op.allow_spinning / inter_op.allow_spinning
    sequential: bool = True  # ORT_SEQUENTIAL execution mode
    cpu_mem_arena: bool = True  # enable_cpu_mem_arena
    mem_pattern: bool = True  # enable_mem_pattern (re-plans buffers per input shape)


SESSION_PROFILES: dict[str, SessionProfile] = {
    # Geant4 fast simulation on a grid node: one shower per call, one core per job; spinning threads would
    # burn the core the job's other work needs, and a second thread would oversubscribe the node.
    "grid": SessionProfile("grid", intra_op_threads=1, allow_spinning=False),
    # Batch generation (evaluation, the fidelity gate, a service): many showers per call on every core.
    "batch": SessionProfile("batch", intra_op_threads=None, allow_spinning=True),
}


def ort_session(path: str | Path, threads: int | None = None, profile: str = "grid") -> Any:
    """An onnxruntime CPU session with the settings of ``SESSION_PROFILES[profile]``; ``threads`` overrides
    the profile's intra-op thread count (``grid``: 1, ``batch``: every core). The graph-optimisation level
    is ORT's default (all levels at load time); an ``optimized`` file already holds the fusions."""
    import onnxruntime as ort

    if profile not in SESSION_PROFILES:
        raise ValueError(f"session profile must be one of {sorted(SESSION_PROFILES)}, got {profile!r}")
    prof = SESSION_PROFILES[profile]
    intra = threads if threads is not None else prof.intra_op_threads
    intra = int(intra) if intra is not None else max(os.cpu_count() or 1, 1)
    if intra < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = prof.inter_op_threads
    opts.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL if prof.sequential else ort.ExecutionMode.ORT_PARALLEL
    )
    opts.enable_cpu_mem_arena = prof.cpu_mem_arena
    opts.enable_mem_pattern = prof.mem_pattern
    spin = "1" if prof.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for invalid/corrupt files
        raise ValueError(f"{path}: onnxruntime cannot load this file: {exc}") from exc


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
        threads: int | None = 1,
        profile: str = "grid",
    ) -> None:
        self.path = Path(onnx_path)
        self.session = ort_session(self.path, threads=threads, profile=profile)
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
    def from_card(
        cls, directory: str | Path, threads: int | None = 1, profile: str = "grid"
    ) -> OnnxShowerGenerator:
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
            path,
            card.architecture["detectors"],
            card.architecture["mesh_shape"],
            card.valid_ranges,
            threads,
            profile,
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
    "SESSION_PROFILES",
    "OnnxShowerGenerator",
    "SessionProfile",
    "onnx_feeds",
    "ort_session",
]
