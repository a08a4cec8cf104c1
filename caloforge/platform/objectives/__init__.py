"""Training objectives by name: ``OBJECTIVES[name]`` is an :class:`Objective` class; an instance, built
from its options (the job config's ``objective`` block, :class:`ObjectiveConfig`), is the callable
``objective(module, x1_BZPR, cond, generator, ctx) -> loss_B`` (see ``common.py`` for the contract).

The model records its *parametrisation* (``ShowerModelConfig.parametrisation``: what the network output
means), the job chooses the *objective* that trains it; :func:`make_objective` checks they fit. Each
parametrisation has a native objective (``NATIVE_OBJECTIVES``), used when the job names none.

- ``flow_matching``: conditional flow matching, linear path (Lipman et al. 2023); ``coupling = "ot"`` adds
  minibatch OT pairing within condition groups (Tong et al. 2023; AllShowers). Trains ``flow_matching``.
- ``edm``: EDM denoising loss with log-normal σ and λ(σ) weighting (Karras et al. 2022). Trains ``edm``.

- ``consistency_distillation``: consistency distillation of a frozen teacher (``LossContext.teacher``)
  with an EMA target network (``LossContext.target``) into a ``consistency`` / ``consistency_fm``
  student (Song et al. 2023; CaloDiT-2). See ``consistency.py``; its optional feature term (per-layer
  centres, widths and soft occupancies, ``shower_features.py``) is the showers' perceptual distance.

- ``shortcut``: shortcut models (Frans et al. 2025) as distillation of a flow-matching teacher into the
  step-conditioned ``shortcut`` parametrisation (the network also takes the step size): d = 0 regresses
  the teacher's velocity, d > 0 learns from two half steps of itself. See ``shortcut.py``.

A new objective is one class here plus one options field in :class:`ObjectiveConfig`; it reads a teacher
or target network from the :class:`LossContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caloforge.platform.objectives.common import (
    LossContext,
    Objective,
    check_objective_inputs,
    unwrap_shower_model,
)
from caloforge.platform.objectives.consistency import (
    ConsistencyDistillation,
    ConsistencyDistillationConfig,
    consistency_distillation_loss,
)
from caloforge.platform.objectives.coupling import (
    condition_groups,
    mean_pair_distance,
    ot_couple,
    ot_permutation,
)
from caloforge.platform.objectives.edm import EDMLoss, EDMLossConfig
from caloforge.platform.objectives.flow_matching import COUPLINGS, FlowMatchingConfig, FlowMatchingLoss
from caloforge.platform.objectives.shortcut import (
    ShortcutConfig,
    ShortcutDistillation,
    shortcut_targets,
)
from caloforge.platform.objectives.shower_features import (
    FEATURE_KINDS,
    LayerFeatures,
    SoftLayerFeatures,
    feature_distance,
)

OBJECTIVES: dict[str, type[Objective]] = {
    "flow_matching": FlowMatchingLoss,
    "edm": EDMLoss,
    "consistency_distillation": ConsistencyDistillation,
    "shortcut": ShortcutDistillation,
}

# The objective a parametrisation is trained with when the job names none.
NATIVE_OBJECTIVES: dict[str, str] = {
    "flow_matching": "flow_matching",
    "edm": "edm",
    "consistency": "consistency_distillation",
    "consistency_fm": "consistency_distillation",
    "shortcut": "shortcut",
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """The job config's ``objective`` block: which objective trains the model, and each one's options.

    ``name``: a key of ``OBJECTIVES``; ``None`` (the default) means the model's native objective
    (``NATIVE_OBJECTIVES[model.config.parametrisation]``). Only the chosen objective's section is used.
    """

    name: str | None = None
    edm: EDMLossConfig = field(default_factory=EDMLossConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    consistency_distillation: ConsistencyDistillationConfig = field(
        default_factory=ConsistencyDistillationConfig
    )
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in OBJECTIVES:
            raise ValueError(f"objective.name: unknown {self.name!r} (known: {sorted(OBJECTIVES)})")

    def resolve_name(self, parametrisation: str) -> str:
        """The objective's name for a model of ``parametrisation``."""
        if self.name is not None:
            return self.name
        try:
            return NATIVE_OBJECTIVES[parametrisation]
        except KeyError:
            raise ValueError(
                f"objective.name: parametrisation {parametrisation!r} has no native objective; name one "
                f"(known: {sorted(OBJECTIVES)})"
            ) from None


def make_objective(
    config: ObjectiveConfig | str | None = None, parametrisation: str | None = None
) -> Objective:
    """The configured objective. ``config``: an :class:`ObjectiveConfig`, an objective name (default
    options) or ``None`` (the native objective of ``parametrisation``). With ``parametrisation`` the
    pairing is checked here (ValueError naming both), so a job fails before it trains."""
    if config is None or isinstance(config, str):
        config = ObjectiveConfig(name=config)
    if config.name is None and parametrisation is None:
        raise ValueError("make_objective: give an objective name or the model's parametrisation")
    name = config.resolve_name(parametrisation) if parametrisation is not None else str(config.name)
    cls = OBJECTIVES[name]
    options = getattr(config, name, None)
    objective = cls(options) if options is not None else cls()  # type: ignore[call-arg]
    if parametrisation is not None and parametrisation not in cls.parametrisations:
        raise ValueError(
            f"objective {name!r} cannot train a model with parametrisation={parametrisation!r}; it trains "
            f"{list(cls.parametrisations)}"
        )
    return objective


__all__ = [
    "COUPLINGS",
    "FEATURE_KINDS",
    "NATIVE_OBJECTIVES",
    "OBJECTIVES",
    "ConsistencyDistillation",
    "ConsistencyDistillationConfig",
    "EDMLoss",
    "EDMLossConfig",
    "FlowMatchingConfig",
    "FlowMatchingLoss",
    "LayerFeatures",
    "LossContext",
    "Objective",
    "ObjectiveConfig",
    "ShortcutConfig",
    "ShortcutDistillation",
    "SoftLayerFeatures",
    "check_objective_inputs",
    "condition_groups",
    "consistency_distillation_loss",
    "feature_distance",
    "make_objective",
    "mean_pair_distance",
    "ot_couple",
    "ot_permutation",
    "shortcut_targets",
    "unwrap_shower_model",
]
