"""Which checkpoint a restarted worker group resumes from, on real files in a run's storage (issue 15):
Ray's latest when it verifies, else the newest older one that does; torn uploads of a dead worker group are
removed; re-reported steps never overwrite a directory that is still there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caloforge.pretrain.rundir import RunDir
from caloforge.training.ray.checkpoints import (
    COMPLETE_DIR,
    RayCheckpointManager,
    choose_resume_checkpoint,
    remove_incomplete_checkpoints,
    verify_checkpoint,
)
from caloforge.training.state import file_digests


def _write(run: RunDir, step: int, world: int = 2, name: str | None = None, ranks: tuple[int, ...] = (0, 1)):
    """A checkpoint laid out as RayCheckpointManager + ray.train.report leave it (each rank's files and
    marker; meta.json from rank 0)."""
    d = run.local_path / (name or f"checkpoint_{step:08d}")
    for rank in ranks:
        part = d.parent / f".part{rank}"
        part.mkdir(parents=True)
        (part / f"trainer_state_rank{rank:05d}.pt").write_bytes(bytes([step, rank]) * 64)
        if rank == 0:
            meta = {"format_version": 1, "step": step, "world_size": world, "metrics": {}}
            (part / "meta.json").write_text(json.dumps(meta))
        marker = {"rank": rank, "step": step, "world_size": world, "files": file_digests(part)}
        (part / COMPLETE_DIR).mkdir()
        (part / COMPLETE_DIR / f"rank{rank:05d}.json").write_text(json.dumps(marker))
        for f in part.rglob("*"):
            if f.is_file():
                (d / f.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
                f.rename(d / f.relative_to(part))
        for sub in sorted(part.rglob("*"), reverse=True):
            sub.rmdir()
        part.rmdir()
    return d


def test_latest_that_verifies_is_used_else_the_newest_older_one(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path), "r")
    for step in (2, 4, 6):
        _write(run, step)
    six = run.local_path / "checkpoint_00000006"
    assert choose_resume_checkpoint(run, six, six.name, tmp_path / "scratch") == (six.name, six)
    # Ray recorded only checkpoint 4 (its group died before the controller heard of 6): 6 is complete
    four = run.local_path / "checkpoint_00000004"
    assert choose_resume_checkpoint(run, four, four.name, tmp_path / "scratch") == (six.name, six)
    assert choose_resume_checkpoint(run, None, None, tmp_path / "scratch") == (six.name, six)
    assert choose_resume_checkpoint(RunDir(str(tmp_path), "empty"), None, None, tmp_path / "s") is None
    state = six / "trainer_state_rank00001.pt"
    data = bytearray(state.read_bytes())
    data[5] ^= 0xFF
    state.write_bytes(bytes(data))  # same size, other content
    with pytest.raises(ValueError, match=r"rank 1: trainer_state_rank00001\.pt is damaged \(sha256"):
        verify_checkpoint(six)
    chosen = choose_resume_checkpoint(run, six, six.name, tmp_path / "scratch")
    assert chosen == (four.name, four)
    (four / "trainer_state_rank00000.pt").write_bytes(b"x")
    assert choose_resume_checkpoint(run, six, six.name, tmp_path / "scratch")[0] == "checkpoint_00000002"
    (run.local_path / "checkpoint_00000002" / "meta.json").unlink()
    with pytest.raises(
        ValueError, match=r"no checkpoint of the run verifies: .*00000006.*00000004.*00000002"
    ):
        choose_resume_checkpoint(run, six, six.name, tmp_path / "scratch")


def test_torn_uploads_are_removed_and_re_reported_steps_get_fresh_names(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path), "r")
    _write(run, 2)
    _write(run, 4, ranks=(0,))  # rank 1 died before its part and marker arrived
    _write(run, 6, ranks=(1,))  # no meta.json
    _write(run, 8)
    (run.local_path / "checkpoint_00000008" / "trainer_state_rank00000.pt").write_bytes(b"damaged")
    removed = remove_incomplete_checkpoints(run, keep="checkpoint_00000002")
    assert removed == ["checkpoint_00000004", "checkpoint_00000006"]
    assert run.ray_checkpoints() == ["checkpoint_00000002", "checkpoint_00000008"]  # damaged 8: Ray's

    manager = RayCheckpointManager(tmp_path / "staging", rank=0, world_size=2)
    manager.taken = set(run.ray_checkpoints())
    assert manager.dir_name(4) == "checkpoint_00000004"
    assert manager.dir_name(8) == "checkpoint_00000008_r1"  # never overwrite the damaged one in place
    manager.taken.add("checkpoint_00000008_r1")
    assert manager.dir_name(8) == "checkpoint_00000008_r2"
