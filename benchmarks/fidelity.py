"""Fidelity benchmark: train a config for a fixed budget, evaluate on a fixed held-out set (issue #16).

One command: the training config (``--config``, default ``configs/train/fidelity-cpu.yaml``) is trained
on the CaloChallenge dataset-2 setting — ``par04-siw`` electrons, 1 GeV–1 TeV log-uniform, normal incidence
(the DS2 mesh 45 × 16 × 9; showers from the built-in simulator, not Geant4) — for ``--steps`` optimizer steps
(default: the config's), then compared with ``caloforge.evaluation`` against ``--n-eval`` held-out showers
simulated with another seed (default 10,000). Along the run, ``--points`` evaluations of the EMA weights (a
cheaper config on ``--curve-n`` showers: both classifiers, FPD/KPD, separation powers, per-layer deviations)
give the quality-vs-compute curve: training loss and AUC against training FLOPs (3 × the analytic forward
FLOPs of ``forward_flops`` × showers seen; elementwise ops not counted).

Writes, under ``--out-dir`` (default ``benchmarks/results/fidelity_<device>_<date>/``): the training run
(``run/``, replaced on every invocation), the final evaluation report (``report/``: report.md table,
report.json, plots), the sample and the matching reference in CaloChallenge format (``sample_cc.h5``,
``reference_cc.h5``: rerun the official ``evaluate.py -d 2`` on them), ``curve.png``, ``layers.png`` (mean
hits and radial width per layer against the data), ``fidelity.json`` (with the per-layer table and the
issue's goals, met or not); and ``benchmarks/results/<device>_<date>_fidelity.json``. Prints a table.

Data (``--data``): ``ds2`` (default) as above; ``mix`` the six pretraining detectors × e-, γ, π+ (1–500 GeV,
θ 80–100°), ``--n-train`` and ``--n-eval`` split evenly over the detectors, per-detector/particle groups in
the report, no CaloChallenge files (the official code reads one detector). The issue's goals are judged on
``ds2`` only.

Budgets (issue #16): the CPU budget is the ``debug`` model on 2 cores for 20 minutes of training
(``configs/train/fidelity-cpu.yaml``: its step count fits 20 minutes on 2 idle cores; on another machine
choose ``--steps`` from the step rate the curve rows report, ``train_s`` / step). The GPU budget is the
``S`` model, 8 minutes in bf16 (``--config`` of an S-sized run, ``--device cuda``).

    .venv/bin/python benchmarks/fidelity.py --quick                       # smoke run, < 1 minute
    .venv/bin/python benchmarks/fidelity.py --points 6                    # the CPU budget (see docs)

``--model BUNDLE`` evaluates an existing bundle (a previous run's ``run/model``) on the same held-out set
instead of training (no curve); ``--empty-layers`` sets which stage may empty a layer when the final
evaluation generates (``layer_energy.empty_layers``; default: the bundle's own).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from caloforge.cli import apply_default_env
from caloforge.config import load_config, to_dict
from caloforge.evaluation.group_classifier import most_telling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, git_commit, write_results  # noqa: E402

REFERENCE_SEED = 1_000_003  # the held-out set: never the training simulation's seed (+ detector index)


@dataclasses.dataclass(frozen=True)
class DataSetting:
    """What the model is trained on and compared with: detectors × particles and the kinematic ranges."""

    name: str
    detectors: tuple[str, ...]
    particles: tuple[str, ...]
    energy_gev: tuple[float, float]
    theta_deg: tuple[float, float]
    phi_deg: tuple[float, float]

    def describe(self) -> str:
        lo, hi = self.energy_gev
        return f"{','.join(self.detectors)} {','.join(self.particles)} {lo:g}-{hi:g} GeV"


DATA_SETTINGS = {
    # CaloChallenge dataset 2: par04-siw electrons, 1 GeV-1 TeV log-uniform, normal incidence
    "ds2": DataSetting("ds2", ("par04-siw",), ("e-",), (1.0, 1000.0), (90.0, 90.0), (0.0, 0.0)),
    # the pretraining mix (configs/pretrain/s_6det.yaml's detectors) with EM and hadronic showers
    "mix": DataSetting(
        "mix",
        ("fe-sci", "odd-like", "par04-scipb", "par04-siw", "pbwo4", "wsi-granular"),
        ("e-", "gamma", "pi+"),
        (1.0, 500.0),  # the range every one of the six simulates (fe-sci stops at 500 GeV)
        (80.0, 100.0),
        (-180.0, 180.0),
    ),
}
CURVE_KEYS = (
    "auc_low",
    "auc_high",
    "fpd",
    "kpd",
    "sep_power/mean",
    "sep_power/width_r",
    "sep_power/e_layer",
    "response/layer_hits_max_dev",
    "response/layer_width_r_max_dev",
)
TABLE_KEYS = (
    "auc_low",
    "auc_high",
    "fpd",
    "kpd",
    "sep_power/etot_einc",
    "sep_power/e_layer",
    "sep_power/width_r",
    "sep_power/width_x",
    "sep_power/sparsity",
    "sep_power/mean",
    "response/radial_width",
    "response/scale",
    "response/layer_hits_max_dev",
    "response/layer_width_r_max_dev",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from caloforge.platform.energy import EMPTY_LAYER_MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", type=Path, default=ROOT / "configs/train/fidelity-cpu.yaml", help="training config"
    )
    p.add_argument("--set", action="append", default=[], dest="overrides", help="training config override")
    p.add_argument(
        "--data",
        choices=sorted(DATA_SETTINGS),
        default="ds2",
        help="ds2: par04-siw electrons (CaloChallenge dataset 2; the goals); mix: 6 detectors × 3 particles",
    )
    p.add_argument("--eval-config", type=Path, default=ROOT / "configs/eval/default.yaml")
    p.add_argument("--curve-config", type=Path, default=ROOT / "configs/eval/ci.yaml")
    p.add_argument(
        "--steps", type=int, default=None, help="training budget in optimizer steps (the config's)"
    )
    p.add_argument("--n-train", type=int, default=20_000, help="simulated training showers (all detectors)")
    p.add_argument(
        "--n-eval", type=int, default=10_000, help="held-out showers of the final evaluation (all)"
    )
    p.add_argument("--curve-n", type=int, default=2000, help="showers per evaluation along the run")
    p.add_argument("--points", type=int, default=6, help="evaluations along the run (the curve)")
    p.add_argument("--device", default="cpu", help="training and generation device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--quick", action="store_true", help="a tiny budget: proves the benchmark runs end to end")
    p.add_argument(
        "--model", type=Path, default=None, help="evaluate this bundle instead of training one (no curve)"
    )
    p.add_argument(
        "--empty-layers",
        choices=EMPTY_LAYER_MODES,
        help="layer_energy.empty_layers of the final evaluation's generation (default: the model's own)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_train, args.n_eval, args.curve_n, args.points = 6, 160, 200, 100, 2
        args.eval_config = ROOT / "configs/eval/ci.yaml"
        args.overrides = [*args.overrides, "model.num_steps=4"]  # a cheap sampler for the smoke run
    if args.steps is None:
        from caloforge.training.run import load_train_config

        args.steps = load_train_config(args.config, args.overrides).loop.steps
    if args.steps < 1 or args.points < 1 or min(args.n_train, args.n_eval, args.curve_n) < 10:
        raise ValueError("--steps, --points must be >= 1 and --n-train, --n-eval, --curve-n >= 10")
    return args


def train_config(args: argparse.Namespace, run_name: str):
    """The given config on the ``--data`` setting, ``--steps`` long, checkpointing at the curve points."""
    from caloforge.training.run import SimulateConfig, load_train_config

    setting = DATA_SETTINGS[args.data]
    cfg = load_train_config(args.config, args.overrides)
    sim = cfg.data.simulate
    shards = (
        sim.shards
        if sim is not None
        else SimulateConfig(detectors=setting.detectors, particles=setting.particles).shards
    )
    n_per_detector = max(1, args.n_train // len(setting.detectors))
    simulate = SimulateConfig(
        detectors=setting.detectors,
        particles=setting.particles,
        n_per_detector=n_per_detector,
        energy_gev=setting.energy_gev,
        log_uniform=True,
        theta_deg=setting.theta_deg,
        phi_deg=setting.phi_deg,
        seed=sim.seed if sim is not None else 0,
        shards=dataclasses.replace(shards, showers_per_shard=min(shards.showers_per_shard, n_per_detector)),
    )
    every = max(1, args.steps // args.points)
    loop = dataclasses.replace(
        cfg.loop, steps=args.steps, checkpoint_every=every, log_every=min(cfg.loop.log_every, every)
    )
    data = dataclasses.replace(cfg.data, simulate=simulate, shards=None)
    return dataclasses.replace(
        cfg,
        name=run_name,
        data=data,
        loop=loop,
        device=args.device,
        progress=False,
        torch_threads=args.threads,
        eval=dataclasses.replace(cfg.eval, every=every),
    )


def flops_per_shower(model) -> float:
    """Training FLOPs per shower: 3 × the analytic forward FLOPs (forward + backward)."""
    from caloforge.platform.backbone import forward_flops

    return 3.0 * forward_flops(model.config.backbone_config(), model.mesh_shape)["total"]


def main(argv: list[str] | None = None) -> int:
    apply_default_env()
    args = parse_args(argv)
    from caloforge.datasets.formats import calochallenge
    from caloforge.datasets.schema import ShowerSet
    from caloforge.datasets.simulator import simulate_dataset
    from caloforge.evaluation import EvalConfig, evaluate
    from caloforge.evaluation.api import generate_sample, load_model
    from caloforge.platform.geometry import load_detector
    from caloforge.training.hooks import PeriodicEval, read_metrics
    from caloforge.training.run import train

    if args.threads:
        torch.set_num_threads(args.threads)
    device_label = "gpu" if args.device.startswith("cuda") else "cpu-vm"
    stamp = dt.date.today().isoformat()
    tag = ("_mix" if args.data == "mix" else "") + ("_quick" if args.quick else "")
    out = args.out_dir or RESULTS / f"fidelity_{device_label}_{stamp}{tag}"
    out.mkdir(parents=True, exist_ok=True)
    eval_cfg = load_config(EvalConfig, args.eval_config)
    if args.quick:  # the smoke run: no groups, no plots, one classifier seed
        eval_cfg = dataclasses.replace(
            eval_cfg,
            groups=dataclasses.replace(eval_cfg.groups, enabled=False),
            plots=dataclasses.replace(eval_cfg.plots, enabled=False),
            classifier=dataclasses.replace(eval_cfg.classifier, n_seeds=1),
        )
    curve_base = load_config(EvalConfig, args.curve_config)
    curve_cfg = dataclasses.replace(
        curve_base,
        metrics=("sep_power", "response", "fpd", "kpd", "cls_low", "cls_high"),
        floor=False,
        groups=dataclasses.replace(curve_base.groups, enabled=False),
        plots=dataclasses.replace(curve_base.plots, enabled=False),
        classifier=dataclasses.replace(curve_base.classifier, n_seeds=1),
    )
    if args.device.startswith("cuda"):  # the classifiers train where the model does (minutes → seconds)
        eval_cfg, curve_cfg = (
            dataclasses.replace(c, classifier=dataclasses.replace(c.classifier, device=args.device))
            for c in (eval_cfg, curve_cfg)
        )

    setting = DATA_SETTINGS[args.data]
    t0 = time.perf_counter()
    n_det = len(setting.detectors)
    parts = [
        simulate_dataset(
            load_detector(det),
            list(setting.particles),
            max(1, args.n_eval // n_det),
            setting.energy_gev,
            True,
            setting.theta_deg,
            setting.phi_deg,
            REFERENCE_SEED + i,
        )
        for i, det in enumerate(setting.detectors)
    ]
    reference = ShowerSet.concat(parts)
    simulate_s = time.perf_counter() - t0
    per_det = max(1, args.curve_n // n_det)  # the curve's reference: the first showers of every detector
    curve_ref = ShowerSet.concat([p.subset(np.arange(min(per_det, len(p)))) for p in parts])

    cfg = None
    steps: int | None = None
    batch: int | None = None
    curve: list[dict] = []
    losses: list[dict] = []
    train_s = 0.0
    eval_time = [0.0]
    bundle = args.model
    if bundle is None:
        cfg = train_config(args, "fidelity")
        batch = cfg.loop.batch_size
        t_train = time.perf_counter()

        def along_the_run(model) -> dict[str, float]:
            t = time.perf_counter()
            # training wall time so far (incl. data preparation)
            row = {"train_s": t - t_train - eval_time[0]}
            sample, ref_sub = generate_sample(model, curve_ref, None, curve_cfg.seed, device=args.device)
            rep = evaluate(sample, ref_sub, curve_cfg)
            row.update({k: rep.metrics[k] for k in CURVE_KEYS if k in rep.metrics})
            curve.append(row)
            eval_time[0] += time.perf_counter() - t
            return {}

        if (out / "run").exists():  # a fresh measurement: the curve needs the whole run
            shutil.rmtree(out / "run")
        hook = PeriodicEval(cfg.loop.checkpoint_every, along_the_run, prefix="fidelity")
        result = train(cfg, out / "run", extra_evals=[hook])
        for row, (step, _) in zip(curve, hook.history, strict=True):
            row["step"] = step
        train_s = time.perf_counter() - t_train - eval_time[0]
        steps, bundle = result.steps, result.model_dir
    model = load_model(bundle, args.device, args.empty_layers)
    fps = flops_per_shower(model)
    if steps is not None and batch is not None:  # a trained run: its curve and losses against FLOPs
        for row in curve:
            row["train_flops"] = row["step"] * batch * fps
        losses = [
            {"step": r["step"], "loss": r["loss"], "train_flops": r["step"] * batch * fps}
            for r in read_metrics(out / "run" / "metrics.jsonl")
            if "loss" in r and "step" in r
        ]

    t_eval = time.perf_counter()
    sample, ref_matched = generate_sample(model, reference, None, eval_cfg.seed, device=args.device)
    report = evaluate(sample, ref_matched, dataclasses.replace(eval_cfg, conditions="match"))
    report.write(out / "report")
    if args.data == "ds2":  # the official evaluation reads one detector's file: dataset 2's
        calochallenge.write(out / "sample_cc.h5", sample, showers_dtype="float64")
        calochallenge.write(out / "reference_cc.h5", ref_matched, showers_dtype="float64")
    eval_s = time.perf_counter() - t_eval
    if curve or losses:  # a trained run (not --model)
        _plot_curve(curve, losses, out / "curve.png")
    layers = layer_table(report.info["layer_profiles"])
    _plot_layers(layers, out / "layers.png")

    m = report.metrics
    record = {
        "benchmark": "fidelity",
        "date": stamp,
        "git_commit": git_commit(),
        "host": platform.node(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "train_config": to_dict(cfg) if cfg is not None else None,
        "model": str(args.model) if args.model is not None else None,  # --model: evaluated, not trained
        "empty_layers": model.config.layer_energy.empty_layers if model.has_energy_head else None,
        "eval_config": str(args.eval_config),
        "data": dataclasses.asdict(setting),
        "steps": steps,
        "batch_size": batch,
        "train_flops_per_shower": fps,
        "train_flops": steps * batch * fps if steps is not None and batch is not None else None,
        "simulate_reference_s": simulate_s,
        "train_s": train_s,
        "curve_eval_s": eval_time[0],
        "final_eval_s": eval_s,
        "n_eval": len(ref_matched),
        "metrics": {
            k: m[k] for k in sorted(m) if not k.startswith("group/") and not k.startswith("floor/group/")
        },
        "goals": goals(m, args.device) if args.data == "ds2" else [],  # the issue's goals are dataset 2's
        "layers": layers,
        "curve": curve,
        "loss_curve": losses,
        "out_dir": str(out),
    }
    trained = (
        f"{steps} steps × {batch}, {record['train_flops']:.3g} training FLOPs, {train_s:.0f} s training"
        if args.model is None
        else f"the bundle {args.model}"
    )
    print(f"\nfidelity: {setting.describe()}, {trained}, {len(ref_matched)} held-out showers")
    print(f"{'metric':28} {'model':>12} {'floor':>12}")
    for k in TABLE_KEYS:
        if k in m:
            print(f"{k:28} {m[k]:>12.4g} {m.get('floor/' + k, float('nan')):>12.4g}")
    telling = most_telling(m)
    if telling:  # the evaluation config ran the classifier per HLF group: which features give it away
        print("classifier per HLF group (AUC, most telling first): "
              + ", ".join(f"{g} {auc:.3f}" for g, auc in telling))  # fmt: skip
    print(f"\nper layer (> {100 * LAYER_MIN_FRAC:.0f} % of the energy): sample / data")
    print(f"{'layer':>6} {'E frac':>8} {'hits data':>10} {'hits':>7} {'width data':>11} {'width':>7}")
    for r in layers["rows"]:
        print(f"{r['layer']:>6} {r['energy_frac']:>8.3f} {r['hits_ref']:>10.1f} {r['hits_ratio']:>7.3f} "
              f"{r['width_r_ref_mm']:>11.2f} {r['width_r_ratio']:>7.3f}")  # fmt: skip
    print("\ngoals (issue #16):" if record["goals"] else "\ngoals (issue #16): judged on --data ds2")
    for g in record["goals"]:
        print(f"  {'met' if g['met'] else 'NOT met':8} {g['goal']}: {g['value']:.4g}")
    print(f"\n{'step':>6} {'train FLOPs':>12} {'train s':>8} " + " ".join(f"{k:>14}" for k in CURVE_KEYS))
    for r in curve:
        print(f"{r['step']:>6} {r['train_flops']:>12.3g} {r['train_s']:>8.0f} "
              + " ".join(f"{r.get(k, float('nan')):>14.4g}" for k in CURVE_KEYS))  # fmt: skip
    (out / "fidelity.json").write_text(json.dumps(record, indent=2) + "\n")
    write_results(record, "fidelity" + tag, device_label, args.results)
    return 0


LAYER_MIN_FRAC = 0.01  # the per-layer goals count layers with more than 1 % of the energy


def layer_table(profiles: dict) -> dict:
    """Per-layer sample/data ratios of the mean hits and radial width (``report.info["layer_profiles"]``)
    for the layers holding more than ``LAYER_MIN_FRAC`` of the data's energy."""
    ref, gen = profiles["reference"], profiles["sample"]
    rows = []
    for z, frac in enumerate(ref["energy_frac"]):
        if frac <= LAYER_MIN_FRAC:
            continue
        rows.append(
            {
                "layer": z,
                "energy_frac": frac,
                "hits_ref": ref["hits"][z],
                "hits_ratio": gen["hits"][z] / ref["hits"][z] if ref["hits"][z] > 0 else float("nan"),
                "width_r_ref_mm": ref["width_r"][z],
                "width_r_ratio": gen["width_r"][z] / ref["width_r"][z]
                if ref["width_r"][z] > 0
                else float("nan"),
            }
        )
    return {"min_energy_frac": LAYER_MIN_FRAC, "rows": rows, "reference": ref, "sample": gen}


