"""Electromagnetic showers (e⁻, e⁺, γ): the GFlash parameterisation (docs/simulator.md §2).

Grindhammer & Peters, hep-ex/0001020 (GP), as implemented in Geant4 GFlash (GFlashHomoShowerParameterisation,
GFlashSamplingShowerParameterisation) and CMS FastSim (EMECALShowerParametrization.h); E in GeV, t in X0,
r in Molière radii, y = E/E_c, P(a, x) = ``scipy.special.gammainc``.

Longitudinal profile (GP eq. 2): (1/E) dE/dt = β(βt)^(α−1) e^(−βt)/Γ(α), T = (α−1)/β.
- homogeneous (GP eq. 5-8): ⟨ln T⟩ = ln(ln y − 0.812), ⟨ln α⟩ = ln(0.81 + (0.458 + 2.26/Z) ln y),
  σ(ln T) = 1/(−1.4 + 1.26 ln y), σ(ln α) = 1/(−0.58 + 0.86 ln y), ρ = 0.705 − 0.023 ln y;
- sampling (GP eq. 13-16, Z = Z_eff, E_c = E_c,eff): ⟨ln T⟩ = ln(e^⟨ln T⟩hom − 0.55/F_S − 0.69(1−ê)),
  ⟨ln α⟩ = ln(e^⟨ln α⟩hom − 0.476/F_S), σ(ln T) = 1/(−2.5 + 1.25 ln y), σ(ln α) = 1/(−0.82 + 0.79 ln y),
  ρ = 0.784 − 0.023 ln y;
- correlated draw: ln T = ⟨ln T⟩ + σ_T(a₊z₁ + a₋z₂), ln α = ⟨ln α⟩ + σ_α(a₊z₁ − a₋z₂), a± = √((1±ρ)/2),
  redrawn while α ≤ 1; guards (Geant4 GFlashSamplingShowerParameterisation): σ ≤ 0.5, log arguments ≥ 0.1,
  T ≥ 1; β = (α−1)/T. Photons convert after t₀ ~ Exp(mean 9/7 X0); e± start at the front of the dead material.

Radial profile (GP eq. 23-29) at τ = t/T (mid-step, capped at 10 as in CMS Gflash):
f(r) = p·2rR_C²/(r²+R_C²)² + (1−p)·2rR_T²/(r²+R_T²)², with R_C = z₁ + z₂τ,
R_T = k₁[e^(k₃(τ−k₂)) + e^(k₄(τ−k₂))], p = p₁ exp[(p₂−τ)/p₃ − exp((p₂−τ)/p₃)] and the sampling corrections of
GP eq. 30-32; core vs tail per spot, radius capped (truncated) at 10 R_M.

Spots (GP §4): N_S = 93 ln(Z) E^0.876 (homogeneous) or (10.3/c) E^0.959 (sampling) following a Gamma
profile with T_S = T̄(0.698 + 0.00212 Z), α_S = ᾱ(0.639 + 0.00334 Z), T̄ = ln y − 0.858,
ᾱ = 0.21 + (0.492 + 2.38/Z) ln y; per step N_k = max(1, ⌊N_S ΔP_S⌋); the step energy ΔE_k = E ΔP gets the
sampling fluctuation ΔE'_k ~ Gamma(ΔE_k/c², c²) (GeV, so that σ/E = c/√E; Geant4
GFlashSamplingShowerParameterisation::ApplySampling).
The core/tail choice of the N_k spots of a step is drawn as one Binomial(N_k, p) (the same law as N_k
Bernoulli draws: spots of a step are exchangeable in the mesh).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc

from caloforge.datasets.simulator.deposit import Segments, truncation_umax
from caloforge.datasets.simulator.stack import Stack

PHOTON_CONVERSION_X0 = 9.0 / 7.0  # mean conversion depth of a photon, X0
EM_RADIUS_CAP_RM = 10.0  # radial draws truncated at 10 Molière radii
TAU_CAP = 10.0  # CMS Gflash caps τ = t/T at 10
MAX_REDRAWS = 100


@dataclass(frozen=True)
class LongitudinalLaw:
    """Per-shower means, widths and correlation of (ln T, ln α)."""

    mean_ln_t: np.ndarray
    mean_ln_alpha: np.ndarray
    sigma_ln_t: np.ndarray
    sigma_ln_alpha: np.ndarray
    rho: np.ndarray


def _inverse_width(denominator: np.ndarray) -> np.ndarray:
    """σ = 1/denominator, capped at 0.5 (and 0.5 where the formula breaks down, denominator ≤ 2)."""
    with np.errstate(divide="ignore"):
        sigma = np.where(denominator > 2.0, 1.0 / np.maximum(denominator, 2.0), 0.5)
    return np.minimum(sigma, 0.5)


def longitudinal_law(
    ln_y: np.ndarray, z: float, fs: np.ndarray, e_hat: float, homogeneous: bool
) -> LongitudinalLaw:
    """GP eq. 5-8 (homogeneous) or eq. 13-16 (sampling, with F_S per shower: F_S·sin θ)."""
    t_hom = np.maximum(ln_y - 0.812, 0.1)
    a_hom = np.maximum(0.81 + (0.458 + 2.26 / z) * ln_y, 0.1)
    if homogeneous:
        return LongitudinalLaw(
            np.log(t_hom),
            np.log(a_hom),
            _inverse_width(-1.4 + 1.26 * ln_y),
            _inverse_width(-0.58 + 0.86 * ln_y),
            np.clip(0.705 - 0.023 * ln_y, -1.0, 1.0),
        )
    return LongitudinalLaw(
        np.log(np.maximum(t_hom - 0.55 / fs - 0.69 * (1.0 - e_hat), 0.1)),
        np.log(np.maximum(a_hom - 0.476 / fs, 0.1)),
        _inverse_width(-2.5 + 1.25 * ln_y),
        _inverse_width(-0.82 + 0.79 * ln_y),
        np.clip(0.784 - 0.023 * ln_y, -1.0, 1.0),
    )


def draw_alpha_t(rng: np.random.Generator, law: LongitudinalLaw) -> tuple[np.ndarray, np.ndarray]:
    """Correlated (α, T) per shower; redraw while α ≤ 1 (at most MAX_REDRAWS times, then α = 1.1)."""
    n = len(law.mean_ln_t)
    a_plus = np.sqrt((1.0 + law.rho) / 2.0)
    a_minus = np.sqrt((1.0 - law.rho) / 2.0)
    ln_t = np.empty(n)
    ln_a = np.empty(n)
    todo = np.arange(n)
    for _ in range(MAX_REDRAWS):
        z1, z2 = rng.standard_normal((2, len(todo)))
        ln_t[todo] = law.mean_ln_t[todo] + law.sigma_ln_t[todo] * (a_plus[todo] * z1 + a_minus[todo] * z2)
        ln_a[todo] = law.mean_ln_alpha[todo] + law.sigma_ln_alpha[todo] * (
            a_plus[todo] * z1 - a_minus[todo] * z2
        )
        todo = todo[ln_a[todo] <= 0.0]
        if todo.size == 0:
            break
    alpha = np.exp(ln_a)
    alpha[todo] = 1.1
    return alpha, np.maximum(np.exp(ln_t), 1.0)


def spot_profile(ln_y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """(α_S, β_S) of the spot profile from the average T̄, ᾱ (GP §4; CMS EMECALShowerParametrization)."""
    t_avg = ln_y - 0.858
    a_avg = 0.21 + (0.492 + 2.38 / z) * ln_y
    t_s = np.maximum(t_avg * (0.698 + 0.00212 * z), 0.5)
    a_s = np.maximum(a_avg * (0.639 + 0.00334 * z), 1.1)
    return a_s, (a_s - 1.0) / t_s


def n_spots(energy_gev: np.ndarray, stack: Stack, c: np.ndarray) -> np.ndarray:
    """N_S = 93 ln(Z) E^0.876 (homogeneous) or (10.3/c) E^0.959 (sampling)."""
    if stack.homogeneous:
        return 93.0 * np.log(stack.z_eff) * np.power(energy_gev, 0.876)
    return (10.3 / c) * np.power(energy_gev, 0.959)


def radial_parameters(
    tau: np.ndarray, ln_e: np.ndarray, stack: Stack, fs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R_C, R_T) in R_M and the core probability p at τ (GP eq. 23-32; k₄ slope 0.0421 as in CMS)."""
    z = stack.z_eff
    r_core = (0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z) * tau
    k4 = 0.3585 + 0.0421 * ln_e
    r_tail = (0.659 - 0.00309 * z) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    p2 = 0.401 + 0.00187 * z
    p3 = 1.313 - 0.0686 * ln_e
    x = (p2 - tau) / p3
    p = (2.632 - 0.00094 * z) * np.exp(x - np.exp(x))
    if not stack.homogeneous:
        one_m_e = 1.0 - stack.e_hat
        e_tau = np.exp(-tau) / fs
        r_core += -0.0203 * one_m_e + 0.0397 * e_tau
        r_tail += -0.14 * one_m_e - 0.495 * e_tau
        p += one_m_e * (0.348 - 0.642 * np.exp(-np.square(tau - 1.0)) / fs)
    return np.maximum(r_core, 1e-3), np.maximum(r_tail, 1e-3), np.clip(p, 0.0, 1.0)


