"""The built-in GFlash-style simulator: the acceptance checks of docs/simulator.md §5 (shared spec), plus
angles, cracks, plates, dead layers, threshold, determinism, input validation and the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from caloforge.datasets.formats import native
from caloforge.datasets.prepare import detector_seed
from caloforge.datasets.schema import SIMULATOR_SOURCE
from caloforge.datasets.simulator import (
    CHUNK_SIZE,
    SIMULATOR_VERSION,
    sample_conditions,
    simulate,
    simulate_dataset,
    simulate_with_truth,
)
from caloforge.datasets.simulator.cli import register
from caloforge.platform.conditioning import PARTICLES, Conditions
from caloforge.platform.geometry import load_detector

DET = {
    name: load_detector(name)
    for name in ("par04-siw", "pbwo4", "lar-pb", "wsi-granular", "odd-like", "fe-sci")
}


def cond(
    det: str, particle: str, energy_gev: float, n: int, theta_deg: float = 90.0, phi_rad: float = 0.0
) -> Conditions:
    return Conditions.make(
        np.full(n, energy_gev * 1000.0), math.radians(theta_deg), phi_rad, PARTICLES[particle], det
    )


def run(det: str, particle: str, energy_gev: float, n: int, seed: int = 1, **kw):
    return simulate_with_truth(DET[det], cond(det, particle, energy_gev, n, **kw), seed)


def layer_centres_x0(det: str) -> np.ndarray:
    m = DET[det].material
    return (np.arange(DET[det].mesh.n_z) + 0.5) * m.pitch_cm / m.x0_cm


def r_centres_mm(det: str) -> np.ndarray:
    e = np.asarray(DET[det].mesh.r_edges_mm)
    return 0.5 * (e[1:] + e[:-1])


def longitudinal_centroid(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    layers = x.sum(axis=(2, 3), dtype=np.float64)
    return (layers * z).sum(1) / np.maximum(layers.sum(1), 1e-12)


def radial_mean(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    radial = x.sum(axis=(1, 2), dtype=np.float64)
    return (radial * r).sum(1) / np.maximum(radial.sum(1), 1e-12)


def rel_resolution(e: np.ndarray) -> float:
    return float(e.std() / e.mean())


# ---------------------------------------------------------------- contract


def test_output_contract_and_calibration() -> None:
    c = Conditions.make(
        [5e3, 20e3, 50e3, 20e3, 10e3],
        np.radians([90, 60, 120, 90, 90]),
        [0.1, -2.0, 3.0, 0.0, 1.0],
        [11, 22, -11, 211, 2212],
        "par04-siw",
    )
    data = simulate(DET["par04-siw"], c, seed=5)
    assert data.showers_NZPR.shape == (5, 45, 16, 9) and data.showers_NZPR.dtype == np.float32
    assert data.source == SIMULATOR_SOURCE == "caloforge-gflash" and data.seed == 5
    assert (
        data.metadata["detector"] == "par04-siw" and data.metadata["simulator_version"] == SIMULATOR_VERSION
    )
    assert data.metadata["sampling_fraction"] == pytest.approx(DET["par04-siw"].sampling_fraction)
    json.dumps(data.metadata)  # stored as JSON by the native format
    for f in Conditions.fields():  # conditions stored exactly as given
        np.testing.assert_array_equal(getattr(data.conditions, f), getattr(c, f))
    assert np.all(data.showers_NZPR >= 0) and np.all(np.isfinite(data.showers_NZPR))
    # calibrated energies: contained EM showers read E_tot/E_inc ≈ 1 (visible / f_e)
    for det in ("par04-siw", "pbwo4", "fe-sci"):
        s, _ = run(det, "e-", 20.0, 128, seed=2)
        ratio = s.total_energy_mev() / s.conditions.energy_mev
        assert 0.95 < ratio.mean() < 1.02, (det, ratio.mean())


def test_empty_conditions() -> None:
    data = simulate(DET["pbwo4"], cond("pbwo4", "e-", 10, 0), seed=0)
    assert data.showers_NZPR.shape == (0, 45, 16, 9)


# ---------------------------------------------------------------- EM (docs/simulator.md §5)


def _formula_mean_t(det: str, energy_gev: np.ndarray) -> np.ndarray:
    """E[T] = exp(⟨ln T⟩ + σ²/2) from GP eq. 5/7 (homogeneous) or 13/15 (sampling), written out anew."""
    m = DET[det].material
    ln_y = np.log(energy_gev * 1000.0 / m.ec_mev)
    if DET[det].homogeneous:
        mean, sigma = np.log(ln_y - 0.812), 1.0 / (-1.4 + 1.26 * ln_y)
    else:
        mean = np.log(ln_y - 0.812 - 0.55 / m.sampling_frequency - 0.69 * (1 - m.e_over_mip))
        sigma = 1.0 / (-2.5 + 1.25 * ln_y)
    return np.exp(mean + np.minimum(sigma, 0.5) ** 2 / 2)


def _shower_max_x0(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per shower: argmax of the (1-2-1 smoothed) layer profile, refined by a parabola through 3 layers."""
    lay = x.sum(axis=(2, 3), dtype=np.float64)
    sm = lay.copy()
    sm[:, 1:-1] = (lay[:, :-2] + 2 * lay[:, 1:-1] + lay[:, 2:]) / 4
    k = np.clip(sm.argmax(1), 1, lay.shape[1] - 2)
    i = np.arange(len(k))
    y0, y1, y2 = sm[i, k - 1], sm[i, k], sm[i, k + 1]
    den = y0 - 2 * y1 + y2
    shift = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
    return z[k] + shift * (z[1] - z[0])


