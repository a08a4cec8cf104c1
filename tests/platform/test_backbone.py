"""ShowerDiT: patching, coordinates, conditioning, initialisation, flavours and validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from toy_models import SMALL_MESH, make_model, scramble_zero_init

from caloforge.platform.backbone import (
    BACKBONE_FLAVORS,
    DEFAULT_POS_MAX_FREQ,
    DEFAULT_POS_MAX_FREQ_R,
    TIME_FREQ_DIM,
    BackboneConfig,
    ShowerDiT,
    count_parameters,
    forward_flops,
    patch_coordinates,
    position_features,
)
from caloforge.platform.conditioning import N_PARTICLE_TYPES, ConditionTensors
from caloforge.platform.geometry import Mesh

DEBUG = BACKBONE_FLAVORS["debug"]


def cond_tensors(b: int, particle: int = 0, detector: int = 0, energy: float = 1e4) -> ConditionTensors:
    return ConditionTensors(
        torch.full((b,), energy),
        torch.full((b,), 1.5),
        torch.linspace(-3.0, 3.0, b),
        torch.full((b,), particle, dtype=torch.int64),
        torch.full((b,), detector, dtype=torch.int64),
    )


def scrambled_net(seed: int = 0) -> ShowerDiT:
    return scramble_zero_init(make_model("flow_matching", scramble=False), seed=seed).network


def test_calodit2_patching_gives_360_tokens_and_unpatchify_inverts() -> None:
    net = ShowerDiT(DEBUG, n_detector_slots=3)
    x = torch.randn(2, 45, 16, 9, generator=torch.Generator().manual_seed(0))
    tokens = net.patchify(x)
    assert tokens.shape == (2, 360, 18)
    torch.testing.assert_close(net.unpatchify(tokens, (45, 16, 9)), x, rtol=0, atol=0)
    # Token 0 is the patch of layers 0-2, phi bins 0-1, radial bins 0-2, flattened (z, phi, r), r fastest.
    torch.testing.assert_close(tokens[0, 0], x[0, 0:3, 0:2, 0:3].reshape(-1), rtol=0, atol=0)
    # The last radial patch of the first (z, phi) cell is token 2 (r fastest in token order).
    torch.testing.assert_close(tokens[1, 2], x[1, 0:3, 0:2, 6:9].reshape(-1), rtol=0, atol=0)


def test_indivisible_mesh_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"n_phi=15 % 2"):
        DEBUG.check_mesh((45, 15, 9))
    net = ShowerDiT(DEBUG, n_detector_slots=1)
    with pytest.raises(ValueError, match=r"not divisible by patch_size \(3, 2, 3\).*n_z=44 % 3"):
        net(torch.zeros(1, 44, 16, 9), torch.zeros(1), cond_tensors(1))
    with pytest.raises(ValueError, match="not divisible"):
        make_model(shape=(12, 8, 5))


def test_patch_coordinates_are_normalised_physical_positions() -> None:
    mesh = Mesh(6, 4, (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0))
    coords = patch_coordinates(mesh, (3, 2, 3))
    assert coords.shape == (2 * 2 * 2, 4)
    grid = coords.reshape(2, 2, 2, 4)
    torch.testing.assert_close(grid[:, 0, 0, 0], torch.tensor([0.25, 0.75]))
    alpha = torch.atan2(grid[0, :, 0, 1], grid[0, :, 0, 2])
    torch.testing.assert_close(alpha, torch.tensor([-math.pi / 2, math.pi / 2]))
    # Radius fraction uses the physical (non-uniform) edges: patch centres at 2 mm and 18 mm of 32 mm.
    torch.testing.assert_close(grid[0, 0, :, 3], torch.tensor([2.0 / 32, 18.0 / 32]))
    uniform = patch_coordinates((6, 4, 6), (3, 2, 3)).reshape(2, 2, 2, 4)
    torch.testing.assert_close(uniform[0, 0, :, 3], torch.tensor([0.25, 0.75]))


@pytest.mark.parametrize("shape", [SMALL_MESH, (45, 16, 9)])
def test_position_features_bounded_distinct_and_azimuth_periodic(shape: tuple[int, int, int]) -> None:
    coords = patch_coordinates(shape, (3, 2, 3))
    feats = position_features(coords, 10, DEFAULT_POS_MAX_FREQ)
    assert feats.shape == (coords.shape[0], 60)
    assert feats.abs().max() <= 1.0 + 1e-6
    dist = torch.cdist(feats, feats) + torch.eye(feats.shape[0]) * 1e3
    assert dist.min() > 0.1, "two patches share a position embedding"
    shifted = coords.clone()
    alpha = torch.atan2(coords[:, 1], coords[:, 2]) + 2 * math.pi
    shifted[:, 1], shifted[:, 2] = torch.sin(alpha), torch.cos(alpha)
    torch.testing.assert_close(position_features(shifted, 10, DEFAULT_POS_MAX_FREQ), feats, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("max_freq", "bound"), [(DEFAULT_POS_MAX_FREQ, 0.2), (32.0, None)])
def test_position_features_interpolate_between_depth_tokens(max_freq: float, bound: float | None) -> None:
    """A token half a pitch off the 15 depth tokens of 45 layers (a mesh placed off the base's grid) gets
    nearly the mean of its two neighbours' features with the default frequencies; with features up to 32
    half periods (above the grid's Nyquist, the default before bundle schema 4) it gets something else."""
    n_tokens = 15
    on_grid = (torch.arange(n_tokens) + 0.5) / n_tokens
    between = on_grid[:-1] + 0.5 / n_tokens

    def features(u_z: torch.Tensor) -> torch.Tensor:
        coords = torch.zeros(len(u_z), 4)
        coords[:, 0], coords[:, 2], coords[:, 3] = u_z, 1.0, 0.5
        return position_features(coords, 10, max_freq)

    grid = features(on_grid)
    error = (features(between) - 0.5 * (grid[:-1] + grid[1:])).norm(dim=1)
    relative = (error / (grid[1:] - grid[:-1]).norm(dim=1)).max().item()
    if bound is not None:
        assert relative < bound
    else:
        assert relative > 0.7  # 0.78: the halfway token looks like neither neighbour


def test_radius_features_take_their_own_limit() -> None:
    """``max_freq_r`` changes the u_r columns only (depth and azimuth stay bit for bit); None or the depth's
    value is the single-limit feature set; the backbone reads it from ``BackboneConfig.pos_max_freq_r``."""
    coords = patch_coordinates((45, 16, 9), (3, 2, 3))
    n = 10
    both = position_features(coords, n, 8.0)
    assert torch.equal(position_features(coords, n, 8.0, 8.0), both)
    radius3 = position_features(coords, n, 8.0, 3.0)
    assert torch.equal(radius3[:, : 4 * n], both[:, : 4 * n])  # u_z and azimuth columns
    assert not torch.allclose(radius3[:, 4 * n :], both[:, 4 * n :])
    # the u_r features of 3 half periods: the top frequency is 3π (one column checks it by hand)
    u_r = coords[:, 3]
    torch.testing.assert_close(radius3[:, 5 * n - 1], torch.sin(3.0 * math.pi * u_r))
    cfg = replace(DEBUG, pos_max_freq_r=2.0)
    assert DEBUG.radius_max_freq == DEFAULT_POS_MAX_FREQ_R == 3.0  # the default since bundle schema 5
    assert replace(DEBUG, pos_max_freq_r=None).radius_max_freq == DEBUG.pos_max_freq  # None: as the depth
    net = ShowerDiT(cfg, n_detector_slots=2, seed=0)
    torch.testing.assert_close(
        net.position_embedding(coords)[:, : 6 * net.n_pos_freq],
        position_features(coords, net.n_pos_freq, cfg.pos_max_freq, 2.0),
    )
    for bad in (0.5, float("inf"), False, "3"):
        with pytest.raises(ValueError, match=r"BackboneConfig\.pos_max_freq_r must be a finite number >= 1"):
            replace(DEBUG, pos_max_freq_r=bad)


def test_adaln_zero_init_outputs_zero_and_no_global_rng_use() -> None:
    state = torch.random.get_rng_state()
    a = ShowerDiT(DEBUG, n_detector_slots=3, seed=4)
    b = ShowerDiT(DEBUG, n_detector_slots=3, seed=4)
    c = ShowerDiT(DEBUG, n_detector_slots=3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    for block in a.blocks:
        assert not block.adaLN_modulation.weight.any()
    out = a(torch.randn(3, *SMALL_MESH), torch.rand(3) * 1000, cond_tensors(3))
    assert out.shape == (3, *SMALL_MESH) and not out.any()


def test_output_depends_on_every_condition_and_not_on_other_rows() -> None:
    net = scrambled_net()
    x = torch.randn(4, *SMALL_MESH, generator=torch.Generator().manual_seed(1))
    label = torch.full((4,), 500.0)
    with torch.no_grad():
        base = net(x, label, cond_tensors(4))
        changes = {
            "particle": net(x, label, cond_tensors(4, particle=N_PARTICLE_TYPES - 1)),
            "detector": net(x, label, cond_tensors(4, detector=1)),
            "energy": net(x, label, cond_tensors(4, energy=5e4)),
            "noise label": net(x, label * 0.5, cond_tensors(4)),
            "input": net(x.flip(1), label, cond_tensors(4)),
        }
        for what, out in changes.items():
            assert (out - base).abs().mean() > 1e-4, f"output ignores the {what}"
        one = net(x[2:3], label[2:3], cond_tensors(4).index(slice(2, 3)))
    torch.testing.assert_close(one, base[2:3], rtol=1e-4, atol=1e-5)


def expected_parameters(cfg: BackboneConfig, slots: int) -> int:
    d, m, v = cfg.width, cfg.mlp_width, cfg.patch_volume
    kin_in = 2 * cfg.energy_freqs + 6
    embed = (v * d + d) + (TIME_FREQ_DIM * d + d + d * d + d) + (kin_in * d + d + d * d + d)
    embed += (N_PARTICLE_TYPES + slots) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (d * v + v)
    return embed + cfg.depth * block + final


@pytest.mark.parametrize("flavor", ["debug", "S"])
def test_flavour_sizes_and_parameter_count(flavor: str) -> None:
    cfg = BACKBONE_FLAVORS[flavor]
    net = ShowerDiT(cfg, n_detector_slots=5)
    assert count_parameters(net) == expected_parameters(cfg, 5)
    if flavor == "S":  # CaloDiT-2 sizes
        assert (cfg.depth, cfg.width, cfg.heads, cfg.mlp_width, cfg.patch_size) == (
            6,
            384,
            6,
            1536,
            (3, 2, 3),
        )
        assert 15e6 < count_parameters(net) < 17e6
    assert (BACKBONE_FLAVORS["B"].depth, BACKBONE_FLAVORS["B"].width) == (12, 768)


def test_learned_position_projection_starts_at_the_fixed_embedding() -> None:
    cfg = replace(DEBUG, pos_embed="sincos+proj")
    net = ShowerDiT(cfg, n_detector_slots=2)
    fixed = ShowerDiT(DEBUG, n_detector_slots=2)
    coords = patch_coordinates(SMALL_MESH, (3, 2, 3))
    assert net.pos_proj is not None
    torch.testing.assert_close(net.position_embedding(coords), fixed.position_embedding(coords))
    assert "pos_proj.weight" in net.state_dict() and "pos_proj.weight" not in fixed.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 66, "heads": 4}, "width=66 is not divisible by heads=4"),
        ({"depth": 0}, "depth must be an int >= 1"),
        ({"patch_size": (3, 0, 3)}, "patch_size"),
        ({"pos_embed": "learned"}, "pos_embed must be one of"),
    ],
)
def test_backbone_config_validation(kwargs: dict, match: str) -> None:
    base = {"depth": 2, "width": 64, "heads": 4, "mlp_width": 128}
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**{**base, **kwargs})


