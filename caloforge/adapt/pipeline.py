"""Adapt a pretrained model to one detector: validate → train → evaluate → gate → register.

``run_adaptation(config, request)`` is what ``caloforge adapt`` (and the adaptation service) runs:

1. **Validate before anything runs** (:func:`plan_adaptation`): the base model (a bundle directory, or a
   registry URI / ``NAME@ALIAS`` resolved to an exact version), the target detector (a built-in name or a
   detector YAML), the data (a shard set of that detector only, whose recorded spec and mesh match the
   YAML), a spare detector slot when the detector is new, the objective against the base's
   parametrisation, the evaluation split. Every problem is a ``ValueError`` naming it; nothing is written
   to the registry.
2. **Model**: the base with the detector in its vocabulary (a known detector continues from its own row; a
   new one takes a spare "K+1" slot, its row the mean of the known rows or ``strategy.init_from``'s);
   another mesh than the base's rebuilds the model for it (``platform.transfer.rebuild_for_mesh``: the
   transform refitted from the data, mesh-independent weights reused).
3. **Train** with the strategy's selection (``adapt.strategies``) through the one job assembly
   (``training.job``, ``adapt.job``) and loop, checkpointed in the run directory (``--resume`` continues):
   in this process, or on Ray Train workers (DeepSpeed or DDP) when the config has a ``cluster:`` block
   (``adapt.distributed``: the Ray path shared with pretraining).
4. **Bundle**: the EMA weights (LoRA merged), lineage ``kind=adapted`` with the parent's URI and version, the
   strategy, the objective and the trained ranges; a LoRA run also keeps its adapter in peft's format.
5. **Evaluate** against the detector's held-out split (``caloforge.evaluation``; report + plots) and apply
   the **gate** (``GateConfig``).
6. **Register** as a version of ``caloforge-<detector>`` with alias ``candidate`` and lineage/metric tags;
   ``champion`` moves to it when it passes the gate and beats the current champion on the gate metric.
   Registration is idempotent per run (a tag with the run id): a resumed run never registers twice, and the
   registrar rolls back a failed registration, so no half-registered version is left.

Run directory (default ``$CALOFORGE_HOME/runs/adapt-<detector>-<name>``)::

    request.json    base, detector, data and the resolved config (a resume must match it)
    base/           the downloaded base bundle (registry bases)
    checkpoints/    the loop's checkpoints (on Ray Train: checkpoint_<step>/, attempts/, logs/, final.json)
    metrics.jsonl   the log-step metrics; adapt.log; parameters.json (trainable and total counts)
    model/          the adapted bundle        adapter/   the LoRA adapter (peft format; lora only)
    report/         the evaluation report     result.json  the AdaptResult
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caloforge.adapt.config import AdaptConfig
from caloforge.adapt.job import TrainOutcome
from caloforge.config import to_dict
from caloforge.datasets.shards import Manifest
from caloforge.datasets.verify import verify_shards
from caloforge.platform.geometry import DetectorSpec, Mesh, builtin_detector_names, load_detector
from caloforge.platform.objectives import make_objective
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.rundir import run_logging, start_or_resume, write_json

__all__ = [
    "AdaptPlan",
    "AdaptRequest",
    "AdaptResult",
    "GateResult",
    "apply_gate",
    "plan_adaptation",
    "register_adaptation",
    "run_adaptation",
]

log = logging.getLogger("caloforge.adapt")

RUN_TAG = "caloforge.adapt_run"  # the registry tag that makes registration idempotent per run

StageCallback = Callable[[str, dict[str, Any]], None]
"""``on_stage(stage, data)``: called when a run enters a stage after training (``"evaluate"``, with the
steps and parameter counts); the adaptation service turns it into job events."""


@dataclass(frozen=True)
class AdaptRequest:
    """What a user asks for: ``base`` (a bundle directory, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``
    or ``NAME@ALIAS``), ``detector`` (a built-in name or a detector YAML path), ``data`` (a shard directory
    of that detector)."""

    base: str
    detector: str
    data: Path

    def to_dict(self) -> dict[str, str]:
        return {"base": self.base, "detector": self.detector, "data": str(Path(self.data).resolve())}


@dataclass(frozen=True)
class AdaptPlan:
    """The validated request (:func:`plan_adaptation`): what will run, decided before anything runs."""

    detector: DetectorSpec
    data_dir: Path
    manifest_hash: str
    base_dir: Path  # the bundle (downloaded for registry bases)
    parent_uri: str
    parent_version: str | None
    known_detector: bool  # the base knows the detector (continues from its row) or takes a spare slot
    data_mesh: Mesh
    rebuild_mesh: bool  # the data's mesh differs from the base's
    n_train: int
    n_eval: int
    objective: str
    register_name: str
    placement: str = ""  # where a rebuilt mesh sits in the base's position frame (platform.transfer)
    # the built-in detectors of the base that place a rebuilt mesh in its position frame (platform.transfer)
    source_detectors: tuple[DetectorSpec, ...] = ()
    warnings: tuple[str, ...] = ()  # what the plan advises against (logged; shown by --dry-run)

    def describe(self) -> dict[str, Any]:
        return {
            "detector": self.detector.name,
            "base": self.parent_uri + (f" (version {self.parent_version})" if self.parent_version else ""),
            "detector_row": "its own (known to the base)" if self.known_detector else "a spare slot (new)",
            "mesh": "x".join(map(str, self.data_mesh.shape))
            + (" (rebuilt from the base's)" if self.rebuild_mesh else " (the base's)"),
            **({"positions": self.placement} if self.rebuild_mesh else {}),
            **({"warnings": "; ".join(self.warnings)} if self.warnings else {}),
            "train_showers": self.n_train,
            "eval_showers": self.n_eval,
            "objective": self.objective,
            "registered_model": self.register_name,
        }


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: dict[str, dict[str, float | bool]] = field(default_factory=dict)  # name -> value, bound, ok

    def reasons(self) -> list[str]:
        return [
            f"{name} = {c['value']:.4g} > {c['bound']:.4g}" for name, c in self.checks.items() if not c["ok"]
        ]


@dataclass(frozen=True)
class AdaptResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    report_dir: Path
    strategy: str
    steps: int
    trainable_parameters: int
    total_parameters: int
    metrics: dict[str, float]
    gate: GateResult
    parent_uri: str
    parent_version: str | None
    registered: dict[str, Any] | None  # name, version, uri, aliases
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out, default=str))


# -- validation -------------------------------------------------------------------------------------------
def _check_detector_name(spec: DetectorSpec, given: str) -> None:
    if spec.name in builtin_detector_names() and Path(given).suffix in (".yaml", ".yml"):
        builtin = load_detector(spec.name)
        if builtin != spec:
            raise ValueError(
                f"detector: {given} is named {spec.name!r} like the built-in detector but describes another "
                "detector; give it its own name (the file stem and its `name:`)"
            )


def plan_adaptation(config: AdaptConfig, request: AdaptRequest, run_dir: Path) -> AdaptPlan:
    """Check everything that can be checked before training (see the module docstring)."""
    try:
        spec = load_detector(request.detector)
    except (ValueError, OSError) as exc:
        raise ValueError(f"detector: {exc}") from None
    _check_detector_name(spec, request.detector)
    data = Path(request.data)
    if not (data / "manifest.json").is_file():
        raise ValueError(f"data: {data} has no manifest.json (a shard directory from `caloforge data shard`)")
    manifest = Manifest.load(data)
    verify_shards(data)  # structure, counts, finite energies and conditions (cached by the fingerprint)
    if manifest.detectors != [spec.name]:
        raise ValueError(
            f"data: {data} holds showers of {manifest.detectors}; adapting to {spec.name!r} needs a shard "
            f"set of {spec.name!r} only"
        )
    recorded = manifest.detector_spec(spec.name)
    if recorded is None:
        raise ValueError(
            f"data: {data}/manifest.json records no spec for {spec.name!r}, so its geometry cannot be "
            "checked against the detector: re-shard with the detector given as a YAML path"
        )
    if recorded != spec:
        diff = sorted(k for k in to_dict(spec) if to_dict(spec)[k] != to_dict(recorded).get(k))
        raise ValueError(
            f"data: {data} was made for another {spec.name!r} than {request.detector} (differs in {diff})"
        )
    data_mesh = manifest.model_mesh([spec.name])
    for split in ("train", config.eval.split):
        if split not in manifest.splits or manifest.counts[split]["total"] < 1:
            raise ValueError(f"data: {data} has no {split!r} showers (splits: {manifest.counts})")
    n_eval = min(config.eval.n_showers, int(manifest.counts[config.eval.split]["total"]))
    if n_eval < 20:
        raise ValueError(
            f"data: {data} has {n_eval} {config.eval.split!r} showers; the evaluation needs >= 20"
        )

    from caloforge.registry.store import fetch_bundle

    base_dir, parent_uri, parent_version, _ = fetch_bundle(request.base, run_dir / "base", "base")
    base = ShowerModel.load(base_dir)
    known = spec.name in base.vocab.detectors
    if known and data_mesh.shape != base.mesh_shape:
        raise ValueError(
            f"detector: the base already knows {spec.name!r} on the mesh {base.mesh_shape}, but the data's "
            f"mesh is {data_mesh.shape}: a name used with a different mesh; rename the new detector"
        )
    if not known:
        base.vocab.with_detector(spec.name)  # ValueError when no spare slot is left
    init_from = config.strategy.init_from
    if init_from is not None and init_from not in base.vocab.detectors:
        raise ValueError(
            f"strategy.init_from: the base does not know {init_from!r} "
            f"(it knows {list(base.vocab.detectors)})"
        )
    if data_mesh.shape != base.mesh_shape:
        base.config.backbone_config().check_mesh(data_mesh.shape)  # the patch must divide the new mesh
    objective = make_objective(config.objective, base.config.parametrisation).name
    if config.cluster is not None:
        from caloforge.adapt.distributed import check_ray_plan

        check_ray_plan(config, run_dir, base.has_energy_head, len(manifest.shards("train")))
    if config.register.enabled:
        from caloforge.registry.versions import check_name, validate_alias

        check_name(config.register.name or f"caloforge-{spec.name}")
        validate_alias(config.register.alias)
    rebuild = data_mesh != base.mesh and data_mesh.shape != base.mesh_shape
    placement = ""
    sources: tuple[DetectorSpec, ...] = ()
    if rebuild:
        from caloforge.platform.transfer import place_mesh

        sources = base_detector_specs(base, exclude=spec.name)
        placement = place_mesh(base.config.position_frame, base.mesh_shape[0], spec, sources)[2]
    warnings: list[str] = []
    if rebuild and config.strategy.kind == "embedding" and not config.strategy.mesh_layers:
        warnings.append(
            f"strategy 'embedding' on another mesh than the base's ({data_mesh.shape} vs "
            f"{base.mesh_shape}) trains only the detector's row, while the patch embedding and output layer "
            "still read the base's voxel layout: measured unable to adapt (docs/adaptation.md, "
            "lar-pb-coarse: AUC 1.0); set strategy.mesh_layers: true, or use 'full' or 'lora'"
        )
    for warning in warnings:
        log.warning("%s", warning)
    return AdaptPlan(
        detector=spec,
        data_dir=data,
        manifest_hash=manifest.fingerprint,
        base_dir=base_dir,
        parent_uri=parent_uri,
        parent_version=parent_version,
        known_detector=known,
        data_mesh=data_mesh,
        rebuild_mesh=rebuild,
        n_train=int(manifest.counts["train"]["total"]),
        n_eval=n_eval,
        objective=objective,
        register_name=config.register.name or f"caloforge-{spec.name}",
        placement=placement,
        source_detectors=sources,
        warnings=tuple(warnings),
    )


def base_detector_specs(base: ShowerModel, exclude: str) -> tuple[DetectorSpec, ...]:
    """The specs of the base's detectors that are built in (what places a new mesh in the base's position
    frame, ``platform.transfer``); detectors only a user's YAML describes are left out, and logged."""
    builtin = set(builtin_detector_names())
    names = [d for d in base.vocab.detectors if d != exclude]
    unknown = [d for d in names if d not in builtin]
    if unknown:
        log.info("position frame: the base's detectors %s are not built in; placed without them", unknown)
    return tuple(load_detector(d) for d in names if d in builtin)


