"""Adaptation on Ray Train workers: the training step of ``run_adaptation`` when the config has a
``cluster:`` block (one process without it).

The same Ray path as pretraining (``caloforge.training.ray``): the embedded local Ray with token
authentication or the cluster of ``RAY_ADDRESS``, ``cluster.num_workers`` ``TorchTrainer`` workers with
DeepSpeed ZeRO 0/1/2 or DDP (``engine``), checkpoints reported to Ray storage with completion markers,
``cluster.max_failures`` worker-group restarts from the latest one, and ``--resume`` continuing the run
(Ray Train resumes a run name + storage path from its latest checkpoint).

Every worker builds the same model (``adapt.job.prepare_model``: the base with the detector's row, the
strategy's selection; LoRA through peft inside the DeepSpeed/DDP wrapper), streams its own share of the
target's ``train`` split and runs the one loop; the row-restricted strategies keep the other rows bitwise
unchanged on every backend (``training/trainable.py``). Rank 0 then writes the bundle of the EMA weights
(LoRA merged from the EMA-averaged adapters; ZeRO ≤ 2 keeps whole parameters on every rank) and the LoRA
adapter in peft's format, and ``final.json``. Evaluation, the gate and registration run in the driver after
the workers finish, as on the one-process path.

The Ray Train run lives in the run directory itself (``cluster.storage_path`` unset: Ray's
``checkpoint_*``, ``attempts/``, ``logs/worker_rank<r>.log`` and ``metrics.jsonl`` beside ``request.json``)
or in ``<cluster.storage_path>/<run dir name>-<run id>`` (``s3://…`` on clusters; the driver then copies
``model/`` and ``adapter/`` into the run directory). The data, the base bundle and the run directory must be
readable by every worker (one machine, or a shared filesystem), as for pretraining's ``data.shards``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caloforge.adapt.config import AdaptConfig
from caloforge.adapt.job import TrainOutcome
from caloforge.config import from_dict, to_dict
from caloforge.training.ray.storage import RunDir, validate_run_name

if TYPE_CHECKING:
    from caloforge.adapt.pipeline import AdaptPlan, AdaptRequest
    from caloforge.training.ray.worker import WorkerContext

__all__ = ["FINAL_FILE", "check_ray_plan", "ray_run_dir", "train_loop_per_worker", "train_on_ray"]

log = logging.getLogger("caloforge.adapt")

FINAL_FILE = "final.json"  # rank 0, after training: {"step", "trainable", "total"}


# -- driver ---------------------------------------------------------------------------------------------
def ray_run_dir(config: AdaptConfig, run_dir: Path, run_id: str) -> RunDir:
    """Where the Ray Train run lives: the run directory itself, or ``<cluster.storage_path>/<name>-<id>``."""
    assert config.cluster is not None
    run_dir = Path(run_dir).resolve()
    try:
        validate_run_name(run_dir.name)
    except ValueError as exc:
        raise ValueError(f"--run-dir {run_dir}: its name names the Ray Train run: {exc}") from None
    if config.cluster.storage_path is None:
        return RunDir(str(run_dir.parent), run_dir.name)
    return RunDir(config.cluster.storage_path, f"{run_dir.name}-{run_id[:8]}")


def check_ray_plan(
    config: AdaptConfig, run_dir: Path, base_has_energy_head: bool, n_train_shards: int
) -> None:
    """Checks of the Ray path that need the run directory, the base or the data (before anything runs): the
    run directory's name is a Ray Train run name; GPUs on this machine when ``cluster.use_gpu`` and no
    ``RAY_ADDRESS``; DDP's ``find_unused_parameters`` with an energy head.
    Fewer train shards than workers is allowed (small targets): each rank then reads every shard, in its
    own shuffled order (``ShowerStream``), and a warning says so."""
    from caloforge.training.ray.launch import check_local_gpus

    c = config.cluster
    if c is None:
        return
    ray_run_dir(config, run_dir, "0" * 32)
    check_local_gpus(c)
    if config.engine.backend == "ddp" and config.engine.find_unused_parameters and base_has_energy_head:
        raise ValueError(
            "engine.find_unused_parameters=true cannot train the base's layer-energy head (its loss runs "
            "outside DDP's forward, which that mode's graph search would miss): set it false (frozen "
            "parameters do not need it)"
        )
    slots = c.num_workers * max(1, config.stream.num_workers)
    if n_train_shards < slots:
        log.warning(
            "data: %d train shard(s) for %d workers × %d stream workers: ranks share shards (each reads them "
            "in its own order); write smaller shards for disjoint streams",
            n_train_shards,
            c.num_workers,
            max(1, config.stream.num_workers),
        )


def train_on_ray(
    config: AdaptConfig,
    request: AdaptRequest,
    plan: AdaptPlan,
    run_dir: Path,
    run_id: str,
    resume: bool,
) -> TrainOutcome:
    """Train on ``cluster.num_workers`` Ray Train workers (see the module docstring); returns when rank 0
    wrote the bundle. A resumed run whose training had finished (a crash in evaluation or registration)
    starts no worker."""
    from caloforge.training.ray import launch as ray_launch

    c = config.cluster
    assert c is not None
    run_dir = Path(run_dir)
    run = ray_run_dir(config, run_dir, run_id)
    if not resume and run.ray_checkpoints():
        raise ValueError(f"{run.uri} holds Ray Train checkpoints of another run: choose another --run-dir")
    starts: list[dict[str, Any]] = []
    if resume and run.exists(FINAL_FILE):
        log.info("%s: training finished already (step %d)", run.uri, run.read_json(FINAL_FILE)["step"])
    else:
        payload = {
            "config": to_dict(config),
            "request": request.to_dict(),
            # absolute paths: the workers' working directory is not the driver's
            "plan": dataclasses.replace(
                plan, data_dir=plan.data_dir.resolve(), base_dir=plan.base_dir.resolve()
            ),
            "run_dir": str(run_dir.resolve()),
            "storage_path": run.storage_path,
            "run_name": run.name,
            "log_level": logging.getLogger("caloforge").getEffectiveLevel(),
        }
        starts = ray_launch.launch_workers(
            train_loop_per_worker,
            payload,
            c,
            config.engine,
            run,
            steps=config.loop.steps,
            what=f"adaptation run {str(run_dir)!r}",
            how_to_continue=f"--resume --run-dir {run_dir}",
        )
        log.info(
            "Ray Train finished: %d worker-group start(s), the first from step %s",
            len(starts),
            starts[0]["start_step"] if starts else "?",
        )
    final = run.read_json(FINAL_FILE)
    model_dir = _fetch(run, "model", run_dir / "model")
    adapter_dir = _fetch(run, "adapter", run_dir / "adapter") if config.strategy.kind == "lora" else None
    return TrainOutcome(
        steps=int(final["step"]),
        trainable_parameters=int(final["trainable"]),
        total_parameters=int(final["total"]),
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        worker_group_starts=len(starts),
        resumed_from_step=starts[0]["start_step"] if starts else None,
    )


def _fetch(run: RunDir, rel: str, target: Path) -> Path:
    """``rel`` of the Ray run as ``target`` in the run directory (nothing to copy when it is there)."""
    if not run.exists(rel):
        raise ValueError(f"{run.uri}/{rel} does not exist: the workers finished without writing it")
    if run.is_local:
        source = run.local_path / rel
        if source.resolve() == target.resolve():
            return target
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        return target
    scratch = target.parent / f".download_{rel}"
    if scratch.exists():
        shutil.rmtree(scratch)
    run.download_dir(rel, scratch)
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)
    return target


# -- worker ---------------------------------------------------------------------------------------------
def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``payload`` is built by :func:`train_on_ray`."""
    from caloforge.training.ray.worker import worker_session

    config = from_dict(AdaptConfig, payload["config"], "adapt config (from the driver)")
    assert config.cluster is not None
    level = int(payload.get("log_level", logging.INFO))
    with worker_session(payload["storage_path"], payload["run_name"], config.cluster, level) as worker:
        _train(config, payload, worker)


