"""Export benchmark: showers/s of eager PyTorch vs ONNX Runtime on CPU for the exported sampler graph.

For each backbone size (default ``debug`` and ``S``, CaloChallenge dataset-2 mesh 45×16×9, patch 3×2×3 →
360 tokens) and each graph — the one-step student (EDM, Euler × 1: one network evaluation) and an N-step
sampler (EDM, Heun × ``--steps``) — the model is exported with ``caloforge.registry.export.export_onnx``
(parity-checked against PyTorch), then the *same* computation (noise + conditions → MeV) is timed:

- eager PyTorch: ``SamplerGraph`` under ``torch.inference_mode`` (what ``ShowerModel.generate`` runs —
  backbone sampler, layer-energy head, rescale — minus the per-seed noise draw, so both sides do identical
  work);
- ONNX Runtime: CPU execution provider, ``intra_op_num_threads`` = the thread count, graph optimisations on.

Batch 1 runs with one thread (the setting of CaloDiT-2's 101 ms/shower CPU figure for its one-step model);
batch 100 with ``--threads`` (default 1). Rates are given per wall second and per process-CPU second (on a
shared machine the CPU-time rate is the more stable one). ``--quick``: batch 10 instead of 100, 2 steps,
fewer repetitions. Models are untrained (timing does not depend on weights) and have the default
layer-energy head (its ODE steps are in every graph; ``layer_nfe`` in the results). Results: a table and
``benchmarks/results/<device>_<date>_export.json``.

    .venv/bin/python benchmarks/export.py --quick
    .venv/bin/python benchmarks/export.py --sizes S --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import DETECTORS, MESH, git_commit, synthetic, write_results

from caloforge.datasets.stats import compute_stats
from caloforge.platform.backbone import BACKBONE_FLAVORS, forward_flops
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig, derive_seeds
from caloforge.registry.export import export_onnx
from caloforge.registry.onnx_graph import SamplerGraph, seeded_noise
from caloforge.registry.onnx_runtime import onnx_feeds, ort_session

CALODIT2_CPU_MS = 101.0  # one-step CaloDiT-2, CPU, 1 thread, batch 1 (background.md §3)


def build(size: str, sampler: str, steps: int, stats: dict) -> ShowerModel:
    cfg = ShowerModelConfig(backbone=size, parametrisation="edm", sampler=sampler, num_steps=steps)
    return ShowerModel.build(cfg, ConditionVocab.create(DETECTORS), stats, MESH).eval()


def timed(fn: Callable[[], object], min_time_s: float, max_reps: int) -> tuple[float, float, int]:
    """(wall s, process CPU s, reps) of repeated ``fn()`` calls after one warm-up call. A first call longer
    than 5 × ``min_time_s`` is itself the measurement (one-time set-up is negligible against it)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    first_wall, first_cpu = time.perf_counter() - w0, time.process_time() - c0
    if first_wall >= 5 * min_time_s:
        return first_wall, first_cpu, 1
    reps, wall, cpu = 0, 0.0, 0.0
    while reps < max_reps and (reps == 0 or wall < min_time_s):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        reps += 1
    return wall, cpu, reps


def bench_case(
    model: ShowerModel, onnx_path: Path, batch: int, threads: int, min_time_s: float, max_reps: int
) -> dict:
    _, cond = synthetic(batch, seed=batch)
    seeds = derive_seeds(0, batch)
    feeds = onnx_feeds(DETECTORS, cond, *seeded_noise(seeds, MESH, model.has_energy_head))
    graph = SamplerGraph(model).eval()
    args = tuple(torch.from_numpy(feeds[name]) for name in graph.input_names)
    torch.set_num_threads(threads)

    def run_torch() -> None:
        with torch.inference_mode():
            graph(*args)

    session = ort_session(onnx_path, threads=threads)

    def run_ort() -> None:
        session.run(None, feeds)

    t_wall, t_cpu, t_reps = timed(run_torch, min_time_s, max_reps)
    o_wall, o_cpu, o_reps = timed(run_ort, min_time_s, max_reps)
    with torch.inference_mode():
        ref = graph(*args).numpy()
    out = session.run(None, feeds)[0]
    rel = float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-5)))
    n_t, n_o = batch * t_reps, batch * o_reps
    return {
        "batch": batch,
        "threads": threads,
        "torch_per_s": n_t / t_wall,
        "ort_per_s": n_o / o_wall,
        "torch_per_cpu_s": n_t / t_cpu,
        "ort_per_cpu_s": n_o / o_cpu,
        "torch_ms_per_shower": 1e3 * t_wall / n_t,
        "ort_ms_per_shower": 1e3 * o_wall / n_o,
        "ort_speedup": (n_o / o_wall) / (n_t / t_wall),
        "ort_speedup_cpu": (n_o / o_cpu) / (n_t / t_cpu),
        "reps": [t_reps, o_reps],
        "max_rel_err_vs_torch": rel,
    }


