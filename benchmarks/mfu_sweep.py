"""GPU sweep: pretraining throughput and MFU of the ``S`` backbone per variant, in one process.

Every row is ``pretrain_scaling.engine_throughput`` (the model through a backend + the one training loop on
in-memory batches, bf16, timed after warm-up in two segments) with one lever changed: ``loop.compile``
(``torch.compile`` default mode) or ``reduce-overhead`` (CUDA graphs), ``TorchBackend`` vs DeepSpeed ZeRO-0/2,
the residual stream in fp32 (the autocast recipe) or bf16 (``model.residual_stream: autocast``), batch 256 /
1024, fused AdamW, and DeepSpeed ``bf16`` weights instead of autocast. Some rows also run a few steps under
``torch.profiler``: the GPU kernel time by class (matmul, attention, fused/eager elementwise, optimizer) and
the busy fraction of the GPU. Besides the loop rows:

- ``raw``: forward + backward + fused AdamW of the compiled model on a batch already on the GPU (no loop,
  EMA, clipping or host syncs): the ceiling of what the loop could reach;
- ``sdpa``: which ``scaled_dot_product_attention`` kernels run at the model's shapes (B, 6 heads, 360
  tokens, head dim 64, bf16, q/k/v as the model lays them out) and their forward + backward time.

Variants run in order of expected value and are skipped once ``--budget-s`` would be exceeded. Writes the
rows in ``pretrain_scaling``'s JSON format (``benchmarks/results/cuda_<date>_pretrain_scaling.json``, or
``--out``) and prints a table last.

    python3 benchmarks/mfu_sweep.py --device cuda [--budget-s 420] [--out $OUT/sweep.json]
    .venv/bin/python benchmarks/mfu_sweep.py --device cpu --quick     # plumbing smoke test (debug model)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_scaling as ps

# (name, overrides of the engine args, expected seconds incl. compilation, profile?), in order of expected
# value: the levers still unmeasured on a GPU first (the loop without per-step host syncs, the bf16 residual
# stream, CUDA graphs), then the rows of the first sweep (docs/pretraining.md) for comparison.
BF16_STREAM = {"residual_stream": "autocast"}
TORCH = {"compile": True, "engine_backend": "torch"}
VARIANTS: list[tuple[str, dict[str, Any], float, bool]] = [
    ("compile, TorchBackend, fused", TORCH, 45, True),
    ("compile, TorchBackend, bf16 residual stream", {**TORCH, **BF16_STREAM}, 45, True),
    ("raw: compiled fwd+bwd+fused AdamW, no loop", {"raw": True}, 45, False),
    ("raw: as above, bf16 residual stream", {"raw": True, **BF16_STREAM}, 45, False),
    ("compile, DS ZeRO-2, fused (s_6det engine)", {"compile": True}, 120, True),
    ("compile, DS ZeRO-2, bf16 residual stream", {"compile": True, **BF16_STREAM}, 90, False),
    ("compile, TorchBackend, bf16 stream, batch 1024", {**TORCH, **BF16_STREAM, "batch": 1024}, 50, False),
    ("compile, TorchBackend, batch 1024", {**TORCH, "batch": 1024}, 50, False),
    (
        "reduce-overhead (CUDA graphs), TorchBackend, bf16 stream",
        {"compile_mode": "reduce-overhead", "engine_backend": "torch", **BF16_STREAM},
        90,
        False,
    ),
    (
        "compile, DS ZeRO-0, bf16 residual stream",
        {"compile": True, "zero_stage": 0, **BF16_STREAM},
        60,
        False,
    ),
    (
        "raw: compiled, batch 1024, bf16 residual stream",
        {"raw": True, "batch": 1024, **BF16_STREAM},
        40,
        False,
    ),
    ("baseline: eager, DS ZeRO-2, foreach AdamW", {"fused_adamw": False}, 25, True),
    ("eager + fused AdamW", {}, 15, False),
    ("compile, DS, batch 1024", {"compile": True, "batch": 1024}, 90, False),
    ("compile, DS bf16 weights (not autocast)", {"compile": True, "bf16_weights": True}, 90, False),
    ("compile, DS ZeRO-2 + overlap_comm", {"compile": True, "overlap_comm": True}, 30, False),
]


def _steps(batch: int, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps per segment)."""
    if quick:
        return 2, 3
    return 8, {256: 40, 512: 20}.get(batch, 12)


