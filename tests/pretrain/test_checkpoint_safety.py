"""Drill 4 (issue 15): a pickle canary in a DeepSpeed checkpoint file never runs.

A real single-process DeepSpeed ZeRO-2 run (CPU, gloo) saves a checkpoint; its optimizer file is replaced by
a pickle whose unpickling would write a canary file, and — as someone able to write the run's storage could —
the checkpoint's recorded digests are updated to match. Resuming refuses with a ValueError naming the file;
the canary is never written. With the digests left alone the damaged file is refused earlier, by hash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = """
import builtins, json, sys, torch
from pathlib import Path
from torch import nn
torch.set_num_threads(1)
from caloforge.pretrain.config import DeepSpeedOptions
from caloforge.training.deepspeed_backend import DeepSpeedBackend
from caloforge.training.config import LoopConfig, OptimConfig
from caloforge.training.loop import Trainer
from caloforge.training.state import CheckpointManager, file_digests

root, canary = Path(sys.argv[1]), Path(sys.argv[2])
cfg = LoopConfig(steps=4, batch_size=4, grad_accum=1, log_every=1, optim=OptimConfig(lr=1e-2))

class Stream:
    def __init__(self): self.i = 0
    def __iter__(self):
        while True:
            self.i += 1
            g = torch.Generator().manual_seed(self.i)
            yield torch.randn(4, 3, generator=g)
    def state_dict(self): return {"i": self.i}
    def load_state_dict(self, s): self.i = s["i"]

def loss(module, batch, generator, ctx):
    return module(batch).pow(2).mean(dim=1)

def trainer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    backend = DeepSpeedBackend(DeepSpeedOptions(zero_stage=2), "cpu")
    return Trainer(model, loss, backend, Stream(), cfg, checkpoints=CheckpointManager(root))

trainer().fit(max_steps=2)
ckpt = root / "step_00000002"
optim = ckpt / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"

class Canary:
    def __reduce__(self):
        return (builtins.exec, (f"open({str(canary)!r}, 'w').write('ran')",))

torch.save({"optimizer_state_dict": Canary()}, optim)
out = {}
try:
    trainer().fit()
except ValueError as exc:
    out["by_hash"] = str(exc)
meta = json.loads((ckpt / "meta.json").read_text())
meta["files"] = file_digests(ckpt, exclude=("meta.json",))  # the attacker rewrites the digests too
(ckpt / "meta.json").write_text(json.dumps(meta))
try:
    trainer().fit()
except ValueError as exc:
    out["by_unpickler"] = str(exc)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_pickle_canary_in_a_deepspeed_checkpoint_never_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "checkpoints"), str(canary)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert not canary.exists()  # neither attempt built the object
    assert "no checkpoint verifies" in out["by_hash"]
    assert "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt has" in out["by_hash"]
    refused = out["by_unpickler"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to unpickle it" in refused
    assert "it needs exec," in refused


@pytest.mark.slow  # importing deepspeed takes seconds
def test_genuine_deepspeed_files_need_only_the_allowed_globals(tmp_path: Path) -> None:
    """The weights-only engine loads tensors/containers and the three allowed classes, nothing else."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from caloforge.training.deepspeed_backend import weights_only_checkpoint_engine

    path = tmp_path / "optim.pt"
    state = {
        "zero_stage": ZeroStageEnum.gradients,
        "loss_scaler": LossScaler(1.0),
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
        "state": {"exp_avg": torch.ones(4)},
    }
    torch.save(state, path)
    engine = weights_only_checkpoint_engine()
    loaded = engine.load(str(path), map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"].numel == 4
    torch.save({"x": os.getcwd}, path)  # any other global is refused, naming the file
    with pytest.raises(ValueError, match=r"optim\.pt: refused to unpickle it"):
        engine.load(str(path), map_location="cpu")
