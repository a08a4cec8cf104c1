"""A consistency student of an adapted teacher, initialised from the base model's distilled student.

CaloDiT-2's workflow for a new detector: adapt the base, then distil the adapted model *starting from the
base's distilled student* instead of from the adapted teacher's own weights — the base student already maps
noise to showers in a few steps, so only the adaptation's change has to be distilled
(``caloforge distill --student-init models:/caloforge-base@fast``; ``cd.student_init``).

:func:`init_student` builds the student as :func:`caloforge.distill.pipeline.make_student` does (the
teacher's config, vocabulary, mesh, fitted transforms and layer-energy head, in the consistency
parametrisation) and then overwrites the backbone with the initialising student's weights:

- every backbone tensor is taken from the initialising student (they are mesh-independent:
  ``caloforge.platform.transfer``), the detector embedding **row by row by name**: a detector the
  initialising student knows takes its row, one it does not know (the adapted detector, in a spare slot)
  keeps the **adapted teacher's** row;
- what depends on the teacher's detector and mesh stays the teacher's: the fitted transforms
  (``transform.*``, ``energy_transform.*``; the teacher's data stats) and the whole layer-energy head
  (``energy_head.*``: distillation never trains it; its layer-indexed tensors are the mesh's);
- :func:`check_student_init` refuses (``ValueError`` naming both) an initialising model that is not a
  consistency student of the teacher's kind (parametrisation), has another backbone (depth, width, heads,
  patch, position embedding), another preconditioning or transform, or a backbone tensor whose shape
  differs from the teacher's — then the weights cannot mean the same thing and there is nothing to start
  from.

:func:`probe_consistency_loss` measures how far a student is from its target: the consistency loss of a
fixed, seeded probe (showers, level indices and noise), with the student as its own target network (θ⁻ = θ),
so two initialisations of the same teacher can be compared exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from caloforge.distill.config import STUDENT_OF
from caloforge.platform.conditioning import Conditions
from caloforge.platform.shower_model import ShowerModel
from caloforge.platform.transfer import DETECTOR_EMBED, FITTED_PREFIXES

__all__ = [
    "TEACHER_PREFIXES",
    "StudentInitReport",
    "check_student_init",
    "init_student",
    "probe_consistency_loss",
]

# Tensors that stay the adapted teacher's (its detector's data and mesh): the head and the fitted transforms.
TEACHER_PREFIXES = ("energy_head.", *FITTED_PREFIXES)


@dataclass(frozen=True)
class StudentInitReport:
    """What :func:`init_student` did: ``copied`` backbone tensors taken from the initialising student;
    ``detector_rows``: per detector of the teacher's vocabulary, ``student_init`` (the initialising
    student's row) or ``teacher`` (the adapted teacher's row: a detector the base student does not know);
    ``kept_teacher``: tensors left as the teacher's (the layer-energy head and the fitted transforms)."""

    copied: tuple[str, ...]
    detector_rows: dict[str, str]
    kept_teacher: tuple[str, ...]
    init_mesh: tuple[int, int, int]
    teacher_mesh: tuple[int, int, int]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        rows = ", ".join(f"{d}: {src}" for d, src in self.detector_rows.items())
        return (
            f"{len(self.copied)} backbone tensors from the initialising student (mesh {self.init_mesh} -> "
            f"{self.teacher_mesh}); detector rows {rows}; {len(self.kept_teacher)} tensors kept from the "
            "teacher (layer-energy head, fitted transforms)"
        )


def check_student_init(teacher: ShowerModel, init: ShowerModel, what: str = "cd.student_init") -> None:
    """``ValueError`` naming the mismatch unless ``init`` can initialise the consistency student of
    ``teacher`` (module docstring)."""
    t_param = teacher.config.parametrisation
    if t_param not in STUDENT_OF:
        raise ValueError(
            f"{what}: a {t_param!r} teacher has no consistency student (known: {sorted(STUDENT_OF)})"
        )
    wanted = STUDENT_OF[t_param]
    got = init.config.parametrisation
    if got != wanted:
        raise ValueError(
            f"{what}: the initialising model is parametrised {got!r}; the consistency student of a "
            f"{t_param!r} teacher is {wanted!r} (give a distilled student of the base: kind distilled, "
            "method cd)"
        )
    t_bb, i_bb = teacher.config.backbone_config(), init.config.backbone_config()
    if t_bb != i_bb:
        diff = {
            f.name: (getattr(i_bb, f.name), getattr(t_bb, f.name))
            for f in dataclasses.fields(t_bb)
            if getattr(i_bb, f.name) != getattr(t_bb, f.name)
        }
        detail = "; ".join(
            f"{k}: {a!r} (student) vs {b!r} (teacher)" for k, a, b in ((k, *v) for k, v in diff.items())
        )
        raise ValueError(f"{what}: the initialising student's backbone differs from the teacher's ({detail})")
    if t_param == "edm" and init.config.edm != teacher.config.edm:
        raise ValueError(
            f"{what}: the initialising student's EDM preconditioning {init.config.edm} differs from the "
            f"teacher's {teacher.config.edm}"
        )
    if init.config.transform != teacher.config.transform:
        raise ValueError(
            f"{what}: the initialising student's transform {init.config.transform!r} differs from the "
            f"teacher's {teacher.config.transform!r}"
        )
    init_params = dict(init.named_parameters())
    for name, param in teacher.named_parameters():
        if name.startswith(TEACHER_PREFIXES) or name == DETECTOR_EMBED:
            continue
        src = init_params.get(name)
        if src is None:
            raise ValueError(f"{what}: the initialising student has no tensor {name!r} (the teacher has)")
        if tuple(src.shape) != tuple(param.shape):
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(src.shape)} in the initialising student and "
                f"{tuple(param.shape)} in the teacher"
            )


