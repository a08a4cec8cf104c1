"""``loop.compile`` and fused AdamW in the backends.

Off by default and ignored on CPU (the CPU path is unchanged); on CUDA a compiled debug ShowerModel trains
through ``TorchBackend`` and ``DeepSpeedBackend`` with unchanged parameter names and state-dict keys, its
deep copies (the EMA-averaged model, bundles) are eager modules, and the compiled forward computes what the
eager one does. Toggling ``loop.compile`` does not block resuming a pretraining run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig
from caloforge.pretrain.config import resume_differences
from caloforge.training.backend import Backend
from caloforge.training.config import LoopConfig, OptimConfig
from caloforge.training.loop import Trainer
from caloforge.training.optim import build_optimizer
from caloforge.training.tasks import shower_loss_fn
from caloforge.training.torch_backend import TorchBackend, use_fused_adamw

MESH = (6, 4, 3)


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, Conditions]:
    rng = np.random.default_rng(seed)
    energy = rng.uniform(2e3, 2e4, n)
    showers = rng.exponential(1.0, (n, *MESH)) * (energy / 72.0)[:, None, None, None]
    showers[rng.random(showers.shape) < 0.3] = 0.0
    det = np.where(rng.random(n) < 0.5, "det-a", "det-b")
    return showers.astype(np.float32), Conditions.make(
        energy, 0.1, 0.0, np.where(det == "det-a", 11, 211), det
    )


def _model() -> ShowerModel:
    showers, cond = _data(32)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    cfg = ShowerModelConfig(backbone="debug", parametrisation="edm", sampler="euler", num_steps=4)
    return ShowerModel.build(cfg, ConditionVocab.create(["det-a", "det-b"], spare_slots=1), stats, MESH)


class _Batches:
    def __init__(self, n: int, batch: int) -> None:
        showers, cond = _data(n, seed=1)
        self.batches = [
            ShowerBatch.from_numpy(showers[i : i + batch], cond.subset(slice(i, i + batch)))
            for i in range(0, n - batch + 1, batch)
        ]

    def __iter__(self) -> Iterator[ShowerBatch]:
        while True:
            yield from self.batches


def test_compile_is_off_by_default_and_ignored_on_cpu() -> None:
    assert LoopConfig().compile is False
    model = nn.Linear(3, 2)
    backend = TorchBackend("cpu")
    backend.setup(model, LoopConfig(steps=2, batch_size=4, compile=True))
    assert backend.compiled is False
    assert model._compiled_call_impl is None  # nn.Module.compile's slot: untouched
    assert backend.fused_adamw is False and not backend.optimizer.defaults["fused"]


def test_compiling_a_shower_model_compiles_its_energy_head_in_place() -> None:
    model = _model()
    keys = list(model.state_dict())
    model.compile()  # lazy: nothing is traced until the first call
    assert model._compiled_call_impl is not None and model.energy_head._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert clone._compiled_call_impl is None and clone.energy_head._compiled_call_impl is None


def test_fused_adamw_is_the_cuda_default_and_matches_adamw() -> None:
    assert use_fused_adamw(None, torch.device("cpu")) is False
    assert use_fused_adamw(None, torch.device("cuda", 0)) is True
    assert use_fused_adamw(False, torch.device("cuda", 0)) is False
    updated = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), fused=fused)
        assert bool(opt.defaults["fused"]) is fused
        for _ in range(3):
            model(torch.linspace(-1, 1, 8).reshape(2, 4)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(updated[1], updated[0], rtol=1e-5, atol=1e-6)


def test_toggling_compile_does_not_block_a_resume() -> None:
    old = {"loop": {"steps": 10, "batch_size": 8}}  # a run stored before the field existed
    assert resume_differences(old, {"loop": {"steps": 10, "batch_size": 8, "compile": True}}) == []
    assert resume_differences(old, {"loop": {"steps": 10, "batch_size": 16, "compile": True}}) == [
        "loop.batch_size: 8 -> 16"
    ]


def _backend(engine: str) -> Backend:
    if engine == "torch":
        return TorchBackend("cuda")
    from caloforge.pretrain.config import DeepSpeedOptions
    from caloforge.training.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(DeepSpeedOptions(zero_stage=2, overlap_comm=False), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("engine", "residual_stream"), [("torch", "fp32"), ("deepspeed", "fp32"), ("torch", "autocast")]
)
def test_compiled_model_trains_on_cuda_with_the_same_keys_and_outputs(
    engine: str, residual_stream: str
) -> None:
    torch._dynamo.reset()
    model = _model()
    model.set_residual_stream(residual_stream)
    keys = list(model.state_dict())
    backend = _backend(engine)
    cfg = LoopConfig(steps=3, batch_size=8, precision="bf16", log_every=1, compile=True)
    trainer = Trainer(model, shower_loss_fn(model), backend, _Batches(32, 8), cfg)
    result = trainer.fit()
    assert backend.compiled and backend.fused_adamw
    assert model._compiled_call_impl is not None and model.energy_head._compiled_call_impl is not None
    assert backend.model is model and list(model.state_dict()) == keys
    assert result.step == 3 and math.isfinite(result.metrics["loss"])
    averaged = trainer.averaged_model()  # a deep copy: an eager module again
    assert averaged._compiled_call_impl is None and list(averaged.state_dict()) == keys

    eager = _model().cuda()
    eager.load_state_dict(model.state_dict())
    showers, cond = _data(8, seed=2)
    x = eager.to_model_space(showers)
    sigma = torch.linspace(0.05, 5.0, 8, device="cuda")
    ct = eager.encode_conditions(cond)
    with torch.no_grad():
        out_eager = eager(x, sigma, ct)
        out_compiled = model(x, sigma, ct)
    rel = float((out_compiled - out_eager).norm() / out_eager.norm())
    assert rel < 1e-4, rel
