"""Consistency parametrisations, consistency distillation (hand-computed case, the objective on
ShowerModels) and multistep consistency sampling."""

from __future__ import annotations

import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.denoisers import ConsistencyDenoiser, edm_sigma_grid
from caloforge.platform.objectives import (
    ConsistencyDistillationConfig,
    LossContext,
    ObjectiveConfig,
    consistency_distillation_loss,
    make_objective,
)
from caloforge.platform.samplers import get_sampler, renoise_permutation
from caloforge.platform.shower_model import ShowerModel


def batch(model: ShowerModel, n: int = 4, seed: int = 6):
    showers, cond = toy_showers(n, SMALL_MESH, seed=seed)
    return model.to_model_space(showers), model.encode_conditions(cond)


def student_of(teacher: ShowerModel, parametrisation: str) -> ShowerModel:
    """A consistency student with the teacher's weights (what ``caloforge distill`` starts from)."""
    import dataclasses

    cfg = dataclasses.replace(teacher.config, parametrisation=parametrisation)
    student = ShowerModel(cfg, teacher.vocab, teacher.mesh, lineage=teacher.lineage)
    student.load_state_dict(teacher.state_dict(), strict=True)
    return student


@pytest.mark.parametrize(
    ("param", "teacher_param"), [("consistency", "edm"), ("consistency_fm", "flow_matching")]
)
def test_boundary_condition_holds_exactly(param: str, teacher_param: str) -> None:
    student = student_of(make_model(teacher_param), param)
    x, ct = batch(student)
    boundary = float(student.denoiser.cd_levels(4)[0])
    with torch.no_grad():
        out = student(x, torch.full((x.shape[0],), boundary), ct)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_consistency_preconditioning_and_grids() -> None:
    den = ConsistencyDenoiser(torch.nn.Identity(), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = den.preconditioning(sigma)
    torch.testing.assert_close(c_in, 1.0 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(c_out, 0.5 * (sigma - 0.002) / (sigma**2 + 0.25).sqrt())
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    levels = den.cd_levels(32)
    torch.testing.assert_close(levels, edm_sigma_grid(32, 0.002, 80.0, 7.0)[:32].flip(0))
    assert float(levels[0]) == pytest.approx(0.002) and float(levels[-1]) == pytest.approx(80.0)
    assert den.time_grid(1).tolist() == [80.0, 0.0]
    grid2 = den.time_grid(2).tolist()
    assert grid2[0] == 80.0 and grid2[-1] == 0.0 and 0.002 < grid2[1] < 80.0


def test_consistency_distillation_loss_by_hand() -> None:
    """Linear teacher v(x, t) = 0.5 x; student f = 2x + t; target f⁻ = x − t; EDM noising x1 + t z."""
    x1 = torch.tensor([1.0, -1.0, 0.5, 2.0]).view(2, 1, 1, 2)
    z = torch.tensor([0.5, 0.0, -1.0, 1.0]).view(2, 1, 1, 2)
    levels = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    n = torch.tensor([0, 1])

    def noisy(x, noise, t):
        return x + t[:, None, None, None] * noise

    loss = consistency_distillation_loss(
        student=lambda x, t, c: 2 * x + t[:, None, None, None],
        target=lambda x, t, c: x - t[:, None, None, None],
        teacher_velocity=lambda x, t, c: 0.5 * x,
        noisy=noisy,
        levels_N=levels,
        x1_BZPR=x1,
        n_B=n,
        noise_BZPR=z,
        cond=None,
    )
    # Sample 0: t_hi = 2, t_lo = 1, x_hi = (1 + 1, -1 + 0) = (2, -1). Heun with h = -1 on v = 0.5 x:
    # x_hat = x_hi (1 + h c + (h c)^2 / 2) = x_hi * 0.625 = (1.25, -0.625);
    # target = x_hat - 1 = (0.25, -1.625)
    # student = 2 x_hi + 2 = (6, 0); loss = ((5.75)^2 + (1.625)^2) / 2
    # Sample 1: t_hi = 4, t_lo = 2, x_hi = (0.5 - 4, 2 + 4) = (-3.5, 6); h = -2: factor 1 - 1 + 0.5 = 0.5
    # x_hat = (-1.75, 3); target = (-3.75, 1); student = (-7 + 4, 12 + 4) = (-3, 16); loss = (0.75^2 + 15^2)/2
    expected = torch.tensor([(5.75**2 + 1.625**2) / 2, (0.75**2 + 15.0**2) / 2])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def hand_case() -> dict:
    """The arguments of the hand-computed case of ``test_consistency_distillation_loss_by_hand`` (linear
    teacher v = 0.5 x, student f = 2x + t, target f⁻ = x − t, EDM noising, levels 1, 2, 4, n = 0 and 1);
    its per-sample L2 distances are (5.75² + 1.625²)/2 and (0.75² + 15²)/2."""
    return dict(
        student=lambda x, t, c: 2 * x + t[:, None, None, None],
        target=lambda x, t, c: x - t[:, None, None, None],
        teacher_velocity=lambda x, t, c: 0.5 * x,
        noisy=lambda x, noise, t: x + t[:, None, None, None] * noise,
        levels_N=torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64),
        x1_BZPR=torch.tensor([1.0, -1.0, 0.5, 2.0]).view(2, 1, 1, 2),
        n_B=torch.tensor([0, 1]),
        noise_BZPR=torch.tensor([0.5, 0.0, -1.0, 1.0]).view(2, 1, 1, 2),
        cond=None,
    )


def test_pseudo_huber_distance_by_hand() -> None:
    """The same case with iCT's pseudo-Huber distance: √(m + c²) − c of the hand-computed means m."""
    kwargs = hand_case()
    m = torch.tensor([(5.75**2 + 1.625**2) / 2, (0.75**2 + 15.0**2) / 2])
    for c in (0.00054, 3.0):
        loss = consistency_distillation_loss(**kwargs, distance="pseudo_huber", huber_c=c)
        torch.testing.assert_close(loss, torch.sqrt(m + c * c) - c, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="distance must be one of"):
        consistency_distillation_loss(**kwargs, distance="l1")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"distance": "l1"}, "distance must be one of"),
        ({"huber_c": 0.0}, "huber_c must be a number > 0"),
        ({"huber_c": True}, "huber_c must be a number > 0"),
        ({"num_scales": 1}, "num_scales must be >= 2"),
    ],
)
def test_consistency_config_names_the_bad_value(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConsistencyDistillationConfig(**overrides)


def fm_objective_case(config: ConsistencyDistillationConfig, n: int = 4) -> tuple:
    """(teacher, student, target, x1, cond, loss, generator, terms): a flow-matching teacher, its
    consistency_fm student and target network (the teacher's weights), a batch of ``n``, the objective's
    loss with ``config`` and generator seed 3, a generator seeded 3 again to replay the objective's draws,
    and the terms the objective recorded (``LossContext.terms``)."""
    teacher = make_model("flow_matching")
    student = student_of(teacher, "consistency_fm")
    target = student_of(teacher, "consistency_fm")
    x1, ct = batch(student, n=n)
    objective = make_objective(
        ObjectiveConfig(name="consistency_distillation", consistency_distillation=config), "consistency_fm"
    )
    ctx = LossContext(target=target, teacher=teacher)
    loss = objective(student, x1, ct, torch.Generator().manual_seed(3), ctx)
    return teacher, student, target, x1, ct, loss, torch.Generator().manual_seed(3), ctx.terms


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_objective_passes_its_distance_on(distance: str) -> None:
    config = ConsistencyDistillationConfig(num_scales=8, distance=distance, huber_c=0.01)
    teacher, student, target, x1, ct, loss, gen, terms = fm_objective_case(config)
    n = torch.randint(0, 7, (x1.shape[0],), generator=gen)
    z = torch.randn(x1.shape, generator=gen)
    levels = student.denoiser.cd_levels(8)
    args = (student, target, teacher.velocity, student.denoiser.noisy, levels, x1, n, z, ct)
    expected = consistency_distillation_loss(*args, distance=distance, huber_c=0.01)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
    assert list(terms) == ["consistency"]  # the whole loss here
    torch.testing.assert_close(terms["consistency"], loss.detach().mean())
    if distance == "pseudo_huber":
        mse = consistency_distillation_loss(*args)
        torch.testing.assert_close(loss.detach(), (mse + 1e-4).sqrt().detach() - 0.01, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("param", "teacher_param"), [("consistency", "edm"), ("consistency_fm", "flow_matching")]
)
def test_objective_on_shower_models_follows_the_documented_draws(param: str, teacher_param: str) -> None:
    teacher = make_model(teacher_param)
    student = student_of(teacher, param)
    target = student_of(teacher, param)
    x1, ct = batch(student)
    objective = make_objective(
        ObjectiveConfig(
            name="consistency_distillation",
            consistency_distillation=ConsistencyDistillationConfig(num_scales=8),
        ),
        param,
    )
    ctx = LossContext(target=target, teacher=teacher)
    loss = objective(student, x1, ct, torch.Generator().manual_seed(3), ctx)
    gen = torch.Generator().manual_seed(3)
    n = torch.randint(0, 7, (x1.shape[0],), generator=gen)
    z = torch.randn(x1.shape, generator=gen)
    expected = consistency_distillation_loss(
        student, target, teacher.velocity, student.denoiser.noisy, student.denoiser.cd_levels(8), x1, n, z, ct
    )
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
    loss.mean().backward()
    assert student.network.final_layer.linear.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters()) and all(
        p.grad is None for p in target.parameters()
    )


