"""Denoisers: EDM preconditioning constants (Karras et al. 2022, Table 1), grids, priors, velocities."""

from __future__ import annotations

import math

import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.denoisers import NOISE_LABEL_SCALE, EDMDenoiser, FlowMatchingDenoiser, edm_sigma_grid


class Capture:
    """Records the backbone's inputs and output through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inputs: tuple = ()
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, inputs, output) -> None:
        self.inputs, self.output = inputs, output


@pytest.mark.parametrize(
    ("sigma", "c_skip", "c_out", "c_in", "c_noise"),
    [
        # σ = σ_data = 0.5: c_skip = ½, c_out = σ_d/√2, c_in = 1/(σ_d√2), c_noise = ln(0.5)/4.
        (0.5, 0.5, 0.35355339059327373, 1.4142135623730951, -0.17328679513998632),
        # σ = σ_max = 80: c_skip = 0.25/6400.25, c_out = 40/√6400.25, c_in = 1/√6400.25, c_noise = ln 80 / 4.
        (80.0, 3.906097418069607e-05, 0.49999023466109294, 0.012499755866527323, 1.0955066586684703),
        # σ = σ_min = 0.002.
        (0.002, 0.9999840002559959, 0.0019999840001919972, 1.9999840001919975, -1.5536520246055479),
    ],
)
def test_edm_preconditioning_matches_the_paper(sigma, c_skip, c_out, c_in, c_noise) -> None:
    model = make_model("edm", scramble=False)
    denoiser = model.denoiser
    assert isinstance(denoiser, EDMDenoiser) and denoiser.sigma_data == 0.5
    got = denoiser.preconditioning(torch.tensor([sigma], dtype=torch.float64))
    for value, expected in zip(got, (c_skip, c_out, c_in, c_noise), strict=True):
        assert float(value) == pytest.approx(expected, rel=1e-8)
    # λ(σ) = (σ² + σ_d²)/(σ σ_d)² makes the effective weight of the network's error λ c_out² = 1.
    weight = denoiser.loss_weight(torch.tensor([sigma], dtype=torch.float64))
    assert float(weight) == pytest.approx((sigma**2 + 0.25) / (sigma * 0.5) ** 2, rel=1e-12)
    assert float(weight * got[1] ** 2) == pytest.approx(1.0, rel=1e-12)


def test_edm_forward_is_preconditioned_network_and_velocity_is_the_ode() -> None:
    model = make_model("edm")
    showers, cond = toy_showers(3, SMALL_MESH, seed=4)
    x = model.to_model_space(showers)
    ct = model.encode_conditions(cond)
    sigma = torch.tensor([0.01, 0.7, 30.0])
    capture = Capture(model.network)
    with torch.no_grad():
        denoised = model(x, sigma, ct)
        c_skip, c_out, c_in, _ = model.denoiser.preconditioning(sigma)
        net_in, label = capture.inputs[0], capture.inputs[1]
        torch.testing.assert_close(net_in, c_in[:, None, None, None] * x)
        torch.testing.assert_close(label, NOISE_LABEL_SCALE * torch.log(sigma) / 4)
        expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * capture.output
        torch.testing.assert_close(denoised, expected)
        torch.testing.assert_close(model.velocity(x, sigma, ct), (x - denoised) / sigma[:, None, None, None])
    capture.handle.remove()


def test_flow_matching_forward_is_the_velocity_with_1000t_label() -> None:
    model = make_model("flow_matching")
    showers, cond = toy_showers(2, SMALL_MESH, seed=4)
    x, ct = model.to_model_space(showers), model.encode_conditions(cond)
    capture = Capture(model.network)
    with torch.no_grad():
        v = model(x, torch.tensor([0.25, 0.75]), ct)
        torch.testing.assert_close(capture.inputs[1], torch.tensor([250.0, 750.0]))
        torch.testing.assert_close(capture.inputs[0], x)
        torch.testing.assert_close(model.velocity(x, torch.tensor([0.25, 0.75]), ct), v)
        torch.testing.assert_close(model.velocity(x, torch.tensor(0.25), ct)[0], v[0])
    capture.handle.remove()


def test_time_grids_and_priors() -> None:
    grid = edm_sigma_grid(32, 0.002, 80.0, 7.0)
    assert grid.dtype == torch.float64 and grid.shape == (33,)
    assert float(grid[0]) == pytest.approx(80.0) and float(grid[31]) == pytest.approx(0.002)
    assert float(grid[32]) == 0.0 and bool((grid[1:] < grid[:-1]).all())
    assert float(grid[16]) == pytest.approx(2.1738597961891104, rel=1e-12)  # Eq. 5 at i = 16, ρ = 7
    torch.testing.assert_close(
        edm_sigma_grid(1, 0.002, 80.0, 7.0), torch.tensor([80.0, 0.0], dtype=torch.float64)
    )

    fm = make_model("flow_matching", scramble=False).denoiser
    edm = make_model("edm", scramble=False).denoiser
    assert isinstance(fm, FlowMatchingDenoiser) and not fm.final_singular and edm.final_singular
    torch.testing.assert_close(
        fm.time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(edm.time_grid(32), grid)
    noise = torch.randn(2, *SMALL_MESH)
    torch.testing.assert_close(fm.prior(noise), noise)
    torch.testing.assert_close(edm.prior(noise), noise * 80.0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
            fm.time_grid(bad)


def test_edm_config_validation_names_the_field() -> None:
    net = make_model("edm", scramble=False).network
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        EDMDenoiser(net, sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMDenoiser(net, sigma_min=1.0, sigma_max=0.5)
    assert math.isclose(EDMDenoiser(net).options()["rho"], 7.0)
    model = make_model("edm", scramble=False)
    with pytest.raises(ValueError, match=r"time must be a scalar or shape \(2,\)"):
        model(
            torch.zeros(2, *SMALL_MESH),
            torch.ones(3),
            model.encode_conditions(toy_showers(2, SMALL_MESH, 0)[1]),
        )
