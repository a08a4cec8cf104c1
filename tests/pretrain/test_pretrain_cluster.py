"""``ray job submit -- caloforge pretrain ...`` against an existing Ray cluster (the README's cluster path).

A real head node (``ray start --head`` on this machine: GCS, raylet, dashboard with the job server on
127.0.0.1) stands in for a cluster. The job's driver must join it through the ``RAY_ADDRESS`` the job server
sets instead of starting an embedded Ray, run 2 DeepSpeed workers there, and leave the same run directory,
checkpoints, bundle and MLflow run as a laptop run. The head runs with token authentication and its own
token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), as a secured cluster does; the submitting client needs
both (docs/pretraining.md). Nothing here reads or writes ``~/.ray``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_pretrain_run import debug_config

from caloforge.environment import free_ports
from caloforge.platform.shower_model import ShowerModel
from caloforge.pretrain.rundir import RunDir
from caloforge.training.hooks import read_metrics
from caloforge.training.ray.checkpoints import verify_checkpoint

BIN = Path(sys.executable).parent
QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "ORT_DISABLE_TELEMETRY": "1",
    "DS_ACCELERATOR": "cpu",
}


@dataclass(frozen=True)
class Head:
    gcs_port: int
    dashboard: str  # the job server's address, http://127.0.0.1:<port>
    client_env: dict[str, str]  # environment of a shell that talks to this cluster


def _stop(proc: subprocess.Popen) -> None:
    """``ray start --block`` does not take its processes down on SIGTERM (Ray 2.60): terminate every process
    it started, then kill what is left."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture()
def ray_head(tmp_path: Path) -> Iterator[Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="cfray-", dir="/tmp"))  # short: Ray's socket paths are limited
    gcs_port, dash_port = free_ports(2)
    # `ray start` turns token auth on only if it finds a token (~/.ray/auth_token): be explicit instead.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env |= QUIET | token
    log = (tmp_path / "head.log").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    head = Head(gcs_port, f"http://127.0.0.1:{dash_port}", env)
    try:
        deadline = time.monotonic() + 120
        while True:  # the job server answers (with the token) once the head is up
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", head.dashboard],
                env=head.client_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"Ray head did not come up (exit {proc.poll()}):\n{(tmp_path / 'head.log').read_text()}"
                    f"\n{probe.stderr[-2000:]}"
                )
            time.sleep(2)
        yield head
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_pretraining_on_an_existing_cluster(
    ray_head: Head, shard_set: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    cfg = debug_config(shard_set, tmp_path / "runs")
    del cfg["fault_injection"]
    cfg["name"] = "on-cluster"
    cfg["loop"]["steps"] = 4
    cfg_path = tmp_path / "pretrain.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # What the job (its driver and every Ray Train worker) sees: the runtime environment, not the submitting
    # shell's environment.
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "CALOFORGE_HOME": str(tmp_path / "home"), **QUIET}
    }
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            str(BIN / "caloforge"),
            "pretrain",
            "--config",
            str(cfg_path),
        ],
        env=ray_head.client_env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0 and "succeeded" in out, out[-4000:]
    # The job server refuses a client without the cluster's token.
    anonymous = {k: v for k, v in ray_head.client_env.items() if not k.startswith("RAY_AUTH_")}
    anonymous["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on: the request carries no token
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", ray_head.dashboard],
        env=anonymous,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
    # The driver joined the head (RAY_ADDRESS set by the job server) and started no Ray of its own.
    joined = [line for line in out.splitlines() if "joining the Ray cluster at RAY_ADDRESS=" in line]
    assert joined and joined[0].rstrip().endswith(f":{ray_head.gcs_port}"), out[-4000:]
    assert "starting an embedded local Ray" not in out

    run = RunDir(str(tmp_path / "runs"), "on-cluster")
    rows = read_metrics(run.local_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    assert run.ray_checkpoints() == ["checkpoint_00000002", "checkpoint_00000004"]
    meta = verify_checkpoint(run.local_path / "checkpoint_00000004")
    assert meta["step"] == 4 and meta["world_size"] == 2
    model = ShowerModel.load(run.local_path / "bundle")
    assert model.vocab.detectors == ("par04-siw", "pbwo4")

    client = MlflowClient(tracking_uri)
    (mlrun,) = client.search_runs(client.get_experiment_by_name("test-pretrain").experiment_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["config.cluster.num_workers"] == "2"
    assert {"loss", "samples_per_s"} <= set(mlrun.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "bundle")}
    assert {"bundle/config.json", "bundle/model.safetensors"} <= artifacts
