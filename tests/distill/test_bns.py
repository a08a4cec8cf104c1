"""Bespoke solvers: the fit recovers a known solver on a linear ODE; coefficients round-trip a bundle."""

from __future__ import annotations

import math

import pytest
import torch

from caloforge.distill.bns import fit_bespoke, polynomial_of_solver
from caloforge.platform.samplers import BespokeSolver, bespoke_solve, get_sampler


def linear_problem(dim: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)

    def velocity(x, t, cond):
        return x @ m.T

    pairs = []
    for _ in range(2):
        x0 = torch.randn(16, 1, 1, dim, generator=gen, dtype=torch.float64)
        pairs.append((x0, None, None))
    return velocity, pairs


@pytest.mark.parametrize(
    ("n", "reference", "poly"), [(4, "rk4", [1, 1, 1 / 2, 1 / 6, 1 / 24]), (2, "heun", [1, 1, 1 / 2])]
)
def test_bns_recovers_a_known_solver_on_a_linear_ode(n: int, reference: str, poly: list[float]) -> None:
    """dx/dt = M x from t = 0 to 1; the reference is one step of ``reference`` (exactly an n-evaluation
    member of the family); the fitted solver's polynomial P(M) equals the reference's."""
    velocity, starts = linear_problem()
    ref_solver = get_sampler(reference)
    pairs = [(x0, ref_solver(velocity, x0, [0.0, 1.0], None), None) for x0, _, _ in starts]
    init = BespokeSolver.euler(torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64))
    assert init.n_coefficients == n * (n + 5) // 2 + 1
    euler_poly = polynomial_of_solver(init)
    assert euler_poly[n] == pytest.approx(1 / n**n)  # Euler's n-step polynomial (1 + M/n)^n
    fit = fit_bespoke(velocity, pairs, init, iterations=300, lr=5e-2, learn_times=False)
    learned = polynomial_of_solver(fit.solver)
    assert learned == pytest.approx(poly, abs=1e-3)
    assert fit.rmse_final < 0.02 * fit.rmse_init
    # the stored coefficients reproduce the reference through the sampler path
    x0, ref, _ = pairs[0]
    out = bespoke_solve(velocity, x0, fit.solver.times, fit.solver.a, fit.solver.b, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-3)


def test_bespoke_solver_validation() -> None:
    with pytest.raises(ValueError, match=r"b\[1\] must have 2 entries"):
        BespokeSolver(2, (0.0, 0.5, 1.0), (1.0, 1.0), ((0.5,), (0.5,)))
    with pytest.raises(ValueError, match="strictly monotone"):
        BespokeSolver(2, (0.0, 1.0, 0.5), (1.0, 1.0), ((0.5,), (0.5, 0.5)))
    with pytest.raises(ValueError, match="need 3 times"):
        BespokeSolver(2, (0.0, 1.0), (1.0, 1.0), ((0.5,), (0.5, 0.5)))
    euler = BespokeSolver.euler([80.0, 10.0, 0.0])
    assert euler.b == ((-70.0,), (-70.0, -10.0)) and euler.a == (1.0, 1.0)
