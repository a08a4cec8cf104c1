"""A submitted request → a validated job spec (SERVICE_CONTRACT's JSON), or a :class:`SpecError` naming the
field; nothing is written to the registry or the job tables here.

The checks are the adaptation's own: the adapt config (``configs/adapt/<strategy>.yaml``) is loaded with the
request's hyper-parameters as ``--set`` overrides (the config's validation speaks), the distillation config
likewise, and ``adapt.pipeline.plan_adaptation`` checks base, detector and data together (the detector's
spec against the shards' recorded spec and mesh, a spare slot, the objective, the registered name).

Speed (many concurrent submissions): a registry base is resolved to an exact version at most every
``base_cache_ttl_s`` seconds per URI, its bundle downloaded once per exact version (into
``$CALOFORGE_HOME/service/cache/base``), and the plan cached per (bundle, detector, data manifest, the parts
of the config it depends on: not the seed, the loop, the metrics or the gate).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caloforge import paths
from caloforge.adapt.config import AdaptConfig
from caloforge.adapt.pipeline import AdaptPlan, AdaptRequest, plan_adaptation
from caloforge.adapt.service.config import ServiceConfig
from caloforge.adapt.service.schemas import SubmitRequest
from caloforge.config import ConfigError, apply_overrides, from_dict, read_yaml, safe_load_strict, to_dict
from caloforge.distill.config import STUDENT_OF, DistillConfig
from caloforge.platform.geometry import builtin_detector_names

__all__ = ["SpecError", "Validator"]

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_DETECTOR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Keys the request sets through its own fields (a hyper-parameter may not set them behind their back).
_RESERVED = {
    "strategy.kind": "strategy",
    "loop.seed": "seed",
    "register.name": "registration.model_name",
    "register.alias": "registration.alias",
    "name": "strategy",
    "fault_injection_step": None,
}
_PLAN_CACHE_SIZE = 512
# Parts of an AdaptConfig that ``plan_adaptation`` does not read (training, evaluation metrics, the gate, run
# housekeeping): left out of the plan cache's key, so requests that differ only in them (a seed, a step
# count, a learning rate) share one plan instead of each loading the base again. Anything not named here is
# part of the key (a new config field costs a cache miss, never a wrong plan).
_NOT_PLANNED = (
    "name",
    "loop",
    "stream",
    "gate",
    "device",
    "keep_checkpoints",
    "progress",
    "torch_threads",
    "fault_injection_step",
)
_NOT_PLANNED_EVAL = ("sampler", "num_steps", "metrics")


class SpecError(ValueError):
    """A request the service refuses: ``field`` (dotted, e.g. ``detector.yaml``), ``message``, and the HTTP
    ``status`` (422, or 413 for an inline YAML over its size limit)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class _Base:
    bundle_dir: Path
    uri: str  # the exact version (models:/NAME/VERSION) or the bundle directory
    version: str | None
    parametrisation: str


def _overrides(hyperparameters: dict[str, Any], field: str, reserved: dict[str, str | None]) -> list[str]:
    out = []
    for key, value in hyperparameters.items():
        if not _KEY_RE.match(key):
            raise SpecError(f"{field}.{key}", "a hyper-parameter is a dotted config key such as loop.steps")
        if key in reserved or any(key.startswith(r + ".") for r in reserved):
            owner = reserved.get(key)
            raise SpecError(
                f"{field}.{key}",
                f"set by the request's {owner!r} field" if owner else "not settable through the service",
            )
        out.append(f"{key}={json.dumps(value)}")  # JSON is YAML: the config parses it as --set does
    return out


def _config_field(exc: Exception, hyperparameters: dict[str, Any], field: str) -> str:
    """The request field a config error is about: the hyper-parameter it names, else the group."""
    text = str(exc)
    for key in sorted(hyperparameters, key=len, reverse=True):
        if key in text:
            return f"{field}.{key}"
    return field


