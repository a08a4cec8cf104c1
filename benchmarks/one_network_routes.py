"""Benchmark: the short measured comparison behind the one-network route for flow-matching models
(issue #13; docs/distillation.md, "Why shortcut models").

Protocol (CPU, minutes):

1. **Teacher**: the ``configs/train/debug.yaml`` flow-matching model (``debug`` backbone, patch 5 × 4 × 3)
   trained with that recipe on simulated ``par04-siw`` + ``pbwo4`` showers (e−, π+); cached in the work
   directory (``--work-dir``).
2. **Students**: the teacher's weights in the step-conditioned ``shortcut`` parametrisation (the network
   also takes the step size d; its step embedding starts at zero, so the student starts as the teacher),
   fine-tuned with each candidate for the *same* number of steps, batch, optimizer and seed:
   - ``shortcut`` (Frans et al. 2025): d = 0 samples regress the teacher's velocity, a quarter of the batch
     learns u(x, t, d) from two half steps of itself (self-consistency, d ∈ {1, ½, …, 1/128}); no JVP
     (``caloforge.platform.objectives.ShortcutDistillation``, the shipped objective);
   - ``meanflow`` (Geng et al. 2025): u(x_t, t, d) regresses sg(v + d · du/dt), v the teacher's velocity
     and du/dt the total derivative along the flow (``torch.func.jvp`` through the backbone, attention on
     PyTorch's math kernel, which has forward-mode AD on the CPU); a quarter of the batch at d > 0,
     adaptive weight 1 / (‖Δ‖² + 10⁻³) (the paper's p = 1); the prototype is in this file;
   - ``shortcut@wall``: shortcut trained for as long (wall time) as MeanFlow's run.
   sCM (Lu & Song 2025) is not prototyped: it needs the TrigFlow parametrisation (a teacher reparametrised
   from flow matching), the same JVP as MeanFlow and tangent normalisation / warm-up to be stable.
3. **Evaluation** (``caloforge.evaluation.evaluate_model``, the same held-out test showers and seeds for
   every row): the teacher with Euler at 1, 2, 4 and 32 steps and its default (midpoint × 16 = 32
   evaluations); every student with the ``shortcut`` sampler at 1, 2 and 4 steps. Metrics: classifier AUCs
   (high-level features, voxels), FPD (beside the data-vs-data floor), training ms per step.

    .venv/bin/python benchmarks/one_network_routes.py            # ~12 min on 1 CPU thread
    .venv/bin/python benchmarks/one_network_routes.py --quick    # seconds: a smoke run (tests)

Prints a table; writes ``benchmarks/results/<device>_<YYYY-MM-DD>_one_network_routes[_quick].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from common import git_commit, write_results

REPO = Path(__file__).resolve().parents[1]
ROUTES = ("shortcut", "meanflow")


@dataclass(frozen=True)
class Plan:
    n_per_detector: int = 1200
    teacher_steps: int = 400
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-4
    n_eval: int = 600
    student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_euler: tuple[int, ...] = (1, 2, 4, 32)
    seed: int = 0
    threads: int = 1
    equal_wall: bool = True


QUICK = Plan(
    n_per_detector=60,
    teacher_steps=4,
    steps=3,
    batch_size=8,
    n_eval=40,
    student_steps=(1, 2),
    teacher_euler=(1, 4),
    equal_wall=False,
)


def eval_config(n: int) -> Any:
    from caloforge.config import from_dict
    from caloforge.evaluation.config import EvalConfig

    return from_dict(
        EvalConfig,
        {
            "seed": 0,
            "n_bins": 30,
            "metrics": ["response", "fpd", "cls_low", "cls_high"],
            "floor_metrics": ["fpd"],
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
            "groups": {"enabled": False},
            "plots": {"enabled": False},
        },
        "benchmarks/one_network_routes.py eval",
    )


# -- teacher ----------------------------------------------------------------------------------------------
def train_teacher(plan: Plan, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(teacher bundle, shard directory, record): the debug recipe, cached in ``work``."""
    from caloforge.config import from_dict
    from caloforge.training.run import TrainConfig, train

    key = f"n{plan.n_per_detector}-s{plan.teacher_steps}-b{plan.batch_size}-seed{plan.seed}"
    run_dir = work / f"teacher-{key}"
    cache = run_dir / "bench.json"
    if cache.is_file():
        record = json.loads(cache.read_text())
        return Path(record["model_dir"]), Path(record["manifest_dir"]), record
    path = REPO / "configs" / "train" / "debug.yaml"
    data = yaml.safe_load(path.read_text())
    data["data"]["simulate"].update(
        n_per_detector=plan.n_per_detector,
        shards={"showers_per_shard": 200, "seed": 7, "split": {"train": 0.6, "val": 0.0, "test": 0.4}},
    )
    data["loop"].update(
        steps=plan.teacher_steps,
        log_every=max(1, plan.teacher_steps // 4),
        checkpoint_every=plan.teacher_steps,
        seed=plan.seed,
    )
    data.update(
        name="one-network-teacher",
        eval={"every": 0},
        device="cpu",
        keep_checkpoints=1,
        progress=False,
        torch_threads=plan.threads,
    )
    config = from_dict(TrainConfig, data, str(path))
    t0 = time.perf_counter()
    result = train(config, run_dir)
    record = {
        "model_dir": str(result.model_dir),
        "manifest_dir": str(result.manifest_dir),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "wall_s": time.perf_counter() - t0,
    }
    cache.write_text(json.dumps(record, indent=2) + "\n")
    return result.model_dir, result.manifest_dir, record


# -- the MeanFlow prototype -------------------------------------------------------------------------------
def meanflow_loss(
    student: Any,
    teacher: Any,
    x1_BZPR: torch.Tensor,
    cond: Any,
    generator: torch.Generator,
    step_fraction: float = 0.25,
    adaptive_p: float = 1.0,
    adaptive_c: float = 1e-3,
) -> torch.Tensor:
    """Per-sample MeanFlow distillation loss (B,) in this repository's time (t = 0 noise, 1 data): for
    x_t = (1 − t) x_0 + t x_1 and a step d ≥ 0 (t + d ≤ 1), u(x_t, t, d) regresses
    sg(v + d · du/dt), v = the teacher's velocity, du/dt = ∂_x u · v + ∂_t u − ∂_d u (the end t + d fixed):
    (d/dt)[(s − t) u] = −v along the flow gives u = v + (s − t) du/dt (Geng et al. 2025, Eq. 6 with time
    reversed). A ``step_fraction`` of the batch has d > 0 (t < s uniform), the rest d = 0 (then the target
    is v). Adaptive weight sg(1 / (‖Δ‖² + c)^p) (their Eq. 9)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = x1_BZPR.shape[0]
    x0 = torch.randn(x1_BZPR.shape, generator=generator)
    a, c = torch.rand(b, generator=generator), torch.rand(b, generator=generator)
    t_B, s_B = torch.minimum(a, c), torch.maximum(a, c)
    n_step = round(step_fraction * b)
    s_B = torch.where(torch.arange(b) < n_step, s_B, t_B)
    d_B = s_B - t_B
    tb = t_B[:, None, None, None]
    x_t = (1.0 - tb) * x0 + tb * x1_BZPR
    with torch.no_grad():
        v = teacher.velocity(x_t, t_B, cond).float()

    def u_fn(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no forward-mode AD
            return student(x, t, cond, d)

    u, dudt = torch.func.jvp(u_fn, (x_t, t_B, d_B), (v, torch.ones_like(t_B), -torch.ones_like(d_B)))
    target = (v + d_B[:, None, None, None] * dudt).detach()
    err = (u.float() - target).pow(2).flatten(1).mean(dim=1)
    weight = 1.0 / (err.detach() + adaptive_c) ** adaptive_p
    return weight * err


# -- fine-tuning ------------------------------------------------------------------------------------------
def make_student(teacher_dir: Path) -> Any:
    from caloforge.distill.shortcut import make_shortcut_student
    from caloforge.platform.shower_model import ShowerModel

    return make_shortcut_student(ShowerModel.load(teacher_dir), num_steps=1)


def fine_tune(route: str, plan: Plan, teacher_dir: Path, shards: Path, steps: int) -> tuple[Any, dict]:
    """The student after ``steps`` Adam updates of ``route``'s loss (same data order and seed per route)."""
    from caloforge.datasets.streaming import load_split
    from caloforge.platform.objectives import ShortcutConfig, ShortcutDistillation
    from caloforge.platform.shower_model import ShowerModel

    teacher = ShowerModel.load(teacher_dir).eval().requires_grad_(False)
    student = make_student(teacher_dir).train()
    trainable = [p for n, p in student.named_parameters() if not n.startswith("energy_head.")]
    opt = torch.optim.Adam(trainable, lr=plan.lr)
    train = load_split(shards, "train")
    x_all = student.to_model_space(train.showers_NZPR)
    gen = torch.Generator().manual_seed(plan.seed)
    shortcut = ShortcutDistillation(ShortcutConfig(velocity_target="teacher"))
    from caloforge.platform.objectives import LossContext

    ctx = LossContext(teacher=teacher)
    losses, times = [], []
    for _ in range(steps):
        rows = torch.randint(0, len(x_all), (plan.batch_size,), generator=gen)
        cond = student.encode_conditions(train.conditions.subset(rows.numpy()))
        t0 = time.perf_counter()
        if route == "meanflow":
            loss_B = meanflow_loss(student, teacher, x_all[rows], cond, gen)
        else:
            loss_B = shortcut(student, x_all[rows], cond, gen, ctx)
        loss = loss_B.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    student.eval()
    skip = min(2, len(times) - 1)  # the first steps warm the allocator
    return student, {
        "steps": steps,
        "train_wall_s": sum(times),
        "ms_per_step": 1e3 * sum(times[skip:]) / len(times[skip:]),
        "loss_first": losses[0],
        "loss_last": float(sum(losses[-5:]) / len(losses[-5:])),
    }


def interleaved_step_cost(plan: Plan, teacher_dir: Path, shards: Path, rounds: int = 8) -> dict[str, float]:
    """Median ms per training step of each route, measured in alternation (round i times one step of every
    route), so that load drifting on a shared machine hits both alike."""
    from caloforge.datasets.streaming import load_split
    from caloforge.platform.objectives import LossContext, ShortcutConfig, ShortcutDistillation
    from caloforge.platform.shower_model import ShowerModel

    teacher = ShowerModel.load(teacher_dir).eval().requires_grad_(False)
    train = load_split(shards, "train", max_showers=plan.batch_size)
    students = {route: make_student(teacher_dir).train() for route in ROUTES}
    x1 = students["shortcut"].to_model_space(train.showers_NZPR)
    cond = students["shortcut"].encode_conditions(train.conditions)
    shortcut = ShortcutDistillation(ShortcutConfig(velocity_target="teacher"))
    ctx = LossContext(teacher=teacher)
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    gen = torch.Generator().manual_seed(plan.seed)
    for i in range(rounds + 1):
        for route, student in students.items():
            t0 = time.perf_counter()
            if route == "meanflow":
                loss = meanflow_loss(student, teacher, x1, cond, gen).mean()
            else:
                loss = shortcut(student, x1, cond, gen, ctx).mean()
            loss.backward()
            if i:  # round 0 warms up
                times[route].append(time.perf_counter() - t0)
    return {route: 1e3 * sorted(ts)[len(ts) // 2] for route, ts in times.items()}


def evaluate(model: Any, reference: Any, plan: Plan, sampler: str, num_steps: int) -> dict[str, float]:
    from caloforge.evaluation.api import evaluate_model

    report = evaluate_model(
        model, reference, plan.n_eval, eval_config(plan.n_eval), num_steps=num_steps, sampler=sampler
    )
    keys = ("auc_high", "auc_low", "fpd", "floor/fpd", "response_mean")
    out = {k: float(report.metrics[k]) for k in keys if k in report.metrics}
    out["generation_ms_per_shower"] = float(report.info["generation_ms_per_shower"])
    return out


def run(plan: Plan, work: Path) -> dict[str, Any]:
    from caloforge.datasets.streaming import load_split
    from caloforge.platform.shower_model import ShowerModel

    torch.set_num_threads(plan.threads)
    teacher_dir, shards, teacher_record = train_teacher(plan, work)
    reference = load_split(shards, "test")
    teacher = ShowerModel.load(teacher_dir)
    rows: list[dict[str, Any]] = []
    for n in plan.teacher_euler:
        rows.append(
            {"model": "teacher", "sampler": "euler", "num_steps": n, "nfe": n}
            | evaluate(teacher, reference, plan, "euler", n)
        )
        print(rows[-1], flush=True)
    rows.append(
        {"model": "teacher", "sampler": "midpoint", "num_steps": 16, "nfe": 32}
        | evaluate(teacher, reference, plan, "midpoint", 16)
    )
    print(rows[-1], flush=True)
    training: dict[str, dict] = {}
    runs = [(route, route, plan.steps) for route in ROUTES]
    for name, route, steps in runs:
        student, rec = fine_tune(route, plan, teacher_dir, shards, steps)
        training[name] = rec
        print(name, rec, flush=True)
        for n in plan.student_steps:
            rows.append(
                {"model": name, "sampler": "shortcut", "num_steps": n, "nfe": n}
                | evaluate(student, reference, plan, "shortcut", n)
            )
            print(rows[-1], flush=True)
    if plan.equal_wall:
        wall = training["meanflow"]["ms_per_step"] / training["shortcut"]["ms_per_step"]
        steps = round(plan.steps * wall)
        student, rec = fine_tune("shortcut", plan, teacher_dir, shards, steps)
        training["shortcut@wall"] = rec
        print("shortcut@wall", rec, flush=True)
        for n in plan.student_steps:
            rows.append(
                {"model": "shortcut@wall", "sampler": "shortcut", "num_steps": n, "nfe": n}
                | evaluate(student, reference, plan, "shortcut", n)
            )
    step_ms = interleaved_step_cost(plan, teacher_dir, shards)
    print("interleaved ms/step", step_ms, flush=True)
    return {"teacher": teacher_record, "training": training, "step_ms_interleaved": step_ms, "rows": rows}


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'model':14} {'sampler':9} {'NFE':>4} {'AUC high':>9} {'AUC low':>8} {'FPD':>8} {'floor':>7} "
        f"{'train ms/step':>14} {'train s':>8}"
    ]
    for r in result["rows"]:
        tr = result["training"].get(r["model"], {})
        lines.append(
            f"{r['model']:14} {r['sampler']:9} {r['nfe']:>4} {fmt(r.get('auc_high')):>9} "
            f"{fmt(r.get('auc_low')):>8} {fmt(r.get('fpd'), '.4f'):>8} {fmt(r.get('floor/fpd'), '.4f'):>7} "
            f"{fmt(tr.get('ms_per_step'), '.0f'):>14} {fmt(tr.get('train_wall_s'), '.0f'):>8}"
        )
    return "\n".join(lines)


def step_line(result: dict[str, Any]) -> str:
    ms = result["step_ms_interleaved"]
    return "training ms/step (interleaved, median): " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per route")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    p.add_argument("--work-dir", type=Path, default=None, help="cache of the teacher")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.steps is not None:
        plan = dataclasses.replace(plan, steps=args.steps)
    if args.threads is not None:
        plan = dataclasses.replace(plan, threads=args.threads)
    from caloforge import paths

    work = args.work_dir or paths.home() / "bench" / "one-network-routes"
    t0 = time.perf_counter()
    result = run(plan, work)
    print(table(result))
    print(step_line(result))
    record = {
        "benchmark": "one_network_routes",
        "plan": dataclasses.asdict(plan),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": plan.threads},
        "wall_s": time.perf_counter() - t0,
        **result,
        "table": table(result) + "\n" + step_line(result),
    }
    write_results(record, "one_network_routes" + ("_quick" if args.quick else ""), "cpu", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
