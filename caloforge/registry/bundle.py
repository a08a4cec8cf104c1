"""What the registry needs to know about a ShowerModel bundle, read by loading it (no mlflow here).

``inspect_bundle(dir)`` loads the bundle through ``caloforge.platform.checkpoint.load_bundle`` (which
refuses a newer ``schema_version``, a weights file whose sha256 differs from config.json and a state dict
that does not fit) and returns a ``BundleInfo``: detectors, particles and ranges it was trained on,
lineage, mesh, sampler defaults and the sha256 of every file (recorded at registration, checked after
every download).

The registry reads the loaded model's typed ``Lineage`` (``caloforge.platform.lineage``; bundles of
schema 1/2 are migrated by ``load_bundle``): ``kind`` (base | adapted | distilled), ``parent_uri`` (registry
URI such as ``models:/caloforge-base/3`` or path of the model it was derived from), ``parent_version``,
``strategy`` (registered as the ``adaptation_method`` tag), ``target_detector``, ``dataset_manifest_hash``
and ``trained`` (the ranges of the model card). See docs/registry.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caloforge.platform.backbone import DEFAULT_POS_MAX_FREQ, DEFAULT_POS_MAX_FREQ_R
from caloforge.platform.hashing import sha256_file
from caloforge.registry.card import ValidRanges, ranges_from_lineage

if TYPE_CHECKING:
    from caloforge.platform.lineage import Lineage
    from caloforge.platform.shower_model import ShowerModel

_URI_RE = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))?/?$")


def parse_model_uri(uri: str) -> tuple[str, int | None, str | None]:
    """(name, version, alias) of ``models:/NAME/3``, ``models:/NAME@alias``, ``NAME@alias`` or ``NAME``."""
    m = _URI_RE.match(uri.strip())
    if not m:
        raise ValueError(
            f"invalid model URI {uri!r}: expected models:/NAME/VERSION, models:/NAME@ALIAS or NAME[@ALIAS]"
        )
    version = m.group("version")
    return m.group("name"), (int(version) if version else None), m.group("alias")


def bundle_files(directory: str | Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``directory``."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def verify_bundle_files(directory: str | Path, expected: Mapping[str, str], what: str) -> None:
    """Compare the files of ``directory`` with the digests recorded at registration (ValueError on any
    difference). Nothing recorded (a version without the ``caloforge.bundle_files`` tag: registered outside
    CaloForge, or its tag removed) is refused too: such a bundle cannot be verified."""
    if not expected:
        raise ValueError(
            f"{what}: the registry records no file digests for this version (tag caloforge.bundle_files "
            "missing), so its bundle cannot be verified; register the bundle again through caloforge"
        )
    actual = bundle_files(directory)
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise ValueError(f"corrupt artifact of {what}: bundle file(s) {missing} missing")
    bad = sorted(f for f, digest in expected.items() if actual[f] != digest)
    if bad:
        f = bad[0]
        raise ValueError(
            f"corrupt artifact of {what}: {f} has sha256 {actual[f][:12]}…, registered {expected[f][:12]}… "
            f"({len(bad)} file(s) differ)"
        )


@dataclass(frozen=True)
class BundleInfo:
    """A summary of one loaded bundle (JSON-able parts and its typed lineage)."""

    path: Path
    schema_version: int
    caloforge_version: str
    detectors: tuple[str, ...]
    n_detector_slots: int
    mesh_shape: tuple[int, int, int]
    r_edges_mm: tuple[float, ...]
    parametrisation: str
    backbone: Any
    transform: str
    sampler: str
    num_steps: int
    n_parameters: int
    lineage: Lineage
    ranges: ValidRanges
    files: dict[str, str] = field(default_factory=dict)
    # where the mesh sits in the backbone's position frame (ShowerModelConfig; (1, 1), None: the mesh is it)
    position_extent: tuple[float, float] = (1.0, 1.0)
    position_frame: tuple[float, float] | None = None
    pos_max_freq: float = (
        DEFAULT_POS_MAX_FREQ  # the position features' highest frequency (32 before schema 4)
    )
    pos_max_freq_r: float = DEFAULT_POS_MAX_FREQ_R  # the radius features' (before schema 5: pos_max_freq)

    @property
    def extra(self) -> dict[str, str]:
        """The lineage's free-form run information."""
        return dict(self.lineage.extra)

    @property
    def particles(self) -> tuple[str, ...]:
        return self.ranges.particles or ()

    @property
    def pdgs(self) -> tuple[int, ...]:
        from caloforge.platform.conditioning import pdg_of

        return tuple(pdg_of(p) for p in self.particles)

    @property
    def kind(self) -> str:
        return self.lineage.kind

    def lineage_tags(self) -> dict[str, str]:
        """Registry tags (short keys) derived from the bundle's lineage (empty string: not recorded)."""
        lineage = self.lineage
        parent = lineage.parent_uri or ""
        parent_version = lineage.parent_version or ""
        if parent.startswith("models:/") and not parent_version:
            try:
                _, version, alias = parse_model_uri(parent)
            except ValueError:
                version, alias = None, None
            parent_version = str(version) if version is not None else (f"@{alias}" if alias else "")
        return {
            "parent_uri": parent,
            "parent_version": parent_version,
            "adaptation_method": lineage.strategy or "",
            "target_detector": lineage.target_detector or "",
            "dataset_manifest_hash": lineage.dataset_manifest_hash or "",
        }

    def summary(self) -> dict[str, Any]:
        """Plain data for model cards and MLflow model metadata."""
        backbone = self.backbone if isinstance(self.backbone, str) else dict(self.backbone)
        return {
            "schema_version": self.schema_version,
            "caloforge_version": self.caloforge_version,
            "mesh_shape": list(self.mesh_shape),
            "r_edges_mm": list(self.r_edges_mm),
            "detectors": list(self.detectors),
            "detector_index": {d: i for i, d in enumerate(self.detectors)},
            "n_detector_slots": self.n_detector_slots,
            "parametrisation": self.parametrisation,
            "backbone": backbone,
            "transform": self.transform,
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "n_parameters": self.n_parameters,
            "position_extent": list(self.position_extent),
            "position_frame": None if self.position_frame is None else list(self.position_frame),
            "pos_max_freq": self.pos_max_freq,
            "pos_max_freq_r": self.pos_max_freq_r,
        }

    def pyfunc_metadata(self) -> dict[str, Any]:
        """Metadata stored in the MLmodel file (what a pyfunc user needs to reshape the output)."""
        return {
            **self.summary(),
            "output": "float32 (N, n_z*n_phi*n_r) MeV, voxel index = z*(n_phi*n_r) + phi*n_r + r",
            "valid_ranges": self.ranges.to_dict(),
        }


