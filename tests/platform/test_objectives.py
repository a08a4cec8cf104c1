"""Objectives: the documented formulas and draw order, calls through DDP, and input validation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.environment import free_port
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.objectives import (
    NATIVE_OBJECTIVES,
    OBJECTIVES,
    EDMLoss,
    EDMLossConfig,
    FlowMatchingConfig,
    LossContext,
    ObjectiveConfig,
    make_objective,
    unwrap_shower_model,
)

# Objectives that train a model on data alone (distillation objectives need a teacher and a target
# network: tests/platform/test_consistency.py).
SELF_CONTAINED = sorted(o for o in OBJECTIVES if o in NATIVE_OBJECTIVES.values() and o in NATIVE_OBJECTIVES)


def batch(model, n: int = 5, seed: int = 6):
    showers, cond = toy_showers(n, SMALL_MESH, seed=seed)
    return model.to_model_space(showers), model.encode_conditions(cond)


def test_flow_matching_loss_is_the_linear_path_velocity_regression() -> None:
    model = make_model("flow_matching")
    x1, ct = batch(model)
    loss = make_objective("flow_matching")(model, x1, ct, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.rand(x1.shape[0], generator=gen)
    tb = t[:, None, None, None]
    with torch.no_grad():
        v = model((1 - tb) * x0 + tb * x1, t, ct)
    expected = ((v - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)


def test_flow_matching_with_logit_normal_time_draws_t_as_a_sigmoid_of_a_normal() -> None:
    from caloforge.platform.objectives.flow_matching import sample_time

    model = make_model("flow_matching")
    x1, ct = batch(model)
    options = FlowMatchingConfig(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    config = ObjectiveConfig(name="flow_matching", flow_matching=options)
    loss = make_objective(config, "flow_matching")(model, x1, ct, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.sigmoid(0.5 + 0.8 * torch.randn(x1.shape[0], generator=gen))
    tb = t[:, None, None, None]
    with torch.no_grad():
        v = model((1 - tb) * x0 + tb * x1, t, ct)
    torch.testing.assert_close(
        loss.detach(), ((v - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-7
    )
    # the distribution: logit(t) ~ N(0.5, 0.8²)
    logit = torch.logit(sample_time(200_000, torch.Generator().manual_seed(0), options).double())
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    with pytest.raises(ValueError, match=r"objective\.flow_matching\.time_sampling must be one of"):
        FlowMatchingConfig(time_sampling="cosine")
    with pytest.raises(ValueError, match=r"logit_std must be > 0"):
        FlowMatchingConfig(time_sampling="logit_normal", logit_std=0.0)


def test_edm_loss_is_weighted_denoising_with_lognormal_sigma() -> None:
    model = make_model("edm")
    x1, ct = batch(model)
    loss = make_objective("edm")(model, x1, ct, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    sigma = torch.exp(torch.randn(x1.shape[0], generator=gen) * 1.2 - 1.2)
    noise = torch.randn(x1.shape, generator=gen)
    with torch.no_grad():
        denoised = model(x1 + sigma[:, None, None, None] * noise, sigma, ct)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * ((denoised - x1) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective", SELF_CONTAINED)
def test_objectives_call_through_ddp(objective: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    # The objective alone (the layer-energy head's loss through DDP: tests/platform/test_energy_head.py).
    model = make_model(objective, layer_energy=LayerEnergyConfig(enabled=False))
    x1, ct = batch(model)
    plain = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0))
    plain.mean().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert unwrap_shower_model(wrapped) is model
        loss = make_objective(objective)(wrapped, x1, ct, torch.Generator().manual_seed(0))
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
        ValueError, match="objective 'edm' cannot train a model with parametrisation='flow_matching'"
    ):
        make_objective("edm")(fm, x1, ct, gen)
    with pytest.raises(ValueError, match=r"x1_BZPR must have shape \(B, 12, 8, 6\)"):
        make_objective("edm")(edm, x1[:, :6], ct, gen)
    with pytest.raises(ValueError, match="cond has 5 rows but x1_BZPR has batch 4"):
        make_objective("flow_matching")(fm, x1[:4], ct, gen)
    with pytest.raises(ValueError, match="expected a ShowerModel"):
        make_objective("flow_matching")(torch.nn.Linear(2, 2), x1, ct, gen)
    with pytest.raises(ValueError, match=r"objective\.name: unknown 'score'"):
        make_objective("score")
    with pytest.raises(ValueError, match="cannot train a model with parametrisation='edm'"):
        make_objective("flow_matching", parametrisation="edm")  # checked before any data is seen
    with pytest.raises(ValueError, match="give an objective name or the model's parametrisation"):
        make_objective(None)


def test_objective_options_live_in_the_objective_config_not_the_model() -> None:
    """The model records its parametrisation; the job's objective config chooses the loss and its options."""
    model = make_model("edm")
    x1, ct = batch(model)
    native = make_objective(None, parametrisation="edm")
    assert isinstance(native, EDMLoss) and native.config == EDMLossConfig()
    shifted = make_objective(ObjectiveConfig(edm=EDMLossConfig(p_mean=0.5, p_std=0.3)), "edm")
    loss = shifted(model, x1, ct, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    sigma = torch.exp(torch.randn(x1.shape[0], generator=gen) * 0.3 + 0.5)
    noise = torch.randn(x1.shape, generator=gen)
    with torch.no_grad():
        denoised = model(x1 + sigma[:, None, None, None] * noise, sigma, ct)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # σ_data is the model's (its preconditioning)
    expected = weight * ((denoised - x1) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    assert not hasattr(model.config, "flow_matching") and not hasattr(model.config.edm, "p_mean")
    with pytest.raises(ValueError, match=r"objective\.edm\.p_std must be > 0"):
        EDMLossConfig(p_std=0.0)
    with pytest.raises(ValueError, match=r"objective\.flow_matching\.coupling must be one of"):
        ObjectiveConfig(flow_matching=FlowMatchingConfig(coupling="sinkhorn"))


def test_loss_context_names_what_an_objective_needs() -> None:
    ctx = LossContext(step=3)
    with pytest.raises(ValueError, match="needs a frozen teacher model"):
        ctx.require_teacher("consistency distillation")
    with pytest.raises(ValueError, match="needs a target network"):
        ctx.require_target("consistency distillation")
    with pytest.raises(ValueError, match="step must be >= 0"):
        LossContext(step=-1)


@pytest.mark.parametrize("objective", SELF_CONTAINED)
def test_objectives_under_bf16_autocast_and_with_a_bf16_network(objective: str) -> None:
    model = make_model(objective)
    x1, ct = batch(model)
    reference = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0))
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast.detach(), reference, rtol=2e-2, atol=1e-3)
    model.network.autocast_stream = True  # ShowerModelConfig.residual_stream = "autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_stream = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0))
    assert bf16_stream.dtype == torch.float32
    torch.testing.assert_close(bf16_stream.detach(), reference, rtol=2e-2, atol=1e-3)
    bf16_stream.mean().backward()
    grad = model.network.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    model.zero_grad(set_to_none=True)
    model.network.autocast_stream = False
    model.network.bfloat16()  # what a bf16 DeepSpeed engine does to the weights; inputs stay fp32
    cast = make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(0))
    torch.testing.assert_close(cast.detach(), reference, rtol=2e-2, atol=1e-3)
    cast.mean().backward()
    assert model.network.blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16
