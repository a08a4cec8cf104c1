"""``rebuild_for_mesh``: a model moved to a mesh unlike the built-ins' keeps its mesh-independent weights,
resamples what is indexed by layers along depth, re-initialises what is indexed by patches, places a
detector of another physical size at its depth and radius, fits its transforms from the new stats, and
refuses a patch that does not divide the mesh."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from toy_models import DETECTORS, scramble_zero_init, toy_showers

from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.geometry import DetectorSpec, Mesh, MeshSpec, load_detector
from caloforge.platform.shower_model import Lineage, ShowerModel, ShowerModelConfig
from caloforge.platform.transfer import depth_resampling, place_mesh, rebuild_for_mesh

SOURCE_SHAPE = (15, 8, 6)
NEW_MESH = Mesh(30, 24, (0.0, 2.0, 4.0, 6.0, 9.0, 12.0, 16.0, 20.0, 25.0, 31.0, 38.0, 46.0, 55.0))  # 30×24×12
PATCH = (5, 4, 3)
N_Z_TENSORS = {"energy_head.fc_in.weight", "energy_head.fc_out.weight", "energy_head.fc_out.bias"}


def _stats(shape: tuple[int, int, int], seed: int) -> dict:
    showers, cond = toy_showers(24, shape, seed=seed)
    return compute_stats(showers, cond.energy_mev, cond.theta_rad)


@pytest.fixture(scope="module")
def source() -> ShowerModel:
    cfg = ShowerModelConfig(backbone="debug", patch_size=PATCH, parametrisation="flow_matching", num_steps=2)
    model = ShowerModel.build(cfg, ConditionVocab.create(DETECTORS, 2), _stats(SOURCE_SHAPE, 1), SOURCE_SHAPE)
    return scramble_zero_init(model)


@pytest.fixture(scope="module")
def new_stats() -> dict:
    return _stats(NEW_MESH.shape, 2)


def test_rebuild_copies_the_backbone_and_resamples_layer_indexed_tensors(source, new_stats) -> None:
    lineage = Lineage(kind="adapted", parent_uri="models:/caloforge-base/1")
    model, report = rebuild_for_mesh(source, NEW_MESH, new_stats, lineage=lineage)
    assert model.mesh == NEW_MESH and model.mesh_shape == (30, 24, 12) and model.lineage == lineage
    # no detector specs: the new mesh is its own position frame, as a model trained on it from scratch
    assert model.config == source.config and model.vocab == source.vocab
    assert report.positions == "fractions of the new mesh (no detector spec given)"
    assert tuple(model.patch_coords_TC.shape) == (6 * 6 * 4, 4)  # the new patch grid
    src = {k: v.detach() for k, v in source.named_parameters()}
    new = {k: v.detach() for k, v in model.named_parameters()}
    assert report.reinitialised == {}
    assert set(report.resampled) == N_Z_TENSORS
    assert report.resampled["energy_head.fc_in.weight"] == (
        "columns summed by overlap: 15 layers over depth 0-1 -> 30 over 0-1"
    )
    assert set(report.copied) == set(new) - N_Z_TENSORS
    for name in report.copied:
        torch.testing.assert_close(new[name], src[name], rtol=0, atol=0, msg=name)
    # 15 layers over the same depth as 30: each new layer covers half an old one (half its input weight) ...
    w_in = src["energy_head.fc_in.weight"]
    torch.testing.assert_close(new["energy_head.fc_in.weight"][:, 0::2], w_in / 2)
    torch.testing.assert_close(new["energy_head.fc_in.weight"][:, 1::2], w_in / 2)
    # ... and outputs the old per-layer rows interpolated at its centre (held beyond the first/last centre)
    centres_old, centres_new = (np.arange(15) + 0.5) / 15, (np.arange(30) + 0.5) / 30
    for name in ("energy_head.fc_out.weight", "energy_head.fc_out.bias"):
        old = src[name].double().numpy()
        expected = np.stack(
            [np.interp(centres_new, centres_old, col) for col in old.reshape(15, -1).T], axis=1
        ).reshape((30, *old.shape[1:]))
        np.testing.assert_allclose(new[name].double().numpy(), expected, rtol=1e-6, atol=1e-7)
    # the transforms are fitted from the new stats, not copied
    assert set(report.fitted) == {
        k for k in model.state_dict() if k.startswith(("transform.", "energy_transform."))
    }
    assert float(model.transform.mean) == pytest.approx(new_stats["log_mean"])
    np.testing.assert_allclose(
        model.energy_transform.mean_Z.numpy(), new_stats["layer_energy_over_einc_mean"], rtol=1e-6
    )
    assert report.detector_rows == {d: "copied" for d in DETECTORS}
    summary = report.summary()
    assert "30, 24, 12" in summary and "resampled 3 along depth, re-initialised 0" in summary


def _lar_pb_on(mesh: Mesh, name: str) -> DetectorSpec:
    """lar-pb's Pb/LAr stack (4.5 mm per layer) read out on ``mesh``."""
    spec = load_detector("lar-pb")
    return dataclasses.replace(spec, name=name, mesh=MeshSpec(mesh.n_z, mesh.n_phi, mesh.r_edges_mm))


