"""``caloforge quickstart``: the whole pipeline on embedded defaults, small enough for a laptop.

Stages (each prints what it did; the last prints one summary table):

1. simulate a small multi-detector, multi-particle dataset with the built-in simulator and shard it into
   webdataset tar shards with a manifest (checksums verified): ``datasets.prepare.simulate_and_shard``, the
   code path of a training config's ``data.simulate`` block (same seeds);
2. stream a few mixed batches and measure the read throughput;
3. pretrain the ``debug`` model on the embedded local Ray with 2 workers (DeepSpeed ZeRO-2 on CPU),
   tracked in MLflow; the final bundle is registered as a ``caloforge-base`` version;
4. evaluate the model against the held-out test split (CaloChallenge-style metrics, report + plots);
5. pull the registered model back as ONNX, run it once with onnxruntime and print its URI;
6. request an adaptation of the base to ``lar-pb`` (held out of pretraining, a few hundred simulated
   showers) from the adaptation service, started embedded (``adapt.service.embedded.EmbeddedService``: the
   API on 127.0.0.1 and a free port, a generated ``submit`` token, a Ray head it owns sized for the
   machine): the Python client submits it, follows its events and waits; the job (a Ray job) fine-tunes,
   evaluates against the test split, gates, exports and registers ``caloforge-lar-pb``; the service and its
   Ray head are stopped afterwards (also on a failure);
7. pull ``caloforge-lar-pb`` as ONNX and run it; the summary shows both models side by side;
8. distil the adapted model to a 2-step bespoke solver (``caloforge distill --method bns``: its weights
   unchanged, so seconds of fitting), register it as a ``distilled`` version of ``caloforge-lar-pb``, pull
   it as ONNX and time it beside its teacher's graph.

So the one command does what users do: launch pretraining, request an adaptation, pull a model. Everything
lands under ``$CALOFORGE_HOME/quickstart`` (data, shards, runs, reports, the service's database and job
directories, the pulled models) and the default MLflow store; a new quickstart replaces its own previous
outputs in that folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from caloforge import paths
from caloforge.config import apply_overrides, dump_yaml, from_dict, load_config, read_yaml
from caloforge.datasets.prepare import SimulateConfig
from caloforge.datasets.shards import ShardConfig

log = logging.getLogger("caloforge.quickstart")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"
N_STAGES = 8


@dataclass(frozen=True)
class QuickAdapt:
    """The adaptation stage: the pretrained base adapted to a detector it never saw."""

    detector: str = "lar-pb"  # held out of the pretraining data
    n_showers: int = 400  # simulated in the target detector (80/10/10 train/val/test)
    config: Path = Path("configs/adapt/full.yaml")
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_showers < 100:
            raise ValueError(f"adapt.n_showers must be >= 100, got {self.n_showers}")


@dataclass(frozen=True)
class QuickDistill:
    """The distillation stage: the adapted model distilled to a few-step sampler (``caloforge distill``)."""

    config: Path = Path("configs/distill/bns.yaml")  # its method: bns (seconds), cd or shortcut (minutes)
    overrides: tuple[str, ...] = ()
    timing_batch: int = 16  # showers per ONNX call when timing teacher and student
    fidelity_showers: int = 200  # the student's export fidelity gate (the registry's default: 800)
    exporter: Literal["dynamo", "legacy"] = "legacy"  # the student's ONNX exporter (legacy: seconds)

    def __post_init__(self) -> None:
        if self.timing_batch < 1:
            raise ValueError(f"distill.timing_batch must be >= 1, got {self.timing_batch}")
        if self.fidelity_showers < 20:
            raise ValueError(f"distill.fidelity_showers must be >= 20, got {self.fidelity_showers}")


@dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart runs (``configs/quickstart.yaml``)."""

    simulate: SimulateConfig = field(
        default_factory=lambda: SimulateConfig(
            detectors=("par04-siw", "pbwo4", "fe-sci"),
            particles=("e-", "gamma", "pi+"),
            n_per_detector=600,
            theta_deg=(80.0, 100.0),
            shards=ShardConfig(showers_per_shard=40),
        )
    )
    stream_batches: int = 20
    stream_batch_size: int = 64
    pretrain_config: Path = Path("configs/pretrain/debug.yaml")
    pretrain_overrides: tuple[str, ...] = ()
    eval_config: Path = Path("configs/eval/ci.yaml")
    eval_showers: int = 200
    export_steps: int = 4
    adapt: QuickAdapt = field(default_factory=QuickAdapt)
    distill: QuickDistill = field(default_factory=QuickDistill)

    def __post_init__(self) -> None:
        if self.stream_batches < 1 or self.stream_batch_size < 1:
            raise ValueError("stream_batches and stream_batch_size must be >= 1")
        if self.eval_showers < 20:
            raise ValueError(f"eval_showers must be >= 20, got {self.eval_showers}")
        if self.export_steps < 1:
            raise ValueError(f"export_steps must be >= 1, got {self.export_steps}")


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() or path.exists() else ROOT / path


