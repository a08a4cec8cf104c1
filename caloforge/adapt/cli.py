"""``caloforge adapt``: fine-tune a pretrained model to one detector, evaluate, gate and register it.

    caloforge adapt --base models:/caloforge-base@champion|BUNDLE_DIR --detector NAME|PATH.yaml \\
        --data SHARDS_DIR --config configs/adapt/full.yaml [--strategy full|lora|bias|embedding] \\
        [--set loop.steps=200] [--dry-run] [--resume] [--run-dir DIR]

Everything is checked before training starts (``adapt.pipeline.plan_adaptation``); ``--dry-run`` prints the
resolved config and that plan. ``--resume`` continues a run directory (after a crash: from its latest
checkpoint; a registered run is never registered again).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from caloforge.config import add_config_args

DEFAULT_CONFIG = "configs/adapt/full.yaml"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "adapt",
        help="adapt a pretrained model to a detector (fine-tune, evaluate, gate, register)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base", required=True, help="registry URI (models:/NAME@ALIAS, NAME@ALIAS) or bundle dir"
    )
    p.add_argument("--detector", required=True, help="built-in detector name or a detector YAML path")
    p.add_argument("--data", required=True, type=Path, help="shard directory of that detector")
    add_config_args(p, default=DEFAULT_CONFIG)
    p.add_argument(
        "--strategy",
        choices=("full", "lora", "bias", "embedding"),
        default=None,
        help="override strategy.kind of the config",
    )
    p.add_argument("--resume", action="store_true", help="continue the run directory's adaptation")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default: $CALOFORGE_HOME/runs/adapt-<detector>-<config name>)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from caloforge.adapt.config import AdaptConfig
    from caloforge.adapt.pipeline import AdaptRequest, plan_adaptation, run_adaptation
    from caloforge.config import dump_yaml, load_config

    overrides = list(args.overrides)
    if args.strategy is not None:
        overrides.append(f"strategy.kind={args.strategy}")
    config = load_config(AdaptConfig, args.config, overrides)
    request = AdaptRequest(base=args.base, detector=args.detector, data=args.data)
    if args.dry_run:
        print(dump_yaml(config), end="")
        with tempfile.TemporaryDirectory(prefix="caloforge-adapt-plan-") as tmp:
            plan = plan_adaptation(config, request, Path(tmp))
        print("# plan")
        for key, value in plan.describe().items():
            print(f"#   {key}: {value}")
        return 0
    result = run_adaptation(config, request, args.run_dir, resume=args.resume)
    rows = [
        ("run directory", str(result.run_dir)),
        ("model bundle", str(result.model_dir)),
        ("parent", result.parent_uri + (f" (v{result.parent_version})" if result.parent_version else "")),
        (
            "strategy",
            f"{result.strategy}: {result.trainable_parameters:,} of {result.total_parameters:,} train",
        ),
        ("steps", str(result.steps)),
    ]
    if result.adapter_dir is not None:
        rows.append(("LoRA adapter (peft)", str(result.adapter_dir)))
    for key in ("fpd", "kpd", "auc_low", "auc_high"):
        if key in result.metrics:
            floor = result.metrics.get(f"floor/{key}")
            rows.append(
                (key, f"{result.metrics[key]:.4g}" + (f" (floor {floor:.4g})" if floor is not None else ""))
            )
    rows.append(("gate", "passed" if result.gate.passed else "failed: " + "; ".join(result.gate.reasons())))
    if result.registered is not None:
        reg = result.registered
        rows.append(("registered", f"{reg['uri']} @{', @'.join(reg['aliases']) or '-'}"))
    rows.append(("report", str(result.report_dir / "report.md")))
    rows.append(("wall time", f"{result.wall_time_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
