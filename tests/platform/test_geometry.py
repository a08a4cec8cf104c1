"""Detector geometry: effective-material worked numbers (docs/simulator.md §1), the built-in detectors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from caloforge.config import ConfigError
from caloforge.platform.conditioning import pdg_of
from caloforge.platform.geometry import (
    DETECTORS_DIR,
    builtin_detector_names,
    effective_material,
    load_detector,
    material,
)

REQUIRED = {"par04-siw", "par04-scipb", "pbwo4", "lar-pb", "wsi-granular", "odd-like", "fe-sci"}


def _close(value: float, expected: float, rel: float = 0.01) -> bool:
    return math.isclose(value, expected, rel_tol=rel)


@pytest.mark.parametrize(
    ("absorber", "d_abs", "active", "d_act", "expected"),
    [
        # docs/simulator.md §1 worked checks
        (
            "Pb",
            2.0,
            "LAr",
            4.0,
            {"z_eff": 69.4, "x0_cm": 1.56, "rm_cm": 3.55, "sampling_frequency": 2.60, "e_over_mip": 0.691},
        ),
        (
            "W",
            3.5,
            "Si",
            0.3,
            {"z_eff": 73.4, "x0_cm": 0.379, "rm_cm": 0.995, "sampling_frequency": 1.00, "e_over_mip": 0.704},
        ),
        # gflash-reference.md §4.2 third example (E_c too) and §4.3 sampling fractions
        (
            "Fe",
            20.0,
            "polystyrene",
            5.0,
            {
                "z_eff": 25.3,
                "x0_cm": 2.17,
                "ec_mev": 22.4,
                "rm_cm": 2.06,
                "sampling_frequency": 0.87,
                "e_over_mip": 0.875,
            },
        ),
    ],
)
def test_effective_material_worked_examples(absorber, d_abs, active, d_act, expected) -> None:
    eff = effective_material(material(absorber), d_abs, material(active), d_act)
    for key, value in expected.items():
        assert _close(getattr(eff, key), value), (key, getattr(eff, key), value)


def test_sampling_fractions_and_homogeneous_limit() -> None:
    pb_lar = effective_material(material("Pb"), 2.0, material("LAr"), 4.0)
    w_si = effective_material(material("W"), 3.5, material("Si"), 0.3)
    assert _close(pb_lar.f_e, 0.17, rel=0.02) and _close(w_si.f_e, 0.010, rel=0.05)
    assert _close(pb_lar.f_e, pb_lar.e_over_mip * pb_lar.f_mip, rel=1e-12)
    crystal = effective_material(material("PbWO4"), 5.0, None, 0.0)
    assert crystal.homogeneous and crystal.f_e == 1.0 and crystal.e_over_mip == 1.0
    assert _close(crystal.x0_cm, 0.890, rel=0.005) and _close(crystal.rm_cm, 1.959, rel=0.005)
    # R_M = X0 · 21.2 MeV / E_c holds for every single material (PDG consistency)
    for name in ("W", "Pb", "Si", "LAr", "Fe", "Cu", "polystyrene"):
        m = effective_material(material(name), 1.0, None, 0.0)
        assert _close(m.rm_cm, m.x0_cm * 21.2 / m.ec_mev, rel=1e-9)


def test_builtin_set_is_complete() -> None:
    assert set(builtin_detector_names()) >= REQUIRED


@pytest.mark.parametrize("name", builtin_detector_names())
def test_builtin_detector_is_physically_sane(name: str) -> None:
    det = load_detector(name)
    assert det.name == name
    assert det.geometry.shape == (45, 16, 9), "every built-in detector uses the 45 x 16 x 9 mesh"
    edges = np.asarray(det.mesh.r_edges_mm)
    assert edges[0] == 0.0 and np.all(np.diff(edges) > 0)
    mat = det.material
    assert 0.0 < det.sampling_fraction <= 1.0
    assert (det.sampling_fraction == 1.0) == det.homogeneous
    assert 5.0 < mat.z_eff < 83.0 and 0.0 < mat.e_over_mip <= 1.0
    if not det.homogeneous:
        assert 0.5 < mat.sampling_frequency < 5.0  # a few layers per X0: the sampling formulas apply
        assert 0.05 <= det.sampling_term_sqrt_gev <= 0.3
    else:
        assert 0.0 <= det.sampling_term_sqrt_gev <= 0.05
    depth_lambda = det.mesh.n_z * mat.pitch_cm / mat.lambda_int_cm
    if name == "fe-sci":
        assert depth_lambda > 4.0, "the hadronic section must contain hadronic showers"
        assert edges[-1] >= 1.4 * mat.lambda_int_cm * 10, "the mesh must cover ~1.5 λ_int laterally"
    else:
        assert 19.5 <= det.depth_x0 <= 30.0, f"an ECAL of {det.depth_x0:.1f} X0"
        assert edges[-1] >= 3.5 * mat.rm_cm * 10, "the mesh must cover several Molière radii"
    lo, hi = det.energy_range_gev
    assert 0.1 <= lo < hi <= 10_000
    assert {"e-", "gamma"} <= set(det.particles) and any(pdg_of(p) == 211 for p in det.particles)
    assert 0 < det.readout_threshold_mev <= 0.01
    assert 0 <= det.front_dead_x0 <= 2.0 and 0 <= det.plate_modulation < 0.1
    text = (DETECTORS_DIR / f"{name}.yaml").read_text()
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 5, "document the numbers"


def test_detector_specific_features() -> None:
    assert load_detector("lar-pb").plate_modulation == pytest.approx(0.03)
    cracks = load_detector("wsi-granular").cracks
    assert cracks is not None and cracks.n_modules == 12 and cracks.response < 1
    dead = load_detector("odd-like").dead_layers
    assert dead is not None and len(dead.indices) >= 1 and dead.extra_x0 > 0
    assert load_detector("pbwo4").homogeneous
    assert load_detector("par04-siw").mesh.r_edges_mm == pytest.approx([4.65 * i for i in range(10)])


def test_loader_is_strict(tmp_path: Path) -> None:
    text = (DETECTORS_DIR / "par04-siw.yaml").read_text()
    bad_key = tmp_path / "par04-siw.yaml"
    bad_key.write_text(text + "\nfoo: 1\n")
    with pytest.raises(ConfigError, match="foo"):
        load_detector(bad_key)
    renamed = tmp_path / "other.yaml"
    renamed.write_text(text)
    with pytest.raises(ConfigError, match="file stem"):
        load_detector(renamed)
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        load_detector("nope")
