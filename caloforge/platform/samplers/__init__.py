"""ODE samplers by name (``SAMPLERS``); all driven through ``velocity(x, t, cond)``.

See ``caloforge.platform.samplers.ode`` for the methods and ``caloforge.platform.denoisers`` for the time
convention. ``get_sampler(name)`` raises a ValueError naming the known samplers.
"""

from __future__ import annotations

from caloforge.platform.samplers.ode import RK4, Euler, Heun, Midpoint, Sampler, VelocityFn

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (Euler(), Midpoint(), Heun(), RK4())}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r} (known: {sorted(SAMPLERS)})") from None


__all__ = ["RK4", "SAMPLERS", "Euler", "Heun", "Midpoint", "Sampler", "VelocityFn", "get_sampler"]
