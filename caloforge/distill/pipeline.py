"""Distil a teacher into a few-step model: validate → train/fit → bundle → evaluate vs teacher → gate →
register.

``run_distillation(config, request)`` is what ``caloforge distill`` runs:

1. **Validate before anything runs** (:func:`plan_distillation`): the teacher (a bundle directory, or a
   registry URI / ``NAME@ALIAS`` resolved to an exact version and downloaded), the data (a shard set of
   detectors the teacher knows, on its mesh, with ``train`` and evaluation splits), the method against the
   teacher's parametrisation (``cd``: ``edm`` → ``consistency`` student, ``flow_matching`` →
   ``consistency_fm``), the registered model name. Every problem is a ``ValueError`` naming it.
2. **cd**: the student is the teacher's weights in the consistency parametrisation (``STUDENT_OF``), its
   default sampler ``consistency`` × ``cd.num_steps`` — or, with ``cd.student_init`` (an adapted teacher,
   CaloDiT-2's workflow), the base's distilled student's backbone with the teacher's detector row, fitted
   transforms and head (``distill.student_init``, validated in the plan); the backbone trains (the
   layer-energy head stays the teacher's) with ``consistency_distillation`` through the one job assembly
   and loop, the teacher frozen and a target network with decay ``cd.target_decay``; checkpoints in the run
   directory (``--resume``).
   **bns**: the teacher's weights unchanged; one bespoke solver per ``bns.steps`` fitted against the
   reference solve of seeded noise with conditions of ``train`` showers (``distill.bns``), stored in the
   bundle (``ShowerModelConfig.bespoke``) with default sampler ``bespoke`` × ``bns.num_steps``; each fitted
   solver is kept in ``bns/`` of the run directory, so ``--resume`` fits only the missing ones.
   **shortcut** (flow-matching teachers): the student is the teacher's network in the step-conditioned
   ``shortcut`` parametrisation (``distill.shortcut.make_shortcut_student``), default sampler ``shortcut``
   × ``shortcut.num_steps``, trained like cd (the same loop, teacher frozen, optional target network).
3. **Bundle** ``model/``: lineage ``kind=distilled``, parent = the teacher's URI and version, strategy = the
   method, the objective (``consistency_distillation`` | ``bespoke_solver``).
4. **Evaluate** student and teacher on the same held-out showers and seeds (``caloforge.evaluation``) and
   apply the **gate** (``DistillGateConfig``: distance from the teacher).
5. **Register** as a new version of the teacher's registered model, kind ``distilled``, tags teacher version,
   method, steps, sampler; alias ``candidate``, and ``promote_alias`` when the gate passes. Idempotent per
   run (a tag with the run id), as adaptation's.

Run directory (default ``$CALOFORGE_HOME/runs/distill-<teacher>-<method>-<name>``)::

    request.json  teacher/      checkpoints/ (cd)  bns/ (bns)  metrics.jsonl  distill.log
    student_init/ (a registry ``cd.student_init``)  student_init.json (how the student was initialised)
    model/        report/student  report/teacher  result.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caloforge.config import to_dict
from caloforge.datasets.shards import Manifest
from caloforge.distill.config import STUDENT_OF, DistillConfig
from caloforge.platform.objectives import make_objective
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.hooks import FailAfterStep, PeriodicEval
from caloforge.training.rundir import run_logging, start_or_resume, write_json

__all__ = [
    "DistillGateResult",
    "DistillPlan",
    "DistillRequest",
    "DistillResult",
    "apply_gate",
    "make_student",
    "plan_distillation",
    "register_distillation",
    "run_distillation",
]

log = logging.getLogger("caloforge.distill")

RUN_TAG = "caloforge.distill_run"  # the registry tag that makes registration idempotent per run
OBJECTIVE_OF = {"cd": "consistency_distillation", "shortcut": "shortcut", "bns": "bespoke_solver"}
HEADLINE = ("fpd", "kpd", "auc_low", "auc_high")


@dataclass(frozen=True)
class DistillRequest:
    """``teacher``: a bundle directory, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``NAME@ALIAS``;
    ``data``: a shard directory of detectors the teacher knows (its training shards, or any such set)."""

    teacher: str
    data: Path

    def to_dict(self) -> dict[str, str]:
        return {"teacher": self.teacher, "data": str(Path(self.data).resolve())}


@dataclass(frozen=True)
class DistillPlan:
    method: str
    teacher_dir: Path
    parent_uri: str
    parent_version: str | None
    teacher_name: str | None  # the teacher's registered model (None for a bundle directory)
    teacher_parametrisation: str
    student_parametrisation: str  # cd: the consistency parametrisation; bns: the teacher's
    detectors: tuple[str, ...]
    data_dir: Path
    manifest_hash: str
    n_train: int
    n_eval: int
    sampler: str
    num_steps: int
    register_name: str | None
    student_init_dir: Path | None = None  # cd.student_init: the initialising student's bundle
    student_init_uri: str | None = None
    student_init_version: str | None = None

    def describe(self) -> dict[str, Any]:
        init = "the teacher's weights"
        if self.student_init_uri is not None:
            init = self.student_init_uri + (
                f" (version {self.student_init_version})" if self.student_init_version else ""
            )
        return {
            "method": self.method,
            "teacher": self.parent_uri + (f" (version {self.parent_version})" if self.parent_version else ""),
            **({"student_init": init} if self.method == "cd" else {}),
            "parametrisation": f"{self.teacher_parametrisation} -> {self.student_parametrisation}",
            "detectors": list(self.detectors),
            "train_showers": self.n_train,
            "eval_showers": self.n_eval,
            "student_sampler": f"{self.sampler} x {self.num_steps}",
            "registered_model": self.register_name or "(not registered)",
        }


@dataclass(frozen=True)
class DistillGateResult:
    passed: bool
    checks: dict[str, dict[str, float | bool]] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        """Why each failed check failed: over its bound, or not measured (NaN: the evaluation's
        ``eval.metrics`` did not compute what the check compares, for student or teacher)."""
        return [
            f"{name} not measured (eval.metrics lacks what it compares)"
            if math.isnan(float(c["value"]))
            else f"{name} = {c['value']:.4g} > {c['bound']:.4g}"
            for name, c in self.checks.items()
            if not c["ok"]
        ]


@dataclass(frozen=True)
class DistillResult:
    run_dir: Path
    model_dir: Path
    method: str
    sampler: str
    num_steps: int
    steps: int  # optimizer steps (cd) or fitting iterations per solver (bns)
    metrics: dict[str, float]  # the student's
    teacher_metrics: dict[str, float]
    gate: DistillGateResult
    parent_uri: str
    parent_version: str | None
    registered: dict[str, Any] | None
    solvers: dict[str, dict[str, float]]  # bns: per step count, rmse before/after
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# -- validation -------------------------------------------------------------------------------------------
def plan_distillation(config: DistillConfig, request: DistillRequest, run_dir: Path) -> DistillPlan:
    """Check everything that can be checked before training (see the module docstring)."""
    data = Path(request.data)
    if not (data / "manifest.json").is_file():
        raise ValueError(f"data: {data} has no manifest.json (a shard directory from `caloforge data shard`)")
    manifest = Manifest.load(data)
    for split in ("train", config.eval.split):
        if split not in manifest.splits or manifest.counts[split]["total"] < 1:
            raise ValueError(f"data: {data} has no {split!r} showers (splits: {manifest.counts})")
    n_eval = min(config.eval.n_showers, int(manifest.counts[config.eval.split]["total"]))
    if n_eval < 20:
        raise ValueError(
            f"data: {data} has {n_eval} {config.eval.split!r} showers; the evaluation needs >= 20"
        )
    from caloforge.registry.store import fetch_bundle

    teacher_dir, parent_uri, parent_version, teacher_name = fetch_bundle(
        request.teacher, run_dir / "teacher", "teacher"
    )
    teacher = ShowerModel.load(teacher_dir)
    unknown = sorted(set(manifest.detectors) - set(teacher.vocab.detectors))
    if unknown:
        raise ValueError(
            f"data: {data} holds showers of {unknown}, which the teacher does not know "
            f"(it knows {list(teacher.vocab.detectors)})"
        )
    mesh = manifest.model_mesh(list(manifest.detectors))
    if mesh.shape != teacher.mesh_shape:
        raise ValueError(f"data: the showers' mesh {mesh.shape} is not the teacher's {teacher.mesh_shape}")
    param = teacher.config.parametrisation
    init_dir, init_uri, init_version = None, None, None
    if config.method == "cd":
        if param not in STUDENT_OF:
            raise ValueError(
                f"method cd: the teacher is parametrised {param!r}; consistency distillation takes "
                f"{sorted(STUDENT_OF)} teachers"
            )
        student_param = STUDENT_OF[param]
        make_objective(config.objective, student_param)  # the objective fits the student
        sampler, num_steps = "consistency", config.cd.num_steps
        if config.cd.student_init is not None:
            from caloforge.distill.student_init import check_student_init

            init_dir, init_uri, init_version, _ = fetch_bundle(
                config.cd.student_init, run_dir / "student_init", "cd.student_init"
            )
            check_student_init(teacher, ShowerModel.load(init_dir))
    elif config.method == "shortcut":
        from caloforge.platform.denoisers import STEP_TEACHERS

        if param not in STEP_TEACHERS["shortcut"]:
            raise ValueError(
                f"method shortcut: the teacher is parametrised {param!r}; the shortcut route takes "
                f"{list(STEP_TEACHERS['shortcut'])} teachers (use method cd or bns)"
            )
        student_param = "shortcut"
        make_objective(config.objective, student_param)
        sampler, num_steps = "shortcut", config.shortcut.num_steps
    else:
        student_param = param
        sampler, num_steps = "bespoke", config.bns.num_steps
    register_name = None
    if config.register.enabled:
        from caloforge.registry.versions import check_name, validate_alias

        register_name = config.register.name or teacher_name
        if register_name is None:
            raise ValueError(
                "register.name: the teacher is a bundle directory, so name the registered model to add the "
                "student to (or set register.enabled: false)"
            )
        check_name(register_name)
        validate_alias(config.register.alias)
        if config.register.promote_alias is not None:
            validate_alias(config.register.promote_alias)
    return DistillPlan(
        method=config.method,
        teacher_dir=teacher_dir,
        parent_uri=parent_uri,
        parent_version=parent_version,
        teacher_name=teacher_name,
        teacher_parametrisation=param,
        student_parametrisation=student_param,
        detectors=tuple(manifest.detectors),
        data_dir=data,
        manifest_hash=manifest.fingerprint,
        n_train=int(manifest.counts["train"]["total"]),
        n_eval=n_eval,
        sampler=sampler,
        num_steps=num_steps,
        register_name=register_name,
        student_init_dir=init_dir,
        student_init_uri=init_uri,
        student_init_version=init_version,
    )


def make_student(teacher: ShowerModel, num_steps: int = 1) -> ShowerModel:
    """The consistency student of ``teacher``: the teacher's weights (strict), its consistency
    parametrisation (``STUDENT_OF``) and default sampler ``consistency`` × ``num_steps``."""
    param = teacher.config.parametrisation
    if param not in STUDENT_OF:
        raise ValueError(f"no consistency student for a {param!r} teacher (known: {sorted(STUDENT_OF)})")
    cfg = dataclasses.replace(
        teacher.config, parametrisation=STUDENT_OF[param], sampler="consistency", num_steps=num_steps
    )
    student = ShowerModel(cfg, teacher.vocab, teacher.mesh, lineage=teacher.lineage)
    student.load_state_dict(teacher.state_dict(), strict=True)
    return student


# -- gate -------------------------------------------------------------------------------------------------
def apply_gate(
    config: DistillConfig, student: dict[str, float], teacher: dict[str, float]
) -> DistillGateResult:
    """The student's distance from its teacher against the configured bounds."""
    gate = config.gate
    checks: dict[str, dict[str, float | bool]] = {}

    def check(name: str, value: float, bound: float) -> None:
        checks[name] = {
            "value": float(value),
            "bound": float(bound),
            "ok": bool(math.isfinite(value) and value <= bound),
        }

    if gate.max_auc_increase is not None:
        for key in ("auc_low", "auc_high"):
            check(
                f"{key}_increase",
                student.get(key, math.nan) - teacher.get(key, math.nan),
                gate.max_auc_increase,
            )
    if gate.max_fpd_ratio is not None:
        t_fpd = teacher.get("fpd", math.nan)
        ratio = student.get("fpd", math.nan) / t_fpd if math.isfinite(t_fpd) and t_fpd > 0 else math.inf
        check("fpd_ratio", ratio, gate.max_fpd_ratio)
    return DistillGateResult(passed=all(bool(c["ok"]) for c in checks.values()), checks=checks)


