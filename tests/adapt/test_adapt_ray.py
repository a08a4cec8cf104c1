"""``caloforge adapt`` on Ray Train workers (a ``cluster:`` block): the embedded local Ray, 2 CPU workers,
DDP and DeepSpeed ZeRO-2, a real base bundle and a real sqlite registry.

- ``embedding`` on DDP: the rows outside the new detector's stay bitwise the base's, the version is
  registered; resuming the finished run starts no worker;
- ``lora`` on DeepSpeed ZeRO-2 (peft's modules inside the engine): the adapter is saved in peft's format
  and the merged bundle equals the adapter applied to the base;
- the config's mistakes are named errors before anything runs.

A worker failure and the restart of the group from the latest checkpoint go through the same shared code
(``training/ray/worker.py``) as pretraining's, whose end-to-end test injects one; here it would add a
worker-group start (about half a minute on a shared 2-core machine) to each run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from adapt_helpers import tiny_config

from caloforge.adapt.config import AdaptConfig, LoraOptions, StrategyConfig
from caloforge.adapt.distributed import train_on_ray
from caloforge.adapt.pipeline import AdaptRequest, plan_adaptation, run_adaptation
from caloforge.config import ConfigError, load_config
from caloforge.datasets.streaming import load_split
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.config import LoopConfig
from caloforge.training.hooks import read_metrics
from caloforge.training.ray.config import ClusterConfig, DeepSpeedOptions, EngineConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "adapt"
EMBED = "denoiser.net.detector_embed.weight"


@pytest.fixture(scope="module")
def ray_up() -> Iterator[None]:
    """One embedded local Ray (2 CPUs) for this module's runs (an existing session is reused)."""
    from caloforge.training.ray.launch import ray_session

    with ray_session(num_cpus=2):
        yield


def _ray_config(engine: EngineConfig, **changes) -> AdaptConfig:
    return tiny_config(cluster=ClusterConfig(num_workers=2, max_failures=1), engine=engine, **changes)


def _attempts(run_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (run_dir / "attempts").glob("*.json")]
    return sorted(records, key=lambda r: r["start_step"])


@pytest.mark.slow
def test_embedding_on_ddp_workers_keeps_other_rows_registers_and_resumes_without_workers(
    ray_up, registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    cfg = _ray_config(EngineConfig(backend="ddp"), strategy=StrategyConfig(kind="embedding"))
    request = AdaptRequest(str(base_bundle), "lar-pb", lar_pb_shards)
    run_dir = tmp_path / "run"
    result = run_adaptation(cfg, request, run_dir)
    assert result.steps == 4 and result.registered is not None and result.registered["version"] == 1
    assert result.trainable_parameters == 64 and result.gate.passed
    starts = _attempts(run_dir)
    assert [(a["start_step"], a["world_size"], a["engine"]) for a in starts] == [(0, 2, "ddp")]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 4]
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000002",
        "checkpoint_00000004",
    ]
    # only the new detector's row trained: every other weight and row is bitwise the base's
    start = ShowerModel.load(base_bundle).with_detector("lar-pb").state_dict()
    adapted = ShowerModel.load(result.model_dir)
    row = adapted.vocab.detector_index("lar-pb")
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == {EMBED}
    weight = adapted.state_dict()[EMBED]
    others = [i for i in range(weight.shape[0]) if i != row]
    assert torch.equal(weight[others], start[EMBED][others])
    assert adapted.lineage.kind == "adapted" and adapted.lineage.strategy == "embedding"
    assert registry.get("caloforge-lar-pb", version=1).tags["caloforge.steps"] == "4"
    # resuming a run whose training finished (e.g. a crash in evaluation) starts no worker: the training
    # step hands back what rank 0 wrote (registration is idempotent per run: test_adapt_pipeline.py)
    run_id = json.loads((run_dir / "request.json").read_text())["run_id"]
    plan = plan_adaptation(cfg, request, run_dir)
    again = train_on_ray(cfg, request, plan, run_dir, run_id, resume=True)
    assert (again.steps, again.trainable_parameters, again.model_dir) == (4, 64, run_dir / "model")
    assert again.worker_group_starts == 0 and len(_attempts(run_dir)) == 1


