"""DeepSpeed behind the training loop's ``Backend`` seam (ZeRO stages 0/1/2; Rajbhandari et al. 2020).

The one place ``deepspeed`` is imported (lazily, inside :meth:`DeepSpeedBackend.setup`, so that building a
config or running ``--dry-run`` stays fast). The DeepSpeed JSON is never hand-written: it is generated from
our config by :func:`deepspeed_config` / :func:`build_deepspeed_config`.

What the engine does for the loop (see ``caloforge/training/backend.py`` for the contract):

- ZeRO stage 0 (plain data parallel), 1 (optimizer states sharded) or 2 (optimizer states + gradients
  sharded) over the process group that Ray Train (or ``torchrun``) already set up; gloo on CPU, NCCL on GPU.
  Used by every job on Ray Train (pretraining, adaptation: ``training/ray/worker.py:make_backend``).
- The optimizer is ``torch.optim.AdamW`` built by ``caloforge.training.optim.build_optimizer`` (passing our
  own optimizer keeps DeepSpeed from JIT-compiling FusedAdam / cpu_adam); the LR schedule is
  ``caloforge.training.optim.build_scheduler`` (the same WSD/cosine/constant schedules as every other run),
  stepped by the engine after each applied update.
- Gradient accumulation: DeepSpeed's ``gradient_accumulation_steps``; every micro-batch calls
  ``engine.backward`` (which applies the 1/accum scaling) and ``engine.step`` (which updates only when
  ``engine.is_gradient_accumulation_boundary()``).
- Clipping: DeepSpeed's ``gradient_clipping`` (= ``loop.max_grad_norm``).
- Precision: fp32 on CPU; bf16 on GPU through DeepSpeed's ``torch_autocast`` section, i.e. fp32 master
  weights and ``torch.autocast(bfloat16)`` around the forward. This matches ``TorchBackend``/``DDPBackend``
  numerics exactly (switching ``engine.backend`` does not change the training recipe) and keeps the EMA
  and the final bundle in fp32, which DeepSpeed's ``bf16`` mode (bf16 weights) would not.
- Save/load: ``engine.save_checkpoint`` / ``engine.load_checkpoint`` under the tag ``deepspeed`` of the
  given directory (model + LR scheduler from rank 0, one optimizer shard per rank). After loading, the
  learning rate is re-derived from the current schedule at the restored step (a resumed run with more
  ``loop.steps`` follows its new, longer schedule from the first update).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from caloforge.environment import free_port
from caloforge.training.backend import Backend, StepInfo
from caloforge.training.config import LoopConfig
from caloforge.training.optim import build_optimizer, build_scheduler
from caloforge.training.torch_backend import (
    compile_model,
    resolve_device,
    resolve_precision,
    use_fused_adamw,
)
from caloforge.training.trainable import TrainableSpec, resolve

if TYPE_CHECKING:
    from caloforge.training.ray.config import DeepSpeedOptions

__all__ = [
    "CHECKPOINT_TAG",
    "SAFE_GLOBALS",
    "DeepSpeedBackend",
    "build_deepspeed_config",
    "weights_only_checkpoint_engine",
]

log = logging.getLogger("caloforge.training")

CHECKPOINT_TAG = "deepspeed"  # sub-directory of a checkpoint holding DeepSpeed's own layout
_NEVER = 2**31 - 1  # "steps_per_print": DeepSpeed's own progress lines stay off (we log ourselves)


def build_deepspeed_config(
    loop: LoopConfig,
    options: DeepSpeedOptions,
    world_size: int,
    precision: Literal["fp32", "bf16"],
) -> dict[str, Any]:
    """The DeepSpeed JSON for a loop config, ZeRO options, data-parallel world size and resolved precision.

    ``train_batch_size`` is the global batch per optimizer update (``loop.batch_size``); the per-rank
    micro-batch is ``loop.micro_batch_size(world_size)``, which raises ``ValueError`` when the batch does not
    split into ``world_size × grad_accum`` equal parts.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16 here (resolve 'auto' first), got {precision!r}")
    micro = loop.micro_batch_size(world_size)
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if options.zero_stage > 0:
        zero.update(
            {
                "overlap_comm": options.overlap_comm,
                "contiguous_gradients": options.contiguous_gradients,
                "reduce_scatter": options.reduce_scatter,
                "reduce_bucket_size": options.reduce_bucket_size,
                "allgather_bucket_size": options.allgather_bucket_size,
            }
        )
    config: dict[str, Any] = {
        "train_batch_size": loop.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": loop.grad_accum,
        "gradient_clipping": float(loop.max_grad_norm) if loop.max_grad_norm is not None else 0.0,
        "zero_optimization": zero,
        # our optimizer is torch.optim.AdamW: DeepSpeed only "tested" its own Adam variants with ZeRO
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


# What DeepSpeed pickles into a ZeRO-1/2 optimizer file besides tensors, dicts, lists and OrderedDicts
# (the model file holds only those): module, class name. An enum, a plain loss-scaler object and a
# dataclass: rebuilt by the weights-only unpickler without running any of their code.
SAFE_GLOBALS: tuple[tuple[str, str], ...] = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_globals() -> list[Any]:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in SAFE_GLOBALS]