# -- the run ----------------------------------------------------------------------------------------------
def _default_run_dir(config: DistillConfig, request: DistillRequest) -> Path:
    from caloforge import paths

    stem = Path(request.teacher).name if Path(request.teacher).is_dir() else request.teacher
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem.removeprefix("models:/"))
    return paths.runs_dir() / f"distill-{safe}-{config.method}-{config.name}"


def run_distillation(
    config: DistillConfig,
    request: DistillRequest,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
    extra_evals: Sequence[PeriodicEval] = (),
) -> DistillResult:
    """Run (or resume) one distillation; returns the :class:`DistillResult` (also ``run_dir/result.json``).
    ``on_stage(stage, data)`` is called when the run enters the evaluation (``"evaluate"``, with the steps),
    as ``caloforge.adapt.pipeline.run_adaptation``'s. ``extra_evals``: evaluations along a ``cd`` student's
    training (``training.hooks.PeriodicEval``; their metrics land in ``metrics.jsonl``), as
    ``training.run.train``'s."""
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(config, request)
    if extra_evals and config.method != "cd":
        raise ValueError(f"extra_evals run along a trained student (method cd), not method {config.method!r}")
    record = {"request": request.to_dict(), "config": to_dict(config)}
    with run_logging(run_dir, "distill.log", config.torch_threads):
        return _run(config, request, run_dir, resume, record, on_stage, tuple(extra_evals))


