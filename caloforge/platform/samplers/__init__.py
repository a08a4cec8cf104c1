"""Samplers by name (``SAMPLERS``); all driven through ``velocity(x, t, cond)``.

See ``caloforge.platform.samplers.ode`` for the ODE methods (euler, midpoint, heun, rk4),
``consistency`` for multistep consistency sampling (consistency-parametrised students), ``shortcut`` for
step-conditioned flow models (``x + h u(x, t, h)``; step-conditioned parametrisations only) and ``bespoke``
for learned solvers (BNS), and ``caloforge.platform.denoisers`` for the time convention. ``get_sampler(name)``
raises a ValueError naming the known samplers. ``SAMPLERS`` holds the ODE solvers (convergent, usable by
any model and the layer-energy head); ``FEW_STEP_SAMPLERS`` the ``consistency`` and ``shortcut``
samplers; ``bespoke`` is in neither: its coefficients belong to a model (``ShowerModelConfig.bespoke``;
``ShowerModel.solver`` builds it). ``SAMPLER_NAMES`` lists every name a model may record.
"""

from __future__ import annotations

from caloforge.platform.samplers.bespoke import BESPOKE, Bespoke, BespokeSolver, bespoke_solve
from caloforge.platform.samplers.consistency import Consistency, renoise_permutation
from caloforge.platform.samplers.ode import RK4, Euler, Heun, Midpoint, Sampler, VelocityFn
from caloforge.platform.samplers.shortcut import SHORTCUT, Shortcut

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (Euler(), Midpoint(), Heun(), RK4())}
FEW_STEP_SAMPLERS: dict[str, Sampler] = {s.name: s for s in (Consistency(), Shortcut())}
# Samplers that call ``velocity(x, t, cond, step)``: only for step-conditioned parametrisations.
STEP_SAMPLERS: tuple[str, ...] = (SHORTCUT,)
SAMPLER_NAMES: tuple[str, ...] = (*SAMPLERS, *FEW_STEP_SAMPLERS, BESPOKE)


def get_sampler(name: str) -> Sampler:
    if name == BESPOKE:
        raise ValueError(
            "the bespoke sampler's coefficients belong to a model: use ShowerModel.solver('bespoke', n) "
            "(ShowerModelConfig.bespoke)"
        )
    try:
        return SAMPLERS[name] if name in SAMPLERS else FEW_STEP_SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r} (known: {sorted(SAMPLER_NAMES)})") from None


__all__ = [
    "BESPOKE",
    "FEW_STEP_SAMPLERS",
    "RK4",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SHORTCUT",
    "STEP_SAMPLERS",
    "Bespoke",
    "BespokeSolver",
    "Consistency",
    "Euler",
    "Heun",
    "Midpoint",
    "Sampler",
    "Shortcut",
    "VelocityFn",
    "bespoke_solve",
    "get_sampler",
    "renoise_permutation",
]
