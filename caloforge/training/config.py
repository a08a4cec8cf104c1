"""Configs of the one training loop (shared by ``caloforge train``, pretraining and adaptation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (CaloDiT-2: lr 5e-4, wd 1e-4)."""

    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class ScheduleConfig:
    """LR schedule over the run's optimizer steps.

    ``wsd``: warmup-stable-decay as CaloDiT-2 (linear warm-up for ``warmup_frac``, constant for
    ``stable_frac``, then square-root decay to ``min_lr_frac``·lr); ``cosine``: linear warm-up then cosine
    to ``min_lr_frac``·lr; ``constant``: linear warm-up then constant.
    """

    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_frac: float = 0.1
    stable_frac: float = 0.5
    min_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_frac <= 1 or not 0 <= self.stable_frac <= 1:
            raise ValueError(
                f"schedule fractions must be in [0, 1], got {self.warmup_frac}, {self.stable_frac}"
            )
        if self.warmup_frac + self.stable_frac > 1:
            raise ValueError("schedule.warmup_frac + schedule.stable_frac must be <= 1")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"schedule.min_lr_frac must be in [0, 1], got {self.min_lr_frac}")


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the weights with warm-up: decay_t = min(decay, (1 + t) / (10 + t))."""

    enabled: bool = True
    decay: float = 0.999
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")


@dataclass(frozen=True)
class LoopConfig:
    """The loop itself. ``batch_size`` is the global batch per optimizer step (all ranks, all micro-steps)."""

    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ema: EMAConfig = EMAConfig()
    # torch.compile the model's forward in place (``nn.Module.compile``: parameter names and state-dict
    # keys stay the same, DDP/DeepSpeed wrap it as usual) on CUDA; ignored on CPU. Same math, faster
    # steps after a one-off compilation of about a minute (docs/pretraining.md, "GPU throughput and MFU").
    compile: bool = False
    # stop with an error after this many optimizer updates in a row were skipped for a non-finite gradient
    # norm (checked at log steps); 0: never stop
    max_consecutive_skipped: int = 100

    def __post_init__(self) -> None:
        if self.max_consecutive_skipped < 0:
            raise ValueError(f"max_consecutive_skipped must be >= 0, got {self.max_consecutive_skipped}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")

    def micro_batch_size(self, world_size: int = 1) -> int:
        """Per-rank micro-batch; errors when the global batch does not split evenly."""
        denom = world_size * self.grad_accum
        if self.batch_size % denom:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by workers × grad_accum = "
                f"{world_size} × {self.grad_accum}"
            )
        return self.batch_size // denom