def goals(m: dict[str, float], device: str) -> list[dict]:
    """Issue #16's goals for the budget this run measured (CPU: debug; GPU: S)."""
    if device.startswith("cuda"):
        bounds = [("auc_low <= 0.65", m["auc_low"], m["auc_low"] <= 0.65)]
        bounds.append(("auc_high <= 0.62", m["auc_high"], m["auc_high"] <= 0.62))
        return [{"goal": g, "value": v, "met": bool(ok)} for g, v, ok in bounds]
    hits, width = m["response/layer_hits_max_dev"], m["response/layer_width_r_max_dev"]
    return [
        {"goal": "hits per layer within 10 % (max |dev|)", "value": hits, "met": bool(hits <= 0.10)},
        {
            "goal": "mean radial width per layer within 10 % (max |dev|)",
            "value": width,
            "met": bool(width <= 0.10),
        },
        {"goal": "auc_high <= 0.80", "value": m["auc_high"], "met": bool(m["auc_high"] <= 0.80)},
    ]


def _plot_layers(layers: dict, path: Path) -> None:
    """Mean hits and radial width per layer, data and sample, with the ratio panels and the ±10 % band."""
    from matplotlib.figure import Figure

    ref, gen = layers["reference"], layers["sample"]
    z = np.arange(len(ref["hits"]))
    fig = Figure(figsize=(10.0, 5.5))
    axes = fig.subplots(2, 2, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for col, (key, label) in enumerate(
        (("hits", "mean hits per layer"), ("width_r", "mean radial width [mm]"))
    ):
        top, bottom = axes[0, col], axes[1, col]
        top.step(z, ref[key], where="mid", color="black", label="data")
        top.step(z, gen[key], where="mid", color="tab:red", label="sample")
        top.set_ylabel(label)
        top.legend(fontsize=8)
        keep = np.asarray(ref["energy_frac"]) > layers["min_energy_frac"]
        ratio = np.where(
            keep & (np.asarray(ref[key]) > 0), np.asarray(gen[key]) / np.maximum(ref[key], 1e-12), np.nan
        )
        bottom.axhspan(0.9, 1.1, color="grey", alpha=0.2)
        bottom.plot(z, ratio, marker=".", color="tab:red")
        bottom.axhline(1.0, color="black", lw=0.8)
        bottom.set_ylabel("sample / data")
        bottom.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_curve(curve: list[dict], losses: list[dict], path: Path) -> None:
    """Training loss and AUCs against training FLOPs (log x; the AUC panel ticked at its evaluations)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = Figure(figsize=(9.0, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    if losses:
        ax1.plot([r["train_flops"] for r in losses], [r["loss"] for r in losses], lw=1)
    ax1.set_xlabel("training FLOPs")
    ax1.set_ylabel("training loss")
    for key in ("auc_low", "auc_high"):
        pts = [(r["train_flops"], r[key]) for r in curve if key in r]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set_xlabel("training FLOPs")
    ax2.set_ylabel("classifier AUC")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        if any(r.get("train_flops", 0) > 0 for r in losses + curve):
            ax.set_xscale("log")
    points = sorted({r["train_flops"] for r in curve if r.get("train_flops", 0) > 0})
    if points:  # the evaluations often lie within one decade, where log-axis minor labels overlap
        ax2.xaxis.set_major_locator(FixedLocator(points))
        ax2.xaxis.set_major_formatter("{x:.1e}")
        ax2.xaxis.set_minor_locator(NullLocator())
        ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
