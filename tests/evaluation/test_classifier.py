"""The classifier two-sample test on distributions whose optimal AUC and likelihood ratio are known."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from caloforge.evaluation.classifier import DNN, two_sample_classifier
from caloforge.evaluation.config import ClassifierConfig

FAST = ClassifierConfig(hidden=16, n_layers=1, lr=5e-3, epochs=12, batch_size=500, patience=4, n_seeds=2)


def gaussians(shift: float, n: int = 4000, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, d))
    gen = rng.normal(size=(n, d))
    ref[:, 0] += shift / 2
    gen[:, 0] -= shift / 2
    return ref, gen


def test_auc_reaches_the_optimal_value_and_weights_estimate_the_density_ratio() -> None:
    ref, gen = gaussians(shift=1.0)
    res = two_sample_classifier(ref, gen, FAST, seed=0, purpose="test/shifted")
    optimal = norm.cdf(1.0 / math.sqrt(2.0))  # AUC of the likelihood ratio for N(±½, 1): Φ(Δ/√2) = 0.760
    assert res.auc == pytest.approx(optimal, abs=0.03)
    assert len(res.aucs) == 2 and res.auc_std < 0.03
    # w = C/(1−C) ≈ p_ref/p_gen, so E_gen[w] = 1 and log w ≈ x₀ (here log p_ref/p_gen = Δ·x₀ with Δ = 1)
    assert np.mean(res.weights_gen) == pytest.approx(1.0, abs=0.1)
    assert np.median(np.log(res.weights_ref)) > 0 > np.median(np.log(res.weights_gen))
    m = res.metrics("high")
    assert m["auc_high"] == res.auc and m["auc_high_std"] == res.auc_std
    assert m["cls_high/w_gen_q05"] < m["cls_high/w_gen_q50"] < m["cls_high/w_gen_q95"]
    assert 0.0 < m["cls_high/jsd"] < 1.0
    assert m["cls_high/n_train_per_class"] == 0.6 * 4000


def test_identical_distributions_give_auc_one_half_and_runs_are_reproducible() -> None:
    ref, gen = gaussians(shift=0.0, n=3000, seed=1)
    a = two_sample_classifier(ref, gen, FAST, seed=3, purpose="test/null")
    b = two_sample_classifier(ref, gen, FAST, seed=3, purpose="test/null")
    assert a.aucs == b.aucs  # same seed, same numbers
    assert 0.45 < a.auc < 0.55
    assert np.quantile(a.weights_gen, 0.05) > 0.5 and np.quantile(a.weights_gen, 0.95) < 2.0
    c = two_sample_classifier(ref, gen, replace(FAST, n_seeds=1), seed=4, purpose="test/null")
    assert c.aucs[0] != a.aucs[0]
    # dropout draws from torch's global RNG, which the classifier seeds (and restores) itself
    with_dropout = replace(FAST, n_seeds=1, dropout=0.3)
    state = torch.random.get_rng_state()
    d1 = two_sample_classifier(ref, gen, with_dropout, seed=5, purpose="test/null")
    torch.manual_seed(1234)
    d2 = two_sample_classifier(ref, gen, with_dropout, seed=5, purpose="test/null")
    assert d1.aucs == d2.aucs
    torch.random.set_rng_state(state)


def test_architecture_follows_the_official_dnn() -> None:
    net = DNN(input_dim=10, hidden=512, n_layers=2, dropout=0.0)
    linear = [m for m in net.modules() if m.__class__.__name__ == "Linear"]
    assert [(m.in_features, m.out_features) for m in linear] == [(10, 512), (512, 512), (512, 512), (512, 1)]
    default = ClassifierConfig()
    assert (default.hidden, default.n_layers, default.lr, default.epochs, default.batch_size) == (
        512,
        2,
        2e-4,
        50,
        1000,
    )


def test_bad_inputs_are_rejected() -> None:
    ref, gen = gaussians(shift=0.0, n=50)
    with pytest.raises(ValueError, match="equal D"):
        two_sample_classifier(ref, gen[:, :2], FAST, seed=0, purpose="x")
    with pytest.raises(ValueError, match="too few"):
        two_sample_classifier(ref[:3], gen[:3], FAST, seed=0, purpose="x")
    with pytest.raises(ValueError, match="split"):
        ClassifierConfig(split=(0.5, 0.5, 0.5))
