"""The job entrypoint of the adaptation service (a Ray job, or run by hand):

    python -m caloforge.adapt.service.jobmain --job-id ID --job-dir DIR [--cwd DIR]

It reads ``DIR/spec.json`` (the job spec of docs/service.md) and runs the stages

    adapt → evaluate → distill (when asked) → export → register

through the public pipelines (``caloforge.adapt.pipeline.run_adaptation``,
``caloforge.distill.pipeline.run_distillation``, ``caloforge.registry.export.export_bundle``), in run
directories inside the job directory::

    DIR/spec.json      the job spec (written by the executor)
    DIR/detector.yaml  the inline detector (spec.detector.yaml), also as DIR/detector/<name>.yaml (the path
                       passed on: a detector file's stem must be its name)
    DIR/adapt/         the adaptation run (resumed when it exists; reused when it finished)
    DIR/distill/       the distillation run (spec.distillation)
    DIR/onnx/adapted/  the ONNX export of the adapted model + model card (onnx/distilled/ for the student)
    DIR/events.jsonl   the job's events, also printed to stdout as ``CALOFORGE_EVENT {json}`` lines
    DIR/result.json    written last, on success

Registration comes last, so a job stopped before it (a cancel) leaves the registry untouched, and only a
model that evaluated and exported is registered. It is idempotent by job id: every version the job
registers carries the tag ``caloforge.service_job=<job id>``, and a version with that tag is never registered
again — running the entrypoint twice for one job (a restarted service, a Ray retry) registers nothing new;
the pipelines' own run tags make it idempotent per run directory too. Exit code 0 on success; otherwise 1
with an ``error`` event naming the stage and the problem (SIGTERM, as ``ray job stop`` sends, included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("caloforge.service.job")

EVENT_PREFIX = "CALOFORGE_EVENT "
JOB_TAG = "caloforge.service_job"  # the registry tag that makes registration idempotent per job
EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
EXPORT_VARIANT = "plain"  # fp32 graph, parity-checked against PyTorch (`registry pull --variant` for others)
HEADLINE = ("fpd", "kpd", "auc_low", "auc_high")
SPEC_KEYS = ("base", "detector", "data", "strategy", "config")

__all__ = ["EVENT_PREFIX", "JOB_TAG", "EventLog", "main", "parse_event_line", "read_events", "run_job"]


# -- events ------------------------------------------------------------------------------------------------
class EventLog:
    """Appends events to ``DIR/events.jsonl`` (``seq`` continues after the events already there, so a rerun
    of the entrypoint adds to the log) and prints each as a ``CALOFORGE_EVENT`` line on stdout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = len(read_events(path))

    def emit(
        self, kind: str, message: str, stage: str | None = None, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        self.seq += 1
        event = {
            "seq": self.seq,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "kind": kind,
            "stage": stage,
            "message": message,
            "data": _jsonable(data or {}),
        }
        line = json.dumps(event, sort_keys=True, allow_nan=False)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(EVENT_PREFIX + line, flush=True)
        return event


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of an ``events.jsonl`` (a torn last line, from a killed writer, is left out)."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def parse_event_line(line: str) -> dict[str, Any] | None:
    """The event of one ``CALOFORGE_EVENT {json}`` log line (None for any other line)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "seq" in event else None


def _jsonable(data: Any) -> Any:
    """Non-finite floats become None (events are strict JSON); paths become strings."""
    if isinstance(data, dict):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_jsonable(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Path):
        return str(data)
    return data


class _Stages:
    """Stage start/end events with timings; remembers the current stage for the error event."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.current: str | None = None
        self._t0 = 0.0

    def start(self, stage: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.current, self._t0 = stage, time.perf_counter()
        self.events.emit("stage", message, stage, {"phase": "start", **(data or {})})

    def end(self, message: str, data: dict[str, Any] | None = None) -> None:
        seconds = round(time.perf_counter() - self._t0, 3)
        self.events.emit("stage", message, self.current, {"phase": "end", "seconds": seconds, **(data or {})})

    @contextmanager
    def stage(self, stage: str, message: str) -> Iterator[dict[str, Any]]:
        """``with stages.stage(...) as out:`` start event, then an end event with ``out`` and the seconds."""
        self.start(stage, message)
        out: dict[str, Any] = {}
        yield out
        self.end(out.pop("message", f"{stage} done"), out)


# -- the spec ----------------------------------------------------------------------------------------------
def load_spec(job_dir: Path) -> dict[str, Any]:
    """``DIR/spec.json`` with its required keys checked (the API validated it in full)."""
    path = job_dir / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no job spec (the executor writes it before submitting the job)")
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [k for k in SPEC_KEYS if not spec.get(k)]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    detector = spec["detector"]
    if not isinstance(detector, dict) or len(detector) != 1 or not ({"name", "yaml"} & set(detector)):
        raise ValueError(f'{path}: detector must be {{"name": ...}} or {{"yaml": ...}}, got {detector!r}')
    for key in ("hyperparameters", "metadata"):
        if not isinstance(spec.get(key) or {}, dict):
            raise ValueError(f"{path}: {key} must be an object")
    return spec


def _detector_arg(spec: dict[str, Any], job_dir: Path) -> str:
    """A built-in name, or the inline YAML, written to ``DIR/detector.yaml`` and ``DIR/detector/<name>.yaml``
    (the path passed on)."""
    detector = spec["detector"]
    if "name" in detector:
        return str(detector["name"])
    from caloforge.config import read_yaml

    text = str(detector["yaml"])
    (job_dir / "detector.yaml").write_text(text)
    name = read_yaml(job_dir / "detector.yaml").get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"detector.yaml: `name` must be a plain detector name, got {name!r}")
    path = job_dir / "detector" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def _overrides(hyperparameters: dict[str, Any] | None, fixed: dict[str, Any]) -> list[str]:
    """``--set`` overrides: the spec's hyper-parameters, then what the service decides (which wins)."""
    merged = {**(hyperparameters or {}), **fixed}
    return [f"{key}={json.dumps(value)}" for key, value in merged.items()]


def _adapt_config(spec: dict[str, Any]) -> Any:
    from caloforge.adapt.config import AdaptConfig
    from caloforge.config import load_config

    registration = spec.get("registration") or {}
    fixed: dict[str, Any] = {"strategy.kind": spec["strategy"], "register.enabled": False}
    if spec.get("seed") is not None:
        fixed["loop.seed"] = int(spec["seed"])
    if registration.get("model_name"):
        fixed["register.name"] = registration["model_name"]
    if registration.get("alias"):
        fixed["register.alias"] = registration["alias"]
    return load_config(AdaptConfig, spec["config"], _overrides(spec.get("hyperparameters"), fixed))


def _distill_config(spec: dict[str, Any], model_name: str) -> Any:
    from caloforge.config import load_config
    from caloforge.distill.config import DistillConfig

    dist = spec["distillation"]
    if not isinstance(dist, dict) or not dist.get("config"):
        raise ValueError(f"distillation: expected an object with a config path, got {dist!r}")
    method = dist.get("method", "cd")
    fixed: dict[str, Any] = {"method": method, "register.enabled": False, "register.name": model_name}
    alias = (spec.get("registration") or {}).get("alias")
    if alias:
        fixed["register.alias"] = alias
    if dist.get("steps") is not None:
        steps = int(dist["steps"])
        if method == "cd":
            fixed["cd.num_steps"] = steps
        else:
            fixed["bns.steps"], fixed["bns.num_steps"] = [steps], steps
    if spec.get("seed") is not None:
        fixed["loop.seed"] = int(spec["seed"])
    return load_config(DistillConfig, dist["config"], _overrides(dist.get("hyperparameters"), fixed))


def _enabled(config: Any) -> Any:
    """``config`` with registration on (the runs themselves are made with it off: registration is last)."""
    return dataclasses.replace(config, register=dataclasses.replace(config.register, enabled=True))


def _load_result(cls: type, gate_cls: type, path: Path) -> Any:
    """A finished run's result (``AdaptResult`` / ``DistillResult``) from its ``result.json``."""
    data = json.loads(path.read_text())
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    for key in ("run_dir", "model_dir", "adapter_dir", "report_dir"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = Path(kwargs[key])
    kwargs["gate"] = gate_cls(**data["gate"])
    return cls(**kwargs)


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in HEADLINE or k in (f"floor/{h}" for h in HEADLINE)}


# -- the stages --------------------------------------------------------------------------------------------
def _stage_adapt(spec: dict[str, Any], job_dir: Path, stages: _Stages) -> tuple[Any, Any, Any]:
    from caloforge.adapt.pipeline import AdaptRequest, AdaptResult, GateResult, run_adaptation

    config = _adapt_config(spec)
    request = AdaptRequest(base=spec["base"], detector=_detector_arg(spec, job_dir), data=Path(spec["data"]))
    run_dir = job_dir / "adapt"
    done = run_dir / "result.json"
    detector = Path(request.detector).stem  # a built-in name, or the inline YAML's file (named after it)
    stages.start("adapt", f"adapting {spec['base']} to {detector} ({config.strategy.kind})")
    if done.is_file():
        result = _load_result(AdaptResult, GateResult, done)
        stages.end("adaptation finished in an earlier attempt (reused)", {"steps": result.steps})
        stages.start("evaluate", "evaluation finished in an earlier attempt (reused)")
    else:

        def on_stage(stage: str, data: dict[str, Any]) -> None:
            stages.end(f"trained {data.get('steps')} steps", data)
            stages.start(stage, "evaluating against the held-out split")

        resume = (run_dir / "request.json").is_file()
        if resume:
            stages.events.emit("log", "resuming the adaptation run", "adapt", {"run_dir": str(run_dir)})
        result = run_adaptation(config, request, run_dir, resume=resume, on_stage=on_stage)
    metrics = _headline(result.metrics)
    stages.events.emit("metric", "evaluation metrics", "evaluate", metrics)
    gate = "passed" if result.gate.passed else "failed: " + "; ".join(result.gate.reasons())
    stages.end(f"evaluated; gate {gate}", {"metrics": metrics, "gate_passed": result.gate.passed})
    return config, request, result


def _stage_distill(spec: dict[str, Any], job_dir: Path, stages: _Stages, adapted: Any, name: str) -> Any:
    from caloforge.distill.pipeline import DistillGateResult, DistillRequest, DistillResult, run_distillation

    config = _distill_config(spec, name)
    request = DistillRequest(teacher=str(adapted.model_dir), data=Path(spec["data"]))
    run_dir = job_dir / "distill"
    done = run_dir / "result.json"
    with stages.stage("distill", f"distilling the adapted model ({config.method})") as out:
        if done.is_file():
            result = _load_result(DistillResult, DistillGateResult, done)
            out["message"] = "distillation finished in an earlier attempt (reused)"
        else:

            def on_stage(stage: str, data: dict[str, Any]) -> None:
                stages.events.emit("log", "evaluating the student against its teacher", "distill", data)

            resume = (run_dir / "request.json").is_file()
            result = run_distillation(config, request, run_dir, resume=resume, on_stage=on_stage)
            out["message"] = f"distilled: {result.sampler} x {result.num_steps}"
        out.update(metrics=_headline(result.metrics), gate_passed=result.gate.passed)
    return config, request, result


def _export(model_dir: Path, out_dir: Path, variant: str, exporter: str) -> dict[str, Any]:
    """``export_bundle`` (as ``caloforge export --format onnx``: parity-checked); reused when done."""
    from caloforge.registry.card import CARD_FILE, ModelCard
    from caloforge.registry.export import ONNX_FILE, export_bundle

    card_path = out_dir / CARD_FILE
    if card_path.is_file() and (out_dir / ONNX_FILE).is_file():
        card = ModelCard.load(card_path)
    else:  # nothing yet, or an attempt that died before writing its card
        card = export_bundle(model_dir, out_dir, "onnx", variant=variant, exporter=exporter, overwrite=True)
    exp = card.exports[-1]
    return {
        "onnx": str((out_dir / ONNX_FILE).resolve()),
        "variant": exp.get("variant", variant),
        "max_abs_err_mev": exp["parity"]["max_abs_err_mev"],
        "max_rel_err": exp["parity"]["max_rel_err"],
    }


def _registered(version: Any) -> dict[str, Any]:
    return {
        "name": version.name,
        "version": version.version,
        "uri": version.uri,
        "aliases": list(version.aliases),
    }


def _register_once(job_id: str, kind: str, register: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The job's version of ``kind`` (found by the job tag), registered by ``register`` when there is none."""
    from caloforge.registry.store import RegistryStore

    found = RegistryStore().search(tags={JOB_TAG: job_id, "kind": kind})
    if found:
        log.info("job %s registered %s already (not registered again)", job_id, found[0].uri)
        return {**_registered(found[0]), "existing": True}
    return {**register(), "existing": False}


def run_job(job_id: str, job_dir: Path, events: EventLog, stages: _Stages | None = None) -> dict[str, Any]:
    """Run the job's stages; returns (and writes) ``result.json``."""
    from caloforge.adapt.pipeline import register_adaptation

    stages = stages or _Stages(events)
    spec = load_spec(job_dir)
    events.emit("log", f"job {job_id} started (pid {os.getpid()})", None, {"job_dir": str(job_dir)})
    config, request, adapted = _stage_adapt(spec, job_dir, stages)
    name = config.register.name or f"caloforge-{_detector_name(request.detector)}"

    distilled = None
    if spec.get("distillation"):
        distilled = _stage_distill(spec, job_dir, stages, adapted, name)

    with stages.stage("export", "exporting to ONNX (parity-checked against PyTorch)") as out:
        options = spec.get("export") or {}  # optional: {"variant": ..., "exporter": "dynamo" | "legacy"}
        variant = str(options.get("variant", EXPORT_VARIANT))
        exporter = str(options.get("exporter", "dynamo"))
        exported = _export(adapted.model_dir, job_dir / "onnx" / "adapted", variant, exporter)
        out["adapted"] = exported
        if distilled is not None:
            out["distilled"] = _export(
                distilled[2].model_dir, job_dir / "onnx" / "distilled", variant, exporter
            )
        out["message"] = f"exported {exported['onnx']} (max abs error {exported['max_abs_err_mev']:.3g} MeV)"

    with stages.stage("register", f"registering as a version of {name}") as reg_out:
        tags = {JOB_TAG: job_id}
        reg = _register_once(
            job_id, "adapted", lambda: register_adaptation(_enabled(config), request, adapted, tags)
        )
        reg_out["adapted"] = reg
        distilled_out = None
        if distilled is not None:
            d_config, d_request, d_result = distilled
            d_tags = {**tags, "parent_uri": reg["uri"], "parent_version": str(reg["version"])}
            d_tags["teacher_version"] = str(reg["version"])
            from caloforge.distill.pipeline import register_distillation

            d_reg = _register_once(
                job_id,
                "distilled",
                lambda: register_distillation(_enabled(d_config), d_request, d_result, d_tags),
            )
            reg_out["distilled"] = d_reg
            distilled_out = {
                "uri": d_reg["uri"],
                "version": d_reg["version"],
                "aliases": d_reg["aliases"],
                "method": d_result.method,
                "steps": d_result.num_steps,
                "onnx_uri": out["distilled"]["onnx"],
                "metrics": _headline(d_result.metrics),
                "gate_passed": d_result.gate.passed,
            }
        reg_out["message"] = f"registered {reg['uri']}" + (" (existing)" if reg["existing"] else "")

    result = {
        "job_id": job_id,
        "registered_model": reg["name"],
        "version": reg["version"],
        "alias": config.register.alias,
        "aliases": reg["aliases"],
        "uri": reg["uri"],
        "onnx_uri": exported["onnx"],
        "metrics": _headline(adapted.metrics),
        "gate": {"passed": adapted.gate.passed, "reasons": adapted.gate.reasons()},
        "parent": {"uri": adapted.parent_uri, "version": adapted.parent_version},
        "distilled": distilled_out,
        "report_dir": str(adapted.report_dir.resolve()),
    }
    result = _jsonable(result)
    from caloforge.training.rundir import write_json

    write_json(job_dir / RESULT_FILE, result)
    events.emit("result", f"succeeded: {reg['uri']}", "register", result)
    return result


def _detector_name(detector: str) -> str:
    return Path(detector).stem if detector.endswith((".yaml", ".yml")) else detector


# -- main --------------------------------------------------------------------------------------------------
class _Stopped(BaseException):
    """SIGTERM (``ray job stop``): unwinds the stages (a registration in progress rolls back)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stopped(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caloforge.adapt.service.jobmain", description=__doc__)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--cwd", type=Path, help="working directory for relative paths (the service's)")
    args = parser.parse_args(argv)

    from caloforge.environment import apply_default_env

    apply_default_env()
    if args.cwd is not None:
        os.chdir(args.cwd)
    job_dir = args.job_dir.resolve()
    if not job_dir.is_dir():
        print(f"--job-dir {job_dir}: not a directory", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("caloforge").setLevel(logging.INFO)
    events = EventLog(job_dir / EVENTS_FILE)
    stages = _Stages(events)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_job(args.job_id, job_dir, events, stages)
        return 0
    except (Exception, _Stopped) as exc:
        traceback.print_exc()
        kind = "stopped" if isinstance(exc, _Stopped) else type(exc).__name__
        events.emit("error", f"{kind}: {exc}", stages.current, {"type": kind})
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit(code: int) -> None:
    """Exit without the interpreter's teardown. The job's outcome is on disk by now (events fsynced,
    ``result.json`` renamed into place, the registry written synchronously); tearing down torch, scipy and
    mlflow module by module takes seconds (4-7 s on a loaded 2-core machine), during which Ray still reports
    the job running and the service waits to record it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
