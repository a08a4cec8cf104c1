"""Driver side of distributed pretraining: validate, prepare the run directory and MLflow run, run the
workers (``pretrain/worker.py``) on Ray Train and hand the final bundle to the ``on_final_bundle`` hooks.

The Ray session (embedded local Ray with token authentication, or the cluster of ``RAY_ADDRESS``, or the
process's own) and the ``TorchTrainer`` are the shared Ray path of ``caloforge.training.ray.launch`` (also
used by adaptation).

Ray Train V2 semantics we rely on (docs/pretraining.md): reusing run name + storage path resumes a run from
its latest checkpoint, even a finished one. CaloForge makes that explicit: a fresh launch whose run directory
already exists is an error, ``resume=True`` (``--resume``) is required to continue it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import caloforge
from caloforge.config import dump_yaml, to_dict
from caloforge.pretrain.config import DataPlan, PretrainConfig, resume_differences, validate_pretrain_config
from caloforge.pretrain.rundir import RUN_FILE, RunDir, validate_run_name
from caloforge.training.ray import launch as ray_launch

__all__ = [
    "FinalBundleHook",
    "PretrainResult",
    "default_bundle_hooks",
    "prepare_data",
    "run_pretrain",
]

log = logging.getLogger("caloforge.pretrain")

FinalBundleHook = Callable[[Path, "str | None", dict[str, float]], None]
"""``hook(bundle_dir, mlflow_run_id, final_metrics)``: called by the driver after a successful run."""


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`run_pretrain` returns."""

    run_name: str
    run_uri: str  # <storage_path>/<run name>
    step: int  # optimizer steps done (in total)
    metrics: dict[str, float]  # final training + validation metrics
    mlflow_run_id: str | None
    bundle_uri: str  # <run_uri>/bundle
    worker_group_starts: int  # worker-group starts during this launch (1 + restarts after failures)
    resumed_from_step: int | None  # step the first worker group of this launch started from
    registered: list[Any] = field(default_factory=list)  # what the on_final_bundle hooks returned


