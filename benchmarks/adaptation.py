"""Benchmark: the data-efficiency study — adapting a pretrained model vs training the same model from scratch.

Protocol (issue #12, "The data-efficiency study"; docs/adaptation.md explains the numbers):

1. **Base**: a model pretrained once with ``caloforge.training.run.train`` on the pretraining detectors
   (``par04-siw``, ``pbwo4``, ``par04-scipb``; ``--full`` adds ``odd-like``; never ``lar-pb``) with two spare
   detector slots; cached in the work directory (a rerun with the same settings reuses it).
2. **Targets**: the held-out built-in ``lar-pb`` and a user-defined detector ``lar-pb-coarse`` (lar-pb's stack
   on a 30 × 16 × 6 mesh, unlike the 45 × 16 × 9 pretraining mesh; its YAML is written into the work
   directory); ``--targets`` also takes ``lar-pb-thick`` (lar-pb with 1.8× thicker plates in 30 layers: its
   tokens land between the base's token positions, ``CUSTOM_DETECTORS``). For each target: a simulated
   training pool and a **fixed held-out set** (another seed) that every run of that target is evaluated on.
3. For each target data size N (``--sizes``): a shard set of N training showers (a seeded subset of the pool)
   and
   - every adaptation strategy (``full``, ``lora``, ``bias``, ``embedding``; the shipped recipes in
     ``configs/adapt/<kind>.yaml``) through ``caloforge.adapt.pipeline.run_adaptation`` (registration off)
     at S steps and at each fraction of ``--adapt-budgets`` (default S/4 and S);
   - the same architecture trained from scratch on the same shards (``caloforge.training.run.train``, the
     base's recipe) at S steps and at each multiple of ``--scratch-multipliers`` (default 1×, 4×, 16× S;
     ``--scratch-multipliers-largest`` adds budgets at the largest size only).

   The recipe (``--recipe``) of the base and scratch runs is ``configs/train/debug.yaml``'s model, objective
   and optimiser by default; ``--recipe fidelity`` takes ``configs/train/fidelity-cpu.yaml``'s (logit-normal
   t, the voxel model reading the layer energies; the position features stay the backbone's, made for
   moving between meshes), and the adaptations then train with its objective too.
4. Every model is evaluated with ``caloforge.evaluation.evaluate_model`` on the same held-out showers with
   the same seeds: FPD and KPD (beside the data-vs-data floor), classifier AUCs on high-level features and
   voxels, the energy response; the wall time and the training FLOPs of each run.

Training FLOPs = 3 × forward FLOPs per shower × showers seen (steps × batch); forward FLOPs per shower =
``caloforge.platform.backbone.forward_flops`` (every matmul of the backbone at the target mesh) + 2 × the
weights of the layer-energy head's linear layers. The factor 3 (forward + backward) is also charged to the
parameter-efficient strategies, whose backward skips most weight gradients: an upper bound for them.

Headline ratios (per target; quality = FPD on the fixed held-out set, lower is better):

- the *best scratch model* is the scratch run with the lowest FPD over all sizes and step budgets (FPD*);
- an adaptation run *matches* it when its FPD ≤ FPD*;
- **data needed** = training showers of the best scratch model / the fewest training showers of a matching
  adaptation run;
- **compute needed** = training FLOPs of the best scratch model / the fewest training FLOPs of a matching
  adaptation run (the base's pretraining is shared by every target and not charged; the JSON also gives the
  ratio with it charged).

A ratio is a lower bound (``≥``) when the matching run is at the grid's smallest size or budget; "not
reached" when no adaptation run matches. The same ratios with quality = ``auc_high``, ``auc_low`` and ``kpd``
are reported beside them, and every one again *within errors*: a run also matches when it is above the best
scratch value by at most their combined 1σ error (FPD's and KPD's own errors, the classifiers' spread over
their seeds), since a strict ``≤`` between two noisy numbers decides by chance when they are level. Goal
of the issue: ≥ 25× less data and ≥ 20× less compute.

    .venv/bin/python benchmarks/adaptation.py --quick            # about a minute (make bench)
    .venv/bin/python benchmarks/adaptation.py                    # the CPU study (debug backbone)
    .venv/bin/python benchmarks/adaptation.py --device cuda --backbone S --full   # the GPU study

Prints a table and the headline ratios, writes plots (quality vs data size, quality vs compute) and
``benchmarks/results/<device>_<YYYY-MM-DD>_adaptation[_quick|_full].json``. Finished runs are cached in the
work directory (``--work-dir``, default ``$CALOFORGE_HOME/bench/adaptation-<backbone>``): a rerun with the
same settings only trains and evaluates what is new.
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
import time
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

STRATEGIES = ("full", "lora", "bias", "embedding")
HELD_OUT = "lar-pb"
CUSTOM = "lar-pb-coarse"  # the user-defined target of the default grid
# User-defined targets (changes to lar-pb's YAML; written into the work directory). lar-pb-coarse sits on the
# base's token grid after placement (its 30 layers have the base's layer pitch); lar-pb-thick, with plates
# 1.8x as thick (0.82 X0 per layer, 24.5 X0), is deeper per layer than any base detector, so it is scaled
# physically and its tokens sit between the base's token positions (docs/adaptation.md).
LAR_PB_R_EDGES = [0.0, 11.1, 22.2, 33.3, 44.4, 55.5, 66.6, 77.7, 88.8, 99.9]
CUSTOM_DETECTORS: dict[str, dict[str, Any]] = {
    CUSTOM: {
        "description": "lar-pb's Pb/LAr stack read out on a coarser 30 × 16 × 6 mesh",
        "mesh": {"n_z": 30, "n_phi": 16, "r_edges_mm": [0.0, 11.1, 22.2, 44.4, 66.6, 83.3, 99.9]},
    },
    "lar-pb-thick": {
        "description": "lar-pb with 4.5 mm Pb plates, 30 layers",
        "mesh": {"n_z": 30, "n_phi": 16, "r_edges_mm": LAR_PB_R_EDGES},
        "absorber": {"material": "Pb", "thickness_mm": 4.5},
    },
}
PARTICLES = ("e-", "pi+")
GOAL_DATA, GOAL_COMPUTE = 25.0, 20.0
# What the table shows and the plots draw (evaluation keys).
METRICS = ("fpd", "floor/fpd", "kpd", "floor/kpd", "auc_high", "auc_low")
# The headline's quality is FPD (CaloDiT-2's); the same ratios with these metrics are reported beside it.
OTHER_QUALITY = ("auc_high", "auc_low", "kpd")
# the 1σ error of each headline quality in a row's metrics (the headline "within errors")
ERROR_KEYS = {"fpd": "fpd_err", "kpd": "kpd_err", "auc_high": "auc_high_std", "auc_low": "auc_low_std"}


@dataclass(frozen=True)
class Plan:
    """Everything that decides the study's numbers (hashed into the cache keys)."""

    backbone: str
    patch_size: tuple[int, int, int]
    device: str
    sizes: tuple[int, ...]
    steps: int  # S: the adaptation budget and scratch's 1×
    batch_size: int
    adapt_budgets: tuple[float, ...]  # fractions of S
    scratch_multipliers: tuple[int, ...]
    scratch_multipliers_largest: tuple[int, ...]  # extra scratch budgets run at the largest size only
    strategies: tuple[str, ...]
    targets: tuple[str, ...]
    base_detectors: tuple[str, ...]
    base_showers: int  # per pretraining detector
    base_steps: int
    n_heldout: int  # the fixed held-out set per target (generated showers = as many)
    eval_steps: int  # sampler steps of the evaluation's generation
    threads: int  # torch intra-op threads of every run (0: torch's default)
    energy_gev: tuple[float, float] = (2.0, 100.0)
    seed: int = 0
    mesh_layers: bool = False  # bias / embedding also train the layers that read the mesh
    # lora also trains the layer-energy head in full (strategy.lora.energy_head; rows lora+head)
    lora_energy_head: bool = False
    pos_max_freq: float | None = None  # model.pos_max_freq of the base and scratch runs (None: backbone)
    pos_max_freq_r: float | None = None  # model.pos_max_freq_r (the radius features alone; None: backbone)
    # the training seed of every run (model initialisation, data order, noise draws); the data (pool, subsets,
    # held-out set) stay those of ``seed``, so two training seeds measure the run-to-run spread
    train_seed: int = 0
    # the training recipe (common.TRAIN_RECIPES) of the base and scratch runs: model, objective, optimiser and
    # schedule (the data and the budgets are the study's); the adaptations train with its objective
    recipe: str = "debug"
    # which stage may empty a layer at generation (``layer_energy.empty_layers``) in every run's evaluation;
    # None: each bundle's own. Not part of the cache keys: a run's training is reused, its evaluation with
    # this mode is kept beside it (``evaluated``)
    empty_layers: str | None = None
    # the layer-energy head's space (``layer_energy.space``) of the base and scratch runs; None: the recipe's
    layer_energy_space: str | None = None

    def key(self, *fields: str, **extra: Any) -> str:
        data = {f: getattr(self, f) for f in fields} | extra
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]

    def base_key(self) -> str:
        """What the base depends on: the plan's settings, the model section of the recipe and the resolved
        backbone (a changed flavour default, such as ``pos_max_freq``, trains a new base)."""
        model = model_config(self)
        extra = {"recipe": self.recipe} if self.recipe != "debug" else {}  # the keys from before it stay
        return self.key(
            "backbone",
            "patch_size",
            "base_detectors",
            "base_showers",
            "base_steps",
            "batch_size",
            "energy_gev",
            "seed",
            "train_seed",
            model=model,
            architecture=resolved_architecture(model),
            **extra,
        )

    def runs_key(self) -> str:
        """What every cached run of the study depends on besides its own size, method and steps."""
        return self.key(
            "batch_size",
            "n_heldout",
            "eval_steps",
            "train_seed",
            base=self.base_key(),
            pool=max(self.sizes) + 20,
        )

    def scratch_budgets(self, n: int) -> tuple[int, ...]:
        extra = self.scratch_multipliers_largest if n == max(self.sizes) else ()
        return tuple(sorted(set(self.scratch_multipliers) | set(extra)))