@pytest.mark.parametrize("det", ["pbwo4", "par04-siw"])
def test_em_shower_maximum_grows_like_ln_e(det: str) -> None:
    energies = np.array([4.0, 16.0, 64.0, 256.0])
    z = layer_centres_x0(det) + DET[det].front_dead_x0  # depth from the shower start (e- at 90°)
    measured = [_shower_max_x0(run(det, "e-", e, 200, seed=3)[0].showers_NZPR, z).mean() for e in energies]
    slope = np.polyfit(np.log(energies), measured, 1)[0]
    expected = np.polyfit(np.log(energies), _formula_mean_t(det, energies), 1)[0]
    assert expected == pytest.approx(1.0, abs=0.05)  # T = ln y − const: one X0 per e-fold of energy
    assert slope == pytest.approx(expected, rel=0.10)


def test_pbwo4_lateral_containment() -> None:
    det = DET["pbwo4"]
    two_rm_mm = 2 * det.material.rm_cm * 10
    edges = np.asarray(det.mesh.r_edges_mm)
    k = int(np.argmin(np.abs(edges - two_rm_mm)))
    assert edges[k] == pytest.approx(two_rm_mm, rel=0.005)
    s, _ = run("pbwo4", "e-", 50.0, 200, seed=4)
    radial = s.showers_NZPR.sum(axis=(1, 2), dtype=np.float64)
    inside = radial[:, :k].sum(1) / radial.sum(1)
    assert inside.mean() >= 0.90
    assert radial[:, 0].sum() > radial[:, -1].sum() * 20  # steeply falling profile


def test_em_resolution_follows_stochastic_term() -> None:
    det = "par04-siw"
    c = DET[det].sampling_term_sqrt_gev
    energies = np.array([2.0, 8.0, 32.0, 128.0])
    res = np.array([rel_resolution(run(det, "e-", e, 400, seed=5)[0].total_energy_mev()) for e in energies])
    # (σ/E)² = a²/E + b²
    (a2, b2), *_ = np.linalg.lstsq(np.stack([1 / energies, np.ones_like(energies)], 1), res**2, rcond=None)
    assert math.sqrt(max(a2, 0)) == pytest.approx(c, rel=0.15)
    assert math.sqrt(max(b2, 0)) < 0.02


def test_photons_start_later_than_electrons() -> None:
    z = layer_centres_x0("par04-siw")
    e_set, e_truth = run("par04-siw", "e-", 20.0, 400, seed=6)
    g_set, g_truth = run("par04-siw", "gamma", 20.0, 400, seed=6)
    assert np.all(e_truth.start_depth_x0 == 0.0)
    conversion = g_truth.start_depth_x0.mean()
    assert conversion == pytest.approx(9 / 7, rel=0.25)  # Exp(mean 9/7 X0); 400 draws: ±5% (1σ)
    shift = (
        longitudinal_centroid(g_set.showers_NZPR, z).mean()
        - longitudinal_centroid(e_set.showers_NZPR, z).mean()
    )
    assert shift > 0.8 and shift == pytest.approx(conversion, abs=0.3)


