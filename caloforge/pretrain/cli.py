"""``caloforge pretrain``: distributed pretraining of the shower foundation model on Ray Train.

    caloforge pretrain --config configs/pretrain/debug.yaml [--set loop.steps=200 ...] [--run-name NAME]
                       [--resume | --resume-if-exists] [--dry-run]

Without ``RAY_ADDRESS`` an embedded local Ray is started for the run; with it (or under
``ray job submit -- caloforge pretrain ...``) the run goes to that cluster. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from caloforge.config import add_config_args

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain",
        help="distributed pretraining on Ray Train (DeepSpeed ZeRO or DDP)",
        description=(
            "Pretrain a ShowerModel on a shard set with Ray Train. Without RAY_ADDRESS an embedded local "
            "Ray is started (127.0.0.1, dashboard off); with RAY_ADDRESS (or inside `ray job submit`) the "
            "run goes to that cluster. The run lives in <cluster.storage_path>/<run name>; launching a name "
            "that exists is an error unless --resume is given."
        ),
        epilog="Docs: docs/pretraining.md. A Ray cluster belongs on a trusted network.",
    )
    add_config_args(p)
    p.add_argument(
        "--run-name",
        default=None,
        metavar="NAME",
        help="the run's name (default: the config's `name`); the run directory is <storage_path>/NAME",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the existing run NAME from its latest checkpoint (raise loop.steps to train longer)",
    )
    resume.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="resume NAME when it exists, else start it (for launchers that retry, e.g. a Kubernetes RayJob)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from caloforge.config import dump_yaml, load_config
    from caloforge.pretrain.config import PretrainConfig

    if not args.config:
        raise ValueError("pretrain: --config is required (e.g. configs/pretrain/debug.yaml)")
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        if cfg.engine.backend == "deepspeed":
            from caloforge.pretrain.deepspeed_backend import deepspeed_config

            ds = deepspeed_config(cfg, cfg.cluster.num_workers)
            print(f"# generated DeepSpeed config ({cfg.cluster.num_workers} workers):")
            print("\n".join(f"# {line}" for line in json.dumps(ds, indent=2).splitlines()))
        return 0
    from caloforge.pretrain.launch import run_pretrain

    try:
        resume = "auto" if args.resume_if_exists else args.resume
        result = run_pretrain(cfg, run_name=args.run_name, resume=resume)
    except RuntimeError as exc:
        print(f"caloforge: pretraining failed: {exc}", file=sys.stderr)
        return 1
    print(f"run        {result.run_name} ({result.run_uri})")
    print(
        f"steps      {result.step}"
        + (f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else "")
    )
    print(f"restarts   {max(0, result.worker_group_starts - 1)}")
    print(f"bundle     {result.bundle_uri}")
    if result.mlflow_run_id:
        print(f"mlflow     run {result.mlflow_run_id}")
    for key in sorted(result.metrics):
        print(f"  {key:40s} {result.metrics[key]:.6g}")
    return 0
