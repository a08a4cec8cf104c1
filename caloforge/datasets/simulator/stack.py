"""The detector as the simulator sees it: a stack of mesh layers in X0 and λ_int, step grids, readout.

``Stack.from_detector`` turns a ``DetectorSpec`` (docs/simulator.md §1) into the arrays the vectorised
simulator needs, once per ``simulate`` call:

- one mesh layer = one absorber + active pitch at normal incidence (docs/simulator.md §4); its thickness
  along the shower axis is pitch / X0_eff in radiation lengths and pitch / λ_int,eff in interaction lengths,
  independent of the incident angle (along the axis the material per unit length is unchanged);
- a *dead layer* (``dead_layers``: support structure, cooling plates) holds ``extra_x0`` radiation lengths of
  passive material on top of its regular pitch and has no readout: everything deposited in it is invisible.
  Its extra thickness in λ_int is extra_x0 · X0_eff / λ_int,eff (support material is absorber-like);
- longitudinal integration steps of at most 0.1 X0 (EM, GFlash ``StepInX0``; Grindhammer & Peters
  hep-ex/0001020) or 0.1 λ_int (hadronic part) *tile the layers exactly*: each layer is cut into
  ceil(thickness / 0.1) equal steps, so every step lies in one layer, like Geant4 GFlash truncating a step at
  a volume boundary. The Gamma sampling fluctuation is additive (Σ Gamma(k_i, θ) = Gamma(Σ k_i, θ)), so the
  step length does not change the energy resolution;
- calibration: stored MeV = visible MeV / f_e (nominal electron sampling fraction, ê · f_mip), so E_tot/E_inc
  ≈ 1 for contained EM showers (CaloChallenge convention); the readout threshold applies to the *visible*
  energy, i.e. to calibrated voxels below threshold / f_e.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caloforge.platform.geometry import DetectorSpec, material

MAX_STEP_X0 = 0.1  # GFlash longitudinal step (Geant4 StepInX0, CMS divisionStepInX0)
MAX_STEP_LAMBDA = 0.1  # hadronic-part step in interaction lengths


@dataclass(frozen=True)
class StepGrid:
    """Longitudinal integration steps tiling the layers: ``edges`` (K+1,) in the grid's depth unit from
    the calorimeter front, ``layer`` (K,) mesh layer of each step, ``active`` (K,) whether it is read out."""

    edges: np.ndarray
    layer: np.ndarray
    active: np.ndarray

    @property
    def n_steps(self) -> int:
        return len(self.layer)

    @property
    def mid(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @classmethod
    def tile(cls, layer_thickness: np.ndarray, layer_active: np.ndarray, max_step: float) -> StepGrid:
        n_sub = np.maximum(1, np.ceil(layer_thickness / max_step - 1e-9)).astype(np.int64)
        layer = np.repeat(np.arange(len(layer_thickness), dtype=np.int64), n_sub)
        step = np.repeat(layer_thickness / n_sub, n_sub)
        edges = np.concatenate([[0.0], np.cumsum(step)])
        return cls(edges, layer, np.asarray(layer_active, dtype=bool)[layer])


@dataclass(frozen=True)
class Stack:
    """Precomputed, read-only view of one detector for the simulator (units in the names)."""

    name: str
    n_z: int
    n_phi: int
    n_r: int
    r_edges_mm: np.ndarray
    r_bin_width_mm: float | None  # set when the radial bins are uniform (fast binning path)
    homogeneous: bool
    z_eff: float
    ec_gev: float
    rm_mm: float
    x0_cm: float
    lambda_cm: float
    sampling_frequency: float  # F_S at normal incidence (0 for homogeneous media)
    e_hat: float
    f_e: float
    f_mip: float
    c_em: float  # stochastic term c (√GeV) of EM energy
    c_had: float  # stochastic term of the hadronic part
    constant_term: float
    front_dead_x0: float
    layer_x0: np.ndarray  # (n_z,) layer thickness along the axis in X0 (dead layers include extra_x0)
    layer_lambda: np.ndarray  # (n_z,) in λ_int
    layer_active: np.ndarray  # (n_z,) bool
    layer_edges_x0: np.ndarray  # (n_z+1,)
    layer_edges_lambda: np.ndarray  # (n_z+1,)
    mip_layer_mev: np.ndarray  # (n_z,) mean MIP energy loss over a full layer (all materials), MeV
    em_grid: StepGrid
    had_grid: StepGrid
    cracks: tuple[int, float, float] | None  # (n_modules, width_fraction, response)
    plate_modulation: float
    calo_inner_radius_mm: float
    threshold_calibrated_mev: float  # readout threshold (visible) / f_e

    @property
    def depth_x0(self) -> float:
        return float(self.layer_edges_x0[-1])

    @property
    def depth_lambda(self) -> float:
        return float(self.layer_edges_lambda[-1])

    @property
    def mip_calibration(self) -> float:
        """Calibrated MeV per MeV of MIP energy loss: the active share f_mip of the loss is visible, the
        stored energy is visible / f_e, so a MIP reads 1/ê of its loss (1 in homogeneous media)."""
        return self.f_mip / self.f_e

    def lambda_to_x0(self, depth_lambda: np.ndarray) -> np.ndarray:
        """Map a depth in λ_int to X0 (piecewise linear through the layers; dead layers differ in ratio)."""
        return np.interp(depth_lambda, self.layer_edges_lambda, self.layer_edges_x0)

    def layer_of_lambda(self, depth_lambda: np.ndarray) -> np.ndarray:
        """Mesh layer containing a depth in λ_int (n_z beyond the stack)."""
        return np.searchsorted(self.layer_edges_lambda, depth_lambda, side="right") - 1

    @classmethod
    def from_detector(cls, det: DetectorSpec) -> Stack:
        mat = det.material
        mesh = det.geometry
        where = f"detector {det.name!r}"
        if det.homogeneous:
            if det.sampling_term_sqrt_gev < 0:
                raise ValueError(
                    f"{where}: sampling_term_sqrt_gev must be >= 0, got {det.sampling_term_sqrt_gev}"
                )
        elif det.sampling_term_sqrt_gev <= 0:
            raise ValueError(
                f"{where}: sampling_term_sqrt_gev must be > 0 for a sampling calorimeter "
                f"(the spot count is 10.3/c · E^0.959), got {det.sampling_term_sqrt_gev}"
            )
        for key in (
            "hadronic_sampling_term_sqrt_gev",
            "constant_term",
            "front_dead_x0",
            "readout_threshold_mev",
        ):
            if not getattr(det, key) >= 0:
                raise ValueError(f"{where}: {key} must be >= 0, got {getattr(det, key)}")
        if not 0 <= det.plate_modulation < 1:
            raise ValueError(f"{where}: plate_modulation must be in [0, 1), got {det.plate_modulation}")
        if det.calo_inner_radius_mm <= 0:
            raise ValueError(f"{where}: calo_inner_radius_mm must be > 0, got {det.calo_inner_radius_mm}")

        pitch_x0 = mat.pitch_cm / mat.x0_cm
        pitch_lambda = mat.pitch_cm / mat.lambda_int_cm
        layer_x0 = np.full(mesh.n_z, pitch_x0)
        layer_lambda = np.full(mesh.n_z, pitch_lambda)
        active = np.ones(mesh.n_z, dtype=bool)
        absorber = material(det.absorber.material)
        mip = det.absorber.thickness_mm / 10.0 * absorber.density_gcm3 * absorber.dedx_min_mev_cm2_g
        if det.active is not None:
            act = material(det.active.material)
            mip += det.active.thickness_mm / 10.0 * act.density_gcm3 * act.dedx_min_mev_cm2_g
        mip_layer = np.full(mesh.n_z, mip)
        if det.dead_layers is not None:
            if det.dead_layers.extra_x0 < 0:
                raise ValueError(
                    f"{where}: dead_layers.extra_x0 must be >= 0, got {det.dead_layers.extra_x0}"
                )
            idx = np.asarray(det.dead_layers.indices, dtype=np.int64)
            extra = det.dead_layers.extra_x0
            layer_x0[idx] += extra
            layer_lambda[idx] += extra * mat.x0_cm / mat.lambda_int_cm
            active[idx] = False
            mip_layer[idx] += extra * absorber.x0_gcm2 * absorber.dedx_min_mev_cm2_g

        edges = np.asarray(mesh.r_edges_mm, dtype=np.float64)
        widths = np.diff(edges)
        uniform = float(widths[0]) if np.allclose(widths, widths[0], rtol=1e-9, atol=0) else None
        cracks = None
        if det.cracks is not None:
            cracks = (det.cracks.n_modules, det.cracks.width_fraction, det.cracks.response)
        return cls(
            name=det.name,
            n_z=mesh.n_z,
            n_phi=mesh.n_phi,
            n_r=mesh.n_r,
            r_edges_mm=edges,
            r_bin_width_mm=uniform,
            homogeneous=det.homogeneous,
            z_eff=mat.z_eff,
            ec_gev=mat.ec_mev / 1000.0,
            rm_mm=mat.rm_cm * 10.0,
            x0_cm=mat.x0_cm,
            lambda_cm=mat.lambda_int_cm,
            sampling_frequency=mat.sampling_frequency,
            e_hat=mat.e_over_mip,
            f_e=mat.f_e,
            f_mip=mat.f_mip,
            c_em=det.sampling_term_sqrt_gev,
            c_had=det.hadronic_sampling_term_sqrt_gev,
            constant_term=det.constant_term,
            front_dead_x0=det.front_dead_x0,
            layer_x0=layer_x0,
            layer_lambda=layer_lambda,
            layer_active=active,
            layer_edges_x0=np.concatenate([[0.0], np.cumsum(layer_x0)]),
            layer_edges_lambda=np.concatenate([[0.0], np.cumsum(layer_lambda)]),
            mip_layer_mev=mip_layer,
            em_grid=StepGrid.tile(layer_x0, active, MAX_STEP_X0),
            had_grid=StepGrid.tile(layer_lambda, active, MAX_STEP_LAMBDA),
            cracks=cracks,
            plate_modulation=det.plate_modulation,
            calo_inner_radius_mm=det.calo_inner_radius_mm,
            threshold_calibrated_mev=det.readout_threshold_mev / mat.f_e,
        )

    def sin_theta_factors(self, sin_theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Incidence at polar angle θ (docs/simulator.md §4): (front dead X0 / sin θ, F_S · sin θ, and the
        factor 1/√sin θ of the stochastic terms). Homogeneous media have no layers to cross: F_S stays 0 and
        the stochastic (photo-statistics) term does not depend on the angle."""
        front = self.front_dead_x0 / sin_theta
        if self.homogeneous:
            return front, np.zeros_like(sin_theta), np.ones_like(sin_theta)
        return front, self.sampling_frequency * sin_theta, 1.0 / np.sqrt(sin_theta)
