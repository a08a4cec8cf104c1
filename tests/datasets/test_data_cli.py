"""``caloforge data shard | inspect | convert`` end to end through ``caloforge.cli.main`` (real files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloforge.cli import build_parser, main
from caloforge.datasets.formats import calochallenge, native
from caloforge.datasets.shards import Manifest


@pytest.fixture
def native_file(tmp_path: Path, showers_factory) -> Path:
    return native.write(tmp_path / "a.h5", showers_factory(60, detector="det-a", seed=1))


def test_shard_from_command_line_then_inspect(
    tmp_path: Path, native_file: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "shards"
    assert (
        main(["data", "shard", str(native_file), "--out", str(out), "--set", "shards.showers_per_shard=16"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "det-a" in printed and "6×4×3" in printed and "train-split statistics" in printed
    m = Manifest.load(out)
    assert m.counts["train"]["total"] == 48 and max(s.n_samples for s in m.shards("train")) == 16
    assert main(["data", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified 5 shards, 60 showers" in printed and "finite energies, conditions and voxels" in printed
    assert (out / "verified.json").is_file()
    assert "log mean" in printed and "E_tot/E_inc" in printed
    bad = m.shards("train")[0]
    data = bytearray((out / bad.name).read_bytes())
    data[2000] ^= 0xFF
    (out / bad.name).write_bytes(bytes(data))
    assert main(["data", "inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s) in 5 shards" in err and bad.name in err and "sha256 mismatch" in err
    assert main(["data", "inspect", str(out), "--no-verify"]) == 0
    assert main(["data", "shard", str(native_file), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "shard", str(native_file), "--out", str(out), "--overwrite"]) == 0
    assert Manifest.load(out).verify() == []


def test_shard_from_config_with_overrides_and_dry_run(
    tmp_path: Path, native_file: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"out_dir: {tmp_path / 'from_cfg'}\nsources:\n  - path: {native_file}\n    detector: det-a\n"
        "shards:\n  showers_per_shard: 100\n"
    )
    dry = [
        "data",
        "shard",
        "--config",
        str(cfg),
        "--set",
        "shards.seed=7",
        "--set",
        "shards.payload_dtype=float16",
    ]
    assert main([*dry, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert (
        "seed: 7" in printed and "payload_dtype: float16" in printed and "showers_per_shard: 100" in printed
    )
    assert not (tmp_path / "from_cfg").exists()
    assert main(["data", "shard", "--config", str(cfg), "--set", "shards.seed=7"]) == 0
    m = Manifest.load(tmp_path / "from_cfg")
    assert m.payload_dtype == "float32" and m.data["config"]["seed"] == 7
    assert main(["data", "shard", "--config", str(cfg), "--set", "shards.showers_per_shard=zero"]) == 2
    assert "shards.showers_per_shard: expected int, got 'zero'" in capsys.readouterr().err
    assert main(["data", "shard", "--out", str(tmp_path / "x"), f"{native_file}:calochallenge:det-a"]) == 2
    assert "a.h5: unknown detector 'det-a'" in capsys.readouterr().err


def test_convert_between_formats(
    tmp_path: Path, native_file: Path, detector_yaml, capsys: pytest.CaptureFixture
) -> None:
    det = detector_yaml("det-a")
    cc = tmp_path / "cc.h5"
    assert (
        main(["data", "convert", str(native_file), str(cc), "--to", "calochallenge", "--chunk-size", "16"])
        == 0
    )
    assert "wrote 60 showers" in capsys.readouterr().out
    with h5py.File(cc, "r") as f:
        assert f["incident_energies"].shape == (60, 1) and f["incident_energies"].dtype == np.float64
        assert f["showers"].shape == (60, 72)
    back = tmp_path / "back.h5"
    assert main(["data", "convert", str(cc), str(back), "--detector", str(det), "--particle", "gamma"]) == 0
    original, again = native.read(native_file), native.read(back)
    np.testing.assert_array_equal(again.showers_NZPR, original.showers_NZPR)
    np.testing.assert_array_equal(again.conditions.energy_mev, original.conditions.energy_mev)
    assert np.all(again.conditions.pdg == 22) and again.metadata["input_format"] == "calochallenge"
    assert main(["data", "convert", str(cc), str(back), "--detector", str(det)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["data", "convert", str(cc), str(tmp_path / "n.h5"), "--detector", "nope"]) == 2
    assert "unknown detector 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "n.h5").exists() and not (tmp_path / "n.h5.tmp").exists()
    part = tmp_path / "part.h5"
    args = ["data", "convert", str(cc), str(part), "--to", "calochallenge", "--write-calibration", "2"]
    assert main([*args, "--start", "10", "--max-showers", "5"]) == 0
    got = calochallenge.read(part, det, calibration=1.0)
    np.testing.assert_allclose(got.showers_NZPR, 2 * original.showers_NZPR[10:15], rtol=1e-6)


def test_data_group_help_and_simulate_registration(capsys: pytest.CaptureFixture) -> None:
    assert main(["data"]) == 2
    assert "shard" in capsys.readouterr().out
    parser = build_parser()
    data_parser = parser._subparsers._group_actions[0].choices["data"]
    commands = set(data_parser._subparsers._group_actions[0].choices)
    assert {"shard", "inspect", "convert"} <= commands
    if importlib.util.find_spec("caloforge.datasets.simulator.cli") is not None:
        assert "simulate" in commands