def make_plan(args: argparse.Namespace) -> Plan:
    full = args.full
    quick = args.quick
    if quick:
        plan = Plan(
            backbone=args.backbone,
            patch_size=(5, 4, 3),
            device=args.device,
            sizes=(40,),
            steps=4,
            batch_size=8,
            adapt_budgets=(1.0,),
            scratch_multipliers=(1, 4),
            scratch_multipliers_largest=(),
            strategies=STRATEGIES,
            targets=(HELD_OUT, CUSTOM),
            base_detectors=("par04-siw", "pbwo4"),
            base_showers=40,
            base_steps=6,
            n_heldout=40,
            eval_steps=2,
            threads=1,
        )
    elif full:  # the issue's grid: for the GPU (S backbone)
        plan = Plan(
            backbone=args.backbone,
            patch_size=(5, 4, 3),
            device=args.device,
            sizes=(250, 1000, 4000, 16000),
            steps=5000,
            batch_size=256,
            adapt_budgets=(0.25, 1.0),
            scratch_multipliers=(1, 4, 16),
            scratch_multipliers_largest=(),
            strategies=STRATEGIES,
            targets=(HELD_OUT, CUSTOM),
            base_detectors=("par04-siw", "pbwo4", "par04-scipb", "odd-like"),
            base_showers=25000,
            base_steps=50000,
            n_heldout=5000,
            eval_steps=16,
            threads=0,
        )
    else:  # the CPU study (debug backbone). 3 × 2 × 3 patches: with 5 × 4 × 3 the debug model never learns
        # the radial shape and every base, adapted or scratch model was 90 % too narrow (docs/adaptation.md)
        plan = Plan(
            backbone=args.backbone,
            patch_size=(3, 2, 3),
            device=args.device,
            sizes=(100, 500, 2500),
            steps=50,
            batch_size=32,
            adapt_budgets=(0.25, 1.0),
            scratch_multipliers=(1, 4, 16),
            scratch_multipliers_largest=(),
            strategies=STRATEGIES,
            targets=(HELD_OUT, CUSTOM),
            base_detectors=("par04-siw", "pbwo4", "par04-scipb"),
            base_showers=1000,
            base_steps=2400,
            n_heldout=300,
            eval_steps=4,
            threads=1,
        )
    changes: dict[str, Any] = {}
    for name in ("sizes", "scratch_multipliers"):
        value = getattr(args, name)
        if value:
            changes[name] = tuple(int(v) for v in value.split(","))
    if args.scratch_multipliers_largest is not None:
        text = args.scratch_multipliers_largest
        changes["scratch_multipliers_largest"] = tuple(int(v) for v in text.split(",")) if text else ()
    if args.patch:
        try:
            changes["patch_size"] = tuple(int(v) for v in args.patch.split(","))
        except ValueError:
            raise ValueError(f"--patch: integers z,phi,r (e.g. 3,2,3), got {args.patch!r}") from None
    if args.adapt_budgets:
        changes["adapt_budgets"] = tuple(float(v) for v in args.adapt_budgets.split(","))
    for name in ("strategies", "targets"):
        value = getattr(args, name)
        if value:
            changes[name] = tuple(v.strip() for v in value.split(","))
    for name in ("steps", "batch_size", "base_steps", "base_showers", "n_heldout", "eval_steps", "threads"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.mesh_layers:
        changes["mesh_layers"] = True
    if args.lora_energy_head:
        changes["lora_energy_head"] = True
    if args.pos_max_freq is not None:
        changes["pos_max_freq"] = args.pos_max_freq
    if args.pos_max_freq_r is not None:
        changes["pos_max_freq_r"] = args.pos_max_freq_r
    if args.train_seed is not None:
        changes["train_seed"] = args.train_seed
    changes["recipe"] = args.recipe
    changes["empty_layers"] = args.empty_layers
    changes["layer_energy_space"] = args.layer_energy_space
    plan = dataclasses.replace(plan, **changes)
    bad = sorted(set(plan.strategies) - set(STRATEGIES))
    if bad:
        raise ValueError(f"--strategies: unknown {bad} (known: {list(STRATEGIES)})")
    bad = sorted(set(plan.targets) - {HELD_OUT, *CUSTOM_DETECTORS})
    if bad:
        raise ValueError(f"--targets: unknown {bad} (known: {[HELD_OUT, *CUSTOM_DETECTORS]})")
    if HELD_OUT in plan.base_detectors:
        raise ValueError(f"{HELD_OUT} is the held-out detector: it must not be a pretraining detector")
    if min(plan.sizes) < 10 or plan.steps < 1 or plan.n_heldout < 20:
        raise ValueError("sizes must be >= 10 showers, steps >= 1, n_heldout >= 20")
    if plan.lora_energy_head and set(plan.strategies) != {"lora"}:
        raise ValueError(
            f"--lora-energy-head applies to the strategy lora, got {list(plan.strategies)}: "
            "pass --strategies lora"
        )
    if plan.mesh_layers and not set(plan.strategies) <= {"bias", "embedding"}:
        raise ValueError(
            f"--mesh-layers applies to the strategies bias and embedding, got {list(plan.strategies)}: "
            "pass --strategies bias,embedding"
        )
    if any(not 0 < f <= 1 for f in plan.adapt_budgets):
        raise ValueError(f"--adapt-budgets: fractions of --steps in (0, 1], got {list(plan.adapt_budgets)}")
    check_patch(plan)
    return plan


def check_patch(plan: Plan) -> None:
    """The patch against the backbone and every mesh of the study, before anything trains (a patch that
    does not divide the user-defined target's mesh would otherwise fail after the base's training)."""
    from caloforge.platform.backbone import backbone_config
    from caloforge.platform.geometry import Mesh, load_detector

    try:
        config = backbone_config(plan.backbone, plan.patch_size)
    except ValueError as err:
        raise ValueError(f"--patch {plan.patch_size}: {err}") from None
    meshes = {}
    for name in (*plan.base_detectors, *plan.targets):
        if name in CUSTOM_DETECTORS:
            mesh = CUSTOM_DETECTORS[name]["mesh"]
            meshes[name] = Mesh(mesh["n_z"], mesh["n_phi"], tuple(mesh["r_edges_mm"]))
        else:
            meshes[name] = load_detector(name).geometry
    for name, mesh in meshes.items():
        try:
            config.check_mesh(mesh.shape)
        except ValueError as err:
            raise ValueError(f"--patch {plan.patch_size}, detector {name}: {err}") from None


# -- configs ----------------------------------------------------------------------------------------------
def model_config(plan: Plan) -> dict[str, Any]:
    """The recipe's model (``configs/train/debug.yaml``'s by default) with the plan's backbone and patch."""
    model = dict(train_recipe(plan.recipe)[1]["model"])
    model.update(backbone=plan.backbone, patch_size=list(plan.patch_size))
    # The fidelity recipe pins position features for its one mesh (32 half periods); a base that is moved to
    # other meshes takes the backbone's defaults (docs/model.md, "Position features"), as the debug recipe's
    model.pop("pos_max_freq", None)
    model.pop("pos_max_freq_r", None)
    if plan.pos_max_freq is not None:
        model["pos_max_freq"] = plan.pos_max_freq
    if plan.pos_max_freq_r is not None:
        model["pos_max_freq_r"] = plan.pos_max_freq_r
    if plan.train_seed:
        model["init_seed"] = plan.train_seed
    if plan.layer_energy_space is not None:
        model["layer_energy"] = {**model.get("layer_energy", {}), "space": plan.layer_energy_space}
    return model


def eval_config(plan: Plan) -> Any:
    """The evaluation of every run (as ``configs/eval/ci.yaml``: small classifiers; no plots)."""
    from caloforge.config import from_dict
    from caloforge.evaluation.config import EvalConfig

    n = plan.n_heldout
    return from_dict(
        EvalConfig,
        {
            "seed": 0,
            "n_bins": 30,
            "metrics": ["response", "fpd", "kpd", "cls_low", "cls_high"],
            "floor_metrics": ["fpd", "kpd"],  # the classifiers' floor is AUC 0.5
            "classifier": {
                "hidden": 64,
                "n_layers": 2,
                "lr": 1.0e-3,
                "epochs": 8 if n >= 200 else 2,
                "batch_size": 256,
                "patience": 3,
                "n_seeds": 2 if n >= 200 else 1,
            },
            "fpd": {
                "min_samples": max(10, min(200, n // 4)),
                "max_samples": max(15, n // 2),
                "num_points": 5 if n >= 200 else 2,
                "num_batches": 4 if n >= 200 else 2,
            },
            "kpd": {"batch_size": max(10, min(500, n // 4)), "num_batches": 6 if n >= 200 else 2},
            # the high-level classifier per particle: which of e⁻ and π⁺ gives the model away
            "groups": {
                "by_detector": False,
                "by_particle": True,
                "energy_bins": 0,
                "metrics": ["cls_high"],
                "min_showers": max(10, n // 10),
            },
            "plots": {"enabled": False},
        },
        "benchmarks/adaptation.py eval",
    )


def recipe_training(plan: Plan) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The recipe's path, objective, optimiser and schedule (the base and scratch runs train with them)."""
    path, data = train_recipe(plan.recipe)
    return path, data["objective"], data["loop"]["optim"], data["loop"]["schedule"]


def loop_config(plan: Plan, steps: int, optim: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
    return {
        "steps": steps,
        "batch_size": plan.batch_size,
        "grad_accum": 1,
        "max_grad_norm": 1.0,
        "log_every": max(1, min(50, steps // 4)),
        "checkpoint_every": steps,
        "seed": plan.train_seed,
        "optim": optim,
        "schedule": schedule,
        "ema": {"enabled": True, "decay": 0.99, "warmup": True},
    }


def adapt_config(plan: Plan, kind: str, steps: int, name: str) -> Any:
    """The shipped recipe ``configs/adapt/<kind>.yaml`` with the study's budget; registration off; the
    pipeline's own evaluation reduced to its minimum (every run is evaluated on the fixed held-out set).
    ``lora`` trains the layer-energy head only with ``--lora-energy-head`` (rows ``lora+head``)."""
    from caloforge.adapt.config import AdaptConfig
    from caloforge.config import from_dict

    path = REPO / "configs" / "adapt" / f"{kind}.yaml"
    data = yaml.safe_load(path.read_text())
    recipe = data["loop"]
    data.update(
        name=name,
        loop=loop_config(plan, steps, recipe["optim"], recipe["schedule"]),
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
        gate={"metric": "fpd"},
        register={"enabled": False},
        device=plan.device,
        progress=False,
        torch_threads=plan.threads,
    )
    if plan.mesh_layers:
        data["strategy"]["mesh_layers"] = True
    if kind == "lora":  # the rows' names say it (lora, lora+head), whatever the recipe's default
        data["strategy"].setdefault("lora", {})["energy_head"] = plan.lora_energy_head
    data["objective"] = recipe_training(plan)[1]  # the objective base and scratch train with
    return from_dict(AdaptConfig, data, str(path))


def scratch_config(plan: Plan, shards: Path, steps: int, name: str) -> Any:
    """The recipe (``configs/train/debug.yaml`` by default) on the target's shards at the study's budget."""
    from caloforge.config import from_dict
    from caloforge.training.run import TrainConfig

    path, objective, optim, schedule = recipe_training(plan)
    data = yaml.safe_load((REPO / "configs" / "train" / "debug.yaml").read_text())
    data.update(
        name=name,
        data={"shards": str(shards), "stream": {"shuffle_buffer": 500}, "spare_detector_slots": 0},
        model=model_config(plan),
        objective=objective,
        loop=loop_config(plan, steps, optim, schedule),
        eval={"every": 0},
        device=plan.device,
        keep_checkpoints=1,
        progress=False,
        torch_threads=plan.threads,
    )
    return from_dict(TrainConfig, data, str(path))


# -- data -------------------------------------------------------------------------------------------------
def custom_detector(work: Path, name: str = CUSTOM) -> Path:
    """A user-defined target of ``CUSTOM_DETECTORS``: lar-pb's YAML with its changes (written once into the
    work dir)."""
    from caloforge.platform.geometry import DETECTORS_DIR

    path = work / "detectors" / f"{name}.yaml"
    spec = yaml.safe_load((DETECTORS_DIR / f"{HELD_OUT}.yaml").read_text())
    spec.update(name=name, **CUSTOM_DETECTORS[name])
    text = yaml.safe_dump(spec, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def detector_arg(work: Path, target: str) -> str:
    return str(custom_detector(work, target)) if target in CUSTOM_DETECTORS else target


def simulate(detector: str, n: int, seed: int, plan: Plan, out: Path, split: tuple[float, ...]) -> Path:
    """``n`` showers of ``detector`` simulated and sharded into ``out/shards`` (cached)."""
    from caloforge.datasets.prepare import SimulateConfig, prepare_shards
    from caloforge.datasets.shards import ShardConfig, SplitFractions

    spec = SimulateConfig(
        detectors=(detector,),
        particles=PARTICLES,
        n_per_detector=n,
        energy_gev=plan.energy_gev,
        seed=seed,
        shards=ShardConfig(showers_per_shard=500, split=SplitFractions(*split), seed=seed),
    )
    return prepare_shards(None, spec, out)


def subset_shards(pool_raw: Path, n: int, out: Path, seed: int) -> Path:
    """A shard set of the first ``n + 20`` pool showers: ``n`` train and 20 test (the adaptation pipeline's
    own check; the study evaluates on the fixed held-out set)."""
    from caloforge.datasets.shards import Manifest, ShardConfig, SourceSpec, SplitFractions, write_shards

    if (out / "manifest.json").is_file():
        return out
    total = n + 20
    split = SplitFractions(train=n / total, val=0.0, test=20 / total)
    config = ShardConfig(showers_per_shard=500, split=split, seed=seed)
    write_shards([SourceSpec(pool_raw, format="native", max_showers=total)], out, config)
    got = Manifest.load(out).counts["train"]["total"]
    if got != n:
        raise ValueError(f"{out}: {got} train showers, expected {n}")
    return out


def target_data(plan: Plan, work: Path, target: str) -> tuple[dict[int, Path], Any, Any]:
    """Per size the shard directory, the fixed held-out ShowerSet and the detector spec."""
    from caloforge.datasets.streaming import load_split
    from caloforge.platform.geometry import load_detector

    det = detector_arg(work, target)
    spec = load_detector(det)
    pool_n = max(plan.sizes) + 20
    root = work / "data" / f"{target}-{plan.key('n_heldout', 'energy_gev', 'seed', pool=pool_n)}"
    pool = simulate(det, pool_n, 100 + plan.seed, plan, root / "pool", (1.0, 0.0, 0.0))
    del pool
    heldout_dir = simulate(det, plan.n_heldout, 200 + plan.seed, plan, root / "heldout", (0.0, 0.0, 1.0))
    heldout = load_split(heldout_dir, "test")
    raw = root / "pool" / "raw" / f"{spec.name}.h5"
    shards = {n: subset_shards(raw, n, root / f"n{n}", plan.seed) for n in plan.sizes}
    return shards, heldout, spec


# -- runs -------------------------------------------------------------------------------------------------
def forward_flops_per_shower(model_dir: Path) -> int:
    """Backbone matmuls at the model's mesh + 2 × the layer-energy head's linear weights."""
    import torch

    from caloforge.platform.backbone import forward_flops
    from caloforge.platform.shower_model import ShowerModel

    model = ShowerModel.load(model_dir)
    flops = forward_flops(model.config.backbone_config(), model.mesh_shape)["total"]
    head = 0
    if model.energy_head is not None:
        head = sum(
            2 * m.weight.numel() for m in model.energy_head.modules() if isinstance(m, torch.nn.Linear)
        )
    return int(flops + head)


def evaluate(model_dir: Path, heldout: Any, spec: Any, plan: Plan) -> dict[str, float]:
    from caloforge.evaluation.api import evaluate_model, load_model

    report = evaluate_model(
        load_model(model_dir, plan.device, plan.empty_layers),  # type: ignore[arg-type]
        heldout,
        len(heldout),
        eval_config(plan),
        num_steps=plan.eval_steps,
        detectors={spec.name: spec},
        device=plan.device,
    )
    out = {k: float(v) for k, v in report.metrics.items() if isinstance(v, int | float)}
    out["generation_ms_per_shower"] = float(report.info["generation_ms_per_shower"])
    return out


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def cached(run_dir: Path, fn: Any) -> dict[str, Any]:
    """``fn()``'s record, kept in ``run_dir/bench.json`` (a rerun reuses it)."""
    path = run_dir / "bench.json"
    if path.is_file():
        record = json.loads(path.read_text())
        record["cached"] = True
        return record
    record = fn()
    _write_json(path, record)
    record["cached"] = False
    return record


def evaluated(run_dir: Path, record: dict[str, Any], heldout: Any, spec: Any, plan: Plan) -> dict[str, Any]:
    """``record`` with the metrics of the plan's evaluation: as recorded, or — with ``plan.empty_layers``
    — the bundle's in ``run_dir/model`` evaluated with that mode (kept in
    ``run_dir/bench-empty_layers-<mode>.json``)."""
    if plan.empty_layers is None:
        return record
    path = run_dir / f"bench-empty_layers-{plan.empty_layers}.json"
    if path.is_file():
        metrics = json.loads(path.read_text())["metrics"]
    else:
        metrics = evaluate(run_dir / "model", heldout, spec, plan)
        _write_json(path, {"empty_layers": plan.empty_layers, "metrics": metrics})
    return {**record, "metrics": metrics, "empty_layers": plan.empty_layers}


def pretrain_base(plan: Plan, work: Path) -> dict[str, Any]:
    from caloforge.config import from_dict
    from caloforge.training.run import TrainConfig, train

    run_dir = work / f"base-{plan.base_key()}"
    # the study's data (configs/train/debug.yaml's data section), the recipe's model, objective and loop
    path, objective, optim, schedule = recipe_training(plan)
    data = yaml.safe_load((REPO / "configs" / "train" / "debug.yaml").read_text())
    data.update(
        name="adaptation-bench-base",
        model=model_config(plan),
        objective=objective,
        loop=loop_config(plan, plan.base_steps, optim, schedule),
        eval={"every": 0},
        device=plan.device,
        keep_checkpoints=1,
        progress=False,
        torch_threads=plan.threads,
    )
    data["data"]["simulate"].update(
        detectors=list(plan.base_detectors),
        n_per_detector=plan.base_showers,
        energy_gev=list(plan.energy_gev),
        shards={"showers_per_shard": 500, "seed": 7},
    )
    data["data"]["spare_detector_slots"] = 2
    config = from_dict(TrainConfig, data, str(path))

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        result = train(config, run_dir)
        wall = time.perf_counter() - t0
        fwd = forward_flops_per_shower(result.model_dir)
        return {
            "model_dir": str(result.model_dir),
            "detectors": list(plan.base_detectors),
            "showers": plan.base_showers * len(plan.base_detectors),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "wall_s": wall,
            "forward_flops_per_shower": fwd,
            "train_flops": 3 * fwd * result.steps * plan.batch_size,
        }

    print(f"base: {run_dir}", flush=True)
    return cached(run_dir, run)


def adapt_run(
    plan: Plan,
    work: Path,
    base: dict,
    target: str,
    n: int,
    shards: Path,
    kind: str,
    steps: int,
    heldout: Any,
    spec: Any,
) -> dict[str, Any]:
    from caloforge.adapt.pipeline import AdaptRequest, run_adaptation

    # the method's name in the rows and run directory
    label = f"{kind}+mesh" if plan.mesh_layers else f"{kind}+head" if plan.lora_energy_head else kind
    run_dir = work / f"runs-{plan.runs_key()}" / target / f"n{n}" / f"{label}-{steps}"

    def run() -> dict[str, Any]:
        if run_dir.exists():  # an interrupted run: start it again
            import shutil

            shutil.rmtree(run_dir)
        config = adapt_config(plan, kind, steps, f"{label}-{steps}")
        request = AdaptRequest(base["model_dir"], detector_arg(work, target), shards)
        t0 = time.perf_counter()
        result = run_adaptation(config, request, run_dir)
        wall = time.perf_counter() - t0
        fwd = forward_flops_per_shower(result.model_dir)
        return {
            "kind": "adapt",
            "method": label,
            "steps": result.steps,
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters,
            "wall_s": wall,
            "forward_flops_per_shower": fwd,
            "train_flops": 3 * fwd * result.steps * plan.batch_size,
            "metrics": evaluate(result.model_dir, heldout, spec, plan),
        }

    return {"target": target, "n_train": n, **evaluated(run_dir, cached(run_dir, run), heldout, spec, plan)}


def scratch_run(
    plan: Plan, work: Path, target: str, n: int, shards: Path, steps: int, heldout: Any, spec: Any
) -> dict[str, Any]:
    from caloforge.training.run import train

    run_dir = work / f"runs-{plan.runs_key()}" / target / f"n{n}" / f"scratch-{steps}"

    def run() -> dict[str, Any]:
        config = scratch_config(plan, shards, steps, f"scratch-{target}-n{n}-{steps}")
        t0 = time.perf_counter()
        result = train(config, run_dir)
        wall = time.perf_counter() - t0
        fwd = forward_flops_per_shower(result.model_dir)
        from caloforge.platform.shower_model import ShowerModel

        model = ShowerModel.load(result.model_dir)
        params = sum(p.numel() for p in model.parameters())
        return {
            "kind": "scratch",
            "method": "scratch",
            "steps": result.steps,
            "trainable_parameters": params,
            "total_parameters": params,
            "wall_s": wall,
            "forward_flops_per_shower": fwd,
            "train_flops": 3 * fwd * result.steps * plan.batch_size,
            "metrics": evaluate(result.model_dir, heldout, spec, plan),
        }

    return {"target": target, "n_train": n, **evaluated(run_dir, cached(run_dir, run), heldout, spec, plan)}


# -- analysis ---------------------------------------------------------------------------------------------
def combined_error(a: dict, b: dict, metric: str) -> float:
    """The 1σ error of the difference of two rows' ``metric`` (``ERROR_KEYS``: FPD/KPD's own error, the
    classifiers' spread over their seeds); 0 where a row has none."""
    key = ERROR_KEYS[metric]
    return math.hypot(a["metrics"].get(key, 0.0), b["metrics"].get(key, 0.0))


def headline(
    rows: list[dict], base_flops: float, plan: Plan, metric: str = "fpd", within_errors: bool = False
) -> dict[str, Any]:
    """The data-needed and compute-needed ratios of one target (see the module docstring) with quality =
    ``metric`` (lower is better: ``fpd``, ``kpd``, ``auc_high``, ``auc_low``). ``within_errors``: a run
    also matches when it is above the best scratch value by at most their combined 1σ error."""
    scratch = [
        r for r in rows if r["kind"] == "scratch" and math.isfinite(r["metrics"].get(metric, math.nan))
    ]
    adapt = [r for r in rows if r["kind"] == "adapt" and math.isfinite(r["metrics"].get(metric, math.nan))]
    if not scratch or not adapt:
        return {"status": "no runs"}
    best = min(scratch, key=lambda r: r["metrics"][metric])
    target_value = best["metrics"][metric]
    matching = [
        r
        for r in adapt
        if r["metrics"][metric] <= target_value + (combined_error(r, best, metric) if within_errors else 0.0)
    ]
    best_adapt = min(adapt, key=lambda r: r["metrics"][metric])
    out: dict[str, Any] = {
        "quality_metric": metric,
        "best_scratch": {k: best[k] for k in ("n_train", "steps", "train_flops")} | {metric: target_value},
        "best_adaptation": {k: best_adapt[k] for k in ("method", "n_train", "steps", "train_flops")}
        | {metric: best_adapt["metrics"][metric]},
        "n_matching_runs": len(matching),
    }
    if not matching:
        out.update(status="not reached", data_needed=None, compute_needed=None, goal_met=False)
        return out
    least_data = min(matching, key=lambda r: (r["n_train"], r["train_flops"]))
    least_flops = min(matching, key=lambda r: (r["train_flops"], r["n_train"]))
    data_ratio = best["n_train"] / least_data["n_train"]
    compute_ratio = best["train_flops"] / least_flops["train_flops"]
    min_adapt_steps = min(round(f * plan.steps) for f in plan.adapt_budgets)
    out.update(
        status="reached",
        data_needed=data_ratio,
        data_needed_lower_bound=least_data["n_train"] == min(plan.sizes),
        data_run={k: least_data[k] for k in ("method", "n_train", "steps")}
        | {metric: least_data["metrics"][metric]},
        compute_needed=compute_ratio,
        compute_needed_lower_bound=least_flops["steps"] == min_adapt_steps
        and least_flops["n_train"] == min(plan.sizes),
        compute_run={k: least_flops[k] for k in ("method", "n_train", "steps", "train_flops")}
        | {metric: least_flops["metrics"][metric]},
        compute_needed_with_pretraining=best["train_flops"] / (least_flops["train_flops"] + base_flops),
        goal_met=bool(data_ratio >= GOAL_DATA and compute_ratio >= GOAL_COMPUTE),
    )
    return out


def headline_text(h: dict[str, Any], metric: str) -> str:
    """One headline's ratios (``≥`` for lower bounds) or why there are none, for the printed summary."""
    if h.get("status") != "reached":
        return (
            f"not reached (best scratch {fmt(h.get('best_scratch', {}).get(metric))}, best "
            f"adaptation {fmt(h.get('best_adaptation', {}).get(metric))})"
        )
    lb_d = "≥ " if h["data_needed_lower_bound"] else ""
    lb_c = "≥ " if h["compute_needed_lower_bound"] else ""
    return (
        f"data needed {lb_d}{h['data_needed']:.3g}×, compute needed {lb_c}{h['compute_needed']:.3g}× "
        f"({h['compute_run']['method']} {h['compute_run']['steps']} steps on {h['compute_run']['n_train']})"
    )


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'target':14} {'N':>6} {'run':16} {'steps':>6} {'train%':>7} {'PFLOP':>8} {'wall s':>7} "
        f"{'FPD':>8} {'floor':>8} {'KPD':>9} {'floor':>9} {'AUC hi':>6} {'AUC vox':>7} {'resp':>6}  "
        "AUC hi per particle"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        m = r["metrics"]
        name = r["method"] if r["kind"] == "adapt" else "scratch"
        share = 100.0 * r["trainable_parameters"] / max(1, r["total_parameters"])
        print(
            f"{r['target']:14} {r['n_train']:>6} {name:16} {r['steps']:>6} {share:>7.3g} "
            f"{r['train_flops'] / 1e15:>8.4f} {r['wall_s']:>7.1f} {fmt(m.get('fpd')):>8} "
            f"{fmt(m.get('floor/fpd')):>8} {fmt(m.get('kpd')):>9} {fmt(m.get('floor/kpd')):>9} "
            f"{fmt(m.get('auc_high'), '.3f'):>6} {fmt(m.get('auc_low'), '.3f'):>7} "
            f"{fmt(response_of(m), '.3f'):>6}  "
            + " ".join(f"{p} {v:.3f}" for p, v in particle_aucs(m).items())
        )


def particle_aucs(metrics: dict[str, float]) -> dict[str, float]:
    """The high-level AUC of each particle's showers alone (``group/<particle>/auc_high``)."""
    out = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "group" and parts[2] == "auc_high":
            out[parts[1]] = value
    return dict(sorted(out.items()))


def response_of(metrics: dict[str, float]) -> float | None:
    """The energy response: mean generated / mean reference total energy − 1 (``response/scale``; 0 ideal)."""
    return metrics.get("response/scale")


# The plots: one per quality of the headline and the data / compute axis. The classifier AUCs have their floor
# at 0.5 (indistinguishable), FPD and KPD at their data-vs-data value.
PLOT_QUALITIES = {
    "fpd": ("FPD", "log"),
    "kpd": ("KPD", "symlog"),
    "auc_high": ("classifier AUC, high-level features", "linear"),
    "auc_low": ("classifier AUC, voxels", "linear"),
}


def plot(rows: list[dict], targets: tuple[str, ...], out: Path) -> list[Path]:
    """``adaptation_<quality>_vs_<data|compute>.png`` for every quality of ``PLOT_QUALITIES``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colours = {"full": "C0", "lora": "C1", "bias": "C2", "embedding": "C3", "scratch": "k"}
    for metric, (ylabel, yscale) in PLOT_QUALITIES.items():
        for xkey, xlabel, name in (
            ("n_train", "training showers of the target", "data"),
            ("train_flops", "training FLOPs", "compute"),
        ):
            fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
            for ax, target in zip(axes[0], targets, strict=True):
                sel = [
                    r
                    for r in rows
                    if r["target"] == target and math.isfinite(r["metrics"].get(metric, math.nan))
                ]
                groups: dict[tuple[str, int], list[dict]] = {}
                for r in sel:
                    groups.setdefault((r["method"], r["steps"]), []).append(r)
                for (method, steps), rs in sorted(groups.items()):
                    rs = sorted(rs, key=lambda r: r[xkey])
                    kind = method.split("+")[0]  # bias+mesh: bias's colour, dash-dotted
                    style = "--" if method == "scratch" else ("-." if "+" in method else "-")
                    ax.plot(
                        [r[xkey] for r in rs],
                        [r["metrics"][metric] for r in rs],
                        style,
                        marker="o",
                        color=colours[kind],
                        alpha=0.4 + 0.6 * steps / max(r["steps"] for r in sel),
                        label=f"{method} {steps} steps",
                    )
                if metric.startswith("auc"):
                    ax.axhline(0.5, color="grey", lw=1, ls=":", label="indistinguishable (0.5)")
                else:
                    floors = [r["metrics"].get(f"floor/{metric}", math.nan) for r in sel]
                    floors = [f for f in floors if math.isfinite(f)]
                    if floors:
                        floor = sum(floors) / len(floors)
                        ax.axhline(floor, color="grey", lw=1, ls=":", label="data-vs-data floor")
                ax.set(xscale="log", xlabel=xlabel, ylabel=f"{ylabel} (lower is better)", title=target)
                ax.set_yscale(yscale, **({"linthresh": 1.0} if yscale == "symlog" else {}))
                ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"adaptation_{metric}_vs_{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


# -- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from caloforge.platform.energy import EMPTY_LAYER_MODES, LAYER_ENERGY_SPACES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a tiny end-to-end run (tests, make bench)")
    mode.add_argument("--full", action="store_true", help="the issue's grid (250 … 16k showers; for a GPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--backbone", default="debug", help="backbone flavour (debug on CPU, S on a GPU)")
    p.add_argument("--sizes", help="target training sizes, comma-separated (e.g. 150,1000,4000)")
    p.add_argument("--steps", type=int, help="S: the adaptation step budget (scratch runs S × multipliers)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--adapt-budgets", help="adaptation budgets as fractions of S, e.g. 0.25,1")
    p.add_argument("--scratch-multipliers", help="scratch budgets as multiples of S, e.g. 1,4,16")
    p.add_argument(
        "--scratch-multipliers-largest",
        help="extra scratch budgets (multiples of S) run at the largest size only, e.g. 16 ('' for none)",
    )
    p.add_argument(
        "--patch",
        help="backbone patch z,phi,r of the base, adapted and scratch models (default 3,2,3; --quick and "
        "--full 5,4,3); it must divide every target's mesh",
    )
    p.add_argument("--strategies", help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument(
        "--mesh-layers",
        action="store_true",
        help="bias and embedding also train the layers that read the mesh (strategy.mesh_layers; rows "
        "named bias+mesh, embedding+mesh); needs --strategies bias,embedding or a subset",
    )
    p.add_argument(
        "--lora-energy-head",
        action="store_true",
        help="lora also trains the layer-energy head in full (strategy.lora.energy_head; rows named "
        "lora+head); needs --strategies lora",
    )
    p.add_argument("--targets", help=f"comma-separated subset of {','.join([HELD_OUT, *CUSTOM_DETECTORS])}")
    p.add_argument(
        "--pos-max-freq",
        type=float,
        help="model.pos_max_freq of the base and the scratch runs (default: the backbone's; 32 was the "
        "default before bundle schema 4)",
    )
    p.add_argument(
        "--pos-max-freq-r",
        type=float,
        help="model.pos_max_freq_r of the base and the scratch runs: the radius features' limit alone "
        "(default: the backbone's, 3 since bundle schema 5; before, the radius followed pos_max_freq)",
    )
    p.add_argument(
        "--recipe",
        choices=sorted(TRAIN_RECIPES),
        default="debug",
        help="training recipe of the base and scratch runs (model, objective, optimiser; the adaptations "
        "train with its objective): debug (configs/train/debug.yaml) or fidelity "
        "(configs/train/fidelity-cpu.yaml, 3.3x the cost of a step)",
    )
    p.add_argument(
        "--empty-layers",
        choices=EMPTY_LAYER_MODES,
        help="which stage may empty a layer when every run generates its evaluation sample "
        "(layer_energy.empty_layers; default: each bundle's own); reuses the cached training",
    )
    p.add_argument(
        "--layer-energy-space",
        choices=LAYER_ENERGY_SPACES,
        help="the layer-energy head's space of the base and scratch runs (layer_energy.space; default: the "
        "recipe's, linear); log_below trains a new base",
    )
    p.add_argument(
        "--train-seed",
        type=int,
        help="training seed of the base, adapted and scratch runs (initialisation, data order; default 0); "
        "the data and the held-out set do not change",
    )
    p.add_argument("--base-steps", type=int)
    p.add_argument("--base-showers", type=int, help="showers per pretraining detector")
    p.add_argument("--n-heldout", type=int, help="held-out showers per target (as many are generated)")
    p.add_argument("--eval-steps", type=int, help="sampler steps of the evaluation's generation")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (CPU default 1: on a shared machine "
        "more threads thrash; 0: torch's default)",
    )
    p.add_argument(
        "--work-dir", type=Path, help="cache (default $CALOFORGE_HOME/bench/adaptation-<backbone>)"
    )
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/<device>_<date>_...)")
    p.add_argument("--plots", type=Path, help="plot directory (default: beside the JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from caloforge.environment import apply_default_env

    apply_default_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from caloforge import paths

    plan = make_plan(args)
    if plan.threads:
        torch.set_num_threads(plan.threads)  # the evaluations (the runs set their own)
    suffix = "_quick" if args.quick else ("_full" if args.full else "")
    work = args.work_dir or paths.home() / "bench" / f"adaptation-{plan.backbone}{suffix}"
    work.mkdir(parents=True, exist_ok=True)
    device_kind = "cuda" if plan.device.startswith("cuda") else "cpu"
    out = args.out or RESULTS / f"{device_kind}_{dt.date.today().isoformat()}_adaptation{suffix}.json"
    plots_dir = args.plots or out.parent / out.stem
    plots_dir.mkdir(parents=True, exist_ok=True)
    print(f"adaptation study: {dataclasses.asdict(plan)}\nwork dir: {work}", flush=True)

    t0 = time.perf_counter()
    base = pretrain_base(plan, work)
    print(f"base: {base['steps']} steps in {base['wall_s']:.0f} s, loss {base['final_loss']:.4g}", flush=True)
    rows: list[dict] = []
    heads: dict[str, Any] = {}
    others: dict[str, Any] = {}
    within: dict[str, Any] = {}
    for target in plan.targets:
        shards, heldout, spec = target_data(plan, work, target)
        target_rows = []
        for n in plan.sizes:
            for fraction in plan.adapt_budgets:
                steps = max(1, round(fraction * plan.steps))
                for kind in plan.strategies:
                    r = adapt_run(plan, work, base, target, n, shards[n], kind, steps, heldout, spec)
                    target_rows.append(r)
                    print(
                        f"  {target} N={n} {kind} {steps} steps: FPD {fmt(r['metrics'].get('fpd'))} "
                        f"({r['wall_s']:.0f} s)",
                        flush=True,
                    )
            for mult in plan.scratch_budgets(n):
                r = scratch_run(plan, work, target, n, shards[n], mult * plan.steps, heldout, spec)
                target_rows.append(r)
                print(
                    f"  {target} N={n} scratch {mult * plan.steps} steps: FPD {fmt(r['metrics'].get('fpd'))} "
                    f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
        heads[target] = headline(target_rows, base["train_flops"], plan)
        others[target] = {m: headline(target_rows, base["train_flops"], plan, m) for m in OTHER_QUALITY}
        within[target] = {
            m: headline(target_rows, base["train_flops"], plan, m, within_errors=True) for m in ERROR_KEYS
        }
        rows.extend(target_rows)
    total = time.perf_counter() - t0

    print_table(rows)
    print(
        f"\nheadline (quality = FPD on the fixed held-out set; goal: data ≥ {GOAL_DATA:g}×, compute ≥ "
        f"{GOAL_COMPUTE:g}×)"
    )
    for target, h in heads.items():
        if h.get("status") != "reached":
            best = h.get("best_scratch", {})
            print(
                f"  {target}: not reached (best scratch FPD {fmt(best.get('fpd'))}, best adaptation "
                f"FPD {fmt(h.get('best_adaptation', {}).get('fpd'))})"
            )
            continue
        lb_d = "≥ " if h["data_needed_lower_bound"] else ""
        lb_c = "≥ " if h["compute_needed_lower_bound"] else ""
        print(
            f"  {target}: data needed {lb_d}{h['data_needed']:.3g}× ({h['data_run']['method']} on "
            f"{h['data_run']['n_train']} vs scratch on {h['best_scratch']['n_train']}), compute needed "
            f"{lb_c}{h['compute_needed']:.3g}× ({h['compute_run']['method']} {h['compute_run']['steps']} "
            f"steps on {h['compute_run']['n_train']}; {h['compute_needed_with_pretraining']:.3g}× with "
            f"the pretraining charged); goal {'met' if h['goal_met'] else 'not met'}"
        )
    for target, by_metric in others.items():
        for metric, h in by_metric.items():
            print(f"  {target}, quality = {metric}: {headline_text(h, metric)}")
    print("within errors (a run matches when above the best scratch value by at most their combined 1σ):")
    for target, by_metric in within.items():
        for metric, h in by_metric.items():
            print(f"  {target}, quality = {metric}: {headline_text(h, metric)}")
    plot_paths = plot(rows, plan.targets, plots_dir)
    record = {
        "benchmark": "adaptation",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": plan.device,
        "device_name": torch.cuda.get_device_name(0) if device_kind == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "mode": "quick" if args.quick else ("full" if args.full else "cpu"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "plan": dataclasses.asdict(plan),
        "definitions": {
            "quality": "FPD on the fixed held-out set of the target (lower is better)",
            "best_scratch": "the scratch run with the lowest FPD over all sizes and budgets",
            "match": "an adaptation run with FPD <= the best scratch FPD",
            "match_within_errors": "value <= best scratch value + hypot(run error, best scratch error); "
            "errors: fpd_err, kpd_err, auc_high_std, auc_low_std",
            "data_needed": "train showers of the best scratch run / fewest train showers of a matching run",
            "compute_needed": "train FLOPs of the best scratch run / fewest train FLOPs of a matching run "
            "(pretraining not charged)",
            "train_flops": "3 x forward FLOPs per shower (backbone matmuls + energy head) x steps x batch",
        },
        "goal": {"data_needed": GOAL_DATA, "compute_needed": GOAL_COMPUTE},
        "base": base,
        "headline": heads,
        "headline_other_metrics": others,
        "headline_within_errors": within,  # every quality, matching within the combined 1σ error
        "rows": rows,
        "plots": [str(p) for p in plot_paths],
        "wall_s": total,  # this invocation (cached runs cost nothing)
        "runs_wall_s": base["wall_s"] + sum(r["wall_s"] for r in rows),  # every run's training, cached or not
    }
    write_results(record, "adaptation", device_kind, out)
    print(f"plots: {', '.join(str(p) for p in plot_paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
