"""``caloforge adapt``: fine-tune a pretrained model to one detector, evaluate, gate and register it.

    caloforge adapt --base models:/caloforge-base@champion|BUNDLE_DIR --detector NAME|PATH.yaml \\
        --data SHARDS_DIR --config configs/adapt/full.yaml [--strategy full|lora|bias|embedding] \\
        [--set loop.steps=200] [--dry-run] [--resume] [--run-dir DIR]

Everything is checked before training starts (``adapt.pipeline.plan_adaptation``); ``--dry-run`` prints the
resolved config and that plan. ``--resume`` continues a run directory (after a crash: from its latest
checkpoint; a registered run is never registered again).

The same request to an adaptation service (``caloforge serve``; docs/service.md)::

    caloforge adapt submit --server URL --base NAME@ALIAS --detector NAME|PATH.yaml --data DIR [--wait]
    caloforge adapt status|cancel|events|wait JOB_ID --server URL
    caloforge adapt list --server URL [--status S] [--detector D]

The token comes from ``$CALOFORGE_TOKEN`` or ``~/.config/caloforge/token``; the server from ``--server``,
else ``$CALOFORGE_SERVER``, else http://127.0.0.1:8080.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from caloforge.config import add_config_args

DEFAULT_CONFIG = "configs/adapt/full.yaml"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "adapt",
        help="adapt a pretrained model to a detector (fine-tune, evaluate, gate, register)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", help="registry URI (models:/NAME@ALIAS, NAME@ALIAS) or bundle dir (required)")
    p.add_argument("--detector", help="built-in detector name or a detector YAML path (required)")
    p.add_argument("--data", type=Path, help="shard directory of that detector (required)")
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
    _register_client(p)
    return p


def _register_client(p: argparse.ArgumentParser) -> None:
    """``caloforge adapt submit|status|list|cancel|events|wait``: the adaptation service's client."""
    sub = p.add_subparsers(dest="adapt_command", metavar="{submit,status,list,cancel,events,wait}")

    def command(name: str, help: str, job: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--server", default=None, help="service URL (default $CALOFORGE_SERVER or :8080)")
        if job:
            c.add_argument("job_id")
        c.set_defaults(func=run_client)
        return c

    s = command("submit", "submit an adaptation request to a service", job=False)
    s.add_argument(
        "--base", required=True, help="registry URI (NAME@ALIAS, models:/...) known to the service"
    )
    s.add_argument(
        "--detector", required=True, help="built-in detector name, or a local detector YAML (sent)"
    )
    s.add_argument("--data", required=True, help="shard directory on the service (inside its data roots)")
    s.add_argument("--strategy", choices=("full", "lora", "bias", "embedding"), default="full")
    s.add_argument("--set", dest="hyperparameters", action="append", default=[], metavar="KEY.PATH=VALUE")
    s.add_argument("--distill", choices=("cd", "bns"), default=None, help="distil the adapted model")
    s.add_argument("--distill-steps", type=int, default=1, help="the student's sampling steps")
    s.add_argument("--model-name", default=None, help="registered model (default caloforge-<detector>)")
    s.add_argument("--alias", default="candidate", help="alias of the registered version")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument(
        "--idempotency-key", default=None, help="resubmitting with the same key returns the same job"
    )
    s.add_argument("--wait", action="store_true", help="wait until the job has finished")
    s.add_argument(
        "--quiet",
        action="store_true",
        help="print only the job id (JOB=$(caloforge adapt submit ... --quiet))",
    )
    command("status", "show a job")
    ls = command("list", "list jobs (newest first)", job=False)
    ls.add_argument("--status", default=None)
    ls.add_argument("--detector", default=None)
    ls.add_argument("--creator", default=None)
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor", default=None)
    command("cancel", "cancel a job")
    ev = command("events", "print a job's events")
    ev.add_argument("--after", type=int, default=0)
    ev.add_argument("--follow", action="store_true", help="stream events until the job has finished")
    w = command("wait", "wait until a job has finished (exit 0 only when it succeeded)")
    w.add_argument("--timeout", type=float, default=None, help="seconds")


def run(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("base", "detector", "data") if getattr(args, k) is None]
    if missing:
        raise ValueError(
            f"caloforge adapt: the following arguments are required: {', '.join(missing)} "
            "(or a service command: submit, status, list, cancel, events, wait)"
        )
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


# -- the service client -----------------------------------------------------------------------------------
def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    from caloforge.config import parse_override

    detector_path = Path(args.detector)
    if detector_path.suffix in (".yaml", ".yml") and detector_path.is_file():
        detector: dict[str, str] = {"yaml": detector_path.read_text()}
    else:
        detector = {"name": args.detector}
    hyper = {}
    for text in args.hyperparameters:
        parts, value = parse_override(text)
        hyper[".".join(parts)] = value
    metadata = {}
    for text in args.metadata:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {text!r}: expected KEY=VALUE")
        metadata[key] = value
    return {
        "base": args.base,
        "detector": detector,
        "data": args.data,
        "strategy": args.strategy,
        "hyperparameters": hyper,
        "distillation": None
        if args.distill is None
        else {"method": args.distill, "steps": args.distill_steps},
        "registration": {"model_name": args.model_name, "alias": args.alias},
        "seed": args.seed,
        "metadata": metadata,
    }


def _print_job(job: dict[str, Any]) -> None:
    rows = [
        ("job", job["id"]),
        ("status", job["status"] + (f" (stage {job['stage']})" if job.get("stage") else "")),
        ("detector", str((job["spec"].get("plan") or {}).get("detector", "?"))),
        ("base", job["spec"].get("base", "?")),
        ("creator", job["creator"]),
        ("created", job["created_at"]),
    ]
    if job.get("error"):
        rows.append(("error", job["error"]))
    result = job.get("result") or {}
    if result.get("uri"):
        rows.append(("registered", f"{result['uri']} @{', @'.join(result.get('aliases') or []) or '-'}"))
    if result.get("onnx_uri"):
        rows.append(("onnx", str(result["onnx_uri"])))
    for key in ("fpd", "kpd", "auc_low", "auc_high"):
        if key in (result.get("metrics") or {}):
            rows.append((key, f"{result['metrics'][key]:.4g}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _print_event(event: dict[str, Any]) -> None:
    stage = f" [{event['stage']}]" if event.get("stage") else ""
    print(f"{event['seq']:>4} {event['time']} {event['kind']:<6}{stage} {event['message']}", flush=True)


def run_client(args: argparse.Namespace) -> int:
    """The service commands; an API error prints ``caloforge: error: STATUS CODE: message (field F)``."""
    import sys

    from caloforge.adapt.service.client import AdaptationClient, ServiceError

    try:
        with AdaptationClient(args.server) as client:
            return _client_command(client, args)
    except ServiceError as exc:
        hint = {
            401: " (set CALOFORGE_TOKEN or ~/.config/caloforge/token)",
            0: " (is `caloforge serve` running?)",
        }
        print(f"caloforge: error: {exc}{hint.get(exc.status, '')}", file=sys.stderr)
        return 1


def _client_command(client: Any, args: argparse.Namespace) -> int:
    cmd = args.adapt_command
    if cmd == "submit":
        job = client.submit(_submit_body(args), idempotency_key=args.idempotency_key)
        if args.quiet:
            print(job["id"], flush=True)
            return 0 if not args.wait or client.wait(job["id"])["status"] == "succeeded" else 1
        _print_job(job)
        if args.wait:
            for _, event in client.stream(job["id"]):
                if "seq" in event:
                    _print_event(event)
            job = client.get(job["id"])
            _print_job(job)
            return 0 if job["status"] == "succeeded" else 1
        return 0
    if cmd == "status":
        _print_job(client.get(args.job_id))
        return 0
    if cmd == "list":
        jobs, cursor = client.list(
            status=args.status,
            detector=args.detector,
            creator=args.creator,
            limit=args.limit,
            cursor=args.cursor,
        )
        print(f"{'JOB':<32} {'STATUS':<11} {'STAGE':<9} {'DETECTOR':<16} {'CREATOR':<16} CREATED")
        for j in jobs:
            det = str((j["spec"].get("plan") or {}).get("detector", "?"))
            stage = j["stage"] or "-"
            print(
                f"{j['id']:<32} {j['status']:<11} {stage:<9} {det:<16} {j['creator']:<16} {j['created_at']}"
            )
        if cursor:
            print(f"# more: --cursor {cursor}")
        return 0
    if cmd == "cancel":
        _print_job(client.cancel(args.job_id))
        return 0
    if cmd == "events":
        if args.follow:
            for name, event in client.stream(args.job_id, after=args.after):
                if "seq" in event:
                    _print_event(event)
                elif name == "status":
                    print(f"     status {event['status']}", flush=True)
        else:
            for event in client.events(args.job_id, after=args.after):
                _print_event(event)
        return 0
    if cmd == "wait":
        job = client.wait(args.job_id, timeout=args.timeout)
        _print_job(job)
        return 0 if job["status"] == "succeeded" else 1
    raise ValueError(f"unknown adapt command {cmd!r}")
