"""Hooks: what the one loop calls around training (torchtitan's callbacks; edm's training_loop reporting).

A hook implements any of ``on_train_start(trainer)``, ``on_step_end(step, metrics)``,
``on_checkpoint(step, path)``, ``on_train_end(step, metrics)`` (subclass :class:`Hook` for no-op
defaults). Hooks run on every rank, in the order given; a hook that should act once checks
``trainer.backend.is_main``. ``metrics`` is a mutable dict: at log steps (``step % log_every == 0``, the
first and the last step) it holds ``loss``, ``grad_norm``, ``lr``, ``samples_per_s``, ``step_time_s``,
``samples_seen``, ``skipped_updates``, ``ema_decay``; on other steps it is empty. A hook may add entries
(e.g. ``eval/…``) that hooks later in the list see.

Built-ins: :class:`ConsoleProgress` (tqdm on rank 0), :class:`MetricsWriter` (``metrics.jsonl``),
:class:`PeriodicEval` (runs a callback on the EMA weights). Periodic checkpoints are the loop's own
(``loop.checkpoint_every``), saved after the step's hooks with the step's metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from caloforge.training.loop import Trainer

__all__ = [
    "ConsoleProgress",
    "FailAfterStep",
    "Hook",
    "HookProtocol",
    "MetricsWriter",
    "PeriodicEval",
    "read_metrics",
]

log = logging.getLogger("caloforge.training")


@runtime_checkable
class HookProtocol(Protocol):
    """What the Trainer calls. All four methods are required by the protocol; :class:`Hook` has no-ops."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None: ...


class Hook:
    """Base class with no-op methods; override what you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        return None

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        return None


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ConsoleProgress(Hook):
    """tqdm bar on rank 0 (step, loss, samples/s, ETA); one log line per log step when the bar is off (with
    the loss's recorded parts, ``loss/<name>``).

    Args:
        enabled: show a bar (tqdm to stderr); when False, log lines only.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = None
        self._main = False
        self._total = 0
        self._start_step = 0
        self._t0 = 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        self._main = trainer.backend.is_main
        self._total = trainer.config.steps
        self._start_step = trainer.step
        self._t0 = time.perf_counter()
        if self._main and self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self._total, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True
            )

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if not self._main:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if "loss" not in metrics:
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self._total - step) if done else math.inf
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4g}", sps=f"{metrics['samples_per_s']:.0f}", refresh=False
            )
        else:
            parts = ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("loss/"))
            log.info(
                "step %d/%d loss %.4g%s lr %.3g samples/s %.0f eta %s",
                step,
                self._total,
                metrics["loss"],
                f" ({parts})" if parts else "",
                metrics["lr"],
                metrics["samples_per_s"],
                _format_eta(eta),
            )

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MetricsWriter(Hook):
    """Append log-step metrics to ``path`` (JSON lines: ``{"step": s, ...}``) on rank 0.

    On resume, lines for steps after the resumed step (written after the last checkpoint, before a
    crash) are dropped, so the file describes one consistent timeline.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._main = False

    def on_train_start(self, trainer: Trainer) -> None:
        self._main = trainer.backend.is_main
        if not self._main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= trainer.step]
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            tmp.replace(self.path)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self._main and metrics:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (a truncated last line, from a crash, is ignored)."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return rows


class PeriodicEval(Hook):
    """Every ``every`` steps and at the run's last step, call ``fn(model) -> dict[str, float]`` with the
    EMA weights swapped in (when the loop keeps an EMA) and the model in eval mode; results land in
    ``metrics`` as ``<prefix>/<name>`` for the hooks after this one.

    Args:
        every: period in optimizer steps.
        fn: the evaluation (generation + comparison, a validation loss, …) on the unwrapped model.
        main_only: call ``fn`` on rank 0 only (the default; ``fn`` must not use collectives then).
        use_ema: evaluate the EMA weights rather than the raw ones.
        prefix: metric-name prefix.
    """

    def __init__(
        self,
        every: int,
        fn: Callable[[nn.Module], dict[str, float]],
        main_only: bool = True,
        use_ema: bool = True,
        prefix: str = "eval",
    ) -> None:
        if every < 1:
            raise ValueError(f"eval every must be >= 1, got {every}")
        self.every = every
        self.fn = fn
        self.main_only = main_only
        self.use_ema = use_ema
        self.prefix = prefix
        self._trainer: Trainer | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_train_start(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def _run(self, step: int) -> dict[str, float]:
        trainer = self._trainer
        assert trainer is not None, "PeriodicEval used before on_train_start"
        if self.main_only and not trainer.backend.is_main:
            return {}
        results = trainer.evaluate(self.fn, use_ema=self.use_ema)
        out = {f"{self.prefix}/{k}": float(v) for k, v in results.items()}
        self.history.append((step, out))
        return out

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self._trainer is not None and (step % self.every == 0 or step == self._trainer.config.steps):
            metrics.update(self._run(step))


class FailAfterStep(Hook):
    """Test-only fault injection of single-process jobs: raise once after ``step`` (a marker file in
    ``run_dir`` keeps the resumed run going), so resume drills need no process killing."""

    def __init__(self, step: int, run_dir: Path, what: str) -> None:
        self.step, self.marker, self.what = step, Path(run_dir) / "fault_injection_fired", what

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step and not self.marker.exists():
            self.marker.write_text(str(step))
            raise RuntimeError(f"fault injection (test-only): {self.what} fails after step {step}")
