"""Each adaptation strategy trains exactly what it says (everything else bitwise the base's), and the LoRA
adapter round-trips through peft's own format to the merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapt_helpers import tiny_config

from caloforge.adapt.config import StrategyConfig
from caloforge.adapt.strategies import load_adapter, prepare_strategy
from caloforge.datasets.streaming import ShowerStream, load_split
from caloforge.platform.objectives import LossContext
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.loop import Trainer
from caloforge.training.tasks import shower_loss_fn
from caloforge.training.torch_backend import TorchBackend

EMBED = "denoiser.net.detector_embed.weight"


def _trained(base_bundle: Path, shards: Path, strategy: StrategyConfig) -> tuple[dict, object, object]:
    cfg = tiny_config(strategy=strategy)
    base = ShowerModel.load(base_bundle)
    start = {n: p.detach().clone() for n, p in base.with_detector("lar-pb").named_parameters()}
    model = base.with_detector("lar-pb")
    prepared = prepare_strategy(model, "lar-pb", strategy)
    stream = ShowerStream(shards, cfg.stream_config(), "train", seed=0)
    trainer = Trainer(
        prepared.module,
        shower_loss_fn(prepared.model),
        TorchBackend("cpu"),
        stream,
        cfg.loop,
        trainable=prepared.trainable,
    )
    trainer.fit()
    return start, prepared, trainer


def _changed(start: dict, model: ShowerModel) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}


@pytest.mark.parametrize("kind", ["full", "bias", "embedding"])
def test_each_strategy_changes_only_its_parameters(base_bundle, lar_pb_shards, kind: str) -> None:
    start, prepared, _ = _trained(base_bundle, lar_pb_shards, StrategyConfig(kind=kind))
    model = prepared.model
    row = model.vocab.detector_index("lar-pb")
    changed = _changed(start, model)
    trainable, total = prepared.parameter_counts
    assert 0 < trainable <= total == sum(p.numel() for p in model.parameters())
    if kind == "full":
        assert trainable == total and len(changed) > 0.5 * len(start)
    elif kind == "bias":
        assert changed and all(
            n.endswith(".bias") or ".adaLN_modulation." in n or n == EMBED for n in changed
        )
        assert any(".adaLN_modulation." in n and n.endswith(".weight") for n in changed)
    else:
        assert changed == {EMBED} and trainable == model.network.detector_embed.weight.shape[1]
    if kind != "full":  # the known detectors' rows and the spare rows stay bitwise the base's
        weight = model.network.detector_embed.weight.detach()
        others = [i for i in range(weight.shape[0]) if i != row]
        assert torch.equal(weight[others], start[EMBED][others])
        assert not torch.equal(weight[row], start[EMBED][row])


def test_embedding_with_the_energy_head_trains_its_context_projection(base_bundle, lar_pb_shards) -> None:
    strategy = StrategyConfig(kind="embedding", energy_head=True)
    start, prepared, _ = _trained(base_bundle, lar_pb_shards, strategy)
    assert _changed(start, prepared.model) == {
        EMBED,
        "energy_head.context.weight",
        "energy_head.context.bias",
    }
    with pytest.raises(ValueError, match="energy_head only applies to kind 'embedding'"):
        StrategyConfig(kind="full", energy_head=True)


def test_mesh_layers_add_the_layers_that_read_the_mesh(base_bundle, lar_pb_shards) -> None:
    mesh_layers = {
        "denoiser.net.patch_embed.weight",
        "denoiser.net.patch_embed.bias",
        "denoiser.net.final_layer.linear.weight",
        "denoiser.net.final_layer.linear.bias",
        "energy_head.fc_in.weight",
        "energy_head.fc_in.bias",
        "energy_head.fc_out.weight",
        "energy_head.fc_out.bias",
    }
    start, prepared, _ = _trained(
        base_bundle, lar_pb_shards, StrategyConfig(kind="embedding", mesh_layers=True)
    )
    assert _changed(start, prepared.model) == {EMBED} | mesh_layers
    params = dict(prepared.model.named_parameters())
    width = prepared.model.network.detector_embed.weight.shape[1]
    assert prepared.parameter_counts[0] == width + sum(params[n].numel() for n in mesh_layers)

    def bias_names(mesh: bool) -> set[str]:
        model = ShowerModel.load(base_bundle).with_detector("lar-pb")
        strategy = StrategyConfig(kind="bias", mesh_layers=mesh)
        return set(prepare_strategy(model, "lar-pb", strategy).trainable.names)

    assert bias_names(True) == bias_names(False) | mesh_layers
    with pytest.raises(ValueError, match="mesh_layers applies to kinds 'bias' and 'embedding'"):
        StrategyConfig(kind="lora", mesh_layers=True)


def test_lora_adapter_round_trips_through_peft_and_equals_the_merged_bundle(
    base_bundle, lar_pb_shards, tmp_path
) -> None:
    start, prepared, trainer = _trained(base_bundle, lar_pb_shards, StrategyConfig(kind="lora"))
    trained_module = trainer.backend.model
    names = [n for n, p in trained_module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    trainable, total = prepared.parameter_counts
    assert 0 < trainable < 0.2 * total
    adapter = prepared.save_adapter(trained_module, tmp_path / "adapter")
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    merged = prepared.merged(trained_module)
    assert isinstance(merged, ShowerModel)
    reloaded = load_adapter(ShowerModel.load(base_bundle).with_detector("lar-pb"), adapter)
    for (name, a), b in zip(merged.state_dict().items(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # the merged bundle computes what the adapter-applied model computes
    showers = load_split(lar_pb_shards, "test", max_showers=6)
    x1 = merged.to_model_space(showers.showers_NZPR)
    ct = merged.encode_conditions(showers.conditions)
    t = torch.full((6,), 0.4)
    with torch.no_grad():
        torch.testing.assert_close(trained_module(x1, t, ct), merged(x1, t, ct), rtol=1e-4, atol=1e-5)
    # and the merged model changed the known detectors' rows not at all
    row = merged.vocab.detector_index("lar-pb")
    weight = merged.network.detector_embed.weight.detach()
    others = [i for i in range(weight.shape[0]) if i != row]
    assert torch.equal(weight[others], start[EMBED][others]) and not torch.equal(
        weight[row], start[EMBED][row]
    )
    loss = shower_loss_fn(merged)
    assert loss is not None and LossContext().step == 0


def test_lora_with_the_energy_head_trains_the_whole_head_and_its_adapter_carries_it(
    base_bundle, lar_pb_shards, tmp_path
) -> None:
    """``strategy.lora.energy_head``: the layer-energy head (no LoRA target inside it) trains in full as
    peft's ``modules_to_save`` beside the adapters; the merged bundle has the trained head, the saved adapter
    reproduces it, and the backbone outside the adapters stays the base's."""
    from caloforge.adapt.config import LoraOptions

    strategy = StrategyConfig(kind="lora", lora=LoraOptions(energy_head=True))
    start, prepared, trainer = _trained(base_bundle, lar_pb_shards, strategy)
    trained_module = trainer.backend.model
    names = [n for n, p in trained_module.named_parameters() if p.requires_grad]
    head = [n for n in names if "energy_head.modules_to_save" in n]
    assert head and all("lora_" in n or "trainable_tokens_delta" in n or n in head for n in names)
    head_size = sum(p.numel() for p in ShowerModel.load(base_bundle).energy_head.parameters())
    plain = prepare_strategy(
        ShowerModel.load(base_bundle).with_detector("lar-pb"), "lar-pb", StrategyConfig(kind="lora")
    )
    # the head counts once in the total (peft keeps its frozen original beside the trained copy)
    assert prepared.parameter_counts == (plain.parameter_counts[0] + head_size, plain.parameter_counts[1])
    merged = prepared.merged(trained_module)
    changed = _changed(start, merged)
    assert {n for n in changed if n.startswith("energy_head.")} and EMBED in changed
    adapter = prepared.save_adapter(trained_module, tmp_path / "adapter")
    reloaded = load_adapter(ShowerModel.load(base_bundle).with_detector("lar-pb"), adapter)
    for (name, a), b in zip(merged.state_dict().items(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"lora\.energy_head applies to kind 'lora'"):
        StrategyConfig(kind="bias", lora=LoraOptions(energy_head=True))
