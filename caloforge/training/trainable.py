"""Which parameters train, and of some of them only a subset of rows: the :class:`Trainable` selection.

Adaptation trains parts of a pretrained model: only a new detector's row of the detector embedding, LoRA
adapters plus that row, or biases and adaLN only. Whole parameters are easy (the optimizer simply does not
see the others); a *row* of a parameter is not, because AdamW updates every element of the tensors it
holds. A row-restricted parameter (``rows``: indices along dim 0) therefore gets three things, so that its
other rows stay **bitwise** unchanged however long it trains, on every backend:

- its gradient is masked (:meth:`Trainable.mask_gradients`, a tensor hook on the parameter that runs
  before the gradient is accumulated into ``.grad``, hence before DDP's all-reduce and DeepSpeed ZeRO's
  gradient hooks see it): the other rows receive exact zeros (copied, not multiplied, so an ``inf``/``nan``
  gradient of a trained row cannot leak into them). AdamW's moments of those rows then stay exactly 0, and
  its update ``m̂ / (sqrt(v̂) + eps) = 0 / eps = 0`` leaves them unchanged (gradient clipping scales 0 to 0);
- no weight decay (``training/optim.py:param_groups``): AdamW's decoupled decay ``θ ← θ·(1 − lr·wd)`` acts
  on the whole tensor and would shrink the frozen rows; decaying only the trained rows is not expressible
  through ``torch.optim.AdamW`` nor through DeepSpeed's flat ZeRO partitions, so the whole parameter goes
  to the non-decayed group (whole matrices trained alongside keep their decay);
- the EMA (``training/ema.py``) averages only those rows; the other rows of the shadow keep their
  initial copy.

The selection is a frozen description by parameter name (names are what the EMA, checkpoints and
state dicts use, and they are the same for the model wrapped by DDP/DeepSpeed): build it with
:func:`select`, hand it to the ``Trainer`` (``trainable=``), and report :func:`count` (trained elements,
counting only the selected rows of row-restricted parameters, and the model's total).
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Trainable", "TrainableSpec", "count", "resolve", "select"]

# parameter -> the handle of its row-mask hook (at most one per parameter; ``mask_gradients`` of a new
# selection removes the earlier ones, so masks never stack up or outlive the selection in use)
_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True, eq=True)
class Trainable:
    """A frozen description of what trains in a model (build it with :func:`select`).

    Attributes:
        names: the trained parameters, in the model's ``named_parameters()`` order.
        rows: for row-restricted parameters (a subset of ``names``), the trained indices along dim 0
            (sorted, unique); every other name trains whole.
        shapes: the shape of every parameter in ``names``.
        total: elements of all the model's parameters (trained or not), for :func:`count`.
    """

    names: tuple[str, ...]
    rows: Mapping[str, tuple[int, ...]]
    shapes: Mapping[str, tuple[int, ...]]
    total: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise ValueError("trainable: the selection has no parameters (no trainable parameters)")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"trainable: duplicate parameter names in {list(self.names)}")
        if set(self.shapes) != set(self.names):
            raise ValueError("trainable: shapes must name exactly the selected parameters")
        rows = {}
        for name, idx in self.rows.items():
            if name not in self.shapes:
                raise ValueError(f"trainable: rows of {name!r}, which is not a selected parameter")
            shape = tuple(self.shapes[name])
            if len(shape) == 0:
                raise ValueError(f"trainable: {name!r} is a scalar (shape ()): it has no rows to select")
            ordered = tuple(sorted({int(i) for i in idx}))
            if not ordered:
                raise ValueError(f"trainable: rows of {name!r} are empty (leave it out instead)")
            if ordered[0] < 0 or ordered[-1] >= shape[0]:
                raise ValueError(
                    f"trainable: rows of {name!r} must lie in [0, {shape[0]}) (shape {shape}), got "
                    f"{list(ordered)}"
                )
            rows[name] = ordered
        object.__setattr__(self, "rows", types.MappingProxyType(rows))
        shapes = {n: tuple(int(s) for s in self.shapes[n]) for n in self.names}
        object.__setattr__(self, "shapes", types.MappingProxyType(shapes))
        trained = sum(self.numel(n) for n in self.names)
        if self.total < trained:
            raise ValueError(f"trainable: total {self.total} is below the {trained} trained elements")

    def to_dict(self) -> dict:
        """A JSON-able record: the names, the rows of row-restricted parameters, and :func:`count`."""
        trained, total = count(self)
        return {
            "names": list(self.names),
            "rows": {n: list(r) for n, r in self.rows.items()},
            "trained": trained,
            "total": total,
        }

    @property
    def restricted(self) -> frozenset[str]:
        """Names of the row-restricted parameters."""
        return frozenset(self.rows)

    def numel(self, name: str) -> int:
        """Trained elements of parameter ``name`` (only its selected rows when row-restricted)."""
        shape = self.shapes[name]
        if name in self.rows:
            return len(self.rows[name]) * math.prod(shape[1:])
        return math.prod(shape)

    def params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The selected ``(name, parameter)`` pairs of ``model`` (ValueError if it does not match)."""
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(f"trainable: the model has no parameter(s) {missing[:5]}")
        out = []
        for name in self.names:
            p = named[name]
            if tuple(p.shape) != self.shapes[name]:
                raise ValueError(
                    f"trainable: parameter {name!r} has shape {tuple(p.shape)} in the model, "
                    f"{self.shapes[name]} in the selection"
                )
            out.append((name, p))
        return out

    def row_index(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The selected rows of ``name`` as an int64 index tensor on ``device``."""
        return torch.tensor(self.rows[name], dtype=torch.int64, device=device)

    def mask_gradients(self, model: nn.Module) -> None:
        """Make ``model``'s parameters' gradients follow this selection: the row-restricted parameters get a
        gradient hook that zeroes their other rows; a mask left on any of ``model``'s parameters by an
        earlier selection is removed. Called by the backends in ``setup`` (after placing the model);
        idempotent. Deep copies of the model carry no masks (PyTorch does not copy tensor hooks)."""
        self.params(model)  # ValueError when the selection does not fit the model
        for name, p in model.named_parameters():
            old = _MASKS.pop(p, None)
            if old is not None:
                old.remove()
            if name in self.rows:
                _MASKS[p] = p.register_hook(_RowMask(name, self.row_index(name, p.device)))


class _RowMask:
    """Gradient hook keeping only ``rows`` of a gradient (the others become exact zeros)."""

    def __init__(self, name: str, rows: torch.Tensor) -> None:
        self.name = name
        self._rows = {rows.device: rows}

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if grad.layout != torch.strided:
            raise ValueError(
                f"trainable: {self.name!r} has a {grad.layout} gradient; row selection needs dense "
                "gradients (e.g. nn.Embedding(sparse=False))"
            )
        rows = self._rows.get(grad.device)
        if rows is None:  # the model moved after the mask was installed
            rows = self._rows.setdefault(grad.device, next(iter(self._rows.values())).to(grad.device))
        masked = torch.zeros_like(grad)
        masked.index_copy_(0, rows, grad.index_select(0, rows))
        return masked


TrainableSpec = Trainable | Sequence[nn.Parameter] | None
"""What ``Trainer``/backends/``build_optimizer``/``EMA`` accept: a selection, a list of parameters (trained
whole), or ``None`` (every parameter with ``requires_grad``)."""


def select(
    model: nn.Module,
    names: Iterable[str] | None = None,
    rows: Mapping[str, Iterable[int]] | None = None,
) -> Trainable:
    """The selection of ``model``'s parameters ``names`` plus the row-restricted ones in ``rows``.

    Args:
        model: the (unwrapped) model.
        names: parameters trained whole (``None``: every parameter with ``requires_grad``).
        rows: ``{name: row indices along dim 0}``; these parameters train only those rows (a name may also
            be in ``names``; ``rows`` restricts it). E.g. only the new detector's embedding row:
            ``select(model, names=[], rows={"network.detector_embed.weight": [k]})``.

    Every selected parameter must have ``requires_grad`` (else it would get no gradient).
    """
    named = dict(model.named_parameters())
    if names is None:
        wanted = {n for n, p in named.items() if p.requires_grad}
    else:
        wanted = set(names) if not isinstance(names, str) else {names}
    rows = dict(rows or {})
    unknown = sorted((wanted | set(rows)) - set(named))
    if unknown:
        raise ValueError(f"trainable: the model has no parameter(s) {unknown[:5]}")
    wanted |= set(rows)
    frozen = sorted(n for n in wanted if not named[n].requires_grad)
    if frozen:
        raise ValueError(
            f"trainable: parameter(s) {frozen[:5]} have requires_grad=False and would get no gradient"
        )
    for name in rows:
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if getattr(module, "sparse", False):
            raise ValueError(f"trainable: rows of {name!r}: a sparse embedding's gradient cannot be masked")
    if not wanted:
        raise ValueError("trainable: the model has no trainable parameters (none has requires_grad)")
    order = [n for n in named if n in wanted]
    return Trainable(
        names=tuple(order),
        rows={n: tuple(int(i) for i in idx) for n, idx in rows.items()},
        shapes={n: tuple(named[n].shape) for n in order},
        total=sum(p.numel() for p in named.values()),
    )


def resolve(model: nn.Module, trainable: TrainableSpec) -> Trainable:
    """A :class:`Trainable` for any :data:`TrainableSpec` (a selection is checked against ``model``)."""
    if trainable is None:
        return select(model)
    if isinstance(trainable, Trainable):
        trainable.params(model)  # ValueError when the selection does not fit the model
        return trainable
    ids = {id(p) for p in trainable}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if len(names) != len(ids):
        raise ValueError("trainable: some parameters do not belong to the model")
    return select(model, names=names)


def count(selection: Trainable) -> tuple[int, int]:
    """``(trained, total)`` elements: only the selected rows of row-restricted parameters count."""
    return sum(selection.numel(n) for n in selection.names), selection.total