SOURCE_MESH = Mesh(15, 8, (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0))
SHALLOW_MESH = Mesh(10, 8, (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0))  # 2/3 of the depth, 2× the radius


def test_a_detector_of_another_size_is_placed_at_its_physical_depth_and_radius(source, tmp_path) -> None:
    stats = _stats(SHALLOW_MESH.shape, 6)
    src_spec = _lar_pb_on(SOURCE_MESH, "det_a")
    model, report = rebuild_for_mesh(
        source, SHALLOW_MESH, stats, detector=_lar_pb_on(SHALLOW_MESH, "shallow"), source_detectors=[src_spec]
    )
    frame = (src_spec.depth_x0, src_spec.radius_rm)
    assert model.config.position_frame == pytest.approx(frame)
    assert model.config.position_extent == pytest.approx((2 / 3, 2.0))
    assert report.positions.startswith("shallow (") and "extent (0.667, 2.000)" in report.positions
    # the tokens sit where the same depth and radius sat in the source: 10 layers = the source's first 10
    depth_new = model.patch_coords_TC[:, 0].unique()
    depth_src = source.patch_coords_TC[:, 0].unique()
    torch.testing.assert_close(depth_new, depth_src[:2])
    radius_new = model.patch_coords_TC[:, 3].unique()
    torch.testing.assert_close(radius_new, torch.tensor([10.0, 40.0]) / 30.0)  # patch centres / source r_max
    # the layers coincide with the source's first ten: the head's layer tensors are exact copies of them
    src = {k: v.detach() for k, v in source.named_parameters()}
    new = {k: v.detach() for k, v in model.named_parameters()}
    torch.testing.assert_close(new["energy_head.fc_in.weight"], src["energy_head.fc_in.weight"][:, :10])
    torch.testing.assert_close(new["energy_head.fc_out.weight"], src["energy_head.fc_out.weight"][:10])
    torch.testing.assert_close(new["energy_head.fc_out.bias"], src["energy_head.fc_out.bias"][:10])
    # the placement is part of the bundle
    loaded = ShowerModel.load(model.save(tmp_path / "placed"))
    assert loaded.config.position_extent == model.config.position_extent
    torch.testing.assert_close(loaded.patch_coords_TC, model.patch_coords_TC, rtol=0, atol=0)
    # moved on again, the model keeps its frame: back on the source's mesh it is at extent (1, 1)
    back, report = rebuild_for_mesh(
        loaded, SOURCE_MESH, _stats(SOURCE_MESH.shape, 7), detector=_lar_pb_on(SOURCE_MESH, "again")
    )
    assert back.config.position_frame == pytest.approx(frame)
    assert back.config.position_extent == pytest.approx((1.0, 1.0))
    torch.testing.assert_close(back.patch_coords_TC, source.patch_coords_TC)
    head = back.energy_head.fc_out.bias.detach()
    torch.testing.assert_close(head[:10], src["energy_head.fc_out.bias"][:10])
    torch.testing.assert_close(head[10:], src["energy_head.fc_out.bias"][9].expand(5))  # held past the end
    assert back.energy_head.fc_in.weight[:, 10:].abs().sum() == 0  # no input weight beyond the old depth


