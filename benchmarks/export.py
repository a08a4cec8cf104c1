"""Export benchmark: ms per shower on one CPU thread of eager PyTorch and each ONNX variant, side by side.

Three kinds of model, each a row group of the table:

- **sizes** (``--sizes``, default ``debug`` and ``S``; CaloChallenge dataset-2 mesh 45×16×9, patch 3×2×3 →
  360 tokens): untrained models whose zero-initialised tensors (adaLN-Zero, final layers) are filled with
  small seeded noise so that they produce non-trivial showers for the gate (timing does not depend on
  weights), with the default layer-energy head. The one-step graph (EDM, Euler × 1: one network evaluation,
  the distilled student's form) and, with ``--steps N``, an N-step graph (EDM, Heun × N) is exported once with
  ``caloforge.registry.export.export_onnx(variant="plain")`` (parity-checked against PyTorch); the other
  variants are built from it with the function ``export_onnx`` uses (``caloforge.registry.optimize.
  build_variant``) and judged by the same fidelity gate (``caloforge.registry.fidelity.fidelity_gate``,
  against the plain fp32 graph; ``--gate-showers``, default 256 — smaller than the publishing default of
  800). ``TIME_ONLY_SIZES`` (narrower / shallower ``S``, the ATLAS student's 4 × 144) are timed without the
  gate: what a smaller student would cost, not a model anyone trained.
- **registered students** (``--students build``, the default): a ``debug`` teacher (``configs/train/
  debug.yaml`` at a small budget, its own patch 5×4×3 → 108 tokens) is trained, distilled into a 1-step
  consistency student (``caloforge.distill``, ``configs/distill/cd.yaml``) and a 2-step bespoke solver
  (``configs/distill/bns.yaml``), both registered in a local MLflow registry (sqlite under ``--work-dir``,
  cached there), and every variant is **pulled** with ``RegistryStore.pull(..., "onnx", variant=V)`` — the
  path of ``caloforge registry pull --format onnx`` — so each timed file is a published, gated graph and its
  gate numbers come from its model card. ``--student-models URI... --tracking-uri URI`` pulls students
  already registered elsewhere instead; ``--students none`` skips them.

The *same* computation (noise + conditions → MeV) is timed on one thread (the ``grid`` session profile):
eager PyTorch (``SamplerGraph`` under ``torch.inference_mode``, ``torch.set_num_threads(1)``: what
``ShowerModel.generate`` runs minus the per-seed noise draw) and each ONNX variant (``--variants``, default
``plain optimized int8 int8-attn``; ``--static`` adds ``int8-static``), at batch 1 and 100 (``--quick``: 10).
Timings are best-of-N on a shared machine: after a warm-up call each, the backends of one model are run in
interleaved rounds (every backend once per round, so load drift hits all alike) and the fastest call is
reported (wall and process CPU time; medians too); the 1-minute load average is recorded per model.
Results: a table and ``benchmarks/results/<device>_<date>_export.json``.

    .venv/bin/python benchmarks/export.py --quick --sizes debug --students none     # smoke run (tests)
    nice .venv/bin/python benchmarks/export.py                   # debug, S, the narrow sizes, the students
    .venv/bin/python benchmarks/export.py --sizes S --steps 4 --static --students none
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from common import DETECTORS, MESH, git_commit, synthetic, write_results

from caloforge.datasets.stats import compute_stats
from caloforge.platform.backbone import BACKBONE_FLAVORS, BackboneConfig, backbone_config, forward_flops
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig, derive_seeds
from caloforge.registry.export import calibration_feeds, export_onnx
from caloforge.registry.fidelity import FidelityGateConfig, FidelityReport, fidelity_gate, small_gate
from caloforge.registry.onnx_graph import SamplerGraph, seeded_noise
from caloforge.registry.onnx_runtime import onnx_feeds, ort_session
from caloforge.registry.optimize import VARIANTS, build_variant
from caloforge.registry.parity import random_conditions

REPO = Path(__file__).resolve().parents[1]
CALODIT2_CPU_MS = 101.0  # one-step CaloDiT-2, CPU, 1 thread, batch 1 (background.md §3)
GOAL_S_MS = 25.0  # issue #17: S one-step, 1 thread, batch 1
GOAL_STUDENT_MS = 5.0  # issue #17: a registered student, 1 thread, batch 1
S_CFG = BACKBONE_FLAVORS["S"]
# Timed without the gate: what a smaller student would cost on one thread (untrained weights).
TIME_ONLY_SIZES: dict[str, BackboneConfig] = {
    "S-d3": replace(S_CFG, depth=3),  # half depth
    "S-w256": replace(S_CFG, width=256, heads=4, mlp_width=1024),  # 2/3 width
    "S-d3-w256": replace(S_CFG, depth=3, width=256, heads=4, mlp_width=1024),
    "4x144": replace(S_CFG, depth=4, width=144, heads=4, mlp_width=576),  # the ATLAS CaloDiT-2 student's size
}
SIZES = {**BACKBONE_FLAVORS, **TIME_ONLY_SIZES}
STUDENT_MODELS = {"cd": "export-bench-cd", "bns": "export-bench-bns"}
TIMING = (
    "best of N interleaved rounds after a warm-up call (every backend of a model once per round; the fastest "
    "call is the least disturbed on a shared machine)"
)


# -- models ---------------------------------------------------------------------------------------------
def build(size: str, sampler: str, steps: int, stats: dict, seed: int = 0) -> ShowerModel:
    """An untrained model whose zero-initialised tensors hold small seeded noise (non-trivial showers)."""
    cfg = ShowerModelConfig(backbone=SIZES[size], parametrisation="edm", sampler=sampler, num_steps=steps)
    model = ShowerModel.build(cfg, ConditionVocab.create(DETECTORS), stats, MESH).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point and not bool(p.any()):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def build_students(work: Path, quick: bool) -> dict[str, Any]:
    """Train a ``debug`` teacher, distil a 1-step consistency student and a 2-step bespoke solver and register
    both in a sqlite MLflow registry under ``work`` (cached: ``work/students.json``). Returns
    ``{"tracking_uri", "models": {label: models:/NAME/VERSION}}``."""
    from caloforge.config import from_dict
    from caloforge.distill.config import DistillConfig
    from caloforge.distill.pipeline import DistillRequest, run_distillation
    from caloforge.registry.store import RegistryStore
    from caloforge.training.run import TrainConfig, train

    record = work / "students.json"
    if record.is_file():
        return json.loads(record.read_text())
    if work.exists():  # an interrupted build: start again (the record is written only when finished)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    steps, n_showers = (6, 100) if quick else (200, 400)
    path = REPO / "configs" / "train" / "debug.yaml"
    data = yaml.safe_load(path.read_text())
    data["loop"].update(steps=steps, batch_size=8 if quick else 32, log_every=max(1, steps // 4),
                        checkpoint_every=steps, seed=0)  # fmt: skip
    data["data"]["simulate"].update(n_per_detector=n_showers, shards={"showers_per_shard": 500, "seed": 7})
    data.update(name="export-bench-teacher", eval={"every": 0}, device="cpu", keep_checkpoints=1,
                progress=False, torch_threads=1)  # fmt: skip
    t0 = time.perf_counter()
    teacher = train(from_dict(TrainConfig, data, str(path)), work / "teacher")
    print(f"students: teacher trained ({steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)
    store = RegistryStore(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    models = {}
    for method, label in (("cd", "cd 1-step"), ("bns", "bns 2-step")):
        cpath = REPO / "configs" / "distill" / f"{method}.yaml"
        cfg = yaml.safe_load(cpath.read_text())
        if method == "cd":
            n = 4 if quick else 40
            cfg["loop"].update(steps=n, batch_size=8 if quick else 32, log_every=max(1, n // 4),
                               checkpoint_every=n, seed=0)  # fmt: skip
            cfg["cd"].update(num_steps=1)
        else:
            cfg["bns"].update(steps=[2], num_steps=2, reference_steps=4 if quick else 16,
                              n_train=8 if quick else 32, n_heldout=8, batch_size=8,
                              iterations=3 if quick else 30)  # fmt: skip
        cfg.update(
            name=f"export-bench-{method}",
            eval={"n_showers": 20, "split": "test", "metrics": {"metrics": ["response"], "floor": False,
                  "groups": {"enabled": False}, "plots": {"enabled": False}}},
            register={"enabled": False}, device="cpu", progress=False, torch_threads=1,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = run_distillation(
            from_dict(DistillConfig, cfg, str(cpath)),
            DistillRequest(str(teacher.model_dir), Path(teacher.manifest_dir)),
            work / method,
        )
        version = store.register_bundle(result.model_dir, name=STUDENT_MODELS[method], kind="distilled")
        models[label] = f"models:/{STUDENT_MODELS[method]}/{version.version}"
        print(f"students: {label} distilled in {time.perf_counter() - t0:.0f} s, {models[label]}", flush=True)
    out = {"tracking_uri": store.tracking_uri, "models": models}
    record.write_text(json.dumps(out, indent=2) + "\n")
    return out


# -- timing ---------------------------------------------------------------------------------------------
def time_interleaved(
    fns: dict[str, Callable[[], object]], n_showers: int, rounds: int, budget_s: float
) -> dict[str, dict[str, float]]:
    """Per backend: the fastest (wall and process-CPU) and median ms per shower over at least 3 and at most
    ``rounds`` interleaved rounds (fewer when a round would exceed ``budget_s`` in total), after a warm-up."""
    for fn in fns.values():
        fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    for r in range(rounds):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls[k].append(time.perf_counter() - w0)
            cpus[k].append(time.process_time() - c0)
        elapsed = time.perf_counter() - t_start
        if r >= 2 and elapsed * (r + 2) / (r + 1) > budget_s:
            break
    return {
        k: {
            "ms_per_shower": 1e3 * min(walls[k]) / n_showers,
            "cpu_ms_per_shower": 1e3 * min(cpus[k]) / n_showers,
            "median_ms_per_shower": 1e3 * float(np.median(walls[k])) / n_showers,
            "reps": len(walls[k]),
        }
        for k in fns
    }


def torch_fn(model: ShowerModel, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    graph = SamplerGraph(model).eval()
    args = tuple(torch.from_numpy(feeds[name]) for name in graph.input_names)

    def run() -> None:
        with torch.inference_mode():
            graph(*args)

    return run


def onnx_fn(path: Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    session = ort_session(path, threads=1, profile="grid")
    return lambda: session.run(None, feeds)


def time_model(
    model: ShowerModel,
    files: dict[str, Path],
    feeds_for: Callable[[int], dict[str, np.ndarray]],
    batches: tuple[int, ...],
    rounds: int,
    budget_s: float,
) -> dict[int, dict[str, dict[str, float]]]:
    """{batch: {backend: timing}} for eager torch and each ONNX file, on one thread."""
    torch.set_num_threads(1)
    out = {}
    for batch in batches:
        feeds = feeds_for(batch)
        fns = {"torch": torch_fn(model, feeds)} | {f"onnx-{v}": onnx_fn(p, feeds) for v, p in files.items()}
        load = os.getloadavg()[0]
        res = time_interleaved(fns, batch, rounds if batch == 1 else max(3, rounds // 4), budget_s)
        for r in res.values():
            r["load_1min"] = round((load + os.getloadavg()[0]) / 2, 2)
        out[batch] = res
        print(
            f"    batch {batch:3d} (load {res['torch']['load_1min']:.1f}): "
            + ", ".join(f"{k} {v['ms_per_shower']:.2f}" for k, v in res.items())
            + " ms/shower",
            flush=True,
        )
    return out


def _rounded(row: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}


def _gate_fields(gate: dict[str, Any] | None) -> dict[str, Any]:
    return {f"gate_{k}": v for k, v in gate.items()} if gate else {}


# -- row groups -----------------------------------------------------------------------------------------
def size_rows(
    size: str, args: argparse.Namespace, tmp: Path, stats: dict, gate_cfg: FidelityGateConfig
) -> list:
    rows: list[dict] = []
    graphs = [("1-step", "euler", 1)] + ([(f"{args.steps}-step", "heun", args.steps)] if args.steps else [])
    gflop = forward_flops(SIZES[size], MESH)["total"] / 1e9
    gated = size not in TIME_ONLY_SIZES
    for label, sampler, n in graphs:
        model = build(size, sampler, n, stats)
        torch.set_num_threads(max(args.gate_threads or 1, 1))
        plain = export_onnx(model, tmp / f"{size}-{label}.onnx", exporter=args.exporter, variant="plain")
        files = {"plain": plain.path}
        gates: dict[str, dict[str, Any] | None] = {"plain": None}
        for v in args.variants:
            if v == "plain":
                continue
            path = tmp / f"{size}-{label}-{v}.onnx"
            feeds, info = calibration_feeds(model, None) if v == "int8-static" else (None, None)
            build_variant(plain.path, path, v, feeds, info)
            files[v] = path
            gate: FidelityReport | None = None
            if gated:
                gate = fidelity_gate(
                    path,
                    plain.path,
                    detectors=list(DETECTORS),
                    mesh=model.mesh,
                    threshold_mev=float(model.transform.threshold_mev),
                    ranges=None,
                    config=gate_cfg,
                )
                print(f"  {size} {label} {v}: gate {gate.summary()}", flush=True)
            gates[v] = gate.to_dict() if gate else None
        print(f"  {size} {label} timing", flush=True)

        def feeds_for(batch: int, m: ShowerModel = model) -> dict[str, np.ndarray]:
            _, cond = synthetic(batch, seed=batch)
            return onnx_feeds(DETECTORS, cond, *seeded_noise(derive_seeds(0, batch), MESH, m.has_energy_head))

        timings = time_model(model, files, feeds_for, (1, args.big_batch), args.rounds, args.budget_s)
        base = {"model": size, "kind": "size" if gated else "size (timing only)", "graph": label,
                "nfe": plain.nfe, "layer_nfe": plain.layer_nfe, "gflop_per_nfe": gflop,
                "parity_max_rel_err": plain.parity.max_rel_err}  # fmt: skip
        for batch, res in timings.items():
            for backend, t in res.items():
                v = backend.removeprefix("onnx-")
                mb = files[v].stat().st_size / 2**20 if backend != "torch" else None
                rows.append({**base, "backend": backend, "batch": batch, **t, "mb": mb,
                             **_gate_fields(gates.get(v) if backend != "torch" else None)})  # fmt: skip
        for path in files.values():
            path.unlink()
    return rows


def student_rows(args: argparse.Namespace, tmp: Path, gate_cfg: FidelityGateConfig) -> list[dict]:
    from caloforge.registry.card import CARD_FILE, ModelCard
    from caloforge.registry.store import RegistryStore

    if args.student_models:
        tracking_uri = args.tracking_uri
        models = {uri: uri for uri in args.student_models}
    else:
        built = build_students(args.work_dir, args.quick)
        tracking_uri, models = built["tracking_uri"], built["models"]
    store = RegistryStore(tracking_uri=tracking_uri)
    rows: list[dict] = []
    for label, uri in models.items():
        bundle = store.download_bundle(uri, tmp / f"{label}-bundle".replace(" ", "-"))
        model = ShowerModel.load(bundle).eval()
        files: dict[str, Path] = {}
        cards: dict[str, dict[str, Any]] = {}
        for v in args.variants:
            out = tmp / f"{label}-{v}".replace(" ", "-")
            t0 = time.perf_counter()
            card = ModelCard.load(
                store.pull(uri, out, "onnx", exporter=args.exporter, variant=v, gate=gate_cfg)
            )
            exp = card.exports[-1]
            files[v], cards[v] = out / exp["file"], exp
            gate = exp.get("fidelity_gate")
            print(
                f"  {label} ({uri}) pulled {v} in {time.perf_counter() - t0:.0f} s"
                + (f"; gate: AUC {gate['auc']:.3f}, passed {gate['passed']}" if gate else ""),
                flush=True,
            )
            assert (out / CARD_FILE).is_file()
        detectors = list(model.vocab.detectors)
        ranges = ModelCard.load(
            tmp / f"{label}-{args.variants[0]}".replace(" ", "-") / CARD_FILE
        ).valid_ranges

        def feeds_for(
            batch: int, m: ShowerModel = model, dets: list[str] = detectors, rng: Any = ranges
        ) -> dict[str, np.ndarray]:
            cond = random_conditions(dets, batch, 17, rng)
            noise = seeded_noise(derive_seeds(0, batch), m.mesh_shape, m.has_energy_head)
            return onnx_feeds(dets, cond, *noise)

        timings = time_model(model, files, feeds_for, (1, args.big_batch), args.rounds, args.budget_s)
        flav = backbone_config(model.config.backbone, model.config.patch_size)
        first = cards[args.variants[0]]
        base = {"model": label, "kind": "registered student", "uri": uri, "graph": f"{first['nfe']}-step",
                "nfe": first["nfe"], "layer_nfe": (first.get("layer_energy") or {}).get("nfe", 0),
                "gflop_per_nfe": forward_flops(flav, model.mesh_shape)["total"] / 1e9,
                "sampler": first.get("sampler")}  # fmt: skip
        for batch, res in timings.items():
            for backend, t in res.items():
                v = backend.removeprefix("onnx-")
                exp = cards.get(v) if backend != "torch" else None
                rows.append({**base, "backend": backend, "batch": batch, **t,
                             "mb": exp["size_bytes"] / 2**20 if exp else None,
                             **_gate_fields(exp.get("fidelity_gate") if exp else None)})  # fmt: skip
    return rows


# -- output ---------------------------------------------------------------------------------------------
def print_table(rows: list[dict], big_batch: int) -> None:
    b2 = f"b={big_batch}"
    print(
        f"\n{'model':11} {'graph':7} {'backend':17} {'MB':>6} | {'ms b=1':>8} {'ms ' + b2:>9} | "
        f"{'CPU-ms b=1':>10} {'CPU-ms ' + b2:>13} | {'load':>4} | {'gate AUC':>8} {'(max)':>6} "
        f"{'E scale':>8} {'E reso':>8} {'pass':>4}"
    )
    keyed = {(r["model"], r["graph"], r["backend"], r["batch"]): r for r in rows}
    for (model, graph, backend, batch), r in keyed.items():
        if batch != 1:
            continue
        big = keyed[(model, graph, backend, big_batch)]
        mb = f"{r['mb']:6.2f}" if r["mb"] is not None else f"{'-':>6}"
        gate = (
            f" {r['gate_auc']:8.3f} {r['gate_auc_bound']:6.3f} {r['gate_response_scale']:+8.4f} "
            f"{r['gate_response_resolution']:+8.4f} {'yes' if r['gate_passed'] else 'NO':>4}"
            if "gate_auc" in r
            else f" {'-':>8} {'':>6} {'-':>8} {'-':>8} {'-':>4}"
        )
        print(
            f"{model:11} {graph:7} {backend:17} {mb} | {r['ms_per_shower']:8.2f} "
            f"{big['ms_per_shower']:9.2f} | "
            f"{r['cpu_ms_per_shower']:10.2f} {big['cpu_ms_per_shower']:13.2f} | {r['load_1min']:4.1f} |{gate}"
        )


def goal_lines(rows: list[dict]) -> list[str]:
    def best(pred: Callable[[dict], bool]) -> tuple[float, str] | None:
        cands = [
            (r["cpu_ms_per_shower"], f"{r['model']} {r['backend']}")
            for r in rows
            if r["batch"] == 1 and r["backend"] != "torch" and pred(r) and r.get("gate_passed", True)
        ]
        return min(cands) if cands else None

    lines = []
    s1 = best(lambda r: r["model"] == "S" and r["graph"] == "1-step")
    if s1:
        lines.append(
            f"S 1-step, 1 thread, batch 1 (CPU time; gate passed): best {s1[1]} {s1[0]:.1f} ms — issue #17 "
            f"goal {GOAL_S_MS:.0f} ms: {'met' if s1[0] <= GOAL_S_MS else 'NOT met'} (CaloDiT-2 reports "
            f"{CALODIT2_CPU_MS:.0f} ms)"
        )
    st = best(lambda r: r["kind"] == "registered student")
    if st:
        lines.append(
            f"registered student, 1 thread, batch 1 (CPU time; gate passed): best {st[1]} {st[0]:.2f} ms — "
            f"goal {GOAL_STUDENT_MS:.0f} ms: {'met' if st[0] <= GOAL_STUDENT_MS else 'NOT met'}"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="ONNX Runtime CPU provider only")
    parser.add_argument(
        "--quick", action="store_true", help="batch 10 instead of 100, few rounds, small gate"
    )
    parser.add_argument(
        "--sizes", nargs="*", default=None, choices=sorted(SIZES),
        help=f"untrained sizes (default: debug S {' '.join(TIME_ONLY_SIZES)}; --quick: debug S); "
        f"{', '.join(TIME_ONLY_SIZES)} are timed without the gate",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="also an N-step Heun graph (default: none)")
    parser.add_argument(
        "--variants", nargs="+", default=["plain", "optimized", "int8", "int8-attn"], choices=list(VARIANTS)
    )
    parser.add_argument("--static", action="store_true", help="also the int8-static variant")
    parser.add_argument(
        "--students", choices=["build", "none"], default="build",
        help="build (default): train, distil, register and pull the debug students",
    )  # fmt: skip
    parser.add_argument(
        "--student-models", nargs="+", default=None,
        help="registered students to pull instead (models:/NAME/VERSION or NAME@ALIAS)",
    )  # fmt: skip
    parser.add_argument("--tracking-uri", default=None, help="the registry of --student-models")
    parser.add_argument(
        "--work-dir", type=Path, default=None,
        help="students' cache (default $CALOFORGE_HOME/bench/export-students[_quick])",
    )  # fmt: skip
    parser.add_argument("--gate-showers", type=int, default=256, help="fidelity-gate showers (default 256)")
    parser.add_argument("--gate-threads", type=int, default=None, help="gate threads (default: all cores)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds at batch 1 (default 20; quick 3)"
    )
    parser.add_argument("--exporter", choices=["dynamo", "legacy"], default="legacy")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.gate_showers < 20:
        parser.error("--steps must be >= 1 and --gate-showers >= 20")
    if args.static and "int8-static" not in args.variants:
        args.variants.append("int8-static")
    args.variants = ["plain"] + [v for v in dict.fromkeys(args.variants) if v != "plain"]  # the reference
    if args.sizes is None:
        args.sizes = ["debug", "S"] + ([] if args.quick else list(TIME_ONLY_SIZES))
    if args.work_dir is None:
        from caloforge import paths

        args.work_dir = paths.home() / "bench" / ("export-students" + ("_quick" if args.quick else ""))
    args.big_batch = 10 if args.quick else 100
    args.rounds = args.rounds or (3 if args.quick else 20)
    args.budget_s = 2.0 if args.quick else 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_interop_threads(1)
    showers, cond = synthetic(64, seed=0)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    gate_cfg = (
        small_gate(args.gate_showers, threads=args.gate_threads)
        if args.quick
        else FidelityGateConfig(n_showers=args.gate_showers, threads=args.gate_threads)
    )
    rows: list[dict] = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="caloforge-bench-export-") as tmp:
        for size in args.sizes:
            print(f"{size}:", flush=True)
            rows += size_rows(size, args, Path(tmp), stats, gate_cfg)
        if args.students != "none" or args.student_models:
            print("registered students:", flush=True)
            rows += student_rows(args, Path(tmp), gate_cfg)
    load_end = os.getloadavg()

    print_table(rows, args.big_batch)
    cpu = platform.processor() or platform.machine()
    print(
        f"CPU: {cpu} ({os.cpu_count()} cores), torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, 1 thread; load average {load_start[0]:.1f} at the start, "
        f"{load_end[0]:.1f} at the end; {TIMING}"
    )
    goals = goal_lines(rows)
    for line in goals:
        print(line)
    record = {
        "benchmark": "export",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "quick": args.quick,
        "mesh": list(MESH),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "git_commit": git_commit(),
        "timing": TIMING,
        "reference_calodit2_cpu_ms": CALODIT2_CPU_MS,
        "goal_s_1step_ms": GOAL_S_MS,
        "goal_student_ms": GOAL_STUDENT_MS,
        "goals": goals,
        "threads": 1,
        "variants": args.variants,
        "time_only_sizes": {k: v.__dict__ for k, v in TIME_ONLY_SIZES.items()},
        "gate": {
            "n_showers": gate_cfg.n_showers,
            "auc_max": gate_cfg.auc_max,
            "response_scale_max": gate_cfg.response_scale_max,
            "response_resolution_max": gate_cfg.response_resolution_max,
        },
        "rows": [_rounded(r) for r in rows],
    }
    write_results(record, "export", args.device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
