"""An adapted teacher distils from the base's distilled student (``cd.student_init``, CaloDiT-2's workflow):
the student takes the base student's backbone and the adapted teacher's detector row, transforms and head;
incompatible students are refused by name; the student starts closer to its target (lower consistency loss
on a fixed probe) than a student made of the teacher's weights; lineage and registry tags name the
initialising student."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import tiny_config

from caloforge.datasets.stats import compute_stats
from caloforge.distill.config import CDOptions, DistillRegisterConfig
from caloforge.distill.pipeline import DistillRequest, make_student, plan_distillation, run_distillation
from caloforge.distill.student_init import check_student_init, init_student, probe_consistency_loss
from caloforge.platform.lineage import Lineage
from caloforge.platform.shower_model import ShowerModel
from caloforge.platform.transfer import DETECTOR_EMBED, rebuild_for_mesh

NEW = "pbwo4"  # the adapted teacher's detector: a spare slot of the base


def _adapted(teacher: ShowerModel, seed: int = 5) -> ShowerModel:
    """The base with ``NEW`` in its spare slot and its backbone nudged (as a short fine-tuning would)."""
    adapted = teacher.with_detector(NEW)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.startswith("denoiser."):
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    return adapted


@pytest.fixture(scope="module")
def lively_teacher(teacher_bundle, shards, tmp_path_factory) -> Path:
    """An EDM teacher whose zero-initialised tensors hold larger seeded noise (std 0.3) than the shared
    fixture's: its ODE bends enough that a short distillation measurably lowers the consistency loss."""
    from caloforge.datasets.shards import Manifest
    from caloforge.training.job import model_for_manifest

    config = ShowerModel.load(teacher_bundle).config
    model = model_for_manifest(config, Manifest.load(shards), spare_detector_slots=1)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.3, generator=gen)
    return model.save(
        tmp_path_factory.mktemp("lively") / "bundle", lineage=Lineage(kind="base", objective="edm")
    )


def _base_student(teacher: ShowerModel) -> ShowerModel:
    """A stand-in for the base's distilled student: the teacher's consistency student, perturbed so that its
    weights differ from the teacher's everywhere (the copy is then visible tensor by tensor)."""
    student = make_student(teacher)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return student


def test_init_takes_the_base_students_backbone_and_the_adapted_teachers_row_transforms_and_head(
    teacher_bundle,
) -> None:
    base = ShowerModel.load(teacher_bundle)
    base_student, adapted = _base_student(base), _adapted(base)
    student, report = init_student(adapted, base_student, num_steps=2)
    assert (student.config.parametrisation, student.config.sampler, student.config.num_steps) == (
        "consistency",
        "consistency",
        2,
    )
    assert tuple(student.vocab.detectors) == ("par04-siw", NEW)
    assert report.detector_rows == {"par04-siw": "student_init", NEW: "teacher"}
    s, b, t = student.state_dict(), base_student.state_dict(), adapted.state_dict()
    rows = s[DETECTOR_EMBED]
    torch.testing.assert_close(rows[0], b[DETECTOR_EMBED][0], rtol=0, atol=0)
    torch.testing.assert_close(rows[1], t[DETECTOR_EMBED][1], rtol=0, atol=0)
    for name, value in s.items():
        if name.startswith(("energy_head.", "transform.", "energy_transform.")):
            torch.testing.assert_close(value, t[name], rtol=0, atol=0)  # the adapted teacher's
        elif name != DETECTOR_EMBED and name in dict(student.named_parameters()):
            torch.testing.assert_close(value, b[name], rtol=0, atol=0)  # the base student's
    assert any(k.startswith("energy_head.") for k in report.kept_teacher)
    assert "denoiser.net.final_layer.linear.weight" in report.copied


