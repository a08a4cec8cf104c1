"""Hadronic showers (π±, K±, K⁰_L, p, p̄, n, n̄): a compact model after CMS FastSim HDShower.

Specification: docs/simulator.md §3 (shared spec).

Sources (docs/gflash-reference.md §5): CMS FastSim ``HDShower.cc``/``HDShowerParametrization.h`` (GRP-based
profile parameters), CMS Gflash (first-interaction depth, MIP track before it, EM fraction, h/e response),
Grindhammer & Peters hep-ex/0001020 for the EM part. E is the incident kinetic energy in GeV.

- First interaction: d ~ Exp(λ_int,eff) along the axis from the calorimeter front (interactions in the thin
  dead material in front are neglected). Charged hadrons leave a MIP track before it: in each layer the
  mean loss Σ ρ_i d_i (dE/dx)_i,min × the crossed fraction of the layer, with a Landau-like upward
  fluctuation drawn from a Moyal law (X = −ln z², z ~ N(0,1): mode 0, mean γ_E + ln 2) of relative scale
  ``MOYAL_SCALE``, normalised so that the mean loss is dE/dx_min · path; the active share f_mip of it is
  visible. Neutral hadrons leave nothing. Beyond the stack the particle punches through (track only).
- Profile after d (HDShower, a = ln[(0.35 + 0.09 ln E)E], parameters evaluated with E clamped to [2, 500]):
  E < 10 GeV: α_EM = 1.08 + 0.24a, β_EM = 0.478 − 0.135a, α_HD = 1.17 + 0.21a, β_HD = 2.10 − 0.72a;
  E ≥ 10 GeV: α_EM = 1.30 + 0.255a, β_EM = 0.289 − 0.010a, α_HD = 0.38 + 0.23a, β_HD = 0.83 − 0.049a.
  EM part: Gamma profile in X0; hadronic part: Gamma profile in λ_int.
- EM fraction: mean f_em = 1 − (E/E₀)^(k−1), k = 0.82, E₀ = 1.0 GeV (mesons) or 2.6 GeV (baryons), clipped to
  [0.02, 0.98]; per shower f_em ~ Beta with that mean and σ = min(0.12, √(μ(1−μ)/3)) (the cap keeps
  a + b = μ(1−μ)/σ² − 1 ≥ 2, so the two Beta parameters are never both < 1: no U shape near μ → 0 or 1).
  Antibaryons add their annihilation energy 2 × 0.938 GeV to the hadronic part. The mean MIP loss of the
  track is taken from the shower energy (energy conservation).
- Response: the hadronic part is seen with h/e = 0.7 × max(0, 1 + 0.1 z) (per-shower Gaussian response
  fluctuation, non-compensation); the EM part as for EM showers (docs/simulator.md §2).
- Lateral: EM part as §2 with this shower's own T = (α_EM−1)/β_EM (≥ 1 X0); hadronic part
  f(r) = 2rR²/(r²+R²)², R = K_R·(0.2 + 0.1·min(s/λ, 6))·λ_int,eff with s the depth after the first
  interaction, truncated at 4R. The spec's scale λ_int/4 is "order of magnitude; tune so that the 90%
  containment radius ≈ 1 λ_int": with K_R = 1 the hadronic part holds 90% within 0.91 λ at 50 GeV and
  1.0 λ at 100 GeV (0.8 λ at 20 GeV), so K_R = 1.
- Spots: hadronic spots carry ≈ 0.2 GeV (N = max(50, ⌈E_had/0.2⌉), per λ step max(1, ⌊N ΔP⌋)); each step
  gets the Gamma sampling fluctuation Gamma(ΔE/c_h², c_h²) with c_h the detector's hadronic term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc

from caloforge.datasets.simulator.deposit import Segments
from caloforge.datasets.simulator.em import n_spots, profile_segments
from caloforge.datasets.simulator.stack import Stack
from caloforge.platform.conditioning import ANTIBARYON_PDGS, BARYON_PDGS, CHARGED_PDGS

PARAMETER_ENERGY_RANGE_GEV = (2.0, 500.0)  # HDShower evaluates its parameters inside this range
EM_FRACTION_K = 0.82
EM_FRACTION_E0_MESON_GEV = 1.0
EM_FRACTION_E0_BARYON_GEV = 2.6
EM_FRACTION_SIGMA = 0.12
EM_FRACTION_CLIP = (0.02, 0.98)
H_OVER_E = 0.7
RESPONSE_SIGMA = 0.10
ANNIHILATION_GEV = 2.0 * 0.938
SPOT_ENERGY_GEV = 0.2
MIN_HADRONIC_SPOTS = 50
LATERAL_SCALE = 1.0  # K_R, see the module docstring
LATERAL_TRUNCATION = 4.0  # r ≤ 4R
MOYAL_SCALE = 0.08  # relative width of the per-layer MIP loss (thin active layers: ξ/E_mp ≈ 0.05-0.1)
_MOYAL_MEAN = 0.5772156649015329 + math.log(2.0)


@dataclass(frozen=True)
class HadronProfile:
    alpha_em: np.ndarray
    beta_em: np.ndarray
    alpha_had: np.ndarray
    beta_had: np.ndarray


def profile_parameters(energy_gev: np.ndarray) -> HadronProfile:
    """HDShower (CMS FastSim) Gamma parameters of the EM (X0) and hadronic (λ) parts."""
    e = np.clip(energy_gev, *PARAMETER_ENERGY_RANGE_GEV)
    a = np.log((0.35 + 0.09 * np.log(e)) * e)
    low = energy_gev < 10.0
    return HadronProfile(
        np.where(low, 1.08 + 0.24 * a, 1.30 + 0.255 * a),
        np.where(low, 0.478 - 0.135 * a, 0.289 - 0.010 * a),
        np.where(low, 1.17 + 0.21 * a, 0.38 + 0.23 * a),
        np.where(low, 2.10 - 0.72 * a, 0.83 - 0.049 * a),
    )


def mean_em_fraction(energy_gev: np.ndarray, baryon: np.ndarray) -> np.ndarray:
    """⟨f_em⟩ = 1 − (E/E₀)^(k−1) (Wigmans/Gabriel), clipped to EM_FRACTION_CLIP."""
    e0 = np.where(baryon, EM_FRACTION_E0_BARYON_GEV, EM_FRACTION_E0_MESON_GEV)
    return np.clip(1.0 - np.power(energy_gev / e0, EM_FRACTION_K - 1.0), *EM_FRACTION_CLIP)


def draw_em_fraction(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """f_em ~ Beta(μκ, (1−μ)κ), κ = μ(1−μ)/σ² − 1, σ = min(0.12, √(μ(1−μ)/3))."""
    var_max = mean * (1.0 - mean)
    var = np.minimum(EM_FRACTION_SIGMA**2, var_max / 3.0)
    kappa = var_max / var - 1.0
    return rng.beta(mean * kappa, (1.0 - mean) * kappa)


@dataclass(frozen=True)
class HadronTruth:
    first_interaction_lambda: np.ndarray  # depth of the first interaction (λ_int from the calorimeter front)
    first_interaction_x0: np.ndarray  # the same in X0 (through dead layers)
    first_interaction_layer: np.ndarray  # mesh layer of it (n_z: punch-through)
    em_fraction: np.ndarray
    t_max_x0: np.ndarray  # T of the EM part, from the first interaction


def _track_segments(
    rng: np.random.Generator,
    stack: Stack,
    shower: np.ndarray,
    depth_lambda: np.ndarray,
    charged: np.ndarray,
    response: np.ndarray,
) -> tuple[Segments, np.ndarray]:
    """MIP track of charged hadrons up to the first interaction; returns the segments (one on-axis spot per
    layer) and the mean energy loss of each track (GeV)."""
    n, n_z = len(shower), stack.n_z
    z = rng.standard_normal((n, n_z))
    crossed = (depth_lambda[:, None] - stack.layer_edges_lambda[None, :-1]) / stack.layer_lambda[None, :]
    np.clip(crossed, 0.0, 1.0, out=crossed)
    crossed[~charged] = 0.0
    loss_mev = crossed * stack.mip_layer_mev[None, :]
    visible = crossed > 0.0
    visible[:, ~stack.layer_active] = False
    rows, cols = np.nonzero(visible)
    moyal = -np.log(np.maximum(np.square(z[rows, cols]), 1e-30))
    factor = (1.0 + MOYAL_SCALE * moyal) / (1.0 + MOYAL_SCALE * _MOYAL_MEAN)
    energy = loss_mev[rows, cols] * np.maximum(factor, 0.0) * stack.mip_calibration * response[rows]
    ones = np.ones(rows.size, dtype=np.int64)
    zeros = np.zeros(rows.size, dtype=np.float32)
    return Segments(shower[rows], cols.astype(np.int64), ones, zeros, zeros, energy), loss_mev.sum(
        axis=1
    ) / 1000.0


def _hadronic_part_segments(
    rng: np.random.Generator,
    stack: Stack,
    *,
    shower: np.ndarray,
    energy_gev: np.ndarray,
    start_lambda: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    c: np.ndarray,
    mev_per_gev: np.ndarray,
) -> Segments:
    """Spots of the hadronic part: a Gamma profile in λ from the first interaction, ≈ 0.2 GeV spots."""
    grid = stack.had_grid
    s = grid.edges[None, :] - start_lambda[:, None]
    np.maximum(s, 0.0, out=s)
    dp = np.diff(gammainc(alpha[:, None], beta[:, None] * s), axis=1)
    de = dp * energy_gev[:, None]
    de[:, ~grid.active] = 0.0
    rows, cols = np.nonzero(de > 0.0)
    if rows.size == 0:
        return Segments.empty()
    de = de[rows, cols]
    total_spots = np.maximum(MIN_HADRONIC_SPOTS, np.ceil(energy_gev / SPOT_ENERGY_GEV))
    n_k = np.maximum(1, np.floor(total_spots[rows] * dp[rows, cols])).astype(np.int64)
    c2 = np.square(c)[rows]
    fluct = c2 > 0
    de_vis = de.copy()
    de_vis[fluct] = rng.gamma(de[fluct] / c2[fluct], c2[fluct])
    depth = np.maximum(grid.mid[cols] - start_lambda[rows], 0.0)
    radius_mm = LATERAL_SCALE * (0.2 + 0.1 * np.minimum(depth, 6.0)) * (stack.lambda_cm * 10.0)
    umax = LATERAL_TRUNCATION**2 / (LATERAL_TRUNCATION**2 + 1.0)
    return Segments(
        shower[rows],
        grid.layer[cols],
        n_k,
        radius_mm.astype(np.float32),
        np.full(rows.size, umax, dtype=np.float32),
        de_vis * mev_per_gev[rows] / n_k,
    )


def hadron_showers(
    rng: np.random.Generator,
    stack: Stack,
    *,
    shower: np.ndarray,
    energy_gev: np.ndarray,
    pdg: np.ndarray,
    sin_theta: np.ndarray,
    response: np.ndarray,
) -> tuple[Segments, HadronTruth]:
    """Segments of hadron showers (track + EM part + hadronic part). ``response``: per-shower constant-term
    factor applied to all visible energy."""
    n = len(energy_gev)
    charged = np.isin(pdg, list(CHARGED_PDGS))
    baryon = np.isin(pdg, list(BARYON_PDGS))
    antibaryon = np.isin(pdg, list(ANTIBARYON_PDGS))
    _, fs, c_factor = stack.sin_theta_factors(sin_theta)

    depth_lambda = rng.exponential(1.0, size=n)
    track, track_gev = _track_segments(rng, stack, shower, depth_lambda, charged, response)
    f_em = draw_em_fraction(rng, mean_em_fraction(energy_gev, baryon))
    had_response = H_OVER_E * np.maximum(1.0 + RESPONSE_SIGMA * rng.standard_normal(n), 0.0)

    interacts = depth_lambda < stack.depth_lambda
    e_shower = np.where(interacts, np.maximum(energy_gev - track_gev, 0.0), 0.0)
    e_em = f_em * e_shower
    e_had = (1.0 - f_em) * e_shower + np.where(interacts & antibaryon, ANNIHILATION_GEV, 0.0)
    depth_x0 = stack.lambda_to_x0(depth_lambda)
    prof = profile_parameters(energy_gev)
    t_max_em = np.maximum((prof.alpha_em - 1.0) / prof.beta_em, 1.0)

    parts = [track]
    em = e_em > 0.0
    if em.any():
        parts.append(
            profile_segments(
                rng,
                stack,
                shower=shower[em],
                energy_gev=e_em[em],
                start_x0=depth_x0[em],
                alpha=prof.alpha_em[em],
                beta=prof.beta_em[em],
                t_max=t_max_em[em],
                spot_alpha=prof.alpha_em[em],
                spot_beta=prof.beta_em[em],
                spots=n_spots(e_em[em], stack, stack.c_em * c_factor[em]),
                c=stack.c_em * c_factor[em],
                fs=fs[em],
                mev_per_gev=1000.0 * response[em],
            )
        )
    had = e_had > 0.0
    if had.any():
        parts.append(
            _hadronic_part_segments(
                rng,
                stack,
                shower=shower[had],
                energy_gev=e_had[had],
                start_lambda=depth_lambda[had],
                alpha=prof.alpha_had[had],
                beta=prof.beta_had[had],
                c=stack.c_had * c_factor[had],
                mev_per_gev=1000.0 * response[had] * had_response[had],
            )
        )
    truth = HadronTruth(
        first_interaction_lambda=depth_lambda,
        first_interaction_x0=np.where(interacts, depth_x0, np.inf),
        first_interaction_layer=np.minimum(stack.layer_of_lambda(depth_lambda), stack.n_z),
        em_fraction=np.where(interacts, f_em, 0.0),
        t_max_x0=t_max_em,
    )
    return Segments.concat(parts), truth
