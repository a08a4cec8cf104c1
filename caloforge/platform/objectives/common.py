"""What every objective shares: the loss context, the objective interface, and the checks.

An **objective** is a small configured callable ``objective(module, x1_BZPR, cond, generator, ctx) ->
loss_B``: ``module`` the possibly wrapped ``ShowerModel`` (objectives *call* the wrapper,
``module(x_t, t, cond)``, so DDP/DeepSpeed see the forward), ``x1_BZPR`` a batch in model (transformed)
space, ``cond`` its ``ConditionTensors``, ``generator`` the only source of randomness and ``ctx`` the
:class:`LossContext` (step, device, target network, teacher). Its options come from its own frozen
config (the job config's ``objective`` block), never from the model: the model records only its
**parametrisation** (what the network output means: ``ShowerModelConfig.parametrisation``, a key of
``denoisers.DENOISERS``), and an objective names the parametrisations it can train
(``Objective.parametrisations``). So "an EDM-parametrised student trained with a consistency loss" is a
model config plus an objective config.

Wrappers are unwrapped through their public handles: ``.module`` (DDP, FSDP, DeepSpeed engine),
``._orig_mod`` (``torch.compile``) and ``.get_base_model()`` (peft ``PeftModel``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from caloforge.platform.conditioning import ConditionTensors

if TYPE_CHECKING:
    from caloforge.platform.shower_model import ShowerModel

_MAX_WRAP_DEPTH = 8
TERM_NAME = re.compile(r"[a-z0-9_]+")  # ``LossContext.record``: logged as ``loss/<name>``


@dataclass(frozen=True)
class LossContext:
    """What the loop hands a loss besides the batch (one per micro-batch).

    ``step``: optimizer updates done before this one (0-based index of the update being computed);
    ``device``: the backend's device; ``target``: the loop's target network (an EMA of the trained
    weights with its own decay, frozen; ``None`` unless the job asks for one: consistency training's θ⁻);
    ``teacher``: a frozen model on ``device`` (``None`` unless the job has one: distillation);
    ``terms``: the parts of the loss the objective recorded (``record``), which the loop logs beside
    the total as ``loss/<name>``.
    """

    step: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    target: nn.Module | None = None
    teacher: nn.Module | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"LossContext.step must be >= 0, got {self.step}")

    def record(self, name: str, value: torch.Tensor) -> None:
        """Record one part of the loss, unweighted: ``value`` per sample (B,) or a batch scalar; ``terms``
        keeps its mean, detached (no gradient, no host sync). A loss records the same names on every call
        (the loop averages them over the log window and across workers); a name twice is an error."""
        if not isinstance(name, str) or not TERM_NAME.fullmatch(name):
            raise ValueError(f"LossContext.record: a term name is lower-case [a-z0-9_]+, got {name!r}")
        if name in self.terms:
            raise ValueError(f"LossContext.record: term {name!r} recorded twice for one micro-batch")
        if not isinstance(value, torch.Tensor) or value.ndim > 1:
            shape = getattr(value, "shape", type(value).__name__)
            raise ValueError(f"LossContext.record({name!r}): expected a (B,) or scalar tensor, got {shape}")
        self.terms[name] = value.detach().float().mean()

    def require_target(self, who: str) -> nn.Module:
        if self.target is None:
            raise ValueError(f"{who} needs a target network: the job must set a target decay")
        return self.target

    def require_teacher(self, who: str) -> nn.Module:
        if self.teacher is None:
            raise ValueError(f"{who} needs a frozen teacher model: the job must give one")
        return self.teacher


class Objective:
    """Base class of the objectives: ``name``, the ``parametrisations`` it can train, ``config``."""

    name: ClassVar[str] = ""
    parametrisations: ClassVar[tuple[str, ...]] = ()

    def __call__(
        self,
        module: nn.Module,
        x1_BZPR: torch.Tensor,
        cond: ConditionTensors,
        generator: torch.Generator,
        ctx: LossContext | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define __call__")

    def check_model(self, model: ShowerModel) -> None:
        """ValueError when ``model``'s parametrisation is not one this objective trains."""
        param = model.config.parametrisation
        if param not in self.parametrisations:
            raise ValueError(
                f"objective {self.name!r} cannot train a model with parametrisation={param!r} (the network "
                f"output means something else); it trains {list(self.parametrisations)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'config', '')})"


def unwrap_shower_model(module: nn.Module) -> ShowerModel:
    """The ``ShowerModel`` inside ``module`` (itself, or under DDP/DeepSpeed/compile/peft wrappers)."""
    from caloforge.platform.shower_model import ShowerModel

    current: object = module
    for _ in range(_MAX_WRAP_DEPTH):
        if isinstance(current, ShowerModel):
            return current
        if isinstance(current, nn.Module) and "_orig_mod" in current._modules:
            current = current._modules["_orig_mod"]
        elif isinstance(current, nn.Module) and "module" in current._modules:
            current = current._modules["module"]
        elif hasattr(current, "get_base_model"):
            current = current.get_base_model()  # type: ignore[union-attr]
        else:
            break
    raise ValueError(
        f"objective: expected a ShowerModel (optionally wrapped by DDP/DeepSpeed/torch.compile/peft), "
        f"got {type(module).__name__}"
    )


def check_objective_inputs(
    model: ShowerModel, objective: Objective, x1_BZPR: torch.Tensor, cond: ConditionTensors
) -> None:
    """ValueError when the model's parametrisation does not fit the objective or the batch the model."""
    objective.check_model(model)
    if x1_BZPR.ndim != 4 or tuple(x1_BZPR.shape[1:]) != model.mesh_shape:
        mesh = ", ".join(map(str, model.mesh_shape))
        raise ValueError(f"x1_BZPR must have shape (B, {mesh}), got {tuple(x1_BZPR.shape)}")
    if len(cond) != x1_BZPR.shape[0]:
        raise ValueError(f"cond has {len(cond)} rows but x1_BZPR has batch {x1_BZPR.shape[0]}")


__all__ = ["LossContext", "Objective", "check_objective_inputs", "unwrap_shower_model"]