class Validator:
    """Validates submissions for one service (thread-safe; caches as in the module docstring)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.configs_dir = Path(config.configs_dir).resolve()
        self.roots = config.resolved_data_roots()
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, _Base]] = {}
        self._plans: OrderedDict[tuple[Any, ...], AdaptPlan] = OrderedDict()
        self._registry: Any = None
        self._files: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def _load_config(self, cls: type, path: Path, overrides: list[str]) -> Any:
        """``caloforge.config.load_config(cls, path, overrides)`` with the file's YAML parsed once per
        (mtime, size) instead of once per request (the same checks and messages)."""
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        hit = self._files.get(path)
        if hit is None or hit[0] != stamp:
            hit = (stamp, read_yaml(path))
            self._files[path] = hit
        data = apply_overrides(hit[1], overrides) if overrides else hit[1]
        source = f"{path} (with --set overrides)" if overrides else str(path)
        return from_dict(cls, data, source)

    def warm_up(self) -> None:
        """Import what validation needs (the model and torch's lazily imported parts, MLflow's client) and
        open the registry, so that the first request does not pay for it: that is tens of seconds on a busy
        machine, and a burst of first requests would all wait for it. The app calls this on startup."""
        import torch._dynamo  # noqa: F401  (imported by torch's parameter initialisation on first use)

        from caloforge.platform.shower_model import ShowerModel  # noqa: F401
        from caloforge.registry.store import RegistryStore

        with self._lock:
            if self._registry is None:
                self._registry = RegistryStore()

    # -- the request ---------------------------------------------------------------------------------------
    def validate(self, req: SubmitRequest) -> dict[str, Any]:
        """The job spec of ``req`` (SERVICE_CONTRACT.md), or :class:`SpecError`."""
        adapt_path = self._config_file("adapt", req.strategy, "strategy")
        detector_arg, detector_spec = self._detector(req)
        data_dir = self._data(req.data)
        overrides = [f"strategy.kind={req.strategy}", f"loop.seed={req.seed}"]
        if req.registration.model_name is not None:
            overrides.append(f"register.name={json.dumps(req.registration.model_name)}")
        overrides.append(f"register.alias={json.dumps(req.registration.alias)}")
        overrides += _overrides(req.hyperparameters, "hyperparameters", _RESERVED)
        try:
            config = self._load_config(AdaptConfig, adapt_path, overrides)
        except ConfigError as exc:
            raise SpecError(_config_field(exc, req.hyperparameters, "hyperparameters"), str(exc)) from None
        distillation = self._distillation(req)
        base = self._base(req.base)
        plan = self._plan(config, base, detector_arg, data_dir)
        if (
            distillation is not None
            and distillation["method"] == "cd"
            and base.parametrisation not in STUDENT_OF
        ):
            raise SpecError(
                "distillation.method",
                f"cd needs a {sorted(STUDENT_OF)} model; the base is parametrised {base.parametrisation!r}",
            )
        description = plan.describe()
        return {
            "base": req.base,
            "detector": detector_spec,
            "data": str(data_dir),
            "strategy": req.strategy,
            "config": str(adapt_path),
            "hyperparameters": dict(req.hyperparameters),
            "distillation": distillation,
            "registration": {"model_name": req.registration.model_name, "alias": req.registration.alias},
            "seed": req.seed,
            "metadata": dict(req.metadata),
            "export": {"exporter": self.config.onnx_exporter},  # the service's choice, for jobmain's export
            "plan": {**description, "base": base.uri, "base_uri": base.uri, "base_version": base.version},
        }

    def _config_file(self, group: str, name: str, field: str) -> Path:
        path = self.configs_dir / group / f"{name}.yaml"
        if not path.is_file():
            raise SpecError(field, f"{name!r} has no config {path} on the service (configs_dir)")
        return path

    def _detector(self, req: SubmitRequest) -> tuple[str, dict[str, str]]:
        """(what plan_adaptation takes: a built-in name or a YAML path, the spec's detector entry)."""
        det = req.detector
        if det.name is not None:
            known = builtin_detector_names()
            if det.name not in known:
                raise SpecError("detector.name", f"unknown detector {det.name!r} (built-in: {known})")
            return det.name, {"name": det.name}
        text = det.yaml or ""
        limit = self.config.max_detector_yaml_bytes
        if len(text.encode()) > limit:
            raise SpecError("detector.yaml", f"the inline YAML exceeds {limit} bytes", status=413)
        try:
            data = safe_load_strict(text)
        except Exception as exc:  # yaml.YAMLError: its message names line and column
            raise SpecError("detector.yaml", f"invalid YAML: {' '.join(str(exc).split())}") from None
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not _DETECTOR_NAME_RE.match(name):
            raise SpecError("detector.yaml", "a detector YAML is a mapping with a plain `name:`")
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = self.config.cache_dir() / "detectors" / digest / f"{name}.yaml"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        from caloforge.platform.geometry import load_detector

        try:
            load_detector(path)
        except (ValueError, OSError) as exc:
            raise SpecError("detector.yaml", str(exc).replace(str(path), "detector.yaml")) from None
        return str(path), {"yaml": text}

    def _inside_roots(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)

    def _data(self, data: str) -> Path:
        given = Path(data).expanduser()
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        for candidate in candidates:
            resolved = candidate.resolve()
            if not self._inside_roots(resolved):
                raise SpecError(
                    "data", f"{data} is not inside the service's data roots {list(map(str, self.roots))}"
                )
            if resolved.is_dir():
                return resolved
        raise SpecError(
            "data", f"{data}: no such shard directory in the data roots {list(map(str, self.roots))}"
        )

    def _distillation(self, req: SubmitRequest) -> dict[str, Any] | None:
        d = req.distillation
        if d is None:
            return None
        path = self._config_file("distill", d.method, "distillation.method")
        steps_key = "cd.num_steps" if d.method == "cd" else "bns.num_steps"
        reserved = {
            "method": "distillation.method",
            steps_key: "distillation.steps",
            "name": None,
            "register.name": "registration.model_name",
            "fault_injection_step": None,
        }
        overrides = [
            f"{steps_key}={d.steps}",
            *_overrides(d.hyperparameters, "distillation.hyperparameters", reserved),
        ]
        try:
            self._load_config(DistillConfig, path, overrides)
        except ConfigError as exc:
            field = _config_field(exc, d.hyperparameters, "distillation.hyperparameters")
            if field == "distillation.hyperparameters" and "num_steps" in str(exc):
                field = "distillation.steps"
            raise SpecError(field, str(exc)) from None
        return {
            "method": d.method,
            "steps": d.steps,
            "config": str(path),
            "hyperparameters": dict(d.hyperparameters),
        }

    # -- base and plan (cached) ----------------------------------------------------------------------------
    def _base(self, base: str) -> _Base:
        now = time.monotonic()
        hit = self._resolved.get(base)
        if hit is not None and now - hit[0] < self.config.base_cache_ttl_s:
            return hit[1]
        with self._lock:
            hit = self._resolved.get(base)
            if hit is not None and now - hit[0] < self.config.base_cache_ttl_s:
                return hit[1]
            info = self._resolve_base(base)
            self._resolved[base] = (time.monotonic(), info)
            return info

    def _resolve_base(self, base: str) -> _Base:
        from caloforge.platform.shower_model import ShowerModel

        path = Path(base).expanduser()
        if base.startswith("models:/") or ("@" in base and not path.is_absolute()):
            from caloforge.registry.store import RegistryStore

            if self._registry is None:
                self._registry = RegistryStore()
            try:
                version = self._registry.resolve(base)
            except ValueError as exc:
                raise SpecError("base", str(exc)) from None
            target = self.config.cache_dir() / "base" / hashlib.sha256(version.uri.encode()).hexdigest()[:16]
            marker = target / ".registry_uri"
            if not (marker.is_file() and marker.read_text() == version.uri):
                tmp = target.with_name(target.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(target, ignore_errors=True)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                self._registry.download_bundle(version.uri, tmp)
                (tmp / ".registry_uri").write_text(version.uri)
                tmp.rename(target)
            bundle, uri, number = target, version.uri, str(version.version)
        elif path.is_absolute():
            resolved = path.resolve()
            if not (self._inside_roots(resolved) or resolved.is_relative_to(paths.home())):
                raise SpecError("base", f"{base} is not inside the service's data roots or $CALOFORGE_HOME")
            if not resolved.is_dir():
                raise SpecError("base", f"{base}: no such bundle directory")
            bundle, uri, number = resolved, str(resolved), None
        else:
            raise SpecError(
                "base",
                f"{base!r} is neither a registry URI (models:/NAME@ALIAS, NAME@ALIAS, models:/NAME/VERSION) "
                "nor an absolute bundle directory",
            )
        try:
            model = ShowerModel.load(bundle)
        except (ValueError, OSError) as exc:
            raise SpecError("base", f"{base}: not a model bundle ({exc})") from None
        return _Base(bundle, uri, number, model.config.parametrisation)

    def _plan(self, config: AdaptConfig, base: _Base, detector: str, data: Path) -> AdaptPlan:
        manifest = data / "manifest.json"
        stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
        key = (
            str(base.bundle_dir),
            base.uri,
            detector,
            str(data),
            stamp,
            _plan_key(config),
        )
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
            try:
                plan = plan_adaptation(
                    config,
                    AdaptRequest(base=str(base.bundle_dir), detector=detector, data=data),
                    self.config.cache_dir() / "plan",
                )
            except ValueError as exc:
                raise SpecError(_plan_field(str(exc)), str(exc)) from None
            self._plans[key] = plan
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
            return plan


def _plan_key(config: AdaptConfig) -> str:
    """The part of ``config`` a plan depends on, as canonical JSON (the plan cache's key)."""
    values = {k: v for k, v in to_dict(config).items() if k not in _NOT_PLANNED}
    values["eval"] = {k: v for k, v in values["eval"].items() if k not in _NOT_PLANNED_EVAL}
    return json.dumps(values, sort_keys=True)


def _plan_field(message: str) -> str:
    """The request field a ``plan_adaptation`` error names (its messages start with the field)."""
    head = message.split(":", 1)[0].strip()
    if head in ("base", "data"):
        return head
    if head == "detector":
        return "detector"
    if head.startswith("strategy.init_from"):
        return "hyperparameters.strategy.init_from"
    if "registered model name" in message:
        return "registration.model_name"
    if "alias" in message:
        return "registration.alias"
    if head.startswith("objective"):
        return "hyperparameters"
    return "data" if "data" in head else "base"
