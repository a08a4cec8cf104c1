"""Where a model came from: the typed ``lineage`` of a bundle's ``config.json`` (bundle schema 3).

``Lineage`` records what kind of model it is (``base`` | ``adapted`` | ``distilled``), the model it was
derived from (``parent_uri``: a registry URI such as ``models:/caloforge-base/3`` or a bundle path, and
``parent_version``), how (``strategy``: e.g. ``full``, ``lora``, ``embedding``, ``consistency``), with which
training ``objective``, for which ``target_detector``, on which data (``dataset_manifest_hash``) and the
conditions it was trained on (``trained``: ``TrainedRanges``). ``extra`` holds free-form run information
(``run_dir``, ``steps``, …) as strings; the keys that used to carry the typed fields as strings (schema 1
and 2 bundles; ``checkpoint.py`` migrates them on load) are refused there, so nothing parses them back.

``TrainedRanges`` keeps the units of the shard manifest's stats blocks (``caloforge.datasets.stats``):
energies in MeV and polar angles in radians, so the numbers recorded are exactly those of the stats (no
unit conversion). Each quantity is ``None`` when it was not recorded (the model card then does not check
it); particles are canonical names (``"e-"``, ``"pi+"``; PDG ids are accepted and converted).

Both classes are frozen and validate in ``__post_init__``: every problem is a ValueError naming the field
(``lineage.kind``, ``trained.energy_mev``, …). ``caloforge.config.to_dict``/``from_dict`` (de)serialise them.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from caloforge.platform.conditioning import particle_name, pdg_of

KINDS = ("base", "adapted", "distilled")
# extra keys of schema-1/2 bundles that are typed fields now (strings the model card used to parse back)
LEGACY_RANGE_KEYS = ("energy_mev_min", "energy_mev_max", "theta_rad_min", "theta_rad_max", "particles")
LEGACY_FIELD_KEYS = {
    "kind": "kind",
    "parent_version": "parent_version",
    "adaptation_method": "strategy",
    "target_detector": "target_detector",
}


def _range(value: Any, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{what}: expected (lo, hi), got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise ValueError(f"{what}: bounds must be numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{what}: invalid range ({lo!r}, {hi!r}) (finite, lo <= hi)")
    return lo, hi


def _names(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, tuple | list):
        raise ValueError(f"{what}: expected a tuple of names, got {value!r}")
    if not value:
        raise ValueError(f"{what}: empty (use None when not recorded)")
    for v in value:
        if not isinstance(v, str) or not v.strip() or v != v.strip():
            raise ValueError(f"{what}: names must be non-empty strings without surrounding spaces, got {v!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{what}: duplicate names in {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class TrainedRanges:
    """The conditions a model was trained on (``None``: not recorded)."""

    energy_mev: tuple[float, float] | None = None  # incident energy, MeV (stats energy_mev_min/max)
    theta_rad: tuple[float, float] | None = None  # polar angle, rad (stats theta_rad_min/max)
    particles: tuple[str, ...] | None = None  # canonical particle names of the streamed shards
    detectors: tuple[str, ...] | None = None  # detectors of the streamed groups

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "energy_mev", _range(self.energy_mev, "trained.energy_mev"))
        set_(self, "theta_rad", _range(self.theta_rad, "trained.theta_rad"))
        particles = self.particles
        if particles is not None and isinstance(particles, tuple | list):
            canonical = []
            for p in particles:
                if isinstance(p, bool) or not isinstance(p, str | int):
                    raise ValueError(f"trained.particles: expected names or PDG ids, got {p!r}")
                try:
                    canonical.append(particle_name(pdg_of(p)))
                except ValueError as exc:
                    raise ValueError(f"trained.particles: {exc}") from None
            particles = canonical
        set_(self, "particles", _names(particles, "trained.particles"))
        set_(self, "detectors", _names(self.detectors, "trained.detectors"))
        if all(getattr(self, f) is None for f in ("energy_mev", "theta_rad", "particles", "detectors")):
            raise ValueError("trained: nothing recorded (use lineage.trained = None instead)")


def _optional_str(value: Any, what: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip() or value != value.strip()):
        raise ValueError(
            f"{what}: expected a non-empty string without surrounding spaces or None, got {value!r}"
        )


@dataclass(frozen=True)
class Lineage:
    """Where a model came from (stored in the bundle's config.json; see the module docstring)."""

    kind: Literal["base", "adapted", "distilled"] = "base"
    parent_uri: str | None = None  # the model it was adapted/distilled from (registry URI or bundle path)
    parent_version: str | None = None  # the parent's registry version (or "@alias"), when known
    strategy: str | None = None  # how it was derived: full, lora, embedding, consistency, ...
    objective: str | None = None  # the training objective (the ShowerModelConfig objective name)
    target_detector: str | None = None  # the detector an adapted/distilled model is for
    dataset_manifest_hash: str | None = None  # fingerprint of the shard manifest it was trained on
    trained: TrainedRanges | None = None  # the conditions it was trained on (the model card's ranges)
    created_utc: str | None = None  # ISO-8601; filled by save_bundle when None
    extra: dict[str, str] = field(default_factory=dict)  # free-form run info: run_dir, steps, ...

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lineage.kind: {self.kind!r} is not one of {list(KINDS)}")
        for name in (
            "parent_uri",
            "parent_version",
            "strategy",
            "objective",
            "target_detector",
            "dataset_manifest_hash",
            "created_utc",
        ):
            _optional_str(getattr(self, name), f"lineage.{name}")
        if self.parent_version is not None and self.parent_uri is None:
            raise ValueError(f"lineage.parent_version: {self.parent_version!r} given without a parent_uri")
        if self.trained is not None and not isinstance(self.trained, TrainedRanges):
            raise ValueError(
                f"lineage.trained: expected TrainedRanges or None, got {type(self.trained).__name__}"
            )
        if self.created_utc is not None:
            try:
                dt.datetime.fromisoformat(self.created_utc)
            except ValueError:
                raise ValueError(f"lineage.created_utc: not an ISO-8601 time: {self.created_utc!r}") from None
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"lineage.extra: expected a mapping of strings, got {type(self.extra).__name__}")
        for key, value in self.extra.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"lineage.extra: keys and values must be strings, got {key!r}: {value!r}")
        typed = sorted(set(self.extra) & {*LEGACY_RANGE_KEYS, *LEGACY_FIELD_KEYS})
        if typed:
            where = {k: f"lineage.{LEGACY_FIELD_KEYS.get(k, 'trained')}" for k in typed}
            raise ValueError(f"lineage.extra: {typed} are typed fields now ({where}), not extra strings")
        object.__setattr__(self, "extra", dict(self.extra))


__all__ = ["KINDS", "LEGACY_FIELD_KEYS", "LEGACY_RANGE_KEYS", "Lineage", "TrainedRanges"]
