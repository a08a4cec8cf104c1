"""Adaptation jobs on a real local Ray head owned by the service (one per module, 127.0.0.1, token auth):
a submitted job succeeds and registers once, its status and logs are read; ``stop`` of a running job ends
it ``STOPPED`` with nothing registered; a second ``RayJobRunner`` re-attaches to the head (a restarted
service); the executor reconciles running, finished and unknown jobs (needs service-api's JobStore)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_exec_helpers import make_home, wait_for, write_spec

from caloforge.adapt.service.jobmain import JOB_TAG, parse_event_line, read_events
from caloforge.adapt.service.rayjobs import HEAD_FILE, RayJobRunner

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 600
LONG = {"loop.steps": 100000, "loop.checkpoint_every": 50000, "loop.log_every": 50000}


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory: pytest.TempPathFactory, tiny_assets: dict[str, Path]) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        yield make_home(tmp_path_factory.mktemp("service-ray"), tiny_assets["base"], mp)


@pytest.fixture(scope="module")
def runner(ray_home: Path) -> Iterator[RayJobRunner]:
    runner = RayJobRunner(None, ray_home, num_cpus=2)
    try:
        yield runner
    finally:
        runner.close(shutdown_head=True)
    assert not (ray_home / "service" / HEAD_FILE).exists()


def _job_dir(home: Path, job_id: str) -> Path:
    return home / "service" / "jobs" / job_id


def _registered(job_id: str) -> list:
    from caloforge.registry.store import RegistryStore

    return RegistryStore().search(tags={JOB_TAG: job_id})


def test_a_submitted_job_succeeds_registers_once_and_its_status_and_logs_are_read(
    runner: RayJobRunner, ray_home: Path, tiny_assets: dict[str, Path]
) -> None:
    head = json.loads((ray_home / "service" / HEAD_FILE).read_text())
    assert head["dashboard_url"].startswith("http://127.0.0.1:") and head["auth_mode"] == "token"
    assert runner.status("adapt-unknown") is None

    job_dir = _job_dir(ray_home, "adapt-ray-ok")
    write_spec(job_dir, data=tiny_assets["data"], config=tiny_assets["config"])
    runner.submit("adapt-ray-ok", job_dir)
    status = wait_for(
        "the job to end", lambda: (s := runner.status("adapt-ray-ok")) in ("SUCCEEDED", "FAILED") and s, 600
    )
    logs = runner.logs("adapt-ray-ok")
    assert status == "SUCCEEDED", logs[-3000:]
    printed = [e for e in map(parse_event_line, logs.splitlines()) if e is not None]
    assert printed == read_events(job_dir / "events.jsonl") and printed[-1]["kind"] == "result"
    result = json.loads((job_dir / "result.json").read_text())
    assert result["uri"] == "models:/caloforge-lar-pb/1" and Path(result["onnx_uri"]).is_file()
    assert [v.uri for v in _registered("adapt-ray-ok")] == [result["uri"]]

    runner.submit("adapt-ray-ok", job_dir)  # a submission id Ray knows already: not an error, no new run
    assert runner.status("adapt-ray-ok") == "SUCCEEDED" and len(_registered("adapt-ray-ok")) == 1


def test_stop_of_a_running_job_ends_it_stopped_with_nothing_registered(
    runner: RayJobRunner, ray_home: Path, tiny_assets: dict[str, Path]
) -> None:
    job_dir = _job_dir(ray_home, "adapt-ray-stop")
    write_spec(job_dir, data=tiny_assets["data"], config=tiny_assets["config"], hyperparameters=LONG)
    runner.submit("adapt-ray-stop", job_dir)
    wait_for(
        "the adapt stage",
        lambda: any(e["kind"] == "stage" for e in read_events(job_dir / "events.jsonl")),
        JOB_TIMEOUT_S,
    )
    assert runner.status("adapt-ray-stop") == "RUNNING"
    assert runner.stop("adapt-ray-stop") is True
    wait_for("STOPPED", lambda: runner.status("adapt-ray-stop") == "STOPPED", 120)
    assert _registered("adapt-ray-stop") == [] and not (job_dir / "result.json").exists()


def test_a_second_runner_reattaches_to_the_owned_head(runner: RayJobRunner, ray_home: Path) -> None:
    again = RayJobRunner(None, ray_home)  # as a restarted service does
    assert again.head == runner.head and again.address == runner.address
    assert again.status("adapt-ray-ok") == "SUCCEEDED" and "CALOFORGE_EVENT" in again.logs("adapt-ray-ok")
    again.close()  # without shutdown_head: the head (and its jobs) stay
    assert runner.status("adapt-ray-ok") == "SUCCEEDED"


def test_the_executor_reconciles_running_finished_and_unknown_jobs(
    runner: RayJobRunner, ray_home: Path, tiny_assets: dict[str, Path]
) -> None:
    """Needs service-api's JobStore (caloforge.adapt.service.store): skipped on a branch without it."""
    store_mod = pytest.importorskip("caloforge.adapt.service.store")
    from caloforge.adapt.service.executor import Executor

    class Config:
        max_concurrent = 1
        poll_interval_s = 0.5

        def job_dir(self, job_id: str) -> Path:
            return _job_dir(ray_home, job_id)

    store = store_mod.JobStore(f"sqlite:///{ray_home / 'service' / 'service.db'}")
    spec = {
        "base": "caloforge-base@champion",
        "detector": {"name": "lar-pb"},
        "data": str(tiny_assets["data"]),
        "strategy": "full",
        "config": str(tiny_assets["config"]),
        "hyperparameters": {},
        "distillation": None,
        "registration": {"model_name": None, "alias": "candidate"},
        "seed": 0,
        "metadata": {},
        "export": {"exporter": "legacy"},
    }

    def running_job(spec: dict) -> str:
        job, _ = store.create_job(spec=spec, creator="test", idempotency_key=None, body_hash="h")
        assert store.transition(job.id, "running", expect=("queued",)) is not None
        write_spec(
            _job_dir(ray_home, job.id), **{**spec, "data": Path(spec["data"]), "config": Path(spec["config"])}
        )
        return job.id

    # finished: a job whose stages all ran before (the run directories of the first test), ended on Ray while
    # the service was down; long-running: still running on Ray; two jobs Ray never heard of, one of which
    # had started (it has events).
    finished = running_job(spec)
    for name in ("adapt", "onnx"):
        shutil.copytree(_job_dir(ray_home, "adapt-ray-ok") / name, _job_dir(ray_home, finished) / name)
    long_running = running_job({**spec, "hyperparameters": LONG})
    never_ran, had_run = running_job(spec), running_job(spec)
    (_job_dir(ray_home, had_run) / "events.jsonl").write_text(
        json.dumps({"seq": 1, "time": "t", "kind": "stage", "stage": "adapt", "message": "m", "data": {}})
        + "\n"
    )
    runner.submit(finished, _job_dir(ray_home, finished))
    runner.submit(long_running, _job_dir(ray_home, long_running))
    wait_for("the finished job", lambda: runner.status(finished) in ("SUCCEEDED", "FAILED"), JOB_TIMEOUT_S)
    wait_for(
        "the long job's adapt stage",
        lambda: read_events(_job_dir(ray_home, long_running) / "events.jsonl"),
        JOB_TIMEOUT_S,
    )

    executor = Executor(store, runner, Config())
    executor.reconcile()
    done = store.get_job(finished)
    assert done.status == "succeeded", (done.error, runner.logs(finished)[-3000:])
    assert (
        done.result["uri"] == "models:/caloforge-lar-pb/1"
    )  # the version of the same run: not registered again
    assert [e.data["job_seq"] for e in store.events(finished)] == list(
        range(1, len(store.events(finished)) + 1)
    )
    assert store.get_job(long_running).status == "running" and store.get_job(long_running).stage == "adapt"
    assert store.get_job(never_ran).status == "queued"
    gone = store.get_job(had_run)
    assert gone.status == "failed" and "Ray job is gone" in gone.error and "stage adapt" in gone.error
    executor.reconcile()  # idempotent: no event is copied twice
    assert len({e.data.get("job_seq") for e in store.events(finished)}) == len(store.events(finished))

    assert store.transition(long_running, "cancelling", expect=("running",)) is not None  # what the API does
    executor.cancel(long_running)
    wait_for("STOPPED", lambda: runner.status(long_running) == "STOPPED", 120)
    executor.reconcile()
    assert store.get_job(long_running).status == "cancelled" and _registered(long_running) == []
    from caloforge.registry.store import RegistryStore

    assert len(RegistryStore().versions("caloforge-lar-pb")) == 1
