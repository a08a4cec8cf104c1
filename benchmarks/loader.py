"""Benchmark: shower loading throughput, webdataset shards (ShowerStream) vs random batches from HDF5.

The same N showers (the built-in simulator's par04-siw, 45 × 16 × 9 mesh, 1–1000 GeV e-/γ; synthetic
showers if the simulator is unavailable) are stored as

- a shard set (``write_shards``, float32 payload, 1000 showers per shard), read by ``ShowerStream``
  (resampled, batch 256, shuffle buffer 2048) with sha256 verification and with structural checks only;
- HDF5 files read in random batches of 256 (sorted random indices, ``dataset[idx]``) with h5py: our native
  layout (lzf, 256-shower chunks, what ``caloforge data simulate`` writes), the CaloChallenge layout (gzip,
  like the official files) and an uncompressed contiguous file (h5py's best case);

each in one process and with 2 DataLoader workers, for a fixed wall-time budget per case after a warm-up,
files in the page cache. Throughput is showers/s and MB/s of decoded float32 voxels. A second table
measures the float16 payload's rounding on the simulated voxel spectrum (relative error per energy band,
voxels flushed to 0, voxels beyond float16's range).

    .venv/bin/python benchmarks/loader.py [--quick] [--n 20000] [--seconds 6] [--device cpu|cuda]

Prints the tables and writes benchmarks/results/<device>_<YYYY-MM-DD>_loader.json. Target: streaming ≥ 5×
the h5py random-batch rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from caloforge.datasets.formats import calochallenge, native
from caloforge.datasets.schema import ShowerSet
from caloforge.datasets.shards import ShardConfig, SplitFractions, write_shards
from caloforge.datasets.streaming import ShowerStream, StreamConfig
from caloforge.platform.conditioning import Conditions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 256
TARGET_SPEEDUP = 5.0


def device_name(device: str) -> str:
    if device == "cuda":
        return "cuda-" + re.sub(r"[^A-Za-z0-9-]", "-", torch.cuda.get_device_name(0))[:32]
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:24] or "host"
    return f"cpu-{host}"


def make_showers(n: int, seed: int = 0) -> tuple[ShowerSet, str]:
    """Simulated par04-siw showers (realistic sparsity), or seeded synthetic ones without the simulator."""
    try:
        from caloforge.datasets.simulator import simulate_dataset
        from caloforge.platform.geometry import load_detector

        det = load_detector("par04-siw")
        data = simulate_dataset(det, ["e-", "gamma"], n, (1.0, 1000.0), True, (60.0, 120.0), seed=seed)
        return data, "caloforge-gflash par04-siw e-/gamma 1-1000 GeV"
    except ImportError:
        rng = np.random.default_rng(seed)
        e = 10 ** rng.uniform(3, 6, n)
        x = (rng.gamma(0.3, 1.0, (n, 45, 16, 9)) * (e[:, None, None, None] / 6480.0)).astype(np.float32)
        x[x < 0.024] = 0.0
        cond = Conditions.make(e, np.pi / 2, 0.0, 11, "par04-siw")
        return ShowerSet(x, cond, "synthetic", seed), "synthetic gamma-distributed voxels"


class _H5Batches(torch.utils.data.IterableDataset):
    """Random batches of 256 from an HDF5 'showers' dataset, one h5py handle per worker."""

    def __init__(self, path: Path, n: int, seed: int) -> None:
        super().__init__()
        self.path, self.n, self.seed = path, n, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        with h5py.File(self.path, "r") as f:
            ds = f["showers"]
            while True:
                idx = np.sort(rng.choice(self.n, BATCH, replace=False))
                yield torch.from_numpy(np.ascontiguousarray(ds[idx], dtype=np.float32))


def _h5_iter(path: Path, n: int, workers: int) -> Iterator[torch.Tensor]:
    ds = _H5Batches(path, n, seed=1)
    if workers == 0:
        return iter(ds)
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2))


def _stream_iter(shard_dir: Path, workers: int, verify: str) -> Iterator[torch.Tensor]:
    cfg = StreamConfig(batch_size=BATCH, shuffle_buffer=2048, num_workers=workers, verify=verify)  # type: ignore
    return (b.showers_BZPR for b in ShowerStream(shard_dir, cfg, seed=1))


def measure(make: Callable[[], Iterator[torch.Tensor]], seconds: float, device: str, voxels: int) -> dict:
    it = make()
    for _ in range(2):  # warm-up: worker start, first shard, caches
        next(it)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        x = next(it)
        if device == "cuda":
            x = x.to("cuda", non_blocking=True)
        n += x.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    rate = n / dt
    return {
        "showers_per_s": rate,
        "mb_per_s": rate * voxels * 4 / 1e6,
        "showers": n,
        "seconds": dt,
        "main_process_cpu_s": cpu,  # with workers, their CPU time is not included
        "loadavg_1min": os.getloadavg()[0],
    }


def float16_precision(x: np.ndarray) -> list[dict]:
    """Relative rounding error of float16 per voxel-energy band (MeV), on the non-zero voxels."""
    v = x[x > 0].astype(np.float64)
    overflow = int((v > 65504.0).sum())
    h = np.minimum(v, 65504.0).astype(np.float16).astype(np.float64)
    rel = np.abs(h - v) / v
    bands = [(0.5e-3 / 0.033, 0.1), (0.1, 1.0), (1.0, 100.0), (100.0, 65504.0), (65504.0, np.inf)]
    rows = []
    for lo, hi in bands:
        m = (v >= lo) & (v < hi)
        rows.append(
            {
                "band_mev": [lo, hi],
                "voxels": int(m.sum()),
                "rel_err_mean": float(rel[m].mean()) if m.any() else None,
                "rel_err_max": float(rel[m].max()) if m.any() else None,
                "to_zero": int((h[m] == 0).sum()),
            }
        )
    below = int(((v > 0) & (v < 0.5e-3 / 0.033)).sum())
    rows.append({"band_mev": [0.0, 0.5e-3 / 0.033], "voxels": below, "note": "below the 15.15 keV threshold"})
    rows.append({"overflow_voxels": overflow, "max_voxel_mev": float(v.max())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4000 showers, 2 s per case")
    parser.add_argument("--n", type=int, default=20000, help="showers stored (default 20000)")
    parser.add_argument("--seconds", type=float, default=6.0, help="wall time per case")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where batches are moved")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    n, seconds = (4000, 2.0) if args.quick else (args.n, args.seconds)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="caloforge-loader-bench-"))
    try:
        t0 = time.perf_counter()
        data, what = make_showers(n)
        voxels = int(np.prod(data.mesh_shape))
        print(f"{n} showers ({what}) made in {time.perf_counter() - t0:.1f} s", flush=True)
        files = {
            "h5py native (lzf, 256-chunks)": native.write(tmp / "native.h5", data),
            "h5py CaloChallenge (gzip)": calochallenge.write(tmp / "cc.h5", data),
        }
        with h5py.File(tmp / "contiguous.h5", "w") as f:
            f.create_dataset("showers", data=data.showers_NZPR.reshape(n, -1))
        files["h5py contiguous, uncompressed"] = tmp / "contiguous.h5"
        t0 = time.perf_counter()
        all_train = ShardConfig(showers_per_shard=1000, split=SplitFractions(1.0, 0.0, 0.0))
        manifest = write_shards([tmp / "native.h5"], tmp / "shards", all_train)
        t_shard = time.perf_counter() - t0
        shard_bytes = sum(s.bytes for s in manifest.shards("train"))
        print(
            f"sharded in {t_shard:.1f} s ({n / t_shard:.0f} showers/s, {shard_bytes / 2**20:.0f} MiB)",
            flush=True,
        )
        rows = []
        for workers in (0, 2):
            for verify in ("sha256", "structure"):
                name = f"ShowerStream shards (verify {verify})"
                r = measure(
                    lambda w=workers, v=verify: _stream_iter(tmp / "shards", w, v),
                    seconds,
                    args.device,
                    voxels,
                )
                rows.append({"reader": name, "workers": workers, **r})
                print(f"  {name:<36} workers={workers}: {r['showers_per_s']:9.0f} showers/s", flush=True)
            for name, path in files.items():
                r = measure(lambda p=path, w=workers: _h5_iter(p, n, w), seconds, args.device, voxels)
                rows.append({"reader": name, "workers": workers, **r})
                print(f"  {name:<36} workers={workers}: {r['showers_per_s']:9.0f} showers/s", flush=True)
        precision = float16_precision(data.showers_NZPR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rate(reader: str, workers: int) -> float:
        return next(r["showers_per_s"] for r in rows if r["reader"] == reader and r["workers"] == workers)

    stream = "ShowerStream shards (verify sha256)"
    print(
        f"\nloader throughput, batch {BATCH}, {n} showers of {data.mesh_shape} on {device_name(args.device)}"
    )
    print("(showers/CPU-s: main process only, the whole cost for workers=0; load: 1-min load average)")
    head = f"{'reader':<38} {'workers':>7} {'showers/s':>10} {'MB/s':>8} {'stream ×':>9}"
    print(f"{head} {'showers/CPU-s':>13} {'load':>5}")
    for r in rows:
        ratio = rate(stream, r["workers"]) / r["showers_per_s"]
        r["stream_speedup"] = ratio
        per_cpu = f"{r['showers'] / r['main_process_cpu_s']:.0f}" if r["workers"] == 0 else "-"
        line = f"{r['reader']:<38} {r['workers']:>7} {r['showers_per_s']:>10.0f} {r['mb_per_s']:>8.0f}"
        print(f"{line} {ratio:>9.1f} {per_cpu:>13} {r['loadavg_1min']:>5.1f}")
    print("\nfloat16 payload rounding on this voxel spectrum (non-zero voxels)")
    print(f"{'band [MeV]':<22} {'voxels':>10} {'mean rel':>10} {'max rel':>10} {'→ 0':>6}")
    for p in precision[:-2]:
        lo, hi = p["band_mev"]
        mean = "-" if p["rel_err_mean"] is None else f"{p['rel_err_mean']:.2e}"
        mx = "-" if p["rel_err_max"] is None else f"{p['rel_err_max']:.2e}"
        print(f"{lo:>9.4g} – {hi:<10.4g} {p['voxels']:>10} {mean:>10} {mx:>10} {p['to_zero']:>6}")
    top = precision[-1]
    print(f"voxels beyond float16's 65504 MeV: {top['overflow_voxels']} (max {top['max_voxel_mev']:.0f} MeV)")
    verdict = {f"workers={w}": {name: rate(stream, w) / rate(name, w) for name in files} for w in (0, 2)}
    print(f"\nShowerStream (sha256) ÷ h5py random batches (target ≥ {TARGET_SPEEDUP:g}×):")
    for key, per in verdict.items():
        print(f"  {key}: " + ", ".join(f"{name}: {x:.1f}×" for name, x in per.items()))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    path = args.out_dir / f"{device_name(args.device)}_{today}_loader.json"
    payload = {
        "benchmark": "loader",
        "device": device_name(args.device),
        "date": today,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "n_showers": n,
        "mesh": list(data.mesh_shape),
        "data": what,
        "batch_size": BATCH,
        "seconds_per_case": seconds,
        "sharding_showers_per_s": n / t_shard,
        "shard_mib": shard_bytes / 2**20,
        "results": rows,
        "speedup_vs_h5py": verdict,
        "target_speedup": TARGET_SPEEDUP,
        "float16": precision,
    }
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
