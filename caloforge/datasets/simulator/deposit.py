"""Spot deposition into the cylindrical mesh (docs/simulator.md §2 "draw", §4 "Deposit").

Every energy deposit of the simulator is a *segment*: ``count`` spots of one shower in one mesh layer that
share a radial scale R (mm), a truncation of the radial profile and an energy per spot (calibrated MeV).
EM steps give two segments (core and tail, hep-ex/0001020 eq. (23)-(29)), hadronic steps one, a MIP track
one spot per layer on the axis. ``deposit`` expands the segments into spots and bins them:

- radius: r = R·√(u/(1−u)) is the inverse CDF r²/(r²+R²) of f(r) = 2rR²/(r²+R²)² (GFlash, Grindhammer &
  Peters hep-ex/0001020; Geant4 ``GFlashHomoShowerParameterisation::GenerateRadius``); drawing u ~ U(0, umax)
  with umax = CDF(r_cap) samples the profile truncated at r_cap (10 R_M for EM, 4R for the hadronic part);
- local azimuth α uniform: the mesh's angular bins are the local azimuth around the shower axis, bin j
  covering [−π + j·2π/n_phi, −π + (j+1)·2π/n_phi) (CaloChallenge convention), so bin = ⌊u·n_phi⌋;
- φ-periodic cracks: global φ = φ_inc + r·sin α / R_calo (docs/simulator.md §4); module boundaries at
  φ = k·2π/n_modules, a crack is the band of ``width_fraction`` of a module centred on a boundary, and
  the visible energy of a spot inside it is scaled by ``response``;
- inclined plates (accordion): the sampling fraction is modulated by 1 + A·cos(2(α − φ_inc)), a quadrupole
  pattern in the local azimuth that rotates with the incident φ (planes look alike from both sides);
- spots beyond the last radial edge are lost (lateral leakage): they go to an overflow radial bin that is
  dropped, so no compaction of the spot arrays is needed; one ``np.bincount`` per pass of at most
  ``spots_per_pass`` spots.

Determinism: radii and azimuths come from two dedicated generators, consumed in segment order; numpy's
Generator fills float32 arrays from the same bit stream whether drawn at once or in pieces, so the result
does not depend on ``spots_per_pass``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caloforge.datasets.simulator.stack import Stack

SPOTS_PER_PASS = 2_000_000


@dataclass(frozen=True)
class Segments:
    """S segments (structure of arrays): spots of one shower in one layer sharing a radial law and energy."""

    shower: np.ndarray  # (S,) int64, index of the shower within the chunk
    layer: np.ndarray  # (S,) int64, mesh layer
    count: np.ndarray  # (S,) int64, number of spots (0 allowed)
    radius_mm: np.ndarray  # (S,) float32, scale R of 2rR²/(r²+R²)² (0: on the axis)
    umax: np.ndarray  # (S,) float32, CDF at the truncation radius (u ~ U(0, umax))
    energy_mev: np.ndarray  # (S,) float64, calibrated energy of each spot

    def __post_init__(self) -> None:
        n = len(self.shower)
        for name in ("layer", "count", "radius_mm", "umax", "energy_mev"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Segments.{name}: length {len(getattr(self, name))} != {n}")

    def __len__(self) -> int:
        return len(self.shower)

    @property
    def n_spots(self) -> int:
        return int(self.count.sum())

    @staticmethod
    def concat(parts: Sequence[Segments]) -> Segments:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Segments.empty()
        return Segments(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("shower", "layer", "count", "radius_mm", "umax", "energy_mev")
            )
        )

    @staticmethod
    def empty() -> Segments:
        i = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float32)
        return Segments(i, i, i, f, f, np.zeros(0, dtype=np.float64))

    @staticmethod
    def interleave(a: Segments, b: Segments) -> Segments:
        """Segments a[0], b[0], a[1], b[1], ... (keeps each shower's spots together for cache locality)."""
        if len(a) != len(b):
            raise ValueError(f"Segments.interleave: lengths {len(a)} != {len(b)}")
        return Segments(
            *(
                np.stack([getattr(a, f), getattr(b, f)], axis=1).reshape(-1)
                for f in ("shower", "layer", "count", "radius_mm", "umax", "energy_mev")
            )
        )


def truncation_umax(radius: np.ndarray, cap: float | np.ndarray) -> np.ndarray:
    """CDF r²/(r²+R²) of the radial term at the cap (same units as ``radius``)."""
    cap2 = np.square(cap)
    return cap2 / (cap2 + np.square(radius))


def _pass_bounds(counts: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split segments into consecutive passes holding at most ``budget`` spots (at least one segment each)."""
    cum = np.cumsum(counts)
    bounds = []
    start = 0
    done = 0
    while start < len(counts):
        end = int(np.searchsorted(cum, done + budget, side="right"))
        end = max(end, start + 1)
        bounds.append((start, end))
        done = int(cum[end - 1])
        start = end
    return bounds


def deposit(
    segments: Segments,
    stack: Stack,
    phi_rad: np.ndarray,
    rng_radius: np.random.Generator,
    rng_azimuth: np.random.Generator,
    spots_per_pass: int = SPOTS_PER_PASS,
) -> np.ndarray:
    """Expand ``segments`` into spots and bin them: calibrated MeV, float64 (n_showers, n_z, n_phi, n_r).

    ``phi_rad`` (n_showers,) is the incident azimuth of each shower of the chunk (cracks, plates).
    """
    if spots_per_pass < 1:
        raise ValueError(f"spots_per_pass must be >= 1, got {spots_per_pass}")
    n_showers = len(phi_rad)
    n_rb = stack.n_r + 1  # last radial bin: overflow (lateral leakage), dropped at the end
    per_layer = stack.n_phi * n_rb
    per_shower = stack.n_z * per_layer
    size = n_showers * per_shower
    out = np.zeros(size, dtype=np.float64)

    keep = segments.count > 0
    count = segments.count[keep]
    if count.size == 0:
        return out.reshape(n_showers, stack.n_z, stack.n_phi, n_rb)[..., : stack.n_r]
    shower = segments.shower[keep]
    base = shower * per_shower + segments.layer[keep] * per_layer
    radius = segments.radius_mm[keep].astype(np.float32, copy=False)
    umax = segments.umax[keep].astype(np.float32, copy=False)
    energy = segments.energy_mev[keep].astype(np.float64, copy=False)
    cracks = stack.cracks
    modulated = cracks is not None or stack.plate_modulation > 0
    inv_width = None if stack.r_bin_width_mm is None else np.float32(1.0 / stack.r_bin_width_mm)
    inner_edges = stack.r_edges_mm[1:].astype(np.float32)

    for s, e in _pass_bounds(count, spots_per_pass):
        cnt = count[s:e]
        m = int(cnt.sum())
        # radius: r = R·sqrt(u/(1-u)), u ~ U(0, umax)
        u = rng_radius.random(m, dtype=np.float32)
        u *= np.repeat(umax[s:e], cnt)
        q = np.subtract(np.float32(1.0), u)
        np.divide(u, q, out=q)
        np.sqrt(q, out=q)
        q *= np.repeat(radius[s:e], cnt)
        r_mm = q
        if inv_width is not None:
            rbin = (r_mm * inv_width).astype(np.int64)
            np.minimum(rbin, stack.n_r, out=rbin)
        else:
            rbin = np.searchsorted(inner_edges, r_mm, side="right").astype(np.int64)
        # local azimuth: bin = floor(u·n_phi), α = −π + 2π·u
        az = rng_azimuth.random(m, dtype=np.float32)
        idx = np.repeat(base[s:e], cnt)
        idx += (az * np.float32(stack.n_phi)).astype(np.int64) * n_rb
        idx += rbin
        w = np.repeat(energy[s:e], cnt)
        if modulated:
            alpha = az.astype(np.float64) * (2.0 * math.pi) - math.pi
            phi_inc = np.repeat(phi_rad[shower[s:e]], cnt)
            factor = np.ones(m, dtype=np.float64)
            if stack.plate_modulation > 0:
                factor += stack.plate_modulation * np.cos(2.0 * (alpha - phi_inc))
            if cracks is not None:
                n_modules, width_fraction, response = cracks
                phi_global = phi_inc + r_mm.astype(np.float64) * np.sin(alpha) / stack.calo_inner_radius_mm
                pos = np.mod(phi_global * (n_modules / (2.0 * math.pi)), 1.0)
                half = 0.5 * width_fraction
                in_crack = (pos < half) | (pos > 1.0 - half)
                factor[in_crack] *= response
            w *= factor
        out += np.bincount(idx, weights=w, minlength=size)
    return out.reshape(n_showers, stack.n_z, stack.n_phi, n_rb)[..., : stack.n_r]
