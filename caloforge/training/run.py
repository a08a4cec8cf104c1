"""A single-process training run from one config: ``caloforge train`` and :func:`train` (quickstart).

Thin entry point (torchtitan's train.py): config → data (shards, or simulate + shard into the run
directory) → the job assembly (``training/job.py``: the model for the manifest, the objective's loss, the
lineage, the standard hooks) → the one loop with ``TorchBackend`` → the EMA model bundle.

Run directory (``run_dir``)::

    config.yaml        the resolved TrainConfig (a later call with another config is refused)
    versions.json      python / torch / numpy / caloforge versions, device, simulator version
    train.log          the caloforge log of every call (appended on resume)
    metrics.jsonl      one JSON line per log step (``training/hooks.py``)
    data/              simulated raw HDF5 (``raw/<detector>.h5``) and shards (``shards/``), with ``simulate:``
    checkpoints/       step_<N>/ + latest (``training/state.py``); a second call resumes from latest
    model/             the final bundle (EMA weights; lineage holds the dataset manifest hash)
    summary.json       the TrainResult

Resume is the default: calling :func:`train` again on the same directory continues from the latest
checkpoint (a finished run only rewrites its bundle and summary).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from caloforge.config import ConfigError, dump_yaml, from_dict, read_yaml, to_dict
from caloforge.datasets.prepare import SimulateConfig, prepare_shards
from caloforge.datasets.streaming import StreamConfig
from caloforge.datasets.verify import verify_shards
from caloforge.platform.objectives import ObjectiveConfig, make_objective
from caloforge.platform.seeding import Purpose
from caloforge.platform.shower_model import ShowerModelConfig
from caloforge.training.config import LoopConfig
from caloforge.training.rundir import run_logging, write_json

if TYPE_CHECKING:
    from caloforge.training.hooks import PeriodicEval

__all__ = [
    "DataConfig",
    "EvalConfig",
    "SimulateConfig",
    "TrainConfig",
    "TrainResult",
    "prepare_data",
    "train",
]

log = logging.getLogger("caloforge.training")

SEED_PURPOSE_EVAL = Purpose.EVAL_LOSS  # the fixed noise of the validation loss


@dataclass(frozen=True)
class DataConfig:
    """Where the showers come from: exactly one of ``shards`` (a shard set written by
    ``caloforge data shard``) or ``simulate``; how to stream them; the vocabulary's spare detector slots.

    ``stream.batch_size`` is the loop's micro-batch (``loop.batch_size / loop.grad_accum``); leave it at
    its default to have it set from the loop, or give exactly that value.
    """

    shards: Path | None = None
    simulate: SimulateConfig | None = None
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(shuffle_buffer=1000))
    spare_detector_slots: int = 1

    def __post_init__(self) -> None:
        if (self.shards is None) == (self.simulate is None):
            raise ValueError("data: give exactly one of 'shards' (a shard directory) or 'simulate'")
        if self.stream.mode != "resampled":
            raise ValueError(f"data.stream.mode must be 'resampled' for training, got {self.stream.mode!r}")
        if self.spare_detector_slots < 0:
            raise ValueError(f"data.spare_detector_slots must be >= 0, got {self.spare_detector_slots}")


@dataclass(frozen=True)
class EvalConfig:
    """In-loop validation: the objective's loss on the first ``n_showers`` of the ``val`` split with fixed
    noise, on the EMA weights, every ``every`` steps and at the end (0: off)."""

    every: int = 0
    n_showers: int = 256
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.n_showers < 1 or self.batch_size < 1:
            raise ValueError(
                f"eval.n_showers and eval.batch_size must be >= 1, got {self.n_showers}, {self.batch_size}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """``caloforge train`` (configs/train/*.yaml)."""

    data: DataConfig
    name: str = "train"  # default run directory: $CALOFORGE_HOME/runs/<name>
    model: ShowerModelConfig = field(default_factory=ShowerModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    keep_checkpoints: int = 3
    progress: bool = True  # tqdm bar (log lines when False)
    torch_threads: int = 0  # intra-op CPU threads during the run; 0: torch's default (all cores)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0: torch's default), got {self.torch_threads}")
        self.objective.resolve_name(self.model.parametrisation)
        make_objective(self.objective, self.model.parametrisation)  # the pairing, before any work
        micro = self.loop.micro_batch_size(1)
        given = self.data.stream.batch_size
        if given not in (micro, StreamConfig().batch_size):
            raise ValueError(
                f"data.stream.batch_size={given} but the loop's micro-batch is {micro} "
                f"(loop.batch_size {self.loop.batch_size} / grad_accum {self.loop.grad_accum}): leave it out"
            )

    def stream_config(self, world_size: int = 1) -> StreamConfig:
        """The stream options with ``batch_size`` = the loop's per-rank micro-batch."""
        return dataclasses.replace(self.data.stream, batch_size=self.loop.micro_batch_size(world_size))


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns (also written to ``run_dir/summary.json``)."""

    run_dir: Path
    model_dir: Path
    manifest_dir: Path
    manifest_hash: str
    steps: int
    final_loss: float
    metrics: dict[str, float]
    resumed_from: Path | None
    wall_time_s: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        out.pop("history")
        return out


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a ``configs/train/*.yaml`` (strict) with ``--set`` overrides."""
    from caloforge.config import load_config

    return load_config(TrainConfig, path, overrides)


# -- data -------------------------------------------------------------------------------------------------
def prepare_data(config: TrainConfig, run_dir: Path) -> Path:
    """The shard directory of this run: ``data.shards``, or ``run_dir/data/shards`` (simulated once)."""
    return prepare_shards(config.data.shards, config.data.simulate, run_dir / "data")


# -- run directory ----------------------------------------------------------------------------------------
def _versions(device: torch.device) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            p: version(p) for p in ("caloforge", "torch", "numpy", "safetensors", "webdataset", "scipy")
        },
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from caloforge.datasets.simulator import SIMULATOR_VERSION

        out["simulator_version"] = SIMULATOR_VERSION
    except ImportError:
        out["simulator_version"] = None
    return out


def _check_or_write_config(config: TrainConfig, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    text = dump_yaml(config)
    if path.is_file():
        try:
            previous = from_dict(TrainConfig, read_yaml(path), str(path))
        except ConfigError as exc:
            raise ValueError(f"{run_dir} holds a run whose config.yaml cannot be read: {exc}") from exc
        if previous != config:
            old, new = to_dict(previous), to_dict(config)
            diff = sorted(_diff_keys(old, new))
            raise ValueError(
                f"{run_dir} holds a run with another config (differs in {diff}); resume it with the same "
                "config or choose another --run-dir"
            )
        return
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "<root>"]


def _val_loss_fn(config: TrainConfig, manifest_dir: Path, loss_fn: Callable) -> Callable[[nn.Module], dict]:
    """The objective's mean loss on fixed validation showers and fixed noise (seeded per batch)."""
    from caloforge.datasets.batch import ShowerBatch
    from caloforge.datasets.shards import Manifest
    from caloforge.datasets.streaming import load_split
    from caloforge.platform.objectives import LossContext
    from caloforge.platform.seeding import derive_seed

    manifest = Manifest.load(manifest_dir)
    split = "val" if "val" in manifest.splits and manifest.counts["val"]["total"] > 0 else "train"
    if split != "val":
        log.warning("%s has no val split: the in-loop eval uses train showers", manifest_dir)
    reference = load_split(manifest_dir, split, max_showers=config.eval.n_showers)
    size = config.eval.batch_size
    batches = [
        ShowerBatch.from_numpy(
            reference.showers_NZPR[i : i + size], reference.conditions.subset(slice(i, i + size))
        )
        for i in range(0, len(reference), size)
    ]

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                gen = torch.Generator(device=device).manual_seed(
                    derive_seed(config.loop.seed, SEED_PURPOSE_EVAL, i)
                )
                ctx = LossContext(step=0, device=device)
                total += float(loss_fn(model, batch, gen, ctx).sum())
                count += len(batch)
        return {f"{split}_loss": total / count}

    return evaluate


# -- the run ----------------------------------------------------------------------------------------------
def train(
    config: TrainConfig, run_dir: str | Path | None = None, *, extra_evals: Sequence[PeriodicEval] = ()
) -> TrainResult:
    """Train (or resume) a ShowerModel in one process; returns the :class:`TrainResult`.

    ``run_dir`` defaults to ``$CALOFORGE_HOME/runs/<config.name>``. ``extra_evals``: more periodic
    evaluations (after the validation loss), e.g. the fidelity benchmark's evaluations along the run.
    """
    from caloforge import paths

    run_dir = Path(run_dir) if run_dir is not None else paths.runs_dir() / config.name
    with run_logging(run_dir, "train.log", config.torch_threads):
        return _train(config, run_dir, extra_evals)


def _train(config: TrainConfig, run_dir: Path, extra_evals: Sequence[PeriodicEval]) -> TrainResult:
    from caloforge.datasets.shards import Manifest
    from caloforge.datasets.streaming import ShowerStream
    from caloforge.training import job
    from caloforge.training.hooks import PeriodicEval
    from caloforge.training.loop import Trainer
    from caloforge.training.state import CheckpointManager
    from caloforge.training.torch_backend import TorchBackend

    t0 = time.perf_counter()
    _check_or_write_config(config, run_dir)
    backend = TorchBackend(config.device)
    write_json(run_dir / "versions.json", _versions(backend.device))
    log.info("run %s: %s", config.name, run_dir)

    manifest_dir = prepare_data(config, run_dir)
    verify_shards(manifest_dir)  # every shard, before any step (cached by the manifest's fingerprint)
    manifest = Manifest.load(manifest_dir)
    model = job.model_for_manifest(config.model, manifest, config.data.spare_detector_slots)
    loss_fn, objective = job.loss_for(model, config.objective)
    stream = ShowerStream(
        manifest_dir, config.stream_config(1), "train", rank=0, world_size=1, seed=config.loop.seed
    )
    lineage = job.training_lineage(
        manifest,
        stream.groups,
        objective,
        extra={"run_dir": str(run_dir.resolve()), "run_name": config.name},
    )
    evals = []
    if config.eval.every:
        evals.append(PeriodicEval(config.eval.every, _val_loss_fn(config, manifest_dir, loss_fn)))
    evals += list(extra_evals)
    hooks = job.standard_hooks(run_dir / "metrics.jsonl", progress=config.progress, evals=evals)
    trainer = Trainer(
        model,
        loss_fn,
        backend,
        stream,
        config.loop,
        hooks=hooks,
        checkpoints=CheckpointManager(run_dir / "checkpoints", config.keep_checkpoints),
    )
    fit = trainer.fit()
    _, model_dir = job.save_final_bundle(trainer, run_dir / "model", lineage)
    metrics = fit.metrics
    if not metrics:  # nothing left to train: report the last logged row of the run
        from caloforge.training.hooks import read_metrics

        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        metrics = {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
    result = TrainResult(
        run_dir=run_dir,
        model_dir=Path(model_dir),
        manifest_dir=manifest_dir,
        manifest_hash=manifest.fingerprint,
        steps=trainer.step,
        final_loss=float(metrics.get("loss", math.nan)),
        metrics=dict(metrics),
        resumed_from=fit.resumed_from,
        wall_time_s=time.perf_counter() - t0,
        history=fit.history,
    )
    write_json(run_dir / "summary.json", result.to_dict())
    log.info(
        "finished %s: step %d, loss %.4g, model %s",
        config.name,
        result.steps,
        result.final_loss,
        model_dir,
    )
    return result
