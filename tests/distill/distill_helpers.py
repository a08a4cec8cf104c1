"""Helpers of the distillation tests (a module of its own: ``conftest`` is not importable unambiguously)."""

from __future__ import annotations

from caloforge.distill.config import (
    BNSOptions,
    CDOptions,
    DistillConfig,
    DistillEvalConfig,
    DistillGateConfig,
)
from caloforge.evaluation.config import ClassifierConfig, EvalConfig, FPDConfig, KPDConfig, PlotConfig
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig


def tiny_config(**changes) -> DistillConfig:
    """Four optimizer steps (cd) or a few solver iterations (bns) and a small evaluation (no plots: they
    took 90 % of a tiny distillation's time)."""
    base = dict(
        name="tiny",
        cd=CDOptions(num_steps=1),
        bns=BNSOptions(
            steps=(1, 2),
            num_steps=2,
            reference_steps=4,
            n_train=16,
            n_heldout=8,
            batch_size=8,
            iterations=10,
            lr=1e-2,
        ),
        loop=LoopConfig(
            steps=4,
            batch_size=8,
            log_every=2,
            checkpoint_every=2,
            seed=0,
            optim=OptimConfig(lr=1e-3),
            schedule=ScheduleConfig(kind="constant"),
            ema=EMAConfig(decay=0.5),
        ),
        eval=DistillEvalConfig(
            n_showers=20,
            metrics=EvalConfig(
                metrics=("sep_power", "response", "fpd", "cls_high", "cls_low"),
                floor_metrics=("fpd",),
                classifier=ClassifierConfig(hidden=16, n_layers=1, epochs=2, batch_size=32, n_seeds=1),
                fpd=FPDConfig(min_samples=10, max_samples=15, num_points=2, num_batches=2),
                kpd=KPDConfig(batch_size=10, num_batches=2),
                plots=PlotConfig(enabled=False),  # the report's plots are the evaluation's tests' business
            ),
        ),
        gate=DistillGateConfig(max_auc_increase=0.5, max_fpd_ratio=None),
        progress=False,
        torch_threads=1,
    )
    base.update(changes)
    return DistillConfig(**base)