# -- gate -------------------------------------------------------------------------------------------------
def apply_gate(config: AdaptConfig, metrics: dict[str, float]) -> GateResult:
    """Check ``metrics`` (an evaluation with its floor) against the configured bounds."""
    gate = config.gate
    checks: dict[str, dict[str, float | bool]] = {}

    def check(name: str, value: float, bound: float) -> None:
        ok = math.isfinite(value) and value <= bound
        checks[name] = {"value": float(value), "bound": float(bound), "ok": bool(ok)}

    for key, bound in (("auc_low", gate.max_auc_low), ("auc_high", gate.max_auc_high)):
        if bound is not None:
            check(key, metrics.get(key, math.nan), bound)
    for key, bound in (("fpd", gate.max_fpd_over_floor), ("kpd", gate.max_kpd_over_floor)):
        if bound is not None:
            # The floor's scale: the data-vs-data value, or its statistical error when that is larger (FPD and
            # KPD are extrapolated / unbiased estimates: a small floor can come out near zero or below).
            scale = max(metrics.get(f"floor/{key}", math.nan), metrics.get(f"floor/{key}_err", math.nan))
            value = metrics.get(key, math.nan)
            ratio = value / scale if math.isfinite(scale) and scale > 0 else math.inf
            check(f"{key}_over_floor", ratio, bound)
    return GateResult(passed=all(bool(c["ok"]) for c in checks.values()), checks=checks)


