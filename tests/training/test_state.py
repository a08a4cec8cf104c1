"""Checkpoint contents, atomicity under a crash mid-save, discovery of `latest`, pruning and RNG states."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import InMemoryStream, TinyDenoiser, denoise_loss, make_showers

from caloforge.training.config import EMAConfig, LoopConfig, OptimConfig
from caloforge.training.loop import Trainer
from caloforge.training.state import CheckpointManager, capture_rng, decode_state, encode_state, restore_rng
from caloforge.training.torch_backend import MODEL_FILE, TorchBackend

SHOWERS, COND = make_showers(64, seed=2)
CFG = LoopConfig(
    steps=6,
    batch_size=4,
    grad_accum=1,
    log_every=1,
    seed=1,
    optim=OptimConfig(lr=1e-2),
    ema=EMAConfig(decay=0.9),
)


class DiskFullBackend(TorchBackend):
    """A TorchBackend whose ``fail_on``-th save dies half-way through writing the weights (ENOSPC)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__("cpu")
        self.fail_on = fail_on
        self.saves = 0

    def save(self, directory: Path) -> None:
        self.saves += 1
        if self.saves != self.fail_on:
            super().save(directory)
            return
        directory.mkdir(parents=True, exist_ok=True)
        full = directory / "full.pt"
        torch.save(self.model.state_dict(), full)
        (directory / MODEL_FILE).write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        full.unlink()
        raise OSError(errno.ENOSPC, "No space left on device")


def _trainer(run_dir: Path | None, backend: TorchBackend | None = None, **kw) -> Trainer:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    stream = InMemoryStream(SHOWERS, COND, 4, seed=7)
    cfg = LoopConfig(**{**CFG.__dict__, **kw})
    checkpoints = CheckpointManager(Path(run_dir) / "checkpoints") if run_dir is not None else None
    return Trainer(
        TinyDenoiser(), denoise_loss, backend or TorchBackend("cpu"), stream, cfg, checkpoints=checkpoints
    )


def test_encode_decode_round_trip() -> None:
    state = {
        "a": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "b": (np.float64(1.5), np.int64(3), [np.array([True, False])]),
        "c": torch.ones(2),
        "d": None,
    }
    out = decode_state(encode_state(state))
    assert out["a"].dtype == np.uint32 and np.array_equal(out["a"], state["a"])
    assert out["b"][0] == 1.5 and type(out["b"][1]) is int and np.array_equal(out["b"][2][0], [True, False])
    assert torch.equal(out["c"], state["c"]) and out["d"] is None
    with pytest.raises(ValueError, match="cannot store"):
        encode_state({"x": object()})


def test_rng_capture_restore_through_weights_only_file(tmp_path) -> None:
    saved = capture_rng()
    torch.save(encode_state(saved), tmp_path / "rng.pt")
    expected = (random.random(), np.random.random(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(decode_state(torch.load(tmp_path / "rng.pt", weights_only=True)))
    got = (random.random(), np.random.random(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path) -> None:
    reference = _trainer(None)
    reference.fit(max_steps=4)

    crashing = _trainer(tmp_path, DiskFullBackend(fail_on=2), checkpoint_every=2)
    with pytest.raises(OSError, match="No space left"):
        crashing.fit(max_steps=4)  # saves at 2 (fine), dies while saving at 4
    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_00000004" / MODEL_FILE).is_file()  # the torn write is there ...
    assert not (root / "step_00000004").exists()  # ... but never under a checkpoint name
    assert (root / "latest").resolve().name == "step_00000002"
    assert CheckpointManager(root).latest() == root / "step_00000002"

    resumed = _trainer(tmp_path, checkpoint_every=2)
    result = resumed.fit(max_steps=4)
    assert result.resumed_from == root / "step_00000002"
    for pa, pb in zip(resumed.backend.model.parameters(), reference.backend.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_latest_discovery_ignores_incomplete_and_survives_a_lost_link(tmp_path) -> None:
    trainer = _trainer(tmp_path, checkpoint_every=1)
    trainer.fit(max_steps=3)
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root)
    torn = root / "step_00000099"  # e.g. a partial copy: no meta.json
    torn.mkdir()
    (torn / MODEL_FILE).write_bytes(b"\x00" * 10)
    assert manager.latest() == root / "step_00000003"
    (root / "latest").unlink()
    assert manager.latest() == root / "step_00000003"
    (root / "latest").symlink_to("step_00000042")  # dangling
    assert manager.latest() == root / "step_00000003"
    assert [s for s, _ in manager.complete_checkpoints()] == [1, 2, 3]  # keep_last=3 pruned nothing yet
    trainer2 = _trainer(tmp_path, checkpoint_every=1)
    trainer2.fit(max_steps=5)
    assert [s for s, _ in manager.complete_checkpoints()] == [3, 4, 5]
    assert manager.latest() == root / "step_00000005"
    assert torn.is_dir()  # never committed, never read, and not ours to delete


def test_load_refuses_other_world_size_and_missing_files(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit(max_steps=2)
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(ValueError, match="world_size=2"):
        _trainer(tmp_path).fit()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "trainer_state_rank00000.pt").unlink()
    with pytest.raises(ValueError, match=r"missing trainer_state_rank00000\.pt"):
        _trainer(tmp_path).fit()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