# ---------------------------------------------------------------- hadrons


def test_hadrons_deeper_broader_and_worse_resolution() -> None:
    det = "fe-sci"
    z, r = layer_centres_x0(det), r_centres_mm(det)
    em, _ = run(det, "e-", 30.0, 300, seed=7)
    had, _ = run(det, "pi+", 30.0, 300, seed=7)
    assert (
        longitudinal_centroid(had.showers_NZPR, z).mean()
        > 2 * longitudinal_centroid(em.showers_NZPR, z).mean()
    )
    assert radial_mean(had.showers_NZPR, r).mean() > 2 * radial_mean(em.showers_NZPR, r).mean()
    assert rel_resolution(had.total_energy_mev()) > 2 * rel_resolution(em.total_energy_mev())
    response = had.total_energy_mev().mean() / 30e3
    assert 0.6 < response < 0.95  # non-compensating: h/e = 0.7 on the hadronic part
    # lateral scale: λ_int (the hadronic part alone holds 90% within ≈ 0.8 λ; with the narrow EM core less)
    radial = had.showers_NZPR.sum(axis=(0, 1, 2), dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(radial)]) / radial.sum()
    r90_lambda = np.interp(0.9, cumulative, DET[det].mesh.r_edges_mm) / (DET[det].material.lambda_int_cm * 10)
    assert 0.4 < r90_lambda < 1.0


def test_neutral_hadrons_silent_and_charged_hadrons_leave_a_mip_track() -> None:
    det = DET["fe-sci"]
    mat = det.material
    mip_mev = 2.0 * 7.874 * 1.451 + 0.5 * 1.06 * 1.936  # Fe 2 cm + scintillator 0.5 cm at dE/dx_min (MeV)
    calibrated_mip = mip_mev * mat.f_mip / mat.f_e
    for particle in ("n", "K0L"):
        s, truth = run("fe-sci", particle, 20.0, 200, seed=8)
        x = s.showers_NZPR.sum(axis=(2, 3))
        for i, first in enumerate(truth.first_interaction_layer):
            assert np.all(x[i, :first] == 0.0), (particle, i, first)
        assert np.any(truth.first_interaction_layer > 3)
    for particle in ("pi+", "p"):
        s, truth = run("fe-sci", particle, 20.0, 200, seed=8)
        hits = (s.showers_NZPR > 0).sum(axis=(2, 3))
        track = []
        for i, first in enumerate(truth.first_interaction_layer):
            if first >= 2:
                pre = s.showers_NZPR[i, : first - 1]  # full layers crossed before the interaction
                assert np.all(hits[i, : first - 1] == 1), "one on-axis hit per layer"
                assert np.all(pre[..., 1:] == 0.0)
                track.extend(pre.sum(axis=(1, 2)).tolist())
        assert len(track) > 300
        track = np.asarray(track)
        assert np.mean(track) == pytest.approx(calibrated_mip, rel=0.05)  # mean loss = dE/dx_min · path
        assert np.median(track) < np.mean(track)  # Landau-like: upward tail
        assert np.percentile(track, 99) > 1.3 * np.median(track)


def test_antibaryons_add_annihilation_energy() -> None:
    p, _ = run("fe-sci", "p", 5.0, 300, seed=9)
    pbar, _ = run("fe-sci", "pbar", 5.0, 300, seed=9)
    extra_gev = (pbar.total_energy_mev().mean() - p.total_energy_mev().mean()) / 1000
    assert 0.7 < extra_gev < 2 * 0.938  # 1.876 GeV seen with h/e ≈ 0.7, minus some leakage


# ------------------------------------------------ angles, cracks, plates, dead layers, threshold


