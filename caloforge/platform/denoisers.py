"""Denoisers: what turns the backbone into a probability-flow ODE. Both expose ``velocity(x, t, cond)``.

**The common time convention.** Each denoiser integrates in its *native* time and hands samplers the grid:

- ``time_grid(num_steps)`` → float64 (num_steps + 1,) from the noise end to the data end;
- ``prior(noise_BZPR)`` → the starting point x(t_grid[0]) from standard normal noise;
- ``velocity(x_BZPR, t_B, cond)`` → dx/dt at time t in that convention;
- ``final_singular``: True when ``velocity`` is undefined at t_grid[-1] (EDM σ = 0); samplers then take a
  plain Euler step into it (EDM Algorithm 1, line 9: x_N = D(x; σ_{N−1})).

A sampler step from t_i to t_{i+1} uses h = t_{i+1} − t_i, which is positive for flow matching and negative
for EDM; nothing else differs, so one set of samplers serves both.

**Flow matching** (Lipman et al. 2023, "Flow Matching for Generative Modeling", Eq. 20–23 with σ_min = 0;
the rectified-flow / linear path of Liu et al. 2023). t ∈ [0, 1], t = 0 noise, t = 1 data;
x_t = (1 − t) x_0 + t x_1; the network output *is* the velocity v(x_t, t) ≈ E[x_1 − x_0 | x_t].
Grid: uniform t_i = i/N. Noise label of the backbone: 1000·t (DiT's timestep scale).

**EDM** (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Table 1 and §5): time is the noise level t = σ (σ(t) = t, s(t) = 1), from σ_max (noise) down to 0 (data).
Preconditioning D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) with
c_skip = σ_data² / (σ² + σ_data²), c_out = σ σ_data / √(σ² + σ_data²), c_in = 1 / √(σ² + σ_data²),
c_noise = ¼ ln σ (backbone noise label 1000·c_noise). ODE (Eq. 4 with σ(t) = t): dx/dσ = (x − D(x; σ)) / σ.
Grid (Eq. 5): σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, σ_N = 0.
``forward`` returns D (what the EDM loss compares to the clean sample).

**Consistency models** (Song et al. 2023, "Consistency Models", Appendix C; as CaloDiT-2 and CaloClouds II):
a one/few-step student's *parametrisation*, the consistency function f(x, t) that maps any point of a
teacher's ODE trajectory to its data end, with the boundary condition f(x, t_data) = x built in.

- ``consistency`` (EDM time, σ from σ_max to σ_min; teachers parametrised ``edm``): EDM's c_in and c_noise
  (so a student starts from its EDM teacher's weights) with c_skip = σ_data² / ((σ − σ_min)² + σ_data²),
  c_out = σ_data (σ − σ_min) / √(σ² + σ_data²): c_skip(σ_min) = 1, c_out(σ_min) = 0, so f(x, σ_min) = x.
- ``consistency_fm`` (flow-matching time t ∈ [0, 1]; teachers parametrised ``flow_matching``):
  f(x_t, t) = x_t + (1 − t) F(x_t, 1000·t), so f(x, 1) = x and, initialised from a flow-matching teacher,
  f is exactly the teacher's Euler jump to t = 1.

Both expose ``velocity`` = what the ``euler`` step to the grid end turns into f (EDM: (x − f)/σ; FM:
F = (f − x)/(1 − t)), so every sampler still runs on them; the ``consistency`` sampler (multistep
consistency sampling, ``samplers/consistency.py``) is their own. ``cd_levels(N)`` is the N-level
discretisation of consistency distillation (boundary first), ``noisy(x_1, z, t)`` the forward process.

**Shortcut models** (Frans et al. 2025, "One Step Diffusion via Shortcut Models"; the one-network route for
flow-matching teachers, docs/distillation.md): ``shortcut`` (flow-matching time) is *step-conditioned*
(``step_conditioned = True``): the backbone also takes the step size d (label 1000·d, ``ShowerDiT``'s
``step_embedder``) and outputs the average velocity u(x_t, t, d) over [t, t + d], so x_{t+d} ≈ x_t + d u;
d = 0 (the default) is the instantaneous velocity, so ``velocity`` without a step serves the ODE samplers,
and the ``shortcut`` sampler (``samplers/shortcut.py``) steps x + h u(x, t, h). MeanFlow's average velocity
u(z, r, t) is the same function with d = t − r.

Shape legend: B batch, Z layers, P angular bins, R radial bins, T tokens, C coordinate channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caloforge.platform.backbone import ShowerDiT
from caloforge.platform.conditioning import ConditionTensors

NOISE_LABEL_SCALE = 1000.0


@dataclass(frozen=True)
class EDMPrecondConfig:
    """The model-side EDM settings (``ShowerModelConfig.edm``): the preconditioning's σ_data and the
    sampling grid (σ_min, σ_max, ρ). The training noise distribution is the objective's
    (``objectives.EDMLossConfig``)."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"edm.sigma_data must be > 0, got {self.sigma_data}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"edm: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not self.rho > 0:
            raise ValueError(f"edm.rho must be > 0, got {self.rho}")


