"""``caloforge data``: simulate (when the simulator has landed), convert, shard, inspect.

- ``caloforge data shard [SOURCE ...] [--out DIR] [--config configs/data/X.yaml] [--set k=v] [--dry-run]``:
  sources as ``PATH[:format[:detector]]`` or from the config's ``sources:`` list (see ``docs/datasets.md``).
- ``caloforge data inspect DIR [--no-verify] [--json]``: the manifest as tables, then ``verify_shards``.
- ``caloforge data convert IN OUT --to native|calochallenge [--detector ...]``: chunked format conversion.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from caloforge.config import add_config_args

log = logging.getLogger("caloforge.datasets")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="datasets: simulate, convert, shard, inspect",
        description="Simulate, convert, shard and inspect calorimeter-shower datasets.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    if importlib.util.find_spec("caloforge.datasets.simulator.cli") is not None:
        importlib.import_module("caloforge.datasets.simulator.cli").register(sub)

    p = sub.add_parser(
        "shard",
        help="convert shower files into webdataset tar shards + manifest.json",
        description=(
            "Stream sources (native, CaloChallenge, LEMURS HDF5) into per-split tar shards with a manifest "
            "(counts, checksums, train-split statistics). Sources come from --config (sources: [...]) or the "
            "command line as PATH[:format[:detector]]; command-line sources replace the config's."
        ),
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="PATH[:format[:detector]]")
    p.add_argument("--out", help="output directory (overrides out_dir of the config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set at the output")
    add_config_args(p)
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser(
        "inspect",
        help="print a shard set's manifest and verify its shards",
        description=(
            "Print the manifest as tables, then verify every shard (size, sha256, tar structure, counts, "
            "finite energies, conditions and voxels) and record the verification (verified.json); exits "
            "non-zero on any problem."
        ),
    )
    p.add_argument("dir", help="shard directory (holding manifest.json)")
    p.add_argument("--no-verify", action="store_true", help="skip the verification of the shards")
    p.add_argument("--json", action="store_true", help="print the manifest JSON instead of tables")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a shower file (native/CaloChallenge/LEMURS) to native or CaloChallenge HDF5",
        description="Chunked conversion; see docs/datasets.md for the units and calibration conventions.",
    )
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument(
        "--from", dest="src_format", default="auto", choices=["auto", "native", "calochallenge", "lemurs"]
    )
    p.add_argument("--to", dest="dst_format", default="native", choices=["native", "calochallenge"])
    p.add_argument("--detector", help="detector name or YAML (needed for CaloChallenge/LEMURS input)")
    p.add_argument("--particle", help="particle name or PDG id (CaloChallenge/LEMURS input; default e-)")
    p.add_argument("--calibration", type=float, help="factor applied to the input voxels when reading")
    p.add_argument("--energy-unit", choices=["MeV", "GeV"], help="LEMURS input unit (default MeV)")
    p.add_argument("--mesh-shape", help="CaloChallenge input mesh: Z,P,R or auto|ds2|ds3")
    p.add_argument("--theta-rad", type=float, help="CaloChallenge input: incident θ (default π/2)")
    p.add_argument("--phi-rad", type=float, help="CaloChallenge input: incident φ (default 0)")
    p.add_argument("--start", type=int, default=0, help="first row to read")
    p.add_argument("--max-showers", type=int, help="read at most this many showers")
    p.add_argument("--chunk-size", type=int, default=2048, help="showers per chunk")
    p.add_argument("--clip-negative-mev", type=float, help="set negative voxels down to -X MeV to 0")
    p.add_argument(
        "--write-calibration", type=float, default=1.0, help="CaloChallenge output: stored = factor × ours"
    )
    p.add_argument(
        "--showers-dtype", default="float32", choices=["float32", "float64"], help="CaloChallenge output"
    )
    p.add_argument(
        "--include-conditions",
        action="store_true",
        help="CaloChallenge output: keep θ/φ/PDG as extra datasets",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_convert)


# -- shard ------------------------------------------------------------------------------------------------
def _cmd_shard(args: argparse.Namespace) -> int:
    from caloforge.config import apply_overrides, dump_yaml, from_dict, read_yaml, to_dict
    from caloforge.datasets.shards import ShardJob, SourceSpec, write_shards

    data: dict[str, Any] = read_yaml(args.config) if args.config else {}
    origin = str(args.config) if args.config else "<command line>"
    if args.sources:
        data["sources"] = [to_dict(SourceSpec.parse(s)) for s in args.sources]
    if args.out:
        data["out_dir"] = args.out
    if args.overwrite:
        data.setdefault("shards", {})["overwrite"] = True
    if args.overrides:
        data = apply_overrides(data, args.overrides)
        origin += " (with --set overrides)"
    job = from_dict(ShardJob, data, origin)
    if args.dry_run:
        print(dump_yaml(job), end="")
        return 0
    manifest = write_shards(job.sources, job.out_dir, job.shards, progress=True)
    print(format_manifest(manifest))
    return 0


# -- inspect ----------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_manifest(manifest: Any) -> str:
    """A shard set's manifest as plain-text tables."""
    d = manifest.data
    splits = manifest.splits
    out = [
        f"shard set {manifest.directory}  ({d['format']} v{d['format_version']}, "
        f"payload {manifest.payload_dtype}, "
        f"seed {d['config']['seed']}, manifest sha256 {manifest.fingerprint[:12]}…)",
        "",
    ]
    rows = []
    for det in manifest.detectors:
        entry = d["detectors"][det]
        spec = "mesh only" if set(entry) == {"mesh_shape"} else "DetectorSpec"
        per_split = [d["counts"][s]["per_detector"].get(det, 0) for s in splits]
        rng = d["ranges"]["per_detector"][det]
        e_lo, e_hi = rng["energy_mev"]
        t_lo, t_hi = rng["theta_rad"]
        rows.append(
            [
                det,
                "×".join(map(str, manifest.mesh_shape(det))),
                spec,
                *per_split,
                f"{e_lo / 1e3:.3g}–{e_hi / 1e3:.3g}",
                f"{t_lo:.3f}–{t_hi:.3f}",
            ]
        )
    totals = [d["counts"][s]["total"] for s in splits]
    rows.append(["total", "", "", *totals, "", ""])
    out.append(_table(["detector", "mesh Z×P×R", "geometry", *splits, "E [GeV]", "θ [rad]"], rows))
    out.append("")
    rows = []
    for det in manifest.detectors:
        for particle in d["particles"]:
            counts = [d["counts"][s]["per_detector_particle"].get(det, {}).get(particle, 0) for s in splits]
            if any(counts):
                rows.append([det, particle, *counts])
    out.append(_table(["detector", "particle", *splits], rows))
    out.append("")
    rows = []
    for s in splits:
        shards = manifest.shards(s)
        rows.append(
            [s, len(shards), sum(x.n_samples for x in shards), f"{sum(x.bytes for x in shards) / 2**20:.1f}"]
        )
    out.append(_table(["split", "shards", "showers", "MiB"], rows))
    out.append("")
    stats = d["stats"]
    rows = []
    blocks = [*((det, stats["per_detector"][det]) for det in sorted(stats["per_detector"]))]
    if stats.get("pooled") is not None:
        blocks.append(("pooled", stats["pooled"]))
    for name, st in blocks:
        rows.append(
            [
                name,
                st["n_showers"],
                f"{st['log_mean']:.4f}",
                f"{st['log_std']:.4f}",
                f"{st['occupancy']:.4f}",
                f"{st['etot_over_einc_mean']:.4f} ± {st['etot_over_einc_std']:.4f}",
            ]
        )
    out.append("train-split statistics")
    out.append(_table(["detector", "showers", "log mean", "log std", "occupancy", "E_tot/E_inc"], rows))
    return "\n".join(out)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from caloforge.datasets.shards import Manifest
    from caloforge.datasets.verify import verify_shards

    manifest = Manifest.load(args.dir)
    if args.json:
        print(json.dumps(manifest.data, indent=1, sort_keys=True))
    else:
        print(format_manifest(manifest))
    if args.no_verify:
        return 0
    report = verify_shards(args.dir, use_cache=False)
    print(f"\n{report.summary()}")
    return 0


