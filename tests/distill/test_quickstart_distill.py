"""The quickstart's distillation stage (stage 8) is configured by ``configs/quickstart.yaml``: its
distillation config with the quickstart's overrides is a valid, small ``DistillConfig`` (the stage itself
runs in ``make quickstart``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from caloforge.config import ConfigError, load_config
from caloforge.distill.config import DistillConfig
from caloforge.quickstart import QuickstartConfig

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_distils_the_adapted_model_with_a_two_step_bespoke_solver() -> None:
    config = load_config(QuickstartConfig, REPO / "configs" / "quickstart.yaml")
    q = config.distill
    distill = load_config(DistillConfig, REPO / q.config, list(q.overrides))
    assert distill.method == "bns" and distill.bns.steps == (2,) and distill.bns.num_steps == 2
    assert distill.register.enabled and distill.register.promote_alias == "fast"
    # a budget of seconds: few reference and training solves
    assert distill.bns.reference_steps <= 16 and distill.bns.n_train <= 64 and distill.bns.iterations <= 60
    assert q.timing_batch >= 1


def test_quickstart_refuses_bad_stage_settings() -> None:
    path = REPO / "configs" / "quickstart.yaml"
    with pytest.raises(ConfigError, match=r"distill\.timing_batch must be >= 1"):
        load_config(QuickstartConfig, path, ["distill.timing_batch=0"])
    with pytest.raises(ConfigError, match=r"distill\.fidelity_showers must be >= 20"):
        load_config(QuickstartConfig, path, ["distill.fidelity_showers=10"])
