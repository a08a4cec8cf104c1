"""The one training loop (torchtitan's Trainer, edm's training_loop): pretraining and every adaptation
strategy run through :class:`Trainer`; distribution, logging, evaluation and checkpointing plug in from
outside (a :class:`~caloforge.training.backend.Backend` and hooks).

One optimizer step = ``grad_accum`` micro-batches of ``config.micro_batch_size(world_size)`` showers per
rank (the global batch is ``config.batch_size``). Per micro-batch the loop re-seeds its own
``torch.Generator`` from ``(seed, purpose, rank, step, micro)`` and calls
``loss_fn(backend.module, batch, generator, ctx) -> loss_B`` with a
:class:`~caloforge.platform.objectives.LossContext` (step, device, target network, frozen teacher); so the
noise of step ``s`` does not depend on how the run was split into resumed pieces. After each update it
folds the weights into the EMA (and the target network, when the job keeps one) and calls the hooks.
Log-step metrics: ``loss`` (the mean of the window's steps over the workers) and, for every part of the
loss the objective recorded (``LossContext.record``: a distillation's consistency and feature terms, the
layer-energy head's loss beside the voxel model's), ``loss/<name>`` (unweighted, averaged the same way).
``fit()`` first resumes from the checkpoint manager's latest checkpoint when there is one (a fresh run is a
resume from nothing) and saves a checkpoint when it stops; the latest log-step metrics go to the manager
with every save.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caloforge.config import to_dict
from caloforge.platform.objectives import LossContext
from caloforge.platform.seeding import Purpose, derive_seed
from caloforge.training.backend import Backend, StepInfo
from caloforge.training.config import LoopConfig
from caloforge.training.ema import EMA
from caloforge.training.hooks import HookProtocol
from caloforge.training.state import CheckpointManager, TrainState, capture_rng, restore_rng
from caloforge.training.target import TargetNetwork
from caloforge.training.trainable import TrainableSpec

__all__ = ["SEED_PURPOSE_LOSS", "FitResult", "LossFn", "Trainer", "derive_seed"]

log = logging.getLogger("caloforge.training")

LossFn = Callable[[nn.Module, Any, torch.Generator, LossContext], torch.Tensor]
"""``loss_fn(module, batch, generator, ctx) -> loss_B``: per-sample losses of one micro-batch."""

SEED_PURPOSE_LOSS = Purpose.LOSS  # the loss_fn's generator (noise levels, noise, couplings)


def _term_mismatch(before: list[str], now: list[str], step: int) -> str:
    return (
        f"the loss recorded terms {now} at step {step + 1} after {before}: a loss records the same terms "
        "(LossContext.record) on every call, or the workers' averages would not line up"
    )


@dataclass(frozen=True)
class FitResult:
    """What ``Trainer.fit`` returns."""

    step: int  # optimizer steps done in total (including resumed ones)
    metrics: dict[str, float]  # the last log-step metrics of this call (empty if no step ran)
    history: list[dict] = field(default_factory=list)  # every log-step row of this call: {"step": s, ...}
    checkpoint: Path | None = None  # the checkpoint saved at the end (None without a checkpoint manager)
    resumed_from: Path | None = None  # the checkpoint this run resumed from


class Trainer:
    """The loop. See the module docstring.

    Args:
        model: the (unwrapped) model; the backend places and wraps it.
        loss_fn: ``(module, batch, generator, ctx) -> loss_B`` (``module`` is ``backend.module``; batches
            arrive as the stream yields them, on the CPU; the loss_fn moves what it needs to the module's
            device; ``ctx`` is the step's ``LossContext``).
        backend: a fresh :class:`Backend` (``setup`` is called here).
        stream: an iterable of micro-batches of exactly ``config.micro_batch_size(world_size)`` samples
            (infinite for training); with ``state_dict()/load_state_dict()`` when checkpoints are written.
        config: the loop configuration.
        hooks: called in order on every rank (see ``training/hooks.py``).
        checkpoints: where checkpoints are saved and found (``CheckpointManager`` or the pretraining's Ray
            manager); ``None``: no checkpoints, no resume. With a manager the loop saves every
            ``config.checkpoint_every`` updates (after the step's hooks, so the saved metrics include
            what they added) and when it stops.
        trainable: parameters to optimise (default: all with ``requires_grad``); adaptation passes LoRA or
            embedding parameters here, or a ``Trainable`` selection (``training/trainable.py``) that trains
            only some rows of a parameter (e.g. a new detector's embedding row).
        teacher: a frozen model for distillation objectives (moved to the backend's device, eval mode,
            no gradients), handed to the loss as ``ctx.teacher``.
        target_decay: keep a target network θ⁻ with this EMA decay (``training/target.py``), handed to the
            loss as ``ctx.target``; ``None``: none.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        backend: Backend,
        stream: Iterable[Any],
        config: LoopConfig,
        hooks: Sequence[HookProtocol] = (),
        checkpoints: CheckpointManager | None = None,
        *,
        trainable: TrainableSpec = None,
        teacher: nn.Module | None = None,
        target_decay: float | None = None,
    ) -> None:
        if config.seed < 0:
            raise ValueError(f"seed must be >= 0, got {config.seed}")
        self.config = config
        self.loss_fn = loss_fn
        self.backend = backend
        self.stream = stream
        backend.setup(model, config, trainable)
        self.micro_batch_size = config.micro_batch_size(backend.world_size)
        self.ema = EMA(backend.model, config.ema, trainable) if config.ema.enabled else None
        self.target = (
            TargetNetwork(backend.model, target_decay, trainable) if target_decay is not None else None
        )
        self.teacher = (
            teacher.to(backend.device).eval().requires_grad_(False) if teacher is not None else None
        )
        self.generator = torch.Generator(device=backend.device)
        self.step = 0
        self.samples_seen = 0
        self.skipped_updates = 0
        self.consecutive_skipped = 0  # skipped updates in a row, up to the last flush
        self._skipped_pending: list[bool | torch.Tensor] = []  # StepInfo.skipped since the last flush
        self.checkpoints = checkpoints
        self.hooks: list[HookProtocol] = list(hooks)
        self.last_metrics: dict[str, float] = {}  # the latest log-step metrics (saved with checkpoints)
        checkpointable = hasattr(stream, "state_dict") and hasattr(stream, "load_state_dict")
        if checkpoints is not None and not checkpointable:
            raise ValueError(
                f"stream {type(stream).__name__} has no state_dict()/load_state_dict(): it cannot be "
                "checkpointed (pass checkpoints=None to train without checkpoints)"
            )
        self.resumed_from: Path | None = None
        self._restored = False
        self._iterator: Iterator[Any] | None = None
        self._last_saved_step: int | None = None

    # -- state -----------------------------------------------------------------------------------------
    def _flush_skipped(self) -> int:
        """Fold the pending per-step skip flags (host bools or device tensors) into ``skipped_updates``
        (one device sync for the whole window); returns how many updates of the window were skipped.

        Raises ``FloatingPointError`` when ``config.max_consecutive_skipped`` updates in a row were skipped
        (every rank sees the same flags, so every rank stops at the same step)."""
        if not self._skipped_pending:
            return 0
        flags = self._skipped_pending
        self._skipped_pending = []
        positions = [i for i, f in enumerate(flags) if isinstance(f, torch.Tensor)]
        values = [bool(f) if not isinstance(f, torch.Tensor) else False for f in flags]
        if positions:
            synced = torch.stack([flags[i].reshape(()).to(torch.int64) for i in positions]).tolist()
            for i, v in zip(positions, synced, strict=True):
                values[i] = bool(v)
        n = sum(values)
        if n:
            log.warning(
                "%d of the last %d optimizer updates were skipped (non-finite gradient norm)", n, len(flags)
            )
        self.skipped_updates += n
        for skipped in values:
            self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
        limit = self.config.max_consecutive_skipped
        if limit and self.consecutive_skipped >= limit:
            raise FloatingPointError(
                f"{self.consecutive_skipped} consecutive optimizer updates were skipped (non-finite loss or "
                f"gradient norm) up to step {self.step}: stopping (loop.max_consecutive_skipped={limit}). "
                "Look for NaN/inf in the data or a diverging learning rate; resume from the last checkpoint"
            )
        return n

    def train_state(self) -> TrainState:
        """This rank's loop state (the backend's part is saved by the backend)."""
        self._flush_skipped()
        stream_state = self.stream.state_dict() if hasattr(self.stream, "state_dict") else None
        return TrainState(
            step=self.step,
            ema=self.ema.state_dict() if self.ema is not None else None,
            stream=stream_state,
            rng=capture_rng(),
            generator=self.generator.get_state(),
            extra={
                "samples_seen": self.samples_seen,
                "skipped_updates": self.skipped_updates,
                "consecutive_skipped": self.consecutive_skipped,
                "loop_config": to_dict(self.config),
                **({"target": self.target.state_dict()} if self.target is not None else {}),
            },
        )

    def load_train_state(self, state: TrainState) -> None:
        if state.step > self.config.steps:
            raise ValueError(
                f"checkpoint is at step {state.step}, beyond this run's steps={self.config.steps}"
            )
        saved, current = state.extra.get("loop_config"), to_dict(self.config)
        if saved is not None and saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            log.warning("resuming with a loop config that differs from the checkpoint's in %s", changed)
        if self.ema is not None:
            if state.ema is None:
                raise ValueError("checkpoint has no EMA state but this run keeps an EMA (ema.enabled)")
            self.ema.load_state_dict(state.ema)
        if (self.target is not None) != ("target" in state.extra):
            has = "has" if "target" in state.extra else "has no"
            keeps = "keeps one" if self.target is not None else "keeps none"
            raise ValueError(f"checkpoint {has} target network but this run {keeps} (target_decay)")
        if self.target is not None:
            self.target.load_state_dict(state.extra["target"])
        if state.stream is not None:
            self.stream.load_state_dict(state.stream)  # type: ignore[attr-defined]
        self._iterator = None
        restore_rng(state.rng)
        self.generator.set_state(state.generator)
        self.step = state.step
        self.samples_seen = int(state.extra.get("samples_seen", 0))
        self.skipped_updates = int(state.extra.get("skipped_updates", 0))
        self.consecutive_skipped = int(state.extra.get("consecutive_skipped", 0))
        self._skipped_pending = []

    def save_checkpoint(self) -> Path:
        """Save model, optimizer, scheduler, EMA, stream position and RNG states atomically (all ranks)."""
        if self.checkpoints is None:
            raise ValueError("save_checkpoint needs a checkpoint manager")
        path = self.checkpoints.save(self.step, self.backend, self.train_state(), self.last_metrics)
        self._last_saved_step = self.step
        if self.backend.is_main:
            log.info("saved checkpoint %s", path)
        for hook in self.hooks:
            hook.on_checkpoint(self.step, path)
        return path

    def restore(self, path: str | Path | None = None) -> Path | None:
        """Resume from ``path`` (default: the checkpoint manager's newest checkpoint that verifies, if any);
        returns that path."""
        self._restored = True
        if path is None:
            if self.checkpoints is None:
                return None
            found = self.checkpoints.resume_point()
            if found is None:
                return None
            path = found
        manager = self.checkpoints or CheckpointManager(Path(path).parent)
        state = manager.load(Path(path), self.backend)
        self.load_train_state(state)
        self.resumed_from = Path(path)
        self._last_saved_step = self.step
        if self.backend.is_main:
            log.info("resumed from %s (step %d)", path, self.step)
        return self.resumed_from

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, fn: Callable[[nn.Module], dict[str, float]], use_ema: bool = True) -> dict[str, float]:
        """``fn(model)`` on the unwrapped model in eval mode, with the EMA weights when ``use_ema``.

        The global RNG states are restored afterwards, so evaluating never changes the training run.
        """
        model = self.backend.model
        was_training = model.training
        rng = capture_rng()
        ctx = self.ema.apply(model) if (use_ema and self.ema is not None) else contextlib.nullcontext()
        model.eval()
        try:
            with ctx:
                return dict(fn(model))
        finally:
            model.train(was_training)
            restore_rng(rng)

    def averaged_model(self) -> nn.Module:
        """A copy of the unwrapped model with the EMA weights (the raw ones without EMA), in eval mode."""
        model = copy.deepcopy(self.backend.model)
        if self.ema is not None:
            self.ema.copy_to(model)
        return model.eval()

    # -- the loop --------------------------------------------------------------------------------------
    def _next_batch(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.stream)
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise ValueError(
                f"the training stream ended at step {self.step}: training needs an infinite stream "
                "(resampled epochs)"
            ) from None
        if len(batch) != self.micro_batch_size:
            raise ValueError(
                f"the stream yielded a batch of {len(batch)} samples; the loop needs micro-batches of "
                f"{self.micro_batch_size} = batch_size {self.config.batch_size} / (world_size "
                f"{self.backend.world_size} × grad_accum {self.config.grad_accum}): build the stream with "
                f"batch_size={self.micro_batch_size}"
            )
        return batch

    def loss_context(self) -> LossContext:
        """The :class:`LossContext` of the update being computed."""
        target = self.target.module if self.target is not None else None
        return LossContext(step=self.step, device=self.backend.device, target=target, teacher=self.teacher)

    def _train_step(self) -> tuple[torch.Tensor, StepInfo, dict[str, torch.Tensor]]:
        """One optimizer update; returns the mean micro-batch loss (a device scalar), the StepInfo and the
        mean of each term the loss recorded (``LossContext.record``; device scalars)."""
        backend = self.backend
        info: StepInfo | None = None
        loss_sum = torch.zeros((), device=backend.device)
        terms: dict[str, torch.Tensor] = {}
        for micro in range(self.config.grad_accum):
            batch = self._next_batch()
            self.generator.manual_seed(
                derive_seed(self.config.seed, SEED_PURPOSE_LOSS, backend.rank, self.step, micro)
            )
            ctx = self.loss_context()
            with backend.autocast(), backend.accumulate():
                loss_B = self.loss_fn(backend.module, batch, self.generator, ctx)
            if not isinstance(loss_B, torch.Tensor) or loss_B.shape != (self.micro_batch_size,):
                raise ValueError(
                    f"loss_fn must return per-sample losses of shape ({self.micro_batch_size},), got "
                    f"{getattr(loss_B, 'shape', type(loss_B).__name__)}"
                )
            loss = loss_B.float().mean()
            backend.backward(loss)
            info = backend.step()
            loss_sum += loss.detach()
            if micro and list(ctx.terms) != list(terms):
                raise ValueError(_term_mismatch(list(terms), list(ctx.terms), self.step))
            for name, value in ctx.terms.items():
                terms[name] = terms.get(name, 0.0) + value
        if info is None:
            raise RuntimeError(f"{type(backend).__name__}.step() did not update at the accumulation boundary")
        n = self.config.grad_accum
        return loss_sum / n, info, {name: value / n for name, value in terms.items()}

    def _is_log_step(self, step: int, target: int) -> bool:
        return step == 1 or step % self.config.log_every == 0 or step == target

    def fit(self, max_steps: int | None = None) -> FitResult:
        """Train until ``config.steps`` (or ``max_steps`` total steps, for splitting a run), resuming first.

        Returns the :class:`FitResult`; with a checkpoint manager a checkpoint is saved at the stop.
        """
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        if not self._restored:
            self.restore()
        target = self.config.steps if max_steps is None else min(max_steps, self.config.steps)
        backend = self.backend
        backend.module.train()
        for hook in self.hooks:
            hook.on_train_start(self)

        history: list[dict] = []
        last: dict[str, float] = {}
        window_loss = torch.zeros((), device=backend.device)
        window_terms: dict[str, torch.Tensor] = {}
        term_names: list[str] | None = None  # what the loss records (the first step's; then checked)
        window_steps = 0
        window_time = 0.0  # seconds spent in training steps (hooks excluded) since the last log
        ema_decay = float("nan")
        while self.step < target:
            t0 = time.perf_counter()
            step_loss, info, step_terms = self._train_step()
            if term_names is None:
                term_names = list(step_terms)  # in the order the loss records them
            elif list(step_terms) != term_names:
                raise ValueError(_term_mismatch(term_names, list(step_terms), self.step))
            for name, value in step_terms.items():
                window_terms[name] = window_terms.get(name, 0.0) + value
            self.step += 1
            self.samples_seen += self.config.batch_size
            self._skipped_pending.append(info.skipped)
            if self.ema is not None:
                ema_decay = self.ema.update(backend.model)
            if self.target is not None:
                self.target.update(backend.model)
            window_loss += step_loss
            window_steps += 1
            metrics: dict[str, float] = {}
            if self._is_log_step(self.step, target):
                loss = float(backend.all_reduce_mean(window_loss / window_steps))
                self._flush_skipped()
                window_time += time.perf_counter() - t0
                elapsed = window_time
                metrics = {
                    "loss": loss,
                    "grad_norm": float(info.grad_norm),
                    "lr": info.lr,
                    "samples_per_s": window_steps * self.config.batch_size / max(elapsed, 1e-9),
                    "step_time_s": elapsed / window_steps,
                    "samples_seen": float(self.samples_seen),
                    "skipped_updates": float(self.skipped_updates),
                    "ema_decay": ema_decay,
                }
                for name in term_names or ():  # the same names on every worker: the same collectives
                    value = backend.all_reduce_mean(window_terms[name] / window_steps)
                    metrics[f"loss/{name}"] = float(value)
                window_loss = torch.zeros((), device=backend.device)
                window_terms = {}
                window_steps = 0
                window_time = 0.0
            else:
                window_time += time.perf_counter() - t0
            for hook in self.hooks:
                hook.on_step_end(self.step, metrics)
            if metrics:
                self.last_metrics = dict(metrics)  # after the hooks: it includes what they added
                last = metrics
                history.append({"step": self.step, **metrics})
            every = self.config.checkpoint_every
            if self.checkpoints is not None and every and self.step % every == 0 and self.step < target:
                self.save_checkpoint()

        checkpoint = None
        if self.checkpoints is not None:
            checkpoint = (
                self.save_checkpoint() if self._last_saved_step != self.step else self.checkpoints.latest()
            )
        for hook in self.hooks:
            hook.on_train_end(self.step, last)
        return FitResult(self.step, last, history, checkpoint, self.resumed_from)
