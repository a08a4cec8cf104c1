"""Driver side of a job on Ray Train (pretraining, adaptation): the Ray session, the resources check, and
``ray.train.torch.TorchTrainer`` with its scaling, run, failure and checkpoint configs. Each job brings its
``train_loop_per_worker`` (built on ``training/ray/worker.py``) and its payload.

Ray (one of the three modules importing it, with ``worker.py`` and ``checkpoints.py``; imported lazily, so a
config check or ``--dry-run`` stays fast):

- without ``RAY_ADDRESS`` an embedded local Ray is started for the run and shut down after it
  (``include_dashboard=False``, ``_node_ip_address="127.0.0.1"``, usage stats off): a laptop just works. It
  runs with token authentication, set explicitly (``RAY_AUTH_MODE=token``; Ray keeps the token in
  ``~/.ray/auth_token``); with ``RAY_AUTH_MODE`` set to anything else in the environment it refuses to start
  unless ``cluster.allow_unauthenticated_ray`` or ``CALOFORGE_ALLOW_UNAUTHENTICATED_RAY=1`` says so;
- with ``RAY_ADDRESS`` (set by ``ray job submit``, or by hand: ``ray://…`` / ``host:6379``) the run joins
  that cluster unchanged;
- when Ray is already initialised in this process (tests, notebooks) it is used as is and left running.

Ray Train V2 semantics the jobs rely on (docs/pretraining.md): reusing run name + storage path resumes a run
from its latest checkpoint, even a finished one; each job makes that explicit (``--resume``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from caloforge.environment import ALLOW_UNAUTHENTICATED_ENV, embedded_auth_mode
from caloforge.training.ray.config import ClusterConfig, EngineConfig
from caloforge.training.ray.storage import RunDir

__all__ = [
    "ALLOW_UNAUTHENTICATED_ENV",
    "attempt_records",
    "check_cluster_resources",
    "check_local_gpus",
    "describe_engine",
    "embedded_auth_mode",
    "embedded_num_cpus",
    "fit",
    "launch_workers",
    "ray_session",
]

log = logging.getLogger("caloforge.training")

# Environment of an embedded local Ray (propagated to the Train controller and workers).
_EMBEDDED_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # A laptop has no node preemption; the watcher actor only adds a C++ warning line per worker group.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


# -- Ray -------------------------------------------------------------------------------------------------
def embedded_num_cpus(cluster: ClusterConfig) -> int:
    """CPUs of an embedded local Ray: ``cluster.local_num_cpus``, else what the workers ask for."""
    if cluster.local_num_cpus is not None:
        return cluster.local_num_cpus
    return max(1, math.ceil(cluster.num_workers * cluster.cpus_per_worker))


@contextlib.contextmanager
def ray_session(num_cpus: int, allow_unauthenticated: bool = False) -> Iterator[str]:
    """Ray for one run; yields ``"existing"``, ``"cluster"`` (``RAY_ADDRESS``) or ``"embedded"``.

    ``num_cpus`` sizes an embedded local Ray (ignored when joining a cluster or reusing a session);
    ``allow_unauthenticated``: see :func:`embedded_auth_mode`.
    """
    import ray

    if ray.is_initialized():
        yield "existing"
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at RAY_ADDRESS=%s", address)
        ray.init(address=address, log_to_driver=True)
        mode = "cluster"
    else:
        auth = embedded_auth_mode(allow_unauthenticated)  # before anything of Ray's starts
        for key, value in _EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)
        preexisting = _descendant_pids()
        log.info(
            "starting an embedded local Ray (%d CPUs, dashboard off, 127.0.0.1, %s)",
            num_cpus,
            "token authentication" if auth == "token" else f"RAY_AUTH_MODE={auth}",
        )
        ray.init(
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": "caloforge.training.ray.raylog.quiet_ray_internals"},
        )
        mode = "embedded"
    try:
        yield mode
    finally:
        spawned = _ray_descendants(preexisting) if mode == "embedded" else []
        ray.shutdown()
        _reap(spawned)


def _descendant_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _ray_descendants(preexisting: set[int]) -> list[Any]:
    """Ray processes this process started since ``ray.init`` (GCS, raylet, workers, actors)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in preexisting:
            continue
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ray" in cmdline:
            found.append(proc)
    return found


