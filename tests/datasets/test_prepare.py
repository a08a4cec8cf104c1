"""``caloforge.datasets.prepare``: one seed convention for simulated data (``caloforge data simulate --seed
7`` and ``data.simulate.seed: 7`` give bitwise-identical showers) and the shard directory of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from caloforge.datasets.formats import native
from caloforge.datasets.prepare import SimulateConfig, detector_seed, prepare_shards, simulate_and_shard
from caloforge.datasets.shards import Manifest, ShardConfig
from caloforge.datasets.simulator.cli import register
from caloforge.platform.seeding import Purpose, derive_seed

DETECTORS = ("par04-siw", "pbwo4")
N = 12


def _spec(seed: int = 7) -> SimulateConfig:
    return SimulateConfig(
        detectors=DETECTORS,
        particles=("e-", "pi+"),
        n_per_detector=N,
        energy_gev=(2.0, 50.0),
        log_uniform=True,
        theta_deg=(80.0, 100.0),
        phi_deg=(-90.0, 90.0),
        seed=seed,
        shards=ShardConfig(showers_per_shard=8),
    )


def _cli(out: Path, seed: int) -> None:
    parser = argparse.ArgumentParser(prog="caloforge data")
    register(parser.add_subparsers(dest="data_command"))
    argv = [
        "simulate",
        "--detector",
        ",".join(DETECTORS),
        "--particles",
        "e-,pi+",
        "--n",
        str(N),
        "--energy-gev",
        "2:50",
        "--log-uniform",
        "--theta-deg",
        "80:100",
        "--phi-deg",
        "-90:90",
        "--seed",
        str(seed),
        "--no-progress",
        "--out",
        str(out),
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0


def test_cli_seed_and_config_seed_give_identical_showers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli(tmp_path / "cli", seed=7)
    capsys.readouterr()
    shard_dir = simulate_and_shard(_spec(seed=7), tmp_path / "run" / "data")
    assert Manifest.load(shard_dir).detectors == sorted(DETECTORS)
    for i, name in enumerate(DETECTORS):
        a = native.read(tmp_path / "cli" / f"{name}.h5")
        b = native.read(tmp_path / "run" / "data" / "raw" / f"{name}.h5")
        assert a.seed == b.seed == detector_seed(7, i) == derive_seed(7, Purpose.SIMULATE, i)
        assert a.showers_NZPR.dtype == np.float32 and a.showers_NZPR.tobytes() == b.showers_NZPR.tobytes()
        for field in ("energy_mev", "theta_rad", "phi_rad", "pdg", "detector"):
            np.testing.assert_array_equal(getattr(a.conditions, field), getattr(b.conditions, field))
        assert a.showers_NZPR.sum() > 0 and len(np.unique(a.conditions.pdg)) == 2
    first = native.read(tmp_path / "cli" / f"{DETECTORS[0]}.h5").showers_NZPR
    _cli(tmp_path / "cli8", seed=8)
    assert native.read(tmp_path / "cli8" / f"{DETECTORS[0]}.h5").showers_NZPR.tobytes() != first.tobytes()


def test_prepare_shards_simulates_once_and_passes_given_shards_through(tmp_path: Path) -> None:
    spec = _spec()
    shard_dir = prepare_shards(None, spec, tmp_path / "data")
    manifest = (shard_dir / "manifest.json").read_bytes()
    # a second call reuses the shards (simulating again would be refused: overwrite=False)
    assert prepare_shards(None, spec, tmp_path / "data") == shard_dir
    assert (shard_dir / "manifest.json").read_bytes() == manifest
    assert prepare_shards(shard_dir, None, tmp_path / "elsewhere") == shard_dir
    assert not (tmp_path / "elsewhere").exists()
    for shards, simulate in [(None, None), (shard_dir, spec)]:
        with pytest.raises(ValueError, match="exactly one of 'shards'"):
            prepare_shards(shards, simulate, tmp_path / "data")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"detectors": ()}, "at least one detector"),
        ({"detectors": ("pbwo4", "pbwo4")}, "duplicates"),
        ({"particles": ()}, "at least one particle"),
        ({"n_per_detector": 0}, "n_per_detector must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_simulate_config_rejects_bad_blocks(kwargs: dict, message: str) -> None:
    base = {"detectors": ("pbwo4",), "particles": ("e-",)}
    with pytest.raises(ValueError, match=message):
        SimulateConfig(**{**base, **kwargs})