# -- data ------------------------------------------------------------------------------------------------
def prepare_data(cfg: PretrainConfig) -> Path:
    """The run's shard set: ``data.shards``, or the ``data.simulate`` set — simulated and sharded once by
    ``caloforge.datasets.prepare.prepare_shards`` into ``$CALOFORGE_HOME/data/simulated/<hash>`` (of the
    block, the simulator version and the seed convention) and reused by every run with the same block."""
    import hashlib
    import json

    if cfg.data.shards is not None:
        return Path(cfg.data.shards).expanduser()
    sim = cfg.data.simulate
    assert sim is not None
    from caloforge import paths
    from caloforge.datasets.prepare import SEED_CONVENTION, prepare_shards
    from caloforge.datasets.simulator import SIMULATOR_VERSION

    identity = json.dumps([to_dict(sim), SIMULATOR_VERSION, SEED_CONVENTION], sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    cache = paths.data_dir() / "simulated" / key
    log.info("data.simulate: shard set %s (simulated on first use)", cache)
    return prepare_shards(None, sim, cache)


# -- run directory ---------------------------------------------------------------------------------------
def _refuse_existing(run: RunDir) -> None:
    if not run.is_empty():
        raise ValueError(
            f"run {run.name!r} already exists at {run.uri}: pass --resume to continue it from its latest "
            "checkpoint (raise loop.steps to train longer), or choose another --run-name"
        )


def _prepare_run_dir(run: RunDir, cfg: PretrainConfig, plan: DataPlan, resume: bool) -> dict[str, Any] | None:
    """Check fresh-vs-resume against what is on storage; returns the previous run record when resuming."""
    if not resume:
        _refuse_existing(run)
        return None
    if not run.exists(RUN_FILE):
        if run.is_empty():
            raise ValueError(f"--resume: there is no run {run.name!r} at {run.uri} to resume")
        raise ValueError(f"--resume: {run.uri} exists but is not a CaloForge pretraining run (no {RUN_FILE})")
    record = run.read_json(RUN_FILE)
    previous_cfg = record.get("config")
    if previous_cfg is not None:
        diffs = resume_differences(previous_cfg, to_dict(cfg))
        if diffs:
            raise ValueError(
                f"--resume {run.name!r}: these settings differ from the run's and cannot change on resume: "
                + "; ".join(diffs)
            )
    previous_hash = record.get("dataset_manifest_hash")
    if previous_hash and previous_hash != plan.manifest_hash:
        raise ValueError(
            f"--resume {run.name!r}: data.shards is a different shard set than the run's (manifest sha256 "
            f"{plan.manifest_hash[:12]} != {previous_hash[:12]})"
        )
    if not run.ray_checkpoints():
        log.warning("run %s has no checkpoint yet: it starts again from step 0", run.uri)
    return record


# -- hooks -----------------------------------------------------------------------------------------------
def default_bundle_hooks(cfg: PretrainConfig) -> list[FinalBundleHook]:
    """``register: true`` → register the bundle as a ``caloforge-base`` version (``candidate`` alias) through
    ``caloforge.registry.store.register_pretrained_bundle`` (error when the registry is not installed)."""
    if not cfg.tracking.register:
        return []
    try:
        from caloforge.registry.store import register_pretrained_bundle
    except ImportError as exc:
        raise ValueError(
            "tracking.register=true but caloforge.registry.store.register_pretrained_bundle is not available"
        ) from exc

    def register(bundle_dir: Path, run_id: str | None, metrics: dict[str, float]) -> Any:
        finite = {k.replace("/", "."): v for k, v in metrics.items() if math.isfinite(v)}
        version = register_pretrained_bundle(bundle_dir, run_id, finite)
        log.info("registered %s version %s", getattr(version, "name", "?"), getattr(version, "version", "?"))
        return version

    return [register]


# -- MLflow ----------------------------------------------------------------------------------------------
def _open_tracker(cfg: PretrainConfig, name: str, run_id: str | None, run: RunDir) -> Any:
    """The driver's MLflow run (new, or the run's own when resuming). An unreachable server is a clear error
    before any worker starts (a few short attempts, not MLflow's minutes of retries)."""
    from caloforge.registry.tracking import RunTracker, TrackingUnavailable, is_unreachable, short_timeouts

    try:
        with short_timeouts(cfg.tracking.timeout_s, max_retries=2):
            return RunTracker(
                cfg.tracking.experiment,
                run_name=name,
                run_id=run_id,
                tags={"caloforge.run_uri": run.uri, "caloforge.kind": "pretrain"},
            )
    except Exception as exc:
        if isinstance(exc, TrackingUnavailable) or is_unreachable(exc):
            from caloforge import paths

            raise ValueError(
                f"tracking: cannot reach the MLflow tracking server at {paths.mlflow_tracking_uri()} "
                f"({str(exc).splitlines()[0][:300]}); start it, point MLFLOW_TRACKING_URI elsewhere, or set "
                "tracking.enabled=false. Once a run is going, an MLflow outage no longer stops it"
            ) from exc
        raise


def _replay_pending(
    tracker: Any, run: RunDir, cfg: PretrainConfig, wait_s: float, bundle_dir: Path | None = None
) -> None:
    """Deliver ``tracking_pending.json`` (what rank 0 could not send) and remove it; while MLflow is
    unreachable, try again every few seconds for up to ``wait_s`` seconds, then leave the file for the next
    launch with a warning."""
    from caloforge.pretrain.hooks import PENDING_FILE
    from caloforge.registry.tracking import is_unreachable, replay_pending, short_timeouts

    if not run.exists(PENDING_FILE):
        return
    record = run.read_json(PENDING_FILE)
    if record.get("run_id") != tracker.run_id:
        log.warning(
            "%s/%s belongs to MLflow run %s, not %s: left alone",
            run.uri,
            PENDING_FILE,
            record.get("run_id"),
            tracker.run_id,
        )
        return
    if bundle_dir is None and any(item[:2] == ["artifacts", "bundle"] for item in record.get("other", [])):
        bundle_dir = run.download_dir(
            "bundle", Path(os.environ.get("TMPDIR", "/tmp")) / f"caloforge-{run.name}-b"
        )
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with short_timeouts(cfg.tracking.timeout_s):
                n = replay_pending(tracker, record, {"bundle": bundle_dir} if bundle_dir else {})
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            if time.monotonic() >= deadline:
                log.warning(
                    "MLflow still unreachable (%s): %s/%s kept; it is replayed by the next --resume launch "
                    "(metrics.jsonl has every metric)",
                    str(exc).splitlines()[0][:200],
                    run.uri,
                    PENDING_FILE,
                )
                return
            time.sleep(min(5.0, max(0.5, deadline - time.monotonic())))
            continue
        # metrics replayed twice (a retried replay) only add duplicate points at the same step
        run.remove(PENDING_FILE)
        log.info("replayed %d MLflow call(s) that rank 0 could not deliver during training", n)
        return


def _end_tracker(tracker: Any, status: str, cfg: PretrainConfig) -> None:
    """Mark the MLflow run ended; an unreachable server only costs a warning (the run's files are on
    storage, and the next launch marks it again)."""
    from caloforge.registry.tracking import is_unreachable, short_timeouts

    try:
        with short_timeouts(cfg.tracking.timeout_s, max_retries=2):
            tracker.end(status)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        log.warning("could not mark MLflow run %s %s (server unreachable): %s", tracker.run_id, status, exc)


# -- the driver ------------------------------------------------------------------------------------------
def _file_log_handler(run: RunDir) -> logging.Handler | None:
    if not run.is_local:
        return None
    path = run.local_path / "logs" / "driver.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    return handler


def run_pretrain(
    cfg: PretrainConfig,
    *,
    run_name: str | None = None,
    resume: bool | Literal["auto"] = False,
    on_final_bundle: Sequence[FinalBundleHook] | None = None,
) -> PretrainResult:
    """Run (or resume) a pretraining run; returns when it finished. See the module docstring.

    Args:
        cfg: the resolved config.
        run_name: the run's name (default ``cfg.name``); the run lives in ``<cluster.storage_path>/<name>``.
        resume: ``True``: continue the existing run from its latest checkpoint (an error when there is none);
            ``False``: start a new run (an error when the run exists); ``"auto"``: resume when the run exists,
            else start it (for unattended launchers that retry, e.g. a Kubernetes RayJob's submitter).
        on_final_bundle: hooks called with the final bundle (default: :func:`default_bundle_hooks`).

    Raises:
        ValueError: a bad config, a missing dataset, an existing run without ``resume`` (all before any
            worker starts).
        RuntimeError: the run failed after ``cluster.max_failures`` restarts (resume it with ``--resume``).
    """
    from caloforge.registry.tracking import library_versions

    name = validate_run_name(run_name or cfg.name)
    run = RunDir(cfg.cluster.storage_path, name)
    if resume == "auto":
        resume = run.exists(RUN_FILE)
        log.info("run %s %s", run.uri, "exists: resuming it" if resume else "is new: starting it")
    if not resume:
        _refuse_existing(run)  # before simulating data or anything else
    manifest_dir = prepare_data(cfg)
    from caloforge.datasets.verify import verify_shards

    log.info("%s", verify_shards(manifest_dir).summary())  # before any worker starts (cached by fingerprint)
    plan = validate_pretrain_config(cfg, manifest_dir=manifest_dir)
    hooks = list(on_final_bundle) if on_final_bundle is not None else default_bundle_hooks(cfg)
    record = _prepare_run_dir(run, cfg, plan, resume)

    handler = _file_log_handler(run)
    root_logger = logging.getLogger("caloforge")
    if handler is not None:
        root_logger.addHandler(handler)
    tracker = None
    try:
        versions = library_versions()
        tracker_id = record.get("mlflow_run_id") if record else None
        if cfg.tracking.enabled:
            tracker = _open_tracker(cfg, name, tracker_id, run)
            _replay_pending(tracker, run, cfg, wait_s=0.0)  # left by an earlier launch
            tracker.log_params(
                {
                    "config": to_dict(cfg),
                    "dataset_manifest_hash": plan.manifest_hash,
                    "versions": versions,
                    "world_size": cfg.cluster.num_workers,
                }
            )
            log.info("MLflow run %s (%s)", tracker.run_id, tracker.tracking_uri)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        launches = list(record.get("launches", [])) if record else []
        launches.append({"at": now, "resume": resume, "steps": cfg.loop.steps})
        new_record = {
            "name": name,
            "created": record.get("created", now) if record else now,
            "caloforge_version": caloforge.__version__,
            "mlflow_run_id": tracker.run_id if tracker else tracker_id,
            "mlflow_tracking_uri": tracker.tracking_uri if tracker else None,
            "dataset_manifest_hash": plan.manifest_hash,
            "manifest_dir": str(plan.manifest_dir),
            "config": to_dict(cfg),
            "launches": launches,
        }
        if record and run.exists("config.yaml"):
            run.write_text(f"config.{len(launches) - 1}.yaml", run.read_text("config.yaml"))
        run.write_text("config.yaml", dump_yaml(cfg))
        run.write_json("versions.json", versions)
        run.write_json(RUN_FILE, new_record)

        payload = {
            "config": to_dict(cfg),
            "storage_path": run.storage_path,
            "run_name": name,
            "manifest_dir": str(plan.manifest_dir),
            "manifest_hash": plan.manifest_hash,
            "detectors": list(plan.detectors),
            "mlflow_run_id": tracker.run_id if tracker else None,
            "mlflow_tracking_uri": tracker.tracking_uri if tracker else None,
            "log_level": logging.getLogger("caloforge").getEffectiveLevel(),
        }
        from caloforge.pretrain.worker import train_loop_per_worker

        c = cfg.cluster
        starts = ray_launch.launch_workers(
            train_loop_per_worker,
            payload,
            c,
            cfg.engine,
            run,
            steps=cfg.loop.steps,
            what=f"pretraining run {run.name!r}",
            how_to_continue=f"--resume --run-name {run.name}",
        )
        final = run.read_json("final_metrics.json")
        metrics = {k: float(v) for k, v in final.get("metrics", {}).items()}
        bundle_dir = run.download_dir(
            "bundle", Path(os.environ.get("TMPDIR", "/tmp")) / f"caloforge-{name}-bundle"
        )
        if tracker is not None:
            _replay_pending(tracker, run, cfg, wait_s=cfg.tracking.final_wait_s, bundle_dir=bundle_dir)
        registered = [hook(bundle_dir, tracker.run_id if tracker else None, metrics) for hook in hooks]
        if tracker is not None:
            _end_tracker(tracker, "FINISHED", cfg)
        result = PretrainResult(
            run_name=name,
            run_uri=run.uri,
            step=int(final["step"]),
            metrics=metrics,
            mlflow_run_id=tracker.run_id if tracker else None,
            bundle_uri=f"{run.uri}/bundle",
            worker_group_starts=len(starts),
            resumed_from_step=starts[0]["start_step"] if starts else None,
            registered=registered,
        )
        log.info(
            "run %s finished at step %d (%d worker-group start(s)); bundle: %s",
            name,
            result.step,
            result.worker_group_starts,
            result.bundle_uri,
        )
        return result
    except BaseException as exc:
        if tracker is not None:
            _end_tracker(tracker, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", cfg)
        raise
    finally:
        if handler is not None:
            root_logger.removeHandler(handler)
            handler.close()
