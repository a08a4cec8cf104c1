"""The layer-energy head: a small conditional flow-matching model of the per-layer energies of a shower.

Why a second stage. The voxel model works in a log space (``transforms.py``) where one standard unit is
≈ 5 e-folds of energy, so a small error at the shower core becomes a large multiplicative error in MeV, and
the mean total energy — the first thing a physicist checks — follows the tail of the generated voxel
distribution instead of its bulk. The best calorimeter generators therefore split the problem: CaloFlow,
CaloDREAM (Favaro et al. 2025) and ATLAS's two-stage model (ATL-SOFT-PUB-2025-003) first generate the layer
energies, then the voxel shape, and scale the shape to those energies. CaloForge does the same with one
shared conditioning: the head reads the backbone's condition context (kinematics + particle + detector
embeddings, ``ShowerDiT.condition_context``), so a detector embedding learned during adaptation serves both
stages.

- **Representation**: u_z = E_z / E_inc per layer, standardised per layer, y_z = (u_z − m_z) / s_z, with
  m_z, s_z from the dataset statistics (``layer_energy_over_einc_mean/std`` of ``caloforge.datasets.stats``).
  The space is *linear* in energy, so the generated mean layer energy is the model's first moment — which
  flow matching learns first — rather than an exponentiated tail. Inverse: u = y·s + m; negative layers
  → 0 with the total Σ_z u_z kept (``LayerEnergyTransform.inverse``).
- **Network** (``LayerEnergyFlow``): residual MLP blocks (LayerNorm → FiLM(shift, scale) from the
  condition → Linear → GELU → Linear), the flow time through DiT's sinusoidal features and an MLP; the FiLM
  projections and the output layer start at zero (the head starts as v = 0).
- **Objective**: conditional flow matching on the linear path (noise y₀ at t = 0, data y₁ at t = 1,
  target y₁ − y₀), ``draws`` noise/time draws per shower per step (a cheap variance reduction: the head is
  ~1000× cheaper than the backbone).
- **Generation**: the head's ODE (sampler and step count of ``LayerEnergyConfig``) from per-shower noise
  gives E_z; ``rescale_layers`` scales each generated layer of the voxel model to its E_z, spreads the energy
  of layers the voxel model left empty over the others (so Σ_z E_z is kept), and re-applies the readout
  threshold. The voxel model decides which layers are hit (``LayerEnergyConfig.empty_layers``): a hit layer
  whose E_z is too small to keep a voxel above the threshold keeps its own energy.

Shape legend: B batch, Z layers, P angular bins, R radial bins, D backbone width, W head width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from caloforge.platform.backbone import TIME_FREQ_DIM, timestep_features, xavier_init_linears
from caloforge.platform.conditioning import LayerCondition
from caloforge.platform.denoisers import NOISE_LABEL_SCALE
from caloforge.platform.samplers import SAMPLERS

STATS_MEAN_KEY = "layer_energy_over_einc_mean"
STATS_STD_KEY = "layer_energy_over_einc_std"
MIN_REL_STD = 1e-3  # floor of s_z relative to the largest s_z (layers that are (almost) never hit)
LAYER_U_MIN, LAYER_U_MAX = -5.0, 20.0  # clamp of the standardised u_z a conditioned voxel model reads
# which stage may leave a layer empty at generation (``rescale_layers``)
EmptyLayerMode = Literal["voxel_model", "either", "hadron_tracks", "axis_tracks"]
EMPTY_LAYER_MODES: tuple[str, ...] = get_args(EmptyLayerMode)
TRACK_MODES: tuple[str, ...] = ("hadron_tracks", "axis_tracks")  # modes that fill charged hadrons' tracks
# the head's space (``LayerEnergyConfig.space``): u_z itself, or u_z with the part below κ in log scale
LayerEnergySpace = Literal["linear", "log_below"]
LAYER_ENERGY_SPACES: tuple[str, ...] = get_args(LayerEnergySpace)
LOG_BELOW_KAPPA = 0.01  # u_z below this fraction of E_inc is modelled in log scale (``log_below``)
LOG_BELOW_DELTA = 1e-6  # g(0) = κ(1 + ln(δ/κ)): where an empty layer sits
LOG_BELOW_MIN_STD = 0.01  # floor of the per-layer scale in ``log_below`` (the log part spans ≈ 0.08)
LOG_BELOW_CONDITION_MIN = -10.0  # clamp of what a conditioned voxel model reads (linear: LAYER_U_MIN)


@dataclass(frozen=True)
class LayerEnergyConfig:
    """The layer-energy head of a ShowerModel (``enabled: false`` = voxel model only, energies as sampled)."""

    enabled: bool = True
    width: int | None = None  # hidden width W of the residual MLP; None: min(256, 2 × backbone width)
    depth: int = 3  # residual blocks
    sampler: str = "midpoint"  # ODE sampler of the head at generation
    num_steps: int = 8  # head ODE steps at generation (8 and 64 midpoint steps agree to 0.1% in E_tot)
    loss_weight: float = 1.0  # weight of the head's loss beside the voxel loss
    draws: int = 16  # noise/time draws per shower per training step (the head is cheap)
    # Which stage may leave a layer empty at generation (``rescale_layers``): ``axis_tracks`` (as
    # ``voxel_model``, and a charged hadron's layer the voxel model left empty takes the head's E_z in one
    # voxel of the innermost radial bin, on the axis: its track; since schema 9), ``hadron_tracks`` (the
    # same in the hottest voxel anywhere in the layer; schema 8), ``voxel_model`` (a layer the voxel model
    # hit keeps hits; schemas 6-7) or ``either`` (the head's energy may empty a hit layer too; before 6).
    empty_layers: EmptyLayerMode = "axis_tracks"
    # The voxel model reads the layer energies (CaloFlow's order: the head samples E_z first; training feeds
    # the data's own E_z): ``ShowerDiT`` with ``layer_condition`` (docs/model.md, "Layer energies"). Off in
    # bundles before schema 7 and by default; on in configs/train/fidelity-cpu.yaml, where it was measured.
    condition_voxels: bool = False
    # The head's space (``LayerEnergyTransform``): ``linear`` u_z = E_z / E_inc (the default), or
    # ``log_below``: u_z above κ = 1 % of E_inc as is, below in log scale, so that a minimum-ionising track of
    # a few MeV stays resolved at 100 GeV (docs/adaptation.md, "What still gives the π⁺ showers away").
    space: LayerEnergySpace = "linear"

    def __post_init__(self) -> None:
        for name in ("width", "depth", "num_steps", "draws"):
            value = getattr(self, name)
            if name == "width" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layer_energy.{name} must be an int >= 1, got {value!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"layer_energy.sampler: unknown {self.sampler!r} (known: {sorted(SAMPLERS)})")
        if not (isinstance(self.loss_weight, int | float) and self.loss_weight >= 0):
            raise ValueError(f"layer_energy.loss_weight must be >= 0, got {self.loss_weight!r}")
        if not isinstance(self.condition_voxels, bool):
            raise ValueError(
                f"layer_energy.condition_voxels must be true or false, got {self.condition_voxels!r}"
            )
        if self.condition_voxels and not self.enabled:
            raise ValueError(
                "layer_energy.condition_voxels needs the head (layer_energy.enabled: true): the voxel model "
                "would have no layer energies to read at generation"
            )
        if self.empty_layers not in EMPTY_LAYER_MODES:
            raise ValueError(
                f"layer_energy.empty_layers must be one of {EMPTY_LAYER_MODES}, got {self.empty_layers!r}"
            )
        if self.space not in LAYER_ENERGY_SPACES:
            raise ValueError(f"layer_energy.space must be one of {LAYER_ENERGY_SPACES}, got {self.space!r}")

    def resolved_width(self, backbone_width: int) -> int:
        """The head's width for a backbone of ``backbone_width`` (``debug`` 64 → 128; ``S``/``B`` → 256)."""
        return self.width if self.width is not None else min(256, 2 * backbone_width)


