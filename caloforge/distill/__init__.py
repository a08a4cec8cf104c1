"""Distillation: few-step samplers that keep a teacher's fidelity (``caloforge distill``).

- ``bns``: bespoke non-stationary solvers fitted to a frozen model (no weight changes);
- ``config``: the job config (``configs/distill/*.yaml``);
- ``pipeline``: validate → train (consistency distillation) or fit (BNS) → bundle → evaluate vs the teacher
  → gate → register as a ``distilled`` version of the teacher's registered model.
"""