def _rounded(row: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="ONNX Runtime CPU provider only")
    parser.add_argument("--quick", action="store_true", help="batch 10 instead of 100, 2 steps, few reps")
    parser.add_argument("--sizes", nargs="+", default=["debug", "S"], choices=sorted(BACKBONE_FLAVORS))
    parser.add_argument("--steps", type=int, default=None, help="Heun steps of the N-step graph (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="threads for the large batch (default 1)")
    parser.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    steps = args.steps if args.steps is not None else (2 if args.quick else 4)
    if steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1")
    big_batch = 10 if args.quick else 100
    min_time_s, max_reps = (0.3, 3) if args.quick else (2.0, 20)
    torch.set_num_interop_threads(1)
    showers, cond = synthetic(64, seed=0)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    graphs = [("1-step", "euler", 1), (f"{steps}-step", "heun", steps)]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="caloforge-bench-export-") as tmp:
        for size in args.sizes:
            gflop = forward_flops(BACKBONE_FLAVORS[size], MESH)["total"] / 1e9
            for label, sampler, n in graphs:
                model = build(size, sampler, n, stats)
                torch.set_num_threads(max(args.threads, 1))
                exp = export_onnx(model, Path(tmp) / f"{size}-{label}.onnx", exporter=args.exporter)
                base = {
                    "size": size,
                    "graph": label,
                    "sampler": sampler,
                    "steps": n,
                    "nfe": exp.nfe,
                    "layer_nfe": exp.layer_nfe,
                    "gflop_per_nfe": gflop,
                    "export_s": exp.export_seconds,
                    "exporter": exp.exporter,
                    "opset": exp.opset,
                    "onnx_mb": exp.path.stat().st_size / 2**20,
                    "parity_max_rel_err": exp.parity.max_rel_err,
                }
                for batch, threads in ((1, 1), (big_batch, args.threads)):
                    r = {**base, **bench_case(model, exp.path, batch, threads, min_time_s, max_reps)}
                    rows.append(r)
                    rates = f"torch {r['torch_per_s']:8.2f}/s  ORT {r['ort_per_s']:8.2f}/s"
                    print(f"{size:5} {label:7} batch {batch:3d} × {threads} thr: {rates}", flush=True)
                exp.path.unlink()

    print()
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, quick={args.quick}")
    print(f"{'size':5} {'graph':7} {'NFE':>3} {'batch':>5} {'thr':>3} | {'torch /s':>9} {'ORT /s':>9} "
          f"{'ORT/torch':>9} | {'torch ms':>9} {'ORT ms':>9} | {'ORT/torch (CPU-s)':>17}")  # fmt: skip
    for r in rows:
        print(
            f"{r['size']:5} {r['graph']:7} {r['nfe']:>3} {r['batch']:>5} {r['threads']:>3} | "
            f"{r['torch_per_s']:>9.2f} {r['ort_per_s']:>9.2f} {r['ort_speedup']:>8.2f}× | "
            f"{r['torch_ms_per_shower']:>9.2f} {r['ort_ms_per_shower']:>9.2f} | "
            f"{r['ort_speedup_cpu']:>16.2f}×"
        )
    one = [r for r in rows if r["size"] == "S" and r["nfe"] == 1 and r["batch"] == 1]
    if one:
        print(
            f"reference: CaloDiT-2 one-step, CPU 1 thread, batch 1: {CALODIT2_CPU_MS:.0f} ms/shower; "
            f"here S 1-step: torch {one[0]['torch_ms_per_shower']:.1f} ms, "
            f"ORT {one[0]['ort_ms_per_shower']:.1f} ms"
        )

    record = {
        "benchmark": "export",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": platform.processor() or platform.machine(),
        "quick": args.quick,
        "mesh": list(MESH),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "git_commit": git_commit(),
        "reference_calodit2_cpu_ms": CALODIT2_CPU_MS,
        "rows": [_rounded(r) for r in rows],
    }
    write_results(record, "export", args.device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
