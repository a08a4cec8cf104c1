"""Shower conditions and the condition vocabulary stored in a model.

``Conditions`` is the numpy form used by datasets, the simulator and evaluation (one entry per shower):
incident energy (MeV), polar angle θ and azimuth φ of the incident direction (rad), particle (PDG id) and
detector name. ``ConditionVocab`` maps particles and detectors to embedding indices; it lives inside a
model bundle, with spare detector slots so that adaptation can add a detector without resizing tensors.
``ConditionTensors`` is what networks consume (torch, one row per shower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# The 12 particle types of AllShowers (name -> PDG id); index len(PARTICLES) is "unknown".
PARTICLES: dict[str, int] = {
    "e-": 11,
    "e+": -11,
    "gamma": 22,
    "pi+": 211,
    "pi-": -211,
    "K+": 321,
    "K-": -321,
    "K0L": 130,
    "p": 2212,
    "pbar": -2212,
    "n": 2112,
    "nbar": -2112,
}
PDG_TO_NAME: dict[int, str] = {v: k for k, v in PARTICLES.items()}
PARTICLE_INDEX: dict[int, int] = {pdg: i for i, pdg in enumerate(PARTICLES.values())}
UNKNOWN_PARTICLE_INDEX = len(PARTICLES)
N_PARTICLE_TYPES = len(PARTICLES) + 1
EM_PDGS = frozenset({11, -11, 22})
CHARGED_PDGS = frozenset({11, -11, 211, -211, 321, -321, 2212, -2212})
BARYON_PDGS = frozenset({2212, -2212, 2112, -2112})
ANTIBARYON_PDGS = frozenset({-2212, -2112})
# Charged hadrons: a minimum-ionising track through the layers before their first interaction
CHARGED_HADRON_PDGS = CHARGED_PDGS - EM_PDGS
# per particle index (``PARTICLES`` order, then "unknown")
_CHARGED_HADRON_TABLE = (*(pdg in CHARGED_HADRON_PDGS for pdg in PARTICLES.values()), False)


def pdg_of(particle: str | int) -> int:
    """PDG id of a particle name (``"pi+"``) or a PDG id given as int or numeric string."""
    if isinstance(particle, int | np.integer):
        if int(particle) not in PDG_TO_NAME:
            raise ValueError(f"unknown PDG id {particle} (known: {sorted(PDG_TO_NAME)})")
        return int(particle)
    if particle in PARTICLES:
        return PARTICLES[particle]
    try:
        return pdg_of(int(particle))
    except ValueError:
        raise ValueError(f"unknown particle {particle!r} (known: {list(PARTICLES)})") from None


def particle_name(pdg: int) -> str:
    return PDG_TO_NAME.get(int(pdg), f"pdg{int(pdg)}")


def is_em(pdg: int) -> bool:
    return int(pdg) in EM_PDGS


def charged_hadron_mask(particle_idx: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether each particle index (``PARTICLES`` order; the last index is "unknown", False)
    is a charged hadron (``CHARGED_HADRON_PDGS``). A table lookup (exports to ONNX)."""
    return torch.tensor(_CHARGED_HADRON_TABLE, dtype=torch.bool, device=particle_idx.device)[particle_idx]