def weights_only_checkpoint_engine(config_params: Any = None) -> Any:
    """A DeepSpeed ``TorchCheckpointEngine`` whose ``load`` is ``torch.load(weights_only=True)`` with
    :data:`SAFE_GLOBALS` allowed (saving is unchanged). A file that needs any other global raises
    ``ValueError`` naming the file and the refused global."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = _safe_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                found = re.search(r"GLOBAL ([\w.]+)", str(exc))
                what = f"it needs {found.group(1)}" if found else str(exc).strip().splitlines()[-1]
                raise ValueError(
                    f"checkpoint file {path}: refused to unpickle it, {what}, which is none of the tensors, "
                    f"containers and {len(allowed)} DeepSpeed classes a CaloForge checkpoint holds (not "
                    "written by CaloForge's DeepSpeed backend, or tampered with)"
                ) from None

    return WeightsOnlyCheckpointEngine(config_params)


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine (ZeRO stage 0/1/2) implementing the loop's :class:`Backend`.

    Build it inside an initialised ``torch.distributed`` process group (Ray Train, ``torchrun``); without
    one, ``setup`` starts a single-process group (gloo on CPU, NCCL on GPU) on 127.0.0.1 so the backend also
    runs standalone. That group lives as long as the process: DeepSpeed caches its groups globally, so it
    cannot be torn down and re-created underneath it.

    Args:
        options: the ZeRO knobs (``engine.deepspeed`` of the job config).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; inside Ray Train pass
            ``ray.train.torch.get_device()``.
        fused_adamw: single-kernel AdamW over ZeRO's flat fp32 partitions; ``None``: on CUDA only.

    With ``LoopConfig.compile`` (CUDA) the model's forward is compiled in place before
    ``deepspeed.initialize`` (see ``caloforge.training.torch_backend.compile_model``).
    """

    def __init__(
        self,
        options: DeepSpeedOptions,
        device: str | torch.device = "auto",
        fused_adamw: bool | None = None,
    ) -> None:
        self.options = options
        self.device = resolve_device(device)
        self.fused_adamw = use_fused_adamw(fused_adamw, self.device)
        self.compiled = False
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.precision: Literal["fp32", "bf16"] = "fp32"
        self.ds_config: dict[str, Any] = {}
        self._engine: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[nn.Parameter] = []
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()

    # -- setup -----------------------------------------------------------------------------------------
    def _ensure_process_group(self) -> None:
        if dist.is_initialized():
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        # what a launcher would export; DeepSpeed's sanity check asks for LOCAL_RANK
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    def setup(self, model: nn.Module, config: LoopConfig, trainable: TrainableSpec = None) -> None:
        if self._engine is not None:
            raise RuntimeError("backend.setup called twice; use a fresh backend per Trainer")
        # DeepSpeed picks its accelerator once, at import: tell it which one instead of letting it probe.
        os.environ["DS_ACCELERATOR"] = "cuda" if self.device.type == "cuda" else "cpu"
        self._ensure_process_group()
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        if not log.isEnabledFor(logging.DEBUG):
            ds_logger.setLevel(logging.WARNING)  # its INFO lines repeat the config on every rank
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.precision = resolve_precision(config.precision, self.device)
        self.ds_config = build_deepspeed_config(config, self.options, self.world_size, self.precision)
        model.to(self.device)
        self.compiled = compile_model(model, config.compile, self.device)
        selection = resolve(model, trainable)
        optimizer = build_optimizer(model, config.optim, selection, fused=self.fused_adamw)
        selection.mask_gradients(model)  # before the engine registers its own gradient hooks
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        scheduler = build_scheduler(optimizer, config.schedule, config.steps)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
            raise ValueError(
                f"DeepSpeed chose checkpoint engine {type(engine.checkpoint_engine).__name__}; CaloForge "
                "loads only through its weights-only TorchCheckpointEngine (drop checkpoint-engine settings)"
            )
        engine.checkpoint_engine = weights_only_checkpoint_engine(engine._config)
        self._engine = engine
        self._optimizer = ds_optimizer
        self._base_optimizer = optimizer
        self._scheduler = scheduler
        log.debug(
            "DeepSpeedBackend: zero_stage=%d device=%s precision=%s world_size=%d micro_batch=%d accum=%d",
            self.options.zero_stage,
            self.device,
            self.precision,
            self.world_size,
            self.ds_config["train_micro_batch_size_per_gpu"],
            self.ds_config["gradient_accumulation_steps"],
        )

    def _require_setup(self) -> Any:
        if self._engine is None:
            raise RuntimeError("DeepSpeedBackend.setup(model, config) has not been called")
        return self._engine

    @property
    def engine(self) -> Any:
        """The ``deepspeed.DeepSpeedEngine`` (after ``setup``)."""
        return self._require_setup()

    @property
    def module(self) -> nn.Module:
        return self._require_setup()

    @property
    def model(self) -> nn.Module:
        return self._require_setup().module

    @property
    def at_boundary(self) -> bool:
        """Whether the ``step()`` after the current micro-batch updates the weights."""
        return bool(self._require_setup().is_gradient_accumulation_boundary())

    # -- per micro-batch -------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 autocast is the engine's job (``torch_autocast`` section, applied inside engine.forward).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        engine = self._require_setup()
        if loss.ndim != 0:
            raise ValueError(f"backend.backward expects a scalar loss, got shape {tuple(loss.shape)}")
        engine.backward(loss)  # scales by 1/gradient_accumulation_steps

    def _local_grad_norm(self) -> float:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))

    def step(self) -> StepInfo | None:
        engine = self._require_setup()
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # advances the micro-step counter only
            return None
        lr = float(self._base_optimizer.param_groups[0]["lr"])
        skipped_before = int(engine.skipped_steps)
        own_norm: float | None = None
        if self.options.zero_stage == 0:
            # Stage 0 leaves full, already all-reduced gradients on the parameters at the boundary and its
            # torch optimizer reports no norm: measure it here; skip a non-finite update like TorchBackend.
            own_norm = self._local_grad_norm()
            if not math.isfinite(own_norm):
                for p in self._params:
                    p.grad = None  # AdamW skips parameters without gradients: no update at all
        engine.step()
        reported = engine.get_global_grad_norm()
        engine_skipped = int(engine.skipped_steps) > skipped_before
        if own_norm is not None:
            grad_norm: float | torch.Tensor = own_norm
        elif reported is None:
            grad_norm = math.nan
        elif isinstance(reported, torch.Tensor):
            # Keep DeepSpeed's norm on the device; the loop reads it at log steps only (no per-step sync).
            grad_norm = reported.detach()
            return StepInfo(grad_norm=grad_norm, lr=lr, skipped=engine_skipped | ~torch.isfinite(grad_norm))
        else:
            grad_norm = float(reported)
        skipped = engine_skipped or not math.isfinite(grad_norm)
        return StepInfo(grad_norm=grad_norm, lr=lr, skipped=skipped)

    # -- collectives -----------------------------------------------------------------------------------
    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        out = value.detach().to(self.device, dtype=torch.float32, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).to(value.dtype)

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # -- state -----------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Every rank: DeepSpeed's layout under ``directory/deepspeed/`` (directory may be rank-local)."""
        engine = self._require_setup()
        directory = Path(directory)
        (directory / CHECKPOINT_TAG).mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={}, save_latest=False)

    def load(self, directory: Path) -> None:
        """Restore model, optimizer shards and LR scheduler written by :meth:`save` (after ``setup``)."""
        engine = self._require_setup()
        directory = Path(directory)
        tag_dir = directory / CHECKPOINT_TAG
        if not tag_dir.is_dir():
            raise ValueError(f"checkpoint {directory}: no DeepSpeed state ({CHECKPOINT_TAG}/ is missing)")
        load_path, _ = engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise ValueError(f"checkpoint {directory}: DeepSpeed could not load {tag_dir}")
        # The optimizer state brought back the learning rate of the *saved* schedule. Re-derive it from this
        # run's schedule at the restored position, so a run resumed with a longer horizon (more loop.steps)
        # uses the new schedule from its first update (identical when the horizon did not change).
        sched = self._scheduler
        for group, base_lr, factor in zip(
            self._base_optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base_lr * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self._base_optimizer.param_groups]
