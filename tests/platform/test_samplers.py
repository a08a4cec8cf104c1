"""Samplers: convergence order on an analytic ODE, EDM Algorithm 1 equivalence, evaluation counts."""

from __future__ import annotations

import math

import pytest
import torch

from caloforge.platform.denoisers import edm_sigma_grid
from caloforge.platform.samplers import SAMPLERS, get_sampler

EXPECTED_ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def analytic_velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
    """dx/dt = cos(t)·x, solved by x(t) = x(t0)·exp(sin t − sin t0). ``cond`` must pass through untouched."""
    assert cond == "untouched"
    return torch.cos(t)[:, None, None, None] * x


def integrate(name: str, t0: float, t1: float, steps: int) -> float:
    x0 = torch.full((1, 1, 1, 1), 1.5, dtype=torch.float64)
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    x = SAMPLERS[name](analytic_velocity, x0, grid, "untouched")
    exact = 1.5 * math.exp(math.sin(t1) - math.sin(t0))
    return abs(float(x) - exact)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize(("t0", "t1"), [(0.0, 2.0), (2.0, 0.0)])  # forward (FM) and backward (EDM) in time
def test_convergence_order(name: str, t0: float, t1: float) -> None:
    n = 8 if name == "rk4" else 32
    coarse, fine = integrate(name, t0, t1, n), integrate(name, t0, t1, 2 * n)
    order = math.log2(coarse / fine)
    assert order == pytest.approx(EXPECTED_ORDER[name], abs=0.25)
    assert SAMPLERS[name].order == EXPECTED_ORDER[name]


def edm_algorithm_1(denoise, x_T: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 (deterministic sampler, σ(t) = t, s(t) = 1), written independently."""
    x = x_T
    for i in range(len(sigmas) - 1):
        t_i, t_next = sigmas[i], sigmas[i + 1]
        d_i = (x - denoise(x, t_i)) / t_i
        x_next = x + (t_next - t_i) * d_i
        if t_next != 0:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_i) * (0.5 * d_i + 0.5 * d_prime)
        x = x_next
    return x


def test_heun_on_the_edm_grid_is_edm_algorithm_1() -> None:
    s_data = 0.5

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:  # exact denoiser for N(0, s_data² I) data
        return x * s_data**2 / (sigma**2 + s_data**2)

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        sigma = t[:, None, None, None]
        return (x - x * s_data**2 / (sigma**2 + s_data**2)) / sigma

    grid = edm_sigma_grid(18, 0.002, 80.0, 7.0)
    noise = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = SAMPLERS["heun"](velocity, noise * 80.0, grid, None, final_singular=True)
    reference = edm_algorithm_1(denoise, noise * 80.0, grid.tolist())
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    # The probability-flow ODE keeps x/√(σ² + s²) constant: the exact end point is noise·s·80/√(80² + s²),
    # and Heun on the ρ = 7 grid converges to it at 2nd order.
    exact = noise * s_data * 80.0 / math.sqrt(80.0**2 + s_data**2)
    errors = [
        float(
            (
                SAMPLERS["heun"](
                    velocity, noise * 80.0, edm_sigma_grid(n, 0.002, 80.0, 7.0), None, final_singular=True
                )
                - exact
            )
            .abs()
            .max()
        )
        for n in (36, 72)
    ]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(2.0, abs=0.3)
    assert errors[1] < 5e-3


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("final_singular", [False, True])
def test_evaluation_counts_and_no_evaluation_at_a_singular_end(name: str, final_singular: bool) -> None:
    times: list[float] = []

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        times.append(float(t[0]))
        return -x

    steps = 5
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    SAMPLERS[name](
        velocity, torch.ones(2, 1, 1, 1, dtype=torch.float64), grid, None, final_singular=final_singular
    )
    per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[name]
    expected = per_step * steps - (per_step - 1) * final_singular
    assert len(times) == expected == SAMPLERS[name].nfe(steps, final_singular)
    assert (0.0 in times) == (name in ("heun", "rk4") and not final_singular)


def test_unknown_sampler_and_bad_grid() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown sampler 'dpm' \(known: \['bespoke', 'consistency', 'euler', 'heun', 'midpoint', "
        r"'rk4', 'shortcut'\]\)",
    ):
        get_sampler("dpm")
    with pytest.raises(ValueError, match="at least 2 points"):
        SAMPLERS["euler"](analytic_velocity, torch.ones(1, 1, 1, 1), [0.0], "untouched")