def test_theta_changes_response_as_specified() -> None:
    # dead material in front is crossed over X0_front / sin θ: lar-pb has 1 X0, 2 X0 at θ = 30°
    _, nt = run("lar-pb", "e-", 30.0, 8, seed=10, theta_deg=90.0)
    _, ot = run("lar-pb", "e-", 30.0, 8, seed=10, theta_deg=30.0)
    assert nt.start_depth_x0 == pytest.approx(-1.0) and ot.start_depth_x0 == pytest.approx(-2.0)
    # with 2 X0 in front (4 X0 at 30°) the lost energy and the earlier start are well measurable
    det = dataclasses.replace(DET["lar-pb"], front_dead_x0=2.0)
    z = layer_centres_x0("lar-pb")
    normal = simulate(det, cond("lar-pb", "e-", 30.0, 300, theta_deg=90.0), seed=10)
    oblique = simulate(det, cond("lar-pb", "e-", 30.0, 300, theta_deg=30.0), seed=10)
    r90, r30 = (s.total_energy_mev() / 30e3 for s in (normal, oblique))
    assert r30.mean() < r90.mean() - 0.05 and rel_resolution(r30) > rel_resolution(r90)
    shift = (
        longitudinal_centroid(normal.showers_NZPR, z).mean()
        - longitudinal_centroid(oblique.showers_NZPR, z).mean()
    )
    assert 1.2 < shift < 2.2  # 2 X0 more in front, minus the shorter T at F_S·sin θ
    # par04-siw (nothing in front): the stochastic term grows as c/√sin θ
    e90, _ = run("par04-siw", "e-", 16.0, 400, seed=11, theta_deg=90.0)
    e30, _ = run("par04-siw", "e-", 16.0, 400, seed=11, theta_deg=30.0)
    ratio = rel_resolution(e30.total_energy_mev()) / rel_resolution(e90.total_energy_mev())
    assert ratio == pytest.approx(math.sqrt(2.0), rel=0.2)


def test_cracks_reduce_response_in_cracks() -> None:
    in_crack, _ = run("wsi-granular", "e-", 20.0, 150, seed=12, phi_rad=0.0)  # module boundary
    centre, _ = run("wsi-granular", "e-", 20.0, 150, seed=12, phi_rad=math.pi / 12)  # module centre
    r_crack = in_crack.total_energy_mev().mean() / 20e3
    r_centre = centre.total_energy_mev().mean() / 20e3
    assert r_centre > 0.95 and r_crack < 0.85 * r_centre
    # the crack is a band of constant global φ: spots displaced along it (local α ≈ 0, ±180°) stay inside,
    # spots displaced across it (α ≈ ±90°, global φ shift r·sin α / R_calo) leave it
    phi_bins = in_crack.showers_NZPR.sum(axis=(0, 1))
    across = phi_bins[[3, 4, 11, 12], 1:].sum()  # α ≈ ±90°, off-axis radial bins
    along = phi_bins[[0, 7, 8, 15], 1:].sum()  # α ≈ 0, ±180°
    assert along < 0.7 * across
    phi_bins = centre.showers_NZPR.sum(axis=(0, 1))
    assert phi_bins[[0, 7, 8, 15], 1:].sum() == pytest.approx(phi_bins[[3, 4, 11, 12], 1:].sum(), rel=0.1)


def test_plate_modulation_rotates_with_phi() -> None:
    alpha = DET["lar-pb"].geometry.phi_centers_rad()
    for phi in (0.0, math.pi / 4):
        s, _ = run("lar-pb", "e-", 20.0, 600, seed=13, phi_rad=phi)
        per_bin = s.showers_NZPR[..., 1:].sum(axis=(0, 1, 3), dtype=np.float64)
        per_bin /= per_bin.mean()
        # f_e·(1 + A cos 2(α − φ)) averaged over 22.5° bins: A·sinc(π/8) = 0.974 A
        amplitude = 2 * np.mean((per_bin - 1) * np.cos(2 * (alpha - phi)))
        orthogonal = 2 * np.mean((per_bin - 1) * np.sin(2 * (alpha - phi)))
        assert amplitude == pytest.approx(0.974 * 0.03, abs=0.012)
        assert abs(orthogonal) < 0.012


def test_dead_layers_are_empty_and_cost_response() -> None:
    s, _ = run("odd-like", "e-", 30.0, 100, seed=14)
    dead = list(DET["odd-like"].dead_layers.indices)
    layers = s.showers_NZPR.sum(axis=(2, 3))
    assert np.all(layers[:, dead] == 0.0)
    assert np.all(layers[:, [d - 1 for d in dead]].mean(0) > 0.005 * 30e3)
    assert 0.75 < s.total_energy_mev().mean() / 30e3 < 0.95


