"""``caloforge distill`` end to end on tiny models and a real sqlite MLflow registry: lineage teacher →
student, tags, the gate vs the teacher, resume after an injected failure, BNS coefficients in the bundle,
the 1-, 2- and 4-step ONNX graphs of a consistency student through the parity check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import tiny_config

from caloforge.distill.pipeline import (
    DistillRequest,
    apply_gate,
    make_student,
    plan_distillation,
    run_distillation,
)
from caloforge.platform.shower_model import ShowerModel


def register_teacher(registry, bundle: Path) -> str:
    version = registry.register_bundle(bundle, name="caloforge-base", kind="base", aliases=("champion",))
    assert version.version == 1
    return "models:/caloforge-base@champion"


@pytest.mark.slow
def test_cd_student_resumes_and_is_registered_once_as_a_distilled_version_of_the_teacher(
    registry, teacher_bundle, shards, tmp_path
):
    teacher_uri = register_teacher(registry, teacher_bundle)
    config = tiny_config(fault_injection_step=2)
    request = DistillRequest(teacher_uri, shards)
    with pytest.raises(RuntimeError, match="fault injection"):
        run_distillation(config, request, tmp_path / "run")
    assert len(registry.versions("caloforge-base")) == 1  # nothing registered by the failed run
    result = run_distillation(config, request, tmp_path / "run", resume=True)
    assert result.steps == 4
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 4

    student = ShowerModel.load(result.model_dir)
    assert student.config.parametrisation == "consistency"
    assert (student.config.sampler, student.config.num_steps) == ("consistency", 1)
    lin = student.lineage
    assert (lin.kind, lin.parent_uri, lin.parent_version, lin.strategy) == (
        "distilled",
        "models:/caloforge-base/1",
        "1",
        "cd",
    )
    assert lin.objective == "consistency_distillation" and lin.extra["steps"] == "4"
    # the layer-energy head is the teacher's, bit for bit; the backbone trained
    teacher = ShowerModel.load(teacher_bundle)
    for name, value in teacher.state_dict().items():
        if name.startswith("energy_head."):
            torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(
        student.state_dict()["denoiser.net.final_layer.linear.weight"],
        teacher.state_dict()["denoiser.net.final_layer.linear.weight"],
    )
    reg = result.registered
    assert reg is not None and reg["name"] == "caloforge-base" and reg["version"] == 2
    version = registry.get("caloforge-base", version=2)
    assert version.kind == "distilled"
    assert version.lineage["parent_uri"] == "models:/caloforge-base/1"
    assert version.lineage["adaptation_method"] == "cd"
    assert version.tags["teacher_version"] == "1" and version.tags["distill_method"] == "cd"
    assert version.tags["distill_steps"] == "1" and version.tags["distill_sampler"] == "consistency"
    assert "candidate" in version.aliases
    assert ("fast" in version.aliases) == result.gate.passed
    assert registry.get("caloforge-base", alias="champion").version == 1  # the teacher stays champion
    for key in ("auc_low", "auc_high", "fpd"):
        assert np.isfinite(result.metrics[key]) and np.isfinite(result.teacher_metrics[key])
    assert (tmp_path / "run" / "report" / "teacher").is_dir()

    again = run_distillation(config, request, tmp_path / "run", resume=True)  # registered once per run
    assert again.registered["version"] == 2 and len(registry.versions("caloforge-base")) == 2
    with pytest.raises(ValueError, match="holds a distillation run already"):
        run_distillation(config, request, tmp_path / "run")


@pytest.mark.slow
def test_bns_stores_solvers_in_the_bundle_and_resumes(teacher_bundle, shards, tmp_path):
    from caloforge.distill.config import DistillRegisterConfig

    config = tiny_config(method="bns", fault_injection_step=2, register=DistillRegisterConfig(enabled=False))
    request = DistillRequest(str(teacher_bundle), shards)
    with pytest.raises(RuntimeError, match="after the 1-step solver"):
        run_distillation(config, request, tmp_path / "run")
    assert (tmp_path / "run" / "bns" / "solver_1.json").is_file()
    result = run_distillation(config, request, tmp_path / "run", resume=True)
    model = ShowerModel.load(result.model_dir)
    assert (model.config.sampler, model.config.num_steps) == ("bespoke", 2)
    assert [s.num_steps for s in model.config.bespoke] == [1, 2]
    assert model.lineage.kind == "distilled" and model.lineage.strategy == "bns"
    for n, rec in result.solvers.items():
        assert rec["rmse_bespoke"] < rec["rmse_euler"], n
    teacher = ShowerModel.load(teacher_bundle)
    for name, value in teacher.state_dict().items():  # no weight changes
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    showers = model.generate(teacher_conditions(shards, 3), seed=1)
    assert showers.shape[0] == 3 and np.isfinite(showers).all()


def teacher_conditions(shards: Path, n: int):
    from caloforge.datasets.streaming import load_split

    return load_split(shards, "test").conditions.subset(slice(0, n))


def test_plan_names_bad_requests(teacher_bundle, shards, tmp_path):
    with pytest.raises(ValueError, match=r"register\.name: the teacher is a bundle directory"):
        plan_distillation(tiny_config(), DistillRequest(str(teacher_bundle), shards), tmp_path)
    with pytest.raises(ValueError, match=r"has no manifest\.json"):
        plan_distillation(tiny_config(), DistillRequest(str(teacher_bundle), tmp_path), tmp_path)
    with pytest.raises(ValueError, match="neither a bundle directory nor a registry URI"):
        plan_distillation(tiny_config(), DistillRequest("nothing-here", shards), tmp_path)
    plan = plan_distillation(_no_register(), DistillRequest(str(teacher_bundle), shards), tmp_path)
    assert plan.describe()["parametrisation"] == "edm -> consistency"


def _no_register():
    from caloforge.distill.config import DistillRegisterConfig

    return tiny_config(register=DistillRegisterConfig(enabled=False))


def test_gate_bounds_the_distance_from_the_teacher() -> None:
    config = tiny_config()  # max_auc_increase 0.5
    teacher = {"auc_low": 0.6, "auc_high": 0.55, "fpd": 1.0}
    assert apply_gate(config, {"auc_low": 0.7, "auc_high": 0.6, "fpd": 3.0}, teacher).passed
    failed = apply_gate(config, {"auc_low": 1.2, "auc_high": 0.6, "fpd": 3.0}, teacher)
    assert not failed.passed and failed.reasons() == ["auc_low_increase = 0.6 > 0.5"]
    unmeasured = apply_gate(config, {"fpd": 3.0}, teacher)  # an evaluation without the classifiers
    assert not unmeasured.passed
    assert unmeasured.reasons() == [
        "auc_low_increase not measured (eval.metrics lacks what it compares)",
        "auc_high_increase not measured (eval.metrics lacks what it compares)",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_student_onnx_graphs_pass_the_parity_check(teacher_bundle, tmp_path, steps) -> None:
    from caloforge.registry.export import export_onnx

    student = make_student(ShowerModel.load(teacher_bundle), num_steps=steps)
    # the plain graph: this is the parity of the consistency sampler (variants: test_registry_inference_opt)
    info = export_onnx(
        student,
        tmp_path / f"student{steps}.onnx",
        exporter="legacy",
        parity_batch_sizes=(1, 3),
        variant="plain",
    )
    assert (info.sampler, info.num_steps) == ("consistency", steps)
    assert info.parity.passed, info.parity.summary()


@pytest.mark.slow
def test_bespoke_onnx_graph_passes_the_parity_check(teacher_bundle, tmp_path) -> None:
    from caloforge.platform.samplers import BespokeSolver
    from caloforge.registry.export import export_onnx

    model = ShowerModel.load(teacher_bundle)
    euler = BespokeSolver.euler(model.denoiser.time_grid(2))
    solver = BespokeSolver(
        2, euler.times, (1.0, 0.9), ((euler.b[0][0],), (0.5 * euler.b[1][0], euler.b[1][1]))
    )
    model.set_bespoke_solvers([solver])
    model.set_sampling_defaults("bespoke", 2)
    info = export_onnx(
        model, tmp_path / "bespoke.onnx", exporter="legacy", parity_batch_sizes=(1, 3), variant="plain"
    )
    assert (info.sampler, info.num_steps, info.nfe) == ("bespoke", 2, 2)
    assert info.parity.passed, info.parity.summary()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cd", "bns"])
def test_a_teacher_that_reads_the_layer_energies_distils(
    conditioned_teacher_bundle, shards, tmp_path, method
):
    from caloforge.distill.config import DistillRegisterConfig

    config = tiny_config(method=method, register=DistillRegisterConfig(enabled=False))
    result = run_distillation(
        config, DistillRequest(str(conditioned_teacher_bundle), shards), tmp_path / "run"
    )
    student = ShowerModel.load(result.model_dir)
    assert student.reads_layer_energies and student.lineage.strategy == method
    cond = teacher_conditions(shards, 4)
    showers = student.generate(cond, seed=2)
    assert showers.shape[0] == 4 and np.isfinite(showers).all() and (showers > 0).any()
    if method == "cd":  # the student's own weights moved, its layer maps with them
        teacher = ShowerModel.load(conditioned_teacher_bundle)
        name = "denoiser.net.layer_token_embed.weight"
        assert not torch.equal(student.state_dict()[name], teacher.state_dict()[name])
