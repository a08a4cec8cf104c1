"""Benchmark: pretraining throughput, data-parallel scaling, and (on a GPU) model FLOPs utilisation.

Engine (both devices, ``--skip-engine`` to leave out): a model (``S`` on CUDA, ``debug`` on CPU) through
``DeepSpeedBackend`` + the training loop on in-memory batches in one process (data loading excluded):
samples/s, and the model FLOPs utilisation MFU = samples/s × training FLOPs per sample / measured matmul
peak, with training FLOPs = 3 × the backbone's analytic forward FLOPs
(``caloforge.platform.backbone.forward_flops``: matmuls of the linear layers and attention). On CUDA in
bf16 against a bf16 8192³ matmul; on CPU in fp32 on one thread against a one-thread fp32 matmul.

``--device cpu`` (default): the same short pretraining run — ``debug`` model, DeepSpeed ZeRO-2, a simulated
shard set, a fixed per-worker micro-batch (weak scaling: global batch = micro-batch × workers) — with 1 and
with 2 Ray workers of one CPU each on the embedded local Ray (``caloforge.pretrain.launch.run_pretrain``,
the real stack: Ray Train, DeepSpeed over gloo, ShowerStream, hooks). Throughput is the loop's samples/s
from ``metrics.jsonl`` over the log windows after the first (warm-up excluded). Goal: 2 workers ≥ 1.7× one.

``--device cuda``: on one GPU, the engine row (``S``, bf16, batch 256, peak memory) and the full stack: a
short ``run_pretrain`` of ``S`` with one GPU worker (Ray Train + DeepSpeed + NCCL + streaming shards + bf16).
``--compile`` sets ``loop.compile`` (``torch.compile`` of the model on CUDA) in both; on CUDA the backends
use fused AdamW. ``benchmarks/mfu_sweep.py`` measures the variants (compile modes, batch, backends,
bf16 weights) in one process and profiles where the GPU time goes.

    .venv/bin/python benchmarks/pretrain_scaling.py [--quick] [--steps N] [--engine deepspeed|ddp]
    .venv/bin/python benchmarks/pretrain_scaling.py --device cuda [--batch 256] [--zero-stage 2] [--compile]

Prints a table and writes ``benchmarks/results/<device>_<YYYY-MM-DD>_pretrain_scaling[_<engine>].json``
(the CPU runs name the engine, e.g. ``_deepspeed-zero2``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
MESH = (45, 16, 9)
TARGET_RATIO = 1.7


def _env() -> None:
    from caloforge.environment import apply_default_env

    apply_default_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _run_config(args: argparse.Namespace, workers: int, storage: Path, gpu: bool) -> dict[str, Any]:
    micro = args.micro_batch
    return {
        "name": f"bench-{workers}w",
        "data": {
            "simulate": {
                "detectors": ["par04-siw", "pbwo4"],
                "particles": ["e-", "gamma", "pi+"],
                "n_per_detector": 300 if args.quick else 600,
                "energy_gev": [1.0, 100.0],
                "shards": {"showers_per_shard": args.showers_per_shard},
            },
            "stream": {"shuffle_buffer": 64},
        },
        "model": {"backbone": "S", "parametrisation": "edm"}
        if gpu
        else {"backbone": "debug", "parametrisation": "edm"},
        "loop": {
            "steps": args.steps,
            "batch_size": micro * workers,
            "grad_accum": 1,
            "log_every": args.log_every,
            "checkpoint_every": 0,
            "precision": "bf16" if gpu else "fp32",
            "compile": bool(args.compile),
        },
        "engine": {
            "backend": args.engine,
            "deepspeed": {
                "zero_stage": args.zero_stage,
                "overlap_comm": gpu,
                "reduce_scatter": args.reduce_scatter,
            },
        },
        "cluster": {
            "num_workers": workers,
            "use_gpu": gpu,
            "cpus_per_worker": 1 if not gpu else max(1, (os.cpu_count() or 2) // 2),
            "storage_path": str(storage),
            "max_failures": 0,
            "num_to_keep": 1,
        },
        "validation": {"enabled": False},
        "tracking": {"enabled": False},
    }


def _steady(metrics_path: Path, log_every: int) -> tuple[float, list[float], float]:
    """Mean samples/s and mean rank-0 CPU utilisation of the log windows after the first (warm-up)."""
    from caloforge.training.hooks import read_metrics

    rows = [r for r in read_metrics(metrics_path) if r["step"] > log_every]
    if not rows:
        raise RuntimeError(f"{metrics_path}: no steady-state log window; raise --steps")
    windows = [r["samples_per_s"] for r in rows]
    util = statistics.fmean(r.get("process_cpu_util", float("nan")) for r in rows)
    return statistics.fmean(windows), windows, util


def run_ray(
    args: argparse.Namespace, workers_list: tuple[int, ...], gpu: bool, tmp: Path
) -> list[dict[str, Any]]:
    from caloforge.config import from_dict
    from caloforge.pretrain.config import PretrainConfig
    from caloforge.pretrain.launch import run_pretrain
    from caloforge.training.ray.launch import ray_session

    rows = []
    with ray_session(num_cpus=max(2, os.cpu_count() or 2)):
        for run_index, workers in enumerate(workers_list):
            storage = tmp / f"runs-{run_index}-{workers}"
            cfg = from_dict(PretrainConfig, _run_config(args, workers, storage, gpu), "benchmark")
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = run_pretrain(cfg, on_final_bundle=[])
            wall = time.perf_counter() - t0
            rate, windows, util = _steady(storage / cfg.name / "metrics.jsonl", args.log_every)
            rows.append(
                {
                    "kind": "ray_pipeline",
                    "workers": workers,
                    "engine": args.engine if args.engine == "ddp" else f"deepspeed-zero{args.zero_stage}",
                    "model": cfg.model.backbone,
                    "precision": cfg.loop.precision,
                    "micro_batch": args.micro_batch,
                    "global_batch": cfg.loop.batch_size,
                    "steps": result.step,
                    "samples_per_s": rate,
                    "samples_per_s_windows": windows,
                    # CPU seconds per wall second of a worker process (rank 0); < 1 = starved or waiting
                    "worker_cpu_util": util,
                    "samples_per_worker_cpu_s": rate / (workers * util) if util > 0 else float("nan"),
                    "wall_s_incl_startup": wall,
                    # other processes on the machine skew a 2-core measurement: keep the context
                    "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
                }
            )
            print(
                f"  {workers} worker(s): {rate:8.1f} samples/s, worker CPU utilisation {util:.2f} "
                f"(wall {wall:.0f} s incl. Ray/worker start)"
            )
    return rows


# -- GPU engine throughput and MFU ------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured dense matmul rate (FLOP/s) of ``n × n @ n × n`` in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


class _MemoryStream:
    """Infinite micro-batches cycling over synthetic showers held in memory (no I/O in the timing)."""

    def __init__(self, showers: np.ndarray, cond: Any, micro: int) -> None:
        from caloforge.datasets.batch import ShowerBatch

        n = len(showers) // micro
        self.batches = [
            ShowerBatch.from_numpy(
                showers[i * micro : (i + 1) * micro], cond.subset(slice(i * micro, (i + 1) * micro))
            )
            for i in range(n)
        ]

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield from self.batches


def _synthetic(n: int) -> tuple[np.ndarray, Any, tuple[str, ...]]:
    from caloforge.platform.conditioning import Conditions

    rng = np.random.default_rng(0)
    showers = (rng.lognormal(0.0, 2.0, (n, *MESH)) * (rng.random((n, *MESH)) < 0.3)).astype(np.float32)
    detectors = ("fe-sci", "odd-like", "par04-scipb", "par04-siw", "pbwo4", "wsi-granular")
    cond = Conditions.make(
        np.exp(rng.uniform(np.log(1e3), np.log(1e6), n)),
        rng.uniform(0.9, 2.2, n),
        rng.uniform(-np.pi, np.pi, n),
        rng.choice([11, 22, 211, -211], n),
        rng.choice(detectors, n),
    )
    return showers, cond, detectors


@contextlib.contextmanager
def _deepspeed_bf16_weights(enabled: bool) -> Iterator[None]:
    """DeepSpeed's ``bf16`` mode (bf16 weights and activations, fp32 master weights in the ZeRO optimizer)
    instead of ``torch_autocast`` (a benchmark variant only: the recipe keeps fp32 weights + autocast)."""
    if not enabled:
        yield
        return
    from caloforge.pretrain import deepspeed_backend as dsb

    original = dsb.build_deepspeed_config

    def patched(*a: Any, **kw: Any) -> dict[str, Any]:
        config = original(*a, **kw)
        config.pop("torch_autocast", None)
        config["bf16"] = {"enabled": True}
        return config

    dsb.build_deepspeed_config = patched
    try:
        yield
    finally:
        dsb.build_deepspeed_config = original


_KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "_mha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_tem", "sm90_", "sm80_")),
    ("optimizer/EMA/norm (multi-tensor)", ("multi_tensor", "adam", "foreach")),
    ("nccl", ("nccl",)),
    ("inductor fused (triton)", ("triton_",)),
)


def _kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in _KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "other eager kernels (elementwise, norm, reduce, copy)"


def gpu_time_breakdown(trace_path: Path, top: int = 12) -> dict[str, Any]:
    """Kernel time by class from a ``torch.profiler`` Chrome trace, and how busy the GPU was.

    ``busy_fraction``: union of kernel/memcpy intervals over the span from the first to the last one
    (1 − idle gaps: launch latency, host syncs, Python overhead between kernels).
    """
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    spans: list[tuple[float, float]] = []
    by_class: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for ev in events:
        cat = str(ev.get("cat", "")).lower()
        if ev.get("ph") != "X" or cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        start, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
        spans.append((start, start + dur))
        name = str(ev.get("name", "?"))
        label = _kernel_class(name) if cat == "kernel" else "memcpy/memset"
        by_class[label] = by_class.get(label, 0.0) + dur
        by_name[name] = by_name.get(name, 0.0) + dur
    if not spans:
        return {"error": f"no kernels in {trace_path.name}"}
    spans.sort()
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s0, e0 in spans[1:]:
        if s0 > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    busy += cur_e - cur_s
    window = spans[-1][1] - spans[0][0]
    total = sum(by_class.values())
    return {
        "kernel_time_ms": total / 1e3,
        "window_ms": window / 1e3,
        "busy_fraction": busy / window if window > 0 else float("nan"),
        "fraction_by_class": {k: v / total for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [
            [name[:120], t / 1e3] for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
        ],
        "attention_kernels": sorted({n[:100] for n in by_name if _kernel_class(n) == "attention"})[:6],
        "n_kernels": len(spans),
    }


def engine_throughput(
    args: argparse.Namespace, device: torch.device, profile_dir: Path | None = None
) -> dict[str, Any]:
    """A model through a backend (``DeepSpeedBackend`` by default) + the loop on in-memory batches in one
    process, and its model FLOPs utilisation (bf16 on CUDA against a bf16 matmul peak; fp32 on CPU against
    an fp32 peak).

    Variant knobs read from ``args`` (defaults in brackets): ``compile`` [False] (``loop.compile``),
    ``compile_mode`` [None] (compile here with this ``torch.compile`` mode instead), ``engine_backend``
    [deepspeed] (or ``torch``: ``TorchBackend``), ``overlap_comm`` [False], ``fused_adamw`` [None = on
    CUDA], ``bf16_weights`` [False] (DeepSpeed ``bf16`` mode), ``residual_stream`` [fp32]
    (``ShowerModelConfig.residual_stream``: ``autocast`` carries the residual stream in bf16), ``tf32``
    [False], ``engine_repeats`` [1] timed segments,
    ``peak_flops`` [measured here]. With ``profile_dir`` a few more steps run under ``torch.profiler`` and
    the row gets a GPU time breakdown (``gpu_time_breakdown``).
    """
    from caloforge.datasets.stats import compute_stats
    from caloforge.platform.backbone import forward_flops
    from caloforge.platform.conditioning import ConditionVocab
    from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig
    from caloforge.pretrain.config import DeepSpeedOptions
    from caloforge.training.config import LoopConfig
    from caloforge.training.deepspeed_backend import DeepSpeedBackend
    from caloforge.training.loop import Trainer
    from caloforge.training.tasks import shower_loss_fn
    from caloforge.training.torch_backend import TorchBackend

    gpu = device.type == "cuda"
    compile_flag = bool(getattr(args, "compile", False))
    compile_mode = getattr(args, "compile_mode", None)
    backend_kind = getattr(args, "engine_backend", "deepspeed")
    fused = getattr(args, "fused_adamw", None)
    bf16_weights = bool(getattr(args, "bf16_weights", False))
    residual_stream = getattr(args, "residual_stream", "fp32")
    tf32 = bool(getattr(args, "tf32", False))
    repeats = int(getattr(args, "engine_repeats", 1))
    peak = getattr(args, "peak_flops", None)
    if gpu:
        torch.cuda.set_device(device)
        peak = peak or peak_matmul_flops(device, torch.bfloat16, 8192, 30)
    else:
        torch.set_num_threads(1)  # as one Ray worker with cpus_per_worker=1 (and robust to a busy machine)
        peak = peak or peak_matmul_flops(device, torch.float32, 1024, 10)
    showers, cond, detectors = _synthetic(args.batch * 4)
    model_cfg = ShowerModelConfig(
        backbone=args.engine_model, parametrisation="edm", residual_stream=residual_stream
    )
    model = ShowerModel.build(
        model_cfg,
        ConditionVocab.create(detectors),
        compute_stats(showers, cond.energy_mev, cond.theta_rad),
        MESH,
    )
    if compile_mode is not None and gpu:
        model.compile(mode=compile_mode)  # what loop.compile does, with another mode
    warmup, steps = args.engine_warmup, args.engine_steps
    profile_steps = 6 if (profile_dir is not None and gpu) else 0
    precision = "bf16" if gpu else "fp32"
    total = warmup + repeats * steps + profile_steps
    loop = LoopConfig(
        steps=total, batch_size=args.batch, precision=precision, log_every=10**9, compile=compile_flag
    )
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        if backend_kind == "torch":
            backend: Any = TorchBackend(device, fused_adamw=fused)
            engine_name = "torch"
        else:
            overlap = bool(getattr(args, "overlap_comm", False))
            options = DeepSpeedOptions(zero_stage=args.zero_stage, overlap_comm=overlap)
            backend = DeepSpeedBackend(options, device, fused_adamw=fused)
            engine_name = f"deepspeed-zero{args.zero_stage}" + ("+overlap_comm" if overlap else "")
        stream = _MemoryStream(showers, cond, args.batch)
        with _deepspeed_bf16_weights(bf16_weights and backend_kind != "torch"):
            trainer = Trainer(model, shower_loss_fn(model), backend, stream, loop)
        t0 = time.perf_counter()
        trainer.fit(max_steps=warmup)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        segments = []
        done = warmup
        for _ in range(repeats):
            t0 = time.perf_counter()
            done += steps
            trainer.fit(max_steps=done)
            _sync(device)
            segments.append(time.perf_counter() - t0)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
        breakdown = None
        if profile_steps:
            from torch.profiler import ProfilerActivity, profile

            assert profile_dir is not None
            profile_dir.mkdir(parents=True, exist_ok=True)
            trace = profile_dir / "trace.json"
            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # kernels only: a small trace
                trainer.fit(max_steps=done + profile_steps)
                _sync(device)
            prof.export_chrome_trace(str(trace))
            breakdown = gpu_time_breakdown(trace)
            trace.unlink()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    elapsed = sum(segments)
    rate = repeats * steps * args.batch / elapsed
    flops = forward_flops(model_cfg.backbone_config(), MESH)
    train_flops = 3 * flops["total"]
    if bf16_weights:
        precision_label = "bf16 weights (DeepSpeed bf16, fp32 master in the optimizer)"
    elif gpu:
        stream = "bf16" if residual_stream == "autocast" else "fp32"
        precision_label = f"bf16 (autocast, fp32 master weights, {stream} residual stream)"
    else:
        precision_label = "fp32"
    row: dict[str, Any] = {
        "kind": "engine",
        "model": args.engine_model,
        "params": sum(p.numel() for p in model.parameters()),
        "precision": precision_label,
        "residual_stream": residual_stream,
        "engine": engine_name,
        "compile": compile_mode or ("default" if getattr(backend, "compiled", False) else "off"),
        "fused_adamw": bool(getattr(backend, "fused_adamw", False)),
        "tf32": tf32,
        "batch": args.batch,
        "steps_timed": repeats * steps,
        "warmup_steps": warmup,
        "warmup_s_incl_compile": warmup_s,
        "samples_per_s": rate,
        "samples_per_s_segments": [steps * args.batch / t for t in segments],
        "step_time_ms": 1000 * elapsed / (repeats * steps),
        "forward_gflop_per_sample": flops["total"] / 1e9,
        "train_gflop_per_sample": train_flops / 1e9,
        "achieved_tflops": rate * train_flops / 1e12,
        "peak_matmul_tflops_measured": peak / 1e12,
        "mfu": rate * train_flops / peak,
        "peak_memory_gib": peak_mem,
    }
    if breakdown is not None:
        row["gpu_time"] = breakdown
    del trainer, backend, model, stream
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="steps per Ray run (default 40, quick 20)")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="alternating 1/2-worker runs (CPU scaling)")
    parser.add_argument(
        "--showers-per-shard", type=int, default=100, help="shard size of the simulated set (CPU scaling)"
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="per-worker batch (cpu 16, cuda 64)")
    parser.add_argument("--engine", choices=["deepspeed", "ddp"], default="deepspeed")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=2)
    parser.add_argument(
        "--reduce-scatter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ZeRO-2 gradient reduce-scatter (default: on for cuda, off for cpu: one all-reduce per bucket)",
    )
    parser.add_argument("--batch", type=int, default=None, help="engine benchmark batch (cuda 256, cpu 8)")
    parser.add_argument("--engine-warmup", type=int, default=None)
    parser.add_argument("--engine-steps", type=int, default=None)
    parser.add_argument(
        "--engine-model", default=None, help="backbone flavour of the engine row (cuda S, cpu debug)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="loop.compile: torch.compile the model (CUDA only; ignored on CPU)",
    )
    parser.add_argument("--skip-ray", action="store_true", help="only the engine/MFU measurement")
    parser.add_argument("--skip-engine", action="store_true", help="only the Ray runs")
    args = parser.parse_args()
    _env()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if gpu:
        os.environ["DS_ACCELERATOR"] = "cuda"
    args.steps = args.steps or (20 if args.quick else 40)
    args.micro_batch = args.micro_batch or (64 if gpu else 16)
    args.batch = args.batch or (256 if gpu else 16)
    if args.reduce_scatter is None:
        args.reduce_scatter = gpu
    args.engine_model = args.engine_model or ("S" if gpu else "debug")
    args.engine_warmup = args.engine_warmup or (10 if gpu else 2)
    args.engine_steps = args.engine_steps or (
        (20 if args.quick else 50) if gpu else (5 if args.quick else 20)
    )
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")

    result: dict[str, Any] = {
        "benchmark": "pretrain_scaling",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if gpu else f"{platform.node()} ({platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "quick": args.quick,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="caloforge-bench-") as tmp:
        os.environ.setdefault("CALOFORGE_HOME", str(Path(tmp) / "home"))  # simulated data cache
        if not args.skip_engine:
            what = "bf16" if gpu else "fp32"
            compiled = ", compiled" if (args.compile and gpu) else ""
            print(
                f"engine throughput and MFU ({args.engine_model}, {what}, ZeRO-{args.zero_stage}{compiled}, "
                f"batch {args.batch}, in-memory batches) ..."
            )
            result["rows"].append(engine_throughput(args, device))
        if not args.skip_ray and gpu:
            print("GPU full stack (Ray Train, 1 GPU worker, streaming shards) ...")
            result["rows"] += run_ray(args, (1,), True, Path(tmp))
        elif not args.skip_ray:
            print(
                f"CPU data-parallel scaling ({args.engine}, debug model, micro-batch {args.micro_batch}) ..."
            )
            # 1 and 2 workers alternate ``--repeats`` times in one Ray session; the ratio is of the medians,
            # so one disturbed run on a shared 2-core machine does not decide the figure.
            rows = run_ray(args, (1, 2) * args.repeats, False, Path(tmp))
            result["rows"] += rows
            by_workers = {w: [r for r in rows if r["workers"] == w] for w in (1, 2)}
            rate = {w: statistics.median(r["samples_per_s"] for r in rs) for w, rs in by_workers.items()}
            ratio = rate[2] / rate[1]
            result["repeats"] = args.repeats
            result["showers_per_shard"] = args.showers_per_shard
            result["median_samples_per_s"] = {str(w): v for w, v in rate.items()}
            pairs = zip(by_workers[1], by_workers[2], strict=True)
            result["ratio_per_repeat"] = [b["samples_per_s"] / a["samples_per_s"] for a, b in pairs]
            result["scaling_ratio_2_vs_1"] = ratio
            result["target_ratio"] = TARGET_RATIO
            # Throughput per busy worker-CPU-second, scaled to full cores: what the ratio would be with a core
            # per worker (an estimate when other processes compete for the cores; DeepSpeed's shared-memory
            # collectives spin while they wait, so this still counts waiting as work).
            per_cpu = {
                w: statistics.median(r["samples_per_worker_cpu_s"] for r in rs)
                for w, rs in by_workers.items()
            }
            result["cpu_normalised_ratio_2_vs_1"] = 2 * per_cpu[2] / per_cpu[1]

    print()
    print(f"{'kind':14s} {'workers':>7s} {'model':>6s} {'batch':>6s} {'samples/s':>10s} {'extra'}")
    for row in result["rows"]:
        extra = ""
        if row["kind"] == "engine":
            extra = (
                f"{row['engine']}, compile {row['compile']}: MFU {100 * row['mfu']:.1f}% "
                f"({row['achieved_tflops']:.3g} of "
                f"{row['peak_matmul_tflops_measured']:.3g} TFLOP/s), {row['train_gflop_per_sample']:.2f} "
                f"GFLOP/sample, peak memory {row['peak_memory_gib']:.1f} GiB"
            )
        workers = row.get("workers", 1)
        batch = row.get("global_batch", row.get("batch"))
        rate = row["samples_per_s"]
        print(f"{row['kind']:14s} {workers:7d} {row['model']:>6s} {batch:6d} {rate:10.1f} {extra}")
    if "scaling_ratio_2_vs_1" in result:
        ratio = result["scaling_ratio_2_vs_1"]
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        per_repeat = ", ".join(f"{r:.2f}" for r in result["ratio_per_repeat"])
        print(
            f"\n2 workers / 1 worker = {ratio:.2f}× (medians of {result['repeats']} alternating runs; "
            f"per run {per_repeat}) ({verdict} the ≥ {TARGET_RATIO}× goal)"
        )
        print(
            f"per busy CPU-second (a core per worker): {result['cpu_normalised_ratio_2_vs_1']:.2f}×; "
            f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    # CPU scaling files are per engine (the GPU file is shared with benchmarks/mfu_sweep.py's rows).
    engine_tag = "" if gpu else "_" + ("ddp" if args.engine == "ddp" else f"deepspeed-zero{args.zero_stage}")
    out = RESULTS / f"{args.device}_{dt.date.today().isoformat()}_pretrain_scaling{engine_tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
