"""Adaptation strategies: what of a pretrained ``ShowerModel`` trains for a new detector (peft enters here).

``ADAPT_STRATEGIES[kind](model, detector, config) -> Prepared``; ``model`` already holds the target detector
in its vocabulary (a spare "K+1" slot for a new detector, its own row for a known one):

- ``full``: every weight (CaloDiT-2's adaptation: lower learning rate, EMA, warmup-stable-decay);
- ``lora``: LoRA adapters through peft on the backbone's ``LORA_TARGETS`` (rank, alpha, dropout, targets from
  the config) plus the detector's embedding row as peft *trainable tokens* (so the adapter, saved in peft's
  own format, carries the row), and with ``lora.energy_head`` the whole layer-energy head (peft's
  ``modules_to_save``); the bundle is the merged model;
- ``bias``: biases and adaLN modulation (BitFit-style; reported competitive for cross-geometry calorimeter
  transfer) plus the detector's embedding row;
- ``embedding``: the detector's embedding row only (and, with ``energy_head``, the layer-energy head's
  context projection, the head's only detector-dependent input).

``mesh_layers`` adds, to ``bias`` and ``embedding``, the parameters that read the mesh (``MESH_LAYERS``):
what a detector on another mesh needs beyond its row (the measured case in docs/adaptation.md).

Rows of the embedding other than the detector's stay bitwise unchanged (``training.trainable``: gradient
mask, no weight decay, EMA of the selected rows). Parameters outside the selection are frozen
(``requires_grad`` off) so they cost no gradient.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from caloforge.adapt.config import StrategyConfig
from caloforge.platform.shower_model import ShowerModel
from caloforge.training.trainable import Trainable, count, select

__all__ = ["ADAPT_STRATEGIES", "MESH_LAYERS", "Prepared", "prepare_strategy"]

ADAPTER_DIR = "adapter"


def _name_of(module: nn.Module, param: nn.Parameter) -> str:
    for name, p in module.named_parameters():
        if p is param:
            return name
    raise ValueError("parameter not found in the module")


@dataclass
class Prepared:
    """A model ready for the loop: ``module`` is what the Trainer trains (the ``ShowerModel``, or peft's
    model around it), ``model`` the ``ShowerModel`` inside, ``trainable`` the selection."""

    kind: str
    module: nn.Module
    model: ShowerModel
    trainable: Trainable

    @property
    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) elements; a row-restricted parameter counts its selected rows only."""
        return count(self.trainable)

    def merged(self, trained: nn.Module) -> ShowerModel:
        """The ``ShowerModel`` to bundle from the trained ``module`` (a copy: LoRA adapters merged in)."""
        if self.kind == "lora":
            return copy.deepcopy(trained).merge_and_unload()  # type: ignore[operator]
        if not isinstance(trained, ShowerModel):
            raise ValueError(f"strategy {self.kind!r}: expected a ShowerModel, got {type(trained).__name__}")
        return trained

    def save_adapter(self, trained: nn.Module, directory: Path) -> Path | None:
        """peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``) for ``lora``."""
        if self.kind != "lora":
            return None
        trained.save_pretrained(str(directory))  # type: ignore[operator]
        return directory


def _freeze_outside(module: nn.Module, selection: Trainable) -> None:
    chosen = set(selection.names)
    for name, p in module.named_parameters():
        p.requires_grad_(name in chosen)


def _row_selection(model: ShowerModel, row: int, extra: list[str]) -> Trainable:
    embed = _name_of(model, model.network.detector_embed.weight)
    selection = select(model, names=extra, rows={embed: [row]})
    _freeze_outside(model, selection)
    return selection


# The parameters that read the mesh: the voxel layout inside a patch (patch embedding, output layer) and the
# layer profile (the layer-energy head's layer-indexed input and output).
MESH_LAYERS = (
    "denoiser.net.patch_embed.",
    "denoiser.net.final_layer.linear.",
    "energy_head.fc_in.",
    "energy_head.fc_out.",
)


def _mesh_layers(model: ShowerModel, config: StrategyConfig) -> list[str]:
    if not config.mesh_layers:
        return []
    return [n for n, _ in model.named_parameters() if n.startswith(MESH_LAYERS)]


def _full(model: ShowerModel, row: int, config: StrategyConfig) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared("full", model, model, select(model))


def _bias(model: ShowerModel, row: int, config: StrategyConfig) -> Prepared:
    names = [n for n, _ in model.named_parameters() if n.endswith(".bias") or ".adaLN_modulation." in n]
    names += [n for n in _mesh_layers(model, config) if n not in names]
    return Prepared("bias", model, model, _row_selection(model, row, names))


def _embedding(model: ShowerModel, row: int, config: StrategyConfig) -> Prepared:
    names = []
    if config.energy_head:
        if model.energy_head is None:
            raise ValueError("strategy.energy_head: the base model has no layer-energy head")
        names = [n for n, _ in model.named_parameters() if n.startswith("energy_head.context.")]
    names += _mesh_layers(model, config)
    return Prepared("embedding", model, model, _row_selection(model, row, names))


def _lora(model: ShowerModel, row: int, config: StrategyConfig) -> Prepared:
    from peft import LoraConfig, get_peft_model

    options = config.lora
    if options.energy_head and model.energy_head is None:
        raise ValueError("strategy.lora.energy_head: the base model has no layer-energy head")
    lora = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.targets),
        trainable_token_indices={"detector_embed": [row]},
        modules_to_save=["energy_head"] if options.energy_head else None,
    )
    peft_model = get_peft_model(model, lora)
    selection = select(peft_model)  # peft leaves exactly the adapters and the token delta trainable
    # (and the copy of the head that trains); the head's frozen original stays in the wrapper until the merge
    # drops it: the total counts the head once
    kept = sum(p.numel() for n, p in peft_model.named_parameters() if ".original_module." in n)
    selection = dataclasses.replace(selection, total=selection.total - kept)
    return Prepared("lora", peft_model, model, selection)


ADAPT_STRATEGIES: dict[str, Callable[[ShowerModel, int, StrategyConfig], Prepared]] = {
    "full": _full,
    "lora": _lora,
    "bias": _bias,
    "embedding": _embedding,
}


def prepare_strategy(model: ShowerModel, detector: str, config: StrategyConfig) -> Prepared:
    """Make ``model`` ready to adapt to ``detector`` (which its vocabulary must know) with ``config``."""
    row = model.vocab.detector_index(detector)
    return ADAPT_STRATEGIES[config.kind](model, row, config)


def load_adapter(model: ShowerModel, directory: Path) -> ShowerModel:
    """``model`` (the base with the detector in its vocabulary) with a saved adapter applied and merged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).merge_and_unload()
