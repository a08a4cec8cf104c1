"""Adaptation configs: every shipped config loads strictly; field errors are named; the gate's arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from caloforge.adapt.config import AdaptConfig, GateConfig, LoraOptions, StrategyConfig
from caloforge.adapt.pipeline import apply_gate
from caloforge.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "adapt"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_adapt_config_loads_and_names_its_strategy(path: Path) -> None:
    config = load_config(AdaptConfig, path)
    assert config.strategy.kind == path.stem.removesuffix("-ray") and config.name == path.stem
    assert (config.cluster is not None) == path.stem.endswith("-ray")  # <kind>-ray: on Ray Train workers
    assert config.register.alias == "candidate" and config.gate.metric == "fpd"


def test_config_mistakes_are_named() -> None:
    with pytest.raises(ConfigError, match=r"full.yaml .*strategy.kind: 'prefix' is not one of"):
        load_config(AdaptConfig, CONFIGS / "full.yaml", ["strategy.kind=prefix"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(AdaptConfig, CONFIGS / "lora.yaml", ["strategy.lora.rnk=4"])
    for kwargs, match in (
        ({"rank": 0}, "rank must be >= 1"),
        ({"targets": ("attn.qkv", "conv")}, "subset of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=match):
            LoraOptions(**kwargs)
    with pytest.raises(ValueError, match=r"gate.max_auc_high must be in \[0.5, 1\]"):
        GateConfig(max_auc_high=0.3)
    with pytest.raises(ValueError, match=r"gate\.metric must be one of"):
        GateConfig(metric="loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="energy_head only applies"):
        StrategyConfig(kind="lora", energy_head=True)
    with pytest.raises(ValueError, match="fault_injection_step"):
        AdaptConfig(fault_injection_step=10_000)


def test_gate_checks_absolute_aucs_and_ratios_to_the_floor() -> None:
    metrics = {
        "auc_low": 0.9,
        "auc_high": 0.7,
        "fpd": 30.0,
        "floor/fpd": 10.0,
        "floor/fpd_err": 2.0,
        "kpd": 1.0,
        "floor/kpd": 0.0,
    }
    passing = AdaptConfig(gate=GateConfig(max_auc_high=0.75, max_fpd_over_floor=3.5))
    result = apply_gate(passing, metrics)
    assert result.passed and result.checks["fpd_over_floor"]["value"] == pytest.approx(3.0)
    failing = AdaptConfig(gate=GateConfig(max_auc_low=0.8, max_fpd_over_floor=2.0, max_kpd_over_floor=5.0))
    result = apply_gate(failing, metrics)
    assert not result.passed
    assert sorted(result.reasons()) == [
        "auc_low = 0.9 > 0.8",
        "fpd_over_floor = 3 > 2",
        "kpd_over_floor = inf > 5",  # a zero floor cannot certify a ratio
    ]
    # a floor at or below zero is measured against its statistical error instead
    noisy = apply_gate(passing, {**metrics, "auc_high": 0.7, "floor/fpd": -1.0, "floor/fpd_err": 10.0})
    assert noisy.passed and noisy.checks["fpd_over_floor"]["value"] == pytest.approx(3.0)
    missing = apply_gate(AdaptConfig(gate=GateConfig(max_auc_high=0.9)), {})
    assert not missing.passed and math.isnan(missing.checks["auc_high"]["value"])
    assert apply_gate(AdaptConfig(gate=GateConfig()), {}).passed  # no bounds: nothing to fail
