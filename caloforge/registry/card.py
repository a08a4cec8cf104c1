"""Model cards: what a model is, where it came from, how good it is and which conditions it is valid for.

A card is JSON (``model_card.json``, written next to every exported model by ``caloforge registry pull``
and ``caloforge export``)::

    {
      "card_version": 1,
      "model": {"name": "caloforge-lar-pb", "version": 3, "uri": "models:/caloforge-lar-pb/3",
                "aliases": ["champion"], "kind": "adapted"},          # name/version null for a local bundle
      "architecture": {... mesh_shape, detectors, detector_index, sampler, num_steps, n_parameters ...},
      "lineage": {"kind": ..., "parent_uri": ..., "parent_version": ..., "strategy": ..., "objective": ...,
                  "target_detector": ..., "dataset_manifest_hash": ..., "trained": {...} | null,
                  "created_utc": ..., "extra": {...}},   # the bundle's typed Lineage (+ "registry")
      "metrics": {"fpd": ..., "kpd": ..., "auc_low": ..., "auc_high": ...},
      "valid_ranges": {"energy_mev": [lo, hi], "theta_rad": [lo, hi], "particles": [...],
                       "detectors": [...], "source": "lineage" | "detector-configs" | "unrecorded"},
      "exports": [{"format": "onnx", "file": "model.onnx", "sha256": ..., "parity": {...}, ...}],
      "registry": {... version tags, promotion records ...},
      "created_utc": "..."
    }

The valid ranges are the bundle's ``lineage.trained`` (``caloforge.platform.lineage.TrainedRanges``;
``source: "lineage"``); only a bundle without trained ranges falls back to the built-in detector configs of
its detectors (``source: "detector-configs"``), else nothing is checked (``"unrecorded"``).

``ValidRanges.check(conditions, strict)`` is the guard every entry point uses: a detector the model does
not know is always an error; energies, angles or particles outside the trained ranges are a
``ConditionRangeWarning`` (or a ``ValueError`` with ``strict=True``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from caloforge.platform.conditioning import Conditions
    from caloforge.platform.lineage import Lineage
    from caloforge.registry.bundle import BundleInfo

log = logging.getLogger("caloforge.registry")

CARD_VERSION = 1
CARD_FILE = "model_card.json"


class ConditionRangeWarning(UserWarning):
    """Conditions outside the ranges a model was trained on (the model extrapolates)."""


def _pair(lo: Any, hi: Any, what: str) -> tuple[float, float] | None:
    if lo is None and hi is None:
        return None
    try:
        pair = (float(lo), float(hi))
    except (TypeError, ValueError):
        raise ValueError(f"{what}: range bounds must be numbers, got {lo!r}, {hi!r}") from None
    if not all(math.isfinite(v) for v in pair) or pair[0] > pair[1]:
        raise ValueError(f"{what}: invalid range {pair}")
    return pair


@dataclass(frozen=True)
class ValidRanges:
    """Conditions a model was trained on. ``None`` for a quantity means: not recorded (not checked)."""

    detectors: tuple[str, ...]
    energy_mev: tuple[float, float] | None = None
    theta_rad: tuple[float, float] | None = None
    particles: tuple[str, ...] | None = None
    source: str = "unrecorded"

    def to_dict(self) -> dict[str, Any]:
        return {
            "energy_mev": list(self.energy_mev) if self.energy_mev else None,
            "theta_rad": list(self.theta_rad) if self.theta_rad else None,
            "particles": list(self.particles) if self.particles is not None else None,
            "detectors": list(self.detectors),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValidRanges:
        e, t, p = d.get("energy_mev"), d.get("theta_rad"), d.get("particles")
        return cls(
            detectors=tuple(d.get("detectors") or ()),
            energy_mev=_pair(*e, "valid_ranges.energy_mev") if e else None,
            theta_rad=_pair(*t, "valid_ranges.theta_rad") if t else None,
            particles=tuple(p) if p is not None else None,
            source=str(d.get("source", "unrecorded")),
        )

    def violations(self, conditions: Conditions) -> list[str]:
        """Human-readable reasons why ``conditions`` lie outside these ranges (empty: all inside).

        Raises ValueError for detectors the model does not know (it cannot encode them at all).
        """
        from caloforge.platform.conditioning import particle_name

        unknown = sorted(set(np.unique(conditions.detector).tolist()) - set(self.detectors))
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown} for this model (known: {list(self.detectors)})")
        out: list[str] = []
        n = len(conditions)
        for key, arr, rng in (
            ("energy_mev", conditions.energy_mev, self.energy_mev),
            ("theta_rad", conditions.theta_rad, self.theta_rad),
        ):
            if rng is None or n == 0:
                continue
            lo, hi = rng
            bad = (arr < lo * (1 - 1e-9)) | (arr > hi * (1 + 1e-9))
            if bad.any():
                out.append(
                    f"{key}: {int(bad.sum())} of {n} value(s) outside the trained range [{lo:.6g}, {hi:.6g}] "
                    f"(given min {float(arr.min()):.6g}, max {float(arr.max()):.6g})"
                )
        if self.particles is not None and n:
            given = {particle_name(int(p)) for p in np.unique(conditions.pdg)}
            extra = sorted(given - set(self.particles))
            if extra:
                out.append(f"particles {extra} were not in training (trained: {list(self.particles)})")
        return out

    def check(self, conditions: Conditions, strict: bool = False) -> list[str]:
        """Warn (``ConditionRangeWarning``) or, with ``strict``, raise ValueError when out of range."""
        problems = self.violations(conditions)
        if problems:
            text = "; ".join(problems)
            if strict:
                raise ValueError(f"conditions outside the trained ranges (strict mode): {text}")
            warnings.warn(
                f"conditions outside the trained ranges: {text}", ConditionRangeWarning, stacklevel=2
            )
            log.warning("conditions outside the trained ranges: %s", text)
        return problems


def ranges_from_lineage(lineage: Lineage, detectors: Sequence[str]) -> ValidRanges:
    """The trained ranges of a bundle's typed lineage (``lineage.trained``; a quantity it did not record is
    not checked), else, for a bundle without trained ranges, the union of the built-in detector configs of
    ``detectors`` (``energy_range_gev``, ``particles``), else unrecorded. ``detectors`` are the ones the
    model knows (its vocabulary)."""
    detectors = tuple(detectors)
    trained = lineage.trained
    if trained is not None:
        return ValidRanges(
            detectors=detectors,
            energy_mev=trained.energy_mev,
            theta_rad=trained.theta_rad,
            particles=trained.particles,
            source="lineage",
        )
    return _ranges_from_detector_configs(detectors)


def _ranges_from_detector_configs(detectors: tuple[str, ...]) -> ValidRanges:
    from caloforge.platform.conditioning import particle_name, pdg_of
    from caloforge.platform.geometry import builtin_detector_names, load_detector

    builtin = set(builtin_detector_names())
    if not detectors or any(d not in builtin for d in detectors):
        return ValidRanges(detectors=detectors, source="unrecorded")
    specs = [load_detector(d) for d in detectors]
    lo = min(s.energy_range_gev[0] for s in specs) * 1e3
    hi = max(s.energy_range_gev[1] for s in specs) * 1e3
    particles: list[str] = []
    for s in specs:
        for p in s.particles:
            name = particle_name(pdg_of(p))
            if name not in particles:
                particles.append(name)
    return ValidRanges(
        detectors=detectors, energy_mev=(lo, hi), particles=tuple(particles), source="detector-configs"
    )


@dataclass(frozen=True)
class ModelCard:
    """The JSON model card (see the module docstring for the layout)."""

    model: dict[str, Any]
    architecture: dict[str, Any]
    lineage: dict[str, Any]
    metrics: dict[str, float]
    valid_ranges: ValidRanges
    exports: tuple[dict[str, Any], ...] = ()
    registry: dict[str, Any] = field(default_factory=dict)
    created_utc: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "card_version": CARD_VERSION,
            "model": dict(self.model),
            "architecture": dict(self.architecture),
            "lineage": dict(self.lineage),
            "metrics": dict(self.metrics),
            "valid_ranges": self.valid_ranges.to_dict(),
            "exports": [dict(e) for e in self.exports],
            "registry": dict(self.registry),
            "created_utc": self.created_utc,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<card>") -> ModelCard:
        version = d.get("card_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: card_version missing or invalid ({version!r})")
        if version > CARD_VERSION:
            raise ValueError(
                f"{source}: card_version {version} is newer than this caloforge supports ({CARD_VERSION})"
            )
        try:
            return cls(
                model=dict(d["model"]),
                architecture=dict(d["architecture"]),
                lineage=dict(d["lineage"]),
                metrics={str(k): float(v) for k, v in d.get("metrics", {}).items()},
                valid_ranges=ValidRanges.from_dict(d["valid_ranges"]),
                exports=tuple(dict(e) for e in d.get("exports", ())),
                registry=dict(d.get("registry", {})),
                created_utc=str(d.get("created_utc", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: invalid model card: {exc!r}") from exc

    def with_export(self, export: Mapping[str, Any]) -> ModelCard:
        return ModelCard(
            self.model, self.architecture, self.lineage, self.metrics, self.valid_ranges,
            (*self.exports, dict(export)), self.registry, self.created_utc,
        )  # fmt: skip

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: model card not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt model card JSON: {exc}") from exc
        return cls.from_dict(data, str(path))


def build_card(
    info: BundleInfo,
    registered: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> ModelCard:
    """A card for a bundle; ``registered`` is ``RegisteredVersion.to_dict()`` when it came from the registry
    (its metrics, kind, aliases and promotion records are included)."""
    from caloforge.config import to_dict

    reg = dict(registered or {})
    tags = dict(reg.get("tags") or {})
    kind = reg.get("kind") or info.kind
    all_metrics = {**dict(reg.get("metrics") or {}), **{k: float(v) for k, v in (metrics or {}).items()}}
    promotions = {
        k.split(".", 2)[2]: json.loads(v) for k, v in tags.items() if k.startswith("caloforge.promotion.")
    }
    return ModelCard(
        model={
            "name": reg.get("name"),
            "version": reg.get("version"),
            "uri": reg.get("uri"),
            "aliases": list(reg.get("aliases") or []),
            "kind": kind,
            "bundle": str(info.path) if not reg else None,
        },
        architecture=info.summary(),
        lineage={**to_dict(info.lineage), **({"registry": reg.get("lineage")} if reg.get("lineage") else {})},
        metrics=all_metrics,
        valid_ranges=info.ranges,
        registry={"description": reg.get("description", ""), "promotions": promotions, "tags": tags}
        if reg
        else {},
        created_utc=dt.datetime.now(tz=dt.UTC).isoformat(timespec="seconds"),
    )


__all__ = [
    "CARD_FILE",
    "CARD_VERSION",
    "ConditionRangeWarning",
    "ModelCard",
    "ValidRanges",
    "build_card",
    "ranges_from_lineage",
]
