"""The adaptation job config (``configs/adapt/*.yaml``): how a pretrained model becomes one detector's model.

``AdaptConfig`` is one frozen dataclass loaded strictly through ``caloforge.config``:

- ``strategy``: what trains (``ADAPT_STRATEGIES``: ``full``, ``lora``, ``bias``, ``embedding``) and how the
  new detector's embedding row starts (``init_from``: a known detector's row; default the mean of the known
  rows, CaloDiT-2's "K+1" slot);
- ``objective``: the loss (default: the base model's native objective; ``ObjectiveConfig``);
- ``loop``: the one training loop (steps, batch, optimizer, schedule, EMA) — adaptation uses a lower
  learning rate than pretraining;
- ``stream``: how the target detector's ``train`` split is streamed;
- ``eval`` and ``gate``: the evaluation against the target's ``test`` split and the bounds a model must meet
  to become the detector's ``champion``;
- ``register``: the registry step (``caloforge-<detector>`` by default, alias ``candidate``);
- ``cluster`` and ``engine``: unset, the run trains in this process (on ``device``); a ``cluster:`` block
  trains on Ray Train workers the way pretraining does (the same ``ClusterConfig`` / ``EngineConfig`` blocks
  and keys: ``cluster.num_workers``, ``engine.backend: deepspeed|ddp``, ``engine.deepspeed.zero_stage``, …;
  ``adapt/distributed.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from caloforge.datasets.streaming import StreamConfig
from caloforge.evaluation.config import EvalConfig
from caloforge.platform.backbone import LORA_TARGETS
from caloforge.platform.objectives import ObjectiveConfig
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig
from caloforge.training.ray.config import ClusterConfig, EngineConfig

__all__ = [
    "GATE_METRICS",
    "AdaptConfig",
    "AdaptEvalConfig",
    "GateConfig",
    "LoraOptions",
    "RegisterConfig",
    "StrategyConfig",
]

STRATEGY_KINDS = ("full", "lora", "bias", "embedding")
# Metrics a gate may compare versions on (lower is better for all of them).
GATE_METRICS = ("fpd", "kpd", "auc_low", "auc_high")


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapters (through peft) on the backbone's linear layers (``LORA_TARGETS`` suffixes).
    ``energy_head``: the layer-energy head (which the adapters do not reach: its layers are not
    ``LORA_TARGETS``) trains in full beside them, as peft's ``modules_to_save``, saved in the adapter."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    energy_head: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"strategy.lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"strategy.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"strategy.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if not self.targets or unknown:
            raise ValueError(
                f"strategy.lora.targets must be a non-empty subset of {list(LORA_TARGETS)}, got "
                f"{list(self.targets)}"
            )


@dataclass(frozen=True)
class StrategyConfig:
    """What trains. ``kind``: ``full`` (every weight), ``lora`` (adapters + the detector's row),
    ``bias`` (biases and adaLN modulation + the detector's row; BitFit-style), ``embedding`` (the detector's
    row only; with ``energy_head`` also the layer-energy head's context projection, its only input that
    depends on the detector). ``mesh_layers`` (``bias`` and ``embedding``): also the layers that read the
    mesh, ``MESH_LAYERS`` (the patch embedding, the output layer's linear map and the layer-energy head's
    layer-indexed input and output), for a detector on another mesh than the base's, whose voxel layout
    inside a patch and layer profile those layers must learn. ``init_from``: the known detector whose row a
    new detector's row copies (default: the mean of the known rows)."""

    kind: Literal["full", "lora", "bias", "embedding"] = "full"
    lora: LoraOptions = field(default_factory=LoraOptions)
    energy_head: bool = False
    mesh_layers: bool = False
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"strategy.kind must be one of {list(STRATEGY_KINDS)}, got {self.kind!r}")
        if self.energy_head and self.kind != "embedding":
            raise ValueError(
                f"strategy.energy_head only applies to kind 'embedding' (kind {self.kind!r} already decides "
                "what of the head trains; for 'lora': strategy.lora.energy_head)"
            )
        if self.lora.energy_head and self.kind != "lora":
            raise ValueError(f"strategy.lora.energy_head applies to kind 'lora', not {self.kind!r}")
        if self.mesh_layers and self.kind not in ("bias", "embedding"):
            raise ValueError(
                f"strategy.mesh_layers applies to kinds 'bias' and 'embedding' (kind {self.kind!r}: 'full' "
                "trains them anyway, 'lora' adapts only its target modules)"
            )