def profile_segments(
    rng: np.random.Generator,
    stack: Stack,
    *,
    shower: np.ndarray,
    energy_gev: np.ndarray,
    start_x0: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    t_max: np.ndarray,
    spot_alpha: np.ndarray,
    spot_beta: np.ndarray,
    spots: np.ndarray,
    c: np.ndarray,
    fs: np.ndarray,
    mev_per_gev: np.ndarray,
) -> Segments:
    """Spots of EM (sub)showers, one row per shower (GP §4 longitudinal loop, vectorised over showers and
    steps). ``start_x0``: calorimeter depth (X0) where the shower starts (t = 0; negative inside the dead
    material in front, whose energy is lost); ``t_max``: this shower's T (τ = t/T); ``spots``: N_S;
    ``c``: stochastic term (√GeV; 0 = no fluctuation); ``fs``: F_S·sin θ; ``mev_per_gev``: calibrated MeV
    per GeV deposited (1000 × per-shower response factors)."""
    grid = stack.em_grid
    t = grid.edges[None, :] - start_x0[:, None]
    np.maximum(t, 0.0, out=t)
    de = np.diff(gammainc(alpha[:, None], beta[:, None] * t), axis=1)
    de *= energy_gev[:, None]
    de[:, ~grid.active] = 0.0  # dead layers: no readout (and no spots needed)
    rows, cols = np.nonzero(de > 0.0)
    if rows.size == 0:
        return Segments.empty()
    de = de[rows, cols]
    dps = np.diff(gammainc(spot_alpha[:, None], spot_beta[:, None] * t), axis=1)[rows, cols]
    n_k = np.maximum(1, np.floor(spots[rows] * dps)).astype(np.int64)
    c2 = np.square(c)[rows]
    fluct = c2 > 0
    de_vis = de.copy()
    de_vis[fluct] = rng.gamma(de[fluct] / c2[fluct], c2[fluct])
    tau = np.minimum(np.maximum(grid.mid[cols] - start_x0[rows], 0.0) / t_max[rows], TAU_CAP)
    ln_e = np.log(np.maximum(energy_gev, 0.01))[rows]  # tiny EM parts of hadron showers stay sane
    r_core, r_tail, p_core = radial_parameters(tau, ln_e, stack, fs[rows])
    n_core = rng.binomial(n_k, p_core)
    e_spot = de_vis * mev_per_gev[rows] / n_k
    sh = shower[rows]
    layer = grid.layer[cols]
    core = Segments(
        sh,
        layer,
        n_core,
        (r_core * stack.rm_mm).astype(np.float32),
        truncation_umax(r_core, EM_RADIUS_CAP_RM).astype(np.float32),
        e_spot,
    )
    tail = Segments(
        sh,
        layer,
        n_k - n_core,
        (r_tail * stack.rm_mm).astype(np.float32),
        truncation_umax(r_tail, EM_RADIUS_CAP_RM).astype(np.float32),
        e_spot,
    )
    return Segments.interleave(core, tail)


