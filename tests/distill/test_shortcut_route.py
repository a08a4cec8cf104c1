"""The one-network route for flow-matching teachers (shortcut models): the step-conditioned backbone stays
backwards compatible, the objective's self-consistency target is exact on a linear ODE, its loss is finite
and falls on a toy, the sampler is the teacher's Euler solver at the student's start, the refusals, the
1-, 2- and 4-step ONNX graphs through the parity check, the CLI dry-run and a tiny end-to-end distillation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import tiny_config

from caloforge.distill.pipeline import DistillRequest, run_distillation
from caloforge.distill.shortcut import STEP_EMBEDDER_PREFIX, make_shortcut_student
from caloforge.platform.backbone import ShowerDiT, backbone_config
from caloforge.platform.conditioning import ConditionTensors, ConditionVocab
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.objectives import (
    LossContext,
    ObjectiveConfig,
    ShortcutConfig,
    ShortcutDistillation,
    make_objective,
    shortcut_targets,
)
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig

REPO = Path(__file__).resolve().parents[2]
MESH = (9, 4, 3)  # 3 × 2 × 1 = 6 tokens of the debug patch


def tiny_model(parametrisation: str, seed: int = 0, **changes) -> ShowerModel:
    cfg = ShowerModelConfig(
        backbone="debug",
        parametrisation=parametrisation,
        sampler="shortcut" if parametrisation == "shortcut" else "euler",
        num_steps=2,
        layer_energy=LayerEnergyConfig(enabled=False),
        **changes,
    )
    model = ShowerModel(cfg, ConditionVocab.create(["a", "b"], spare_slots=1), MESH)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised layers get small noise, as training would
        for name, p in model.named_parameters():
            if not p.any() and STEP_EMBEDDER_PREFIX not in f"{name}.":
                p.normal_(0.0, 0.05, generator=gen)
    return model


def conditions(b: int) -> ConditionTensors:
    return ConditionTensors(
        torch.linspace(2e3, 5e4, b),
        torch.full((b,), 1.57),
        torch.zeros(b),
        torch.arange(b) % 2,
        torch.arange(b) % 2,
    )


def test_step_conditioned_backbone_keeps_the_plain_one_unchanged() -> None:
    cfg = backbone_config("debug")
    plain, step = ShowerDiT(cfg, 3, seed=4), ShowerDiT(cfg, 3, seed=4, step_condition=True)
    extra = set(step.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("step_embedder.") for k in extra)
    for name, value in plain.state_dict().items():  # same initialisation draws for the shared weights
        torch.testing.assert_close(step.state_dict()[name], value, rtol=0, atol=0)
    x, t, cond = torch.randn(2, 9, 4, 3), torch.tensor([100.0, 900.0]), conditions(2)
    # the zero output layer: any step label gives the plain network's output
    torch.testing.assert_close(step(x, t, cond, None, torch.tensor([0.0, 500.0])), plain(x, t, cond))
    with pytest.raises(ValueError, match="needs step_label_B"):
        step(x, t, cond)
    with pytest.raises(ValueError, match="has no step condition"):
        plain(x, t, cond, None, t)


def test_shortcut_target_is_exact_on_a_linear_ode() -> None:
    # dx/dt = a x: the average velocity over [t, t + d] is x (e^{ad} − 1) / d, and two exact half steps
    # average to exactly that (the self-consistency identity the objective trains).
    a = -1.3
    d = torch.tensor([1.0, 0.5, 0.125], dtype=torch.float64)
    x = torch.tensor([0.7, -2.0, 1.1], dtype=torch.float64)[:, None, None, None]

    def exact(x_, t_, cond_, step_):
        step_ = step_[:, None, None, None]
        return torch.where(step_ > 0, x_ * torch.expm1(a * step_) / step_.clamp_min(1e-30), a * x_)

    got = shortcut_targets(exact, x, torch.zeros(3, dtype=torch.float64), d, 0.5 * d, None)
    torch.testing.assert_close(got, exact(x, None, None, d), rtol=1e-12, atol=0)
    # at the finest level the half steps use d = 0 (Euler with the instantaneous velocity): first order
    fine = shortcut_targets(exact, x, torch.zeros(3, dtype=torch.float64), d, torch.zeros(3), None)
    h = 0.5 * d[:, None, None, None]
    torch.testing.assert_close(fine, a * x * (1 + 0.5 * a * h), rtol=1e-12, atol=0)


def test_shortcut_loss_is_finite_and_falls_on_a_toy() -> None:
    torch.manual_seed(0)
    student = tiny_model("shortcut").train()
    objective = ShortcutDistillation(ShortcutConfig(velocity_target="data", bootstrap_fraction=0.5))
    x1 = torch.randn(8, *MESH, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
    cond = conditions(8)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = objective(student, x1, cond, torch.Generator().manual_seed(2)).mean()  # the same draws
        assert math.isfinite(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_student_starts_as_its_teacher() -> None:
    teacher = tiny_model("flow_matching")
    student = make_shortcut_student(teacher, num_steps=4)
    assert (student.config.parametrisation, student.config.sampler, student.config.num_steps) == (
        "shortcut",
        "shortcut",
        4,
    )
    noise, cond = torch.randn(3, *MESH, generator=torch.Generator().manual_seed(3)), conditions(3)
    with torch.no_grad():
        for n in (1, 2, 4):  # N shortcut steps of the fresh student = the teacher's N Euler steps
            torch.testing.assert_close(
                student.sample(noise, cond, "shortcut", n), teacher.sample(noise, cond, "euler", n)
            )
        # distillation starts at zero loss on the flow rows (d = 0 regresses the teacher's velocity)
        only_flow = ShortcutDistillation(ShortcutConfig(bootstrap_fraction=0.0, velocity_target="teacher"))
        loss = only_flow(student, noise, cond, torch.Generator().manual_seed(4), LossContext(teacher=teacher))
        assert float(loss.abs().max()) < 1e-10
        # the step input is live once the step embedding has trained
        student.network.step_embedder.fc2.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(5))
        assert not torch.allclose(
            student.sample(noise, cond, "shortcut", 1), teacher.sample(noise, cond, "euler", 1)
        )
        # d = 0 is still the instantaneous velocity path the ODE samplers use
        assert torch.isfinite(student.sample(noise, cond, "heun", 2)).all()


def test_anchor_rows_regress_the_teachers_own_solve_of_the_whole_path() -> None:
    """``anchor_fraction``: those rows learn d = 1 from t = 0 with the teacher's ``anchor_sampler`` ×
    ``anchor_steps`` solve of the same noise as target; the other rows and the draws are unchanged."""
    teacher = tiny_model("flow_matching")
    student = make_shortcut_student(teacher)
    gen = torch.Generator().manual_seed(5)
    student.network.step_embedder.fc2.weight.data.normal_(0.0, 0.5, generator=gen)
    x1, cond, b = torch.randn(8, *MESH, generator=torch.Generator().manual_seed(1)), conditions(8), 8
    ctx = LossContext(teacher=teacher)
    config = ShortcutConfig(
        velocity_target="teacher", bootstrap_fraction=0.25, anchor_fraction=0.25, anchor_steps=3
    )
    with torch.no_grad():
        loss = ShortcutDistillation(config)(student, x1, cond, torch.Generator().manual_seed(4), ctx)
        plain = ShortcutDistillation(dataclasses.replace(config, anchor_fraction=0.0))
        plain_ctx = LossContext(teacher=teacher)
        before = plain(student, x1, cond, torch.Generator().manual_seed(4), plain_ctx)
        # by hand: the first draw is x_0; rows 2-3 (after the 2 bootstrap rows) are the anchors
        x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(4))
        rows = torch.tensor([2, 3])
        sub = cond.index(torch.isin(torch.arange(b), rows))
        x = x0[rows]
        for i in range(3):  # the teacher's midpoint rule on t = 0, 1/3, 2/3, 1
            t0, h = i / 3, 1 / 3
            k1 = teacher.velocity(x, torch.full((2,), t0), sub)
            x = x + h * teacher.velocity(x + 0.5 * h * k1, torch.full((2,), t0 + 0.5 * h), sub)
        out = student(x0[rows], torch.zeros(2), sub, torch.ones(2))
        expected = (out - (x - x0[rows])).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(loss[rows], expected, rtol=1e-5, atol=1e-7)
    keep = torch.tensor([0, 1, 4, 5, 6, 7])
    torch.testing.assert_close(loss[keep], before[keep])  # bootstrap and flow rows as without anchors
    assert not torch.allclose(loss[rows], before[rows])
    # the groups' means are recorded (loss/flow, loss/bootstrap, loss/anchor in the training log)
    assert list(ctx.terms) == ["flow", "bootstrap", "anchor"] and list(plain_ctx.terms) == [
        "flow",
        "bootstrap",
    ]
    for name, group in (("bootstrap", [0, 1]), ("anchor", [2, 3]), ("flow", [4, 5, 6, 7])):
        torch.testing.assert_close(ctx.terms[name], loss[group].mean())
    with pytest.raises(ValueError, match="anchor_fraction > 0 needs velocity_target: teacher"):
        ShortcutConfig(anchor_fraction=0.1)
    with pytest.raises(ValueError, match="bootstrap_fraction \\+ anchor_fraction must be <= 1"):
        ShortcutConfig(velocity_target="teacher", bootstrap_fraction=0.8, anchor_fraction=0.3)
    with pytest.raises(ValueError, match="anchor_steps must be an int >= 1"):
        ShortcutConfig(velocity_target="teacher", anchor_fraction=0.1, anchor_steps=0)
    with pytest.raises(ValueError, match="anchor_sampler must be one of"):
        ShortcutConfig(velocity_target="teacher", anchor_fraction=0.1, anchor_sampler="shortcut")


def test_refusals_name_the_parametrisation() -> None:
    with pytest.raises(
        ValueError, match="objective 'shortcut' cannot train a model with parametrisation='flow_matching'"
    ):
        make_objective("shortcut", "flow_matching")
    assert isinstance(make_objective(None, "shortcut"), ShortcutDistillation)  # its native objective
    with pytest.raises(ValueError, match="cannot train a model with parametrisation='shortcut'"):
        make_objective(ObjectiveConfig(name="flow_matching"), "shortcut")
    with pytest.raises(ValueError, match="needs a step-conditioned parametrisation"):
        ShowerModelConfig(backbone="debug", parametrisation="flow_matching", sampler="shortcut")
    with pytest.raises(ValueError, match="velocity_target"):
        ShortcutConfig(velocity_target="ema")
    teacher = tiny_model("flow_matching")
    with pytest.raises(ValueError, match="takes none"):
        teacher.velocity(torch.zeros(1, *MESH), torch.zeros(1), conditions(1), torch.zeros(1))
    with pytest.raises(ValueError, match="it distils"):
        make_shortcut_student(tiny_model("edm"))
    student = make_shortcut_student(teacher)
    with pytest.raises(ValueError, match="needs a frozen teacher"):
        teaching = ShortcutDistillation(ShortcutConfig(velocity_target="teacher"))
        teaching(student, torch.zeros(2, *MESH), conditions(2), torch.Generator())


@pytest.mark.slow
def test_shortcut_student_onnx_graphs_pass_the_parity_check(fm_teacher_bundle, tmp_path) -> None:
    from caloforge.registry.export import export_onnx

    student = make_shortcut_student(ShowerModel.load(fm_teacher_bundle))
    with torch.no_grad():  # a trained step embedding, so the graph must carry the step input
        student.network.step_embedder.fc2.weight.normal_(
            0.0, 0.02, generator=torch.Generator().manual_seed(6)
        )
    for steps in (1, 2, 4):
        info = export_onnx(
            student,
            tmp_path / f"student{steps}.onnx",
            num_steps=steps,
            exporter="legacy",
            parity_batch_sizes=(1, 3),
            variant="plain",
        )
        assert (info.sampler, info.num_steps, info.nfe) == ("shortcut", steps, steps)
        assert info.parity.passed, info.parity.summary()


def test_cli_dry_run_plans_the_shortcut_route(fm_teacher_bundle, teacher_bundle, shards, capsys) -> None:
    from caloforge.cli import main

    args = ["distill", "--teacher", str(fm_teacher_bundle), "--data", str(shards), "--method", "shortcut"]
    args += [
        "--config",
        str(REPO / "configs" / "distill" / "shortcut.yaml"),
        "--set",
        "register.enabled=false",
    ]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: shortcut" in out and "velocity_target: teacher" in out
    assert "parametrisation: flow_matching -> shortcut" in out and "student_sampler: shortcut x 1" in out
    args[2] = str(teacher_bundle)  # an EDM teacher is refused, naming the route's teachers
    assert main([*args, "--dry-run"]) != 0
    assert "the shortcut route takes ['flow_matching'] teachers" in capsys.readouterr().err


@pytest.mark.slow
def test_shortcut_distillation_end_to_end_is_registered_as_a_distilled_version(
    registry, fm_teacher_bundle, shards, tmp_path
) -> None:
    from caloforge.distill.config import ShortcutOptions

    registry.register_bundle(fm_teacher_bundle, name="caloforge-base", kind="base", aliases=("champion",))
    config = tiny_config(
        name="tiny-shortcut",
        method="shortcut",
        shortcut=ShortcutOptions(num_steps=2),
        objective=ObjectiveConfig(name="shortcut", shortcut=ShortcutConfig(velocity_target="teacher")),
    )
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, steps=3))
    result = run_distillation(
        config, DistillRequest("models:/caloforge-base@champion", shards), tmp_path / "run"
    )
    student = ShowerModel.load(result.model_dir)
    assert (student.config.parametrisation, student.config.sampler, student.config.num_steps) == (
        "shortcut",
        "shortcut",
        2,
    )
    assert student.lineage.objective == "shortcut" and student.lineage.strategy == "shortcut"
    teacher = ShowerModel.load(fm_teacher_bundle)
    assert not torch.equal(  # the step embedding trained
        student.state_dict()["denoiser.net.step_embedder.fc2.weight"],
        torch.zeros_like(student.state_dict()["denoiser.net.step_embedder.fc2.weight"]),
    )
    for name, value in teacher.state_dict().items():  # the layer-energy head is the teacher's
        if name.startswith("energy_head."):
            torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0)
    version = registry.get("caloforge-base", version=2)
    assert version.kind == "distilled" and version.lineage["parent_uri"] == "models:/caloforge-base/1"
    assert version.tags["distill_method"] == "shortcut" and version.tags["distill_sampler"] == "shortcut"
    assert version.tags["distill_steps"] == "2" and version.tags["teacher_version"] == "1"
    for key in ("auc_low", "auc_high", "fpd"):
        assert np.isfinite(result.metrics[key])