@dataclass(frozen=True)
class AdaptEvalConfig:
    """Evaluation of the adapted model against the target detector's held-out split.

    ``n_showers``: generated showers (the conditions of as many reference showers; capped by the split);
    ``split``: ``test`` (``val`` when the data has no test showers is refused: say it here);
    ``sampler`` / ``num_steps``: generation (default: the model's); ``metrics``: the evaluation settings.
    """

    n_showers: int = 1000
    split: Literal["test", "val"] = "test"
    sampler: str | None = None
    num_steps: int | None = None
    metrics: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.n_showers < 20:
            raise ValueError(f"eval.n_showers must be >= 20, got {self.n_showers}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"eval.num_steps must be >= 1, got {self.num_steps}")


@dataclass(frozen=True)
class GateConfig:
    """What a model must meet to become the detector's ``champion``.

    Bounds (``None``: not checked): ``max_auc_low`` / ``max_auc_high`` (classifier AUCs, absolute);
    ``max_fpd_over_floor`` / ``max_kpd_over_floor`` (the metric divided by its data-vs-data floor from the
    same evaluation, or by the floor's statistical error when that is larger; a floor that is neither
    positive nor has an error fails the check). ``metric``: what a passing version must beat the current
    champion on (lower is better); a version that passes the gate but does not beat the champion stays
    ``candidate``.
    """

    metric: Literal["fpd", "kpd", "auc_low", "auc_high"] = "fpd"
    max_auc_low: float | None = None
    max_auc_high: float | None = None
    max_fpd_over_floor: float | None = None
    max_kpd_over_floor: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise ValueError(f"gate.metric must be one of {list(GATE_METRICS)}, got {self.metric!r}")
        for name in ("max_auc_low", "max_auc_high"):
            value = getattr(self, name)
            if value is not None and not 0.5 <= value <= 1.0:
                raise ValueError(f"gate.{name} must be in [0.5, 1], got {value}")
        for name in ("max_fpd_over_floor", "max_kpd_over_floor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"gate.{name} must be > 0, got {value}")


@dataclass(frozen=True)
class RegisterConfig:
    """Registration of the result: ``name`` (default ``caloforge-<detector>``), the ``alias`` every new
    version gets, and whether a version that passes the gate and beats the champion becomes ``champion``."""

    enabled: bool = True
    name: str | None = None
    alias: str = "candidate"
    promote: bool = True


def _default_loop() -> LoopConfig:
    return LoopConfig(
        steps=500,
        batch_size=32,
        log_every=10,
        checkpoint_every=100,
        optim=OptimConfig(lr=2.0e-4),
        schedule=ScheduleConfig(kind="wsd", warmup_frac=0.05, stable_frac=0.6),
        ema=EMAConfig(decay=0.99),
    )


@dataclass(frozen=True)
class AdaptConfig:
    """``caloforge adapt`` (``configs/adapt/*.yaml``); see the module docstring."""

    name: str = "adapt"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    loop: LoopConfig = field(default_factory=_default_loop)
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(shuffle_buffer=500))
    eval: AdaptEvalConfig = field(default_factory=AdaptEvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    device: str = "auto"
    keep_checkpoints: int = 2  # one process (on Ray Train: cluster.num_to_keep)
    progress: bool = True  # a progress bar in one process (Ray workers log lines)
    torch_threads: int = 0  # this process's torch threads (Ray workers: cluster.cpus_per_worker)
    fault_injection_step: int | None = None  # test-only: fail once after this step (resume drills)
    # Ray Train (``adapt/distributed.py``): unset, one process; set, ``cluster.num_workers`` workers with the
    # ``engine`` (DeepSpeed ZeRO 0/1/2 or DDP), checkpoints in Ray storage (default: the run directory).
    cluster: ClusterConfig | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.fault_injection_step is not None and not 1 <= self.fault_injection_step < self.loop.steps:
            raise ValueError(
                f"fault_injection_step must be in [1, loop.steps={self.loop.steps}), got "
                f"{self.fault_injection_step}"
            )
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        if self.stream.mode != "resampled":
            raise ValueError(f"stream.mode must be 'resampled' for training, got {self.stream.mode!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.cluster is None:
            if self.engine != EngineConfig():
                raise ValueError(
                    "engine: applies to training on Ray Train workers only; add a cluster: block "
                    "(cluster.num_workers, ...) or remove engine"
                )
            return
        if self.device != "auto":
            raise ValueError(
                f"device: {self.device!r} with a cluster: block; the Ray workers' device is set by "
                "cluster.use_gpu (leave device: auto)"
            )
        try:
            self.loop.micro_batch_size(self.cluster.num_workers)
        except ValueError as exc:
            raise ValueError(f"loop.batch_size: {exc}") from None

    @property
    def world_size(self) -> int:
        """Training processes: ``cluster.num_workers``, or 1 without a cluster block."""
        return self.cluster.num_workers if self.cluster is not None else 1

    def stream_config(self) -> StreamConfig:
        """The stream options with the loop's per-rank micro-batch (``loop.batch_size`` split over
        :attr:`world_size` ranks and ``loop.grad_accum``)."""
        return dataclasses.replace(self.stream, batch_size=self.loop.micro_batch_size(self.world_size))
