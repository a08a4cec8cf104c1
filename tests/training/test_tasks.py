"""shower_loss_fn: MeV batch → model space + encoded conditions → platform objective, on a real debug
ShowerModel; and the loop driving it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloforge.datasets.batch import ShowerBatch
from caloforge.datasets.stats import compute_stats
from caloforge.platform.conditioning import Conditions, ConditionVocab
from caloforge.platform.energy import LayerEnergyConfig
from caloforge.platform.objectives import (
    FlowMatchingConfig,
    LossContext,
    ObjectiveConfig,
    make_objective,
)
from caloforge.platform.shower_model import ShowerModel, ShowerModelConfig
from caloforge.training.config import LoopConfig, OptimConfig
from caloforge.training.loop import Trainer
from caloforge.training.state import CheckpointManager
from caloforge.training.tasks import shower_loss_fn
from caloforge.training.torch_backend import TorchBackend

MESH = (6, 4, 3)


def _data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, Conditions]:
    rng = np.random.default_rng(seed)
    energy = rng.uniform(2e3, 2e4, n)
    showers = rng.exponential(1.0, (n, *MESH)) * (energy / 72.0)[:, None, None, None]
    showers[rng.random(showers.shape) < 0.3] = 0.0
    det = np.where(rng.random(n) < 0.5, "det-a", "det-b")
    return showers.astype(np.float32), Conditions.make(
        energy, 0.1, 0.0, np.where(det == "det-a", 11, 211), det
    )


def _model(objective: str = "flow_matching", **config_kwargs) -> ShowerModel:
    showers, cond = _data()
    stats = compute_stats(showers, cond.energy_mev, cond.theta_rad)
    cfg = ShowerModelConfig(
        backbone="debug", parametrisation=objective, sampler="euler", num_steps=4, **config_kwargs
    )
    return ShowerModel.build(cfg, ConditionVocab.create(["det-a", "det-b"], spare_slots=1), stats, MESH)


@pytest.mark.parametrize("objective", ["edm", "flow_matching"])  # trained from data alone
def test_loss_fn_is_the_objective_plus_the_weighted_head_loss(objective: str) -> None:
    model = _model(objective, layer_energy=LayerEnergyConfig(loss_weight=0.25, draws=3))
    showers, cond = _data(8, seed=1)
    batch = ShowerBatch.from_numpy(showers, cond)
    loss_fn = shower_loss_fn(model)
    ctx = LossContext()
    loss_B = loss_fn(model, batch, torch.Generator().manual_seed(3), ctx)
    assert loss_B.shape == (8,) and loss_B.dtype == torch.float32 and torch.isfinite(loss_B).all()
    # One generator, in order: the objective's draws, then the head's (y₀ then t, ``energy_flow_loss``).
    gen = torch.Generator().manual_seed(3)
    x1 = model.transform(torch.from_numpy(showers))
    ct = model.vocab.encode(cond)
    objective_B = make_objective(objective)(model, x1, ct, gen)
    head_B = model.energy_loss(torch.from_numpy(showers), ct, gen)
    torch.testing.assert_close(loss_B, objective_B + 0.25 * head_B, rtol=0, atol=0)
    assert (head_B > 0).all()
    assert list(ctx.terms) == ["voxel", "layer_energy"]  # logged as loss/voxel, loss/layer_energy
    torch.testing.assert_close(ctx.terms["voxel"], objective_B.detach().mean())
    torch.testing.assert_close(ctx.terms["layer_energy"], head_B.detach().mean())
    # The head's draws come after the objective's: drawing them from a fresh generator gives another loss.
    fresh_B = model.energy_loss(torch.from_numpy(showers), ct, torch.Generator().manual_seed(3))
    assert not torch.allclose(fresh_B, head_B)
    loss_B.mean().backward()
    assert model.network.detector_embed.weight.grad is not None
    assert model.energy_head is not None
    head_grads = {n: p.grad for n, p in model.energy_head.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads.values())
    # A fresh head starts as v = 0 (zero output layer), so only the output layer gets a gradient yet.
    nonzero = sorted(n for n, g in head_grads.items() if g.abs().sum() > 0)
    assert nonzero == ["fc_out.bias", "fc_out.weight"]


@pytest.mark.parametrize("objective", ["edm", "flow_matching"])  # trained from data alone
def test_loss_fn_without_the_head_is_the_objective_on_transformed_inputs(objective: str) -> None:
    model = _model(objective, layer_energy=LayerEnergyConfig(enabled=False))
    showers, cond = _data(8, seed=1)
    batch = ShowerBatch.from_numpy(showers, cond)
    ctx = LossContext()
    loss_B = shower_loss_fn(model)(model, batch, torch.Generator().manual_seed(3), ctx)
    assert ctx.terms == {}  # one part: the total says it all
    x1 = model.transform(torch.from_numpy(showers))
    expected = make_objective(objective)(
        model, x1, model.vocab.encode(cond), torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(loss_B, expected, rtol=0, atol=0)
    loss_B.mean().backward()
    assert model.network.detector_embed.weight.grad is not None


def test_the_objective_comes_from_the_job_config_and_mistakes_are_value_errors() -> None:
    model = _model("flow_matching")
    showers, cond = _data(8, seed=1)
    batch = ShowerBatch.from_numpy(showers, cond)
    ot = ObjectiveConfig(name="flow_matching", flow_matching=FlowMatchingConfig(coupling="ot"))
    loss_fn = shower_loss_fn(model, ot)
    assert loss_fn.objective.config.coupling == "ot"  # what trained the weights (for the lineage)
    assert not hasattr(model.config, "flow_matching")  # the model is not changed by the job's choice
    plain = shower_loss_fn(model)(model, batch, torch.Generator().manual_seed(3), LossContext())
    coupled = loss_fn(model, batch, torch.Generator().manual_seed(3), LossContext())
    assert not torch.allclose(plain, coupled)
    with pytest.raises(ValueError, match="cannot train a model with parametrisation='flow_matching'"):
        shower_loss_fn(model, "edm")
    with pytest.raises(ValueError, match="unknown 'score'"):
        shower_loss_fn(model, "score")
    with pytest.raises(ValueError, match="needs a ShowerModel"):
        shower_loss_fn(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected a ShowerBatch"):
        shower_loss_fn(model)(model, torch.zeros(2), torch.Generator(), LossContext())


class _ListStream:
    """A resumable stream over a fixed cycle of batches (enough for a few steps)."""

    def __init__(self, batches: list[ShowerBatch]) -> None:
        self.batches = batches
        self.position = 0

    def __iter__(self):
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def test_trainer_drives_a_shower_model(tmp_path) -> None:
    model = _model("edm")
    showers, cond = _data(32, seed=2)
    batches = [
        ShowerBatch.from_numpy(showers[i : i + 8], cond.subset(slice(i, i + 8))) for i in range(0, 32, 8)
    ]
    cfg = LoopConfig(steps=3, batch_size=8, log_every=1, optim=OptimConfig(lr=1e-3))
    checkpoints = CheckpointManager(tmp_path / "checkpoints")
    trainer = Trainer(
        model, shower_loss_fn(model), TorchBackend("cpu"), _ListStream(batches), cfg, checkpoints=checkpoints
    )
    result = trainer.fit()
    assert result.step == 3 and all(np.isfinite(r["loss"]) for r in result.history)
    averaged = trainer.averaged_model()
    generated = averaged.generate(cond.subset(slice(0, 4)), num_steps=2, seed=1)
    assert generated.shape == (4, *MESH) and np.isfinite(generated).all()