def _fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out)


def _stage(n: int, title: str) -> None:
    print(f"\n== [{n}/{N_STAGES}] {title}", flush=True)


def run(config: QuickstartConfig) -> dict[str, Any]:
    """Run all stages; returns the summary (also written to ``quickstart/summary.json``)."""
    import numpy as np

    from caloforge.datasets.formats import native
    from caloforge.datasets.prepare import simulate_and_shard
    from caloforge.datasets.shards import Manifest
    from caloforge.datasets.streaming import ShowerStream, StreamConfig, load_split
    from caloforge.platform.conditioning import particle_name

    base = paths.home() / "quickstart"
    if base.exists():
        log.info("removing the previous quickstart outputs in %s", base)
        _stop_stray_service(base)
        shutil.rmtree(base)
    base.mkdir(parents=True)
    summary: dict[str, Any] = {"home": str(base)}
    sim = config.simulate

    _stage(
        1,
        f"simulate {len(sim.detectors)} detectors × {len(sim.particles)} particles (caloforge-gflash) and "
        "shard them (the code path of a config's `data.simulate`)",
    )
    t0 = time.perf_counter()
    shard_dir = simulate_and_shard(sim, base / "data")
    simulate_s = time.perf_counter() - t0
    rows = []
    for raw in sorted((base / "data" / "raw").glob("*.h5")):
        data = native.read(raw)
        det = raw.stem
        ratio = data.total_energy_mev() / data.conditions.energy_mev
        per_particle = ", ".join(
            f"{particle_name(p)} {ratio[data.conditions.pdg == p].mean():.2f}"
            for p in np.unique(data.conditions.pdg)
        )
        rows.append([det, len(data), per_particle])
    print(_fmt_table(["detector", "showers", "mean E_tot/E_inc per particle"], rows))
    manifest = Manifest.load(shard_dir)
    problems = manifest.verify()
    if problems:
        raise ValueError(f"{shard_dir}: shard verification failed: {problems}")
    n_shards = sum(len(manifest.shards(s)) for s in manifest.splits)
    n_bytes = sum(p.stat().st_size for p in shard_dir.glob("*.tar"))
    print(
        f"{simulate_s:.1f} s; {n_shards} shards, {n_bytes / 2**20:.1f} MiB, checksums verified, "
        f"manifest {shard_dir}/manifest.json"
    )

    _stage(2, f"stream {config.stream_batches} mixed batches of {config.stream_batch_size}")
    stream = ShowerStream(
        shard_dir,
        StreamConfig(
            batch_size=config.stream_batch_size, shuffle_buffer=256, mixing="temperature", temperature=2.0
        ),
        split="train",
        seed=sim.seed,
    )
    seen: dict[str, int] = {}
    t0 = time.perf_counter()
    n_stream = 0
    it = iter(stream)
    for _ in range(config.stream_batches):
        batch = next(it)
        n_stream += len(batch)
        for d in batch.detector:
            seen[d] = seen.get(d, 0) + 1
    stream_s = time.perf_counter() - t0
    rate = n_stream / stream_s
    mb_s = rate * 4 * int(np.prod(manifest.mesh_shape(manifest.detectors[0]))) / 2**20
    print(f"{n_stream} showers in {stream_s:.2f} s: {rate:.0f} showers/s, {mb_s:.1f} MB/s; mix {seen}")
    counts = manifest.counts
    summary["data"] = {
        "detectors": list(sim.detectors),
        "particles": list(sim.particles),
        "showers": len(sim.detectors) * sim.n_per_detector,
        "shards": n_shards,
        "bytes": n_bytes,
        "stream_showers_per_s": round(rate, 1),
        "stream_mb_per_s": round(mb_s, 2),
        "counts": counts,
    }

    _stage(3, "pretrain on the embedded local Ray (2 workers, DeepSpeed) and register the bundle")
    from caloforge.pretrain.config import PretrainConfig
    from caloforge.pretrain.launch import run_pretrain

    raw = read_yaml(_resolve(config.pretrain_config))
    raw.setdefault("data", {}).pop("simulate", None)
    raw["data"]["shards"] = str(shard_dir)
    raw.setdefault("cluster", {})["storage_path"] = str(base / "runs")
    raw.setdefault("tracking", {})["register"] = True
    raw = apply_overrides(raw, config.pretrain_overrides)
    pre_cfg = from_dict(PretrainConfig, raw, f"{config.pretrain_config} (quickstart)")
    (base / "pretrain.yaml").write_text(dump_yaml(pre_cfg))
    t0 = time.perf_counter()
    result = run_pretrain(pre_cfg, run_name="quickstart")
    pretrain_s = time.perf_counter() - t0
    bundle = Path(result.bundle_uri)
    registered = result.registered[0] if result.registered else None
    model_uri = registered.uri if registered is not None else None
    print(
        f"{result.step} steps in {pretrain_s:.0f} s; "
        f"final loss {result.metrics.get('loss', float('nan')):.4f}; "
        f"bundle {bundle}; MLflow run {result.mlflow_run_id}; registered {model_uri}"
    )
    summary["pretrain"] = {
        "steps": result.step,
        "seconds": round(pretrain_s, 1),
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
        "bundle": str(bundle),
        "mlflow_run_id": result.mlflow_run_id,
        "model_uri": model_uri,
    }

    _stage(4, f"evaluate {config.eval_showers} generated showers against the test split")
    from caloforge.evaluation.api import evaluate_model
    from caloforge.evaluation.config import EvalConfig

    eval_cfg = load_config(EvalConfig, _resolve(config.eval_config))
    reference = load_split(shard_dir, "test")
    n_eval = min(config.eval_showers, len(reference))
    report = evaluate_model(bundle, reference, n_eval, eval_cfg)
    report_dir = base / "report"
    report.write(report_dir)
    keys = ("fpd", "kpd", "auc_low", "auc_high")
    rows = [
        [
            k,
            f"{report.metrics.get(k, float('nan')):.4g}",
            f"{report.metrics.get('floor/' + k, float('nan')):.4g}",
        ]
        for k in keys
    ]
    print(_fmt_table(["metric", "model", "data-vs-data floor"], rows))
    print(f"report: {report_dir}/report.md")
    summary["evaluation"] = {k: report.metrics.get(k) for k in keys} | {"report": str(report_dir)}

    _stage(5, "pull the registered model as ONNX and run it once with onnxruntime")
    from caloforge.registry.export import OnnxShowerGenerator
    from caloforge.registry.store import RegistryStore

    pulled = base / "pulled"
    if model_uri is None:
        raise ValueError("quickstart: the pretraining run registered no model (tracking.register is off?)")
    card_path = RegistryStore().pull(model_uri, pulled, "onnx", num_steps=config.export_steps)
    card = json.loads(card_path.read_text())
    cond = reference.conditions.subset(slice(0, 4))
    t0 = time.perf_counter()
    showers = OnnxShowerGenerator.from_card(pulled).generate(cond, seed=0)
    onnx_ms = 1e3 * (time.perf_counter() - t0) / len(cond)
    e_ratio = showers.reshape(len(cond), -1).sum(1) / cond.energy_mev
    print(f"ONNX {pulled}: {len(cond)} showers, {onnx_ms:.1f} ms/shower, E_tot/E_inc {np.round(e_ratio, 2)}")
    summary["registry"] = {
        "model_uri": model_uri,
        "onnx_dir": str(pulled),
        "card": card.get("name", card_path.name),
    }

    _stage(
        6,
        f"request an adaptation of the base to {config.adapt.detector} (never pretrained on, "
        f"{config.adapt.n_showers} simulated showers) from the adaptation service",
    )
    adapted = _adapt(config, base, model_uri)
    summary["adaptation"] = adapted

    _stage(7, f"pull caloforge-{Path(config.adapt.detector).stem} as ONNX and run it once")
    adapted_pulled = base / "pulled-adapted"
    RegistryStore().pull(adapted["uri"], adapted_pulled, "onnx", num_steps=config.export_steps)
    target_ref = load_split(adapted["data"], "test")
    cond = target_ref.conditions.subset(slice(0, 4))
    t0 = time.perf_counter()
    showers = OnnxShowerGenerator.from_card(adapted_pulled).generate(cond, seed=0)
    adapted_ms = 1e3 * (time.perf_counter() - t0) / len(cond)
    e_ratio = showers.reshape(len(cond), -1).sum(1) / cond.energy_mev
    print(f"ONNX {adapted_pulled}: {adapted_ms:.1f} ms/shower, E_tot/E_inc {np.round(e_ratio, 2)}")
    summary["adaptation"]["onnx_dir"] = str(adapted_pulled)

    nan = float("nan")
    print("\n== CaloForge quickstart summary")
    rows = [
        ["detectors", ", ".join(sim.detectors)],
        ["particles", ", ".join(sim.particles)],
        ["showers simulated", len(sim.detectors) * sim.n_per_detector],
        ["shards / bytes", f"{n_shards} / {n_bytes / 2**20:.1f} MiB"],
        ["stream throughput", f"{rate:.0f} showers/s ({mb_s:.1f} MB/s)"],
        ["pretraining", f"{result.step} steps, {pretrain_s:.0f} s, 2 Ray workers"],
    ]
    print(_fmt_table(["what", "value"], rows))
    am = adapted["metrics"]
    models = [
        ["model", model_uri, adapted["uri"]],
        ["detectors", ", ".join(sim.detectors), adapted["detector"]],
        [
            "how",
            f"pretrained, {result.step} steps",
            f"{adapted['strategy']} from {adapted['parent']}, {adapted['steps']} steps, "
            f"{adapted['train_showers']} showers",
        ],
        ["trainable parameters", "all", f"{adapted['trainable']:,} of {adapted['total']:,}"],
        [
            "FPD (floor)",
            f"{report.metrics.get('fpd', nan):.3g} ({report.metrics.get('floor/fpd', nan):.3g})",
            f"{am.get('fpd', nan):.3g} ({am.get('floor/fpd', nan):.3g})",
        ],
        [
            "AUC high-level (floor)",
            f"{report.metrics.get('auc_high', nan):.3f} ({report.metrics.get('floor/auc_high', nan):.3f})",
            f"{am.get('auc_high', nan):.3f} ({am.get('floor/auc_high', nan):.3f})",
        ],
        [
            "gate / aliases",
            "-",
            f"{'passed' if adapted['gate_passed'] else 'failed'}; @{', @'.join(adapted['aliases'])}",
        ],
        ["ONNX ms/shower", f"{onnx_ms:.1f}", f"{adapted_ms:.1f}"],
    ]
    print()
    print(_fmt_table(["", "base model", "adapted model"], models))
    _stage(8, f"distil {adapted['uri']} ({config.distill.config.stem}) and time it beside its teacher")
    summary["distillation"] = _distil(config, base, adapted, adapted_pulled)
    (base / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _adapt(config: QuickstartConfig, base: Path, base_uri: str | None) -> dict[str, Any]:
    """Stage 6: simulate the target detector, then request the adaptation of the registered base from the
    adaptation service (embedded) and wait for it; returns what the summary shows."""
    from caloforge.adapt.config import AdaptConfig
    from caloforge.adapt.service.client import AdaptationClient
    from caloforge.adapt.service.embedded import EmbeddedService
    from caloforge.datasets.prepare import simulate_and_shard
    from caloforge.datasets.shards import Manifest

    if base_uri is None:
        raise ValueError("quickstart: the pretraining run registered no model (tracking.register is off?)")
    q = config.adapt
    sim = SimulateConfig(
        detectors=(q.detector,),
        particles=config.simulate.particles,
        n_per_detector=q.n_showers,
        energy_gev=config.simulate.energy_gev,
        log_uniform=config.simulate.log_uniform,
        theta_deg=config.simulate.theta_deg,
        seed=config.simulate.seed + 1,
        shards=config.simulate.shards,
    )
    data = simulate_and_shard(sim, base / "adapt-data")
    adapt_cfg = load_config(AdaptConfig, _resolve(q.config), list(q.overrides))
    (base / "adapt.yaml").write_text(dump_yaml(adapt_cfg))
    # The service reads configs/adapt/<strategy>.yaml: give it exactly this config (overrides applied).
    configs = base / "service-configs"
    (configs / "adapt").mkdir(parents=True)
    (configs / "adapt" / f"{adapt_cfg.strategy.kind}.yaml").write_text(dump_yaml(adapt_cfg))
    request = {
        "base": base_uri,
        "detector": {"name": q.detector},
        "data": str(data),
        "strategy": adapt_cfg.strategy.kind,
        "seed": adapt_cfg.loop.seed,
        "registration": {"model_name": adapt_cfg.register.name, "alias": adapt_cfg.register.alias},
        "metadata": {"requested_by": "caloforge quickstart"},
    }
    t0 = time.perf_counter()
    # The job's own ONNX export is a by-product here (stage 7 pulls the registered model as users do): the
    # legacy exporter makes it in seconds where dynamo takes minutes on a small CPU machine.
    with EmbeddedService(
        base, data_roots=(base,), configs_dir=configs, token_name="quickstart", onnx_exporter="legacy"
    ) as service:
        print(
            f"service {service.url} (Ray head: {service.num_cpus} CPUs, token 'quickstart' with the submit "
            f"scope); submitting {q.detector} ({adapt_cfg.strategy.kind}, {adapt_cfg.loop.steps} steps)",
            flush=True,
        )
        with AdaptationClient(service.url, service.token) as client:
            job = client.submit(request, idempotency_key=f"quickstart-{q.detector}")
            print(f"job {job['id']}: {job['status']}", flush=True)
            trained: dict[str, Any] = {}
            for kind, event in client.stream(job["id"]):
                _print_job_event(kind, event)
                data_ = event.get("data") or {}
                if kind == "stage" and event.get("stage") == "adapt" and data_.get("phase") == "end":
                    trained = data_
            job = client.get(job["id"])
            if job["status"] != "succeeded":
                logs = client.logs(job["id"])
                tail = "\n".join(logs.splitlines()[-40:])
                raise RuntimeError(
                    f"quickstart: the adaptation job {job['id']} {job['status']}: {job['error']}\n"
                    f"last lines of its log:\n{tail}"
                )
    seconds = time.perf_counter() - t0
    result = job["result"]
    print(
        f"{adapt_cfg.strategy.kind}: {trained.get('trainable_parameters', 0):,} of "
        f"{trained.get('total_parameters', 0):,} parameters, {trained.get('steps')} steps; job {job['id']} "
        f"succeeded in {seconds:.0f} s; gate {'passed' if result['gate']['passed'] else 'failed'}; "
        f"registered {result['uri']} @{', @'.join(result['aliases'])}; ONNX {result['onnx_uri']}; "
        f"report {result['report_dir']}"
    )
    return {
        "detector": q.detector,
        "data": str(data),
        "train_showers": Manifest.load(data).counts["train"]["total"],
        "strategy": adapt_cfg.strategy.kind,
        "steps": trained.get("steps"),
        "seconds": round(seconds, 1),
        "trainable": trained.get("trainable_parameters", 0),
        "total": trained.get("total_parameters", 0),
        "metrics": result["metrics"],
        "gate_passed": result["gate"]["passed"],
        "uri": result["uri"],
        "aliases": result["aliases"],
        "parent": result["parent"]["uri"],
        "job": job["id"],
        "service_onnx": result["onnx_uri"],
        "report": result["report_dir"],
    }


def _print_job_event(kind: str, event: dict[str, Any]) -> None:
    """One line per stage start/end, status change, metric and error of the job's event stream."""
    data = event.get("data") or {}
    if kind == "status":
        print(f"  status {event['status']}" + (f" (stage {event['stage']})" if event.get("stage") else ""))
    elif kind == "stage":
        took = f" ({data['seconds']:.0f} s)" if data.get("phase") == "end" and "seconds" in data else ""
        print(f"  [{event.get('stage')}] {event['message']}{took}", flush=True)
    elif kind in ("error", "result"):
        print(f"  {kind}: {event['message']}", flush=True)


def _stop_stray_service(base: Path) -> None:
    """A Ray head that a killed quickstart left running: stopped before its folder is removed."""
    from caloforge.adapt.service.embedded import EmbeddedService

    if EmbeddedService.stop_leftovers(base):
        log.info("stopped the Ray head a previous quickstart left running")


def _distil(
    config: QuickstartConfig, base: Path, adapted: dict[str, Any], teacher_onnx: Path
) -> dict[str, Any]:
    """Stage 8: distil the adapted model (``caloforge distill``), register the student as a ``distilled``
    version of the adapted model's registered model, pull it as ONNX and time both graphs alike (one warm-up
    call, then the fastest of 3 at ``timing_batch``); prints the teacher-vs-student table."""
    import numpy as np

    from caloforge.datasets.streaming import load_split
    from caloforge.distill.config import DistillConfig
    from caloforge.distill.pipeline import DistillRequest, run_distillation
    from caloforge.registry.card import CARD_FILE, ModelCard
    from caloforge.registry.export import OnnxShowerGenerator
    from caloforge.registry.fidelity import FidelityGateConfig
    from caloforge.registry.store import RegistryStore

    q = config.distill
    if adapted.get("uri") is None:
        raise ValueError("quickstart: the adaptation registered no model (its register.enabled is off?)")
    cfg = load_config(DistillConfig, _resolve(q.config), list(q.overrides))
    (base / "distill.yaml").write_text(dump_yaml(cfg))
    t0 = time.perf_counter()
    result = run_distillation(
        cfg, DistillRequest(adapted["uri"], Path(adapted["data"])), base / "runs" / "distill"
    )
    fit_s = time.perf_counter() - t0
    reg = result.registered or {}
    if reg.get("uri") is None:
        raise ValueError("quickstart: the distillation registered no student (its register.enabled is off?)")
    student_onnx = base / "pulled-distilled"
    RegistryStore().pull(
        reg["uri"],
        student_onnx,
        "onnx",
        exporter=q.exporter,
        gate=FidelityGateConfig(n_showers=q.fidelity_showers),
    )
    cond = load_split(adapted["data"], "test").conditions
    cond = cond.subset(np.arange(q.timing_batch) % len(cond))
    timing: dict[str, float] = {}
    graph: dict[str, dict[str, Any]] = {}
    for name, onnx_dir in (("teacher", teacher_onnx), ("student", student_onnx)):
        gen = OnnxShowerGenerator.from_card(onnx_dir)
        gen.generate(cond, seed=0)  # warm-up
        best = math.inf
        for rep in range(3):
            t1 = time.perf_counter()
            gen.generate(cond, seed=1 + rep)
            best = min(best, time.perf_counter() - t1)
        timing[name] = 1e3 * best / len(cond)
        export = ModelCard.load(onnx_dir / CARD_FILE).exports[-1]
        graph[name] = {k: export.get(k) for k in ("sampler", "num_steps", "nfe", "exporter")}
    sm, tm = result.metrics, result.teacher_metrics
    nan = float("nan")
    print(
        f"{result.method}: {result.sampler} x {result.num_steps} in {fit_s:.0f} s; gate "
        f"{'passed' if result.gate.passed else 'failed: ' + '; '.join(result.gate.reasons())}; registered "
        f"{reg['uri']} @{', @'.join(reg.get('aliases', []))}; ONNX {student_onnx}"
    )
    rows = [
        ["model", adapted["uri"], reg["uri"]],
        [
            "how",
            f"{adapted['strategy']} adaptation, {adapted['steps']} steps",
            f"{result.method} from the adapted model, {fit_s:.0f} s",
        ],
        [
            "ONNX graph: sampler x steps (network calls, exporter)",
            *(
                f"{g['sampler']} x {g['num_steps']} ({g['nfe']}, {g['exporter']})"
                for g in (graph["teacher"], graph["student"])
            ),
        ],
        ["FPD (distillation's evaluation)", f"{tm.get('fpd', nan):.3g}", f"{sm.get('fpd', nan):.3g}"],
        ["AUC high-level", f"{tm.get('auc_high', nan):.3f}", f"{sm.get('auc_high', nan):.3f}"],
        [
            "gate / aliases",
            "-",
            f"{'passed' if result.gate.passed else 'failed'}; @{', @'.join(reg.get('aliases', []))}",
        ],
        [
            f"ONNX ms/shower (batch {q.timing_batch}, warm)",
            f"{timing['teacher']:.2f}",
            f"{timing['student']:.2f}",
        ],
    ]
    print()
    print(_fmt_table(["", "adapted model (teacher)", "distilled student"], rows))
    stage_s = time.perf_counter() - t0
    print(
        f"stage 8: {stage_s:.0f} s (distillation {fit_s:.0f} s, ONNX pull and timing {stage_s - fit_s:.0f} s)"
    )
    return {
        "method": result.method,
        "sampler": result.sampler,
        "num_steps": result.num_steps,
        "seconds": round(fit_s, 1),
        "stage_seconds": round(stage_s, 1),
        "uri": reg["uri"],
        "aliases": reg.get("aliases", []),
        "gate_passed": result.gate.passed,
        "metrics": result.metrics,
        "teacher_metrics": result.teacher_metrics,
        "onnx_graphs": graph,
        "onnx_ms_per_shower": {k: round(v, 3) for k, v in timing.items()},
        "onnx_dir": str(student_onnx),
    }


def _handler(args: argparse.Namespace) -> int:
    config = load_config(QuickstartConfig, args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(config), end="")
        return 0
    run(config)
    return 0


def register(subparsers: Any) -> None:
    from caloforge.config import add_config_args

    p = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline on embedded defaults (simulate to registry)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, default=str(DEFAULT_CONFIG.relative_to(ROOT)))
    p.set_defaults(func=_handler)


__all__ = ["QuickstartConfig", "register", "run"]
