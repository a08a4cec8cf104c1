"""Seeds derived from (seed, purpose, index), so every random draw of an evaluation is reproducible and
independent of the order in which metrics run (docs/development.md: determinism)."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed from ``numpy.random.SeedSequence([seed, crc32(purpose), index])``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode()), int(index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def rng(seed: int, purpose: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, index))
