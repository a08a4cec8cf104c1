"""``ShowerModel``: one deployable calorimeter-shower generator.

Bundles the mesh geometry, the condition vocabulary (detectors + spare slots), the fitted transform
(MeV ↔ model space), the backbone wrapped by its denoiser (flow matching or EDM), the default sampler and
step count, and lineage metadata. Saved as a bundle (``checkpoint.py``: config.json + model.safetensors).

Generation is three public pieces so that export/serving can reuse them (EDM's ``edm_sampler`` structure;
per-shower seeds as EDM's ``StackedRandomGenerator``):

1. ``initial_noise(seeds)``: one ``torch.Generator`` per shower seed draws that shower's N(0, I) noise on
   the CPU, so a shower depends only on its seed — not on batch composition or device;
2. ``sample(noise, cond, sampler, num_steps)``: ``x = denoiser.prior(noise)``, then the sampler integrates
   ``velocity`` over ``denoiser.time_grid(num_steps)`` (see ``denoisers.py`` for the time convention);
3. ``to_mev(x, layers)``: the inverse transform (threshold, clamp ≥ 0) and, for a model with the
   layer-energy head (``energy.py``, on by default), the scaling of each layer to the head's sample
   ``layers = sample_layer_energies(initial_layer_noise(seeds), cond)``. The head runs first: a model
   whose voxel network reads the layer energies (``layer_energy.condition_voxels``) samples with
   ``cond = with_layers(cond, layers)``.

``generate(conditions, ...)`` chains them in batches and returns float32 numpy (N, n_z, n_phi, n_r) in MeV.
``forward(x_t_BZPR, t_B, cond)`` is the training-time network call used by the objectives (so DDP/DeepSpeed
wrappers see it); what it returns is the model's *parametrisation*: ``flow_matching`` the velocity, ``edm``
the denoised D(x; σ) with t = σ. Which objective trains it is the training job's choice.

Shape legend: N showers, B batch, Z layers, P angular bins, R radial bins, T tokens, C coordinates.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from caloforge.platform.backbone import (
    BACKBONE_FLAVORS,
    BackboneConfig,
    ShowerDiT,
    backbone_config,
    patch_coordinates,
)
from caloforge.platform.conditioning import (
    Conditions,
    ConditionTensors,
    ConditionVocab,
    charged_hadron_mask,
)
from caloforge.platform.denoisers import DENOISERS, Denoiser, EDMPrecondConfig
from caloforge.platform.energy import (
    TRACK_MODES,
    EmptyLayerMode,
    LayerEnergyConfig,
    LayerEnergyFlow,
    LayerEnergyTransform,
    check_energy_grid,
    energy_flow_loss,
    rescale_layers,
)
from caloforge.platform.geometry import Mesh
from caloforge.platform.lineage import Lineage  # re-exported: defined in lineage.py
from caloforge.platform.samplers import (
    BESPOKE,
    SAMPLER_NAMES,
    STEP_SAMPLERS,
    Bespoke,
    BespokeSolver,
    Sampler,
    get_sampler,
)
from caloforge.platform.seeding import Purpose, derive_seeds
from caloforge.platform.transforms import (
    CALOCHALLENGE_THRESHOLD_MEV,
    TRANSFORMS,
    LayerLogStandardize,
    LogStandardize,
    build_transform,
)

logger = logging.getLogger("caloforge.platform")
# A fresh model whose patch holds more voxels than this × the token width gets a warning: 18 voxels per
# 64-wide token (0.28) learn the shape, 30, 36, 54 and 60 do not (docs/model.md).
MAX_PATCH_VOXELS_PER_WIDTH = 0.3

GENERATE_SEED_PURPOSE = (
    Purpose.GENERATE
)  # seeds of generate(): derive_seeds(seed, N)[i] (platform/seeding.py)


@dataclass(frozen=True)
class ShowerModelConfig:
    """Everything needed to rebuild a ShowerModel's architecture (weights come from the state dict).

    ``backbone``: a flavour name of ``BACKBONE_FLAVORS`` or an explicit ``BackboneConfig``;
    ``patch_size`` overrides the backbone's patch (None: keep it). ``parametrisation``: what the network
    output means, a key of ``denoisers.DENOISERS`` (``edm``: the preconditioned denoiser D(x; σ);
    ``flow_matching``: the velocity); ``edm``: the EDM preconditioning and sampling grid (used by the
    ``edm`` parametrisation). How the weights are trained (the objective and its options) is the training
    job's choice, recorded in the lineage, not part of the model. ``transform``: a key of
    ``TRANSFORMS``; ``threshold_mev``: readout threshold (calibrated MeV) applied by the transform.
    ``sampler`` / ``num_steps``: generation defaults (``sampler`` a key of ``SAMPLER_NAMES``; ``bespoke``
    needs a solver for ``num_steps`` in ``bespoke``). ``bespoke``: learned few-step solvers of this model
    (``samplers.BespokeSolver``, at most one per step count; empty unless ``caloforge distill --method bns``
    fitted some; older bundles load with none). ``init_seed``: weight initialisation seed.
    ``layer_energy``: the layer-energy head (``caloforge.platform.energy``; on by default).
    ``residual_stream``: the backbone's residual stream under autocast (training or sampling in bf16):
    ``fp32`` (the usual autocast recipe) or ``autocast`` (the autocast dtype, bf16: half the bytes of the
    memory-bound work around the matmuls; weights, optimizer and EMA stay fp32). No effect without autocast,
    so fp32 training and the ONNX export do not see it; it can change on a built model.
    ``position_extent``: the mesh's depth and radius in the position frame of the backbone (the token
    positions are the patch centres' depth and radius fractions times these; ``backbone.patch_coordinates``).
    ``position_frame``: what a position coordinate of 1 stands for, (depth in X0, radius in Molière radii);
    None: the frame is the mesh itself, with ``position_extent`` (1, 1), as for every model trained from
    scratch. Both are set by ``platform.transfer.rebuild_for_mesh`` when a model moves to a detector of
    another physical size, so that its tokens sit where the same depth and radius sat in training.
    ``pos_max_freq``: the highest frequency of the depth position features, in half periods over the frame
    (None: the backbone's, ``BackboneConfig.pos_max_freq``; bundles before schema 4 load with 32, what they
    were trained with). ``pos_max_freq_r``: the same for the radius features (None: the backbone's
    ``pos_max_freq_r``, 3 since schema 5; bundles before it load with their depth limit).
    """

    backbone: str | BackboneConfig = "S"
    patch_size: tuple[int, int, int] | None = None
    parametrisation: str = "edm"
    edm: EDMPrecondConfig = field(default_factory=EDMPrecondConfig)
    transform: str = "log_standardize"
    threshold_mev: float = CALOCHALLENGE_THRESHOLD_MEV
    sampler: str = "heun"
    num_steps: int = 32
    bespoke: tuple[BespokeSolver, ...] = ()
    init_seed: int = 0
    layer_energy: LayerEnergyConfig = field(default_factory=LayerEnergyConfig)
    residual_stream: Literal["fp32", "autocast"] = "fp32"
    position_extent: tuple[float, float] = (1.0, 1.0)
    position_frame: tuple[float, float] | None = None
    pos_max_freq: float | None = None
    pos_max_freq_r: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backbone, str) and self.backbone not in BACKBONE_FLAVORS:
            raise ValueError(
                f"backbone: unknown flavour {self.backbone!r} (known: {sorted(BACKBONE_FLAVORS)})"
            )
        if self.patch_size is not None:
            backbone_config(self.backbone, self.patch_size)  # validates the patch
        if self.pos_max_freq is not None or self.pos_max_freq_r is not None:
            self.backbone_config()  # validates pos_max_freq(_r) (BackboneConfig)
        if self.parametrisation not in DENOISERS:
            raise ValueError(
                f"parametrisation: unknown {self.parametrisation!r} (known: {sorted(DENOISERS)})"
            )
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform: unknown {self.transform!r} (known: {sorted(TRANSFORMS)})")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler: unknown {self.sampler!r} (known: {sorted(SAMPLER_NAMES)})")
        if isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps!r}")
        steps = [s.num_steps for s in self.bespoke]
        if len(set(steps)) != len(steps):
            raise ValueError(f"bespoke: at most one solver per step count, got step counts {steps}")
        if self.sampler == BESPOKE:
            self.bespoke_solver(self.num_steps)
        if self.sampler in STEP_SAMPLERS and not DENOISERS[self.parametrisation].step_conditioned:
            raise ValueError(
                f"sampler {self.sampler!r} needs a step-conditioned parametrisation (e.g. 'shortcut'), "
                f"got {self.parametrisation!r}"
            )
        if not self.threshold_mev >= 0:
            raise ValueError(f"threshold_mev must be >= 0, got {self.threshold_mev}")
        if self.residual_stream not in ("fp32", "autocast"):
            raise ValueError(f"residual_stream must be fp32 or autocast, got {self.residual_stream!r}")
        for name in ("position_extent", "position_frame"):
            value = getattr(self, name)
            if value is None and name == "position_frame":
                continue
            if len(value) != 2 or not all(math.isfinite(v) and v > 0 for v in value):
                raise ValueError(f"{name} must be two finite numbers > 0 (depth, radius), got {value!r}")
        if self.position_frame is None and tuple(self.position_extent) != (1.0, 1.0):
            raise ValueError(
                f"position_extent {tuple(self.position_extent)} needs a position_frame (the physical depth "
                "and radius it is measured in); without one the mesh is the frame, extent (1, 1)"
            )

    def backbone_config(self) -> BackboneConfig:
        cfg = backbone_config(self.backbone, self.patch_size)
        if self.pos_max_freq is not None:
            cfg = dataclasses.replace(cfg, pos_max_freq=self.pos_max_freq)
        if self.pos_max_freq_r is not None:
            cfg = dataclasses.replace(cfg, pos_max_freq_r=self.pos_max_freq_r)
        return cfg

    def bespoke_solver(self, num_steps: int) -> BespokeSolver:
        """The learned solver for ``num_steps`` (ValueError naming the step counts there are)."""
        for solver in self.bespoke:
            if solver.num_steps == num_steps:
                return solver
        raise ValueError(
            f"sampler 'bespoke' with num_steps={num_steps}: the model has bespoke solvers for "
            f"{sorted(s.num_steps for s in self.bespoke) or 'no step counts'} "
            "(caloforge distill --method bns)"
        )


def as_mesh(mesh: Mesh | tuple[int, int, int] | list[int]) -> Mesh:
    """A ``Mesh``; a bare (n_z, n_phi, n_r) shape becomes a mesh with uniform 1 mm radial bins (only radius
    *fractions* matter to the model)."""
    if isinstance(mesh, Mesh):
        return mesh
    shape = tuple(int(v) for v in mesh)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"mesh_shape must be (n_z, n_phi, n_r) with entries >= 1, got {tuple(mesh)}")
    return Mesh(shape[0], shape[1], tuple(float(r) for r in range(shape[2] + 1)))


def seeded_noise(
    seeds: np.ndarray | torch.Tensor | list[int], mesh_shape: tuple[int, int, int], layer_energy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seed convention, in one place: shower i's CPU ``torch.Generator().manual_seed(seeds[i])`` draws its
    voxel noise ``randn((Z, P, R))`` and then, with ``layer_energy``, the layer-energy head's noise
    ``randn((Z,))``. Returns float32 CPU tensors ((N, Z, P, R), (N, Z) or None); row i depends only on
    seeds[i], so a shower does not depend on batch composition or device."""
    seeds_np = np.asarray(seeds.cpu() if isinstance(seeds, torch.Tensor) else seeds)
    if seeds_np.ndim != 1 or not np.issubdtype(seeds_np.dtype, np.integer):
        raise ValueError(
            f"seeds must be a 1-D integer array, got dtype {seeds_np.dtype} shape {seeds_np.shape}"
        )
    shape = tuple(int(v) for v in mesh_shape)
    noise = torch.empty((len(seeds_np), *shape), dtype=torch.float32)
    layer_noise = torch.empty((len(seeds_np), shape[0]), dtype=torch.float32) if layer_energy else None
    for i, s in enumerate(seeds_np.tolist()):
        gen = torch.Generator().manual_seed(int(s))
        noise[i] = torch.randn(shape, generator=gen, dtype=torch.float32)
        if layer_noise is not None:
            layer_noise[i] = torch.randn((shape[0],), generator=gen, dtype=torch.float32)
    return noise, layer_noise