# -- convert ----------------------------------------------------------------------------------------------
def _mesh_arg(text: str | None) -> Any:
    if text is None or text in ("auto", "ds2", "ds3"):
        return text
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--mesh-shape: expected Z,P,R or auto|ds2|ds3, got {text!r}") from None
    if len(shape) != 3:
        raise ValueError(f"--mesh-shape: expected three numbers Z,P,R, got {text!r}")
    return shape


def _input_specs(args: argparse.Namespace) -> list[Any]:
    """The DetectorSpecs a conversion to native records: those of a native input, else ``--detector``'s."""
    from caloforge.datasets import formats
    from caloforge.datasets.formats import native

    fmt = args.src_format if args.src_format != "auto" else formats.detect_format(args.input)
    if fmt == "native":
        return list(native.read_detector_specs(args.input).values())
    if args.detector is None:
        return []
    _, spec = formats.resolve_detector(args.detector, path=args.input, custom_ok=True)
    return [spec] if spec is not None else []


def _cmd_convert(args: argparse.Namespace) -> int:
    from caloforge.datasets import formats
    from caloforge.datasets.formats import calochallenge

    if args.output.exists() and not args.overwrite:
        raise ValueError(f"{args.output}: already exists (pass --overwrite to replace it)")
    if args.output.resolve() == args.input.resolve():
        raise ValueError(f"{args.output}: output and input are the same file")
    chunks = formats.iter_any(
        args.input,
        args.src_format,
        detector=args.detector,
        particle=args.particle,
        calibration=args.calibration,
        energy_unit=args.energy_unit,
        mesh_shape=_mesh_arg(args.mesh_shape),
        theta_rad=args.theta_rad,
        phi_rad=args.phi_rad,
        start=args.start or None,
        max_showers=args.max_showers,
        chunk_size=args.chunk_size,
        clip_negative_mev=args.clip_negative_mev,
    )
    writer: Any = None
    n = 0
    try:
        for chunk in chunks:
            if writer is None:
                if args.dst_format == "native":
                    meta = {"converted_from": str(args.input), "input_format": chunk.metadata.get("format")}
                    writer = formats.NativeWriter(
                        args.output, chunk.mesh_shape, chunk.source, chunk.seed, meta, _input_specs(args)
                    )
                else:
                    writer = calochallenge.CaloChallengeWriter(
                        args.output,
                        chunk.mesh_shape,
                        calibration=args.write_calibration,
                        showers_dtype=args.showers_dtype,
                        include_conditions=args.include_conditions,
                        source=chunk.source,
                    )
            writer.append(chunk)
            n += len(chunk)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise ValueError(f"{args.input}: no showers in the selected range")
    writer.close()
    print(f"wrote {n} showers to {args.output} ({args.dst_format})")
    return 0