def test_a_mesh_is_placed_on_the_base_layer_grid_inside_its_depths_and_scaled_beyond() -> None:
    shallow, deep = load_detector("par04-scipb"), load_detector("pbwo4")  # 20.3 and 25.8 X0, 45 layers
    lar_pb = load_detector("lar-pb")  # 20.7 X0
    cut = dataclasses.replace(lar_pb, name="cut", mesh=MeshSpec(30, 16, lar_pb.mesh.r_edges_mm))  # 13.8 X0
    # 30 layers as thick as lar-pb's: inside the base's 20.3-25.8 X0, on its first 30 layer positions
    extent, frame, where = place_mesh(None, 45, cut, [shallow, deep])
    assert extent[0] == pytest.approx(30 / 45) and frame[0] == pytest.approx(lar_pb.depth_x0)
    assert extent[1] == pytest.approx(1.0) and frame[1] == pytest.approx(lar_pb.radius_rm)  # in range
    assert "range 20.3-25.8 X0" in where
    # a detector twice as thick per layer as the deepest one: the deepest frame, scaled physically
    thick = dataclasses.replace(lar_pb, name="thick", mesh=MeshSpec(45, 16, lar_pb.mesh.r_edges_mm))
    thick = dataclasses.replace(thick, absorber=dataclasses.replace(lar_pb.absorber, thickness_mm=7.5))
    extent, frame, _ = place_mesh(None, 45, thick, [shallow, deep])
    assert frame[0] == pytest.approx(deep.depth_x0)
    assert extent[0] == pytest.approx(thick.depth_x0 / deep.depth_x0) and extent[0] > 1.5
    # a recorded frame is the one frame; no specs: the mesh is its own frame
    extent, frame, _ = place_mesh((20.0, 4.0), 30, cut, [])
    assert frame == (20.0, 4.0) and extent == pytest.approx((cut.depth_x0 / 20.0, cut.radius_rm / 4.0))
    assert place_mesh(None, 45, cut, [])[:2] == ((1.0, 1.0), None)
    assert place_mesh(None, 45, None, [shallow])[:2] == ((1.0, 1.0), None)


