"""Model benchmark: training and sampling throughput of ShowerModel flavours.

For each backbone flavour (default: ``debug`` and ``S``) on the CaloChallenge dataset-2 mesh (45×16×9,
patch 3×2×3 → 360 tokens):

- parameter count and analytic FLOPs per shower per network evaluation (``backbone.forward_flops``);
- training: forward + backward of the objective's per-sample loss (flow matching and EDM), samples/s;
- sampling: ``ShowerModel.generate`` end to end (per-shower seeded noise → sampler → MeV) per sampler and
  step count, showers/s and network evaluations (NFE) per shower.

``--device cuda`` runs under bf16 autocast (``--precision fp32`` to disable); CPU runs in fp32. ``--quick``
shrinks batches, iterations and step grids for a fast smoke run. Results: a printed table and
``benchmarks/results/<device>_<date>_model.json``.

    .venv/bin/python benchmarks/model.py --quick
    .venv/bin/python benchmarks/model.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import DETECTORS, MESH, git_commit, synthetic, write_results

from caloforge.datasets.stats import compute_stats
from caloforge.platform.backbone import BACKBONE_FLAVORS, count_parameters, forward_flops
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.objectives import OBJECTIVES, make_objective
from caloforge.platform.samplers import SAMPLERS
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig


def build(flavor: str, objective: str, stats: dict, device: torch.device) -> ShowerModel:
    cfg = ShowerModelConfig(backbone=flavor, parametrisation=objective)
    return ShowerModel.build(cfg, ConditionVocab.create(DETECTORS), stats, MESH).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Timer:
    """Wall time and process CPU time (all threads) of a block; on a shared machine the CPU-time rate is
    the more stable number, the wall-clock rate is what a user sees."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall_s = self.cpu_s = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        sync(self.device)
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


def time_training(model: ShowerModel, objective: str, batch: int, iters: int, precision: str) -> Timer:
    """Forward + backward of the per-sample training loss (no optimizer step), ``iters`` times: the objective
    plus, for a model with the layer-energy head, the head's loss (as ``shower_loss_fn`` adds it)."""
    device = model.device
    showers, cond = synthetic(batch, seed=1)
    showers_t = torch.as_tensor(showers, device=device)
    x1 = model.to_model_space(showers_t)
    ct = model.encode_conditions(cond, device)
    ct = model.with_layers(ct, model.layer_energies_mev(showers_t))  # as shower_loss_fn (if it reads them)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = model.config.layer_energy.loss_weight
    model.train()

    def step() -> None:
        with autocast(device, precision):
            loss_B = make_objective(objective)(model, x1, ct, gen)
            if model.has_energy_head:
                loss_B = loss_B + weight * model.energy_loss(showers_t, ct, gen)
            loss = loss_B.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernels)
    with Timer(device) as timer:
        for _ in range(iters):
            step()
    return timer


def time_sampling(model: ShowerModel, sampler: str, steps: int, n: int, batch: int, precision: str) -> Timer:
    """``generate()`` of n showers end to end (noise from seeds → sampler → MeV)."""
    _, cond = synthetic(n, seed=2)
    with autocast(model.device, precision):
        model.generate(cond.subset(slice(0, min(n, batch))), num_steps=1, sampler="euler")  # warm-up
        with Timer(model.device) as timer:
            out = model.generate(cond, num_steps=steps, sampler=sampler, batch_size=batch, seed=0)
    assert out.shape == (n, *MESH) and np.isfinite(out).all()
    return timer


