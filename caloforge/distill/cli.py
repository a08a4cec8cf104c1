"""``caloforge distill``: a few-step model from a teacher (consistency student or bespoke solvers), evaluated
against the teacher, gated and registered as a ``distilled`` version of the teacher's registered model.

    caloforge distill --teacher models:/NAME@ALIAS|BUNDLE_DIR --data SHARDS_DIR --method cd|shortcut|bns \\
        --config configs/distill/cd.yaml [--set loop.steps=200] [--dry-run] [--resume] [--run-dir DIR] \\
        [--student-init models:/NAME@fast|BUNDLE_DIR]

An adapted teacher distils like the base (CaloDiT-2): ``--student-init`` starts the consistency student from
the base's distilled student (its backbone; the adapted teacher's detector row, transforms and head) instead
of the teacher's weights (``cd.student_init``).

Everything is checked before training starts (``distill.pipeline.plan_distillation``); ``--dry-run`` prints
the resolved config and that plan. ``--resume`` continues a run directory (a registered run is never
registered again).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from caloforge.config import add_config_args

DEFAULT_CONFIG = "configs/distill/cd.yaml"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="distil a teacher into a few-step model (consistency student or bespoke solvers)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teacher", required=True, help="registry URI (models:/NAME@ALIAS, NAME@ALIAS) or bundle dir"
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="shard directory of detectors the teacher knows (its training data)",
    )
    p.add_argument(
        "--method", choices=("cd", "shortcut", "bns"), default=None, help="override the config's method"
    )
    p.add_argument(
        "--student-init",
        default=None,
        help="cd: start the student from this distilled student of the base (registry URI, e.g. "
        "models:/caloforge-base@fast, or bundle dir) instead of the teacher's weights (cd.student_init)",
    )
    add_config_args(p, default=DEFAULT_CONFIG)
    p.add_argument("--resume", action="store_true", help="continue the run directory's distillation")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default: $CALOFORGE_HOME/runs/distill-<teacher>-<method>-<config name>)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from caloforge.config import dump_yaml, load_config
    from caloforge.distill.config import DistillConfig
    from caloforge.distill.pipeline import DistillRequest, plan_distillation, run_distillation

    overrides = list(args.overrides)
    if args.method is not None:
        overrides.append(f"method={args.method}")
    if args.student_init is not None:
        overrides.append(f"cd.student_init={args.student_init}")
    config = load_config(DistillConfig, args.config, overrides)
    request = DistillRequest(teacher=args.teacher, data=args.data)
    if args.dry_run:
        print(dump_yaml(config), end="")
        with tempfile.TemporaryDirectory(prefix="caloforge-distill-plan-") as tmp:
            plan = plan_distillation(config, request, Path(tmp))
        print("# plan")
        for key, value in plan.describe().items():
            print(f"#   {key}: {value}")
        return 0
    result = run_distillation(config, request, args.run_dir, resume=args.resume)
    rows = [
        ("run directory", str(result.run_dir)),
        ("model bundle", str(result.model_dir)),
        ("teacher", result.parent_uri + (f" (v{result.parent_version})" if result.parent_version else "")),
        ("method", f"{result.method}: sampler {result.sampler} x {result.num_steps}"),
    ]
    if args.student_init is not None or config.cd.student_init is not None:
        rows.append(("student init", str(config.cd.student_init)))
    for n, rec in sorted(result.solvers.items(), key=lambda kv: int(kv[0])):
        rows.append((f"bespoke {n}-step", f"rmse {rec['rmse_bespoke']:.4g} (euler {rec['rmse_euler']:.4g})"))
    for key in ("fpd", "auc_low", "auc_high"):
        if key in result.metrics:
            rows.append(
                (
                    key,
                    f"{result.metrics[key]:.4g} "
                    f"(teacher {result.teacher_metrics.get(key, float('nan')):.4g})",
                )
            )
    rows.append(("gate", "passed" if result.gate.passed else "failed: " + "; ".join(result.gate.reasons())))
    if result.registered is not None:
        reg = result.registered
        rows.append(("registered", f"{reg['uri']} @{', @'.join(reg['aliases']) or '-'}"))
    rows.append(("wall time", f"{result.wall_time_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
