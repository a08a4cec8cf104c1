"""``caloforge train`` / ``train()``: config validation, dry run, the run directory, resume, refusal of a
different config, and the final bundle with its lineage (tiny simulated data, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from caloforge.cli import main
from caloforge.config import ConfigError, load_config
from caloforge.platform.shower_model import ShowerModel
from caloforge.registry.card import ranges_from_lineage
from caloforge.training.hooks import read_metrics
from caloforge.training.run import TrainConfig, load_train_config, train

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "train" / "debug.yaml"
TINY = [
    "data.simulate.n_per_detector=60",
    "data.simulate.shards.showers_per_shard=20",
    "data.stream.shuffle_buffer=16",
    "loop.steps=4",
    "loop.batch_size=8",
    "loop.grad_accum=2",
    "loop.log_every=2",
    "loop.checkpoint_every=2",
    "eval.every=2",
    "eval.n_showers=8",
    "eval.batch_size=4",
    "model.num_steps=2",
    "progress=false",
]


def test_every_train_config_loads() -> None:
    files = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert files
    for path in files:
        config = load_train_config(path)
        assert config.loop.micro_batch_size(1) >= 1, path


def test_config_validation_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="exactly one of 'shards'"):
        load_config(TrainConfig, DEBUG, ["data.shards=/some/dir"])
    with pytest.raises(ConfigError, match=r"data\.stream\.batch_size=7"):
        load_config(TrainConfig, DEBUG, ["data.stream.batch_size=7"])
    with pytest.raises(ConfigError, match="resampled"):
        load_config(TrainConfig, DEBUG, ["data.stream.mode=single_pass"])
    with pytest.raises(ConfigError, match=r"loop\.optim\.lr"):
        load_config(TrainConfig, DEBUG, ["loop.optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, DEBUG, ["loop.stepz=3"])


def test_dry_run_prints_the_resolved_config(tmp_path, capsys) -> None:
    code = main(
        ["train", "--config", str(DEBUG), "--set", "loop.steps=7", "--dry-run", "--run-dir", str(tmp_path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# run directory: {tmp_path}")
    assert yaml.safe_load(out)["loop"]["steps"] == 7
    assert not any(tmp_path.iterdir())
    assert main(["train", "--dry-run"]) == 2  # --config is required


def test_train_writes_the_run_directory_and_resumes(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(DEBUG),
            "--run-dir",
            str(run_dir),
            *[arg for s in TINY for arg in ("--set", s)],
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "final loss" in out and "eval/val_loss" in out and str(run_dir / "model") in out
    for name in ("config.yaml", "versions.json", "train.log", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step_00000004"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert "eval/val_loss" in rows[1] and "eval/val_loss" in rows[2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == pytest.approx(rows[-1]["loss"])
    model = ShowerModel.load(run_dir / "model")
    assert model.lineage.dataset_manifest_hash == summary["manifest_hash"]
    assert model.lineage.extra["steps"] == "4"
    assert model.vocab.detectors == ("par04-siw", "pbwo4") and model.vocab.n_detector_slots == 3
    # the trained ranges reach the bundle (and so the model card): debug.yaml simulates e-/pi+ at
    # 2–100 GeV, θ = 90°
    assert (model.lineage.kind, model.lineage.objective, model.lineage.parent_uri) == (
        "base",
        "flow_matching",
        None,
    )
    assert model.lineage.trained is not None and model.lineage.trained.detectors == ("par04-siw", "pbwo4")
    card = ranges_from_lineage(model.lineage, model.vocab.detectors)
    assert card.source == "lineage" and card.particles == ("e-", "pi+")
    assert card.energy_mev is not None and 2e3 <= card.energy_mev[0] < card.energy_mev[1] <= 1e5
    assert card.theta_rad == pytest.approx((math.pi / 2, math.pi / 2))
    assert "resumed" not in (run_dir / "train.log").read_text()

    # a second call resumes (here: a finished run) and a longer run continues from the checkpoint
    config = load_train_config(DEBUG, TINY)
    again = train(config, run_dir)
    assert again.steps == 4 and again.resumed_from.name == "step_00000004" and again.history == []
    with pytest.raises(ValueError, match=r"another config \(differs in \['loop.steps'\]\)"):
        train(load_train_config(DEBUG, [*TINY, "loop.steps=6"]), run_dir)
    assert "resumed from" in (run_dir / "train.log").read_text()
