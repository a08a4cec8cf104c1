"""The exported ONNX graph: ``SamplerGraph``, its input/output names and the seed convention.

``SamplerGraph`` is the whole generation path of ``ShowerModel.generate`` (minus the seeded noise draw) as
one module: ``x = denoiser.prior(noise)``, the sampler's steps over the fixed time grid
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
not the same ones. ``seed_convention`` is that rule as the text stored in the file and the model card; it
names ``caloforge.registry.export``, which re-exports ``initial_noise`` / ``initial_layer_noise``.
``io_spec`` and ``particle_index_table`` are the tables stored there too. docs/inference_contract.md is the
full contract.

Nothing here runs onnxruntime or writes files (``caloforge.registry.onnx_runtime``, ``.export``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from caloforge.platform.conditioning import (
    PARTICLE_INDEX,
    PARTICLES,
    UNKNOWN_PARTICLE_INDEX,
    ConditionTensors,
)
from caloforge.platform.energy import check_energy_grid
from caloforge.platform.samplers import get_sampler
from caloforge.platform.shower_model import ShowerModel
from caloforge.platform.shower_model import seeded_noise as platform_seeded_noise

CONDITION_INPUT_NAMES: tuple[str, ...] = (
    "energy_mev",
    "theta_rad",
    "phi_rad",
    "particle_idx",
    "detector_idx",
)
ONNX_OUTPUT_NAME = "shower_mev"


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
        # The model's sampler (a learned ``bespoke`` one carries its coefficients) and a Python-list grid:
        # the sampler loop unrolls over it at export (no data-dependent control flow).
        self.sampler, self.grid = model.solver(self.sampler_name, self.num_steps)
        self.final_singular = bool(model.denoiser.final_singular)
        self.layer_energy = model.has_energy_head
        self.input_names = onnx_input_names(self.layer_energy)
        le = model.config.layer_energy
        self.layer_sampler_name = le.sampler if self.layer_energy else None
        self.layer_empty_layers = le.empty_layers if self.layer_energy else None
        self.layer_space = le.space if self.layer_energy else None
        self.layer_condition_voxels = bool(le.condition_voxels) if self.layer_energy else None
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

    def layer_energy_info(self) -> dict[str, Any] | None:
        """The layer-energy stage frozen into the graph, as the card and ``metadata_props`` record it (None:
        no head, no ``layer_noise`` input)."""
        if not self.layer_energy:
            return None
        return {
            "sampler": self.layer_sampler_name,
            "num_steps": self.layer_num_steps,
            "nfe": self.layer_nfe,
            "empty_layers": self.layer_empty_layers,
            "space": self.layer_space,
            "condition_voxels": self.layer_condition_voxels,
        }

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"SamplerGraph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        named = dict(zip(self.input_names, inputs, strict=True))
        cond = ConditionTensors(*(named[name] for name in CONDITION_INPUT_NAMES))
        layer_mev_BZ = None
        if self.layer_energy:  # the head first: a voxel model may read its E_z (ShowerModel.generate's order)
            layer_mev_BZ = self._layer_energies(named["layer_noise"], cond)
            cond = self.model.with_layers(cond, layer_mev_BZ)
        x_BZPR = self.model.denoiser.prior(named["noise"])
        x_BZPR = self.sampler(
            self.model.velocity, x_BZPR, self.grid, cond, final_singular=self.final_singular
        )
        return self.model.to_mev(x_BZPR, layer_mev_BZ, cond)

    def _layer_energies(self, noise_BZ: torch.Tensor, cond: ConditionTensors) -> torch.Tensor:
        """``ShowerModel.sample_layer_energies`` over the fixed Python grid (unrolled at export)."""
        head, transform, method = self.model.energy_head, self.model.energy_transform, self.layer_sampler
        assert head is not None and transform is not None and method is not None

        def velocity(y_BZ: torch.Tensor, t_B: torch.Tensor, context_BD: torch.Tensor) -> torch.Tensor:
            return head(y_BZ, t_B, context_BD).float()

        context_BD = self.model.network.condition_context(cond)
        y_BZ = method(velocity, noise_BZ.float(), self.layer_grid, context_BD)
        return transform.inverse(y_BZ, cond.energy_mev)


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


__all__ = [
    "CONDITION_INPUT_NAMES",
    "ONNX_OUTPUT_NAME",
    "SamplerGraph",
    "initial_layer_noise",
    "initial_noise",
    "io_spec",
    "onnx_input_names",
    "particle_index_table",
    "seed_convention",
    "seeded_noise",
]