def test_init_reuses_the_backbone_across_meshes(teacher_bundle) -> None:
    """An adapted teacher on another mesh (rebuilt with ``platform.transfer``) keeps its mesh-dependent
    tensors; the backbone comes from the base student."""
    base = ShowerModel.load(teacher_bundle)
    rng = np.random.default_rng(0)
    showers = (rng.lognormal(0, 2, (32, 45, 16, 6)) * (rng.random((32, 45, 16, 6)) < 0.3)).astype(np.float32)
    stats = compute_stats(showers, np.full(32, 1e4), np.full(32, np.pi / 2))
    adapted, _ = rebuild_for_mesh(base.with_detector(NEW), (45, 16, 6), stats)
    student, report = init_student(adapted, _base_student(base))
    assert student.mesh_shape == (45, 16, 6) and report.init_mesh == (45, 16, 9)
    s, t = student.state_dict(), adapted.state_dict()
    for name in ("transform.log_max_Z", "energy_transform.mean_Z", "energy_head.fc_out.weight"):
        assert s[name].shape == t[name].shape and torch.equal(s[name], t[name]), name  # the new mesh's
    assert s["transform.log_max_Z"].shape != base.state_dict()[
        "transform.log_max_Z"
    ].shape or not torch.equal(s["transform.log_max_Z"], base.state_dict()["transform.log_max_Z"])
    x = student.generate(_conditions(2, NEW), seed=0)
    assert x.shape == (2, 45, 16, 6) and np.isfinite(x).all()


def _conditions(n: int, detector: str):
    from caloforge.platform.conditioning import Conditions

    return Conditions.make(
        np.full(n, 1e4), np.full(n, np.pi / 2), np.zeros(n), np.full(n, 11), [detector] * n
    )


def test_incompatible_initialising_models_are_refused_by_name(teacher_bundle) -> None:
    base = ShowerModel.load(teacher_bundle)
    adapted = _adapted(base)
    with pytest.raises(ValueError, match=r"parametrised 'edm'; the consistency student of a 'edm' teacher"):
        check_student_init(adapted, base)  # the teacher itself is not a student
    other = dataclasses.replace(base.config, patch_size=(3, 4, 3))
    wider = ShowerModel(other, base.vocab, base.mesh, lineage=base.lineage)
    with pytest.raises(ValueError, match=r"backbone differs from the teacher's \(patch_size: \(3, 4, 3\)"):
        check_student_init(adapted, make_student(wider))
    fm = ShowerModel(dataclasses.replace(base.config, parametrisation="flow_matching"), base.vocab, base.mesh)
    with pytest.raises(ValueError, match=r"'consistency_fm'.*'edm' teacher is 'consistency'"):
        check_student_init(adapted, make_student(fm))
    with pytest.raises(ValueError, match=r"cd\.student_init is for method cd"):
        tiny_config(method="bns", cd=CDOptions(student_init="models:/caloforge-base@fast"))


def test_plan_resolves_and_checks_the_initialising_student(teacher_bundle, shards, tmp_path) -> None:
    base = ShowerModel.load(teacher_bundle)
    bad = base.save(tmp_path / "not-a-student")  # an edm model: not a consistency student
    config = tiny_config(register=DistillRegisterConfig(enabled=False), cd=CDOptions(student_init=str(bad)))
    with pytest.raises(ValueError, match=r"cd\.student_init: the initialising model is parametrised 'edm'"):
        plan_distillation(config, DistillRequest(str(teacher_bundle), shards), tmp_path / "run")
    good = make_student(base).save(tmp_path / "student")
    config = tiny_config(register=DistillRegisterConfig(enabled=False), cd=CDOptions(student_init=str(good)))
    plan = plan_distillation(config, DistillRequest(str(teacher_bundle), shards), tmp_path / "run")
    assert plan.student_init_dir == good.resolve() and plan.describe()["student_init"] == str(good.resolve())


