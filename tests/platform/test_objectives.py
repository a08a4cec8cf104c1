"""Objectives: the documented formulas and draw order, calls through DDP, and input validation."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.objectives import OBJECTIVES, get_objective, unwrap_shower_model


def batch(model, n: int = 5, seed: int = 6):
    showers, cond = toy_showers(n, SMALL_MESH, seed=seed)
    return model.to_model_space(showers), model.encode_conditions(cond)


def test_flow_matching_loss_is_the_linear_path_velocity_regression() -> None:
    model = make_model("flow_matching")
    x1, ct = batch(model)
    loss = OBJECTIVES["flow_matching"](model, x1, ct, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.rand(x1.shape[0], generator=gen)
    tb = t[:, None, None, None]
    with torch.no_grad():
        v = model((1 - tb) * x0 + tb * x1, t, ct)
    expected = ((v - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)


def test_edm_loss_is_weighted_denoising_with_lognormal_sigma() -> None:
    model = make_model("edm")
    x1, ct = batch(model)
    loss = OBJECTIVES["edm"](model, x1, ct, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    sigma = torch.exp(torch.randn(x1.shape[0], generator=gen) * 1.2 - 1.2)
    noise = torch.randn(x1.shape, generator=gen)
    with torch.no_grad():
        denoised = model(x1 + sigma[:, None, None, None] * noise, sigma, ct)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * ((denoised - x1) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_objectives_call_through_ddp(objective: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    # The objective alone (the layer-energy head's loss through DDP: tests/platform/test_energy_head.py).
    model = make_model(objective, layer_energy=LayerEnergyConfig(enabled=False))
    x1, ct = batch(model)
    plain = OBJECTIVES[objective](model, x1, ct, torch.Generator().manual_seed(0))
    plain.mean().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert unwrap_shower_model(wrapped) is model
        loss = OBJECTIVES[objective](wrapped, x1, ct, torch.Generator().manual_seed(0))
        loss.mean().backward()  # DDP's reducer only fires when the forward went through the wrapper
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-6, atol=1e-8, msg=name)


def test_objective_input_validation() -> None:
    fm, edm = make_model("flow_matching", scramble=False), make_model("edm", scramble=False)
    x1, ct = batch(fm)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(
        ValueError, match="objective 'edm' cannot train a model built with objective='flow_matching'"
    ):
        OBJECTIVES["edm"](fm, x1, ct, gen)
    with pytest.raises(ValueError, match=r"x1_BZPR must have shape \(B, 12, 8, 6\)"):
        OBJECTIVES["edm"](edm, x1[:, :6], ct, gen)
    with pytest.raises(ValueError, match="cond has 5 rows but x1_BZPR has batch 4"):
        OBJECTIVES["flow_matching"](fm, x1[:4], ct, gen)
    with pytest.raises(ValueError, match="expected a ShowerModel"):
        OBJECTIVES["flow_matching"](torch.nn.Linear(2, 2), x1, ct, gen)
    with pytest.raises(ValueError, match="unknown objective 'score'"):
        get_objective("score")


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_objectives_under_bf16_autocast_and_with_a_bf16_network(objective: str) -> None:
    model = make_model(objective)
    x1, ct = batch(model)
    reference = OBJECTIVES[objective](model, x1, ct, torch.Generator().manual_seed(0)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = OBJECTIVES[objective](model, x1, ct, torch.Generator().manual_seed(0))
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast.detach(), reference, rtol=2e-2, atol=1e-3)
    model.network.autocast_stream = True  # ShowerModelConfig.residual_stream = "autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_stream = OBJECTIVES[objective](model, x1, ct, torch.Generator().manual_seed(0))
    assert bf16_stream.dtype == torch.float32
    torch.testing.assert_close(bf16_stream.detach(), reference, rtol=2e-2, atol=1e-3)
    bf16_stream.mean().backward()
    grad = model.network.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    model.zero_grad(set_to_none=True)
    model.network.autocast_stream = False
    model.network.bfloat16()  # what a bf16 DeepSpeed engine does to the weights; inputs stay fp32
    cast = OBJECTIVES[objective](model, x1, ct, torch.Generator().manual_seed(0))
    torch.testing.assert_close(cast.detach(), reference, rtol=2e-2, atol=1e-3)
    cast.mean().backward()
    assert model.network.blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16
