"""Pretraining config: shipped configs load, the generated DeepSpeed JSON, and the clear errors the driver
raises before any worker starts (no Ray here)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from caloforge.cli import main
from caloforge.config import ConfigError, from_dict, load_config
from caloforge.pretrain.config import (
    DeepSpeedOptions,
    PretrainConfig,
    resume_differences,
    validate_pretrain_config,
)
from caloforge.pretrain.deepspeed_backend import deepspeed_config
from caloforge.pretrain.launch import run_pretrain
from caloforge.pretrain.rundir import RunDir, resolve_storage_path, validate_run_name
from caloforge.training.config import LoopConfig
from caloforge.training.deepspeed_backend import build_deepspeed_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def base(shards: Path, storage: Path | None = None) -> dict:
    return {
        "name": "cfgtest",
        "data": {"shards": str(shards)},
        "model": {"backbone": "debug"},
        "loop": {"steps": 4, "batch_size": 8, "grad_accum": 2},
        "cluster": {"num_workers": 2, "storage_path": str(storage or shards.parent / "runs")},
    }


def build(data: dict) -> PretrainConfig:
    return from_dict(PretrainConfig, data, "test")


def with_(data: dict, path: str, value: object) -> dict:
    out = copy.deepcopy(data)
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def test_shipped_configs_load_and_generate_deepspeed_json() -> None:
    debug = load_config(PretrainConfig, CONFIGS / "debug.yaml")
    assert debug.cluster.num_workers == 2 and not debug.cluster.use_gpu
    assert debug.engine.backend == "deepspeed" and debug.engine.deepspeed.zero_stage == 2
    ds = deepspeed_config(debug, debug.cluster.num_workers)
    assert "torch_autocast" not in ds  # fp32 on CPU

    real = load_config(PretrainConfig, CONFIGS / "s_6det.yaml")
    assert real.model.backbone == "S" and real.cluster.use_gpu
    assert set(real.detectors) == {"fe-sci", "odd-like", "par04-scipb", "par04-siw", "pbwo4", "wsi-granular"}
    assert "lar-pb" not in real.detectors  # held out for adaptation
    ds = deepspeed_config(real, real.cluster.num_workers)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["train_batch_size"] == real.loop.batch_size
    assert (
        ds["train_micro_batch_size_per_gpu"] * real.loop.grad_accum * real.cluster.num_workers
        == real.loop.batch_size
    )


def test_deepspeed_json_is_generated_from_the_loop_and_accepted_by_deepspeed() -> None:
    loop = LoopConfig(batch_size=48, grad_accum=3, max_grad_norm=None, precision="auto")
    ds = build_deepspeed_config(loop, DeepSpeedOptions(zero_stage=1, reduce_bucket_size=1000), 4, "fp32")
    assert ds["train_batch_size"] == 48 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_allow_untested_optimizer"] is True  # torch.optim.AdamW, never DeepSpeed's fused Adam
    assert build_deepspeed_config(loop, DeepSpeedOptions(zero_stage=0), 4, "fp32")["zero_optimization"] == {
        "stage": 0
    }
    with pytest.raises(ValueError, match="not divisible by workers × grad_accum = 5 × 3"):
        build_deepspeed_config(loop, DeepSpeedOptions(), 5, "fp32")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        build_deepspeed_config(loop, DeepSpeedOptions(), 4, "auto")  # type: ignore[arg-type]

    from deepspeed.runtime.config import DeepSpeedConfig  # DeepSpeed's own parser (one process: world size 1)

    parsed = DeepSpeedConfig(
        build_deepspeed_config(LoopConfig(batch_size=6, grad_accum=2), DeepSpeedOptions(), 1, "bf16")
    )
    assert parsed.torch_autocast_enabled and str(parsed.torch_autocast_dtype) == "torch.bfloat16"
    assert not parsed.bfloat16_config.enabled  # fp32 master weights, bf16 compute
    assert parsed.zero_optimization_stage == 2 and parsed.train_micro_batch_size_per_gpu == 3
    assert parsed.gradient_clipping == 1.0


def test_config_field_errors_name_the_key(shard_set: Path) -> None:
    cfg = base(shard_set)
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1 or 2"):
        build(with_(cfg, "engine.deepspeed.zero_stage", 3))
    with pytest.raises(ConfigError, match=r"fault_injection.rank=2 is not a worker rank"):
        build(with_(cfg, "fault_injection", {"rank": 2, "step": 1}))
    with pytest.raises(ConfigError, match=r"fault_injection.step must be in"):
        build(with_(cfg, "fault_injection", {"rank": 0, "step": 4}))
    with pytest.raises(ConfigError, match="must be 'resampled' for pretraining"):
        build(with_(cfg, "data.stream", {"mode": "single_pass"}))
    with pytest.raises(ConfigError, match="unknown key"):
        build(with_(cfg, "cluster.num_gpus", 1))
    with pytest.raises(ConfigError, match=r"validation.sampler: unknown"):
        build(with_(cfg, "validation.sampler", "leapfrog"))
    ddp = with_(cfg, "engine.backend", "ddp")
    with pytest.raises(ConfigError, match=r"find_unused_parameters=true cannot train model\.layer_energy"):
        build(with_(ddp, "engine.find_unused_parameters", True))
    unused = with_(ddp, "engine.find_unused_parameters", True)
    no_head = with_(unused, "model.layer_energy", {"enabled": False})
    assert build(no_head).engine.find_unused_parameters


def test_validation_errors_before_any_worker(shard_set: Path, tmp_path: Path) -> None:
    cfg = base(shard_set)
    plan = validate_pretrain_config(build(cfg))
    assert (
        plan.detectors == ("par04-siw", "pbwo4")
        and plan.mesh_shape == (45, 16, 9)
        and plan.micro_batch_size == 2
    )
    assert sum(plan.probabilities.values()) == pytest.approx(1.0)

    with pytest.raises(ValueError, match=r"unknown detector 'lar-pb'"):
        validate_pretrain_config(
            build(with_(cfg, "data.stream", {"mixing": "explicit", "weights": {"lar-pb": 1.0}}))
        )
    with pytest.raises(ValueError, match=r"not divisible by workers × grad_accum = 3 × 2"):
        validate_pretrain_config(build(with_(with_(cfg, "loop.batch_size", 10), "cluster.num_workers", 3)))
    with pytest.raises(ValueError, match="manifest not found"):
        validate_pretrain_config(build(with_(cfg, "data.shards", str(tmp_path / "nowhere"))))
    with pytest.raises(ValueError, match="detectors: \\['lar-pb'\\] are not in the data"):
        validate_pretrain_config(build(with_(cfg, "detectors", ["par04-siw", "pbwo4", "lar-pb"])))
    with pytest.raises(ValueError, match="need at least 12 train shards per mixing group"):
        validate_pretrain_config(
            build(with_(with_(cfg, "cluster.num_workers", 4), "data.stream", {"num_workers": 3}))
        )
    with pytest.raises(ValueError, match=r"data.stream.batch_size=5"):
        validate_pretrain_config(build(with_(cfg, "data.stream", {"batch_size": 5})))
    with pytest.raises(ValueError, match=r"model: .*patch"):
        validate_pretrain_config(build(with_(cfg, "model.patch_size", [4, 2, 3])))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match=r"cluster.use_gpu: 2 workers × 1 GPU need 2 GPUs, this machine has 0"
        ):
            validate_pretrain_config(build(with_(cfg, "cluster.use_gpu", True)))


def test_run_directory_rules(shard_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = build(base(shard_set, tmp_path / "runs"))
    with pytest.raises(ValueError, match="there is no run 'cfgtest'"):
        run_pretrain(cfg, resume=True)
    run = RunDir(str(tmp_path / "runs"), "cfgtest")
    run.write_json("caloforge_run.json", {"name": "cfgtest"})
    with pytest.raises(ValueError, match=r"already exists .* pass --resume"):
        run_pretrain(cfg)
    # resuming (explicitly or "auto" because the run exists) checks the stored config first
    from caloforge.config import to_dict

    stored = to_dict(build(with_(base(shard_set, tmp_path / "runs"), "model.backbone", "S")))
    run.write_json("caloforge_run.json", {"name": "cfgtest", "config": stored})
    with pytest.raises(ValueError, match=r"cannot change on resume: model.backbone: 'S' -> 'debug'"):
        run_pretrain(cfg, resume="auto")
    with pytest.raises(ValueError, match="run name 'a/b'"):
        validate_run_name("a/b")
    assert resolve_storage_path("s3://bucket/runs/") == "s3://bucket/runs"
    assert resolve_storage_path("rel") == str(Path("rel").resolve())
    # the CLI: one-line errors (exit 2); --dry-run prints the resolved config and the DeepSpeed JSON
    assert (
        main(["pretrain", "--config", str(CONFIGS / "debug.yaml"), "--set", "loop.batch_size=7", "--dry-run"])
        == 2
    )
    assert "batch_size=7 is not divisible by grad_accum" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(CONFIGS / "debug.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "zero_stage: 2" in out and '"train_micro_batch_size_per_gpu"' in out


def test_resume_may_change_steps_but_not_the_model_or_batch_geometry(shard_set: Path) -> None:
    from caloforge.config import to_dict

    old = to_dict(build(base(shard_set)))
    assert resume_differences(old, to_dict(build(with_(base(shard_set), "loop.steps", 40)))) == []
    assert resume_differences(old, to_dict(build(with_(base(shard_set), "validation.every", 5)))) == []
    diffs = resume_differences(
        old, to_dict(build(with_(with_(base(shard_set), "model.backbone", "S"), "loop.grad_accum", 1)))
    )
    assert diffs == ["loop.grad_accum: 2 -> 1", "model.backbone: 'debug' -> 'S'"]