def test_readout_threshold_applies_to_visible_energy() -> None:
    base = DET["par04-siw"]
    high = dataclasses.replace(base, readout_threshold_mev=0.05)
    c = cond("par04-siw", "e-", 10.0, 64)
    low_set = simulate(base, c, seed=15).showers_NZPR
    high_set = simulate(high, c, seed=15).showers_NZPR
    cut = 0.05 / base.sampling_fraction  # visible threshold in calibrated MeV
    assert high_set[high_set > 0].min() >= cut * (1 - 1e-6)
    assert low_set[low_set > 0].min() >= base.readout_threshold_mev / base.sampling_fraction * (1 - 1e-6)
    expected = np.where(low_set >= cut, low_set, 0.0)
    np.testing.assert_allclose(high_set, expected, rtol=1e-6)  # the cut only removes voxels
    assert (high_set > 0).sum() < (low_set > 0).sum()


# ---------------------------------------------------------------- determinism


def _mixed(det: str, n: int) -> Conditions:
    rng = np.random.default_rng(0)
    return Conditions.make(
        rng.uniform(2e3, 60e3, n),
        rng.uniform(0.9, 2.2, n),
        rng.uniform(-3, 3, n),
        rng.choice([11, 22, 211, 2112], n),
        det,
    )


def test_determinism_and_chunking_independence() -> None:
    det = DET["wsi-granular"]
    c = _mixed("wsi-granular", CHUNK_SIZE + 40)
    a = simulate(det, c, seed=21).showers_NZPR
    np.testing.assert_array_equal(a, simulate(det, c, seed=21).showers_NZPR)
    b = simulate(det, c, seed=22).showers_NZPR
    assert not np.array_equal(a, b)
    assert (a.sum(axis=(1, 2, 3)) > 0).mean() > 0.8  # only punch-through neutrons (e^-0.95 of them) are empty
    # the first full chunk does not depend on what follows it
    head = simulate(det, c.subset(slice(0, CHUNK_SIZE)), seed=21).showers_NZPR
    np.testing.assert_array_equal(head, a[:CHUNK_SIZE])
    # nor on how many spots are processed per pass (memory bound)
    small, _ = simulate_with_truth(det, c, seed=21, spots_per_pass=10_000)
    np.testing.assert_array_equal(small.showers_NZPR, a)


# ---------------------------------------------------------------- conditions and validation


def test_sample_conditions() -> None:
    det = DET["fe-sci"]
    c = sample_conditions(
        det, ["e-", "pi+", 2112], 4000, (1.0, 400.0), True, (50.0, 130.0), (-30.0, 30.0), seed=3
    )
    assert len(c) == 4000 and set(np.unique(c.detector)) == {"fe-sci"}
    counts = np.array([(c.pdg == p).sum() for p in (11, 211, 2112)])
    assert counts.min() > 1200
    e_gev = c.energy_mev / 1000
    assert e_gev.min() >= 1.0 and e_gev.max() <= 400.0
    assert np.median(e_gev) == pytest.approx(20.0, rel=0.15)  # log-uniform: median at the geometric mean
    assert np.degrees(c.theta_rad).min() >= 50 and np.degrees(c.theta_rad).max() <= 130
    assert np.abs(np.degrees(c.phi_rad)).max() <= 30
    again = sample_conditions(
        det, ["e-", "pi+", 2112], 4000, (1.0, 400.0), True, (50.0, 130.0), (-30.0, 30.0), seed=3
    )
    np.testing.assert_array_equal(c.energy_mev, again.energy_mev)
    lin = sample_conditions(det, ["e-"], 4000, (1.0, 400.0), False, (90.0, 90.0), seed=3)
    assert np.median(lin.energy_mev / 1000) == pytest.approx(200.0, rel=0.1)
    assert np.all(lin.theta_rad == math.radians(90.0))