def register_distillation(
    config: DistillConfig,
    request: DistillRequest,
    result: DistillResult,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Register the student of a finished run made with ``register.enabled: false`` (its ``result``) as
    :func:`run_distillation` would have (``config.register``; the same tags), plus ``tags`` on a new version
    (they override the computed ones: the adaptation service points ``parent_uri`` / ``teacher_version`` at
    the registered teacher and adds ``caloforge.service_job``). Idempotent per run."""
    plan = plan_distillation(config, request, result.run_dir)
    run_id = str(json.loads((result.run_dir / "request.json").read_text())["run_id"])
    return _register(
        config,
        plan,
        run_id,
        result.model_dir,
        result.metrics,
        result.teacher_metrics,
        result.gate,
        result.steps,
        tags,
    )


def _run(
    config: DistillConfig,
    request: DistillRequest,
    run_dir: Path,
    resume: bool,
    record: dict[str, Any],
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
    extra_evals: tuple[PeriodicEval, ...] = (),
) -> DistillResult:
    t0 = time.perf_counter()
    plan = plan_distillation(config, request, run_dir)
    run_id = start_or_resume(run_dir, record, resume, "a distillation")
    log.info("distillation %s: %s", run_dir, plan.describe())
    model_dir = run_dir / "model"
    if config.method in ("cd", "shortcut"):
        steps, solvers = _distil_cd(config, request, plan, run_dir, model_dir, extra_evals), {}
    else:
        steps, solvers = _fit_bns(config, request, plan, run_dir, model_dir)
    if on_stage is not None:
        on_stage("evaluate", {"steps": steps})
    metrics, teacher_metrics = _evaluate(config, request, plan, model_dir, run_dir)
    gate = apply_gate(config, metrics, teacher_metrics)
    log.info("gate %s%s", "passed" if gate.passed else "failed: ", "; ".join(gate.reasons()))
    registered = None
    if config.register.enabled:
        registered = _register(config, plan, run_id, model_dir, metrics, teacher_metrics, gate, steps)
    result = DistillResult(
        run_dir=run_dir,
        model_dir=model_dir,
        method=config.method,
        sampler=plan.sampler,
        num_steps=plan.num_steps,
        steps=steps,
        metrics=metrics,
        teacher_metrics=teacher_metrics,
        gate=gate,
        parent_uri=plan.parent_uri,
        parent_version=plan.parent_version,
        registered=registered,
        solvers=solvers,
        wall_time_s=time.perf_counter() - t0,
    )
    write_json(run_dir / "result.json", result.to_dict())
    return result


def _lineage(config: DistillConfig, plan: DistillPlan, manifest: Manifest, groups: Any, run_dir: Path) -> Any:
    from caloforge.training import job

    return job.training_lineage(
        manifest,
        groups,
        OBJECTIVE_OF[config.method],
        extra={
            "run_dir": str(run_dir.resolve()),
            "run_name": config.name,
            "sampler": plan.sampler,
            "num_steps": str(plan.num_steps),
            **_student_init_tags(plan),
        },
        kind="distilled",
        parent_uri=plan.parent_uri,
        parent_version=plan.parent_version,
        strategy=config.method,
        target_detector=plan.detectors[0] if len(plan.detectors) == 1 else None,
    )


def _student_init_tags(plan: DistillPlan) -> dict[str, str]:
    """Lineage extra / registry tags of a student initialised from another student (none otherwise)."""
    if plan.student_init_uri is None:
        return {}
    tags = {"student_init": plan.student_init_uri}
    if plan.student_init_version is not None:
        tags["student_init_version"] = plan.student_init_version
    return tags


def _distil_cd(
    config: DistillConfig,
    request: DistillRequest,
    plan: DistillPlan,
    run_dir: Path,
    model_dir: Path,
    extra_evals: tuple[PeriodicEval, ...] = (),
) -> int:
    from caloforge.datasets.streaming import ShowerStream
    from caloforge.training import job
    from caloforge.training.loop import Trainer
    from caloforge.training.state import CheckpointManager
    from caloforge.training.torch_backend import TorchBackend

    manifest = Manifest.load(request.data)
    teacher = ShowerModel.load(plan.teacher_dir)
    target_decay = config.cd.target_decay
    if config.method == "shortcut":
        from caloforge.distill.shortcut import make_shortcut_student

        student = make_shortcut_student(teacher, config.shortcut.num_steps)
        target_decay = config.shortcut.target_decay
    elif plan.student_init_dir is not None:
        from caloforge.distill.student_init import init_student

        student, report = init_student(teacher, ShowerModel.load(plan.student_init_dir), config.cd.num_steps)
        log.info("student initialised from %s: %s", plan.student_init_uri, report.summary())
        write_json(
            run_dir / "student_init.json",
            {"uri": plan.student_init_uri, "version": plan.student_init_version, **report.to_dict()},
        )
    else:
        student = make_student(teacher, config.cd.num_steps)
    # The backbone trains; the layer-energy head stays the teacher's (its loss term is then a constant).
    trainable = [p for n, p in student.named_parameters() if not n.startswith("energy_head.")]
    loss_fn, _ = job.loss_for(student, config.objective)
    stream = ShowerStream(
        request.data, config.stream_config(), "train", rank=0, world_size=1, seed=config.loop.seed
    )
    lineage = _lineage(config, plan, manifest, stream.groups, run_dir)
    hooks: list[FailAfterStep] = []
    if config.fault_injection_step is not None:
        hooks.append(FailAfterStep(config.fault_injection_step, run_dir, "distillation"))
    hooks = job.standard_hooks(
        run_dir / "metrics.jsonl", progress=config.progress, evals=extra_evals, extra=hooks
    )
    trainer = Trainer(
        student,
        loss_fn,
        TorchBackend(config.device),
        stream,
        config.loop,
        hooks,
        checkpoints=CheckpointManager(run_dir / "checkpoints", config.keep_checkpoints),
        trainable=trainable,
        teacher=teacher,
        target_decay=target_decay,
    )
    trainer.fit()
    job.save_final_bundle(trainer, model_dir, lineage, extra={"target_decay": str(target_decay)})
    return trainer.step


def _fit_bns(
    config: DistillConfig, request: DistillRequest, plan: DistillPlan, run_dir: Path, model_dir: Path
) -> tuple[int, dict[str, dict[str, float]]]:
    import torch

    from caloforge.datasets.streaming import ShowerStream, load_split
    from caloforge.distill.bns import fit_bespoke
    from caloforge.platform.samplers import BespokeSolver
    from caloforge.platform.seeding import Purpose, derive_seeds

    opts = config.bns
    manifest = Manifest.load(request.data)
    model = ShowerModel.load(plan.teacher_dir).eval().requires_grad_(False)
    train = load_split(request.data, "train")
    rng = torch.Generator().manual_seed(opts.seed)
    total = opts.n_train + opts.n_heldout
    rows = torch.randint(0, len(train.conditions), (total,), generator=rng).numpy()
    seeds = derive_seeds(opts.seed, total, purpose=Purpose.GENERATE)
    pairs: list[tuple[Any, Any, Any]] = []
    reference = f"{opts.reference_sampler} x {opts.reference_steps}"
    with torch.no_grad():
        for start in range(0, total, opts.batch_size):
            stop = min(start + opts.batch_size, total)
            cond = model.encode_conditions(train.conditions.subset(rows[start:stop]))
            if model.reads_layer_energies:  # as at generation: the head's layer energies first
                layers = model.sample_layer_energies(model.initial_layer_noise(seeds[start:stop]), cond)
                cond = model.with_layers(cond, layers)
            x0 = model.denoiser.prior(model.initial_noise(seeds[start:stop]))
            ref = model.sample(
                model.initial_noise(seeds[start:stop]), cond, opts.reference_sampler, opts.reference_steps
            )
            pairs.append((x0, ref, cond))
    n_train_batches = max(1, math.ceil(opts.n_train / opts.batch_size))
    train_pairs, heldout = pairs[:n_train_batches], pairs[n_train_batches:]
    solvers, report = [], {}
    (run_dir / "bns").mkdir(exist_ok=True)
    for n in sorted(opts.steps):
        saved = run_dir / "bns" / f"solver_{n}.json"
        if saved.is_file():  # resume: a solver fitted before the interruption
            data = json.loads(saved.read_text())
            solver = BespokeSolver(**{**data["solver"], "b": tuple(tuple(r) for r in data["solver"]["b"])})
            report[str(n)] = data["report"]
            solvers.append(solver)
            log.info("bespoke %d-step: kept from %s", n, saved)
            continue
        init = BespokeSolver.euler(model.denoiser.time_grid(n))
        fit = fit_bespoke(
            model.velocity,
            train_pairs,
            init,
            iterations=opts.iterations,
            lr=opts.lr,
            learn_times=opts.learn_times,
            heldout=heldout,
            fitted_against=reference,
        )
        report[str(n)] = {
            "rmse_euler": fit.heldout_rmse_init if fit.heldout_rmse_init is not None else fit.rmse_init,
            "rmse_bespoke": fit.heldout_rmse_final if fit.heldout_rmse_final is not None else fit.rmse_final,
        }
        write_json(saved, {"solver": to_dict(fit.solver), "report": report[str(n)]})
        solvers.append(fit.solver)
        if config.fault_injection_step is not None and not (run_dir / "fault_injection_fired").exists():
            (run_dir / "fault_injection_fired").write_text(str(n))
            raise RuntimeError(f"fault injection (test-only): distillation fails after the {n}-step solver")
    model.set_bespoke_solvers(solvers)
    model.set_sampling_defaults("bespoke", opts.num_steps)
    stream = ShowerStream(request.data, config.stream_config(), "train", rank=0, world_size=1, seed=0)
    lineage = _lineage(config, plan, manifest, stream.groups, run_dir)
    lineage = dataclasses.replace(
        lineage,
        extra={
            **lineage.extra,
            "bns_steps": ",".join(map(str, sorted(opts.steps))),
            "bns_reference": reference,
        },
    )
    model.save(model_dir, lineage=lineage, overwrite=True)
    return opts.iterations, report


def _evaluate(
    config: DistillConfig, request: DistillRequest, plan: DistillPlan, model_dir: Path, run_dir: Path
) -> tuple[dict[str, float], dict[str, float]]:
    """Student and teacher metrics on the same held-out showers and seeds (a resumed run gets the same)."""
    from caloforge.datasets.streaming import load_split
    from caloforge.evaluation.api import evaluate_model

    reference = load_split(request.data, config.eval.split)
    out = []
    for who, bundle in (("student", model_dir), ("teacher", plan.teacher_dir)):
        report = evaluate_model(bundle, reference, plan.n_eval, config.eval.metrics)
        report.write(run_dir / "report" / who)
        out.append({k: float(v) for k, v in report.metrics.items() if isinstance(v, int | float)})
    return out[0], out[1]


def _register(
    config: DistillConfig,
    plan: DistillPlan,
    run_id: str,
    model_dir: Path,
    metrics: dict[str, float],
    teacher_metrics: dict[str, float],
    gate: DistillGateResult,
    steps: int,
    extra_tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    from caloforge.registry.store import RegistryStore

    store = RegistryStore()
    name = plan.register_name
    assert name is not None
    known = any(m.name == name for m in store.list_models())
    existing = store.search(tags={RUN_TAG: run_id}, name=name) if known else []
    if existing:
        version = existing[0]
        log.info("run %s is registered already as %s (not registered again)", run_id, version.uri)
    else:
        tags = {
            "parent_uri": plan.parent_uri,
            "adaptation_method": config.method,  # the registry's "how derived" (caloforge.adaptation_method)
            "distill_method": config.method,
            "distill_sampler": plan.sampler,
            "distill_steps": str(plan.num_steps),
            "dataset_manifest_hash": plan.manifest_hash,
            RUN_TAG: run_id,
            "caloforge.steps": str(steps),
            "caloforge.objective": OBJECTIVE_OF[config.method],
            "caloforge.gate": "passed" if gate.passed else "failed: " + "; ".join(gate.reasons()),
        }
        if plan.parent_version is not None:
            tags["parent_version"] = plan.parent_version
            tags["teacher_version"] = plan.parent_version
        tags.update(_student_init_tags(plan))
        if len(plan.detectors) == 1:
            tags["target_detector"] = plan.detectors[0]
        for key in HEADLINE:
            value = teacher_metrics.get(key, math.nan)
            if math.isfinite(value):
                tags[f"teacher.{key}"] = f"{value:.6g}"
        tags.update(extra_tags or {})
        headline = {k: v for k, v in metrics.items() if k in HEADLINE and math.isfinite(v)}
        version = store.register_bundle(
            model_dir,
            name=name,
            kind="distilled",
            tags=tags,
            metrics=headline,
            description=(
                f"{config.method} distillation of {plan.parent_uri} ({plan.sampler} x {plan.num_steps})"
            ),
            aliases=(config.register.alias,),
        )
    promoted = False
    if config.register.promote_alias is not None and gate.passed:
        current = store.get(name, version=version.version)
        if config.register.promote_alias not in current.aliases:
            store.promote(
                name,
                version.version,
                config.register.promote_alias,
                reason=f"{config.method} student within the gate of its teacher {plan.parent_uri}",
            )
        promoted = True
    version = store.get(name, version=version.version)
    return {
        "name": name,
        "version": version.version,
        "uri": version.uri,
        "aliases": list(version.aliases),
        "promoted": promoted,
    }
