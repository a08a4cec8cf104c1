"""A consistency student provably beats its teacher's one-step Euler on a toy 2-D distribution.

Two Gaussians at (±2, 0) (σ = 0.25). A tiny MLP stands in for the backbone inside the real denoisers
(``EDMDenoiser`` teacher, ``ConsistencyDenoiser`` student: the same preconditioning code) and the student
is trained with the real ``consistency_distillation_loss`` and the loop's ``TargetNetwork`` (μ = 0.95).
Distance: the energy distance to fresh data (0 for equal distributions).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from caloforge.platform.denoisers import ConsistencyDenoiser, EDMDenoiser
from caloforge.platform.objectives import consistency_distillation_loss
from caloforge.platform.samplers import get_sampler
from caloforge.training.target import TargetNetwork


class TinyNet(nn.Module):
    """The backbone's call signature ``net(x_BZPR, noise_label_B, cond, coords)`` on (B, 1, 1, 2) points."""

    def __init__(self, seed: int = 0, width: int = 64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.freqs = nn.Parameter(torch.randn(8) * 2.0, requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x, label, cond=None, coords=None):
        t = (label / 1000.0)[:, None] * self.freqs[None, :]
        h = torch.cat([x.flatten(1), t.sin(), t.cos()], dim=1)
        return self.mlp(h).view_as(x)


def data(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.where(torch.rand(n, generator=gen) < 0.5, -2.0, 2.0)
    x = torch.randn(n, 2, generator=gen) * 0.25
    x[:, 0] += centre
    return x.view(n, 1, 1, 2)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def train_teacher(steps: int = 800) -> EDMDenoiser:
    teacher = EDMDenoiser(TinyNet(seed=0))
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x1 = data(256, seed=100 + step)
        sigma = (torch.randn(256, generator=gen) * 1.2 - 1.2).exp()
        noise = torch.randn(x1.shape, generator=gen)
        denoised = teacher(x1 + sigma[:, None, None, None] * noise, sigma, None)
        loss = (teacher.loss_weight(sigma) * (denoised - x1).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


def sample(denoiser, name: str, steps: int, n: int = 2000) -> torch.Tensor:
    noise = torch.randn((n, 1, 1, 2), generator=torch.Generator().manual_seed(9))
    grid = denoiser.time_grid(steps)
    with torch.no_grad():
        return get_sampler(name)(denoiser.velocity, denoiser.prior(noise), grid, None, final_singular=True)


@pytest.mark.slow
def test_consistency_student_beats_the_teachers_one_step_euler() -> None:
    torch.set_num_threads(1)
    teacher = train_teacher()
    student = ConsistencyDenoiser(copy.deepcopy(teacher.net).requires_grad_(True))
    target = TargetNetwork(student, decay=0.95)
    levels = student.cd_levels(32)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    for step in range(600):
        x1 = data(256, seed=10_000 + step)
        n = torch.randint(0, 31, (256,), generator=gen)
        z = torch.randn(x1.shape, generator=gen)
        loss = consistency_distillation_loss(
            student, target.module, teacher.velocity, student.noisy, levels, x1, n, z, None
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(student)
    student.eval()
    reference = data(2000, seed=7)
    d_euler1 = energy_distance(sample(teacher, "euler", 1), reference)
    d_heun32 = energy_distance(sample(teacher, "heun", 32), reference)
    d_student1 = energy_distance(sample(student, "consistency", 1), reference)
    d_student2 = energy_distance(sample(student, "consistency", 2), reference)
    print(f"energy distance: teacher euler×1 {d_euler1:.4f}, heun×32 {d_heun32:.4f}, "
          f"student ×1 {d_student1:.4f}, ×2 {d_student2:.4f}")  # fmt: skip
    assert math.isfinite(d_student1)
    assert d_euler1 > 1.0  # one Euler step collapses both modes onto their mean
    assert d_student1 < 0.1 * d_euler1
    assert d_student1 < 0.1 and d_student2 < 0.1
