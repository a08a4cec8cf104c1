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
    with pytest.raises(ValueError, match=r"no checkpoint verifies: .*trainer_state_rank00000\.pt missing"):
        _trainer(tmp_path).fit()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


# -- reliability drills (issue 15): damaged checkpoints, kills mid-write ----------------------------------
def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the content digest can tell


def test_same_size_corruption_of_the_latest_checkpoint_falls_back_and_the_run_finishes(tmp_path) -> None:
    """Drill 3 (in-process): a byte flipped in the latest checkpoint's weights → the manager skips it, the
    run resumes from the previous checkpoint, re-does the lost steps and ends with the uninterrupted run's
    weights; the damaged checkpoint is replaced by the next good save."""
    reference = _trainer(None)
    reference.fit(max_steps=6)
    first = _trainer(tmp_path, checkpoint_every=2)
    first.fit(max_steps=4)
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root)
    meta = json.loads((root / "step_00000004" / "meta.json").read_text())
    assert set(meta["files"]) == {MODEL_FILE, "optim.pt", "trainer_state_rank00000.pt"}
    assert all(len(v["sha256"]) == 64 for v in meta["files"].values())
    size = (root / "step_00000004" / MODEL_FILE).stat().st_size
    _flip_byte(root / "step_00000004" / MODEL_FILE, size // 2)
    with pytest.raises(ValueError, match=r"model\.pt is damaged \(sha256"):
        manager.verify(root / "step_00000004")
    assert manager.latest() == root / "step_00000004"  # the link still points there ...
    assert manager.resume_point() == root / "step_00000002"  # ... resuming does not

    resumed = _trainer(tmp_path, checkpoint_every=2)
    result = resumed.fit(max_steps=6)
    assert result.resumed_from == root / "step_00000002"
    assert [r["step"] for r in result.history] == [3, 4, 5, 6]  # 2 steps lost, redone
    for pa, pb in zip(resumed.backend.model.parameters(), reference.backend.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for step in (4, 6):
        manager.verify(root / f"step_{step:08d}")  # step 4 re-written: it verifies again


def test_no_checkpoint_verifies_is_an_error_not_a_fresh_start(tmp_path) -> None:
    _trainer(tmp_path, checkpoint_every=2).fit(max_steps=4)
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _flip_byte(root / f"step_{step:08d}" / "optim.pt", 100)
    with pytest.raises(ValueError, match=r"no checkpoint verifies: .*step_00000004.*step_00000002"):
        _trainer(tmp_path, checkpoint_every=2).fit(max_steps=6)


_KILL_MID_WRITE = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)  # as the tests (tests/training/conftest.py)
import test_state as t
from caloforge.training.torch_backend import TorchBackend

class KilledMidWrite(TorchBackend):
    saves = 0
    def save(self, directory):
        KilledMidWrite.saves += 1
        super().save(directory)
        if KilledMidWrite.saves == 2:  # the model and optimizer files of step 4 are written: die now
            os.kill(os.getpid(), signal.SIGKILL)

t._trainer(Path({run!r}), KilledMidWrite("cpu"), checkpoint_every=2).fit(max_steps=6)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_no_verifying_incomplete_checkpoint(tmp_path) -> None:
    """Drill 2: a training process SIGKILLed while writing checkpoint 4 → nothing incomplete verifies; the
    next run resumes from checkpoint 2 and ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys

    code = _KILL_MID_WRITE.format(tests=str(Path(__file__).parent), run=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root)
    torn = root / ".tmp_step_00000004"
    assert torn.is_dir() and not (torn / "meta.json").exists()
    with pytest.raises(ValueError, match=r"no meta\.json"):
        manager.verify(torn)
    assert [s for s, _ in manager.complete_checkpoints()] == [2]
    assert manager.resume_point() == root / "step_00000002"

    reference = _trainer(None)
    reference.fit(max_steps=6)
    resumed = _trainer(tmp_path, checkpoint_every=2)
    assert resumed.fit(max_steps=6).resumed_from == root / "step_00000002"
    for pa, pb in zip(resumed.backend.model.parameters(), reference.backend.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not list(root.glob(".tmp_*"))  # the torn write is gone after the next good save
