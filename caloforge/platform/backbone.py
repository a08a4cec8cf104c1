"""``ShowerDiT``: a diffusion transformer on 3D patches of the cylindrical shower mesh.

Architecture (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", §3.2, adaLN-Zero block;
CaloDiT-2, Raikwar et al. 2025, for the calorimeter adaptation):

1. **Patchify**: the (n_z, n_phi, n_r) mesh is cut into non-overlapping (p_z, p_phi, p_r) patches (3×2×3 on
   45×16×9 → 15·8·3 = 360 tokens, as CaloDiT-2); each patch is flattened and linearly embedded to width D.
2. **Position embedding from physical coordinates**: every patch centre gets normalised coordinates
   (depth fraction u_z ∈ (0, 1), azimuth α of the patch centre as integer harmonics sin kα / cos kα, radius
   fraction u_r = r_centre / r_max of the mesh); each coordinate goes through fixed sinusoidal features (a
   third of the width each, as CaloDiT-2's 3D sin-cos embedding), optionally plus a zero-initialised learned
   projection. Nothing is a per-index table, so one set of weights serves meshes of different sizes (the
   token count follows the mesh; the features only see fractions and angles).
3. **Conditioning vector** c ∈ R^D, the sum of: the noise-level embedding (DiT's sinusoidal timestep
   features, 256 dims, then an MLP) of the denoiser's noise label; an MLP of the kinematics (Fourier
   features of ln(E / 1 GeV), θ/π, sin θ, cos θ, sin φ, cos φ); a particle-type embedding
   (``N_PARTICLE_TYPES`` = 12 + unknown); a detector embedding with ``vocab.n_detector_slots`` rows (spare
   rows for detectors added by adaptation). Networks built with ``step_condition=True`` (the one-network
   few-step parametrisations, ``denoisers.ShortcutDenoiser``) add a second embedding of the same kind, of
   the step-size label, whose output layer starts at zero: such a network starts as its flow-matching
   teacher for every step size, and networks without it keep their exact state-dict keys and
   initialisation (the new module is registered and drawn last).
4. **DiT blocks** with adaLN-Zero: (shift, scale, gate) × 2 regressed from SiLU(c) by a zero-initialised
   linear layer; multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``;
   a GELU(tanh) MLP.
5. **Final layer**: adaLN (shift, scale) + zero-initialised linear to p_z·p_phi·p_r values per token, then
   unpatchify back to (B, n_z, n_phi, n_r).

Module names are public API: ``LORA_TARGETS`` lists the linear layers LoRA adapters attach to (matched by
peft's ``target_modules`` suffix rule), and a test pins the state-dict keys of the ``debug`` flavour.

All ops export to ONNX at opset 18 (dynamo and legacy exporters): the only Python control flow in
``forward`` depends on tensor *shapes*, never on values.

Shape legend: B batch, Z layers (n_z), P angular bins (n_phi), R radial bins (n_r), T tokens, D width,
C coordinate channels (4: u_z, sin α, cos α, u_r), F features, H heads, K head dim, V values per patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from caloforge.platform.conditioning import N_PARTICLE_TYPES, ConditionTensors
from caloforge.platform.geometry import Mesh

# Linear layers that LoRA adapters target (peft ``target_modules``: a module matches when its name equals
# an entry or ends with "." + entry). Stable names: changing one breaks stored adapters.
LORA_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation")

TIME_FREQ_DIM = 256  # DiT's frequency embedding size for the noise label
DEFAULT_POS_MAX_FREQ = 8.0  # BackboneConfig.pos_max_freq of every flavour (bundles before schema 4: 32)
# BackboneConfig.pos_max_freq_r of every flavour: the Nyquist frequency of 3 radius tokens (9 radial bins,
# p_r 3); bundles before schema 5 have the radius follow pos_max_freq
DEFAULT_POS_MAX_FREQ_R = 3.0
N_COORDS = 4  # u_z, sin α, cos α, u_r
LAYER_PROFILE_FEATURES = 3  # LayerCondition.profile_BF: energy ratio, mean depth, depth spread


@dataclass(frozen=True)
class BackboneConfig:
    """Sizes of a ``ShowerDiT``. ``patch_size`` is (p_z, p_phi, p_r) in mesh bins."""

    depth: int
    width: int
    heads: int
    mlp_width: int
    patch_size: tuple[int, int, int] = (3, 2, 3)
    pos_embed: str = "sincos"  # "sincos" (fixed) | "sincos+proj" (fixed + zero-initialised learned proj)
    # Highest frequency of the u_z / u_r features, in half periods over the mesh. 8 stays below the depth
    # token grid's Nyquist (15 half periods for 15 depth tokens), so the features interpolate between token
    # positions and a model moved to another mesh off its grid keeps its sense of depth; 32 (before
    # bundle schema 4) aliased there (docs/model.md, "Position features").
    pos_max_freq: float = DEFAULT_POS_MAX_FREQ
    # Highest frequency of the u_r features alone (None: pos_max_freq). The radius has fewer tokens than the
    # depth (3 on the 9-bin meshes with p_r = 3), so its Nyquist frequency is lower: 3 measured to adapt
    # better to another radial binning and no worse on the grid (docs/adaptation.md); before bundle schema 5
    # the radius followed pos_max_freq.
    pos_max_freq_r: float | None = DEFAULT_POS_MAX_FREQ_R
    energy_freqs: int = 16  # Fourier frequencies of ln(E / 1 GeV)

    def __post_init__(self) -> None:
        for name in ("depth", "width", "heads", "mlp_width", "energy_freqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BackboneConfig.{name} must be an int >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"BackboneConfig.width={self.width} is not divisible by heads={self.heads}")
        if self.width < 2 * N_COORDS + 4:
            raise ValueError(
                f"BackboneConfig.width must be >= 12 for the position features, got {self.width}"
            )
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"BackboneConfig.patch_size must be three ints >= 1, got {self.patch_size}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"BackboneConfig.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        for name in ("pos_max_freq", "pos_max_freq_r"):
            freq = getattr(self, name)
            if freq is None and name == "pos_max_freq_r":
                continue
            number = isinstance(freq, int | float) and not isinstance(freq, bool)
            if not (number and math.isfinite(freq) and freq >= 1):
                raise ValueError(f"BackboneConfig.{name} must be a finite number >= 1, got {freq!r}")

    @property
    def radius_max_freq(self) -> float:
        """The u_r features' highest frequency (``pos_max_freq_r``, else ``pos_max_freq``)."""
        return self.pos_max_freq if self.pos_max_freq_r is None else self.pos_max_freq_r

    @property
    def patch_volume(self) -> int:
        p_z, p_phi, p_r = self.patch_size
        return p_z * p_phi * p_r

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def check_mesh(self, mesh_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (T_z, T_phi, T_r) of a mesh; ValueError when a dim is not divisible by the patch."""
        if len(mesh_shape) != 3:
            raise ValueError(f"mesh shape must be (n_z, n_phi, n_r), got {tuple(mesh_shape)}")
        bad = [
            f"{axis}={n} % {p}"
            for axis, n, p in zip(("n_z", "n_phi", "n_r"), mesh_shape, self.patch_size, strict=True)
            if int(n) % int(p)
        ]
        if bad:
            raise ValueError(
                f"mesh {tuple(mesh_shape)} is not divisible by patch_size {self.patch_size}: {', '.join(bad)}"
            )
        grid = tuple(int(n) // int(p) for n, p in zip(mesh_shape, self.patch_size, strict=True))
        return grid  # type: ignore[return-value]


POS_EMBEDS = ("sincos", "sincos+proj")

BACKBONE_FLAVORS: dict[str, BackboneConfig] = {
    "debug": BackboneConfig(depth=2, width=64, heads=4, mlp_width=256),
    # CaloDiT-2: 6 blocks, width 384, 6 heads, MLP 1536.
    "S": BackboneConfig(depth=6, width=384, heads=6, mlp_width=1536),
    "B": BackboneConfig(depth=12, width=768, heads=12, mlp_width=3072),
}


def backbone_config(
    flavor_or_config: str | BackboneConfig, patch_size: tuple[int, int, int] | None = None
) -> BackboneConfig:
    """Resolve a flavour name (``BACKBONE_FLAVORS``) or explicit config, optionally overriding the patch."""
    if isinstance(flavor_or_config, BackboneConfig):
        cfg = flavor_or_config
    else:
        try:
            cfg = BACKBONE_FLAVORS[flavor_or_config]
        except KeyError:
            raise ValueError(
                f"unknown backbone flavour {flavor_or_config!r} (known: {sorted(BACKBONE_FLAVORS)})"
            ) from None
    if patch_size is not None:
        cfg = replace(cfg, patch_size=tuple(int(p) for p in patch_size))
    return cfg


# --------------------------------------------------------------------------------------------------------
# Coordinates and fixed features
# --------------------------------------------------------------------------------------------------------


def patch_coordinates(
    mesh: Mesh | tuple[int, int, int],
    patch_size: tuple[int, int, int],
    extent: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Normalised physical coordinates of every patch centre, token order (z, phi, r) with r fastest.

    Returns ``coords_TC`` float32 (T, 4): depth fraction (i_z + ½)/T_z, sin α, cos α with α the patch's
    central azimuth (CaloChallenge bin convention, −π + (j + ½)·2π/T_phi), and the radius fraction
    r_centre / r_max using the mesh's radial edges (uniform edges when only a shape is given).
    ``extent`` (depth, radius) scales the two fractions: the mesh's size in the position frame the
    backbone was trained in (``ShowerModelConfig.position_extent``; (1, 1): the mesh is the frame).
    """
    if len(extent) != 2 or not all(math.isfinite(e) and e > 0 for e in extent):
        raise ValueError(f"patch_coordinates: extent must be two finite numbers > 0, got {extent!r}")
    if isinstance(mesh, Mesh):
        shape = mesh.shape
        r_edges = torch.tensor(mesh.r_edges_mm, dtype=torch.float64)
    else:
        shape = tuple(int(v) for v in mesh)
        r_edges = torch.arange(shape[2] + 1, dtype=torch.float64)
    if len(shape) != 3 or any(n % p for n, p in zip(shape, patch_size, strict=True)):
        raise ValueError(f"mesh {shape} is not divisible by patch_size {tuple(patch_size)}")
    t_z, t_phi = shape[0] // patch_size[0], shape[1] // patch_size[1]
    u_z = (torch.arange(t_z, dtype=torch.float64) + 0.5) / t_z * float(extent[0])
    alpha = -math.pi + (torch.arange(t_phi, dtype=torch.float64) + 0.5) * (2 * math.pi / t_phi)
    p_r = patch_size[2]
    r_lo = r_edges[0 : shape[2] : p_r]
    r_hi = r_edges[p_r : shape[2] + 1 : p_r]
    u_r = 0.5 * (r_lo + r_hi) / r_edges[-1] * float(extent[1])
    gz, ga, gr = torch.meshgrid(u_z, alpha, u_r, indexing="ij")
    coords = torch.stack([gz, torch.sin(ga), torch.cos(ga), gr], dim=-1).reshape(-1, N_COORDS)
    return coords.to(torch.float32)


def position_features(
    coords_TC: torch.Tensor, n_freq: int, max_freq: float, max_freq_r: float | None = None
) -> torch.Tensor:
    """Fixed sinusoidal features (T, 6·n_freq) of patch coordinates.

    u_z and u_r: sin/cos(ω_j u) with ω_j = π·max_freq^(j/(n_freq−1)) (from half a period to ``max_freq``
    half periods over the mesh; for u_r to ``max_freq_r`` when given). Azimuth: sin/cos(k α) for integer
    harmonics k = 1..n_freq, written with the angle-addition recursion from (sin α, cos α) so the features
    stay exactly 2π-periodic.
    """
    device, dtype = coords_TC.device, coords_TC.dtype
    j = torch.arange(n_freq, device=device, dtype=dtype)

    def omegas(top: float) -> torch.Tensor:
        return math.pi * torch.pow(torch.tensor(top, device=device, dtype=dtype), j / max(n_freq - 1, 1))

    omega_F = omegas(max_freq)
    omega_r_F = omega_F if max_freq_r is None else omegas(max_freq_r)
    u_z, sin_a, cos_a, u_r = coords_TC.unbind(-1)
    alpha = torch.atan2(sin_a, cos_a)
    k_F = j + 1.0
    ang_z = u_z[:, None] * omega_F[None, :]
    ang_a = alpha[:, None] * k_F[None, :]
    ang_r = u_r[:, None] * omega_r_F[None, :]
    return torch.cat([ang_z.sin(), ang_z.cos(), ang_a.sin(), ang_a.cos(), ang_r.sin(), ang_r.cos()], dim=-1)


def timestep_features(
    label_B: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0
) -> torch.Tensor:
    """DiT/ADM sinusoidal features of a scalar noise label: [cos(label·f_k), sin(label·f_k)],
    f_k = max_period^(−k/(dim/2)), k = 0..dim/2−1."""
    half = dim // 2
    k = torch.arange(half, device=label_B.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = label_B.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def kinematic_features(cond: ConditionTensors, n_freq: int) -> torch.Tensor:
    """(B, 2·n_freq + 6): Fourier features of u = ln(E / 1 GeV) with ω_j log-spaced in [0.1, 30] (periods
    from 63 down to 0.2 in ln E, i.e. ~20 % energy resolution at the top), u/10, θ/π, sin θ, cos θ,
    sin φ, cos φ."""
    energy = cond.energy_mev.float()
    u_B = torch.log(energy.clamp_min(1e-3) / 1000.0)
    j = torch.arange(n_freq, device=u_B.device, dtype=torch.float32)
    omega = torch.exp(math.log(0.1) + (math.log(30.0) - math.log(0.1)) * j / max(n_freq - 1, 1))
    ang = u_B[:, None] * omega[None, :]
    theta = cond.theta_rad.float()
    phi = cond.phi_rad.float()
    scalars = torch.stack(
        [u_B / 10.0, theta / math.pi, torch.sin(theta), torch.cos(theta), torch.sin(phi), torch.cos(phi)],
        dim=-1,
    )
    return torch.cat([ang.sin(), ang.cos(), scalars], dim=-1)


def xavier_init_linears(module: nn.Module, gen: torch.Generator) -> None:
    """Xavier-uniform weights and zero biases for every ``nn.Linear`` in ``module`` (module order), drawn
    from ``gen``: the common first step of the DiT initialisation, shared by the layer-energy head."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight, generator=gen)
            nn.init.zeros_(sub.bias)


def modulate(x_BTD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BTD * (1 + scale_BD[:, None, :]) + shift_BD[:, None, :]


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        qkv = self.qkv(x_BTD).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q_BHTK, k_BHTK, v_BHTK = qkv.unbind(0)
        out_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK)
        return self.proj(out_BHTK.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BTD), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3)."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, mlp_width)
        self.adaLN_modulation = nn.Linear(width, 6 * width)

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            F.silu(c_BD)
        ).chunk(6, dim=-1)
        x_BTD = x_BTD + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x_BTD), shift_msa, scale_msa))
        return x_BTD + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x_BTD), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_volume: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, patch_volume)

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(F.silu(c_BD)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_BTD), shift, scale))


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(TIME_FREQ_DIM, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, label_B: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(timestep_features(label_B).to(self.fc1.weight.dtype))))


class KinematicsEmbedder(nn.Module):
    def __init__(self, width: int, n_freq: int) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.fc1 = nn.Linear(2 * n_freq + 6, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, cond: ConditionTensors) -> torch.Tensor:
        feats = kinematic_features(cond, self.n_freq).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(feats)))


class ShowerDiT(nn.Module):
    """DiT on 3D mesh patches. ``forward(x_BZPR, noise_label_B, cond, coords_TC=None) -> out_BZPR``.

    ``noise_label_B`` is the denoiser's scalar noise label (flow matching: 1000·t; EDM: 1000·c_noise).
    With ``step_condition`` the network also takes ``step_label_B`` (B,), the step-size label (shortcut
    models: 1000·d), embedded by ``step_embedder`` (a ``TimestepEmbedder`` with a zero output layer) and
    added to the conditioning vector; without it ``step_label_B`` must be None. ``coords_TC`` are the patch
    coordinates of ``patch_coordinates(mesh, patch)``; when None they are derived from the input shape with
    uniform radial bins. With ``layer_condition`` the network also reads the layer energies (``cond.layers``,
    a ``LayerCondition``): each token gets a linear map of its ``p_z`` layers' standardised energies added to
    its embedding (``layer_token_embed``), the conditioning vector a linear map of the shower's profile
    numbers (``layer_profile_embed``); both start at zero. Weights are initialised from ``seed`` through a
    private ``torch.Generator`` (the global RNG is not touched).
    """

    def __init__(
        self,
        config: BackboneConfig,
        n_detector_slots: int,
        seed: int = 0,
        step_condition: bool = False,
        layer_condition: bool = False,
    ) -> None:
        super().__init__()
        if n_detector_slots < 1:
            raise ValueError(f"n_detector_slots must be >= 1, got {n_detector_slots}")
        self.config = config
        self.n_detector_slots = n_detector_slots
        # Under autocast, carry the residual stream in the autocast dtype (bf16) instead of fp32; set from
        # ``ShowerModelConfig.residual_stream`` (no effect without autocast). See ``forward``.
        self.autocast_stream = False
        d = config.width
        self.n_pos_freq = d // 6  # frequencies per coordinate (sin + cos for 3 coordinates: 6·n ≤ D)
        with torch.device("meta"):
            self.patch_embed = nn.Linear(config.patch_volume, d)
            self.pos_proj = nn.Linear(6 * self.n_pos_freq, d) if config.pos_embed == "sincos+proj" else None
            self.t_embedder = TimestepEmbedder(d)
            self.kin_embedder = KinematicsEmbedder(d, config.energy_freqs)
            self.particle_embed = nn.Embedding(N_PARTICLE_TYPES, d)
            self.detector_embed = nn.Embedding(n_detector_slots, d)
            self.blocks = nn.ModuleList(
                [DiTBlock(d, config.heads, config.mlp_width) for _ in range(config.depth)]
            )
            self.final_layer = FinalLayer(d, config.patch_volume)
            # Registered last: networks without it keep their state-dict keys and initialisation draws.
            self.step_embedder = TimestepEmbedder(d) if step_condition else None
            self.layer_token_embed = nn.Linear(config.patch_size[0], d) if layer_condition else None
            self.layer_profile_embed = nn.Linear(LAYER_PROFILE_FEATURES, d) if layer_condition else None
        self.to_empty(device="cpu")
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """DiT initialisation (xavier-uniform linears, N(0, 0.02) embeddings and timestep MLP, zero adaLN
        modulation and output layer), drawn from ``torch.Generator().manual_seed(seed)``. The optional step
        embedder is drawn after everything else (N(0, 0.02) first layer, zero output layer), so the other
        weights do not depend on whether it exists; the optional layer-energy maps start at zero (no draw)."""
        gen = torch.Generator().manual_seed(int(seed))
        step = self.step_embedder
        layer_maps = [m for m in (self.layer_token_embed, self.layer_profile_embed) if m is not None]
        for _name, child in self.named_children():
            if child is not step and not any(child is m for m in layer_maps):
                xavier_init_linears(child, gen)
        for emb in (self.particle_embed, self.detector_embed):
            nn.init.normal_(emb.weight, std=0.02, generator=gen)
        for lin in (self.t_embedder.fc1, self.t_embedder.fc2):
            nn.init.normal_(lin.weight, std=0.02, generator=gen)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.pos_proj is not None:
            nn.init.zeros_(self.pos_proj.weight)
        if step is not None:
            nn.init.normal_(step.fc1.weight, std=0.02, generator=gen)
            nn.init.zeros_(step.fc1.bias)
            nn.init.zeros_(step.fc2.weight)
            nn.init.zeros_(step.fc2.bias)
        for lin in layer_maps:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def step_condition(self) -> bool:
        """Whether the network takes a step-size label (``forward``'s ``step_label_B``)."""
        return self.step_embedder is not None

    @property
    def layer_condition(self) -> bool:
        """Whether the network reads the layer energies (``cond.layers``)."""
        return self.layer_token_embed is not None

    def _layer_inputs(
        self, cond: ConditionTensors, n_tokens: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) token and (B, D) conditioning-vector contributions of ``cond.layers``."""
        assert self.layer_token_embed is not None and self.layer_profile_embed is not None
        layers = cond.layers
        if layers is None:
            raise ValueError(
                "this network is conditioned on the layer energies but cond.layers is None: attach them "
                "with ShowerModel.with_layers(cond, layer_mev_BZ) (the data's E_z in training, the head's "
                "at generation)"
            )
        b, n_z = layers.u_BZ.shape
        p_z = self.config.patch_size[0]
        if n_z % p_z or n_tokens % (n_z // p_z):
            raise ValueError(
                f"cond.layers has {n_z} layers, which do not tile {n_tokens} tokens in depth patches of {p_z}"
            )
        per_depth_BZD = self.layer_token_embed(layers.u_BZ.reshape(b, n_z // p_z, p_z).to(dtype))
        # token order (z, φ, r), z slowest: every token of a depth patch gets that patch's vector
        tokens_BTD = per_depth_BZD.repeat_interleave(n_tokens // (n_z // p_z), dim=1)
        return tokens_BTD, self.layer_profile_embed(layers.profile_BF.to(dtype))

    # ---- shape plumbing -------------------------------------------------------------------------------

    def patchify(self, x_BZPR: torch.Tensor) -> torch.Tensor:
        """(B, Z, P, R) -> (B, T, V), token order (z, phi, r), r fastest; V = p_z·p_phi·p_r."""
        b, n_z, n_phi, n_r = x_BZPR.shape
        p_z, p_phi, p_r = self.config.patch_size
        x = x_BZPR.reshape(b, n_z // p_z, p_z, n_phi // p_phi, p_phi, n_r // p_r, p_r)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, (n_z // p_z) * (n_phi // p_phi) * (n_r // p_r), p_z * p_phi * p_r)

    def unpatchify(self, x_BTV: torch.Tensor, mesh_shape: tuple[int, int, int]) -> torch.Tensor:
        n_z, n_phi, n_r = mesh_shape
        p_z, p_phi, p_r = self.config.patch_size
        b = x_BTV.shape[0]
        x = x_BTV.reshape(b, n_z // p_z, n_phi // p_phi, n_r // p_r, p_z, p_phi, p_r)
        x = x.permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, n_z, n_phi, n_r)

    def position_embedding(self, coords_TC: torch.Tensor) -> torch.Tensor:
        """(T, D): fixed sin-cos features (zero-padded to D) plus the optional learned projection."""
        cfg = self.config
        feats_TF = position_features(coords_TC, self.n_pos_freq, cfg.pos_max_freq, cfg.pos_max_freq_r)
        pad = self.config.width - feats_TF.shape[-1]
        pos_TD = F.pad(feats_TF, (0, pad)) if pad else feats_TF
        if self.pos_proj is not None:
            pos_TD = pos_TD + self.pos_proj(feats_TF.to(self.pos_proj.weight.dtype))
        return pos_TD

    def condition_context(self, cond: ConditionTensors) -> torch.Tensor:
        """(B, D): kinematics + particle + detector embeddings (no noise level). The layer-energy head
        (``caloforge.platform.energy``) reads it too, so both stages share one detector embedding."""
        return (
            self.kin_embedder(cond)
            + self.particle_embed(cond.particle_idx)
            + self.detector_embed(cond.detector_idx)
        )

    def condition_embedding(self, noise_label_B: torch.Tensor, cond: ConditionTensors) -> torch.Tensor:
        """(B, D): the adaLN conditioning vector (noise-level embedding + ``condition_context``)."""
        return self.t_embedder(noise_label_B) + self.condition_context(cond)

    def forward(
        self,
        x_BZPR: torch.Tensor,
        noise_label_B: torch.Tensor,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
        step_label_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x_BZPR.ndim != 4:
            raise ValueError(f"ShowerDiT input must be (B, n_z, n_phi, n_r), got shape {tuple(x_BZPR.shape)}")
        mesh_shape = tuple(int(s) for s in x_BZPR.shape[1:])
        self.config.check_mesh(mesh_shape)  # type: ignore[arg-type]
        if coords_TC is None:
            coords_TC = patch_coordinates(mesh_shape, self.config.patch_size).to(x_BZPR.device)  # type: ignore[arg-type]
        # Inputs follow the weights' dtype, so a model cast to bf16 (e.g. by DeepSpeed) accepts fp32 inputs;
        # under autocast the weights stay fp32 and this is a no-op.
        dtype = self.patch_embed.weight.dtype
        tokens_BTV = self.patchify(x_BZPR.to(dtype))
        if coords_TC.shape[0] != tokens_BTV.shape[1]:
            raise ValueError(
                f"coords_TC has {coords_TC.shape[0]} rows but the mesh {mesh_shape} has "
                f"{tokens_BTV.shape[1]} tokens"
            )
        pos_TD = self.position_embedding(coords_TC.float().to(x_BZPR.device))
        h_BTD = self.patch_embed(tokens_BTV) + pos_TD.to(dtype)[None]
        layer_vector_BD = None
        if self.layer_token_embed is not None:
            layer_tokens_BTD, layer_vector_BD = self._layer_inputs(cond, h_BTD.shape[1], dtype)
            h_BTD = h_BTD + layer_tokens_BTD
        device_type = h_BTD.device.type
        if self.autocast_stream and torch.is_autocast_enabled(device_type):
            # The residual stream in bf16: the memory-bound work around the matmuls (norm + modulation,
            # gated residual adds) moves half the bytes. LayerNorm still normalises in fp32 (autocast) and
            # the weights stay fp32; only the running sum x + gate·f(x) is rounded to bf16 each block.
            h_BTD = h_BTD.to(torch.get_autocast_dtype(device_type))
        c_BD = self.condition_embedding(noise_label_B, cond)
        if layer_vector_BD is not None:
            c_BD = c_BD + layer_vector_BD
        if self.step_embedder is not None:
            if step_label_B is None:
                raise ValueError("this ShowerDiT is step-conditioned: forward needs step_label_B")
            c_BD = c_BD + self.step_embedder(step_label_B)
        elif step_label_B is not None:
            raise ValueError("this ShowerDiT has no step condition: step_label_B must be None")
        c_BD = c_BD.to(h_BTD.dtype)
        for block in self.blocks:
            h_BTD = block(h_BTD, c_BD)
        out_BTV = self.final_layer(h_BTD, c_BD)
        return self.unpatchify(out_BTV, mesh_shape)  # type: ignore[arg-type]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(config: BackboneConfig, mesh_shape: tuple[int, int, int]) -> dict[str, int]:
    """Analytic FLOPs of one ``ShowerDiT`` forward for one shower (2 FLOPs per multiply-add).

    ``linear``: every matmul of the linear layers (patch embedding, condition MLPs, qkv/proj/MLP/adaLN per
    block, final layer); ``attention``: QKᵀ and AV, 4·T²·D per block; ``shared``: the optional learned
    position projection, computed once per forward for the whole batch (not included in ``total``).
    Elementwise ops (norms, GELU, softmax, modulation) are not counted. One training step costs ≈ 3×.
    """
    t_z, t_phi, t_r = config.check_mesh(mesh_shape)
    t = t_z * t_phi * t_r
    d, m, v = config.width, config.mlp_width, config.patch_volume
    per_block = 2 * t * d * (3 * d + d + 2 * m) + 2 * d * 6 * d
    embed = 2 * t * v * d + 2 * (TIME_FREQ_DIM * d + d * d) + 2 * ((2 * config.energy_freqs + 6) * d + d * d)
    final = 2 * d * 2 * d + 2 * t * d * v
    linear = embed + config.depth * per_block + final
    attention = config.depth * 4 * t * t * d
    shared = 2 * t * 6 * (d // 6) * d if config.pos_embed == "sincos+proj" else 0
    return {
        "linear": linear,
        "attention": attention,
        "total": linear + attention,
        "shared": shared,
        "tokens": t,
    }


__all__ = [
    "BACKBONE_FLAVORS",
    "DEFAULT_POS_MAX_FREQ",
    "LORA_TARGETS",
    "BackboneConfig",
    "ShowerDiT",
    "backbone_config",
    "count_parameters",
    "forward_flops",
    "patch_coordinates",
    "position_features",
]
