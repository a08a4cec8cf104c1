"""One job assembly: what every training job builds around the one loop.

``caloforge train`` (``training/run.py``), the Ray pretraining worker (``pretrain/worker.py``) and the
adaptation and distillation jobs are *callers* of this module, not copies of it:

- :func:`model_for_manifest`: a fresh ``ShowerModel`` for a shard set (transform fitted from the
  manifest's pooled stats, vocabulary = the manifest's detectors + spare slots, the detectors' common mesh
  from their recorded specs, ``Manifest.model_mesh``);
- :func:`loss_for`: the loop's ``loss_fn`` for a model and the job's objective config (checks that the
  objective can train the model's parametrisation);
- :func:`training_lineage`: the bundle lineage of a trained model (dataset, trained ranges, objective);
- :func:`standard_hooks`: metrics.jsonl, the progress bar, periodic evaluations;
- :func:`final_model` / :func:`save_final_bundle`: the EMA weights in a standalone CPU model, saved as
  the run's bundle with its final lineage.

A new training job (adaptation, distillation) brings its model (e.g. a base bundle with a new detector
row), its objective config (a new objective in ``platform/objectives``), and its trainable selection,
and uses these pieces; the loop, checkpoints and hooks come with them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caloforge.datasets.shards import Manifest
from caloforge.datasets.streaming import StreamGroup, trained_ranges
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.objectives import ObjectiveConfig, make_objective
from caloforge.platform.shower_model import Lineage, ShowerModel, ShowerModelConfig
from caloforge.training.hooks import ConsoleProgress, Hook, MetricsWriter, PeriodicEval
from caloforge.training.loop import LossFn, Trainer
from caloforge.training.tasks import shower_loss_fn

__all__ = [
    "final_model",
    "loss_for",
    "model_for_manifest",
    "save_final_bundle",
    "standard_hooks",
    "training_lineage",
]

log = logging.getLogger("caloforge.training")


def model_for_manifest(
    config: ShowerModelConfig,
    manifest: Manifest,
    spare_detector_slots: int,
    detectors: Sequence[str] | None = None,
    lineage: Lineage | None = None,
) -> ShowerModel:
    """A fresh model for a shard set: the pooled stats fit the transform; the vocabulary is ``detectors``
    (default: the manifest's, sorted) + ``spare_detector_slots``; the mesh is the detectors' recorded
    geometry (``Manifest.model_mesh``: ValueError naming the manifest when a spec is not recorded)."""
    names = tuple(detectors) if detectors is not None else tuple(manifest.detectors)
    stats = (manifest.stats or {}).get("pooled")
    if stats is None:
        raise ValueError(f"{manifest.directory}: the manifest has no pooled stats to fit the transform")
    vocab = ConditionVocab.create(names, spare_slots=spare_detector_slots)
    return ShowerModel.build(config, vocab, stats, manifest.model_mesh(names), lineage=lineage)


def loss_for(model: ShowerModel, objective: ObjectiveConfig) -> tuple[LossFn, str]:
    """The loop's ``loss_fn`` for ``model`` trained with ``objective`` and the objective's name (ValueError
    when it cannot train the model's parametrisation)."""
    built = make_objective(objective, model.config.parametrisation)
    return shower_loss_fn(model, built), built.name


def training_lineage(
    manifest: Manifest,
    groups: Sequence[StreamGroup],
    objective: str,
    extra: Mapping[str, str] | None = None,
    **fields: Any,
) -> Lineage:
    """The lineage of weights trained on ``groups`` of ``manifest`` with ``objective``: the dataset's
    fingerprint, the trained ranges (the model card's valid ranges), the objective, free-form run ``extra``
    and the typed ``fields`` of an adapted or distilled model (``kind``, ``parent_uri``, ``parent_version``,
    ``strategy``, ``target_detector``; ``kind`` defaults to ``base``)."""
    return Lineage(
        objective=objective,
        dataset_manifest_hash=manifest.fingerprint,
        trained=trained_ranges(manifest, list(groups)),
        extra=dict(extra or {}),
        **fields,
    )


def standard_hooks(
    metrics_path: Path | None,
    *,
    progress: bool,
    evals: Sequence[PeriodicEval] = (),
    extra: Sequence[Hook] = (),
) -> list[Hook]:
    """The hooks every job has, in order: evaluations (their metrics reach the writers), ``extra``
    (job-specific: resource metrics, MLflow, …), ``metrics.jsonl`` (when ``metrics_path``), the progress
    bar (rank 0; log lines when ``progress`` is false)."""
    hooks: list[Hook] = [*evals, *extra]
    if metrics_path is not None:
        hooks.append(MetricsWriter(metrics_path))
    hooks.append(ConsoleProgress(enabled=progress))
    return hooks


def final_model(trainer: Trainer, finalize: Callable[[nn.Module], ShowerModel] | None = None) -> ShowerModel:
    """The EMA weights (the raw ones without EMA) in a standalone CPU ``ShowerModel`` in eval mode
    (DeepSpeed's parameters are views of one flat buffer: they are cloned). ``finalize`` turns the trained
    module into the ``ShowerModel`` to keep (e.g. LoRA adapters merged in)."""
    model = trainer.averaged_model()
    if finalize is not None:
        model = finalize(model)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.detach().clone()
    model = model.to("cpu")
    if not isinstance(model, ShowerModel):
        raise ValueError(f"final_model: the trained model is a {type(model).__name__}, not a ShowerModel")
    return model


def save_final_bundle(
    trainer: Trainer,
    directory: Path,
    lineage: Lineage,
    extra: Mapping[str, str] | None = None,
    finalize: Callable[[nn.Module], ShowerModel] | None = None,
) -> tuple[ShowerModel, Path]:
    """Save :func:`final_model` as a bundle in ``directory`` (replacing it), its lineage completed with
    the run's progress (steps, samples seen, EMA or raw weights, time) and ``extra``."""
    model = final_model(trainer, finalize)
    final = dataclasses.replace(
        lineage,
        extra={
            **lineage.extra,
            "steps": str(trainer.step),
            "samples_seen": str(trainer.samples_seen),
            "ema": "true" if trainer.ema is not None else "false",
            "trained_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **dict(extra or {}),
        },
    )
    path = model.save(directory, lineage=final, overwrite=True)
    return model, Path(path)