def plan(device: torch.device, quick: bool, flavor: str) -> dict:
    big = flavor != "debug"
    if device.type == "cuda":
        return {
            "train_batch": 64 if quick else 256,
            "train_iters": 3 if quick else 20,
            "steps": [4] if quick else [1, 8, 32],
            "n_showers": 256 if quick else 2048,
            "sample_batch": 256,
        }
    if quick:
        return {
            "train_batch": 4 if big else 16,
            "train_iters": 2,
            "steps": [2],
            "n_showers": 2 if big else 16,
            "sample_batch": 16,
        }
    return {
        "train_batch": 16 if big else 64,
        "train_iters": 5,
        "steps": [8, 32] if not big else [8],
        "n_showers": 4 if big else 64,
        "sample_batch": 64,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small batches and step grids (smoke run)")
    parser.add_argument("--flavors", nargs="+", default=["debug", "S"], choices=sorted(BACKBONE_FLAVORS))
    parser.add_argument("--samplers", nargs="+", default=sorted(SAMPLERS), choices=sorted(SAMPLERS))
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    showers, cond = synthetic(64, seed=0)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)

    rows: list[dict] = []
    for flavor in args.flavors:
        p = plan(device, args.quick, flavor)
        cfg = BACKBONE_FLAVORS[flavor]
        flops = forward_flops(cfg, MESH)
        base = {"flavor": flavor, "tokens": flops["tokens"], "gflop_per_nfe": flops["total"] / 1e9}
        for objective in sorted(OBJECTIVES):
            model = build(flavor, objective, stats, device)
            base["params"] = count_parameters(model)
            timer = time_training(model, objective, p["train_batch"], p["train_iters"], precision)
            n = p["train_batch"] * p["train_iters"]
            rows.append({**base, "kind": "train", "objective": objective, "batch": p["train_batch"],
                         "wall_s": timer.wall_s, "cpu_s": timer.cpu_s, "per_s": n / timer.wall_s,
                         "per_cpu_s": n / timer.cpu_s,
                         "tflops": n / timer.wall_s * 3 * flops["total"] / 1e12})  # fmt: skip
            rate = n / timer.wall_s
            print(f"{flavor:5s} train {objective:13s} batch {p['train_batch']:4d}: {rate:9.1f} samples/s")
        model = build(flavor, "edm", stats, device)
        for sampler in args.samplers:
            for steps in p["steps"]:
                nfe = SAMPLERS[sampler].nfe(steps, model.denoiser.final_singular)
                n = p["n_showers"]
                timer = time_sampling(model, sampler, steps, n, p["sample_batch"], precision)
                rows.append({**base, "kind": "sample", "objective": "edm", "sampler": sampler, "steps": steps,
                             "nfe": nfe, "batch": min(p["sample_batch"], n), "wall_s": timer.wall_s,
                             "cpu_s": timer.cpu_s, "per_s": n / timer.wall_s, "per_cpu_s": n / timer.cpu_s,
                             "ms_per_shower": 1e3 * timer.wall_s / n})  # fmt: skip
                rate = n / timer.wall_s
                print(
                    f"{flavor:5s} sample {sampler:8s} steps {steps:3d} (NFE {nfe:3d}): {rate:9.2f} showers/s"
                )

    print()
    print(f"device={device} precision={precision} threads={torch.get_num_threads()} quick={args.quick}")
    header = f"{'flavor':6} {'params':>10} {'GFLOP/NFE':>9} {'what':28} {'batch':>5} {'NFE':>4}"
    print(f"{header} {'per s (wall)':>13} {'per CPU-s':>10}")
    for r in rows:
        what = (
            f"train fwd+bwd {r['objective']}"
            if r["kind"] == "train"
            else f"sample {r['sampler']} x{r['steps']}"
        )
        nfe = str(r.get("nfe", ""))
        print(f"{r['flavor']:6} {r['params']:>10,} {r['gflop_per_nfe']:>9.3f} {what:28} {r['batch']:>5} "
              f"{nfe:>4} {r['per_s']:>13.2f} {r['per_cpu_s']:>10.2f}")  # fmt: skip
    print("train rates are samples/s (forward + backward), sample rates are showers/s (generate end to end)")

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    record = {
        "benchmark": "model",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "mesh": list(MESH),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "rows": rows,
    }
    write_results(record, "model", args.device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
