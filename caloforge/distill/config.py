"""The distillation job config (``configs/distill/*.yaml``): how a teacher becomes a few-step model.

``DistillConfig`` is one frozen dataclass loaded strictly through ``caloforge.config``:

- ``method``: ``cd`` (consistency distillation: a new student network, trained), ``shortcut`` (the
  one-network route for flow-matching teachers: the teacher's network, step-conditioned, fine-tuned with
  the shortcut objective) or ``bns`` (bespoke solvers for the teacher itself: no weight changes);
- ``cd``: the student's sampling steps recorded in the bundle, the target network's decay μ, and
  ``student_init`` (a distilled student of the base to start from instead of the teacher's weights:
  CaloDiT-2's workflow for adapted teachers; ``distill.student_init``);
  ``objective``: its loss options (``objective.consistency_distillation``: N = 32, the teacher's Heun step;
  ``objective.shortcut`` for method ``shortcut``); ``shortcut``: the shortcut student's sampling steps and
  optional target network;
  ``loop`` / ``stream``: the one training loop and the data stream (the teacher's detectors' ``train``
  split: the conditions and clean showers come from data);
- ``bns``: the step counts to fit (2, 4, 8), the reference solve, the training pairs and the optimizer;
- ``eval`` and ``gate``: student and teacher evaluated on the same held-out showers with the same seeds; the
  gate bounds the student's distance from its teacher (AUC increase, FPD ratio);
- ``register``: a new version of the teacher's registered model, kind ``distilled``, alias ``candidate``;
  one that passes the gate also gets ``promote_alias`` (default ``fast``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from caloforge.datasets.streaming import StreamConfig
from caloforge.evaluation.config import EvalConfig
from caloforge.platform.objectives import ObjectiveConfig
from caloforge.platform.samplers import SAMPLERS
from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig

__all__ = [
    "METHODS",
    "METHOD_OBJECTIVES",
    "BNSOptions",
    "CDOptions",
    "DistillConfig",
    "DistillEvalConfig",
    "DistillGateConfig",
    "DistillRegisterConfig",
    "ShortcutOptions",
]

METHODS = ("cd", "shortcut", "bns")
# The objective each training method needs (``objective.name``).
METHOD_OBJECTIVES = {"cd": "consistency_distillation", "shortcut": "shortcut"}
# The student parametrisation of each teacher parametrisation (same time convention).
STUDENT_OF = {"edm": "consistency", "flow_matching": "consistency_fm"}


@dataclass(frozen=True)
class CDOptions:
    """Consistency distillation: ``num_steps`` the student's default sampling steps (1, 2 or 4 recorded in
    the bundle; ``consistency`` sampler), ``target_decay`` μ of the target network θ⁻ (CaloDiT-2: 0.95),
    ``student_init``: ``None`` (the student starts from the teacher's weights) or a distilled student of
    the base to start from — a bundle directory or a registry URI (``models:/caloforge-base@fast``); the
    adapted teacher's detector row, fitted transforms and layer-energy head are kept
    (``caloforge.distill.student_init``)."""

    num_steps: int = 1
    target_decay: float = 0.95
    student_init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"cd.num_steps must be >= 1, got {self.num_steps!r}")
        if self.student_init is not None and not str(self.student_init).strip():
            raise ValueError("cd.student_init must be a bundle directory or a registry URI, or null")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"cd.target_decay must be in [0, 1), got {self.target_decay}")


@dataclass(frozen=True)
class ShortcutOptions:
    """The shortcut student (flow-matching teachers): ``num_steps`` its default sampling steps (1, 2 or 4
    recorded in the bundle; ``shortcut`` sampler, any step count works); ``target_decay``: the decay of an EMA
    target network θ⁻ for the self-consistency targets (``None``: the student itself, as Frans et al.)."""

    num_steps: int = 1
    target_decay: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"shortcut.num_steps must be >= 1, got {self.num_steps!r}")
        if self.target_decay is not None and not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"shortcut.target_decay must be in [0, 1) or null, got {self.target_decay}")


@dataclass(frozen=True)
class BNSOptions:
    """Bespoke solvers: ``steps`` (one solver each), ``num_steps`` the default recorded in the bundle (one of
    ``steps``); the reference ``reference_sampler`` × ``reference_steps``; ``n_train`` training pairs (noise
    + conditions of ``train`` showers, reference solved once) in batches of ``batch_size``; ``n_heldout``
    held-out pairs for the reported RMSE; Adam ``lr`` for ``iterations``; ``learn_times``: the interior
    times learn too."""

    steps: tuple[int, ...] = (2, 4, 8)
    num_steps: int = 4
    reference_sampler: str = "heun"
    reference_steps: int = 64
    n_train: int = 512
    n_heldout: int = 128
    batch_size: int = 64
    iterations: int = 1000
    lr: float = 1e-3
    learn_times: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.steps or any(isinstance(s, bool) or s < 1 for s in self.steps):
            raise ValueError(f"bns.steps must be step counts >= 1, got {list(self.steps)}")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"bns.steps has duplicates: {list(self.steps)}")
        if self.num_steps not in self.steps:
            raise ValueError(f"bns.num_steps={self.num_steps} is not one of bns.steps {list(self.steps)}")
        if self.reference_sampler not in SAMPLERS:
            raise ValueError(
                f"bns.reference_sampler must be one of {sorted(SAMPLERS)}, got {self.reference_sampler!r}"
            )
        if self.reference_steps < max(self.steps):
            raise ValueError(
                f"bns.reference_steps={self.reference_steps} must be >= the largest bns.steps "
                f"{max(self.steps)}"
            )
        for name in ("n_train", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"bns.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heldout < 0 or self.iterations < 0 or self.seed < 0:
            raise ValueError("bns.n_heldout, bns.iterations and bns.seed must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"bns.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class DistillEvalConfig:
    """Student and teacher generate for the conditions of ``n_showers`` held-out showers of ``split`` with
    the same seeds (each with its own default sampler: the teacher's, the student's few steps)."""

    n_showers: int = 1000
    split: Literal["test", "val"] = "test"
    metrics: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.n_showers < 20:
            raise ValueError(f"eval.n_showers must be >= 20, got {self.n_showers}")


@dataclass(frozen=True)
class DistillGateConfig:
    """How far from its teacher a student may be to be promoted (``None``: not checked):
    ``max_auc_increase`` (student AUC − teacher AUC, for ``auc_low`` and ``auc_high``; the issue's goal is
    0.05), ``max_fpd_ratio`` (student FPD / teacher FPD)."""

    max_auc_increase: float | None = 0.05
    max_fpd_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_auc_increase is not None and not 0 <= self.max_auc_increase <= 0.5:
            raise ValueError(f"gate.max_auc_increase must be in [0, 0.5], got {self.max_auc_increase}")
        if self.max_fpd_ratio is not None and not self.max_fpd_ratio > 0:
            raise ValueError(f"gate.max_fpd_ratio must be > 0, got {self.max_fpd_ratio}")


@dataclass(frozen=True)
class DistillRegisterConfig:
    """Registration: ``name`` (default: the teacher's registered model; required for a bundle-directory
    teacher), the ``alias`` every new version gets, and ``promote_alias`` for a version that passes the gate
    (``None``: none)."""

    enabled: bool = True
    name: str | None = None
    alias: str = "candidate"
    promote_alias: str | None = "fast"


def _default_loop() -> LoopConfig:
    return LoopConfig(
        steps=1000,
        batch_size=64,
        log_every=10,
        checkpoint_every=200,
        optim=OptimConfig(lr=1e-4),
        schedule=ScheduleConfig(kind="wsd", warmup_frac=0.05, stable_frac=0.6),
        ema=EMAConfig(decay=0.999),
    )


@dataclass(frozen=True)
class DistillConfig:
    """``caloforge distill`` (``configs/distill/*.yaml``); see the module docstring."""

    name: str = "distill"
    method: Literal["cd", "shortcut", "bns"] = "cd"
    cd: CDOptions = field(default_factory=CDOptions)
    shortcut: ShortcutOptions = field(default_factory=ShortcutOptions)
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig(name="consistency_distillation")
    )
    bns: BNSOptions = field(default_factory=BNSOptions)
    loop: LoopConfig = field(default_factory=_default_loop)
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(shuffle_buffer=500))
    eval: DistillEvalConfig = field(default_factory=DistillEvalConfig)
    gate: DistillGateConfig = field(default_factory=DistillGateConfig)
    register: DistillRegisterConfig = field(default_factory=DistillRegisterConfig)
    device: str = "auto"
    keep_checkpoints: int = 2
    progress: bool = True
    torch_threads: int = 0
    fault_injection_step: int | None = None  # test-only: fail once after this step (resume drills)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        wanted = METHOD_OBJECTIVES.get(self.method)
        if wanted is not None and self.objective.name != wanted:
            raise ValueError(
                f"objective.name must be {wanted!r} for method {self.method}, got {self.objective.name!r}"
            )
        if self.method != "cd" and self.cd.student_init is not None:
            raise ValueError(
                f"cd.student_init is for method cd (a consistency student of the base), got method "
                f"{self.method!r}"
            )
        if self.stream.mode != "resampled":
            raise ValueError(f"stream.mode must be 'resampled' for training, got {self.stream.mode!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.fault_injection_step is not None and not 1 <= self.fault_injection_step < self.loop.steps:
            raise ValueError(
                f"fault_injection_step must be in [1, loop.steps={self.loop.steps}), got "
                f"{self.fault_injection_step}"
            )

    def stream_config(self) -> StreamConfig:
        return dataclasses.replace(self.stream, batch_size=self.loop.micro_batch_size(1))
