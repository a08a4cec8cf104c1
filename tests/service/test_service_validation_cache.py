"""The validator's caches (what makes many concurrent submissions cheap; benchmarks/service.py measures it):
requests that differ only in what a plan does not depend on (seed, loop, metrics, gate) share one plan;
anything the plan reads (eval.n_showers, the registered name) gets a plan of its own; the config file is
parsed once and re-read when it changes, with load_config's checks and messages."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from caloforge.adapt.service.schemas import SubmitRequest
from caloforge.adapt.service.validation import SpecError, Validator


def _request(service, **changes) -> SubmitRequest:  # type: ignore[no-untyped-def]
    body = {
        "base": str(service.base_bundle),
        "detector": {"name": "lar-pb"},
        "data": str(service.data),
        "strategy": "full",
        "hyperparameters": {"loop.steps": 4, "eval.n_showers": 20},
        "seed": 1,
    }
    body.update(changes)
    return SubmitRequest.model_validate(body)


def test_plan_cache_keys_on_what_the_plan_reads(service) -> None:  # type: ignore[no-untyped-def]
    validator = Validator(service.config)
    first = validator.validate(_request(service))
    assert first["plan"]["eval_showers"] == 20
    for i, hyper in enumerate(
        [
            {"loop.steps": 7, "eval.n_showers": 20},
            {"loop.optim.lr": 1e-5, "eval.n_showers": 20, "gate.max_auc_high": 1.0},
            {"eval.n_showers": 20, "eval.metrics.classifier.epochs": 1, "progress": False},
        ]
    ):
        spec = validator.validate(_request(service, seed=10 + i, hyperparameters=hyper))
        assert spec["plan"] == first["plan"] and spec["seed"] == 10 + i and spec["hyperparameters"] == hyper
    assert len(validator._plans) == 1  # one plan for all four requests
    other = validator.validate(_request(service, hyperparameters={"eval.n_showers": 21}))
    named = validator.validate(
        _request(service, registration={"model_name": "caloforge-lar-pb-bench", "alias": "candidate"})
    )
    assert other["plan"]["eval_showers"] == 21
    assert named["plan"]["registered_model"] == "caloforge-lar-pb-bench"
    assert len(validator._plans) == 3


def test_config_file_is_parsed_once_and_reread_when_it_changes(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    configs = tmp_path / "configs"
    (configs / "adapt").mkdir(parents=True)
    source = Path(service.config.configs_dir) / "adapt" / "full.yaml"
    target = configs / "adapt" / "full.yaml"
    target.write_text(source.read_text())
    validator = Validator(dataclasses.replace(service.config, configs_dir=configs))
    assert validator.validate(_request(service))["strategy"] == "full"
    with pytest.raises(SpecError) as err:
        validator.validate(_request(service, hyperparameters={"loop.stepz": 4}))
    assert err.value.field == "hyperparameters.loop.stepz" and "stepz" in err.value.message
    target.write_text(source.read_text().replace("batch_size: 32", "batch_size: 0"))
    later = time.time() + 5  # a different mtime even on a coarse clock
    os.utime(target, (later, later))
    with pytest.raises(SpecError) as err:
        validator.validate(_request(service))
    assert "batch_size" in err.value.message and str(target) in err.value.message
