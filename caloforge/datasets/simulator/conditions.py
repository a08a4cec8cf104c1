"""Incident conditions for the simulator: validation and sampling.

``sample_conditions`` draws N showers' conditions (particle uniformly from a list, energy uniform or
log-uniform, θ and φ uniform in degrees) from one seeded generator; ``validate_conditions`` checks
conditions handed to ``simulate`` against the simulator's validity range (GFlash: 0.1 GeV < E < 10 TeV,
Geant4 GFlashParticleBounds) and the detector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from caloforge.platform.conditioning import PDG_TO_NAME, Conditions, particle_name, pdg_of
from caloforge.platform.geometry import DetectorSpec
from caloforge.platform.seeding import Purpose, seed_sequence

ENERGY_RANGE_GEV = (0.1, 10_000.0)  # validity of the parameterisation (GFlash particle bounds)
THETA_RANGE_DEG = (10.0, 170.0)  # sin θ ≥ 0.17: the angle rules of docs/simulator.md §4 stay sane
PHI_LIMIT_DEG = 360.0


def _range(value: object, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: bounds must be finite, got ({lo:g}, {hi:g})")
    if lo > hi:
        raise ValueError(f"{name}: low {lo:g} > high {hi:g}")
    return lo, hi


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or int(seed) < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def sample_conditions(
    detector: DetectorSpec,
    particles: Sequence[str | int],
    n: int,
    energy_gev: tuple[float, float],
    log_uniform: bool,
    theta_deg: tuple[float, float],
    phi_deg: tuple[float, float] = (-180.0, 180.0),
    seed: int = 0,
) -> Conditions:
    """N conditions for ``detector``: particles drawn uniformly from ``particles`` (names or PDG ids, each
    listed in ``detector.particles``), energy in ``energy_gev`` (uniform, or log-uniform when
    ``log_uniform``; inside ``detector.energy_range_gev``), θ and φ uniform in degrees. A range with
    low == high fixes the value. Deterministic in ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n: expected a positive integer number of showers, got {n!r}")
    seed = _check_seed(seed)
    if isinstance(particles, str | int) or len(particles) == 0:
        raise ValueError(
            f"particles: expected a non-empty list of particle names or PDG ids, got {particles!r}"
        )
    pdgs = [pdg_of(p) for p in particles]
    if len(set(pdgs)) != len(pdgs):
        raise ValueError(f"particles: duplicate entries in {list(particles)!r}")
    allowed = {pdg_of(p) for p in detector.particles}
    missing = [particle_name(p) for p in pdgs if p not in allowed]
    if missing:
        raise ValueError(
            f"particles: {missing} not simulated for detector {detector.name!r} "
            f"(its 'particles' list: {list(detector.particles)})"
        )
    e_lo, e_hi = _range(energy_gev, "energy_gev")
    d_lo, d_hi = detector.energy_range_gev
    if e_lo <= 0 or e_lo < d_lo or e_hi > d_hi:
        raise ValueError(
            f"energy_gev: ({e_lo:g}, {e_hi:g}) GeV is outside the range of detector {detector.name!r} "
            f"(energy_range_gev: {d_lo:g}..{d_hi:g})"
        )
    if e_lo < ENERGY_RANGE_GEV[0] or e_hi > ENERGY_RANGE_GEV[1]:
        raise ValueError(
            f"energy_gev: ({e_lo:g}, {e_hi:g}) GeV is outside the simulator's validity range "
            f"{ENERGY_RANGE_GEV[0]:g}..{ENERGY_RANGE_GEV[1]:g} GeV"
        )
    t_lo, t_hi = _range(theta_deg, "theta_deg")
    if t_lo < THETA_RANGE_DEG[0] or t_hi > THETA_RANGE_DEG[1]:
        raise ValueError(
            f"theta_deg: ({t_lo:g}, {t_hi:g}) must lie in [{THETA_RANGE_DEG[0]:g}, {THETA_RANGE_DEG[1]:g}]"
        )
    p_lo, p_hi = _range(phi_deg, "phi_deg")
    if p_lo < -PHI_LIMIT_DEG or p_hi > PHI_LIMIT_DEG or p_hi - p_lo > 360.0:
        raise ValueError(
            f"phi_deg: ({p_lo:g}, {p_hi:g}) must lie in [-360, 360] and span at most 360 degrees"
        )

    rng = np.random.default_rng(seed_sequence(seed, spawn_key=(Purpose.SIMULATE_CONDITIONS,)))
    pdg = np.asarray(pdgs, dtype=np.int64)[rng.integers(0, len(pdgs), size=n)]
    u = rng.random(n)
    if log_uniform:
        energy = np.exp(math.log(e_lo) + u * (math.log(e_hi) - math.log(e_lo)))
    else:
        energy = e_lo + u * (e_hi - e_lo)
    energy = np.clip(energy, e_lo, e_hi)
    theta = np.deg2rad(t_lo + rng.random(n) * (t_hi - t_lo))
    phi = np.deg2rad(p_lo + rng.random(n) * (p_hi - p_lo))
    return Conditions.make(energy * 1000.0, theta, phi, pdg, detector.name)


def validate_conditions(detector: DetectorSpec, conditions: Conditions) -> None:
    """Raise ValueError naming the field, the offending value and its index."""
    if not isinstance(conditions, Conditions):
        raise ValueError(f"conditions: expected a Conditions object, got {type(conditions).__name__}")
    if len(conditions) == 0:
        return
    wrong = conditions.detector != detector.name
    if wrong.any():
        i = int(np.argmax(wrong))
        raise ValueError(
            f"conditions.detector: {int(wrong.sum())} shower(s) are for another detector than "
            f"{detector.name!r}, e.g. {str(conditions.detector[i])!r} at index {i}"
        )

    def check(name: str, values: np.ndarray, lo: float, hi: float, unit: str) -> None:
        bad = ~(np.isfinite(values) & (values >= lo) & (values <= hi))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"conditions.{name}: {int(bad.sum())} value(s) outside [{lo:g}, {hi:g}] {unit}, "
                f"e.g. {values[i]!r} at index {i}"
            )

    check("energy_mev", conditions.energy_mev, ENERGY_RANGE_GEV[0] * 1e3, ENERGY_RANGE_GEV[1] * 1e3, "MeV")
    check(
        "theta_rad",
        conditions.theta_rad,
        math.radians(THETA_RANGE_DEG[0]),
        math.radians(THETA_RANGE_DEG[1]),
        "rad",
    )
    check("phi_rad", conditions.phi_rad, -2 * math.pi, 2 * math.pi, "rad")
    unknown = ~np.isin(conditions.pdg, list(PDG_TO_NAME))
    if unknown.any():
        i = int(np.argmax(unknown))
        raise ValueError(
            f"conditions.pdg: unknown PDG id {int(conditions.pdg[i])} at index {i} "
            f"(known: {sorted(PDG_TO_NAME)})"
        )


__all__ = ["ENERGY_RANGE_GEV", "THETA_RANGE_DEG", "sample_conditions", "validate_conditions"]
