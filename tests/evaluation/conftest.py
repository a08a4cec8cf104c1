"""Fixtures of the evaluation tests: two seeds of one simulator configuration and a fast config."""

from __future__ import annotations

from dataclasses import replace

import pytest
from eval_showers import CONFIG_DIR, simulated

from caloforge.config import load_config
from caloforge.datasets.schema import ShowerSet
from caloforge.evaluation.config import EvalConfig


@pytest.fixture(scope="session")
def sim_a() -> ShowerSet:
    return simulated(seed=101)


@pytest.fixture(scope="session")
def sim_b() -> ShowerSet:
    return simulated(seed=202)


@pytest.fixture(scope="session")
def ci_config() -> EvalConfig:
    """configs/eval/ci.yaml with smaller classifiers (these tests run on 2 shared CPU cores)."""
    cfg = load_config(EvalConfig, CONFIG_DIR / "ci.yaml")
    return replace(cfg, classifier=replace(cfg.classifier, hidden=32, epochs=6, max_showers_per_class=2000))
