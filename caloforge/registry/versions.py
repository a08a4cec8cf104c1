"""What the registry records about a model version, and the naming rules it checks before writing.

``RegisteredVersion`` / ``RegisteredModelSummary`` are the registry's answers (built from MLflow entities
by ``caloforge.registry.lookup``); ``version_tags`` is the searchable tag set a new version carries:

========================================  ===============================================================
tag                                       value
========================================  ===============================================================
``caloforge.kind``                        ``base`` | ``adapted`` | ``distilled``
``caloforge.detectors``                   comma-separated detector names the model knows
``caloforge.detector.<name>``             ``true`` (one per detector: exact search by detector)
``caloforge.target_detector``             the detector an adapted/distilled model is for
``caloforge.particles``                   comma-separated particle names it was trained on
``caloforge.particle.<pdg>``              ``true`` (one per particle, PDG id: exact search by particle)
``caloforge.adaptation_method``           e.g. ``full``, ``lora``, ``embedding``, ``consistency`` (or absent)
``caloforge.parent_uri``                  the model it was adapted/distilled from (URI or path)
``caloforge.parent_version``              its version (or ``@alias``) when the parent is a registry URI
``caloforge.dataset_manifest_hash``       hash of the shard manifest it was trained on
``caloforge.version``                     caloforge version that registered it
``caloforge.schema_version``              bundle schema version
``caloforge.bundle_files``                JSON ``{file: sha256}`` of the bundle (checked on download)
``caloforge.model_files``                 JSON ``{file: sha256}`` of MLmodel + the entry script
``caloforge.mesh_shape``                  e.g. ``45x16x9``
``caloforge.logged_model_id``             the MLflow logged model holding the artifacts
``metric.<name>``                         evaluation metrics (``fpd``, ``kpd``, ``auc_low``, ...)
``caloforge.promotion.<alias>``           JSON ``{at, reason, previous_version}`` of the last promotion
========================================  ===============================================================

No mlflow import here: these are plain values and checks.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import caloforge
from caloforge.registry.bundle import BundleInfo

KINDS: tuple[str, ...] = ("base", "adapted", "distilled")
ALIASES: tuple[str, ...] = ("champion", "candidate")  # the documented ones; others are allowed
BASE_MODEL_NAME = "caloforge-base"
TAG = "caloforge."
METRIC_TAG = "metric."

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ALIAS_RE = re.compile(r"^[A-Za-z_][\w-]{0,254}$")
# Short keys of search() and of register tags, stored as caloforge.<key>; "detector"/"particle" are
# membership tests of search().
SHORT_KEYS = frozenset(
    {
        "kind",
        "detectors",
        "target_detector",
        "particles",
        "adaptation_method",
        "parent_uri",
        "parent_version",
        "dataset_manifest_hash",
        "version",
        "schema_version",
    }
)


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model, as the registry reports it."""

    name: str
    version: int
    source: str
    run_id: str | None
    model_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""
    created_ms: int = 0

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: what ``mlflow.pyfunc.load_model`` and ``caloforge export`` take."""
        return f"models:/{self.name}/{self.version}"

    @property
    def kind(self) -> str:
        return self.tags.get(TAG + "kind", "")

    @property
    def detectors(self) -> tuple[str, ...]:
        raw = self.tags.get(TAG + "detectors", "")
        return tuple(d for d in raw.split(",") if d)

    @property
    def particles(self) -> tuple[str, ...]:
        raw = self.tags.get(TAG + "particles", "")
        return tuple(p for p in raw.split(",") if p)

    @property
    def metrics(self) -> dict[str, float]:
        return {k[len(METRIC_TAG) :]: float(v) for k, v in self.tags.items() if k.startswith(METRIC_TAG)}

    @property
    def lineage(self) -> dict[str, str]:
        keys = (
            "parent_uri",
            "parent_version",
            "adaptation_method",
            "dataset_manifest_hash",
            "target_detector",
        )
        return {k: self.tags[TAG + k] for k in keys if TAG + k in self.tags}

    @property
    def bundle_files(self) -> dict[str, str]:
        raw = self.tags.get(TAG + "bundle_files")
        return json.loads(raw) if raw else {}

    @property
    def model_files(self) -> dict[str, str]:
        """Digests of the pyfunc model's files outside the bundle (``MLmodel``, the entry script, …)."""
        raw = self.tags.get(TAG + "model_files")
        return json.loads(raw) if raw else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "aliases": list(self.aliases),
            "kind": self.kind,
            "detectors": list(self.detectors),
            "particles": list(self.particles),
            "metrics": self.metrics,
            "lineage": self.lineage,
            "source": self.source,
            "run_id": self.run_id,
            "model_id": self.model_id,
            "description": self.description,
            "created": iso_time(self.created_ms),
            "tags": dict(sorted(self.tags.items())),
        }