@dataclass(frozen=True)
class Conditions:
    """Conditions of N showers (numpy). ``detector`` holds names (dtype str)."""

    energy_mev: np.ndarray  # (N,) float64
    theta_rad: np.ndarray  # (N,) float64
    phi_rad: np.ndarray  # (N,) float64
    pdg: np.ndarray  # (N,) int64
    detector: np.ndarray  # (N,) str

    def __post_init__(self) -> None:
        n = len(self.energy_mev)
        for name in ("energy_mev", "theta_rad", "phi_rad", "pdg", "detector"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or len(arr) != n:
                shape = getattr(arr, "shape", None)
                raise ValueError(f"Conditions.{name}: expected a 1-D array of length {n}, got shape {shape}")

    def __len__(self) -> int:
        return len(self.energy_mev)

    @classmethod
    def make(
        cls,
        energy_mev: Sequence[float] | np.ndarray,
        theta_rad: Sequence[float] | np.ndarray,
        phi_rad: Sequence[float] | np.ndarray,
        pdg: Sequence[int] | np.ndarray,
        detector: Sequence[str] | np.ndarray | str,
    ) -> Conditions:
        e = np.asarray(energy_mev, dtype=np.float64).reshape(-1)
        n = len(e)
        det = np.full(n, detector) if isinstance(detector, str) else np.asarray(detector, dtype=str)
        return cls(
            e,
            np.broadcast_to(np.asarray(theta_rad, dtype=np.float64), (n,)).copy(),
            np.broadcast_to(np.asarray(phi_rad, dtype=np.float64), (n,)).copy(),
            np.broadcast_to(np.asarray(pdg, dtype=np.int64), (n,)).copy(),
            np.broadcast_to(det, (n,)).astype(str),
        )

    def subset(self, index: np.ndarray | slice) -> Conditions:
        return Conditions(
            self.energy_mev[index],
            self.theta_rad[index],
            self.phi_rad[index],
            self.pdg[index],
            self.detector[index],
        )

    @staticmethod
    def concat(parts: Sequence[Conditions]) -> Conditions:
        return Conditions(*(np.concatenate([getattr(p, f) for p in parts]) for f in Conditions.fields()))

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("energy_mev", "theta_rad", "phi_rad", "pdg", "detector")


@dataclass(frozen=True)
class LayerCondition:
    """The layer energies as a voxel network conditioned on them reads them (CaloFlow's order: the
    layer-energy head samples E_z first, the voxel model follows). Built by ``ShowerModel.with_layers``:

    - ``u_BZ``: each layer's E_z / E_inc standardised per layer (the head's own space), clamped to
      [-5, 20] (a layer whose data spread is tiny cannot blow the token features up);
    - ``profile_BF``: (B, 3) whole-shower numbers: ΣE_z / E_inc − 1, 4·(mean depth − 0.3) and 4·(depth
      spread), depth being the layer index over (Z − 1), energy-weighted.
    """

    u_BZ: torch.Tensor
    profile_BF: torch.Tensor

    def to(self, device: torch.device | str) -> LayerCondition:
        return LayerCondition(self.u_BZ.to(device), self.profile_BF.to(device))

    def index(self, idx: torch.Tensor | slice) -> LayerCondition:
        return LayerCondition(self.u_BZ[idx], self.profile_BF[idx])


@dataclass(frozen=True)
class ConditionTensors:
    """Network-side conditions, one row per shower (all on one device). ``layers`` is set only for a
    model whose voxel network reads the layer energies (``ShowerModel.with_layers``)."""

    energy_mev: torch.Tensor  # (B,) float32
    theta_rad: torch.Tensor  # (B,) float32
    phi_rad: torch.Tensor  # (B,) float32
    particle_idx: torch.Tensor  # (B,) int64 in [0, N_PARTICLE_TYPES)
    detector_idx: torch.Tensor  # (B,) int64 in [0, vocab.n_detector_slots)
    layers: LayerCondition | None = None

    def __len__(self) -> int:
        return self.energy_mev.shape[0]

    def to(self, device: torch.device | str) -> ConditionTensors:
        layers = None if self.layers is None else self.layers.to(device)
        return ConditionTensors(*(getattr(self, f).to(device) for f in self.fields()), layers=layers)

    def index(self, idx: torch.Tensor | slice) -> ConditionTensors:
        layers = None if self.layers is None else self.layers.index(idx)
        return ConditionTensors(*(getattr(self, f)[idx] for f in self.fields()), layers=layers)

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("energy_mev", "theta_rad", "phi_rad", "particle_idx", "detector_idx")


@dataclass(frozen=True)
class ConditionVocab:
    """Detectors known to a model (index order is stable) plus spare slots for detectors added later."""

    detectors: tuple[str, ...]
    n_detector_slots: int

    def __post_init__(self) -> None:
        if len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"duplicate detector in vocabulary {self.detectors}")
        if self.n_detector_slots < len(self.detectors):
            raise ValueError(
                f"n_detector_slots={self.n_detector_slots} < number of detectors {len(self.detectors)}"
            )

    @classmethod
    def create(cls, detectors: Sequence[str], spare_slots: int = 4) -> ConditionVocab:
        return cls(tuple(detectors), len(detectors) + spare_slots)

    def detector_index(self, name: str) -> int:
        try:
            return self.detectors.index(name)
        except ValueError:
            raise ValueError(
                f"unknown detector {name!r} for this model (known: {list(self.detectors)})"
            ) from None

    def with_detector(self, name: str) -> ConditionVocab:
        """A vocabulary that also knows ``name`` (uses a spare slot; errors when none is left)."""
        if name in self.detectors:
            return self
        if len(self.detectors) >= self.n_detector_slots:
            raise ValueError(f"no spare detector slot left for {name!r} ({self.n_detector_slots} slots used)")
        return ConditionVocab((*self.detectors, name), self.n_detector_slots)

    def encode(self, cond: Conditions, device: torch.device | str = "cpu") -> ConditionTensors:
        det_lookup = {d: i for i, d in enumerate(self.detectors)}
        unknown = sorted(set(np.unique(cond.detector).tolist()) - set(det_lookup))
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown} for this model (known: {list(self.detectors)})")
        det_idx = np.array([det_lookup[d] for d in cond.detector], dtype=np.int64)
        part_idx = np.array(
            [PARTICLE_INDEX.get(int(p), UNKNOWN_PARTICLE_INDEX) for p in cond.pdg], dtype=np.int64
        )
        return ConditionTensors(
            torch.as_tensor(cond.energy_mev, dtype=torch.float32, device=device),
            torch.as_tensor(cond.theta_rad, dtype=torch.float32, device=device),
            torch.as_tensor(cond.phi_rad, dtype=torch.float32, device=device),
            torch.as_tensor(part_idx, device=device),
            torch.as_tensor(det_idx, device=device),
        )

    def to_dict(self) -> dict:
        return {"detectors": list(self.detectors), "n_detector_slots": self.n_detector_slots}

    @classmethod
    def from_dict(cls, d: dict) -> ConditionVocab:
        return cls(tuple(d["detectors"]), int(d["n_detector_slots"]))
