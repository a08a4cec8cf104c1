"""Real, small parts for the training tests: an in-memory resumable shower stream and a tiny network.

``InMemoryStream`` behaves like the sharded ``ShowerStream`` contract (infinite resampled epochs, rank
split, ``state_dict``/``load_state_dict``) over arrays held in memory; ``TinyDenoiser`` + ``denoise_loss``
form a flow-matching-style regression on log-energies that uses the loop's generator for its noise.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from caloforge.datasets.batch import ShowerBatch
from caloforge.platform.conditioning import Conditions
from caloforge.platform.objectives import LossContext

MESH = (3, 4, 2)
DETECTORS = ("det-a", "det-b")


def make_showers(n: int, seed: int = 0) -> tuple[np.ndarray, Conditions]:
    """``n`` synthetic showers on ``MESH``: energy follows the incident energy, shape the detector."""
    rng = np.random.default_rng(seed)
    energy = rng.uniform(1e3, 1e4, n)
    det = rng.integers(0, len(DETECTORS), n)
    profile = (
        np.where(det[:, None, None, None] == 0, 1.0, 0.3)
        * np.linspace(1.0, 0.2, MESH[0])[None, :, None, None]
    )
    showers = rng.exponential(1.0, (n, *MESH)) * profile * (energy[:, None, None, None] / 24.0)
    cond = Conditions.make(energy, 0.0, 0.0, np.where(det == 0, 11, 211), np.asarray(DETECTORS)[det])
    return showers.astype(np.float32), cond


class InMemoryStream:
    """Infinite, seeded, resumable stream of ``ShowerBatch`` micro-batches over in-memory showers.

    Epoch ``e`` visits ``permutation(seed, e)[rank::world_size]`` in batches of ``batch_size`` (a partial
    last batch is dropped). ``state_dict()`` is the position of the next batch to be yielded.
    """

    def __init__(
        self,
        showers_NZPR: np.ndarray,
        conditions: Conditions,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        per_rank = len(showers_NZPR) // world_size
        if per_rank < batch_size:
            raise ValueError(f"{len(showers_NZPR)} showers are too few for {world_size} × batch {batch_size}")
        self.showers_NZPR = showers_NZPR
        self.conditions = conditions
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index = 0  # batches already yielded in this epoch

    def _order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.showers_NZPR))
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[ShowerBatch]:
        while True:
            order = self._order(self.epoch)
            n_batches = len(order) // self.batch_size
            while self.index < n_batches:
                idx = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
                self.index += 1
                yield ShowerBatch.from_numpy(self.showers_NZPR[idx], self.conditions.subset(idx))
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "order_head": self._order(self.epoch)[:4]}

    def load_state_dict(self, state: dict) -> None:
        epoch = int(state["epoch"])
        if not np.array_equal(np.asarray(state["order_head"]), self._order(epoch)[:4]):
            raise ValueError("stream state does not match this data/seed/rank (different epoch order)")
        self.epoch = epoch
        self.index = int(state["index"])


class TinyDenoiser(nn.Module):
    """A two-layer MLP velocity network conditioned on time and detector (dropout optional)."""

    def __init__(self, n_voxels: int = int(np.prod(MESH)), width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.det_embed = nn.Embedding(len(DETECTORS), 8)
        self.inp = nn.Linear(n_voxels + 8 + 1, width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, n_voxels)

    def forward(self, x_BV: torch.Tensor, t_B: torch.Tensor, det_B: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_BV, self.det_embed(det_B), t_B[:, None]], dim=1)
        return self.out(self.drop(torch.nn.functional.silu(self.norm(self.inp(h)))))


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def denoise_loss(
    module: nn.Module, batch: ShowerBatch, generator: torch.Generator, ctx: LossContext | None = None
) -> torch.Tensor:
    """Conditional flow matching on standardised log-energies: noise and time from ``generator``."""
    device = _device_of(module)
    dtype = next(module.parameters()).dtype
    x1 = torch.log(batch.showers_BZPR.flatten(1).to(device, dtype) + 1e-3) / 5.0
    x0 = torch.randn(x1.shape, generator=generator, device=device, dtype=dtype)
    t = torch.rand(x1.shape[0], generator=generator, device=device, dtype=dtype)
    det = torch.tensor([DETECTORS.index(d) for d in batch.detector], device=device)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    v = module(x_t, t, det)
    return ((v - (x1 - x0)) ** 2).mean(dim=1)


def deterministic_loss(
    module: nn.Module, batch: ShowerBatch, generator: torch.Generator, ctx: LossContext | None = None
) -> torch.Tensor:
    """The same regression without randomness (for exact equivalence tests)."""
    device = _device_of(module)
    dtype = next(module.parameters()).dtype
    x1 = torch.log(batch.showers_BZPR.flatten(1).to(device, dtype) + 1e-3) / 5.0
    t = torch.full((x1.shape[0],), 0.5, device=device, dtype=dtype)
    det = torch.tensor([DETECTORS.index(d) for d in batch.detector], device=device)
    v = module(0.5 * x1, t, det)
    return ((v - x1) ** 2).mean(dim=1)
