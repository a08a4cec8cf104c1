"""Benchmark: the quality–speed study of distillation (issue #13) — few-step samplers against their teacher.

Protocol (docs/distillation.md explains the numbers):

1. **Teacher**: the ``configs/train/debug.yaml`` model (flow matching, ``debug`` backbone; ``--backbone S`` on
   a GPU) trained with ``caloforge.training.run.train`` on the simulated ``par04-siw`` and ``pbwo4`` showers
   (e- and pi+), one spare detector slot; cached in the work directory. ``--teacher-recipe fidelity`` takes
   the model, objective and loop of ``configs/train/fidelity-cpu.yaml`` instead (a teacher that improves
   with NFE; docs/distillation.md). A **fixed held-out set** of both
   detectors (another simulation seed) is what every row is evaluated on.
2. **Routes** (``--routes``, a comma-separated subset of ``ROUTES``; each yields rows = a bundle + a sampler
   + a step count):
   - ``euler``, ``midpoint``, ``heun``: the teacher at 1, 2, 4, 8, 16, 32 network evaluations (NFE; a
     midpoint or Heun step takes two, so they start at 2);
   - ``cd``: the consistency student (``caloforge distill --method cd``, ``configs/distill/cd.yaml`` at the
     study's budget) sampled with 1, 2 and 4 steps;
   - ``shortcut``: the one-network route for flow-matching teachers (``--method shortcut``,
     ``configs/distill/shortcut.yaml``) at the consistency student's budget, sampled with 1, 2 and 4 steps;
   - ``bns``: bespoke solvers for the teacher (``--method bns``, ``configs/distill/bns.yaml``) at 2, 4, 8;
   - another route is one function added to ``ROUTES``: ``route(ctx) -> list[Candidate]`` (see ``route_cd``).
3. **Quality** of every row: ``caloforge.evaluation.evaluate_model`` on the held-out set with the same seeds:
   classifier AUCs on high-level features (``auc_high``) and voxels (``auc_low``; 0.5 = indistinguishable),
   FPD and KPD beside their data-vs-data floor (two halves of the held-out set).
4. **Speed** of every row: the row's graph exported to ONNX (``caloforge.registry.export.export_onnx``,
   plain fp32, parity-checked against PyTorch) and run in onnxruntime on ONE CPU thread (the ``grid`` session
   profile) at batch 1 and ``--batch`` (default 100): ms per shower (wall). With CUDA present, also eager
   PyTorch on the GPU at batch 100 and 1000. A row timed while other work shared the cores is timed again
   alone with ``--retime LABEL[,LABEL]`` (or ``all``; the cached quality is kept, the row marked
   ``retimed``).
5. **Adapted models distil like the base** (``--no-adapted`` skips it): the teacher adapted to the held-out
   ``lar-pb`` (``caloforge adapt``, full fine-tuning, ``configs/adapt/full.yaml``) is distilled (a) from the
   base's distilled student (``cd.student_init``, CaloDiT-2's workflow) and (b) from its own weights, with
   the same budget, data order and seeds; the consistency loss on a fixed probe of ``lar-pb`` showers
   (``distill.student_init.probe_consistency_loss``) is logged along both runs, and a shorter run from the
   base student is added. Reported: the steps and wall time the base-student start needs to reach the
   from-scratch run's final consistency loss, and the 1-step AUCs of every run on ``lar-pb`` held-out showers.

Goal checks printed (issue #13): the 1-step student's ``auc_high`` within 0.05 of the teacher's at 32 NFE (the
best sampler there), and at equal quality (``auc_high`` ≤ the student's) ≥ 10× faster (ONNX, one thread,
batch 1) than the fastest teacher row of the samplers measured (named in the line: run ``euler``,
``midpoint`` and ``heun`` for the goal as the issue states it); the fastest learned solver (``bns``) of the
teacher at equal quality is shown beside it.

Outputs: a table, ``<results>_pareto.png`` (quality vs ms per shower, log x; the non-dominated front joined)
and the JSON record (default ``benchmarks/results/distillation.json``; ``--quick``:
``distillation_quick.json``: a tiny teacher with a 2-step default sampler and layer-energy head, one step
count per student and solver route, no short adapted run). Finished pieces (teacher, distillations, rows)
are cached in the work directory (``--work-dir``, default
``$CALOFORGE_HOME/bench/distillation-<backbone>[_quick]``); a cached distillation trained with another
config than the rerun's (an edited ``configs/distill/*.yaml``) is refused, not reused.

    .venv/bin/python benchmarks/distillation.py --quick          # the smoke run (tests): about a minute
    nice .venv/bin/python benchmarks/distillation.py             # the CPU study (debug backbone, ~24 min)
    .venv/bin/python benchmarks/distillation.py --teacher-recipe fidelity --base-steps 6000 \
        --base-showers 8000 --n-eval 1000 --cd-steps 1000 --threads 2 --no-adapted   # ~45 min, 2 idle cores
    .venv/bin/python benchmarks/distillation.py --device cuda --backbone S   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from common import (
    RESULTS,
    TRAIN_RECIPES,
    git_commit,
    resolved_architecture,
    train_recipe,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]

BASE_DETECTORS = ("par04-siw", "pbwo4")
# --teacher-recipe: the training recipe (common.TRAIN_RECIPES) whose model, objective and loop the teacher
# takes (the data is the study's)
ADAPT_TARGET = "lar-pb"
PARTICLES = ("e-", "pi+")
TEACHER_SAMPLERS = ("euler", "midpoint", "heun")
GOAL_AUC_GAP, GOAL_SPEEDUP = 0.05, 10.0
QUALITY = "auc_high"  # the Pareto front's and the goal's quality (lower is better)
METRICS = ("auc_high", "auc_low", "fpd", "floor/fpd", "kpd", "floor/kpd")


# the plan's fields every teacher key holds (optional ones join only when set: ``Plan.teacher_key``)
TEACHER_KEY_FIELDS = (
    "backbone",
    "teacher_recipe",
    "base_showers",
    "base_steps",
    "batch_size",
    "energy_gev",
    "seed",
)

TEACHER_SECTIONS = ("model", "objective", "loop")  # what ``--teacher-set`` may change


@dataclass(frozen=True)
class Plan:
    """Everything that decides the study's numbers (hashed into the cache keys)."""

    backbone: str
    device: str
    threads: int  # torch intra-op threads for training and evaluation (0: torch's default)
    # teacher
    base_showers: int  # per base detector
    base_steps: int
    batch_size: int
    n_eval: int  # the fixed held-out set (as many showers generated per row)
    nfe: tuple[int, ...]
    # consistency distillation
    cd_steps: int
    cd_batch_size: int
    cd_lr: float
    cd_sampling: tuple[int, ...]
    # shortcut models: the consistency student's budget (cd_steps, cd_batch_size, cd_lr)
    shortcut_sampling: tuple[int, ...]
    # bespoke solvers
    bns_steps: tuple[int, ...]
    bns_iterations: int
    bns_n_train: int
    bns_reference_steps: int
    bns_lr: float
    # timing
    batch: int  # the large CPU batch (batch 1 always)
    gpu_batches: tuple[int, ...]
    min_time_s: float
    max_reps: int
    # adapted models
    adapt_showers: int
    adapt_steps: int
    adapted_cd_steps: int
    adapted_short_steps: int  # 0: no short run
    probe_showers: int
    probe_every: int
    n_eval_adapted: int
    energy_gev: tuple[float, float] = (2.0, 100.0)
    seed: int = 0
    # quick-mode model changes (None: configs/train/debug.yaml's): the layer-energy head's sampler steps
    # (every row's export traces them), the teacher's default steps (the pipelines' teacher evaluations)
    layer_energy_steps: int | None = None
    teacher_num_steps: int | None = None
    # the teacher's training recipe (model, objective, loop): a key of TRAIN_RECIPES
    teacher_recipe: str = "debug"
    # ``--cd-set`` overrides of the consistency student's config (after the study's budget is applied)
    cd_overrides: tuple[str, ...] = ()
    # ``--shortcut-set`` overrides of the shortcut student's config (after the study's budget is applied)
    shortcut_overrides: tuple[str, ...] = ()
    # ``--teacher-set`` overrides of the teacher's training config (``model.*``, ``objective.*``,
    # ``loop.*`` keys, after the recipe and the study's budget are applied); part of every key
    teacher_overrides: tuple[str, ...] = ()
    # which stage may empty a layer when a row generates its evaluation sample and its graph
    # (``layer_energy.empty_layers``); None: each bundle's own. Part of the rows' keys only when set
    empty_layers: str | None = None
    # seeds of each classifier in the rows' evaluation (the AUC is their mean, ± their spread); None: the
    # evaluation's default (2 for n_eval >= 200). Part of the rows' keys only when set
    classifier_seeds: int | None = None

    def key(self, *fields: str, **extra: Any) -> str:
        data = {f: getattr(self, f) for f in fields} | extra
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]

    def teacher_key(self) -> str:
        """The plan's settings and the resolved architecture (a changed flavour default, such as
        ``pos_max_freq``, trains a new teacher)."""
        extra: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("layer_energy_steps", "teacher_num_steps")
            if getattr(self, k) is not None
        }
        if self.teacher_overrides:
            extra["teacher_overrides"] = list(self.teacher_overrides)
        return self.key(*TEACHER_KEY_FIELDS, **extra, architecture=resolved_architecture(model_config(self)))

    def cd_key(self) -> str:
        extra = {"cd_overrides": list(self.cd_overrides)} if self.cd_overrides else {}
        return self.key("cd_steps", "cd_batch_size", "cd_lr", teacher=self.teacher_key(), **extra)

    def shortcut_key(self) -> str:
        extra = {"shortcut_overrides": list(self.shortcut_overrides)} if self.shortcut_overrides else {}
        return self.key(
            "cd_steps", "cd_batch_size", "cd_lr", method="shortcut", teacher=self.teacher_key(), **extra
        )

    def bns_key(self) -> str:
        return self.key(
            "bns_steps",
            "bns_iterations",
            "bns_n_train",
            "bns_reference_steps",
            "bns_lr",
            t=self.teacher_key(),
        )


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(
            backbone=args.backbone,
            device=args.device,
            threads=1,
            base_showers=100,  # the pipelines' own check needs >= 20 test-split showers (10 %)
            base_steps=6,
            batch_size=8,
            n_eval=40,
            nfe=(1, 2),
            cd_steps=4,
            cd_batch_size=8,
            cd_lr=1e-3,
            cd_sampling=(1,),
            shortcut_sampling=(1,),
            bns_steps=(2,),
            bns_iterations=3,
            bns_n_train=8,
            bns_reference_steps=4,
            bns_lr=5e-3,
            batch=10,
            gpu_batches=(10, 100),
            min_time_s=0.02,
            max_reps=2,
            adapt_showers=140,
            adapt_steps=2,
            adapted_cd_steps=4,
            adapted_short_steps=0,  # the short run's headline is tested on hand-made runs
            probe_showers=8,
            probe_every=2,
            n_eval_adapted=20,
            layer_energy_steps=2,
            teacher_num_steps=2,
        )
    else:  # the CPU study (debug backbone, about 24 minutes on 2 contended cores)
        plan = Plan(
            backbone=args.backbone,
            device=args.device,
            threads=1,  # on a shared 2-core machine a second thread thrashes
            base_showers=1000,
            base_steps=400,
            batch_size=32,
            n_eval=200,
            nfe=(1, 2, 4, 8, 16, 32),
            cd_steps=160,
            cd_batch_size=32,
            cd_lr=5e-4,
            cd_sampling=(1, 2, 4),
            shortcut_sampling=(1, 2, 4),
            bns_steps=(2, 4, 8),
            bns_iterations=60,
            bns_n_train=96,
            bns_reference_steps=32,
            bns_lr=5e-3,
            batch=100,
            gpu_batches=(100, 1000),
            min_time_s=0.5,
            max_reps=10,
            adapt_showers=400,
            adapt_steps=40,
            adapted_cd_steps=40,
            adapted_short_steps=10,
            probe_showers=48,
            probe_every=5,
            n_eval_adapted=150,
        )
    changes: dict[str, Any] = {}
    for name in ("base_steps", "base_showers", "n_eval", "cd_steps", "bns_iterations", "adapted_cd_steps"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.threads is not None:
        changes["threads"] = args.threads
    changes["teacher_recipe"] = args.teacher_recipe
    changes["cd_overrides"] = tuple(args.cd_overrides)
    changes["shortcut_overrides"] = tuple(args.shortcut_overrides)
    changes["teacher_overrides"] = tuple(args.teacher_overrides)
    changes["empty_layers"] = args.empty_layers
    changes["classifier_seeds"] = args.classifier_seeds
    plan = dataclasses.replace(plan, **changes)
    for text in plan.teacher_overrides:
        section = text.split("=", 1)[0].split(".", 1)[0]
        if "=" not in text or section not in TEACHER_SECTIONS:
            raise ValueError(
                f"--teacher-set {text!r}: expected KEY=VALUE with KEY under one of {list(TEACHER_SECTIONS)}"
            )
    if plan.classifier_seeds is not None and plan.classifier_seeds < 1:
        raise ValueError(f"--classifier-seeds must be >= 1, got {plan.classifier_seeds}")
    if plan.n_eval < 20 or plan.n_eval_adapted < 20 or min(plan.nfe) < 1 or plan.cd_steps < 1:
        raise ValueError("n_eval and n_eval_adapted must be >= 20, NFE >= 1, cd_steps >= 1")
    if not 0 <= plan.adapted_short_steps <= plan.adapted_cd_steps:
        raise ValueError("adapted_short_steps must be in [0, adapted_cd_steps]")
    return plan


# -- helpers ----------------------------------------------------------------------------------------------
def cached(path: Path, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s record kept in ``path`` (a JSON file; a rerun reuses it)."""
    if path.is_file():
        return json.loads(path.read_text()) | {"cached": True}
    record = fn()
    write_record(path, record)
    return record | {"cached": False}


def check_retime_labels(labels: frozenset[str], rows: list[dict]) -> None:
    """ValueError naming the ``--retime`` labels no row has (a typo would silently time nothing)."""
    unknown = sorted(labels - {"all"} - {r["label"] for r in rows})
    if unknown:
        raise ValueError(f"--retime: no row labelled {unknown} (rows: {[r['label'] for r in rows]})")


def write_record(path: Path, record: dict[str, Any]) -> None:
    """``record`` as ``path`` (JSON), whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def eval_config(n: int, classifier_seeds: int | None = None) -> Any:
    """The evaluation of every row (as ``configs/eval/ci.yaml``: small classifiers; no groups, no plots);
    ``classifier_seeds`` replaces the classifiers' default number of seeds."""
    from caloforge.config import from_dict
    from caloforge.evaluation.config import EvalConfig

    return from_dict(
        EvalConfig,
        {
            "seed": 0,
            "n_bins": 30,
            "metrics": ["response", "fpd", "kpd", "cls_low", "cls_high"],
            "floor_metrics": ["fpd", "kpd"],
            "classifier": {
                "hidden": 64,
                "n_layers": 2,
                "lr": 1.0e-3,
                "epochs": 8 if n >= 200 else 2,
                "batch_size": 256,
                "patience": 3,
                "n_seeds": classifier_seeds or (2 if n >= 200 else 1),
            },
            "fpd": {
                "min_samples": max(10, min(200, n // 4)),
                "max_samples": max(15, n // 2),
                "num_points": 5 if n >= 200 else 2,
                "num_batches": 4 if n >= 200 else 2,
            },
            "kpd": {"batch_size": max(10, min(500, n // 4)), "num_batches": 6 if n >= 200 else 2},
            "groups": {"enabled": False},
            "plots": {"enabled": False},
        },
        "benchmarks/distillation.py eval",
    )


def simulate(detectors: tuple[str, ...], n: int, seed: int, plan: Plan, out: Path, split: tuple) -> Path:
    """``n`` showers per detector simulated and sharded into ``out/shards`` (cached)."""
    from caloforge.datasets.prepare import SimulateConfig, prepare_shards
    from caloforge.datasets.shards import ShardConfig, SplitFractions

    spec = SimulateConfig(
        detectors=detectors,
        particles=PARTICLES,
        n_per_detector=n,
        energy_gev=plan.energy_gev,
        seed=seed,
        shards=ShardConfig(showers_per_shard=500, split=SplitFractions(*split), seed=seed),
    )
    return prepare_shards(None, spec, out)


def recipe(plan: Plan) -> tuple[Path, dict[str, Any]]:
    """The teacher recipe's training config: its path and its YAML."""
    return train_recipe(plan.teacher_recipe)


def model_config(plan: Plan) -> dict[str, Any]:
    """The teacher's model section: the recipe's, at the study's backbone, with ``--teacher-set model.*``."""
    from caloforge.config import apply_overrides

    model = dict(recipe(plan)[1]["model"])
    model["backbone"] = plan.backbone
    if plan.teacher_num_steps is not None:
        model["num_steps"] = plan.teacher_num_steps
    if plan.layer_energy_steps is not None:
        model["layer_energy"] = {**model.get("layer_energy", {}), "num_steps": plan.layer_energy_steps}
    return apply_overrides({"model": model}, teacher_overrides(plan, "model"))["model"]


def teacher_overrides(plan: Plan, section: str) -> list[str]:
    """The ``--teacher-set`` overrides of one section of the training config (``model``, ``objective``,
    ``loop``), keys kept from the top (``model.layer_energy.space=log_below``)."""
    return [o for o in plan.teacher_overrides if o.split("=", 1)[0].split(".", 1)[0] == section]


def train_teacher(plan: Plan, work: Path) -> dict[str, Any]:
    """The teacher: the recipe's model, objective and loop (``TRAIN_RECIPES``) trained on the base
    detectors (``configs/train/debug.yaml``'s data section) at the study's budget (cached)."""
    from caloforge.config import apply_overrides, from_dict
    from caloforge.training.run import TrainConfig, train

    run_dir = work / f"teacher-{plan.teacher_key()}"
    path = REPO / "configs" / "train" / "debug.yaml"
    data = yaml.safe_load(path.read_text())
    recipe_path, recipe_data = recipe(plan)
    data["objective"] = recipe_data["objective"]
    loop = recipe_data["loop"]
    loop.update(
        steps=plan.base_steps,
        batch_size=plan.batch_size,
        log_every=max(1, min(50, plan.base_steps // 4)),
        checkpoint_every=plan.base_steps,
        seed=plan.seed,
    )
    data.update(
        name="distillation-bench-teacher",
        model=model_config(plan),
        loop=loop,
        eval={"every": 0},
        device=plan.device,
        keep_checkpoints=1,
        progress=False,
        torch_threads=plan.threads,
    )
    data["data"]["simulate"].update(
        detectors=list(BASE_DETECTORS),
        n_per_detector=plan.base_showers,
        energy_gev=list(plan.energy_gev),
        shards={"showers_per_shard": 500, "seed": 7},
    )
    data["data"]["spare_detector_slots"] = 1  # the adapted detector's slot
    data = apply_overrides(data, teacher_overrides(plan, "objective") + teacher_overrides(plan, "loop"))
    config = from_dict(TrainConfig, data, f"{path} with {recipe_path.name}'s model, objective and loop")

    def run() -> dict[str, Any]:
        if run_dir.exists():  # an interrupted run: start again (the record is written only when finished)
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        result = train(config, run_dir)
        return {
            "model_dir": str(result.model_dir),
            "shards": str(result.manifest_dir),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "wall_s": time.perf_counter() - t0,
        }

    print(f"teacher: {run_dir}", flush=True)
    return cached(work / f"teacher-{plan.teacher_key()}.json", run)


def distill_config(
    plan: Plan, method: str, name: str, steps: int | None = None, student_init: str | None = None
):
    """``configs/distill/<method>.yaml`` at the study's budget; registration off; the pipeline's own
    evaluation reduced to its minimum (every row is evaluated on the fixed held-out set)."""
    from caloforge.config import apply_overrides, from_dict
    from caloforge.distill.config import DistillConfig

    path = REPO / "configs" / "distill" / f"{method}.yaml"
    data = yaml.safe_load(path.read_text())
    if method in ("cd", "shortcut"):
        n = steps if steps is not None else plan.cd_steps
        data["loop"].update(
            steps=n,
            batch_size=plan.cd_batch_size,
            log_every=max(1, min(10, n // 4)),
            checkpoint_every=n,
            seed=plan.seed,
        )
        data["loop"]["optim"]["lr"] = plan.cd_lr
        if method == "cd":
            data["cd"].update(num_steps=1, student_init=student_init)
            data = apply_overrides(data, plan.cd_overrides)
        else:
            data["shortcut"].update(num_steps=1)
            data = apply_overrides(data, plan.shortcut_overrides)
    else:
        data["bns"].update(
            steps=list(plan.bns_steps),
            num_steps=max(plan.bns_steps),
            reference_steps=plan.bns_reference_steps,
            n_train=plan.bns_n_train,
            n_heldout=max(8, plan.bns_n_train // 4),
            batch_size=min(32, plan.bns_n_train),
            iterations=plan.bns_iterations,
            lr=plan.bns_lr,
            seed=plan.seed,
        )
    data.update(
        name=name,
        eval={
            "n_showers": 20,
            "split": "test",
            "metrics": {
                "metrics": ["response"],
                "floor": False,
                "groups": {"enabled": False},
                "plots": {"enabled": False},
            },
        },
        register={"enabled": False},
        device=plan.device,
        progress=False,
        torch_threads=plan.threads,
    )
    return from_dict(DistillConfig, data, str(path))


# What a cached student's config may differ in from a rerun's (how it ran, not what it learned).
CACHE_NEUTRAL_KEYS = ("name", "progress", "torch_threads")


def check_cached_config(run_dir: Path, config: Any) -> None:
    """ValueError when the cached run ``run_dir`` was trained with another config than ``config`` (a
    changed ``configs/distill/<method>.yaml`` or default: the cache key holds the study's settings only).
    Keys the recorded config lacks (added later) count at their defaults."""
    from caloforge.config import from_dict, to_dict
    from caloforge.registry.tracking import flatten_params

    request = run_dir / "request.json"
    if not request.is_file():
        return  # the run never started: nothing cached to compare
    recorded = json.loads(request.read_text())["config"]
    was = flatten_params(to_dict(from_dict(type(config), recorded, str(request))))
    now = flatten_params(to_dict(config))
    differ = sorted(
        k
        for k in set(was) | set(now)
        if was.get(k) != now.get(k) and k.split(".")[0] not in CACHE_NEUTRAL_KEYS
    )
    if differ:
        shown = ", ".join(f"{k}: {was.get(k)} → {now.get(k)}" for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise ValueError(
            f"{run_dir}: the cached student was trained with another config ({shown}{more}); delete "
            f"{run_dir} and {run_dir}.json to train it again, or use another --work-dir"
        )


def distil(plan: Plan, work: Path, teacher: dict, method: str, key: str) -> dict[str, Any]:
    from caloforge.distill.pipeline import DistillRequest, run_distillation

    run_dir = work / f"{method}-{key}"
    if (work / f"{method}-{key}.json").is_file():
        check_cached_config(run_dir, distill_config(plan, method, f"bench-{method}"))

    def run() -> dict[str, Any]:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        config = distill_config(plan, method, f"bench-{method}")
        result = run_distillation(
            config, DistillRequest(teacher["model_dir"], Path(teacher["shards"])), run_dir
        )
        return {
            "model_dir": str(result.model_dir),
            "steps": result.steps,
            "solvers": result.solvers,
            "wall_s": time.perf_counter() - t0,
        }

    print(f"{method}: {run_dir}", flush=True)
    return cached(work / f"{method}-{key}.json", run)


# -- routes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One row of the study: a bundle sampled with ``sampler`` × ``num_steps`` (``nfe`` network calls)."""

    label: str
    route: str
    kind: str  # teacher | student | solver
    bundle: str
    sampler: str
    num_steps: int
    nfe: int


@dataclass
class Context:
    plan: Plan
    work: Path
    teacher: dict[str, Any]
    distilled: dict[str, dict[str, Any]]  # method -> its distil() record (filled by the routes)


def teacher_route(sampler_name: str) -> Callable[[Context], list[Candidate]]:
    def route(ctx: Context) -> list[Candidate]:
        """The teacher with ``sampler_name`` at each NFE of the grid it can reach (the most steps whose NFE
        does not exceed the target; duplicates dropped)."""
        from caloforge.platform.samplers import get_sampler
        from caloforge.platform.shower_model import ShowerModel

        model = ShowerModel.load(ctx.teacher["model_dir"])
        sampler = get_sampler(sampler_name)
        singular = bool(model.denoiser.final_singular)
        out: dict[int, Candidate] = {}
        for target in ctx.plan.nfe:
            steps = max((n for n in range(1, target + 1) if sampler.nfe(n, singular) <= target), default=None)
            if steps is None:
                continue
            nfe = sampler.nfe(steps, singular)
            out.setdefault(
                nfe,
                Candidate(
                    f"{sampler_name} {nfe}",
                    sampler_name,
                    "teacher",
                    ctx.teacher["model_dir"],
                    sampler_name,
                    steps,
                    nfe,
                ),
            )
        return list(out.values())

    return route


def route_cd(ctx: Context) -> list[Candidate]:
    """The consistency student (``caloforge distill --method cd``) at ``plan.cd_sampling`` steps."""
    rec = distil(ctx.plan, ctx.work, ctx.teacher, "cd", ctx.plan.cd_key())
    ctx.distilled["cd"] = rec
    return [
        Candidate(f"cd {n}", "cd", "student", rec["model_dir"], "consistency", n, n)
        for n in ctx.plan.cd_sampling
    ]


def route_shortcut(ctx: Context) -> list[Candidate]:
    """The shortcut student (``caloforge distill --method shortcut``, the one-network route for flow-matching
    teachers) at ``plan.shortcut_sampling`` steps, trained with the consistency student's budget."""
    rec = distil(ctx.plan, ctx.work, ctx.teacher, "shortcut", ctx.plan.shortcut_key())
    ctx.distilled["shortcut"] = rec
    return [
        Candidate(f"shortcut {n}", "shortcut", "student", rec["model_dir"], "shortcut", n, n)
        for n in ctx.plan.shortcut_sampling
    ]


def route_bns(ctx: Context) -> list[Candidate]:
    """Bespoke solvers for the teacher (``caloforge distill --method bns``) at ``plan.bns_steps``."""
    rec = distil(ctx.plan, ctx.work, ctx.teacher, "bns", ctx.plan.bns_key())
    ctx.distilled["bns"] = rec
    return [
        Candidate(f"bns {n}", "bns", "solver", rec["model_dir"], "bespoke", n, n) for n in ctx.plan.bns_steps
    ]


# name -> route(ctx) -> candidates. Another route is one entry here: distil its bundle (cached like
# ``distil``), return its candidates.
ROUTES: dict[str, Callable[[Context], list[Candidate]]] = {
    **{name: teacher_route(name) for name in TEACHER_SAMPLERS},
    "cd": route_cd,
    "shortcut": route_shortcut,
    "bns": route_bns,
}


# -- measurements -----------------------------------------------------------------------------------------
TIMING = "best of >= 3 calls after a warm-up (a shared machine: the fastest call is the least disturbed)"


def timed(fn: Callable[[], object], min_time_s: float, max_reps: int) -> tuple[float, float, int]:
    """(fastest, median wall s per call, calls) of at least 3 (and until ``min_time_s`` or ``max_reps``)
    ``fn()`` calls after one warm-up call."""
    fn()
    times: list[float] = []
    while len(times) < 3 or (len(times) < max_reps and sum(times) < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ordered = sorted(times)
    return ordered[0], ordered[len(ordered) // 2], len(times)


def row_key(plan: Plan, c: Candidate) -> str:
    """A row's cache key. Not ``threads``: the quality does not depend on the torch threads and the ONNX
    timing is one thread whatever they are, so a row measured once serves runs with any --threads;
    ``empty_layers`` and ``classifier_seeds`` only when set (the rows measured before them keep their
    keys)."""
    extra: dict[str, Any] = {"empty_layers": plan.empty_layers} if plan.empty_layers is not None else {}
    if plan.classifier_seeds is not None:
        extra["classifier_seeds"] = plan.classifier_seeds
    return plan.key(
        "n_eval",
        "batch",
        "gpu_batches",
        c=dataclasses.asdict(c),
        t=plan.teacher_key(),
        timing=TIMING,
        **extra,
    )


def measure(c: Candidate, plan: Plan, heldout: Any, work: Path) -> dict[str, Any]:
    """Quality on the held-out set and ms per shower (``measure_speed``)."""
    from caloforge.evaluation.api import evaluate_model, load_model

    model = load_model(c.bundle, "cpu", plan.empty_layers)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    report = evaluate_model(
        model,
        heldout,
        None,
        eval_config(len(heldout), plan.classifier_seeds),
        sampler=c.sampler,
        num_steps=c.num_steps,
    )
    metrics = {k: float(v) for k, v in report.metrics.items() if isinstance(v, int | float)}
    eval_s = time.perf_counter() - t0
    return {
        **dataclasses.asdict(c),
        "metrics": {
            k: metrics[k]
            for k in sorted(metrics)
            if k.startswith(("auc", "fpd", "kpd", "floor/", "response"))
        },
        "eval_s": eval_s,
        **measure_speed(c, plan, heldout, work, model),
    }


def measure_speed(
    c: Candidate, plan: Plan, heldout: Any, work: Path, model: Any | None = None
) -> dict[str, Any]:
    """``ms_per_shower`` (ONNX on one CPU thread; CUDA when present) and ``onnx`` (size, export, parity) of
    the row's graph; ``model``: the row's bundle already loaded on the CPU (else loaded here: ``--retime``
    runs this alone on cached rows)."""
    import numpy as np
    import torch

    from caloforge.evaluation.api import load_model
    from caloforge.platform.shower_model import derive_seeds
    from caloforge.registry.export import export_onnx
    from caloforge.registry.onnx_graph import SamplerGraph, seeded_noise
    from caloforge.registry.onnx_runtime import onnx_feeds, ort_session

    if model is None:
        model = load_model(c.bundle, "cpu", plan.empty_layers)  # type: ignore[arg-type]
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    path = onnx_dir / f"{c.label.replace(' ', '-')}.onnx"
    info = export_onnx(
        model,
        path,
        sampler=c.sampler,
        num_steps=c.num_steps,
        exporter="legacy",
        variant="plain",
        parity_batch_sizes=(1, 2),
        overwrite=True,
    )
    if info.nfe != c.nfe:
        raise ValueError(f"{c.label}: the graph makes {info.nfe} network calls, the row says {c.nfe}")
    session = ort_session(path, threads=1, profile="grid")
    detectors = list(model.vocab.detectors)
    ms: dict[str, float] = {}
    for batch in (1, plan.batch):
        idx = np.arange(batch) % len(heldout)
        cond = heldout.conditions.subset(idx)
        feeds = onnx_feeds(
            detectors, cond, *seeded_noise(derive_seeds(7, batch), model.mesh_shape, model.has_energy_head)
        )
        best, median, _ = timed(lambda f=feeds: session.run(None, f), plan.min_time_s, plan.max_reps)
        ms[f"onnx_cpu1_b{batch}"] = 1e3 * best / batch
        ms[f"onnx_cpu1_b{batch}_median"] = 1e3 * median / batch
    mb = path.stat().st_size / 2**20
    path.unlink()
    if torch.cuda.is_available():
        gpu = load_model(c.bundle, "cuda", plan.empty_layers).eval()  # type: ignore[arg-type]
        graph = SamplerGraph(gpu, num_steps=c.num_steps, sampler=c.sampler).eval()
        for batch in plan.gpu_batches:
            idx = np.arange(batch) % len(heldout)
            feeds = onnx_feeds(
                detectors,
                heldout.conditions.subset(idx),
                *seeded_noise(derive_seeds(7, batch), gpu.mesh_shape, gpu.has_energy_head),
            )
            args = tuple(torch.from_numpy(feeds[n]).cuda() for n in graph.input_names)

            def run(a: tuple = args) -> None:
                with torch.inference_mode():
                    graph(*a)
                torch.cuda.synchronize()

            best, median, _ = timed(run, plan.min_time_s, plan.max_reps)
            ms[f"cuda_b{batch}"] = 1e3 * best / batch
            ms[f"cuda_b{batch}_median"] = 1e3 * median / batch
        del gpu, graph
    return {
        "ms_per_shower": ms,
        "onnx": {"mb": mb, "export_s": info.export_seconds, "parity_max_rel_err": info.parity.max_rel_err},
    }


def pareto_front(rows: list[dict], quality: str = QUALITY, speed: str = "onnx_cpu1_b1") -> list[str]:
    """Labels of the non-dominated rows (no other row is at least as fast and as good, and better in one)."""
    pts = [
        (r["label"], r["ms_per_shower"][speed], r["metrics"][quality])
        for r in rows
        if math.isfinite(r["metrics"].get(quality, math.nan))
    ]
    front = []
    for label, x, y in pts:
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for _, x2, y2 in pts)
        if not dominated:
            front.append((x, label))
    return [label for _, label in sorted(front)]


def goal_check(rows: list[dict], speed: str = "onnx_cpu1_b1") -> dict[str, Any]:
    """The issue's two goals for the best 1-step student (``cd 1``, ``shortcut 1``: the lowest ``auc_high``)
    against the teacher rows; ``students`` has the AUC gap of every 1-step student."""
    teacher = [
        r for r in rows if r["kind"] == "teacher" and math.isfinite(r["metrics"].get(QUALITY, math.nan))
    ]
    students = [
        r
        for r in rows
        if r["kind"] == "student" and r["nfe"] == 1 and math.isfinite(r["metrics"].get(QUALITY, math.nan))
    ]
    if not students or not teacher:
        return {"status": "not measured (needs a student route (cd, shortcut) and a teacher sampler)"}
    student = min(students, key=lambda r: r["metrics"][QUALITY])
    q = student["metrics"][QUALITY]
    ms = student["ms_per_shower"][speed]
    at32 = [r for r in teacher if r["nfe"] == max(t["nfe"] for t in teacher)]
    ref = min(at32, key=lambda r: r["metrics"][QUALITY])
    gap = q - ref["metrics"][QUALITY]
    matching = [r for r in teacher if r["metrics"][QUALITY] <= q]
    out: dict[str, Any] = {
        "student": student["label"],
        "student_auc_high": q,
        "student_ms": ms,
        "teacher_reference": ref["label"],
        "teacher_reference_auc_high": ref["metrics"][QUALITY],
        "auc_gap": gap,
        "auc_goal_met": bool(gap <= GOAL_AUC_GAP),
        "students": {
            r["label"]: {
                "auc_high": r["metrics"][QUALITY],
                "auc_gap": r["metrics"][QUALITY] - ref["metrics"][QUALITY],
            }
            for r in students
        },
    }
    if matching:
        fastest = min(matching, key=lambda r: r["ms_per_shower"][speed])
        speedup = fastest["ms_per_shower"][speed] / ms
        out.update(
            equal_quality_teacher=fastest["label"],
            equal_quality_teacher_ms=fastest["ms_per_shower"][speed],
            speedup=speedup,
            speedup_lower_bound=False,
        )
    else:  # no teacher row is as good: compare with the teacher's best row (a lower bound)
        best = min(teacher, key=lambda r: r["metrics"][QUALITY])
        speedup = best["ms_per_shower"][speed] / ms
        out.update(
            equal_quality_teacher=best["label"] + " (no teacher row is as good: lower bound)",
            equal_quality_teacher_ms=best["ms_per_shower"][speed],
            speedup=speedup,
            speedup_lower_bound=True,
        )
    out["speedup_goal_met"] = bool(speedup >= GOAL_SPEEDUP)
    out["teacher_samplers"] = sorted({r["route"] for r in teacher})
    # Learned solvers (bns) run the frozen teacher too: shown beside the goal, which names the samplers.
    solvers = [
        r
        for r in rows
        if r["kind"] == "solver" and r["metrics"].get(QUALITY, math.nan) <= q  # NaN compares False
    ]
    if solvers:
        fastest = min(solvers, key=lambda r: r["ms_per_shower"][speed])
        out["equal_quality_solver"] = fastest["label"]
        out["equal_quality_solver_ms"] = fastest["ms_per_shower"][speed]
        out["solver_speedup"] = fastest["ms_per_shower"][speed] / ms
    return out


# -- adapted models ----------------------------------------------------------------------------------------
def adapted_study(plan: Plan, work: Path, teacher: dict, base_student: dict) -> dict[str, Any]:
    """The adapted teacher distilled from the base's student vs from its own weights (module docstring)."""
    import numpy as np

    from caloforge.adapt.config import AdaptConfig
    from caloforge.adapt.pipeline import AdaptRequest, run_adaptation
    from caloforge.config import from_dict
    from caloforge.datasets.streaming import load_split
    from caloforge.distill.pipeline import DistillRequest, make_student, run_distillation
    from caloforge.distill.student_init import init_student, probe_consistency_loss
    from caloforge.evaluation.api import evaluate_model
    from caloforge.platform.shower_model import ShowerModel
    from caloforge.training.hooks import PeriodicEval

    fields = ("adapt_showers", "adapt_steps", "adapted_cd_steps", "adapted_short_steps", "probe_showers")
    key = plan.key(*fields, "probe_every", "n_eval_adapted", "cd_batch_size", "cd_lr", base=plan.cd_key())
    root = work / f"adapted-{key}"
    data = simulate(
        (ADAPT_TARGET,), plan.adapt_showers, 300 + plan.seed, plan, root / "data", (0.85, 0.0, 0.15)
    )
    heldout = load_split(
        simulate(
            (ADAPT_TARGET,), plan.n_eval_adapted, 400 + plan.seed, plan, root / "heldout", (0.0, 0.0, 1.0)
        ),
        "test",
    )
    probe = heldout.subset(np.arange(min(plan.probe_showers, len(heldout))))

    def adapt() -> dict[str, Any]:
        path = REPO / "configs" / "adapt" / "full.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["loop"].update(
            steps=plan.adapt_steps,
            batch_size=plan.batch_size,
            log_every=max(1, min(10, plan.adapt_steps // 4)),
            checkpoint_every=plan.adapt_steps,
            seed=plan.seed,
        )
        cfg.update(
            name="bench",
            eval={
                "n_showers": 20,
                "split": "test",
                "num_steps": 1,
                "metrics": {
                    "metrics": ["response"],
                    "floor": False,
                    "groups": {"enabled": False},
                    "plots": {"enabled": False},
                },
            },
            register={"enabled": False},
            device=plan.device,
            progress=False,
            torch_threads=plan.threads,
        )
        run_dir = root / "adapt"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        result = run_adaptation(
            from_dict(AdaptConfig, cfg, str(path)),
            AdaptRequest(teacher["model_dir"], ADAPT_TARGET, data),
            run_dir,
        )
        return {"model_dir": str(result.model_dir), "steps": result.steps, "wall_s": time.perf_counter() - t0}

    adapted = cached(root / "adapt.json", adapt)
    print(
        f"adapted teacher ({ADAPT_TARGET}, full, {adapted['steps']} steps): {adapted['model_dir']}",
        flush=True,
    )
    adapted_model = ShowerModel.load(adapted["model_dir"]).eval()

    def probe_loss(model: Any) -> float:
        return probe_consistency_loss(
            model, adapted_model, probe.showers_NZPR, probe.conditions, seed=plan.seed
        )

    def cd_run(name: str, steps: int, init: str | None) -> dict[str, Any]:
        run_dir = root / name

        def run() -> dict[str, Any]:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            if init is None:
                start = make_student(adapted_model)
            else:
                start, _ = init_student(adapted_model, ShowerModel.load(init))
            curve = [{"step": 0, "probe": probe_loss(start)}]
            hook = PeriodicEval(plan.probe_every, lambda m: {"consistency": probe_loss(m)}, prefix="probe")
            config = distill_config(plan, "cd", f"bench-{name}", steps=steps, student_init=init)
            t0 = time.perf_counter()
            result = run_distillation(
                config, DistillRequest(adapted["model_dir"], data), run_dir, extra_evals=[hook]
            )
            wall = time.perf_counter() - t0
            curve += [{"step": s, "probe": m["probe/consistency"]} for s, m in hook.history]
            report = evaluate_model(result.model_dir, heldout, None, eval_config(len(heldout)), num_steps=1)
            metrics = {k: float(v) for k, v in report.metrics.items() if k in METRICS}
            return {"name": name, "steps": steps, "student_init": init, "wall_s": wall, "curve": curve,
                    "metrics_1step": metrics, "model_dir": str(result.model_dir)}  # fmt: skip

        print(f"adapted cd {name}: {run_dir}", flush=True)
        return cached(root / f"{name}.json", run)

    runs = [
        cd_run("from-base-student", plan.adapted_cd_steps, base_student["model_dir"]),
        cd_run("from-teacher", plan.adapted_cd_steps, None),
    ]
    if plan.adapted_short_steps:
        runs.append(cd_run("from-base-student-short", plan.adapted_short_steps, base_student["model_dir"]))

    def teacher_eval() -> dict[str, Any]:
        report = evaluate_model(adapted["model_dir"], heldout, None, eval_config(len(heldout)))
        return {k: float(v) for k, v in report.metrics.items() if k in METRICS}

    teacher_metrics = cached(root / "teacher_eval.json", teacher_eval)
    return adapted_headline(runs, adapted, teacher_metrics)


def adapted_headline(runs: list[dict], adapted: dict, teacher_metrics: dict) -> dict[str, Any]:
    """Steps and wall time the base-student start needs to reach the from-scratch run's final loss; AUCs."""
    by = {r["name"]: r for r in runs}
    init, scratch = by["from-base-student"], by["from-teacher"]
    target = scratch["curve"][-1]["probe"]
    reached = next((p["step"] for p in init["curve"] if p["probe"] <= target), None)
    out: dict[str, Any] = {
        "adapted_teacher": {k: adapted[k] for k in ("model_dir", "steps", "wall_s")},
        "adapted_teacher_metrics": {k: v for k, v in teacher_metrics.items() if k != "cached"},
        "runs": runs,
        "initial_probe": {
            "from_base_student": init["curve"][0]["probe"],
            "from_teacher": scratch["curve"][0]["probe"],
        },
        "scratch_final_probe": target,
        "scratch_steps": scratch["steps"],
        "steps_to_scratch_final": reached,
    }
    if reached is not None:
        # reached at the first probe (step 0: before any step) -> the ratio is only a lower bound
        out["step_ratio_lower_bound"] = reached == init["curve"][0]["step"]
        out["step_ratio"] = scratch["steps"] / max(reached, 1)
        out["wall_ratio"] = scratch["wall_s"] / max(init["wall_s"] * max(reached, 1) / init["steps"], 1e-9)
    short = by.get("from-base-student-short")
    if short is not None:
        out["short_auc_high"] = short["metrics_1step"].get("auc_high")
        out["scratch_auc_high"] = scratch["metrics_1step"].get("auc_high")
        out["short_matches_scratch_auc"] = bool(
            out["short_auc_high"] is not None
            and out["scratch_auc_high"] is not None
            and out["short_auc_high"] <= out["scratch_auc_high"]
        )
    return out


# -- output -----------------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or not isinstance(x, int | float) or not math.isfinite(x) else format(x, spec)


def print_table(rows: list[dict], front: list[str], batch: int) -> None:
    gpu = sorted({k for r in rows for k in r["ms_per_shower"] if k.startswith("cuda") and "median" not in k})
    header = (
        f"{'row':13} {'NFE':>4} {'AUC hi':>7} {'AUC lo':>7} {'FPD':>9} {'floor':>9} {'KPD':>9} "
        f"{'ms b=1':>8} {'ms b=' + str(batch):>9}" + "".join(f" {k:>11}" for k in gpu) + "  front"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        m, t = r["metrics"], r["ms_per_shower"]
        print(
            f"{r['label']:13} {r['nfe']:>4} {fmt(m.get('auc_high'), '.3f'):>7} "
            f"{fmt(m.get('auc_low'), '.3f'):>7} "
            f"{fmt(m.get('fpd')):>9} {fmt(m.get('floor/fpd')):>9} {fmt(m.get('kpd')):>9} "
            f"{fmt(t.get('onnx_cpu1_b1'), '.2f'):>8} {fmt(t.get(f'onnx_cpu1_b{batch}'), '.2f'):>9}"
            + "".join(f" {fmt(t.get(k), '.3f'):>11}" for k in gpu)
            + ("  *" if r["label"] in front else "")
        )


def plot(rows: list[dict], front: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {"euler": "C0", "midpoint": "C1", "heun": "C2", "cd": "C3", "bns": "C4", "shortcut": "C5"}
    markers = {"teacher": "o", "student": "s", "solver": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in (
        (axes[0], "auc_high", "classifier AUC, high-level features"),
        (axes[1], "fpd", "FPD"),
    ):
        by_route: dict[str, list[dict]] = {}
        for r in rows:
            if math.isfinite(r["metrics"].get(key, math.nan)):
                by_route.setdefault(r["route"], []).append(r)
        for route, rs in by_route.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            ax.plot(
                [r["ms_per_shower"]["onnx_cpu1_b1"] for r in rs],
                [r["metrics"][key] for r in rs],
                ls="--" if rs[0]["kind"] == "teacher" else "-",
                marker=markers.get(rs[0]["kind"], "o"),
                color=colours.get(route),
                label=route,
            )
            for r in rs:
                xy = (r["ms_per_shower"]["onnx_cpu1_b1"], r["metrics"][key])
                ax.annotate(str(r["nfe"]), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "auc_high":
            pts = sorted(
                (r["ms_per_shower"]["onnx_cpu1_b1"], r["metrics"][key]) for r in rows if r["label"] in front
            )
            if pts:
                ax.step(
                    *zip(*pts, strict=True), where="post", color="k", lw=1.5, alpha=0.5, label="Pareto front"
                )
            ax.axhline(0.5, color="grey", lw=1, ls=":", label="indistinguishable (0.5)")
        else:
            floors = [r["metrics"].get("floor/fpd", math.nan) for r in rows]
            floors = [f for f in floors if math.isfinite(f)]
            if floors:
                ax.axhline(sum(floors) / len(floors), color="grey", lw=1, ls=":", label="data-vs-data floor")
            ax.set_yscale("log")
        ax.set(
            xscale="log",
            xlabel="ms per shower (ONNX Runtime, 1 CPU thread, batch 1)",
            ylabel=f"{label} (lower is better)",
        )
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping minor labels
        ax.legend(fontsize=7)
    axes[0].set_title("quality vs speed (numbers: network calls)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from caloforge.platform.energy import EMPTY_LAYER_MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny end-to-end run (tests)")
    p.add_argument("--device", default="cpu", help="training/evaluation device: cpu | cuda | cuda:N")
    p.add_argument("--backbone", default="debug", help="backbone flavour (debug on CPU, S on a GPU)")
    p.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {','.join(ROUTES)}")
    p.add_argument("--no-adapted", action="store_true", help="skip the adapted-model distillation study")
    p.add_argument(
        "--teacher-recipe",
        choices=sorted(TRAIN_RECIPES),
        default="debug",
        help="the training config whose model, objective and loop the teacher takes",
    )
    p.add_argument("--base-steps", type=int, help="teacher training steps")
    p.add_argument("--base-showers", type=int, help="teacher training showers per detector")
    p.add_argument("--n-eval", type=int, help="held-out showers (as many generated per row)")
    p.add_argument("--cd-steps", type=int, help="consistency distillation steps of the base student")
    p.add_argument(
        "--cd-set",
        action="append",
        default=[],
        dest="cd_overrides",
        metavar="KEY=VALUE",
        help="override of the consistency student's config (configs/distill/cd.yaml keys, e.g. "
        "objective.consistency_distillation.distance=pseudo_huber); part of its cache key",
    )
    p.add_argument(
        "--shortcut-set",
        action="append",
        default=[],
        dest="shortcut_overrides",
        metavar="KEY=VALUE",
        help="override of the shortcut student's config (configs/distill/shortcut.yaml keys, e.g. "
        "loop.steps=3000 or objective.shortcut.bootstrap_fraction=0.5); part of its cache key",
    )
    p.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        dest="teacher_overrides",
        metavar="KEY=VALUE",
        help="override of the teacher's training config (model.*, objective.* or loop.* keys, e.g. "
        "model.layer_energy.space=log_below); part of every cache key (a new teacher, its students, rows)",
    )
    p.add_argument(
        "--empty-layers",
        choices=EMPTY_LAYER_MODES,
        help="which stage may empty a layer when a row generates its evaluation sample and its graph "
        "(layer_energy.empty_layers; default: each bundle's own); the trained students are reused",
    )
    p.add_argument(
        "--classifier-seeds",
        type=int,
        help="seeds of each classifier in the rows' evaluation, whose mean is the AUC and spread its ± "
        "(default: 2 for --n-eval >= 200); part of the rows' cache keys when given (the adapted runs keep 2)",
    )
    p.add_argument(
        "--retime",
        default="",
        help="comma-separated row labels (e.g. 'cd 1,heun 8'), or 'all': time those cached rows again "
        "(export and ONNX timing only, the quality kept; for a row first timed on a busy machine)",
    )
    p.add_argument("--bns-iterations", type=int, help="Adam iterations per bespoke solver")
    p.add_argument("--adapted-cd-steps", type=int, help="distillation steps of the adapted runs")
    p.add_argument("--threads", type=int, help="torch threads (0: torch's default); ONNX timing is 1 thread")
    p.add_argument(
        "--work-dir", type=Path, help="cache (default $CALOFORGE_HOME/bench/distillation-<backbone>)"
    )
    p.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/distillation[_quick].json)"
    )
    args = p.parse_args(argv)
    args.retime_labels = frozenset(r.strip() for r in args.retime.split(",") if r.strip())
    args.route_list = tuple(r.strip() for r in args.routes.split(",") if r.strip())
    unknown = sorted(set(args.route_list) - set(ROUTES))
    if unknown or not args.route_list:
        p.error(f"--routes: unknown {unknown} (known: {list(ROUTES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from caloforge.environment import apply_default_env

    apply_default_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import numpy as np
    import torch

    from caloforge import paths
    from caloforge.datasets.streaming import load_split

    plan = make_plan(args)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    suffix = "_quick" if args.quick else ""
    work = args.work_dir or paths.home() / "bench" / f"distillation-{plan.backbone}{suffix}"
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"distillation{suffix}.json"
    png = out.with_name(out.stem + "_pareto.png")
    print(
        f"distillation study: {dataclasses.asdict(plan)}\nroutes: {args.route_list}\nwork dir: {work}",
        flush=True,
    )

    t_start = time.perf_counter()
    teacher = train_teacher(plan, work)
    print(
        f"teacher: {teacher['steps']} steps in {teacher['wall_s']:.0f} s, loss {teacher['final_loss']:.4g}",
        flush=True,
    )
    heldout_dir = simulate(
        BASE_DETECTORS, plan.n_eval // len(BASE_DETECTORS) + 1, 1000 + plan.seed, plan,
        work / f"heldout-{plan.key('n_eval', 'energy_gev', 'seed')}", (0.0, 0.0, 1.0),
    )  # fmt: skip
    heldout = load_split(heldout_dir, "test")
    heldout = heldout.subset(np.arange(min(plan.n_eval, len(heldout))))
    ctx = Context(plan, work, teacher, {})
    rows: list[dict] = []
    for name in args.route_list:
        for c in ROUTES[name](ctx):
            path = work / "rows" / f"{c.label.replace(' ', '-')}-{row_key(plan, c)}.json"
            if path.is_file() and ({"all", c.label} & args.retime_labels):
                record = json.loads(path.read_text())
                stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                write_record(path, record | measure_speed(c, plan, heldout, work) | {"retimed": stamp})
                print(f"  {c.label}: timed again", flush=True)
            row = cached(path, lambda c=c: measure(c, plan, heldout, work))
            rows.append(row)
            m, t = row["metrics"], row["ms_per_shower"]
            print(
                f"  {c.label:12} NFE {c.nfe:>3}: AUC hi {fmt(m.get('auc_high'), '.3f')} "
                f"lo {fmt(m.get('auc_low'), '.3f')} "
                f"FPD {fmt(m.get('fpd'))} | {fmt(t['onnx_cpu1_b1'], '.2f')} ms (b=1), "
                f"{fmt(t[f'onnx_cpu1_b{plan.batch}'], '.2f')} ms (b={plan.batch})",
                flush=True,
            )
    check_retime_labels(args.retime_labels, rows)
    front = pareto_front(rows)
    front_fpd = pareto_front(rows, quality="fpd")
    goal = goal_check(rows)
    adapted = None
    if not args.no_adapted:
        if "cd" not in ctx.distilled:
            ctx.distilled["cd"] = distil(plan, work, teacher, "cd", plan.cd_key())
        adapted = adapted_study(plan, work, teacher, ctx.distilled["cd"])
    total = time.perf_counter() - t_start

    print_table(rows, front, plan.batch)
    print(f"\nPareto front ({QUALITY} vs ms per shower, ONNX 1 thread batch 1): {', '.join(front)}")
    if "auc_gap" in goal:
        print(
            f"goal 1 (1-step student within {GOAL_AUC_GAP} AUC of the 32-NFE teacher): best student "
            f"{goal['student']} {goal['student_auc_high']:.3f} vs {goal['teacher_reference']} "
            f"{goal['teacher_reference_auc_high']:.3f}: gap {goal['auc_gap']:+.3f} -> "
            f"{'met' if goal['auc_goal_met'] else 'NOT met'}"
        )
        for label, g in goal["students"].items():
            print(f"  {label}: AUC high {g['auc_high']:.3f}, gap {g['auc_gap']:+.3f}")
        lb = "≥ " if goal["speedup_lower_bound"] else ""
        print(
            f"goal 2 (at equal quality >= {GOAL_SPEEDUP:g}x faster than the best teacher sampler): "
            f"{goal['student_ms']:.2f} ms vs {goal['equal_quality_teacher']} "
            f"{goal['equal_quality_teacher_ms']:.2f} ms: "
            f"{lb}{goal['speedup']:.1f}x -> {'met' if goal['speedup_goal_met'] else 'NOT met'} "
            f"(teacher samplers measured: {', '.join(goal['teacher_samplers'])})"
        )
        if "solver_speedup" in goal:
            print(
                f"  against the teacher's learned solver {goal['equal_quality_solver']} "
                f"{goal['equal_quality_solver_ms']:.2f} ms: {goal['solver_speedup']:.1f}x"
            )
    else:
        print(f"goals: {goal['status']}")
    if adapted is not None:
        print(f"\nadapted teacher ({ADAPT_TARGET}) distilled from the base student vs from its own weights:")
        print(
            f"{'run':26} {'steps':>6} {'wall s':>7} {'probe@0':>9} {'probe@end':>10} {'AUC hi':>7} "
            f"{'AUC lo':>7} {'FPD':>9}"
        )
        for r in adapted["runs"]:
            m = r["metrics_1step"]
            print(
                f"{r['name']:26} {r['steps']:>6} {r['wall_s']:>7.1f} {r['curve'][0]['probe']:>9.4g} "
                f"{r['curve'][-1]['probe']:>10.4g} {fmt(m.get('auc_high'), '.3f'):>7} "
                f"{fmt(m.get('auc_low'), '.3f'):>7} "
                f"{fmt(m.get('fpd')):>9}"
            )
        tm = adapted["adapted_teacher_metrics"]
        blank = " " * 36
        print(
            f"{'adapted teacher (default)':26} {blank} {fmt(tm.get('auc_high'), '.3f'):>7} "
            f"{fmt(tm.get('auc_low'), '.3f'):>7} {fmt(tm.get('fpd')):>9}"
        )
        if adapted["steps_to_scratch_final"] is not None:
            lb = "≥ " if adapted["step_ratio_lower_bound"] else ""
            print(
                "from the base student the probe loss reaches the from-scratch run's final "
                f"{adapted['scratch_final_probe']:.4g} "
                f"after {adapted['steps_to_scratch_final']} of {adapted['scratch_steps']} steps: "
                f"{lb}{adapted['step_ratio']:.3g}x fewer steps, "
                f"{lb}{adapted['wall_ratio']:.3g}x less wall time"
            )
        else:
            print(
                "from the base student the probe loss does not reach the from-scratch run's final "
                f"{adapted['scratch_final_probe']:.4g} within {adapted['scratch_steps']} steps"
            )
    plot(rows, front, png)
    record = {
        "benchmark": "distillation",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": plan.device,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "onnx_threads": 1,
        "mode": "quick" if args.quick else "cpu",
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "plan": dataclasses.asdict(plan),
        "routes": list(args.route_list),
        "definitions": {
            "quality": f"{QUALITY} on the fixed held-out set (lower is better; 0.5 = indistinguishable)",
            "speed": "ms per shower, ONNX Runtime plain fp32 graph, 1 CPU thread (grid profile), batch 1; "
            + TIMING,
            "front": "rows no other row beats on both quality and speed",
            "goal_auc": "the best 1-step student's auc_high - best teacher auc_high at the largest NFE <= "
            f"{GOAL_AUC_GAP}",
            "goal_speed": "ms of the fastest teacher row with auc_high <= the student's / student ms >= "
            f"{GOAL_SPEEDUP}",
        },
        "teacher": teacher,
        "distilled": ctx.distilled,
        "rows": rows,
        "front": front,
        "front_fpd": front_fpd,
        "goal": goal,
        "adapted": adapted,
        "plot": str(png),
        "wall_s": total,
    }
    write_results(record, "distillation", plan.device, out)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
