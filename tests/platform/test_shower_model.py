"""ShowerModel: construction, config, decomposed generation, spare detector slots and user errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_models import DETECTORS, SMALL_MESH, make_model, toy_showers

from caloforge.config import ConfigError, from_dict, to_dict
from caloforge.datasets.stats import compute_stats
from caloforge.platform.backbone import BackboneConfig
from caloforge.platform.checkpoint import load_bundle, migrate_model_config, save_bundle
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.denoisers import EDMPrecondConfig
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig, derive_seeds


def test_config_round_trips_through_strict_yaml_dicts() -> None:
    cfg = ShowerModelConfig(
        backbone=BackboneConfig(depth=1, width=48, heads=2, mlp_width=96, patch_size=(3, 4, 3)),
        parametrisation="flow_matching",
        sampler="rk4",
        num_steps=8,
    )
    data = to_dict(cfg)
    assert data["backbone"]["patch_size"] == [3, 4, 3] and data["parametrisation"] == "flow_matching"
    assert from_dict(ShowerModelConfig, data) == cfg
    patched = from_dict(ShowerModelConfig, {"backbone": "debug", "patch_size": [3, 2, 2]})
    assert patched.backbone_config().patch_size == (3, 2, 2)
    with pytest.raises(ConfigError, match=r"model.yaml: .*sampler: unknown 'dpm'"):
        from_dict(ShowerModelConfig, {"sampler": "dpm"}, "model.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ShowerModelConfig, {"edm": {"sigma_dat": 0.5}}, "model.yaml")
    with pytest.raises(ConfigError, match="unknown key"):  # objective options belong to the job config
        from_dict(ShowerModelConfig, {"edm": {"p_mean": -1.0}}, "model.yaml")
    for kwargs, match in (
        ({"backbone": "XL"}, "unknown flavour 'XL'"),
        ({"parametrisation": "score"}, "parametrisation: unknown 'score'"),
        ({"transform": "logit"}, "transform: unknown 'logit'"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"patch_size": (3, 0, 3)}, "patch_size"),
        ({"residual_stream": "bf16"}, "residual_stream must be fp32 or autocast"),
    ):
        with pytest.raises(ValueError, match=match):
            ShowerModelConfig(**kwargs)


def test_generate_is_noise_then_sampler_then_to_mev(small_data) -> None:
    model = make_model("edm", num_steps=3, sampler="euler")
    assert model.has_energy_head, "the layer-energy head is on by default"
    _, cond = small_data
    cond = cond.subset(slice(0, 3))
    seeds = np.array([1, 2, 3], dtype=np.int64)
    showers = model.generate(cond, seeds=seeds)
    with torch.inference_mode():
        noise = model.initial_noise(seeds)
        gen = torch.Generator().manual_seed(2)
        torch.testing.assert_close(noise[1], torch.randn(SMALL_MESH, generator=gen))
        layer_noise = model.initial_layer_noise(seeds)
        # The head's noise continues each shower's generator after its voxel noise.
        torch.testing.assert_close(layer_noise[1], torch.randn((SMALL_MESH[0],), generator=gen))
        ct = model.encode_conditions(cond)
        x = model.sample(noise, ct, "euler", 3)
        layers = model.sample_layer_energies(layer_noise, ct)
        manual = model.to_mev(x, layers, ct).numpy()
        unscaled = model.to_mev(x).numpy()
    np.testing.assert_array_equal(showers, manual)
    assert layers.shape == (3, SMALL_MESH[0]) and (layers >= 0).all()
    assert not np.array_equal(showers, unscaled), "generate must scale the layers to the head's energies"
    assert model.training, "generate must restore the training mode"


def test_generate_without_the_head_is_noise_then_sampler_then_to_mev(small_data) -> None:
    model = make_model("edm", num_steps=3, sampler="euler", layer_energy=LayerEnergyConfig(enabled=False))
    assert not model.has_energy_head and model.energy_head is None and model.energy_transform is None
    _, cond = small_data
    cond = cond.subset(slice(0, 3))
    seeds = np.array([1, 2, 3], dtype=np.int64)
    showers = model.generate(cond, seeds=seeds)
    with torch.inference_mode():
        x = model.sample(model.initial_noise(seeds), model.encode_conditions(cond), "euler", 3)
        manual = model.to_mev(x).numpy()
    np.testing.assert_array_equal(showers, manual)
    with pytest.raises(ValueError, match="no layer-energy head"):
        model.sample_layer_energies(torch.zeros(3, SMALL_MESH[0]), model.encode_conditions(cond))


def test_derived_seeds_depend_on_seed_and_index_only() -> None:
    a, b = derive_seeds(0, 10), derive_seeds(0, 3)
    np.testing.assert_array_equal(a[:3], b)
    assert a.dtype == np.int64 and (a >= 0).all() and len(set(a.tolist())) == 10
    assert not np.array_equal(derive_seeds(1, 3), b)


def test_transform_round_trip_through_the_model(small_data) -> None:
    model = make_model("flow_matching", transform="layer_log_standardize")
    showers, _ = small_data
    back = model.to_mev(model.to_model_space(showers)).numpy()
    kept = showers >= model.config.threshold_mev
    np.testing.assert_allclose(back[kept], showers[kept], rtol=2e-5)
    assert not back[~kept].any()


def test_with_detector_uses_a_spare_slot(small_data) -> None:
    model = make_model("flow_matching")
    emb = model.network.detector_embed.weight.detach().clone()
    new = model.with_detector("det_c")
    assert new.vocab.detectors == (*DETECTORS, "det_c") and new.vocab.n_detector_slots == 4
    assert model.vocab.detectors == DETECTORS, "the original model must not change"
    torch.testing.assert_close(new.network.detector_embed.weight[2], emb[:2].mean(dim=0))
    torch.testing.assert_close(model.network.detector_embed.weight, emb)
    copied = model.with_detector("det_c", init_from="det_b")
    torch.testing.assert_close(copied.network.detector_embed.weight[2], emb[1])
    _, cond = small_data
    cond_c = Conditions.make(cond.energy_mev[:2], cond.theta_rad[:2], cond.phi_rad[:2], cond.pdg[:2], "det_c")
    out = new.generate(cond_c, num_steps=2, sampler="euler")
    assert out.shape == (2, *SMALL_MESH) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown detector"):
        model.generate(cond_c, num_steps=2)
    full = new.with_detector("det_d")
    with pytest.raises(ValueError, match="no spare detector slot left for 'det_e'"):
        full.with_detector("det_e")
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        model.with_detector("det_x", init_from="nope")
    assert new.with_detector("det_c").vocab == new.vocab


def test_generate_rejects_user_mistakes(small_data) -> None:
    model = make_model("flow_matching", scramble=False)
    _, cond = small_data
    two = cond.subset(slice(0, 2))
    with pytest.raises(ValueError, match=r"seeds must be an integer array of shape \(2,\)"):
        model.generate(two, seeds=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"seeds must be an integer array of shape \(2,\)"):
        model.generate(two, seeds=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        model.generate(two, batch_size=0)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        model.generate(two, sampler="dpm")
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        model.generate(two, num_steps=0)
    with pytest.raises(ValueError, match="model is on cpu; move it first"):
        model.generate(two, device="meta")
    with pytest.raises(ValueError, match="conditions must be a Conditions"):
        model.generate({"energy_mev": [1.0]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected shape \(B, 12, 8, 6\)"):
        model.to_model_space(np.zeros((2, 12, 8, 5), dtype=np.float32))
    assert model.generate(two.subset(slice(0, 0))).shape == (0, *SMALL_MESH)
    unfitted = ShowerModel(model.config, model.vocab, model.mesh)
    with pytest.raises(ValueError, match="transform is not fitted"):
        unfitted.generate(two)


def test_build_checks_stats_against_the_mesh() -> None:
    showers, cond = toy_showers(8, (9, 8, 6), seed=1)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    vocab = ConditionVocab.create(DETECTORS)
    cfg = ShowerModelConfig(backbone="debug")
    with pytest.raises(ValueError, match=r"n_voxels_per_shower'\]=432 does not match the mesh \(12, 8, 6\)"):
        ShowerModel.build(cfg, vocab, stats, SMALL_MESH)
    with pytest.raises(ValueError, match="needs a stats block"):
        ShowerModel.build(cfg, vocab, None, SMALL_MESH)  # type: ignore[arg-type]
    model = ShowerModel.build(cfg, vocab, stats, (9, 8, 6))
    assert model.mesh_shape == (9, 8, 6) and model.patch_coords_TC.shape == (3 * 4 * 2, 4)
    assert "patch_coords_TC" not in model.state_dict()


def test_build_warns_when_position_features_alias_on_the_depth_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SMALL_MESH has 12 layers: 4 depth tokens of 3, so the default 8 half periods alias; 4 do not. Its 6
    radial bins make 2 radius tokens, below the radius default of 3."""
    with caplog.at_level(logging.WARNING, logger="caloforge.platform"):
        model = make_model()
    assert model.config.backbone_config().pos_max_freq == 8.0
    assert "above the Nyquist frequency of the 4 depth tokens" in caplog.text
    assert "model.pos_max_freq <= 4" in caplog.text
    assert "above the Nyquist frequency of the 2 radius tokens" in caplog.text
    assert "model.pos_max_freq_r <= 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="caloforge.platform"):
        model = make_model(pos_max_freq=4, pos_max_freq_r=2)
    assert "Nyquist" not in caplog.text and model.config.backbone_config().pos_max_freq == 4.0
    with caplog.at_level(logging.INFO, logger="caloforge.platform"):
        make_model(pos_max_freq=32, pos_max_freq_r=32)  # named in the config: the user's choice, logged
    named = [r for r in caplog.records if "Nyquist" in r.getMessage()]
    assert [r.levelno for r in named] == [logging.INFO, logging.INFO]
    assert "radius tokens" in named[1].getMessage()
    for bad in (0.5, float("nan"), True, "8"):
        with pytest.raises(ValueError, match="pos_max_freq must be a finite number >= 1"):
            ShowerModelConfig(backbone="debug", pos_max_freq=bad)  # type: ignore[arg-type]