@dataclass(frozen=True)
class RegisteredModelSummary:
    """A registered model: its name, latest version and alias -> version map."""

    name: str
    latest_version: int | None
    aliases: dict[str, int]
    description: str
    tags: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "latest_version": self.latest_version,
            "aliases": dict(self.aliases),
            "description": self.description,
            "tags": dict(self.tags),
        }


def default_model_name(kind: str, target_detector: str | None) -> str:
    """``caloforge-base`` for base models, ``caloforge-<detector>`` for adapted/distilled ones."""
    check_kind(kind)
    if kind == "base":
        return BASE_MODEL_NAME
    if not target_detector:
        raise ValueError(
            f"kind={kind!r} needs a target detector to name the registered model: pass name=... or "
            "tags={'target_detector': '<detector>'} (or record lineage.target_detector in the bundle)"
        )
    return f"caloforge-{target_detector}"


def validate_alias(alias: str) -> str:
    """MLflow's alias rules, checked before anything is written (``latest`` and ``v<N>`` are reserved)."""
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise ValueError(f"invalid alias {alias!r}: use letters, digits, '_' and '-' (e.g. {list(ALIASES)})")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow")
    return alias


def check_kind(kind: str) -> None:
    """ValueError unless ``kind`` is one of ``KINDS``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


def check_name(name: str) -> str:
    """``name`` when it is a valid registered model name, else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid registered model name {name!r}: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit"
        )
    return name


def iso_time(ms: int) -> str:
    """UTC ISO time (seconds) of an MLflow timestamp in ms; "" for 0 (unknown)."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds") if ms else ""


def now_iso() -> str:
    """The current UTC time, ISO format to the second (promotion records, descriptions)."""
    return dt.datetime.now(tz=dt.UTC).isoformat(timespec="seconds")


def finite_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """``metrics`` as floats; ValueError naming the metric for a bad name, a non-number or a NaN/inf."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"metric name {key!r}: use letters, digits, '_', '.' and '-'")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r}: expected a number, got {value!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"metric {key!r} is not finite ({v}); refusing to register it")
        out[key] = v
    return out


def version_tags(
    info: BundleInfo, kind: str, extra: Mapping[str, str], metrics: Mapping[str, float]
) -> dict[str, str]:
    """The tags of a new version of ``info``'s bundle: what the bundle says (detectors, particles, lineage,
    digests), then ``extra`` (short keys become ``caloforge.<key>``) and ``metrics`` (``metric.<name>``).
    A base model has no target detector; an adapted/distilled one knowing one detector targets it."""
    lineage = {k: v for k, v in info.lineage_tags().items() if v}
    tags: dict[str, str] = {
        TAG + "kind": kind,
        TAG + "detectors": ",".join(info.detectors),
        TAG + "particles": ",".join(info.particles),
        TAG + "version": caloforge.__version__,
        TAG + "schema_version": str(info.schema_version),
        TAG + "mesh_shape": "x".join(str(v) for v in info.mesh_shape),
        TAG + "bundle_files": json.dumps(info.files, sort_keys=True),
    }
    tags.update({TAG + f"detector.{d}": "true" for d in info.detectors})
    tags.update({TAG + f"particle.{p}": "true" for p in info.pdgs})
    tags.update({TAG + k: v for k, v in lineage.items()})
    for key, value in extra.items():
        tags[TAG + key if key in SHORT_KEYS else key] = value
    tags.update({METRIC_TAG + k: repr(v) for k, v in metrics.items()})
    if kind == "base":
        tags.pop(TAG + "target_detector", None)
    elif TAG + "target_detector" not in tags and len(info.detectors) == 1:
        tags[TAG + "target_detector"] = info.detectors[0]
    for key, value in tags.items():
        if len(key) > 250 or len(value) > 100_000:
            raise ValueError(f"tag {key[:60]!r}: key longer than 250 or value longer than 100000 characters")
    return tags


__all__ = [
    "ALIASES",
    "BASE_MODEL_NAME",
    "KINDS",
    "METRIC_TAG",
    "SHORT_KEYS",
    "TAG",
    "RegisteredModelSummary",
    "RegisteredVersion",
    "check_kind",
    "check_name",
    "default_model_name",
    "finite_metrics",
    "iso_time",
    "now_iso",
    "validate_alias",
    "version_tags",
]
