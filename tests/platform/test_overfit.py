"""A debug model overfits a handful of fixed showers with a plain AdamW loop, for both objectives."""

from __future__ import annotations

import pytest
import torch
from toy_models import SMALL_MESH, make_model, toy_showers

from caloforge.platform.objectives import make_objective

STEPS = 80
REPEAT = 8  # each optimizer step sees the 4 showers 8 times with fresh noise / times


def eval_loss(model, objective: str, x1: torch.Tensor, ct, seed: int = 1234) -> float:
    """Loss on fixed draws (same generator seed before and after training), so the comparison is exact."""
    with torch.no_grad():
        return float(make_objective(objective)(model, x1, ct, torch.Generator().manual_seed(seed)).mean())


@pytest.mark.parametrize("objective", ["edm", "flow_matching"])  # trained from data alone
def test_loss_drops_when_overfitting_four_showers(objective: str) -> None:
    model = make_model(objective, scramble=False)
    showers, cond = toy_showers(4, SMALL_MESH, seed=77)
    x1 = model.to_model_space(showers).repeat(REPEAT, 1, 1, 1)
    ct = model.encode_conditions(cond).index(torch.arange(4).repeat(REPEAT))
    before = eval_loss(model, objective, x1, ct)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        loss = make_objective(objective)(model, x1, ct, gen).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    after = eval_loss(model, objective, x1, ct)
    assert after < 0.6 * before, (before, after)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
