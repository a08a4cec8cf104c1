"""DeepSpeedBackend inside a real 2-worker Ray TorchTrainer (gloo, CPU), for ZeRO stages 0, 1 and 2 (stage 2
with and without reduce-scatter):

- training through the one loop equals single-process TorchBackend training on the same global batches
  (loss curve, gradient norms before clipping, LR schedule, final weights and EMA) — so DeepSpeed's
  gradient accumulation (1/accum scaling, update only at the boundary), data-parallel averaging and clipping
  match ours;
- a run stopped at step 3, checkpointed through ``engine.save_checkpoint`` and resumed through
  ``engine.load_checkpoint`` ends bit-identical to the straight run.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from caloforge.pretrain.config import DeepSpeedOptions
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.loop import Trainer
from caloforge.training.state import CheckpointManager
from caloforge.training.torch_backend import TorchBackend

WORLD = 2
STEPS = 6
CFG = LoopConfig(
    steps=STEPS,
    batch_size=8,
    grad_accum=2,
    max_grad_norm=0.5,
    log_every=1,
    seed=3,
    optim=OptimConfig(lr=2e-2, weight_decay=0.01),
    schedule=ScheduleConfig(kind="wsd", warmup_frac=0.34, stable_frac=0.33),
    ema=EMAConfig(decay=0.9),
)
# (ZeRO stage, reduce_scatter): stage 2 both with per-slice reduces and with one all-reduce per bucket
VARIANTS = ((0, True), (1, True), (2, True), (2, False))


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


class BlockStream:
    """Step ``s`` uses rows ``8s .. 8s+7`` (mod 64) as its global batch; rank ``r`` takes micro-batch ``k`` =
    rows ``8s + (r·accum + k)·m .. +m``. Resumable (``state_dict`` is the next yield index)."""

    def __init__(self, rank: int, world: int, accum: int, micro: int) -> None:
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.normal(size=(64, 4))).float()
        self.y = torch.from_numpy(np.sin(rng.normal(size=(64, 1)) * 2)).float()
        self.rank, self.world, self.accum, self.micro = rank, world, accum, micro
        self.i = 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            step, k = divmod(self.i, self.accum)
            start = (
                step * self.world * self.accum * self.micro + (self.rank * self.accum + k) * self.micro
            ) % 64
            self.i += 1
            yield Batch(self.x[start : start + self.micro], self.y[start : start + self.micro])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def mse_loss(module: nn.Module, batch: Batch, generator: torch.Generator, ctx: object) -> torch.Tensor:
    return ((module(batch.x) - batch.y) ** 2).mean(dim=1)


def _summary(trainer: Trainer, history: list[dict]) -> dict:
    ema = trainer.averaged_model()
    return {
        "params": {n: p.detach().clone() for n, p in trainer.backend.model.named_parameters()},
        "ema": {n: p.detach().clone() for n, p in ema.named_parameters()},
        "loss": [row["loss"] for row in history],
        "grad_norm": [row["grad_norm"] for row in history],
        "lr": [row["lr"] for row in history],
    }


def _train_in_ray(config: dict) -> None:
    """Ray Train worker: per ZeRO stage, a straight run and a run split at step 3 through a checkpoint."""
    import ray.train

    from caloforge.training.deepspeed_backend import DeepSpeedBackend

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    micro = CFG.micro_batch_size(world)
    out: dict = {"rank": rank, "world": world}
    for stage, reduce_scatter in VARIANTS:
        options = DeepSpeedOptions(
            zero_stage=stage,
            reduce_scatter=reduce_scatter,
            reduce_bucket_size=1000,
            allgather_bucket_size=1000,
        )
        backend = DeepSpeedBackend(options, "cpu")
        trainer = Trainer(
            make_model(), mse_loss, backend, BlockStream(rank, world, CFG.grad_accum, micro), CFG
        )
        assert backend.engine.zero_optimization_stage() == stage
        assert backend.ds_config["train_micro_batch_size_per_gpu"] == micro
        straight = _summary(trainer, trainer.fit().history)

        run_dir = Path(config["tmp"]) / f"stage{stage}-{reduce_scatter}"
        first = Trainer(
            make_model(),
            mse_loss,
            DeepSpeedBackend(options, "cpu"),
            BlockStream(rank, world, CFG.grad_accum, micro),
            CFG,
            checkpoints=CheckpointManager(run_dir / "checkpoints"),
        )
        first.fit(max_steps=3)
        second = Trainer(
            make_model(),
            mse_loss,
            DeepSpeedBackend(options, "cpu"),
            BlockStream(rank, world, CFG.grad_accum, micro),
            CFG,
            checkpoints=CheckpointManager(run_dir / "checkpoints"),
        )
        result = second.fit()
        assert result.resumed_from is not None and result.resumed_from.name == "step_00000003"
        out[(stage, reduce_scatter)] = {"straight": straight, "resumed": _summary(second, result.history)}
    torch.save(out, Path(config["tmp"]) / f"rank{rank}.pt")


def _reference() -> dict:
    """Single process, whole global batch per step, plain torch."""
    cfg = dataclasses.replace(CFG, grad_accum=1)
    trainer = Trainer(make_model(), mse_loss, TorchBackend("cpu"), BlockStream(0, 1, 1, cfg.batch_size), cfg)
    return _summary(trainer, trainer.fit().history)


@pytest.mark.slow
def test_deepspeed_backend_matches_single_process_and_resumes_exactly(
    ray_local: None, tmp_path: Path
) -> None:
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    trainer = TorchTrainer(
        _train_in_ray,
        train_loop_config={"tmp": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ds-backend", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    ref = _reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [WORLD, WORLD]
    for variant in VARIANTS:
        stage = variant[0]
        got = ranks[0][variant]["straight"]
        # the schedule: warm-up 2 updates, stable 2, square-root decay over the last 2
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert got["lr"][0] == pytest.approx(2e-2 / 3) and got["lr"][2] == pytest.approx(2e-2)
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, err_msg=f"ZeRO-{stage} loss")
        np.testing.assert_allclose(
            got["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=f"ZeRO-{stage} grad norm"
        )
        assert max(ref["grad_norm"]) > CFG.max_grad_norm  # clipping was exercised
        for name, value in ref["params"].items():
            torch.testing.assert_close(
                got["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {name}"
            )
            torch.testing.assert_close(got["ema"][name], ref["ema"][name], rtol=1e-5, atol=1e-6)
            # both ranks hold the same full weights
            torch.testing.assert_close(
                ranks[1][variant]["straight"]["params"][name], got["params"][name], rtol=0, atol=0
            )
        resumed = ranks[0][variant]["resumed"]
        assert len(resumed["loss"]) == STEPS - 3
        assert resumed["loss"] == got["loss"][3:]  # bit-identical continuation
        for name, value in got["params"].items():
            torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=0)
            torch.testing.assert_close(resumed["ema"][name], got["ema"][name], rtol=0, atol=0)
