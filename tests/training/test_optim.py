"""LR schedules at their breakpoints, AdamW parameter groups, and LambdaLR driving the optimizer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from caloforge.training.config import OptimConfig, ScheduleConfig
from caloforge.training.optim import build_optimizer, build_scheduler, schedule_factor, schedule_phases


def test_wsd_breakpoints_calodit2_fractions() -> None:
    cfg = ScheduleConfig(kind="wsd", warmup_frac=0.1, stable_frac=0.5, min_lr_frac=0.0)
    assert schedule_phases(cfg, 100) == (10, 50, 40)
    f = schedule_factor(cfg, 100)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == 1.0 and f(59) == 1.0 and f(60) == 1.0  # stable plateau, decay starts at 1
    assert f(70) == pytest.approx(1 - math.sqrt(10 / 40))  # square-root decay: 0.5 after a quarter
    assert f(99) == pytest.approx(1 - math.sqrt(39 / 40))
    assert f(99) > 0  # the last update still moves the weights
    assert f(100) == 0.0 and f(250) == 0.0
    warm = [f(s) for s in range(10)]
    assert all(b - a == pytest.approx(1 / 11) for a, b in itertools.pairwise(warm))
    decay = [f(s) for s in range(60, 101)]
    assert all(b < a for a, b in itertools.pairwise(decay))


def test_wsd_min_lr_floor_and_no_warmup() -> None:
    f = schedule_factor(ScheduleConfig(kind="wsd", warmup_frac=0.0, stable_frac=0.5, min_lr_frac=0.1), 20)
    assert f(0) == 1.0 and f(9) == 1.0
    assert f(10) == 1.0
    assert f(15) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert f(20) == pytest.approx(0.1)


def test_cosine_breakpoints() -> None:
    cfg = ScheduleConfig(kind="cosine", warmup_frac=0.2, stable_frac=0.0, min_lr_frac=0.1)
    assert schedule_phases(cfg, 50) == (10, 0, 40)
    f = schedule_factor(cfg, 50)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(30) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(50) == pytest.approx(0.1)


def test_constant_after_warmup() -> None:
    f = schedule_factor(ScheduleConfig(kind="constant", warmup_frac=0.25, stable_frac=0.0), 8)
    assert [f(s) for s in range(8)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1])


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        schedule_phases(ScheduleConfig(), 0)
    with pytest.raises(ValueError, match="step must be"):
        schedule_factor(ScheduleConfig(), 10)(-1)
    with pytest.raises(ValueError, match="warmup_frac"):
        ScheduleConfig(warmup_frac=0.7, stable_frac=0.5)


def test_scheduler_drives_optimizer_lr() -> None:
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    cfg = ScheduleConfig(kind="wsd", warmup_frac=0.1, stable_frac=0.5)
    sched = build_scheduler(opt, cfg, 20)
    f = schedule_factor(cfg, 20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2 * f(s) for s in range(20)])
    state = sched.state_dict()
    assert state["last_epoch"] == 20


def test_weight_decay_groups_and_trainable_subset() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2} and {p.ndim for p in plain["params"]} == {1}
    assert len(decayed["params"]) == 2 and len(plain["params"]) == 3
    only = build_optimizer(model, OptimConfig(), trainable=[model[2].weight])
    assert [p for g in only.param_groups for p in g["params"]] == [model[2].weight]
    with pytest.raises(ValueError, match="do not belong"):
        build_optimizer(model, OptimConfig(), trainable=[nn.Parameter(torch.zeros(2))])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, OptimConfig())