def test_depth_resampling_conserves_input_weight_and_interpolates_outputs() -> None:
    rows, columns = depth_resampling(4, 1.0, 3, 1.0)
    np.testing.assert_allclose(columns.sum(axis=0), np.ones(4))  # every old layer's weight lands once
    np.testing.assert_allclose(columns[1], [0.0, 2 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(rows[1], [0.0, 0.5, 0.5, 0.0])  # the new middle layer: halfway
    rows, columns = depth_resampling(3, 1.0, 3, 1.0)
    np.testing.assert_allclose(rows, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(columns, np.eye(3), atol=1e-12)
    _, columns = depth_resampling(2, 1.0, 2, 2.0)  # twice as deep: the second new layer has no old depth
    np.testing.assert_allclose(columns, [[1.0, 1.0], [0.0, 0.0]])


def test_a_placement_without_a_frame_is_refused() -> None:
    with pytest.raises(ValueError, match=r"position_extent \(0.5, 1.0\) needs a position_frame"):
        ShowerModelConfig(backbone="debug", position_extent=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"position_frame must be two finite numbers > 0"):
        ShowerModelConfig(backbone="debug", position_frame=(20.0, -1.0))


def test_a_detector_spec_of_another_mesh_is_refused(source, new_stats) -> None:
    with pytest.raises(ValueError, match=r"detector 'shallow' has the mesh \(10, 8, 6\), not \(30, 24, 12\)"):
        rebuild_for_mesh(source, NEW_MESH, new_stats, detector=_lar_pb_on(SHALLOW_MESH, "shallow"))


def test_rebuilt_model_generates_and_round_trips_a_bundle(source, new_stats, tmp_path) -> None:
    model, _ = rebuild_for_mesh(source, NEW_MESH, new_stats)
    _, cond = toy_showers(3, NEW_MESH.shape, seed=5)
    out = model.generate(cond, num_steps=2, batch_size=2, seed=3)
    assert out.shape == (3, 30, 24, 12) and np.isfinite(out).all() and (out >= 0).all()
    loaded = ShowerModel.load(model.save(tmp_path / "bundle"))
    assert loaded.mesh == NEW_MESH
    np.testing.assert_array_equal(loaded.generate(cond, num_steps=2, batch_size=2, seed=3), out)


def test_patch_that_does_not_divide_the_mesh_is_refused_naming_both(source, new_stats) -> None:
    with pytest.raises(
        ValueError, match=r"patch_size \(5, 4, 3\) does not divide the mesh \(32, 24, 12\).*n_z=32"
    ):
        rebuild_for_mesh(source, (32, 24, 12), new_stats)
    with pytest.raises(ValueError, match=r"patch_size \(4, 4, 3\) does not divide the mesh \(30, 24, 12\)"):
        rebuild_for_mesh(source, NEW_MESH, new_stats, patch_size=(4, 4, 3))


def test_stats_of_another_mesh_are_refused(source) -> None:
    with pytest.raises(ValueError, match=r"n_voxels_per_shower.*does not match the mesh \(30, 24, 12\)"):
        rebuild_for_mesh(source, NEW_MESH, _stats(SOURCE_SHAPE, 3))


def test_patch_of_another_volume_reinitialises_patch_embedding_and_output(source, new_stats) -> None:
    model, report = rebuild_for_mesh(source, NEW_MESH, new_stats, patch_size=(3, 4, 3))
    patch_tensors = {
        "denoiser.net.patch_embed.weight",
        "denoiser.net.final_layer.linear.weight",
        "denoiser.net.final_layer.linear.bias",
    }
    assert set(report.reinitialised) == patch_tensors
    assert "denoiser.net.patch_embed.bias" in report.copied  # (width,): independent of the patch
    assert "denoiser.net.blocks.1.attn.qkv.weight" in report.copied
    assert model.config.backbone_config().patch_size == (3, 4, 3)


def test_same_layer_count_keeps_the_energy_head(source) -> None:
    mesh = Mesh(15, 12, tuple(float(r) for r in range(4)))
    _, report = rebuild_for_mesh(source, mesh, _stats(mesh.shape, 4))
    assert report.reinitialised == {} and report.resampled == {}
    assert "energy_head.fc_out.weight" in report.copied


def test_vocab_rows_are_copied_by_name_and_new_detectors_start_at_the_mean(source, new_stats) -> None:
    vocab = ConditionVocab(("det_b", "my-det"), 3)
    model, report = rebuild_for_mesh(source, NEW_MESH, new_stats, vocab=vocab)
    assert report.detector_rows == {"det_b": "copied", "my-det": "mean of copied rows"}
    src_w = source.network.detector_embed.weight
    new_w = model.network.detector_embed.weight
    torch.testing.assert_close(new_w[0], src_w[1], rtol=0, atol=0)
    torch.testing.assert_close(new_w[1], src_w[1], rtol=0, atol=0)  # the mean of the one copied row
    fresh = ShowerModel.build(model.config, vocab, new_stats, NEW_MESH)
    torch.testing.assert_close(new_w[2], fresh.network.detector_embed.weight[2], rtol=0, atol=0)  # spare
