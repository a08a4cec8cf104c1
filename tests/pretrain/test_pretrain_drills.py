"""Reliability drills with real processes (issue 15): a Ray worker SIGKILLed mid-run, ENOSPC on one rank of
two during a save, the MLflow server killed and restarted during a run. Embedded local Ray (2 CPUs), DDP
over gloo, the debug model, constant learning rate, no validation: as small as the drills allow.

What each drill asserts is what was kept: the step the run resumed from, one timeline of metrics, the final
weights against a run stopped cleanly at that checkpoint and resumed, the checkpoints left in storage, and
(for MLflow) every metric of every step in the tracking server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caloforge.config import from_dict
from caloforge.environment import free_port
from caloforge.pretrain.config import PretrainConfig
from caloforge.pretrain.hooks import FAULT_MARKER, PENDING_FILE
from caloforge.pretrain.launch import run_pretrain
from caloforge.pretrain.rundir import RunDir
from caloforge.training.hooks import read_metrics
from caloforge.training.ray.checkpoints import verify_checkpoint

pytestmark = pytest.mark.slow


def drill_config(shards: Path, storage: Path, name: str, steps: int = 6, **over: object) -> PretrainConfig:
    raw: dict = {
        "name": name,
        "data": {"shards": str(shards), "stream": {"shuffle_buffer": 16}},
        "model": {"backbone": "debug", "patch_size": [9, 4, 3], "num_steps": 2, "sampler": "euler"},
        "loop": {
            "steps": steps,
            "batch_size": 8,
            "log_every": 1,
            "checkpoint_every": 2,
            "optim": {"lr": 2e-3},
            "schedule": {"kind": "constant", "warmup_frac": 0.0},  # no dependence on loop.steps
            "ema": {"decay": 0.9},
        },
        "engine": {"backend": "ddp"},
        "cluster": {"num_workers": 2, "storage_path": str(storage), "max_failures": 1, "num_to_keep": 3},
        "validation": {"enabled": False},
        "tracking": {"enabled": False},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(PretrainConfig, raw, "drill config")


def _starts(run: RunDir) -> list[dict]:
    return sorted(
        (run.read_json(f"attempts/{n}") for n in run.listdir("attempts")), key=lambda a: a["start_step"]
    )


def _weights(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(str(run.local_path / "bundle" / "model.safetensors"))


def _no_staging_left(name: str) -> None:
    assert not list(Path(tempfile.gettempdir()).glob(f"caloforge-{name}-rank*"))


def test_sigkill_and_enospc_resume_from_the_last_complete_checkpoint(
    ray_local: None, shard_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drill 1: rank 0's worker process SIGKILLed after step 3 → the group restarts from checkpoint 2 and
    ends with the weights of a run stopped cleanly at step 2 and resumed. Drill 6: ENOSPC (from the kernel)
    on rank 1 of 2 while saving step 4 → both ranks stop within a bounded time, checkpoint 2 is intact and
    resumed from, and after the next good saves no torn or temporary checkpoint files are left."""
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    storage = tmp_path / "runs"
    timings = {}

    # -- drill 1 -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    killed = run_pretrain(
        drill_config(shard_set, storage, "killed", fault_injection={"rank": 0, "step": 3, "kind": "sigkill"})
    )
    timings["sigkill run"] = time.perf_counter() - t0
    run = RunDir(str(storage), "killed")
    assert killed.step == 6 and killed.worker_group_starts == 2
    fired = run.read_json(FAULT_MARKER)
    assert (fired["kind"], fired["rank"], fired["step"]) == ("sigkill", 0, 3)
    starts = _starts(run)
    assert [s["start_step"] for s in starts] == [0, 2]
    assert starts[1]["restored_from"].endswith("checkpoint_00000002")
    assert fired["pid"] == starts[0]["pid"] and starts[1]["pid"] != fired["pid"]
    assert [r["step"] for r in read_metrics(run.local_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    t0 = time.perf_counter()
    run_pretrain(drill_config(shard_set, storage, "reference", steps=2))  # stops cleanly at checkpoint 2
    reference = run_pretrain(drill_config(shard_set, storage, "reference"), resume=True)
    timings["reference stop + resume"] = time.perf_counter() - t0
    assert reference.step == 6 and reference.resumed_from_step == 2
    ref_weights = _weights(RunDir(str(storage), "reference"))
    got = _weights(run)
    assert set(got) == set(ref_weights)
    for key, value in ref_weights.items():
        assert torch.equal(got[key], value), key  # bit-identical: nothing of the killed attempt leaked in

    # -- drill 6 -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    full = run_pretrain(
        drill_config(shard_set, storage, "full", fault_injection={"rank": 1, "step": 4, "kind": "enospc"})
    )
    timings["enospc run"] = time.perf_counter() - t0
    run = RunDir(str(storage), "full")
    assert full.step == 6 and full.worker_group_starts == 2
    fired = run.read_json(FAULT_MARKER)
    assert (fired["kind"], fired["rank"], fired["step"]) == ("enospc", 1, 4)
    starts = _starts(run)
    assert [s["start_step"] for s in starts] == [0, 2]
    assert starts[1]["restored_from"].endswith("checkpoint_00000002")
    restart_ns = max(int(n.removesuffix(".json")) for n in run.listdir("attempts"))
    stopped_within = restart_ns / 1e9 - fired["at_unix"]  # the fault → every rank gone → the new group up
    timings["enospc → new worker group"] = stopped_within
    assert 0 < stopped_within < 120
    for pid in (fired["pid"], starts[0]["pid"]):  # both ranks of the first group are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert run.ray_checkpoints() == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]
    for name in run.ray_checkpoints():
        verify_checkpoint(run.local_path / name)  # checkpoint 2 intact; 4 re-written whole, not torn
    leftovers = [p for p in run.local_path.rglob("*") if p.name.startswith((".tmp", ".old", ".part"))]
    assert leftovers == []  # no temporary files of ours or of the atomic writers
    for key, value in ref_weights.items():
        assert torch.equal(_weights(run)[key], value), key
    for name in ("killed", "reference", "full"):
        _no_staging_left(name)
    print("drill timings (s):", {k: round(v, 1) for k, v in timings.items()})


# -- drill 5: MLflow outage ----------------------------------------------------------------------------------


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that can be killed and started again on the same port and
    store (1 worker, job execution off)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
            "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def test_mlflow_killed_mid_run_and_restarted_loses_no_metric(
    ray_local: None, shard_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drill 5: the tracking server is SIGKILLed once step 3 of 8 is logged and started again while the run
    goes on → the run finishes with one worker-group start, and every step's metrics reach MLflow (queued
    by rank 0 and replayed when the server is back, or by the driver at the end)."""
    from mlflow import MlflowClient

    root = tmp_path / "mlflow"
    root.mkdir()
    server = MlflowServer(root)
    first_start = server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("CALOFORGE_HOME", str(tmp_path / "home"))
    storage = tmp_path / "runs"
    run = RunDir(str(storage), "outage")
    cfg = drill_config(
        shard_set,
        storage,
        "outage",
        steps=8,
        cluster={"num_workers": 1},
        tracking={
            "enabled": True,
            "experiment": "drills",
            "timeout_s": 2,
            "retry_every_s": 1,
            "final_wait_s": 120,
        },
    )
    events: dict[str, float] = {}

    def outage() -> None:
        metrics = run.local_path / "metrics.jsonl"
        while not (metrics.is_file() and any(r["step"] >= 3 for r in read_metrics(metrics))):
            time.sleep(0.02)
        server.kill()
        events["killed_at_step"] = max(r["step"] for r in read_metrics(metrics))
        events["restart_s"] = server.start()

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    try:
        t0 = time.perf_counter()
        result = run_pretrain(cfg)
        elapsed = time.perf_counter() - t0
        watcher.join(timeout=180)
        assert result.step == 8 and result.worker_group_starts == 1
        assert 3 <= events["killed_at_step"] < 8  # the server died during training
        assert not run.exists(PENDING_FILE)  # whatever rank 0 could not deliver was replayed
        client = MlflowClient(server.uri)
        mlrun = client.get_run(result.mlflow_run_id)
        assert mlrun.info.status == "FINISHED"
        rows = read_metrics(run.local_path / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 9))
        for key in ("loss", "lr", "grad_norm", "samples_seen"):
            history = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}
            assert history == {r["step"]: pytest.approx(r[key]) for r in rows}, key
        artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "bundle")}
        assert {"bundle/config.json", "bundle/model.safetensors"} <= artifacts
        restart = events["restart_s"]
        print(f"drill 5: run {elapsed:.1f} s, server start {first_start:.1f} s, restart {restart:.1f} s")
    finally:
        server.kill()
    _no_staging_left("outage")