class LayerEnergyTransform(nn.Module):
    """E_z (MeV) ↔ y_z = (g(u_z) − m_z) / s_z with u_z = E_z / E_inc. Buffers ship in the bundle.

    ``space`` (``LayerEnergyConfig.space``): ``linear`` g(u) = u; ``log_below`` g(u) = u for u ≥ κ and
    κ (1 + ln((u + δ) / κ)) below (continuous with its slope at κ; κ = ``LOG_BELOW_KAPPA``, δ =
    ``LOG_BELOW_DELTA``), with s_z floored at ``LOG_BELOW_MIN_STD``. In linear space a layer's resolution is a
    fixed fraction of its spread over all showers, so a 5 MeV track at 100 GeV (u = 5·10⁻⁵) is lost in the
    noise of layers that carry GeV in other showers; the log part keeps it, and the large layers, which make
    the energy resolution, stay linear (docs/adaptation.md, "What still gives the π⁺ showers away")."""

    mean_Z: torch.Tensor
    std_Z: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        n_z: int,
        mean_Z: list[float] | None = None,
        std_Z: list[float] | None = None,
        space: LayerEnergySpace = "linear",
    ) -> None:
        super().__init__()
        if n_z < 1:
            raise ValueError(f"n_z must be >= 1, got {n_z}")
        if space not in LAYER_ENERGY_SPACES:
            raise ValueError(
                f"LayerEnergyTransform: space must be one of {LAYER_ENERGY_SPACES}, got {space!r}"
            )
        fitted = mean_Z is not None and std_Z is not None
        mean = torch.zeros(n_z) if mean_Z is None else torch.tensor(mean_Z, dtype=torch.float32)
        std = torch.ones(n_z) if std_Z is None else torch.tensor(std_Z, dtype=torch.float32)
        if mean.shape != (n_z,) or std.shape != (n_z,):
            raise ValueError(f"LayerEnergyTransform: mean/std must have n_z={n_z} entries")
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):
            raise ValueError("LayerEnergyTransform: mean/std have non-finite entries")
        if fitted:
            std = std.clamp_min(max(float(std.max()) * MIN_REL_STD, 1e-12))
        self.n_z = n_z
        self.space = space
        self.register_buffer("mean_Z", mean)
        self.register_buffer("std_Z", std)
        self.register_buffer("fitted", torch.tensor(bool(fitted)))

    @classmethod
    def from_stats(
        cls, stats: Mapping[str, Any], n_z: int, space: LayerEnergySpace = "linear"
    ) -> LayerEnergyTransform:
        missing = [k for k in (STATS_MEAN_KEY, STATS_STD_KEY) if k not in stats]
        if missing:
            raise ValueError(
                f"stats block has no {missing} (shards written before the layer-energy head existed): "
                "re-shard the data (caloforge data shard), or set model.layer_energy.enabled=false"
            )
        vectors = []
        for key in (STATS_MEAN_KEY, STATS_STD_KEY):
            value = stats[key]
            if not isinstance(value, list | tuple) or len(value) != n_z:
                got = len(value) if isinstance(value, list | tuple) else type(value).__name__
                raise ValueError(f"stats[{key!r}] must be a list of n_z={n_z} numbers, got {got}")
            vectors.append([float(v) for v in value])
        return cls(n_z, vectors[0], vectors[1], space)

    def _check(self, layer_BZ: torch.Tensor, energy_mev_B: torch.Tensor, what: str) -> None:
        if layer_BZ.ndim != 2 or layer_BZ.shape[1] != self.n_z:
            raise ValueError(f"{what}: expected (B, n_z={self.n_z}), got shape {tuple(layer_BZ.shape)}")
        if energy_mev_B.shape != (layer_BZ.shape[0],):
            raise ValueError(
                f"{what}: energy_mev_B must be ({layer_BZ.shape[0]},), got {tuple(energy_mev_B.shape)}"
            )

    def _scale(self) -> torch.Tensor:
        return self.std_Z.clamp_min(LOG_BELOW_MIN_STD) if self.space == "log_below" else self.std_Z

    def forward(self, layer_mev_BZ: torch.Tensor, energy_mev_B: torch.Tensor) -> torch.Tensor:
        """Layer energies (MeV) → model space."""
        self._check(layer_mev_BZ, energy_mev_B, "LayerEnergyTransform.forward")
        u = layer_mev_BZ.float() / energy_mev_B.float()[:, None]
        if self.space == "log_below":
            u = u.clamp_min(0.0)
            kappa = LOG_BELOW_KAPPA
            u = torch.where(u >= kappa, u, kappa * (1.0 + torch.log((u + LOG_BELOW_DELTA) / kappa)))
        return (u - self.mean_Z) / self._scale()

    def inverse(self, y_BZ: torch.Tensor, energy_mev_B: torch.Tensor) -> torch.Tensor:
        """Model space → layer energies in MeV (≥ 0), keeping the unclamped total.

        Layers the flow leaves slightly negative (rarely-hit layers, where the density sits at 0) are set to
        0, and the remaining layers are scaled so that the shower's total stays the unclamped Σ_z u_z
        (itself clamped ≥ 0). A plain clamp would add the mean of the negative part to every such layer —
        +15–20% of E_tot for hadrons, whose late layers are often empty — while the unclamped sum is the
        unbiased one (linear space)."""
        self._check(y_BZ, energy_mev_B, "LayerEnergyTransform.inverse")
        if self.space == "log_below":  # g < κ is a valid small layer, not an overshoot: no total to keep
            g = y_BZ.float() * self._scale() + self.mean_Z
            kappa = LOG_BELOW_KAPPA
            small = kappa * torch.exp((g / kappa - 1.0).clamp_max(0.0)) - LOG_BELOW_DELTA
            return torch.where(g >= kappa, g, small).clamp_min(0.0) * energy_mev_B.float()[:, None]
        u = y_BZ.float() * self.std_Z + self.mean_Z
        positive = u.clamp_min(0.0)
        total = u.sum(dim=1).clamp_min(0.0)
        have = positive.sum(dim=1)
        scale = torch.where(have > 0, total / have.clamp_min(1e-30), torch.zeros_like(have))
        return positive * scale[:, None] * energy_mev_B.float()[:, None]

    def condition(self, layer_mev_BZ: torch.Tensor, energy_mev_B: torch.Tensor) -> LayerCondition:
        """What a voxel network conditioned on the layer energies reads (``LayerCondition``) for layer
        energies in MeV (negative entries count as 0): the head's y_z clamped to [``LAYER_U_MIN``,
        ``LAYER_U_MAX``] (``log_below``: [``LOG_BELOW_CONDITION_MIN``, ``LAYER_U_MAX``], so that an empty
        layer and a track stay apart) and (ΣE_z/E_inc − 1, 4·(mean depth − 0.3), 4·depth spread)."""
        self._check(layer_mev_BZ, energy_mev_B, "LayerEnergyTransform.condition")
        layer_BZ = layer_mev_BZ.float().clamp_min(0.0)
        low = LOG_BELOW_CONDITION_MIN if self.space == "log_below" else LAYER_U_MIN
        u_BZ = self.forward(layer_BZ, energy_mev_B).clamp(low, LAYER_U_MAX)
        total_B = layer_BZ.sum(dim=1)
        weight_BZ = layer_BZ / total_B.clamp_min(1e-30)[:, None]
        depth_Z = torch.arange(self.n_z, dtype=torch.float32, device=layer_BZ.device) / max(self.n_z - 1, 1)
        mean_B = (weight_BZ * depth_Z).sum(dim=1)
        spread_B = (weight_BZ * (depth_Z - mean_B[:, None]) ** 2).sum(dim=1).clamp_min(0.0).sqrt()
        ratio_B = total_B / energy_mev_B.float() - 1.0
        profile_BF = torch.stack([ratio_B, 4.0 * (mean_B - 0.3), 4.0 * spread_B], dim=1)
        return LayerCondition(u_BZ, profile_BF)