def make_denoiser(config: ShowerModelConfig, net: ShowerDiT) -> Denoiser:
    """The denoiser of ``config.parametrisation`` (``DENOISERS``) around ``net``."""
    return DENOISERS[config.parametrisation].from_config(net, config.edm)


class ShowerModel(nn.Module):
    """Geometry + vocabulary + fitted transform + denoised backbone + sampler defaults + lineage."""

    patch_coords_TC: torch.Tensor

    def __init__(
        self,
        config: ShowerModelConfig,
        vocab: ConditionVocab,
        mesh: Mesh | tuple[int, int, int],
        stats: Mapping[str, Any] | None = None,
        lineage: Lineage | None = None,
    ) -> None:
        super().__init__()
        mesh = as_mesh(mesh)
        bb = config.backbone_config()
        bb.check_mesh(mesh.shape)
        if stats is not None:
            _check_stats(stats, mesh)
        self._config = config
        self.vocab = vocab
        self.mesh = mesh
        self.lineage = lineage if lineage is not None else Lineage()
        net = ShowerDiT(
            bb,
            vocab.n_detector_slots,
            seed=config.init_seed,
            step_condition=DENOISERS[config.parametrisation].step_conditioned,
            layer_condition=config.layer_energy.enabled and config.layer_energy.condition_voxels,
        )
        net.autocast_stream = config.residual_stream == "autocast"
        self.denoiser = make_denoiser(config, net)
        self.transform: LogStandardize | LayerLogStandardize = build_transform(
            config.transform, mesh.n_z, config.threshold_mev, stats
        )
        # The layer-energy head (second stage): None when config.layer_energy.enabled is false.
        self.energy_head: LayerEnergyFlow | None = None
        self.energy_transform: LayerEnergyTransform | None = None
        le = config.layer_energy
        if le.enabled:
            self.energy_head = LayerEnergyFlow(
                mesh.n_z, bb.width, le.resolved_width(bb.width), le.depth, seed=config.init_seed + 1
            )
            self.energy_transform = (
                LayerEnergyTransform(mesh.n_z, space=le.space)
                if stats is None
                else LayerEnergyTransform.from_stats(stats, mesh.n_z, le.space)
            )
        # Derived from the mesh, not stored: one network state dict fits meshes of any (divisible) size.
        coords_TC = patch_coordinates(mesh, bb.patch_size, config.position_extent)
        self.register_buffer("patch_coords_TC", coords_TC, persistent=False)

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        config: ShowerModelConfig,
        vocab: ConditionVocab,
        stats: Mapping[str, Any],
        mesh_shape: Mesh | tuple[int, int, int],
        lineage: Lineage | None = None,
    ) -> ShowerModel:
        """A fresh model whose transform is fitted from ``stats`` (a ``caloforge.datasets.stats`` block)."""
        if stats is None:
            raise ValueError("ShowerModel.build needs a stats block to fit the transform")
        bb = config.backbone_config()
        voxels = math.prod(bb.patch_size)
        if voxels > MAX_PATCH_VOXELS_PER_WIDTH * bb.width:
            logger.warning(
                "patch %s packs %d voxels into a %d-wide token (> %.2f × width): measured to cap the "
                "voxel-level shape (hits and radial widths 15-45 %% off at any step count of the CPU budget; "
                "docs/model.md, 'What limits the voxel-level shape')",
                bb.patch_size,
                voxels,
                bb.width,
                MAX_PATCH_VOXELS_PER_WIDTH,
            )
        model = cls(config, vocab, mesh_shape, stats=stats, lineage=lineage)
        depth_tokens, _, radius_tokens = bb.check_mesh(model.mesh_shape)
        # the radius follows the depth's limit when the backbone says so (bundles before schema 5)
        radius_named = config.pos_max_freq_r is not None or (
            bb.pos_max_freq_r is None and config.pos_max_freq is not None
        )
        for axis, key, freq, tokens, named in (
            ("depth", "pos_max_freq", bb.pos_max_freq, depth_tokens, config.pos_max_freq is not None),
            ("radius", "pos_max_freq_r", bb.radius_max_freq, radius_tokens, radius_named),
        ):
            if freq <= tokens:
                continue
            # the default on a short mesh warns; a value the config names is the user's choice (logged)
            logger.log(
                logging.INFO if named else logging.WARNING,
                "%s %g is above the Nyquist frequency of the %d %s tokens (%d half periods): the position "
                "features alias between token positions, so the model will not carry over to a mesh whose "
                "tokens sit between them; set model.%s <= %d (docs/model.md, 'Position features')",
                key,
                freq,
                tokens,
                axis,
                tokens,
                key,
                tokens,
            )
        return model

    def with_detector(self, name: str, init_from: str | None = None) -> ShowerModel:
        """A copy that also knows detector ``name`` in a spare slot (ValueError when none is left).

        The new slot's embedding row starts as a copy of detector ``init_from``'s row or, by default, the
        mean of the known detectors' rows (a neutral start for fine-tuning). A known ``name`` returns an
        unchanged copy.
        """
        new_vocab = self.vocab.with_detector(name)
        if init_from is not None:
            self.vocab.detector_index(init_from)  # ValueError for an unknown source detector
        model = copy.deepcopy(self)
        if new_vocab is self.vocab:
            return model
        model.vocab = new_vocab
        weight = model.network.detector_embed.weight
        with torch.no_grad():
            idx = new_vocab.detector_index(name)
            if init_from is not None:
                weight[idx] = weight[self.vocab.detector_index(init_from)]
            elif self.vocab.detectors:
                weight[idx] = weight[: len(self.vocab.detectors)].mean(dim=0)
        return model

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.compile`` in place (``loop.compile``), for the forward and, with the layer-energy head,
        the head's forward too: its loss runs outside ``forward`` (``energy_loss``), so compiling only the
        forward would leave the head's ~100 small kernels per step eager. Names and state-dict keys do not
        change; deep copies are eager modules again."""
        super().compile(*args, **kwargs)
        if self.energy_head is not None:
            self.energy_head.compile(*args, **kwargs)

    # ---- properties ---------------------------------------------------------------------------------

    @property
    def config(self) -> ShowerModelConfig:
        return self._config

    def set_sampling_defaults(
        self,
        sampler: str | None = None,
        num_steps: int | None = None,
        empty_layers: EmptyLayerMode | None = None,
    ) -> None:
        """Change the default sampler, step count and/or which stage may empty a layer
        (``layer_energy.empty_layers``): what ``generate`` and the export use; the weights' meaning does
        not change."""
        changes: dict[str, Any] = {}
        if sampler is not None:
            changes["sampler"] = sampler
        if num_steps is not None:
            changes["num_steps"] = num_steps
        if empty_layers is not None:
            if not self.has_energy_head:
                raise ValueError("empty_layers: this model has no layer-energy head (layer_energy.enabled)")
            changes["layer_energy"] = dataclasses.replace(
                self._config.layer_energy, empty_layers=empty_layers
            )
        self._config = dataclasses.replace(self._config, **changes)  # validated by __post_init__

    def set_bespoke_solvers(self, solvers: tuple[BespokeSolver, ...] | list[BespokeSolver]) -> None:
        """Store learned solvers (replacing those of the same step counts); the weights do not change.
        Each must span this model's time grid (its first and last time)."""
        start, end = (float(v) for v in self.denoiser.time_grid(1)[[0, -1]])
        for solver in solvers:
            t0, tn = solver.times[0], solver.times[-1]
            if abs(t0 - start) > 1e-9 * max(1.0, abs(start)) or abs(tn - end) > 1e-9 * max(1.0, abs(end)):
                raise ValueError(
                    f"bespoke[num_steps={solver.num_steps}]: times run {t0} → {tn}, the model's grid "
                    f"{start} → {end}"
                )
        new_steps = {s.num_steps for s in solvers}
        kept = tuple(s for s in self._config.bespoke if s.num_steps not in new_steps)
        merged = tuple(sorted((*kept, *solvers), key=lambda s: s.num_steps))
        self._config = dataclasses.replace(self._config, bespoke=merged)

    def solver(self, sampler: str | None = None, num_steps: int | None = None) -> tuple[Sampler, list[float]]:
        """The sampler and its time grid (Python floats) that ``sample``, ``generate`` and the ONNX export
        use for ``sampler`` × ``num_steps`` (defaults: the model's); ``bespoke`` takes the stored solver's
        coefficients and times."""
        name = sampler if sampler is not None else self.config.sampler
        n = num_steps if num_steps is not None else self.config.num_steps
        if name == BESPOKE:
            learned = self.config.bespoke_solver(n)
            return Bespoke(learned), list(learned.times)
        method = get_sampler(name)
        if name in STEP_SAMPLERS and not self.denoiser.step_conditioned:
            raise ValueError(
                f"sampler {name!r} needs a step-conditioned parametrisation (e.g. 'shortcut'), this model is "
                f"{self.config.parametrisation!r}"
            )
        return method, [float(t) for t in self.denoiser.time_grid(n).tolist()]

    def set_residual_stream(self, mode: Literal["fp32", "autocast"]) -> None:
        """Switch the backbone's residual stream under autocast (a numerics choice, see the config)."""
        self._config = dataclasses.replace(self._config, residual_stream=mode)
        self.network.autocast_stream = mode == "autocast"

    @property
    def network(self) -> ShowerDiT:
        return self.denoiser.net  # type: ignore[return-value]

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return self.mesh.shape

    @property
    def device(self) -> torch.device:
        return self.patch_coords_TC.device

    @property
    def default_sampler(self) -> str:
        return self.config.sampler

    @property
    def default_num_steps(self) -> int:
        return self.config.num_steps

    @property
    def reads_layer_energies(self) -> bool:
        """Whether the voxel network is conditioned on the layer energies (``layer_energy.condition_voxels``):
        then every call of the network needs ``cond.layers`` (``with_layers``)."""
        return self.network.layer_condition

    def with_layers(self, cond: ConditionTensors, layer_mev_BZ: torch.Tensor) -> ConditionTensors:
        """``cond`` with the layer energies ``layer_mev_BZ`` (B, Z) in MeV attached as the voxel network
        reads them (the data's own E_z in training, the head's at generation); ``cond`` unchanged for a
        model that does not read them."""
        if not self.reads_layer_energies:
            return cond
        _, transform = self._require_energy_head()
        layers = torch.as_tensor(layer_mev_BZ, dtype=torch.float32, device=cond.energy_mev.device)
        # compare sizes, not len(cond): a Python int would fix the batch size in an exported graph
        if (
            layers.ndim != 2
            or layers.shape[1] != self.mesh.n_z
            or layers.shape[0] != cond.energy_mev.shape[0]
        ):
            raise ValueError(
                f"with_layers layer_mev_BZ: expected ({len(cond)}, {self.mesh.n_z}), "
                f"got {tuple(layers.shape)}"
            )
        return dataclasses.replace(cond, layers=transform.condition(layers, cond.energy_mev))  # fp32 ops

    @property
    def has_energy_head(self) -> bool:
        return self.energy_head is not None

    def extra_repr(self) -> str:
        return (
            f"parametrisation={self.config.parametrisation}, mesh={self.mesh_shape}, "
            f"detectors={list(self.vocab.detectors)}/{self.vocab.n_detector_slots}, "
            f"sampler={self.config.sampler}×{self.config.num_steps}, "
            f"layer_energy={'on' if self.has_energy_head else 'off'}"
        )

    # ---- network calls ------------------------------------------------------------------------------

    def _check_x(self, x_BZPR: torch.Tensor, what: str) -> None:
        if x_BZPR.ndim != 4 or tuple(x_BZPR.shape[1:]) != self.mesh_shape:
            mesh = ", ".join(map(str, self.mesh_shape))
            raise ValueError(f"{what}: expected shape (B, {mesh}), got {tuple(x_BZPR.shape)}")

    def _step_args(self, step_B: torch.Tensor | float | None) -> tuple[Any, ...]:
        if step_B is None:
            return ()
        if not self.denoiser.step_conditioned:
            raise ValueError(
                f"a step size was given, but parametrisation {self.config.parametrisation!r} takes none "
                "(only step-conditioned parametrisations do, e.g. 'shortcut')"
            )
        return (step_B,)

    def forward(
        self,
        x_t_BZPR: torch.Tensor,
        t_B: torch.Tensor,
        cond: ConditionTensors,
        step_B: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Training-time call: the denoiser's output (FM: velocity; EDM: D(x; σ) with t = σ; shortcut: the
        average velocity over a step ``step_B``, default 0)."""
        self._check_x(x_t_BZPR, "ShowerModel.forward x_t_BZPR")
        return self.denoiser(x_t_BZPR, t_B, cond, self.patch_coords_TC, *self._step_args(step_B))

    def velocity(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor,
        cond: ConditionTensors,
        step_B: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """dx/dt of the probability-flow ODE in the denoiser's time convention (see denoisers.py); for a
        step-conditioned model with ``step_B`` = h the average velocity over [t, t + h]."""
        self._check_x(x_BZPR, "ShowerModel.velocity x_BZPR")
        return self.denoiser.velocity(x_BZPR, t_B, cond, self.patch_coords_TC, *self._step_args(step_B))

    def encode_conditions(
        self, conditions: Conditions, device: torch.device | str | None = None
    ) -> ConditionTensors:
        """Numpy ``Conditions`` → ``ConditionTensors`` (ValueError for detectors unknown to this model)."""
        return self.vocab.encode(conditions, self.device if device is None else device)

    # ---- transforms ---------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        unfitted = not bool(self.transform.fitted) or (
            self.energy_transform is not None and not bool(self.energy_transform.fitted)
        )
        if unfitted:
            raise ValueError(
                "the model's transform is not fitted: build the model with ShowerModel.build(..., stats) "
                "or load a bundle"
            )

    def to_model_space(self, showers_mev_BZPR: torch.Tensor | np.ndarray) -> torch.Tensor:
        """MeV showers (B, Z, P, R) → model space (on the model's device)."""
        self._check_fitted()
        x = torch.as_tensor(showers_mev_BZPR, dtype=torch.float32, device=self.device)
        self._check_x(x, "to_model_space showers_mev_BZPR")
        return self.transform(x)

    def to_mev(
        self,
        x_BZPR: torch.Tensor,
        layer_mev_BZ: torch.Tensor | None = None,
        cond: ConditionTensors | None = None,
    ) -> torch.Tensor:
        """Model space → MeV (threshold applied, ≥ 0). With ``layer_mev_BZ`` (the layer-energy head's
        sample), each layer is scaled to those energies (``energy.rescale_layers``; ``cond``, the showers'
        conditions, is needed there when ``layer_energy.empty_layers`` is ``hadron_tracks``)."""
        self._check_fitted()
        self._check_x(x_BZPR, "to_mev x_BZPR")
        showers = self.transform.inverse(x_BZPR)
        if layer_mev_BZ is None:
            return showers
        if tuple(layer_mev_BZ.shape) != (x_BZPR.shape[0], self.mesh.n_z):
            raise ValueError(
                f"to_mev layer_mev_BZ: expected ({x_BZPR.shape[0]}, {self.mesh.n_z}), "
                f"got {tuple(layer_mev_BZ.shape)}"
            )
        mode = self.config.layer_energy.empty_layers
        score = track = None
        if mode in TRACK_MODES:
            if cond is None:
                raise ValueError(
                    f"to_mev: layer_energy.empty_layers = {mode} needs cond (which showers are charged "
                    "hadrons)"
                )
            score, track = self.transform.log_energy(x_BZPR), charged_hadron_mask(cond.particle_idx)
        return rescale_layers(showers, layer_mev_BZ, self.transform.threshold_mev, mode, score, track)

    def layer_energies_mev(self, showers_mev_BZPR: torch.Tensor) -> torch.Tensor:
        """(B, Z) layer sums of MeV showers after the readout threshold (what the head learns)."""
        x = torch.as_tensor(showers_mev_BZPR, dtype=torch.float32, device=self.device)
        self._check_x(x, "layer_energies_mev showers_mev_BZPR")
        x = torch.where(x < self.transform.threshold_mev, torch.zeros_like(x), x)
        return x.sum(dim=(2, 3))

    def _require_energy_head(self) -> tuple[LayerEnergyFlow, LayerEnergyTransform]:
        if self.energy_head is None or self.energy_transform is None:
            raise ValueError("this model has no layer-energy head (model.layer_energy.enabled is false)")
        return self.energy_head, self.energy_transform

    def energy_loss(
        self, showers_mev_BZPR: torch.Tensor, cond: ConditionTensors, generator: torch.Generator
    ) -> torch.Tensor:
        """Per-shower flow-matching loss (B,) of the layer-energy head on MeV showers (weight not applied)."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            layer_mev_BZ = self.layer_energies_mev(showers_mev_BZPR)
        return self.layer_energy_loss(layer_mev_BZ, cond, generator)

    def layer_energy_loss(
        self, layer_mev_BZ: torch.Tensor, cond: ConditionTensors, generator: torch.Generator
    ) -> torch.Tensor:
        """``energy_loss`` on the showers' layer energies (``layer_energies_mev``), when the caller has them
        already (``shower_loss_fn`` also conditions the voxel model on them)."""
        head, transform = self._require_energy_head()
        with torch.autocast(device_type=self.device.type, enabled=False):
            y1_BZ = transform(layer_mev_BZ, cond.energy_mev)
        context_BD = self.network.condition_context(cond)
        return energy_flow_loss(head, y1_BZ, context_BD, generator, self.config.layer_energy.draws)

    def sample_layer_energies(
        self, noise_BZ: torch.Tensor, cond: ConditionTensors, num_steps: int | None = None
    ) -> torch.Tensor:
        """Integrate the head's ODE from ``noise_BZ`` (N(0, I), shape (B, Z)) → layer energies (B, Z) MeV."""
        head, transform = self._require_energy_head()
        if noise_BZ.ndim != 2 or tuple(noise_BZ.shape) != (len(cond), self.mesh.n_z):
            raise ValueError(
                f"sample_layer_energies noise_BZ: expected ({len(cond)}, {self.mesh.n_z}), "
                f"got {tuple(noise_BZ.shape)}"
            )
        le = self.config.layer_energy
        grid = check_energy_grid(num_steps if num_steps is not None else le.num_steps)
        context_BD = self.network.condition_context(cond)

        def velocity(y_BZ: torch.Tensor, t_B: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return head(y_BZ, t_B, ctx).float()

        y_BZ = get_sampler(le.sampler)(velocity, noise_BZ.float(), grid, context_BD)
        return transform.inverse(y_BZ, cond.energy_mev)

    # ---- generation ---------------------------------------------------------------------------------

    def initial_noise(
        self, seeds: np.ndarray | torch.Tensor, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(B, Z, P, R) float32 N(0, I) voxel noise by the seed convention (``seeded_noise``), on ``device``
        (default: the model's)."""
        noise, _ = seeded_noise(seeds, self.mesh_shape, layer_energy=False)
        return noise.to(self.device if device is None else device)

    def initial_layer_noise(
        self, seeds: np.ndarray | torch.Tensor, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(B, Z) float32 N(0, I) noise of the layer-energy head by the seed convention (``seeded_noise``)."""
        _, layer_noise = seeded_noise(seeds, self.mesh_shape, layer_energy=True)
        assert layer_noise is not None
        return layer_noise.to(self.device if device is None else device)

    def sample(
        self,
        noise_BZPR: torch.Tensor,
        cond: ConditionTensors,
        sampler: str | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``noise_BZPR`` to model-space showers."""
        self._check_x(noise_BZPR, "ShowerModel.sample noise_BZPR")
        if len(cond) != noise_BZPR.shape[0]:
            raise ValueError(f"cond has {len(cond)} rows but noise_BZPR has batch {noise_BZPR.shape[0]}")
        method, grid = self.solver(sampler, num_steps)
        x_start = self.denoiser.prior(noise_BZPR)
        return method(self.velocity, x_start, grid, cond, final_singular=self.denoiser.final_singular)

    def generate(
        self,
        conditions: Conditions,
        num_steps: int | None = None,
        sampler: str | None = None,
        seeds: np.ndarray | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = False,
        seed: int = 0,
    ) -> np.ndarray:
        """Showers for ``conditions``: float32 (N, n_z, n_phi, n_r) in MeV.

        ``seeds`` (N,) int64 fixes each shower's noise (default: ``derive_seeds(seed, N)``, so shower i
        depends only on (seed, i)). ``device``: where to run (default: the model's device; the model must
        already be there). Runs in eval mode under ``torch.inference_mode``.
        """
        if not isinstance(conditions, Conditions):
            raise ValueError(f"conditions must be a Conditions, got {type(conditions).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        n = len(conditions)
        if seeds is None:
            seeds = derive_seeds(seed, n)
        seeds = np.asarray(seeds)
        if seeds.shape != (n,) or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(
                f"seeds must be an integer array of shape ({n},), got {seeds.dtype} {seeds.shape}"
            )
        run_device = self.device if device is None else torch.device(device)
        same_index = run_device.index is None or run_device.index == self.device.index
        if run_device.type != self.device.type or not same_index:
            raise ValueError(
                f"generate(device={str(run_device)!r}) but the model is on {self.device}; move it first"
            )
        self._check_fitted()
        self.solver(sampler, num_steps)  # fail before any work
        out = np.empty((n, *self.mesh_shape), dtype=np.float32)
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="generate", unit="batch")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in starts:
                    stop = min(start + batch_size, n)
                    cond = self.encode_conditions(conditions.subset(slice(start, stop)), self.device)
                    noise, layer_noise = seeded_noise(
                        seeds[start:stop], self.mesh_shape, self.has_energy_head
                    )
                    layers = None
                    if layer_noise is not None:  # the head first: a voxel model may read its E_z
                        layers = self.sample_layer_energies(layer_noise.to(self.device), cond)
                        cond = self.with_layers(cond, layers)
                    x = self.sample(noise.to(self.device), cond, sampler, num_steps)
                    out[start:stop] = self.to_mev(x, layers, cond).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    # ---- persistence --------------------------------------------------------------------------------

    def save(self, directory: str | Path, lineage: Lineage | None = None, overwrite: bool = False) -> Path:
        """Write a bundle (config.json + model.safetensors); see ``checkpoint.save_bundle``."""
        from caloforge.platform.checkpoint import save_bundle

        return save_bundle(self, directory, lineage=lineage, overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> ShowerModel:
        """Read a bundle written by ``save``; see ``checkpoint.load_bundle``."""
        from caloforge.platform.checkpoint import load_bundle

        return load_bundle(directory, device=device)


def _check_stats(stats: Mapping[str, Any], mesh: Mesh) -> None:
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a stats block (mapping), got {type(stats).__name__}")
    n_vox = stats.get("n_voxels_per_shower")
    if n_vox is not None and int(n_vox) != mesh.n_voxels:
        raise ValueError(
            f"stats['n_voxels_per_shower']={n_vox} does not match the mesh {mesh.shape} "
            f"({mesh.n_voxels} voxels)"
        )
    layers = stats.get("layer_log_mean")
    if layers is not None and len(layers) != mesh.n_z:
        raise ValueError(f"stats['layer_log_mean'] has {len(layers)} layers, the mesh has n_z={mesh.n_z}")


__all__ = [
    "Lineage",
    "ShowerModel",
    "ShowerModelConfig",
    "as_mesh",
    "derive_seeds",
    "make_denoiser",
    "seeded_noise",
]
