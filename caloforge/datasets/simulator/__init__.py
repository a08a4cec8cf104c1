"""The built-in GFlash-style shower simulator (docs/simulator.md; spec: the team's shared simulator.md).

A fast parameterised simulator in the style of GFlash (Grindhammer & Peters, hep-ex/0001020; Geant4 GFlash;
CMS Gflash) for EM showers and of CMS FastSim HDShower for hadrons, depositing into the cylindrical
(n_z, n_phi, n_r) mesh of a ``DetectorSpec``. It is NOT Geant4: everything it writes carries
``source = "caloforge-gflash"``.

Public API::

    simulate(detector, conditions, seed, progress=False) -> ShowerSet
    simulate_with_truth(detector, conditions, seed, progress=False) -> (ShowerSet, ShowerTruth)
    sample_conditions(detector, particles, n, energy_gev, log_uniform, theta_deg, phi_deg=(-180, 180), seed=0)
        -> Conditions
    simulate_dataset(detector, particles, n, energy_gev, log_uniform, theta_deg, phi_deg, seed, progress)
        -> ShowerSet

Modules: ``stack`` (detector → layers, steps, calibration), ``em`` (EM showers), ``hadronic`` (hadron
showers), ``deposit`` (spots → mesh), ``conditions`` (validation, sampling), ``engine`` (chunks, seeds),
``cli`` (``caloforge data simulate``).
"""

from caloforge.datasets.simulator.conditions import (
    ENERGY_RANGE_GEV,
    THETA_RANGE_DEG,
    sample_conditions,
    validate_conditions,
)
from caloforge.datasets.simulator.engine import (
    CHUNK_SIZE,
    SIMULATOR_VERSION,
    ShowerTruth,
    simulate,
    simulate_dataset,
    simulate_with_truth,
)

__all__ = [
    "CHUNK_SIZE",
    "ENERGY_RANGE_GEV",
    "SIMULATOR_VERSION",
    "THETA_RANGE_DEG",
    "ShowerTruth",
    "sample_conditions",
    "simulate",
    "simulate_dataset",
    "simulate_with_truth",
    "validate_conditions",
]