def test_analytic_flops_match_the_flop_counter_for_linear_layers() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    for cfg in (DEBUG, replace(DEBUG, pos_embed="sincos+proj")):
        net = ShowerDiT(cfg, n_detector_slots=2)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(2, 45, 16, 9), torch.zeros(2), cond_tensors(2))
        flops = forward_flops(cfg, (45, 16, 9))
        # The counter sees the matmuls (CPU SDPA has no registered formula): compare the linear part.
        assert counter.get_total_flops() == 2 * flops["linear"] + flops["shared"]
        assert flops["tokens"] == 360 and flops["attention"] == cfg.depth * 4 * 360 * 360 * cfg.width


def block_input_dtypes(
    net: ShowerDiT, x: torch.Tensor, autocast: bool
) -> tuple[list[torch.dtype], torch.Tensor]:
    seen: list[torch.dtype] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype)) for b in net.blocks]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x, torch.full((x.shape[0],), 300.0), cond_tensors(x.shape[0]))
    finally:
        for h in hooks:
            h.remove()
    return seen, out.float()


def test_autocast_residual_stream_is_bf16_only_under_autocast() -> None:
    net = scrambled_net()
    x = torch.randn(4, *SMALL_MESH, generator=torch.Generator().manual_seed(2))
    assert net.autocast_stream is False  # the default recipe: fp32 stream under autocast
    dtypes_fp32_stream, out_fp32_stream = block_input_dtypes(net, x, autocast=True)
    _, out_fp32 = block_input_dtypes(net, x, autocast=False)
    net.autocast_stream = True
    dtypes_bf16_stream, out_bf16_stream = block_input_dtypes(net, x, autocast=True)
    _, out_fp32_flagged = block_input_dtypes(net, x, autocast=False)
    assert dtypes_fp32_stream == [torch.float32] * len(net.blocks)
    assert dtypes_bf16_stream == [torch.bfloat16] * len(net.blocks)
    # Without autocast the flag changes nothing, bit for bit (fp32 training, the ONNX export).
    assert torch.equal(out_fp32_flagged, out_fp32)
    # Under autocast the bf16 stream stays within bf16 rounding of the fp32-stream output.
    scale = out_fp32.abs().mean()
    assert (out_fp32_stream - out_fp32).abs().mean() / scale < 1e-2
    assert (out_bf16_stream - out_fp32).abs().mean() / scale < 2e-2
    assert not torch.equal(out_bf16_stream, out_fp32_stream)
