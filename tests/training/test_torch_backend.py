"""TorchBackend: accumulation boundary, clipping, non-finite skipping, bf16 autocast, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from caloforge.training.config import LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.torch_backend import DDPBackend, TorchBackend, resolve_device, resolve_precision


def _setup(
    max_grad_norm: float | None = 1.0, grad_accum: int = 1, precision: str = "fp32", fused: bool | None = None
) -> TorchBackend:
    torch.manual_seed(0)
    backend = TorchBackend("cpu", fused_adamw=fused)
    cfg = LoopConfig(
        steps=10,
        batch_size=4 * grad_accum,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        precision=precision,
        optim=OptimConfig(lr=0.1, weight_decay=0.0),
        schedule=ScheduleConfig(kind="constant", warmup_frac=0.0, stable_frac=0.0),
    )
    backend.setup(nn.Linear(3, 2), cfg)
    return backend


def _loss(backend: TorchBackend, scale: float = 1.0) -> torch.Tensor:
    x = torch.arange(12.0).reshape(4, 3) / 10
    with backend.autocast(), backend.accumulate():
        out = backend.module(x)
    return scale * (out.float() ** 2).sum(dim=1).mean()


def test_update_only_at_the_accumulation_boundary() -> None:
    backend = _setup(grad_accum=3, max_grad_norm=None)
    w0 = backend.model.weight.detach().clone()
    for i in range(2):
        backend.backward(_loss(backend))
        assert backend.step() is None, i
        assert torch.equal(backend.model.weight, w0)
    backend.backward(_loss(backend))
    info = backend.step()
    assert info is not None and info.lr == pytest.approx(0.1) and not info.skipped
    assert not torch.equal(backend.model.weight, w0)
    assert all(p.grad is None for p in backend.model.parameters())


def test_grad_norm_is_reported_before_clipping_and_clipping_applies() -> None:
    reference = _setup(max_grad_norm=None)
    reference.backward(_loss(reference, scale=10.0))
    expected_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.model.parameters()))
    grads = {n: p.grad.clone() for n, p in reference.model.named_parameters()}

    clipped = _setup(max_grad_norm=0.5)
    clipped.backward(_loss(clipped, scale=10.0))
    info = clipped.step()
    assert info.grad_norm == pytest.approx(expected_norm, rel=1e-5)
    # AdamW's first moment after one update is (1 − β1)·g: g is the clipped gradient
    for name, p in clipped.model.named_parameters():
        exp_avg = clipped.optimizer.state[p]["exp_avg"]
        torch.testing.assert_close(exp_avg, 0.1 * grads[name] * 0.5 / expected_norm, rtol=1e-5, atol=1e-7)


def test_non_finite_gradients_skip_the_update_but_advance_the_schedule() -> None:
    backend = _setup()
    w0 = backend.model.weight.detach().clone()
    backend.backward(_loss(backend) * float("nan"))
    info = backend.step()
    assert info.skipped and not math.isfinite(info.grad_norm)
    assert torch.equal(backend.model.weight, w0)
    assert backend.scheduler.last_epoch == 1
    assert all(p.grad is None for p in backend.model.parameters())


def test_fused_adamw_decides_the_skip_on_the_device_without_a_host_sync() -> None:
    """With fused AdamW (the CUDA default) the norm and the skip flag stay tensors (no per-step GPU→host
    sync); a non-finite norm leaves weights, moments and step counts untouched, a finite one updates."""
    backend = _setup(fused=True)
    w0 = backend.model.weight.detach().clone()
    backend.backward(_loss(backend) * float("nan"))
    info = backend.step()
    assert isinstance(info.grad_norm, torch.Tensor) and isinstance(info.skipped, torch.Tensor)
    assert bool(info.skipped) and not math.isfinite(float(info.grad_norm))
    assert torch.equal(backend.model.weight, w0)
    assert float(backend.optimizer.state[backend.model.weight]["step"]) == 0.0
    assert backend.scheduler.last_epoch == 1
    assert not hasattr(backend.optimizer, "found_inf")
    backend.backward(_loss(backend))
    info = backend.step()
    assert not bool(info.skipped) and math.isfinite(float(info.grad_norm))
    assert not torch.equal(backend.model.weight, w0)
    assert float(backend.optimizer.state[backend.model.weight]["step"]) == 1.0


def test_bf16_autocast_on_request_and_auto_is_fp32_on_cpu() -> None:
    bf16 = _setup(precision="bf16")
    with bf16.autocast():
        assert bf16.module(torch.ones(1, 3)).dtype == torch.bfloat16
    assert bf16.model.weight.dtype == torch.float32  # master weights stay fp32
    auto = _setup(precision="auto")
    assert auto.precision == "fp32"
    with auto.autocast():
        assert auto.module(torch.ones(1, 3)).dtype == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", torch.device("cpu"))


def test_save_load_round_trip(tmp_path) -> None:
    a = _setup()
    for _ in range(3):
        a.backward(_loss(a))
        a.step()
    a.save(tmp_path)
    b = _setup()
    b.load(tmp_path)
    assert torch.equal(a.model.weight, b.model.weight)
    assert b.scheduler.last_epoch == 3
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(a.optimizer.state[pa]["exp_avg_sq"], b.optimizer.state[pb]["exp_avg_sq"])
    with pytest.raises(ValueError, match=r"missing model\.pt"):
        _setup().load(tmp_path / "nothing")


def test_device_and_setup_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="not supported"):
            resolve_device("meta")
    with pytest.raises(ValueError, match="process group"):
        DDPBackend("cpu")
    with pytest.raises(RuntimeError, match="setup"):
        _ = TorchBackend("cpu").module
    backend = _setup()
    with pytest.raises(RuntimeError, match="twice"):
        backend.setup(nn.Linear(1, 1), LoopConfig())
    with pytest.raises(ValueError, match="scalar loss"):
        backend.backward(torch.ones(2, requires_grad=True))
