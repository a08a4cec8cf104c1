"""Plain-PyTorch backends: ``TorchBackend`` (one process) and ``DDPBackend`` (DistributedDataParallel).

Both implement ``caloforge.training.backend.Backend``: they place the model, build AdamW + the LR schedule
(``training/optim.py``), scale micro-batch losses by ``1/grad_accum``, clip the global gradient norm, skip
updates with non-finite gradients (the schedule still advances, so the update index stays the loop's step),
run the forward under bf16 autocast when asked (``precision`` ``bf16``, or ``auto`` on CUDA), and save /
load model + optimizer + scheduler as ``torch.save`` of plain state dicts, read back with
``torch.load(weights_only=True)``.

``DDPBackend`` never creates a process group: it joins the one its launcher made (``torchrun``, Ray Train,
``torch.multiprocessing`` + ``init_process_group``). Off the accumulation boundary its ``accumulate()`` is
``DistributedDataParallel.no_sync()``, so gradients are all-reduced once per optimizer update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from caloforge.training.backend import Backend, StepInfo
from caloforge.training.config import LoopConfig
from caloforge.training.optim import build_optimizer, build_scheduler
from caloforge.training.trainable import TrainableSpec, resolve

__all__ = [
    "DDPBackend",
    "TorchBackend",
    "compile_model",
    "resolve_device",
    "resolve_precision",
    "use_fused_adamw",
]

log = logging.getLogger("caloforge.training")

MODEL_FILE = "model.pt"
OPTIM_FILE = "optim.pt"


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` (the current CUDA device) when available, else ``cpu``; names are checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device: {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; explicit values are kept (bf16 autocast also runs on CPU)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: {precision!r} is not one of auto, fp32, bf16")
    return precision  # type: ignore[return-value]


def use_fused_adamw(fused_adamw: bool | None, device: torch.device) -> bool:
    """``None`` (the backends' default) → fused AdamW on CUDA, the default implementation elsewhere."""
    return device.type == "cuda" if fused_adamw is None else bool(fused_adamw)


def compile_model(model: nn.Module, enabled: bool, device: torch.device) -> bool:
    """``model.compile()`` in place when ``enabled`` (``LoopConfig.compile``) and ``device`` is CUDA.

    In place, so parameter names and state-dict keys do not change and DDP / DeepSpeed wrap the model as
    usual; a deep copy or pickle of the model (the EMA-averaged model, bundles) is a plain eager module again
    (``nn.Module`` drops the compiled call). A model the caller already compiled is left as it is. Returns
    whether the model's forward is compiled. On CPU the flag is ignored (logged).
    """
    if not enabled:
        return False
    if device.type != "cuda":
        log.info("loop.compile is ignored on %s: the model is compiled on CUDA only", device)
        return False
    if getattr(model, "_compiled_call_impl", None) is None:  # nn.Module.compile's slot
        model.compile()
    return True


class TorchBackend(Backend):
    """One process on one device.

    Args:
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: overrides ``LoopConfig.precision`` when given (``auto``/``fp32``/``bf16``).
        fused_adamw: single-kernel AdamW; ``None``: on CUDA only.
    """

    def __init__(
        self,
        device: str | torch.device = "auto",
        precision: str | None = None,
        fused_adamw: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.fused_adamw = use_fused_adamw(fused_adamw, self.device)
        self._precision_override = precision
        if precision is not None:
            resolve_precision(precision, self.device)
        self.precision: Literal["fp32", "bf16"] = "fp32"
        self._model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._params: list[nn.Parameter] = []
        self._grad_accum = 1
        self._max_grad_norm: float | None = None
        self._micro = 0  # micro-batches since the last optimizer update
        self.compiled = False  # whether setup compiled the model's forward (LoopConfig.compile on CUDA)

    # -- setup -----------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, config: LoopConfig, trainable: TrainableSpec = None) -> None:
        if self._model is not None:
            raise RuntimeError("backend.setup called twice; use a fresh backend per Trainer")
        self.precision = resolve_precision(self._precision_override or config.precision, self.device)
        model.to(self.device)
        self.compiled = compile_model(model, config.compile, self.device)
        self._model = model
        selection = resolve(model, trainable)
        self.optimizer = build_optimizer(model, config.optim, selection, fused=self.fused_adamw)
        selection.mask_gradients(model)
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.steps)
        self._grad_accum = config.grad_accum
        self._max_grad_norm = config.max_grad_norm
        self._micro = 0
        self._wrap(model)
        log.debug(
            "%s: device=%s precision=%s compiled=%s fused_adamw=%s params=%d",
            type(self).__name__,
            self.device,
            self.precision,
            self.compiled,
            self.fused_adamw,
            sum(p.numel() for p in self._params),
        )

    def _wrap(self, model: nn.Module) -> None:
        """Hook for wrapping backends; the plain backend calls the model itself."""

    def _require_setup(self) -> None:
        if self._model is None or self.optimizer is None or self.scheduler is None:
            raise RuntimeError(f"{type(self).__name__}.setup(model, config) has not been called")

    @property
    def module(self) -> nn.Module:
        self._require_setup()
        return self._model  # type: ignore[return-value]

    @property
    def model(self) -> nn.Module:
        self._require_setup()
        return self._model  # type: ignore[return-value]

    @property
    def at_boundary(self) -> bool:
        """Whether the next ``step()`` call (after the current micro-batch) updates the weights."""
        return (self._micro + 1) % self._grad_accum == 0

    # -- per micro-batch -------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._require_setup()
        if loss.ndim != 0:
            raise ValueError(f"backend.backward expects a scalar loss, got shape {tuple(loss.shape)}")
        (loss / self._grad_accum).backward()

    def step(self) -> StepInfo | None:
        self._require_setup()
        self._micro += 1
        if self._micro < self._grad_accum:
            return None
        self._micro = 0
        assert self.optimizer is not None and self.scheduler is not None
        max_norm = self._max_grad_norm if self._max_grad_norm is not None else math.inf
        grads_present = [p for p in self._params if p.grad is not None]
        lr = float(self.optimizer.param_groups[0]["lr"])
        if grads_present and self.fused_adamw:
            # Decide on the device: fused AdamW skips the whole update (weights, moments, step counts) when
            # ``found_inf`` is 1 — GradScaler's mechanism — so no per-step GPU→host sync happens here.
            norm = torch.nn.utils.clip_grad_norm_(grads_present, max_norm)
            found_inf = (~torch.isfinite(norm)).to(torch.float32)
            self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return StepInfo(grad_norm=norm.detach(), lr=lr, skipped=found_inf > 0)
        if grads_present:
            norm = torch.nn.utils.clip_grad_norm_(grads_present, max_norm)
            grad_norm = float(norm)
        else:
            grad_norm = 0.0
        skipped = not math.isfinite(grad_norm)
        if skipped:
            log.warning("non-finite gradient norm (%s): skipping this optimizer update", grad_norm)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInfo(grad_norm=grad_norm, lr=lr, skipped=skipped)

    # -- state -----------------------------------------------------------------------------------------
    def _optim_state(self) -> dict:
        assert self.optimizer is not None and self.scheduler is not None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def save(self, directory: Path) -> None:
        self._require_setup()
        directory = Path(directory)
        if self.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), directory / MODEL_FILE)
            torch.save(self._optim_state(), directory / OPTIM_FILE)
        self.barrier()

    def load(self, directory: Path) -> None:
        self._require_setup()
        directory = Path(directory)
        for name in (MODEL_FILE, OPTIM_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"checkpoint {directory}: missing {name}")
        model_state = torch.load(directory / MODEL_FILE, map_location=self.device, weights_only=True)
        self.model.load_state_dict(model_state)
        optim_state = torch.load(directory / OPTIM_FILE, map_location=self.device, weights_only=True)
        assert self.optimizer is not None and self.scheduler is not None
        self.optimizer.load_state_dict(optim_state["optimizer"])
        self.scheduler.load_state_dict(optim_state["scheduler"])
        self._micro = 0