def raw_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Forward + backward + fused AdamW of the (compiled on CUDA) model, batch on the device, no loop."""
    from caloforge.datasets.stats import compute_stats
    from caloforge.platform.backbone import forward_flops
    from caloforge.platform.conditioning import ConditionVocab
    from caloforge.platform.objectives import make_objective
    from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig
    from caloforge.training.config import OptimConfig
    from caloforge.training.optim import build_optimizer

    gpu = device.type == "cuda"
    showers, cond, detectors = ps._synthetic(args.batch)
    residual_stream = getattr(args, "residual_stream", "fp32")
    cfg = ShowerModelConfig(
        backbone=args.engine_model, parametrisation="edm", residual_stream=residual_stream
    )
    vocab = ConditionVocab.create(detectors)
    model = ShowerModel.build(cfg, vocab, compute_stats(showers, cond.energy_mev, cond.theta_rad), ps.MESH)
    model.to(device).train()
    if gpu:
        model.compile()
    x1 = model.to_model_space(showers)
    ct = model.encode_conditions(cond, device)
    gen = torch.Generator(device=device).manual_seed(0)
    opt = build_optimizer(model, OptimConfig(), fused=gpu)
    precision = torch.bfloat16 if gpu else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=precision, enabled=gpu):
            loss = make_objective("edm")(model, x1, ct, gen).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warmup, steps = args.engine_warmup, args.engine_steps
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    ps._sync(device)
    warm_s = time.perf_counter() - t0
    segments = []
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ps._sync(device)
        segments.append(time.perf_counter() - t0)
    rate = 2 * steps * args.batch / sum(segments)
    train_flops = 3 * forward_flops(cfg.backbone_config(), ps.MESH)["total"]
    row = {
        "kind": "raw",
        "model": args.engine_model,
        "engine": "none (fwd+bwd+fused AdamW)",
        "residual_stream": residual_stream,
        "compile": "default" if gpu else "off",
        "batch": args.batch,
        "warmup_s_incl_compile": warm_s,
        "samples_per_s": rate,
        "samples_per_s_segments": [steps * args.batch / t for t in segments],
        "step_time_ms": 1000 * sum(segments) / (2 * steps),
        "achieved_tflops": rate * train_flops / 1e12,
        "peak_matmul_tflops_measured": args.peak_flops / 1e12,
        "mfu": rate * train_flops / args.peak_flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan"),
    }
    return row


def sdpa_check(device: torch.device, batch: int = 256) -> dict[str, Any]:
    """Which SDPA backends accept the model's attention inputs, and their fwd+bwd time (ms)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, tokens, head_dim = 6, 360, 64
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, dtype=torch.bfloat16)
    qkv = qkv.permute(2, 0, 3, 1, 4)  # as Attention.forward: (3, B, H, T, K), strided
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    grad = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
    out: dict[str, Any] = {"shape_BHTK": [batch, heads, tokens, head_dim]}
    choices = [("default", None)] + [
        (name, getattr(SDPBackend, name))
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
        if hasattr(SDPBackend, name)
    ]
    for name, backend in choices:
        try:
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            with ctx:
                for _ in range(3):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
                end.record()
                torch.cuda.synchronize(device)
            out[name] = {"ok": True, "fwd_bwd_ms": start.elapsed_time(end) / 10}
        except Exception as exc:  # a backend that rejects these inputs: record why
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    # attention FLOPs per fwd+bwd at these shapes (4·T²·D forward, ×2.5 for backward's 5 matmuls)
    flops = 3.5 * 4 * tokens * tokens * heads * head_dim * batch
    for name, _ in choices:
        if out[name].get("ok"):
            out[name]["tflops"] = flops / (out[name]["fwd_bwd_ms"] / 1e3) / 1e12
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip variants past this wall time")
    parser.add_argument(
        "--only", nargs="*", type=int, default=None, help="indices of VARIANTS to run, in this order"
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/)")
    parser.add_argument("--profile-dir", type=Path, default=Path("/tmp/caloforge-profile"))
    parser.add_argument("--no-sdpa", action="store_true", help="leave out the attention-kernel check")
    args = parser.parse_args()
    ps._env()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if gpu:
        os.environ["DS_ACCELERATOR"] = "cuda"
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    t_start = time.perf_counter()
    if gpu:
        torch.cuda.set_device(device)
        peak = ps.peak_matmul_flops(device, torch.bfloat16, 8192, 30)
    else:
        peak = ps.peak_matmul_flops(device, torch.float32, 512, 5)
    result: dict[str, Any] = {
        "benchmark": "pretrain_scaling",
        "sweep": "benchmarks/mfu_sweep.py",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if gpu else "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "quick": args.quick,
        "peak_matmul_tflops_measured": peak / 1e12,
        "rows": [],
    }
    if gpu and not args.no_sdpa:
        try:
            result["sdpa"] = sdpa_check(device)
            print("sdpa:", json.dumps(result["sdpa"]), flush=True)
        except Exception:
            traceback.print_exc()

    out = args.out or ps.RESULTS / f"{args.device}_{dt.date.today().isoformat()}_pretrain_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    order = args.only if args.only is not None else range(len(VARIANTS))
    for index in order:
        name, overrides, estimate, profile = VARIANTS[index]
        elapsed = time.perf_counter() - t_start
        if elapsed + estimate > args.budget_s:
            print(f"[{index}] {name}: skipped ({elapsed:.0f} s used, ~{estimate:.0f} s needed)", flush=True)
            result["rows"].append({"kind": "skipped", "variant": name})
            continue
        batch = int(overrides.get("batch", 256 if gpu else 8))
        warmup, steps = _steps(batch, args.quick)
        settings: dict[str, Any] = {
            "engine_model": "S" if gpu else "debug",
            "engine_warmup": warmup,
            "engine_steps": steps,
            "engine_repeats": 2,
            "zero_stage": 2,
            "peak_flops": peak,
        }
        settings.update({k: v for k, v in overrides.items() if k != "raw"})
        settings["batch"] = batch
        vargs = argparse.Namespace(**settings)
        torch._dynamo.reset()  # each variant compiles afresh (no shape-generalised graphs carried over)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            if overrides.get("raw"):
                row = raw_throughput(vargs, device)
            else:
                row = ps.engine_throughput(vargs, device, args.profile_dir if profile else None)
        except Exception as exc:
            traceback.print_exc()
            row = {"kind": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["variant"] = name
        row["variant_wall_s"] = time.perf_counter() - t0
        result["rows"].append(row)
        brief = {k: row.get(k) for k in ("samples_per_s", "mfu", "step_time_ms", "peak_memory_gib")}
        print(f"[{index}] {name}: {brief} ({row['variant_wall_s']:.0f} s)", flush=True)
        if "gpu_time" in row:
            print(f"    gpu_time: {json.dumps(row['gpu_time'])}", flush=True)
        if gpu:
            torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every variant: a killed run keeps rows
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{result['device_name']}, torch {torch.__version__}, bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'variant':46s} {'batch':>5s} {'samples/s':>10s} {'step ms':>8s} {'MFU':>6s} {'mem GiB':>7s}")
    for row in result["rows"]:
        if row["kind"] in ("skipped", "failed"):
            print(f"{row['variant'][:46]:46s} {row['kind']}: {row.get('error', '')[:60]}")
            continue
        print(
            f"{row['variant'][:46]:46s} {row['batch']:5d} {row['samples_per_s']:10.1f} "
            f"{row['step_time_ms']:8.2f} {100 * row['mfu']:5.1f}% {row['peak_memory_gib']:7.1f}"
        )
    for row in result["rows"]:
        if "gpu_time" in row and "fraction_by_class" in row["gpu_time"]:
            g = row["gpu_time"]
            parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in g["fraction_by_class"].items())
            print(f"GPU time, {row['variant']}: busy {100 * g['busy_fraction']:.0f}%; {parts}")
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
