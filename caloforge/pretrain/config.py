"""The pretraining job config (``configs/pretrain/*.yaml``) and its driver-side validation.

``PretrainConfig`` is one frozen dataclass loaded strictly through ``caloforge.config``: the model
(``ShowerModelConfig``), the objective that trains it (``ObjectiveConfig``), the data (a shard set plus how
to stream and mix it), the loop (``LoopConfig``: steps, global batch, accumulation, optimizer, schedule,
EMA), the engine (DeepSpeed ZeRO stage or plain DDP),
the cluster (Ray Train scaling, storage, failure/checkpoint policy), quick validation, MLflow tracking and the
test-only fault injection. Field checks live in ``__post_init__``; everything that needs files or the machine
(the shard manifest, the mixing detectors, the mesh, GPUs) is checked by :func:`validate_pretrain_config`,
which the driver runs before any worker starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from caloforge.datasets.prepare import SimulateConfig
from caloforge.datasets.streaming import StreamConfig
from caloforge.platform.objectives import ObjectiveConfig, make_objective
from caloforge.platform.shower_model import ShowerModelConfig
from caloforge.training.config import LoopConfig
from caloforge.training.ray.config import ClusterConfig, DeepSpeedOptions, EngineConfig

__all__ = [
    "ClusterConfig",
    "DataPlan",
    "DeepSpeedOptions",
    "EngineConfig",
    "FaultInjectionConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "TrackingConfig",
    "ValidationConfig",
    "resume_differences",
    "validate_pretrain_config",
]


@dataclass(frozen=True)
class PretrainDataConfig:
    """Where the showers come from and how each worker streams them.

    ``shards``: a shard set written by ``caloforge data shard`` (the directory holding ``manifest.json``);
    or ``simulate``: a shard set the driver simulates with the built-in simulator before the run — the same
    block as ``caloforge train`` (``caloforge.datasets.prepare.SimulateConfig``), cached by content under
    ``$CALOFORGE_HOME/data/simulated/<hash>`` (exactly one of the two).
    ``stream``: how each worker streams its share of the ``train`` split — detector/particle mixing
    (``mixing``, ``temperature``, ``weights``), shuffle buffer, DataLoader workers. ``stream.mode`` must be
    ``resampled`` (infinite, so every rank takes the same number of batches); ``stream.batch_size`` is set by
    the job to the per-rank micro-batch ``loop.batch_size / (workers × grad_accum)``.
    ``val_split``: held-out split used by the quick validation. ``audit_samples``: record fingerprints of
    each rank's first N training samples in the run's ``attempts/`` records (data lineage; 0 = off).
    """

    shards: Path | None = None
    simulate: SimulateConfig | None = None
    stream: StreamConfig = field(default_factory=StreamConfig)
    val_split: str = "val"
    audit_samples: int = 0

    def __post_init__(self) -> None:
        if (self.shards is None) == (self.simulate is None):
            raise ValueError(
                "data: set exactly one of data.shards (a shard set) or data.simulate (simulate one)"
            )
        if self.stream.mode != "resampled":
            raise ValueError(
                f"data.stream.mode must be 'resampled' for pretraining (infinite streams with a fixed step "
                f"count keep ranks in lock-step), got {self.stream.mode!r}"
            )
        if self.audit_samples < 0:
            raise ValueError(f"data.audit_samples must be >= 0, got {self.audit_samples}")


@dataclass(frozen=True)
class ValidationConfig:
    """Quick validation on rank 0 with the EMA weights: per detector, generate showers for the conditions of
    ``showers_per_detector`` held-out showers and compare total-energy means and longitudinal profiles."""

    enabled: bool = True
    every: int = 0  # optimizer steps between validations (0: only at the end of the run)
    showers_per_detector: int = 64
    num_steps: int | None = None  # sampler steps (default: the model's)
    sampler: str | None = None  # default: the model's
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"validation.every must be >= 0, got {self.every}")
        if self.showers_per_detector < 2:
            raise ValueError(f"validation.showers_per_detector must be >= 2, got {self.showers_per_detector}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"validation.num_steps must be >= 1, got {self.num_steps}")
        if self.batch_size < 1:
            raise ValueError(f"validation.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking (``$MLFLOW_TRACKING_URI``, else sqlite under ``$CALOFORGE_HOME/mlflow``)."""

    enabled: bool = True
    experiment: str = "caloforge-pretrain"
    register: bool = False  # register the final bundle as a caloforge-base version (alias "candidate")
    # During training MLflow is best effort (metrics.jsonl in the run directory is the record): each call
    # waits at most timeout_s (no retries); after a failure, calls are queued and retried every
    # retry_every_s; at the end of the run the driver waits up to final_wait_s for the server to replay
    # what is still queued (what is left stays in <run>/tracking_pending.json and is replayed by --resume).
    timeout_s: float = 5.0
    retry_every_s: float = 30.0
    final_wait_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "retry_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"tracking.{name} must be > 0, got {getattr(self, name)}")
        if self.final_wait_s < 0:
            raise ValueError(f"tracking.final_wait_s must be >= 0, got {self.final_wait_s}")


