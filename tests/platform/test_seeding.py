"""``caloforge.platform.seeding``: the one seed derivation — pinned values (the golden loss curve, the
``generate``/ONNX seed convention and the shard splits depend on them), stable string keys, and no other
``SeedSequence`` in the package."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from caloforge.platform.seeding import (
    PURPOSES,
    Purpose,
    derive_seed,
    derive_seeds,
    rng,
    seed_sequence,
    torch_generator,
)

PACKAGE = Path(__file__).resolve().parents[2] / "caloforge"


def test_derive_seed_is_the_training_loops_derivation() -> None:
    # pinned: the loop's noise (and so tests/assets/golden_loss_debug.json) is drawn from these
    assert derive_seed(0, Purpose.LOSS, 0, 0, 0) == 2896572098853795976
    assert derive_seed(7, Purpose.SIMULATE, 0) == 1154655831259248913
    assert derive_seed(7, Purpose.SIMULATE, 1) == 8628194238459575389
    for seed, keys in [(0, (1, 0, 0, 0)), (3, (1, 1, 250, 1)), (2**40 + 5, (Purpose.EVAL_LOSS, 9))]:
        words = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
        assert derive_seed(seed, *keys) == ((int(words[0]) << 32) | int(words[1])) & (2**63 - 1)
    seeds = {derive_seed(s, 1, r, st) for s in range(3) for r in range(3) for st in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)


def test_derive_seeds_is_the_generate_seed_convention() -> None:
    # pinned: ShowerModel.generate(seed=0) and the ONNX export's seed convention use these
    assert derive_seeds(0, 3).tolist() == [1632165471887183869, 6772975169673664999, 5306355799365414689]
    words = np.random.SeedSequence([5, Purpose.ONNX_PARITY]).generate_state(4, dtype=np.uint64)
    np.testing.assert_array_equal(
        derive_seeds(5, 4, Purpose.ONNX_PARITY), (words >> np.uint64(1)).astype(np.int64)
    )
    a = derive_seeds(11, 10, "model/generate")
    np.testing.assert_array_equal(a[:4], derive_seeds(11, 4, "model/generate"))
    assert a.dtype == np.int64 and (a >= 0).all() and len(set(a.tolist())) == 10
    assert derive_seeds(11, 0).shape == (0,)
    with pytest.raises(ValueError, match="n must be >= 0"):
        derive_seeds(0, -1)


def test_rng_equals_default_rng_of_the_key_list() -> None:
    for seed, keys in [(0, ()), (4, (Purpose.SHARD_SPLIT, 2)), (9, (Purpose.STREAM_SHARDS, 0, 1, 2, 3))]:
        expected = np.random.default_rng([seed, *keys]).random(6)
        np.testing.assert_array_equal(rng(seed, *keys).random(6), expected)
    np.testing.assert_array_equal(
        rng(17).integers(0, 1000, 5), np.random.default_rng(17).integers(0, 1000, 5)
    )


def test_string_keys_are_hashed_stably() -> None:
    # pinned (sha256-based, not Python's randomised hash): the same in every process and on every platform
    assert derive_seed(7, "fpd/x") == 6765278922136791837
    assert derive_seed(7, "fpd/x") != derive_seed(7, "fpd/y") != derive_seed(8, "fpd/y")
    np.testing.assert_array_equal(rng(1, "floor/split").random(3), rng(1, "floor/split").random(3))


def test_torch_generator_is_seeded_with_derive_seed() -> None:
    a = torch.randn(4, generator=torch_generator(3, Purpose.EVAL_LOSS, 2))
    b = torch.randn(4, generator=torch.Generator().manual_seed(derive_seed(3, Purpose.EVAL_LOSS, 2)))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("seed", "keys", "message"),
    [
        (-1, (), "seed must be >= 0"),
        (0, (1, -2), "seed key 1 must be >= 0"),
        (0, (1.5,), "integer or a string"),
    ],
)
def test_bad_seeds_and_keys_are_refused(seed: int, keys: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        derive_seed(seed, *keys)
    with pytest.raises(ValueError, match=message):
        seed_sequence(seed, *keys)


def test_purpose_table_lists_every_purpose() -> None:
    assert PURPOSES["GENERATE"] == Purpose.GENERATE and len(PURPOSES) == 11
    # one value is shared (historical); their key layouts (5 vs 3 words) keep the sequences apart
    assert Purpose.LOSS == Purpose.SHARD_SPLIT
    assert derive_seed(0, Purpose.LOSS, 0, 0, 0) != derive_seed(0, Purpose.SHARD_SPLIT, 0)
    shared = [v for v in set(PURPOSES.values()) if list(PURPOSES.values()).count(v) > 1]
    assert shared == [1]


def test_seed_sequences_are_built_only_in_the_seeding_module() -> None:
    pattern = re.compile(r"SeedSequence\(")
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "seeding.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
    assert pattern.search((PACKAGE / "platform" / "seeding.py").read_text())