@pytest.mark.slow
def test_lora_on_deepspeed_zero2_workers_saves_the_peft_adapter_equal_to_the_bundle(
    ray_up, registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    from caloforge.adapt.strategies import load_adapter

    engine = EngineConfig(backend="deepspeed", deepspeed=DeepSpeedOptions(zero_stage=2))
    # the recipe's LoRA (configs/adapt/lora.yaml): adapters, the detector's row and the layer-energy head
    strategy = StrategyConfig(kind="lora", lora=LoraOptions(energy_head=True))
    cfg = _ray_config(engine, strategy=strategy)
    request = AdaptRequest(str(base_bundle), "lar-pb", lar_pb_shards)
    run_dir = tmp_path / "run"
    result = run_adaptation(cfg, request, run_dir)
    assert result.steps == 4 and result.registered["name"] == "caloforge-lar-pb"
    assert [(a["start_step"], a["engine"]) for a in _attempts(run_dir)] == [(0, "deepspeed")]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 4]
    assert result.adapter_dir == run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in result.adapter_dir.iterdir()
    }
    bundle = ShowerModel.load(result.model_dir)
    base = ShowerModel.load(base_bundle).with_detector("lar-pb")
    head = sum(p.numel() for p in base.energy_head.parameters())
    # trained: adapters, the row's delta and the head; the total counts the head once (not peft's frozen copy)
    assert head < result.trainable_parameters < result.total_parameters
    size = sum(p.numel() for p in base.parameters())
    assert result.total_parameters == size + result.trainable_parameters - head
    assert any(  # the head trained (its copy in peft's modules_to_save), and the adapter carries it
        not torch.equal(v, base.state_dict()[k])
        for k, v in bundle.state_dict().items()
        if k.startswith("energy_head.")
    )
    reloaded = load_adapter(base, result.adapter_dir)
    for name, value in bundle.state_dict().items():
        torch.testing.assert_close(value, reloaded.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in bundle.state_dict().items())
    weight, start = bundle.state_dict()[EMBED], base.state_dict()[EMBED]  # peft's trainable token: one row
    others = [i for i in range(weight.shape[0]) if i != bundle.vocab.detector_index("lar-pb")]
    assert torch.equal(weight[others], start[others]) and not torch.equal(weight, start)
    showers = load_split(lar_pb_shards, "test", max_showers=4)
    x1 = bundle.to_model_space(showers.showers_NZPR)
    ct = bundle.encode_conditions(showers.conditions)
    t = torch.full((4,), 0.4)
    with torch.no_grad():
        torch.testing.assert_close(bundle(x1, t, ct), reloaded(x1, t, ct), rtol=1e-4, atol=1e-5)


def test_ray_settings_are_checked_before_anything_runs(
    registry, base_bundle, lar_pb_shards, tmp_path
) -> None:
    base = CONFIGS / "full-ray.yaml"
    for overrides, match in (
        (["cluster.num_workers=0"], r"full-ray.yaml.*cluster.num_workers must be >= 1, got 0"),
        (["engine.backend=horovod"], r"engine.backend: 'horovod' is not one of \['deepspeed', 'ddp'\]"),
        (["engine.deepspeed.zero_stage=3"], r"engine.deepspeed.zero_stage must be 0, 1 or 2"),
        (
            ["cluster.num_workers=3"],
            r"loop.batch_size: batch_size=32 is not divisible by workers × grad_accum",
        ),
        (["device=cpu"], r"device: 'cpu' with a cluster: block"),
        (["cluster=null", "engine.backend=ddp"], r"engine: applies to training on Ray Train workers only"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(AdaptConfig, base, overrides)
    config = load_config(AdaptConfig, base)
    assert config.cluster.num_workers == 2 and config.engine.deepspeed.zero_stage == 2
    assert config.world_size == 2 and config.stream_config().batch_size == 16
    with pytest.raises(ValueError, match=r"loop\.batch_size"):
        AdaptConfig(loop=LoopConfig(batch_size=6), cluster=ClusterConfig(num_workers=4))
    request = AdaptRequest(str(base_bundle), "lar-pb", lar_pb_shards)
    if not torch.cuda.is_available():  # GPUs asked for on a machine without: named, before anything runs
        gpu = tiny_config(cluster=ClusterConfig(num_workers=2, use_gpu=True))
        with pytest.raises(ValueError, match=r"cluster\.use_gpu: 2 workers × 1 GPU need 2 GPUs"):
            run_adaptation(gpu, request, tmp_path / "gpu")
        assert not (tmp_path / "gpu" / "request.json").exists()
    with pytest.raises(ValueError, match=r"--run-dir .*its name names the Ray Train run"):
        run_adaptation(tiny_config(cluster=ClusterConfig(num_workers=2)), request, tmp_path / "bad name")
    assert registry.list_models() == []
