"""``caloforge registry ...`` and ``caloforge export ...``.

- ``caloforge registry list [--json]``: registered models, latest versions, aliases.
- ``caloforge registry show MODEL [--json]``: one version (``NAME``, ``NAME@ALIAS``, ``models:/NAME/3``);
  a bare ``NAME`` shows every version.
- ``caloforge registry search --tag KEY=VALUE ... [--name NAME] [--json]``: versions by tag
  (``detector=lar-pb``, ``particle=pi+``, ``kind=adapted``, ``metric.fpd=...``).
- ``caloforge registry register BUNDLE --kind base|adapted|distilled [--name] [--tag K=V] [--metric K=V]
  [--run-id] [--alias A] [--description]``.
- ``caloforge registry promote NAME VERSION --alias champion --reason TEXT``.
- ``caloforge registry pull NAME [--alias champion | --version N] --format onnx|torch --out DIR [--steps N]``:
  the exported model + ``model_card.json``.
- ``caloforge registry generate MODEL --energy-mev E --particle P --detector D [-n N] --out FILE.npy
  [--strict]``: showers (N, Z, P, R) MeV from a registered model, a bundle directory or a pulled ONNX
  directory; conditions outside the trained ranges warn, or are refused with ``--strict``.
- ``caloforge export --model URI_OR_DIR --format onnx|torch [--steps N] --out DIR``.

ONNX exports take ``--variant plain|optimized|int8|int8-attn|int8-static`` (default ``optimized``),
``--gate-config FILE.yaml`` (fidelity-gate bounds) and ``--calibration-showers N`` (``int8-static``).

Every command takes ``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``, else the sqlite store under
``$CALOFORGE_HOME/mlflow``). mlflow/torch are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from caloforge.registry.optimize import VARIANTS

log = logging.getLogger("caloforge.registry")


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"empty key in {text!r}")
    return key.strip(), value.strip()


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under $CALOFORGE_HOME/mlflow)",
    )


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", dest="fmt", choices=["onnx", "torch"], default="onnx", help="default onnx")
    p.add_argument("--out", required=True, type=Path, help="output directory (model file + model_card.json)")
    p.add_argument(
        "--steps", type=int, help="sampler steps frozen into the ONNX graph (default: the model's)"
    )
    p.add_argument("--sampler", help="sampler for the ONNX graph (default: the model's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo", help="torch.onnx exporter")
    p.add_argument("--rtol", type=float, default=1e-3, help="parity tolerance, relative (default 1e-3)")
    p.add_argument(
        "--atol-mev", type=float, default=1e-5, help="parity tolerance, absolute MeV (default 1e-5)"
    )
    p.add_argument(
        "--max-mismatch-fraction",
        type=float,
        default=1e-3,
        help="parity: fraction of voxels allowed beyond the tolerance (float32 rounding compounded over a "
        "many-step solve; default 1e-3)",
    )
    p.add_argument(
        "--outlier-limit",
        type=float,
        default=10.0,
        help="parity: no voxel beyond this many times its tolerance (default 10)",
    )
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="optimized",
        help="ONNX graph written: plain fp32 (standard ops), optimized (default: fp32 + ORT fusions), "
        "int8 (dynamic quantisation of the token-wise MatMuls), int8-attn (also the attention MatMuls), "
        "int8-static (calibrated QDQ); all but plain pass the fidelity gate",
    )
    p.add_argument(
        "--gate-config",
        type=Path,
        help="fidelity gate bounds, YAML (FidelityGateConfig; defaults: configs/export/fidelity_gate.yaml)",
    )
    p.add_argument(
        "--calibration-showers",
        type=int,
        default=64,
        help="int8-static: calibration inputs from the trained ranges (default 64)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``registry`` and ``export`` commands."""
    parser = subparsers.add_parser(
        "registry",
        help="model registry (MLflow): list, show, search, register, promote, pull, generate",
        description="Registered CaloForge models: one MLflow registered model per detector family.",
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    sub = parser.add_subparsers(dest="registry_command", metavar="ACTION")

    p = sub.add_parser("list", help="registered models with latest version and aliases")
    p.add_argument("--json", action="store_true")
    _add_tracking(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="one version (NAME@ALIAS, models:/NAME/N) or all versions of NAME")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    _add_tracking(p)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("search", help="versions whose tags match (detector=, particle=, kind=, ...)")
    p.add_argument("--tag", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="only this registered model")
    p.add_argument("--json", action="store_true")
    _add_tracking(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("register", help="register a bundle directory as a new version")
    p.add_argument("bundle", type=Path)
    p.add_argument("--kind", choices=["base", "adapted", "distilled"], required=True)
    p.add_argument("--name", help="registered model (default caloforge-base / caloforge-<target detector>)")
    p.add_argument(
        "--tag", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="e.g. parent_uri=..."
    )
    p.add_argument(
        "--metric", type=_kv, action="append", default=[], metavar="NAME=VALUE", help="e.g. fpd=20.1"
    )
    p.add_argument("--run-id", help="attach to this MLflow run (default: a new registration run)")
    p.add_argument("--alias", action="append", default=[], help="alias to set on the new version")
    p.add_argument("--description")
    p.add_argument("--json", action="store_true")
    _add_tracking(p)
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("promote", help="move an alias (champion/candidate) to a version, with a reason")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="champion", help="default champion")
    p.add_argument("--reason", required=True, help="why (recorded with a timestamp)")
    _add_tracking(p)
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("pull", help="download a version and write the ONNX file (or bundle) + model card")
    p.add_argument("model", help="NAME, NAME@ALIAS or models:/NAME/N")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--alias", help="e.g. champion")
    group.add_argument("--version", type=int)
    _add_export_options(p)
    _add_tracking(p)
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("generate", help="showers from a registered model, bundle or pulled ONNX directory")
    p.add_argument("model", help="NAME@ALIAS, models:/NAME/N, a bundle directory or a pulled ONNX directory")
    p.add_argument("--energy-mev", type=float, required=True)
    p.add_argument("--theta-rad", type=float, default=math.pi / 2)
    p.add_argument("--phi-rad", type=float, default=0.0)
    p.add_argument("--particle", required=True, help="name (e-, pi+, ...) or PDG id")
    p.add_argument("--detector", required=True)
    p.add_argument("-n", "--num", type=int, default=1, help="number of showers (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampler steps (bundle/registry models; default: the model's)")
    p.add_argument("--strict", action="store_true", help="refuse conditions outside the trained ranges")
    p.add_argument("--out", type=Path, required=True, help="output .npy: float32 (N, Z, P, R) MeV")
    _add_tracking(p)
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser(
        "export",
        help="export a model (registry URI or bundle directory) to ONNX or a torch bundle + model card",
        description=(
            "ONNX: the sampler unrolled for a fixed number of steps, preprocessing and inverse transform "
            "inside the graph, dynamic batch; onnxruntime parity against PyTorch is checked and a failing "
            "export is not written. torch: a verified copy of the safetensors bundle. See "
            "docs/inference_contract.md."
        ),
    )
    p.add_argument("--model", required=True, help="bundle directory or NAME@ALIAS / models:/NAME/N")
    _add_export_options(p)
    _add_tracking(p)
    p.set_defaults(func=_cmd_export)


def _store(args: argparse.Namespace) -> Any:
    from caloforge.registry.store import RegistryStore

    return RegistryStore(tracking_uri=args.tracking_uri)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "-"


def _print_versions(versions: list[Any]) -> None:
    if not versions:
        print("(no matching versions)")
        return
    print(f"{'model':<28} {'ver':>4} {'kind':<10} {'aliases':<20} {'detectors':<24} metrics")
    for v in versions:
        print(
            f"{v.name:<28} {v.version:>4} {v.kind:<10} {','.join(v.aliases) or '-':<20} "
            f"{','.join(v.detectors):<24} {_fmt_metrics(v.metrics)}"
        )


def _cmd_list(args: argparse.Namespace) -> int:
    models = _store(args).list_models()
    if args.json:
        _print_json([m.to_dict() for m in models])
        return 0
    if not models:
        print("(no registered models)")
        return 0
    print(f"{'model':<28} {'latest':>6}  aliases")
    for m in models:
        aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted(m.aliases.items())) or "-"
        print(f"{m.name:<28} {m.latest_version if m.latest_version is not None else '-':>6}  {aliases}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from caloforge.registry.bundle import parse_model_uri

    store = _store(args)
    name, version, alias = parse_model_uri(args.model)
    versions = [store.get(name, version, alias)] if version is not None or alias else store.versions(name)
    if args.json:
        _print_json([v.to_dict() for v in versions] if len(versions) != 1 else versions[0].to_dict())
        return 0
    for v in versions:
        d = v.to_dict()
        print(f"{v.uri}  aliases: {', '.join('@' + a for a in v.aliases) or '-'}")
        for key in ("kind", "detectors", "particles", "metrics", "lineage", "created", "run_id", "source"):
            print(f"  {key:<12} {d[key]}")
        if v.description:
            print("  description  " + v.description.replace("\n", "\n               "))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    versions = _store(args).search(dict(args.tag), name=args.name)
    if args.json:
        _print_json([v.to_dict() for v in versions])
    else:
        _print_versions(versions)
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    metrics = {}
    for key, value in args.metric:
        try:
            metrics[key] = float(value)
        except ValueError:
            raise ValueError(f"--metric {key}={value}: not a number") from None
    v = _store(args).register_bundle(
        args.bundle,
        name=args.name,
        kind=args.kind,
        tags=dict(args.tag),
        metrics=metrics,
        run_id=args.run_id,
        description=args.description,
        aliases=args.alias,
    )
    if args.json:
        _print_json(v.to_dict())
    else:
        print(f"registered {args.bundle} as {v.uri}" + (f" (@{', @'.join(v.aliases)})" if v.aliases else ""))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    v = _store(args).promote(args.name, args.version, alias=args.alias, reason=args.reason)
    record = json.loads(v.tags.get(f"caloforge.promotion.{args.alias}", "{}"))
    prev = record.get("previous_version")
    print(
        f"{v.uri} is now @{args.alias}"
        + (f" (was v{prev})" if prev else "")
        + f": {record.get('reason', '')}"
    )
    return 0


def _model_uri(model: str, alias: str | None, version: int | None) -> str:
    from caloforge.registry.bundle import parse_model_uri

    name, v, a = parse_model_uri(model)
    if (alias or version is not None) and (v is not None or a):
        raise ValueError(f"{model!r} already names a version/alias; drop --alias/--version")
    if alias:
        return f"models:/{name}@{alias}"
    if version is not None:
        return f"models:/{name}/{version}"
    return f"models:/{name}" + (f"/{v}" if v is not None else f"@{a}" if a else "")


def _export_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    gate = None
    if args.gate_config is not None:
        from caloforge.registry.fidelity import FidelityGateConfig

        gate = FidelityGateConfig.load(args.gate_config)
    if args.fmt == "torch" and args.variant != "optimized":
        raise ValueError("--variant applies to --format onnx; a torch bundle is the model itself")
    return {
        "variant": args.variant,
        "gate": gate,
        "calibration_showers": args.calibration_showers,
        "num_steps": args.steps,
        "sampler": args.sampler,
        "opset": args.opset,
        "exporter": args.exporter,
        "rtol": args.rtol,
        "atol_mev": args.atol_mev,
        "max_mismatch_fraction": args.max_mismatch_fraction,
        "outlier_limit": args.outlier_limit,
        "overwrite": args.overwrite,
    }


def _report_export(out: Path) -> None:
    from caloforge.registry.card import CARD_FILE, ModelCard

    card = ModelCard.load(out / CARD_FILE)
    exp = card.exports[-1]
    if exp["format"] == "onnx":
        p = exp["parity"]
        print(
            f"wrote {out / exp['file']} ({exp.get('variant', 'plain')}: {exp.get('precision', 'fp32')}; "
            f"{exp['sampler']}×{exp['num_steps']}, opset {exp['opset']}); parity vs PyTorch "
            f"({exp.get('parity_of', 'published graph')}): max abs {p['max_abs_err_mev']:.3g} MeV, "
            f"max rel {p['max_rel_err']:.3g}, {p['n_mismatch']} of {p['n_voxels']} voxels beyond tolerance"
        )
        gate = exp.get("fidelity_gate")
        if gate:
            print(
                f"fidelity gate vs fp32 ({gate['n_showers']} showers): classifier AUC {gate['auc']:.3f} "
                f"(max {gate['auc_bound']:.3f}), energy response scale {gate['response_scale']:+.4f}, "
                f"resolution {gate['response_resolution']:+.4f}: passed"
            )
    else:
        print(f"wrote {out / exp['dir']} (safetensors bundle)")
    print(f"wrote {out / CARD_FILE}")


def _cmd_pull(args: argparse.Namespace) -> int:
    uri = _model_uri(args.model, args.alias, args.version)
    _store(args).pull(uri, args.out, args.fmt, **_export_kwargs(args))
    _report_export(args.out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    source = Path(args.model)
    if source.is_dir():
        from caloforge.registry.export import export_bundle

        export_bundle(source, args.out, args.fmt, **_export_kwargs(args))
    elif source.exists():
        raise ValueError(f"--model {source}: not a directory (give a bundle directory or a registry URI)")
    else:
        _store(args).pull(args.model, args.out, args.fmt, **_export_kwargs(args))
    _report_export(args.out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from caloforge.platform.conditioning import Conditions, pdg_of

    if args.num < 1:
        raise ValueError(f"-n must be >= 1, got {args.num}")
    if args.out.suffix != ".npy":
        raise ValueError(f"--out {args.out}: expected a .npy file")
    cond = Conditions.make(
        np.full(args.num, args.energy_mev),
        args.theta_rad,
        args.phi_rad,
        pdg_of(args.particle),
        args.detector,
    )
    source = Path(args.model)
    if source.is_dir() and (source / "model_card.json").is_file() and (source / "model.onnx").is_file():
        from caloforge.registry.onnx_runtime import OnnxShowerGenerator

        if args.steps is not None:
            raise ValueError("--steps: an ONNX file has its step count frozen in; pull another with --steps")
        showers = OnnxShowerGenerator.from_card(source).generate(cond, seed=args.seed, strict=args.strict)
    else:
        import tempfile

        from caloforge.registry.bundle import load_checked

        with tempfile.TemporaryDirectory(prefix="caloforge-generate-") as tmp:
            if source.is_dir():
                bundle = source / "bundle" if (source / "bundle" / "config.json").is_file() else source
            else:
                bundle = _store(args).download_bundle(args.model, Path(tmp) / "bundle")
            model, info = load_checked(bundle)
            info.ranges.check(cond, strict=args.strict)
            showers = model.generate(cond, num_steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp.npy")
    np.save(tmp_out, showers)
    tmp_out.replace(args.out)
    etot = showers.reshape(len(showers), -1).sum(axis=1)
    ratio = float(np.mean(etot)) / args.energy_mev
    print(f"wrote {args.out}: {showers.shape} float32 MeV; mean E_tot/E_inc {ratio:.3f}", file=sys.stderr)
    return 0
