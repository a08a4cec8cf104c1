"""``caloforge data simulate``: simulate showers with the built-in GFlash-style simulator into native HDF5.

    caloforge data simulate --detector lar-pb --particles e-,gamma,pi+ --n 10000 --energy-gev 1:1000 \\
        --log-uniform --theta-deg 50:130 [--phi-deg -180:180] --seed 7 --out DIR

writes ``DIR/<detector>.h5`` (``caloforge.datasets.formats.native``, recording the full ``DetectorSpec``) per
detector of the comma list (built-in names or detector YAML paths); detector i gets the seed
``caloforge.datasets.prepare.detector_seed(seed, i)``, the same as detector i of a training config's
``data.simulate`` block (so ``--seed 7`` and ``data.simulate.seed: 7`` give identical showers). The group
``caloforge data`` calls ``register`` with its subparsers.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import numpy as np

from caloforge import paths

_NUMBER = r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?"
_NEGATIVE_RANGE = re.compile(rf"^-(\d+\.?\d*|\.\d+)(e-?\d+)?(:{_NUMBER})?$")


def register(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to the ``caloforge data`` group."""
    p = data_subparsers.add_parser(
        "simulate",
        help="simulate showers with the built-in GFlash-style simulator (not Geant4)",
        description=(
            "Simulate showers with the built-in GFlash-style simulator (docs/simulator.md) and write "
            "DIR/<detector>.h5 (native CaloForge HDF5) for each detector. Ranges are LOW:HIGH (LOW == HIGH "
            "fixes the value)."
        ),
    )
    p.add_argument(
        "--detector",
        required=True,
        help="built-in detector name(s), comma separated (e.g. par04-siw,lar-pb), or a detector YAML path",
    )
    p.add_argument(
        "--particles",
        default=None,
        help="comma-separated particle names or PDG ids (default: the detector's 'particles' list)",
    )
    p.add_argument("--n", type=int, required=True, help="showers per detector")
    p.add_argument(
        "--energy-gev",
        default=None,
        metavar="LOW:HIGH",
        help="incident energy range in GeV (default: the detector's energy_range_gev)",
    )
    p.add_argument(
        "--log-uniform", action="store_true", help="draw energies log-uniformly (default: uniform)"
    )
    p.add_argument(
        "--theta-deg",
        default="90:90",
        metavar="LOW:HIGH",
        help="polar angle range in degrees (default 90:90)",
    )
    p.add_argument(
        "--phi-deg",
        default="-180:180",
        metavar="LOW:HIGH",
        help="azimuth range in degrees (default -180:180)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: $CALOFORGE_HOME/data/simulated)",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar"
    )
    p.set_defaults(func=run)
    # let "--phi-deg -180:180" through: argparse takes a leading "-" for an option unless the word looks
    # like a negative number, and only knows plain numbers (this parser has no option starting "-<digit>")
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = _NEGATIVE_RANGE
    return p


def parse_range(text: str | None, name: str) -> tuple[float, float] | None:
    """``"1:1000"`` → (1.0, 1000.0); a single number fixes the value; None stays None."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise ValueError(f"{name}: expected LOW:HIGH numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: expected LOW:HIGH finite numbers, got {text!r}")
    if values[0] > values[1]:
        raise ValueError(f"{name}: LOW {values[0]:g} > HIGH {values[1]:g} in {text!r}")
    return values[0], values[1]


def parse_list(text: str, name: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise ValueError(f"{name}: expected a comma-separated list without empty entries, got {text!r}")
    return items


def run(args: argparse.Namespace) -> int:
    """Handler of ``caloforge data simulate``; user mistakes raise ValueError (printed by the CLI)."""
    from caloforge.datasets.formats import native
    from caloforge.datasets.prepare import detector_seed
    from caloforge.datasets.simulator import sample_conditions, simulate
    from caloforge.platform.conditioning import particle_name
    from caloforge.platform.geometry import load_detector

    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {args.seed}")
    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of showers, got {args.n}")
    names = parse_list(args.detector, "--detector")
    if len(set(names)) != len(names):
        raise ValueError(f"--detector: duplicate entries in {args.detector!r}")
    detectors = [load_detector(n) for n in names]  # all validated before any work starts
    particles = parse_list(args.particles, "--particles") if args.particles is not None else None
    energy = parse_range(args.energy_gev, "--energy-gev")
    theta = parse_range(args.theta_deg, "--theta-deg")
    phi = parse_range(args.phi_deg, "--phi-deg")
    out_dir = Path(args.out) if args.out is not None else paths.data_dir() / "simulated"

    plans = []
    for i, det in enumerate(detectors):
        seed = detector_seed(args.seed, i)
        cond = sample_conditions(
            det,
            particles if particles is not None else list(det.particles),
            args.n,
            energy if energy is not None else det.energy_range_gev,
            args.log_uniform,
            theta,
            phi,
            seed,
        )
        plans.append((det, cond, seed))
    for det, cond, seed in plans:
        start = time.perf_counter()
        data = simulate(det, cond, seed, progress=args.progress)
        elapsed = time.perf_counter() - start
        path = native.write(out_dir / f"{det.name}.h5", data, detectors=[det])
        ratio = data.total_energy_mev() / cond.energy_mev
        per_particle = ", ".join(
            f"{particle_name(p)} {ratio[cond.pdg == p].mean():.3f}" for p in np.unique(cond.pdg)
        )
        print(
            f"{path}: {len(data)} showers ({det.name}, seed {seed}); mean E_tot/E_inc: {per_particle}; "
            f"{elapsed:.1f} s, {len(data) / max(elapsed, 1e-9):.0f} showers/s"
        )
    return 0
