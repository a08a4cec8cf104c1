"""``rebuild_for_mesh``: a model moved to a mesh unlike the built-ins' keeps its mesh-independent weights,
re-initialises what is indexed by layers or patches, fits its transforms from the new stats, and refuses a
patch that does not divide the mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_models import DETECTORS, scramble_zero_init, toy_showers

from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import ConditionVocab
from caloforge.platform.geometry import Mesh
from caloforge.platform.shower_model import Lineage, ShowerModel, ShowerModelConfig
from caloforge.platform.transfer import rebuild_for_mesh

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


def test_rebuild_copies_the_backbone_and_reinitialises_layer_indexed_tensors(source, new_stats) -> None:
    lineage = Lineage(kind="adapted", parent_uri="models:/caloforge-base/1")
    model, report = rebuild_for_mesh(source, NEW_MESH, new_stats, lineage=lineage)
    assert model.mesh == NEW_MESH and model.mesh_shape == (30, 24, 12) and model.lineage == lineage
    assert model.config == source.config and model.vocab == source.vocab
    assert tuple(model.patch_coords_TC.shape) == (6 * 6 * 4, 4)  # the new patch grid
    src = dict(source.named_parameters())
    new = dict(model.named_parameters())
    assert set(report.reinitialised) == N_Z_TENSORS
    assert report.reinitialised["energy_head.fc_in.weight"] == "shape (128, 15) -> (128, 30)"
    assert set(report.copied) == set(new) - N_Z_TENSORS
    for name in report.copied:
        torch.testing.assert_close(new[name], src[name], rtol=0, atol=0, msg=name)
    # re-initialised tensors are the fresh model's seeded draws (fc_out starts at zero: the head's v = 0)
    fresh = ShowerModel.build(model.config, model.vocab, new_stats, NEW_MESH)
    for name in N_Z_TENSORS:
        torch.testing.assert_close(new[name], dict(fresh.named_parameters())[name], rtol=0, atol=0)
    assert float(new["energy_head.fc_out.weight"].detach().abs().sum()) == 0.0
    # the transforms are fitted from the new stats, not copied
    assert set(report.fitted) == {
        k for k in model.state_dict() if k.startswith(("transform.", "energy_transform."))
    }
    assert float(model.transform.mean) == pytest.approx(new_stats["log_mean"])
    np.testing.assert_allclose(
        model.energy_transform.mean_Z.numpy(), new_stats["layer_energy_over_einc_mean"], rtol=1e-6
    )
    assert report.detector_rows == {d: "copied" for d in DETECTORS}
    assert "30, 24, 12" in report.summary() and "re-initialised 3" in report.summary()


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
    assert set(report.reinitialised) == N_Z_TENSORS | patch_tensors
    assert "denoiser.net.patch_embed.bias" in report.copied  # (width,): independent of the patch
    assert "denoiser.net.blocks.1.attn.qkv.weight" in report.copied
    assert model.config.backbone_config().patch_size == (3, 4, 3)


def test_same_layer_count_keeps_the_energy_head(source) -> None:
    mesh = Mesh(15, 12, tuple(float(r) for r in range(4)))
    _, report = rebuild_for_mesh(source, mesh, _stats(mesh.shape, 4))
    assert report.reinitialised == {}


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
