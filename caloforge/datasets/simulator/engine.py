"""The simulator's driver: fixed-size chunks, per-chunk seeds, one deposition per chunk.

Showers are processed in chunks of ``CHUNK_SIZE`` (in the order of the conditions); chunk k draws from
``seed_sequence(seed, k)`` (``caloforge.platform.seeding``: a numpy seed sequence of [seed, k]; three
spawned streams: shower physics, spot radii, spot azimuths), so the same seed and conditions give identical
arrays however the work is split internally, and the first ``k·CHUNK_SIZE`` showers of a longer run equal a
shorter run's. Inside a chunk everything is vectorised over showers, steps and spots (docs/simulator.md;
GFlash, Grindhammer & Peters hep-ex/0001020; CMS FastSim HDShower).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from caloforge.config import to_dict
from caloforge.datasets.schema import SIMULATOR_SOURCE, ShowerSet
from caloforge.datasets.simulator.conditions import sample_conditions, validate_conditions
from caloforge.datasets.simulator.deposit import SPOTS_PER_PASS, Segments, deposit
from caloforge.datasets.simulator.em import em_showers
from caloforge.datasets.simulator.hadronic import hadron_showers
from caloforge.datasets.simulator.stack import Stack
from caloforge.platform.conditioning import EM_PDGS, Conditions
from caloforge.platform.geometry import DetectorSpec
from caloforge.platform.seeding import seed_sequence

SIMULATOR_VERSION = "1.0.0"
CHUNK_SIZE = 256

logger = logging.getLogger("caloforge.simulator")


@dataclass(frozen=True)
class ShowerTruth:
    """Generator-level truth of N simulated showers (for validation; not stored in files).

    ``start_depth_x0``: depth along the axis from the calorimeter front (X0) where the shower starts: e±
    at the front of the dead material (−X0_front/sin θ), γ at the conversion point, hadrons at the first
    interaction (+inf when they punch through). ``first_interaction_layer``: mesh layer of the hadronic
    first interaction (n_z: punch-through; −1 for EM showers). ``t_max_x0``: depth of maximum T of the
    (EM part of the) shower from its start. ``em_fraction``: 1 for EM showers, the drawn f_em for hadrons
    (0 if no interaction)."""

    start_depth_x0: np.ndarray
    first_interaction_layer: np.ndarray
    t_max_x0: np.ndarray
    em_fraction: np.ndarray

    @staticmethod
    def concat(parts: Sequence[ShowerTruth]) -> ShowerTruth:
        return ShowerTruth(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("start_depth_x0", "first_interaction_layer", "t_max_x0", "em_fraction")
            )
        )


def _chunk_generators(seed: int, chunk_index: int) -> tuple[np.random.Generator, ...]:
    root = seed_sequence(seed, chunk_index)
    return tuple(np.random.Generator(np.random.PCG64(s)) for s in root.spawn(3))


def _simulate_chunk(
    stack: Stack, cond: Conditions, seed: int, chunk_index: int, spots_per_pass: int
) -> tuple[np.ndarray, ShowerTruth]:
    rng, rng_radius, rng_azimuth = _chunk_generators(seed, chunk_index)
    n = len(cond)
    energy_gev = cond.energy_mev / 1000.0
    sin_theta = np.sin(cond.theta_rad)
    if stack.constant_term > 0:
        response = np.maximum(1.0 + stack.constant_term * rng.standard_normal(n), 0.0)
    else:
        response = np.ones(n)
    truth = ShowerTruth(np.zeros(n), np.full(n, -1, dtype=np.int64), np.zeros(n), np.ones(n))
    parts = []
    em = np.isin(cond.pdg, list(EM_PDGS))
    index = np.arange(n, dtype=np.int64)
    if em.any():
        seg, em_truth = em_showers(
            rng,
            stack,
            shower=index[em],
            energy_gev=energy_gev[em],
            is_photon=cond.pdg[em] == 22,
            sin_theta=sin_theta[em],
            response=response[em],
        )
        parts.append(seg)
        truth.start_depth_x0[em] = em_truth.start_x0
        truth.t_max_x0[em] = em_truth.t_max_x0
    had = ~em
    if had.any():
        seg, had_truth = hadron_showers(
            rng,
            stack,
            shower=index[had],
            energy_gev=energy_gev[had],
            pdg=cond.pdg[had],
            sin_theta=sin_theta[had],
            response=response[had],
        )
        parts.append(seg)
        truth.start_depth_x0[had] = had_truth.first_interaction_x0
        truth.first_interaction_layer[had] = had_truth.first_interaction_layer
        truth.t_max_x0[had] = had_truth.t_max_x0
        truth.em_fraction[had] = had_truth.em_fraction
    grid = deposit(Segments.concat(parts), stack, cond.phi_rad, rng_radius, rng_azimuth, spots_per_pass)
    below = grid < stack.threshold_calibrated_mev  # readout threshold on the visible energy
    out = grid.astype(np.float32)
    out[below] = 0.0
    return out, truth


def simulate_with_truth(
    detector: DetectorSpec,
    conditions: Conditions,
    seed: int,
    progress: bool = False,
    *,
    spots_per_pass: int = SPOTS_PER_PASS,
) -> tuple[ShowerSet, ShowerTruth]:
    """``simulate`` plus the generator-level truth of each shower. ``spots_per_pass`` bounds memory (about
    50 bytes per spot); it does not change the result."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or int(seed) < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    seed = int(seed)
    if not isinstance(detector, DetectorSpec):
        raise ValueError(f"detector: expected a DetectorSpec, got {type(detector).__name__}")
    validate_conditions(detector, conditions)
    stack = Stack.from_detector(detector)
    n = len(conditions)
    mesh = detector.geometry
    showers = np.zeros((n, *mesh.shape), dtype=np.float32)
    truths = []
    start = time.perf_counter()
    with tqdm(total=n, disable=not progress, unit="shower", desc=f"simulate {detector.name}") as bar:
        for k, lo in enumerate(range(0, n, CHUNK_SIZE)):
            hi = min(lo + CHUNK_SIZE, n)
            showers[lo:hi], truth = _simulate_chunk(
                stack, conditions.subset(slice(lo, hi)), seed, k, spots_per_pass
            )
            truths.append(truth)
            bar.update(hi - lo)
    elapsed = time.perf_counter() - start
    logger.info(
        "simulated %d showers for detector %s in %.2f s (%.0f showers/s)",
        n,
        detector.name,
        elapsed,
        n / elapsed if elapsed > 0 else float("inf"),
    )
    metadata = {
        "detector": detector.name,
        "simulator": SIMULATOR_SOURCE,
        "simulator_version": SIMULATOR_VERSION,
        "chunk_size": CHUNK_SIZE,
        "sampling_fraction": detector.sampling_fraction,
        "calibration": "stored MeV = visible MeV / sampling_fraction",
        "readout_threshold_mev": detector.readout_threshold_mev,
        "detector_spec": to_dict(detector),
    }
    result = ShowerSet(showers, conditions, SIMULATOR_SOURCE, seed, metadata)
    if truths:
        truth = ShowerTruth.concat(truths)
    else:
        truth = ShowerTruth(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    return result, truth


def simulate(detector: DetectorSpec, conditions: Conditions, seed: int, progress: bool = False) -> ShowerSet:
    """Simulate one shower per entry of ``conditions`` (all for ``detector``) with the built-in GFlash-style
    simulator (docs/simulator.md): float32 (N, n_z, n_phi, n_r) calibrated MeV, source "caloforge-gflash",
    the seed and the detector/simulator version in the metadata. Same seed + conditions → identical arrays."""
    return simulate_with_truth(detector, conditions, seed, progress)[0]


def simulate_dataset(
    detector: DetectorSpec,
    particles: Sequence[str | int],
    n: int,
    energy_gev: tuple[float, float],
    log_uniform: bool,
    theta_deg: tuple[float, float],
    phi_deg: tuple[float, float] = (-180.0, 180.0),
    seed: int = 0,
    progress: bool = False,
) -> ShowerSet:
    """``sample_conditions`` then ``simulate`` with the same seed (the two use independent streams)."""
    cond = sample_conditions(detector, particles, n, energy_gev, log_uniform, theta_deg, phi_deg, seed)
    return simulate(detector, cond, seed, progress)
