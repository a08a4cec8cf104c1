"""The DeepSpeed JSON of a pretraining config (``caloforge pretrain --print-deepspeed-config``).

The backend itself is shared by every job on Ray Train and lives in ``caloforge.training.deepspeed_backend``
(the one module importing ``deepspeed``).
"""

from __future__ import annotations

from typing import Any

import torch

from caloforge.pretrain.config import PretrainConfig
from caloforge.training.deepspeed_backend import build_deepspeed_config
from caloforge.training.torch_backend import resolve_precision

__all__ = ["deepspeed_config"]


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON of a pretraining config at ``world_size`` data-parallel ranks.

    Precision ``auto`` resolves to bf16 when the config asks for GPUs and fp32 otherwise (what
    :class:`DeepSpeedBackend` resolves on the workers' devices).
    """
    on_gpu = cfg.cluster.use_gpu
    precision = resolve_precision(cfg.loop.precision, torch.device("cuda" if on_gpu else "cpu"))
    return build_deepspeed_config(cfg.loop, cfg.engine.deepspeed, world_size, precision)
