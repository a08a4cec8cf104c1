"""Benchmark: showers/s per CPU core of the built-in GFlash-style simulator.

For every built-in detector, particle (e-, gamma, pi+ by default) and energy (10, 100 GeV), simulate N
showers at normal incidence (azimuth uniform) in one thread and report showers/s per core (from the process
CPU time, robust on a shared machine), the wall-clock rate, ms/shower and the mean E_tot/E_inc. Target
(docs/simulator.md §5): >= 200 showers/s per core for EM showers at 100 GeV on the 6480-voxel mesh.

    .venv/bin/python benchmarks/simulator.py [--quick] [--n 512] [--detectors par04-siw,pbwo4]
        [--particles e-,gamma,pi+] [--energies 10,100] [--profile]

Prints a table and writes benchmarks/results/<device>_<YYYY-MM-DD>_simulator.json.
"""

from __future__ import annotations

import os

# one core: set before numpy loads its thread pools
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402

from caloforge.datasets.simulator import SIMULATOR_VERSION, simulate  # noqa: E402
from caloforge.platform.conditioning import Conditions, pdg_of  # noqa: E402
from caloforge.platform.geometry import builtin_detector_names, load_detector  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_EM_100GEV = 200.0


def device_name() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:24] or "host"
    return f"cpu-{host}"


def _conditions(detector: str, particle: str, energy_gev: float, n: int) -> Conditions:
    """Normal incidence, azimuth uniform (seeded): cracks and plates are hit as often as in real data."""
    phi = np.random.default_rng(0).uniform(-math.pi, math.pi, n)
    return Conditions.make(np.full(n, energy_gev * 1000.0), math.pi / 2, phi, pdg_of(particle), detector)


def bench_one(detector: str, particle: str, energy_gev: float, n: int, repeats: int) -> dict:
    det = load_detector(detector)
    simulate(det, _conditions(detector, particle, energy_gev, 16), seed=0)  # warm-up (imports, caches)
    cond = _conditions(detector, particle, energy_gev, n)
    best_cpu = best_wall = math.inf
    data = None
    for r in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        data = simulate(det, cond, seed=1 + r)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    ratio = data.total_energy_mev() / cond.energy_mev
    return {
        "detector": detector,
        "particle": particle,
        "energy_gev": energy_gev,
        "n": n,
        "cpu_seconds": best_cpu,
        "wall_seconds": best_wall,
        "showers_per_s": n / best_cpu,  # per core: one thread, CPU time of this process
        "wall_showers_per_s": n / best_wall,
        "ms_per_shower": 1000.0 * best_cpu / n,
        "etot_over_einc_mean": float(ratio.mean()),
        "occupancy": float((data.showers_NZPR > 0).mean()),
    }


def profile_em(detector: str, energy_gev: float, n: int) -> str:
    det = load_detector(detector)
    cond = _conditions(detector, "e-", energy_gev, n)
    simulate(det, cond.subset(slice(0, 16)), seed=0)
    prof = cProfile.Profile()
    prof.enable()
    simulate(det, cond, seed=1)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def _run_table(
    detectors: list[str], particles: list[str], energies: list[float], n: int, repeats: int
) -> tuple[list[dict], bool]:
    rows = []
    header = (
        f"{'detector':14s} {'particle':8s} {'E/GeV':>6s} {'showers/s':>10s} {'ms/shower':>10s} "
        f"{'wall/s':>8s} {'Etot/Einc':>9s} {'occupancy':>9s}"
    )
    print(
        f"caloforge-gflash {SIMULATOR_VERSION} on {device_name()}: {n} showers x {repeats} repeats, 1 thread"
    )
    print(header)
    print("-" * len(header))
    for det in detectors:
        for particle in particles:
            for energy in energies:
                row = bench_one(det, particle, energy, n, repeats)
                rows.append(row)
                print(
                    f"{det:14s} {particle:8s} {energy:6.0f} {row['showers_per_s']:10.0f} "
                    f"{row['ms_per_shower']:10.3f} {row['wall_showers_per_s']:8.0f} "
                    f"{row['etot_over_einc_mean']:9.3f} {row['occupancy']:9.3f}",
                    flush=True,
                )
    em100 = [
        r["showers_per_s"]
        for r in rows
        if r["particle"] in ("e-", "e+", "gamma") and r["energy_gev"] == 100.0
    ]
    met = bool(em100) and min(em100) >= TARGET_EM_100GEV
    if em100:
        print(
            f"target >= {TARGET_EM_100GEV:.0f} showers/s/core for EM at 100 GeV: "
            f"{'met' if met else 'NOT met'} (min {min(em100):.0f}, max {max(em100):.0f})"
        )
    return rows, met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few showers, one repeat (smoke run)")
    parser.add_argument(
        "--n", type=int, default=None, help="showers per configuration (default 512; 64 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats, best kept (default 3; 1 with --quick)"
    )
    parser.add_argument("--detectors", default=None, help="comma list (default: all built-in detectors)")
    parser.add_argument("--particles", default="e-,gamma,pi+")
    parser.add_argument("--energies", default="10,100", help="GeV, comma list")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="the simulator is numpy: cpu only")
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile of e- 100 GeV in par04-siw"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    n = args.n or (64 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    detectors = args.detectors.split(",") if args.detectors else builtin_detector_names()
    particles = args.particles.split(",")
    energies = [float(e) for e in args.energies.split(",")]
    try:
        from threadpoolctl import threadpool_limits

        single_thread = threadpool_limits(limits=1)
    except ImportError:  # the environment variables above already pin numpy to one thread
        single_thread = contextlib.nullcontext()
    with single_thread:
        rows, met = _run_table(detectors, particles, energies, n, repeats)
        if args.profile:
            print(profile_em("par04-siw", 100.0, n))

    today = datetime.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{device_name()}_{today}_simulator.json"
    payload = {
        "benchmark": "simulator",
        "device": device_name(),
        "date": today,
        "threads": 1,
        "quick": args.quick,
        "simulator_version": SIMULATOR_VERSION,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "processor": platform.processor() or platform.machine(),
        "target_em_100gev_showers_per_s": TARGET_EM_100GEV,
        "target_met": met,
        "results": rows,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