def test_simulate_dataset_end_to_end() -> None:
    data = simulate_dataset(
        DET["pbwo4"], ["gamma", "e+"], 40, (5.0, 50.0), True, (60.0, 120.0), seed=4, progress=True
    )
    assert len(data) == 40 and data.seed == 4 and set(np.unique(data.conditions.pdg)) == {22, -11}
    again = simulate_dataset(DET["pbwo4"], ["gamma", "e+"], 40, (5.0, 50.0), True, (60.0, 120.0), seed=4)
    np.testing.assert_array_equal(data.showers_NZPR, again.showers_NZPR)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"particles": ["muon"]}, "unknown particle 'muon'"),
        ({"particles": ["K0L"]}, r"\['K0L'\] not simulated for detector 'par04-siw'"),
        ({"particles": ["e-", "e-"]}, "duplicate"),
        ({"particles": []}, "non-empty"),
        ({"energy_gev": (100.0, 10.0)}, "low 100 > high 10"),
        ({"energy_gev": (0.5, 10.0)}, "outside the range of detector 'par04-siw'"),
        ({"energy_gev": (1.0, float("nan"))}, "finite"),
        ({"theta_deg": (5.0, 90.0)}, "theta_deg"),
        ({"phi_deg": (-180.0, 200.0)}, "span at most 360"),
        ({"n": 0}, "positive integer"),
        ({"seed": -1}, "non-negative integer"),
    ],
)
def test_sample_conditions_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {
        "particles": ["e-"],
        "n": 10,
        "energy_gev": (1.0, 100.0),
        "log_uniform": False,
        "theta_deg": (90.0, 90.0),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample_conditions(DET["par04-siw"], **args)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("detector", "pbwo4", "another detector than 'par04-siw'"),
        ("energy_mev", 50.0, r"conditions.energy_mev: 1 value\(s\) outside \[100, 1e\+07\] MeV"),
        ("theta_rad", float("nan"), "conditions.theta_rad"),
        ("pdg", 13, "unknown PDG id 13 at index 2"),
    ],
)
def test_simulate_rejects_bad_conditions(field: str, value, message: str) -> None:
    c = cond("par04-siw", "e-", 10.0, 4)
    values = getattr(c, field).copy()
    if field == "detector":
        values = values.astype(object)
    values[2] = value
    bad = dataclasses.replace(
        c, **{field: np.asarray(values, dtype=getattr(c, field).dtype if field != "detector" else str)}
    )
    with pytest.raises(ValueError, match=message):
        simulate(DET["par04-siw"], bad, seed=0)
    with pytest.raises(ValueError, match="seed"):
        simulate(DET["par04-siw"], c, seed=-3)


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="caloforge data")
    register(root.add_subparsers(dest="data_command"))
    return root


def test_cli_simulate_writes_one_file_per_detector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = "simulate --detector par04-siw,fe-sci --particles e-,gamma,pi+ --n 24 --energy-gev 1:100"
    argv += " --log-uniform --theta-deg 50:130 --phi-deg -90:-10 --seed 7 --no-progress --out"
    args = _parser().parse_args([*argv.split(), str(tmp_path)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "showers/s" in lines[0] and "E_tot/E_inc" in lines[0] and "pi+" in lines[0]
    seeds = []
    for i, name in enumerate(("par04-siw", "fe-sci")):
        data = native.read(tmp_path / f"{name}.h5")
        assert len(data) == 24 and set(np.unique(data.conditions.detector)) == {name}
        assert data.source == "caloforge-gflash" and data.seed == detector_seed(7, i)
        assert data.metadata["detector"] == name
        e_gev = data.conditions.energy_mev / 1000
        assert e_gev.min() >= 1 and e_gev.max() <= 100
        phi_deg = np.degrees(data.conditions.phi_rad)  # "-90:-10" passes argparse as a value
        assert phi_deg.min() >= -90 and phi_deg.max() <= -10
        seeds.append(data.seed)
    assert seeds[0] != seeds[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--detector", "nope"], "unknown detector 'nope'"),
        (["--detector", "par04-siw", "--particles", "e-,tau"], "unknown particle 'tau'"),
        (["--detector", "par04-siw", "--energy-gev", "100:1"], "LOW 100 > HIGH 1"),
        (["--detector", "par04-siw", "--energy-gev", "a:b"], "expected LOW:HIGH numbers"),
        (["--detector", "par04-siw", "--theta-deg", "0:90"], "theta_deg"),
        (["--detector", "par04-siw,", "--particles", "e-"], "without empty entries"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, argv: list[str], message: str) -> None:
    args = _parser().parse_args(["simulate", "--n", "5", "--out", str(tmp_path), "--no-progress", *argv])
    with pytest.raises(ValueError, match=message):
        args.func(args)
    assert not list(tmp_path.iterdir())  # nothing written when the input is bad