def test_radius_aliasing_follows_a_backbone_whose_radius_follows_the_depth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backbone with ``pos_max_freq_r: null`` (bundles before schema 5) takes the depth's limit for the
    radius: named depth limit, named radius limit (logged, not warned)."""
    showers, cond = toy_showers(8, SMALL_MESH, seed=1)
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    backbone = BackboneConfig(depth=1, width=32, heads=2, mlp_width=64, pos_max_freq_r=None)
    cfg = ShowerModelConfig(backbone=backbone, pos_max_freq=4)
    with caplog.at_level(logging.INFO, logger="caloforge.platform"):
        ShowerModel.build(cfg, ConditionVocab.create(DETECTORS), stats, SMALL_MESH)
    radius = [r for r in caplog.records if "radius tokens" in r.getMessage()]
    assert [r.levelno for r in radius] == [logging.INFO]
    assert "pos_max_freq_r 4 is above the Nyquist frequency of the 2 radius tokens" in radius[0].getMessage()


def test_radius_position_limit_is_a_model_setting_that_round_trips(small_data, tmp_path: Path) -> None:
    """``pos_max_freq_r`` sets the radius features' limit alone (unset: the backbone's, 3 since bundle schema
    5); saved and loaded, the model samples the same."""
    assert ShowerModelConfig(backbone="debug").backbone_config().radius_max_freq == 3.0  # since schema 5
    cfg = ShowerModelConfig(backbone="debug", pos_max_freq=6, pos_max_freq_r=3).backbone_config()
    assert (cfg.pos_max_freq, cfg.radius_max_freq) == (6.0, 3.0)
    with pytest.raises(ValueError, match="pos_max_freq_r must be a finite number >= 1"):
        ShowerModelConfig(backbone="debug", pos_max_freq_r=0)
    model = make_model(pos_max_freq=4, pos_max_freq_r=2)
    save_bundle(model, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.config.pos_max_freq_r == 2.0
    _, cond = small_data
    cond, seeds = cond.subset(slice(0, 2)), np.array([3, 4], dtype=np.int64)
    kwargs = {"num_steps": 2, "sampler": "euler"}
    torch.testing.assert_close(
        loaded.generate(cond, seeds=seeds, **kwargs), model.generate(cond, seeds=seeds, **kwargs)
    )


def test_bundles_before_schema_5_keep_the_radius_at_the_depth_limit(small_data, tmp_path: Path) -> None:
    """A schema-4 bundle has no radius limit of its own: its radius features ran to ``pos_max_freq``, and it
    loads that way (a flavour-named backbone gets the value, a backbone written out gets None = as the
    depth's), sampling what it sampled when it was written."""
    model = make_model(pos_max_freq_r=8.0)  # the radius as schema 4 trained it (8, the depth's default)
    path = model.save(tmp_path / "v4")
    data = json.loads((path / "config.json").read_text())
    data["schema_version"] = 4
    del data["model_config"]["pos_max_freq_r"]
    (path / "config.json").write_text(json.dumps(data))
    loaded = load_bundle(path)
    assert loaded.config.pos_max_freq_r == 8.0 and loaded.config.backbone_config().radius_max_freq == 8.0
    _, cond = small_data
    cond, seeds = cond.subset(slice(0, 2)), np.array([5, 6], dtype=np.int64)
    kwargs = {"num_steps": 2, "sampler": "euler"}
    expected = model.generate(cond, seeds=seeds, **kwargs)
    torch.testing.assert_close(loaded.generate(cond, seeds=seeds, **kwargs), expected)
    named = migrate_model_config({"backbone": "debug", "pos_max_freq": 32.0}, 4)
    assert named["pos_max_freq_r"] == 32.0
    written_out = migrate_model_config({"backbone": {"depth": 2, "pos_max_freq": 8.0}}, 4)
    assert written_out["backbone"]["pos_max_freq_r"] is None
    assert migrate_model_config({"backbone": "debug"}, 9) == {"backbone": "debug"}  # today's: unchanged


def test_bundles_before_schema_6_let_the_head_empty_layers(small_data, tmp_path: Path) -> None:
    """Before schema 6 the layer-energy head's energy was applied to every hit layer, also where it empties
    the layer: such a bundle loads with ``empty_layers = either`` and samples what it sampled."""
    legacy = make_model(layer_energy=LayerEnergyConfig(empty_layers="either"))
    path = legacy.save(tmp_path / "v5")
    data = json.loads((path / "config.json").read_text())
    data["schema_version"] = 5
    del data["model_config"]["layer_energy"]["empty_layers"]
    (path / "config.json").write_text(json.dumps(data))
    loaded = load_bundle(path)
    assert loaded.config.layer_energy.empty_layers == "either"
    _, cond = small_data
    cond, seeds = cond.subset(slice(0, 2)), np.array([5, 6], dtype=np.int64)
    kwargs = {"num_steps": 2, "sampler": "euler"}
    torch.testing.assert_close(
        loaded.generate(cond, seeds=seeds, **kwargs), legacy.generate(cond, seeds=seeds, **kwargs)
    )
    assert make_model().config.layer_energy.empty_layers == "axis_tracks"  # today's default (schema 9)
    assert migrate_model_config({"layer_energy": {"enabled": False}}, 1)["layer_energy"] == {
        "enabled": False,
        "empty_layers": "either",
    }
    assert migrate_model_config({}, 5)["layer_energy"] == {"empty_layers": "either"}
    assert migrate_model_config({"layer_energy": "on"}, 5)["layer_energy"] == "on"  # from_dict refuses it
    assert migrate_model_config({"layer_energy": {"empty_layers": "voxel_model"}}, 6) == {
        "layer_energy": {"empty_layers": "voxel_model"}
    }
    # schemas 6-7 generated with voxel_model; a bundle that names its mode keeps it
    assert migrate_model_config({}, 7)["layer_energy"] == {"empty_layers": "voxel_model"}
    assert migrate_model_config({"layer_energy": {"empty_layers": "either"}}, 7)["layer_energy"] == {
        "empty_layers": "either"
    }
    # schema 8 filled a hadron's track in the hottest voxel anywhere in the layer
    assert migrate_model_config({"layer_energy": {"enabled": True}}, 8) == {
        "layer_energy": {"empty_layers": "hadron_tracks", "enabled": True}
    }
    assert migrate_model_config({"layer_energy": {"enabled": True}}, 9) == {"layer_energy": {"enabled": True}}


def test_sampling_defaults_and_residual_stream_change_through_named_methods() -> None:
    """The config is read-only; what may change on a built model has a method (no config setter)."""
    model = make_model("edm", scramble=False)
    with pytest.raises(AttributeError):
        model.config = model.config  # type: ignore[misc]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_sampling_defaults(sampler="euler", num_steps=7)
    assert (model.config.sampler, model.config.num_steps) == ("euler", 7)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        model.set_sampling_defaults(num_steps=0)
    assert model.config.num_steps == 7
    # The residual stream's precision is a numerics choice, not architecture: it reaches the backbone.
    assert model.network.autocast_stream is False
    model.set_residual_stream("autocast")
    assert model.network.autocast_stream is True and model.config.residual_stream == "autocast"
    model.set_residual_stream("fp32")
    assert model.network.autocast_stream is False
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    # σ_data is the model's parametrisation (its preconditioning), fixed at build time.
    edm = make_model("edm", scramble=False, edm=EDMPrecondConfig(sigma_data=1.0))
    c_skip = edm.denoiser.preconditioning(torch.tensor([1.0]))[0]
    torch.testing.assert_close(c_skip, torch.tensor([0.5]))