class DDPBackend(TorchBackend):
    """``DistributedDataParallel`` inside an already-initialised ``torch.distributed`` process group.

    Args:
        device: ``auto`` → ``cuda:$LOCAL_RANK`` when CUDA is present, else ``cpu``.
        precision: as ``TorchBackend``.
        find_unused_parameters: passed to DDP; needed only when a forward leaves some trainable
            parameters out of the graph entirely (unused embedding rows are fine without it).
        fused_adamw: as ``TorchBackend``.

    With ``LoopConfig.compile`` the model is compiled in place before DDP wraps it: one compiled backward,
    so the gradient all-reduce starts after it rather than overlapping bucket by bucket.
    """

    def __init__(
        self,
        device: str | torch.device = "auto",
        precision: str | None = None,
        find_unused_parameters: bool = False,
        fused_adamw: bool | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "DDPBackend needs an initialised torch.distributed process group "
                "(torchrun, Ray Train, or dist.init_process_group) before it is built"
            )
        if device == "auto" and torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            torch.cuda.set_device(device)
        super().__init__(device, precision, fused_adamw)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.find_unused_parameters = find_unused_parameters
        self._ddp: nn.parallel.DistributedDataParallel | None = None

    def _wrap(self, model: nn.Module) -> None:
        self._ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
        )

    @property
    def module(self) -> nn.Module:
        self._require_setup()
        assert self._ddp is not None
        return self._ddp

    def accumulate(self) -> contextlib.AbstractContextManager:
        self._require_setup()
        assert self._ddp is not None
        return contextlib.nullcontext() if self.at_boundary else self._ddp.no_sync()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().to(self.device, dtype=torch.float32, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).to(value.dtype)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()