def test_objective_names_what_is_missing() -> None:
    teacher = make_model("edm")
    student = student_of(teacher, "consistency")
    x1, ct = batch(student)
    objective = make_objective("consistency_distillation", "consistency")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="needs a frozen teacher"):
        objective(student, x1, ct, gen, LossContext(target=student))
    with pytest.raises(ValueError, match="needs a target network"):
        objective(student, x1, ct, gen, LossContext(teacher=teacher))
    fm_teacher = make_model("flow_matching")
    with pytest.raises(
        ValueError, match="a 'consistency' student distils a teacher parametrised \\['edm'\\]"
    ):
        objective(student, x1, ct, gen, LossContext(teacher=fm_teacher, target=student))
    with pytest.raises(ValueError, match="cannot train a model with parametrisation='edm'"):
        make_objective("consistency_distillation", "edm")


def test_consistency_sampler_one_step_is_the_jump_and_multistep_renoises() -> None:
    student = student_of(make_model("edm"), "consistency")
    _, ct = batch(student)
    noise = student.initial_noise([1, 2, 3, 4])
    with torch.no_grad():
        one = student.sample(noise, ct, "consistency", 1)
        euler = student.sample(noise, ct, "euler", 1)
        f = student(noise * 80.0, torch.full((4,), 80.0), ct)
        torch.testing.assert_close(one, euler)
        torch.testing.assert_close(one, f, rtol=1e-5, atol=1e-4)  # x − σ(x − f)/σ at σ = 80
        two = student.sample(noise, ct, "consistency", 2)
        s1 = float(student.denoiser.time_grid(2)[1])
        perm = renoise_permutation(1, noise[0].numel())
        fresh = (noise * 80.0).flatten(1)[:, perm].view_as(noise)
        x1 = f + (s1 / 80.0) * (fresh - f)
        expected = student(x1, torch.full((4,), s1), ct)
        torch.testing.assert_close(two, expected, rtol=1e-5, atol=1e-4)
    assert get_sampler("consistency").nfe(4) == 4
    assert not torch.equal(renoise_permutation(1, 100), renoise_permutation(2, 100))
    assert torch.equal(torch.sort(renoise_permutation(3, 100)).values, torch.arange(100))