@torch.no_grad()
def init_student(
    teacher: ShowerModel, init: ShowerModel, num_steps: int = 1
) -> tuple[ShowerModel, StudentInitReport]:
    """The consistency student of ``teacher`` (sampler ``consistency`` × ``num_steps``) with the backbone of
    ``init`` (a distilled student of the base) and the teacher's row for each detector ``init`` does not
    know; see the module docstring. Returns the student and a :class:`StudentInitReport`."""
    from caloforge.distill.pipeline import make_student

    check_student_init(teacher, init)
    student = make_student(teacher, num_steps)
    init_params = dict(init.named_parameters())
    copied: list[str] = []
    kept: list[str] = []
    detector_rows: dict[str, str] = {}
    for name, param in student.named_parameters():
        if name.startswith(TEACHER_PREFIXES):
            kept.append(name)
        elif name == DETECTOR_EMBED:
            src_w = init_params[name]
            for det in student.vocab.detectors:
                if det in init.vocab.detectors:
                    param[student.vocab.detector_index(det)] = src_w[init.vocab.detector_index(det)].to(param)
                    detector_rows[det] = "student_init"
                else:
                    detector_rows[det] = "teacher"
            copied.append(name)
        else:
            param.copy_(init_params[name].to(device=param.device, dtype=param.dtype))
            copied.append(name)
    params = set(dict(student.named_parameters()))
    kept.extend(k for k in student.state_dict() if k not in params and k.startswith(FITTED_PREFIXES))
    notes = []
    if not any(src == "student_init" for src in detector_rows.values()):
        notes.append("no detector in common: every detector row is the teacher's")
    report = StudentInitReport(
        copied=tuple(copied),
        detector_rows=detector_rows,
        kept_teacher=tuple(kept),
        init_mesh=init.mesh_shape,
        teacher_mesh=teacher.mesh_shape,
        notes=tuple(notes),
    )
    return student, report


@torch.no_grad()
def probe_consistency_loss(
    student: ShowerModel,
    teacher: ShowerModel,
    showers_mev: np.ndarray,
    conditions: Conditions,
    *,
    num_scales: int = 32,
    teacher_solver: str = "heun",
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Mean consistency loss ‖f_θ(x_{n+1}, t_{n+1}) − f_θ(x̂_n, t_n)‖² of ``student`` on the probe
    (``showers_mev``, ``conditions``): the teacher's ``teacher_solver`` step between adjacent levels of the
    ``num_scales`` grid, level indices and noise drawn from ``seed`` (the same for every student of the same
    teacher), the student as its own target. Lower: the student agrees more with itself along the
    teacher's ODE (zero for a perfect consistency function)."""
    from caloforge.platform.objectives.consistency import check_teacher, consistency_distillation_loss

    check_teacher(student, teacher)
    if len(showers_mev) != len(conditions) or len(conditions) < 1:
        raise ValueError(
            f"probe: {len(showers_mev)} showers and {len(conditions)} conditions (equal and >= 1 needed)"
        )
    student, teacher = student.eval(), teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    levels = student.denoiser.cd_levels(num_scales)
    total, count = 0.0, 0
    for start in range(0, len(conditions), batch_size):
        stop = min(start + batch_size, len(conditions))
        showers = torch.as_tensor(np.asarray(showers_mev[start:stop], dtype=np.float32))
        x1 = student.to_model_space(showers)
        cond = student.encode_conditions(conditions.subset(slice(start, stop)))
        # as in training: the data's own layer energies (unchanged for a student that does not read them)
        cond = student.with_layers(cond, student.layer_energies_mev(showers))
        n_B = torch.randint(0, num_scales - 1, (stop - start,), generator=gen)
        noise = torch.randn(x1.shape, generator=gen)
        loss_B = consistency_distillation_loss(
            student=student,
            target=student,
            teacher_velocity=teacher.velocity,
            noisy=student.denoiser.noisy,
            levels_N=levels,
            x1_BZPR=x1,
            n_B=n_B,
            noise_BZPR=noise,
            cond=cond,
            teacher_solver=teacher_solver,
        )
        total += float(loss_B.sum())
        count += stop - start
    return total / count