def _reap(processes: list[Any], grace_s: float = 5.0) -> None:
    """After ``ray.shutdown()`` of the embedded Ray: terminate the processes it left behind.

    Ray normally takes its workers down with the raylet, but an actor (seen: a Ray Train controller of a run
    that had restarted its workers) can survive as an orphan; this leaves nothing running on the machine.
    """
    import psutil

    def running(procs: list[Any]) -> list[Any]:
        out = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out

    deadline = time.monotonic() + grace_s
    while (alive := running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not alive:
        return
    log.warning(
        "embedded Ray left %d process(es) after shutdown (pids %s): terminating them",
        len(alive),
        ", ".join(str(p.pid) for p in alive),
    )
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    deadline = time.monotonic() + grace_s
    while (alive := running(alive)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def check_local_gpus(cluster: ClusterConfig) -> None:
    """Before anything starts: the GPUs ``cluster.use_gpu`` asks for, on this machine when no Ray cluster is
    given (``RAY_ADDRESS``; a cluster's GPUs are checked after joining, :func:`check_cluster_resources`)."""
    if not cluster.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    need = cluster.num_workers * cluster.gpus_per_worker
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < need:
        raise ValueError(
            f"cluster.use_gpu: {cluster.num_workers} workers × {cluster.gpus_per_worker:g} GPU need "
            f"{need:g} GPUs, this machine has {have} (set cluster.use_gpu=false, or RAY_ADDRESS to a cluster "
            "with GPUs)"
        )


def check_cluster_resources(cluster: ClusterConfig, mode: str) -> None:
    """The GPUs/CPUs the scaling config asks for, against the Ray cluster's (before any worker starts).

    Embedded Ray: a shortfall is an error. An existing cluster may autoscale (KubeRay adds worker pods when
    Ray Train asks for them), so there a shortfall is a warning and Ray Train waits for the resources.
    """
    import ray

    total = ray.cluster_resources()
    c = cluster
    problems = []
    if c.use_gpu:
        need = c.num_workers * c.gpus_per_worker
        have = float(total.get("GPU", 0.0))
        if have < need:
            problems.append(
                f"cluster.use_gpu: {c.num_workers} workers × {c.gpus_per_worker:g} GPU need {need:g} GPUs, "
                f"the Ray cluster has {have:g} now (set cluster.use_gpu=false, or fewer workers)"
            )
    need_cpu = c.num_workers * c.cpus_per_worker
    have_cpu = float(total.get("CPU", 0.0))
    if have_cpu < need_cpu:
        problems.append(
            f"cluster: {c.num_workers} workers × {c.cpus_per_worker:g} CPU need {need_cpu:g} CPUs, the Ray "
            f"cluster has {have_cpu:g} now (lower cluster.cpus_per_worker or cluster.num_workers)"
        )
    if problems and mode == "embedded":
        raise ValueError("; ".join(problems))
    for problem in problems:
        log.warning("%s; Ray Train waits until an autoscaler provides them", problem)


# -- the trainer -----------------------------------------------------------------------------------------
def describe_engine(engine: EngineConfig) -> str:
    """``ddp`` or ``deepspeed ZeRO-<stage>``."""
    return engine.backend if engine.backend == "ddp" else f"deepspeed ZeRO-{engine.deepspeed.zero_stage}"


def attempt_records(run: RunDir) -> dict[str, dict[str, Any]]:
    """``attempts/<name>.json`` of the run (one per worker-group start, written by rank 0), by file name."""
    return {n: run.read_json(f"attempts/{n}") for n in run.listdir("attempts") if n.endswith(".json")}


def fit(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    payload: dict[str, Any],
    cluster: ClusterConfig,
    run: RunDir,
    *,
    what: str,
    how_to_continue: str,
) -> None:
    """Run ``train_loop_per_worker(payload)`` on ``cluster.num_workers`` Ray Train workers, the run in
    ``run`` (Ray's checkpoints, ``cluster.max_failures`` worker-group restarts from the latest one,
    ``cluster.num_to_keep`` kept); inside :func:`ray_session`.

    Raises ``RuntimeError`` naming ``what`` and ``how_to_continue`` when the run failed after its restarts.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = cluster
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.storage_path,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=c.num_to_keep),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        from ray.train import TrainingFailedError

        if isinstance(exc, TrainingFailedError):
            raise RuntimeError(
                f"{what} failed (after up to cluster.max_failures={c.max_failures} restarts from its latest "
                f"checkpoint): {exc}. Fix the cause and continue it with {how_to_continue}"
            ) from exc
        raise


def launch_workers(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    payload: dict[str, Any],
    cluster: ClusterConfig,
    engine: EngineConfig,
    run: RunDir,
    *,
    steps: int,
    what: str,
    how_to_continue: str,
) -> list[dict[str, Any]]:
    """One launch of a job's Ray Train workers: the Ray session (:func:`ray_session`), the resource check,
    :func:`fit`; returns the attempt records this launch added (one per worker-group start, in order)."""
    before = set(attempt_records(run))
    with ray_session(embedded_num_cpus(cluster), cluster.allow_unauthenticated_ray) as mode:
        check_cluster_resources(cluster, mode)
        log.info(
            "%s: %d workers (%s), engine %s, %d steps → %s",
            what,
            cluster.num_workers,
            "GPU" if cluster.use_gpu else "CPU",
            describe_engine(engine),
            steps,
            run.uri,
        )
        fit(train_loop_per_worker, payload, cluster, run, what=what, how_to_continue=how_to_continue)
    attempts = attempt_records(run)
    return [attempts[n] for n in sorted(set(attempts) - before)]
