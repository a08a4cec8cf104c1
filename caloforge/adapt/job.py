"""The adaptation job's training step, shared by the one-process path (:func:`train_here`) and the Ray Train
workers (``adapt/distributed.py``): the model to train, its lineage, and what a finished training leaves in
the run directory (the bundle with the EMA weights, LoRA merged; the LoRA adapter in peft's format).

The loop, checkpoints and hooks are the one job assembly's (``caloforge.training.job``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from caloforge.adapt.config import AdaptConfig
from caloforge.adapt.strategies import Prepared, prepare_strategy
from caloforge.config import to_dict
from caloforge.datasets.shards import Manifest
from caloforge.datasets.streaming import StreamGroup
from caloforge.platform.shower_model import Lineage, ShowerModel
from caloforge.training import job
from caloforge.training.hooks import FailAfterStep, Hook
from caloforge.training.loop import Trainer
from caloforge.training.rundir import write_json

if TYPE_CHECKING:
    from caloforge.adapt.pipeline import AdaptPlan, AdaptRequest

__all__ = [
    "TrainOutcome",
    "adaptation_lineage",
    "prepare_model",
    "report_parameters",
    "save_outputs",
    "train_here",
]

log = logging.getLogger("caloforge.adapt")


@dataclass(frozen=True)
class TrainOutcome:
    """What the training step leaves for evaluation, the gate and registration (in the driver)."""

    steps: int
    trainable_parameters: int
    total_parameters: int
    model_dir: Path  # the bundle (EMA weights; LoRA merged)
    adapter_dir: Path | None  # the LoRA adapter in peft's format (lora only)
    worker_group_starts: int = 0  # Ray Train: worker-group starts of this launch (0: one process)
    resumed_from_step: int | None = None  # Ray Train: the step the first worker group of this launch began at


def prepare_model(config: AdaptConfig, plan: AdaptPlan) -> Prepared:
    """The base with the target detector in its vocabulary (a spare slot for a new one), rebuilt for the
    data's mesh when it differs, prepared for the strategy. Deterministic: the strategy's random
    initialisations (LoRA's ``A``) draw from ``loop.seed``, so every Ray worker builds the same model."""
    from caloforge.platform.transfer import rebuild_for_mesh

    base = ShowerModel.load(plan.base_dir)
    name = plan.detector.name
    model = base.with_detector(name, init_from=config.strategy.init_from)
    if plan.rebuild_mesh:
        stats = Manifest.load(plan.data_dir).stats["pooled"]
        model, report = rebuild_for_mesh(
            model,
            plan.data_mesh,
            stats,
            detector=plan.detector,
            source_detectors=plan.source_detectors,
        )
        log.info("rebuilt for the mesh %s: %s", plan.data_mesh.shape, report.summary())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.loop.seed)
        return prepare_strategy(model, name, config.strategy)


def report_parameters(config: AdaptConfig, prepared: Prepared, run_dir: Path) -> None:
    """Print and log the trainable and total parameter counts; ``run_dir/parameters.json``."""
    trained, total = prepared.parameter_counts
    log.info(
        "strategy %s: %d of %d parameters train (%.3g%%)",
        config.strategy.kind,
        trained,
        total,
        100.0 * trained / max(total, 1),
    )
    print(f"strategy {config.strategy.kind}: {trained:,} trainable of {total:,} parameters", flush=True)
    write_json(
        run_dir / "parameters.json",
        {
            "strategy": config.strategy.kind,
            "trainable": trained,
            "total": total,
            **prepared.trainable.to_dict(),
        },
    )


def adaptation_lineage(
    config: AdaptConfig,
    plan: AdaptPlan,
    manifest: Manifest,
    groups: list[StreamGroup],
    objective: str,
    run_dir: Path,
) -> Lineage:
    """The adapted bundle's lineage: ``kind=adapted``, the parent, the strategy, the trained ranges."""
    return job.training_lineage(
        manifest,
        groups,
        objective,
        extra={"run_dir": str(Path(run_dir).resolve()), "run_name": config.name},
        kind="adapted",
        parent_uri=plan.parent_uri,
        parent_version=plan.parent_version,
        strategy=config.strategy.kind,
        target_detector=plan.detector.name,
    )


def save_outputs(
    config: AdaptConfig,
    prepared: Prepared,
    trainer: Trainer,
    lineage: Lineage,
    model_dir: Path,
    adapter_dir: Path | None,
) -> None:
    """The bundle of the EMA weights (LoRA merged in) in ``model_dir``; a LoRA run's adapter (the EMA
    weights too, in peft's format) in ``adapter_dir``."""
    extra = {}
    if config.strategy.kind == "lora":
        extra["lora"] = json.dumps(to_dict(config.strategy.lora), sort_keys=True)
    job.save_final_bundle(trainer, model_dir, lineage, extra=extra, finalize=prepared.merged)
    if config.strategy.kind == "lora" and adapter_dir is not None:
        prepared.save_adapter(trainer.averaged_model().to("cpu"), adapter_dir)


def train_here(
    config: AdaptConfig, request: AdaptRequest, plan: AdaptPlan, prepared: Prepared, run_dir: Path
) -> TrainOutcome:
    """One process (``config.cluster`` unset): the loop on ``config.device``, checkpoints in
    ``run_dir/checkpoints`` (a resumed run continues from the newest that verifies)."""
    from caloforge.datasets.streaming import ShowerStream
    from caloforge.training.state import CheckpointManager
    from caloforge.training.torch_backend import TorchBackend

    manifest = Manifest.load(request.data)
    loss_fn, objective = job.loss_for(prepared.model, config.objective)
    stream = ShowerStream(
        request.data, config.stream_config(), "train", rank=0, world_size=1, seed=config.loop.seed
    )
    lineage = adaptation_lineage(config, plan, manifest, stream.groups, objective, run_dir)
    extra: list[Hook] = []
    if config.fault_injection_step is not None:
        extra.append(FailAfterStep(config.fault_injection_step, run_dir, "adaptation"))
    hooks = job.standard_hooks(run_dir / "metrics.jsonl", progress=config.progress, extra=extra)
    trainer = Trainer(
        prepared.module,
        loss_fn,
        TorchBackend(config.device),
        stream,
        config.loop,
        hooks,
        checkpoints=CheckpointManager(run_dir / "checkpoints", config.keep_checkpoints),
        trainable=prepared.trainable,
    )
    trainer.fit()
    adapter_dir = run_dir / "adapter" if config.strategy.kind == "lora" else None
    save_outputs(config, prepared, trainer, lineage, run_dir / "model", adapter_dir)
    trained, total = prepared.parameter_counts
    return TrainOutcome(trainer.step, trained, total, run_dir / "model", adapter_dir)
