"""Helpers of the adaptation tests (a module of its own: ``conftest`` is not importable unambiguously):
the base's model config, simulated shard sets, and a tiny adaptation config."""

from __future__ import annotations

from tiny_world import BASE_DETECTORS, MODEL, make_shards  # noqa: F401  (re-exported to the tests)

from caloforge.adapt.config import AdaptConfig, AdaptEvalConfig, GateConfig
from caloforge.evaluation.config import ClassifierConfig, EvalConfig, FPDConfig, KPDConfig, PlotConfig
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig


def tiny_config(**changes) -> AdaptConfig:
    """Four optimizer steps and a small evaluation: seconds on 2 cores."""
    base = dict(
        name="tiny",
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
        eval=AdaptEvalConfig(
            n_showers=30,
            metrics=EvalConfig(
                metrics=("sep_power", "response", "fpd", "kpd", "cls_high"),
                floor_metrics=("fpd", "kpd", "cls_high"),
                classifier=ClassifierConfig(hidden=16, n_layers=1, epochs=2, batch_size=32, n_seeds=1),
                fpd=FPDConfig(min_samples=10, max_samples=15, num_points=2, num_batches=2),
                kpd=KPDConfig(batch_size=10, num_batches=2),
                plots=PlotConfig(dpi=40),
            ),
        ),
        gate=GateConfig(max_auc_high=1.0),
        progress=False,
        torch_threads=1,
    )
    base.update(changes)
    return AdaptConfig(**base)