@dataclass(frozen=True)
class EMTruth:
    start_x0: np.ndarray  # calorimeter depth of the shower start (X0; < 0 inside the front dead material)
    t_max_x0: np.ndarray  # depth of maximum T of this shower, from its start
    alpha: np.ndarray


def em_showers(
    rng: np.random.Generator,
    stack: Stack,
    *,
    shower: np.ndarray,
    energy_gev: np.ndarray,
    is_photon: np.ndarray,
    sin_theta: np.ndarray,
    response: np.ndarray,
) -> tuple[Segments, EMTruth]:
    """Segments of e±/γ showers. ``response``: per-shower multiplicative factor (constant term)."""
    front, fs, c_factor = stack.sin_theta_factors(sin_theta)
    c = stack.c_em * c_factor
    ln_y = np.log(energy_gev / stack.ec_gev)
    law = longitudinal_law(ln_y, stack.z_eff, fs, stack.e_hat, stack.homogeneous)
    alpha, t_max = draw_alpha_t(rng, law)
    beta = (alpha - 1.0) / t_max
    t0 = rng.exponential(PHOTON_CONVERSION_X0, size=len(energy_gev))
    start = np.where(is_photon, t0, 0.0) - front
    spot_alpha, spot_beta = spot_profile(ln_y, stack.z_eff)
    segments = profile_segments(
        rng,
        stack,
        shower=shower,
        energy_gev=energy_gev,
        start_x0=start,
        alpha=alpha,
        beta=beta,
        t_max=t_max,
        spot_alpha=spot_alpha,
        spot_beta=spot_beta,
        spots=n_spots(energy_gev, stack, c),
        c=c,
        fs=fs,
        mev_per_gev=1000.0 * response,
    )
    return segments, EMTruth(start, t_max, alpha)