@dataclass(frozen=True)
class FaultInjectionConfig:
    """Test-only, once per run, in worker ``rank`` at optimizer step ``step``: raise (``raise``) or kill the
    worker process with SIGKILL (``sigkill``: no Python cleanup, like the kernel's OOM killer) right after
    the step, or make the checkpoint save of that step fail with a real ENOSPC from the kernel (``enospc``:
    the rank's training-state file is written through ``/dev/full``; ``step`` must be a checkpoint step)."""

    rank: int
    step: int
    kind: Literal["raise", "sigkill", "enospc"] = "raise"


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining job (see the module docstring and ``configs/pretrain/*.yaml``)."""

    data: PretrainDataConfig
    name: str = "pretrain"  # default run name (``--run-name`` overrides)
    model: ShowerModelConfig = field(default_factory=ShowerModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    detectors: tuple[str, ...] = ()  # the model's vocabulary, in slot order (default: the data's detectors)
    spare_detector_slots: int = 4  # embedding rows kept free for detectors added by adaptation
    loop: LoopConfig = field(default_factory=LoopConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    validation: ValidationConfig = ValidationConfig()
    tracking: TrackingConfig = TrackingConfig()
    fault_injection: FaultInjectionConfig | None = None

    def __post_init__(self) -> None:
        if self.spare_detector_slots < 0:
            raise ValueError(f"spare_detector_slots must be >= 0, got {self.spare_detector_slots}")
        make_objective(self.objective, self.model.parametrisation)  # the pairing, before any worker starts
        if len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"detectors: duplicate names in {list(self.detectors)}")
        if self.engine.find_unused_parameters and self.model.layer_energy.enabled:
            raise ValueError(
                "engine.find_unused_parameters=true cannot train model.layer_energy (the head's loss runs "
                "outside DDP's forward, which that mode's graph search would miss): set "
                "engine.find_unused_parameters=false (frozen parameters do not need it) or "
                "model.layer_energy.enabled=false"
            )
        fi = self.fault_injection
        if fi is not None:
            if not 0 <= fi.rank < self.cluster.num_workers:
                raise ValueError(
                    f"fault_injection.rank={fi.rank} is not a worker rank "
                    f"(cluster.num_workers={self.cluster.num_workers})"
                )
            if not 1 <= fi.step < self.loop.steps:
                raise ValueError(
                    f"fault_injection.step must be in [1, loop.steps={self.loop.steps}), got {fi.step}"
                )
        if self.validation.sampler is not None:
            from caloforge.platform.samplers import SAMPLERS

            if self.validation.sampler not in SAMPLERS:
                raise ValueError(
                    f"validation.sampler: unknown {self.validation.sampler!r} (known: {sorted(SAMPLERS)})"
                )


# -- resume -------------------------------------------------------------------------------------------------
# Settings a resumed run may change; everything else must match the run's stored config.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "name",
    "loop.steps",
    "loop.log_every",
    "loop.checkpoint_every",
    "loop.compile",  # same math compiled or not
    "loop.optim.lr",
    "loop.schedule",
    "validation",
    "tracking.enabled",
    "tracking.register",
    "tracking.timeout_s",
    "tracking.retry_every_s",
    "tracking.final_wait_s",
    "loop.max_consecutive_skipped",
    "cluster.allow_unauthenticated_ray",
    "cluster.storage_path",
    "cluster.max_failures",
    "cluster.num_to_keep",
    "cluster.local_num_cpus",
    "cluster.cpus_per_worker",
    "fault_injection",
    "data.audit_samples",
    "data.stream.num_workers",
    "data.stream.prefetch_factor",
    "data.shards",  # the same shard set may move; its manifest hash is what must match (checked separately)
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def resume_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for settings that differ between a run's stored config and a resume's config
    and are not in :data:`RESUMABLE_CHANGES` (model, mixing, batch geometry, world size, engine, seeds)."""
    old, new = _flatten(previous), _flatten(current)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES):
            continue
        diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


# -- driver-side validation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataPlan:
    """What validation learned about the data (used by the driver and shipped to the workers)."""

    manifest_dir: Path
    manifest_hash: str
    detectors: tuple[str, ...]  # the model vocabulary, in slot order
    train_detectors: tuple[str, ...]  # detectors with non-zero mixing weight
    mesh_shape: tuple[int, int, int]
    micro_batch_size: int
    probabilities: dict[str, float] = field(default_factory=dict)


def validate_pretrain_config(
    cfg: PretrainConfig, manifest_dir: Path | None = None, check_devices: bool = True
) -> DataPlan:
    """Everything that can be checked before a worker starts; raises ``ValueError`` naming the key.

    Checks: the batch splits into workers × accumulation; the shard set exists and has a ``train`` and the
    validation split; every detector named in the mixing weights and in ``detectors`` is in the data; the
    streamed detectors share one mesh that the backbone's patch divides; each rank has shards of its own;
    GPUs are present when requested and no Ray cluster is given (a cluster's GPUs are checked after joining).
    ``manifest_dir`` is the shard set to check (default ``data.shards``; the driver passes the simulated set).
    """
    from caloforge.datasets.shards import Manifest
    from caloforge.datasets.streaming import plan_groups

    c = cfg.cluster
    try:
        micro = cfg.loop.micro_batch_size(c.num_workers)
    except ValueError as exc:
        raise ValueError(f"loop.batch_size: {exc}") from None
    default_batch = StreamConfig().batch_size
    if cfg.data.stream.batch_size not in (default_batch, micro):
        raise ValueError(
            f"data.stream.batch_size={cfg.data.stream.batch_size}: the per-rank micro-batch is set by the "
            f"loop (loop.batch_size / (workers × grad_accum) = {micro}); remove data.stream.batch_size"
        )
    if manifest_dir is None and cfg.data.shards is None:
        raise ValueError(
            "data.simulate: prepare the shard set first (launch.prepare_data) and pass manifest_dir"
        )
    shards_dir = Path(manifest_dir if manifest_dir is not None else cfg.data.shards or "").expanduser()
    try:
        manifest = Manifest.load(shards_dir)
    except ValueError as exc:
        raise ValueError(f"data.shards: {exc}") from None
    for split in ("train", cfg.data.val_split):
        if split not in manifest.splits or not manifest.shards(split):
            raise ValueError(f"data.shards: {shards_dir} has no {split!r} shards (splits: {manifest.splits})")
    stream_cfg = dataclasses.replace(cfg.data.stream, batch_size=micro)
    try:
        groups = plan_groups(manifest, "train", stream_cfg)
    except ValueError as exc:
        raise ValueError(f"data.stream: {exc}") from None
    train_detectors = tuple(sorted({g.detector for g in groups}))
    if cfg.detectors:
        unknown = [d for d in cfg.detectors if d not in manifest.detectors]
        if unknown:
            raise ValueError(
                f"detectors: {unknown} are not in the data {shards_dir} (detectors: {manifest.detectors})"
            )
        missing = [d for d in train_detectors if d not in cfg.detectors]
        if missing:
            raise ValueError(
                f"detectors: the training mix streams {missing}, which the vocabulary does not list"
            )
        vocab = tuple(cfg.detectors)
    else:
        vocab = train_detectors
    mesh = manifest.mesh_shape(groups[0].detector)
    try:
        cfg.model.backbone_config().check_mesh(mesh)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    slots = c.num_workers * max(1, cfg.data.stream.num_workers)
    few = [f"{g.key} ({len(g.shards)})" for g in groups if len(g.shards) < slots]
    if few:
        raise ValueError(
            f"data.shards: {c.num_workers} workers × {max(1, cfg.data.stream.num_workers)} stream workers "
            f"need at least {slots} train shards per mixing group for disjoint streams; these have fewer: "
            f"{few} (write smaller shards: shards.showers_per_shard of `caloforge data shard`, or use fewer "
            "workers)"
        )
    val = {s.detector for s in manifest.shards(cfg.data.val_split)}
    if cfg.validation.enabled and not set(train_detectors) & val:
        raise ValueError(
            f"validation: split {cfg.data.val_split!r} has no showers of {list(train_detectors)}"
        )
    if check_devices:
        from caloforge.training.ray.launch import check_local_gpus

        check_local_gpus(c)
    return DataPlan(
        manifest_dir=manifest.directory.resolve(),
        manifest_hash=manifest.fingerprint,
        detectors=vocab,
        train_detectors=train_detectors,
        mesh_shape=tuple(int(v) for v in mesh),  # type: ignore[arg-type]
        micro_batch_size=micro,
        probabilities={g.key: g.probability for g in groups},
    )
