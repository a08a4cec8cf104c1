"""Evaluation benchmark: time to evaluate N vs N showers on the 6480-voxel mesh (45 × 16 × 9), per metric.

Two samples of 10k showers (``--n``) of one simulator configuration (par04-siw, e-, 10–100 GeV log-uniform,
normal incidence; the built-in simulator) are compared with ``caloforge.evaluation.evaluate`` and the time of
each step is reported: HLF features (both sets), separation power (all HLF histograms), FPD (1/N
extrapolation), KPD, PRDC, and the low- and high-level classifiers. The comparison runs once, without the
data-vs-data floor and the conditional groups (each would repeat the same steps on subsets), so every row
is one metric's cost. Wall seconds and process-CPU seconds (all threads) are both given: on a shared
machine the CPU time is the more stable number.

Config: ``EvalConfig()`` defaults (the CaloChallenge classifier recipe: 512 × 2 hidden, lr 2·10⁻⁴, batch
1000, ≤ 50 epochs with early stopping) except ``classifier.n_seeds`` (``--cls-seeds``, default 1: the row
is per seed; the default evaluation runs 3). ``--config`` replaces the base config. ``--quick``: 2k vs 2k
showers with ``configs/eval/ci.yaml`` (a smoke run of the benchmark itself). ``--device cuda`` trains the
classifiers on the GPU.

Prints a table and writes ``benchmarks/results/<device>_<YYYY-MM-DD>_evaluation.json``.

    .venv/bin/python benchmarks/evaluation.py --quick
    .venv/bin/python benchmarks/evaluation.py --n 10000 --device cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from caloforge.config import load_config, to_dict
from caloforge.datasets.simulator import SIMULATOR_VERSION, simulate_dataset
from caloforge.environment import apply_default_env
from caloforge.evaluation import EvalConfig, evaluate
from caloforge.evaluation.group_classifier import most_telling
from caloforge.platform.geometry import load_detector

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
STEPS = ("features", "sep_power", "fpd", "kpd", "prdc", "cls_low", "cls_high", "cls_groups")
DETECTOR = "par04-siw"


def device_name(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^A-Za-z0-9-]", "-", torch.cuda.get_device_name(0))[:32]
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:24] or "host"
    return f"cpu-{host}"


def build_config(args: argparse.Namespace) -> EvalConfig:
    if args.config is not None:
        base = load_config(EvalConfig, args.config)
    elif args.quick:
        base = load_config(EvalConfig, ROOT / "configs" / "eval" / "ci.yaml")
    else:
        base = EvalConfig()
    classifier = replace(base.classifier, device=args.device)
    if args.cls_seeds is not None:
        classifier = replace(classifier, n_seeds=args.cls_seeds)
    elif args.config is None and not args.quick:
        classifier = replace(classifier, n_seeds=1)
    return replace(
        base,
        metrics=("sep_power", "response", *STEPS[2:]),
        floor=False,
        groups=replace(base.groups, enabled=False),
        plots=replace(base.plots, enabled=False),
        classifier=classifier,
    )


def main(argv: list[str] | None = None) -> int:
    apply_default_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="showers per set (default 10000)")
    parser.add_argument("--quick", action="store_true", help="2k vs 2k showers, configs/eval/ci.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="classifier device")
    parser.add_argument("--config", type=Path, help="base EvalConfig YAML (default: EvalConfig())")
    parser.add_argument("--cls-seeds", type=int, help="classifier repetitions (default 1 = time per seed)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    n = 2000 if args.quick else args.n
    if n < 100:
        parser.error("--n must be >= 100")
    config = build_config(args)

    det = load_detector(DETECTOR)
    t0 = time.perf_counter()
    ref = simulate_dataset(det, ["e-"], n, (10.0, 100.0), True, (90.0, 90.0), (0.0, 0.0), seed=1)
    gen = simulate_dataset(det, ["e-"], n, (10.0, 100.0), True, (90.0, 90.0), (0.0, 0.0), seed=2)
    sim_s = time.perf_counter() - t0
    print(f"simulated 2 × {n} showers ({DETECTOR}, mesh {ref.mesh_shape}) in {sim_s:.1f} s", file=sys.stderr)

    report = evaluate(gen, ref, config)
    wall, cpu = report.info["timings_s"], report.info["cpu_timings_s"]
    history = report.plot_data.classifier_history if report.plot_data else {}
    m = report.metrics
    rows = []
    for step in (*STEPS, "total"):
        if step not in wall:
            continue
        note = ""
        if step == "cls_groups":
            telling = most_telling(m)
            note = f"{len(telling)} classifiers, most telling: " + ", ".join(
                f"{g} {auc:.3f}" for g, auc in telling[:3]
            )
        elif step.startswith("cls_"):
            kind = step.removeprefix("cls_")
            runs = history.get(kind, [])
            epochs = [len(h) for h in runs]
            n_train = int(m[f"cls_{kind}/n_train_per_class"])
            note = (
                f"{len(runs)} seed(s), {n_train}/class train, epochs run {epochs}, AUC {m[f'auc_{kind}']:.3f}"
            )
        elif step == "features":
            note = f"{2 * n / wall[step]:.0f} showers/s, HLF dim {report.info['hlf_dim']}"
        elif step == "fpd":
            note = f"FPD×10³ {m['fpd']:.1f} ± {m['fpd_err']:.1f}"
        elif step == "kpd":
            note = f"KPD×10³ {m['kpd']:.2f} ± {m['kpd_err']:.2f}"
        elif step == "prdc":
            note = " ".join(
                f"{k[0].upper()} {m[f'prdc/{k}']:.3f}" for k in ("precision", "recall", "density", "coverage")
            )
        rows.append({"step": step, "wall_s": wall[step], "cpu_s": cpu.get(step), "note": note})

    dev = device_name(args.device)
    threads = torch.get_num_threads()
    print(f"\nevaluate {n} vs {n} showers, mesh {ref.mesh_shape}, {dev}, torch threads {threads}")
    print(f"{'step':<10} {'wall s':>9} {'CPU s':>9}  note")
    for r in rows:
        print(f"{r['step']:<10} {r['wall_s']:>9.2f} {r['cpu_s']:>9.2f}  {r['note']}")

    today = dt.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{dev}_{today}_evaluation.json"
    payload = {
        "benchmark": "evaluation",
        "date": today,
        "device": dev,
        "quick": args.quick,
        "n_per_set": n,
        "mesh_shape": list(ref.mesh_shape),
        "detector": DETECTOR,
        "simulator_version": SIMULATOR_VERSION,
        "simulation_s": round(sim_s, 3),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "config": to_dict(config),
        "results": rows,
        "metrics": {k: v for k, v in m.items() if np.isfinite(v)},
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
