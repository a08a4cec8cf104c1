"""Strict YAML <-> dataclass config loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from caloforge.config import ConfigError, apply_overrides, dump_yaml, from_dict, load_config, read_yaml
from caloforge.training.config import LoopConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    steps: int = 10
    inner: Inner = Inner()
    tags: tuple[str, ...] = ()
    weights: dict[str, float] | None = None


def test_round_trip(tmp_path: Path) -> None:
    cfg = Outer(name="x", steps=3, inner=Inner(lr=0.5, kind="b"), tags=("p", "q"), weights={"d": 1.0})
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  lr: 1.0\n  lrr: 2.0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: inner\.lrr: unknown key"):
        load_config(Outer, path)


def test_wrong_type_and_missing_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"steps: expected int, got 'ten'"):
        from_dict(Outer, {"name": "x", "steps": "ten"})
    with pytest.raises(ConfigError, match=r"name: required key is missing"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match=r"inner\.kind: 'c' is not one of"):
        from_dict(Outer, {"name": "x", "inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"expected int, got True"):
        from_dict(Outer, {"name": "x", "steps": True})


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    cfg = load_config(Outer, path, ["inner.lr=0.25", "steps=7", "tags=[a, b]"])
    assert cfg.inner.lr == 0.25 and cfg.steps == 7 and cfg.tags == ("a", "b")
    assert load_config(Outer, path, ["inner.lr=2e-3"]).inner.lr == 2e-3  # YAML 1.1 reads 2e-3 as a string
    with pytest.raises(ConfigError, match=r"inner\.lr: expected float, got 'fast'"):
        load_config(Outer, path, ["inner.lr=fast"])
    with pytest.raises(ConfigError, match=r"with --set overrides\): inner\.nope: unknown key"):
        load_config(Outer, path, ["inner.nope=1"])
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        apply_overrides({}, ["novalue"])


def test_post_init_validation_is_reported_with_source() -> None:
    with pytest.raises(ConfigError, match=r"not divisible by grad_accum"):
        from_dict(LoopConfig, {"batch_size": 10, "grad_accum": 3}, "loop.yaml")
    with pytest.raises(ValueError, match=r"workers × grad_accum = 4 × 1"):
        LoopConfig(batch_size=10).micro_batch_size(4)


def test_bad_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
