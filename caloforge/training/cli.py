"""``caloforge train``: train a ShowerModel in one process from a config (``training/run.py``).

    caloforge train --config configs/train/debug.yaml [--set loop.steps=50] [--dry-run] [--run-dir DIR]

Running the same command again resumes from the run directory's latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from caloforge.config import add_config_args


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a shower model in one process (resumes an existing run directory)",
        description=(
            "Train a ShowerModel with the one training loop on one device: shards (or showers simulated "
            "into the run directory), EMA, checkpoints, metrics.jsonl, and the final bundle in "
            "RUN_DIR/model. Calling it again on the same run directory resumes from the latest checkpoint."
        ),
    )
    add_config_args(p)
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default: $CALOFORGE_HOME/runs/<config name>)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from caloforge import paths
    from caloforge.config import dump_yaml
    from caloforge.training.run import load_train_config

    if not args.config:
        raise ValueError("caloforge train: --config is required (e.g. configs/train/debug.yaml)")
    config = load_train_config(args.config, args.overrides)
    run_dir = args.run_dir if args.run_dir is not None else paths.runs_dir() / config.name
    if args.dry_run:
        print(f"# run directory: {run_dir}")
        print(dump_yaml(config), end="")
        return 0

    from caloforge.training.run import train

    result = train(config, run_dir)
    logging.getLogger("caloforge.training").debug("summary %s", result.to_dict())
    rows = [
        ("run directory", str(result.run_dir)),
        ("model bundle", str(result.model_dir)),
        ("shards", f"{result.manifest_dir} (manifest {result.manifest_hash[:12]})"),
        (
            "steps",
            str(result.steps)
            + (f" (resumed from {result.resumed_from.name})" if result.resumed_from else ""),
        ),
        ("final loss", f"{result.final_loss:.5g}"),
    ]
    for key in sorted(result.metrics):
        if key.startswith("eval/"):
            rows.append((key, f"{result.metrics[key]:.5g}"))
    if "samples_per_s" in result.metrics:
        rows.append(("samples/s", f"{result.metrics['samples_per_s']:.1f}"))
    rows.append(("wall time", f"{result.wall_time_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