# -- the run ----------------------------------------------------------------------------------------------
def _default_run_dir(config: AdaptConfig, request: AdaptRequest) -> Path:
    from caloforge import paths

    name = Path(request.detector).stem
    return paths.runs_dir() / f"adapt-{name}-{config.name}"


def run_adaptation(
    config: AdaptConfig,
    request: AdaptRequest,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    on_stage: StageCallback | None = None,
) -> AdaptResult:
    """Run (or resume) one adaptation; returns the :class:`AdaptResult` (also ``run_dir/result.json``).
    ``on_stage``: see :data:`StageCallback`."""
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(config, request)
    record = {"request": request.to_dict(), "config": to_dict(config)}
    with run_logging(run_dir, "adapt.log", config.torch_threads):
        return _run(config, request, run_dir, resume, record, on_stage)


def register_adaptation(
    config: AdaptConfig, request: AdaptRequest, result: AdaptResult, tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Register the model of a finished run made with ``register.enabled: false`` (its ``result``) exactly as
    :func:`run_adaptation` would have (``config.register``: name, alias, promotion; the same tags), plus
    ``tags`` on a new version (the adaptation service adds ``caloforge.service_job``). Idempotent per run:
    a run registered already is not registered again. Returns the ``registered`` record."""
    plan = plan_adaptation(config, request, result.run_dir)  # the base is reused from the run directory
    run_id = str(json.loads((result.run_dir / "request.json").read_text())["run_id"])
    trained, total = result.trainable_parameters, result.total_parameters
    return _register(
        config,
        plan,
        run_id,
        result.model_dir,
        result.metrics,
        result.gate,
        result.steps,
        trained,
        total,
        tags,
    )


def _run(
    config: AdaptConfig,
    request: AdaptRequest,
    run_dir: Path,
    resume: bool,
    record: dict[str, Any],
    on_stage: StageCallback | None = None,
) -> AdaptResult:
    t0 = time.perf_counter()
    plan = plan_adaptation(config, request, run_dir)
    run_id = start_or_resume(run_dir, record, resume, "an adaptation")
    log.info("adaptation %s: %s", run_dir, plan.describe())
    trained_run = _train(config, request, plan, run_dir, run_id, resume)
    model_dir, adapter_dir, steps = trained_run.model_dir, trained_run.adapter_dir, trained_run.steps
    trained, total = trained_run.trainable_parameters, trained_run.total_parameters
    if on_stage is not None:
        on_stage("evaluate", {"steps": steps, "trainable_parameters": trained, "total_parameters": total})
    metrics, report_dir = _evaluate(config, request, plan, model_dir, run_dir)
    gate = apply_gate(config, metrics)
    log.info("gate %s%s", "passed" if gate.passed else "failed: ", "; ".join(gate.reasons()))
    registered = None
    if config.register.enabled:
        registered = _register(config, plan, run_id, model_dir, metrics, gate, steps, trained, total)
    result = AdaptResult(
        run_dir=run_dir,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        report_dir=report_dir,
        strategy=config.strategy.kind,
        steps=steps,
        trainable_parameters=trained,
        total_parameters=total,
        metrics=metrics,
        gate=gate,
        parent_uri=plan.parent_uri,
        parent_version=plan.parent_version,
        registered=registered,
        wall_time_s=time.perf_counter() - t0,
    )
    write_json(run_dir / "result.json", result.to_dict())
    return result


def _train(
    config: AdaptConfig, request: AdaptRequest, plan: AdaptPlan, run_dir: Path, run_id: str, resume: bool
) -> TrainOutcome:
    """The training step: the bundle (and LoRA adapter) in ``run_dir``; in this process, or on Ray Train
    workers when the config has a ``cluster:`` block."""
    from caloforge.adapt.job import prepare_model, report_parameters, train_here

    prepared = prepare_model(config, plan)
    report_parameters(config, prepared, run_dir)
    if config.cluster is None:
        return train_here(config, request, plan, prepared, run_dir)
    from caloforge.adapt.distributed import train_on_ray

    del prepared  # each worker builds its own
    return train_on_ray(config, request, plan, run_dir, run_id, resume)


def _evaluate(
    config: AdaptConfig, request: AdaptRequest, plan: AdaptPlan, model_dir: Path, run_dir: Path
) -> tuple[dict[str, float], Path]:
    """Metrics of the bundle against the held-out split (seeded: a resumed run gets the same numbers)."""
    from caloforge.datasets.streaming import load_split
    from caloforge.evaluation.api import evaluate_model

    report_dir = run_dir / "report"
    reference = load_split(request.data, config.eval.split)
    report = evaluate_model(
        model_dir,
        reference,
        plan.n_eval,
        config.eval.metrics,
        num_steps=config.eval.num_steps,
        sampler=config.eval.sampler,
        detectors={plan.detector.name: plan.detector},
    )
    report.write(report_dir)
    metrics = {k: float(v) for k, v in report.metrics.items() if isinstance(v, int | float)}
    return metrics, report_dir


HEADLINE = ("fpd", "kpd", "auc_low", "auc_high", "floor/fpd", "floor/kpd", "floor/auc_low", "floor/auc_high")


def _register(
    config: AdaptConfig,
    plan: AdaptPlan,
    run_id: str,
    model_dir: Path,
    metrics: dict[str, float],
    gate: GateResult,
    steps: int,
    trained: int,
    total: int,
    extra_tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    from caloforge.registry.store import RegistryStore

    store = RegistryStore()
    name = plan.register_name
    existing = store.search(tags={RUN_TAG: run_id}, name=name) if _model_exists(store, name) else []
    if existing:
        version = existing[0]
        log.info("run %s is registered already as %s (not registered again)", run_id, version.uri)
        if config.register.alias not in version.aliases:  # interrupted between the version and its alias
            version = store.set_alias(name, version.version, config.register.alias)
    else:
        tags = {
            "parent_uri": plan.parent_uri,
            "adaptation_method": config.strategy.kind,
            "target_detector": plan.detector.name,
            "dataset_manifest_hash": plan.manifest_hash,
            RUN_TAG: run_id,
            "caloforge.train_showers": str(plan.n_train),
            "caloforge.steps": str(steps),
            "caloforge.trainable_parameters": str(trained),
            "caloforge.total_parameters": str(total),
            "caloforge.objective": plan.objective,
            "caloforge.gate": "passed" if gate.passed else "failed: " + "; ".join(gate.reasons()),
        }
        if plan.parent_version is not None:
            tags["parent_version"] = plan.parent_version
        tags.update(extra_tags or {})
        headline = {k.replace("/", "_"): v for k, v in metrics.items() if k in HEADLINE and math.isfinite(v)}
        version = store.register_bundle(
            model_dir,
            name=name,
            kind="adapted",
            tags=tags,
            metrics=headline,
            description=f"{config.strategy.kind} adaptation of {plan.parent_uri} to {plan.detector.name}",
            aliases=(config.register.alias,),
        )
    promoted = False
    if config.register.promote and gate.passed:
        promoted = _maybe_promote(store, name, version.version, config.gate.metric, metrics)
    version = store.get(name, version=version.version)
    return {
        "name": name,
        "version": version.version,
        "uri": version.uri,
        "aliases": list(version.aliases),
        "promoted": promoted,
    }


def _model_exists(store: Any, name: str) -> bool:
    return any(m.name == name for m in store.list_models())


def _maybe_promote(store: Any, name: str, version: int, metric: str, metrics: dict[str, float]) -> bool:
    """Move ``champion`` to ``version`` when there is none or ``version`` beats it on ``metric``."""
    value = metrics.get(metric, math.nan)
    if not math.isfinite(value):
        return False
    try:
        champion = store.get(name, alias="champion")
    except ValueError:
        champion = None
    if champion is not None and champion.version == version:
        return True
    if champion is not None:
        current = float(champion.tags.get(f"metric.{metric}", "inf"))
        if not value < current:
            log.info(
                "v%d passed the gate but does not beat champion v%d on %s (%.4g >= %.4g)",
                version,
                champion.version,
                metric,
                value,
                current,
            )
            return False
    reason = f"passed the adaptation gate; {metric} {value:.4g}" + (
        f" beats v{champion.version}" if champion is not None else " (first champion)"
    )
    store.promote(name, version, "champion", reason=reason)
    return True