def as_batch_time(t: torch.Tensor | float, x_BZPR: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) time to (B,) float32 on ``x``'s device."""
    t_B = torch.as_tensor(t, dtype=torch.float32, device=x_BZPR.device)
    if t_B.ndim == 0:
        return t_B.expand(x_BZPR.shape[0])
    if t_B.shape != (x_BZPR.shape[0],):
        raise ValueError(f"time must be a scalar or shape ({x_BZPR.shape[0]},), got {tuple(t_B.shape)}")
    return t_B


def edm_sigma_grid(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """float64 (num_steps + 1,): σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then
    σ_N = 0 (Karras et al. 2022, Eq. 5; N = 1 gives [σ_max, 0])."""
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


class Denoiser(nn.Module):
    """Base class: wraps the backbone as ``self.net`` (so state-dict keys do not depend on the kind)."""

    kind: str = ""
    final_singular: bool = False
    # True for the parametrisations whose network takes a step-size label too (``ShowerDiT.step_condition``).
    step_conditioned: bool = False

    def __init__(self, net: ShowerDiT) -> None:
        super().__init__()
        self.net = net

    @classmethod
    def from_config(cls, net: ShowerDiT, edm: EDMPrecondConfig) -> Denoiser:
        """The denoiser of a ``ShowerModelConfig`` (``parametrisation`` picks the class; kinds without
        options ignore ``edm``)."""
        return cls(net)

    def forward(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward")

    def velocity(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define velocity")

    def time_grid(self, num_steps: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define time_grid")

    def prior(self, noise_BZPR: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define prior")

    def options(self) -> dict[str, float]:
        """Hyper-parameters (for logs and benchmark records)."""
        return {}

    @staticmethod
    def _check_steps(num_steps: int) -> int:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        return num_steps


class FlowMatchingDenoiser(Denoiser):
    """Linear-path conditional flow matching: the network predicts v = x_1 − x_0 (t = 0 noise, 1 data)."""

    kind = "flow_matching"
    final_singular = False

    def forward(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t_B = as_batch_time(t_B, x_BZPR)
        return self.net(x_BZPR, NOISE_LABEL_SCALE * t_B, cond, coords_TC)

    def velocity(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward(x_BZPR, t_B, cond, coords_TC)

    def time_grid(self, num_steps: int) -> torch.Tensor:
        n = self._check_steps(num_steps)
        return torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)

    def prior(self, noise_BZPR: torch.Tensor) -> torch.Tensor:
        return noise_BZPR

    def noisy(self, x1_BZPR: torch.Tensor, noise_BZPR: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t) x_0 + t x_1 on the linear path (x_0 = ``noise_BZPR``)."""
        t_b = t_B[:, None, None, None].to(x1_BZPR.dtype)
        return (1.0 - t_b) * noise_BZPR + t_b * x1_BZPR


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1); time is σ, from σ_max to 0."""

    kind = "edm"
    final_singular = True

    def __init__(
        self,
        net: ShowerDiT,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ) -> None:
        super().__init__(net)
        self.configure(sigma_data, sigma_min, sigma_max, rho)

    @classmethod
    def from_config(cls, net: ShowerDiT, edm: EDMPrecondConfig) -> EDMDenoiser:
        return cls(net, edm.sigma_data, edm.sigma_min, edm.sigma_max, edm.rho)

    def configure(self, sigma_data: float, sigma_min: float, sigma_max: float, rho: float) -> None:
        """Set σ_data (preconditioning) and the sampling grid (σ_min, σ_max, ρ)."""
        EDMPrecondConfig(sigma_data, sigma_min, sigma_max, rho)  # validates
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)

    def preconditioning(
        self, sigma_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1, each shaped like ``sigma_B``."""
        sd = self.sigma_data
        var = sigma_B**2 + sd**2
        c_skip = sd**2 / var
        c_out = sigma_B * sd / var.sqrt()
        c_in = 1.0 / var.sqrt()
        c_noise = sigma_B.log() / 4.0
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D(x; σ) with σ = ``t_B``."""
        sigma_B = as_batch_time(t_B, x_BZPR)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma_B)
        f_BZPR = self.net(c_in[:, None, None, None] * x_BZPR, NOISE_LABEL_SCALE * c_noise, cond, coords_TC)
        return c_skip[:, None, None, None] * x_BZPR + c_out[:, None, None, None] * f_BZPR.float()

    def velocity(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, Eq. 4 with σ(t) = t, s(t) = 1)."""
        sigma_B = as_batch_time(t_B, x_BZPR)
        denoised = self.forward(x_BZPR, sigma_B, cond, coords_TC)
        return (x_BZPR - denoised) / sigma_B[:, None, None, None]

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """Karras et al. 2022, Eq. 5: N noise levels from σ_max to σ_min with ρ spacing, then 0."""
        return edm_sigma_grid(self._check_steps(num_steps), self.sigma_min, self.sigma_max, self.rho)

    def prior(self, noise_BZPR: torch.Tensor) -> torch.Tensor:
        return noise_BZPR * self.sigma_max

    def noisy(self, x1_BZPR: torch.Tensor, noise_BZPR: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """x_σ = x_1 + σ n (the variance-exploding process of EDM, n = ``noise_BZPR``)."""
        return x1_BZPR + t_B[:, None, None, None].to(x1_BZPR.dtype) * noise_BZPR

    def options(self) -> dict[str, float]:
        return {
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "rho": self.rho,
        }

    def loss_weight(self, sigma_B: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_data²) / (σ σ_data)² (Karras et al. 2022, Table 1)."""
        return (sigma_B**2 + self.sigma_data**2) / (sigma_B * self.sigma_data) ** 2


class ConsistencyDenoiser(EDMDenoiser):
    """The consistency function f(x, σ) on EDM's preconditioning (see the module docstring), with
    f(x, σ_min) = x. ``forward`` returns f; ``velocity`` (x − f)/σ; ``time_grid(n)`` is the multistep
    consistency sampling grid: the first n levels of EDM's (n + 1)-level ρ grid, then 0 (n = 1:
    [σ_max, 0])."""

    kind = "consistency"
    final_singular = True
    teacher_parametrisations: tuple[str, ...] = ("edm",)

    def preconditioning(
        self, sigma_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise): Song et al. 2023, Appendix C, on EDM's c_in and c_noise."""
        sd, eps = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma_B - eps) ** 2 + sd**2)
        c_out = (sigma_B - eps) * sd / (sigma_B**2 + sd**2).sqrt()
        c_in = 1.0 / (sigma_B**2 + sd**2).sqrt()
        c_noise = sigma_B.log() / 4.0
        return c_skip, c_out, c_in, c_noise

    def time_grid(self, num_steps: int) -> torch.Tensor:
        n = self._check_steps(num_steps)
        levels = edm_sigma_grid(n + 1, self.sigma_min, self.sigma_max, self.rho)
        return torch.cat([levels[:n], torch.zeros(1, dtype=torch.float64)])

    def cd_levels(self, num_scales: int) -> torch.Tensor:
        """float64 (N,) σ_min = σ_1 < … < σ_N = σ_max (Karras et al. 2022, Eq. 5; Song et al. 2023, §4)."""
        if num_scales < 2:
            raise ValueError(f"consistency distillation needs >= 2 noise levels, got {num_scales}")
        return edm_sigma_grid(num_scales, self.sigma_min, self.sigma_max, self.rho)[:num_scales].flip(0)


class ConsistencyFMDenoiser(FlowMatchingDenoiser):
    """The consistency function on the flow-matching path: f(x_t, t) = x_t + (1 − t) F(x_t, 1000·t), so
    f(x, 1) = x. ``forward`` returns f; ``velocity`` F (the Euler step to t = 1 lands on f); ``time_grid`` is
    FM's uniform grid (multistep consistency sampling re-noises at t_1, …, t_{n−1})."""

    kind = "consistency_fm"
    final_singular = False
    teacher_parametrisations: tuple[str, ...] = ("flow_matching",)

    def forward(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t_B = as_batch_time(t_B, x_BZPR)
        v_BZPR = self.net(x_BZPR, NOISE_LABEL_SCALE * t_B, cond, coords_TC).float()
        return x_BZPR + (1.0 - t_B)[:, None, None, None] * v_BZPR

    def velocity(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t_B = as_batch_time(t_B, x_BZPR)
        return self.net(x_BZPR, NOISE_LABEL_SCALE * t_B, cond, coords_TC)

    def cd_levels(self, num_scales: int) -> torch.Tensor:
        """float64 (N,) t_1 = 1 > … > t_N = 0: FM's uniform grid, boundary (data) first."""
        if num_scales < 2:
            raise ValueError(f"consistency distillation needs >= 2 noise levels, got {num_scales}")
        return torch.linspace(1.0, 0.0, num_scales, dtype=torch.float64)


class ShortcutDenoiser(FlowMatchingDenoiser):
    """A flow-matching network that also takes the step size d: the average velocity u(x_t, t, d) ≈
    (x_{t+d} − x_t) / d along the flow from t to t + d (see the module docstring). ``forward`` and
    ``velocity`` return u; ``step_B`` None means d = 0, where u is the instantaneous velocity, so the ODE
    samplers integrate the flow as with the teacher. The ``shortcut`` sampler steps x + h u(x, t, h)."""

    kind = "shortcut"
    final_singular = False
    step_conditioned = True
    teacher_parametrisations: tuple[str, ...] = ("flow_matching",)

    def forward(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
        step_B: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        t_B = as_batch_time(t_B, x_BZPR)
        d_B = as_batch_time(0.0 if step_B is None else step_B, x_BZPR)
        return self.net(x_BZPR, NOISE_LABEL_SCALE * t_B, cond, coords_TC, NOISE_LABEL_SCALE * d_B)

    def velocity(
        self,
        x_BZPR: torch.Tensor,
        t_B: torch.Tensor | float,
        cond: ConditionTensors,
        coords_TC: torch.Tensor | None = None,
        step_B: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        return self.forward(x_BZPR, t_B, cond, coords_TC, step_B)


# The parametrisations a ShowerModel can have (``ShowerModelConfig.parametrisation``): what the network
# output means.
DENOISERS: dict[str, type[Denoiser]] = {
    "flow_matching": FlowMatchingDenoiser,
    "edm": EDMDenoiser,
    "consistency": ConsistencyDenoiser,
    "consistency_fm": ConsistencyFMDenoiser,
    "shortcut": ShortcutDenoiser,
}

# The one-network few-step parametrisations (step-conditioned) and the teacher parametrisation of each.
STEP_TEACHERS: dict[str, tuple[str, ...]] = {"shortcut": ShortcutDenoiser.teacher_parametrisations}

# The consistency parametrisations and the teacher parametrisation each one distils (same time convention).
CONSISTENCY_TEACHERS: dict[str, tuple[str, ...]] = {
    "consistency": ConsistencyDenoiser.teacher_parametrisations,
    "consistency_fm": ConsistencyFMDenoiser.teacher_parametrisations,
}

__all__ = [
    "CONSISTENCY_TEACHERS",
    "DENOISERS",
    "STEP_TEACHERS",
    "ConsistencyDenoiser",
    "ConsistencyFMDenoiser",
    "Denoiser",
    "EDMDenoiser",
    "EDMPrecondConfig",
    "FlowMatchingDenoiser",
    "ShortcutDenoiser",
    "as_batch_time",
    "edm_sigma_grid",
]
