"""The one seed derivation of CaloForge: every seed that is not given by the user is derived here from
(seed, purpose, index...) through ``numpy.random.SeedSequence`` (stable across platforms and numpy
versions), so the same config and seed give the same bytes (docs/development.md: determinism).

- :func:`seed_sequence` ``(seed, *keys)``: the ``SeedSequence`` with entropy ``[seed, *keys]`` — the only
  place one is built. Keys are non-negative ints or strings; a string is hashed stably (the first 8 bytes
  of its UTF-8 SHA-256, little-endian; never Python's randomised ``hash``).
- :func:`derive_seed` ``(seed, *keys) -> int``: one 63-bit seed (the sequence's first two 32-bit state
  words, high word first).
- :func:`derive_seeds` ``(seed, n, purpose) -> (n,) int64``: n per-item seeds of one purpose (the first n
  64-bit state words, each shifted right by one); entry i depends only on (seed, purpose, i), not on n.
  This is the seed convention of ``ShowerModel.generate`` and of the ONNX export (shower i of ``seed``
  gets ``derive_seeds(seed, N)[i]``), so it is kept as it was.
- :func:`rng` ``(seed, *keys) -> numpy.random.Generator`` (identical to ``numpy.random.default_rng([seed,
  *keys])``) and :func:`torch_generator` ``(seed, *keys)`` (a ``torch.Generator`` seeded with
  ``derive_seed``).

``derive_seed(seed, p)`` is not ``derive_seeds(seed, 1, p)[0]`` (two readings of the same sequence, both
kept bit-identical to the draws that existing runs, the golden loss curve and exported models rely on).

**Purposes** (:class:`Purpose`) are the first key after the seed; each has one fixed key layout, listed
in the table. numpy pads entropy shorter than its pool (4 words) with zeros, so ``(seed, p)`` and
``(seed, p, 0)`` give the same sequence: never use one purpose with two layouts. The values are historical
(changing one changes the draws of existing commands); a new purpose takes a value not yet in
:data:`PURPOSES`. ``LOSS`` and ``SHARD_SPLIT`` share the value 1 (their layouts differ in length: 5 and 3
words, so their sequences differ).
"""

from __future__ import annotations

import hashlib
import operator
from typing import Final

import numpy as np
import torch

__all__ = ["PURPOSES", "Purpose", "derive_seed", "derive_seeds", "rng", "seed_sequence", "torch_generator"]

_MASK_63 = (1 << 63) - 1


class Purpose:
    """Named purposes: ``<caller>: <derivation and key layout>``."""

    # training/loop.py: derive_seed(loop.seed, LOSS, rank, step, micro) seeds the loss_fn's generator
    LOSS: Final = 1
    # training/run.py: derive_seed(loop.seed, EVAL_LOSS, batch) fixes the noise of the in-loop val loss
    EVAL_LOSS: Final = 0xE7A
    # platform/shower_model.py: derive_seeds(seed, N, GENERATE)[i] is shower i's noise seed in generate()
    GENERATE: Final = 0x67656E
    # registry/export.py (its PARITY_PURPOSE): rng(seed, ONNX_PARITY) conditions and
    # derive_seeds(seed + i, b, ONNX_PARITY) noise seeds of the ONNX parity check
    ONNX_PARITY: Final = 0x6F6E6E78
    # datasets/prepare.py (caloforge data simulate, data.simulate): derive_seed(seed, SIMULATE, i) is the
    # simulator seed of detector i of one call
    SIMULATE: Final = 0x51A
    # datasets/simulator/conditions.py: seed_sequence(seed, spawn_key=(SIMULATE_CONDITIONS,)) draws the
    # sampled conditions (the simulator's chunks use seed_sequence(seed, chunk), no purpose)
    SIMULATE_CONDITIONS: Final = 0xC0DD
    # datasets/shards.py: rng(seed, SHARD_SPLIT, source) assigns train/val/test; rng(seed, SHARD_CHUNK,
    # source, chunk) shuffles the rows of a chunk
    SHARD_SPLIT: Final = 1
    SHARD_CHUNK: Final = 2
    # datasets/streaming.py: rng(seed, STREAM_SHARDS, epoch, group, slot, pass) orders a slot's shards,
    # derive_seed(seed, STREAM_SHUFFLE, epoch, group, slot) seeds its shuffle buffer, rng(seed,
    # STREAM_MIX, epoch, slot) picks the group of each sample or batch
    STREAM_SHARDS: Final = 11
    STREAM_SHUFFLE: Final = 12
    STREAM_MIX: Final = 13


PURPOSES: Final[dict[str, int]] = {k: v for k, v in vars(Purpose).items() if k.isupper()}
"""The purpose table: name → value."""


def _key(key: int | str, what: str) -> int:
    if isinstance(key, str):
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    if isinstance(key, bool):
        raise ValueError(f"{what} must be an integer or a string, got {key!r}")
    try:
        value = operator.index(key)
    except TypeError:
        raise ValueError(f"{what} must be an integer or a string, got {key!r}") from None
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def seed_sequence(seed: int, *keys: int | str, spawn_key: tuple[int, ...] = ()) -> np.random.SeedSequence:
    """``numpy.random.SeedSequence([seed, *keys], spawn_key=spawn_key)``; seed and integer keys must be
    >= 0, string keys are hashed stably. ``spawn_key`` is numpy's child-stream key (only the simulator's
    conditions stream uses it)."""
    if isinstance(seed, str):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    entropy = [_key(seed, "seed"), *(_key(k, f"seed key {i}") for i, k in enumerate(keys))]
    return np.random.SeedSequence(entropy, spawn_key=tuple(_key(k, "spawn key") for k in spawn_key))


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``(seed, *keys)``: the first two 32-bit state words of :func:`seed_sequence`,
    high word first, masked to 63 bits (what the training loop has always drawn with)."""
    words = seed_sequence(seed, *keys).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & _MASK_63


def derive_seeds(seed: int, n: int, purpose: int | str = Purpose.GENERATE) -> np.ndarray:
    """(n,) int64 per-item seeds of ``purpose``: the first n 64-bit state words of ``seed_sequence(seed,
    purpose)``, each shifted right by one (63 bits); entry i depends only on (seed, purpose, i)."""
    if n < 0:
        raise ValueError(f"derive_seeds: n must be >= 0, got {n}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    words = seed_sequence(seed, purpose).generate_state(n, dtype=np.uint64)
    return (words >> np.uint64(1)).astype(np.int64)


def rng(seed: int, *keys: int | str) -> np.random.Generator:
    """``numpy.random.default_rng(seed_sequence(seed, *keys))`` (for integer keys the same generator as
    ``numpy.random.default_rng([seed, *keys])``)."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def torch_generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