def _train(config: AdaptConfig, payload: dict[str, Any], worker: WorkerContext) -> None:
    from caloforge.adapt.job import adaptation_lineage, prepare_model, save_outputs
    from caloforge.datasets.shards import Manifest
    from caloforge.datasets.streaming import ShowerStream
    from caloforge.training import job
    from caloforge.training.hooks import Hook
    from caloforge.training.loop import Trainer
    from caloforge.training.ray.storage import FaultInjection
    from caloforge.training.ray.worker import make_backend

    assert config.cluster is not None
    plan: AdaptPlan = payload["plan"]
    run, rank, world = worker.run, worker.rank, worker.world
    manifest = Manifest.load(plan.data_dir)
    if manifest.fingerprint != plan.manifest_hash:
        raise ValueError(
            f"data: {plan.data_dir} changed since the run was planned (manifest sha256 "
            f"{manifest.fingerprint[:12]} != {plan.manifest_hash[:12]})"
        )
    prepared = prepare_model(config, plan)
    loss_fn, objective = job.loss_for(prepared.model, config.objective)
    stream = ShowerStream(plan.data_dir, config.stream_config(), "train", rank, world, seed=config.loop.seed)
    lineage = adaptation_lineage(config, plan, manifest, stream.groups, objective, Path(payload["run_dir"]))
    backend = make_backend(config.engine, worker.device)
    if worker.is_main:
        trained, total = prepared.parameter_counts
        log.info(
            "worker group of %d on %s: strategy %s (%d of %d parameters train), micro-batch %d × %d",
            world,
            worker.device,
            config.strategy.kind,
            trained,
            total,
            config.loop.micro_batch_size(world),
            config.loop.grad_accum,
        )
    manager = worker.checkpoint_manager(config.cluster.num_to_keep)
    extra: list[Hook] = list(worker.run_file_hooks())
    if config.fault_injection_step is not None:  # test-only: the last rank fails once
        extra.append(FaultInjection(world - 1, config.fault_injection_step, rank, run))
    hooks = job.standard_hooks(worker.metrics_path, progress=False, extra=extra)
    trainer = Trainer(
        prepared.module,
        loss_fn,
        backend,
        stream,
        config.loop,
        hooks,
        checkpoints=manager,
        trainable=prepared.trainable,
    )
    restored_from = worker.resume(trainer, manager)
    worker.record_attempt(trainer, restored_from, engine=config.engine.backend)
    trainer.fit()
    if not worker.is_main:
        return
    model_dir, adapter_dir = worker.staging / "model", worker.staging / "adapter"
    lora = config.strategy.kind == "lora"
    save_outputs(config, prepared, trainer, lineage, model_dir, adapter_dir if lora else None)
    run.upload_dir(model_dir, "model")
    if lora:
        run.upload_dir(adapter_dir, "adapter")
    trained, total = prepared.parameter_counts
    run.write_json(FINAL_FILE, {"step": trainer.step, "trainable": trained, "total": total})
    log.info("adapted bundle (EMA weights) written to %s/model", run.uri)
