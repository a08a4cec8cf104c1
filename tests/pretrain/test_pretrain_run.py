"""End to end: ``caloforge pretrain`` on the embedded local Ray with 2 CPU workers, DeepSpeed ZeRO-2, a tiny
shard set and the debug model.

One run (to keep the suite short) covers: an injected worker failure at step 3 → Ray restarts the worker
group from the step-2 checkpoint and the run reaches its last step on one consistent timeline; each rank
streamed its own shards; the MLflow run holds params, metrics, validation and the bundle artifact; the
storage keeps ``num_to_keep`` complete checkpoints; relaunching the name without ``--resume`` is refused
before any worker starts; ``--resume`` with a raised ``loop.steps`` continues the finished run, the same
MLflow run, and registers the final bundle through the registry hook.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from caloforge.cli import main
from caloforge.config import load_config
from caloforge.datasets.shards import Manifest, shard_samples
from caloforge.platform.conditioning import Conditions
from caloforge.platform.shower_model import ShowerModel
from caloforge.pretrain.audit import sample_fingerprint
from caloforge.pretrain.config import PretrainConfig
from caloforge.pretrain.hooks import FAULT_MARKER
from caloforge.pretrain.launch import run_pretrain
from caloforge.pretrain.rundir import RunDir
from caloforge.training.hooks import read_metrics
from caloforge.training.ray.checkpoints import verify_checkpoint


def debug_config(shards: Path, storage: Path) -> dict:
    return {
        "name": "e2e",
        "data": {"shards": str(shards), "stream": {"shuffle_buffer": 16}, "audit_samples": 8},
        "model": {
            "backbone": "debug",
            "patch_size": [9, 4, 3],
            "parametrisation": "edm",
            "num_steps": 2,
            "sampler": "euler",
        },
        "loop": {
            "steps": 6,
            "batch_size": 8,
            "grad_accum": 2,
            "log_every": 1,
            "checkpoint_every": 2,
            "optim": {"lr": 2e-3},
            "ema": {"decay": 0.9},
        },
        "engine": {"backend": "deepspeed", "deepspeed": {"zero_stage": 2}},
        "cluster": {"num_workers": 2, "storage_path": str(storage), "max_failures": 1, "num_to_keep": 2},
        "validation": {"showers_per_detector": 4, "num_steps": 2, "batch_size": 8},
        "tracking": {"experiment": "test-pretrain"},
        "fault_injection": {"rank": 1, "step": 3},
    }


def _attempts(run: RunDir) -> list[dict]:
    return [run.read_json(f"attempts/{n}") for n in run.listdir("attempts")]


@pytest.mark.slow
def test_pretrain_survives_worker_failure_and_resumes_for_more_steps(
    ray_local: None,
    shard_set: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    cfg_path = tmp_path / "debug.yaml"
    cfg_path.write_text(yaml.safe_dump(debug_config(shard_set, tmp_path / "runs")))
    cfg = load_config(PretrainConfig, cfg_path)

    # -- a fresh run with a failure injected in rank 1 after step 3 -------------------------------------
    result = run_pretrain(cfg)
    run = RunDir(str(tmp_path / "runs"), "e2e")
    assert result.step == 6 and result.run_uri == run.uri
    assert result.worker_group_starts == 2  # the first group and one restart
    assert run.read_json(FAULT_MARKER)["rank"] == 1 and run.read_json(FAULT_MARKER)["step"] == 3
    starts = sorted(_attempts(run), key=lambda a: a["start_step"])
    assert [a["start_step"] for a in starts] == [0, 2]
    assert starts[1]["restored_from"].endswith("checkpoint_00000002")

    # one timeline: every step once, counters and schedule continue where the checkpoint left them
    rows = read_metrics(run.local_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["samples_seen"] for r in rows] == [8.0 * s for s in range(1, 7)]
    assert [r["ema_decay"] for r in rows] == pytest.approx([(1 + t) / (10 + t) for t in range(6)])
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    client = MlflowClient(tracking_uri)
    loss_history = client.get_metric_history(result.mlflow_run_id, "loss")
    by_step: dict[int, list[float]] = {}
    for m in loss_history:
        by_step.setdefault(m.step, []).append(m.value)
    assert (
        sorted(by_step) == [1, 2, 3, 4, 5, 6] and len(by_step[3]) == 2
    )  # step 3 before and after the restart
    lr_history = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "lr")}
    assert lr_history[3] == pytest.approx(rows[2]["lr"])  # the restored scheduler, not a fresh one
    assert rows[2]["loss"] in by_step[3]  # metrics.jsonl kept the post-restart value of step 3

    # each rank streamed its own shards (fingerprints of its first samples → the shards holding them)
    manifest = Manifest.load(shard_set)
    where = {
        sample_fingerprint(arr): shard.name
        for shard in manifest.shards("train")
        for _, arr in shard_samples(manifest, shard)
    }
    read = [
        {where[f] for f in run.read_json(f"audit/step00000000_rank{r:05d}.json")["fingerprints"]}
        for r in (0, 1)
    ]
    assert read[0] and read[1] and not read[0] & read[1]

    # MLflow: params, metrics, validation and the bundle artifact
    mlrun = client.get_run(result.mlflow_run_id)
    params = mlrun.data.params
    assert params["config.loop.steps"] == "6" and params["config.engine.deepspeed.zero_stage"] == "2"
    assert params["dataset_manifest_hash"] == manifest.fingerprint
    assert {"versions.torch", "versions.ray", "versions.deepspeed", "versions.caloforge"} <= set(params)
    assert mlrun.info.status == "FINISHED"
    metrics = mlrun.data.metrics
    assert {"loss", "lr", "samples_per_s", "grad_norm"} <= set(metrics) and metrics["samples_per_s"] > 0
    for det in ("par04-siw", "pbwo4"):
        assert f"val/{det}/etot_ratio" in metrics and f"val/{det}/long_profile_sep" in metrics
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "bundle")}
    assert {"bundle/config.json", "bundle/model.safetensors"} <= artifacts

    # the bundle (EMA weights) loads and generates for the pretraining detectors
    model = ShowerModel.load(run.local_path / "bundle")
    assert (
        model.vocab.detectors == ("par04-siw", "pbwo4")
        and model.lineage.dataset_manifest_hash == manifest.fingerprint
    )
    stats = manifest.stats["per_detector"]
    trained = model.lineage.trained  # the trained ranges, for the model card
    assert trained is not None and trained.particles == ("e-", "gamma")
    assert trained.energy_mev[1] == max(s["energy_mev_max"] for s in stats.values())
    assert model.lineage.kind == "base" and model.lineage.objective == "edm"
    assert model.lineage.extra["steps"] == "6" and model.lineage.extra["ema"] == "true"
    shower = model.generate(Conditions.make([5e3], 1.5, 0.0, 11, "pbwo4"), num_steps=2, sampler="euler")
    assert shower.shape == (1, 45, 16, 9) and np.isfinite(shower).all()

    # storage keeps num_to_keep complete checkpoints; a damaged copy is refused on load
    assert run.ray_checkpoints() == ["checkpoint_00000004", "checkpoint_00000006"]
    meta = verify_checkpoint(run.local_path / "checkpoint_00000006")
    assert meta["step"] == 6 and meta["world_size"] == 2
    damaged = tmp_path / "damaged"
    shutil.copytree(run.local_path / "checkpoint_00000006", damaged)
    (damaged / "trainer_state_rank00001.pt").unlink()
    with pytest.raises(ValueError, match=r"rank 1: trainer_state_rank00001\.pt missing"):
        verify_checkpoint(damaged)
    marker = json.loads((damaged / "_complete" / "rank00000.json").read_text())
    assert "deepspeed/mp_rank_00_model_states.pt" in marker["files"]

    # -- the same name again without --resume: refused before any worker starts ----------------------
    assert main(["pretrain", "--config", str(cfg_path)]) == 2
    assert "already exists" in capsys.readouterr().err

    # -- --resume with more steps: continues the finished run and the same MLflow run, then registers -------
    code = main(
        [
            "pretrain",
            "--config",
            str(cfg_path),
            "--resume",
            "--set",
            "loop.steps=8",
            "--set",
            "tracking.register=true",
        ]
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "steps      8 (resumed at step 6)" in out
    rows = read_metrics(run.local_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[-1]["samples_seen"] == 64.0
    # update 7 follows the new 8-step WSD schedule (warm-up 1, stable 4, √-decay over 3), not the finished one
    assert rows[5]["lr"] < 1e-3 and rows[6]["lr"] == pytest.approx(2e-3 * (1 - math.sqrt(1 / 3)))
    assert {m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")} == set(range(1, 9))
    resumed = client.get_run(result.mlflow_run_id)
    assert resumed.data.tags["caloforge.resume.1.config.loop.steps"] == "8"
    assert resumed.info.status == "FINISHED"
    assert run.ray_checkpoints() == ["checkpoint_00000006", "checkpoint_00000008"]
    assert run.read_json("final_metrics.json")["step"] == 8
    version = client.get_model_version_by_alias("caloforge-base", "candidate")
    assert version.run_id == result.mlflow_run_id
    # no worker left its node-local staging behind (the killed first attempt's is removed by the restart)
    assert not list(Path(tempfile.gettempdir()).glob("caloforge-e2e-rank*"))
