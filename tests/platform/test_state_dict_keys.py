"""Names are public API: the debug model's state-dict keys and the LoRA target modules are pinned.

Changing any of these breaks stored bundles, training checkpoints and LoRA adapters; if a change is
intended, bump the bundle schema_version and update this file in the same change.
"""

from __future__ import annotations

import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.backbone import LORA_TARGETS
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.objectives import make_objective

PINNED_DEBUG_STATE_DICT: list[tuple[str, tuple[int, ...]]] = [
    ("denoiser.net.patch_embed.weight", (64, 18)),
    ("denoiser.net.patch_embed.bias", (64,)),
    ("denoiser.net.t_embedder.fc1.weight", (64, 256)),
    ("denoiser.net.t_embedder.fc1.bias", (64,)),
    ("denoiser.net.t_embedder.fc2.weight", (64, 64)),
    ("denoiser.net.t_embedder.fc2.bias", (64,)),
    ("denoiser.net.kin_embedder.fc1.weight", (64, 38)),
    ("denoiser.net.kin_embedder.fc1.bias", (64,)),
    ("denoiser.net.kin_embedder.fc2.weight", (64, 64)),
    ("denoiser.net.kin_embedder.fc2.bias", (64,)),
    ("denoiser.net.particle_embed.weight", (13, 64)),
    ("denoiser.net.detector_embed.weight", (4, 64)),
    ("denoiser.net.blocks.0.attn.qkv.weight", (192, 64)),
    ("denoiser.net.blocks.0.attn.qkv.bias", (192,)),
    ("denoiser.net.blocks.0.attn.proj.weight", (64, 64)),
    ("denoiser.net.blocks.0.attn.proj.bias", (64,)),
    ("denoiser.net.blocks.0.mlp.fc1.weight", (256, 64)),
    ("denoiser.net.blocks.0.mlp.fc1.bias", (256,)),
    ("denoiser.net.blocks.0.mlp.fc2.weight", (64, 256)),
    ("denoiser.net.blocks.0.mlp.fc2.bias", (64,)),
    ("denoiser.net.blocks.0.adaLN_modulation.weight", (384, 64)),
    ("denoiser.net.blocks.0.adaLN_modulation.bias", (384,)),
    ("denoiser.net.blocks.1.attn.qkv.weight", (192, 64)),
    ("denoiser.net.blocks.1.attn.qkv.bias", (192,)),
    ("denoiser.net.blocks.1.attn.proj.weight", (64, 64)),
    ("denoiser.net.blocks.1.attn.proj.bias", (64,)),
    ("denoiser.net.blocks.1.mlp.fc1.weight", (256, 64)),
    ("denoiser.net.blocks.1.mlp.fc1.bias", (256,)),
    ("denoiser.net.blocks.1.mlp.fc2.weight", (64, 256)),
    ("denoiser.net.blocks.1.mlp.fc2.bias", (64,)),
    ("denoiser.net.blocks.1.adaLN_modulation.weight", (384, 64)),
    ("denoiser.net.blocks.1.adaLN_modulation.bias", (384,)),
    ("denoiser.net.final_layer.adaLN_modulation.weight", (128, 64)),
    ("denoiser.net.final_layer.adaLN_modulation.bias", (128,)),
    ("denoiser.net.final_layer.linear.weight", (18, 64)),
    ("denoiser.net.final_layer.linear.bias", (18,)),
    ("transform.log_eps", ()),
    ("transform.threshold_mev", ()),
    ("transform.fitted", ()),
    ("transform.log_max_Z", (12,)),
    ("transform.mean", ()),
    ("transform.std", ()),
]

# The layer-energy head (default LayerEnergyConfig: width 2 × 64 = 128 for `debug`, depth 3) and its
# transform's buffers, after the voxel model's keys. A model with ``layer_energy.enabled: false`` has none
# of them.
PINNED_ENERGY_HEAD_STATE_DICT: list[tuple[str, tuple[int, ...]]] = [
    ("energy_head.fc_in.weight", (128, 12)),
    ("energy_head.fc_in.bias", (128,)),
    ("energy_head.context.weight", (128, 64)),
    ("energy_head.context.bias", (128,)),
    ("energy_head.time_fc1.weight", (128, 256)),
    ("energy_head.time_fc1.bias", (128,)),
    ("energy_head.time_fc2.weight", (128, 128)),
    ("energy_head.time_fc2.bias", (128,)),
    ("energy_head.blocks.0.modulation.weight", (256, 128)),
    ("energy_head.blocks.0.modulation.bias", (256,)),
    ("energy_head.blocks.0.fc1.weight", (256, 128)),
    ("energy_head.blocks.0.fc1.bias", (256,)),
    ("energy_head.blocks.0.fc2.weight", (128, 256)),
    ("energy_head.blocks.0.fc2.bias", (128,)),
    ("energy_head.blocks.1.modulation.weight", (256, 128)),
    ("energy_head.blocks.1.modulation.bias", (256,)),
    ("energy_head.blocks.1.fc1.weight", (256, 128)),
    ("energy_head.blocks.1.fc1.bias", (256,)),
    ("energy_head.blocks.1.fc2.weight", (128, 256)),
    ("energy_head.blocks.1.fc2.bias", (128,)),
    ("energy_head.blocks.2.modulation.weight", (256, 128)),
    ("energy_head.blocks.2.modulation.bias", (256,)),
    ("energy_head.blocks.2.fc1.weight", (256, 128)),
    ("energy_head.blocks.2.fc1.bias", (256,)),
    ("energy_head.blocks.2.fc2.weight", (128, 256)),
    ("energy_head.blocks.2.fc2.bias", (128,)),
    ("energy_head.fc_out.weight", (12, 128)),
    ("energy_head.fc_out.bias", (12,)),
    ("energy_transform.mean_Z", (12,)),
    ("energy_transform.std_Z", (12,)),
    ("energy_transform.fitted", ()),
]

PINNED_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation")

PINNED_LORA_MODULES = sorted(
    [f"denoiser.net.blocks.{i}.{name}" for i in range(2) for name in PINNED_LORA_TARGETS]
    + ["denoiser.net.final_layer.adaLN_modulation"]
)


def test_debug_state_dict_keys_and_shapes_are_pinned() -> None:
    for objective in ("edm", "flow_matching"):  # the parametrisations trained from data alone
        model = make_model(objective, scramble=False)  # 2 detectors + 2 spare slots, 12×8×6 mesh
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert got == PINNED_DEBUG_STATE_DICT + PINNED_ENERGY_HEAD_STATE_DICT
        no_head = make_model(objective, scramble=False, layer_energy=LayerEnergyConfig(enabled=False))
        got = [(k, tuple(v.shape)) for k, v in no_head.state_dict().items()]
        assert got == PINNED_DEBUG_STATE_DICT


def test_lora_targets_are_pinned_and_match_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    assert LORA_TARGETS == PINNED_LORA_TARGETS
    model = make_model("edm")
    showers, cond = toy_showers(3, SMALL_MESH, seed=2)
    x1, ct = model.to_model_space(showers), model.encode_conditions(cond)
    reference = make_objective("edm")(model, x1, ct, torch.Generator().manual_seed(0)).detach()

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS)))
    adapted = sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in peft_model.named_modules()
        if name.endswith(".lora_A")
    )
    assert adapted == PINNED_LORA_MODULES
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    # The objective finds the ShowerModel inside the peft wrapper and calls through it; LoRA B starts at
    # zero, so the loss equals the base model's, and gradients reach the adapters only.
    loss = make_objective("edm")(peft_model, x1, ct, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)
    loss.mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