def load_checked(directory: str | Path, what: str | None = None) -> tuple[ShowerModel, BundleInfo]:
    """Load a bundle and summarise it; every problem is a ValueError naming ``what`` (default: the path)."""
    from caloforge.platform.checkpoint import load_bundle, read_bundle_config

    directory = Path(directory)
    label = what or str(directory)
    if not directory.is_dir():
        raise ValueError(f"{label}: bundle directory {directory} not found")
    try:
        config = read_bundle_config(directory)
        model = load_bundle(directory, device="cpu")
    except ValueError as exc:
        detail = str(exc).replace(str(directory), label) if what else str(exc)  # no staging paths
        raise ValueError(f"not a loadable model bundle: {detail}") from exc
    info = _summarise(directory, config, model)
    return model, info


def inspect_bundle(directory: str | Path, what: str | None = None) -> BundleInfo:
    """``load_checked`` without keeping the model."""
    return load_checked(directory, what)[1]


def _summarise(directory: Path, config: dict[str, Any], model: ShowerModel) -> BundleInfo:
    from caloforge.config import to_dict

    mc = model.config
    backbone = mc.backbone if isinstance(mc.backbone, str) else to_dict(mc.backbone)
    return BundleInfo(
        path=directory.resolve(),
        schema_version=int(config["schema_version"]),
        caloforge_version=str(config.get("caloforge_version", "")),
        detectors=tuple(model.vocab.detectors),
        n_detector_slots=int(model.vocab.n_detector_slots),
        mesh_shape=tuple(int(v) for v in model.mesh_shape),  # type: ignore[arg-type]
        r_edges_mm=tuple(float(r) for r in model.mesh.r_edges_mm),
        parametrisation=mc.parametrisation,
        backbone=backbone,
        transform=mc.transform,
        sampler=mc.sampler,
        num_steps=int(mc.num_steps),
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        lineage=model.lineage,  # typed; migrated from schema 1/2 by load_bundle
        ranges=ranges_from_lineage(model.lineage, model.vocab.detectors),
        files=bundle_files(directory),
        position_extent=tuple(float(v) for v in mc.position_extent),  # type: ignore[arg-type]
        position_frame=None if mc.position_frame is None else tuple(float(v) for v in mc.position_frame),  # type: ignore[arg-type]
        pos_max_freq=float(mc.backbone_config().pos_max_freq),
        pos_max_freq_r=float(mc.backbone_config().radius_max_freq),
    )
