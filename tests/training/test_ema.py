"""EMA warm-up decay, the update rule, fp32 shadows, apply/restore and state round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caloforge.training.config import EMAConfig
from caloforge.training.ema import EMA, ema_decay


def test_warmup_decay_sequence() -> None:
    cfg = EMAConfig(decay=0.999, warmup=True)
    assert ema_decay(cfg, 0) == pytest.approx(0.1)
    assert ema_decay(cfg, 1) == pytest.approx(2 / 11)
    assert ema_decay(cfg, 90) == pytest.approx(91 / 100)
    # (1 + t) / (10 + t) reaches 0.999 at t = 8990
    assert ema_decay(cfg, 8989) < 0.999 and ema_decay(cfg, 8990) == pytest.approx(0.999)
    assert ema_decay(cfg, 10**6) == 0.999
    assert ema_decay(EMAConfig(decay=0.9, warmup=False), 0) == 0.9
    with pytest.raises(ValueError):
        ema_decay(cfg, -1)


def test_update_matches_the_recurrence_and_skips_frozen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[1].bias.requires_grad_(False)
    ema = EMA(model, EMAConfig(decay=0.5, warmup=True))
    assert "1.bias" not in ema.shadow
    assert set(EMA(model, EMAConfig(), trainable=[model[0].weight]).shadow) == {"0.weight"}
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (t + 1))
        d = ema.update(model)
        assert d == pytest.approx(min(0.5, (1 + t) / (10 + t)))
        for n, p in model.named_parameters():
            if p.requires_grad:
                expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s, expected[n], rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 4


def test_fp32_shadow_for_bf16_model_and_apply_restores() -> None:
    model = nn.Linear(4, 2).to(torch.bfloat16)
    ema = EMA(model, EMAConfig(decay=0.9))
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    raw = model.weight.detach().clone()
    with ema.apply(model) as m:
        assert m is model
        torch.testing.assert_close(model.weight.float(), ema.shadow["weight"].to(torch.bfloat16).float())
        assert not torch.equal(model.weight, raw)
        with pytest.raises(RuntimeError, match="re-entrant"), ema.apply(model):
            pass
    assert torch.equal(model.weight, raw)


def test_state_dict_round_trip_and_mismatch() -> None:
    model = nn.Linear(2, 2)
    ema = EMA(model, EMAConfig())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    fresh = EMA(nn.Linear(2, 2), EMAConfig())
    fresh.load_state_dict(ema.state_dict())
    assert fresh.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(fresh.shadow[n], ema.shadow[n])
    with pytest.raises(ValueError, match="shape"):
        EMA(nn.Linear(2, 3), EMAConfig()).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="differ"):
        EMA(nn.Sequential(nn.Linear(2, 2)), EMAConfig()).load_state_dict(ema.state_dict())
