"""The one-network route for flow-matching teachers: the shortcut student (``caloforge distill --method
shortcut``; docs/distillation.md).

The student is the teacher's network in the step-conditioned ``shortcut`` parametrisation
(``denoisers.ShortcutDenoiser``): the same weights (strict, besides the new step embedding, whose output
layer is zero) so that at the start u(x, t, d) = v_teacher(x, t) for every step size d and the ``shortcut``
sampler at N steps is the teacher's N-step Euler solver. Fine-tuning with the ``shortcut`` objective
(``platform/objectives/shortcut.py``) then teaches the large steps.
"""

from __future__ import annotations

import dataclasses

from caloforge.platform.denoisers import STEP_TEACHERS
from caloforge.platform.samplers import SHORTCUT
from caloforge.platform.shower_model import ShowerModel

STEP_EMBEDDER_PREFIX = "denoiser.net.step_embedder."


def make_shortcut_student(teacher: ShowerModel, num_steps: int = 1) -> ShowerModel:
    """The ``shortcut`` student of a flow-matching ``teacher`` (see the module docstring), default sampler
    ``shortcut`` × ``num_steps``."""
    param = teacher.config.parametrisation
    allowed = sorted({p for ps in STEP_TEACHERS.values() for p in ps})
    if param not in allowed:
        raise ValueError(
            f"method shortcut: the teacher is parametrised {param!r}; it distils {allowed} teachers"
        )
    cfg = dataclasses.replace(
        teacher.config, parametrisation="shortcut", sampler=SHORTCUT, num_steps=num_steps
    )
    student = ShowerModel(cfg, teacher.vocab, teacher.mesh, lineage=teacher.lineage)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith(STEP_EMBEDDER_PREFIX) for k in missing):
        raise ValueError(
            f"shortcut student: teacher weights do not fit (missing {missing}, unexpected {unexpected})"
        )
    return student.to(teacher.device)


__all__ = ["STEP_EMBEDDER_PREFIX", "make_shortcut_student"]
