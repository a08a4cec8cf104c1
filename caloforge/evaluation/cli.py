"""``caloforge evaluate``: evaluate a model bundle or an existing sample against a reference.

Examples::

    caloforge evaluate --model runs/x/bundle --reference data/shards --n 20000 --out eval/x
    caloforge evaluate --generated gen.h5 --reference ref.h5 --detector par04-siw --out eval/y \
        --config configs/eval/default.yaml --set classifier.epochs=20
    caloforge evaluate --model bundle --reference ref.h5 --n 10000 --out eval/z \
        --write-calochallenge eval/z/generated_cc.h5   # then run the official evaluate.py on it

``--reference`` is a shard directory (``caloforge data shard``; ``--split``, default ``test``) or an HDF5
file (native, CaloChallenge or LEMURS; ``--detector`` names the detector of files that do not record it, as
a built-in name or a detector YAML). Each detector's geometry and voxel threshold come from the DetectorSpec
the inputs record (the shard manifest, native files) or ``--detector``'s YAML, else the built-in detector of
that name, else (``--model``) the bundle's mesh.
The report (report.json, report.md, PNGs) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from caloforge.config import add_config_args

log = logging.getLogger("caloforge.evaluation")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle or generated showers against reference showers",
        description=(
            "CaloChallenge-style evaluation (HLF separation powers, FPD/KPD, classifier AUCs, PRDC, "
            "data-vs-data floor, per detector/particle/energy groups) written as report.json, report.md and "
            "PNG plots."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, metavar="BUNDLE_DIR", help="model bundle to generate from")
    src.add_argument(
        "--generated", type=Path, metavar="FILE", help="existing sample (native/CaloChallenge/LEMURS HDF5)"
    )
    p.add_argument(
        "--reference", type=Path, required=True, metavar="SHARDS_DIR_OR_HDF5", help="reference showers"
    )
    p.add_argument("--split", default="test", help="split of a shard directory reference (default: test)")
    p.add_argument(
        "--n",
        type=int,
        help="number of showers to evaluate (model: generated with the conditions of n "
        "seeded reference showers; --generated: cap on each set)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory for the report")
    p.add_argument(
        "--detector",
        help="detector of HDF5 inputs that do not record one (CaloChallenge/LEMURS): a built-in name or a "
        "detector YAML (whose geometry and threshold the evaluation then uses)",
    )
    p.add_argument(
        "--calibration", type=float, help="factor applied to CaloChallenge/LEMURS voxels when reading"
    )
    p.add_argument("--num-steps", type=int, help="model: sampler steps (default: the bundle's)")
    p.add_argument("--sampler", help="model: sampler name (default: the bundle's)")
    p.add_argument("--batch-size", type=int, default=256, help="model: generation batch size")
    p.add_argument("--device", default=None, help="model: device to generate on (default cpu)")
    p.add_argument(
        "--write-calochallenge",
        type=Path,
        metavar="FILE",
        help="also write the evaluated sample as a CaloChallenge HDF5 file",
    )
    p.add_argument(
        "--write-calochallenge-reference",
        type=Path,
        metavar="FILE",
        help="also write the matching reference showers as a CaloChallenge HDF5 file",
    )
    p.add_argument(
        "--write-calibration",
        type=float,
        default=1.0,
        help="CaloChallenge output: stored energies = factor × ours (default 1)",
    )
    add_config_args(p)
    p.set_defaults(func=_cmd_evaluate)


def _load_reference(args: argparse.Namespace):  # -> ShowerSet
    from caloforge.datasets.formats import read_any

    ref = Path(args.reference)
    if ref.is_dir():
        from caloforge.datasets.formats import resolve_detector
        from caloforge.datasets.streaming import load_split

        name = None if args.detector is None else resolve_detector(args.detector, path=ref, custom_ok=True)[0]
        return load_split(ref, args.split, detector=name)
    if not ref.is_file():
        raise ValueError(f"--reference {ref}: no such file or shard directory")
    return read_any(ref, detector=args.detector, calibration=_calibration_for(ref, args.calibration))


def _detector_specs(args: argparse.Namespace) -> dict:  # -> {name: DetectorSpec}
    """The DetectorSpecs the inputs record (shard manifest, native files) plus ``--detector`` as a YAML; two
    different specs under one name are an error."""
    from caloforge.datasets.formats import detect_format, native, resolve_detector
    from caloforge.datasets.shards import Manifest

    found: list[tuple[str, dict]] = []
    for path in (args.reference, args.generated):
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            found.append((str(path), Manifest.load(path).detector_specs()))
        elif path.is_file() and detect_format(path) == "native":
            found.append((str(path), native.read_detector_specs(path)))
    if args.detector is not None and native.declares_spec(args.detector):
        name, spec = resolve_detector(args.detector, path=args.reference)
        found.append((f"--detector {args.detector}", {name: spec}))
    specs: dict = {}
    origin: dict[str, str] = {}
    for where, entries in found:
        for name, spec in entries.items():
            if name in specs and specs[name] != spec:
                raise ValueError(
                    f"detector {name!r}: {where} gives a different DetectorSpec than {origin[name]}"
                )
            specs[name], origin[name] = spec, where
    return specs


def _calibration_for(path: Path, calibration: float | None) -> float | None:
    """``--calibration`` applies to CaloChallenge/LEMURS inputs only (native files are already calibrated)."""
    if calibration is None:
        return None
    from caloforge.datasets.formats import detect_format

    return None if detect_format(path) == "native" else calibration


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from caloforge.config import dump_yaml, load_config
    from caloforge.evaluation.config import EvalConfig

    config = load_config(EvalConfig, args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(config), end="")
        return 0
    if args.n is not None and args.n < 4:
        raise ValueError(f"--n must be >= 4, got {args.n}")

    from caloforge.datasets.formats import calochallenge, read_any
    from caloforge.evaluation.api import evaluate, generate_sample, load_model

    reference = _load_reference(args)
    specs = _detector_specs(args)
    log.info("reference: %d showers (%s) from %s", len(reference), reference.source, args.reference)
    model_mesh = None
    if args.model is not None:
        model = load_model(args.model, args.device)
        model_mesh = model.mesh
        sample, reference = generate_sample(
            model,
            reference,
            args.n,
            config.seed,
            num_steps=args.num_steps,
            sampler=args.sampler,
            batch_size=args.batch_size,
            device=args.device,
        )
        config = replace(config, conditions="match")
        gen_s = sample.metadata["generation_s"]
    else:
        sample = read_any(
            args.generated,
            detector=args.detector,
            calibration=_calibration_for(args.generated, args.calibration),
        )
        if args.n is not None:
            config = replace(config, max_showers=args.n)
        gen_s = None
    log.info("sample: %d showers (%s)", len(sample), sample.source)

    report = evaluate(sample, reference, config, detectors=specs, mesh=model_mesh)
    if gen_s is not None:
        report.info["generation_s"] = gen_s
        report.info["generation_ms_per_shower"] = round(1e3 * gen_s / len(sample), 4)
    report.info["reference_path"] = str(args.reference)
    report.info["sample_path"] = str(args.model if args.model is not None else args.generated)
    out = report.write(args.out)
    for target, data in ((args.write_calochallenge, sample), (args.write_calochallenge_reference, reference)):
        if target is not None:
            calochallenge.write(target, data, calibration=args.write_calibration, include_conditions=True)
            log.info("wrote %s (%d showers, CaloChallenge format)", target, len(data))

    m = report.metrics
    summary = [f"{k} = {m[k]:.4g}" for k in ("fpd", "kpd", "auc_low", "auc_high", "sep_power/mean") if k in m]
    print(f"evaluation written to {out}: " + ", ".join(summary))
    return 0
