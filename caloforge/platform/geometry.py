"""Detector and mesh geometry in physical units.

A detector is data (``caloforge/platform/detectors/*.yaml``, shipped as package data), not code.
``DetectorSpec`` holds the absorber/active structure, the readout mesh and the simulation knobs;
``EffectiveMaterial`` holds the derived quantities of docs/simulator.md §1 (Z_eff, X0_eff, E_c,eff, R_M,eff,
λ_int,eff, F_S, ê, sampling fractions).

Units in names: ``_mm``, ``_cm``, ``_gcm2`` (g/cm²), ``_mev``, ``_gev``, ``_x0`` (radiation lengths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from caloforge.config import ConfigError, from_dict, read_yaml


@dataclass(frozen=True)
class Material:
    """PDG material constants."""

    name: str
    Z: float
    A: float
    density_gcm3: float
    x0_gcm2: float
    ec_mev: float
    lambda_int_cm: float
    dedx_min_mev_cm2_g: float

    @property
    def x0_cm(self) -> float:
        return self.x0_gcm2 / self.density_gcm3

    @property
    def lambda_int_gcm2(self) -> float:
        return self.lambda_int_cm * self.density_gcm3


# PDG values as given in docs/simulator.md §1 (λ_int in cm, dE/dx_min in MeV cm²/g).
MATERIALS: dict[str, Material] = {
    m.name: m
    for m in (
        Material("W", 74, 183.84, 19.30, 6.76, 7.97, 9.95, 1.145),
        Material("Pb", 82, 207.2, 11.35, 6.37, 7.43, 17.59, 1.122),
        Material("PbWO4", 68.36, 170.87, 8.30, 7.39, 9.64, 20.28, 1.229),
        Material("Si", 14, 28.09, 2.329, 21.82, 40.19, 46.5, 1.664),
        Material("polystyrene", 5.61, 11.16, 1.06, 43.79, 93.11, 72.7, 1.936),
        Material("LAr", 18, 39.95, 1.396, 19.55, 32.84, 85.7, 1.508),
        Material("Fe", 26, 55.85, 7.874, 13.84, 21.68, 16.77, 1.451),
        Material("Cu", 29, 63.55, 8.96, 12.86, 19.42, 15.32, 1.403),
    )
}


def material(name: str) -> Material:
    try:
        return MATERIALS[name]
    except KeyError:
        raise ValueError(f"unknown material {name!r} (known: {sorted(MATERIALS)})") from None


@dataclass(frozen=True)
class EffectiveMaterial:
    """Effective quantities of an absorber + active structure (docs/simulator.md §1)."""

    z_eff: float
    a_eff: float
    density_gcm3: float
    x0_gcm2: float
    x0_cm: float
    ec_mev: float
    rm_cm: float
    lambda_int_cm: float
    sampling_frequency: float  # F_S = X0_eff[cm] / pitch[cm]; 0 for homogeneous media
    e_over_mip: float  # ê
    f_mip: float
    f_e: float  # sampling fraction for electrons = ê · f_mip (1 for homogeneous media)
    pitch_cm: float

    @property
    def homogeneous(self) -> bool:
        return self.sampling_frequency == 0.0


def effective_material(
    absorber: Material, d_absorber_mm: float, active: Material | None, d_active_mm: float
) -> EffectiveMaterial:
    """Combine an absorber plate and an active layer (or a homogeneous medium when active is None)."""
    if d_absorber_mm <= 0:
        raise ValueError(f"absorber thickness must be > 0 mm, got {d_absorber_mm}")
    parts = [(absorber, d_absorber_mm / 10.0)]
    if active is not None:
        if d_active_mm <= 0:
            raise ValueError(f"active thickness must be > 0 mm, got {d_active_mm}")
        parts.append((active, d_active_mm / 10.0))
    mass = [d * m.density_gcm3 for m, d in parts]
    total_mass = sum(mass)
    w = [x / total_mass for x in mass]
    pitch_cm = sum(d for _, d in parts)
    rho = total_mass / pitch_cm
    z_eff = sum(wi * m.Z for wi, (m, _) in zip(w, parts, strict=True))
    a_eff = sum(wi * m.A for wi, (m, _) in zip(w, parts, strict=True))
    inv_x0 = sum(wi / m.x0_gcm2 for wi, (m, _) in zip(w, parts, strict=True))
    x0_gcm2 = 1.0 / inv_x0
    ec_over_x0 = sum(wi * m.ec_mev / m.x0_gcm2 for wi, (m, _) in zip(w, parts, strict=True))
    ec = x0_gcm2 * ec_over_x0
    rm_cm = (21.2 / ec_over_x0) / rho
    lambda_gcm2 = 1.0 / sum(wi / m.lambda_int_gcm2 for wi, (m, _) in zip(w, parts, strict=True))
    if active is None:
        return EffectiveMaterial(
            z_eff,
            a_eff,
            rho,
            x0_gcm2,
            x0_gcm2 / rho,
            ec,
            rm_cm,
            lambda_gcm2 / rho,
            0.0,
            1.0,
            1.0,
            1.0,
            pitch_cm,
        )
    dedx = [d * m.density_gcm3 * m.dedx_min_mev_cm2_g for m, d in parts]
    f_mip = dedx[1] / sum(dedx)
    e_hat = 1.0 / (1.0 + 0.007 * (absorber.Z - active.Z))
    return EffectiveMaterial(
        z_eff=z_eff,
        a_eff=a_eff,
        density_gcm3=rho,
        x0_gcm2=x0_gcm2,
        x0_cm=x0_gcm2 / rho,
        ec_mev=ec,
        rm_cm=rm_cm,
        lambda_int_cm=lambda_gcm2 / rho,
        sampling_frequency=(x0_gcm2 / rho) / pitch_cm,
        e_over_mip=e_hat,
        f_mip=f_mip,
        f_e=e_hat * f_mip,
        pitch_cm=pitch_cm,
    )


@dataclass(frozen=True)
class Mesh:
    """The cylindrical scoring mesh: n_z layers × n_phi angular bins × n_r radial bins (r_edges in mm)."""

    n_z: int
    n_phi: int
    r_edges_mm: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.n_z < 1 or self.n_phi < 1:
            raise ValueError(f"mesh n_z and n_phi must be >= 1, got {self.n_z}, {self.n_phi}")
        edges = np.asarray(self.r_edges_mm, dtype=float)
        if edges.size < 2 or edges[0] != 0.0 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"mesh r_edges_mm must start at 0 and increase strictly, got {self.r_edges_mm}")

    @property
    def n_r(self) -> int:
        return len(self.r_edges_mm) - 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_z, n_phi, n_r): the canonical in-memory order."""
        return (self.n_z, self.n_phi, self.n_r)

    @property
    def n_voxels(self) -> int:
        return self.n_z * self.n_phi * self.n_r

    @property
    def r_max_mm(self) -> float:
        return float(self.r_edges_mm[-1])

    def r_centers_mm(self) -> np.ndarray:
        e = np.asarray(self.r_edges_mm, dtype=np.float64)
        return 0.5 * (e[1:] + e[:-1])

    def phi_centers_rad(self) -> np.ndarray:
        """Angular bin centres at −π + (j + ½)·2π/n_phi (CaloChallenge convention)."""
        return -math.pi + (np.arange(self.n_phi) + 0.5) * 2 * math.pi / self.n_phi

    def voxel_coordinates_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_PR, y_PR, r_PR): bin-centre coordinates x = r_c cos φ_c, y = r_c sin φ_c, r = r_c, each
        (P, R) (the CaloChallenge convention of the centre-of-energy and width features)."""
        r_c = self.r_centers_mm()
        phi_c = self.phi_centers_rad()
        x = np.cos(phi_c)[:, None] * r_c[None, :]
        y = np.sin(phi_c)[:, None] * r_c[None, :]
        r = np.broadcast_to(r_c[None, :], x.shape).copy()
        return x, y, r


@dataclass(frozen=True)
class Layer:
    material: str
    thickness_mm: float


@dataclass(frozen=True)
class Cracks:
    """φ-periodic module cracks: n_modules per 2π, crack width as a fraction of a module, response in it."""

    n_modules: int
    width_fraction: float
    response: float

    def __post_init__(self) -> None:
        if self.n_modules < 1 or not 0 < self.width_fraction < 1 or not 0 <= self.response <= 1:
            raise ValueError(f"invalid cracks {self}")


@dataclass(frozen=True)
class DeadLayers:
    indices: tuple[int, ...]
    extra_x0: float


@dataclass(frozen=True)
class MeshSpec:
    n_z: int
    n_phi: int
    r_edges_mm: tuple[float, ...]


@dataclass(frozen=True)
class DetectorSpec:
    """One detector: materials, structure, readout mesh and simulation knobs (docs/simulator.md §1)."""

    name: str
    description: str
    absorber: Layer
    mesh: MeshSpec
    active: Layer | None = None  # None: homogeneous (e.g. PbWO4 crystals)
    front_dead_x0: float = 0.0
    sampling_term_sqrt_gev: float = 0.1  # c in σ/E = c/√E (EM)
    hadronic_sampling_term_sqrt_gev: float = 0.5
    constant_term: float = 0.0
    cracks: Cracks | None = None
    dead_layers: DeadLayers | None = None
    plate_modulation: float = 0.0  # inclined-plate (accordion) modulation amplitude of the sampling fraction
    calo_inner_radius_mm: float = 1500.0  # R_calo: converts a local transverse offset to a global φ shift
    readout_threshold_mev: float = 0.0005  # on visible energy (0.5 keV)
    energy_range_gev: tuple[float, float] = (1.0, 1000.0)
    particles: tuple[str, ...] = ("e-", "gamma", "pi+")

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"detector name must be a non-empty word, got {self.name!r}")
        material(self.absorber.material)
        if self.active is not None:
            material(self.active.material)
        lo, hi = self.energy_range_gev
        if not 0 < lo < hi:
            raise ValueError(f"energy_range_gev must satisfy 0 < lo < hi, got {self.energy_range_gev}")
        if self.dead_layers is not None:
            bad = [i for i in self.dead_layers.indices if not 0 <= i < self.mesh.n_z]
            if bad:
                raise ValueError(f"dead_layers.indices out of range [0, {self.mesh.n_z}): {bad}")
            if len(set(self.dead_layers.indices)) != len(self.dead_layers.indices):
                raise ValueError(f"dead_layers.indices has duplicates: {self.dead_layers.indices}")
            if self.dead_layers.extra_x0 < 0:
                raise ValueError(f"dead_layers.extra_x0 must be >= 0, got {self.dead_layers.extra_x0}")
        if self.sampling_term_sqrt_gev < 0 or (self.active is not None and self.sampling_term_sqrt_gev == 0):
            raise ValueError(
                f"sampling_term_sqrt_gev must be > 0 for a sampling detector (>= 0 if homogeneous), "
                f"got {self.sampling_term_sqrt_gev}"
            )
        for name in (
            "hadronic_sampling_term_sqrt_gev",
            "constant_term",
            "front_dead_x0",
            "readout_threshold_mev",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.plate_modulation < 1:
            raise ValueError(f"plate_modulation must be in [0, 1), got {self.plate_modulation}")
        if self.calo_inner_radius_mm <= 0:
            raise ValueError(f"calo_inner_radius_mm must be > 0, got {self.calo_inner_radius_mm}")
        from caloforge.platform.conditioning import pdg_of

        for p in self.particles:
            pdg_of(p)

    @cached_property
    def geometry(self) -> Mesh:
        return Mesh(self.mesh.n_z, self.mesh.n_phi, tuple(self.mesh.r_edges_mm))

    @cached_property
    def material(self) -> EffectiveMaterial:
        act = material(self.active.material) if self.active is not None else None
        return effective_material(
            material(self.absorber.material),
            self.absorber.thickness_mm,
            act,
            self.active.thickness_mm if self.active is not None else 0.0,
        )

    @property
    def homogeneous(self) -> bool:
        return self.active is None

    @property
    def sampling_fraction(self) -> float:
        """Nominal electron sampling fraction f_e used to calibrate stored energies (1 if homogeneous)."""
        return self.material.f_e

    @property
    def layer_pitch_mm(self) -> float:
        return self.material.pitch_cm * 10.0

    @property
    def radius_rm(self) -> float:
        """Outer radius of the mesh in Molière radii of the effective material."""
        return self.mesh.r_edges_mm[-1] / (self.material.rm_cm * 10.0)

    @property
    def depth_x0(self) -> float:
        """Total depth of the mesh in X0 at normal incidence (dead-layer material included)."""
        dead = len(self.dead_layers.indices) * self.dead_layers.extra_x0 if self.dead_layers else 0.0
        return self.mesh.n_z * self.material.pitch_cm / self.material.x0_cm + dead


# Built-in detectors ship inside the package (package data), so a non-editable install finds them too.
DETECTORS_DIR = Path(__file__).resolve().parent / "detectors"


def load_detector_file(path: str | Path) -> DetectorSpec:
    path = Path(path)
    spec = from_dict(DetectorSpec, read_yaml(path), str(path))
    if spec.name != path.stem:
        raise ConfigError(f"{path}: name {spec.name!r} must equal the file stem {path.stem!r}")
    return spec


def builtin_detector_names(directory: Path = DETECTORS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_detector(name_or_path: str | Path, directory: Path = DETECTORS_DIR) -> DetectorSpec:
    """A built-in detector by name, or a detector YAML by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return load_detector_file(p)
    candidate = directory / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ValueError(
            f"unknown detector {str(name_or_path)!r} (built-in: {builtin_detector_names(directory)})"
        )
    return load_detector_file(candidate)


def detector_names_exist(names: list[str] | tuple[str, ...]) -> None:
    known = set(builtin_detector_names())
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown detector(s) {missing} (built-in: {sorted(known)})")


__all__ = [
    "DETECTORS_DIR",
    "MATERIALS",
    "Cracks",
    "DeadLayers",
    "DetectorSpec",
    "EffectiveMaterial",
    "Layer",
    "Material",
    "Mesh",
    "MeshSpec",
    "builtin_detector_names",
    "effective_material",
    "load_detector",
    "material",
]
