"""Acceptance of the adaptation service (issue #14) with real processes on 127.0.0.1: ``caloforge serve`` as a
subprocess (uvicorn, SQLite in WAL mode, the executor), the local Ray head it starts and owns, and a real
``mlflow server`` as the tracking server and registry of the service and its jobs (MLFLOW_TRACKING_URI).

One MLflow server, one tiny base registered in it and one Ray head serve the tests, in file order (tiny
configs: 5 steps, 20 evaluation showers, plots only where the report is checked, the legacy ONNX exporter):

1. a running job cancelled: Ray says ``STOPPED``, the job is ``cancelled``, nothing is registered;
2. SIGKILL while one job runs and one (with bns distillation, 2 steps) waits (max_concurrent 1); jobs crafted
   in the database while the service is down (Ray never heard of them: one had started, one had not; one
   with a broken spec); restart (re-attached to the same Ray head, room for three jobs): the running job is
   followed, the crafted ones failed / requeued / run, the waiting one runs; SIGKILL again while it runs,
   restart after both Ray jobs ended: both recorded, each registered once (the distilled version with the
   adapted one as parent), every event copied once; ``caloforge registry pull ... --alias candidate`` of the
   first works, its report, a plot and Ray logs are served; its entrypoint run again registers nothing new;
   the broken job failed with its entrypoint's error;
3. SIGTERM stops the service; ``--no-execute`` on the same database queues and runs nothing.

Unit-level pieces live elsewhere: the API in-thread (test_service_api.py), the entrypoint's error events and
event lines (tests/service_exec/test_jobmain.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import make_base_bundle, make_shards

from caloforge.adapt.service.jobmain import JOB_TAG, parse_event_line, read_events
from caloforge.environment import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "acceptance-bootstrap-token-0123456789abcdef"
JOB_TIMEOUT_S = 300
LONG = {"loop.steps": 100000, "loop.checkpoint_every": 50000, "loop.log_every": 50000}
STAGES = ("adapt", "evaluate", "export", "register")


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float = JOB_TIMEOUT_S, every_s: float = 0.25
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


# -- the real processes ------------------------------------------------------------------------------------
class MlflowServer:
    """``mlflow server`` (1 worker, job execution off, proxied artifacts) on a free 127.0.0.1 port, in a
    process group of its own (the server and its worker)."""

    def __init__(self, root: Path) -> None:
        self.log = root / "mlflow.log"
        self.uri = f"http://127.0.0.1:{free_port()}"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host", "127.0.0.1",
            "--port", self.uri.rsplit(":", 1)[1],
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "mlflow-artifacts"),
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for("mlflow server", healthy, 120)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class ServiceProcess:
    """``caloforge serve`` as a subprocess; ``start`` (again after ``kill``) with the same home and DB."""

    root: Path
    config: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None
    starts: int = 0
    log: Path | None = None
    args: tuple[str, ...] = ()  # more arguments of the next starts (--set KEY=VALUE, --no-execute)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        cmd = [sys.executable, "-m", "caloforge.cli", "serve", "--config", str(self.config)]
        cmd += ["--port", str(self.port), *self.args]
        self.log = self.root / f"serve-{self.starts}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("caloforge serve /readyz", ready, 180)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM (uvicorn shuts down, the executor stops; the Ray head stays); the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


@dataclass
class Accept:
    home: Path
    data: Path
    service: ServiceProcess
    runner: Any  # a RayJobRunner re-attached to the service's head (Ray's own view of the jobs)


def _tiny_configs(configs: Path) -> None:
    """The service's ``configs/adapt/full.yaml`` and ``configs/distill/bns.yaml``: a few steps and the
    smallest evaluation the configs accept."""
    from caloforge.adapt.config import AdaptConfig, AdaptEvalConfig, GateConfig
    from caloforge.config import dump_yaml
    from caloforge.distill.config import BNSOptions, DistillConfig, DistillEvalConfig, DistillGateConfig
    from caloforge.evaluation.config import ClassifierConfig, EvalConfig, FPDConfig, KPDConfig, PlotConfig
    from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig, ScheduleConfig

    loop = LoopConfig(
        steps=5,
        batch_size=8,
        log_every=5,
        checkpoint_every=5,
        seed=0,
        optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(kind="constant"),
        ema=EMAConfig(decay=0.5),
    )
    metrics = EvalConfig(
        metrics=("sep_power", "response", "fpd", "kpd", "cls_high"),
        floor_metrics=("fpd",),
        classifier=ClassifierConfig(hidden=8, n_layers=1, epochs=1, batch_size=32, n_seeds=1),
        fpd=FPDConfig(min_samples=10, max_samples=15, num_points=2, num_batches=2),
        kpd=KPDConfig(batch_size=10, num_batches=2),
        plots=PlotConfig(enabled=False, layers=(0,), dpi=20),  # plots: one job asks for them
    )
    adapt = AdaptConfig(
        name="tiny",
        loop=loop,
        eval=AdaptEvalConfig(n_showers=20, metrics=metrics),
        gate=GateConfig(max_auc_high=1.0),
        progress=False,
        torch_threads=1,
    )
    bns = DistillConfig(
        name="tiny-bns",
        method="bns",
        bns=BNSOptions(
            steps=(2,), num_steps=2, reference_steps=4, n_train=8, n_heldout=4, batch_size=8, iterations=5
        ),
        loop=loop,
        eval=DistillEvalConfig(n_showers=20, metrics=metrics),
        gate=DistillGateConfig(max_auc_increase=0.5),
        progress=False,
        torch_threads=1,
    )
    (configs / "adapt").mkdir(parents=True)
    (configs / "distill").mkdir()
    (configs / "adapt" / "full.yaml").write_text(dump_yaml(adapt))
    (configs / "distill" / "bns.yaml").write_text(dump_yaml(bns))


@pytest.fixture(scope="module")
def accept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Accept]:
    """The MLflow server and the service (whose Ray head starts with it) start while the data and the base
    are made; then the base is registered."""
    root = tmp_path_factory.mktemp("service-accept")
    home = root / "home"
    _tiny_configs(root / "configs")
    config = root / "service.yaml"
    config.write_text(
        f"data_roots: [{home / 'data'}]\nconfigs_dir: {root / 'configs'}\nmax_concurrent: 1\n"
        "poll_interval_s: 0.25\nray_num_cpus: 1\nonnx_exporter: legacy\n"
    )
    mlflow = MlflowServer(root)
    service: ServiceProcess | None = None
    runner = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CALOFORGE_HOME", str(home))
            mp.setenv("MLFLOW_TRACKING_URI", mlflow.uri)
            mp.setenv("RAY_AUTH_MODE", "token")  # what the service sets for its head (restored afterwards)
            for key in ("RAY_ADDRESS", "CALOFORGE_SERVICE_DATABASE_URL"):
                mp.delenv(key, raising=False)
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "CALOFORGE_SERVICE_BOOTSTRAP_TOKEN": TOKEN,
                "OMP_NUM_THREADS": "1",
            }
            service = ServiceProcess(root, config, env, free_port())
            service.start(wait=False)
            data = make_shards(home / "data" / "lar-pb", ("lar-pb",), 80, seed=5)
            bundle = make_base_bundle(root / "base")
            mlflow.wait_ready()
            from caloforge.registry.store import RegistryStore

            RegistryStore().register_bundle(bundle, name="caloforge-base", kind="base", aliases=("champion",))
            service.wait_ready()
            from caloforge.adapt.service.rayjobs import RayJobRunner

            runner = RayJobRunner(None, home)  # re-attaches to the head the service started
            yield Accept(home, data, service, runner)
    finally:
        if service is not None:
            service.stop()
        mlflow.terminate()
        if runner is not None:
            runner.close(shutdown_head=True)
        mlflow.wait()


# -- helpers -----------------------------------------------------------------------------------------------
def _body(acc: Accept, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "base": "caloforge-base@champion",
        "detector": {"name": "lar-pb"},
        "data": str(acc.data),
        "strategy": "full",
        "seed": 1,
    }
    body.update(changes)
    return body


def _submit(acc: Accept, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    with acc.service.client() as c:
        r = c.post("/v1/adaptations", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return dict(r.json())


def _job(acc: Accept, job_id: str) -> dict[str, Any]:
    with acc.service.client() as c:
        r = c.get(f"/v1/adaptations/{job_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_status(acc: Accept, job_id: str, *statuses: str, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    def check() -> dict | None:
        job = _job(acc, job_id)
        if job["status"] in ("succeeded", "failed", "cancelled") and job["status"] not in statuses:
            raise AssertionError(
                f"{job_id} ended {job['status']}: {job['error']}\n{_logs(acc, job_id)[-3000:]}"
            )
        return job if job["status"] in statuses else None

    return dict(wait_for(f"{job_id} {statuses}", check, timeout_s))


def _logs(acc: Accept, job_id: str) -> str:
    with acc.service.client() as c:
        r = c.get(f"/v1/adaptations/{job_id}/logs")
    return r.text


def _events(acc: Accept, job_id: str) -> list[dict[str, Any]]:
    with acc.service.client() as c:
        return list(c.get(f"/v1/adaptations/{job_id}/events").json()["data"])


def _started(acc: Accept, job_id: str) -> bool:
    """The entrypoint has begun its adapt stage (seen in the job dir, as the executor sees it)."""
    events = read_events(acc.home / "service" / "jobs" / job_id / "events.jsonl")
    return any(e["kind"] == "stage" and e["stage"] == "adapt" for e in events)


def _registered(job_id: str) -> list[Any]:
    from caloforge.registry.store import RegistryStore

    return RegistryStore().search(tags={JOB_TAG: job_id})


# -- the scenarios -----------------------------------------------------------------------------------------
def test_cancel_of_a_running_job_stops_its_ray_job(accept: Accept) -> None:
    acc = accept
    job = _submit(acc, _body(acc, hyperparameters=LONG))
    wait_for("the long job's adapt stage", lambda: _started(acc, job["id"]))
    assert acc.runner.status(job["id"]) == "RUNNING"
    with acc.service.client() as c:
        r = c.post(f"/v1/adaptations/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    done = _wait_status(acc, job["id"], "cancelled", timeout_s=120)
    assert acc.runner.status(job["id"]) == "STOPPED" and done["result"] is None
    assert _registered(job["id"]) == []
    assert not (acc.home / "service" / "jobs" / job["id"] / "result.json").exists()


def test_sigkill_restart_registers_once_distils_and_serves_pull_and_report(
    accept: Accept, tmp_path: Path
) -> None:
    from caloforge.adapt.service.rayjobs import HEAD_FILE
    from caloforge.adapt.service.store import JobStore
    from caloforge.platform.geometry import DETECTORS_DIR
    from caloforge.registry.store import RegistryStore

    acc = accept
    jobs_dir = acc.home / "service" / "jobs"
    # The first job: an inline detector, the report's plots on; submitted twice with one Idempotency-Key.
    inline = (DETECTORS_DIR / "lar-pb.yaml").read_text()
    body = _body(acc, detector={"yaml": inline}, hyperparameters={"eval.metrics.plots.enabled": True})
    first = _submit(acc, body, key="accept-first")
    assert first["status"] == "queued" and first["spec"]["export"] == {"exporter": "legacy"}
    plan = first["spec"]["plan"]  # the registry base resolved to its exact version by the validation
    assert (plan["base_uri"], plan["base_version"]) == ("models:/caloforge-base/1", "1")
    assert _submit(acc, body, key="accept-first")["id"] == first["id"]  # the same job (tests/service: more)
    # The second (bns distillation, 2 steps; alias "staging") waits: max_concurrent is 1.
    distil = {"method": "bns", "steps": 2}
    second = _submit(acc, _body(acc, seed=2, distillation=distil, registration={"alias": "staging"}))
    wait_for("the first job's adapt stage", lambda: _started(acc, first["id"]))
    assert _job(acc, second["id"])["status"] == "queued"
    head = json.loads((acc.home / "service" / HEAD_FILE).read_text())
    acc.service.kill()  # SIGKILL while the first job runs and the second is queued

    # While the service is down: jobs Ray never heard of (one that had started, one that had not) and one
    # whose spec is broken (its entrypoint fails at once), crafted in the service's database.
    store = JobStore(f"sqlite:///{acc.home / 'service' / 'service.db'}")
    spec = dict(store.get_job(first["id"]).spec)

    def crafted(spec: dict[str, Any], running: bool) -> str:
        job, _ = store.create_job(spec=spec, creator="bootstrap", idempotency_key=None, body_hash="crafted")
        if running:
            assert store.transition(job.id, "running", expect=("queued",)) is not None
        return job.id

    had_run = crafted(spec, True)
    (jobs_dir / had_run).mkdir(parents=True)
    event = {"seq": 1, "time": "t", "kind": "stage", "stage": "adapt", "message": "m", "data": {}}
    (jobs_dir / had_run / "events.jsonl").write_text(json.dumps(event) + "\n")
    broken = crafted({k: v for k, v in spec.items() if k != "config"}, False)
    never_ran = crafted(spec, True)
    store.close()

    # Restart, with room for three jobs now (so that the queued ones run beside the first): the first is
    # followed, the crafted ones reconciled, the second and the broken one submitted, the requeued one waits.
    acc.service.args = ("--set", "max_concurrent=3")
    acc.service.start()
    assert json.loads((acc.home / "service" / HEAD_FILE).read_text()) == head  # re-attached, not restarted
    assert _job(acc, never_ran)["status"] == "queued"  # requeued, behind the others: cancel it
    with acc.service.client() as c:
        assert c.post(f"/v1/adaptations/{never_ran}/cancel").status_code == 200
        r = c.post("/v1/adaptations", json=_body(acc, base="caloforge-base@nope"))  # unknown alias
    assert r.status_code == 422 and r.json()["error"]["field"] == "base"
    gone = _job(acc, had_run)
    assert gone["status"] == "failed" and "Ray job is gone" in gone["error"]
    assert "stage adapt" in gone["error"]
    # followed, not requeued or failed: still running, or (on a fast machine) already finished and reconciled
    assert _job(acc, first["id"])["status"] in ("running", "succeeded")

    # SIGKILL again while the second job runs; start the service once both Ray jobs have ended.
    wait_for("the second job's adapt stage", lambda: _started(acc, second["id"]))
    acc.service.kill()
    for job in (first, second):
        wait_for("the Ray jobs", lambda job=job: acc.runner.status(job["id"]) in ("SUCCEEDED", "FAILED"))
        assert acc.runner.status(job["id"]) == "SUCCEEDED", acc.runner.logs(job["id"])[-3000:]
    acc.service.start()  # reconciled: both recorded from what Ray says

    # The first job: succeeded, registered once, every event copied once across three service processes.
    done = _job(acc, first["id"])
    result = done["result"]
    assert (done["status"], done["attempts"]) == ("succeeded", 1)
    assert (result["registered_model"], result["alias"]) == ("caloforge-lar-pb", "candidate")
    assert result["parent"] == {"uri": "models:/caloforge-base/1", "version": "1"}
    assert Path(result["onnx_uri"]).is_file() and result["distilled"] is None
    (version,) = _registered(first["id"])
    assert version.uri == result["uri"] and version.tags["caloforge.kind"] == "adapted"
    assert float(version.tags["metric.fpd"]) == pytest.approx(result["metrics"]["fpd"])
    assert (jobs_dir / first["id"] / "detector" / "lar-pb.yaml").read_text() == inline
    events = _events(acc, first["id"])
    copied = [e for e in events if e["data"] and "job_seq" in e["data"]]
    assert [e["data"]["job_seq"] for e in copied] == list(range(1, len(copied) + 1))
    stages = [(e["stage"], e["data"]["phase"]) for e in copied if e["kind"] == "stage"]
    assert stages == [(s, p) for s in STAGES for p in ("start", "end")]
    printed = [e for e in map(parse_event_line, _logs(acc, first["id"]).splitlines()) if e is not None]
    assert [e["seq"] for e in printed] == [e["data"]["job_seq"] for e in copied]  # from Ray's logs too
    with acc.service.client() as c:  # the report and a plot
        report = c.get(f"/v1/adaptations/{first['id']}/report").json()
        plot = next(f for f in report["files"] if f.endswith(".png"))
        png = c.get(f"/v1/adaptations/{first['id']}/report/files/{plot}")
    assert "fpd" in report["markdown"].lower()
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    # `caloforge registry pull` of it (the exporter and variant that are quick here).
    from caloforge.cli import main

    out = tmp_path / "pulled"
    argv = ["registry", "pull", "caloforge-lar-pb", "--alias", "candidate", "--format", "onnx"]
    assert main([*argv, "--out", str(out), "--variant", "plain", "--exporter", "legacy"]) == 0
    assert (out / "model.onnx").is_file() and result["uri"] in (out / "model_card.json").read_text()

    # The second job: the adapted and the distilled version, the distilled one's parent the adapted one.
    done = _job(acc, second["id"])
    result = done["result"]
    assert (done["status"], done["attempts"]) == ("succeeded", 1)
    distilled = result["distilled"]
    assert distilled is not None and (distilled["method"], distilled["steps"]) == ("bns", 2)
    versions = {v.tags["caloforge.kind"]: v for v in _registered(second["id"])}
    assert sorted(versions) == ["adapted", "distilled"]
    assert versions["adapted"].uri == result["uri"] and versions["distilled"].uri == distilled["uri"]
    assert versions["distilled"].tags["caloforge.parent_uri"] == result["uri"]
    assert versions["distilled"].tags["caloforge.parent_version"] == str(result["version"])
    assert RegistryStore().resolve("caloforge-lar-pb@staging").uri == distilled["uri"]

    # The first job's entrypoint again (as a Ray retry would): every stage reused, nothing registered.
    from caloforge.adapt.service.jobmain import main as jobmain

    assert jobmain(["--job-id", first["id"], "--job-dir", str(jobs_dir / first["id"])]) == 0
    again = read_events(jobs_dir / first["id"] / "events.jsonl")[len(printed) :]
    assert any(e["kind"] == "stage" and "reused" in e["message"] for e in again)
    register_end = next(e for e in again if e["stage"] == "register" and e["data"].get("phase") == "end")
    assert register_end["data"]["adapted"]["existing"] is True
    assert [v.uri for v in _registered(first["id"])] == [version.uri]

    # The broken job (run beside them) failed with its entrypoint's error.
    failed = _wait_status(acc, broken, "failed", timeout_s=120)
    assert "missing ['config']" in failed["error"] and acc.runner.status(broken) == "FAILED"
    assert [_job(acc, j)["status"] for j in (never_ran, had_run)] == ["cancelled", "failed"]


def test_sigterm_then_a_validate_only_service_queues_without_running(accept: Accept) -> None:
    """SIGTERM stops the service (uvicorn shuts down, then re-raises the signal); ``--no-execute`` on the same
    database validates and queues (a registry base) and runs nothing."""
    acc = accept
    assert acc.service.stop() in (0, -signal.SIGTERM), acc.service.log.read_text()[-3000:]
    acc.service.args = ("--no-execute",)
    acc.service.start()
    assert f"{acc.service.url} (validate-only" in acc.service.log.read_text()
    with acc.service.client() as c:
        assert c.get("/readyz").json()["executor"] == "none"
        job = c.post("/v1/adaptations", json=_body(acc)).json()
    assert job["status"] == "queued" and job["spec"]["plan"]["base_version"] == "1"
    time.sleep(1.0)  # an executing service would have submitted it by now (poll_interval_s 0.25)
    assert _job(acc, job["id"])["status"] == "queued" and acc.runner.status(job["id"]) is None
    assert acc.service.stop() in (0, -signal.SIGTERM)