class _EnergyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)  # (shift, scale) from SiLU(c); zero-initialised
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h_BW: torch.Tensor, c_BW: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c_BW)).chunk(2, dim=-1)
        return h_BW + self.fc2(F.gelu(self.fc1(self.norm(h_BW) * (1 + scale) + shift)))


class LayerEnergyFlow(nn.Module):
    """v(y_t, t, context) for the layer-energy flow. ``forward(y_BZ, t_B, context_BD) -> v_BZ``."""

    def __init__(self, n_z: int, context_width: int, width: int, depth: int, seed: int = 0) -> None:
        super().__init__()
        self.n_z = n_z
        self.fc_in = nn.Linear(n_z, width)
        self.context = nn.Linear(context_width, width)
        self.time_fc1 = nn.Linear(TIME_FREQ_DIM, width)
        self.time_fc2 = nn.Linear(width, width)
        self.blocks = nn.ModuleList([_EnergyBlock(width) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc_out = nn.Linear(width, n_z)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Xavier-uniform linears from ``torch.Generator().manual_seed(seed)``; zero FiLM and output."""
        gen = torch.Generator().manual_seed(int(seed))
        xavier_init_linears(self, gen)
        for lin in (self.time_fc1, self.time_fc2):
            nn.init.normal_(lin.weight, std=0.02, generator=gen)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, y_BZ: torch.Tensor, t_B: torch.Tensor, context_BD: torch.Tensor) -> torch.Tensor:
        if y_BZ.ndim != 2 or y_BZ.shape[1] != self.n_z:
            raise ValueError(f"LayerEnergyFlow input must be (B, {self.n_z}), got {tuple(y_BZ.shape)}")
        dtype = self.fc_in.weight.dtype  # inputs follow the weights (bf16 under DeepSpeed, fp32 otherwise)
        t_feats = timestep_features(NOISE_LABEL_SCALE * t_B.float()).to(dtype)
        c_BW = self.context(context_BD.to(dtype)) + self.time_fc2(F.silu(self.time_fc1(t_feats)))
        h_BW = self.fc_in(y_BZ.to(dtype))
        for block in self.blocks:
            h_BW = block(h_BW, c_BW)
        return self.fc_out(self.norm_out(h_BW))


def energy_flow_loss(
    head: nn.Module, y1_BZ: torch.Tensor, context_BD: torch.Tensor, generator: torch.Generator, draws: int
) -> torch.Tensor:
    """Per-shower CFM loss (B,) of the head, averaged over ``draws`` (noise, t) draws.

    Draw order from ``generator``: y₀ (B·draws·Z normals), then t (B·draws uniforms)."""
    b, n_z = y1_BZ.shape
    y0 = torch.randn((b * draws, n_z), generator=generator, device=generator.device).to(y1_BZ.device)
    t_B = torch.rand(b * draws, generator=generator, device=generator.device).to(y1_BZ.device)
    y1 = y1_BZ.repeat_interleave(draws, dim=0)
    t = t_B[:, None]
    y_t = (1.0 - t) * y0 + t * y1
    v = head(y_t, t_B, context_BD.repeat_interleave(draws, dim=0))
    per_draw = (v.float() - (y1 - y0)).pow(2).mean(dim=1)
    return per_draw.view(b, draws).mean(dim=1)


def rescale_layers(
    showers_mev_BZPR: torch.Tensor,
    layer_mev_BZ: torch.Tensor,
    threshold_mev: torch.Tensor | float,
    empty_layers: EmptyLayerMode = "voxel_model",
    voxel_score_BZPR: torch.Tensor | None = None,
    track_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale each layer of ``showers_mev_BZPR`` to ``layer_mev_BZ``; keep Σ_z E_z; re-apply the threshold.

    ``empty_layers`` says which stage may leave a layer empty (``EMPTY_LAYER_MODES``):

    - ``hadron_tracks``: as ``voxel_model``, and in the showers of ``track_B`` (B,) bool (required: the
      charged hadrons, ``conditioning.charged_hadron_mask``) a layer the voxel model left without a voxel
      at or above the threshold gets its target, when that is at or above the threshold, in the voxel
      model's hottest voxel of the layer: the largest ``voxel_score_BZPR`` (required; the voxel model's
      ln(E + ε) before the threshold, ``ShowerTransform.log_energy``; split evenly between tied voxels).
      A charged hadron crosses the layers before its first interaction as a minimum-ionising track, one
      hit voxel per layer, which the voxel model, averaging over where that voxel is, leaves empty; an
      electromagnetic shower's empty layers are the voxel model's to decide (docs/model.md, "Which stage
      leaves a layer empty").
    - ``axis_tracks``: as ``hadron_tracks``, with the fill in the hottest voxel of the innermost radial bin
      (the largest score among its angular bins): the mesh is centred on the incident direction, so the
      track runs along the axis. Where the voxel model left the layer empty its scores all sit near ln ε
      and the hottest voxel of the whole layer is as likely in any radial bin (docs/model.md, "Charged
      hadrons' tracks").
    - ``voxel_model``: a layer the voxel model hit keeps hits. Where its target is too small for the layer's
      hottest voxel to stay at or above the threshold (a target of 0 included: the head's flow leaves
      rarely-hit layers slightly negative, and those are set to 0), the layer keeps the voxel model's own
      energy (before the total is scaled, below). The head's independent draws would otherwise empty layers
      on top of the voxel model's own empty layers (docs/model.md, "Which stage leaves a layer empty").
    - ``either`` (bundles before schema 6): every hit layer is scaled to its target, so a target of 0, or
      one too small for any of its voxels, empties it.

    The whole shower is then scaled so that its total is Σ_z E_z of ``layer_mev_BZ`` (the head's total,
    which it models well; an undertrained voxel model's own energies can be far off): the energy of a layer
    the voxel model left empty raises every hit layer in proportion, the energy kept layers bring lowers
    every layer in proportion — which can push a kept layer's voxels below the threshold when kept layers
    carry a large part of the shower. When every hit layer has a target of 0 (``either`` only), the voxel
    shower as a whole is scaled to Σ_z E_z. A shower with no voxel at all stays empty. No value-dependent
    Python control flow (exports to ONNX)."""
    if empty_layers not in EMPTY_LAYER_MODES:
        raise ValueError(f"empty_layers must be one of {EMPTY_LAYER_MODES}, got {empty_layers!r}")
    raw = showers_mev_BZPR.float()
    target = layer_mev_BZ.float()
    threshold = torch.as_tensor(threshold_mev, dtype=raw.dtype, device=raw.device)
    if empty_layers in TRACK_MODES and (voxel_score_BZPR is None or track_B is None):
        raise ValueError(
            f"rescale_layers(empty_layers={empty_layers!r}) needs voxel_score_BZPR (the voxel model's "
            "scores) and track_B (which showers are charged hadrons)"
        )
    have = raw.sum(dim=(2, 3))
    per_layer = target
    if empty_layers != "either":
        # The scaled layer's hottest voxel is peak · target / have: below the threshold nothing survives.
        keeps_hits = target * raw.amax(dim=(2, 3)) >= threshold * have
        per_layer = torch.where((have > 0) & ~keeps_hits, have, target)
    layer_scale = torch.where(have > 0, per_layer / have.clamp_min(1e-30), torch.zeros_like(have))
    x = raw * layer_scale[:, :, None, None]
    if empty_layers in TRACK_MODES:
        assert voxel_score_BZPR is not None and track_B is not None  # checked above
        score = voxel_score_BZPR.float()
        # axis_tracks: only the innermost radial bin competes (the mesh is centred on the incident direction)
        cand = score[..., :1] if empty_layers == "axis_tracks" else score
        hottest = (cand == cand.amax(dim=(2, 3), keepdim=True)).to(raw.dtype)
        hottest = F.pad(hottest / hottest.sum(dim=(2, 3), keepdim=True), (0, score.shape[3] - cand.shape[3]))
        fill = (track_B.bool()[:, None] & (have <= 0) & (target >= threshold))[:, :, None, None]
        x = torch.where(fill, hottest * target[:, :, None, None], x)
    # Every hit layer got a target of 0 while empty layers got energy: scale the voxel shower as a whole.
    lost_all = (x.sum(dim=(1, 2, 3)) <= 0)[:, None, None, None]
    x = torch.where(lost_all, raw, x)
    total_have = x.sum(dim=(1, 2, 3))
    total_scale = torch.where(
        total_have > 0, target.sum(dim=1) / total_have.clamp_min(1e-30), torch.zeros_like(total_have)
    )
    x = x * total_scale[:, None, None, None]
    return torch.where(x < threshold, torch.zeros_like(x), x)


def check_energy_grid(num_steps: int) -> torch.Tensor:
    """The head's time grid 0 → 1 in ``num_steps`` equal steps (float64)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"layer-energy num_steps must be an int >= 1, got {num_steps!r}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


__all__ = [
    "EMPTY_LAYER_MODES",
    "STATS_MEAN_KEY",
    "STATS_STD_KEY",
    "EmptyLayerMode",
    "LayerEnergyConfig",
    "LayerEnergyFlow",
    "LayerEnergyTransform",
    "check_energy_grid",
    "energy_flow_loss",
    "rescale_layers",
]