@pytest.mark.slow
def test_adapted_teacher_distils_from_the_base_student_which_starts_closer(
    registry, lively_teacher, shards, tmp_path
) -> None:
    from caloforge.datasets.prepare import SimulateConfig, simulate_and_shard
    from caloforge.datasets.shards import ShardConfig, SplitFractions
    from caloforge.datasets.streaming import load_split
    from caloforge.evaluation.config import PlotConfig
    from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig

    registry.register_bundle(lively_teacher, name="caloforge-base", kind="base", aliases=("champion",))
    # 1. the base's distilled student (a real, short consistency distillation), registered as version 2
    quiet = tiny_config()
    quiet = dataclasses.replace(
        quiet,
        eval=dataclasses.replace(
            quiet.eval, metrics=dataclasses.replace(quiet.eval.metrics, plots=PlotConfig(enabled=False))
        ),
    )
    loop = LoopConfig(
        steps=80,
        batch_size=8,
        log_every=40,
        checkpoint_every=80,
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(kind="constant"),
        ema=EMAConfig(decay=0.5),
    )
    base_run = run_distillation(
        dataclasses.replace(quiet, loop=loop),
        DistillRequest("models:/caloforge-base@champion", shards),
        tmp_path / "base-cd",
    )
    assert base_run.registered["version"] == 2
    # 2. the adapted teacher (the base with pbwo4 in its spare slot, nudged), registered on its own
    adapted_data = simulate_and_shard(
        SimulateConfig(
            detectors=(NEW,),
            particles=("e-", "pi+"),
            n_per_detector=60,
            energy_gev=(2.0, 50.0),
            seed=4,
            shards=ShardConfig(showers_per_shard=30, split=SplitFractions(train=0.6, val=0.0, test=0.4)),
        ),
        tmp_path / "pbwo4-data",
    )
    base = ShowerModel.load(lively_teacher)
    adapted = _adapted(base)
    adapted_dir = adapted.save(tmp_path / "adapted", lineage=Lineage(kind="adapted", objective="edm"))
    registry.register_bundle(adapted_dir, name="caloforge-pbwo4", kind="adapted", aliases=("champion",))

    # the base student starts closer to the adapted teacher's consistency target than the teacher's weights
    probe = load_split(adapted_data, "test")
    base_student = ShowerModel.load(base_run.model_dir)
    from_base, _ = init_student(adapted, base_student)
    args = (adapted, probe.showers_NZPR, probe.conditions)
    loss_base = probe_consistency_loss(from_base, *args, seed=1)
    loss_scratch = probe_consistency_loss(make_student(adapted), *args, seed=1)
    assert loss_base < 0.8 * loss_scratch, (loss_base, loss_scratch)

    # 3. distil the adapted teacher from the base student through the pipeline (registry URIs)
    config = dataclasses.replace(quiet, cd=CDOptions(student_init="models:/caloforge-base/2"))
    result = run_distillation(
        config, DistillRequest("models:/caloforge-pbwo4@champion", adapted_data), tmp_path / "a"
    )
    init = json.loads((tmp_path / "a" / "student_init.json").read_text())
    assert init["uri"] == "models:/caloforge-base/2" and init["version"] == "2"
    assert init["detector_rows"] == {"par04-siw": "student_init", NEW: "teacher"}
    student = ShowerModel.load(result.model_dir)
    assert student.lineage.extra["student_init"] == "models:/caloforge-base/2"
    assert student.lineage.parent_uri == "models:/caloforge-pbwo4/1"
    version = registry.get("caloforge-pbwo4", version=result.registered["version"])
    assert version.kind == "distilled" and version.tags["student_init"] == "models:/caloforge-base/2"
    assert version.tags["student_init_version"] == "2" and version.tags["teacher_version"] == "1"
    for name, value in adapted.state_dict().items():  # the adapted teacher's head, bit for bit
        if name.startswith("energy_head."):
            torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0)


def test_probe_is_deterministic_and_checks_its_inputs(teacher_bundle, shards) -> None:
    from caloforge.datasets.streaming import load_split

    teacher = ShowerModel.load(teacher_bundle)
    data = load_split(shards, "test")
    student = make_student(teacher)
    a = probe_consistency_loss(student, teacher, data.showers_NZPR[:6], data.conditions.subset(slice(0, 6)))
    b = probe_consistency_loss(student, teacher, data.showers_NZPR[:6], data.conditions.subset(slice(0, 6)))
    assert a == b and a > 0
    with pytest.raises(ValueError, match="6 showers and 5 conditions"):
        probe_consistency_loss(student, teacher, data.showers_NZPR[:6], data.conditions.subset(slice(0, 5)))
